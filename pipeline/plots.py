"""The report's figures, drawn with matplotlib and saved as PNG.

Figures are made with `matplotlib.figure.Figure`, not pyplot: no global state and no GUI backend,
saving renders with Agg whatever backend the user configured.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pipeline.images import label_palette

_PALETTE = np.array(label_palette(), dtype=np.float64).reshape(256, 3) / 255.0
DPI = 100


def colour(value: int) -> tuple[float, float, float]:
    """The colour of a mask value (cluster id + 1, or a ground-truth class) in masks, legend and plots alike."""
    return tuple(_PALETTE[value])


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def cluster_sizes(path: Path, core: list[int], ignored: list[int], labels: list[str]) -> Path:
    """Objects per cluster: core objects in the cluster's colour, those outside the core hatched on top."""
    x = np.arange(len(core))
    figure = Figure(figsize=(max(5.0, 0.4 * len(core) + 1.5), 3.6))
    axes = figure.add_subplot()
    axes.bar(x, core, color=[colour(c + 1) for c in x], edgecolor="black", linewidth=0.5)
    axes.bar(x, ignored, bottom=core, color="white", edgecolor="grey", hatch="//", linewidth=0.5)
    axes.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("objects")
    axes.set_title("objects per cluster (hatched: outside the core)", fontsize=10)
    return _save(figure, path)


def confusion(path: Path, matrix: np.ndarray, row_labels: list[str], column_labels: list[str]) -> Path:
    """A row-normalised confusion matrix (rows: ground-truth classes, columns: predicted ids)."""
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    rows, columns = shares.shape
    figure = Figure(figsize=(max(5.0, 0.32 * columns + 2.5), max(4.0, 0.3 * rows + 2.0)))
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    axes.set_xticks(np.arange(columns), column_labels, rotation=60, ha="right", fontsize=7)
    axes.set_yticks(np.arange(rows), row_labels, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("ground truth")
    axes.set_title("share of each class's pixels")
    figure.colorbar(image, ax=axes, fraction=0.04)
    return _save(figure, path)


def class_iou(path: Path, iou: dict[int, float], labels: dict[int, str]) -> Path:
    """Per-class IoU bars in each class's colour."""
    classes = sorted(iou)
    figure = Figure(figsize=(max(5.0, 0.35 * len(classes) + 1.5), 3.6))
    axes = figure.add_subplot()
    axes.bar(np.arange(len(classes)), [iou[c] for c in classes], color=[colour(c) for c in classes],
             edgecolor="black", linewidth=0.5)
    axes.set_xticks(np.arange(len(classes)), [labels[c] for c in classes], rotation=60, ha="right", fontsize=7)
    axes.set_ylim(0, 1)
    axes.set_ylabel("IoU")
    axes.set_title(f"Per-class IoU (Hungarian), mIoU {np.mean([iou[c] for c in classes]):.3f}")
    return _save(figure, path)


def training_curves(path: Path, log: list[dict]) -> Path:
    """Loss and learning rate per epoch, one line per self-training round (rows of train_log.csv)."""
    figure = Figure(figsize=(8.0, 3.2))
    loss_axes, lr_axes = figure.subplots(1, 2)
    step = 0
    for round_index in sorted({int(r["round"]) for r in log}):
        rows = [r for r in log if int(r["round"]) == round_index]
        x = np.arange(step + 1, step + len(rows) + 1)
        step += len(rows)
        loss_axes.plot(x, [float(r["loss"]) for r in rows], marker="o", label=f"round {round_index}")
        lr_axes.plot(x, [float(r["lr"]) for r in rows], marker="o", label=f"round {round_index}")
    for axes, title in ((loss_axes, "training loss"), (lr_axes, "learning rate")):
        axes.set_xlabel("epoch (all rounds)")
        axes.set_title(title)
        axes.legend(fontsize=8)
    return _save(figure, path)
