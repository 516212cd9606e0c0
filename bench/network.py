"""`make bench`'s network group: the job on 2 worker hosts (cluster/hosts.py: network namespaces,
1 CPU each), each host's link unshaped and shaped to 1 Gbit/s (tc tbf), with the gradients'
all-reduce as today (one float32 pack after the backward pass), in packs that start during it
(--all-reduce-pack-mb), in 16 bits (--grad-compression fp16), and both. Needs root.

    python -m bench.network                 # ~25 min on 2 cores
    python -m bench.network --rounds 2      # each setting twice, interleaved

Epoch time: the median of epochs 2..3 (the first traces), on 24,000 training images (375 steps of
64). Beside each shaped run, the ring all-reduce's own time at the link's rate,
2 (N - 1) / N x bytes / rate, a step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from job import data as D

REPO = Path(__file__).resolve().parent.parent
HOSTS_ENV = {"HOSTS_PREFIX": "fjbn", "HOSTS_SUBNET": "10.251.9"}  # not a user's hosts cluster
HEAD = f"{HOSTS_ENV['HOSTS_SUBNET']}.1:6379"
WORKER_HOSTS = ("w1", "w2")
RATES = {"unshaped": "0", "1gbit": "1gbit"}
RATE_BYTES_PER_SECOND = {"1gbit": 1e9 / 8}
SETTINGS = {  # name: job flags
    "float32_one_pack": ["--grad-compression", "none", "--all-reduce-pack-mb", "0"],
    "float32_packs": ["--grad-compression", "none", "--all-reduce-pack-mb", "1"],
    "fp16_one_pack": ["--grad-compression", "fp16", "--all-reduce-pack-mb", "0"],
    "fp16_packs": ["--grad-compression", "fp16", "--all-reduce-pack-mb", "1"],
}
BYTES_PER_STEP = {"float32": 841_546 * 4, "fp16": 841_546 * 2}  # the seed model's gradients
EPOCHS = 3
TRAIN_IMAGES_LIMIT = 30_000  # official images: 24,000 train / 6,000 val


def hosts(state: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **HOSTS_ENV, "HOSTS_DIR": state}
    r = subprocess.run([sys.executable, "-m", "cluster.hosts", *args], cwd=REPO, env=env,
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"error: cluster.hosts {' '.join(args)}: {r.stderr.strip()}")
    return r


def epoch_seconds(state: str, data: str, tmp: str, name: str, flags: list[str]) -> dict:
    out = f"{tmp}/{name}"
    hosts(state, "exec", "head", "--", sys.executable, "-m", "job", "train", "--data", data,
          "--ray-address", HEAD, "--num-workers", "2", "--epochs", str(EPOCHS),
          "--progress-seconds", "0", "--name", name, "--output", f"{out}/out",
          "--storage-path", f"{out}/ckpt", *flags)
    metrics = json.loads(Path(out, "out", "metrics.json").read_text())
    steps = metrics["optimizer_steps"] // EPOCHS
    return {"epoch_seconds": statistics.median(metrics["epoch_seconds"][1:]), "steps": steps}


def network(source: str, tmp: str, rounds: int = 1) -> dict:
    if os.geteuid() != 0:
        return {"skipped": "needs root (network namespaces)"}
    data = f"{tmp}/network-data"
    D.prepare_data(source, data, limit=TRAIN_IMAGES_LIMIT)
    state = f"{tmp}/network-hosts"
    hosts(state, "up", str(len(WORKER_HOSTS)))
    runs: dict[str, dict[str, list[dict]]] = {r: {s: [] for s in SETTINGS} for r in RATES}
    try:
        for round_ in range(rounds):  # interleaved: the machine's load moves
            for rate, tc_rate in RATES.items():
                for host in WORKER_HOSTS:
                    hosts(state, "shape", host, tc_rate)
                for setting, flags in SETTINGS.items():
                    print(f"network: {setting}, {rate}, round {round_ + 1}", flush=True)
                    runs[rate][setting].append(
                        epoch_seconds(state, data, tmp, f"{setting}-{rate}-{round_}", flags))
    finally:
        hosts(state, "down", check=False)
    table = {}
    for setting in SETTINGS:
        seconds = {rate: min(r["epoch_seconds"] for r in runs[rate][setting]) for rate in RATES}
        steps = runs["unshaped"][setting][0]["steps"]
        wire = BYTES_PER_STEP["fp16" if setting.startswith("fp16") else "float32"]
        ring_ms = 2 * (2 - 1) / 2 * wire / RATE_BYTES_PER_SECOND["1gbit"] * 1000
        table[setting] = {
            **{f"epoch_seconds_{rate}": s for rate, s in seconds.items()},
            "1gbit / unshaped": seconds["1gbit"] / seconds["unshaped"],
            "ms a step added by the 1 Gbit/s link": (seconds["1gbit"] - seconds["unshaped"]) / steps * 1000,
            "ring all-reduce at 1 Gbit/s, ms a step (model)": ring_ms,
            "bytes a step": wire,
        }
    base = table["float32_one_pack"]["epoch_seconds_1gbit"]
    for row in table.values():
        row["1gbit epoch / float32_one_pack's"] = row["epoch_seconds_1gbit"] / base
    return {"train_images": 24_000, "steps_an_epoch": runs["unshaped"]["float32_one_pack"][0]["steps"],
            "settings": SETTINGS, "table": table}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=D.default_source(), help="official IDX files")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(network(args.source, tmp, args.rounds), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
