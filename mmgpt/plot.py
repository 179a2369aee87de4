"""The loss curve of a run, drawn from its metrics JSONL."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: Path, out_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        axis.plot(steps, losses, label="train loss", linewidth=0.5, alpha=0.35)
        window = max(1, len(losses) // 40)
        smoothed = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                    for i in range(len(losses))]
        axis.plot(steps, smoothed, label=f"train loss (mean of {window} steps)", linewidth=1.5)
    if evals:
        axis.plot(*zip(*evals), "o-", label="eval loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
