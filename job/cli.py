"""Command line: `python -m job {prepare-data,train,retrain,evaluate} ...` (see README for examples).

    python -m job prepare-data --out data/fashion-mnist
    python -m job train --data data/fashion-mnist --epochs 10 --num-workers 2 --output runs/local
    python -m job retrain --config /etc/fashion/job.toml    # prepare-data if needed, then train
    python -m job evaluate --model runs/local/model --data data/fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from job.config import DEFAULTS, FAST_EPOCHS, RECIPES, JobError, build_config, load_config_file

# Keep TensorFlow's C++ start-up chatter off the console (must be set before TF is imported).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

def train_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for JobConfig fields. Absent flags stay absent so a config file can supply them."""
    s = argparse.SUPPRESS
    parser.add_argument("--config", default=s, help="TOML or JSON file of settings (flags win)")
    parser.add_argument("--data", default=s, help="dataset from prepare-data (path or URI)")
    parser.add_argument("--output", default=s, help=f"results dir (default {DEFAULTS.output})")
    parser.add_argument("--storage-path", default=s,
                        help=f"Ray checkpoint storage, path or s3:// gs:// (default {DEFAULTS.storage_path})")
    parser.add_argument("--name", default=s,
                        help="Ray run name; rerun with the same name to resume (default: derived)")
    parser.add_argument("--model", default=s, help="seed (reference CNN, default) or strong")
    parser.add_argument("--epochs", type=int, default=s, help=f"default {DEFAULTS.epochs}")
    parser.add_argument("--num-workers", type=int, default=s, help=f"default {DEFAULTS.num_workers}")
    parser.add_argument("--batch-size", type=int, default=s,
                        help=f"GLOBAL batch, split across workers (default {DEFAULTS.batch_size})")
    parser.add_argument("--learning-rate", type=float, default=s,
                        help=f"default {DEFAULTS.learning_rate}")
    parser.add_argument("--lr-schedule", default=s, help="constant (default) or cosine")
    parser.add_argument("--warmup-epochs", type=int, default=s,
                        help=f"linear LR warm-up epochs (default {DEFAULTS.warmup_epochs})")
    parser.add_argument("--recipe", default=s,
                        help=f"a named preset: {', '.join(RECIPES)} (README; flags given win)")
    parser.add_argument("--seed", type=int, default=s, help=f"default {DEFAULTS.seed}")
    parser.add_argument("--use-gpu", action="store_true", default=s,
                        help="one GPU per worker, NCCL all-reduce")
    parser.add_argument("--cpus-per-worker", type=int, default=s,
                        help=f"default {DEFAULTS.cpus_per_worker}")
    parser.add_argument("--max-failures", type=int, default=s,
                        help=f"worker-group restarts from the last checkpoint (default "
                             f"{DEFAULTS.max_failures}; -1 = unlimited)")
    parser.add_argument("--fast", action="store_true", default=s,
                        help=f"fast path: bigger batches, scaled LR, {FAST_EPOCHS} epochs; "
                             "on GPUs also XLA + float16")
    parser.add_argument("--jit-compile", action="store_true", default=s,
                        help="XLA-compile the training step (part of --fast on GPUs)")
    parser.add_argument("--mixed-precision", action="store_true", default=s,
                        help="float16 compute (needs --use-gpu; part of --fast on GPUs)")
    parser.add_argument("--promote-to", default=s,
                        help="models dir: make this run MODELS/current if it passes the checks below")
    parser.add_argument("--min-accuracy", type=float, default=s,
                        help=f"promotion floor on test accuracy (default {DEFAULTS.min_accuracy})")
    parser.add_argument("--max-regression", type=float, default=s,
                        help=f"promotion: largest drop below the current model (default "
                             f"{DEFAULTS.max_regression})")
    parser.add_argument("--ray-address", default=s,
                        help="existing Ray cluster (default $RAY_ADDRESS, else a private local Ray)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m job", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare-data", help="official IDX files -> sharded Parquet")
    prep.add_argument("--source", default=None,
                      help="dir or URI with the IDX files (default $FASHION_MNIST_DIR, else the "
                           "Debian package's /usr/share/datasets/fashion-mnist)")
    prep.add_argument("--out", required=True, help="output dir or URI")
    prep.add_argument("--shards", type=int, default=8, help="part files per split (default 8)")
    prep.add_argument("--seed", type=int, default=0, help="train/val split seed (default 0)")
    prep.add_argument("--limit", type=int, default=0,
                      help="keep only the first N train and N test images (smoke tests)")

    train_flags(sub.add_parser("train", help="train with Ray, evaluate the best checkpoint"))
    retrain = sub.add_parser("retrain", help="the scheduled job in one command: prepare-data "
                             "into --data from --source if it is missing, then train")
    train_flags(retrain)
    retrain.add_argument("--source", default=argparse.SUPPRESS,
                         help="official IDX files (default $FASHION_MNIST_DIR, else Debian's)")

    ev = sub.add_parser("evaluate", help="score an exported model on the test shards")
    ev.add_argument("--model", required=True, help="OUTPUT/model of a train run")
    ev.add_argument("--data", required=True, help="dataset from prepare-data")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(make_parser().parse_args(argv))
    command = args.pop("command")
    try:
        if command == "prepare-data":
            from job.data import default_source, prepare_data

            source = args["source"] or default_source()
            manifest = prepare_data(source, args["out"], args["shards"], args["seed"],
                                    limit=args["limit"])
            counts = {s: sum(files.values()) for s, files in manifest["splits"].items()}
            print(f"dataset in {args['out']}: {counts}")
        elif command in ("train", "retrain"):
            from job.driver import run

            file_values = load_config_file(args.pop("config")) if "config" in args else {}
            run(build_config(file_values, args), prepare_data=command == "retrain")
        else:
            from job.driver import evaluate

            print(json.dumps(evaluate(args["model"], args["data"]), indent=1))
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
