"""Training-time augmentation that keeps every answer true: a small set seen many times is learnt by heart (the
eval loss rises while the training loss falls), and a picture that moves a few pixels or is mirrored is a new
picture with the same answers, once the words for sides are mirrored with it.

Each draw is a pure function of (seed, step, sample index), so a resumed run and a run on N processes see the same
augmented batches as one uninterrupted run.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

import torch
from torch.nn import functional

from mmgpt.data.records import Sample, Segment, Turn

# Words that name a side of the picture, swapped when it is mirrored on that axis.
SIDE_WORDS = {
    "h": (("left", "right"), ("leftmost", "rightmost")),
    "v": (("top", "bottom"), ("above", "below"), ("upper", "lower"), ("topmost", "bottommost")),
}


def _swapper(axes: str) -> tuple[re.Pattern, dict[str, str]]:
    pairs = [pair for axis in axes for pair in SIDE_WORDS[axis]]
    swap = {a: b for first, second in pairs for a, b in ((first, second), (second, first))}
    return re.compile(r"\b(" + "|".join(sorted(swap, key=len, reverse=True)) + r")\b", re.IGNORECASE), swap


def mirror_text(text: str, axes: str) -> str:
    """`text` as it reads of the picture mirrored on `axes` ("h": left-right, "v": top-bottom, "hv": both)."""
    if not axes:
        return text
    pattern, swap = _swapper(axes)

    def swapped(match: re.Match) -> str:
        word = match.group(0)
        other = swap[word.lower()]
        if word.isupper() and len(word) > 1:
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return pattern.sub(swapped, text)


def mirror_sample(sample: Sample, axes: str) -> Sample:
    """The sample's text mirrored; images are mirrored on their pixels (`Augment.pixels`)."""
    turns = [Turn(turn.role, [replace(segment, text=mirror_text(segment.text, axes))
                              if segment.text is not None and not segment.tool_call else segment
                              for segment in turn.segments]) for turn in sample.turns]
    return Sample(turns, sample.source)


@dataclass(frozen=True)
class Augment:
    """`shift`: pixels a picture may move each way (edges repeated into the gap); `flip`: the axes it may be
    mirrored on, each half the time ("h", "v" or "hv"; mirror only what the set's answers survive)."""

    shift: int = 0
    flip: str = ""
    seed: int = 0

    @property
    def active(self) -> bool:
        return bool(self.shift or self.flip)

    def describe(self) -> str:
        mirrored = {"h": "left-right", "v": "top-bottom", "hv": "left-right and top-bottom"}.get(self.flip)
        return ", ".join(([f"pictures moved up to {self.shift} px"] if self.shift else []) +
                         ([f"mirrored {mirrored} (side words swapped)"] if mirrored else []))

    def draw(self, step: int, index: int) -> tuple[str, int, int]:
        """The axes mirrored and the (dx, dy) shift of sample `index` at step `step`."""
        rng = random.Random(f"{self.seed}-{step}-{index}")
        axes = "".join(axis for axis in self.flip if rng.random() < 0.5)
        return axes, rng.randint(-self.shift, self.shift), rng.randint(-self.shift, self.shift)

    @staticmethod
    def pixels(pixel_values: torch.Tensor, axes: str, dx: int, dy: int) -> torch.Tensor:
        """(N, C, H, W) pictures mirrored on `axes`, then moved (dx, dy) pixels with their edges repeated."""
        if "h" in axes:
            pixel_values = pixel_values.flip(-1)
        if "v" in axes:
            pixel_values = pixel_values.flip(-2)
        if dx or dy:
            height, width = pixel_values.shape[-2:]
            pad = max(abs(dx), abs(dy))
            padded = functional.pad(pixel_values, (pad, pad, pad, pad), mode="replicate")
            top, left = pad - dy, pad - dx
            pixel_values = padded[..., top:top + height, left:left + width]
        return pixel_values
