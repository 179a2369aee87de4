"""Training speed: mmgpt vs transformers' Llava with the same Llama decoder and a ViT of the same shape.

One process, both models built side by side; each repetition times one optimizer step (forward, backward, AdamW)
of each side, alternating which goes first, so drifts in the machine's speed hit both alike. Reported per size and
precision: seconds per step (median/min), samples/s, text tokens/s (the same text on both sides), FLOPs per step
as torch counts them (each side's own work), achieved FLOP/s against the matmul ceiling measured in the same run,
and peak memory of two steps (optimizer state included) above the built model, each side in a fresh process.
`--ablate` adds mmgpt computing logits at every position (the decoder's own loss) and mmgpt with the batch packed
(`train.packing`) instead of padded.

    python benchmarks/bench_train.py [--sizes tiny small] [--dtypes bf16 fp32] [--repeats 10] [--ablate]
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from peers import (SIZES, build_llava, build_mmgpt, chat_batch, in_fresh_process, matmul_ceiling, median_min,
                   peak_memory, timed)

from mmgpt.modeling import MMGPTForConditionalGeneration

# Per size: batch, prompt text tokens, answer tokens, whether the ViT trains (tiny: everything, as the tiny
# recipe; small: the vision tower frozen, as stage 2 of the real recipe and LLaVA's fine-tuning).
WORKLOADS = {"tiny": (32, 16, 4, True), "small": (8, 192, 32, False)}


class FullLogits(MMGPTForConditionalGeneration):
    """mmgpt with its decoder's own loss: logits at every position."""

    @property
    def _plain_head(self) -> bool:
        return False


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, autocast) -> None:
    with autocast:
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def counted_flops(model: torch.nn.Module, batch: dict, autocast) -> float:
    """FLOPs of one forward and backward; attention in its plain form so that torch's counter sees it."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        with autocast:
            loss = model(**batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def build_side(name: str, size_name: str) -> torch.nn.Module:
    size = SIZES[size_name]
    torch.manual_seed(0)
    model = build_llava(size) if name == "llava" else build_mmgpt(size)
    if name == "mmgpt full logits":
        model.__class__ = FullLogits
    model.train()
    tower = model.vision if isinstance(model, MMGPTForConditionalGeneration) else model.model.vision_tower
    tower.requires_grad_(WORKLOADS[size_name][3])
    return model


def side_step(name: str, size_name: str, model: torch.nn.Module, autocast) -> tuple[dict, object]:
    batch_size, prompt, answer, _ = WORKLOADS[size_name]
    batch = chat_batch("llava" if name == "llava" else "mmgpt", SIZES[size_name], batch_size, prompt, answer,
                       packed=name == "mmgpt packed")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return batch, lambda: train_step(model, optimizer, batch, autocast)


def autocast_for(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


def memory_of(name: str, size_name: str, dtype: str) -> dict:
    """Peak memory of a side's first two steps above its built model (run in a process of its own)."""
    model = build_side(name, size_name)
    _, step = side_step(name, size_name, model, autocast_for(dtype))
    return {"peak": peak_memory(lambda: (step(), step()))}


def run(size_name: str, dtype: str, repeats: int, ablate: bool, ceilings: dict[str, float]) -> dict:
    size = SIZES[size_name]
    batch_size = WORKLOADS[size_name][0]
    names = ["mmgpt", "llava"] + (["mmgpt full logits", "mmgpt packed"] if ablate else [])
    autocast = autocast_for(dtype)
    sides = {}
    for name in names:
        model = build_side(name, size_name)
        batch, step = side_step(name, size_name, model, autocast)
        step()
        memory = in_fresh_process(["--memory-of", name, "--sizes", size_name, "--dtypes", dtype])["peak"]
        sides[name] = {"step": step, "batch": batch, "flops": counted_flops(model, batch, autocast),
                       "memory": memory, "times": [],
                       "parameters": sum(p.numel() for p in model.parameters()),
                       "trained": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    for repeat in range(repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in order:
            sides[name]["times"].append(timed(sides[name]["step"]))
    text_tokens = int(sides["mmgpt"]["batch"]["attention_mask"].sum()) - batch_size * (size.patches // size.shuffle**2)
    padding = 1 - sides["mmgpt"]["batch"]["attention_mask"].float().mean().item()
    report = {"size": size_name, "dtype": dtype, "batch": batch_size, "text_tokens": text_tokens, "padding": padding,
              "sides": {}}
    for name, side in sides.items():
        median = statistics.median(side["times"])
        report["sides"][name] = {
            "seconds": side["times"], "median": median, "min": min(side["times"]),
            "samples_per_s": batch_size / median, "text_tokens_per_s": text_tokens / median,
            "sequence": side["batch"]["input_ids"].shape[1], "rows": side["batch"]["input_ids"].shape[0], "gflop": side["flops"] / 1e9,
            "tflops_per_s": side["flops"] / median / 1e12, "ceiling_share": side["flops"] / median / ceilings[dtype],
            "peak_mb": side["memory"] / 1e6, "parameters_m": side["parameters"] / 1e6,
            "trained_m": side["trained"] / 1e6,
        }
    return report


def print_report(report: dict, ceilings: dict[str, float]) -> None:
    mmgpt = report["sides"]["mmgpt"]
    print(f"\n{report['size']}, {report['dtype']}, batch {report['batch']}, {report['text_tokens']} text tokens a step, "
          f"{report['padding']:.0%} of mmgpt's padded batch is padding (ceiling {ceilings[report['dtype']] / 1e12:.2f} TFLOP/s)")
    print(f"{'side':<18} {'s/step med/min':>15} {'samples/s':>9} {'text tok/s':>10} {'rows x len':>10} {'GFLOP':>7} "
          f"{'TFLOP/s':>7} {'ceiling':>7} {'peak MB':>8} {'params M':>9} {'speedup':>7}")
    for name, side in report["sides"].items():
        print(f"{name:<18} {median_min(side['seconds']):>15} {side['samples_per_s']:>9.2f} "
              f"{side['text_tokens_per_s']:>10.0f} {side['rows']:>5}x{side['sequence']:<4} {side['gflop']:>7.1f} "
              f"{side['tflops_per_s']:>7.3f} {side['ceiling_share']:>7.1%} {side['peak_mb']:>8.0f} "
              f"{side['parameters_m']:>9.2f} {side['median'] / mmgpt['median']:>6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "small"])
    parser.add_argument("--dtypes", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--ablate", action="store_true", help="also time mmgpt with logits at every position")
    parser.add_argument("--json", help="write the full results here")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args.sizes[0], args.dtypes[0])))
        return
    ceilings = {"fp32": matmul_ceiling(torch.float32), "bf16": matmul_ceiling(torch.bfloat16)}
    print(f"{torch.get_num_threads()} threads; matmul ceilings: fp32 {ceilings['fp32'] / 1e12:.3f}, "
          f"bf16 {ceilings['bf16'] / 1e12:.3f} TFLOP/s; speedup = side's median step / mmgpt's")
    reports = []
    for size in args.sizes:
        for dtype in args.dtypes:
            reports.append(run(size, dtype, args.repeats, args.ablate, ceilings))
            print_report(reports[-1], ceilings)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"ceilings": ceilings, "reports": reports}, handle, indent=1)


if __name__ == "__main__":
    main()
