import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from accelerate import Accelerator

from mmgpt import MMGPT
from mmgpt.modeling import MMGPTForConditionalGeneration
from mmgpt.checkpoint import list_checkpoints
from mmgpt.config import load_config
from mmgpt.evaluate import normalise, read_eval_items
from mmgpt.train import train

from conftest import losses, stop_at_step_3_and_resume, tiny_config


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


def test_resume_with_decoding_workers_continues_with_the_same_losses(shapes_dir, tmp_path):
    """Two worker processes decode ahead of the step; Ctrl-C mid-run and the resumed run see the same batches as a
    run that never stopped, and as one that decodes in the training process."""
    overrides = ["train.max_steps=6", "train.save_every=100", "train.eval_every=3", "train.num_workers=2"]

    stop_at_step_3_and_resume(lambda: tiny_config(shapes_dir, tmp_path / "resumed", *overrides))
    train(tiny_config(shapes_dir, tmp_path / "in-process", *overrides, "train.num_workers=0"))
    assert len(losses(tmp_path / "resumed")) == 6
    assert losses(tmp_path / "resumed") == losses(tmp_path / "in-process")


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


def test_gradient_accumulation_equals_one_big_batch(shapes_dir, tmp_path):
    """2 x 4 accumulated is the same optimizer step as one batch of 8: averaged (not summed), clipped once."""
    runs = {}
    for accum in (1, 2):
        output_dir = tmp_path / f"accum{accum}"
        train(tiny_config(shapes_dir, output_dir, "train.max_steps=2", "train.batch_size=8",
                          f"train.grad_accum_steps={accum}", "train.save_every=1", "train.keep_checkpoints=5",
                          "train.max_grad_norm=0.5", "train.peak_tflops=0.5", "data.eval="))
        runs[accum] = output_dir
    one, two = ([json.loads(line) for line in (runs[a] / "metrics.jsonl").read_text().splitlines()] for a in (1, 2))
    for big, accumulated in zip(one, two):
        assert accumulated["loss"] == pytest.approx(big["loss"], rel=1e-5)
        assert accumulated["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-5)
        assert accumulated["supervised_tokens"] == big["supervised_tokens"]
    assert one[0]["grad_norm"] > 0.5  # so clipping acted, once, on the whole step's gradient
    for record in one + two:  # cost figures of every step: tokens/s, achieved FLOP/s, MFU against the stated peak
        assert record["tokens_per_s"] > 0 and record["mfu"] == pytest.approx(record["tflops_per_s"] / 0.5)
    from safetensors.torch import load_file

    for step in (1, 2):
        big = load_file(runs[1] / "checkpoints" / f"step-{step}" / "model.safetensors")
        accumulated = load_file(runs[2] / "checkpoints" / f"step-{step}" / "model.safetensors")
        for name, weight in big.items():
            torch.testing.assert_close(accumulated[name], weight, rtol=1e-5, atol=1e-6)
    optimizer_steps = torch.load(runs[2] / "checkpoints" / "step-2" / "optimizer.bin", weights_only=True)
    assert {int(s["step"]) for s in optimizer_steps["state"].values()} == {2}


def test_packed_batches_train_as_padded_ones(shapes_dir, tmp_path):
    """`train.packing`: the same losses and gradient norms as length-grouped padding, step by step."""
    runs = {}
    for packing in (False, True):
        runs[packing] = tmp_path / f"packing-{packing}"
        train(tiny_config(shapes_dir, runs[packing], "train.max_steps=3", "train.batch_size=8", "train.save_every=100",
                          f"train.packing={str(packing).lower()}", "data.eval="))
    padded, packed = ([json.loads(line) for line in (runs[p] / "metrics.jsonl").read_text().splitlines()]
                      for p in (False, True))
    for one, other in zip(padded, packed, strict=True):
        assert other["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert other["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
        assert other["supervised_tokens"] == one["supervised_tokens"]
    from conftest import TINY_LFM2

    with pytest.raises(ValueError, match="train.packing: the lfm2 decoder"):
        train(tiny_config(shapes_dir, tmp_path / "lfm2", TINY_LFM2, "train.packing=true", "train.max_steps=1"))


@pytest.mark.slow
def test_compiled_blocks_train_as_plain_ones_and_save_plain_weights(shapes_dir, tmp_path):
    """`train.compile`: each decoder layer and ViT block compiled in place; the same losses, and a final model whose
    weights load into a plain model."""
    runs = {}
    for compiled in (False, True):
        runs[compiled] = tmp_path / f"compile-{compiled}"
        train(tiny_config(shapes_dir, runs[compiled], "train.max_steps=3", "train.batch_size=8", "data.eval=",
                          f"train.compile={str(compiled).lower()}", "train.save_every=2"))
    assert losses(runs[True]) == pytest.approx(losses(runs[False]), rel=1e-4)
    assert isinstance(MMGPT.from_pretrained(runs[True] / "final", device="cpu").chat(
        [{"role": "user", "content": "hi"}], max_new_tokens=2), str)


def test_resumed_and_fresh_runs_save_the_same_generation_settings(shapes_dir, tmp_path):
    overrides = ["train.max_steps=2", "train.save_every=1", "data.eval="]
    train(tiny_config(shapes_dir, tmp_path / "fresh", *overrides))
    (tmp_path / "fresh" / "final").rename(tmp_path / "fresh-final")
    shutil.rmtree(tmp_path / "fresh" / "checkpoints" / "step-2")
    resumed = train(tiny_config(shapes_dir, tmp_path / "fresh", *overrides))
    assert resumed.step == 2
    before = json.loads((tmp_path / "fresh-final" / "generation_config.json").read_text())
    after = json.loads((resumed.final_dir / "generation_config.json").read_text())
    assert after == before
    processor = MMGPT.from_pretrained(resumed.final_dir, device="cpu").processor
    assert after["eos_token_id"] == [processor.special.end, processor.special.eos]


class Fp16ScalerAccelerator(Accelerator):
    """What accelerate sets up for fp16 on a CUDA GPU (a GradScaler in the optimizer's step), on the CPU."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        self.native_amp = True

    @property
    def mixed_precision(self) -> str:
        return "fp16"


def test_fp16_run_goes_on_after_a_nan_step(shapes_dir, tmp_path, monkeypatch):
    real_forward = MMGPTForConditionalGeneration.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        output = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if output.loss is not None and calls["n"] == 2:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(MMGPTForConditionalGeneration, "forward", forward)
    monkeypatch.setattr("mmgpt.train.Accelerator", Fp16ScalerAccelerator)
    result = train(tiny_config(shapes_dir, tmp_path, "train.max_steps=5", "train.save_every=100", "data.eval="))
    assert result.step == 5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in records] == [0, 1, 1, 1, 1]
    assert (tmp_path / "checkpoints" / "step-5" / "scaler.pt").is_file()


@pytest.mark.slow
def test_real_recipe_architecture_trains_both_stages_and_generates(shapes_dir, tmp_path):
    """SigLIP-B/16 at 224 px + GPT-2 small, pixel shuffle 2 (49 image tokens), as configs/siglip-gpt2-*.yaml build
    them, with random weights (nothing downloaded): stage 1 (projector), then stage 2 from its final folder."""
    root = Path(__file__).resolve().parents[1] / "configs"
    shape = ["model.vision.pretrained=", "model.text.pretrained=", "model.text.config={model_type: gpt2, vocab_size: 50257}"]
    common = [f"data.train={shapes_dir / 'train.jsonl'}", f"data.eval={shapes_dir / 'eval.jsonl'}", "train.batch_size=2",
              "train.max_steps=2", "train.warmup_steps=1", "train.eval_batches=1", "train.mixed_precision=no"]
    stage1 = train(load_config(root / "siglip-gpt2-stage1.yaml", [*shape, *common, f"output_dir={tmp_path / 's1'}"]))
    stage2 = train(load_config(root / "siglip-gpt2-stage2.yaml",
                               [*common, f"model.init_from={stage1.final_dir}", f"output_dir={tmp_path / 's2'}"]))
    model = MMGPT.from_pretrained(stage2.final_dir, device="cpu")
    assert model.model.vision.vit.__class__.__name__ == "VisionTransformer" and model.model.vision.width == 768
    assert model.model.num_image_tokens == 49 and model.model.config.text_config.n_layer == 12
    assert sum(p.numel() for p in model.model.parameters()) > 200e6
    messages = [{"role": "user", "content": [{"type": "image", "image": str(shapes_dir / "images" / "eval000000.png")},
                                             {"type": "text", "text": "What colour is the circle?"}]}]
    answer = model.generate([messages], max_new_tokens=4)[0]
    assert isinstance(answer, str)
