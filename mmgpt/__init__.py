"""mmgpt: a small, hackable vision-language GPT (timm ViT -> projector -> any transformers causal LM)."""

from mmgpt.inference import MMGPT
from mmgpt.modeling import MMGPTConfig, MMGPTForConditionalGeneration
from mmgpt.processing import MMGPTProcessor

__all__ = ["MMGPT", "MMGPTConfig", "MMGPTForConditionalGeneration", "MMGPTProcessor"]
