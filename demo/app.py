"""Gradio demo: image-grounded multi-turn chat in the browser, over the public inference API only.

    python demo/app.py runs/tiny-shapes/final          (or: mmgpt demo [CHECKPOINT])
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
from PIL import Image
from python_multipart.multipart import parse_options_header
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse

from mmgpt import MMGPT, ContextTooLongError, ImageError, load_image
from mmgpt.data.tool_chats import zoom
from mmgpt.images import ImageTransform
from mmgpt.tools import tool_schema

NOTICE = "Notice: "  # replies that start with this are the demo talking, not the model: never fed back as context
IMAGE_RECEIVED = NOTICE + "Image received. Now ask a question about it."  # the one notice whose message stays
MAX_FILE_BYTES = 5 * 1024 * 1024  # one upload
MAX_IMAGES_PER_MESSAGE = 4
MAX_IMAGE_PIXELS = 16_000_000  # one picture, decoded: a 12-Mpx phone photo fits, a 9000x9000 PNG does not
MAX_CHAT_PIXELS = 64_000_000  # every picture of one chat, decoded
TOOLS = [zoom]  # offered when the tools switch is on: the shapes world's quadrant zoom
TOOL_SCHEMAS = [tool_schema(tool) for tool in TOOLS]
MAX_TOOL_CALLS = 4
UPLOAD_CACHE_BYTES = 256 * 1024 * 1024  # this demo's stored uploads; beyond it uploads wait for the cleanup
CACHE_CLEANUP = (300, 3600)  # every 5 minutes delete uploads older than an hour; all of them at shutdown
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
IMAGE_KINDS = "PNG, JPEG, GIF, WebP or BMP"
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


class ChatImages:
    """Each uploaded picture decoded once and kept at the model's input size: a chat's history then costs
    kilobytes, a follow-up question decodes nothing, and the server's memory does not grow with megapixels."""

    def __init__(self, transform: ImageTransform, capacity: int = 512):
        self.transform = transform
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[Image.Image, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._decoding = threading.Lock()

    def pixels(self, path: str) -> int:
        """Decoded size of a picture, from its header alone (or from the cache). Raises `ImageError`."""
        with self._lock:
            if path in self._items:
                return self._items[path][1]
        try:
            with warnings.catch_warnings():  # a huge size is refused by the demo's own cap, from this header
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    return image.size[0] * image.size[1]
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ImageError(f"image '{Path(path).name}' cannot be read: {error}") from None

    def small(self, path: str) -> Image.Image:
        """The picture at the model's input size. Raises `ImageError`."""
        with self._lock:
            if path in self._items:
                self._items.move_to_end(path)
                return self._items[path][0]
        with self._decoding:  # one full-size picture in memory at a time, however many chats send them
            picture = load_image(path, max_pixels=MAX_IMAGE_PIXELS)
            entry = (self.transform.small(picture), picture.size[0] * picture.size[1])
            del picture
        with self._lock:
            self._items[path] = entry
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return entry[0]


def _parts(content: Any) -> list[tuple[str, str]]:
    """A Gradio chat message's content as [("text", ...) | ("file", path)], whatever form Gradio gave it in."""
    if isinstance(content, str):
        return [("text", content)]
    if isinstance(content, tuple):  # (path,) or (path, alt text): a file
        return [("file", content[0])] if content else []
    if isinstance(content, dict):
        if content.get("type") == "text":
            return [("text", content.get("text", ""))]
        path = content.get("path") or (content.get("file") or {}).get("path")
        return [("file", path)] if path else []
    if isinstance(content, list):
        return [part for item in content for part in _parts(item)]
    return []


def context_turns(history: list[dict]) -> list[tuple[str, list[tuple[str, str]]]]:
    """What of a Gradio history the model should see: [(role, parts)], consecutive user messages merged.

    A message the demo refused (answered with a notice) is left out with its notice, so one refused message never
    joins later ones; a picture sent alone ("Image received") waits for the question that follows it. Tool calls
    shown in the chat are left out: a later turn sees the answers, not the zoomed pictures behind them.
    """
    turns: list[tuple[str, list[tuple[str, str]]]] = []
    waiting: list[tuple[str, str]] = []  # user parts acknowledged, not yet answered
    pending: list[tuple[str, str]] = []  # user parts since the last reply
    for message in history:
        if (message.get("metadata") or {}).get("title"):
            continue  # a tool call shown to the user: the model gets the answer it led to, not the call again
        parts = _parts(message.get("content"))
        if message.get("role") == "user":
            pending += parts
            continue
        if message.get("role") != "assistant":
            continue
        reply = "".join(value for kind, value in parts if kind == "text").split("\n\n" + NOTICE)[0]
        if reply == IMAGE_RECEIVED:
            waiting, pending = waiting + pending, []
        elif reply.startswith(NOTICE) or not reply:
            pending = []
        else:
            turns += [("user", waiting + pending), ("assistant", [("text", reply)])]
            waiting, pending = [], []
    if waiting + pending:
        turns.append(("user", waiting + pending))
    return turns


def responder(model: MMGPT):
    """The chat function: streams the reply to the new message, or a notice when the input cannot be answered."""
    images = ChatImages(model.processor.transform)

    def refusal(files: list[str], earlier: list[tuple[str, list[tuple[str, str]]]]) -> str | None:
        """Why the new message cannot go to the model, checked from file headers before any picture is decoded."""
        if len(files) > MAX_IMAGES_PER_MESSAGE:
            return f"{len(files)} images in one message; the demo takes at most {MAX_IMAGES_PER_MESSAGE}. Please send fewer."
        pixels = 0
        for path in files:
            try:
                size = images.pixels(path)
            except ImageError:
                return f"Could not read {Path(path).name} as an image (only {IMAGE_KINDS}). Please attach another image."
            if size > MAX_IMAGE_PIXELS:
                return (f"{Path(path).name} is {size / 1e6:.0f} megapixels; the demo takes pictures of up to "
                        f"{MAX_IMAGE_PIXELS / 1e6:.0f}. Please send a smaller version.")
            pixels += size
        for _, parts in earlier:
            for kind, path in parts:
                if kind == "file":
                    try:
                        pixels += images.pixels(path)
                    except ImageError:
                        pass  # gone from the upload cache: it will be left out below
        if pixels > MAX_CHAT_PIXELS:
            return (f"with this message the chat would hold {pixels / 1e6:.0f} megapixels of pictures; a chat takes up "
                    f"to {MAX_CHAT_PIXELS / 1e6:.0f}. Clear the chat to send more pictures.")
        return None

    def to_messages(turns: list[tuple[str, list[tuple[str, str]]]]) -> list[dict]:
        messages = []
        for role, parts in turns:
            items = []
            for kind, value in parts:
                if kind == "text":
                    items.append({"type": "text", "text": value})
                    continue
                try:
                    items.append({"type": "image", "image": images.small(value)})
                except ImageError:
                    continue  # an earlier picture no longer in the upload cache (it was accepted when sent)
            if items:
                messages.append({"role": role, "content": items})
        return messages

    def respond(message: dict, history: list[dict], temperature: float, top_p: float, max_new_tokens: int,
                system_prompt: str = model.processor.system_prompt, use_tools: bool = False) -> Iterator[str | list]:
        text = (message.get("text") or "").strip()
        files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
        if not text and not files:
            yield NOTICE + "Type a question, or attach an image and ask about it."
            return
        earlier = context_turns(history)
        problem = refusal(files, earlier)
        if problem:
            yield NOTICE + problem + " (This message was not sent to the model.)"
            return
        new_parts = [("file", path) for path in files] + ([("text", text)] if text else [])
        if earlier and earlier[-1][0] == "user":
            earlier[-1] = ("user", earlier[-1][1] + new_parts)
        else:
            earlier.append(("user", new_parts))
        for path in files:
            try:
                images.small(path)  # decoded once here, kept small for every later turn
            except ImageError:
                yield NOTICE + (f"Could not read {Path(path).name} as an image (only {IMAGE_KINDS}). Please attach "
                                "another image. (This message was not sent to the model.)")
                return
        system = [{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else []
        messages = system + to_messages(earlier)
        if not text:
            yield IMAGE_RECEIVED
            return
        try:
            prompt = model.prompt(messages, int(max_new_tokens), tools=TOOL_SCHEMAS if use_tools else None)
        except ContextTooLongError as error:
            yield (NOTICE + f"this message is too long for the model ({error}). It was not sent; shorten it and try "
                   "again, the chat goes on without it.")
            return
        note = (f"\n\n{NOTICE}the {prompt.dropped} oldest messages no longer fit the context and were left out."
                if prompt.dropped else "")
        settings = dict(max_new_tokens=int(max_new_tokens), do_sample=temperature > 0,
                        temperature=max(temperature, 1e-5), top_p=top_p, stream=True)
        answer = ""
        if not use_tools:
            for piece in model.chat(prompt, **settings):
                answer += piece
                yield answer
            yield (answer.strip() or NOTICE + "the model gave an empty answer.") + note
            return
        shown: list = []  # each call, titled, with what the tool returned
        calls: list[dict] = []
        try:
            for event in model.chat(messages, tools=TOOLS, max_tool_calls=MAX_TOOL_CALLS, **settings):
                if isinstance(event, str):
                    answer += event
                    yield [*shown, answer]
                elif event["role"] == "assistant":
                    calls, answer = [dict(call["function"], note=event["content"]) for call in event["tool_calls"]], ""
                else:
                    shown.append(tool_message(calls.pop(0) if calls else {}, event))
                    yield shown
        except ContextTooLongError as error:  # the tools' results filled the context before the model answered
            yield [*shown, NOTICE + f"the tools' results no longer fit the model's context ({error}); ask again "
                                    "with the tools switched off."]
            return
        yield [*shown, (answer.strip() or NOTICE + "the model gave an empty answer.") + note]

    return respond


def tool_message(call: dict, result: dict) -> gr.ChatMessage:
    """One tool call as the chat shows it: a collapsible "used zoom" titled with the call's arguments, holding the
    picture (or the text) the tool returned."""
    arguments = call.get("arguments")
    shown = ", ".join(f"{key}={value}" for key, value in arguments.items()) if isinstance(arguments, dict) else arguments
    title = f"used {call.get('name') or 'a tool'}" + (f" ({shown})" if shown else "")
    pictures = [part["image"] for part in result["content"] if part["type"] == "image"]
    text = " ".join(part["text"] for part in result["content"] if part["type"] == "text")
    content = gr.Image(pictures[0], show_label=False, height=128) if pictures else text
    metadata = {"title": title, "status": "done"}
    if call.get("note"):
        metadata["log"] = call["note"]
    return gr.ChatMessage(content=content, metadata=metadata)


class UploadGate:
    """ASGI middleware in front of Gradio's upload route: only pictures are stored, and only so many bytes.

    Gradio writes every upload to its cache before any component sees it and judges files by name alone; here
    the request is read first (its size capped), every file in it must start with an image format's signature,
    and this demo's stored uploads must have room. Otherwise nothing is stored: 415, 413 or 507 with the reason.
    """

    def __init__(self, app: Any, max_body: int = MAX_IMAGES_PER_MESSAGE * MAX_FILE_BYTES + 65536,
                 cache_bytes: int = UPLOAD_CACHE_BYTES, concurrent: int = 4):
        self.app, self.max_body, self.cache_bytes = app, max_body, cache_bytes
        self.reading = asyncio.Semaphore(concurrent)  # bounds the memory that request bodies in flight take

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/upload"):
            return await self.app(scope, receive, send)
        content_type, options = parse_options_header(dict(scope["headers"]).get(b"content-type", b""))
        if content_type != b"multipart/form-data" or b"boundary" not in options:
            return await self.app(scope, receive, send)  # Gradio refuses it itself
        async with self.reading:
            body, size = [], 0
            while True:
                event = await receive()
                if event["type"] == "http.disconnect":
                    return
                body.append(event.get("body", b""))
                size += len(body[-1])
                if size > self.max_body:
                    return await self._refuse(scope, receive, send, 413, f"An upload takes at most "
                                              f"{MAX_IMAGES_PER_MESSAGE} images of up to {MAX_FILE_BYTES // 2**20} MB.")
                if not event.get("more_body", False):
                    break
        data = b"".join(body)
        heads = [part.partition(b"\r\n\r\n")[2][:16] for part in data.split(b"--" + options[b"boundary"])[1:-1]
                 if b"filename=" in part.partition(b"\r\n\r\n")[0].lower()]
        if not all(head.startswith(IMAGE_SIGNATURES) or head[:4] == b"RIFF" and head[8:12] == b"WEBP" for head in heads):
            return await self._refuse(scope, receive, send, 415, f"Only images ({IMAGE_KINDS}) can be uploaded.")
        if self._stored(scope) + len(data) > self.cache_bytes:
            return await self._refuse(scope, receive, send, 507, "The demo's upload space is full; please try again "
                                                                 "in a few minutes.")
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": data, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    def _stored(scope: dict) -> int:
        """Bytes of this demo's uploads still on disk."""
        total = 0
        for path in list(scope["app"].get_blocks().upload_file_set):
            with contextlib.suppress(OSError):
                total += os.path.getsize(path)
        return total

    @staticmethod
    async def _refuse(scope: dict, receive: Any, send: Any, status: int, reason: str) -> None:
        await PlainTextResponse(reason, status_code=status)(scope, receive, send)


def build_app(model: MMGPT, checkpoint: str, tools: bool = False) -> gr.Blocks:
    system = model.processor.system_prompt
    can_call = model.processor.special.tool is not None
    tools = tools and can_call
    examples = [
        [{"text": "What colour is the circle?", "files": [str(EXAMPLES_DIR / "shapes1.png")]}, 0.0, 1.0, 16, system, tools],
        [{"text": "How many shapes are there?", "files": [str(EXAMPLES_DIR / "shapes2.png")]}, 0.0, 1.0, 16, system, tools],
        [{"text": "Is there a red square?", "files": [str(EXAMPLES_DIR / "shapes3.png")]}, 0.0, 1.0, 16, system, tools],
    ]
    with gr.Blocks(title="mmgpt", delete_cache=CACHE_CLEANUP) as app:
        gr.Markdown(f"## mmgpt\nImage-grounded chat. Checkpoint loaded: `{checkpoint}`")
        with gr.Accordion("system prompt", open=False):
            system_prompt = gr.Textbox(
                system, lines=2, label="system prompt", placeholder="none (this model was trained without one)",
                info="Sent first in every chat; the default is the one the model was trained under (empty: none). "
                     "A model trained with system rules follows it over the user's words: learnt behaviour, not a "
                     "security boundary.")
        use_tools = gr.Checkbox(
            tools, label="tools: zoom", interactive=can_call,
            info="Let the model call zoom (one quadrant of your picture, enlarged) before it answers; each call shows "
                 "in the chat. For models trained with zoom chats (README, \"Tool use\")." if can_call else
                 "This model was saved before tool use: it has no tool tokens.")
        gr.ChatInterface(
            responder(model),
            multimodal=True,
            textbox=gr.MultimodalTextbox(file_types=["image"], file_count="multiple", sources=["upload"],
                                         placeholder="Ask about an image: attach, paste or drop it here"),
            chatbot=gr.Chatbot(height=420, label="chat"),
            additional_inputs=[
                gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)", render=False),
                gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p", render=False),
                gr.Slider(1, 128, value=32, step=1, label="max new tokens", render=False),
                system_prompt,
                use_tools,
            ],
            additional_inputs_accordion="generation settings",
            examples=examples,
            flagging_mode="never",
            api_name="chat",
            concurrency_limit=2,
            fill_height=False,
        )
    return app


def launch(model: MMGPT, checkpoint: str, host: str = "127.0.0.1", port: int = 7860, open_browser: bool = False,
           block: bool = True, upload_cache_bytes: int = UPLOAD_CACHE_BYTES, tools: bool = False) -> gr.Blocks:
    """Serve the demo: bounded queue, two chats at a time, only pictures uploaded and their bytes and pixels capped,
    no files served but Gradio's uploads, and those deleted after an hour and at shutdown. `tools`: the tools
    switch starts on."""
    app = build_app(model, checkpoint, tools)
    app.queue(max_size=32, default_concurrency_limit=2)
    app.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_BYTES, inbrowser=open_browser,
               show_error=False, share=False, prevent_thread_lock=not block, quiet=not block,
               app_kwargs={"middleware": [Middleware(UploadGate, cache_bytes=upload_cache_bytes)]})
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="mmgpt web demo")
    parser.add_argument("checkpoint", help="a saved model folder, e.g. runs/tiny-shapes/final")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--tools", action="store_true", help="start with the tools switch on")
    args = parser.parse_args(argv)
    launch(MMGPT.from_pretrained(args.checkpoint), args.checkpoint, args.host, args.port, tools=args.tools)


if __name__ == "__main__":
    main()
