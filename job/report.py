"""Pictures and TensorBoard logs of a finished run, written by the driver from metrics.json data."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster heads
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from job.data import CLASS_NAMES  # noqa: E402


def plot_learning_curves(history: list[dict], path: str) -> None:
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(epochs, [h[metric] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{metric}"] for h in history], "s-", label="validation")
        ax.set(xlabel="epoch", ylabel=metric, title=metric.capitalize())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(confusion: list[list[int]], accuracy: float, path: str) -> None:
    matrix = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(CLASS_NAMES))
    ax.set_xticks(ticks, CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(ticks, CLASS_NAMES)
    ax.set(xlabel="predicted", ylabel="true", title=f"Test set confusion matrix (accuracy {accuracy:.4f})")
    threshold = matrix.max() / 2
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, count, ha="center", va="center", fontsize=8,
                color="white" if count > threshold else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_tensorboard(history: list[dict], logdir: str) -> None:
    """Per-epoch scalars in TensorBoard's format: `tensorboard --logdir OUTPUT/tensorboard`."""
    import tensorflow as tf

    for split, prefix in (("train", ""), ("validation", "val_")):
        with tf.summary.create_file_writer(os.path.join(logdir, split)).as_default():
            for h in history:
                for metric in ("loss", "accuracy"):
                    tf.summary.scalar(f"epoch_{metric}", h[prefix + metric], step=h["epoch"])
                if not prefix:
                    tf.summary.scalar("epoch_seconds", h["epoch_seconds"], step=h["epoch"])


def write_figures(output: str, metrics: dict) -> None:
    plot_learning_curves(metrics["history"], os.path.join(output, "learning_curves.png"))
    plot_confusion_matrix(metrics["confusion_matrix"], metrics["test_accuracy"],
                          os.path.join(output, "confusion_matrix.png"))
    write_tensorboard(metrics["history"], os.path.join(output, "tensorboard"))
