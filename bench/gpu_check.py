"""GPU check for the first machine that has NVIDIA GPUs: what TensorFlow sees, then short real runs.

    make gpu-check                      # after `make train-local`'s set-up; EPOCHS=3 by default
    make gpu-check FLAGS="--seed 3"     # FLAGS: added to every run's job flags
    .venv/bin/python bench/gpu_check.py --data data/fashion-mnist --epochs 3 -- --seed 3

Runs, on the full data set, 1 GPU worker with the default recipe, with `--fast` (float16, XLA)
and with `--recipe large-batch`, and with >= 2 GPUs the default recipe on 2 workers (NCCL). Prints
one table (epoch seconds, ms a step, compute ms a step, test accuracy, optimizer steps) and exits
non-zero if any run fails.
Each check is new runs (a rerun never resumes or reprints an earlier one): their full output is
kept in runs/gpu-check/<UTC time>/<name>/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.network import steady_step  # noqa: E402  (after the path above)


def run(check: Path, name: str, data: str, epochs: int, *flags: str) -> dict:
    out = check / name
    args = [sys.executable, "-m", "job", "train", "--data", data, "--use-gpu", "--epochs", str(epochs),
            "--output", str(out), "--storage-path", str(check / "checkpoints"),
            "--name", f"gpu-check-{check.name}-{name}", *flags]
    print(f"== {name}: {' '.join(args[1:])}", flush=True)
    result = subprocess.run(args, cwd=REPO)
    if result.returncode != 0:
        return {"name": name, "error": f"exit status {result.returncode}"}
    metrics = json.loads((out / "metrics.json").read_text())
    # The step's time and its compute apart from the all-reduce: what bench/network.py's
    # projection assumes (GPU_STEP_MS) until a GPU machine has measured it.
    return {"name": name, **steady_step(metrics), "accuracy": metrics["test_accuracy"],
            "steps": metrics["optimizer_steps"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("flags", nargs="*", help="after --: more job flags for every run")
    args = parser.parse_args()
    from job.gpu import gpu_names, why_no_gpu

    gpus = gpu_names()
    print(f"TensorFlow sees {len(gpus)} GPU(s): {', '.join(gpus) or 'none'}")
    if not gpus:
        print(f"error: no GPU for TensorFlow: {why_no_gpu()}", file=sys.stderr)
        return 1
    check = REPO / "runs" / "gpu-check" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    runs = {"seed-1gpu": ["--num-workers", "1"],
            "fast-1gpu": ["--num-workers", "1", "--fast"],
            "large-batch-1gpu": ["--num-workers", "1", "--recipe", "large-batch"]}
    if len(gpus) >= 2:
        runs["seed-2gpu-nccl"] = ["--num-workers", "2"]
    data = os.path.abspath(args.data)
    rows = [run(check, name, data, args.epochs, *flags, *args.flags) for name, flags in runs.items()]
    print("\n| run | median epoch s | ms a step | compute ms a step | test accuracy | optimizer steps |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | FAILED: {r['error']} | | | | |")
        else:
            print(f"| {r['name']} | {r['epoch_seconds']:.1f} | {r['step_ms']:.2f} | {r['compute_ms']:.2f} | "
                  f"{r['accuracy']:.4f} | {r['steps']} |")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
