"""Fast-binding episodes, after Frozen (Tsimpoukelli et al. 2021): made-up words bound to visual categories inside
one context only.

An episode picks N categories (a colour and a shape; no two share a colour) and N made-up words that share no
syllable, and is one interleaved document: pictures of the categories (varied in size and place), each followed
by its word and nothing else ("[picture]dako[picture]zupi[picture]dako..."). A category's first word can only be
guessed; every later one can be named by looking back for the earlier picture like it. Words change from episode to
episode, and held-out episodes use only words that no training episode uses, so a model can name them only by
binding in context. The word follows its picture at once and the next picture follows the word: every token more
in a turn (a line break after the word, a chat's role markers) put binding off by hundreds to thousands of steps in
a small decoder trained from scratch (`benchmarks/binding_steps.py`, README "Few-shot").
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


def pick_categories(rng: random.Random, ways: int) -> list[tuple[str, str]]:
    """`ways` categories of different colours, each with its own shape (shapes repeat only past three)."""
    shapes = rng.sample(SHAPES, len(SHAPES))
    return [(colour, shapes[index % len(SHAPES)]) for index, colour in enumerate(rng.sample(list(COLOURS), ways))]


def _shown(writer: ImageWriter, rng: random.Random, category: tuple[str, str]) -> dict:
    return {"type": "image", "image": writer.save(draw_object(*category, rng))}


def training_episode(writer: ImageWriter, rng: random.Random, vocabulary: list[str], ways: int = 2,
                     turns: int = 9) -> dict:
    """One interleaved document of `turns` pictures over `ways` categories in random order, every one shown at
    least once, each picture followed by its word. Every picture after a category's first is itself a few-shot
    query, so one document teaches all the context lengths that eval asks (9 pictures: a 2-way 4-shot query) with
    the most answerable words per token and no padding."""
    categories, words = pick_categories(rng, ways), pick_words(rng, vocabulary, ways)
    order = list(range(ways)) + [rng.randrange(ways) for _ in range(turns - ways)]
    rng.shuffle(order)
    content = []
    for index in order:
        content += [_shown(writer, rng, categories[index]), {"type": "text", "text": words[index]}]
    return {"content": content}


def held_out_episodes(writer: ImageWriter, rng: random.Random, vocabulary: list[str], episodes: int, ways: int,
                      per_way: int) -> list[dict]:
    """`per_way` one-picture queries per category and episode, tagged with their episode: the few-shot evaluation
    draws each query's solved examples from the other records of its episode and writes them before it, each
    picture followed by its word, as in training."""
    records = []
    for episode in range(episodes):
        categories, words = pick_categories(rng, ways), pick_words(rng, vocabulary, ways)
        for category, word in zip(categories, words):
            for _ in range(per_way):
                records.append({"content": [_shown(writer, rng, category)], "answer": word,
                                "kind": f"{ways}-way binding", "episode": f"episode-{episode:04d}"})
    return records
