"""Fast-binding episodes, after Frozen (Tsimpoukelli et al. 2021): made-up words bound to visual categories inside
one context only.

An episode picks N categories (a colour and a shape; no two share a colour) and N made-up words, and is one
interleaved document: pictures of the categories (varied in size and place), each followed by its word and nothing
else ("[picture]dako[picture]zupi[picture]dako..."). A category's first word can only be guessed; every later one
can be named by looking back for the earlier picture like it and copying the word that followed it. The word
follows its picture at once and the next picture follows the word: every token more in a turn (a line break after
the word, a chat's role markers) put binding off by hundreds to thousands of steps in a small decoder trained from
scratch (`benchmarks/binding_steps.py`, README "Few-shot").

Training words are drawn afresh for every episode, as two consonant-vowel syllables (`syllables`) or as random
strings of one to eight letters (`strings`: any but the unseen letters; `alphabet`: any, never a word of unseen
letters alone). A model trained on syllable words can pass a test of new pairings of known syllables by looking
pieces up; the held-out sets (`held_out_sets`) add what a lookup cannot pass: words of letters that no training
word is made of, words of other lengths, and 3- to 5-way episodes.
"""

from __future__ import annotations

import itertools
import random
import string
from dataclasses import dataclass
from typing import Callable

from mmgpt.data.scenes import COLOURS, SHAPES, ImageWriter, draw_object

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SYLLABLES = ["".join(pair) for pair in itertools.product(CONSONANTS, VOWELS)]
UNSEEN_LETTERS = "chjqwy"  # no training word is made of them alone; each is in the shapes world's text
UNSEEN = frozenset(UNSEEN_LETTERS)
STRING_ALPHABET = "".join(sorted(set(string.ascii_lowercase) - set(UNSEEN_LETTERS)))
STRING_LENGTHS = range(1, 9)
WORLD_WORDS = {"zero"}  # the one word of the shapes world with the syllable form
HELD_OUT_SHARE = 0.2
WORD_FORMS = ("syllables", "strings", "alphabet")

Draw = Callable[[random.Random], str]


def made_up_words() -> tuple[list[str], list[str]]:
    """(training words, held-out words): every two-syllable consonant-vowel word ("dako", "zupi"), split once with
    a fixed seed so that every data set agrees which words are held out. Every syllable is in training words, so a
    held-out word is a new pairing of known pieces: the model can copy it, but cannot have learnt it."""
    words = sorted({first + second for first in SYLLABLES for second in SYLLABLES} - WORLD_WORDS)
    random.Random("made-up-words").shuffle(words)
    held_out = int(len(words) * HELD_OUT_SHARE)
    return sorted(words[held_out:]), sorted(words[:held_out])


HELD_OUT_WORDS = frozenset(made_up_words()[1])


def pieces(word: str) -> list[str]:
    """The word's two-letter pieces at even offsets: its syllables, for syllable words."""
    return [word[i : i + 2] for i in range(0, len(word), 2)]


def pick_words(rng: random.Random, draw: Draw, ways: int) -> list[str]:
    """`ways` words from `draw` that differ in their first letter and share no piece, so the first token of an
    answer tells the words apart and no word can be spliced from two ("muku", "gege": "muge")."""
    while True:
        words = [draw(rng) for _ in range(ways)]
        parts = [part for word in words for part in pieces(word)]
        if len({word[0] for word in words}) == ways and len(set(parts)) == len(parts):
            return words


def from_list(words: list[str]) -> Draw:
    return lambda rng: rng.choice(words)


def syllable_words(count: int) -> Draw:
    """Words of `count` consonant-vowel syllables."""
    return lambda rng: "".join(rng.choice(SYLLABLES) for _ in range(count))


def letter_strings(letters: str, lengths: range | tuple[int, ...],
                   allowed: Callable[[str], bool] = lambda word: True) -> Draw:
    """Random strings over `letters`, of a length drawn from `lengths`, each one that `allowed` accepts."""
    def draw(rng: random.Random) -> str:
        while True:
            word = "".join(rng.choice(letters) for _ in range(rng.choice(lengths)))
            if allowed(word):
                return word
    return draw


def never_held_out(word: str) -> bool:
    """Whether a word may be in training: not a held-out two-syllable word, and not made of unseen letters alone
    (every unseen-letter held-out word is), so no held-out word is ever in training."""
    return word not in HELD_OUT_WORDS and not set(word) <= UNSEEN


def small_alphabet_strings(letters: str, fewest: int) -> Callable[[random.Random], Draw]:
    """Given an episode's (or a drill's) rng: strings of one to eight letters of `fewest` to all of `letters`,
    drawn for it, never held out. A small alphabet makes the words share letters, as held-out words of six letters
    do, so a copy must follow the word it began, not its last letter alone."""
    return lambda rng: letter_strings("".join(rng.sample(letters, rng.randint(fewest, len(letters)))),
                                      STRING_LENGTHS, never_held_out)


def training_words(form: str) -> Callable[[random.Random], Draw]:
    """How a training episode draws its words, given the episode's rng, so that copying is the only way to name
    them: `syllables` (two syllables, the training share of `made_up_words`); `strings` (of 6 to 20 of
    `STRING_ALPHABET`'s letters: the unseen letters are never bound to a picture); `alphabet` (of 7 to 26 letters
    of the whole alphabet, so always one that is not unseen). Strings are new every episode and no piece recurs
    often enough to be learnt."""
    if form == "syllables":
        training = made_up_words()[0]
        return lambda rng: from_list(training)
    if form == "strings":
        return small_alphabet_strings(STRING_ALPHABET, 6)
    if form == "alphabet":
        return small_alphabet_strings(string.ascii_lowercase, 7)
    raise ValueError(f"episode word form must be one of {', '.join(WORD_FORMS)}, got {form!r}")


@dataclass(frozen=True)
class HeldOutKind:
    """One kind of held-out episode: its name in `mmgpt eval`'s table, its ways, and how its words are drawn."""

    name: str
    ways: int
    draw: Draw


def held_out_sets(ways: int) -> dict[str, list[HeldOutKind]]:
    """File name -> the kinds of episode it holds (episodes cycle over the kinds). `episodes-eval.jsonl` is new
    pairings of known syllables (`ways`-way); the others cannot be passed by a lookup of known pieces."""
    held_out = made_up_words()[1]
    unseen = letter_strings(UNSEEN_LETTERS, (4,))
    return {
        "episodes-eval.jsonl": [HeldOutKind(f"{ways}-way, new pairings", ways, from_list(held_out))],
        "episodes-eval-letters.jsonl": [HeldOutKind("2-way, unseen letters", 2, unseen)],
        "episodes-eval-lengths.jsonl": [HeldOutKind(f"2-way, {count} syllable{'s' * (count > 1)}", 2,
                                                    syllable_words(count)) for count in (1, 3, 4)],
        **{f"episodes-eval-{n}way.jsonl": [HeldOutKind(f"{n}-way, unseen letters", n, unseen)] for n in (3, 4, 5)},
    }


def pick_categories(rng: random.Random, ways: int) -> list[tuple[str, str]]:
    """`ways` categories of different colours, each with its own shape (shapes repeat only past three)."""
    shapes = rng.sample(SHAPES, len(SHAPES))
    return [(colour, shapes[index % len(SHAPES)]) for index, colour in enumerate(rng.sample(list(COLOURS), ways))]


def _shown(writer: ImageWriter, rng: random.Random, category: tuple[str, str]) -> dict:
    return {"type": "image", "image": writer.save(draw_object(*category, rng))}


def training_episode(writer: ImageWriter, rng: random.Random, draw: Draw, ways: int = 2, turns: int = 9) -> dict:
    """One interleaved document of `turns` pictures over `ways` categories in random order, every one shown at
    least once, each picture followed by its word. Every picture after a category's first is itself a few-shot
    query, so one document teaches all the context lengths that eval asks (9 pictures: a 2-way 4-shot query) with
    the most answerable words per token and no padding."""
    categories, words = pick_categories(rng, ways), pick_words(rng, draw, ways)
    order = list(range(ways)) + [rng.randrange(ways) for _ in range(turns - ways)]
    rng.shuffle(order)
    content = []
    for index in order:
        content += [_shown(writer, rng, categories[index]), {"type": "text", "text": words[index]}]
    return {"content": content}


def copy_drill(rng: random.Random, words: int = 6) -> dict:
    """Plain text, no picture: `words` random words of one to eight letters, one a line, then the same list again.
    The second half can only be written by copying the first, so the decoder practises copying every letter, the
    unseen ones included, as a language model does from the text it is trained on. Each drill draws its words from
    7 to 26 letters of the alphabet, as `alphabet` episodes do, so words often share letters and a copy must keep
    its place. No drill word is held out or made of unseen letters alone."""
    draw = training_words("alphabet")(rng)
    listed = [draw(rng) for _ in range(words)]
    return {"content": [{"type": "text", "text": "\n".join(listed + listed)}]}


def held_out_episodes(writer: ImageWriter, rng: random.Random, kinds: list[HeldOutKind], episodes: int,
                      per_way: int) -> list[dict]:
    """`per_way` one-picture queries per category and episode, tagged with their episode and kind (episodes cycle
    over `kinds`): the few-shot evaluation draws each query's solved examples from the other records of its
    episode and writes them before it, each picture followed by its word, as in training."""
    records = []
    for episode in range(episodes):
        kind = kinds[episode % len(kinds)]
        categories, words = pick_categories(rng, kind.ways), pick_words(rng, kind.draw, kind.ways)
        for category, word in zip(categories, words):
            for _ in range(per_way):
                records.append({"content": [_shown(writer, rng, category)], "answer": word, "kind": kind.name,
                                "episode": f"episode-{episode:04d}"})
    return records
