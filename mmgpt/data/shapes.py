"""A deterministic synthetic world of coloured shapes: images, captions, VQA chats and interleaved documents.

Each 64x64 image holds 1-4 objects, one per quadrant, with distinct (colour, shape) pairs, so "the red circle",
"left" and "top" are never ambiguous. The same seed always writes the same files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four")
QUADRANTS = ((0, 0), (1, 0), (0, 1), (1, 1))  # (column, row): top left, top right, bottom left, bottom right
IMAGE_SIZE = 64


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    column: int  # 0 left, 1 right
    row: int  # 0 top, 1 bottom

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def place(self) -> str:
        return f"{('top', 'bottom')[self.row]} {('left', 'right')[self.column]}"


def random_scene(rng: random.Random) -> list[Shape]:
    count = rng.randint(1, 4)
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    quadrants = rng.sample(QUADRANTS, count)
    return [Shape(colour, shape, column, row) for (colour, shape), (column, row) in zip(pairs, quadrants)]


def draw_scene(scene: list[Shape], rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    half = IMAGE_SIZE // 2
    for item in scene:
        size = rng.randint(16, 24)
        left = item.column * half + rng.randint(2, half - size - 2)
        top = item.row * half + rng.randint(2, half - size - 2)
        box = (left, top, left + size, top + size)
        fill = COLOURS[item.colour]
        if item.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif item.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(left + size / 2, top), (left, top + size), (left + size, top + size)], fill=fill)
    return image


def caption(scene: list[Shape]) -> str:
    """Objects in reading order (top left first), so each part of the caption is tied to one region."""
    parts = [f"a {item.name} at the {item.place}" for item in sorted(scene, key=lambda item: (item.row, item.column))]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{NUMBERS[len(scene)].capitalize()} shape{'s' if len(scene) > 1 else ''}: {listed}."


def questions(scene: list[Shape], rng: random.Random) -> list[tuple[str, str, str]]:
    """One (kind, question, answer) per question kind that this scene supports."""
    items = []
    shape_counts = {s: sum(item.shape == s for item in scene) for s in SHAPES}
    colour_counts = {c: sum(item.colour == c for item in scene) for c in COLOURS}
    unique_shape = [item for item in scene if shape_counts[item.shape] == 1]
    if unique_shape:
        item = rng.choice(unique_shape)
        items.append(("colour", f"What colour is the {item.shape}?", item.colour))
    unique_colour = [item for item in scene if colour_counts[item.colour] == 1]
    if unique_colour:
        item = rng.choice(unique_colour)
        items.append(("shape", f"What shape is the {item.colour} object?", item.shape))
    if rng.random() < 0.5:
        items.append(("count", "How many shapes are there?", NUMBERS[len(scene)]))
    else:
        shape = rng.choice(SHAPES)
        items.append(("count", f"How many {shape}s are there?", NUMBERS[shape_counts[shape]]))
    present = {(item.colour, item.shape) for item in scene}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
        answer = "yes"
    else:
        colour, shape = rng.choice(sorted({(c, s) for c in COLOURS for s in SHAPES} - present))
        answer = "no"
    items.append(("presence", f"Is there a {colour} {shape}?", answer))
    item = rng.choice(scene)
    if rng.random() < 0.5:
        items.append(("position", f"Is the {item.name} on the left or the right?", ("left", "right")[item.column]))
    else:
        items.append(("position", f"Is the {item.name} at the top or the bottom?", ("top", "bottom")[item.row]))
    return items


class _Writer:
    """Draws scenes into `out/images/` and hands back their relative paths."""

    def __init__(self, out: Path, prefix: str, rng: random.Random):
        self.out, self.prefix, self.rng, self.count = out, prefix, rng, 0
        (out / "images").mkdir(parents=True, exist_ok=True)

    def image(self, scene: list[Shape]) -> str:
        relative = f"images/{self.prefix}{self.count:06d}.png"
        self.count += 1
        draw_scene(scene, self.rng).save(self.out / relative)
        return relative


def _vqa_chat(writer: _Writer, rng: random.Random, max_questions: int) -> dict:
    scene = random_scene(rng)
    image = writer.image(scene)
    asked = questions(scene, rng)
    rng.shuffle(asked)
    messages = []
    for index, (_, question, answer) in enumerate(asked[:max_questions]):
        content = [{"type": "image", "image": image}] if index == 0 else []
        messages.append({"role": "user", "content": content + [{"type": "text", "text": question}]})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def _caption_doc(writer: _Writer, rng: random.Random) -> dict:
    scene = random_scene(rng)
    return {"content": [{"type": "image", "image": writer.image(scene)}, {"type": "text", "text": caption(scene)}]}


def _interleaved_doc(writer: _Writer, rng: random.Random) -> dict:
    content = [{"type": "text", "text": "A page of pictures."}]
    for index in range(rng.randint(2, 3)):
        scene = random_scene(rng)
        content.append({"type": "text", "text": f" Picture {index + 1}:"})
        content.append({"type": "image", "image": writer.image(scene)})
        content.append({"type": "text", "text": caption(scene)})
    return {"content": content}


def write_shapes(out: str | Path, seed: int = 0, train: int = 8000, eval: int = 500) -> tuple[Path, Path]:
    """Write `out/train.jsonl` (VQA chats, captions, interleaved documents) and `out/eval.jsonl` (one question each)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    writer = _Writer(out, "train", rng)
    train_records = []
    for _ in range(train):
        roll = rng.random()
        if roll < 0.5:
            train_records.append(_vqa_chat(writer, rng, max_questions=5))
        elif roll < 0.9:
            train_records.append(_caption_doc(writer, rng))
        else:
            train_records.append(_interleaved_doc(writer, rng))
    eval_rng = random.Random(f"eval-{seed}")
    eval_writer = _Writer(out, "eval", eval_rng)
    kinds = ("colour", "shape", "count", "presence", "position")
    eval_records = []
    while len(eval_records) < eval:
        scene = random_scene(eval_rng)
        wanted = kinds[len(eval_records) % len(kinds)]
        found = [q for q in questions(scene, eval_rng) if q[0] == wanted]
        if not found:
            continue
        _, question, answer = found[0]
        image = eval_writer.image(scene)
        eval_records.append(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": answer},
                ],
                "kind": wanted,
            }
        )
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, records in zip(paths, (train_records, eval_records)):
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return paths
