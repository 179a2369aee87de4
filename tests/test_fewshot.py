"""Few-shot contexts and fast-binding episodes: what a query sees, and where each image lands."""

import dataclasses
import json
import random
import re
import string

import pytest
import torch

from mmgpt.data.collate import collate
from mmgpt.data.episodes import (
    STRING_ALPHABET, STRING_LENGTHS, SYLLABLES, UNSEEN_LETTERS, from_list, made_up_words, pick_categories, pick_words,
    pieces, training_words,
)
from mmgpt.data.eval_records import read_eval_items
from mmgpt.data.records import RecordError, parse_record
from mmgpt.data.scenes import COLOURS
from mmgpt.data.shapes import pair_question, write_shapes
from mmgpt.fewshot import few_shot_items
from mmgpt.images import load_image

from conftest import training_episodes


@pytest.fixture(scope="module")
def icl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("icl")
    write_shapes(folder, seed=3, train=30, eval=14, episodes=30, eval_episodes=4, ways=2, per_way=5)
    return folder


@pytest.fixture(scope="module")
def strings_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("icl-strings")
    write_shapes(folder, seed=4, train=10, eval=7, episodes=300, eval_episodes=6, per_way=2, episode_words="strings",
                 copy_drills=200)
    return folder


def pictures_and_words(content):
    """[(picture, word)] of an episode document: each picture and the line that follows it."""
    assert [part["type"] for part in content] == ["image", "text"] * (len(content) // 2)
    return [(content[i]["image"], content[i + 1]["text"]) for i in range(0, len(content), 2)]


def examples_of(item, query):
    """The solved examples in a few-shot item, as (images, answer): chat turns or document lines before the query."""
    before = item.prompt[: len(item.prompt) - len(query.prompt)]
    if query.is_document:
        return [([image], word) for image, word in pictures_and_words(before)]
    return [(image_of(before[i]), before[i + 1]["content"]) for i in range(0, len(before), 2)]


def image_of(message):
    return [part["image"] for part in message["content"] if part["type"] == "image"]


@pytest.mark.parametrize("shots", [1, 2, 4])
def test_episode_examples_come_from_the_query_episode_k_per_word_never_the_query(icl_dir, shots):
    queries = read_eval_items(icl_dir / "episodes-eval.jsonl")
    assert len(queries) == 4 * 2 * 5
    episode_images = {}
    for query in queries:
        episode_images.setdefault(query.episode, set()).update(query.images)
    for query, item in zip(queries, few_shot_items(queries, queries, shots, seed=0)):
        examples = examples_of(item, query)
        answers = [answer for _, answer in examples]
        words = {q.answer for q in queries if q.episode == query.episode}
        assert len(words) == 2 and sorted(answers) == sorted(list(words) * shots)
        shown = [image for images, _ in examples for image in images]
        assert len(shown) == len(set(shown)) == 2 * shots
        assert not set(shown) & set(query.images)
        assert set(shown) <= episode_images[query.episode]
        solved = {q.images[0]: q.answer for q in queries}
        assert all(solved[images[0]] == answer for images, answer in examples)  # each picture with its own word
        assert item.prompt[-1] == query.prompt[-1] and item.answer == query.answer


def test_plain_records_get_exactly_k_examples_and_the_draw_is_seeded(icl_dir):
    queries = read_eval_items(icl_dir / "eval.jsonl")
    first = few_shot_items(queries, queries, 3, seed=0)
    again = few_shot_items(list(reversed(queries)), queries, 3, seed=0)[::-1]  # order and batching do not matter
    other = few_shot_items(queries, queries, 3, seed=1)
    for query, item in zip(queries, first):
        examples = examples_of(item, query)
        assert len(examples) == 3
        assert not {image for images, _ in examples for image in images} & set(query.images)
    assert [item.prompt for item in first] == [item.prompt for item in again]
    assert [item.prompt for item in first] != [item.prompt for item in other]


def test_support_file_is_used_instead_of_the_queries(icl_dir):
    queries = read_eval_items(icl_dir / "eval.jsonl")[:3]
    support = read_eval_items(icl_dir / "eval.jsonl")[3:]
    support_images = {image for item in support for image in item.images}
    for query, item in zip(queries, few_shot_items(queries, support, 2)):
        assert {image for images, _ in examples_of(item, query) for image in images} <= support_images


def test_too_many_shots_for_an_episode_is_an_error_naming_it(icl_dir):
    queries = read_eval_items(icl_dir / "episodes-eval.jsonl")
    with pytest.raises(ValueError, match="episode 'episode-0000' has too few other examples"):
        few_shot_items(queries, queries, 5)  # 5 per word, one of them the query: at most 4 shots


def test_held_out_words_never_appear_in_training(icl_dir):
    training_words, held_out_words = made_up_words()
    assert held_out_words and not set(training_words) & set(held_out_words)
    assert "zero" not in training_words + held_out_words  # the one shapes-world word of their form
    train_text = (icl_dir / "train.jsonl").read_text()
    train_words = {word.strip() for episode in training_episodes(icl_dir) for _, word in pictures_and_words(episode["content"])}
    held_out_answers = {item.answer for item in read_eval_items(icl_dir / "episodes-eval.jsonl")}
    assert train_words <= set(training_words) and held_out_answers <= set(held_out_words)
    assert len(held_out_answers) == 4 * 2  # fresh words in every episode
    assert not {word for word in held_out_answers if re.search(rf"\b{word}\b", train_text)}


def test_training_episodes_bind_each_word_to_one_category_right_after_its_picture(icl_dir):
    episodes = training_episodes(icl_dir)
    assert len(episodes) == 30
    for episode in episodes:
        pairs = pictures_and_words(episode["content"])
        assert len(pairs) == 9 and all(word.isalpha() for _, word in pairs)  # the word alone, nothing between
        category_of = {}
        for image, word in pairs:
            pixels = load_image(icl_dir / image).convert("RGB")
            colours = {colour for count, colour in pixels.getcolors(64 * 64) if colour != (255, 255, 255) and count > 40}
            assert len(colours) == 1  # one object, in its category's colour
            assert category_of.setdefault(word, colours) == colours
        assert len(category_of) == 2 and len({frozenset(c) for c in category_of.values()}) == 2


def test_episode_ways_mixes_training_episodes_and_leaves_the_held_out_sets_as_they_are(tmp_path, icl_dir):
    write_shapes(tmp_path, seed=3, train=4, eval=7, episodes=60, eval_episodes=4, ways=2, per_way=5,
                 episode_ways=(2, 3, 4))
    ways = [len({word for _, word in pictures_and_words(e["content"])}) for e in training_episodes(tmp_path)]
    assert len(ways) == 60 and set(ways) == {2, 3, 4}
    assert (tmp_path / "episodes-eval.jsonl").read_text() == (icl_dir / "episodes-eval.jsonl").read_text()
    with pytest.raises(ValueError, match="ways must be between 2 and .* got 9"):
        write_shapes(tmp_path, train=1, eval=1, episode_ways=(2, 9))


@pytest.mark.parametrize("ways", [2, 3, 5])
def test_an_episode_s_categories_and_words_are_told_apart_by_every_part(ways):
    """Categories differ in colour (and in shape while shapes last); words share no syllable, so none can be
    spliced from two others."""
    rng = random.Random(ways)
    training_words, _ = made_up_words()
    for _ in range(200):
        categories = pick_categories(rng, ways)
        assert len({colour for colour, _ in categories}) == ways
        assert len({shape for _, shape in categories}) == min(ways, 3)
        words = pick_words(rng, from_list(training_words), ways)
        syllables = [word[i : i + 2] for word in words for i in (0, 2)]
        assert len(set(syllables)) == 2 * ways and len({word[0] for word in words}) == ways


def test_string_episodes_draw_fresh_words_of_training_letters_only(strings_dir):
    """Words of one to eight letters, new in every episode, never a held-out word: naming them takes copying. No
    training word has an unseen letter."""
    episodes = training_episodes(strings_dir)
    assert len(episodes) == 300
    words_of = [{word for _, word in pictures_and_words(episode["content"])} for episode in episodes]
    words = set().union(*words_of)
    assert all(len(episode_words) == 2 for episode_words in words_of)
    assert {len(word) for word in words} == set(STRING_LENGTHS)
    characters = set("".join(words))
    assert characters == set(STRING_ALPHABET) and not characters & set(UNSEEN_LETTERS)
    long_words = [word for episode_words in words_of for word in episode_words if len(word) >= 4]
    assert len(set(long_words)) > 0.95 * len(long_words)  # re-drawn every episode (short ones repeat by chance)
    assert not words & set(made_up_words()[1])


def test_alphabet_words_use_every_letter_but_never_a_held_out_word():
    """The `alphabet` form: every letter, the unseen ones included, but never a word of unseen letters alone (every
    unseen-letter held-out word is one) nor a held-out syllable word."""
    rng = random.Random(5)
    episode_draw = training_words("alphabet")
    words = [word for _ in range(400) for word in pick_words(rng, episode_draw(rng), 3)]
    assert set("".join(words)) == set(string.ascii_lowercase) and {len(word) for word in words} == set(STRING_LENGTHS)
    assert not [word for word in words if set(word) <= set(UNSEEN_LETTERS) or word in made_up_words()[1]]
    with pytest.raises(ValueError, match="episode word form must be one of syllables, strings, alphabet, got 'runes'"):
        training_words("runes")


def test_copy_drills_repeat_a_list_of_words_of_every_letter_and_never_a_held_out_word(strings_dir):
    records = map(json.loads, (strings_dir / "train.jsonl").read_text().splitlines())
    drills = [r["content"][0]["text"] for r in records if "content" in r and len(r["content"]) == 1
              and r["content"][0]["type"] == "text"]
    assert len(drills) == 200
    words = set()
    for drill in drills:
        lines = drill.split("\n")
        assert len(lines) == 12 and lines[:6] == lines[6:] and all(line.isalpha() for line in lines)
        words.update(lines)
    assert set("".join(words)) == set(string.ascii_lowercase)
    assert not {word for word in words if set(word) <= set(UNSEEN_LETTERS)}
    held_out = {item.answer for name in ("letters", "3way", "4way", "5way")
                for item in read_eval_items(strings_dir / f"episodes-eval-{name}.jsonl")}
    assert held_out and not held_out & words


def test_held_out_sets_are_what_no_lookup_of_training_pieces_can_pass(strings_dir):
    """Unseen letters: no letter of theirs is in any training word of either form; other lengths: 1, 3 and 4
    syllables; N-way: N words an episode, each told apart by its first letter."""
    def episodes_of(name):
        by_episode = {}
        for item in read_eval_items(strings_dir / name):
            by_episode.setdefault(item.episode, []).append(item)
        return list(by_episode.values())

    training_syllable_words = made_up_words()[0]
    for name, ways in [("episodes-eval-letters.jsonl", 2), ("episodes-eval-3way.jsonl", 3),
                       ("episodes-eval-4way.jsonl", 4), ("episodes-eval-5way.jsonl", 5)]:
        episodes = episodes_of(name)
        assert len(episodes) == 6
        for items in episodes:
            words = {item.answer for item in items}
            assert len(items) == 2 * ways and len(words) == ways and len({word[0] for word in words}) == ways
            assert all(set(word) <= set(UNSEEN_LETTERS) and len(word) == 4 for word in words)
            assert {item.kind for item in items} == {f"{ways}-way, unseen letters"}
    assert not set(UNSEEN_LETTERS) & set("".join(training_syllable_words + SYLLABLES))
    lengths = {}
    for items in episodes_of("episodes-eval-lengths.jsonl"):
        for item in items:
            assert all(piece in SYLLABLES for piece in pieces(item.answer))
            lengths.setdefault(item.kind, set()).add(len(item.answer) // 2)
    assert lengths == {"2-way, 1 syllable": {1}, "2-way, 3 syllables": {3}, "2-way, 4 syllables": {4}}


def test_two_image_questions_have_the_right_answers():
    rng = random.Random(0)
    answers = {"more": [], "same colour": []}
    for kind in answers:
        for _ in range(200):
            (first, second), question, answer = pair_question(rng, kind)
            if kind == "more":
                assert len(first) != len(second) and answer == ("first" if len(first) > len(second) else "second")
            else:
                assert len(first) == len(second) == 1 and first[0].colour in COLOURS
                assert answer == ("yes" if first[0].colour == second[0].colour else "no")
            answers[kind].append(answer)
    for kind, given in answers.items():
        assert 0.4 < max(given.count(a) for a in set(given)) / len(given) < 0.6, kind  # balanced: no answer prior


def test_each_image_of_a_few_shot_context_fills_its_own_slot(tiny, icl_dir):
    processor, model = tiny
    queries = read_eval_items(icl_dir / "episodes-eval.jsonl")
    item = few_shot_items(queries, queries, 2)[0]
    sample = parse_record({"content": item.prompt})
    encoded = processor.encode(sample, add_generation_prompt=True)
    images = sample.images
    assert encoded.input_ids[-1] == processor.special.image_end  # left open, ready for the query's word
    assert len(images) == 2 * 2 + 1 and encoded.num_images == len(images)
    ids = torch.tensor(encoded.input_ids)
    starts = (ids == processor.special.image_start).nonzero().flatten().tolist()
    assert len(starts) == len(images)
    batch = collate([encoded], processor.special.pad, "left")
    with torch.no_grad():
        embedded = model.embed_with_images(batch["input_ids"], batch["pixel_values"])
        for slot, start in enumerate(starts):
            span = slice(start + 1, start + 1 + processor.num_image_tokens)
            assert (ids[span] == processor.special.image).all() and ids[span.stop] == processor.special.image_end
            pixels = processor.transform(load_image(images[slot])).unsqueeze(0)  # the slot-th image of the context
            alone = model.get_image_features(pixels)[0]
            torch.testing.assert_close(embedded[0, span], alone.to(embedded.dtype))


def test_a_document_eval_record_without_an_answer_is_an_error_naming_its_line(icl_dir):
    bad = icl_dir / "no-answer.jsonl"
    bad.write_text(json.dumps({"content": [{"type": "image", "image": "images/episodes-eval000000.png"}]}) + "\n")
    with pytest.raises(RecordError, match="no-answer.jsonl line 1: a document eval record needs an 'answer'"):
        read_eval_items(bad)


def test_a_document_query_never_takes_chat_examples(icl_dir):
    documents = [dataclasses.replace(read_eval_items(icl_dir / "episodes-eval.jsonl")[0], episode=None)]
    chats = read_eval_items(icl_dir / "eval.jsonl")
    with pytest.raises(ValueError, match="a document query cannot take solved examples of the other form"):
        few_shot_items(documents, chats, 1)
