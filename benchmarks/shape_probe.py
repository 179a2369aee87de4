"""Can a vision tower tell a world's shapes apart? Two probes on one-object pictures, minutes instead of a VLM run.

    python benchmarks/shape_probe.py --style clutter [--probe frozen|trained] [--pictures 3000 --steps 600]

`frozen`: an MLP over each image token of the tiny recipe's ViT left at its random init (after pixel shuffle, as the
projector sees it), the tokens' logits pooled, so the probe asks what random features carry. `trained`: the same ViT
trained alone as a shape classifier (the shortest path from the label to the ViT), so the probe asks how fast this
ViT can learn to see the shapes at all. Prints held-out accuracy (chance: one over the number of shapes).
"""

from __future__ import annotations

import argparse
import random
import time

import timm
import torch
import torchvision.transforms.functional as F

from mmgpt.data.clutter import STYLES, draw_things, random_things
from mmgpt.projector import pixel_shuffle

VIT = dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, mlp_ratio=2.0)  # the tiny recipe's


def pictures(style: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    world, rng = STYLES[style], random.Random(0)
    images, labels = [], []
    for _ in range(count):
        thing = random_things(world, rng, 1, 0.5, (1.0,) * len(world.palette))
        images.append(F.to_tensor(draw_things(world, thing, rng)))
        labels.append(world.shapes.index(thing[0].shape))
    return (torch.stack(images) - 0.5) / 0.5, torch.tensor(labels)


def frozen_probe(x: torch.Tensor, y: torch.Tensor, held_out: int, steps: int, depth: int, shuffle: int) -> float:
    settings = {**VIT, "depth": max(depth, 1)}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **settings).eval()
    with torch.no_grad():
        tokens = vit._pos_embed(vit.patch_embed(x))
        for block in vit.blocks[:depth]:
            tokens = block(tokens)
        grid = VIT["img_size"] // VIT["patch_size"]
        features = pixel_shuffle(vit.norm(tokens)[:, vit.num_prefix_tokens:], (grid, grid), shuffle)
    width, classes = features.shape[-1], int(y.max()) + 1
    probe = torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 256), torch.nn.GELU(),
                                torch.nn.Linear(256, classes))
    optimizer = torch.optim.Adam(probe.parameters(), 1e-3)
    train = len(x) - held_out
    for _ in range(steps):
        batch = torch.randint(0, train, (64,))
        loss = torch.nn.functional.cross_entropy(probe(features[batch]).logsumexp(1), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(features[train:]).logsumexp(1).argmax(-1) == y[train:]).float().mean().item()


def trained_probe(x: torch.Tensor, y: torch.Tensor, held_out: int, steps: int) -> None:
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=int(y.max()) + 1, **VIT)
    optimizer = torch.optim.AdamW(vit.parameters(), 5e-4)
    train, start = len(x) - held_out, time.perf_counter()
    for step in range(1, steps + 1):
        batch = torch.randint(0, train, (64,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(vit(x[batch]).float(), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 4) == 0:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                accuracy = (vit(x[train:]).argmax(-1) == y[train:]).float().mean().item()
            seconds = time.perf_counter() - start
            print(f"trained ViT, step {step}: held-out shape accuracy {accuracy:.3f} ({seconds:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--style", choices=tuple(STYLES), default="clutter")
    parser.add_argument("--probe", choices=("frozen", "trained"), default="frozen")
    parser.add_argument("--pictures", type=int, default=3000, help="one-object pictures; the last 500 are held out")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = pictures(args.style, args.pictures)
    if args.probe == "trained":
        trained_probe(x, y, 500, args.steps)
        return
    for depth, shuffle in ((4, 4), (0, 4), (1, 4), (4, 2)):
        accuracy = frozen_probe(x, y, 500, args.steps, depth, shuffle)
        print(f"frozen random ViT, depth {depth}, shuffle {shuffle}: held-out shape accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
