"""Samples -> encoded training examples: a map-style set tokenised up front (length errors before step 1, lengths
for grouping), and the per-sample encoder a stream uses in its workers."""

from __future__ import annotations

import sys

from torch.utils.data import Dataset

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
    """Tokenised samples whose images are loaded when a batch asks for them."""

    def __init__(self, samples: list[Sample], processor: MMGPTProcessor, max_length: int, skip_bad: bool = False):
        self.processor = processor
        self.samples, self.tokens, self.skipped = [], [], []
        for sample in samples:
            ids, labels, images = processor.tokenize(sample)
            try:
                check_tokens(sample, ids, labels, max_length)
            except RecordError as error:
                if not skip_bad:
                    raise
                self.skipped.append(str(error))
                continue
            self.samples.append(sample)
            self.tokens.append((ids, labels, images))
        self.lengths = tuple(len(ids) for ids, _, _ in self.tokens)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded:
        ids, labels, images = self.tokens[index]
        return Encoded(ids, labels, self.processor.pixel_values(images, self.samples[index].source))


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
