"""Peak memory of the web demo's server under a burst of large pictures, and the time of the text follow-ups.

    python benchmarks/demo_memory.py runs/tiny-shapes/final [--app demo/app.py] [--chats 2] [--repeats 3]

The server runs in its own process (`python APP CHECKPOINT --port P`), so its peak resident memory (VmHWM) is its
own. Two bursts, each sent by `--chats` users at once through the HTTP API (gradio_client), every user then asking
three text follow-ups in the same chat:
  huge:  4 PNGs of 9000x9000 (0.27 MB on disk each, 81 Mpx decoded) in one message;
  large: 4 PNGs of 4000x3000 (12 Mpx decoded each) in one message.
`--app` takes another checkout's demo/app.py, to compare before and after a change on the same burst.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
BURSTS = {"huge": (9000, 9000), "large": (4000, 3000)}
FOLLOW_UPS = ["What colour is the circle?", "How many shapes are there?", "Is there a red square?"]


def picture(path: Path, size: tuple[int, int]) -> Path:
    """A white picture with a few flat shapes: compresses to a small file, decodes to width x height x 3 bytes."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.ellipse((width // 10, height // 10, width // 3, height // 3), fill="red")
    draw.rectangle((width // 2, height // 2, width * 4 // 5, height * 4 // 5), fill="blue")
    image.save(path)
    return path


def memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """The demo in its own process, on a free port of this machine."""

    def __init__(self, app: Path, checkpoint: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process = subprocess.Popen([sys.executable, str(app), str(checkpoint), "--port", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the demo exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise TimeoutError(f"the demo did not answer at {self.url} within {timeout} s")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def chat(url: str, files: list[Path]) -> tuple[str, list[float], list[str]]:
    """One user: the pictures with a question, then the text follow-ups; (first reply, follow-up seconds, replies)."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    try:
        first = str(client.predict({"text": "What is in these pictures?", "files": [handle_file(str(f)) for f in files]},
                                   0.0, 1.0, 8, api_name="/chat"))
    except Exception as error:  # an upload refused by the server is an answer too
        first = f"refused: {type(error).__name__}: {str(error)[:120]}"
    seconds, replies = [], []
    for question in FOLLOW_UPS:
        start = time.perf_counter()
        replies.append(str(client.predict({"text": question, "files": []}, 0.0, 1.0, 8, api_name="/chat")))
        seconds.append(time.perf_counter() - start)
    return first, seconds, replies


def burst(server: Server, files: list[Path], chats: int) -> dict:
    """Every user at once; the server's resident memory before, and its peak after."""
    before = memory_kb(server.process.pid)
    with ThreadPoolExecutor(max_workers=chats) as pool:
        results = list(pool.map(lambda _: chat(server.url, files), range(chats)))
    after = memory_kb(server.process.pid)
    follow_ups = [s for _, seconds, _ in results for s in seconds]
    return {"rss_before_mb": before["VmRSS"] / 1024, "peak_mb": after["VmHWM"] / 1024,
            "follow_up_median_s": statistics.median(follow_ups), "follow_up_max_s": max(follow_ups),
            "first_replies": [first[:100] for first, _, _ in results]}


def measure(app: Path, checkpoint: Path, kind: str, chats: int, folder: Path) -> dict:
    """One fresh server, a warm-up chat about a small picture, then the burst."""
    files = [picture(folder / f"{kind}-{index}.png", BURSTS[kind]) for index in range(4)]
    small = picture(folder / "small.png", (64, 64))
    server = Server(app, checkpoint)
    try:
        server.wait()
        chat(server.url, [small])
        return burst(server, files, chats)
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--app", type=Path, default=ROOT / "demo" / "app.py")
    parser.add_argument("--chats", type=int, default=2, help="users sending the burst at once")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; app: {args.app}")
    with tempfile.TemporaryDirectory() as folder:
        for kind in BURSTS:
            runs = [measure(args.app, args.checkpoint, kind, args.chats, Path(folder)) for _ in range(args.repeats)]
            growth = [run["peak_mb"] - run["rss_before_mb"] for run in runs]
            follow = [run["follow_up_median_s"] for run in runs]
            print(f"{kind}: peak {statistics.median(r['peak_mb'] for r in runs):.0f} MB "
                  f"(+{statistics.median(growth):.0f} MB over {statistics.median(r['rss_before_mb'] for r in runs):.0f}, "
                  f"min +{min(growth):.0f}); text follow-up median {statistics.median(follow):.2f} s "
                  f"(min {min(follow):.2f}); first reply: {runs[0]['first_replies'][0]!r}")


if __name__ == "__main__":
    main()
