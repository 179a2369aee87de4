"""Encoded samples -> one batch: padded (right for training, left for generation) or packed (training)."""

from __future__ import annotations

import torch

from mmgpt.processing import IGNORE_INDEX, Encoded


def collate(samples: list[Encoded], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad ids with `pad_id` and labels with -100; concatenate images in reading order across the batch."""
    length = max(len(sample.input_ids) for sample in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, span] = torch.tensor(sample.input_ids)
        labels[row, span] = torch.tensor(sample.labels)
        attention_mask[row, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    pixels = [sample.pixel_values for sample in samples if sample.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def pack(samples: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Several samples end to end in each row, no longer than the longest sample: fewer rows than `collate`, and
    padding only where no sample fits. Each sample's positions start at 0 and there is no attention mask, so the
    decoder (transformers' packed-sequence masks) lets no sample see another; each sample's first label is dropped,
    since nothing of its own comes before it. The loss equals the padded batch's (tested)."""
    capacity = max(len(sample.input_ids) for sample in samples)
    rows: list[list[Encoded]] = []
    room: list[int] = []
    for sample in sorted(samples, key=lambda sample: -len(sample.input_ids)):  # first fit, longest first
        row = next((index for index, free in enumerate(room) if free >= len(sample.input_ids)), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(sample)
        room[row] -= len(sample.input_ids)
    input_ids = torch.full((len(rows), capacity), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), capacity), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), capacity), dtype=torch.long)
    for index, row in enumerate(rows):
        start = 0
        for sample in row:
            span = slice(start, start + len(sample.input_ids))
            input_ids[index, span] = torch.tensor(sample.input_ids)
            labels[index, span.start + 1 : span.stop] = torch.tensor(sample.labels[1:], dtype=torch.long)
            position_ids[index, span] = torch.arange(len(sample.input_ids))
            start = span.stop
        position_ids[index, start:] = torch.arange(capacity - start)  # the padding: a sequence of its own
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    pixels = [sample.pixel_values for row in rows for sample in row if sample.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch
