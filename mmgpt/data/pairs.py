"""Preference pairs for DPO: records -> pairs of encoded replies to one prompt -> batches.

Record (JSONL, images relative to the file as in any chat):
  {"messages": [... the prompt, ending with a user turn ...], "chosen": "the better reply", "rejected": "the worse"}
`chosen` and `rejected` may also be TRL's form, a list holding one assistant message. Both replies are encoded after
the same prompt; labels mark the reply and its <|end|> only, so earlier assistant turns of the prompt are context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mmgpt.data.collate import collate
from mmgpt.data.dataset import check_tokens
from mmgpt.data.records import RecordError, Sample, iter_lines, parse_record
from mmgpt.processing import IGNORE_INDEX, Encoded, MMGPTProcessor


@dataclass
class Pair:
    prompt: Sample
    chosen: str
    rejected: str


def _reply(value: Any, key: str, where: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{where}: '{key}' must be a non-empty string (or one assistant message)")
    return value


def parse_pair(record: Any, base_dir: Path | None, where: str) -> Pair:
    if not isinstance(record, dict) or "messages" not in record:
        raise RecordError(f"{where}: a preference record needs 'messages' (the prompt), 'chosen' and 'rejected'")
    prompt = parse_record({"messages": record["messages"]}, base_dir, where)
    if prompt.turns[-1].role != "user":
        raise RecordError(f"{where}: the prompt must end with a user message (the replies answer it)")
    chosen, rejected = _reply(record.get("chosen"), "chosen", where), _reply(record.get("rejected"), "rejected", where)
    if chosen.strip() == rejected.strip():
        raise RecordError(f"{where}: 'chosen' and 'rejected' are the same reply")
    return Pair(prompt, chosen, rejected)


def read_pairs(path: str | Path, skip_bad: bool = False) -> tuple[list[Pair], list[str]]:
    """The pairs of a JSONL file, and the errors of skipped records (only when `skip_bad`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference data not found: {path}")
    pairs, skipped = [], []
    for line_number, line in enumerate(iter_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {line_number}"
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RecordError(f"{where}: malformed JSON ({error.msg})") from None
            pairs.append(parse_pair(record, path.parent, where))
        except RecordError as error:
            if not skip_bad:
                raise
            skipped.append(str(error))
    return pairs, skipped


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded


class PairDataset(Dataset):
    """Tokenised pairs (length errors before step 1), images loaded when a batch asks for them."""

    def __init__(self, pairs: list[Pair], processor: MMGPTProcessor, max_length: int, skip_bad: bool = False):
        self.processor = processor
        self.pairs, self.tokens, self.skipped = [], [], []
        end = processor.special.end
        for pair in pairs:
            ids, _, images = processor.tokenize(pair.prompt, add_generation_prompt=True)
            rows = []
            for reply in (pair.chosen, pair.rejected):
                reply_ids = processor.encode_text(reply) + [end]
                rows.append((ids + reply_ids, [IGNORE_INDEX] * len(ids) + reply_ids))
            try:
                for row_ids, row_labels in rows:
                    check_tokens(pair.prompt, row_ids, row_labels, max_length)
            except RecordError as error:
                if not skip_bad:
                    raise
                self.skipped.append(str(error))
                continue
            self.pairs.append(pair)
            self.tokens.append((rows, images))
        self.lengths = tuple(max(len(ids) for ids, _ in rows) for rows, _ in self.tokens)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> EncodedPair:
        rows, images = self.tokens[index]
        pixels = self.processor.pixel_values(images, self.pairs[index].prompt.source)
        return EncodedPair(*(Encoded(ids, labels, pixels) for ids, labels in rows))


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch: the chosen replies in rows 0..n-1, the rejected ones in rows n..2n-1."""
    return collate([pair.chosen for pair in pairs] + [pair.rejected for pair in pairs], pad_id)


def write_pairs(records: list[dict], out: Path) -> None:
    """Pair records as JSONL, image paths made relative to `out`'s folder (they must lie inside it)."""
    folder = out.resolve().parent

    def relative(message: dict) -> dict:
        content = message["content"]
        if not isinstance(content, list):
            return message
        items = []
        for item in content:
            if item.get("type") == "image":
                path = Path(item["image"]).resolve()
                if not path.is_relative_to(folder):
                    raise ValueError(f"image {path} is outside {folder}: write the pairs into the folder that holds "
                                     "the prompts' images")
                item = dict(item, image=str(path.relative_to(folder)))
            items.append(item)
        return dict(message, content=items)

    lines = [json.dumps(dict(record, messages=[relative(m) for m in record["messages"]])) + "\n" for record in records]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines))
