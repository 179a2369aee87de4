"""VLMEvalKit model: add it to VLMEvalKit's `vlmeval/config.py` and run its benchmarks on an mmgpt model:

    from functools import partial
    from mmgpt.integrations.vlmevalkit import MMGPTVLMEval
    supported_VLM["mmgpt"] = partial(MMGPTVLMEval, model_path="runs/siglip-gpt2-stage2/final")

    python run.py --data MMStar MMMU_DEV_VAL --model mmgpt

VLMEvalKit installs from its repository, not from PyPI; where it is not installed the class stands alone with the
same interface (`generate_inner` for one message, `chat_inner` for a conversation).
"""

from __future__ import annotations

from typing import Any

from mmgpt.inference import MMGPT

try:
    from vlmeval.vlm.base import BaseModel
except ImportError:
    BaseModel = object


def content(items: list[dict]) -> list[dict]:
    """VLMEvalKit's interleaved items ({type: image|text, value}) -> our content items, in order."""
    converted = []
    for item in items:
        if item["type"] == "image":
            converted.append({"type": "image", "image": item["value"]})
        elif item["type"] == "text":
            converted.append({"type": "text", "text": item["value"]})
        else:
            raise ValueError(f"mmgpt takes text and images, not {item['type']!r}")
    return converted


class MMGPTVLMEval(BaseModel):
    """Greedy answers of an `MMGPT`; images stand where the message puts them (interleaved)."""

    INTERLEAVE = True

    def __init__(self, model_path: str, device: str | None = None, max_new_tokens: int = 128, **kwargs: Any) -> None:
        if BaseModel is not object:
            super().__init__()
        self.model = MMGPT.from_pretrained(model_path, device=device)
        self.max_new_tokens = max_new_tokens

    def generate_inner(self, message: list[dict], dataset: str | None = None) -> str:
        return self.model.chat([{"role": "user", "content": content(message)}], max_new_tokens=self.max_new_tokens)

    def chat_inner(self, message: list[dict], dataset: str | None = None) -> str:
        conversation = [{"role": turn["role"], "content": content(turn["content"])} for turn in message]
        return self.model.chat(conversation, max_new_tokens=self.max_new_tokens)
