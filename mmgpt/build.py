"""Config -> (processor, model): where a run's tokenizer, image transform and network come from."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from mmgpt.config import ModelConfig, TextConfig
from mmgpt.images import ImageTransform
from mmgpt.modeling import MMGPTConfig, MMGPTForConditionalGeneration
from mmgpt.processing import MMGPTProcessor
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
    elif config.init_from:
        processor = MMGPTProcessor.from_pretrained(config.init_from)
        model = MMGPTForConditionalGeneration.from_pretrained(config.init_from)
    else:
        processor, model = _new(config, training_texts)
    model.generation_config = generation_config(processor.special)
    return processor, model


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
    text_config = AutoConfig.for_model(settings.pop("model_type", "gpt2"), **settings)
    text_config.vocab_size = max(vocab_size, settings.get("vocab_size", 0))
    return text_config


def composite_config(config: ModelConfig, text_config: PretrainedConfig, image_token_id: int) -> MMGPTConfig:
    return MMGPTConfig(
        text_config=text_config.to_dict(),
        vision_model_name=config.vision.name,
        vision_kwargs=dict(config.vision.kwargs),
        vision_pretrained=config.vision.pretrained,
        vision_fused_attention=config.vision.fused_attention,
        vision_conv_stem=config.vision.conv_stem,
        text_pretrained=config.text.pretrained,
        text_attn_implementation=config.text.attn_implementation,
        projector_shuffle_factor=config.projector_shuffle_factor,
        projector_pool_size=config.projector_pool_size,
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
