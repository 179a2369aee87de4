"""mmgpt against transformers' LlavaForConditionalGeneration at the same sizes: train step and greedy generation.

Both models get the same vision size (ViT width 192, depth 6, 64x64 images, patch 8), a decoder of the same size
(4 layers, width 256, MLP 1024, eager attention: GPT-2 for mmgpt, Llama for Llava, which needs one), the same number of image tokens per image (64: no pixel shuffle, since
Llava has none) and the same batches. Reports median and minimum seconds over repetitions and the ratio
Llava / mmgpt (> 1: mmgpt is faster).

    python benchmarks/vs_llava.py [--repeats 10] [--batch 16] [--dtype bf16|fp32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, GPT2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mmgpt.modeling import MMGPTConfig, MMGPTForConditionalGeneration

VOCAB = 1024
IMAGE_TOKEN = VOCAB - 1
VISION = {"img_size": 64, "patch_size": 8, "embed_dim": 192, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0}


def text_config() -> GPT2Config:
    return GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=VOCAB, n_positions=512, activation_function="gelu",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def build_mmgpt() -> torch.nn.Module:
    config = MMGPTConfig(text_config=text_config().to_dict(), vision_kwargs=VISION, vision_fused_attention=False,
                         text_attn_implementation="eager", image_token_id=IMAGE_TOKEN)
    return MMGPTForConditionalGeneration(config)


def build_llava() -> torch.nn.Module:
    vision = CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=3,
                              image_size=64, patch_size=8)
    # Llava's decoder must be Llama-style (it ties `embed_tokens`): the same width, depth, heads and MLP size.
    text = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=512)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_index=IMAGE_TOKEN, image_seq_length=64, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="eager").to(torch.float32)


def batch(batch_size: int, text_tokens: int = 24) -> dict:
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, VOCAB - 1, (batch_size, text_tokens), generator=generator)
    image = torch.full((batch_size, 64), IMAGE_TOKEN)
    input_ids = torch.cat([text[:, :4], image, text[:, 4:]], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(batch_size, 3, 64, 64, generator=generator)}


def timed(fn, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {"mmgpt": build_mmgpt(), "llava": build_llava()}
    inputs = batch(args.batch)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    results: dict[str, dict[str, list[float]]] = {}
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step() -> None:
            model.train()
            with autocast:
                loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        def generate() -> None:
            model.eval()
            with torch.inference_mode(), autocast:
                model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)

        results[name] = {"train step": timed(train_step, args.repeats), "generate 16 tokens": timed(generate, args.repeats)}
        print(f"{name}: {params / 1e6:.2f}M parameters")
    print(f"\nbatch {args.batch}, {args.dtype}, {args.repeats} repeats, {torch.get_num_threads()} threads")
    print(f"{'':20} {'mmgpt median/min':>18} {'llava median/min':>18} {'llava/mmgpt (median)':>22}")
    for task in results["mmgpt"]:
        ours, theirs = results["mmgpt"][task], results["llava"][task]
        print(f"{task:20} {statistics.median(ours):8.3f}/{min(ours):.3f}s {statistics.median(theirs):9.3f}/{min(theirs):.3f}s"
              f" {statistics.median(theirs) / statistics.median(ours):18.2f}x")


if __name__ == "__main__":
    main()
