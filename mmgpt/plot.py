"""Plots: the loss curve of a run (from its metrics JSONL) and few-shot accuracy against the number of shots."""

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


def plot_few_shot(results: list[dict], out_path: Path, title: str) -> None:
    """Accuracy (with the images, and blind) against the number of solved examples in the context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = [result["shots"] for result in results]
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(shots, [result["accuracy"] for result in results], "o-", label="with images")
    axis.plot(shots, [result["blind_accuracy"] for result in results], "s--", label="blind (blank images)")
    axis.set_xticks(shots)
    axis.set_xlabel("shots (solved examples in context)")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1)
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
