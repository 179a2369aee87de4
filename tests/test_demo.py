"""The web demo in a real browser (Chromium driven by Playwright) and under concurrent API load."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from mmgpt import MMGPT
from mmgpt.train import train

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
QUESTIONS = [("What colour is the circle?", "red"), ("How many shapes are there?", "two")]


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
        {"role": "user", "content": [{"type": "image", "image": "demo_picture.png"}, {"type": "text", "text": QUESTIONS[0][0]}]},
        {"role": "assistant", "content": QUESTIONS[0][1]},
        {"role": "user", "content": QUESTIONS[1][0]},
        {"role": "assistant", "content": QUESTIONS[1][1]}]}
    data = folder / "demo_chat.jsonl"
    data.write_text((json.dumps(chat) + "\n") * 4)
    run = tmp_path_factory.mktemp("demo-run")
    config = tiny_config(folder, run, f"data.train={data}", "data.eval=", "train.max_steps=120", "train.lr=5e-3",
                         "train.min_lr_ratio=1.0", "train.warmup_steps=5", "train.save_every=1000")
    final = train(config).final_dir
    module = load_app_module()
    port = free_port()
    app = module.launch(MMGPT.from_pretrained(final, device="cpu"), str(final), port=port, block=False)
    yield {"url": f"http://127.0.0.1:{port}/", "image": folder / "demo_picture.png", "app": app}
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
        textbox = page.locator("textarea").first
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

        send("What is this?", [not_an_image])
        expect(bot).to_have_count(3, timeout=60_000)
        expect(bot.nth(2)).to_contain_text("Could not read notes.png", timeout=60_000)
        send(QUESTIONS[1][0])
        expect(bot).to_have_count(4, timeout=60_000)
        expect(bot.nth(3)).to_contain_text(QUESTIONS[1][1], timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "demo-after-bad-file.png"), full_page=True)
        browser.close()


def test_eight_concurrent_api_requests_are_all_answered(served):
    from gradio_client import Client, handle_file

    def ask(index: int) -> str:
        client = Client(served["url"], verbose=False)  # one client per user: each has its own conversation
        message = {"text": QUESTIONS[0][0], "files": [handle_file(str(served["image"]))]}
        return client.predict(message, 0.0, 1.0, 8, api_name="/chat")

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

    big = b"\x89PNG" + b"\0" * (6 * 1024 * 1024)
    response = httpx.post(served["url"] + "gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=60)
    assert response.status_code == 413
    small = httpx.post(served["url"] + "gradio_api/upload", files={"files": ("ok.png", b"\x89PNG", "image/png")}, timeout=60)
    assert small.status_code == 200


@pytest.fixture(scope="module")
def respond(tiny):
    processor, model = tiny
    return load_app_module().responder(MMGPT(model, processor))


def last(replies) -> str:
    return list(replies)[-1]


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
        "bomb": ({"text": "what?", "files": [str(bomb)]}, "Could not read bomb.png"),
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
