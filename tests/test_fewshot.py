"""Few-shot contexts and fast-binding episodes: what a query sees, and where each image lands."""

import json
import random
import re

import pytest
import torch

from mmgpt.data.collate import collate
from mmgpt.data.episodes import made_up_words, pick_categories, pick_words
from mmgpt.data.eval_records import normalise, read_eval_items
from mmgpt.data.records import parse_record
from mmgpt.data.scenes import COLOURS
from mmgpt.data.shapes import pair_question, write_shapes
from mmgpt.fewshot import few_shot_items
from mmgpt.images import load_image


@pytest.fixture(scope="module")
def icl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("icl")
    write_shapes(folder, seed=3, train=30, eval=14, episodes=30, eval_episodes=4, ways=2, per_way=5, copies=20)
    return folder


def training_chats(folder):
    """(fast-binding episodes, text-only copy questions) of a train.jsonl."""
    chats = [r for r in map(json.loads, (folder / "train.jsonl").read_text().splitlines()) if "messages" in r]
    episodes = [r for r in chats if isinstance(r["messages"][0]["content"], list)
                and r["messages"][0]["content"][0].get("text", "").endswith('"?')]
    return episodes, [r for r in chats if isinstance(r["messages"][0]["content"], str)]


def examples_of(item, query):
    """The solved examples in a few-shot item: every user message before the query's own, with its answer."""
    messages = item.messages[: len(item.messages) - len(query.messages)]
    return [(messages[i], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]


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
        answers = [normalise(answer) for _, answer in examples]
        words = {normalise(q.answer) for q in queries if q.episode == query.episode}
        assert len(words) == 2 and sorted(answers) == sorted(list(words) * shots)
        shown = [image for message, _ in examples for image in image_of(message)]
        assert len(shown) == len(set(shown)) == 2 * shots
        assert not set(shown) & set(query.images)
        assert set(shown) <= episode_images[query.episode]
        assert item.messages[-1] == query.messages[-1] and item.answer == query.answer


def test_plain_records_get_exactly_k_examples_and_the_draw_is_seeded(icl_dir):
    queries = read_eval_items(icl_dir / "eval.jsonl")
    first = few_shot_items(queries, queries, 3, seed=0)
    again = few_shot_items(list(reversed(queries)), queries, 3, seed=0)[::-1]  # order and batching do not matter
    other = few_shot_items(queries, queries, 3, seed=1)
    for query, item in zip(queries, first):
        examples = examples_of(item, query)
        assert len(examples) == 3
        assert not {image for message, _ in examples for image in image_of(message)} & set(query.images)
    assert [item.messages for item in first] == [item.messages for item in again]
    assert [item.messages for item in first] != [item.messages for item in other]


def test_support_file_is_used_instead_of_the_queries(icl_dir):
    queries = read_eval_items(icl_dir / "eval.jsonl")[:3]
    support = read_eval_items(icl_dir / "eval.jsonl")[3:]
    support_images = {image for item in support for image in item.images}
    for query, item in zip(queries, few_shot_items(queries, support, 2)):
        assert {image for message, _ in examples_of(item, query) for image in image_of(message)} <= support_images


def test_too_many_shots_for_an_episode_is_an_error_naming_it(icl_dir):
    queries = read_eval_items(icl_dir / "episodes-eval.jsonl")
    with pytest.raises(ValueError, match="episode 'episode-0000' has too few other examples"):
        few_shot_items(queries, queries, 5)  # 5 per word, one of them the query: at most 4 shots


def test_held_out_words_never_appear_in_training(icl_dir):
    training_words, held_out_words = made_up_words()
    assert held_out_words and not set(training_words) & set(held_out_words)
    assert "zero" not in training_words + held_out_words  # the one shapes-world word of their form
    episodes, copies = training_chats(icl_dir)
    train_answers = {episode["messages"][-1]["content"] for episode in episodes}
    held_out_answers = {item.answer for item in read_eval_items(icl_dir / "episodes-eval.jsonl")}
    assert train_answers <= set(training_words) and held_out_answers <= set(held_out_words)
    assert len(held_out_answers) == 4 * 2  # fresh words in every episode
    texts = [part if isinstance(part, str) else part.get("text", "") for chat in episodes + copies
             for message in chat["messages"] for part in ([message["content"]] if isinstance(message["content"], str)
                                                           else message["content"])]
    offered = {word for text in texts for word in re.findall(r'"(\w+)"', text)}
    assert train_answers <= offered and not offered & set(held_out_words)


def test_training_episodes_bind_each_word_to_one_category(icl_dir):
    episodes, _ = training_chats(icl_dir)
    assert len(episodes) == 30
    for episode in episodes:
        words = [m["content"] for m in episode["messages"] if m["role"] == "assistant"]
        questions = [m["content"][0]["text"] for m in episode["messages"] if m["role"] == "user"]
        assert len(set(words)) == 2 and len(words) == 9  # every episode has repeats to answer
        for question in questions:
            assert sorted(question.rstrip("?").replace(" or ", ", ").split(", ")) == sorted(f'"{w}"' for w in set(words))


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
        syllables = [word[i : i + 2] for word in pick_words(rng, training_words, ways) for i in (0, 2)]
        assert len(set(syllables)) == 2 * ways


def test_copy_questions_name_the_word_they_ask_for_from_training_words_only(icl_dir):
    training_words, _ = made_up_words()
    _, copies = training_chats(icl_dir)
    assert len(copies) == 20
    picked = []
    for record in copies:
        question, answer = record["messages"][0]["content"], record["messages"][1]["content"]
        options, ordinal = question.split("? The ")
        words = [word.strip('"') for word in options.split(" or ")]
        assert set(words) <= set(training_words) and len(set(words)) == 2
        assert answer == words[{"first.": 0, "second.": 1}[ordinal]]
        picked.append(ordinal)
    assert set(picked) == {"first.", "second."}


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
    sample = parse_record({"messages": item.messages})
    encoded = processor.encode(sample, add_generation_prompt=True)
    images = sample.images
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
