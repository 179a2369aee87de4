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
    """Accuracy (with the images, solid, and blind, dashed, in the same colour) against the number of solved
    examples in the context, one line pair per kind of query."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[int, float, float]]] = {}
    for result in results:
        for kind, scores in result["by_kind"].items():
            curves.setdefault(kind, []).append((result["shots"], scores["accuracy"], scores["blind_accuracy"]))
    figure, axis = plt.subplots(figsize=(6, 4) if len(curves) > 1 else (5, 3.5))
    for index, (kind, points) in enumerate(curves.items()):
        shots, accuracy, blind = zip(*sorted(points))
        colour = f"C{index % 10}"
        axis.plot(shots, accuracy, "o-", color=colour, label=kind if len(curves) > 1 else "with images")
        axis.plot(shots, blind, "s--", color=colour, alpha=0.5,
                  label="blind (blank images), dashed" if index == 0 else None)
    axis.set_xticks(sorted({result["shots"] for result in results}))
    axis.set_xlabel("shots (solved examples in context)")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1.02)
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
