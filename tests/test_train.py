import json
import os
import signal

import pytest
import torch

from mmgpt import MMGPT
from mmgpt.checkpoint import list_checkpoints
from mmgpt.evaluate import normalise, read_eval_items
from mmgpt.train import train

from conftest import tiny_config


def losses(output_dir):
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_resume_after_ctrl_c_continues_with_the_same_losses(shapes_dir, tmp_path):
    overrides = ["train.max_steps=6", "train.save_every=100", "train.eval_every=100",
                 "model.text.config.resid_pdrop=0.1"]  # dropout on, so the RNG state must be restored too

    def press_ctrl_c_at_step_3(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    interrupted = train(tiny_config(shapes_dir, tmp_path / "resumed", *overrides), on_step=press_ctrl_c_at_step_3)
    assert interrupted.final_dir is None and interrupted.step == 3
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed")] == [3]
    resumed = train(tiny_config(shapes_dir, tmp_path / "resumed", *overrides))
    straight = train(tiny_config(shapes_dir, tmp_path / "straight", *overrides))
    assert resumed.step == straight.step == 6
    assert len(losses(tmp_path / "resumed")) == 6
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "mmgpt_processor.json"):
        assert (resumed.final_dir / name).is_file()
    assert (tmp_path / "resumed" / "loss.png").stat().st_size > 1000


def test_model_overfits_a_handful_of_samples(shapes_dir, tmp_path):
    items = read_eval_items(shapes_dir / "eval.jsonl")[:4]
    handful = shapes_dir / "handful.jsonl"  # beside the images: paths may not leave the data folder
    records = [{"messages": item.solved} for item in items]
    handful.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tiny_config(shapes_dir, tmp_path / "run", f"data.train={handful}", "data.eval=", "train.max_steps=150",
                         "train.lr=5e-3", "train.min_lr_ratio=1.0", "train.warmup_steps=5", "train.save_every=1000")
    result = train(config)
    assert losses(tmp_path / "run")[-1] < 0.05
    model = MMGPT.from_pretrained(result.final_dir, device="cpu")
    answers = model.generate([item.prompt for item in items], max_new_tokens=8)
    assert [normalise(a) for a in answers] == [normalise(item.answer) for item in items]


def test_frozen_modules_do_not_change(shapes_dir, tmp_path):
    config = tiny_config(shapes_dir, tmp_path / "run", "train.max_steps=3", "train.freeze=[vision]",
                         "train.save_every=1", "train.keep_checkpoints=5", "data.eval=")
    train(config)
    from safetensors.torch import load_file

    first = load_file(tmp_path / "run" / "checkpoints" / "step-1" / "model.safetensors")
    last = load_file(tmp_path / "run" / "checkpoints" / "step-3" / "model.safetensors")
    assert torch.equal(first["vision.vit.blocks.0.attn.qkv.weight"], last["vision.vit.blocks.0.attn.qkv.weight"])
    assert not torch.equal(first["projector.mlp.0.weight"], last["projector.mlp.0.weight"])


def test_unknown_module_name_in_freeze_is_an_error(shapes_dir, tmp_path):
    config = tiny_config(shapes_dir, tmp_path / "run", "train.freeze=[visoin]", "train.max_steps=1")
    with pytest.raises(ValueError, match="visoin"):
        train(config)


def test_gradient_accumulation_steps_once_per_accumulated_batch(shapes_dir, tmp_path):
    config = tiny_config(shapes_dir, tmp_path / "run", "train.max_steps=3", "train.grad_accum_steps=2",
                         "train.batch_size=2", "train.save_every=1", "train.keep_checkpoints=5", "data.eval=")
    train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["supervised_tokens"] > 0 for r in records)
    from safetensors.torch import load_file

    first = load_file(tmp_path / "run" / "checkpoints" / "step-1" / "model.safetensors")
    second = load_file(tmp_path / "run" / "checkpoints" / "step-2" / "model.safetensors")
    assert not torch.equal(first["projector.mlp.0.weight"], second["projector.mlp.0.weight"])
    optimizer_steps = torch.load(tmp_path / "run" / "checkpoints" / "step-3" / "optimizer.bin", weights_only=True)
    assert {int(s["step"]) for s in optimizer_steps["state"].values()} == {3}
