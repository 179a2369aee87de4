"""lmms-eval adapter, registered as model `mmgpt` through the `lmms_eval.models` entry point:

    lmms-eval --model mmgpt --model_args pretrained=runs/siglip-gpt2-stage2/final --tasks mmstar

Each request becomes a chat: the task's images where its context says `<image>`, or before the text when it does
not place them; `until` strings cut the answer; `loglikelihood` scores a continuation as the assistant's reply
(lmms-eval 0.7.3 itself turns every loglikelihood result into a string before scoring, so its multiple-choice
tasks fail for every model there; the method follows the API for versions that pass results through); multi-round
tasks keep the whole conversation, each round's answer in it.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from mmgpt.data.formats import PLACEHOLDER
from mmgpt.inference import MMGPT

MANIFEST = ModelManifest(model_id="mmgpt", simple_class_path="mmgpt.integrations.lmms_eval.MMGPTLmms")


def user_message(context: str, visuals: list | None) -> dict:
    """The task's text and images as one user message, images where `<image>` stands (else first)."""
    images = [image for image in (visuals or []) if image is not None]
    pieces = context.split(PLACEHOLDER)
    if len(pieces) - 1 != len(images):
        pieces = ["".join(pieces)]
        content = [{"type": "image", "image": image} for image in images]
    else:
        content = []
    for position, piece in enumerate(pieces):
        if position and len(pieces) > 1:
            content.append({"type": "image", "image": images[position - 1]})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return {"role": "user", "content": content}


def cut_at(text: str, until: list[str] | str | None) -> str:
    for stop in [until] if isinstance(until, str) else until or []:
        if stop and stop in text:
            text = text.split(stop)[0]
    return text


class MMGPTLmms(lmms):
    """An `MMGPT` answering lmms-eval requests (greedy unless the task asks for a temperature)."""

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int = 128, **kwargs: Any) -> None:
        super().__init__()
        self.model = MMGPT.from_pretrained(pretrained, device=device)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _generate(self, conversations: list[list[dict]], gen_kwargs: dict) -> list[str]:
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        answers = self.model.generate(
            conversations, max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            do_sample=temperature > 0, temperature=temperature or 1.0, top_p=float(gen_kwargs.get("top_p") or 1.0),
        )
        return [cut_at(answer, gen_kwargs.get("until")) for answer in answers]

    def generate_until(self, requests) -> list[str]:
        outputs: list[str] = []
        arguments = [request.args for request in requests]
        for start in range(0, len(arguments), self.batch_size):
            chunk = arguments[start : start + self.batch_size]
            conversations = [[user_message(context, doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual else [])]
                             for context, _, doc_to_visual, doc_id, task, split in chunk]
            outputs += self._generate(conversations, dict(chunk[0][1]))
        return outputs

    def generate_until_multi_round(self, requests) -> list:
        outputs = []
        for context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split in [r.args for r in requests]:
            doc = self._doc(task, split, doc_id)
            conversation = [user_message(context, doc_to_visual(doc) if doc_to_visual else [])]
            answers: list[str] = []
            info = None
            while True:
                answer = self._generate([conversation], dict(gen_kwargs))[0]
                answers.append(answer)
                conversation.append({"role": "assistant", "content": answer})
                visuals, context, done, answers, info = doc_to_text(
                    doc, previous_output=answers, round_idx=len(answers), previous_round_info=info)
                answers = list(answers)
                if done:
                    break
                conversation.append(user_message(context, visuals))
            outputs.append(answers)
        return outputs

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for context, doc_to_target, doc_to_visual, doc_id, task, split in [r.args for r in requests]:
            doc = self._doc(task, split, doc_id)
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            visuals = doc_to_visual(doc) if doc_to_visual else []
            # the task's target delimiter (" red") separates text; here the answer opens the assistant's turn
            results.append(self.model.loglikelihood([user_message(context, visuals)], continuation.lstrip()))
        return results
