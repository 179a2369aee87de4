"""Maps vision features into the decoder's embedding space, optionally trading tokens for width."""

from __future__ import annotations

import torch
from torch import nn


def pixel_shuffle(features: torch.Tensor, grid_size: tuple[int, int], factor: int) -> torch.Tensor:
    """Merge each `factor x factor` block of neighbouring patches into one token with `factor**2` times the width."""
    batch, num_patches, width = features.shape
    height, grid_width = grid_size
    assert height * grid_width == num_patches, "features do not match the patch grid"
    assert height % factor == 0 and grid_width % factor == 0, "grid must divide by the shuffle factor"
    h_out, w_out = height // factor, grid_width // factor
    x = features.reshape(batch, h_out, factor, w_out, factor, width)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous()  # (B, h_out, w_out, f, f, C)
    return x.reshape(batch, h_out * w_out, width * factor * factor)


class Projector(nn.Module):
    """LLaVA-1.5 style two-layer MLP, after an optional pixel shuffle (Idefics3 / nanoVLM)."""

    def __init__(self, vision_width: int, text_width: int, grid_size: tuple[int, int], shuffle_factor: int = 1):
        super().__init__()
        self.grid_size = grid_size
        self.shuffle_factor = shuffle_factor
        in_width = vision_width * shuffle_factor**2
        self.mlp = nn.Sequential(nn.Linear(in_width, text_width), nn.GELU(), nn.Linear(text_width, text_width))

    def num_tokens(self, num_patches: int) -> int:
        return num_patches // self.shuffle_factor**2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.shuffle_factor > 1:
            features = pixel_shuffle(features, self.grid_size, self.shuffle_factor)
        return self.mlp(features)
