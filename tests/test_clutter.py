"""The clutter worlds: deterministic, answers true to the drawn scene, skewed in training, balanced held out."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mmgpt.cli import main
from mmgpt.config import load_config
from mmgpt.data.clutter import (
    IMAGE_SIZE, KINDS, STYLES, Thing, draw_things, question, random_things, write_clutter,
)
from mmgpt.data.formats import read_jsonl


def _answers(path) -> list[tuple[str, str]]:
    """(question, answer) of every assistant turn."""
    pairs = []
    for record in map(json.loads, path.read_text().splitlines()):
        messages = record["messages"]
        for asked, answer in zip(messages[::2], messages[1::2]):
            text = next(item["text"] for item in asked["content"] if item["type"] == "text")
            pairs.append((record.get("kind", text), answer["content"]))
    return pairs


@pytest.mark.parametrize("style", sorted(STYLES))
def test_same_seed_same_files_and_records_load(tmp_path, style):
    first = write_clutter(tmp_path / "a", style=style, seed=2, train=30, eval=24)
    second = write_clutter(tmp_path / "b", style=style, seed=2, train=30, eval=24)
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a/images/train000007.png").read_bytes() == (tmp_path / "b/images/train000007.png").read_bytes()
    samples, skipped = read_jsonl(first[0])
    assert len(samples) == 30 and not skipped and all(sample.images for sample in samples)
    assert Image.open(tmp_path / "a" / samples[0].images[0]).size == (IMAGE_SIZE, IMAGE_SIZE)


def test_held_out_answers_are_balanced_within_each_kind_and_training_is_skewed(tmp_path):
    _, eval_path = write_clutter(tmp_path, train=400, eval=240)
    held_out = Counter(_answers(eval_path))
    kinds = Counter(kind for kind, _ in held_out.elements())
    assert set(kinds) == set(KINDS) and set(kinds.values()) == {40}
    for kind in KINDS:
        counts = [count for (k, _), count in held_out.items() if k == kind]
        assert max(counts) - min(counts) <= 1, (kind, counts)
    trained = Counter(answer for _, answer in _answers(tmp_path / "train.jsonl"))
    assert trained["no"] > 2 * trained["yes"]
    assert trained["small"] > 2 * trained["big"]
    assert trained["red"] > 3 * trained["blue"]


def test_answers_are_true_to_the_scene():
    world = STYLES["clutter"]
    rng = random.Random(0)
    for _ in range(200):
        things = random_things(world, rng, rng.randint(1, 4), 0.5, (1,) * len(world.palette))
        assert len({(t.colour, t.shape) for t in things}) == len(things)
        for kind in KINDS:
            asked = question(world, things, kind, rng, yes_share=0.5)
            if asked is None:
                continue
            text, answer = asked
            named = [t for t in things if f"the {t.name} " in text]
            middle = IMAGE_SIZE / 2
            if kind == "position" and "left" in text:
                assert answer == ("left" if named[0].x < middle - 6 else "right" if named[0].x > middle + 6 else None)
            elif kind == "position":
                assert answer == ("top" if named[0].y < middle - 6 else "bottom" if named[0].y > middle + 6 else None)
            elif kind == "size":
                width = named[0].width
                assert answer == ("small" if width <= 14 else "big") and not 14 < width < 21
            elif kind == "presence":
                colour, shape = text.removeprefix("Is there a ").removesuffix("?").split()
                assert answer == ("yes" if any((t.colour, t.shape) == (colour, shape) for t in things) else "no")
            elif text == "How many shapes are there?":
                assert answer == ("zero", "one", "two", "three", "four")[len(things)]


def test_objects_are_drawn_in_their_colour_where_they_are():
    world = STYLES["clutter"]
    rng = random.Random(1)
    things = random_things(world, rng, 1, 0.0, (1,) * len(world.palette))
    image = draw_things(world, things, rng)
    centre = image.getpixel((round(things[0].x), round(things[0].y)))
    assert centre == world.palette[things[0].colour]


@pytest.mark.parametrize("shape", ["hexagon", "triangle", "cross", "star"])
def test_tiles_are_filled_with_their_colour_inside_a_darker_edge(shape):
    world = STYLES["tiles"]
    thing = Thing("salmon", shape, "big", IMAGE_SIZE / 2, IMAGE_SIZE / 2, 24.0, 0.0)
    image = draw_things(world, [thing], random.Random(3))
    assert image.getpixel((IMAGE_SIZE // 2, IMAGE_SIZE // 2)) == world.palette["salmon"]
    assert (100, 52, 44) in {colour for _, colour in image.getcolors(IMAGE_SIZE * IMAGE_SIZE)}  # 2/5 of salmon


def test_cli_writes_each_style_and_refuses_an_unknown_one(tmp_path, capsys):
    for style in ("sketch", "tiles"):
        command = ["data", "clutter", "--out", str(tmp_path / style), "--style", style, "--train", "12", "--eval", "12"]
        assert main(command) == 0
        assert "wrote" in capsys.readouterr().out
        assert len((tmp_path / style / "eval.jsonl").read_text().splitlines()) == 12
    with pytest.raises(SystemExit):
        main(["data", "clutter", "--out", str(tmp_path / "x"), "--style", "nowhere"])
    assert "invalid choice: 'nowhere'" in capsys.readouterr().err


def test_tiny_vqa_recipe_trains_and_evaluates_on_a_clutter_set(tmp_path, capsys):
    """configs/tiny-vqa.yaml as documented, shrunk: its trained conv-stem ViT, augmentation, answer loss and vision
    warm-up, on a clutter set, then the held-out eval with the blind baseline per kind."""
    from conftest import TINY_OVERRIDES

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny-vqa.yaml"
    documented = load_config(config)  # the recipe as written passes its checks, not only shrunk
    assert 0 < documented.train.vision_warmup_steps < documented.train.max_steps
    assert main(["data", "clutter", "--out", str(tmp_path / "set"), "--train", "40", "--eval", "12"]) == 0
    settings = [*TINY_OVERRIDES, f"data.train={tmp_path / 'set/train.jsonl'}", f"data.eval={tmp_path / 'set/eval.jsonl'}",
                "train.max_steps=4", "train.vision_warmup_steps=2", f"output_dir={tmp_path / 'run'}"]
    assert main(["train", str(config), "--set", *settings]) in (None, 0)
    log = capsys.readouterr().out
    assert "augment: pictures moved up to 4 px, mirrored left-right and top-bottom" in log
    assert "answer loss: 1.0 x" in log and "vision warm-up: steps 1-2" in log
    assert f"picture cache: up to {documented.data.cache_pictures_mb} MB" in log
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [("loss" in record) for record in records if "eval_loss" not in record] == [False, False, True, True]
    saved = json.loads((tmp_path / "run/final/config.json").read_text())
    assert saved["vision_conv_stem"] is True and saved["vision_conv_stem_depth"] == documented.model.vision.conv_stem_depth
    assert main(["eval", str(tmp_path / "run/final"), "--data", str(tmp_path / "set/eval.jsonl"),
                 "--out", str(tmp_path / "predictions.jsonl")]) in (None, 0)
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 12 and set(report["by_kind"]) == set(KINDS)
    assert all("blind_accuracy" in kind for kind in report["by_kind"].values())
