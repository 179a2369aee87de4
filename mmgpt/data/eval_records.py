"""Eval records, read with the same checks as training data: chats whose last message is the reference answer, or
interleaved documents whose continuation is (`{"content": [...], "answer": "dako"}`: the answer is the text that
follows the content, up to the next image or the end of the document)."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from mmgpt.data.records import RecordError, iter_lines, parse_record


def normalise(answer: str) -> str:
    """Lower-case, then strip punctuation and spaces at both ends."""
    return answer.lower().strip(string.punctuation + string.whitespace)


@dataclass
class EvalItem:
    prompt: list[dict]  # chat: the messages before the answer; document: the content items before it
    answer: str
    kind: str
    where: str
    episode: str | None = None  # fast-binding episode: few-shot examples come from the same one
    is_document: bool = False
    rule: dict | None = None  # a system-rule record's rule, for `mmgpt.data.rules.score`

    @property
    def solved(self) -> list[dict]:
        """The prompt with its reference answer: a few-shot example."""
        if self.is_document:
            return self.prompt + [{"type": "text", "text": self.answer}]
        return self.prompt + [{"role": "assistant", "content": self.answer}]

    @property
    def images(self) -> list:
        parts = self.prompt if self.is_document else [
            part for message in self.prompt if isinstance(message["content"], list) for part in message["content"]]
        return [part["image"] for part in parts if part.get("type") == "image"]


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(item.get("text", "") for item in content)


def read_eval_items(path: str | Path) -> list[EvalItem]:
    """Chats whose last message is the assistant's reference answer, and documents with an "answer"; image paths
    made absolute."""
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
        if not sample.is_chat:
            if not isinstance(record.get("answer"), str) or not record["answer"].strip():
                raise RecordError(f"{where}: a document eval record needs an 'answer' string (the text that follows its content)")
            content = [_absolute_item(item, path.parent) for item in record["content"]]
            items.append(EvalItem(content, record["answer"], record.get("kind", "all"), where, record.get("episode"),
                                  is_document=True))
            continue
        if sample.turns[-1].role != "assistant" or len(sample.turns) < 2:
            raise RecordError(f"{where}: an eval record must be a chat ending with the assistant's answer")
        messages = record["messages"]
        prompt = [_absolute(message, path.parent) for message in messages[:-1]]
        items.append(EvalItem(prompt, _text(messages[-1]["content"]), record.get("kind", "all"), where,
                              record.get("episode"), rule=_rule(record.get("rule"), where)))
    return items


def _rule(rule, where: str) -> dict | None:
    """A rule record's "rule" (see `mmgpt.data.rules`), checked for what scoring reads."""
    if rule is None:
        return None
    if not isinstance(rule, dict) or not isinstance(rule.get("name"), str) or not isinstance(rule.get("turn"), str):
        raise RecordError(f"{where}: 'rule' must be an object with 'name' and 'turn' strings")
    if rule["name"] == "secret" and not (isinstance(rule.get("secret"), str) and rule["secret"]):
        raise RecordError(f"{where}: a secret rule needs its 'secret' word")
    return rule


def _absolute_item(item: dict, base: Path) -> dict:
    return dict(item, image=str(base / item["image"])) if item.get("type") == "image" else item


def _absolute(message: dict, base: Path) -> dict:
    content = message.get("content")
    if isinstance(content, list):
        content = [_absolute_item(item, base) for item in content]
    return dict(message, content=content)
