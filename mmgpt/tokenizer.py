"""Tokenizers: a byte-level BPE trained offline for tiny recipes, or a decoder's own with our control tokens added.

Control tokens are looked up by name at load time (`SpecialTokens.from_tokenizer`), never by hard-coded id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

CONTROL_TOKENS = {
    "image": "<|image|>",
    "image_start": "<|image_start|>",
    "image_end": "<|image_end|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",
}
TOOL_TOKENS = {  # tool use (`mmgpt.tools`); optional, so that models saved before it still load
    "tool": "<|tool|>",  # the role of a message carrying a tool's result
    "tool_call": "<|tool_call|>",  # opens a call in an assistant message: the call's JSON follows
}
PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the control tokens of one tokenizer."""

    pad: int
    eos: int
    image: int
    image_start: int
    image_end: int
    system: int
    user: int
    assistant: int
    end: int
    tool: int | None = None
    tool_call: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "SpecialTokens":
        ids = {}
        for name, token in {**CONTROL_TOKENS, **TOOL_TOKENS}.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(token_id) != token:
                if name in TOOL_TOKENS:
                    continue
                raise ValueError(f"tokenizer has no control token {token!r}: was it saved by mmgpt?")
            ids[name] = token_id
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer needs a pad and an eos token")
        return cls(pad=tokenizer.pad_token_id, eos=tokenizer.eos_token_id, **ids)

    def role(self, role: str) -> int:
        if role == "tool":
            return self.tools_supported()[0]
        return {"system": self.system, "user": self.user, "assistant": self.assistant}[role]

    def tools_supported(self) -> tuple[int, int]:
        """(tool, tool_call) ids, or a clear error for a tokenizer saved before tool use."""
        if self.tool is None or self.tool_call is None:
            raise ValueError(f"this model's tokenizer has no {TOOL_TOKENS['tool']} and {TOOL_TOKENS['tool_call']} tokens: "
                             "it was saved before mmgpt had tool use; train a model on tool chats to use tools")
        return self.tool, self.tool_call


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE learned from `texts`: every byte is in the alphabet, so any UTF-8 text encodes."""
    specials = [PAD_TOKEN, EOS_TOKEN, *CONTROL_TOKENS.values(), *TOOL_TOKENS.values()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[*CONTROL_TOKENS.values(), *TOOL_TOKENS.values()],
    )


def load_decoder_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The decoder's own tokenizer (hub name or folder) with our control tokens and a pad token added."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.add_special_tokens({"additional_special_tokens": [*CONTROL_TOKENS.values(), *TOOL_TOKENS.values()]})
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer
