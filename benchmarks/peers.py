"""mmgpt and transformers' LlavaForConditionalGeneration built at the same sizes, for the fair benchmarks.

Both sides get the same decoder (Llama layout: width, depth, heads, KV heads, MLP, vocabulary) and a ViT of the
same shape (timm's for mmgpt, CLIP's for Llava). The one difference is each stack's own design: mmgpt merges
patches with its pixel shuffle before the decoder (49 tokens for a ViT-B/16 at 224 px with shuffle 2), Llava
hands the decoder every patch (196). Also: the machine's matmul ceilings, and peak memory around a call.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mmgpt.data.collate import collate, pack
from mmgpt.modeling import MMGPTConfig, MMGPTForConditionalGeneration
from mmgpt.processing import Encoded


@dataclass(frozen=True)
class Size:
    image_size: int
    patch_size: int
    vision_width: int
    vision_depth: int
    vision_heads: int
    vision_mlp: int
    shuffle: int
    width: int
    depth: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    attention: str  # the decoder's and the ViTs' attention implementation, the same on both sides

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


SIZES = {
    # the tiny-shapes recipe's towers (its decoder in Llama layout), eager attention as that recipe uses
    "tiny": Size(64, 8, 192, 4, 3, 384, 4, 256, 4, 4, 4, 1024, 1024, "eager"),
    # ViT-B/16 at 224 px and a SmolLM2-135M-like decoder cut to 12 layers: matrices dominate
    "small": Size(224, 16, 768, 12, 12, 3072, 2, 576, 12, 9, 3, 1536, 49152, "sdpa"),
}


def llama_config(size: Size) -> LlamaConfig:
    return LlamaConfig(hidden_size=size.width, intermediate_size=size.mlp, num_hidden_layers=size.depth,
                       num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, vocab_size=size.vocab,
                       max_position_embeddings=2048, tie_word_embeddings=False)


def build_mmgpt(size: Size) -> MMGPTForConditionalGeneration:
    vision = {"img_size": size.image_size, "patch_size": size.patch_size, "embed_dim": size.vision_width,
              "depth": size.vision_depth, "num_heads": size.vision_heads, "mlp_ratio": size.vision_mlp / size.vision_width}
    config = MMGPTConfig(text_config=llama_config(size).to_dict(), vision_model_name="vit_base_patch16_224",
                         vision_kwargs=vision, vision_fused_attention=size.attention == "sdpa",
                         text_attn_implementation=size.attention, projector_shuffle_factor=size.shuffle,
                         image_token_id=size.vocab - 1)
    return MMGPTForConditionalGeneration(config)


def build_llava(size: Size) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=size.vision_width, intermediate_size=size.vision_mlp,
                              num_hidden_layers=size.vision_depth, num_attention_heads=size.vision_heads,
                              image_size=size.image_size, patch_size=size.patch_size)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=llama_config(size).to_dict(),
                         image_token_index=size.vocab - 1, image_seq_length=size.patches, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration._from_config(config, attn_implementation=size.attention).to(torch.float32)


def image_tokens(side: str, size: Size) -> int:
    return size.patches // size.shuffle**2 if side == "mmgpt" else size.patches


def chat_batch(side: str, size: Size, batch: int, prompt: int, answer: int, seed: int = 0, packed: bool = False) -> dict:
    """Chat rows: a prompt of about `prompt` text tokens around one image, then an answer of about `answer`
    labelled tokens; lengths vary by row (0.5-1.5x, as a loader without length grouping gives) and are the same on
    both sides. Right-padded by mmgpt's `collate`, or packed by its `pack`."""
    generator = torch.Generator().manual_seed(seed)
    image = image_tokens(side, size)
    samples = []
    for _ in range(batch):
        prompt_length = int(prompt * (0.5 + torch.rand((), generator=generator)))
        answer_length = max(2, int(answer * (0.5 + torch.rand((), generator=generator))))
        text = torch.randint(0, size.vocab - 1, (prompt_length + answer_length,), generator=generator)
        ids = torch.cat([text[:8], torch.full((image,), size.vocab - 1), text[8:]]).tolist()
        labels = [-100] * (len(ids) - answer_length) + ids[-answer_length:]
        pixels = torch.randn(1, 3, size.image_size, size.image_size, generator=generator)
        samples.append(Encoded(ids, labels, pixels))
    return pack(samples, pad_id=0) if packed else collate(samples, pad_id=0)


def matmul_ceiling(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """The best FLOP/s of an n x n matmul in `dtype` on this device: what a step could reach at most."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def peak_memory(fn: Callable[[], object]) -> float:
    """Bytes of memory `fn` takes at its peak above what was in use before: CUDA's allocator, or on a CPU the
    process's resident set (Linux's high-water mark). Call it in a fresh process: on a CPU, memory an earlier
    call freed stays resident and would hide this call's needs."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - before
    before = _rss_kib("VmRSS:")
    fn()
    return (_rss_kib("VmHWM:") - before) * 1024


def in_fresh_process(argv: list[str]) -> dict:
    """Run this script again with `argv` and read the JSON object its last line prints."""
    import subprocess
    import sys

    output = subprocess.run([sys.executable, sys.argv[0], *argv], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def median_min(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}/{min(values):.3f}"
