"""How much can the tiny recipe's ViT learn from a set's own questions and answers, by the shortest path?

    python benchmarks/answer_probe.py data/clutter [--steps 1500 --lr 5e-4 --conv-stem --save vit.pth]

The ViT (the tiny recipe's, optionally with the convolutional stem) and a small question-attention head are trained
together as an answer classifier on every (picture, question, answer) of the one-picture chats in DIR/train.jsonl:
no decoder between the answers and the ViT. Prints held-out accuracy on DIR/eval.jsonl, per kind, as it goes.
`--save` writes the ViT's weights in timm's layout, for `model.vision.pretrained` (with `model.vision.conv_stem`
as trained), so the recipe can start from a ViT that has learnt to see the set.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
from torch import nn

from mmgpt.build import transform_for
from mmgpt.images import load_image
from mmgpt.vision import VisionEncoder

VIT = dict(img_size=64, patch_size=8, embed_dim=192, depth=4, num_heads=3, mlp_ratio=2.0)  # the tiny recipe's
MAX_WORDS = 16


def answer_pairs(path: Path) -> list[tuple[str, str, str, str]]:
    """(picture, question, answer, kind) for every user-assistant exchange of each one-picture chat."""
    pairs = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        messages = record.get("messages", [])
        pictures = [item["image"] for message in messages if isinstance(message["content"], list)
                    for item in message["content"] if item.get("type") == "image"]
        if len(pictures) != 1:
            continue
        for asked, answered in zip(messages[::2], messages[1::2]):
            text = asked["content"] if isinstance(asked["content"], str) else " ".join(
                item.get("text", "") for item in asked["content"])
            if asked["role"] == "user" and answered["role"] == "assistant" and isinstance(answered["content"], str):
                pairs.append((str(path.parent / pictures[0]), text, answered["content"], record.get("kind", "")))
    return pairs


class AnswerHead(nn.Module):
    """Question words (mean embedding) pick image tokens by attention, softmax (one object) and sigmoid-gated sum
    (how many) per head; an MLP maps what was picked, with the question, to an answer."""

    def __init__(self, width: int, words: int, answers: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(words, width, padding_idx=0)
        self.question_norm, self.image_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.key, self.query = nn.Linear(width, width), nn.Linear(width, width)
        self.pool = nn.Linear(2 * heads * width, 2 * width)
        self.mlp = nn.Sequential(nn.Linear(3 * width, 512), nn.GELU(), nn.Linear(512, answers))

    def forward(self, tokens: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        present = (words > 0).float().unsqueeze(-1)
        question = self.question_norm((self.embed(words) * present).sum(1) / present.sum(1).clamp(min=1))
        tokens = self.image_norm(tokens)
        batch, count, width = tokens.shape
        keys = self.key(tokens).view(batch, count, self.heads, -1)
        scores = (keys * self.query(question).view(batch, 1, self.heads, -1)).sum(-1) / math.sqrt(keys.shape[-1])
        picked = torch.einsum("bnh,bnd->bhd", scores.softmax(1), tokens)
        counted = torch.einsum("bnh,bnd->bhd", torch.sigmoid(scores), tokens) / count
        pooled = self.pool(torch.cat([picked, counted], 1).reshape(batch, -1))
        return self.mlp(torch.cat([pooled, question], -1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="folder with train.jsonl and eval.jsonl (our chat JSONL)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--conv-stem", action="store_true", help="stride-2 convolutions instead of the linear patchify")
    parser.add_argument("--save", default="", help="write the trained ViT's weights here (timm's layout)")
    args = parser.parse_args()
    torch.manual_seed(0)
    vision = VisionEncoder("vit_tiny_patch16_224", VIT, fused_attention=False, conv_stem=args.conv_stem)
    transform = transform_for(vision)
    train, held_out = answer_pairs(args.data / "train.jsonl"), answer_pairs(args.data / "eval.jsonl")
    vocabulary = {word: index + 1 for index, word in
                  enumerate(sorted({word for _, text, _, _ in train for word in re.findall(r"\w+", text.lower())}))}
    answers = {answer: index for index, answer in enumerate(sorted({answer for _, _, answer, _ in train}))}

    def tensors(pairs: list) -> tuple[torch.Tensor, ...]:
        pictures = sorted({picture for picture, *_ in pairs})
        index = {picture: row for row, picture in enumerate(pictures)}
        words = torch.zeros(len(pairs), MAX_WORDS, dtype=torch.long)
        for row, (_, text, _, _) in enumerate(pairs):
            ids = [vocabulary.get(word, 0) for word in re.findall(r"\w+", text.lower())][:MAX_WORDS]
            words[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return (torch.stack([transform(load_image(picture)) for picture in pictures]),
                torch.tensor([index[picture] for picture, *_ in pairs]), words,
                torch.tensor([answers.get(answer, -100) for _, _, answer, _ in pairs]))

    pixels, picture_of, words, labels = tensors(train)
    eval_pixels, eval_picture_of, eval_words, eval_labels = tensors(held_out)
    kinds = [kind for *_, kind in held_out]
    print(f"{len(train)} training and {len(held_out)} held-out questions, {len(answers)} answers")
    head = AnswerHead(vision.width, len(vocabulary) + 1, len(answers))
    parameters = [*vision.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(labels), (args.batch_size,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(vision(pixels[picture_of[batch]]), words[batch])
        loss = nn.functional.cross_entropy(logits.float(), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps:
            vision.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                predicted = torch.cat([head(vision(eval_pixels[eval_picture_of[rows]]), eval_words[rows]).argmax(-1)
                                       for rows in torch.arange(len(eval_labels)).split(200)])
            vision.train()
            right = (predicted == eval_labels).float()
            per_kind = {kind: round(right[[k == kind for k in kinds]].mean().item(), 2) for kind in sorted(set(kinds))}
            print(f"step {step}: held-out accuracy {right.mean().item():.3f} {per_kind} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    if args.save:
        torch.save(vision.vit.state_dict(), args.save)
        print(f"wrote {args.save}: --set model.vision.pretrained={args.save} model.vision.conv_stem={args.conv_stem}")


if __name__ == "__main__":
    main()
