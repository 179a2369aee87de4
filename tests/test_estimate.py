"""`mmgpt estimate`: its parameter counts are the built model's, its FLOPs are what torch counts in a training step."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmgpt.build import build
from mmgpt.config import load_config
from mmgpt.data.collate import collate
from mmgpt.data.dataset import EncodedDataset
from mmgpt.data.formats import read_jsonl
from mmgpt.estimate import ModelCosts, estimate
from mmgpt.lora import add_lora
from mmgpt.train import parameter_groups

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
# The real recipe's architecture with nothing to download: GPT-2 small's shape from transformers' defaults.
GPT2_SHAPE = ["model.vision.pretrained=", "model.text.pretrained=", "model.text.config={model_type: gpt2, vocab_size: 50257}"]
STAGES = {  # what trains in each of the real recipe's stages, and with adapters
    "stage 1": ["train.freeze=[vision, language_model]"],
    "stage 2": ["train.freeze=[vision]"],
    "all": [],
    "lora": ["train.freeze=[vision]", "train.lora.r=8"],
}


def built(shapes_dir, tmp_path, overrides):
    # plain attention in both towers: torch's counter does not see inside the fused CPU kernel
    config = tiny_config(shapes_dir, tmp_path, "model.text.attn_implementation=eager",
                         "model.vision.fused_attention=false", *overrides)
    samples, _ = read_jsonl(config.data.train)
    torch.manual_seed(0)
    processor, model = build(config.model, [s.text for x in samples for t in x.turns for s in t.segments if s.text])
    if config.train.lora.r:
        add_lora(model, config.train.lora)
    parameter_groups(model, config)
    return config, processor, model, samples


@pytest.mark.parametrize("stage", STAGES)
def test_training_flops_match_what_torch_counts(shapes_dir, tmp_path, stage):
    config, processor, model, samples = built(shapes_dir, tmp_path, STAGES[stage])
    dataset = EncodedDataset(samples[:8], processor, 256)
    batch = collate([dataset[i] for i in range(8)], processor.special.pad)
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    images = batch["pixel_values"].shape[0]
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    predicted = ModelCosts.of(model).training_flops(batch["input_ids"].numel(), images, batch["input_ids"].shape[0],
                                                    labelled=labelled)
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.03)


@pytest.mark.parametrize("stage", STAGES)
def test_parameter_counts_are_the_built_models(shapes_dir, tmp_path, stage):
    config, processor, model, _ = built(shapes_dir, tmp_path, STAGES[stage])
    config.model.text.bpe_vocab_size = len(processor.tokenizer)
    figures = estimate(config, gpus=1, gpu="h100", mfu=0.4, data=config.data.train)
    assert figures["parameters"] == sum(p.numel() for p in model.parameters())
    assert figures["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert figures["images_per_sample"] > 0 and figures["image_tokens"] == model.num_image_tokens


def test_memory_shrinks_as_sharding_and_checkpointing_say(shapes_dir, tmp_path):
    config = load_config(ROOT / "configs" / "siglip-gpt2-stage1.yaml", [*GPT2_SHAPE, "train.freeze=[vision]"])
    memory = estimate(config, gpus=8, gpu="a100", mfu=0.4, data=None)["memory"]
    ddp, zero2, fsdp = (memory[name][False] for name in ("ddp", "zero2", "fsdp"))
    assert zero2["optimizer"] == pytest.approx(ddp["optimizer"] / 8) and zero2["weights"] == ddp["weights"]
    assert fsdp["weights"] == pytest.approx(ddp["weights"] / 8)
    assert memory["ddp"][True]["activations"] < 0.75 * ddp["activations"]  # the logits stay: checkpointing keeps them


def test_estimate_from_the_command_line_for_the_real_recipe_without_downloads(shapes_dir):
    command = [sys.executable, "-m", "mmgpt.cli", "estimate", str(ROOT / "configs" / "siglip-gpt2-stage1.yaml"),
               "--gpus", "8", "--gpu", "a100", "--data", str(shapes_dir / "train.jsonl"), "--set", *GPT2_SHAPE]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "M total, 2.95M trained" in result.stdout  # stage 1 trains the projector only (3072 -> 768 -> 768) and "time per 1M samples on 8 x a100" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.strip().startswith(("ddp", "zero2", "fsdp"))]) == 6
    figures = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300).stdout)
    assert 200e6 < figures["parameters"] < 230e6 and figures["image_tokens"] == 49
    result = subprocess.run([*command[:4], str(ROOT / "configs" / "siglip-gpt2-stage2.yaml")], capture_output=True, text=True)
    assert result.returncode == 2 and "model.init_from runs/siglip-gpt2-stage1/final: no config.json yet" in result.stderr
