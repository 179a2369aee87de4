"""The composite model: timm ViT -> projector -> any transformers causal LM, as one `PreTrainedModel`.

Image features replace the embeddings of the image-slot tokens, so an image sits in the token stream exactly where
it stands in the text. They are computed at prefill only: `generate()` drops `pixel_values` once a KV cache exists.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmgpt.processing import IGNORE_INDEX
from mmgpt.projector import Projector
from mmgpt.vision import VisionEncoder

# Decoders whose logits are `lm_head(last hidden state)` and nothing else; others take the decoder's own loss path.
PLAIN_HEAD_DECODERS = frozenset({"gpt2", "llama", "lfm2", "mistral", "qwen2", "qwen3", "smollm3"})
# Decoders where tokens meet only in attention, masked by transformers' packed-sequence masks (restarting
# positions, no attention mask): packed samples cannot see each other. Not LFM2: its convolutions cross samples.
PACKABLE_DECODERS = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "smollm3"})


class MMGPTConfig(PretrainedConfig):
    """Vision (timm name + kwargs), projector and text (any causal-LM config) settings; `config.json` on disk."""

    model_type = "mmgpt"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2")}

    text_config: dict | PretrainedConfig | None = None
    vision_model_name: str = "vit_tiny_patch16_224"
    vision_kwargs: dict | None = None
    vision_pretrained: str = ""
    vision_fused_attention: bool = True
    vision_conv_stem: bool = False
    vision_conv_stem_depth: int | list[int] = 1
    text_pretrained: str = ""
    text_attn_implementation: str = ""  # "" = transformers' default for the decoder; "eager" is fastest for tiny ones
    projector_shuffle_factor: int = 1
    projector_pool_size: int = 0
    projector_grid_embedding: bool = False
    projector_norm: bool = False
    image_token_id: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any):
        super().__post_init__(**kwargs)
        if self.vision_kwargs is None:
            self.vision_kwargs = {}


class MMGPTForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """Answers next-token questions about text with images in it; `generate()` works with every strategy."""

    config: MMGPTConfig
    config_class = MMGPTConfig
    base_model_prefix = "mmgpt"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: MMGPTConfig):
        super().__init__(config)
        self.vision = VisionEncoder(
            config.vision_model_name, config.vision_kwargs, "", config.vision_fused_attention, config.vision_conv_stem,
            config.vision_conv_stem_depth,
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config, **self._attention_kwargs(config))
        self.projector = Projector(
            self.vision.width, config.text_config.hidden_size, self.vision.grid_size, config.projector_shuffle_factor,
            config.projector_pool_size, config.projector_grid_embedding, config.projector_norm,
        )
        # The blocks FSDP wraps (and device maps keep whole): found from the towers, for any decoder and ViT.
        self._no_split_modules = [*(self.language_model._no_split_modules or []), type(self.vision.vit.blocks[0]).__name__]
        self.post_init()

    @functools.cached_property
    def _cache_argument(self) -> str:
        """The decoder's name for its KV cache: `cache` in transformers' own models, `past_key_values` in decoders
        written to the older convention (remote code)."""
        return "cache" if "cache" in inspect.signature(self.language_model.forward).parameters else "past_key_values"

    @classmethod
    def from_parts(cls, config: MMGPTConfig) -> "MMGPTForConditionalGeneration":
        """Build a fresh model, loading the pretrained vision and text weights the config names (hub or local)."""
        model = cls(config)
        if config.vision_pretrained:
            model.vision = VisionEncoder(
                config.vision_model_name,
                config.vision_kwargs,
                config.vision_pretrained,
                config.vision_fused_attention,
                config.vision_conv_stem,
                config.vision_conv_stem_depth,
            )
        if config.text_pretrained:
            model.language_model = AutoModelForCausalLM.from_pretrained(
                config.text_pretrained, config=config.text_config, **cls._attention_kwargs(config)
            )
        return model

    @staticmethod
    def _attention_kwargs(config: MMGPTConfig) -> dict:
        return {"attn_implementation": config.text_attn_implementation} if config.text_attn_implementation else {}

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Only the projector is ours to initialise: timm and the decoder initialise their own modules."""
        if isinstance(module, torch.nn.Linear) and any(module is m for m in self.projector.modules()):
            torch.nn.init.normal_(module.weight, std=0.02)
            torch.nn.init.zeros_(module.bias)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute activations in backward, block by block, in the decoder (transformers) and the ViT (timm)."""
        super().gradient_checkpointing_enable(gradient_checkpointing_kwargs or {"use_reentrant": False})
        self.vision.vit.set_grad_checkpointing(True)

    def compile_blocks(self) -> None:
        """`torch.compile` each decoder layer and ViT block in place, with dynamic shapes: one compilation serves
        every block of a kind and every batch length, and names, weights and checkpoints stay as they are."""
        for module in self.modules():
            if type(module).__name__ in self._no_split_modules:
                module.compile(dynamic=True)

    @property
    def num_image_tokens(self) -> int:
        return self.projector.num_tokens(self.vision.num_patches)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.language_model.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(num_images, 3, H, W) -> (num_images, num_image_tokens, text width)."""
        return self.projector(self.vision(pixel_values.to(self.vision.vit.patch_embed.proj.weight.dtype)))

    def embed_with_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each run of image-slot tokens replaced by one image's features, in reading order."""
        inputs_embeds = self.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.config.image_token_id
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if input_ids.device.type == "cpu" or not self.training:
            # Counting the slots waits for the device: training batches on a GPU skip it (the processor makes one
            # slot per image by construction); on a CPU it is free, and at inference it is one wait per prompt.
            num_slots = int(image_mask.sum())
            if num_slots != num_images * self.num_image_tokens:
                raise ValueError(
                    f"the input has {num_slots} image-slot tokens ({num_slots / self.num_image_tokens:g} images of "
                    f"{self.num_image_tokens} tokens) but {num_images} images were given"
                )
        if num_images == 0:
            return inputs_embeds
        features = self.get_image_features(pixel_values).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), features.reshape(-1, features.shape[-1]))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ):
        cache = cache if cache is not None else past_key_values  # transformers >= 5.24 says `cache`
        if inputs_embeds is None:
            prefill = cache is None or cache.get_seq_length() == 0
            if prefill or pixel_values is not None:
                inputs_embeds = self.embed_with_images(input_ids, pixel_values)
            else:
                inputs_embeds = self.get_input_embeddings()(input_ids)
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # Positions count real tokens only, so left-padded rows see the same positions as unpadded ones.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        if labels is not None:
            use_cache = False  # a training forward: no cache, which would also turn off packed-sequence masks
        if labels is not None and self._plain_head:
            return self._labelled_loss(inputs_embeds, attention_mask, position_ids, labels,
                                       kwargs.pop("num_items_in_batch", None), **kwargs)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{self._cache_argument: cache},
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _labelled_loss(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                       position_ids: torch.Tensor | None, labels: torch.Tensor,
                       num_items_in_batch: int | torch.Tensor | None, **kwargs: Any) -> CausalLMOutputWithPast:
        """The decoder's loss with logits only where there is a label: in chat data most positions (images, system
        and user turns, padding) have none, and at a large vocabulary the logits are a third of the forward's work.
        Equal to the decoder's own loss (tested); `logits` holds the labelled positions' rows only, flattened."""
        hidden = self.language_model.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                                position_ids=position_ids, use_cache=False, **kwargs).last_hidden_state
        targets = labels[:, 1:]
        labelled = targets != IGNORE_INDEX
        logits = self.language_model.get_output_embeddings()(hidden[:, :-1][labelled])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[labelled], reduction="sum")
        loss = loss / (labelled.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @property
    def _plain_head(self) -> bool:
        """Whether the decoder's logits are its output layer applied to its last hidden state, nothing more (no
        soft-capping or scaling), so that they may be taken at some positions only."""
        head = self.language_model.get_output_embeddings()
        return self.config.text_config.model_type in PLAIN_HEAD_DECODERS and type(head) is torch.nn.Linear


AutoConfig.register("mmgpt", MMGPTConfig)
AutoModelForCausalLM.register(MMGPTConfig, MMGPTForConditionalGeneration)
AutoModelForImageTextToText.register(MMGPTConfig, MMGPTForConditionalGeneration)
