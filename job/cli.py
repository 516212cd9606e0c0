"""Command line: `python -m job {prepare-data,train,retrain,evaluate} ...` (see README for examples).

    python -m job prepare-data --out data/fashion-mnist
    python -m job train --data data/fashion-mnist --epochs 10 --num-workers 2 --output runs/local
    python -m job retrain --config /etc/fashion/job.toml    # prepare-data if needed, then train
    python -m job evaluate --model runs/local/model --data data/fashion-mnist
    python -m job rollback --models /mnt/models        # the release current before this one
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from job.config import DEFAULTS, JobConfig, JobError, build_config, load_config_file
from job.env import set_job_env

set_job_env()  # before anything imports TensorFlow


def train_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per JobConfig field, from the field's type, default and help text. Absent flags
    stay absent (SUPPRESS), so a config file can supply them."""
    s = argparse.SUPPRESS
    parser.add_argument("--config", default=s, help="TOML or JSON file of settings (flags win)")
    for f in dataclasses.fields(JobConfig):
        if "help" not in f.metadata or f.name in skip:
            continue
        default = getattr(DEFAULTS, f.name)
        shown = "" if default is False or default in ("", "-") else f" (default {default})"
        kind = {"action": "store_true"} if isinstance(default, bool) else {"type": type(default)}
        parser.add_argument("--" + f.name.replace("_", "-"), default=s, **kind,
                            help=(f.metadata["help"] + shown).replace("%", "%%"))


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

    train_flags(sub.add_parser("train", help="train with Ray, evaluate the best checkpoint"),
                skip=("source",))
    train_flags(sub.add_parser("retrain", help="the scheduled job in one command: prepare-data "
                               "into --data from --source if it is missing, then train"))

    back = sub.add_parser("rollback", help="make an earlier release MODELS/current again (and "
                          "the newest serving version)")
    back.add_argument("--models", required=True, help="the models dir of --promote-to")
    back.add_argument("--to", default="", help="a release name under MODELS/releases/ (default: "
                                              "the one current before the current one)")

    ev = sub.add_parser("evaluate", help="score an exported model on the test shards")
    ev.add_argument("--model", required=True, help="OUTPUT/model of a train run")
    ev.add_argument("--data", required=True, help="dataset from prepare-data")
    return parser


def reference_markdown() -> str:
    """The text of docs/cli.md, every command's flags as the parser defines them (`make docs`)."""
    parser = make_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = ["# Command-line reference", "",
             "Generated from the parser (`job/cli.py`, defaults and help from `JobConfig` in "
             "`job/config.py`) by `make docs`; a test checks it is current. A flag of `train` or "
             "`retrain` is also a key of `--config FILE` (TOML or JSON, `-` or `_`).", ""]
    summaries = {action.dest: action.help for action in commands._choices_actions}
    for name, sub in commands.choices.items():
        lines += [f"## `python -m job {name}`", "", summaries[name], "", "| flag | help |",
                  "| --- | --- |"]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                text = (action.help or "").replace("%%", "%").replace("|", "\\|")
                lines.append(f"| `{action.option_strings[0]}` | {text} |")
        lines.append("")
    return "\n".join(lines)


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
        elif command == "rollback":
            from job.promote import rollback

            decision = rollback(args["models"], args["to"])
            print(f"{args['models']}/current is {decision['release']} again "
                  f"(test accuracy {decision['test_accuracy']:.4f}; serving version "
                  f"{decision['serving_version']}): {decision['reason']}")
        else:
            from job.results import evaluate

            print(json.dumps(evaluate(args["model"], args["data"]), indent=1))
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_status", 2)
    return 0
