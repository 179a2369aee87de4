"""Training-time augmentation: mirrored pictures carry mirrored words, draws are pure functions of (step, index),
and `mmgpt train` uses it when asked."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

from mmgpt.cli import main
from mmgpt.config import ConfigError, load_config
from mmgpt.data.augment import Augment, mirror_sample, mirror_text
from mmgpt.data.clutter import STYLES, Thing, draw_things
from mmgpt.data.dataset import EncodedDataset
from mmgpt.data.loader import StepSampler
from mmgpt.data.records import Sample, Segment, Turn
from mmgpt.images import ImageError

from conftest import TINY_OVERRIDES

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-shapes.yaml"


def test_side_words_swap_on_their_axis_only_and_keep_their_case():
    text = "Is the red circle on the Left or the right? Top left, bottom-right; a lefty is above."
    assert mirror_text(text, "h") == "Is the red circle on the Right or the left? Top right, bottom-left; a lefty is above."
    assert mirror_text(text, "v") == "Is the red circle on the Left or the right? Bottom left, top-right; a lefty is below."
    assert mirror_text(text, "") == text
    assert mirror_text("TOP LEFT", "hv") == "BOTTOM RIGHT"  # answers in capitals, under a system rule


def test_a_mirrored_picture_and_its_mirrored_answer_agree():
    """A blue square drawn on the left: mirrored, its pixels are on the right, and so is the answer."""
    world = STYLES["clutter"]
    picture = draw_things(world, [Thing("blue", "square", "big", 14.0, 40.0, 24.0, 0.0)], random.Random(0))
    pixels = torch.from_numpy(numpy.asarray(picture, dtype=numpy.float32)).permute(2, 0, 1)[None]
    mirrored = Augment.pixels(pixels, "hv", 0, 0)[0]
    row, column = ((mirrored[2] > 150) & (mirrored[0] < 100)).nonzero().float().mean(0).tolist()
    assert column > 40 and row < 32  # drawn low on the left, it is high on the right
    chat = Sample([Turn("user", [Segment(image="x.png"), Segment(text="Is the blue square on the left or the right?")]),
                   Turn("assistant", [Segment(text="left")])])
    assert mirror_sample(chat, "hv").turns[1].segments[0].text == "right"
    moved = Augment.pixels(pixels, "", 5, -3)
    assert torch.equal(moved[..., 10:40, 20:40], pixels[..., 13:43, 15:35])


def test_draws_are_a_function_of_step_and_index_and_mirrored_items_carry_mirrored_tokens(tiny):
    processor, _ = tiny
    chats = [Sample([Turn("user", [Segment(image=Image.new("RGB", (8, 8), (index * 30, 0, 0))),
                                   Segment(text="Is it on the left or at the top?")]),
                     Turn("assistant", [Segment(text="left" if index % 2 else "top")])]) for index in range(8)]
    augment = Augment(shift=3, flip="hv", seed=1)
    dataset = EncodedDataset(chats, processor, 256, augment=augment)
    first, again = dataset[(5, 7)], dataset[(5, 7)]
    assert first.input_ids == again.input_ids and torch.equal(first.pixel_values, again.pixel_values)
    answers = set()
    for step in range(40):
        item = dataset[(1, step)]
        axes, _, _ = augment.draw(step, 1)
        question, answer = processor.decode(item.input_ids).rsplit("?", 1)
        answers.add(answer.strip())
        assert answer.strip() == ("right" if "h" in axes else "left")
        assert question.endswith("on the right or at the bottom" if axes == "hv" else "on the left or at the top"
                                 if not axes else "on the right or at the top" if axes == "h" else
                                 "on the left or at the bottom")
    assert answers == {"left", "right"}
    assert dataset[1].input_ids == dataset.tokens[1][0]  # asked by index alone (eval), nothing is augmented
    resumed = list(StepSampler(dataset.lengths, 4, 0, 3, 6, with_step=True))
    assert resumed == list(StepSampler(dataset.lengths, 4, 0, 0, 6, with_step=True))[3:]
    assert all(step in (3, 4, 5) for batch in resumed for _, step in batch)


@pytest.mark.parametrize("setting, message", [
    ("data.augment_flip=x", "'data.augment_flip' must be one of '', 'h', 'v', 'hv', got 'x'"),
    ("data.augment_shift=-1", "'data.augment_shift' must be 0 \\(no moves\\) or more pixels"),
    ("data.cache_pictures_mb=-1", "'data.cache_pictures_mb' must be 0 \\(off\\) or more, got -1"),
    ("train.objective=dpo", "^data.augment_flip: for the chats and documents .* not for preference pairs"),
])
def test_bad_augment_settings_are_named(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.augment_flip=h", "model.init_from=somewhere", setting])


def test_train_command_augments_and_says_so(shapes_dir, tmp_path, capsys):
    settings = [*TINY_OVERRIDES, f"data.train={shapes_dir / 'train.jsonl'}", "data.eval=", "train.max_steps=4",
                "data.augment_shift=2", "data.augment_flip=h", f"output_dir={tmp_path}"]
    assert main(["train", str(CONFIG), "--set", *settings]) in (None, 0)
    assert "augment: pictures moved up to 2 px, mirrored left-right" in capsys.readouterr().out
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and all(loss == loss for loss in losses)


def test_decoded_pictures_are_kept_within_the_budget_and_come_back_unchanged(tiny, tmp_path):
    """`data.cache_pictures_mb`: a picture is decoded once while the budget lasts (so it still loads once its file is
    gone), the rest every time; moved and mirrored items from the cache equal those from the file."""
    processor, _ = tiny
    chats = []
    for index in range(4):
        Image.new("RGB", (8, 8), (index * 60, 0, 0)).save(tmp_path / f"{index}.png")
        chats.append(Sample([Turn("user", [Segment(image=str(tmp_path / f"{index}.png")), Segment(text="Colour?")]),
                             Turn("assistant", [Segment(text="red")])]))
    augment = Augment(shift=3, flip="hv", seed=1)
    plain = EncodedDataset(chats, processor, 256, augment=augment)
    one_picture = plain[0].pixel_values.nbytes
    cached = EncodedDataset(chats, processor, 256, augment=augment, cache_bytes=2 * one_picture)
    for step in range(3):
        for index in range(4):
            assert torch.equal(cached[(index, step)].pixel_values, plain[(index, step)].pixel_values)
    assert sorted(cached.cached_pixels) == [0, 1]
    for index in range(4):
        (tmp_path / f"{index}.png").unlink()
    assert torch.equal(cached[1].pixel_values, plain.processor.pixel_values([Image.new("RGB", (8, 8), (60, 0, 0))]))
    with pytest.raises(ImageError, match="2.png"):
        cached[2]


def test_a_picture_cache_for_preference_pairs_is_refused():
    with pytest.raises(ConfigError, match="^data.cache_pictures_mb: for the chats .* not for preference pairs"):
        load_config(None, ["train.objective=dpo", "model.init_from=somewhere", "data.cache_pictures_mb=64"])
