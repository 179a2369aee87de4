"""Sample -> token ids, labels and pixel values. Labels are decided here and nowhere else.

Layout (control tokens are ids, never parsed out of text):
  document: text and images in order, then <|endoftext|>; loss on every text token, on each <|image_start|>
            that follows text (where that text ends: how a model learns to stop a line, as OpenFlamingo's
            <|endofchunk|>; `complete` stops there) and on the end token.
  chat:     per message <|role|> content <|end|>; loss on assistant content and its <|end|> only. An assistant's
            tool calls follow its text, each <|tool_call|> and the call's JSON (learnt); a tool's result is a
            message of role tool (`mmgpt.tools`), never learnt.
  image:    <|image_start|> <|image|> x num_image_tokens <|image_end|>; no loss on the image's own tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mmgpt.data.records import Sample, Turn
from mmgpt.images import ImageError, ImageTransform, load_image
from mmgpt.tokenizer import SpecialTokens

IGNORE_INDEX = -100
PROCESSOR_FILE = "mmgpt_processor.json"


@dataclass
class Encoded:
    """One tokenised sample: ids and labels of equal length, and one pixel tensor per image, in order."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None  # (num_images, 3, H, W)

    @property
    def num_images(self) -> int:
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]


class MMGPTProcessor:
    """Tokenizer + image transform + chat layout; saved beside the model so inference sees what training saw."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, transform: ImageTransform, num_image_tokens: int,
                 system_prompt: str = ""):
        self.tokenizer = tokenizer
        self.transform = transform
        self.num_image_tokens = num_image_tokens
        self.system_prompt = system_prompt  # the one the model was trained under (`model.system_prompt`); "" = none
        self.special = SpecialTokens.from_tokenizer(tokenizer)

    def encode_text(self, text: str) -> list[int]:
        """User or data text -> ids; control-token look-alikes stay plain characters."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def image_slot(self) -> list[int]:
        return [self.special.image_start, *[self.special.image] * self.num_image_tokens, self.special.image_end]

    def _encode_turn(self, turn: Turn, supervised: bool, images: list,
                     document: bool = False) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for segment in turn.segments:
            if segment.is_image:
                slot = self.image_slot()
                ends_text = document and bool(ids) and ids[-1] != self.special.image_end
                ids += slot
                labels += [slot[0] if ends_text else IGNORE_INDEX] + [IGNORE_INDEX] * (len(slot) - 1)
                images.append(segment.image)
            else:
                text_ids = self.encode_text(segment.text)
                if segment.tool_call:
                    text_ids = [self.special.tools_supported()[1], *text_ids]
                ids += text_ids
                labels += text_ids if supervised else [IGNORE_INDEX] * len(text_ids)
        return ids, labels

    def encode_message(self, turn: Turn, images: list) -> tuple[list[int], list[int]]:
        """One chat message, <|role|> content <|end|>, labelled where the assistant wrote it; its images are
        appended to `images`. A chat's ids are its messages' ids end to end."""
        supervised = turn.role == "assistant"
        turn_ids, turn_labels = self._encode_turn(turn, supervised, images)
        end_label = self.special.end if supervised else IGNORE_INDEX
        return [self.special.role(turn.role), *turn_ids, self.special.end], [IGNORE_INDEX, *turn_labels, end_label]

    def tokenize(self, sample: Sample, add_generation_prompt: bool = False) -> tuple[list[int], list[int], list]:
        """Token ids, labels and image references of one sample (images not loaded yet).

        `add_generation_prompt` ends a chat with <|assistant|>, ready for the model to answer, and leaves a
        document open (no <|endoftext|>), ready for the model to continue.
        """
        ids: list[int] = []
        labels: list[int] = []
        images: list = []
        if not sample.is_chat:
            turn_ids, turn_labels = self._encode_turn(sample.turns[0], True, images, document=True)
            if add_generation_prompt:
                return turn_ids, turn_labels, images
            return turn_ids + [self.special.eos], turn_labels + [self.special.eos], images
        for turn in sample.turns:
            turn_ids, turn_labels = self.encode_message(turn, images)
            ids += turn_ids
            labels += turn_labels
        if add_generation_prompt:
            ids.append(self.special.assistant)
            labels.append(IGNORE_INDEX)
        return ids, labels, images

    def encode(self, sample: Sample, add_generation_prompt: bool = False) -> Encoded:
        """`tokenize` plus the images loaded and transformed."""
        ids, labels, images = self.tokenize(sample, add_generation_prompt)
        return Encoded(ids, labels, self.pixel_values(images, sample.source))

    def pixel_values(self, images: list, source: str = "<memory>") -> torch.Tensor | None:
        if not images:
            return None
        tensors = []
        for image in images:
            try:
                tensors.append(self.transform(load_image(image)))
            except ImageError as error:
                raise ImageError(f"{source}: {error}") from None
        return torch.stack(tensors)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder)
        settings = {
            "image_size": list(self.transform.size),
            "image_mean": list(self.transform.mean),
            "image_std": list(self.transform.std),
            "interpolation": self.transform.interpolation,
            "num_image_tokens": self.num_image_tokens,
            "system_prompt": self.system_prompt,
        }
        (folder / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        from mmgpt.transformers_processor import transformers_processor

        transformers_processor(self.tokenizer, self.transform.size, self.transform.mean, self.transform.std,
                               self.transform.interpolation, self.num_image_tokens).save_pretrained(folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "MMGPTProcessor":
        path = Path(folder) / PROCESSOR_FILE
        try:
            settings: dict[str, Any] = json.loads(path.read_text())
            transform = ImageTransform(
                size=(int(settings["image_size"][0]), int(settings["image_size"][1])),
                mean=tuple(float(value) for value in settings["image_mean"]),
                std=tuple(float(value) for value in settings["image_std"]),
                interpolation=InterpolationMode(settings["interpolation"]).value,
            )
            num_image_tokens = settings["num_image_tokens"]
            system_prompt = settings.get("system_prompt", "")
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found: is {folder} a folder saved by mmgpt?") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        except KeyError as error:
            raise ValueError(f"{path}: missing field {error}") from None
        except (TypeError, ValueError, IndexError) as error:
            raise ValueError(f"{path}: a field has the wrong form ({error})") from None
        if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens < 1:
            raise ValueError(f"{path}: num_image_tokens must be a whole number of at least 1, got {num_image_tokens!r}")
        if not isinstance(system_prompt, str):
            raise ValueError(f"{path}: system_prompt must be a string, got {system_prompt!r}")
        return cls(AutoTokenizer.from_pretrained(folder), transform, num_image_tokens, system_prompt)
