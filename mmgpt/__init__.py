"""mmgpt: a small, hackable vision-language GPT (timm ViT -> projector -> any transformers causal LM)."""

from mmgpt.images import ImageError, load_image
from mmgpt.inference import MMGPT, ContextTooLongError
from mmgpt.modeling import MMGPTConfig, MMGPTForConditionalGeneration
from mmgpt.processing import MMGPTProcessor
from mmgpt.transformers_processor import MMGPTTransformersProcessor

__all__ = [
    "MMGPT",
    "ContextTooLongError",
    "ImageError",
    "MMGPTConfig",
    "MMGPTForConditionalGeneration",
    "MMGPTProcessor",
    "MMGPTTransformersProcessor",
    "load_image",
]
