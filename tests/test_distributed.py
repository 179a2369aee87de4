"""Many processes: `accelerate launch --cpu --num_processes 2` (gloo) trains what one process trains, step by step,
resumes after a kill, and hands its checkpoints to a different number of processes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmgpt import checkpoint
from mmgpt.build import build
from mmgpt.config import load_config
from mmgpt.data.formats import read_jsonl
from mmgpt.data.loader import batch_indices, split_for_process
from mmgpt.train import TrainingError, train

from conftest import TINY_LFM2, TINY_OVERRIDES

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-shapes.yaml"
LOSS_TOLERANCE = 1e-4  # relative: the same sums in another order (and other padding) on each side


def records(output_dir: Path, key: str) -> list[tuple[int, float]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


def settings(shapes_dir: Path, output_dir: Path, *overrides: str) -> list[str]:
    return [*TINY_OVERRIDES, f"data.train={shapes_dir / 'train.jsonl'}", f"data.eval={shapes_dir / 'eval.jsonl'}",
            "train.batch_size=8", "train.eval_every=3", "train.eval_batches=2", f"output_dir={output_dir}", *overrides]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(processes: int, overrides: list[str]) -> list[str]:
    """The README's multi-process command; on a machine without GPUs the processes talk over gloo."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "mmgpt.cli", "train", str(CONFIG), "--set", *overrides]


def run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores: one thread each
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def assert_close(left: list[tuple[int, float]], right: list[tuple[int, float]]) -> None:
    assert [step for step, _ in left] == [step for step, _ in right]
    for (step, a), (_, b) in zip(left, right):
        assert abs(a - b) <= LOSS_TOLERANCE * abs(b), f"step {step}: {a} vs {b}"


@pytest.fixture(scope="module")
def two_process_run(shapes_dir, tmp_path_factory):
    """6 steps on 2 processes with 2 accumulation steps each (global batch 8 = 2 x 2 x 2), checkpoints kept."""
    output_dir = tmp_path_factory.mktemp("two") / "run"
    overrides = settings(shapes_dir, output_dir, "train.max_steps=6", "train.grad_accum_steps=2",
                         "train.save_every=3", "train.keep_checkpoints=5")
    result = run(launch_command(2, overrides))
    return output_dir, result


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains_step_by_step(two_process_run, shapes_dir, tmp_path):
    two, result = two_process_run
    assert "MULTI_CPU: batch 8 = 2 process(es) x 2 accumulation step(s) x 2" in result.stdout
    one = tmp_path / "one"
    train(load_config(CONFIG, settings(shapes_dir, one, "train.max_steps=6", "train.save_every=3")))
    assert_close(records(two, "loss"), records(one, "loss"))
    assert_close(records(two, "grad_norm"), records(one, "grad_norm"))
    assert_close(records(two, "eval_loss"), records(one, "eval_loss"))
    assert [r for r in records(two, "supervised_tokens")] == records(one, "supervised_tokens")
    # only the main process writes: one line a step, one final model, no leftovers of the checkpoint writes
    assert [step for step, _ in records(two, "loss")] == [1, 2, 3, 4, 5, 6]
    assert (two / "final" / "model.safetensors").is_file() and (two / "loss.png").is_file()
    assert sorted(p.name for p in checkpoint.checkpoints_dir(two).iterdir()) == ["step-3", "step-6"]
    assert sorted(p.name for p in (checkpoint.checkpoints_dir(two) / "step-3").glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]  # every process saved its own RNG state


@pytest.mark.slow
@pytest.mark.parametrize("warmup", [0, 2])
def test_two_processes_with_the_answer_loss_train_what_one_process_trains(warmup, shapes_dir, tmp_path):
    """The answer head is a second model under DDP, and its loss shares the main loss's normaliser: 2 processes x 2
    accumulation steps make one process's steps, in the vision warm-up (the ViT run outside DDP) and after it."""
    extra = ["train.max_steps=4", "train.freeze=[]", "train.answer_loss_weight=1.0", "train.save_every=100",
             f"train.vision_warmup_steps={warmup}"]
    run(launch_command(2, settings(shapes_dir, tmp_path / "two", *extra, "train.grad_accum_steps=2")))
    train(load_config(CONFIG, settings(shapes_dir, tmp_path / "one", *extra)))
    for key in ("loss", "answer_loss", "grad_norm"):
        assert_close(records(tmp_path / "two", key), records(tmp_path / "one", key))


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_on_one(two_process_run, shapes_dir, tmp_path):
    two, _ = two_process_run
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(checkpoint.checkpoints_dir(resumed) / "step-6")
    result = run([sys.executable, "-m", "mmgpt.cli", "train", str(CONFIG), "--set",
                  *settings(shapes_dir, resumed, "train.max_steps=6", "train.save_every=3")])
    assert "resuming from" in result.stdout and "written by 2 process(es)" in result.stdout
    assert_close(records(resumed, "loss"), records(two, "loss"))


@pytest.mark.slow
def test_killed_two_process_run_resumes_with_identical_losses(shapes_dir, tmp_path):
    dropout = "model.text.config.resid_pdrop=0.1"  # each process's dropout stream must come back too
    killed = settings(shapes_dir, tmp_path / "killed", "train.max_steps=10", "train.save_every=2", dropout)
    command = launch_command(2, killed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    deadline = time.time() + 300
    while not checkpoint.list_checkpoints(tmp_path / "killed") or checkpoint.list_checkpoints(tmp_path / "killed")[-1][0] < 4:
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both workers, as a node failure would
    process.wait()
    assert not (tmp_path / "killed" / "final").exists()
    rerun = run(launch_command(2, killed))
    assert "resuming from" in rerun.stdout
    straight = settings(shapes_dir, tmp_path / "straight", "train.max_steps=10", "train.save_every=2", dropout)
    run(launch_command(2, straight))
    assert records(tmp_path / "killed", "loss") == records(tmp_path / "straight", "loss")


@pytest.mark.slow
def test_sigterm_saves_on_every_process_and_the_same_command_resumes(shapes_dir, tmp_path):
    overrides = settings(shapes_dir, tmp_path / "run", "train.max_steps=400", "train.save_every=1000", "data.eval=")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(launch_command(2, overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 3:
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)  # what docker stop and schedulers send, to every process
    output, _ = process.communicate(timeout=120)
    saved = checkpoint.list_checkpoints(tmp_path / "run")
    assert len(saved) == 1, output[-3000:]
    step, folder = saved[0]
    assert "checkpoint saved. Run the same command again to resume" in output
    assert sorted(p.name for p in folder.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert checkpoint.load_trainer_state(folder)["step"] == step == len(records(tmp_path / "run", "loss"))


def test_each_sample_is_seen_once_per_epoch_across_processes_and_accumulation():
    lengths = tuple((i * 37) % 101 for i in range(96))
    for processes, accum in [(1, 1), (2, 1), (2, 3), (4, 2)]:
        seen = []
        for step in range(96 // 24):
            batch = batch_indices(lengths, 24, seed=5, step=step)
            for rank in range(processes):
                micro_batches = split_for_process(batch, processes, accum, rank)
                assert len(micro_batches) == accum and all(len(m) == 24 // (processes * accum) for m in micro_batches)
                seen += [i for micro in micro_batches for i in micro]
        assert sorted(seen) == list(range(96)), (processes, accum)


def test_batch_that_does_not_split_over_processes_and_accumulation_is_a_clear_error(shapes_dir, tmp_path):
    config = load_config(CONFIG, settings(shapes_dir, tmp_path, "train.batch_size=6", "train.grad_accum_steps=4"))
    with pytest.raises(ValueError, match="train.batch_size 6 does not split evenly over 1 process.*multiple of 4"):
        train(config)


def test_sharded_checkpoint_on_another_layout_is_refused_with_the_reason(shapes_dir, tmp_path):
    config = load_config(CONFIG, settings(shapes_dir, tmp_path, "train.max_steps=2", "train.save_every=2"))
    train(config)
    folder = checkpoint.latest_checkpoint(tmp_path)
    state = checkpoint.load_trainer_state(folder)
    checkpoint.save_trainer_state(folder, {**state, "num_processes": 8, "distributed_type": "FSDP"})
    config.train.max_steps = 4
    with pytest.raises(TrainingError, match="written by 8 process.*under FSDP.*1 under NO.*layout that wrote them"):
        train(config)


@pytest.mark.slow
def test_fsdp_launch_without_gpus_is_refused_not_run_as_something_else(shapes_dir, tmp_path):
    command = launch_command(2, settings(shapes_dir, tmp_path / "run", "train.max_steps=2"))
    fsdp = [*command[:3], "--use_fsdp", "--fsdp_version", "2", *command[4:]]  # --multi_gpu -> --use_fsdp
    result = subprocess.run(fsdp, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "the launch asks for FSDP, which accelerate runs on GPUs only; this run would be MULTI_CPU" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


LLAMA = ("model.text.config={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 3, "
         "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 256}")


@pytest.mark.parametrize("decoder, layers", [(None, 2), (TINY_LFM2, 2), (LLAMA, 3)])
def test_fsdp_wraps_every_decoder_layer_and_vit_block_found_from_the_model(shapes_dir, tmp_path, decoder, layers):
    from accelerate.utils.dataclasses import get_module_class_from_name

    config = load_config(None, [*TINY_OVERRIDES, "model.vision.kwargs.depth=2", *([decoder] if decoder else [])])
    samples, _ = read_jsonl(shapes_dir / "train.jsonl")
    _, model = build(config.model, [seg.text for s in samples for t in s.turns for seg in t.segments if seg.text])
    classes = {get_module_class_from_name(model, name) for name in model._no_split_modules}  # what accelerate does
    assert None not in classes
    wrapped = [module for module in model.modules() if type(module) in classes]
    assert len(wrapped) == layers + 2  # every decoder layer and both ViT blocks, nothing else


@pytest.mark.slow
def test_checkpoint_of_one_process_resumes_on_two(shapes_dir, tmp_path):
    one = tmp_path / "one"
    train(load_config(CONFIG, settings(shapes_dir, one, "train.max_steps=6", "train.save_every=3",
                                       "train.keep_checkpoints=5")))
    resumed = tmp_path / "resumed"
    shutil.copytree(one, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(checkpoint.checkpoints_dir(resumed) / "step-6")
    result = run(launch_command(2, settings(shapes_dir, resumed, "train.max_steps=6", "train.save_every=3")))
    assert "resuming from" in result.stdout and "written by 1 process(es)" in result.stdout
    assert_close(records(resumed, "loss"), records(one, "loss"))
