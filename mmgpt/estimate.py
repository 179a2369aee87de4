"""What a run costs before it runs: parameters, FLOPs per sample, memory per GPU by sharding strategy, time.

FLOPs count matrix multiplies (2 per multiply-add), as MFU figures do (PaLM appendix B): each linear layer once per
token it sees (the decoder's output layer only at labelled tokens: training computes logits there alone), attention
4 * layers * width * sequence per token, backward twice the forward where weights train and once where only
gradients flow through. Memory follows Korthikanti et al. 2022 for activations (34 bytes x
width per token and layer at 16-bit with a fused attention; a checkpointed layer keeps only its input), and
mixed-precision AdamW for the rest (fp32 weights, fp32 gradients, two fp32 moments).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mmgpt.config import ModelConfig
from mmgpt.modeling import MMGPTConfig, MMGPTForConditionalGeneration

# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets (TFLOP/s) and memory (GiB), by name.
GPUS = {
    "h200": (989.0, 141), "h100": (989.0, 80), "a100": (312.0, 80), "a100-40gb": (312.0, 40),
    "l40s": (362.0, 48), "l4": (121.0, 24), "a10": (125.0, 24), "v100": (125.0, 32),
}
STRATEGIES = ("ddp", "zero2", "fsdp")  # replicated; optimizer + gradients sharded; everything sharded (ZeRO-3)
TOWERS = ("vision", "projector", "language_model")  # in the order data flows through them


def peak_flops_of(device: torch.device, mixed_precision: str) -> float:
    """The datasheet peak of a known CUDA GPU at 16-bit (0 where unknown: CPUs, fp32 runs, other GPUs)."""
    if device.type != "cuda" or mixed_precision not in ("bf16", "fp16"):
        return 0.0
    name = torch.cuda.get_device_name(device).lower().replace(" ", "")
    matches = [key for key in GPUS if key.split("-")[0] in name]
    return GPUS[max(matches, key=len)][0] * 1e12 if matches else 0.0


@dataclass
class Tower:
    """One part of the model as the cost model sees it: linear weights and whether gradients touch them."""

    matmul_weights: int = 0  # elements of every linear layer's weight (each used once per position)
    trained_matmul_weights: int = 0
    layers: int = 0  # attention layers
    width: int = 0
    positions: int = 0  # positions per image (vision, projector); 0 for the decoder (per token)
    head_weights: int = 0  # the decoder's output layer, used at labelled positions only (in `matmul_weights` too)
    gradient_flows: bool = False  # some weight here or upstream trains, so backward passes through


@dataclass
class ModelCosts:
    parameters: int
    trainable: int
    towers: dict[str, Tower] = field(default_factory=dict)

    @classmethod
    def of(cls, model: MMGPTForConditionalGeneration) -> "ModelCosts":
        towers = {}
        upstream_trains = False
        for name in TOWERS:
            module = getattr(model, name)
            tower = Tower()
            for layer in module.modules():
                if isinstance(layer, (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d)):
                    per_position = layer.weight.numel()  # a convolution: its weight once per output position
                    tower.matmul_weights += per_position
                    tower.trained_matmul_weights += per_position if layer.weight.requires_grad else 0
            upstream_trains = upstream_trains or any(p.requires_grad for p in module.parameters())
            tower.gradient_flows = upstream_trains
            towers[name] = tower
        vision = towers["vision"]
        vision.layers, vision.width = len(model.vision.vit.blocks), model.vision.width
        vision.positions = model.vision.num_patches + model.vision.num_prefix_tokens
        towers["projector"].positions = model.num_image_tokens
        text = model.config.text_config
        decoder = towers["language_model"]
        decoder.width = text.hidden_size
        head = model.language_model.get_output_embeddings()
        decoder.head_weights = head.weight.numel() if model._plain_head else 0
        decoder.layers = sum(1 for kind in getattr(text, "layer_types", None) or ["attention"] * text.num_hidden_layers
                             if "attention" in kind)
        parameters = {id(p): p for p in model.parameters()}.values()  # tied weights once
        return cls(sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if p.requires_grad), towers)

    def forward_flops(self, tokens: int, images: int, sequence: float, labelled: float | None = None
                      ) -> dict[str, tuple[float, float]]:
        """Forward FLOPs per tower, (linear layers, attention), for `tokens` decoder tokens in sequences of mean
        length `sequence`, `labelled` of them with a label (all when not given)."""
        vision, projector, decoder = (self.towers[name] for name in TOWERS)
        labelled = tokens if labelled is None else labelled
        return {
            "vision": (images * 2 * vision.matmul_weights * vision.positions,
                       images * 4 * vision.layers * vision.width * vision.positions**2),
            "projector": (images * 2 * projector.matmul_weights * projector.positions, 0.0),
            "language_model": (2 * (tokens * (decoder.matmul_weights - decoder.head_weights)
                                    + labelled * decoder.head_weights),
                               tokens * 4 * decoder.layers * decoder.width * sequence),
        }

    def training_flops(self, tokens: int, images: int, sequences: int, checkpointing: bool = False,
                       labelled: float | None = None) -> float:
        """Forward + backward (+ the recomputed forward under activation checkpointing) of one training step.

        Where gradients flow, a linear layer's backward is its input gradient (1x forward) plus its weight gradient
        where the weight trains (1x); attention's is 2x (both operands of both products)."""
        total = 0.0
        for name, (linear, attention) in self.forward_flops(tokens, images, tokens / max(1, sequences), labelled).items():
            tower = self.towers[name]
            if not tower.gradient_flows:
                total += linear + attention
                continue
            weight_share = tower.trained_matmul_weights / max(1, tower.matmul_weights)
            recompute = checkpointing and name != "projector"
            total += linear * (2 + weight_share + recompute) + attention * (3 + recompute)
        return total

    def memory(self, strategy: str, gpus: int, micro_batch: int, tokens: float, images: float, bytes_per_activation: int,
               checkpointing: bool, vocab_size: int, labelled: float) -> dict[str, float]:
        """Bytes per GPU: fp32 weights, fp32 gradients and AdamW's two fp32 moments of the trained weights, each
        sharded over the GPUs as the strategy does, and the activations of one micro-batch."""
        shard_weights = gpus if strategy == "fsdp" else 1
        shard_state = gpus if strategy in ("zero2", "fsdp") else 1
        activations = 0.0
        per_token_layer = 34 / 2 * bytes_per_activation  # x width; 34 bytes at 16-bit
        for name, count in (("vision", images * self.towers["vision"].positions), ("language_model", tokens)):
            tower = self.towers[name]
            if tower.gradient_flows:
                kept = 2 / 2 * bytes_per_activation if checkpointing else per_token_layer
                recompute = per_token_layer if checkpointing else 0
                activations += micro_batch * count * tower.width * (tower.layers * kept + recompute)
        logit_rows = labelled if self.towers["language_model"].head_weights else tokens
        activations += micro_batch * logit_rows * vocab_size * (bytes_per_activation + 8)  # logits, fp32 loss and grad
        return {
            "weights": 4 * self.parameters / shard_weights,
            "gradients": 4 * self.trainable / shard_state,
            "optimizer": 8 * self.trainable / shard_state,
            "activations": activations,
        }


def estimate(config, gpus: int, gpu: str, mfu: float, data: str | None) -> dict:
    """The figures `mmgpt estimate` prints, from a run config (no weights loaded, nothing trained)."""
    from mmgpt.lora import add_lora
    from mmgpt.data.loader import micro_batch_size
    from mmgpt.train import parameter_groups

    if gpu not in GPUS:
        raise ValueError(f"unknown --gpu {gpu!r}; known: {', '.join(GPUS)}")
    with torch.device("meta"):  # shapes only: no memory, no initialisation, nothing downloaded
        model = MMGPTForConditionalGeneration(_architecture(config.model))
        if config.train.lora.r:
            add_lora(model, config.train.lora)
    parameter_groups(model, config)
    costs = ModelCosts.of(model)
    text_tokens, labelled, images = _tokens_per_sample(data, config)
    tokens = text_tokens + images * (model.num_image_tokens + 2)
    micro = micro_batch_size(config.train.batch_size, gpus, config.train.grad_accum_steps)
    precision_bytes = 4 if config.train.mixed_precision == "no" else 2
    checkpointing = config.train.activation_checkpointing
    per_sample = costs.training_flops(round(tokens), round(images), 1, checkpointing, labelled)
    peak, memory_gib = GPUS[gpu]
    memory = {
        strategy: {
            setting: costs.memory(strategy, gpus, micro, tokens, images, precision_bytes, setting,
                                  model.config.text_config.vocab_size, labelled)
            for setting in (False, True)
        }
        for strategy in STRATEGIES
    }
    return {
        "parameters": costs.parameters, "trainable": costs.trainable,
        "tokens_per_sample": tokens, "text_tokens": text_tokens, "labelled_tokens": labelled, "images_per_sample": images,
        "image_tokens": model.num_image_tokens, "flops_per_sample": per_sample, "micro_batch": micro,
        "gpus": gpus, "gpu": gpu, "gpu_memory_gib": memory_gib, "mfu": mfu, "checkpointing": checkpointing,
        "hours_per_million_samples": per_sample * 1e6 / (gpus * peak * 1e12 * mfu) / 3600,
        "memory": memory,
    }


def _architecture(config: ModelConfig) -> MMGPTConfig:
    """The composite's config as training would build it: from `init_from`'s folder, or from the model section."""
    from mmgpt.build import composite_config, decoder_config

    if config.init_from:
        folder = Path(config.init_from)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"model.init_from {folder}: no config.json yet. Estimate with the config of the stage that writes it "
                "(and this stage's train settings), or --set model.init_from= and the architecture"
            )
        return MMGPTConfig.from_pretrained(folder)
    try:
        text_config = decoder_config(config.text, config.text.bpe_vocab_size)
    except OSError as error:
        raise ValueError(f"could not read the decoder config {config.text.pretrained!r} ({error}); give a local "
                         "folder, or --set model.text.pretrained= model.text.config=... to describe its shape") from None
    text_config.bos_token_id = text_config.eos_token_id = text_config.pad_token_id = None
    return composite_config(config, text_config, 0)


def _tokens_per_sample(data: str | None, config, limit: int = 1000) -> tuple[float, float, float]:
    """Mean text tokens, labelled tokens (assistant turns, or all of a document) and images per record over the
    first `limit` records, GPT-2-like BPE taken as about 4 characters a token; when no data is given, 64 text
    tokens, 16 labelled and 1 image are assumed."""
    if not data:
        return 64.0, 16.0, 1.0
    from mmgpt.data.records import parse_record

    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    characters, labelled, images, count = 0, 0.0, 0, 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if count == limit:
                break
            if not line.strip():
                continue
            sample = parse_record(json.loads(line), path.parent, f"{path.name} record {count + 1}")
            segments = [segment for turn in sample.turns for segment in turn.segments]
            characters += sum(len(s.text) for s in segments if not s.is_image) + 8 * len(sample.turns)  # + role tokens
            images += sum(1 for s in segments if s.is_image)
            labelled += sum(sum(len(s.text) for s in turn.segments if not s.is_image) / 4 + 1
                            for turn in sample.turns if turn.role in (None, "assistant"))
            count += 1
    if count == 0:
        raise ValueError(f"{path} holds no records")
    return characters / 4 / count, labelled / count, images / count


def format_estimate(figures: dict) -> str:
    """The estimate as a short report with one memory table per strategy and activation-checkpointing setting."""
    gib = 2**30
    lines = [
        f"parameters: {figures['parameters'] / 1e6:.1f}M total, {figures['trainable'] / 1e6:.2f}M trained",
        f"tokens per sample: {figures['tokens_per_sample']:.0f} ({figures['text_tokens']:.0f} text + "
        f"{figures['images_per_sample']:.2f} images x {figures['image_tokens']} image tokens; "
        f"{figures['labelled_tokens']:.0f} labelled)",
        f"training FLOPs per sample: {figures['flops_per_sample'] / 1e9:.2f} GFLOP",
        f"time per 1M samples on {figures['gpus']} x {figures['gpu']} at {figures['mfu']:.0%} MFU: "
        f"{figures['hours_per_million_samples']:.3g} h",
        f"memory per GPU (GiB; micro-batch {figures['micro_batch']}; {figures['gpu']} has {figures['gpu_memory_gib']}):",
        f"  {'strategy':<8} {'ckpt':<5} {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total':>8}",
    ]
    for strategy, settings in figures["memory"].items():
        for checkpointing, parts in settings.items():
            total = sum(parts.values())
            fits = "" if total < figures["gpu_memory_gib"] * gib * 0.9 else "  (does not fit)"
            lines.append(
                f"  {strategy:<8} {'yes' if checkpointing else 'no':<5} "
                + " ".join(f"{parts[key] / gib:>8.2f}" for key in ("weights", "gradients", "optimizer", "activations"))
                + f" {total / gib:>8.2f}{fits}"
            )
    return "\n".join(lines)
