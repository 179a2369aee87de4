"""Samples -> encoded training examples: a map-style set tokenised up front (length errors before step 1, lengths
for grouping), and the per-sample encoder a stream uses in its workers."""

from __future__ import annotations

import sys

import torch
from torch.utils.data import Dataset

from mmgpt.data.augment import Augment, mirror_sample
from mmgpt.data.records import RecordError, Sample
from mmgpt.processing import Encoded, MMGPTProcessor


def check_tokens(sample: Sample, ids: list[int], labels: list[int], max_length: int) -> None:
    """A sample training can use: it fits, and something in it is learnt."""
    if len(ids) > max_length:
        raise RecordError(f"{sample.source}: {len(ids)} tokens (images included) exceed the limit of {max_length}; "
                          "shorten it or raise data.max_length")
    if all(label < 0 for label in labels):
        raise RecordError(f"{sample.source}: no token to learn from (a chat needs an assistant turn)")


class EncodedDataset(Dataset):
    """Tokenised samples whose images are loaded when a batch asks for them. With `augment`, items are asked for
    as (index, step) and come moved or mirrored as drawn for that step; a sample whose text names a side is
    tokenised up front mirrored too (its side words swapped), for each way it can be mirrored."""

    def __init__(self, samples: list[Sample], processor: MMGPTProcessor, max_length: int, skip_bad: bool = False,
                 augment: Augment | None = None, cache_bytes: int = 0):
        self.processor, self.augment = processor, augment if augment and augment.active else None
        self.cached_pixels: dict[int, torch.Tensor] = {}
        self.cache_bytes_left = cache_bytes
        mirrorings = [axes for axes in ("h", "v", "hv") if self.augment and set(axes) <= set(self.augment.flip)]
        self.samples, self.tokens, self.mirrored, self.skipped = [], [], [], []
        for sample in samples:
            ids, labels, images = processor.tokenize(sample)
            try:
                check_tokens(sample, ids, labels, max_length)
                mirrored = {axes: mirror_sample(sample, axes) for axes in mirrorings}
                variants = {axes: processor.tokenize(flipped)[:2] for axes, flipped in mirrored.items()
                            if flipped != sample}
                for variant_ids, variant_labels in variants.values():
                    check_tokens(sample, variant_ids, variant_labels, max_length)
            except RecordError as error:
                if not skip_bad:
                    raise
                self.skipped.append(str(error))
                continue
            self.samples.append(sample)
            self.tokens.append((ids, labels, images))
            self.mirrored.append(variants)
        self.lengths = tuple(len(ids) for ids, _, _ in self.tokens)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> Encoded:
        index, step = key if isinstance(key, tuple) else (key, None)
        ids, labels, images = self.tokens[index]
        pixels = self._pixels(index, images)
        if self.augment is None or step is None:
            return Encoded(ids, labels, pixels)
        axes, dx, dy = self.augment.draw(step, index)
        ids, labels = self.mirrored[index].get(axes, (ids, labels))  # only samples whose text names a side change
        return Encoded(ids, labels, None if pixels is None else Augment.pixels(pixels, axes, dx, dy))

    def _pixels(self, index: int, images: list) -> torch.Tensor | None:
        """The sample's pictures, decoded; kept while the cache has room, so that later epochs skip decoding."""
        if index in self.cached_pixels:
            return self.cached_pixels[index]
        pixels = self.processor.pixel_values(images, self.samples[index].source)
        if pixels is not None and pixels.nbytes <= self.cache_bytes_left:
            self.cached_pixels[index] = pixels
            self.cache_bytes_left -= pixels.nbytes
        return pixels


class SampleEncoder:
    """One sample -> `Encoded` (pixels only when asked), or None for a bad one when skipping: a stream has no
    up-front pass, so each skip is reported on stderr as it happens, never silently."""

    def __init__(self, processor: MMGPTProcessor, max_length: int, skip_bad: bool = False):
        self.processor, self.max_length, self.skip_bad = processor, max_length, skip_bad

    def __call__(self, sample: Sample, with_pixels: bool = True) -> Encoded | None:
        ids, labels, images = self.processor.tokenize(sample)
        try:
            check_tokens(sample, ids, labels, self.max_length)
        except RecordError as error:
            if not self.skip_bad:
                raise
            if with_pixels:
                print(f"skipped a bad record (data.skip_bad_records=true): {error}", file=sys.stderr)
            return None
        return Encoded(ids, labels, self.processor.pixel_values(images, sample.source) if with_pixels else None)
