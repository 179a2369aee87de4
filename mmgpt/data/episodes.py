"""Fast-binding episodes, after Frozen (Tsimpoukelli et al. 2021): made-up words bound to visual categories inside
one context only.

An episode picks N categories (a colour and a shape; no two share a colour) and N made-up words that share no
syllable. Each turn asks '"dako" or "zupi"?' (all N words, in a fresh order) about one image of one category (varied
in size and place); the answer is the word bound to that category in this episode. A category's first sight can
only be guessed; every later one can be answered by looking back. Words change from episode to episode, and held-out episodes use only words that no training episode
uses, so a model can answer them only by binding in context.
"""

from __future__ import annotations

import itertools
import random

from mmgpt.data.scenes import COLOURS, SHAPES, ImageWriter, draw_object

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SYLLABLES = ["".join(pair) for pair in itertools.product(CONSONANTS, VOWELS)]
WORLD_WORDS = {"zero"}  # the one word of the shapes world with this form
HELD_OUT_SHARE = 0.2


def made_up_words() -> tuple[list[str], list[str]]:
    """(training words, held-out words): every two-syllable consonant-vowel word ("dako", "zupi"), split once with
    a fixed seed so that every data set agrees which words are held out. Every syllable is in training words, so a
    held-out word is a new pairing of known pieces: the model can copy it, but cannot have learnt it."""
    words = sorted({first + second for first in SYLLABLES for second in SYLLABLES} - WORLD_WORDS)
    random.Random("made-up-words").shuffle(words)
    held_out = int(len(words) * HELD_OUT_SHARE)
    return sorted(words[held_out:]), sorted(words[:held_out])


def pick_words(rng: random.Random, vocabulary: list[str], ways: int) -> list[str]:
    """`ways` words that share no syllable, so each syllable of an answer has one continuation in the context and a
    word cannot be spliced from two ("muku", "gege": "muge")."""
    while True:
        words = rng.sample(vocabulary, ways)
        syllables = [word[i : i + 2] for word in words for i in (0, 2)]
        if len(set(syllables)) == len(syllables):
            return words


def options_question(words: list[str]) -> str:
    """'"dako" or "zupi"?' / '"dako", "zupi" or "mite"?': short, since every turn asks it and tokens are most of a
    step's cost. The quotes make each word the same tokens in the question as in the answer (no leading space), so naming
    it is copying it."""
    named = [f'"{word}"' for word in words]
    return f"{', '.join(named[:-1])} or {named[-1]}?"


def pick_categories(rng: random.Random, ways: int) -> list[tuple[str, str]]:
    """`ways` categories of different colours, each with its own shape (shapes repeat only past three)."""
    shapes = rng.sample(SHAPES, len(SHAPES))
    return [(colour, shapes[index % len(SHAPES)]) for index, colour in enumerate(rng.sample(list(COLOURS), ways))]


def _turn(writer: ImageWriter, rng: random.Random, category: tuple[str, str], word: str, words: list[str]) -> list[dict]:
    """One solved example: the question naming every word, an image of the category, and the bound word. The image
    comes last in its turn so that the word follows it closely, as a name follows what it names."""
    image = writer.save(draw_object(*category, rng))
    options = rng.sample(words, len(words))
    return [
        {"role": "user", "content": [{"type": "text", "text": options_question(options)}, {"type": "image", "image": image}]},
        {"role": "assistant", "content": word},
    ]


def training_episode(writer: ImageWriter, rng: random.Random, vocabulary: list[str], ways: int = 2,
                     turns: int = 9) -> dict:
    """One chat of `turns` turns over `ways` categories in random order, every one shown at least once. Every
    prefix is itself a few-shot query, so one long episode teaches all the context lengths that eval asks (9
    turns: a 2-way 4-shot query) with the most answerable turns per token and no padding."""
    categories, words = pick_categories(rng, ways), pick_words(rng, vocabulary, ways)
    order = list(range(ways)) + [rng.randrange(ways) for _ in range(turns - ways)]
    rng.shuffle(order)
    messages = [message for index in order for message in _turn(writer, rng, categories[index], words[index], words)]
    return {"messages": messages}


ORDINALS = ("first", "second", "third", "fourth", "fifth")  # so at most 5-way


def copy_question(rng: random.Random, vocabulary: list[str], ways: int = 2) -> dict:
    """A text-only chat, '"dako" or "zupi"? The second.' -> 'zupi': picking an offered word and copying it, the
    half of an episode's answer that needs no picture, taught cheaply (no image, a dozen tokens)."""
    words = pick_words(rng, vocabulary, ways)
    index = rng.randrange(ways)
    question = f"{options_question(words)} The {ORDINALS[index]}."
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": words[index]}]}


def held_out_episodes(writer: ImageWriter, rng: random.Random, vocabulary: list[str], episodes: int, ways: int,
                  per_way: int) -> list[dict]:
    """`per_way` one-question chats per category and episode, tagged with their episode: the few-shot evaluation
    draws each query's solved examples from the other records of its episode."""
    records = []
    for episode in range(episodes):
        categories, words = pick_categories(rng, ways), pick_words(rng, vocabulary, ways)
        for category, word in zip(categories, words):
            for _ in range(per_way):
                records.append({"messages": _turn(writer, rng, category, word, words), "kind": f"{ways}-way binding",
                                "episode": f"episode-{episode:04d}"})
    return records
