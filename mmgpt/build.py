"""Config -> (processor, model): where a run's tokenizer, image transform and network come from."""

from __future__ import annotations

from typing import Iterable

from transformers import AutoConfig, GenerationConfig

from mmgpt.config import ModelConfig
from mmgpt.images import ImageTransform
from mmgpt.modeling import MMGPTConfig, MMGPTForConditionalGeneration
from mmgpt.processing import MMGPTProcessor
from mmgpt.tokenizer import SpecialTokens, load_decoder_tokenizer, train_bpe_tokenizer
from mmgpt.vision import VisionEncoder


def generation_config(special: SpecialTokens) -> GenerationConfig:
    """Stop at the end of a turn or of a document; pad with the tokenizer's pad token."""
    return GenerationConfig(eos_token_id=[special.end, special.eos], pad_token_id=special.pad)


def build(config: ModelConfig, training_texts: Iterable[str]) -> tuple[MMGPTProcessor, MMGPTForConditionalGeneration]:
    """A new processor and model; pretrained parts are loaded from the hub names or paths the config gives."""
    if config.init_from:
        model = MMGPTForConditionalGeneration.from_pretrained(config.init_from)
        return MMGPTProcessor.from_pretrained(config.init_from), model
    text = config.text
    tokenizer_source = text.tokenizer or text.pretrained
    tokenizer = (
        load_decoder_tokenizer(tokenizer_source)
        if tokenizer_source
        else train_bpe_tokenizer(training_texts, text.bpe_vocab_size)
    )
    special = SpecialTokens.from_tokenizer(tokenizer)
    if text.pretrained:
        text_config = AutoConfig.from_pretrained(text.pretrained)
    else:
        settings = dict(text.config)
        text_config = AutoConfig.for_model(settings.pop("model_type", "gpt2"), **settings)
        text_config.vocab_size = len(tokenizer)
    text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id = None, special.eos, special.pad
    model_config = MMGPTConfig(
        text_config=text_config.to_dict(),
        vision_model_name=config.vision.name,
        vision_kwargs=dict(config.vision.kwargs),
        vision_pretrained=config.vision.pretrained,
        vision_fused_attention=config.vision.fused_attention,
        vision_conv_stem=config.vision.conv_stem,
        text_pretrained=text.pretrained,
        text_attn_implementation=text.attn_implementation,
        projector_shuffle_factor=config.projector_shuffle_factor,
        projector_pool_size=config.projector_pool_size,
        image_token_id=special.image,
    )
    model = MMGPTForConditionalGeneration.from_parts(model_config)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model.config.text_config = model.language_model.config
    model.generation_config = generation_config(special)
    processor = MMGPTProcessor(tokenizer, transform_for(model.vision), model.num_image_tokens)
    return processor, model


def transform_for(vision: VisionEncoder) -> ImageTransform:
    """The image transform timm's data config prescribes for this ViT (input size, mean, std, interpolation)."""
    data_config = vision.data_config()
    return ImageTransform(
        size=tuple(data_config["input_size"][1:]),
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        interpolation=data_config.get("interpolation", "bicubic"),
    )
