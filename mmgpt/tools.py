"""Tool use: tools described by JSON schema, calls the model writes, checked and run, and their results.

The format is the transformers / OpenAI chat convention, so data and clients carry over:
- A tool is a JSON schema {"type": "function", "function": {"name", "description", "parameters"}}; a Python
  function with type hints and a Google-style docstring becomes one through transformers' `get_json_schema`.
- The schemas enter the prompt one way only: the system message ends with `TOOLS_HEADER` and one compact JSON line
  per schema (a system message holding just that is made when the chat has none).
- An assistant message may hold "tool_calls": [{"type": "function", "function": {"name", "arguments"}}]
  (arguments a dict, or its JSON text); each is written `<|tool_call|>{"name": ..., "arguments": {...}}` after the
  message's text, and learnt like the rest of the assistant's words.
- A {"role": "tool", "name": ..., "content": ...} message carries a result, text and images as in a user message:
  `<|tool|> content <|end|>`, never learnt. Its text is data: control-token look-alikes in it stay characters.
- A parameter of type image ({"type": "image"}: a `PIL.Image.Image` type hint) takes the number of a picture in the
  conversation, 1 for the first, counting the pictures tools returned; the function receives that picture.

Safety: only the functions passed in can run. An unknown name, arguments that are not JSON or break the schema, an
exception, a time-out, or a result that is not text or a readable picture of bounded size becomes a tool message
that starts with `ERROR_PREFIX`, which the model reads and answers after; the caller never sees a crash.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable

from PIL import Image
from transformers.utils import get_json_schema

from mmgpt.images import ImageBytes, ImageError, load_image

TOOLS_HEADER = "Tools you can call:"
ERROR_PREFIX = "error: "
MAX_RESULT_CHARS = 2000  # a tool's text beyond this is cut (and says so): a result must leave room for the answer
MAX_RESULT_PIXELS = 16_000_000  # one returned picture, decoded, as the demo's upload cap
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict}


class ToolError(ValueError):
    """A tool definition or a call record that cannot be used."""


def tool_schema(tool: Callable | dict) -> dict:
    """A function (through `get_json_schema`) or a schema, in the {"type": "function", "function": {...}} form."""
    if callable(tool):
        try:
            return get_json_schema(tool)
        except Exception as error:  # transformers raises its own exception types for untyped or undocumented tools
            raise ToolError(f"tool {getattr(tool, '__name__', tool)!r} cannot be described: {error}") from None
    if not isinstance(tool, dict):
        raise ToolError(f"a tool must be a function or a JSON schema dict, got {type(tool).__name__}")
    function = tool.get("function", tool)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ToolError(f"a tool schema needs a 'name': {json.dumps(tool)[:80]}")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or not isinstance(parameters.get("properties", {}), dict):
        raise ToolError(f"tool {function['name']!r}: 'parameters' must be a JSON schema object")
    return {"type": "function", "function": dict(function, parameters=parameters)}


def tools_text(schemas: list[dict]) -> str:
    """The block that ends the system message: the header, then one compact JSON schema per line."""
    return "\n".join([TOOLS_HEADER, *(json.dumps(schema, separators=(",", ":")) for schema in schemas)])


def call_text(name: str, arguments: dict | str) -> str:
    """What the model writes after <|tool_call|>. A call the model wrote that was not JSON is kept as it was
    (recorded with an empty name and its text as the arguments), so that the prompt shows what it wrote."""
    if not name and isinstance(arguments, str):
        return arguments
    return json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"))


def read_call(call: Any, where: str) -> tuple[str, dict | str]:
    """(name, arguments) of one entry of a message's "tool_calls" (OpenAI's or transformers' form)."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ToolError(f"{where}: a tool call must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}")
    name, arguments = function["name"], function.get("arguments", {})
    if isinstance(arguments, str) and name:
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise ToolError(f"{where}: tool call {name!r} has arguments that are not JSON ({error.msg})") from None
    if not isinstance(arguments, dict) and name:
        raise ToolError(f"{where}: tool call {name!r} needs its arguments as an object")
    if not name and not isinstance(arguments, str):
        raise ToolError(f"{where}: a tool call needs a name")
    return name, arguments


def parse_call(text: str) -> tuple[str, dict]:
    """The model's call text -> (name, arguments); `ToolError` says what is wrong with it."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError as error:
        raise ToolError(f"the call is not JSON ({error.msg}): {text[:80]!r}") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ToolError(f'the call must be {{"name": ..., "arguments": {{...}}}}, got {text[:80]!r}')
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ToolError(f"the arguments of {call['name']!r} must be an object, got {json.dumps(arguments)[:60]}")
    return call["name"], arguments


def check_arguments(schema: dict, arguments: dict, pictures: int) -> None:
    """Arguments against the schema's parameters: required present, nothing unknown, each of its type and enum."""
    parameters = schema["function"]["parameters"]
    properties = parameters.get("properties", {})
    name = schema["function"]["name"]
    missing = [key for key in parameters.get("required", []) if key not in arguments]
    if missing:
        raise ToolError(f"{name}: missing argument(s) {', '.join(missing)}")
    for key, value in arguments.items():
        if key not in properties:
            raise ToolError(f"{name}: unknown argument {key!r} (it takes {', '.join(properties) or 'none'})")
        expected = properties[key].get("type")
        if expected == "image":
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= pictures:
                raise ToolError(f"{name}: {key} must be the number of a picture in the conversation, 1 to {pictures}, "
                                f"got {json.dumps(value)}")
            continue
        kinds = JSON_TYPES.get(expected)
        if kinds is not None and (not isinstance(value, kinds) or isinstance(value, bool) and expected != "boolean"):
            raise ToolError(f"{name}: {key} must be of type {expected}, got {json.dumps(value)[:40]}")
        if "enum" in properties[key] and value not in properties[key]["enum"]:
            raise ToolError(f"{name}: {key} must be one of {json.dumps(properties[key]['enum'])}, got {json.dumps(value)[:40]}")


class Toolbox:
    """The functions a caller passed, by name: the only ones a model's call can run."""

    def __init__(self, tools: list[Callable], timeout: float = 10.0):
        if not isinstance(tools, (list, tuple)) or not all(callable(tool) for tool in tools):
            raise ToolError("tools must be a list of Python functions (each described by its type hints and docstring)")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise ValueError(f"tool_timeout must be a number of seconds above 0, got {timeout!r}")
        self.schemas = [tool_schema(tool) for tool in tools]
        self.functions = {schema["function"]["name"]: (schema, tool) for schema, tool in zip(self.schemas, tools)}
        if len(self.functions) != len(tools):
            raise ToolError("two tools have the same name")
        self.timeout = timeout

    def call_record(self, text: str) -> dict:
        """The assistant message's entry for a call the model wrote (kept verbatim if it is not JSON)."""
        try:
            name, arguments = parse_call(text)
        except ToolError:
            name, arguments = "", text
        return {"type": "function", "function": {"name": name, "arguments": arguments}}

    def run(self, text: str, pictures: list) -> dict:
        """Run the call the model wrote (`pictures`: the conversation's, in order, as paths, bytes or PIL images);
        the tool message with its result, or with what went wrong."""
        try:
            name, arguments = parse_call(text)
        except ToolError as error:
            return _error_message("", str(error))
        if name not in self.functions:
            return _error_message(name, f"there is no tool {name!r} (tools: {', '.join(self.functions)})")
        schema, function = self.functions[name]
        try:
            check_arguments(schema, arguments, len(pictures))
        except ToolError as error:
            return _error_message(name, str(error))
        properties = schema["function"]["parameters"].get("properties", {})
        try:
            values = {key: load_image(pictures[value - 1]) if properties[key].get("type") == "image" else value
                      for key, value in arguments.items()}
        except ImageError as error:
            return _error_message(name, str(error))
        outcome: dict[str, Any] = {}

        def call() -> None:
            try:
                outcome["value"] = function(**values)
            except BaseException as error:  # the tool's failure is reported to the model, not raised
                outcome["error"] = error

        worker = threading.Thread(target=call, daemon=True, name=f"tool-{name}")
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            return _error_message(name, f"{name} took more than {self.timeout:g} s and was abandoned")
        if "error" in outcome:
            error = outcome["error"]
            return _error_message(name, f"{name} failed: {type(error).__name__}: {error}")
        try:
            content = result_content(outcome["value"])
        except (ImageError, ToolError) as error:
            return _error_message(name, f"{name} returned {error}")
        return {"role": "tool", "name": name, "content": content}


def _error_message(name: str, reason: str) -> dict:
    return {"role": "tool", "name": name, "content": [{"type": "text", "text": ERROR_PREFIX + reason}]}


def result_content(value: Any) -> list[dict]:
    """A tool's return value -> message content: text, pictures (PIL images or encoded bytes, each checked as any
    image is), or a list of these; anything else as JSON. Text beyond `MAX_RESULT_CHARS` is cut and says so."""
    items: list[dict] = []
    for part in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(part, (Image.Image, bytes, bytearray)):
            source = ImageBytes(bytes(part), "the tool's picture") if isinstance(part, (bytes, bytearray)) else part
            try:
                picture = load_image(source, max_pixels=MAX_RESULT_PIXELS)
            except ImageError as error:
                raise ImageError(f"a picture that cannot be used: {error}") from None
            items.append({"type": "image", "image": picture})
            continue
        text = part if isinstance(part, str) else _as_json(part)
        if len(text) > MAX_RESULT_CHARS:
            text = text[:MAX_RESULT_CHARS] + f" [cut: {len(text) - MAX_RESULT_CHARS} more characters]"
        items.append({"type": "text", "text": text})
    if not items or all(item["type"] == "text" and not item["text"].strip() for item in items):
        return [{"type": "text", "text": "(no output)"}]
    return items


def _as_json(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)

