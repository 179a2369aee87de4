"""Streaming shards: written with images inside, read back as the same samples, split over processes and workers
with no duplicates, resumed exactly, and with start-up and memory that do not grow with the set."""

import subprocess
import sys
from pathlib import Path

import pytest

from mmgpt.cli import main
from mmgpt.data.formats import read_jsonl, read_samples
from mmgpt.data.shards import ShardStream, batches_from_worker, shard_index
from mmgpt.train import TrainingError, train

from conftest import TINY_OVERRIDES, losses, stop_at_step_3_and_resume, tiny_config
from test_formats import as_text

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-shapes.yaml"


def shard(source, out, size):
    assert main(["data", "shard", str(source), "--out", str(out), "--shard-size", str(size)]) == 0
    return out


def test_shards_hold_the_images_and_read_back_as_the_same_samples(shapes_dir, tmp_path):
    folder = shard(shapes_dir / "train.jsonl", tmp_path / "shards", 8)
    assert shard_index(folder)["samples"] == 40 and len(shard_index(folder)["shards"]) == 5
    (shapes_dir / "images").rename(shapes_dir / "images-away")  # nothing may come from the original files
    try:
        samples, _ = read_samples(folder)
    finally:
        (shapes_dir / "images-away").rename(shapes_dir / "images")
    assert as_text(samples) == as_text(read_jsonl(shapes_dir / "train.jsonl")[0])


def test_every_sample_once_an_epoch_across_processes_and_workers(shapes_dir, tmp_path):
    folder = shard(shapes_dir / "train.jsonl", tmp_path / "shards", 4)  # 10 shards
    sizes = {shard["name"]: shard["samples"] for shard in shard_index(folder)["shards"]}
    seen = []
    for stream in range(4):  # 2 processes x 2 workers
        reader = ShardStream(folder, None, seed=3, buffer=5, micro_batch=1, consumed_batches=0)
        import torch

        order = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 100_003)).tolist()
        per_epoch = sum(sizes[reader.shards[i].name] for i in order[stream::4])
        samples = reader._samples(stream, 4)
        seen += [next(samples).source for _ in range(per_epoch)]
    assert sorted(seen) == sorted(s.source for s in read_samples(folder)[0])
    assert [batches_from_worker(7, w, 3) for w in range(3)] == [3, 2, 2]


def test_stream_resumes_exactly_with_workers(shapes_dir, tmp_path):
    folder = shard(shapes_dir / "train.jsonl", tmp_path / "shards", 8)
    overrides = [f"data.train={folder}", "train.max_steps=6", "train.save_every=100", "train.num_workers=2",
                 "data.shuffle_buffer=6", "model.text.config.resid_pdrop=0.1"]

    stop_at_step_3_and_resume(lambda: tiny_config(shapes_dir, tmp_path / "resumed", *overrides))
    train(tiny_config(shapes_dir, tmp_path / "straight", *overrides))
    assert len(losses(tmp_path / "resumed")) == 6
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    with pytest.raises(TrainingError, match="read its data as 2 stream.*would read 1"):
        train(tiny_config(shapes_dir, tmp_path / "resumed", *overrides, "train.max_steps=8", "train.num_workers=0"))


def test_fewer_shards_than_streams_is_a_clear_error(shapes_dir, tmp_path):
    folder = shard(shapes_dir / "train.jsonl", tmp_path / "shards", 40)  # one shard
    with pytest.raises(Exception, match=r"1 shard\(s\) for 2 streams .*--shard-size"):
        train(tiny_config(shapes_dir, tmp_path / "run", f"data.train={folder}", "train.max_steps=1",
                          "train.num_workers=2", "data.eval="))


@pytest.mark.parametrize("setting", ["data.augment_shift=2", "data.cache_pictures_mb=64"])
def test_settings_for_a_set_read_whole_are_refused_for_a_stream(shapes_dir, tmp_path, setting):
    folder = shard(shapes_dir / "train.jsonl", tmp_path / "shards", 40)
    with pytest.raises(Exception, match=f"^{setting.split('=')[0]}: for a training set read whole .*not for a stream of shards"):
        train(tiny_config(shapes_dir, tmp_path / "run", f"data.train={folder}", "train.max_steps=1", "data.eval=",
                          setting))


def first_step(folder, init_from, output_dir):
    """Peak RSS in MB of `mmgpt train` on `folder` up to its first step."""
    command = [sys.executable, "-m", "mmgpt.cli", "train", str(CONFIG), "--set", *TINY_OVERRIDES,
               f"data.train={folder}", "data.eval=", f"model.init_from={init_from}", "train.max_steps=1",
               "train.num_workers=1", f"output_dir={output_dir}"]
    probe = (f"import resource, subprocess; "
             f"subprocess.run({command!r}, check=True, capture_output=True); "
             f"print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    output = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=300)
    return float(output.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_ten_times_the_data_trains_in_the_same_memory(shapes_dir, tmp_path):
    """Streamed shards: 10x the samples, the same peak memory. (Start-up time is not asserted: wall times on these
    shared cores vary by a third from run to run, and timings belong in benchmarks.)"""
    records = (shapes_dir / "train.jsonl").read_text().splitlines()
    for name, copies in (("small", 50), ("large", 500)):  # 2,000 and 20,000 samples
        (shapes_dir / f"{name}.jsonl").write_text("\n".join(records * copies) + "\n")
        shard(shapes_dir / f"{name}.jsonl", tmp_path / name, 1000)
    model = train(tiny_config(shapes_dir, tmp_path / "model", "train.max_steps=1", "data.eval=")).final_dir
    figures = {name: first_step(tmp_path / name, model, tmp_path / f"run-{name}") for name in ("small", "large")}
    assert shard_index(tmp_path / "large")["samples"] == 10 * shard_index(tmp_path / "small")["samples"]
    assert figures["large"] <= 1.10 * figures["small"], figures
