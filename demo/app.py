"""Gradio demo: image-grounded multi-turn chat in the browser, over the public inference API only.

    python demo/app.py runs/tiny-shapes/final          (or: mmgpt demo [CHECKPOINT])
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from mmgpt import MMGPT, ContextTooLongError, ImageError, load_image

NOTICE = "Notice: "  # replies that start with this are the demo talking, not the model: never fed back as context
MAX_FILE_SIZE = "5mb"
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


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


def to_messages(history: list[dict], text: str, files: list[str]) -> tuple[list[dict], list[str]]:
    """Gradio history + the new message -> mmgpt chat messages; also the names of images that could not be read.

    Consecutive user messages merge into one turn; notices from the demo and unreadable images are left out.
    """
    messages: list[dict] = []
    unreadable: list[str] = []

    def add(role: str, items: list[dict]) -> None:
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += items
        else:
            messages.append({"role": role, "content": items})

    def image_item(path: str) -> list[dict]:
        try:
            return [{"type": "image", "image": load_image(path)}]
        except ImageError:
            unreadable.append(Path(path).name)
            return []

    for message in history:
        role = message.get("role")
        parts = _parts(message.get("content"))
        if role == "assistant":
            reply = "".join(value for kind, value in parts if kind == "text").split("\n\n" + NOTICE)[0]
            if reply and not reply.startswith(NOTICE):
                add("assistant", [{"type": "text", "text": reply}])
        elif role == "user":
            items = []
            for kind, value in parts:
                items += image_item(value) if kind == "file" else [{"type": "text", "text": value}]
            if items:
                add("user", items)
    unreadable.clear()  # earlier turns' bad files were reported when they were sent
    new_items = [item for path in files for item in image_item(path)]
    if text:
        new_items.append({"type": "text", "text": text})
    if new_items:
        add("user", new_items)
    return messages, unreadable


def responder(model: MMGPT):
    """The chat function: streams the reply to the new message, or a notice when the input cannot be answered."""

    def respond(message: dict, history: list[dict], temperature: float, top_p: float, max_new_tokens: int) -> Iterator[str]:
        text = (message.get("text") or "").strip()
        files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
        if not text and not files:
            yield NOTICE + "Type a question, or attach an image and ask about it."
            return
        messages, unreadable = to_messages(history, text, files)
        if unreadable:
            yield NOTICE + f"Could not read {', '.join(unreadable)} as an image (only PNG, JPEG, GIF, WebP, BMP under the size limit). Please attach another image."
            return
        if not text:
            yield NOTICE + "Image received. Now ask a question about it."
            return
        try:
            messages, dropped = model.fit_to_context(messages, int(max_new_tokens))
        except ContextTooLongError as error:
            yield NOTICE + f"This message is too long for the model: {error}. Clear the chat or send less."
            return
        note = f"\n\n{NOTICE}the {dropped} oldest messages no longer fit the context and were left out." if dropped else ""
        answer = ""
        for piece in model.chat(messages, max_new_tokens=int(max_new_tokens), do_sample=temperature > 0,
                                temperature=max(temperature, 1e-5), top_p=top_p, stream=True):
            answer += piece
            yield answer
        yield (answer.strip() or NOTICE + "the model gave an empty answer.") + note

    return respond


def build_app(model: MMGPT, checkpoint: str) -> gr.Blocks:
    examples = [
        [{"text": "What colour is the circle?", "files": [str(EXAMPLES_DIR / "shapes1.png")]}, 0.0, 1.0, 16],
        [{"text": "How many shapes are there?", "files": [str(EXAMPLES_DIR / "shapes2.png")]}, 0.0, 1.0, 16],
        [{"text": "Is there a red square?", "files": [str(EXAMPLES_DIR / "shapes3.png")]}, 0.0, 1.0, 16],
    ]
    with gr.Blocks(title="mmgpt") as app:
        gr.Markdown(f"## mmgpt\nImage-grounded chat. Checkpoint loaded: `{checkpoint}`")
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
           block: bool = True) -> gr.Blocks:
    """Serve the demo: bounded queue, two chats at a time, uploads capped, no files served but Gradio's uploads."""
    app = build_app(model, checkpoint)
    app.queue(max_size=32, default_concurrency_limit=2)
    app.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, inbrowser=open_browser,
               show_error=False, share=False, prevent_thread_lock=not block, quiet=not block)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="mmgpt web demo")
    parser.add_argument("checkpoint", help="a saved model folder, e.g. runs/tiny-shapes/final")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    launch(MMGPT.from_pretrained(args.checkpoint), args.checkpoint, args.host, args.port)


if __name__ == "__main__":
    main()
