"""Low-rank adapters (peft's LoRA) on the decoder and optionally the ViT, and their merge into plain weights.

Adapters are injected in place (`peft.inject_adapter_in_model`), so the model keeps its class, `generate()` and
checkpointing; a checkpoint holds base weights and adapters; `final/` holds the merged weights, a plain mmgpt model
that loads without peft.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mmgpt.config import LoraConfig
from mmgpt.modeling import MMGPTForConditionalGeneration

ADAPTER_NAME = "default"
TOWERS = ("language_model", "vision")


def target_layers(model: MMGPTForConditionalGeneration, settings: LoraConfig) -> list[str]:
    """Full names of the linear layers that get adapters: those named in `settings.targets` (every linear layer
    when empty) inside the chosen towers, never the decoder's output head."""
    unknown = set(settings.modules) - set(TOWERS)
    if unknown or not settings.modules:
        raise ValueError(f"train.lora.modules {settings.modules!r}: choose from {list(TOWERS)}")
    head = model.get_output_embeddings()
    names = []
    for tower in settings.modules:
        for name, module in getattr(model, tower).named_modules():
            if isinstance(module, (nn.Linear, Conv1D)) and module is not head:
                if not settings.targets or name.rsplit(".", 1)[-1] in settings.targets:
                    names.append(f"{tower}.{name}")
    if not names:
        raise ValueError(f"train.lora.targets {settings.targets!r} match no linear layer in {settings.modules}")
    return names


def add_lora(model: MMGPTForConditionalGeneration, settings: LoraConfig) -> None:
    """Inject adapters into the chosen towers; `train.parameter_groups` then trains only them there."""
    from peft import LoraConfig as PeftLoraConfig, inject_adapter_in_model

    peft_config = PeftLoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=target_layers(model, settings),
    )
    with warnings.catch_warnings():  # peft notes that it transposes GPT-2's Conv1D (in x out) adapters: expected
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER_NAME)


def is_adapter(parameter_name: str) -> bool:
    return ".lora_" in f".{parameter_name}"


def merge_lora(state_dict: dict[str, torch.Tensor], model: MMGPTForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The plain model's weights: W + scale * B @ A for every adapted layer (transposed for GPT-2's Conv1D, which
    stores W as in x out), adapter tensors dropped, `base_layer` names restored. Works on a gathered state dict, so
    FSDP and DeepSpeed runs merge the same way."""
    from peft.tuners.lora import LoraLayer

    merged = {key.replace(".base_layer.", "."): value for key, value in state_dict.items() if not is_adapter(key)}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        lora_a = state_dict[f"{name}.lora_A.{ADAPTER_NAME}.weight"].float()
        lora_b = state_dict[f"{name}.lora_B.{ADAPTER_NAME}.weight"].float()
        delta = (lora_b @ lora_a) * module.scaling[ADAPTER_NAME]  # (out, in)
        if module.fan_in_fan_out:
            delta = delta.T
        weight = merged[f"{name}.weight"]
        merged[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    return merged
