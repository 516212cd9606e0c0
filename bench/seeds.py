"""`make seeds`: one recipe over several seeds, as `make train-local` runs it (full data, the
job's CLI), and the table of what it scored.

    python -m bench.seeds --recipe default --seeds 0 1 2 3 4 --data data/fashion-mnist
    python -m bench.seeds --recipe large-batch --seeds 0 1 2 -- --cpus-per-worker 1

Each run is a fresh `python -m job train --recipe R --seed S` ("default": no --recipe, the
defaults; flags after `--` are passed on);
its metrics.json goes to OUT/<recipe>-seed<S>/, and the table (per seed, then mean ± sd and min)
to OUT/<recipe>.md. Runs already in OUT are reused, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from job.config import RECIPES

REPO = Path(__file__).resolve().parent.parent
DEFAULT = "default"  # the defaults themselves: what `make train-local` runs


def train_args(recipe: str, seed: int, data: str, out: Path, flags: list[str]) -> list[str]:
    """The `python -m job` arguments of one seed's run."""
    preset = [] if recipe == DEFAULT else ["--recipe", recipe]
    return ["train", "--data", data, *preset, "--seed", str(seed), "--output",
            str(out / f"{recipe}-seed{seed}"), "--storage-path", str(out / "checkpoints"), *flags]


def run_seed(recipe: str, seed: int, data: str, out: Path, flags: list[str]) -> dict:
    run = out / f"{recipe}-seed{seed}"
    if not (run / "metrics.json").exists():
        print(f"seeds: {recipe}, seed {seed}", flush=True)
        subprocess.run([sys.executable, "-m", "job", *train_args(recipe, seed, data, out, flags)],
                       cwd=REPO, check=True)
    return json.loads((run / "metrics.json").read_text())


def training_compute(metrics: dict) -> str:
    """A run's training FLOPs an epoch: 3 forward passes' worth per image (job/model.py)."""
    from job.workarounds import native_stderr_to

    with native_stderr_to(os.devnull):  # TensorFlow's C++ start-up lines
        from job.model import build_model, forward_flops

        forward = forward_flops(build_model(metrics["model"], 1e-3))
    images = metrics["history"][0]["optimizer_steps"] * metrics["global_batch_size"]
    return (f"training compute {3 * forward * images / 1e12:.2f} TFLOPs an epoch ({metrics['model']} "
            f"model: {forward / 1e6:.1f} MFLOPs an image forward, x3, x{images:,} images)")


def table(recipe: str, runs: dict[int, dict]) -> str:
    acc = [m["test_accuracy"] for m in runs.values()]
    rows = [f"| {seed} | {m['test_accuracy']:.4f} | {m['test_loss']:.4f} | {m['best_epoch']} | "
            f"{m['optimizer_steps']} | {m['wall_seconds']:.0f} |" for seed, m in runs.items()]
    name = "the defaults" if recipe == DEFAULT else f"`--recipe {recipe}`"
    spread = f"{statistics.mean(acc):.4f} ± {statistics.stdev(acc):.4f}" if len(acc) > 1 else f"{acc[0]:.4f}"
    return "\n".join([
        f"{name}: test accuracy {spread} (mean ± sd), min {min(acc):.4f}, over {len(acc)} seed(s); "
        f"{training_compute(next(iter(runs.values())))}", "",
        "| seed | test accuracy | test loss | best epoch | optimizer steps (best) | wall s |",
        "| --- | --- | --- | --- | --- | --- |", *rows, ""])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=(DEFAULT, *RECIPES), default=DEFAULT)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--data", default=str(REPO / "data" / "fashion-mnist"))
    parser.add_argument("--out", default=str(REPO / "runs" / "seeds"))
    parser.add_argument("flags", nargs="*", help="after --: more flags of `python -m job train`")
    return parser


def main() -> int:
    args = make_parser().parse_args()
    out = Path(args.out)
    runs = {seed: run_seed(args.recipe, seed, args.data, out, args.flags) for seed in args.seeds}
    text = table(args.recipe, runs)
    (out / f"{args.recipe}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
