"""Model promotion: a finished run becomes the "current" model only if it is good enough.

    MODELS/releases/<run_name>/   a full copy of the run's OUTPUT (model, metrics, plots)
    MODELS/current                a symlink to one release: the stable path consumers read
    MODELS/promotions.jsonl       every decision, accepted or not, with both accuracies

The switch is one atomic rename of a new symlink over the old one, made only after the release
is completely copied: a rejected, failed or interrupted promotion never touches `current`.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from job.config import JobConfig


def current_accuracy(models: str) -> float | None:
    try:
        with open(os.path.join(models, "current", "metrics.json")) as f:
            return json.load(f)["test_accuracy"]
    except FileNotFoundError:
        return None


def decide(accuracy: float, current: float | None, floor: float, margin: float) -> tuple[bool, str]:
    if accuracy < floor:
        return False, f"test accuracy {accuracy:.4f} is below the floor {floor:.4f}"
    if current is not None and accuracy < current - margin:
        return False, (f"test accuracy {accuracy:.4f} is more than {margin:.4f} below the "
                       f"current model's {current:.4f}")
    return True, "no current model" if current is None else f"current model has {current:.4f}"


def promote(cfg: JobConfig, output: str, metrics: dict) -> dict:
    """Decide, record, and (if accepted) switch MODELS/current to a copy of `output`."""
    models = cfg.promote_to
    os.makedirs(models, exist_ok=True)
    current = current_accuracy(models)
    accepted, reason = decide(metrics["test_accuracy"], current, cfg.min_accuracy,
                              cfg.max_regression)
    decision = {"run_name": cfg.run_name, "accepted": accepted, "reason": reason,
                "test_accuracy": metrics["test_accuracy"], "current_accuracy": current,
                "min_accuracy": cfg.min_accuracy, "max_regression": cfg.max_regression,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if accepted:
        release = os.path.join(models, "releases", cfg.run_name)
        partial = release + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(output, partial)
        shutil.rmtree(release, ignore_errors=True)
        os.rename(partial, release)
        link = os.path.join(models, "current")
        tmp_link = link + ".new"
        if os.path.lexists(tmp_link):
            os.remove(tmp_link)
        os.symlink(os.path.relpath(release, models), tmp_link)
        os.replace(tmp_link, link)  # atomic: readers see the old or the new model, never neither
    with open(os.path.join(models, "promotions.jsonl"), "a") as f:
        f.write(json.dumps(decision) + "\n")
    return decision
