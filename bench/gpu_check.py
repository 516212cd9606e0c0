"""GPU check for the first machine that has NVIDIA GPUs: what TensorFlow sees, then short real runs.

    make gpu-check                      # after `make train-local`'s set-up; EPOCHS=3 by default
    .venv/bin/python bench/gpu_check.py --data data/fashion-mnist --epochs 3

Runs, on the full data set, 1 GPU worker with the default recipe, with `--fast` (float16, XLA)
and with `--recipe large-batch`, and with >= 2 GPUs the default recipe on 2 workers (NCCL). Prints
one table (epoch seconds, test accuracy, optimizer steps) and exits non-zero if any run fails.
Each run's full output is kept in runs/gpu-check/<name>/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(name: str, data: str, epochs: int, *flags: str) -> dict:
    out = REPO / "runs" / "gpu-check" / name
    args = [sys.executable, "-m", "job", "train", "--data", data, "--use-gpu", "--epochs", str(epochs),
            "--output", str(out), "--storage-path", str(out.parent / "checkpoints"),
            "--name", f"gpu-check-{name}", *flags]
    print(f"== {name}: {' '.join(args[1:])}", flush=True)
    result = subprocess.run(args, cwd=REPO)
    if result.returncode != 0:
        return {"name": name, "error": f"exit status {result.returncode}"}
    metrics = json.loads((out / "metrics.json").read_text())
    seconds = metrics["epoch_seconds"][1:] or metrics["epoch_seconds"]  # epoch 1 compiles
    return {"name": name, "seconds": statistics.median(seconds), "accuracy": metrics["test_accuracy"],
            "steps": metrics["optimizer_steps"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    from job.gpu import gpu_names, why_no_gpu

    gpus = gpu_names()
    print(f"TensorFlow sees {len(gpus)} GPU(s): {', '.join(gpus) or 'none'}")
    if not gpus:
        print(f"error: no GPU for TensorFlow: {why_no_gpu()}", file=sys.stderr)
        return 1
    data = os.path.abspath(args.data)
    rows = [run("seed-1gpu", data, args.epochs, "--num-workers", "1"),
            run("fast-1gpu", data, args.epochs, "--num-workers", "1", "--fast"),
            run("large-batch-1gpu", data, args.epochs, "--num-workers", "1", "--recipe", "large-batch")]
    if len(gpus) >= 2:
        rows.append(run("seed-2gpu-nccl", data, args.epochs, "--num-workers", "2"))
    print("\n| run | median epoch s | test accuracy | optimizer steps |\n| --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | FAILED: {r['error']} | | |")
        else:
            print(f"| {r['name']} | {r['seconds']:.1f} | {r['accuracy']:.4f} | {r['steps']} |")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
