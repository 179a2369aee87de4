"""Samples -> encoded training examples; text is tokenised up front so length errors surface before training."""

from __future__ import annotations

from torch.utils.data import Dataset

from mmgpt.data.records import RecordError, Sample
from mmgpt.processing import Encoded, MMGPTProcessor


class EncodedDataset(Dataset):
    """Tokenised samples whose images are loaded when a batch asks for them."""

    def __init__(self, samples: list[Sample], processor: MMGPTProcessor, max_length: int, skip_bad: bool = False):
        self.processor = processor
        self.samples, self.tokens, self.skipped = [], [], []
        for sample in samples:
            ids, labels, images = processor.tokenize(sample)
            if len(ids) > max_length:
                error = f"{sample.source}: {len(ids)} tokens (images included) exceed the limit of {max_length}"
                if not skip_bad:
                    raise RecordError(error + "; shorten it or raise data.max_length")
                self.skipped.append(error)
                continue
            if all(label < 0 for label in labels):
                error = f"{sample.source}: no token to learn from (a chat needs an assistant turn)"
                if not skip_bad:
                    raise RecordError(error)
                self.skipped.append(error)
                continue
            self.samples.append(sample)
            self.tokens.append((ids, labels, images))
        self.lengths = tuple(len(ids) for ids, _, _ in self.tokens)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded:
        ids, labels, images = self.tokens[index]
        return Encoded(ids, labels, self.processor.pixel_values(images, self.samples[index].source))
