"""Records -> `Sample`s: the one place that checks a record (readers of every format, `formats.py`, call it).

Interleaved document: {"content": [{"type": "text", "text": ...}, {"type": "image", "image": "img/1.png"}, ...]}
Chat: {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": [items] or "plain text"}, ...]},
      with "tools": [JSON schemas] and assistant "tool_calls" for tool use (the format: `mmgpt.tools`)
Image paths are relative to the JSONL file and must stay inside its folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

from PIL import Image

from mmgpt.images import ImageBytes
from mmgpt.tools import ToolError, call_text, read_call, tool_schema, tools_text

ROLES = ("system", "user", "assistant", "tool")
ImageRef = Union[str, Path, Image.Image, ImageBytes]


class RecordError(ValueError):
    """A record that cannot be used; the message names the file, the line and the cause."""


@dataclass
class Segment:
    """A piece of a turn: either text or one image (a path or a PIL image); `tool_call` text is a call's JSON."""

    text: str | None = None
    image: ImageRef | None = None
    tool_call: bool = False

    @property
    def is_image(self) -> bool:
        return self.image is not None


@dataclass
class Turn:
    """One chat message, or the whole of a document (role None)."""

    role: str | None
    segments: list[Segment]


@dataclass
class Sample:
    """A parsed record; `source` says where it came from, for error messages."""

    turns: list[Turn]
    source: str = "<memory>"
    is_chat: bool = field(init=False)

    def __post_init__(self) -> None:
        self.is_chat = any(turn.role is not None for turn in self.turns)

    @property
    def images(self) -> list[ImageRef]:
        return [segment.image for turn in self.turns for segment in turn.segments if segment.is_image]


def _parse_items(content: Any, base_dir: Path | None, where: str) -> list[Segment]:
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RecordError(f"{where}: content must be a string or a list of items, got {type(content).__name__}")
    segments = []
    for position, item in enumerate(content):
        if not isinstance(item, dict) or item.get("type") not in ("text", "image"):
            raise RecordError(f"{where}: item {position} must be an object with type 'text' or 'image'")
        if item["type"] == "text":
            if not isinstance(item.get("text"), str):
                raise RecordError(f"{where}: text item {position} has no 'text' string")
            try:
                item["text"].encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate: valid in JSON and Python strings, not in Unicode text
                raise RecordError(f"{where}: text item {position} holds {error.object[error.start]!r} at character "
                                  f"{error.start}, half of a UTF-16 pair, which is not text") from None
            segments.append(Segment(text=item["text"]))
        else:
            segments.append(Segment(image=_resolve_image(item.get("image"), base_dir, where)))
    if not segments or all(not s.is_image and not s.text.strip() for s in segments):
        raise RecordError(f"{where}: empty content")
    return segments


def _resolve_image(image: Any, base_dir: Path | None, where: str) -> ImageRef:
    if isinstance(image, (Image.Image, ImageBytes)):
        return image
    if not isinstance(image, (str, Path)) or not str(image):
        raise RecordError(f"{where}: image item needs an 'image' path")
    if base_dir is None:
        path = Path(image)
    else:
        path = (base_dir / image).resolve()
        if not path.is_relative_to(base_dir.resolve()):
            raise RecordError(f"{where}: image '{image}' is outside the data folder {base_dir}")
    if not path.is_file():
        raise RecordError(f"{where}: image '{image}': file not found")
    return path


def parse_record(record: Any, base_dir: Path | None = None, where: str = "<memory>") -> Sample:
    """Check one decoded JSON record and turn it into a Sample (image paths resolved against `base_dir`)."""
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record must be a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise RecordError(f"{where}: 'messages' must be a non-empty list")
        turns = []
        for index, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in ROLES:
                raise RecordError(f"{where}: message {index} has unknown role {role!r} (expected one of {ROLES})")
            turns.append(_message_turn(message, turns, base_dir, f"{where} message {index}"))
        if record.get("tools"):
            turns = _with_tools(turns, record["tools"], where)
        return Sample(turns, where)
    if "content" in record:
        return Sample([Turn(None, _parse_items(record["content"], base_dir, where))], where)
    raise RecordError(f"{where}: a record needs 'messages' (chat) or 'content' (document)")


def _message_turn(message: dict, earlier: list[Turn], base_dir: Path | None, where: str) -> Turn:
    """One chat message; an assistant's "tool_calls" become call segments after its text."""
    role, calls = message["role"], message.get("tool_calls") or []
    if calls and role != "assistant":
        raise RecordError(f"{where}: only an assistant message may hold tool_calls")
    if role == "tool" and not (earlier and (earlier[-1].role == "tool" or any(s.tool_call for s in earlier[-1].segments))):
        raise RecordError(f"{where}: a tool message must follow an assistant message with tool_calls")
    if not isinstance(calls, list):
        raise RecordError(f"{where}: tool_calls must be a list")
    content = message.get("content")
    segments = _parse_items(content, base_dir, where) if content or not calls else []
    for position, call in enumerate(calls):
        try:
            segments.append(Segment(text=call_text(*read_call(call, f"{where} tool call {position}")), tool_call=True))
        except ToolError as error:
            raise RecordError(str(error)) from None
    return Turn(role, segments)


def _with_tools(turns: list[Turn], tools: Any, where: str) -> list[Turn]:
    """The tool schemas at the end of the system message (one made if there is none): `mmgpt.tools`."""
    if not isinstance(tools, list):
        raise RecordError(f"{where}: 'tools' must be a list of JSON schemas")
    try:
        block = tools_text([tool_schema(tool) for tool in tools])
    except ToolError as error:
        raise RecordError(f"{where}: {error}") from None
    if turns[0].role == "system":
        return [Turn("system", [*turns[0].segments, Segment(text="\n\n" + block)]), *turns[1:]]
    return [Turn("system", [Segment(text=block)]), *turns]


def iter_lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        yield from handle
