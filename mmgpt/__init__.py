"""mmgpt: a small, hackable vision-language GPT (timm ViT -> projector -> any transformers causal LM)."""

from mmgpt.images import ImageError, load_image
from mmgpt.inference import MMGPT, ContextTooLongError
from mmgpt.modeling import MMGPTConfig, MMGPTForConditionalGeneration
from mmgpt.processing import MMGPTProcessor

__all__ = [
    "MMGPT",
    "ContextTooLongError",
    "ImageError",
    "MMGPTConfig",
    "MMGPTForConditionalGeneration",
    "MMGPTProcessor",
    "load_image",
]
