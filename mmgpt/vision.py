"""The image encoder: any timm ViT, returning one fixed count of patch features per image."""

from __future__ import annotations

import functools
import math
import os

import timm
import torch
from timm.layers import HybridEmbed
from torch import nn


def _pretrained_kwargs(pretrained: str) -> dict:
    """timm takes a hub name through `pretrained=True` and a local weights file through `pretrained_cfg_overlay`."""
    if not pretrained:
        return {"pretrained": False}
    if os.path.isfile(pretrained):
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": pretrained}}
    return {"pretrained": True}


def conv_stem_embed(img_size, patch_size, in_chans: int = 3, embed_dim: int = 768, depth: int | list[int] = 1,
                    **kwargs) -> HybridEmbed:
    """Patch embedding by a stack of stride-2 3x3 convolutions instead of one linear patchify (Xiao et al. 2021,
    "Early convolutions help transformers see better"): same patch grid, but a locality prior that a ViT trained
    from scratch on small data otherwise has to learn. `depth` is the convolutions a stage, finest first: one
    number for all or one a stage. Each stride-1 convolution past the first widens what a patch sees, most in the
    coarse stages (at patch size 8: 15 px with one a stage, 39 px with [1, 2, 2], 43 px with 2), for an object
    that straddles patches. Built on timm's `HybridEmbed`."""
    size = patch_size if isinstance(patch_size, int) else patch_size[0]
    stages = int(math.log2(size))
    assert 2**stages == size, "the convolutional stem needs a power-of-two patch size"
    depths = [depth] * stages if isinstance(depth, int) else list(depth)
    if len(depths) != stages:
        raise ValueError(f"model.vision.conv_stem_depth {depth} names {len(depths)} stages, but a stem for patch "
                         f"size {size} has {stages} (one number for all, or one a stage)")
    layers: list[nn.Module] = []
    width = in_chans
    for stage, stage_depth in enumerate(depths):
        out = min(embed_dim, 32 * 2**stage)
        layers += [nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.GELU()]
        for _ in range(stage_depth - 1):
            layers += [nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.GELU()]
        width = out
    return HybridEmbed(nn.Sequential(*layers), img_size=img_size, patch_size=1, feature_size=None,
                       in_chans=in_chans, embed_dim=embed_dim, bias=kwargs.get("bias", True))


class VisionEncoder(nn.Module):
    """Wraps a timm ViT so the rest of the model sees `(B, num_patches, width)` and nothing timm-specific."""

    def __init__(
        self, model_name: str, model_kwargs: dict, pretrained: str = "", fused_attention: bool = True,
        conv_stem: bool = False, conv_stem_depth: int | list[int] = 1,
    ):
        super().__init__()
        extra = {"embed_layer": functools.partial(conv_stem_embed, depth=conv_stem_depth)} if conv_stem else {}
        try:
            self.vit = timm.create_model(model_name, num_classes=0, **model_kwargs, **extra,
                                         **_pretrained_kwargs(pretrained))
        except TypeError as error:  # an unknown or wrong-typed keyword surfaces deep inside the model class
            raise ValueError(f"timm's {model_name!r} cannot be built with the vision kwargs {model_kwargs}: {error}") from None
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
