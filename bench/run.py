"""`make bench`: what the job costs against plain Keras, and how soon it reaches 0.90, in one run.

    python -m bench.run                     # both groups (~1 h on 2 cores)
    python -m bench.run --only accuracy     # time to test accuracy 0.90, full data (~45 min)
    python -m bench.run --only speed        # epoch-time ratios on a 15,000-image subset (~12 min)

Every measurement runs in a fresh process (bench/programs.py, or the job's own CLI) and every
number comes from this one run on this machine: compare the ratios, machines are noisy. An epoch
time is the median over epochs 2..3 (the first one traces). Results go to bench/results.json;
the exit status is 1 if a README target (TARGETS) is missed, and the missed figures are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from job import data as D

REPO = Path(__file__).resolve().parent.parent
SPEED_EPOCHS = 3
TARGET_ACCURACY = 0.90

# (figure, ceiling): README's targets, checked at the end of every run.
TARGETS = [
    ("ray_1_worker / plain_keras", 1.05),
    ("read_all_shards / full_epoch", 0.02),
    ("ray_start_seconds", 10.0),
    ("fast / default: time to 0.90", 0.5),
]


# Epoch-time ratios the speed group reports (numerator, denominator).
RATIOS = [
    ("ray_1_worker", "plain_keras"),  # the job's own overhead
    ("ray_1_worker_8_steps_per_call", "ray_1_worker"),  # of it, per-step Python and reductions
    ("ray_2_workers_64_each", "ray_1_worker"),  # 2 workers sharing the same cores
    ("default_job_fast", "default_job"),  # --fast per epoch
    ("ray_1_worker_xla", "ray_1_worker"),  # XLA on CPU
]


def program(name: str, **kwargs) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.programs", name, json.dumps(kwargs)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def job(data: str, *flags: str, test_curve: bool = False) -> dict:
    """The job as its users run it (`python -m job train`, its console shown); its metrics.json,
    with `test_curve`: plus every epoch's checkpoint scored on the test set."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "job", "train", "--data", data, "--name", "bench",
                        "--output", f"{tmp}/out", "--storage-path", f"{tmp}/ckpt", *flags],
                       cwd=REPO, check=True)
        metrics = json.loads(Path(tmp, "out", "metrics.json").read_text())
        if test_curve:
            metrics["test_curve"] = program("test-curve", data=data, run_dir=f"{tmp}/ckpt/bench")["curve"]
        return metrics


def steady(epoch_seconds: list[float]) -> float:
    return statistics.median(epoch_seconds[1:])


def read_all_shards_seconds(data: str) -> float:
    started = time.perf_counter()
    manifest = D.load_manifest(data)
    for split in D.SPLITS:
        D.read_split(data, split, manifest)
    return time.perf_counter() - started


def speed(subset: str, full: str, cores: int) -> dict:
    """Epoch seconds of plain Keras and of the job in several shapes, on the subset."""
    half = str(max(1, cores // 2))
    runs = {  # name: the job's flags
        "ray_1_worker": ["--num-workers", "1", "--cpus-per-worker", str(cores)],
        "ray_1_worker_8_steps_per_call": ["--num-workers", "1", "--cpus-per-worker", str(cores),
                                          "--steps-per-execution", "8"],
        "ray_2_workers_64_each": ["--num-workers", "2", "--cpus-per-worker", half, "--batch-size", "128"],
        "default_job": ["--cpus-per-worker", half],
        "default_job_fast": ["--cpus-per-worker", half, "--fast"],
        "ray_1_worker_xla": ["--num-workers", "1", "--cpus-per-worker", str(cores), "--jit-compile"],
    }
    seconds = {"plain_keras": steady(program("plain-keras", data=subset, threads=cores,
                                             epochs=SPEED_EPOCHS)["epoch_seconds"])}
    for name, flags in runs.items():
        print(f"speed: {name}", flush=True)
        seconds[name] = steady(job(subset, "--epochs", str(SPEED_EPOCHS), *flags)["epoch_seconds"])
    rows = D.load_manifest(subset)["splits"]["train"]
    full_epoch = seconds["default_job"] * 48000 / sum(rows.values())
    return {
        "epoch_seconds": seconds,
        "read_all_shards_seconds": min(read_all_shards_seconds(full) for _ in range(3)),
        "ray_start_seconds": program("ray-start")["seconds"],
        "ratios": {f"{a} / {b}": seconds[a] / seconds[b] for a, b in RATIOS},
        "full_epoch_seconds_estimate": full_epoch,
    }


def time_to_accuracy(full: str, cores: int) -> dict:
    """Time to test accuracy 0.90 of the default job and of `--fast`, as `make train-local` runs
    them on the full data set: the training seconds up to the first epoch whose checkpoint
    scores >= 0.90 on the test set (MLPerf's time to quality); none if no epoch does."""
    result = {}
    for name, flags in {"default": [], "fast": ["--fast"]}.items():
        print(f"accuracy: {name} job, full data", flush=True)
        metrics = job(full, "--cpus-per-worker", str(max(1, cores // 2)), *flags, test_curve=True)
        reached = [p["epoch"] for p in metrics["test_curve"] if p["test_accuracy"] >= TARGET_ACCURACY]
        result[name] = {
            "test_accuracy": metrics["test_accuracy"], "epochs": metrics["epochs_completed"],
            "optimizer_steps": metrics["optimizer_steps"], "test_curve": metrics["test_curve"],
            "training_seconds": sum(metrics["epoch_seconds"]),
            "time_to_0.90": sum(metrics["epoch_seconds"][: reached[0]]) if reached else None,
            "epochs_to_0.90": reached[0] if reached else None,
        }
    return result


def figures(results: dict) -> dict:
    """The figures TARGETS names, from whichever groups ran."""
    found = {}
    if "speed" in results:
        s = results["speed"]
        found["ray_1_worker / plain_keras"] = s["ratios"]["ray_1_worker / plain_keras"]
        found["read_all_shards / full_epoch"] = (s["read_all_shards_seconds"]
                                                 / s["full_epoch_seconds_estimate"])
        found["ray_start_seconds"] = s["ray_start_seconds"]
    if "accuracy" in results:
        default, fast = (results["accuracy"][k]["time_to_0.90"] for k in ("default", "fast"))
        found["fast / default: time to 0.90"] = (fast / default if fast and default else float("inf"))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("speed", "accuracy"), help="one group (default both)")
    parser.add_argument("--source", default=D.default_source(), help="official IDX files")
    parser.add_argument("--subset", type=int, default=15000,
                        help="official train images for the speed group (80 %% train / 20 %% val)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    args = parser.parse_args()
    cores = os.cpu_count()
    results = {"machine": f"{platform.machine()}, {cores} cores, {platform.processor() or '?'}, "
                          f"Python {platform.python_version()}"}
    with tempfile.TemporaryDirectory() as tmp:
        full, subset = f"{tmp}/full", f"{tmp}/subset"
        D.prepare_data(args.source, full)
        if args.only != "speed":
            results["accuracy"] = time_to_accuracy(full, cores)
        if args.only != "accuracy":
            D.prepare_data(args.source, subset, limit=args.subset)
            results["speed"] = speed(subset, full, cores)
    found = figures(results)
    results["targets"] = {name: {"value": found[name], "ceiling": ceiling, "met": found[name] <= ceiling}
                          for name, ceiling in TARGETS if name in found}
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    missed = [f"{name} = {t['value']:.3g} (target <= {t['ceiling']:g})"
              for name, t in results["targets"].items() if not t["met"]]
    for line in missed:
        print(f"missed: {line}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
