"""The shapes world's tools, `zoom` and `find_regions`, and training chats in which the assistant uses them.

Both see pixels only and know nothing of the scene. `find_regions` measures the picture's regions of one colour and
says what it measured, in text: a tool that does the looking for the model, as a calculator does its sums
(`find_region_chat`: one call, then the answer, for every one-picture question). `zoom` crops a quadrant and enlarges
it. In a zoom chat the assistant looks at the quadrants in reading order (top left, top right, bottom left, bottom
right), where a 64-pixel picture's object fills the view instead of a quarter of it:
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

import numpy as np
from PIL import Image

from mmgpt.data.scenes import COLOURS, SHAPES, ImageWriter, Shape, draw_scene, random_scene
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

# Basic colour names by hue band (upper bound in degrees), for saturated pixels: a measure of pixels that knows no
# world's palette. Pale, dark and grey pixels are named by brightness instead.
HUE_NAMES = ((15, "red"), (40, "orange"), (70, "yellow"), (165, "green"), (195, "teal"), (255, "blue"),
             (290, "purple"), (345, "pink"), (360, "red"))
COLOUR_NAMES = ("white", "grey", "black", *dict.fromkeys(name for _, name in HUE_NAMES))
# Forms by how much of its bounding box a region fills (a disc fills pi/4, a triangle half) and how square the box
# is: the least filling first. Geometry of pixels, as a classical vision tool measures it.
FORMS = ((0.4, "region", "region"), (0.7, "triangle", "triangle"), (0.9, "circle", "ellipse"),
         (1.01, "square", "rectangle"))
REGION_MIN_SHARE = 0.01  # a region smaller than this share of the picture is noise, not a region
MAX_REGIONS = 8
REGION_WORK_SIZE = 96  # larger pictures are measured at this size (nearest-neighbour, so no new colours)


def colour_names(image: Image.Image) -> np.ndarray:
    """(H, W) indices into `COLOUR_NAMES`: each pixel's basic colour name."""
    hue, saturation, value = (np.asarray(image.convert("HSV"), dtype=np.float32) / 255).transpose(2, 0, 1)
    degrees = hue * 360
    names = np.full(degrees.shape, COLOUR_NAMES.index("grey"))
    for upper, name in reversed(HUE_NAMES):
        names[degrees < upper] = COLOUR_NAMES.index(name)
    pale = saturation < 0.25
    names[pale] = COLOUR_NAMES.index("grey")
    names[pale & (value > 0.8)] = COLOUR_NAMES.index("white")
    names[value < 0.2] = COLOUR_NAMES.index("black")
    return names


def _connected(names: np.ndarray, ground: int) -> np.ndarray:
    """Label each pixel with the smallest flat index in its 4-connected region of one colour name (-1: ground)."""
    height, width = names.shape
    big = height * width
    labels = np.where(names != ground, np.arange(big).reshape(height, width), big)
    padded_names = np.pad(names, 1, constant_values=-1)
    shifts = ((0, 1), (2, 1), (1, 0), (1, 2))  # the neighbour above, below, left and right
    same = [padded_names[dy:dy + height, dx:dx + width] == names for dy, dx in shifts]
    while True:
        before = labels
        padded = np.pad(labels, 1, constant_values=big)
        for (dy, dx), alike in zip(shifts, same):
            labels = np.where(alike & (labels < big), np.minimum(labels, padded[dy:dy + height, dx:dx + width]), labels)
        if np.array_equal(before, labels):
            return np.where(labels == big, -1, labels)


def _form(fill: float, aspect: float) -> str:
    """A region's form from the share of its bounding box it fills and the box's width over its height."""
    _, square, oblong = next(form for form in FORMS if fill < form[0])
    return square if 0.8 <= aspect <= 1.25 else oblong


def find_regions(image: Image.Image, colour: str = "", form: str = "") -> str:
    """Regions of one colour on the picture's ground, measured: how many, and each one's colour, form, place and size.

    Args:
        image: picture number, 1 for the first
        colour: only regions of this colour (choices: ["red", "orange", "yellow", "green", "teal", "blue", "purple", "pink", "white", "grey", "black"])
        form: only regions of this form (choices: ["circle", "ellipse", "square", "rectangle", "triangle", "region"])
    """
    scale = min(1.0, REGION_WORK_SIZE / max(image.size))
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.NEAREST)
    names = colour_names(image)
    border = np.concatenate([names[0], names[-1], names[:, 0], names[:, -1]])
    labels = _connected(names, int(np.bincount(border).argmax()))
    height, width = names.shape
    found = []
    for label, area in zip(*np.unique(labels[labels >= 0], return_counts=True)):
        if area < REGION_MIN_SHARE * height * width:
            continue
        rows, columns = np.nonzero(labels == label)
        box_height, box_width = rows.max() - rows.min() + 1, columns.max() - columns.min() + 1
        row, column = rows.mean(), columns.mean()
        bottom, right = int(row >= height / 2), int(column >= width / 2)
        named, shaped = COLOUR_NAMES[names.flat[label]], _form(area / (box_width * box_height), box_width / box_height)
        if colour in ("", named) and form in ("", shaped):
            line = (f"{named} {shaped}, {('top', 'bottom')[bottom]} {('left', 'right')[right]}, "
                    f"{round(box_width / scale)}x{round(box_height / scale)} px")
            found.append((area, (bottom, right, row, column), line))
    largest = sorted(found, key=lambda region: -region[0])[:MAX_REGIONS]  # all are counted, the largest listed
    lines = [line for _, _, line in sorted(largest, key=lambda region: region[1])]  # in reading order
    return "\n".join([f"{len(found)} found", *lines])


FIND_REGIONS_SCHEMA = tool_schema(find_regions)


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


def _asked(writer: ImageWriter, rng: random.Random, kind: str) -> tuple[list[dict], Image.Image | None,
                                                                       list[Shape], str, str]:
    """A question of this kind: (its pictures as content items, the picture drawn if it is one, its scene,
    question, answer)."""
    if kind == "pair":
        scenes, question, answer = pair_question(rng)
        return [{"type": "image", "image": writer.image(scene)} for scene in scenes], None, [], question, answer
    scene = random_scene(rng)
    found = [asked for asked in questions(scene, rng) if asked[0] == kind]
    while not found:  # colour and shape questions need an object unique in shape or colour
        scene = random_scene(rng)
        found = [asked for asked in questions(scene, rng) if asked[0] == kind]
    _, question, answer = found[0]
    picture = draw_scene(scene, writer.rng)
    return [{"type": "image", "image": writer.save(picture)}], picture, scene, question, answer


def tool_chat(writer: ImageWriter, rng: random.Random, kind: str | None = None) -> dict:
    """One question about one picture (two for a pair question) with the zoom tool offered."""
    kind = kind or rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    content, picture, scene, question, answer = _asked(writer, rng, kind)
    steps = look_closer(picture, scene, kind, question, writer) if kind in ZOOM_KINDS else []
    messages = [{"role": "user", "content": content + [{"type": "text", "text": question}]}, *steps,
                {"role": "assistant", "content": answer}]
    return {"tools": [ZOOM_SCHEMA], "messages": messages, "kind": kind}


def _filters(question: str) -> dict:
    """`find_regions`' arguments for a question: the colour and the shape it names (a plural counts too)."""
    words = question.rstrip("?").split()
    colour = next((word for word in words if word in COLOURS), None)
    form = next((shape for shape in SHAPES if shape in words or f"{shape}s" in words), None)
    return {key: value for key, value in (("colour", colour), ("form", form)) if value}


def find_region_chat(writer: ImageWriter, rng: random.Random, kind: str | None = None) -> dict:
    """One question with `find_regions` offered: a one-picture question is answered after one call that asks for
    the colour and shape the question names, a two-picture one at once."""
    kind = kind or rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    content, picture, _, question, answer = _asked(writer, rng, kind)
    filters = _filters(question)
    steps = [] if picture is None else [
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "find_regions", "arguments": {"image": 1, **filters}}}]},
        {"role": "tool", "name": "find_regions", "content": find_regions(picture, **filters)},
    ]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": question}]}, *steps,
                {"role": "assistant", "content": answer}]
    return {"tools": [FIND_REGIONS_SCHEMA], "messages": messages, "kind": kind}


CHATS = {"zoom": tool_chat, "find_regions": find_region_chat}  # training chats by the tool they offer


def tool_chats(writer: ImageWriter, rng: random.Random, count: int, tool: str = "zoom") -> list[dict]:
    if tool not in CHATS:
        raise ValueError(f"no training chats for the tool {tool!r}; known: {', '.join(CHATS)}")
    return [CHATS[tool](writer, rng) for _ in range(count)]
