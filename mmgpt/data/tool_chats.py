"""The shapes world's tool, `zoom`, and training chats in which the assistant uses it before answering.

`zoom` sees pixels only: it crops a quadrant and enlarges it, and knows nothing of the scene. In a tool chat the
assistant looks at the quadrants in reading order (top left, top right, bottom left, bottom right), where a
64-pixel picture's object fills the view instead of a quarter of it:
  colour, presence, position  until the zoomed view shows the object the question names (presence: "no" after
                              all four without it), saying what each other view shows before the next call
                              ("a blue square.", "nothing."); the answer is then read from that view or its place;
  count                       all four, the count so far written before each next call ("So far: two."), so
                              the answer is the last count plus what the last view shows;
  shape, two-picture questions  answered at once: the whole picture already shows them (no call).
Every tool chat carries the tool's schema (`mmgpt.tools`), so a model learns both when to call and when not to.
"""

from __future__ import annotations

import random

from PIL import Image

from mmgpt.data.scenes import ImageWriter, Shape, draw_scene, random_scene
from mmgpt.data.shapes import NUMBERS, pair_question, questions
from mmgpt.tools import tool_schema

REGIONS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}  # (column, row)
ZOOM_KINDS = ("colour", "presence", "position", "count")  # the questions a closer look answers
KIND_WEIGHTS = {"colour": 0.2, "presence": 0.2, "position": 0.2, "count": 0.2, "shape": 0.1, "pair": 0.1}


def zoom(image: Image.Image, region: str) -> Image.Image:
    """One quadrant of a picture, enlarged to the picture's size.

    Args:
        image: picture number, 1 for the first
        region: the quadrant (choices: ["top left", "top right", "bottom left", "bottom right"])
    """
    if region not in REGIONS:
        raise ValueError(f"region must be one of {', '.join(REGIONS)}, got {region!r}")
    column, row = REGIONS[region]
    width, height = image.size
    box = (column * width // 2, row * height // 2, (column + 1) * width // 2, (row + 1) * height // 2)
    return image.crop(box).resize((width, height), Image.Resampling.BICUBIC)


ZOOM_SCHEMA = tool_schema(zoom)


def _named(kind: str, question: str, item: Shape) -> bool:
    """Whether `item` is what the question asks about (for count: one of what it counts)."""
    if kind in ("presence", "position"):
        return f" {item.name}" in question
    if kind == "colour":
        return question.endswith(f" {item.shape}?")
    return question == "How many shapes are there?" or f" {item.shape}s " in question


def _call(region: str) -> dict:
    return {"type": "function", "function": {"name": "zoom", "arguments": {"image": 1, "region": region}}}


def look_closer(picture: Image.Image, scene: list[Shape], kind: str, question: str, writer: ImageWriter) -> list[dict]:
    """The assistant's calls and the tool's results, in order, for one question of a `ZOOM_KINDS` kind."""
    at = {(item.column, item.row): item for item in scene}
    messages: list[dict] = []
    counted = 0
    note = ""
    for region, place in REGIONS.items():
        messages.append({"role": "assistant", "content": note, "tool_calls": [_call(region)]})
        messages.append({"role": "tool", "name": "zoom",
                         "content": [{"type": "image", "image": writer.save(zoom(picture, region))}]})
        found = place in at and _named(kind, question, at[place])
        counted += found
        if found and kind != "count":
            break
        seen = f"a {at[place].name}." if place in at else "nothing."
        note = f"So far: {NUMBERS[counted]}." if kind == "count" else seen
    return messages


def tool_chat(writer: ImageWriter, rng: random.Random, kind: str | None = None) -> dict:
    """One question about one picture (two for a pair question) with the zoom tool offered."""
    kind = kind or rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    if kind == "pair":
        scenes, question, answer = pair_question(rng)
        content = [{"type": "image", "image": writer.image(scene)} for scene in scenes]
        steps: list[dict] = []
    else:
        scene = random_scene(rng)
        found = [asked for asked in questions(scene, rng) if asked[0] == kind]
        while not found:  # colour and shape questions need an object unique in shape or colour
            scene = random_scene(rng)
            found = [asked for asked in questions(scene, rng) if asked[0] == kind]
        _, question, answer = found[0]
        picture = draw_scene(scene, writer.rng)
        content = [{"type": "image", "image": writer.save(picture)}]
        steps = look_closer(picture, scene, kind, question, writer) if kind in ZOOM_KINDS else []
    messages = [{"role": "user", "content": content + [{"type": "text", "text": question}]}, *steps,
                {"role": "assistant", "content": answer}]
    return {"tools": [ZOOM_SCHEMA], "messages": messages, "kind": kind}


def tool_chats(writer: ImageWriter, rng: random.Random, count: int) -> list[dict]:
    return [tool_chat(writer, rng) for _ in range(count)]
