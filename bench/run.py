"""`make bench`: what the job costs against plain Keras, and how soon it reaches 0.90, in one run.

    python -m bench.run                     # every group (50-100 min on 2 cores)
    python -m bench.run --only accuracy     # wall and time to test accuracy 0.90, full data
    python -m bench.run --only speed        # the job against plain Keras on full data (rounds
                                            # interleaved), knobs' epoch-time ratios on a
                                            # 10,000-image subset, the collectives a step runs
    python -m bench.run --only network      # worker hosts, each link unshaped and at 1 Gbit/s:
                                            # the all-reduce settings on 2, scaling over 1-3
                                            # (bench/network.py; root)
    python -m bench.run --rounds 1          # each A/B once (default 2 rounds, interleaved)
    python -m bench.run --check             # exit 1 if a target (TARGETS) is missed

Every measurement runs in a fresh process (bench/programs.py, or the job's own CLI) and every
number comes from this one run on this machine: compare the ratios, machines are noisy. An epoch
time is the median over epochs 2..3 (the first one traces); where an A/B runs in rounds, each
round runs every side once (the machine's load moves between rounds) and a side's figure is its
fastest round. Results go to bench/results.json; missed targets are printed (the targets are
goals: a missed one is a finding, not a failure, unless --check).
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

from bench.network import at_least_one, network, projection, scaling
from job import data as D
from job.driver import RAY_LOGS

REPO = Path(__file__).resolve().parent.parent
SPEED_EPOCHS = 3
TARGET_ACCURACY = 0.90

# (figure, ceiling): docs/benchmarks.md's targets, checked at the end of every run.
TARGETS = [
    ("collectives per training step, 2 workers", 1),
    ("full data: ray_2_workers / ray_1_worker", 1.10),
    ("full data: ray_1_worker / plain_keras", 1.00),
    ("ray_1_worker / plain_keras3", 1.00),
    ("progress_every_0.5s / progress_off", 1.02),
    ("step_timing_on / step_timing_off", 1.01),
    ("the job's wall, reference recipe / plain Keras 10 epochs + test", 1.15),
    ("read_all_shards / full_epoch", 0.02),
    ("ray_start_seconds", 10.0),
    ("fast / reference: time to 0.90", 0.5),
    ("2 worker hosts, epoch: links at 1 Gbit/s / unshaped, the default settings", 1.15),
    ("all-reduce bytes a step: --grad-compression fp16 / float32", 0.5),
]

# The one-machine A/B on full data, in rounds: name: the job's workers, the cores split among
# them (0: plain tf-keras `fit` on every core).
FULL_DATA_RUNS = {"plain_keras": 0, "ray_1_worker": 1, "ray_2_workers": 2}
FULL_DATA_RATIOS = [("ray_1_worker", "plain_keras"), ("ray_2_workers", "ray_1_worker")]

# Epoch-time ratios the speed group reports on the subset (numerator, denominator).
RATIOS = [
    ("ray_1_worker", "plain_keras"),  # the job's own overhead, against tf-keras ...
    ("ray_1_worker", "plain_keras3"),  # ... and against the notebook's Keras 3
    ("ray_2_workers", "ray_1_worker"),  # 2 workers sharing the same cores: the all-reduce's cost
    ("ray_1_worker_1_step_per_call", "ray_1_worker"),  # the default --steps-per-execution's gain
    ("progress_every_0.5s", "progress_off"),  # what progress lines cost (0.5 s: a live terminal's)
    ("step_timing_on", "step_timing_off"),  # the straggler watch's compute clock, per step
    ("default_job_fast", "ray_2_workers"),  # --fast per epoch
]


def program(name: str, **kwargs) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.programs", name, json.dumps(kwargs)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def job(data: str, *flags: str, test_curve: bool = False, env: dict | None = None) -> dict:
    """The job as its users run it (`python -m job train`, its console shown); its metrics.json
    plus the command's wall seconds, with `test_curve`: plus every epoch's checkpoint scored on
    the test set."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "job", "train", "--data", data, "--name", "bench",
                        "--output", f"{tmp}/out", "--storage-path", f"{tmp}/ckpt", *flags],
                       cwd=REPO, check=True, env={**os.environ, **(env or {})})
        metrics = json.loads(Path(tmp, "out", "metrics.json").read_text())
        metrics["command_seconds"] = time.perf_counter() - started
        if test_curve:
            metrics["test_curve"] = program("test-curve", data=data, run_dir=f"{tmp}/ckpt/bench")["curve"]
        return metrics


def sharing_cores(workers: int, cores: int) -> list[str]:
    """The job's flags for `workers` workers splitting this machine's cores between them."""
    return ["--num-workers", str(workers), "--cpus-per-worker", str(max(1, cores // workers))]


def steady(epoch_seconds: list[float]) -> float:
    return statistics.median(epoch_seconds[1:])


def read_all_shards_seconds(data: str) -> float:
    started = time.perf_counter()
    manifest = D.load_manifest(data)
    for split in D.SPLITS:
        D.read_split(data, split, manifest)
    return time.perf_counter() - started


def collectives_run(data: str, cores: int) -> tuple[int, int]:
    """(collectives one worker ran, training steps) in a 1-epoch, 2-worker job, counted from
    TensorFlow's own log of each collective it executes (collective_ops.cc, VLOG 1)."""
    log_env = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "collective_ops=1"}
    metrics = job(data, "--epochs", "1", *sharing_cores(2, cores), "--progress-seconds", "0", env=log_env)
    counts = [sum("ExecuteAsync start" in line for line in path.read_text(errors="replace").splitlines())
              for path in Path(RAY_LOGS).resolve().glob("worker-*.err")]  # of the run just ended
    return max(counts), metrics["optimizer_steps"]


def collectives_per_training_step(source: str, tmp: str, cores: int) -> dict:
    """Two datasets with the same validation split (2,000 images) and 8,000 or 4,000 training
    images: everything but the training steps (validation, checkpoints, epoch-end metrics, set-up)
    runs the same collectives in both, so the difference over the difference in steps is what one
    training step runs."""
    runs = {}
    for train, val_fraction in ((8000, 0.2), (4000, 1 / 3)):
        data = f"{tmp}/collectives-{train}"
        D.prepare_data(source, data, limit=round(2000 / val_fraction), val_fraction=val_fraction)
        print(f"speed: collectives, {train} training images", flush=True)
        runs[train] = collectives_run(data, cores)
    (big, big_steps), (small, small_steps) = runs[8000], runs[4000]
    return {"runs": {str(k): {"collectives": c, "steps": s} for k, (c, s) in runs.items()},
            "per_training_step": (big - small) / (big_steps - small_steps)}


def full_data_epochs(full: str, cores: int, rounds: int) -> dict:
    """The job on 1 and 2 workers against plain tf-keras `fit`, full data, every side once a
    round: each round's epoch seconds, and the ratios of each side's fastest round."""
    by_round = []
    for round_ in range(rounds):
        seconds = {}
        for name, workers in FULL_DATA_RUNS.items():
            print(f"speed: full data, {name}, round {round_ + 1} of {rounds}", flush=True)
            if workers:
                run = job(full, "--epochs", str(SPEED_EPOCHS), *sharing_cores(workers, cores))
            else:
                run = program("plain-keras", data=full, threads=cores, epochs=SPEED_EPOCHS)
            seconds[name] = steady(run["epoch_seconds"])
        by_round.append(seconds)
    fastest = {name: min(r[name] for r in by_round) for name in FULL_DATA_RUNS}
    return {"epoch_seconds_by_round": by_round, "epoch_seconds": fastest,
            "ratios_by_round": [{f"{a} / {b}": r[a] / r[b] for a, b in FULL_DATA_RATIOS} for r in by_round],
            "ratios": {f"{a} / {b}": fastest[a] / fastest[b] for a, b in FULL_DATA_RATIOS}}


def speed(source: str, tmp: str, subset: str, full: str, cores: int, rounds: int) -> dict:
    """The one-machine A/B on full data, then epoch seconds of plain Keras and of the job in
    several shapes on the subset."""
    full_data = full_data_epochs(full, cores, rounds)
    one, two = sharing_cores(1, cores), sharing_cores(2, cores)
    runs = {  # name: the job's flags
        "ray_1_worker": one,
        "ray_1_worker_1_step_per_call": [*one, "--steps-per-execution", "1"],
        "ray_2_workers": two,
        "progress_off": [*two, "--progress-seconds", "0"],
        "progress_every_0.5s": [*two, "--progress-seconds", "0.5"],
        "default_job_fast": [*two, "--fast"],
    }
    seconds = {}
    for name, lib in (("plain_keras", "tf_keras"), ("plain_keras3", "keras")):
        print(f"speed: {name}", flush=True)
        seconds[name] = steady(program("plain-keras", data=subset, threads=cores, lib=lib,
                                       epochs=SPEED_EPOCHS)["epoch_seconds"])
    print("speed: step timing on and off", flush=True)
    timing = program("step-timing", data=subset, threads=cores)
    seconds.update({f"step_timing_{k}": statistics.median(v) for k, v in timing.items()})
    for name, flags in runs.items():
        print(f"speed: {name}", flush=True)
        seconds[name] = steady(job(subset, "--epochs", str(SPEED_EPOCHS), *flags)["epoch_seconds"])
    return {
        "full_data": full_data,
        "epoch_seconds": seconds,
        "collectives": collectives_per_training_step(source, tmp, cores),
        "read_all_shards_seconds": min(read_all_shards_seconds(full) for _ in range(3)),
        "ray_start_seconds": program("ray-start")["seconds"],
        "ratios": {f"{a} / {b}": seconds[a] / seconds[b] for a, b in RATIOS},
    }


def time_to_accuracy(full: str, cores: int) -> dict:
    """The job with the reference recipe (the notebook's training) and `--fast`, full data, as
    `make train-local` runs them, each with the time to test accuracy 0.90: the training seconds
    up to the first epoch whose checkpoint scores >= 0.90 on the test set (MLPerf's time to
    quality; none if no epoch does). And the baseline for the reference's wall time: plain
    Keras, 10 epochs and the test score, in one process."""
    print("accuracy: plain Keras, 10 epochs + test, full data", flush=True)
    started = time.perf_counter()
    plain = program("plain-keras", data=full, threads=cores, epochs=10, test=True)
    result = {"plain_keras_10_epochs": {"test_accuracy": plain["test_accuracy"],
                                        "command_seconds": time.perf_counter() - started}}
    for name, flags in {"reference": ["--recipe", "reference"], "fast": ["--fast"]}.items():
        print(f"accuracy: {name} job, full data", flush=True)
        metrics = job(full, *sharing_cores(2, cores), "--keep-checkpoints", "0", *flags, test_curve=True)
        reached = [p["epoch"] for p in metrics["test_curve"] if p["test_accuracy"] >= TARGET_ACCURACY]
        result[name] = {
            "test_accuracy": metrics["test_accuracy"], "epochs": metrics["epochs_completed"],
            "optimizer_steps": metrics["optimizer_steps"], "test_curve": metrics["test_curve"],
            "training_seconds": sum(metrics["epoch_seconds"]),
            "command_seconds": metrics["command_seconds"],
            "time_to_0.90": sum(metrics["epoch_seconds"][: reached[0]]) if reached else None,
            "epochs_to_0.90": reached[0] if reached else None,
        }
    return result


def figures(results: dict) -> dict:
    """The figures TARGETS names, from whichever groups ran."""
    found = {}
    if "speed" in results:
        s = results["speed"]
        for ratio in ("ray_1_worker / plain_keras3", "progress_every_0.5s / progress_off",
                      "step_timing_on / step_timing_off"):
            found[ratio] = s["ratios"][ratio]
        for ratio, value in s["full_data"]["ratios"].items():
            found[f"full data: {ratio}"] = value
        found["collectives per training step, 2 workers"] = s["collectives"]["per_training_step"]
        found["read_all_shards / full_epoch"] = (s["read_all_shards_seconds"]
                                                 / s["full_data"]["epoch_seconds"]["ray_2_workers"])
        found["ray_start_seconds"] = s["ray_start_seconds"]
    if "accuracy" in results:
        a = results["accuracy"]
        found["the job's wall, reference recipe / plain Keras 10 epochs + test"] = (
            a["reference"]["command_seconds"] / a["plain_keras_10_epochs"]["command_seconds"])
        reference, fast = (a[k]["time_to_0.90"] for k in ("reference", "fast"))
        found["fast / reference: time to 0.90"] = (fast / reference if fast and reference else float("inf"))
    if "table" in results.get("network", {}):
        n = results["network"]["table"]
        found["2 worker hosts, epoch: links at 1 Gbit/s / unshaped, the default settings"] = (
            n["float32_one_pack"]["1gbit / unshaped"])
        found["all-reduce bytes a step: --grad-compression fp16 / float32"] = (
            n["fp16_one_pack"]["bytes a step"] / n["float32_one_pack"]["bytes a step"])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("speed", "accuracy", "network"),
                        help="one group (default all; network needs root)")
    parser.add_argument("--source", default=D.default_source(), help="official IDX files")
    parser.add_argument("--subset", type=int, default=10000,
                        help="official train images for the speed group (80 %% train / 20 %% val)")
    parser.add_argument("--rounds", type=at_least_one, default=2,
                        help="rounds of the interleaved A/Bs (full data one machine, network)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    cores = os.cpu_count()
    results = {"machine": f"{platform.machine()}, {cores} cores, {platform.processor() or '?'}, "
                          f"Python {platform.python_version()}"}
    with tempfile.TemporaryDirectory() as tmp:
        full, subset = f"{tmp}/full", f"{tmp}/subset"
        if args.only != "network":  # the network group prepares its own subset
            D.prepare_data(args.source, full)
        if args.only in (None, "accuracy"):
            results["accuracy"] = time_to_accuracy(full, cores)
        if args.only in (None, "speed"):
            D.prepare_data(args.source, subset, limit=args.subset)
            results["speed"] = speed(args.source, tmp, subset, full, cores, args.rounds)
        if args.only in (None, "network"):
            results["network"] = network(args.source, tmp, args.rounds)
            results["network_scaling"] = scaling(args.source, tmp)
            if "parameters" in results["network"]:  # not when skipped
                results["network_projection"] = projection(results["network"]["parameters"])
    found = figures(results)
    results["targets"] = {name: {"value": found[name], "ceiling": ceiling, "met": found[name] <= ceiling}
                          for name, ceiling in TARGETS if name in found}
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    missed = [f"{name} = {t['value']:.3g} (target <= {t['ceiling']:g})"
              for name, t in results["targets"].items() if not t["met"]]
    for line in missed:
        print(f"missed: {line}", file=sys.stderr)
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
