"""Held-out accuracy: greedy answers to the last assistant turn of each chat, with and without the images, after
K solved examples (few-shot) or none."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, TextIO

from PIL import Image
from tqdm.auto import tqdm

from mmgpt.data.eval_records import EvalItem, normalise, read_eval_items
from mmgpt.data.records import RecordError
from mmgpt.data.rules import RESTRICTING, score
from mmgpt.fewshot import few_shot_items
from mmgpt.inference import MMGPT, ContextTooLongError
from mmgpt.tools import ERROR_PREFIX


def _blank_images(content: list[dict], blank: Image.Image) -> list[dict]:
    return [dict(item, image=blank) if item.get("type") == "image" else item for item in content]


def _blind(item: EvalItem, blank: Image.Image) -> EvalItem:
    if item.is_document:
        return replace(item, prompt=_blank_images(item.prompt, blank))
    blinded = []
    for message in item.prompt:
        content = message["content"]
        blinded.append(dict(message, content=_blank_images(content, blank) if isinstance(content, list) else content))
    return replace(item, prompt=blinded)


def predict(model: MMGPT, items: list[EvalItem], batch_size: int, max_new_tokens: int, desc: str) -> list[str]:
    """Chats: the assistant's reply. Documents: the text that follows, up to the next image or the end. A file may
    hold both; each batch is one kind, so the answers come back in the file's order."""
    predictions = [""] * len(items)
    for is_document in (False, True):
        indices = [i for i, item in enumerate(items) if item.is_document == is_document]
        answer = model.complete if is_document else model.generate
        for start in tqdm(range(0, len(indices), batch_size), desc=desc, unit="batch", disable=not indices):
            chunk = indices[start : start + batch_size]
            for index, text in zip(chunk, answer([items[i].prompt for i in chunk], max_new_tokens)):
                predictions[index] = text
    return predictions


def _check_fits(model: MMGPT, items: list[EvalItem], max_new_tokens: int, shots: int) -> None:
    """A few-shot context that does not fit is an error, never silently cut to fewer shots."""
    for item in items:
        try:
            dropped = model.prompt(item.prompt, max_new_tokens, document=item.is_document).dropped
        except ContextTooLongError as error:
            raise ContextTooLongError(f"{item.where} with {shots} shots: {error}") from None
        if dropped:
            raise ContextTooLongError(f"{item.where}: the {shots}-shot context does not fit in the model's "
                                      f"{model.context_length} tokens; use fewer shots")


def evaluate(
    model: MMGPT,
    path: str | Path,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    out: TextIO | None = None,
    shots: int = 0,
    support: str | Path | None = None,
    seed: int = 0,
    tools: list[Callable] | None = None,
    max_tool_calls: int = 4,
) -> dict:
    """{"data", "shots", "n", "accuracy", "blind_accuracy", "by_kind": {kind: {"n", "accuracy", "blind_accuracy"}}};
    `out` gets one JSON line per sample.

    With `tools`, the same questions are asked again with the tools offered (the tool loop, one chat at a time):
    "tools": {"n", "accuracy", "calls", "tool_errors", "by_kind": {kind: the same but by_kind}}, beside the answers
    without them; `calls` is the mean number of calls per question, `tool_errors` the share of calls that failed.

    With `shots` > 0 each query is preceded by that many solved examples (see `mmgpt.fewshot`) drawn from `support`,
    or from `path` itself. The blind score blanks every image, the examples' included.
    """
    items = read_eval_items(path)
    if not items:
        raise RecordError(f"{path}: no eval records")
    if shots:
        pool = items if support is None else read_eval_items(support)
        items = few_shot_items(items, pool, shots, seed)
        _check_fits(model, items, max_new_tokens, shots)
    height, width = model.processor.transform.size
    blank = Image.new("RGB", (width, height), (255, 255, 255))
    seen = predict(model, items, batch_size, max_new_tokens, f"eval, {shots} shots")
    blind = predict(model, [_blind(item, blank) for item in items],
                    batch_size, max_new_tokens, f"eval blind, {shots} shots")
    correct = [normalise(p) == normalise(i.answer) for p, i in zip(seen, items)]
    blind_correct = [normalise(p) == normalise(i.answer) for p, i in zip(blind, items)]
    by_kind: dict[str, list[tuple[bool, bool]]] = {}
    for item, ok, blind_ok in zip(items, correct, blind_correct):
        by_kind.setdefault(item.kind, []).append((ok, blind_ok))
    with_tools = _with_tools(model, items, tools, max_tool_calls, max_new_tokens) if tools else None
    if out is not None:
        for index, (item, prediction, blind_prediction, ok) in enumerate(zip(items, seen, blind, correct)):
            line = {"where": item.where, "shots": shots, "kind": item.kind, "answer": item.answer,
                    "prediction": prediction, "blind_prediction": blind_prediction, "correct": ok}
            if with_tools:
                line.update(with_tools[index])
            out.write(json.dumps(line) + "\n")
    result = {
        "data": str(path),
        "shots": shots,
        "n": len(items),
        "accuracy": sum(correct) / len(items),
        "blind_accuracy": sum(blind_correct) / len(items),
        "by_kind": {kind: {"n": len(pairs), "accuracy": round(sum(ok for ok, _ in pairs) / len(pairs), 4),
                           "blind_accuracy": round(sum(blind for _, blind in pairs) / len(pairs), 4)}
                    for kind, pairs in sorted(by_kind.items())},
    }
    if any(item.rule for item in items):
        result["rules"] = rule_table(items, seen)
    if with_tools:
        result["tools"] = tool_table(items, with_tools)
    return result


def _with_tools(model: MMGPT, items: list[EvalItem], tools: list[Callable], max_tool_calls: int,
                max_new_tokens: int) -> list[dict]:
    """Per item: the answer with the tools offered, whether it is right, and the calls made on the way."""
    answers = []
    for item in tqdm(items, desc="eval with tools", unit="question"):
        if item.is_document:
            raise RecordError(f"{item.where}: tools are offered in chats; this eval record is a document")
        conversation = model.chat(item.prompt, max_new_tokens, tools=tools, max_tool_calls=max_tool_calls)
        steps = conversation[len(item.prompt) : -1]
        calls = [call["function"] for step in steps for call in step.get("tool_calls", [])]
        results = [step for step in steps if step["role"] == "tool"]
        errors = sum(any(part.get("text", "").startswith(ERROR_PREFIX) for part in step["content"]) for step in results)
        prediction = conversation[-1]["content"]
        answers.append({"tool_prediction": prediction, "tool_correct": normalise(prediction) == normalise(item.answer),
                        "tool_calls": [{"name": call["name"], "arguments": call["arguments"]} for call in calls],
                        "tool_errors": errors})
    return answers


def tool_table(items: list[EvalItem], answers: list[dict]) -> dict:
    """Accuracy with the tools, and calls per question, in all and per kind."""
    def summary(chosen: list[dict]) -> dict:
        calls = sum(len(answer["tool_calls"]) for answer in chosen)
        return {"n": len(chosen), "accuracy": round(sum(answer["tool_correct"] for answer in chosen) / len(chosen), 4),
                "calls": round(calls / len(chosen), 3),
                "tool_errors": round(sum(answer["tool_errors"] for answer in chosen) / calls, 4) if calls else 0.0}

    kinds = sorted({item.kind for item in items})
    return {**summary(answers), "by_kind": {kind: summary([answer for item, answer in zip(items, answers)
                                                             if item.kind == kind]) for kind in kinds}}


def rule_table(items: list[EvalItem], predictions: list[str]) -> dict:
    """Per rule (`mmgpt.data.rules`): how often the reply kept it (in all, and under attack), how often a secret
    leaked, the accuracy on picture questions, and on the same questions asked without the rule (their unruled
    twins); "all rules" pools the rules that restrict (`RESTRICTING`)."""
    scored: dict[str, list[tuple[dict, dict]]] = {}
    twins: dict[str, list[bool]] = {}
    for item, prediction in zip(items, predictions):
        if not item.rule:
            continue
        outcome = score(item.rule, prediction, item.answer)
        twin_of = item.rule.get("twin_of")
        if twin_of:  # the same question without the rule: counted beside the rule, not as a rule of its own
            for name in (twin_of, "all rules"):
                twins.setdefault(name, []).append(outcome["correct"])
            continue
        for name in {item.rule["name"]} | ({"all rules"} if item.rule["name"] in RESTRICTING else set()):
            scored.setdefault(name, []).append((item.rule, outcome))

    def rate(values: list[bool]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    table = {}
    for name, pairs in sorted(scored.items()):
        attacked = [outcome["kept"] for rule, outcome in pairs if rule.get("attack")]
        correct = [outcome["correct"] for _, outcome in pairs if outcome["correct"] is not None]
        leaks = [outcome["leaked"] for _, outcome in pairs if outcome["leaked"] is not None]
        table[name] = {"n": len(pairs), "kept": rate([outcome["kept"] for _, outcome in pairs]),
                       "kept_attacked": rate(attacked), "n_attacked": len(attacked),
                       "leaked": rate(leaks), "accuracy": rate(correct), "n_picture": len(correct),
                       "accuracy_without_rule": rate(twins.get(name, []))}
    return table
