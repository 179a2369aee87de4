"""LoRA: only adapters (and the projector) train, resume is exact, and `final/` is a plain model with them merged."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from mmgpt import MMGPT
from mmgpt.checkpoint import latest_checkpoint
from mmgpt.config import load_config
from mmgpt.lora import add_lora, merge_lora
from mmgpt.modeling import MMGPTForConditionalGeneration
from mmgpt.train import train

from conftest import tiny_config

LORA = ["train.lora.r=4", "train.lora.alpha=8", "train.lora.dropout=0.1", "train.lr=1e-2"]


def losses(output_dir):
    return [r["loss"] for r in map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_lora_trains_adapters_and_projector_only_and_final_loads_merged(shapes_dir, tmp_path):
    config = tiny_config(shapes_dir, tmp_path, "train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=5",
                         "data.eval=", *LORA)
    result = train(config)
    first = load_file(tmp_path / "checkpoints" / "step-1" / "model.safetensors")
    last = load_file(tmp_path / "checkpoints" / "step-4" / "model.safetensors")
    changed = {name for name in first if not torch.equal(first[name], last[name])}
    assert changed, "nothing trained"
    assert all(".lora_" in name or name.startswith(("projector.", "vision.")) for name in changed), changed
    assert any(".lora_B." in name for name in changed) and any(name.startswith("projector.") for name in changed)
    assert not any(".base_layer." in name for name in changed)  # the decoder's own weights stay frozen

    final = load_file(result.final_dir / "model.safetensors")
    assert not any("lora_" in name or "base_layer" in name for name in final)
    model = MMGPT.from_pretrained(result.final_dir, device="cpu")  # no peft needed to load
    assert set(final) == set(model.model.state_dict()) - {"language_model.lm_head.weight"}
    assert isinstance(model.generate([[{"role": "user", "content": "hi"}]], max_new_tokens=3)[0], str)


def test_merged_weights_compute_what_the_adapted_model_computes(tiny, tmp_path):
    processor, base = tiny
    for targets, modules in [([], ["language_model"]), (["qkv", "fc1"], ["vision", "language_model"])]:
        model = MMGPTForConditionalGeneration(base.config)
        model.load_state_dict(base.state_dict())
        config = load_config(None, ["train.lora.r=4", f"train.lora.targets={targets}", f"train.lora.modules={modules}"])
        add_lora(model, config.train.lora)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".lora_B." in name:
                    parameter.normal_(std=0.5)  # adapters start at zero; make them matter
        model.eval()
        plain = MMGPTForConditionalGeneration(base.config).eval()
        plain.load_state_dict(merge_lora(model.state_dict(), model), strict=False)
        input_ids = torch.tensor([[5, 6, 7, *processor.image_slot(), 8, 9]])
        pixels = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            expected = model(input_ids=input_ids, pixel_values=pixels).logits
            merged = plain(input_ids=input_ids, pixel_values=pixels).logits
        assert not torch.allclose(expected, base(input_ids=input_ids, pixel_values=pixels).logits, atol=1e-3)
        torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)


def test_lora_resume_after_ctrl_c_continues_with_the_same_losses(shapes_dir, tmp_path):
    overrides = ["train.max_steps=6", "train.save_every=100", "data.eval=", *LORA]  # adapter dropout: RNG matters

    def press_ctrl_c_at_step_3(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(tiny_config(shapes_dir, tmp_path / "resumed", *overrides), on_step=press_ctrl_c_at_step_3).final_dir is None
    assert latest_checkpoint(tmp_path / "resumed").name == "step-3"
    train(tiny_config(shapes_dir, tmp_path / "resumed", *overrides))
    train(tiny_config(shapes_dir, tmp_path / "straight", *overrides))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


@pytest.mark.parametrize("override, message", [
    ("train.lora.modules=[projector]", r"train.lora.modules \['projector'\]: choose from"),
    ("train.lora.targets=[nothing_here]", "match no linear layer"),
])
def test_bad_lora_settings_are_named(shapes_dir, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_config(shapes_dir, tmp_path, "train.max_steps=1", "train.lora.r=2", override))
