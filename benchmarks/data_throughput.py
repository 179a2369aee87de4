"""How fast the input pipeline feeds the model at the real recipe's image size, against how fast the model eats.

Realistic JPEGs (500x375, quality 90, photo-like content) in image chats, transformed for SigLIP-B/16 at 224 px,
through mmgpt's training loader (`mmgpt.data.loader.batch_loader` over a `StepSampler`) with 0, 1, 2 and 4 decoding
workers; beside it, the samples/s of the real architecture's training step on this machine (random weights) and
the samples/s a GPU would take at a stated MFU (`mmgpt estimate`'s FLOPs per sample).

    python benchmarks/data_throughput.py [--images 512 --batch-size 64 --steps 40 --repeats 3 --workers 0,1,2,4]
"""

from __future__ import annotations

import argparse
import json
import warnings
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmgpt.build import build
from mmgpt.config import load_config
from mmgpt.data.dataset import EncodedDataset
from mmgpt.data.loader import StepSampler, batch_loader, running
from mmgpt.data.formats import read_jsonl
from mmgpt.estimate import GPUS, estimate

ROOT = Path(__file__).resolve().parents[1]
REAL_SHAPE = ["model.vision.pretrained=", "model.text.pretrained=",
              "model.text.config={model_type: gpt2, vocab_size: 50257}", "train.freeze=[vision]"]


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> Image.Image:
    """Smooth colour fields with edges and grain: JPEG decodes it at the cost of a photograph of its size."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(x * rng.uniform(2, 12) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(2, 12)) for _ in range(3)]
    pixels = (np.stack(channels, -1) * 90 + 128 + rng.normal(0, 12, (height, width, 3))).clip(0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def write_set(folder: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    questions = ["What is in the picture?", "Describe the colours.", "Is it day or night?", "What stands out?"]
    with open(folder / "train.jsonl", "w") as handle:
        for index in range(count):
            photo_like(rng).save(folder / "images" / f"{index}.jpg", quality=90)
            chat = [{"role": "user", "content": [{"type": "image", "image": f"images/{index}.jpg"},
                                                 {"type": "text", "text": questions[index % 4]}]},
                    {"role": "assistant", "content": "A field of soft colours with a few sharp edges and grain."}]
            handle.write(json.dumps({"messages": chat}) + "\n")
    return folder / "train.jsonl"


def loader_rate(dataset: EncodedDataset, pad: int, batch_size: int, workers: int, steps: int) -> float:
    """Samples/s delivered by the loader over `steps` batches, from its creation (workers' start included) to the
    last batch: enough batches that the prefetched ones do not flatter it."""
    sampler = StepSampler(dataset.lengths, batch_size, seed=0, first_step=0, last_step=steps)
    started = time.perf_counter()
    with running(batch_loader(dataset, sampler, pad, workers, torch.device("cpu"))) as batches:
        for _ in range(steps):
            next(batches)
        return steps * batch_size / (time.perf_counter() - started)


def model_rate(config, dataset: EncodedDataset, pad: int, batch_size: int, steps: int) -> float:
    """Samples/s of the real architecture's training step (forward, backward, AdamW) on this machine."""
    processor, model = build(config.model, [])
    model.train()
    for name, parameter in model.vision.named_parameters():
        parameter.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sampler = StepSampler(dataset.lengths, batch_size, seed=0, first_step=0, last_step=steps + 1)
    with running(batch_loader(dataset, sampler, pad, 0, torch.device("cpu"))) as batches:
        batches = list(batches)
    times = []
    for batch in batches:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    return batch_size / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="batches timed per measurement (epochs repeat)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", default="0,1,2,4")
    parser.add_argument("--model-batch", type=int, default=8, help="batch of the CPU model-rate measurement")
    parser.add_argument("--gpu", default="h100", choices=list(GPUS))
    parser.add_argument("--mfu", type=float, default=0.35)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores, on purpose

    config = load_config(ROOT / "configs" / "siglip-gpt2-stage1.yaml", REAL_SHAPE)
    with tempfile.TemporaryDirectory() as folder:
        data = write_set(Path(folder), args.images)
        config.data.train = str(data)
        samples, _ = read_jsonl(data)
        texts = [s.text for x in samples for t in x.turns for s in t.segments if not s.is_image]
        processor, _ = build(config.model, texts)
        dataset = EncodedDataset(samples, processor, 1024)
        steps = args.steps
        print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}; {args.images} JPEGs 500x375 q90 -> 224 px, batch {args.batch_size}")
        print(f"{'workers':>7}  {'samples/s (median)':>18}  {'min':>6}  {'max':>6}")
        for workers in (int(w) for w in args.workers.split(",")):
            rates = [loader_rate(dataset, processor.special.pad, args.batch_size, workers, steps)
                     for _ in range(args.repeats)]
            print(f"{workers:>7}  {statistics.median(rates):>18.0f}  {min(rates):>6.0f}  {max(rates):>6.0f}")
        cpu_rate = model_rate(config, dataset, processor.special.pad, args.model_batch, 4)
        print(f"model training step on this CPU (bf16 autocast, batch {args.model_batch}): {cpu_rate:.1f} samples/s")
        figures = estimate(config, gpus=1, gpu=args.gpu, mfu=args.mfu, data=str(data))
        gpu_rate = GPUS[args.gpu][0] * 1e12 * args.mfu / figures["flops_per_sample"]
        print(f"one {args.gpu} at {args.mfu:.0%} MFU would take {gpu_rate:.0f} samples/s "
              f"({figures['flops_per_sample'] / 1e9:.1f} GFLOP a sample, stage 2)")


if __name__ == "__main__":
    main()
