"""The shapes world's pieces: objects, scenes, drawing, and a writer that saves drawn images beside a JSONL file."""

from __future__ import annotations

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


def random_scene(rng: random.Random, count: int | None = None) -> list[Shape]:
    count = count or rng.randint(1, 4)
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    quadrants = rng.sample(QUADRANTS, count)
    return [Shape(colour, shape, column, row) for (colour, shape), (column, row) in zip(pairs, quadrants)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, left: int, top: int, size: int, fill: tuple) -> None:
    box = (left, top, left + size, top + size)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left + size / 2, top), (left, top + size), (left + size, top + size)], fill=fill)


def draw_scene(scene: list[Shape], rng: random.Random) -> Image.Image:
    """Each object somewhere inside its own quadrant, 16-24 px wide."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    half = IMAGE_SIZE // 2
    for item in scene:
        size = rng.randint(16, 24)
        left = item.column * half + rng.randint(2, half - size - 2)
        top = item.row * half + rng.randint(2, half - size - 2)
        _draw_shape(draw, item.shape, left, top, size, COLOURS[item.colour])
    return image


def draw_object(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """One object near the centre, 36-52 px wide: an instance of a category, varied in size and place. Large, so
    that its colour and shape are most of the picture, not a detail in a white field."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    size = rng.randint(36, 52)
    left, top = ((IMAGE_SIZE - size) // 2 + rng.randint(-5, 5) for _ in range(2))
    _draw_shape(ImageDraw.Draw(image), shape, left, top, size, COLOURS[colour])
    return image


class ImageWriter:
    """Draws scenes into `out/images/` and hands back their relative paths."""

    def __init__(self, out: Path, prefix: str, rng: random.Random):
        self.out, self.prefix, self.rng, self.count = out, prefix, rng, 0
        (out / "images").mkdir(parents=True, exist_ok=True)

    def image(self, scene: list[Shape]) -> str:
        return self.save(draw_scene(scene, self.rng))

    def save(self, image: Image.Image) -> str:
        relative = f"images/{self.prefix}{self.count:06d}.png"
        self.count += 1
        image.save(self.out / relative)
        return relative
