"""Figures logged with every run: the loss curve and the confusion matrix."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _plt():
    """matplotlib.pyplot, imported on the first figure: importing it costs about 0.3 s of
    CPU, which every Ray actor (they import `pipelines`) and the driver would otherwise pay
    before the first step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(history: Sequence[dict[str, float]]):
    fig, ax = _plt().subplots(figsize=(5, 3.5))
    epochs = np.arange(1, len(history) + 1)
    for key in ("train_loss", "val_loss"):
        values = [h.get(key, np.nan) for h in history]
        if not np.all(np.isnan(values)):
            ax.plot(epochs, values, marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("loss per epoch")
    ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]):
    k = len(class_names)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    fig, ax = _plt().subplots(figsize=(1.0 + 0.45 * k, 0.8 + 0.45 * k))
    ax.imshow(counts, cmap="Blues")
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if counts[i, j] > counts.max() / 2 else "black")
    ax.set_xticks(range(k), class_names, fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion matrix")
    fig.tight_layout()
    return fig


def predicted_vs_true(y_true: np.ndarray, y_pred: np.ndarray):
    """A regressor's test predictions against the targets, with the line they would lie on."""
    fig, ax = _plt().subplots(figsize=(4.2, 4.0))
    ax.scatter(y_true, y_pred, s=6, alpha=0.5)
    low, high = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
    ax.plot([low, high], [low, high], color="black", linewidth=0.8)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title("test predictions")
    fig.tight_layout()
    return fig


def close(fig) -> None:
    _plt().close(fig)


def image_grid(images, title: str, columns: int = 10):
    """Draw (N, H, W) or (N, 1, H, W) images, values in [0, 1], as a grid."""
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[:, 0]
    n = len(images)
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    fig, axes = _plt().subplots(rows, columns, figsize=(0.8 * columns, 0.8 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap="gray", vmin=0.0, vmax=1.0)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def filters(weights, shape, title: str, limit: int = 64):
    """The first layer's weights, one image per unit (or kernel), each scaled to [0, 1]."""
    w = np.asarray(weights)[:limit].reshape(-1, *shape)
    low = w.reshape(len(w), -1).min(axis=1).reshape(-1, *([1] * len(shape)))
    high = w.reshape(len(w), -1).max(axis=1).reshape(-1, *([1] * len(shape)))
    return image_grid((w - low) / np.maximum(high - low, 1e-12), title, columns=16)


def grad_norms(history: Sequence[dict[str, float]], prefix: str = "grad_norm."):
    """Each layer's mean gradient norm per epoch, on a log scale: vanishing gradients show."""
    fig, ax = _plt().subplots(figsize=(6, 4))
    layers = sorted({k for h in history for k in h if k.startswith(prefix)})
    epochs = np.arange(1, len(history) + 1)
    for layer in layers:
        ax.plot(epochs, [h.get(layer, np.nan) for h in history], marker="o",
                label=layer[len(prefix):])
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean gradient norm")
    ax.set_title("gradient norm per layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def staleness_histogram(counts: dict[int, int]):
    """How many parameter-server updates arrived with each staleness (in versions)."""
    fig, ax = _plt().subplots(figsize=(5, 3.5))
    keys = sorted(counts)
    ax.bar(keys, [counts[k] for k in keys], width=0.8)
    ax.set_xlabel("staleness (server version - version the gradient was computed on)")
    ax.set_ylabel("updates")
    ax.set_title("staleness of applied updates")
    fig.tight_layout()
    return fig


def pipeline_timeline(stages: list[list[tuple[str, float, float]]]):
    """One mini-batch of a pipeline: per stage, when it ran forwards, backwards, or idled."""
    fig, ax = _plt().subplots(figsize=(7, 1 + 0.6 * len(stages)))
    colours = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green"}
    start = min(t[1] for row in stages for t in row)
    for k, row in enumerate(stages):
        for kind, a, b in row:
            ax.barh(k, (b - a) * 1e3, left=(a - start) * 1e3, color=colours[kind], edgecolor="white")
    ax.set_yticks(range(len(stages)), [f"stage {k}" for k in range(len(stages))])
    ax.invert_yaxis()
    ax.set_xlabel("ms (blue: forward, orange: backward (input gradient where split), green: weight gradient, "
                  "blank: idle)")
    ax.set_title("pipeline timeline, last mini-batch")
    fig.tight_layout()
    return fig


def sweep_scatter(points: Sequence[dict], values: Sequence[float], metric: str, log_keys: Sequence[str] = ()):
    """One panel per hyper-parameter: its value in each trial against the trial's metric.

    Lists and sections (a swept strategy) are categories, drawn at their rank in sorted order.
    """
    keys = sorted({k for p in points for k in p})
    fig, axes = _plt().subplots(1, max(len(keys), 1), figsize=(3.2 * max(len(keys), 1), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [p.get(key) for p in points]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if not numeric:
            labels = sorted({str(x) for x in xs})
            ax.set_xticks(range(len(labels)), [label[:18] for label in labels], rotation=30, fontsize=7)
            xs = [labels.index(str(x)) for x in xs]
        elif key in log_keys:
            ax.set_xscale("log")
        ax.scatter(xs, values, alpha=0.8)
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel(metric)
    fig.suptitle(f"{metric} per trial")
    fig.tight_layout()
    return fig


def latent_trajectories(true, inferred, sequences: int = 3):
    """True hidden states against a model's inferred ones, mapped onto the true states by
    least squares (with an intercept): a state-space model's latents are only defined up to
    an affine change of coordinates, so only the mapped trajectories can be compared."""
    true, inferred = np.asarray(true, dtype=np.float64), np.asarray(inferred, dtype=np.float64)
    n, steps, dims = true.shape
    design = np.concatenate([inferred.reshape(n * steps, -1), np.ones((n * steps, 1))], axis=1)
    weights, *_ = np.linalg.lstsq(design, true.reshape(n * steps, dims), rcond=None)
    mapped = (design @ weights).reshape(n, steps, dims)
    explained = 1.0 - ((mapped - true) ** 2).sum() / max(((true - true.mean(axis=(0, 1))) ** 2).sum(), 1e-12)
    shown = min(sequences, n)
    fig, axes = _plt().subplots(shown, dims, figsize=(3.0 * dims, 1.8 * shown + 0.5), squeeze=False)
    for i in range(shown):
        for d in range(dims):
            ax = axes[i][d]
            ax.plot(true[i, :, d], color="black", label="true")
            ax.plot(mapped[i, :, d], color="tab:orange", linestyle="--", label="inferred (mapped)")
            ax.set_title(f"sequence {i}, state {d}", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"true against inferred latent states (R² of the map {explained:.3f})", fontsize=9)
    fig.tight_layout()
    return fig
