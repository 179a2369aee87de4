"""The training loop: next-token loss on images + text, on accelerate (one CPU process or many GPUs).

Setup (model, data, optimizer) and checkpoint files live elsewhere; this file reads like the algorithm:
for each step, take the step's batches, forward, backward, clip, step, and now and then log, evaluate, save.
"""

from __future__ import annotations

import functools
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmgpt import checkpoint
from mmgpt.build import build
from mmgpt.config import Config
from mmgpt.data.collate import collate
from mmgpt.data.dataset import EncodedDataset
from mmgpt.data.records import read_jsonl
from mmgpt.modeling import MMGPTConfig, MMGPTForConditionalGeneration
from mmgpt.plot import plot_metrics
from mmgpt.processing import MMGPTProcessor

METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many NaN steps in a row); the last good checkpoint is kept."""


@dataclass
class TrainResult:
    final_dir: Path | None  # None when the run was interrupted before the end
    step: int


def mixed_precision_for(setting: str) -> str:
    """'auto' picks bf16 where the hardware computes it natively, else full precision."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else "no"


def batch_indices(lengths: tuple[int, ...], batch_size: int, seed: int, micro_step: int) -> list[int]:
    """The sample indices of global micro-batch `micro_step`, a pure function of its arguments (so resume is exact)."""
    per_epoch = len(lengths) // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the data set ({len(lengths)} samples)")
    epoch, position = divmod(micro_step, per_epoch)
    return _epoch_batches(lengths, batch_size, seed, epoch)[position]


@functools.lru_cache(maxsize=2)
def _epoch_batches(lengths: tuple[int, ...], batch_size: int, seed: int, epoch: int, group: int = 16) -> list[list[int]]:
    """One epoch's batches: a seeded shuffle, sorted by length within windows of `group` batches so a batch pads
    little, then the batches shuffled again. Cached: every step of the epoch reads it."""
    per_epoch = len(lengths) // batch_size
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator)[: per_epoch * batch_size].tolist()
    window = group * batch_size
    order = [i for start in range(0, len(order), window) for i in sorted(order[start : start + window], key=lengths.__getitem__)]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(per_epoch, generator=generator).tolist()]


def cosine_with_warmup(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def parameter_groups(model: MMGPTForConditionalGeneration, config: Config) -> list[dict]:
    """Freeze the named modules; give each trainable module its learning rate, no weight decay on 1-D weights."""
    modules = {"vision": model.vision, "projector": model.projector, "language_model": model.language_model}
    unknown = (set(config.train.freeze) | set(config.train.lr_multipliers)) - set(modules)
    if unknown:
        raise ValueError(f"unknown module name(s) {sorted(unknown)} in train.freeze/lr_multipliers; known: {sorted(modules)}")
    groups = []
    for name, module in modules.items():
        frozen = name in config.train.freeze
        module.requires_grad_(not frozen)
        if frozen:
            continue
        lr = config.train.lr * float(config.train.lr_multipliers.get(name, 1.0))
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups.append({"params": decay, "lr": lr, "weight_decay": config.train.weight_decay})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


class _StopFlag:
    """First Ctrl-C asks the loop to save and stop at the end of the step; a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def __enter__(self) -> "_StopFlag":
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


def _load_data(config: Config) -> tuple[list, list, list[str]]:
    train_samples, skipped = read_jsonl(config.data.train, config.data.skip_bad_records)
    eval_samples, eval_skipped = read_jsonl(config.data.eval, config.data.skip_bad_records) if config.data.eval else ([], [])
    return train_samples, eval_samples, skipped + eval_skipped


def _texts(samples: list) -> list[str]:
    return [segment.text for sample in samples for turn in sample.turns for segment in turn.segments if not segment.is_image]


def train(config: Config, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train per `config`, resuming from the newest checkpoint in `config.output_dir` if there is one."""
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(mixed_precision=mixed_precision_for(config.train.mixed_precision))
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    set_seed(config.seed)
    log = accelerator.print

    train_samples, eval_samples, skipped = _load_data(config)
    resume_from = checkpoint.latest_checkpoint(output_dir)
    if resume_from is not None:
        processor = MMGPTProcessor.from_pretrained(resume_from)
        model = MMGPTForConditionalGeneration(MMGPTConfig.from_pretrained(resume_from))
    else:
        processor, model = build(config.model, _texts(train_samples))
    max_length = config.data.max_length or model.config.text_config.max_position_embeddings
    train_set = EncodedDataset(train_samples, processor, max_length, config.data.skip_bad_records)
    eval_set = EncodedDataset(eval_samples, processor, max_length, config.data.skip_bad_records)
    skipped += train_set.skipped + eval_set.skipped
    if skipped:
        log(f"skipped {len(skipped)} bad record(s) (data.skip_bad_records=true); first: {skipped[0]}")
    log(
        f"data: {len(train_set)} training and {len(eval_set)} eval samples; "
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{model.num_image_tokens} tokens per image; precision: {accelerator.mixed_precision}"
    )

    optimizer = torch.optim.AdamW(parameter_groups(model, config), betas=(0.9, 0.95), fused=True)
    schedule = cosine_with_warmup(config.train.warmup_steps, config.train.max_steps, config.train.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step = 0
    if resume_from is not None:
        checkpoint.check_pickles(resume_from)
        accelerator.load_state(str(resume_from), load_kwargs={"weights_only": True})
        step = checkpoint.load_trainer_state(resume_from)["step"]
        log(f"resuming from {resume_from} (step {step})")
        if step >= config.train.max_steps and (output_dir / "final" / "model.safetensors").is_file():
            log(f"already finished: {step} of {config.train.max_steps} steps; the model is in {output_dir / 'final'}")
            return TrainResult(output_dir / "final", step)
    if accelerator.is_main_process:
        checkpoint.prune(output_dir, config.train.keep_checkpoints)
        _truncate_metrics(output_dir / METRICS_FILE, step)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

    def save_checkpoint() -> None:
        def write(folder: Path) -> None:
            accelerator.save_state(str(folder), safe_serialization=True)
            if accelerator.is_main_process:
                processor.save_pretrained(folder)
                accelerator.unwrap_model(model).config.save_pretrained(folder)
                checkpoint.save_trainer_state(folder, {"step": step, "samples_skipped": len(skipped)})

        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            try:
                checkpoint.write_atomically(checkpoint.checkpoints_dir(output_dir) / f"step-{step}", write)
            except OSError as error:
                previous = checkpoint.latest_checkpoint(output_dir)
                raise TrainingError(
                    f"could not save the checkpoint of step {step}: {error}. "
                    + (f"The previous checkpoint {previous} is intact; free space and run the same command to resume."
                       if previous else "No earlier checkpoint exists.")
                ) from error
            checkpoint.prune(output_dir, config.train.keep_checkpoints)
        accelerator.wait_for_everyone()

    def evaluate() -> float:
        model.eval()
        losses = []
        with torch.no_grad():
            for micro in range(min(config.train.eval_batches, len(eval_set) // config.train.batch_size or 1)):
                indices = list(range(micro * config.train.batch_size, min(len(eval_set), (micro + 1) * config.train.batch_size)))
                batch = collate([eval_set[i] for i in indices], processor.special.pad)
                with accelerator.autocast():
                    losses.append(model(**{k: v.to(accelerator.device) for k, v in batch.items()}).loss.item())
        model.train()
        return sum(losses) / len(losses)

    accum = config.train.grad_accum_steps
    world = accelerator.num_processes
    bad_in_a_row = 0
    bad_total = 0
    model.train()
    progress = tqdm(total=config.train.max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    started = time.perf_counter()
    first_step = step
    with _StopFlag() as stop:
        while step < config.train.max_steps:
            losses, tokens = [], 0
            for micro in range(accum):
                global_micro = (step * accum + micro) * world + accelerator.process_index
                indices = batch_indices(train_set.lengths, config.train.batch_size, config.seed, global_micro)
                batch = collate([train_set[i] for i in indices], processor.special.pad)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                tokens += int((batch["labels"] != -100).sum())
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    accelerator.backward(loss)
                    losses.append(loss.detach().float())
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
            mean_loss = float(torch.stack(losses).mean())
            finite = math.isfinite(mean_loss) and math.isfinite(float(grad_norm))
            if finite:
                optimizer.step()
                bad_in_a_row = 0
            else:
                bad_in_a_row += 1
                bad_total += 1
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}")

            record = {"step": step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "supervised_tokens": tokens, "bad_steps": bad_total}
            record["steps_per_s"] = (step - first_step) / (time.perf_counter() - started)
            _append_metrics(accelerator, output_dir, record)
            if eval_set and (step % config.train.eval_every == 0 or step == config.train.max_steps):
                eval_record = {"step": step, "eval_loss": evaluate()}
                _append_metrics(accelerator, output_dir, eval_record)
                progress.write(f"step {step}: eval loss {eval_record['eval_loss']:.4f}")
            if on_step is not None:
                on_step(step, record)
            if bad_in_a_row >= config.train.max_bad_steps:
                raise TrainingError(
                    f"{bad_in_a_row} steps in a row had a NaN/inf loss or gradient (step {step}); stopping. "
                    f"The last good checkpoint is kept in {checkpoint.checkpoints_dir(output_dir)}: lower train.lr "
                    "or check the data, then run the same command to resume."
                )
            if step % config.train.save_every == 0 and step < config.train.max_steps or stop.requested:
                save_checkpoint()
            if stop.requested:
                progress.close()
                log(f"interrupted at step {step}; checkpoint saved. Run the same command again to resume.")
                return TrainResult(None, step)
    progress.close()

    final_dir = output_dir / "final"
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)

        def write_final(folder: Path) -> None:
            unwrapped.save_pretrained(folder, safe_serialization=True)
            processor.save_pretrained(folder)

        checkpoint.write_atomically(final_dir, write_final)
        plot_metrics(output_dir / METRICS_FILE, output_dir / "loss.png")
    save_checkpoint()
    accelerator.wait_for_everyone()
    log(f"done: {step} steps; model saved to {final_dir}")
    return TrainResult(final_dir, step)


def _append_metrics(accelerator: Accelerator, output_dir: Path, record: dict) -> None:
    if accelerator.is_main_process:
        with open(output_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint being resumed from: those steps are about to be redone."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
