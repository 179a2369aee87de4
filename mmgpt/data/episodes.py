"""Fast-binding episodes, after Frozen (Tsimpoukelli et al. 2021): made-up words bound to visual categories inside
one context only.

An episode picks N categories (a colour and a shape) and N made-up words. Each turn shows one image of one category
(varied in size and place) and asks 'Is this a "dax" or a "wug"?' (all N words, in a fresh order); the answer is the word bound to that category in
this episode. A category's first sight can only be guessed; every later one can be answered by looking back. Words
change from episode to episode, and held-out episodes use only words that no training episode uses, so a model can
answer them only by binding in context.
"""

from __future__ import annotations

import itertools
import random

from mmgpt.data.scenes import COLOURS, SHAPES, ImageWriter, draw_object

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
WORLD_WORDS = {"red", "top", "two", "dot", "bed", "mat", "pat", "sat", "set"}  # real words a made-up word must not be
HELD_OUT_SHARE = 0.2


def made_up_words() -> tuple[list[str], list[str]]:
    """(training words, held-out words): every consonant-vowel-consonant word and its two-syllable extension, split
    once with a fixed seed so that every data set agrees which words are held out."""
    short = ["".join(letters) for letters in itertools.product(CONSONANTS, VOWELS, CONSONANTS)]
    long = [word + vowel + consonant for word in short[::7] for vowel in VOWELS for consonant in CONSONANTS[::3]]
    words = sorted(set(short + long) - WORLD_WORDS)
    random.Random("made-up-words").shuffle(words)
    held_out = int(len(words) * HELD_OUT_SHARE)
    return sorted(words[held_out:]), sorted(words[:held_out])


def options_question(words: list[str]) -> str:
    """'Is this a "dax" or a "wug"?' / 'Is this a "dax", a "wug" or a "zib"?' The quotes make each word the same
    tokens in the question as in the answer (no leading space), so naming it is copying it."""
    named = [f'a "{word}"' for word in words]
    return f"Is this {', '.join(named[:-1])} or {named[-1]}?"


def _categories(rng: random.Random, ways: int) -> list[tuple[str, str]]:
    return rng.sample([(colour, shape) for colour in COLOURS for shape in SHAPES], ways)


def _turn(writer: ImageWriter, rng: random.Random, category: tuple[str, str], word: str, words: list[str]) -> list[dict]:
    """One solved example: the question naming every word, an image of the category, and the bound word. The image
    comes last in its turn so that the word follows it closely, as a name follows what it names."""
    image = writer.save(draw_object(*category, rng))
    options = rng.sample(words, len(words))
    return [
        {"role": "user", "content": [{"type": "text", "text": options_question(options)}, {"type": "image", "image": image}]},
        {"role": "assistant", "content": word},
    ]


def training_episode(writer: ImageWriter, rng: random.Random, vocabulary: list[str], max_turns: int = 10) -> dict:
    """One chat: 2- or 3-way, ways+1 to `max_turns` turns, categories in random order (every one shown at least once)."""
    ways = rng.choice((2, 3))
    categories, words = _categories(rng, ways), rng.sample(vocabulary, ways)
    order = list(range(ways)) + [rng.randrange(ways) for _ in range(rng.randint(1, max_turns - ways))]
    rng.shuffle(order)
    messages = [message for index in order for message in _turn(writer, rng, categories[index], words[index], words)]
    return {"messages": messages}


def held_out_episodes(writer: ImageWriter, rng: random.Random, vocabulary: list[str], episodes: int, ways: int,
                  per_way: int) -> list[dict]:
    """`per_way` one-question chats per category and episode, tagged with their episode: the few-shot evaluation
    draws each query's solved examples from the other records of its episode."""
    records = []
    for episode in range(episodes):
        categories, words = _categories(rng, ways), rng.sample(vocabulary, ways)
        for category, word in zip(categories, words):
            for _ in range(per_way):
                records.append({"messages": _turn(writer, rng, category, word, words), "kind": f"{ways}-way binding",
                                "episode": f"episode-{episode:04d}"})
    return records
