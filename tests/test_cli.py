"""End to end through the console script, as a user runs it: data -> train -> eval -> chat."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_LFM2, TINY_OVERRIDES, training_episodes

ROOT = Path(__file__).resolve().parents[1]


def mmgpt(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "mmgpt.cli", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    return result


@pytest.mark.slow
def test_data_train_eval_chat_from_the_command_line(tmp_path):
    made = mmgpt("data", "shapes", "--out", "shapes", "--train", "40", "--eval", "10", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "shapes" / "train.jsonl").is_file() and (tmp_path / "shapes" / "eval.jsonl").is_file()

    train_command = ("train", str(ROOT / "configs" / "tiny-shapes.yaml"), "--set", *TINY_OVERRIDES,
                     "--set", "output_dir=run", "data.train=shapes/train.jsonl", "data.eval=shapes/eval.jsonl",
                     "train.max_steps=4", "train.save_every=2")
    trained = mmgpt(*train_command, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert any("eval_loss" in m for m in metrics)
    assert (tmp_path / "run" / "loss.png").is_file()

    evaluated = mmgpt("eval", "run/final", "--data", "shapes/eval.jsonl", "--out", "preds.jsonl", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert report["n"] == 10 and 0 <= report["accuracy"] <= 1 and 0 <= report["blind_accuracy"] <= 1
    assert len((tmp_path / "preds.jsonl").read_text().splitlines()) == 10

    image = sorted((tmp_path / "shapes" / "images").glob("eval*.png"))[0]
    chatted = mmgpt("chat", "run/final", "--image", str(image), "What colour is the circle?",
                    "--max-new-tokens", "4", cwd=tmp_path)
    assert chatted.returncode == 0, chatted.stderr

    rerun = mmgpt(*train_command, cwd=tmp_path)  # the same command again: already finished, nothing redone
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stdout and "step 4" in rerun.stdout
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == len(metrics)


def test_unknown_config_key_is_reported_by_name(tmp_path):
    result = mmgpt("train", str(ROOT / "configs" / "tiny-shapes.yaml"), "--set", "train.learning_rate=1", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown config key 'train.learning_rate'" in result.stderr


def test_missing_image_in_data_is_reported_with_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"content": [{"type": "image", "image": "nope.png"}]}\n')
    result = mmgpt("train", str(ROOT / "configs" / "tiny-shapes.yaml"), "--set", "data.train=bad.jsonl", cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.jsonl line 1" in result.stderr and "nope.png" in result.stderr and "not found" in result.stderr


@pytest.mark.slow
def test_few_shot_eval_on_held_out_episodes_from_the_command_line(tmp_path):
    made = mmgpt("data", "shapes", "--out", "icl", "--train", "20", "--eval", "7", "--episodes", "20",
                 "--eval-episodes", "2", "--per-way", "3", "--episode-ways", "2,3", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    episode_ways = {len({part["text"] for part in r["content"] if part["type"] == "text"})
                    for r in training_episodes(tmp_path / "icl")}
    assert episode_ways == {2, 3}
    assert "episodes-eval.jsonl (12 records)" in made.stdout and "episodes-eval-5way.jsonl (30 records)" in made.stdout
    trained = mmgpt("train", str(ROOT / "configs" / "tiny-icl.yaml"), "--set", *TINY_OVERRIDES, TINY_LFM2, "--set",
                    "output_dir=run", "data.train=icl/train.jsonl", "data.eval=", "train.max_steps=3", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr

    evaluated = mmgpt("eval", "run/final", "--data", "icl/episodes-eval.jsonl", "icl/episodes-eval-lengths.jsonl",
                      "--shots", "0,1,2", "--out", "preds.jsonl", "--plot", "few-shot.png", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    lines = evaluated.stdout.strip().splitlines()
    assert lines[0].split() == ["kind", "shots", "accuracy", "blind", "n"]
    results = json.loads(lines[-1])
    assert [(Path(r["data"]).name, r["shots"]) for r in results] == [
        (name, shots) for name in ("episodes-eval.jsonl", "episodes-eval-lengths.jsonl") for shots in (0, 1, 2)]
    assert all(r["n"] == 12 for r in results)
    rows = [tuple(line.rsplit(None, 4)[i] for i in (0, 1, 4)) for line in lines[1:-2]]
    assert rows == [("2-way, new pairings", str(shots), "12") for shots in (0, 1, 2)] + [
        (kind, str(shots), "6") for shots in (0, 1, 2) for kind in ("2-way, 1 syllable", "2-way, 3 syllables")]
    predictions = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert sorted(p["shots"] for p in predictions) == [0] * 24 + [1] * 24 + [2] * 24
    assert (tmp_path / "few-shot.png").read_bytes()[:4] == b"\x89PNG"

    one = mmgpt("eval", "run/final", "--data", "icl/eval.jsonl", "--shots", "2", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout.strip().splitlines()[-1])["shots"] == 2

    too_many = mmgpt("eval", "run/final", "--data", "icl/episodes-eval.jsonl", "--shots", "3", cwd=tmp_path)
    assert too_many.returncode == 2 and "too few other examples per answer for 3 shots" in too_many.stderr
    bad = mmgpt("eval", "run/final", "--data", "icl/eval.jsonl", "--shots", "1,x", cwd=tmp_path)
    assert bad.returncode == 2 and "--shots takes whole numbers" in bad.stderr


def test_errors_are_one_line_naming_the_file_and_debug_shows_the_traceback(tiny, tmp_path):
    processor, model = tiny
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    plain = mmgpt("chat", str(folder), "hi", cwd=tmp_path)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        f"mmgpt chat: error: ValueError: {weights} cannot be read: Error while deserializing header: invalid header "
        "length (--debug shows the traceback)"]
    for debug in (mmgpt("--debug", "chat", str(folder), "hi", cwd=tmp_path),
                  subprocess.run([sys.executable, "-m", "mmgpt.cli", "chat", str(folder), "hi"], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=600, env={**os.environ, "MMGPT_DEBUG": "1"})):
        assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
        assert debug.stderr.strip().splitlines()[-1].startswith(f"mmgpt chat: error: ValueError: {weights}")

    (tmp_path / "taken").write_text("a file, not a folder")
    exists = mmgpt("data", "shapes", "--out", "taken", "--train", "4", "--eval", "2", cwd=tmp_path)
    assert exists.returncode == 2 and "Traceback" not in exists.stderr
    assert "FileExistsError: [Errno 17] File exists: 'taken'" in exists.stderr

    zero = mmgpt("eval", str(folder), "--data", "x.jsonl", "--batch-size", "0", cwd=tmp_path)
    assert zero.returncode == 2 and "--batch-size: expects a whole number of at least 1, got '0'" in zero.stderr
    ways = mmgpt("data", "shapes", "--out", "w", "--episode-ways", "2,x", cwd=tmp_path)
    assert ways.returncode == 2 and "--episode-ways takes whole numbers separated by commas" in ways.stderr


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied", "/runs/final/model.safetensors"),
                                   TypeError("expected str, bytes or os.PathLike object, not NoneType")])
def test_any_user_error_is_one_line(error, monkeypatch, capsys):
    from mmgpt import cli

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr("mmgpt.inference.MMGPT.from_pretrained", fail)
    assert cli.main(["chat", "somewhere", "hi"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"mmgpt chat: error: {type(error).__name__}: {error} (--debug shows the traceback)"]
