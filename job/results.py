"""A run's checkpoints, what it leaves in OUTPUT, and how a model is scored: the driver's last
steps, and `evaluate`.

    OUTPUT/metrics.json    test figures, per-epoch history, the resolved settings
    OUTPUT/model/          TF SavedModel (reloadable with tf_keras, servable)
    OUTPUT/*.png, tensorboard/   plots (job/report.py)

Nothing is written to OUTPUT until the run has finished; then OUTPUT is replaced in one rename.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np

from job import data as D
from job.config import JobConfig, JobError

METRICS_FILE = "metrics.json"


def check_output_dir(cfg: JobConfig) -> None:
    """OUTPUT may be missing, empty, or hold an earlier result of this same run."""
    if not os.path.isdir(cfg.output) or not os.listdir(cfg.output):
        return
    try:
        with open(os.path.join(cfg.output, METRICS_FILE)) as f:
            previous = json.load(f).get("run_name")
    except (OSError, ValueError):
        previous = None
    if previous != cfg.run_name:
        held = f"run {previous!r}" if previous else "files of another kind"
        raise JobError(f"output dir {cfg.output} holds {held}, not run {cfg.run_name!r}; "
                       f"choose another --output or remove it")


def best_checkpoint(result):
    """(checkpoint, metrics) with the highest validation accuracy."""
    if not result.best_checkpoints:
        raise JobError("training produced no checkpoint")
    return max(result.best_checkpoints, key=lambda cm: cm[1]["val_accuracy"])


def load_checkpoint_model(cfg: JobConfig, checkpoint):
    """The checkpoint's model as validation scored it, and as it is tested and exported."""
    import tensorflow as tf

    from job.model import build_model, scored_model
    from job.train import WEIGHTS_PREFIX

    model = build_model(cfg.model, cfg.learning_rate, ema_momentum=cfg.ema_momentum)
    parts = {"model": model}
    if cfg.ema_momentum:  # the weights' average: the optimizer's "average" slots
        model.optimizer.build(model.trainable_variables)
        parts["optimizer"] = model.optimizer
    with checkpoint.as_directory() as ckpt_dir:
        tf.train.Checkpoint(**parts).read(os.path.join(ckpt_dir, WEIGHTS_PREFIX)).expect_partial()
    model.optimizer.finalize_variable_values(model.trainable_variables)  # the average, if kept
    return scored_model(model, cfg.flips)


def finished_result(cfg: JobConfig):
    """(Ray Train's result, run_state) of this run if its storage holds it trained to the last
    epoch, read without starting Ray or a worker; else None."""
    import logging

    import ray.train

    notes = logging.getLogger("ray.train")  # Ray's note that it found the run's snapshot
    level = notes.level
    notes.setLevel(logging.WARNING)
    try:
        result = ray.train.Result.from_path(f"{cfg.storage_path}/{cfg.run_name}")
    except (RuntimeError, OSError):  # no run there yet, or none that reached a checkpoint
        return None
    finally:
        notes.setLevel(level)
    if not result.checkpoint:
        return None
    state = run_state(result)
    return (result, state) if state["epoch"] >= cfg.epochs else None


def run_state(result) -> dict:
    """Epoch count, per-epoch history and restart points, from the latest checkpoint."""
    from job.train import load_state

    with result.checkpoint.as_directory() as ckpt_dir:
        return load_state(ckpt_dir)


def score(model, images: np.ndarray, labels: np.ndarray) -> dict:
    """Test loss/accuracy, per-class accuracy and the confusion matrix, from one predict pass."""
    probs = model.predict(images.astype(np.float32) / 255.0, batch_size=1000, verbose=0)
    picked = probs[np.arange(len(labels)), labels]
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((D.NUM_CLASSES, D.NUM_CLASSES), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return {
        "test_accuracy": float((predicted == labels).mean()),
        "test_loss": float(-np.log(np.clip(picked, 1e-7, 1.0)).mean()),
        "per_class_accuracy": dict(zip(D.CLASS_NAMES, per_class.round(4).tolist(), strict=True)),
        "confusion_matrix": confusion.tolist(),
    }


def write_output(output: str, model, metrics: dict) -> None:
    """Write everything into a sibling staging dir, then swap it in with renames."""
    from job.report import write_figures

    output = os.path.abspath(output.rstrip("/"))
    for leftover in glob.glob(f"{glob.escape(output)}.staging-*") + glob.glob(f"{glob.escape(output)}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)  # of a crashed driver: OUTPUT's lock is ours
    staging, old = f"{output}.staging-{os.getpid()}", f"{output}.old-{os.getpid()}"
    os.makedirs(staging)
    model.save(os.path.join(staging, "model"))  # TF SavedModel: reloadable, servable
    write_figures(staging, metrics)
    write_json_atomically(os.path.join(staging, METRICS_FILE), metrics)
    if os.path.exists(output):
        os.rename(output, old)
    os.rename(staging, output)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomically(path: str, value: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def evaluate(model_path: str, data: str) -> dict:
    import tf_keras as keras

    if not os.path.isdir(model_path):
        raise JobError(f"model not found: {model_path}")
    model = keras.models.load_model(model_path)
    test = score(model, *D.read_split(data, "test"))
    return {"model": model_path, "data": data, "test_accuracy": test["test_accuracy"],
            "test_loss": test["test_loss"], "per_class_accuracy": test["per_class_accuracy"]}
