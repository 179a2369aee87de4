"""Training faults: kills, interrupted or failing checkpoint writes, NaN steps, tampered checkpoints."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmgpt import checkpoint
from mmgpt.config import load_config
from mmgpt.modeling import MMGPTForConditionalGeneration
from mmgpt.train import TrainingError, train

from conftest import TINY_OVERRIDES, tiny_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-shapes.yaml"


def losses(output_dir):
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.slow
def test_sigkill_mid_run_then_same_command_resumes_with_identical_losses(shapes_dir, tmp_path):
    settings = [*TINY_OVERRIDES, f"data.train={shapes_dir / 'train.jsonl'}", "data.eval=", "train.max_steps=60",
                "train.save_every=10"]
    command = [sys.executable, "-m", "mmgpt.cli", "train", str(CONFIG), "--set", *settings,
               f"output_dir={tmp_path / 'killed'}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint.list_checkpoints(tmp_path / "killed") or checkpoint.list_checkpoints(tmp_path / "killed")[-1][0] < 20:
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "final").exists()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stdout
    train(load_config(CONFIG, [*settings, f"output_dir={tmp_path / 'straight'}"]))  # the same run, never stopped
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_the_same_command_resumes(shapes_dir, tmp_path):
    """What `docker stop` or a scheduler sends, reaching the training process and its decoding workers alike."""
    settings = [*TINY_OVERRIDES, f"data.train={shapes_dir / 'train.jsonl'}", "data.eval=", "train.max_steps=400",
                "train.save_every=1000", "train.num_workers=1", f"output_dir={tmp_path}"]
    command = [sys.executable, "-m", "mmgpt.cli", "train", str(CONFIG), "--set", *settings]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.time() + 300
    while not (tmp_path / "metrics.jsonl").is_file() or len((tmp_path / "metrics.jsonl").read_text().splitlines()) < 3:
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output[-2000:]
    assert "checkpoint saved. Run the same command again to resume" in output
    [(step, _)] = checkpoint.list_checkpoints(tmp_path)
    assert step == len(losses(tmp_path))
    command[command.index("train.max_steps=400")] = f"train.max_steps={step + 2}"
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and f"resuming from {checkpoint.checkpoints_dir(tmp_path) / f'step-{step}'}" in rerun.stdout


def test_half_written_checkpoints_are_never_taken(shapes_dir, tmp_path):
    config = tiny_config(shapes_dir, tmp_path, "train.max_steps=4", "train.save_every=2", "data.eval=")
    train(config)
    folder = checkpoint.checkpoints_dir(tmp_path)
    # what a kill during a write leaves: a temporary folder, and a step folder without its state file
    (folder / ".tmp-step-6-123").mkdir()
    (folder / ".tmp-step-6-123" / "model.safetensors").write_bytes(b"partial")
    (folder / "step-8").mkdir()
    (folder / "step-8" / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.latest_checkpoint(tmp_path) == folder / "step-4"


def test_error_while_saving_keeps_the_previous_checkpoint(shapes_dir, tmp_path, monkeypatch):
    config = tiny_config(shapes_dir, tmp_path, "train.max_steps=6", "train.save_every=2", "data.eval=")
    from accelerate import Accelerator

    real_save = Accelerator.save_state
    calls = []

    def failing_save(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            real_save(self, output_dir, **kwargs)  # a partial write, then the disk is full
            raise OSError(28, "No space left on device")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", failing_save)
    with pytest.raises(TrainingError, match=r"step 4: \[Errno 28\] No space left.*step-2 is intact"):
        train(config)
    assert [step for step, _ in checkpoint.list_checkpoints(tmp_path)] == [2]
    assert not list(checkpoint.checkpoints_dir(tmp_path).glob(".tmp-*"))
    assert checkpoint.load_trainer_state(checkpoint.checkpoints_dir(tmp_path) / "step-2")["step"] == 2


def test_nan_steps_are_skipped_counted_and_stop_the_run(shapes_dir, tmp_path, monkeypatch):
    real_forward = MMGPTForConditionalGeneration.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        output = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if output.loss is not None and calls["n"] in (2, 5, 6, 7):
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(MMGPTForConditionalGeneration, "forward", forward)
    config = tiny_config(shapes_dir, tmp_path, "train.max_steps=20", "train.save_every=4", "train.max_bad_steps=3",
                         "data.eval=")
    with pytest.raises(TrainingError, match="3 steps in a row had a NaN/inf loss") as stopped:
        train(config)
    named = re.search(r"The last good checkpoint is (\S+):", str(stopped.value)).group(1)
    assert Path(named).is_dir() and Path(named).name == "step-4"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in records] == [0, 1, 1, 1, 2, 3, 4]
    assert [step for step, _ in checkpoint.list_checkpoints(tmp_path)] == [4]
    weights = checkpoint.checkpoints_dir(tmp_path) / "step-4" / "model.safetensors"
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(weights).values())


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = ""


def test_checkpoint_with_a_malicious_pickle_is_refused_and_the_payload_never_runs(shapes_dir, tmp_path):
    global MARKER
    MARKER = str(tmp_path / "pwned")
    config = tiny_config(shapes_dir, tmp_path / "run", "train.max_steps=4", "train.save_every=2", "data.eval=")
    train(config)
    latest = checkpoint.latest_checkpoint(tmp_path / "run")
    with open(latest / "random_states_0.pkl", "wb") as handle:
        pickle.dump({"random_state": Payload()}, handle)
    (tmp_path / "run" / "final").rename(tmp_path / "old-final")
    config.train.max_steps = 6
    with pytest.raises(ValueError, match="refusing to load .*random_states_0.pkl"):
        train(config)
    assert not Path(MARKER).exists()
    torch.save({"state": Payload()}, latest / "random_states_0.pkl")
    with pytest.raises(ValueError, match="refusing to load"):
        train(config)
    assert not Path(MARKER).exists()
    (latest / "random_states_0.pkl").unlink()
    torch.save({"state": Payload()}, latest / "optimizer.bin")
    with pytest.raises(ValueError, match=r"refusing to load .*optimizer.bin: .*it holds posix.system") as refused:
        train(config)
    assert not Path(MARKER).exists() and "weights_only" not in str(refused.value)


def saved_model(tiny, folder: Path) -> Path:
    processor, model = tiny
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def edit_json(path: Path, **changes) -> None:
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize("file, changes, message", [
    ("config.json", {"image_token_id": 99999}, r"config.json: image_token_id 99999 is outside the decoder's vocabulary"),
    ("config.json", {"image_token_id": 5}, r"config.json: image_token_id 5 is the tokenizer's '<\|system\|>', not '<\|image\|>'"),
    ("config.json", {"image_token_id": 300}, r"config.json: image_token_id 300 is the tokenizer's '.*', not '<\|image\|>'"),
    ("mmgpt_processor.json", {"num_image_tokens": 7}, r"mmgpt_processor.json: num_image_tokens is 7 but the model in "
                                                      r"config.json makes 16 tokens of each image"),
    ("mmgpt_processor.json", {"image_size": [64, 64]}, r"mmgpt_processor.json: image_size is \[64, 64\] but the model's "
                                                       r"ViT in config.json takes \[32, 32\]"),
    ("mmgpt_processor.json", {"image_size": "big"}, r"mmgpt_processor.json: a field has the wrong form"),
])
def test_saved_parts_that_disagree_are_refused_at_load_naming_the_file_and_field(tiny, tmp_path, file, changes, message):
    from mmgpt import MMGPT

    folder = saved_model(tiny, tmp_path / "model")
    edit_json(folder / file, **changes)
    with pytest.raises(ValueError, match=message):
        MMGPT.from_pretrained(folder, device="cpu")


def test_a_checkpoint_whose_parts_disagree_is_refused_on_resume(shapes_dir, tmp_path):
    config = tiny_config(shapes_dir, tmp_path / "run", "train.max_steps=2", "train.save_every=2", "data.eval=")
    train(config)
    edit_json(checkpoint.latest_checkpoint(tmp_path / "run") / "mmgpt_processor.json", num_image_tokens=3)
    (tmp_path / "run" / "final").rename(tmp_path / "old-final")
    config.train.max_steps = 4
    with pytest.raises(ValueError, match=r"step-2/mmgpt_processor.json: num_image_tokens is 3"):
        train(config)
