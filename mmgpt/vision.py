"""The image encoder: any timm ViT, returning one fixed count of patch features per image."""

from __future__ import annotations

import os

import timm
import torch
from torch import nn


def _pretrained_kwargs(pretrained: str) -> dict:
    """timm takes a hub name through `pretrained=True` and a local weights file through `pretrained_cfg_overlay`."""
    if not pretrained:
        return {"pretrained": False}
    if os.path.isfile(pretrained):
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": pretrained}}
    return {"pretrained": True}


class VisionEncoder(nn.Module):
    """Wraps a timm ViT so the rest of the model sees `(B, num_patches, width)` and nothing timm-specific."""

    def __init__(self, model_name: str, model_kwargs: dict, pretrained: str = "", fused_attention: bool = True):
        super().__init__()
        self.vit = timm.create_model(model_name, num_classes=0, **model_kwargs, **_pretrained_kwargs(pretrained))
        if not fused_attention:
            # timm's plain attention path: at tiny widths on CPU its backward is far faster than fused SDPA's.
            for module in self.vit.modules():
                if hasattr(module, "fused_attn"):
                    module.fused_attn = False
        self.num_prefix_tokens = getattr(self.vit, "num_prefix_tokens", 0)
        self.grid_size = tuple(self.vit.patch_embed.grid_size)
        self.width = self.vit.num_features

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def data_config(self) -> dict:
        """Mean, std and interpolation as timm resolves them; the input size the ViT was built for."""
        config = timm.data.resolve_model_data_config(self.vit)
        config["input_size"] = (3, *self.vit.patch_embed.img_size)
        return config

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.vit.forward_features(pixel_values)  # (B, prefix + N, C)
        return features[:, self.num_prefix_tokens :]  # (B, N, C): class and register tokens dropped
