"""The end-of-run pictures and summary: ``curves.png`` (loss, accuracy, lr), ``confusion.png`` and
``report.md`` in the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .logging import read_metrics

__all__ = ["plot_curves", "plot_confusion", "write_report"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics_path: str | Path, out: str | Path) -> None:
    recs = read_metrics(metrics_path)
    tr = [r for r in recs if r["kind"] == "train"]
    ep = [r for r in recs if r["kind"] == "epoch"]
    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    if tr:
        ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], lw=0.8, label="train (per step)")
    if ep:
        ax[0].plot([r["step"] for r in ep], [r["val_loss"] for r in ep], "o-", label="val")
        ax[1].plot([r["epoch"] + 1 for r in ep], [r["top1"] for r in ep], "o-", label="top-1")
        if "ema_top1" in ep[0]:
            ax[1].plot([r["epoch"] + 1 for r in ep], [r["ema_top1"] for r in ep], "s--", label="EMA top-1")
    if tr:
        ax[2].plot([r["step"] for r in tr], [r["lr"] for r in tr])
    for a, t, xl in zip(ax, ("loss", "val accuracy (%)", "learning rate"), ("step", "epoch", "step")):
        a.set_title(t)
        a.set_xlabel(xl)
        a.grid(alpha=0.3)
    ax[0].legend()
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: list[list[int]], classes: list[str], out: str | Path, title: str = "") -> None:
    import numpy as np

    plt = _plt()
    cm = np.asarray(confusion, dtype=float)
    n = len(cm)
    norm = cm / np.maximum(1, cm.sum(1, keepdims=True))
    size = max(5.0, min(20.0, 0.6 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:  # numbers and names are unreadable beyond that
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (counts; colour = row-normalised)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def write_report(run_dir: str | Path, cfg, result: dict[str, Any], classes: list[str]) -> Path:
    d = Path(run_dir)
    plot_curves(d / "metrics.jsonl", d / "curves.png")
    recs = [r for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "epoch"]
    if "confusion" not in result:
        # `--resume auto` of a run whose last checkpoint is its end (e.g. killed while writing the final
        # weights): no epoch ran in this process, so the figures come from metrics.jsonl; the confusion
        # matrix and per-class accuracy of the earlier process are kept as they are
        if not recs:
            return d / "report.md"
        result = {**recs[-1], "best_top1": max(r["top1"] for r in recs), "per_class_acc": []}
    else:
        plot_confusion(result["confusion"], classes, d / "confusion.png")
    lines = [
        f"# {cfg.model} on {cfg.dataset}",
        "",
        f"Final epoch: **top-1 {result['top1']:.2f}%**, top-5 {result['top5']:.2f}%, val loss "
        f"{result['val_loss']:.4f} ({result['epoch'] + 1} epochs; best top-1 {result['best_top1']:.2f}%).",
        f"Training time {sum(r['epoch_time'] for r in recs):.0f} s over {len(recs)} epochs.",
        "",
        "| epoch | train loss | val loss | top-1 | top-5 | img/s |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['epoch'] + 1} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['top1']:.2f} "
            f"| {r['top5']:.2f} "
            f"| {r['img_per_s']:.0f} |"
            for r in recs
        ],
        "",
        "## Per-class accuracy (final epoch)",
        "",
        "| class | accuracy |",
        "|---|---|",
        *[f"| {c} | {a:.2f} |" for c, a in zip(classes, result["per_class_acc"])],
        "",
        "![curves](curves.png)",
        "",
        "![confusion](confusion.png)",
        "",
        "Files: `config.yaml` (repeat with `davit train --config config.yaml`), `metrics.jsonl`, `tb/` "
        "(TensorBoard), `model.safetensors`, `checkpoints/`.",
    ]
    p = d / "report.md"
    p.write_text("\n".join(lines) + "\n")
    return p
