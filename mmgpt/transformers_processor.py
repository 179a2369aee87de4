"""mmgpt's processor as a transformers `ProcessorMixin`, saved beside every model, so that after `import mmgpt`
`AutoProcessor.from_pretrained(path)` and `apply_chat_template` work as for any transformers VLM:

    processor = AutoProcessor.from_pretrained(path)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    model.generate(**inputs)  # stops at the end of the turn: the saved generation_config says so

The chat template writes mmgpt's layout (<|role|> content <|end|>, <|image|> where an image stands, which the
processor widens into the image's slot), the same ids `MMGPT.prompt` makes (tested). Pixels come from
transformers' ViT image processor set to mmgpt's size, interpolation, mean and std. One difference from
`MMGPT.chat`: as with every transformers processor, control-token look-alikes in message text are read as
control tokens here, where `MMGPT` keeps them plain text.
"""

from __future__ import annotations

from transformers import AutoProcessor, ProcessorMixin, ViTImageProcessor
from transformers.image_utils import PILImageResampling

from mmgpt.modeling import MMGPTConfig
from mmgpt.tokenizer import CONTROL_TOKENS

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<|image|>{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


class MMGPTTransformersProcessor(ProcessorMixin):
    """Tokenizer + ViT image processor + chat template; each <|image|> in the text becomes the image's slot."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens: int = 1, chat_template=None, **kwargs):
        self.num_image_tokens = num_image_tokens
        self.image_token = CONTROL_TOKENS["image"]
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return CONTROL_TOKENS["image_start"] + self.image_token * self.num_image_tokens + CONTROL_TOKENS["image_end"]


def transformers_processor(tokenizer, size: tuple[int, int], mean: tuple, std: tuple, interpolation: str,
                           num_image_tokens: int) -> MMGPTTransformersProcessor:
    """The transformers processor equal to mmgpt's own: the same tokenizer, image size and normalisation."""
    image_processor = ViTImageProcessor(
        do_resize=True, size={"height": size[0], "width": size[1]}, resample=PILImageResampling[interpolation.upper()],
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(mean), image_std=list(std),
    )
    return MMGPTTransformersProcessor(image_processor, tokenizer, num_image_tokens=num_image_tokens)


AutoProcessor.register(MMGPTConfig, MMGPTTransformersProcessor)
