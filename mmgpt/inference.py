"""The public inference API: load a saved model folder, then chat about images (optionally streaming).

    from mmgpt import MMGPT
    model = MMGPT.from_pretrained("runs/tiny-shapes/final")
    model.chat([{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                             {"type": "text", "text": "What colour is the circle?"}]}])

Generation is transformers' `generate()`: greedy, sampling, streamers and the KV cache come from there.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import TextIteratorStreamer

from mmgpt.build import load_saved
from mmgpt.data.collate import collate
from mmgpt.data.records import Sample, parse_record
from mmgpt.modeling import MMGPTForConditionalGeneration
from mmgpt.processing import Encoded, MMGPTProcessor


class ContextTooLongError(ValueError):
    """The prompt (text + image tokens) does not fit in the decoder's context."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_messages(messages: Any) -> None:
    """A conversation is a non-empty list of message dicts; a bare string is the commonest slip, so say what to pass."""
    if isinstance(messages, str):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got the string "
                         f"{messages!r:.60}: pass [{{'role': 'user', 'content': {messages!r:.40}}}]")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, got {messages!r:.80}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} must be a {{'role': ..., 'content': ...}} dict, got {message!r:.80}")


def check_generation(max_new_tokens: Any, do_sample: Any, temperature: Any, top_p: Any) -> None:
    """Generation settings, checked before any work: one error naming the setting and the value."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number, 0 or more, got {temperature!r}")
    if do_sample and temperature == 0:
        raise ValueError("temperature 0 with do_sample=True: sampling needs a temperature above 0 (or do_sample=False)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")


class MMGPT:
    """A loaded model and its processor. One object may be shared across threads: calls are serialised."""

    def __init__(self, model: MMGPTForConditionalGeneration, processor: MMGPTProcessor, source: str = ""):
        self.model = model.eval()
        self.processor = processor
        self.source = source
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "MMGPT":
        """Load a `save_pretrained` folder (e.g. OUTPUT_DIR/final). Device: CUDA if present, else CPU."""
        device = torch.device(device) if device is not None else default_device()
        processor, model = load_saved(path, dtype or torch.float32)
        return cls(model.to(device), processor, str(path))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def context_length(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    def _sample(self, messages: list[dict]) -> Sample:
        check_messages(messages)
        return parse_record({"messages": messages}, base_dir=None, where="messages")

    def _tokenize_prompt(self, messages: list[dict], max_new_tokens: int) -> tuple[Sample, list[int], list[int], list]:
        """Token ids, labels and image references of the prompt (no image loaded); `ContextTooLongError` if too long."""
        return self._tokenize(self._sample(messages), max_new_tokens)

    def _tokenize(self, sample: Sample, max_new_tokens: int) -> tuple[Sample, list[int], list[int], list]:
        ids, labels, images = self.processor.tokenize(sample, add_generation_prompt=True)
        limit = self.context_length - max_new_tokens
        if len(ids) > limit:
            raise ContextTooLongError(
                f"prompt is {len(ids)} tokens ({len(images)} image(s) of {self.processor.num_image_tokens + 2} "
                f"tokens each included); with max_new_tokens={max_new_tokens} the limit is {limit} "
                f"(context {self.context_length})"
            )
        return sample, ids, labels, images

    def encode_prompt(self, messages: list[dict], max_new_tokens: int) -> Encoded:
        """The prompt for the next assistant turn, images loaded; raises `ContextTooLongError` if it cannot fit."""
        sample, ids, labels, images = self._tokenize_prompt(messages, max_new_tokens)
        return Encoded(ids, labels, self.processor.pixel_values(images, sample.source))

    def fit_to_context(self, messages: list[dict], max_new_tokens: int) -> tuple[list[dict], int]:
        """Drop the oldest whole exchanges until the prompt fits; returns (messages kept, number dropped).

        The rule: system messages and the newest user message are always kept; before them, the oldest
        messages go first, a user message together with the assistant replies that follow it, so no turn and no
        image is ever cut in half. If even the shortest form does not fit, `ContextTooLongError` says why.
        Only tokenises: no image is loaded while searching.
        """
        check_messages(messages)
        system = [m for m in messages if m.get("role") == "system"]
        rest = [m for m in messages if m.get("role") != "system"]
        dropped = 0
        while True:
            try:
                self._tokenize_prompt(system + rest, max_new_tokens)
                return system + rest, dropped
            except ContextTooLongError:
                later_users = [i for i, m in enumerate(rest) if i > 0 and m.get("role") == "user"]
                if not later_users:
                    raise
                dropped += later_users[0]
                rest = rest[later_users[0] :]

    def encode_document(self, content: list[dict], max_new_tokens: int, load_images: bool = True) -> Encoded:
        """An interleaved document to continue (no end-of-document token); `ContextTooLongError` if it cannot fit.
        Never cut: which part of a document may go is the caller's to say."""
        if not isinstance(content, list) or not content:
            raise ValueError("a document must be a non-empty list of {'type': 'text'|'image', ...} items")
        sample, ids, labels, images = self._tokenize(parse_record({"content": content}, None, "document"), max_new_tokens)
        return Encoded(ids, labels, self.processor.pixel_values(images, sample.source) if load_images else None)

    def complete(
        self,
        documents: list[list[dict]],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[str]:
        """Continue several interleaved documents (text and images, as in training data) in one left-padded batch:
        the text the model writes next, up to where it would place an image or end the document (or
        `max_new_tokens`)."""
        check_generation(max_new_tokens, do_sample, temperature, top_p)
        if not isinstance(documents, list) or not documents:
            raise ValueError(f"documents must be a non-empty list of documents (lists of items), got {documents!r:.80}")
        encoded = [self.encode_document(content, max_new_tokens) for content in documents]
        return self._generate_batch(encoded, max_new_tokens, do_sample, temperature, top_p, document=True)

    def _generate_batch(self, encoded: list[Encoded], max_new_tokens: int, do_sample: bool, temperature: float,
                        top_p: float, document: bool = False) -> list[str]:
        batch = collate(encoded, self.processor.special.pad, padding_side="left")
        kwargs = self._generate_kwargs(batch, max_new_tokens, do_sample, temperature, top_p)
        if document:  # a document's text runs until its next image: stop there instead of forbidding it
            kwargs["eos_token_id"] = [*kwargs["eos_token_id"], self.processor.special.image_start]
            kwargs["suppress_tokens"].remove(self.processor.special.image_start)
        with self._lock, torch.inference_mode():
            output = self.model.generate(**kwargs)
        prompt_length = batch["input_ids"].shape[1]
        return [self.processor.decode(row[prompt_length:]).strip() for row in output]

    def _encode_fitted(self, messages: list[dict], max_new_tokens: int) -> Encoded:
        return self.encode_prompt(self.fit_to_context(messages, max_new_tokens)[0], max_new_tokens)

    def _generate_kwargs(self, batch: dict, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float) -> dict:
        kwargs: dict[str, Any] = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        special = self.processor.special
        kwargs.update(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=[special.end, special.eos],
                      pad_token_id=special.pad)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        # the model may only write text and end its turn: it never opens an image slot or a new turn
        kwargs["suppress_tokens"] = [special.image, special.image_start, special.image_end, special.system,
                                     special.user, special.assistant, special.pad]
        return kwargs

    def generate(
        self,
        conversations: list[list[dict]],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[str]:
        """Answer several conversations in one left-padded batch (each cut to fit by `fit_to_context`)."""
        check_generation(max_new_tokens, do_sample, temperature, top_p)
        if not isinstance(conversations, list) or not conversations:
            raise ValueError(f"conversations must be a non-empty list of message lists, got {conversations!r:.80}")
        encoded = [self._encode_fitted(messages, max_new_tokens) for messages in conversations]
        return self._generate_batch(encoded, max_new_tokens, do_sample, temperature, top_p)

    def loglikelihood(self, messages: list[dict], continuation: str) -> tuple[float, bool]:
        """Log-probability of `continuation` as the assistant's reply to `messages`, and whether greedy decoding
        would write exactly it: how multiple-choice benchmarks score a model."""
        continuation_ids = self.processor.encode_text(continuation)
        prompt = self.encode_prompt(messages, max(1, len(continuation_ids)))
        ids = torch.tensor([prompt.input_ids + continuation_ids], device=self.device)
        pixels = prompt.pixel_values.to(self.device) if prompt.pixel_values is not None else None
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=ids, pixel_values=pixels).logits[0, len(prompt.input_ids) - 1 : -1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(continuation_ids, device=self.device)
        total = float(log_probs.gather(-1, target[:, None]).sum())
        return total, bool((log_probs.argmax(-1) == target).all())

    def chat(
        self,
        messages: list[dict],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """The assistant's reply to `messages`; with `stream=True`, an iterator of text pieces as they come."""
        if not stream:
            return self.generate([messages], max_new_tokens, do_sample, temperature, top_p)[0]
        check_generation(max_new_tokens, do_sample, temperature, top_p)
        encoded = self._encode_fitted(messages, max_new_tokens)
        batch = collate([encoded], self.processor.special.pad, padding_side="left")
        kwargs = self._generate_kwargs(batch, max_new_tokens, do_sample, temperature, top_p)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    self.model.generate(**kwargs, streamer=streamer)
            except BaseException as error:  # surfaced to the consumer below
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()

        def pieces() -> Iterator[str]:
            for piece in streamer:
                if piece:
                    yield piece
            thread.join()
            if errors:
                raise errors[0]

        return pieces()
