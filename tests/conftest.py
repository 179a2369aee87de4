"""Shared fixtures: a tiny shapes set, a tiny config, and a tiny processor + model built the way training builds them."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Callable

import pytest
import torch

from mmgpt.build import build
from mmgpt.config import Config, load_config
from mmgpt.data.formats import read_jsonl
from mmgpt.data.shapes import write_shapes
from mmgpt.train import train

TINY_OVERRIDES = [
    "model.vision.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}",
    "model.text.config={model_type: gpt2, n_layer: 2, n_embd: 32, n_head: 2, n_positions: 256, "
    "resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}",
    "model.text.bpe_vocab_size=400",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "train.eval_batches=1",
    "train.mixed_precision=no",
]


def losses(output_dir: Path) -> list[float]:
    """The training loss of each step, from a run's metrics."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


def stop_at_step_3_and_resume(config_for: Callable[[], Config]) -> None:
    """Train until Ctrl-C at step 3, then run the same config again, which resumes it."""

    def press_ctrl_c_at_step_3(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(config_for(), on_step=press_ctrl_c_at_step_3).step == 3
    train(config_for())


def training_episodes(folder: Path) -> list[dict]:
    """The fast-binding episodes of a train.jsonl: documents of several pictures that open with one (the shapes
    world's documents open with text, or are one picture and its caption)."""
    records = map(json.loads, (folder / "train.jsonl").read_text().splitlines())
    return [r for r in records if "content" in r and r["content"][0]["type"] == "image" and len(r["content"]) > 2]


# The tiny-icl recipe's decoder layout (LFM2: a short convolution, then one attention layer), at test size.
TINY_LFM2 = ("model.text.config={model_type: lfm2, hidden_size: 32, intermediate_size: 64, "
             "block_auto_adjust_ff_dim: false, num_hidden_layers: 2, layer_types: [conv, full_attention], "
             "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 256}")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    write_shapes(folder, seed=1, train=40, eval=10)
    return folder


def tiny_config(shapes_dir: Path, output_dir: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [f"data.train={shapes_dir / 'train.jsonl'}", f"data.eval={shapes_dir / 'eval.jsonl'}", f"output_dir={output_dir}",
         *TINY_OVERRIDES, *overrides],
    )


@pytest.fixture(scope="session")
def tiny(shapes_dir, tmp_path_factory):
    """(processor, model) in eval mode, built from the tiny config and the shapes training text."""
    torch.manual_seed(0)
    config = tiny_config(shapes_dir, tmp_path_factory.mktemp("run"))
    samples, _ = read_jsonl(config.data.train)
    texts = [seg.text for s in samples for t in s.turns for seg in t.segments if not seg.is_image]
    processor, model = build(config.model, texts)
    return processor, model.eval()
