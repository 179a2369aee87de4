"""Maps vision features into the decoder's embedding space, optionally with fewer tokens: pooled or shuffled."""

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


def average_pool(features: torch.Tensor, grid_size: tuple[int, int], pooled: int) -> torch.Tensor:
    """Average the patch grid down to `pooled x pooled` tokens of the same width: each token summarises a region
    wherever in it the content sits, so the same thing in another place looks the same (1 = one global token)."""
    batch, _, width = features.shape
    grid = features.transpose(1, 2).reshape(batch, width, *grid_size)
    return nn.functional.adaptive_avg_pool2d(grid, pooled).flatten(2).transpose(1, 2)


class Projector(nn.Module):
    """LLaVA-1.5 style two-layer MLP, after an optional average pool of the patch grid or pixel shuffle (Idefics3 /
    nanoVLM): the pool keeps the width and loses where things are, the shuffle keeps everything in wider tokens.

    With `norm`, a LayerNorm ends the MLP. Unnormed, the MLP's output grows in training (to 12 times the decoder's
    token embeddings and 60 times its position embeddings in the tiny recipe), and anything added to it drowns.

    With `grid_embedding`, each image token also gets a learnt row and a learnt column embedding (after the norm,
    started at half its scale), the same for every image wherever it stands in the text: "left" is then one
    feature of every left token, read in the same look that finds the token by what it shows.
    """

    def __init__(self, vision_width: int, text_width: int, grid_size: tuple[int, int], shuffle_factor: int = 1,
                 pool_size: int = 0, grid_embedding: bool = False, norm: bool = False):
        super().__init__()
        if pool_size and shuffle_factor > 1:
            raise ValueError("choose either an average pool or a pixel shuffle for the projector, not both")
        self.grid_size = grid_size
        self.shuffle_factor = shuffle_factor
        self.pool_size = pool_size
        in_width = vision_width * shuffle_factor**2
        self.mlp = nn.Sequential(nn.Linear(in_width, text_width), nn.GELU(), nn.Linear(text_width, text_width))
        self.norm = nn.LayerNorm(text_width) if norm else None
        rows, columns = (pool_size, pool_size) if pool_size else (side // shuffle_factor for side in grid_size)
        self.row_embedding = nn.Parameter(torch.randn(rows, 1, text_width) * 0.5) if grid_embedding else None
        self.column_embedding = nn.Parameter(torch.randn(1, columns, text_width) * 0.5) if grid_embedding else None

    def num_tokens(self, num_patches: int) -> int:
        return self.pool_size**2 if self.pool_size else num_patches // self.shuffle_factor**2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool_size:
            features = average_pool(features, self.grid_size, self.pool_size)
        elif self.shuffle_factor > 1:
            features = pixel_shuffle(features, self.grid_size, self.shuffle_factor)
        tokens = self.mlp(features)
        if self.norm is not None:
            tokens = self.norm(tokens)
        if self.row_embedding is not None:
            tokens = tokens + (self.row_embedding + self.column_embedding).flatten(0, 1)
        return tokens
