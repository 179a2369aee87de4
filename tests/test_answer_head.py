"""The auxiliary answer loss: it finds each answer, its question and its picture in a batch, trains the ViT by its
short path, and keeps training exact (accumulation, resume) as the main loss does."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmgpt.answer_head import answers_after_pictures
from mmgpt.config import ConfigError
from mmgpt.data.collate import collate
from mmgpt.data.dataset import EncodedDataset
from mmgpt.data.records import Sample, Segment, Turn
from mmgpt.train import train

from conftest import losses, stop_at_step_3_and_resume, tiny_config


def chat(*turns: tuple[str, list]) -> Sample:
    return Sample([Turn(role, [Segment(image=part) if isinstance(part, Image.Image) else Segment(text=part)
                               for part in parts]) for role, parts in turns])


def test_each_answer_is_found_with_its_question_and_the_picture_before_it(tiny):
    processor, model = tiny
    red, blue, green = (Image.new("RGB", (8, 8), colour) for colour in ("red", "blue", "green"))
    chats = [
        chat(("user", [red, "What colour is it?"]), ("assistant", ["red"]),
             ("user", ["How many shapes are there?"]), ("assistant", ["one"])),
        chat(("user", ["Say yes."]), ("assistant", ["yes"])),  # no picture: its answer is not the head's
        chat(("user", [blue, "Is it a square?"]), ("assistant", ["no"]),
             ("user", [green, "And this one?"]), ("assistant", ["square"])),
    ]
    batch = collate([EncodedDataset(chats, processor, 256)[index] for index in range(3)], processor.special.pad)
    rows, picture, question, first_token = answers_after_pictures(
        batch["input_ids"], batch["labels"], batch["attention_mask"], model.config.image_token_id,
        model.num_image_tokens)
    assert rows.tolist() == [0, 0, 2, 2]
    assert picture.tolist() == [0, 0, 1, 2]  # pictures in reading order across the batch: red, blue, green
    answers = ["red", "one", "no", "square"]
    assert first_token.tolist() == [processor.tokenizer.encode(answer)[0] for answer in answers]
    asked = [processor.tokenizer.decode(batch["input_ids"][row][mask]) for row, mask in zip(rows, question)]
    for text, wanted, earlier in zip(asked, ["What colour is it?", "How many shapes", "Is it a square?", "And this one?"],
                                     [None, "What colour", None, "Is it a square"]):
        assert wanted in text and (earlier is None or earlier not in text)
        assert not any(answer in text.split() for answer in answers)


def test_the_answer_loss_trains_the_vit_and_is_logged(shapes_dir, tmp_path):
    overrides = ["train.max_steps=3", "train.save_every=100", "data.eval=", "train.lr=1e-3"]
    plain = train(tiny_config(shapes_dir, tmp_path / "plain", *overrides))
    helped = train(tiny_config(shapes_dir, tmp_path / "helped", *overrides, "train.answer_loss_weight=2.0"))
    records = [json.loads(line) for line in (tmp_path / "helped" / "metrics.jsonl").read_text().splitlines()]
    assert all(record["answer_loss"] > 0 for record in records)
    assert all("answer_loss" not in json.loads(line)
               for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines())
    from safetensors.torch import load_file

    plain_weights = load_file(plain.final_dir / "model.safetensors")
    helped_weights = load_file(helped.final_dir / "model.safetensors")
    assert set(plain_weights) == set(helped_weights)  # the head is not saved with the model
    stem = "vision.vit.patch_embed.proj.weight"
    assert not torch.allclose(plain_weights[stem], helped_weights[stem])


def test_with_the_answer_loss_accumulation_and_resume_stay_exact(shapes_dir, tmp_path):
    """2 x 4 accumulated is one batch of 8 (the answer loss shares the main loss's normaliser), and a run stopped
    at step 3 and resumed gives the losses of one that never stopped (the head's state is in the checkpoint)."""
    weight = "train.answer_loss_weight=1.0"
    runs = {}
    for accum in (1, 2):
        runs[accum] = tmp_path / f"accum{accum}"
        train(tiny_config(shapes_dir, runs[accum], "train.max_steps=2", "train.batch_size=8", weight,
                          f"train.grad_accum_steps={accum}", "train.save_every=100", "data.eval="))
    one, two = ([json.loads(line) for line in (runs[a] / "metrics.jsonl").read_text().splitlines()] for a in (1, 2))
    for big, accumulated in zip(one, two):
        for key in ("loss", "grad_norm", "answer_loss"):
            assert accumulated[key] == pytest.approx(big[key], rel=1e-5)

    overrides = ["train.max_steps=6", "train.save_every=100", "train.eval_every=100", weight]

    stop_at_step_3_and_resume(lambda: tiny_config(shapes_dir, tmp_path / "resumed", *overrides))
    train(tiny_config(shapes_dir, tmp_path / "straight", *overrides))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


@pytest.mark.parametrize("setting", ["train.packing=true", "train.freeze=[vision]", "train.answer_loss_weight=-1",
                                     "train.vision_warmup_steps=-1", "train.vision_warmup_steps=4"])
def test_settings_the_answer_loss_cannot_work_with_are_named(setting, shapes_dir, tmp_path):
    from mmgpt.config import check_values

    weight = [] if "answer_loss_weight" in setting else ["train.answer_loss_weight=1.0"]
    name = setting.split("=")[0].split(".")[1]
    with pytest.raises(ConfigError, match=name):
        check_values(tiny_config(shapes_dir, tmp_path, *weight, "train.max_steps=4", setting))


def test_vision_warmup_without_the_answer_loss_is_named(shapes_dir, tmp_path):
    from mmgpt.config import check_values

    with pytest.raises(ConfigError, match="vision_warmup_steps.*answer_loss_weight"):
        check_values(tiny_config(shapes_dir, tmp_path, "train.max_steps=4", "train.vision_warmup_steps=2"))


def test_vision_warmup_trains_the_vit_alone_first(shapes_dir, tmp_path):
    """During the warm-up steps only the ViT and the head learn (the decoder is not run); after them, all of it."""
    from safetensors.torch import load_file

    overrides = ["data.eval=", "train.answer_loss_weight=1.0"]
    start = train(tiny_config(shapes_dir, tmp_path / "start", *overrides, "train.max_steps=1", "train.lr=0"))
    train(tiny_config(shapes_dir, tmp_path / "warmed", *overrides, "train.max_steps=3", "train.save_every=2",
                      "train.vision_warmup_steps=2"))
    before = load_file(start.final_dir / "model.safetensors")
    after = load_file(tmp_path / "warmed" / "checkpoints" / "step-2" / "model.safetensors")  # the warm-up's end
    assert all(torch.equal(before[name], after[name]) for name in before if name.startswith("language_model."))
    assert not torch.equal(before["vision.vit.patch_embed.proj.weight"], after["vision.vit.patch_embed.proj.weight"])
    records = [json.loads(line) for line in (tmp_path / "warmed" / "metrics.jsonl").read_text().splitlines()]
    decoder_ran = [("loss" in record, "tokens_per_s" in record) for record in records]
    assert decoder_ran == [(False, False)] * 2 + [(True, True)] and all(record["answer_loss"] > 0 for record in records)

    overrides += ["train.save_every=100", "train.max_steps=6", "train.eval_every=100", "train.vision_warmup_steps=2"]
    stop_at_step_3_and_resume(lambda: tiny_config(shapes_dir, tmp_path / "resumed", *overrides))
    straight = train(tiny_config(shapes_dir, tmp_path / "straight", *overrides))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 4  # the decoder's loss from step 3 on
    trained = load_file(straight.final_dir / "model.safetensors")
    assert not any(torch.equal(before[name], trained[name]) for name in before if name.endswith("attn.c_attn.weight"))


def test_the_heads_own_answers_are_counted_per_kind(shapes_dir, tmp_path):
    """benchmarks/answer_head_reads.py: the newest checkpoint's ViT and head answer every held-out question, counted
    under the record's kind; a run without the head is named as such."""
    import importlib.util
    from collections import Counter
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "answer_head_reads.py"
    spec = importlib.util.spec_from_file_location("answer_head_reads", path)
    reads = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reads)
    overrides = ["train.max_steps=2", "train.save_every=100", "data.eval="]
    train(tiny_config(shapes_dir, tmp_path / "headed", *overrides, "train.answer_loss_weight=1.0"))
    figures = reads.head_accuracy(tmp_path / "headed", shapes_dir / "eval.jsonl")
    kinds = Counter(json.loads(line)["kind"] for line in (shapes_dir / "eval.jsonl").read_text().splitlines())
    assert {kind: figure["n"] for kind, figure in figures.items() if kind != "all"} == kinds
    assert figures["all"]["n"] == sum(kinds.values())
    assert figures["all"]["accuracy"] == pytest.approx(
        sum(figure["accuracy"] * figure["n"] for kind, figure in figures.items() if kind != "all") / sum(kinds.values()))
    train(tiny_config(shapes_dir, tmp_path / "plain", *overrides))
    with pytest.raises(FileNotFoundError, match="without train.answer_loss_weight"):
        reads.head_accuracy(tmp_path / "plain", shapes_dir / "eval.jsonl")
