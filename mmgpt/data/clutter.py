"""Worlds with other statistics than the shapes world, for checking that a recipe learns more than one set.

Like a small image-QA set a user brings: question-answer chats only (no captions, no documents), objects of
varied size anywhere in the picture, overlapping and rotated, on coloured or textured backgrounds, colours with
near neighbours in hue, and answer priors that are strongly skewed in training. The held-out questions are
balanced by answer within each kind, so a model that answers from the prior scores chance there, and only
looking pays.

Three styles share the questions and differ in everything drawn: `clutter` (filled shapes on pale or textured
grounds) and `sketch` (outlines on dark or noisy grounds, another palette, more objects), which recipes were tuned
on, and `tiles` (filled shapes with a dark edge on shaded or checked grounds, a third palette, hexagons), kept for
checking a recipe on a world it was not tuned on.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from mmgpt.data.scenes import IMAGE_SIZE, ImageWriter

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
SIZES = {"small": (10, 14), "big": (21, 27)}  # px across; nothing in between, so "big or small" has one answer
KINDS = ("colour", "shape", "count", "presence", "position", "size")


@dataclass(frozen=True)
class Style:
    """What a world draws, and how skewed its training answers are."""

    palette: dict[str, tuple[int, int, int]]
    colour_weights: tuple[float, ...]  # how often each colour is drawn in training scenes: the colour prior
    shapes: tuple[str, ...]
    most_objects: int
    small_share: float  # training share of small objects: the size prior
    yes_share: float  # training share of "yes" presence answers
    look: str  # "filled", "outline" (2 px lines) or "edged" (filled, with a dark 1 px edge)
    grounds: tuple[str, ...]  # kinds of background: "pale", "stripes", "noise", "dark", "shaded", "checks"


STYLES = {
    "clutter": Style(
        palette={"red": (215, 40, 40), "orange": (240, 130, 30), "yellow": (225, 205, 30), "green": (40, 160, 60),
                 "teal": (30, 150, 150), "blue": (40, 70, 215), "purple": (130, 50, 190), "pink": (235, 100, 180)},
        colour_weights=(8, 5, 3, 2, 2, 1, 1, 1),
        shapes=("circle", "square", "triangle", "cross"),
        most_objects=4, small_share=0.75, yes_share=0.25, look="filled", grounds=("pale", "stripes", "noise"),
    ),
    "sketch": Style(
        palette={"white": (240, 240, 240), "red": (235, 60, 50), "lime": (150, 230, 40), "green": (30, 150, 50),
                 "cyan": (40, 210, 230), "blue": (60, 90, 240), "magenta": (220, 50, 210)},
        colour_weights=(1, 1, 6, 1, 4, 1, 2),
        shapes=("circle", "square", "triangle", "star", "ring"),
        most_objects=5, small_share=0.3, yes_share=0.7, look="outline", grounds=("dark", "noise"),
    ),
    "tiles": Style(
        palette={"brown": (140, 80, 30), "gold": (235, 185, 20), "navy": (30, 40, 120), "olive": (120, 130, 30),
                 "salmon": (250, 130, 110), "violet": (150, 90, 220), "grey": (128, 128, 128)},
        colour_weights=(1, 4, 1, 1, 2, 1, 6),
        shapes=("hexagon", "triangle", "cross", "ring", "star"),
        most_objects=4, small_share=0.6, yes_share=0.35, look="edged", grounds=("shaded", "checks"),
    ),
}


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str  # "small" or "big"
    x: float  # centre, px
    y: float
    width: float
    angle: float  # degrees

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


def _place(rng: random.Random, colour: str, width: float, placed: list[Thing]) -> tuple[float, float] | None:
    """A centre inside the picture where the object overlaps others a little at most, and none of its own colour,
    so that each stays recognisable."""
    for _ in range(50):
        x, y = (rng.uniform(width / 2 + 1, IMAGE_SIZE - width / 2 - 1) for _ in range(2))
        if all(math.dist((x, y), (t.x, t.y)) >= (t.width + width) / (2 if t.colour == colour else 2.6) for t in placed):
            return x, y
    return None


def random_things(style: Style, rng: random.Random, count: int, small_share: float,
                  colour_weights: tuple[float, ...]) -> list[Thing]:
    """`count` objects of distinct (colour, shape), so "the red circle" names one."""
    colours = list(style.palette)
    things: list[Thing] = []
    while len(things) < count:
        colour = rng.choices(colours, weights=colour_weights)[0]
        shape = rng.choice(style.shapes)
        if any((t.colour, t.shape) == (colour, shape) for t in things):
            continue
        size = "small" if rng.random() < small_share else "big"
        width = rng.uniform(*SIZES[size])
        centre = _place(rng, colour, width, things)
        if centre is not None:
            things.append(Thing(colour, shape, size, *centre, width, rng.uniform(0, 360)))
    return things


def _ground(style: Style, rng: random.Random) -> Image.Image:
    kind = rng.choice(style.grounds)
    if kind == "dark":
        tone = tuple(rng.randint(10, 60) for _ in range(3))
    else:
        tone = tuple(rng.randint(205, 250) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), tone)
    if kind == "shaded":  # from the tone at one edge to another light tone at the opposite one
        other = tuple(rng.randint(150, 250) for _ in range(3))
        ramp = Image.linear_gradient("L").resize((IMAGE_SIZE, IMAGE_SIZE)).rotate(rng.choice((0, 90, 180, 270)))
        image = Image.composite(Image.new("RGB", image.size, other), image, ramp)
    elif kind == "checks":
        other = tuple(max(0, value - rng.randint(15, 35)) for value in tone)
        step = rng.randint(5, 10)
        draw = ImageDraw.Draw(image)
        for row in range(0, IMAGE_SIZE, step):
            for column in range((row // step) % 2 * step, IMAGE_SIZE, step * 2):
                draw.rectangle((column, row, column + step - 1, row + step - 1), fill=other)
    elif kind == "stripes":
        other = tuple(max(0, value - rng.randint(20, 45)) for value in tone)
        step = rng.randint(4, 9)
        draw = ImageDraw.Draw(image)
        for offset in range(-IMAGE_SIZE, IMAGE_SIZE, step * 2):
            draw.polygon([(offset, 0), (offset + step, 0), (offset + step + IMAGE_SIZE, IMAGE_SIZE),
                          (offset + IMAGE_SIZE, IMAGE_SIZE)], fill=other)
    elif kind == "noise":
        noise = Image.frombytes("RGB", image.size, rng.randbytes(IMAGE_SIZE * IMAGE_SIZE * 3))
        image = Image.blend(image, noise, 0.25)
    return image


def _outline(thing: Thing) -> list[tuple[float, float]]:
    """The shape's corners, rotated about its centre (circles and rings are drawn as ellipses instead)."""
    half = thing.width / 2
    if thing.shape == "square":
        corners = [(-half, -half), (half, -half), (half, half), (-half, half)]
    elif thing.shape == "triangle":
        corners = [(0, -half), (half, half * 0.8), (-half, half * 0.8)]
    elif thing.shape == "hexagon":
        corners = [(half * math.cos(math.pi * point / 3), half * math.sin(math.pi * point / 3)) for point in range(6)]
    elif thing.shape == "cross":
        arm = half / 3
        corners = [(-arm, -half), (arm, -half), (arm, -arm), (half, -arm), (half, arm), (arm, arm), (arm, half),
                   (-arm, half), (-arm, arm), (-half, arm), (-half, -arm), (-arm, -arm)]
    else:  # star
        corners = [((half if point % 2 == 0 else half * 0.45) * math.sin(math.pi * point / 5),
                    -(half if point % 2 == 0 else half * 0.45) * math.cos(math.pi * point / 5)) for point in range(10)]
    turn = math.radians(thing.angle)
    return [(thing.x + x * math.cos(turn) - y * math.sin(turn), thing.y + x * math.sin(turn) + y * math.cos(turn))
            for x, y in corners]


def _box(thing: Thing, scale: float = 1.0) -> tuple[float, float, float, float]:
    """The square about the object's centre, `scale` times its width across."""
    half = thing.width * scale / 2
    return thing.x - half, thing.y - half, thing.x + half, thing.y + half


def draw_things(style: Style, things: list[Thing], rng: random.Random) -> Image.Image:
    image = _ground(style, rng)
    draw = ImageDraw.Draw(image)
    line = {"filled": 0, "outline": 2, "edged": 1}[style.look]
    for thing in things:
        colour = style.palette[thing.colour]
        fill = None if style.look == "outline" else colour
        edge = tuple(value * 2 // 5 for value in colour) if style.look == "edged" else colour
        if thing.shape == "circle":
            draw.ellipse(_box(thing), fill=fill, outline=edge, width=line)
        elif thing.shape == "ring" and style.look == "outline":
            for scale in (1.0, 0.5):
                draw.ellipse(_box(thing, scale), outline=colour, width=line)
        elif thing.shape == "ring":
            draw.ellipse(_box(thing), outline=colour, width=max(2, round(thing.width / 5)))
            if style.look == "edged":  # both rims of the band, which is about a fifth of the width thick
                for scale in (1.0, 0.6):
                    draw.ellipse(_box(thing, scale), outline=edge, width=line)
        else:
            draw.polygon(_outline(thing), fill=fill, outline=edge if line else None, width=line)
    return image


def _side(thing: Thing, axis: str) -> str | None:
    """Which half of the picture holds the object's centre, if it is clearly in one (6 px from the middle)."""
    value = thing.x if axis == "x" else thing.y
    if abs(value - IMAGE_SIZE / 2) < 6:
        return None
    names = ("left", "right") if axis == "x" else ("top", "bottom")
    return names[value > IMAGE_SIZE / 2]


def question(style: Style, things: list[Thing], kind: str, rng: random.Random,
             yes_share: float) -> tuple[str, str] | None:
    """A (question, answer) of this kind that the scene answers without ambiguity, or None."""
    if kind == "colour":
        unique = [t for t in things if sum(o.shape == t.shape for o in things) == 1]
        return (f"What colour is the {(t := rng.choice(unique)).shape}?", t.colour) if unique else None
    if kind == "shape":
        unique = [t for t in things if sum(o.colour == t.colour for o in things) == 1]
        return (f"What shape is the {(t := rng.choice(unique)).colour} object?", t.shape) if unique else None
    if kind == "count":
        if rng.random() < 0.5:
            return "How many shapes are there?", NUMBERS[len(things)]
        shape = rng.choice(style.shapes)
        return f"How many {shape}s are there?", NUMBERS[sum(t.shape == shape for t in things)]
    if kind == "presence":
        present = {(t.colour, t.shape) for t in things}
        if rng.random() < yes_share:
            colour, shape = rng.choice(sorted(present))
            return f"Is there a {colour} {shape}?", "yes"
        absent = sorted({(c, s) for c in style.palette for s in style.shapes} - present)
        colour, shape = rng.choice(absent)
        return f"Is there a {colour} {shape}?", "no"
    if kind == "position":
        axis = rng.choice("xy")
        placed = [(t, side) for t in things if (side := _side(t, axis))]
        if not placed:
            return None
        thing, side = rng.choice(placed)
        ask = "on the left or the right" if axis == "x" else "at the top or the bottom"
        return f"Is the {thing.name} {ask}?", side
    thing = rng.choice(things)
    return f"Is the {thing.name} big or small?", thing.size


def _chat(image: str, asked: list[tuple[str, str]]) -> list[dict]:
    messages = []
    for index, (text, answer) in enumerate(asked):
        content = [{"type": "image", "image": image}] if index == 0 else []
        messages.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
        messages.append({"role": "assistant", "content": answer})
    return messages


def _answers(style: Style, kind: str) -> tuple[str, ...]:
    """Every answer a kind can have, so that the held-out set can give each the same share."""
    return {"colour": tuple(style.palette), "shape": style.shapes, "count": NUMBERS[:style.most_objects + 1],
            "presence": ("yes", "no"), "position": ("left", "right", "top", "bottom"), "size": tuple(SIZES)}[kind]


def _balanced_eval(style: Style, writer: ImageWriter, rng: random.Random, count: int) -> list[dict]:
    """One question a picture, the kinds in turn, and within a kind every answer as often as any other (colours,
    sizes, counts and yes/no are uniform here, unlike training)."""
    uniform = tuple(1.0 for _ in style.palette)
    tally = {kind: dict.fromkeys(_answers(style, kind), 0) for kind in KINDS}
    records = []
    while len(records) < count:
        kind = KINDS[len(records) % len(KINDS)]
        things = random_things(style, rng, rng.randint(1, style.most_objects), 0.5, uniform)
        asked = question(style, things, kind, rng, yes_share=0.5)
        if asked is None or tally[kind][asked[1]] > min(tally[kind].values()):
            continue
        tally[kind][asked[1]] += 1
        image = writer.save(draw_things(style, things, rng))
        records.append({"messages": _chat(image, [asked]), "kind": kind})
    return records


def write_clutter(out: str | Path, style: str = "clutter", seed: int = 0, train: int = 6000, eval: int = 600,
                  questions_per_image: int = 5) -> list[Path]:
    """Write `out/train.jsonl` (one chat of up to `questions_per_image` questions per picture, answers skewed as
    the style says) and `out/eval.jsonl` (one question per picture, balanced by answer within each kind)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    world = STYLES[style]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{style}-{seed}")
    writer = ImageWriter(out, "train", rng)
    train_records = []
    for _ in range(train):
        things = random_things(world, rng, rng.randint(1, world.most_objects), world.small_share, world.colour_weights)
        kinds = rng.sample(KINDS, k=min(questions_per_image, len(KINDS)))
        asked = [found for kind in kinds if (found := question(world, things, kind, rng, world.yes_share))]
        if asked:
            train_records.append({"messages": _chat(writer.save(draw_things(world, things, rng)), asked)})
    eval_rng = random.Random(f"{style}-eval-{seed}")
    eval_records = _balanced_eval(world, ImageWriter(out, "eval", eval_rng), eval_rng, eval)
    written = {"train.jsonl": train_records, "eval.jsonl": eval_records}
    for name, records in written.items():
        (out / name).write_text("".join(json.dumps(record) + "\n" for record in records))
    return [out / name for name in written]
