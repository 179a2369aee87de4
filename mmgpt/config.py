"""Run configuration: dataclasses are the single source of truth; YAML and `--set a.b=c` only supply values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


MIXED_PRECISION = ("auto", "bf16", "fp16", "no")
OBJECTIVES = ("next_token", "dpo")
FLIPS = ("", "h", "v", "hv")  # data.augment_flip: the axes training pictures may be mirrored on


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


@dataclass
class DataConfig:
    train: str = "data/shapes/train.jsonl"
    eval: str = ""
    format: str = ""  # "" = detect from the file or folder; jsonl, llava, hf, webdataset (see mmgpt/data/formats.py)
    image_folder: str = ""  # image paths are relative to this folder; "" = the data file's folder
    shuffle_buffer: int = 1000  # samples each stream of shards shuffles through (format shards)
    skip_bad_records: bool = False  # skip (and count, and report) bad records instead of stopping
    max_length: int = 0  # longest sample in tokens; 0 = the decoder's context length
    augment_shift: int = 0  # training pictures move up to this many pixels each way (a new picture, the same answers)
    augment_flip: str = ""  # "h", "v" or "hv": mirror training pictures on these axes, half the time each, and swap
    # the words for sides with them (left/right, top/bottom, ...); only for sets whose answers survive a mirror
    cache_pictures_mb: int = 0  # keep up to this many MB of decoded training pictures (each loader worker its own
    # copy): a small set is decoded once instead of every epoch; 0 = decode every time


@dataclass
class VisionConfig:
    name: str = "vit_tiny_patch16_224"  # any timm ViT
    pretrained: str = ""  # "" = random init; a hub name (e.g. "timm/...") or a local weights file
    kwargs: dict = field(default_factory=dict)  # timm.create_model overrides: img_size, patch_size, depth, ...
    fused_attention: bool = True  # false: timm's plain attention (faster backward for tiny ViTs on CPU)
    conv_stem: bool = False  # true: stride-2 convolutions instead of a linear patchify (for ViTs trained from scratch)
    conv_stem_depth: int | list = 1  # convolutions a stage of the conv stem, for all or each ([1, 2, 2], finest
    # first): more widen what a patch sees (objects that straddle patches)


@dataclass
class TextConfig:
    pretrained: str = ""  # "" = build from `config`; else a hub name or a local transformers folder
    config: dict = field(default_factory=lambda: {"model_type": "gpt2"})  # used when `pretrained` is empty
    tokenizer: str = ""  # "" = the pretrained decoder's, or a BPE trained on the training text if none
    attn_implementation: str = ""  # "" = transformers' default (sdpa); "eager" is faster for tiny decoders on CPU
    bpe_vocab_size: int = 2048


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector_shuffle_factor: int = 1  # >1 merges r x r patches into one token (r^2 fewer image tokens)
    projector_pool_size: int = 0  # >0 averages the patch grid to P x P tokens (1: one global token per image)
    projector_grid_embedding: bool = False  # true: a learnt row and column embedding added to each image token
    projector_norm: bool = False  # true: a LayerNorm ends the MLP (before the grid embedding), so neither drowns
    init_from: str = ""  # start from a saved model folder (e.g. a previous stage's OUTPUT/final)
    system_prompt: str = ""  # saved with the model as the system prompt it was trained under (the demo's default); "" = keep


@dataclass
class LoraConfig:
    """Low-rank adapters (peft) in place of full fine-tuning of the named towers; the projector trains fully."""

    r: int = 0  # adapter rank; 0 = no adapters (full fine-tuning of every module not frozen)
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.05
    targets: list = field(default_factory=list)  # layer names (e.g. [c_attn, c_proj] or [q_proj, v_proj]); [] = every linear layer
    modules: list = field(default_factory=lambda: ["language_model"])  # towers that get adapters: language_model, vision


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 32  # the global batch of one optimizer step: processes x grad_accum_steps x micro-batch
    grad_accum_steps: int = 1
    lr: float = 5e-4
    lr_multipliers: dict = field(default_factory=dict)  # per module: {"vision": 2.0, "language_model": 1.0}
    freeze: list = field(default_factory=list)  # module names to freeze: vision, projector, language_model
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto (bf16 where the hardware has it), bf16, fp16, no
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 200
    keep_checkpoints: int = 2
    max_bad_steps: int = 5  # stop after this many NaN/inf steps in a row
    num_workers: int = -1  # processes that decode images ahead of the step; -1 = up to 8 a GPU, 1 on a CPU
    packing: bool = False  # several samples per row, each seeing only itself, instead of padding (attention decoders)
    compile: bool = False  # torch.compile each decoder layer and ViT block in place (dynamic shapes)
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~30 % more compute
    peak_tflops: float = 0.0  # the device's peak for the logged MFU; 0 = known GPUs' datasheet figure, none on CPU
    lora: LoraConfig = field(default_factory=LoraConfig)
    objective: str = "next_token"  # next_token, or dpo: preference pairs (mmgpt/data/pairs.py), model.init_from the reference
    dpo_beta: float = 0.1  # DPO: how far the policy may move from the reference (larger: less far)
    dpo_sft_weight: float = 0.0  # DPO: plus this times the chosen reply's mean next-token loss (RPO), so it stays likely
    answer_loss_weight: float = 0.0  # >0: plus this times a loss from the answers to the ViT by a short path (answer_head.py)
    vision_warmup_steps: int = 0  # first steps: the ViT learns by the answer loss alone, the decoder not run (cheap)


@dataclass
class Config:
    output_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TYPES = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}


def _coerce(value: Any, annotation: str, key: str) -> Any:
    """`value` as the field's type, named as this module's postponed annotations name it ("int", "int | list": the
    first alternative the value is, or can be read as)."""
    names = [name.strip() for name in annotation.split("|")]
    for name in names:
        kind = TYPES[name]
        if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                return float(value)  # YAML reads 1e-3 (no dot) as a string
            except ValueError:
                continue
        if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
    expected = "a number" if names == ["float"] else " or ".join(names)
    raise ConfigError(f"config key '{key}' expects {expected}, got {value!r}")


def _apply(target: Any, values: dict, prefix: str = "") -> None:
    known = {f.name: f for f in dataclasses.fields(target)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise ConfigError(f"unknown config key '{key}' (known here: {', '.join(sorted(known))})")
        current = getattr(target, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; give it a mapping")
            _apply(current, value, key + ".")
        else:
            setattr(target, name, _coerce(value, known[name].type, key))


def _set_dotted(config: Config, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like dotted.key=value")
    key, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    parts = key.split(".")
    target: Any = config
    for depth, part in enumerate(parts[:-1]):
        if dataclasses.is_dataclass(target):
            if part not in {f.name for f in dataclasses.fields(target)}:
                raise ConfigError(f"unknown config key '{'.'.join(parts[: depth + 1])}'")
            target = getattr(target, part)
        elif isinstance(target, dict):
            target = target.setdefault(part, {})
        else:
            raise ConfigError(f"config key '{'.'.join(parts[: depth + 1])}' is not a section")
    if isinstance(target, dict):
        target[parts[-1]] = value
    else:
        field_types = {f.name: f.type for f in dataclasses.fields(target)}
        if field_types.get(parts[-1]) == "str":
            value = raw  # a string field takes the text as typed: `no` stays "no", not False

        _apply(target, {parts[-1]: value}, ".".join(parts[:-1]) + "." if len(parts) > 1 else "")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- `dotted.key=value` overrides, each checked against the dataclasses."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        _apply(config, values)
    for assignment in overrides:
        _set_dotted(config, assignment)
    check_values(config)
    return config


def chat_set_settings(data: DataConfig) -> str:
    """The data settings in use that work on the items of a set of chats and documents read whole (moving and
    mirroring pictures, keeping them decoded), not on preference pairs or a stream of shards; "" if none."""
    named = {"data.augment_shift": data.augment_shift, "data.augment_flip": data.augment_flip,
             "data.cache_pictures_mb": data.cache_pictures_mb}
    return " and ".join(name for name, value in named.items() if value)


def check_values(config: Config) -> None:
    """Values each field's type admits but no run can use: one error naming the key and the value."""
    train, data = config.train, config.data
    stem_depth = config.model.vision.conv_stem_depth
    stem_depths = stem_depth if isinstance(stem_depth, list) else [stem_depth]
    rules: list[tuple[str, Any, bool, str]] = [
        ("train.max_steps", train.max_steps, train.max_steps >= 1, "at least 1"),
        ("train.batch_size", train.batch_size, train.batch_size >= 1, "at least 1"),
        ("train.grad_accum_steps", train.grad_accum_steps, train.grad_accum_steps >= 1, "at least 1"),
        ("train.lr", train.lr, train.lr >= 0, "0 or more"),
        ("train.weight_decay", train.weight_decay, train.weight_decay >= 0, "0 or more"),
        ("train.warmup_steps", train.warmup_steps, train.warmup_steps >= 0, "0 or more"),
        ("train.min_lr_ratio", train.min_lr_ratio, 0 <= train.min_lr_ratio <= 1, "between 0 and 1"),
        ("train.max_grad_norm", train.max_grad_norm, train.max_grad_norm >= 0, "0 (no clipping) or more"),
        ("train.mixed_precision", train.mixed_precision, train.mixed_precision in MIXED_PRECISION,
         f"one of {', '.join(MIXED_PRECISION)}"),
        ("train.eval_every", train.eval_every, train.eval_every >= 1, "at least 1"),
        ("train.eval_batches", train.eval_batches, train.eval_batches >= 1, "at least 1"),
        ("train.save_every", train.save_every, train.save_every >= 1, "at least 1"),
        ("train.keep_checkpoints", train.keep_checkpoints, train.keep_checkpoints >= 1, "at least 1"),
        ("train.max_bad_steps", train.max_bad_steps, train.max_bad_steps >= 1, "at least 1"),
        ("train.num_workers", train.num_workers, train.num_workers >= -1, "-1 (automatic) or more"),
        ("train.num_threads", train.num_threads, train.num_threads >= 0, "0 (torch's default) or more"),
        ("train.peak_tflops", train.peak_tflops, train.peak_tflops >= 0, "0 (automatic) or more"),
        ("train.lora.r", train.lora.r, train.lora.r >= 0, "0 (no adapters) or more"),
        ("train.lora.dropout", train.lora.dropout, 0 <= train.lora.dropout < 1, "in [0, 1)"),
        ("train.objective", train.objective, train.objective in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}"),
        ("train.dpo_beta", train.dpo_beta, train.dpo_beta > 0, "above 0"),
        ("train.dpo_sft_weight", train.dpo_sft_weight, train.dpo_sft_weight >= 0, "0 or more"),
        ("train.answer_loss_weight", train.answer_loss_weight, train.answer_loss_weight >= 0, "0 (off) or more"),
        ("train.vision_warmup_steps", train.vision_warmup_steps, 0 <= train.vision_warmup_steps < train.max_steps,
         "0 (off) or more, and fewer than train.max_steps"),
        ("model.vision.conv_stem_depth", config.model.vision.conv_stem_depth,
         len(stem_depths) > 0
         and all(isinstance(depth, int) and not isinstance(depth, bool) and depth >= 1 for depth in stem_depths),
         "at least 1, or a list of such numbers (one a stage)"),
        ("data.max_length", data.max_length, data.max_length >= 0, "0 (the context length) or more"),
        ("data.shuffle_buffer", data.shuffle_buffer, data.shuffle_buffer >= 1, "at least 1"),
        ("data.augment_shift", data.augment_shift, data.augment_shift >= 0, "0 (no moves) or more pixels"),
        ("data.cache_pictures_mb", data.cache_pictures_mb, data.cache_pictures_mb >= 0, "0 (off) or more"),
        ("data.augment_flip", data.augment_flip, data.augment_flip in FLIPS, f"one of {', '.join(map(repr, FLIPS))}"),
        ("model.projector_shuffle_factor", config.model.projector_shuffle_factor,
         config.model.projector_shuffle_factor >= 1, "at least 1"),
        ("model.projector_pool_size", config.model.projector_pool_size, config.model.projector_pool_size >= 0,
         "0 (no pooling) or more"),
    ]
    for key, value, ok, wanted in rules:
        if not ok:
            raise ConfigError(f"config key '{key}' must be {wanted}, got {value!r}")
    if train.objective == "dpo" and not config.model.init_from:
        raise ConfigError("train.objective=dpo needs model.init_from: the saved model to start from, which is also the "
                          "frozen reference the policy is measured against")
    if train.objective == "dpo" and (settings := chat_set_settings(data)):
        raise ConfigError(f"{settings}: for the chats and documents of a set read whole, not for preference pairs "
                          "(train.objective=dpo)")
    if train.objective == "dpo" and train.packing:
        raise ConfigError("train.packing does not apply to train.objective=dpo (each pair is two padded rows); set "
                          "train.packing=false")
    if train.answer_loss_weight and (train.objective == "dpo" or train.packing or "vision" in train.freeze):
        raise ConfigError("train.answer_loss_weight trains the ViT by a short path from the answers: it needs "
                          "train.objective=next_token, padded batches (train.packing=false) and the vision tower "
                          "trained (not in train.freeze)")
    if train.vision_warmup_steps and not train.answer_loss_weight:
        raise ConfigError("train.vision_warmup_steps trains the ViT by the answer loss alone: set "
                          "train.answer_loss_weight above 0 too")
    for name, multiplier in train.lr_multipliers.items():
        if not isinstance(multiplier, (int, float)) or isinstance(multiplier, bool) or multiplier < 0:
            raise ConfigError(f"config key 'train.lr_multipliers.{name}' must be a number, 0 or more, got {multiplier!r}")
