"""Generation speed: mmgpt vs transformers' Llava with the same Llama decoder, and a chat's second turn.

Part 1, both sides built as in bench_train.py (same decoder and ViT shape), greedy `generate()` on left-padded
prompts of one image and about `--prompt` text tokens, alternating the sides repetition by repetition:
time to first token (a 1-token generate) and decode tokens/s (the extra time of `--new` forced tokens), at
batch 1 and 8. Part 2, mmgpt's `MMGPT.chat` at the same size: turn 1 holds two images and about 400 text tokens;
the time to first token of turn 2 (the history, the reply and a new question) with the conversation's KV cache
and without it, against turn 1's.

    python benchmarks/bench_generate.py [--sizes tiny small] [--dtypes fp32 bf16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from PIL import Image

from peers import SIZES, Size, build_llava, build_mmgpt, image_tokens, median_min, timed

from mmgpt.build import build
from mmgpt.config import ModelConfig
from mmgpt.inference import MMGPT


def prompt_batch(side: str, size: Size, batch: int, prompt: int, seed: int = 0) -> dict:
    """Left-padded prompts of one image and 0.5-1.5x `prompt` text tokens, the same text on both sides."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        text = torch.randint(0, size.vocab - 1, (int(prompt * (0.5 + torch.rand((), generator=generator))),),
                             generator=generator)
        rows.append(torch.cat([text[:8], torch.full((image_tokens(side, size),), size.vocab - 1), text[8:]]))
    length = max(len(row) for row in rows)
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - len(row) :], attention_mask[index, length - len(row) :] = row, 1
    pixels = torch.randn(batch, 3, size.image_size, size.image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels}


def generate(model: torch.nn.Module, inputs: dict, new_tokens: int) -> None:
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)


def race(size_name: str, dtype: torch.dtype, repeats: int, prompt: int, new_tokens: int) -> dict:
    size = SIZES[size_name]
    torch.manual_seed(0)
    models = {"mmgpt": build_mmgpt(size).to(dtype).eval(), "llava": build_llava(size).to(dtype).eval()}
    results = {}
    for batch in (1, 8):
        inputs = {name: prompt_batch(name, size, batch, prompt) for name in models}
        for name, model in models.items():
            inputs[name]["pixel_values"] = inputs[name]["pixel_values"].to(dtype)
            generate(model, inputs[name], 2)
        first = {name: [] for name in models}
        whole = {name: [] for name in models}
        for repeat in range(repeats):
            for name in (models if repeat % 2 == 0 else reversed(list(models))):
                first[name].append(timed(lambda: generate(models[name], inputs[name], 1)))
                whole[name].append(timed(lambda: generate(models[name], inputs[name], 1 + new_tokens)))
        for name in models:
            decode = [w - f for w, f in zip(whole[name], first[name])]
            results[(name, batch)] = {"ttft": first[name], "decode_tokens_per_s": batch * new_tokens / statistics.median(decode),
                                      "decode_seconds": decode}
    return results


def second_turn(size_name: str, dtype: torch.dtype, repeats: int) -> dict:
    """Turn 1: a system message and a question with two images in about 400 text tokens; turn 2: the history, a
    24-token reply and a short question. Times to first token (1-token chats)."""
    size = SIZES[size_name]
    words = [f"w{index}" for index in range(300)]
    config = ModelConfig()
    config.vision.name, config.vision.fused_attention = "vit_base_patch16_224", size.attention == "sdpa"
    config.vision.kwargs = {"img_size": size.image_size, "patch_size": size.patch_size, "embed_dim": size.vision_width,
                            "depth": size.vision_depth, "num_heads": size.vision_heads,
                            "mlp_ratio": size.vision_mlp / size.vision_width}
    config.projector_shuffle_factor = size.shuffle
    config.text.config = {"model_type": "llama", "hidden_size": size.width, "intermediate_size": size.mlp,
                          "num_hidden_layers": size.depth, "num_attention_heads": size.heads,
                          "num_key_value_heads": size.kv_heads, "max_position_embeddings": 2048}
    config.text.attn_implementation, config.text.bpe_vocab_size = size.attention, 1024
    torch.manual_seed(0)
    processor, model = build(config, [" ".join(words)] * 4)
    api = MMGPT(model.to(dtype), processor)
    generator = torch.Generator().manual_seed(1)
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (180,), generator=generator))

    def picture(seed: int) -> dict:
        pixels = torch.randint(0, 255, (size.image_size, size.image_size, 3), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(seed))
        return {"type": "image", "image": Image.fromarray(pixels.numpy())}

    turn_1 = [{"role": "system", "content": "You describe pictures."},
              {"role": "user", "content": [picture(0), picture(1), {"type": "text", "text": text}]}]
    tokens_1 = len(api.prompt(turn_1, 1).ids)
    turn_2 = turn_1 + [{"role": "assistant", "content": " ".join(words[:24])},
                       {"role": "user", "content": "And what is in the corner of the second one?"}]
    times: dict[str, list[float]] = {"turn 1": [], "turn 2 cached": [], "turn 2 uncached": []}
    for _ in range(repeats + 1):
        api.prefix_cache.clear()
        times["turn 1"].append(timed(lambda: api.chat(turn_1, max_new_tokens=1)))
        api.chat(turn_1, max_new_tokens=24)  # the reply's keys and values join the cache, as in a real chat
        times["turn 2 cached"].append(timed(lambda: api.chat(turn_2, max_new_tokens=1)))
        times["turn 2 uncached"].append(timed(lambda: api.chat(turn_2, max_new_tokens=1, cache=False)))
    times = {name: values[1:] for name, values in times.items()}  # the first round warms up
    return {"tokens_turn_1": tokens_1, "tokens_turn_2": len(api.prompt(turn_2, 1).ids), "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "small"])
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=64, help="text tokens a prompt (0.5-1.5x across a batch)")
    parser.add_argument("--new", type=int, default=32, help="tokens decoded after the first")
    parser.add_argument("--json", help="write the full results here")
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads; speedup = llava's median / mmgpt's (time) or mmgpt's / llava's (tokens/s)")
    report = []
    for size in args.sizes:
        for dtype_name in args.dtypes:
            dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
            results = race(size, dtype, args.repeats, args.prompt, args.new)
            print(f"\n{size}, {dtype_name}: {args.prompt} text tokens a prompt, {args.new} decoded tokens")
            print(f"{'batch':>5} {'side':<6} {'TTFT s med/min':>15} {'decode tok/s':>12} {'TTFT speedup':>12} "
                  f"{'decode speedup':>14}")
            for batch in (1, 8):
                ours, theirs = results[("mmgpt", batch)], results[("llava", batch)]
                for name in ("mmgpt", "llava"):
                    side = results[(name, batch)]
                    print(f"{batch:>5} {name:<6} {median_min(side['ttft']):>15} {side['decode_tokens_per_s']:>12.1f}"
                          + (f" {statistics.median(theirs['ttft']) / statistics.median(ours['ttft']):>11.2f}x "
                             f"{ours['decode_tokens_per_s'] / theirs['decode_tokens_per_s']:>13.2f}x" if name == "mmgpt" else ""))
            chat = second_turn(size, dtype, args.repeats)
            turn_1 = statistics.median(chat["times"]["turn 1"])
            print(f"chat: turn 1 {chat['tokens_turn_1']} tokens (2 images), turn 2 {chat['tokens_turn_2']} tokens")
            for name, values in chat["times"].items():
                print(f"  {name:<16} TTFT {median_min(values)} s  ({statistics.median(values) / turn_1:.2f}x turn 1)")
            report.append({"size": size, "dtype": dtype_name, "chat": chat,
                           "race": {f"{name} batch {batch}": value for (name, batch), value in results.items()}})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
