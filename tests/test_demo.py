"""The web demo in a real browser (Chromium driven by Playwright) and under concurrent API load."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmgpt import MMGPT
from mmgpt.data.rules import DEFAULT_SYSTEM_PROMPT
from mmgpt.data.tool_chats import ZOOM_SCHEMA, zoom
from mmgpt.train import train

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
QUESTIONS = [("What colour is the circle?", "red"), ("How many shapes are there?", "two")]
TOOL_QUESTION = ("Look closer at the top left.", "done looking")


def load_app_module():
    spec = importlib.util.spec_from_file_location("mmgpt_demo_app", ROOT / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(shapes_dir, tmp_path_factory):
    """A tiny model taught one two-question chat about one picture, served on 127.0.0.1."""
    folder = shapes_dir
    image = sorted((folder / "images").glob("train*.png"))[0]
    Image.open(image).save(folder / "demo_picture.png")
    chat = {"messages": [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image", "image": "demo_picture.png"}, {"type": "text", "text": QUESTIONS[0][0]}]},
        {"role": "assistant", "content": QUESTIONS[0][1]},
        {"role": "user", "content": QUESTIONS[1][0]},
        {"role": "assistant", "content": QUESTIONS[1][1]}]}
    small = Image.open(image).convert("RGB").resize((32, 32))  # what the demo keeps of a picture: the model's size
    zoom(small, "top left").save(folder / "demo_zoomed.png")
    tool_chat = {"tools": [ZOOM_SCHEMA], "messages": [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image", "image": "demo_picture.png"},
                                     {"type": "text", "text": TOOL_QUESTION[0]}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "zoom", "arguments": {"image": 1, "region": "top left"}}}]},
        {"role": "tool", "name": "zoom", "content": [{"type": "image", "image": "demo_zoomed.png"}]},
        {"role": "assistant", "content": TOOL_QUESTION[1]}]}
    data = folder / "demo_chat.jsonl"
    data.write_text((json.dumps(chat) + "\n" + json.dumps(tool_chat) + "\n") * 4)
    run = tmp_path_factory.mktemp("demo-run")
    config = tiny_config(folder, run, f"data.train={data}", "data.eval=", "train.max_steps=120", "train.lr=5e-3",
                         "train.min_lr_ratio=1.0", "train.warmup_steps=5", "train.save_every=1000",
                         f"model.system_prompt={DEFAULT_SYSTEM_PROMPT}", "model.text.config.n_positions=512")
    final = train(config).final_dir
    assert MMGPT.from_pretrained(final, device="cpu").processor.system_prompt == DEFAULT_SYSTEM_PROMPT  # saved with it
    module = load_app_module()
    port = free_port()
    app = module.launch(MMGPT.from_pretrained(final, device="cpu"), str(final), port=port, block=False)
    yield {"url": f"http://127.0.0.1:{port}/", "image": folder / "demo_picture.png", "app": app, "checkpoint": final}
    app.close()


def test_demo_binds_loopback_by_default(served):
    assert served["app"].server_name == "127.0.0.1"  # launched without a host: this machine only


def test_chat_in_a_real_browser(served, tmp_path):
    if not Path(CHROMIUM).exists():
        reason = "Chromium is not installed at /usr/bin/chromium: `apt-get install chromium` (.ci/run does this)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text, not a picture")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(served["url"])
        textbox = page.locator("textarea").last  # the message box: the system prompt's comes before it
        expect(textbox).to_be_visible(timeout=30_000)
        expect(page.get_by_text("Checkpoint loaded")).to_be_visible()
        bot = page.locator('[data-testid="bot"]')

        def send(text: str, files: list[Path] = ()) -> None:
            if files:
                page.locator('input[type="file"]').first.set_input_files([str(f) for f in files])
                page.wait_for_timeout(500)
            textbox.fill(text)
            textbox.press("Enter")

        send(QUESTIONS[0][0], [served["image"]])
        submitted = time.perf_counter()
        expect(bot).to_have_count(1, timeout=60_000)
        expect(bot.nth(0)).not_to_have_text("", timeout=60_000)
        first_token_s = time.perf_counter() - submitted
        expect(bot.nth(0)).to_contain_text(QUESTIONS[0][1], timeout=60_000)
        (ARTIFACTS / "demo-timing.json").write_text(json.dumps({"submit_to_first_token_s": round(first_token_s, 3)}))
        send(QUESTIONS[1][0])
        expect(bot).to_have_count(2, timeout=60_000)
        expect(bot.nth(1)).to_contain_text(QUESTIONS[1][1], timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "demo-chat.png"), full_page=True)
        page.get_by_text("system prompt").first.click()  # the collapsed field opens, holding the model's own
        system_box = page.get_by_label("system prompt")
        expect(system_box).to_have_value(DEFAULT_SYSTEM_PROMPT, timeout=30_000)
        system_box.fill("Answer in capitals.")
        expect(system_box).to_have_value("Answer in capitals.")

        page.locator('input[type="file"]').first.set_input_files([str(not_an_image)])  # refused before it is stored
        expect(page.get_by_text("Only images (PNG, JPEG, GIF, WebP or BMP) can be uploaded")).to_be_visible(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "demo-after-bad-file.png"), full_page=True)
        send("word " * 400)  # a paste the context cannot hold: refused, and kept out of what follows
        expect(bot).to_have_count(3, timeout=60_000)
        expect(bot.nth(2)).to_contain_text("this message is too long for the model", timeout=60_000)
        send(QUESTIONS[1][0])  # answered by the model (before, the refused paste joined it and it was refused too)
        expect(bot).to_have_count(4, timeout=60_000)
        expect(bot.nth(3)).to_have_text(re.compile(r"^(?!Notice)\s*\w"), timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "demo-after-refused-message.png"), full_page=True)

        page = browser.new_page()  # a new chat, with the tools switch on: the model calls zoom, the chat shows it
        page.goto(served["url"])
        textbox = page.locator("textarea").last
        expect(textbox).to_be_visible(timeout=30_000)
        page.get_by_label("tools: zoom").check()
        page.locator('input[type="file"]').first.set_input_files([str(served["image"])])
        page.wait_for_timeout(500)
        textbox.fill(TOOL_QUESTION[0])
        textbox.press("Enter")
        expect(page.get_by_text("used zoom (image=1, region=top left)")).to_be_visible(timeout=60_000)
        expect(page.locator('[data-testid="bot"]').last).to_contain_text(TOOL_QUESTION[1], timeout=60_000)
        page.get_by_text("used zoom (image=1, region=top left)").click()  # the call opens on the zoomed picture
        expect(page.locator('[data-testid="bot"] img').first).to_be_visible(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "demo-tool-call.png"), full_page=True)
        browser.close()


def test_eight_concurrent_api_requests_are_all_answered(served):
    from gradio_client import Client, handle_file

    def ask(index: int) -> str:
        client = Client(served["url"], verbose=False)  # one client per user: each has its own conversation
        message = {"text": QUESTIONS[0][0], "files": [handle_file(str(served["image"]))]}
        return client.predict(message, 0.0, 1.0, 8, DEFAULT_SYSTEM_PROMPT, api_name="/chat")

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len(answers) == 8
    assert all(QUESTIONS[0][1] in str(answer) for answer in answers), answers


def test_files_outside_the_upload_cache_are_refused(served):
    import httpx

    secret = ROOT / "pyproject.toml"
    for path in ["/etc/passwd", str(secret), "../../../../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd"]:
        response = httpx.get(served["url"] + "gradio_api/file=" + path, timeout=30)
        assert response.status_code in (403, 404), (path, response.status_code)
        assert "root:" not in response.text and "[project]" not in response.text


def test_upload_over_the_size_limit_is_refused(served):
    import httpx

    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (6 * 1024 * 1024)
    response = httpx.post(served["url"] + "gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=60)
    assert response.status_code == 413
    picture = (ROOT / "demo" / "examples" / "shapes1.png").read_bytes()
    small = httpx.post(served["url"] + "gradio_api/upload", files={"files": ("ok.png", picture, "image/png")}, timeout=60)
    assert small.status_code == 200


@pytest.fixture(scope="module")
def respond(tiny):
    processor, model = tiny
    return load_app_module().responder(MMGPT(model, processor))


def last(replies) -> str:
    return list(replies)[-1]


def test_the_system_prompt_goes_first_and_an_empty_one_is_left_out(respond, tmp_path, monkeypatch):
    seen = []
    original = MMGPT.prompt
    monkeypatch.setattr(MMGPT, "prompt", lambda self, messages, *a, **k: (
        isinstance(messages, list) and seen.append(messages)) or original(self, messages, *a, **k))
    question = {"text": "What colour is the circle?", "files": []}
    last(respond(question, [], 0.0, 1.0, 4, "Answer in capitals."))
    last(respond(question, [], 0.0, 1.0, 4, "  "))
    last(respond(question, [], 0.0, 1.0, 4))  # the model's own, none here: it was trained without one
    assert seen[0][0] == {"role": "system", "content": "Answer in capitals."} and seen[0][1]["role"] == "user"
    assert [m["role"] for m in seen[1]] == [m["role"] for m in seen[2]] == ["user"]


def test_bad_inputs_get_a_message_and_the_next_message_works(respond, tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "good.png")
    good = str(tmp_path / "good.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "good.png").read_bytes()[:40])
    (tmp_path / "notes.png").write_text("not a picture")
    bomb = tmp_path / "bomb.png"
    Image.new("L", (13000, 13000)).save(bomb)  # 169 Mpx: over Pillow's decompression-bomb limit
    settings = (0.0, 1.0, 4)
    cases = {
        "empty": ({"text": "  ", "files": []}, "Type a question"),
        "image only": ({"text": "", "files": [good]}, "Now ask a question"),
        "not an image": ({"text": "what?", "files": [str(tmp_path / "notes.png")]}, "Could not read notes.png"),
        "truncated": ({"text": "what?", "files": [str(tmp_path / "cut.png")]}, "Could not read cut.png"),
        "bomb": ({"text": "what?", "files": [str(bomb)]}, "bomb.png is 169 megapixels"),
    }
    for name, (message, expected) in cases.items():
        assert expected in last(respond(message, [], *settings)), name
    history = [{"role": "user", "content": {"path": str(tmp_path / "notes.png")}},
               {"role": "user", "content": "what?"},
               {"role": "assistant", "content": "Notice: Could not read notes.png as an image"},
               {"role": "user", "content": {"path": good}}]
    answer = last(respond({"text": "What colour is it?", "files": []}, history, *settings))
    assert answer and not answer.startswith("Notice")


def test_long_conversation_drops_oldest_turns_and_says_so(respond, tmp_path):
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "blue.png")
    history = []
    for turn in range(40):
        history += [{"role": "user", "content": {"path": str(tmp_path / "blue.png")}},
                    {"role": "user", "content": f"question {turn} about the picture"},
                    {"role": "assistant", "content": "blue"}]
    reply = last(respond({"text": "and now?", "files": []}, history, 0.0, 1.0, 4))
    assert "oldest messages no longer fit the context" in reply


def test_a_refused_message_stays_out_of_the_chat(respond, tmp_path):
    """A paste too long for the context is refused; the questions after it are answered as if it had not been sent."""
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    history = [{"role": "user", "content": {"path": str(tmp_path / "red.png")}},
               {"role": "user", "content": "What colour is the circle?"},
               {"role": "assistant", "content": "red"}]
    paste = "word " * 400
    refused = last(respond({"text": paste, "files": []}, history, 0.0, 1.0, 4))
    assert refused.startswith("Notice: this message is too long") and "not sent" in refused and "send less" not in refused
    history += [{"role": "user", "content": paste}, {"role": "assistant", "content": refused}]
    for question in ["And now?", "What shape is it?"]:
        answer = last(respond({"text": question, "files": []}, history, 0.0, 1.0, 4))
        assert not answer.startswith("Notice"), answer
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_what_the_model_sees_of_a_history(tmp_path):
    module = load_app_module()
    picture = {"path": str(tmp_path / "a.png")}
    history = [{"role": "user", "content": picture},
               {"role": "assistant", "content": module.IMAGE_RECEIVED},
               {"role": "user", "content": "far too long"},
               {"role": "assistant", "content": "Notice: this message is too long for the model"},
               {"role": "user", "content": "What colour?"},
               {"role": "assistant", "content": "red\n\nNotice: the 2 oldest messages no longer fit"},
               {"role": "user", "content": "bad"},
               {"role": "assistant", "content": "Notice: Could not read x.png"},
               {"role": "user", "content": picture}]
    assert module.context_turns(history) == [
        ("user", [("file", picture["path"]), ("text", "What colour?")]),
        ("assistant", [("text", "red")]),
        ("user", [("file", picture["path"])]),
    ]


def test_a_picture_is_decoded_once_however_long_the_chat(tiny, tmp_path, monkeypatch):
    processor, model = tiny
    module = load_app_module()
    decoded = []
    real_load = module.load_image
    monkeypatch.setattr(module, "load_image", lambda path, **kwargs: decoded.append(path) or real_load(path, **kwargs))
    respond = module.responder(MMGPT(model, processor))
    Image.new("RGB", (300, 200), "green").save(tmp_path / "green.png")
    history = [{"role": "user", "content": {"path": str(tmp_path / "green.png")}}]
    history.append({"role": "assistant", "content": last(respond({"text": "", "files": [str(tmp_path / "green.png")]}, [], 0.0, 1.0, 4))})
    for question in ["What colour?", "How many?", "Where?"]:
        answer = last(respond({"text": question, "files": []}, history, 0.0, 1.0, 4))
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    assert decoded == [str(tmp_path / "green.png")]


def test_the_small_form_of_a_picture_gives_the_same_pixels(tiny):
    processor, _ = tiny
    picture = Image.effect_mandelbrot((300, 200), (-2, -1, 1, 1), 60).convert("RGB")
    small = processor.transform.small(picture)
    assert small.size == tuple(reversed(processor.transform.size))
    assert torch.equal(processor.transform(small), processor.transform(picture))


def test_pixel_caps_refuse_before_decoding(respond, tmp_path, monkeypatch):
    module = load_app_module()
    huge = tmp_path / "huge.png"
    Image.new("L", (9000, 9000)).save(huge)  # about 80 KB on disk, 81 Mpx decoded
    reply = last(respond({"text": "what?", "files": [str(huge)]}, [], 0.0, 1.0, 4))
    assert "huge.png is 81 megapixels" in reply and "not sent" in reply
    big = tmp_path / "big.png"
    Image.new("L", (4000, 3000)).save(big)  # 12 Mpx: fits one picture, five of them do not fit one chat
    history = []
    for _ in range(4):
        history += [{"role": "user", "content": {"path": str(big)}}, {"role": "user", "content": "and this?"},
                    {"role": "assistant", "content": "red"}]
    reply = last(respond({"text": "what?", "files": [str(big)] * 2}, history, 0.0, 1.0, 4))
    assert "the chat would hold 72 megapixels" in reply and "Clear the chat" in reply
    reply = last(respond({"text": "what?", "files": [str(tmp_path / "huge.png")] * 5}, [], 0.0, 1.0, 4))
    assert "at most 4" in reply


def test_only_pictures_are_stored_and_the_store_is_bounded_and_emptied_at_shutdown(served, tmp_path):
    import httpx

    module = load_app_module()
    model = MMGPT.from_pretrained(served["checkpoint"], device="cpu")
    port = free_port()
    app = module.launch(model, "test", port=port, block=False, upload_cache_bytes=300_000)
    url = f"http://127.0.0.1:{port}/gradio_api/upload"
    picture = (ROOT / "demo" / "examples" / "shapes1.png").read_bytes()
    try:
        for name, data in [("notes.png", b"this is text, not a picture"), ("script.sh", b"#!/bin/sh\nrm -rf /\n"),
                           ("mixed.png", None)]:
            files = ([("files", ("ok.png", picture, "image/png")), ("files", ("x.png", b"text", "image/png"))]
                     if data is None else {"files": (name, data, "image/png")})
            response = httpx.post(url, files=files, timeout=60)
            assert response.status_code == 415 and "Only images" in response.text, (name, response.status_code)
        assert not app.upload_file_set  # nothing of the refused uploads was stored
        stored = []
        while True:
            response = httpx.post(url, files={"files": (f"{len(stored)}.png", picture + bytes(len(stored)), "image/png")},
                                  timeout=60)
            if response.status_code != 200:
                break
            stored += response.json()
        assert response.status_code == 507 and "upload space is full" in response.text
        assert 0 < len(stored) and sum(Path(path).stat().st_size for path in stored) <= 300_000
    finally:
        app.close()
    assert not any(Path(path).exists() for path in stored)  # the uploads are deleted at shutdown


@pytest.mark.slow
def test_server_memory_stays_bounded_under_a_burst_of_huge_pictures(served, tmp_path):
    """The server in its own process; two users at once send four 81-Mpx PNGs (refused from their headers), then
    four 12-Mpx ones (decoded one at a time, kept small), each followed by three text questions in the same chat.
    Before the caps the first burst took the server from 1.0 to 5.0 GB."""
    spec = importlib.util.spec_from_file_location("demo_memory", ROOT / "benchmarks" / "demo_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for kind, refused in [("huge", True), ("large", False)]:
        result = bench.measure(ROOT / "demo" / "app.py", served["checkpoint"], kind, chats=2, folder=tmp_path)
        assert all(("81 megapixels" in reply) == refused for reply in result["first_replies"]), result
        assert result["peak_mb"] - result["rss_before_mb"] < 350, result
