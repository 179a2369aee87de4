"""Held-out accuracy: greedy answers to the last assistant turn of each chat, with and without the images."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from mmgpt.data.records import RecordError, iter_lines, parse_record
from mmgpt.inference import MMGPT


def normalise(answer: str) -> str:
    """Lower-case, then strip punctuation and spaces at both ends."""
    return answer.lower().strip(string.punctuation + string.whitespace)


@dataclass
class EvalItem:
    messages: list[dict]  # the conversation up to (not including) the answer
    answer: str
    kind: str
    where: str


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(item.get("text", "") for item in content)


def read_eval_items(path: str | Path) -> list[EvalItem]:
    """Chats whose last message is the assistant's reference answer; image paths made absolute."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"eval file not found: {path}")
    items = []
    for line_number, line in enumerate(iter_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise RecordError(f"{where}: malformed JSON ({error.msg})") from None
        sample = parse_record(record, path.parent, where)  # the training checks: roles, content, image paths
        if not sample.is_chat or sample.turns[-1].role != "assistant" or len(sample.turns) < 2:
            raise RecordError(f"{where}: an eval record must be a chat ending with the assistant's answer")
        messages = record["messages"]
        prompt = [_absolute(message, path.parent) for message in messages[:-1]]
        items.append(EvalItem(prompt, _text(messages[-1]["content"]), record.get("kind", "all"), where))
    return items


def _absolute(message: dict, base: Path) -> dict:
    content = message.get("content")
    if isinstance(content, list):
        content = [dict(item, image=str(base / item["image"])) if item.get("type") == "image" else item for item in content]
    return dict(message, content=content)


def _blind(messages: list[dict], blank: Image.Image) -> list[dict]:
    blinded = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [dict(item, image=blank) if item.get("type") == "image" else item for item in content]
        blinded.append(dict(message, content=content))
    return blinded


def predict(model: MMGPT, items: list[EvalItem], batch_size: int, max_new_tokens: int, desc: str) -> list[str]:
    predictions = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        chunk = items[start : start + batch_size]
        predictions += model.generate([item.messages for item in chunk], max_new_tokens=max_new_tokens)
    return predictions


def evaluate(
    model: MMGPT, path: str | Path, batch_size: int = 32, max_new_tokens: int = 16, out: str | Path | None = None
) -> dict:
    """{"n", "accuracy", "blind_accuracy", "by_kind"}; `out` gets one JSON line per sample."""
    items = read_eval_items(path)
    if not items:
        raise RecordError(f"{path}: no eval records")
    height, width = model.processor.transform.size
    blank = Image.new("RGB", (width, height), (255, 255, 255))
    seen = predict(model, items, batch_size, max_new_tokens, "eval")
    blind = predict(model, [EvalItem(_blind(i.messages, blank), i.answer, i.kind, i.where) for i in items],
                    batch_size, max_new_tokens, "eval (blind)")
    correct = [normalise(p) == normalise(i.answer) for p, i in zip(seen, items)]
    blind_correct = [normalise(p) == normalise(i.answer) for p, i in zip(blind, items)]
    by_kind: dict[str, list[bool]] = {}
    for item, ok in zip(items, correct):
        by_kind.setdefault(item.kind, []).append(ok)
    if out is not None:
        with open(out, "w") as handle:
            for item, prediction, blind_prediction, ok in zip(items, seen, blind, correct):
                handle.write(json.dumps({"where": item.where, "kind": item.kind, "answer": item.answer,
                                         "prediction": prediction, "blind_prediction": blind_prediction,
                                         "correct": ok}) + "\n")
    return {
        "n": len(items),
        "accuracy": sum(correct) / len(items),
        "blind_accuracy": sum(blind_correct) / len(items),
        "by_kind": {kind: round(sum(oks) / len(oks), 4) for kind, oks in sorted(by_kind.items())},
    }
