"""The training loop: next-token loss on images + text, on accelerate (one CPU process or many GPUs).

Setup (model, data, optimizer) and checkpoint files live elsewhere; this file reads like the algorithm:
for each step, take the step's batches, forward, backward, clip, step, and now and then log, evaluate, save.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from mmgpt import checkpoint
from mmgpt.answer_head import AnswerHead
from mmgpt.build import build, load_saved
from mmgpt.config import Config, ConfigError, chat_set_settings, check_values
from mmgpt.data.augment import Augment
from mmgpt.data.dataset import EncodedDataset, SampleEncoder
from mmgpt.data.formats import detect_format, iter_samples, read_samples
from mmgpt.data.loader import (
    StepSampler, batch_loader, default_num_workers, micro_batch_size, running, split_for_process,
)
from mmgpt.data.pairs import PairDataset, collate_pairs, read_pairs
from mmgpt.data.records import Sample
from mmgpt.data.shards import ShardStream, shard_index
from mmgpt.dpo import STATS, dpo_step
from mmgpt.estimate import ModelCosts, peak_flops_of
from mmgpt.lora import add_lora, is_adapter, merge_lora
from mmgpt.modeling import PACKABLE_DECODERS, MMGPTForConditionalGeneration
from mmgpt.plot import plot_metrics
from mmgpt.processing import IGNORE_INDEX

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


def cosine_with_warmup(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def starting_at(first: int, factor: Callable[[int], float]) -> Callable[[int], float]:
    """`factor`'s schedule for a part of the model that starts training at step `first` (after the vision
    warm-up): nothing before it, then its own warm-up and decay, as if the run began there."""
    return lambda step: 0.0 if step < first else factor(step - first)


def parameter_groups(model: MMGPTForConditionalGeneration, config: Config) -> list[dict]:
    """Freeze the named modules; in towers with LoRA adapters train the adapters only; give each trainable module
    its learning rate, no weight decay on 1-D weights."""
    modules = {"vision": model.vision, "projector": model.projector, "language_model": model.language_model}
    unknown = (set(config.train.freeze) | set(config.train.lr_multipliers)) - set(modules)
    if unknown:
        raise ValueError(f"unknown module name(s) {sorted(unknown)} in train.freeze/lr_multipliers; known: {sorted(modules)}")
    adapted = set(config.train.lora.modules) if config.train.lora.r else set()
    groups = []
    for name, module in modules.items():
        frozen = name in config.train.freeze
        for parameter_name, parameter in module.named_parameters():
            parameter.requires_grad_(not frozen and (name not in adapted or is_adapter(parameter_name)))
        if frozen:
            continue
        lr = config.train.lr * float(config.train.lr_multipliers.get(name, 1.0))
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups.append({"params": decay, "lr": lr, "weight_decay": config.train.weight_decay, "module": name})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "module": name})
    return [g for g in groups if g["params"]]


class _StopFlag:
    """Ctrl-C or SIGTERM (docker stop, Kubernetes, batch schedulers) asks the loop to save and stop at the end of
    the step; a second signal stops at once. Every process gets the signal, and they agree on the step through
    `Accelerator.check_trigger`, so all of them save the same checkpoint."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict = {}

    def __enter__(self) -> "_StopFlag":
        self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


TOKENIZER_SAMPLES = 10_000  # a stream's first samples, whose text trains a new BPE tokenizer


def _load_data(config: Config) -> tuple[list, list, list[str], Path | None]:
    """Training and eval samples, or for a stream of shards no training samples and the shards' folder: nothing of
    a stream is read here."""
    data = config.data
    if config.train.objective == "dpo":
        train_pairs, skipped = read_pairs(data.train, data.skip_bad_records)
        eval_pairs, eval_skipped = read_pairs(data.eval, data.skip_bad_records) if data.eval else ([], [])
        return train_pairs, eval_pairs, skipped + eval_skipped, None
    format = data.format or (detect_format(Path(data.train)) if Path(data.train).exists() else "")
    stream = Path(data.train) if format == "shards" else None
    train_samples, skipped = read_samples(data.train, data.format, data.image_folder, data.skip_bad_records) \
        if stream is None else ([], [])
    eval_samples, eval_skipped = (
        read_samples(data.eval, "", data.image_folder, data.skip_bad_records) if data.eval else ([], [])
    )
    return train_samples, eval_samples, skipped + eval_skipped, stream


def _texts(samples: Iterable[Sample]) -> Iterator[str]:
    """The training text, read only if a new tokenizer is trained on it."""
    return (segment.text for sample in samples for turn in sample.turns for segment in turn.segments
            if not segment.is_image)


def _supervised_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens the loss is taken on: labels are shifted inside the decoder, so the first position never counts."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def _counts(micro_batches: list[dict[str, torch.Tensor]], device: torch.device, pad_id: int) -> torch.Tensor:
    """(supervised tokens, tokens, images) of this process's micro-batches, to be summed over processes at once."""
    return torch.stack([
        sum(_supervised_tokens(batch) for batch in micro_batches),
        sum(batch["attention_mask"].sum() if "attention_mask" in batch else (batch["input_ids"] != pad_id).sum()
            for batch in micro_batches),  # packed batches have no mask: padding only at the rows' ends
        torch.tensor(sum(len(batch.get("pixel_values", ())) for batch in micro_batches), device=device),
    ])


def _sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _check_launch(accelerator: Accelerator, accum: int) -> None:
    """Refuse launches that would not do what they say: N processes that are not one run, a sharding strategy that
    accelerate runs only on GPUs (on CPU it silently falls back to plain data parallel), or an accelerate config
    whose accumulation steps differ from the recipe's (the batch split would be wrong)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise TrainingError(f"the launcher started {launched} processes but {accelerator.num_processes} joined the run")
    for strategy, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(variable, "false").lower() == "true" and accelerator.distributed_type.value != strategy.upper():
            raise TrainingError(
                f"the launch asks for {strategy}, which accelerate runs on GPUs only; this run would be "
                f"{accelerator.distributed_type.value}. Drop the {strategy} flag or config on a machine without GPUs."
            )
    if accelerator.gradient_accumulation_steps != accum:
        raise TrainingError(
            f"the accelerate config sets {accelerator.gradient_accumulation_steps} gradient accumulation steps and "
            f"train.grad_accum_steps is {accum}: set it in the recipe (train.grad_accum_steps) only"
        )


def check_resumable(folder: Path, accelerator: Accelerator) -> dict:
    """The checkpoint's trainer state, or a clear error when this launch cannot take its files.

    Full (unsharded) checkpoints resume on any number of processes: the batch order is a function of the step
    alone. Sharded ones (FSDP, DeepSpeed) hold one file per process and resume only on the same layout."""
    state = checkpoint.load_trainer_state(folder)
    saved_processes = state.get("num_processes", 1)
    saved_type = state.get("distributed_type", "NO")
    saved_sharded = saved_type in (DistributedType.FSDP.value, DistributedType.DEEPSPEED.value)
    if (saved_sharded or _sharded(accelerator)) and (
        saved_type != accelerator.distributed_type.value or saved_processes != accelerator.num_processes
    ):
        raise TrainingError(
            f"{folder} was written by {saved_processes} process(es) under {saved_type} and this launch has "
            f"{accelerator.num_processes} under {accelerator.distributed_type.value}: sharded checkpoints resume "
            "only on the layout that wrote them. Launch with that layout, or start a new output_dir."
        )
    return state


def train(config: Config, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train per `config`, resuming from the newest checkpoint in `config.output_dir` if there is one."""
    check_values(config)
    output_dir = Path(config.output_dir)
    accum = config.train.grad_accum_steps
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # so that a launch of N CPU processes is one gloo run, not N runs
        mixed_precision=mixed_precision_for(config.train.mixed_precision),
        gradient_accumulation_steps=accum,
        step_scheduler_with_optimizer=False,  # the schedule advances once per optimizer step, whatever the processes
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    _check_launch(accelerator, accum)
    if config.train.answer_loss_weight and accelerator.distributed_type in (DistributedType.FSDP,
                                                                             DistributedType.DEEPSPEED):
        raise ConfigError(f"train.answer_loss_weight trains a second, small model beside this one, which runs on one "
                          f"process or under DDP, not under {accelerator.distributed_type.value}")
    micro_size = micro_batch_size(config.train.batch_size, world, accum)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    set_seed(config.seed, device_specific=True)  # each process its own dropout stream, restored on resume
    log = accelerator.print

    train_samples, eval_samples, skipped, stream = _load_data(config)
    resume_from = checkpoint.latest_checkpoint(output_dir)
    resume_state = check_resumable(resume_from, accelerator) if resume_from is not None else None
    texts = _texts(islice(iter_samples(stream, "shards"), TOKENIZER_SAMPLES) if stream else train_samples)
    processor, model = build(config.model, texts, resume_from)
    if config.train.lora.r:
        add_lora(model, config.train.lora)
    if config.train.activation_checkpointing:
        model.gradient_checkpointing_enable()
    if config.train.compile:
        model.compile_blocks()
    decoder_type = model.config.text_config.model_type
    if config.train.packing and decoder_type not in PACKABLE_DECODERS:
        raise ConfigError(f"train.packing: the {decoder_type} decoder mixes tokens outside attention, so packed samples "
                          f"would see each other; packing works with {', '.join(sorted(PACKABLE_DECODERS))} "
                          "(set train.packing=false: length-grouped padding)")
    max_length = config.data.max_length or model.config.text_config.max_position_embeddings
    dpo = config.train.objective == "dpo"
    make_set = PairDataset if dpo else EncodedDataset
    augment = Augment(config.data.augment_shift, config.data.augment_flip, config.seed)
    if stream and (settings := chat_set_settings(config.data)):
        raise ConfigError(f"{settings}: for a training set read whole (JSONL, LLaVA JSON, a Hugging Face "
                          "dataset), not for a stream of shards")
    if dpo:
        train_set = PairDataset(train_samples, processor, max_length, config.data.skip_bad_records)
    else:
        train_set = EncodedDataset([] if stream else train_samples, processor, max_length,
                                   config.data.skip_bad_records, augment, config.data.cache_pictures_mb * 2**20)
    eval_set = make_set(eval_samples, processor, max_length, config.data.skip_bad_records)
    collate_fn = collate_pairs if dpo else None
    reference = None
    if dpo:  # the starting model, frozen: DPO measures the policy's log-probabilities against it
        reference = load_saved(config.model.init_from)[1].requires_grad_(False).eval()
    skipped += train_set.skipped + eval_set.skipped
    train_count = f"{shard_index(stream)['samples']} streamed" if stream else str(len(train_set))
    if skipped:
        log(f"skipped {len(skipped)} bad record(s) (data.skip_bad_records=true); first: {skipped[0]}")

    groups = parameter_groups(model, config)
    costs = ModelCosts.of(model)
    answer_head, seen = None, {}
    answer_stats = torch.zeros(2, device=accelerator.device)  # summed answer loss and answer count since the last log
    if config.train.answer_loss_weight:
        vision_width = model.vision.width
        answer_head = AnswerHead(vision_width, model.config.text_config.vocab_size, model.config.image_token_id,
                                 model.num_image_tokens)
        groups.append({"params": list(answer_head.parameters()), "lr": config.train.lr,
                       "weight_decay": config.train.weight_decay})
        model.vision.register_forward_hook(  # training forwards only: an eval batch's features would linger
            lambda module, inputs, features: seen.update(features=features) if module.training else None)
    log(
        f"data: {train_count} training and {len(eval_set)} eval samples; model: {costs.parameters / 1e6:.2f}M "
        f"parameters ({costs.trainable / 1e6:.2f}M trained), {model.num_image_tokens} tokens per image; "
        f"precision: {accelerator.mixed_precision}; {accelerator.distributed_type.value}: batch "
        f"{config.train.batch_size} = {world} process(es) x "
        f"{accum} accumulation step(s) x {micro_size}"
    )
    if augment.active:
        log(f"augment: {augment.describe()}")
    if config.data.cache_pictures_mb:
        log(f"picture cache: up to {config.data.cache_pictures_mb} MB of decoded training pictures kept (in each "
            f"loader worker)")
    if answer_head is not None:
        log(f"answer loss: {config.train.answer_loss_weight} x the first answer tokens' cross-entropy from the ViT's "
            "features by a short path (the head is not saved with the model)")
    if config.train.vision_warmup_steps:
        log(f"vision warm-up: steps 1-{config.train.vision_warmup_steps} train the ViT by the answer loss alone (the "
            "decoder not run, no eval loss); the projector and decoder start after them, with their own warm-up")
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=True)
    schedule = cosine_with_warmup(config.train.warmup_steps, config.train.max_steps, config.train.min_lr_ratio)
    warmup = config.train.vision_warmup_steps  # 0: `after_warmup` is `schedule`
    after_warmup = starting_at(warmup, cosine_with_warmup(config.train.warmup_steps, config.train.max_steps - warmup,
                                                          config.train.min_lr_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [  # the projector and decoder join after the warm-up
        after_warmup if group.get("module") in ("projector", "language_model") else schedule for group in groups])
    vision = model.vision
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if answer_head is not None:
        answer_head = accelerator.prepare_model(answer_head)  # its state travels in the checkpoints, for resuming
    if reference is not None:
        reference = accelerator.prepare_model(reference, evaluation_mode=True)  # on the device, under autocast

    def objective(batch: dict[str, torch.Tensor],
                  normaliser: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss of the micro-batch as its share of the global batch's mean, summed DPO `STATS` or None): the mean
        per supervised token for next-token prediction, per pair for DPO."""
        if reference is None:
            return model(**batch, num_items_in_batch=normaliser).loss, None
        loss_sum, stats = dpo_step(model, reference, batch, config.train.dpo_beta, config.train.dpo_sft_weight)
        return loss_sum / normaliser, stats

    def answer_term(batch: dict[str, torch.Tensor], normaliser: torch.Tensor) -> torch.Tensor:
        """The weighted answer loss of the micro-batch the model has just seen, over the main loss's normaliser, so
        that its gradient too is the same on 1 process or N."""
        features = seen.pop("features", None)
        if features is None:  # a batch without pictures: no answers for the head, which still takes part
            features = torch.zeros(0, 1, vision_width, device=accelerator.device)
        answer_loss, answers = answer_head(features, batch["input_ids"], batch["labels"], batch["attention_mask"])
        answer_stats[0] += answer_loss.detach().float()
        answer_stats[1] += answers
        return config.train.answer_loss_weight * answer_loss / normaliser

    def vision_term(batch: dict[str, torch.Tensor], normaliser: torch.Tensor) -> torch.Tensor:
        """A warm-up step's loss: the answer loss alone, the ViT run without the decoder."""
        if batch.get("pixel_values") is not None:
            with accelerator.autocast():
                vision(batch["pixel_values"])
        return answer_term(batch, normaliser)

    peak_flops = config.train.peak_tflops * 1e12 or peak_flops_of(accelerator.device, accelerator.mixed_precision)

    workers = config.train.num_workers
    if workers < 0:
        workers = default_num_workers(accelerator.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))

    streams_count = world * max(1, workers) if stream is not None else None
    step = 0
    if resume_from is not None:
        if resume_state.get("data_streams") != streams_count:
            raise TrainingError(
                f"{resume_from} read its data as {resume_state.get('data_streams')} stream(s) and this launch would "
                f"read {streams_count}: a stream resumes exactly only on the same processes x train.num_workers"
            )
        checkpoint.check_pickles(resume_from)
        accelerator.load_state(str(resume_from), load_kwargs={"weights_only": True})
        step = resume_state["step"]
        log(f"resuming from {resume_from} (step {step}, written by {resume_state.get('num_processes', 1)} process(es))")
        if step >= config.train.max_steps and (output_dir / "final" / "model.safetensors").is_file():
            log(f"already finished: {step} of {config.train.max_steps} steps; the model is in {output_dir / 'final'}")
            return TrainResult(output_dir / "final", step)
    if accelerator.is_main_process:
        checkpoint.prune(output_dir, config.train.keep_checkpoints)
        _truncate_metrics(output_dir / METRICS_FILE, step)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

    def save_checkpoint() -> None:
        """Every process writes its part (its RNG state; its shard under FSDP/DeepSpeed) into one temporary
        folder, which the main process renames once all are done."""
        final = checkpoint.checkpoints_dir(output_dir) / f"step-{step}"
        folder = checkpoint.temporary_folder(final)
        if accelerator.is_main_process:
            shutil.rmtree(folder, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(folder), safe_serialization=True)
            if accelerator.is_main_process:
                processor.save_pretrained(folder)
                accelerator.unwrap_model(model).config.save_pretrained(folder)
                checkpoint.save_trainer_state(folder, {
                    "step": step, "samples_skipped": len(skipped), "num_processes": world,
                    "distributed_type": accelerator.distributed_type.value, "data_streams": streams_count,
                })
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                checkpoint.commit(folder, final)
        except OSError as error:
            shutil.rmtree(folder, ignore_errors=True)
            previous = checkpoint.latest_checkpoint(output_dir)
            raise TrainingError(
                f"could not save the checkpoint of step {step}: {error}. "
                + (f"The previous checkpoint {previous} is intact; free space and run the same command to resume."
                   if previous else "No earlier checkpoint exists.")
            ) from error
        if accelerator.is_main_process:
            checkpoint.prune(output_dir, config.train.keep_checkpoints)
        accelerator.wait_for_everyone()

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}

    def evaluate() -> dict[str, float]:
        """Mean loss per supervised token (DPO: per pair, with the pairs' mean `STATS`) over the first eval samples,
        each process taking an equal share: whole batches (the same samples on any layout) or, for a set smaller
        than one batch, all that split evenly."""
        model.eval()
        batch_size = config.train.batch_size
        count = min(config.train.eval_batches, len(eval_set) // batch_size) * batch_size
        count = count or len(eval_set) // (world * accum) * world * accum
        batches = [micro for start in range(0, count, batch_size)
                   for micro in split_for_process(list(range(start, min(count, start + batch_size))), world, accum, rank)]
        loss_sum = torch.zeros((), device=accelerator.device)
        stats_sum = torch.zeros(len(STATS), device=accelerator.device)
        count = torch.zeros((), device=accelerator.device, dtype=torch.long)
        with torch.no_grad():
            for batch in batch_loader(eval_set, batches, processor.special.pad, workers, accelerator.device,
                                      collate_fn=collate_fn):
                batch = to_device(batch)  # exhausting the loader stops its workers
                loss, stats = objective(batch, 1)  # a sum over the micro-batch
                loss_sum += loss.float()
                if stats is None:
                    count += _supervised_tokens(batch)
                else:
                    stats_sum += stats
                    count += batch["input_ids"].shape[0] // 2
        model.train()
        count = accelerator.reduce(count, "sum")
        metrics = {"eval_loss": float(accelerator.reduce(loss_sum, "sum") / count)}
        if reference is not None:
            stats_sum = accelerator.reduce(stats_sum, "sum") / count
            metrics.update({f"eval_{name}": float(value) for name, value in zip(STATS[1:], stats_sum[1:])})
        return metrics

    bad_in_a_row = 0
    bad_total = 0
    model.train()
    progress = tqdm(total=config.train.max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    started = time.perf_counter()
    first_step = step
    if stream is not None:
        streams = ShardStream(stream, SampleEncoder(processor, max_length, config.data.skip_bad_records), config.seed,
                              config.data.shuffle_buffer, micro_size, step * accum, rank, world)
        loader = batch_loader(streams, None, processor.special.pad, workers, accelerator.device, batch_size=micro_size,
                              packing=config.train.packing)
    else:
        sampler = StepSampler(train_set.lengths, config.train.batch_size, config.seed, step, config.train.max_steps,
                              world, accum, rank, with_step=augment.active)
        loader = batch_loader(train_set, sampler, processor.special.pad, workers, accelerator.device,
                              packing=config.train.packing, collate_fn=collate_fn)
    with _StopFlag() as stop, running(loader) as batches:
        while step < config.train.max_steps:
            step_started = time.perf_counter()
            micro_batches = [to_device(next(batches)) for _ in range(accum)]
            # The loss is a sum over the supervised tokens of the whole global batch divided by their count, so a
            # step's gradient is the same on 1 process or N, in one batch or in accumulated micro-batches.
            counts = _counts(micro_batches, accelerator.device, processor.special.pad)
            global_tokens, tokens, images = accelerator.reduce(counts, "sum")
            loss_sum = torch.zeros((), device=accelerator.device)
            stats_sum = torch.zeros(len(STATS), device=accelerator.device)
            warming_up = step < config.train.vision_warmup_steps
            for batch in micro_batches:
                with accelerator.accumulate(model):
                    if warming_up:
                        loss, stats = vision_term(batch, global_tokens), None
                        trained_on = loss
                    else:
                        loss, stats = objective(batch, config.train.batch_size if dpo else global_tokens)
                        trained_on = loss + answer_term(batch, global_tokens) if answer_head is not None else loss
                    if stats is not None:
                        stats_sum += stats
                    # DDP/FSDP average gradients over processes and accelerate divides by the accumulation steps:
                    # scale back up so the gradients are those of the global sum above.
                    accelerator.backward(trained_on * world * accum)
                    loss_sum += loss.detach().float()
            if warming_up and world > 1:  # the ViT ran outside DDP's forward: its gradients are averaged here
                for parameter in vision.parameters():
                    if parameter.grad is not None:
                        parameter.grad = accelerator.reduce(parameter.grad, "mean")
            norm = accelerator.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
            if answer_head is not None:
                torch.nn.utils.clip_grad_norm_(answer_head.parameters(), config.train.max_grad_norm)
            grad_norm = None if norm is None else float(norm)  # DeepSpeed clips (and reports) inside its own step
            mean_loss = float(accelerator.reduce(loss_sum, "sum"))
            if accelerator.scaler is not None:
                optimizer.step()  # fp16: the scaler skips steps with inf/NaN gradients itself and lowers its scale
                finite = math.isfinite(mean_loss)
            else:
                finite = math.isfinite(mean_loss) and (grad_norm is None or math.isfinite(grad_norm))
                if finite:
                    optimizer.step()
            bad_in_a_row = 0 if finite else bad_in_a_row + 1
            bad_total += not finite
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}")

            step_seconds = time.perf_counter() - step_started
            record = {"step": step, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "supervised_tokens": int(global_tokens), "bad_steps": bad_total,
                      "steps_per_s": (step - first_step) / (time.perf_counter() - started)}
            if not warming_up:  # in the warm-up the decoder did not run: no loss of its own, its FLOPs not spent
                flops_per_s = costs.training_flops(int(tokens), int(images), config.train.batch_size,
                                                    labelled=int(global_tokens)) / step_seconds
                record.update(loss=mean_loss, tokens_per_s=int(tokens) / step_seconds, tflops_per_s=flops_per_s / 1e12)
                if peak_flops:
                    record["mfu"] = flops_per_s / (peak_flops * world)
            if answer_head is not None:
                answer_sum, answer_count = accelerator.reduce(answer_stats, "sum").tolist()
                record["answer_loss"] = answer_sum / max(answer_count, 1)
                answer_stats.zero_()
            if dpo:
                stats_mean = accelerator.reduce(stats_sum, "sum") / config.train.batch_size
                record.update({name: float(value) for name, value in zip(STATS[1:], stats_mean[1:])})
            _append_metrics(accelerator, output_dir, record)
            if eval_set and not warming_up and (step % config.train.eval_every == 0 or step == config.train.max_steps):
                eval_record = {"step": step, **evaluate()}
                _append_metrics(accelerator, output_dir, eval_record)
                if accelerator.is_local_main_process:
                    progress.write(f"step {step}: eval loss {eval_record['eval_loss']:.4f}")
            if on_step is not None:
                on_step(step, record)
            if bad_in_a_row >= config.train.max_bad_steps:
                kept = checkpoint.latest_checkpoint(output_dir)
                raise TrainingError(
                    f"{bad_in_a_row} steps in a row had a NaN/inf loss or gradient (step {step}); stopping. "
                    + (f"The last good checkpoint is {kept}: lower train.lr or check the data, then run the same "
                       "command to resume." if kept else "No checkpoint was written yet: lower train.lr or check "
                       "the data, then start again.")
                )
            if stop.requested:
                accelerator.set_trigger()
            stopping = accelerator.check_trigger()
            if step % config.train.save_every == 0 and step < config.train.max_steps or stopping:
                save_checkpoint()
            if stopping:
                progress.close()
                log(f"interrupted at step {step}; checkpoint saved. Run the same command again to resume.")
                return TrainResult(None, step)
    progress.close()

    save_checkpoint()
    final_dir = output_dir / "final"
    state_dict = accelerator.get_state_dict(model)  # every process: gathers FSDP/DeepSpeed shards
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        weights = merge_lora(state_dict, unwrapped) if config.train.lora.r else state_dict

        def write_final(folder: Path) -> None:
            unwrapped.save_pretrained(folder, state_dict=weights, safe_serialization=True)
            processor.save_pretrained(folder)

        checkpoint.write_atomically(final_dir, write_final)
        plot_metrics(output_dir / METRICS_FILE, output_dir / "loss.png")
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
