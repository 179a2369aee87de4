"""The public inference API: load a saved model folder, then chat about images (optionally streaming).

    from mmgpt import MMGPT
    model = MMGPT.from_pretrained("runs/tiny-shapes/final")
    model.chat([{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                             {"type": "text", "text": "What colour is the circle?"}]}])

With `tools=[function, ...]`, `chat` runs the tool loop (`mmgpt.tools`): the model writes a call, the function runs,
its result (text or pictures) joins the conversation, and the model goes on until it answers:

    conversation = model.chat(messages, tools=[zoom], max_tool_calls=4)   # every call and result, then the answer

Generation is transformers' `generate()`: greedy, sampling, streamers and the KV cache come from there. Every
entry point (chat, streaming, batched generate, complete, loglikelihood, evaluation, the demo) turns its input into
a `Prompt` with one method, `MMGPT.prompt`; `chat` keeps the KV cache of each conversation it has read, so a
follow-up turn reads only its new tokens and encodes only its new images.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from transformers import TextIteratorStreamer

from mmgpt.build import load_saved
from mmgpt.data.collate import collate
from mmgpt.data.records import parse_record
from mmgpt.modeling import MMGPTForConditionalGeneration
from mmgpt.prefix_cache import PrefixCache, prompt_key
from mmgpt.processing import IGNORE_INDEX, Encoded, MMGPTProcessor
from mmgpt.tools import Toolbox


TOOL_TURN_TOKENS = 64  # what a tool-loop turn may write where the context has room: a call's JSON is 15-40 tokens


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


@dataclass
class Prompt:
    """Messages (or a document) made ready for the model: token ids and the images in reading order, not yet
    loaded. `dropped`: how many of the oldest messages were left out so that it fits the context."""

    ids: list[int]
    images: list = field(default_factory=list)
    source: str = "messages"
    dropped: int = 0
    document: bool = False


class MMGPT:
    """A loaded model and its processor. One object may be shared across threads: calls are serialised.

    `cache_bytes` bounds the KV caches `chat` keeps of the conversations it has read (0: keep none)."""

    def __init__(self, model: MMGPTForConditionalGeneration, processor: MMGPTProcessor, source: str = "",
                 cache_bytes: int = 512 * 2**20):
        self.model = model.eval()
        self.processor = processor
        self.source = source
        self.prefix_cache = PrefixCache(cache_bytes)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        cache_bytes: int = 512 * 2**20) -> "MMGPT":
        """Load a `save_pretrained` folder (e.g. OUTPUT_DIR/final). Device: CUDA if present, else CPU."""
        device = torch.device(device) if device is not None else default_device()
        processor, model = load_saved(path, dtype or torch.float32)
        return cls(model.to(device), processor, str(path), cache_bytes)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def context_length(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    def prompt(self, messages: "list[dict] | Prompt", max_new_tokens: int, document: bool = False,
               fit: bool = True, tools: list[dict] | None = None) -> Prompt:
        """Messages -> the prompt for the next assistant turn; with `document=True`, an interleaved document's
        items -> the prompt to continue it (never cut: which part of a document may go is the caller's to say).

        Fitting (`fit=True`, chats only) drops the oldest whole exchanges until the prompt leaves room for
        `max_new_tokens`: system messages and the newest user message always stay; before them the oldest go
        first, a user message together with the replies (and tool calls and results) that follow it, so no turn and
        no image is cut in half. `tools`: JSON schemas, written at the end of the system message (`mmgpt.tools`).
        Each message is tokenised once and fitting counts; no image is loaded. `ContextTooLongError` says why
        even the shortest form does not fit. A `Prompt` passes through, checked to leave room for `max_new_tokens`."""
        limit = self.context_length - max_new_tokens
        if isinstance(messages, Prompt):
            self._check_fits(len(messages.ids), len(messages.images), limit, max_new_tokens)
            return messages
        if document:
            if not isinstance(messages, list) or not messages:
                raise ValueError("a document must be a non-empty list of {'type': 'text'|'image', ...} items")
            sample = parse_record({"content": messages}, None, "document")
            ids, _, images = self.processor.tokenize(sample, add_generation_prompt=True)
            self._check_fits(len(ids), len(images), limit, max_new_tokens)
            return Prompt(ids, images, sample.source, document=True)
        check_messages(messages)
        sample = parse_record({"messages": messages, "tools": tools}, base_dir=None, where="messages")
        turns = [t for t in sample.turns if t.role == "system"] + [t for t in sample.turns if t.role != "system"]
        encoded = []
        for turn in turns:
            images: list = []
            encoded.append((turn.role, self.processor.encode_message(turn, images)[0], images))
        first = sum(role == "system" for role, _, _ in encoded)  # the first message that may be dropped
        length = sum(len(ids) for _, ids, _ in encoded) + 1  # + <|assistant|>
        kept = first
        for start in (i for i, (role, _, _) in enumerate(encoded) if role == "user" and i > first):
            if length <= limit or not fit:
                break
            length -= sum(len(ids) for _, ids, _ in encoded[kept:start])  # one more exchange goes
            kept = start
        encoded = encoded[:first] + encoded[kept:]
        ids = [token for _, turn_ids, _ in encoded for token in turn_ids] + [self.processor.special.assistant]
        images = [image for _, _, turn_images in encoded for image in turn_images]
        self._check_fits(len(ids), len(images), limit, max_new_tokens)
        return Prompt(ids, images, sample.source, dropped=kept - first)

    def _check_fits(self, length: int, images: int, limit: int, max_new_tokens: int) -> None:
        if length > limit:
            raise ContextTooLongError(
                f"prompt is {length} tokens ({images} image(s) of {self.processor.num_image_tokens + 2} "
                f"tokens each included); with max_new_tokens={max_new_tokens} the limit is {limit} "
                f"(context {self.context_length})"
            )

    def _encoded(self, prompt: Prompt, images_from: int = 0) -> Encoded:
        """The prompt with its images loaded, from image `images_from` on (those before it are already read)."""
        pixels = self.processor.pixel_values(prompt.images[images_from:], prompt.source)
        return Encoded(prompt.ids, [IGNORE_INDEX] * len(prompt.ids), pixels)

    def _generate_kwargs(self, prompts: list[Prompt], max_new_tokens: int, do_sample: bool, temperature: float,
                         top_p: float, images_from: int = 0, tool_calls: bool = False) -> dict:
        """`generate()`'s arguments for a left-padded batch; `images_from`: images before it are already read;
        `tool_calls`: whether the model may call a tool."""
        encoded = [self._encoded(prompt, images_from) for prompt in prompts]
        batch = collate(encoded, self.processor.special.pad, padding_side="left")
        kwargs: dict[str, Any] = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        special = self.processor.special
        kwargs.update(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=[special.end, special.eos],
                      pad_token_id=special.pad)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        kwargs["suppress_tokens"] = self._forbidden(tool_calls)
        if prompts[0].document:  # a document's text runs until its next image: stop there instead of forbidding it
            kwargs["eos_token_id"] = [*kwargs["eos_token_id"], special.image_start]
            kwargs["suppress_tokens"].remove(special.image_start)
        return kwargs

    def _forbidden(self, tool_calls: bool = False) -> list[int]:
        """Tokens the model may not write in a chat reply: it never opens an image slot or a new turn, and calls a
        tool only when tools are offered."""
        special = self.processor.special
        forbidden = [special.image, special.image_start, special.image_end, special.system, special.user,
                     special.assistant, special.pad]
        return forbidden + [token for token in (special.tool, None if tool_calls else special.tool_call)
                            if token is not None]

    def _generate_batch(self, prompts: list[Prompt], max_new_tokens: int, do_sample: bool, temperature: float,
                        top_p: float) -> list[str]:
        kwargs = self._generate_kwargs(prompts, max_new_tokens, do_sample, temperature, top_p)
        with self._lock, torch.inference_mode():
            output = self.model.generate(**kwargs)
        prompt_length = kwargs["input_ids"].shape[1]
        return [self.processor.decode(row[prompt_length:]).strip() for row in output]

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
        prompts = [self.prompt(content, max_new_tokens, document=True) for content in documents]
        return self._generate_batch(prompts, max_new_tokens, do_sample, temperature, top_p)

    def generate(
        self,
        conversations: "list[list[dict] | Prompt]",
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[str]:
        """Answer several conversations in one left-padded batch (each fitted to the context by `prompt`)."""
        check_generation(max_new_tokens, do_sample, temperature, top_p)
        if not isinstance(conversations, list) or not conversations:
            raise ValueError(f"conversations must be a non-empty list of message lists, got {conversations!r:.80}")
        prompts = [self.prompt(messages, max_new_tokens) for messages in conversations]
        return self._generate_batch(prompts, max_new_tokens, do_sample, temperature, top_p)

    def loglikelihood(self, messages: list[dict], continuation: str) -> tuple[float, bool]:
        """Log-probability of `continuation` as the assistant's reply to `messages`, and whether greedy decoding
        would write exactly it: how multiple-choice benchmarks score a model."""
        continuation_ids = self.processor.encode_text(continuation)
        prompt = self._encoded(self.prompt(messages, max(1, len(continuation_ids)), fit=False))
        ids = torch.tensor([prompt.input_ids + continuation_ids], device=self.device)
        pixels = prompt.pixel_values.to(self.device) if prompt.pixel_values is not None else None
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=ids, pixel_values=pixels).logits[0, len(prompt.input_ids) - 1 : -1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(continuation_ids, device=self.device)
        total = float(log_probs.gather(-1, target[:, None]).sum())
        allowed = log_probs.clone()
        allowed[:, self._forbidden()] = float("-inf")  # greedy as `generate` decodes: forbidden tokens never win
        return total, bool((allowed.argmax(-1) == target).all())

    def chat(
        self,
        messages: "list[dict] | Prompt",
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stream: bool = False,
        cache: bool = True,
        tools: list[Callable] | None = None,
        max_tool_calls: int = 4,
        tool_timeout: float = 10.0,
    ) -> "str | list[dict] | Iterator[str | dict]":
        """The assistant's reply to `messages`; with `stream=True`, an iterator of text pieces as they come.

        With `cache=True` the decoder's KV cache of this conversation is kept (within the `cache_bytes` bound), so
        the next turn, whose messages begin with these plus the reply, reads only its new tokens and images.

        With `tools` (Python functions, described to the model by their type hints and docstrings), the tool loop
        runs instead and the whole conversation comes back: `messages`, then each assistant message with its
        `tool_calls` and each tool's result, then the answer (`[-1]["content"]`); each turn may take up to
        `TOOL_TURN_TOKENS` tokens where the context has room, for a call's JSON. At most `max_tool_calls` calls
        run; after that the model must answer. A call that fails in any way, or a tool that runs past
        `tool_timeout` seconds, becomes a tool message the model reads (`mmgpt.tools`). Streaming yields text
        pieces, and each call message and result message (dicts) as it happens; the text before a call is also
        that call message's content."""
        check_generation(max_new_tokens, do_sample, temperature, top_p)
        if tools is not None:
            if not isinstance(max_tool_calls, int) or isinstance(max_tool_calls, bool) or max_tool_calls < 0:
                raise ValueError(f"max_tool_calls must be a whole number, 0 or more, got {max_tool_calls!r}")
            if isinstance(messages, Prompt):
                raise ValueError("chat with tools takes messages, not a Prompt: each step's prompt holds the calls")
            self.processor.special.tools_supported()
            check_messages(messages)
            conversation = [dict(message) for message in messages]
            events = self._tool_loop(conversation, Toolbox(tools, tool_timeout), max_tool_calls, stream,
                                     (max_new_tokens, do_sample, temperature, top_p, cache))
            if stream:
                return events
            for _ in events:
                pass
            return conversation
        prompt = self.prompt(messages, max_new_tokens)
        settings = (max_new_tokens, do_sample, temperature, top_p, cache)
        if not stream:
            return self.processor.decode(self._turn(prompt, settings)).strip()
        return self._streamed(prompt, settings, False)[0]

    def _turn(self, prompt: Prompt, settings: tuple, streamer: TextIteratorStreamer | None = None,
              tool_calls: bool = False) -> list[int]:
        """Generate one assistant turn for `prompt`: the new token ids (reusing and keeping KV caches as `chat`
        says)."""
        max_new_tokens, do_sample, temperature, top_p, cache = settings
        special = self.processor.special
        key = prompt_key(prompt.ids, prompt.images, special.image_start, special.image_end) if cache else None
        with self._lock, torch.inference_mode():
            past, reused = self.prefix_cache.take(key, special.image_start) if cache else (None, 0)
            images_read = sum(token == special.image_start for token in prompt.ids[:reused])
            kwargs = self._generate_kwargs([prompt], max_new_tokens, do_sample, temperature, top_p, images_read,
                                           tool_calls)
            if past is not None:
                kwargs[self.model._cache_argument] = past
            output = self.model.generate(**kwargs, streamer=streamer, return_dict_in_generate=True)
            if cache:
                sequence = output.sequences[0].tolist()
                self.prefix_cache.put(key + sequence[len(prompt.ids) : output.cache.get_seq_length()], output.cache,
                                      len(key))
        return output.sequences[0, len(prompt.ids) :].tolist()

    def _streamed(self, prompt: Prompt, settings: tuple, tool_calls: bool) -> tuple[Iterator[str], list[list[int]]]:
        """(text pieces as they come, a list that holds the turn's ids once the pieces are exhausted); the text
        stops where a tool call begins."""
        special = self.processor.special
        streamer = _ReplyStreamer(self.processor.tokenizer, special.tool_call, skip_prompt=True,
                                  skip_special_tokens=True, timeout=300)
        errors: list[BaseException] = []
        generated: list[list[int]] = []

        def in_thread() -> None:
            try:
                generated.append(self._turn(prompt, settings, streamer, tool_calls))
            except BaseException as error:  # surfaced to the consumer below
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=in_thread, daemon=True)
        thread.start()

        def pieces() -> Iterator[str]:
            for piece in streamer:
                if piece:
                    yield piece
            thread.join()
            if errors:
                raise errors[0]

        return pieces(), generated

    def _tool_loop(self, conversation: list[dict], toolbox: Toolbox, max_tool_calls: int, stream: bool,
                   settings: tuple) -> Iterator[str | dict]:
        """Generate, run the calls, append calls and results to `conversation`, until the model answers."""
        tool_call = self.processor.special.tool_call
        calls = 0
        while True:
            prompt = self.prompt(conversation, settings[0], tools=toolbox.schemas)
            room = max(settings[0], min(TOOL_TURN_TOKENS, self.context_length - len(prompt.ids)))
            turn = (room, *settings[1:])
            allowed = calls < max_tool_calls
            if stream:
                pieces, generated = self._streamed(prompt, turn, allowed)
                yield from pieces
                ids = generated[0]
            else:
                ids = self._turn(prompt, turn, tool_calls=allowed)
            starts = [index for index, token in enumerate(ids) if token == tool_call]
            text = self.processor.decode(ids[: starts[0]] if starts else ids).strip()
            if not starts:
                conversation.append({"role": "assistant", "content": text})
                return
            written = [self.processor.decode(ids[start + 1 : end]).strip()
                       for start, end in zip(starts, starts[1:] + [len(ids)])][: max_tool_calls - calls]
            message = {"role": "assistant", "content": text, "tool_calls": [toolbox.call_record(w) for w in written]}
            conversation.append(message)
            yield message
            for call in written:
                calls += 1
                pictures = parse_record({"messages": conversation}, None, "messages").images
                result = toolbox.run(call, pictures)
                conversation.append(result)
                yield result


class _ReplyStreamer(TextIteratorStreamer):
    """Streams a reply's text up to its first tool call: the call's JSON is shown as a call, not as text."""

    def __init__(self, tokenizer: Any, tool_call_id: int | None, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        self.tool_call_id = tool_call_id
        self.calling = False

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt or self.tool_call_id is None:
            return super().put(value)
        if self.calling:
            return None
        ids = value.reshape(-1).tolist()
        if self.tool_call_id in ids:
            self.calling = True
            before = ids[: ids.index(self.tool_call_id)]
            return super().put(torch.tensor(before)) if before else None
        return super().put(value)
