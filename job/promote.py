"""Model promotion: a finished run becomes the "current" model only if it is good enough.

    MODELS/releases/<run_name>[.N]/   a full copy of the run's OUTPUT (model, metrics, plots);
                                      a release is never changed or deleted once written
    MODELS/current                    a symlink to one release: the stable path consumers read
    MODELS/promotions.jsonl           every decision, accepted or not, with both accuracies,
                                      and every rollback
    MODELS/serving/<N>/               what `current` holds, as TF Serving (and KServe's TensorFlow
                                      runtime) load it: the SavedModel of each accepted model or
                                      rollback as the next integer version; servers serve the
                                      highest, so they follow `current`

Promotions into one MODELS dir take turns (a lock: read, decide, switch as one step). The switch
is one atomic rename of a new symlink over the old one, made only after the release is completely
copied: a rejected, failed or interrupted promotion never touches `current`, and the release it
points to is never removed. Promoting the model that is already current (a rerun of a finished
run, a RayJob retry) changes nothing. A rollback (`python -m job rollback --models MODELS`) is a
promotion of an earlier release, without the gate: the same lock, switch, record and version.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time

from job.config import JobConfig, JobError
from job.runlock import waiting_lock


def current_metrics(models: str) -> dict | None:
    try:
        with open(os.path.join(models, "current", "metrics.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def decide(accuracy: float, current: float | None, floor: float, margin: float) -> tuple[bool, str]:
    if accuracy < floor:
        return False, f"test accuracy {accuracy:.4f} is below the floor {floor:.4f}"
    if current is not None and accuracy < current - margin:
        return False, (f"test accuracy {accuracy:.4f} is more than {margin:.4f} below the "
                       f"current model's {current:.4f}")
    return True, "no current model" if current is None else f"current model has {current:.4f}"


def same_model(a: dict, b: dict) -> bool:
    """The same run's same result: a repeated promotion of what is already current."""
    return all(a.get(k) == b.get(k) for k in ("run_name", "checkpoint", "test_accuracy", "test_loss"))


def promote(cfg: JobConfig, output: str, metrics: dict) -> dict:
    """Decide, record, and (if accepted) switch MODELS/current to a copy of `output`."""
    models = cfg.promote_to
    os.makedirs(os.path.join(models, "releases"), exist_ok=True)
    with waiting_lock(os.path.join(models, ".promote.lock"), f"promotion into {models}"):
        current, release, version = current_metrics(models), None, None
        current_accuracy = current["test_accuracy"] if current else None
        if current and same_model(current, metrics):
            accepted, reason = True, "this model is already current: nothing changed"
        else:
            accepted, reason = decide(metrics["test_accuracy"], current_accuracy, cfg.min_accuracy,
                                      cfg.max_regression)
            if accepted:
                release = release_copy(models, cfg.run_name, output)
                switch_current(models, release)
                version = serve(models, release)
        decision = {"run_name": cfg.run_name, "accepted": accepted, "reason": reason,
                    **({"release": os.path.basename(release), "serving_version": version}
                       if release else {}),
                    "test_accuracy": metrics["test_accuracy"], "current_accuracy": current_accuracy,
                    "min_accuracy": cfg.min_accuracy, "max_regression": cfg.max_regression,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        record(models, decision)
    return decision


def record(models: str, decision: dict) -> None:
    with open(os.path.join(models, "promotions.jsonl"), "a") as f:
        f.write(json.dumps(decision) + "\n")


def serve(models: str, release: str) -> int:
    """Copy the release's SavedModel to MODELS/serving/<next version>; that version. Renamed
    into place complete: a server polling the directory never loads half a version."""
    serving = os.path.join(models, "serving")
    os.makedirs(serving, exist_ok=True)
    version = max((int(v) for v in os.listdir(serving) if v.isdigit()), default=0) + 1
    partial = tempfile.mkdtemp(prefix=f".{version}.partial-", dir=serving)
    try:
        shutil.copytree(os.path.join(release, "model"), partial, dirs_exist_ok=True)
        os.rename(partial, os.path.join(serving, str(version)))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return version


def current_release(models: str) -> str | None:
    link = os.path.join(models, "current")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def rollback(models: str, to: str = "") -> dict:
    """Make release `to` (default: the one current before the current one) current again."""
    with waiting_lock(os.path.join(models, ".promote.lock"), f"rollback in {models}"):
        now = current_release(models)
        if not to:
            history = []  # the releases made current, in order (promotions and rollbacks)
            with contextlib.suppress(FileNotFoundError), open(os.path.join(models, "promotions.jsonl")) as f:
                history = [d["release"] for d in map(json.loads, f) if d.get("release")]
            earlier = [r for r in history[:-1] if r != now]
            if not earlier:
                raise JobError(f"{models}: no earlier release in promotions.jsonl to roll back to: "
                               f"name one of {models}/releases/ with --to")
            to = earlier[-1]
        release = os.path.join(models, "releases", to)
        if not os.path.isfile(os.path.join(release, "model", "saved_model.pb")):
            raise JobError(f"{release}: no such release (or it holds no model)")
        switch_current(models, release)
        restored = current_metrics(models)
        decision = {"run_name": restored["run_name"], "accepted": True,
                    "reason": f"rollback from {now}", "rollback": True, "release": to,
                    "serving_version": serve(models, release),
                    "test_accuracy": restored["test_accuracy"],
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        record(models, decision)
    return decision


def release_copy(models: str, run_name: str, output: str) -> str:
    """A complete copy of `output` under a release name not yet taken; its path."""
    releases = os.path.join(models, "releases")
    partial = tempfile.mkdtemp(prefix=f".{run_name}.partial-", dir=releases)  # unique per process
    try:
        shutil.copytree(output, partial, dirs_exist_ok=True)
        name, n = run_name, 1
        while os.path.lexists(os.path.join(releases, name)):
            n += 1
            name = f"{run_name}.{n}"
        os.rename(partial, os.path.join(releases, name))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return os.path.join(releases, name)


def switch_current(models: str, release: str) -> None:
    link = os.path.join(models, "current")
    tmp_link = f"{link}.new-{os.getpid()}"
    if os.path.lexists(tmp_link):
        os.remove(tmp_link)
    os.symlink(os.path.relpath(release, models), tmp_link)
    os.replace(tmp_link, link)  # atomic: readers see the old or the new model, never neither
