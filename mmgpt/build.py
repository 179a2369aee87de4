"""Config -> (processor, model): where a run's tokenizer, image transform and network come from."""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Iterable

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import CONFIG_MAPPING, AutoConfig, GenerationConfig, PretrainedConfig

from mmgpt.config import ConfigError, ModelConfig, TextConfig
from mmgpt.images import ImageTransform
from mmgpt.modeling import MMGPTConfig, MMGPTForConditionalGeneration
from mmgpt.processing import PROCESSOR_FILE, MMGPTProcessor
from mmgpt.tokenizer import SpecialTokens, load_decoder_tokenizer, train_bpe_tokenizer
from mmgpt.vision import VisionEncoder


def generation_config(special: SpecialTokens) -> GenerationConfig:
    """Stop at the end of a turn or of a document; pad with the tokenizer's pad token."""
    return GenerationConfig(eos_token_id=[special.end, special.eos], pad_token_id=special.pad)


def build(
    config: ModelConfig, training_texts: Iterable[str], resume_from: Path | None = None
) -> tuple[MMGPTProcessor, MMGPTForConditionalGeneration]:
    """The run's processor and model, the one place they are made: resuming (the checkpoint's processor and
    architecture; its weights come with the training state), from a saved model (`init_from`), or new, with
    pretrained parts loaded from the hub names or paths the config gives. Every path gets the same generation
    settings."""
    if resume_from is not None:
        processor = MMGPTProcessor.from_pretrained(resume_from)
        model = MMGPTForConditionalGeneration(MMGPTConfig.from_pretrained(resume_from))
        check_parts(processor, model, resume_from)
    elif config.init_from:
        processor, model = load_saved(config.init_from)
    else:
        processor, model = _new(config, training_texts)
    model.generation_config = generation_config(processor.special)
    if config.system_prompt:
        processor.system_prompt = config.system_prompt
    return processor, model


def load_saved(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[MMGPTProcessor, MMGPTForConditionalGeneration]:
    """A `save_pretrained` folder's processor and model, checked against each other; a file that cannot be read
    is named."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no mmgpt model in {folder} (expected config.json, model.safetensors, tokenizer)")
    processor = MMGPTProcessor.from_pretrained(folder)
    try:
        model = MMGPTForConditionalGeneration.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    except SafetensorError as error:
        raise ValueError(f"{folder / 'model.safetensors'} cannot be read: {error}") from None
    check_parts(processor, model, folder)
    return processor, model


def check_parts(processor: MMGPTProcessor, model: MMGPTForConditionalGeneration, folder: Path) -> None:
    """A saved model's files must agree with each other: otherwise the first chat fails far from the cause."""
    image_token_id, vocab = model.config.image_token_id, model.config.text_config.vocab_size
    if not 0 <= image_token_id < vocab:
        raise ValueError(f"{folder / 'config.json'}: image_token_id {image_token_id} is outside the decoder's vocabulary "
                         f"(text_config.vocab_size {vocab})")
    if image_token_id != processor.special.image:
        token = processor.tokenizer.convert_ids_to_tokens(image_token_id)
        raise ValueError(f"{folder / 'config.json'}: image_token_id {image_token_id} is the tokenizer's {token!r}, not "
                         f"'<|image|>' (id {processor.special.image}); the tokenizer and config.json do not belong together")
    if len(processor.tokenizer) > vocab:
        raise ValueError(f"{folder}: the tokenizer has {len(processor.tokenizer)} tokens but config.json's "
                         f"text_config.vocab_size is {vocab}")
    if processor.num_image_tokens != model.num_image_tokens:
        raise ValueError(f"{folder / PROCESSOR_FILE}: num_image_tokens is {processor.num_image_tokens} but the model in "
                         f"config.json makes {model.num_image_tokens} tokens of each image")
    image_size = tuple(model.vision.vit.patch_embed.img_size)
    if tuple(processor.transform.size) != image_size:
        raise ValueError(f"{folder / PROCESSOR_FILE}: image_size is {list(processor.transform.size)} but the model's "
                         f"ViT in config.json takes {list(image_size)}")


def _new(config: ModelConfig, training_texts: Iterable[str]) -> tuple[MMGPTProcessor, MMGPTForConditionalGeneration]:
    text = config.text
    tokenizer_source = text.tokenizer or text.pretrained
    tokenizer = (
        load_decoder_tokenizer(tokenizer_source)
        if tokenizer_source
        else train_bpe_tokenizer(training_texts, text.bpe_vocab_size)
    )
    special = SpecialTokens.from_tokenizer(tokenizer)
    text_config = decoder_config(text, len(tokenizer))
    text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id = None, special.eos, special.pad
    model_config = composite_config(config, text_config, special.image)
    model = MMGPTForConditionalGeneration.from_parts(model_config)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.config.text_config = model.language_model.config
    processor = MMGPTProcessor(tokenizer, transform_for(model.vision), model.num_image_tokens)
    return processor, model


def decoder_config(text: TextConfig, vocab_size: int) -> PretrainedConfig:
    """The decoder's architecture: a pretrained one's own config, or one built from `text.config`; a vocab_size
    given there is kept when larger than the tokenizer's (a real decoder's shape with a small tokenizer)."""
    if text.pretrained:
        return AutoConfig.from_pretrained(text.pretrained)
    settings = dict(text.config)
    model_type = settings.pop("model_type", "gpt2")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"config key 'model.text.config.model_type': transformers has no decoder type {model_type!r}")
    _check_keys(CONFIG_MAPPING[model_type], settings)
    try:
        text_config = AutoConfig.for_model(model_type, **settings)
    except (StrictDataclassError, TypeError, ValueError) as error:  # a value of the wrong type or range
        raise ConfigError(f"config key 'model.text.config': {' '.join(str(error).split())}") from None
    text_config.vocab_size = max(vocab_size, settings.get("vocab_size", 0))
    return text_config


def _check_keys(config_class: type[PretrainedConfig], settings: dict) -> None:
    """transformers stores any unknown key as an attribute and goes on; a typo must stop the run instead."""
    known = set(inspect.signature(config_class.__init__).parameters) | set(config_class.attribute_map)
    known |= set(config_class().to_dict())
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"config key 'model.text.config.{key}': {config_class.__name__} has no such setting{hint}")


def composite_config(config: ModelConfig, text_config: PretrainedConfig, image_token_id: int) -> MMGPTConfig:
    return MMGPTConfig(
        text_config=text_config.to_dict(),
        vision_model_name=config.vision.name,
        vision_kwargs=dict(config.vision.kwargs),
        vision_pretrained=config.vision.pretrained,
        vision_fused_attention=config.vision.fused_attention,
        vision_conv_stem=config.vision.conv_stem,
        vision_conv_stem_depth=config.vision.conv_stem_depth,
        text_pretrained=config.text.pretrained,
        text_attn_implementation=config.text.attn_implementation,
        projector_shuffle_factor=config.projector_shuffle_factor,
        projector_pool_size=config.projector_pool_size,
        projector_grid_embedding=config.projector_grid_embedding,
        projector_norm=config.projector_norm,
        image_token_id=image_token_id,
    )


def transform_for(vision: VisionEncoder) -> ImageTransform:
    """The image transform timm's data config prescribes for this ViT (input size, mean, std, interpolation)."""
    data_config = vision.data_config()
    return ImageTransform(
        size=tuple(data_config["input_size"][1:]),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        interpolation=data_config.get("interpolation", "bicubic"),
    )
