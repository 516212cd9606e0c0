"""`make bench`'s network group, on worker hosts of the hosts cluster (cluster/hosts.py: network
namespaces), each host's link unshaped and shaped to 1 Gbit/s (tc tbf). Needs root.

- settings: 2 hosts of 1 CPU, the gradients' all-reduce as today (one float32 pack after the
  backward pass), in packs that start during it (--all-reduce-pack-mb), in 16 bits
  (--grad-compression fp16), and both; 24,000 training images (375 steps of 64), the median of
  epochs 2..3 (the first traces), in interleaved rounds (the fastest round counts). Beside them,
  at each rate, the step's profile: the link's own time for the ring's bytes (plain TCP),
  TensorFlow's all-reduce of the gradients alone, and the job's step on 2 MWMS workers without
  Ray (bench/programs.py), float32 and fp16.
- scaling: 1, 2 and 3 hosts at 60 % of a core each (3 fit this machine's 2 cores beside the
  driver), 48 images a worker a step (as GPUs keep theirs: the global batch grows), 12,000
  training images, epoch 2: per step, the workers' own compute and the rest (the all-reduce and
  waiting for the slowest).

Beside each, the ring all-reduce's own time at the link's rate, 2 (N - 1) / N x bytes / rate, a
step; `projection` carries the measured split to 8 and 64 GPUs (docs/benchmarks.md).

    python -m bench.network                 # each setting in 2 interleaved rounds, 25-50 min
    python -m bench.network --rounds 1      # each setting once
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
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
RATES = {"unshaped": "0", "1gbit": "1gbit"}
RATE_BYTES_PER_SECOND = {"1gbit": 1e9 / 8}
SETTINGS = {  # name: job flags
    "float32_one_pack": ["--grad-compression", "none", "--all-reduce-pack-mb", "0"],
    "float32_packs": ["--grad-compression", "none", "--all-reduce-pack-mb", "1"],
    "fp16_one_pack": ["--grad-compression", "fp16", "--all-reduce-pack-mb", "0"],
    "fp16_packs": ["--grad-compression", "fp16", "--all-reduce-pack-mb", "1"],
}
WIRE_BYTES = {"float32": 4, "fp16": 2}  # a gradient element on the wire
PROFILE_PORT = 7300  # the profile's 2 workers (no Ray) on w1 and w2
EPOCHS = 3
FULL_TRAIN_IMAGES = 48_000  # the official 60,000 less the 12,000 validation images
TRAIN_IMAGES_LIMIT = 30_000  # official images: 24,000 train / 6,000 val
SCALING_WORKERS = (1, 2, 3)
SCALING_CPU_PERCENT = 60
PER_WORKER_BATCH = 48  # a multiple of the 6 shards
SCALING_EPOCHS = 2  # epoch 2 is timed
SCALING_TRAIN_IMAGES_LIMIT = 15_000  # 12,000 train
# The projection's assumptions (docs/benchmarks.md): `make gpu-check` prints a GPU's compute ms a
# step; the "about a millisecond" for this CNN's step on a data-centre GPU until then.
GPU_STEP_MS = 1.0
GPU_US_AN_IMAGE = 5.0  # ~50 MFLOPs an image a training step at ~10 TFLOP/s effective
HOP_LATENCY_US = 5.0  # one hop of the ring on an RDMA fabric
PROJECTED_RECIPES = {"default": 64, "large-batch": 1024}  # global batch
PROJECTED_GPUS = (8, 64)
PROJECTED_GBIT = (100, 400)


def hosts(state: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **HOSTS_ENV, "HOSTS_DIR": state}
    r = subprocess.run([sys.executable, "-m", "cluster.hosts", *args], cwd=REPO, env=env,
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"error: cluster.hosts {' '.join(args)}: {r.stderr.strip()}")
    return r


@contextlib.contextmanager
def worker_hosts(state: str, count: int, cpu_percent: int = 0):
    """`count` worker hosts (w1, w2, ...) beside the head, each throttled to `cpu_percent` of a
    core if given; yields a function that shapes every worker's link to a `tc` rate ("0": none)."""
    names = [f"w{i}" for i in range(1, count + 1)]
    hosts(state, "up", str(count))
    try:
        for host in names if cpu_percent else ():
            hosts(state, "throttle", host, str(cpu_percent))

        def shape_links(tc_rate: str) -> None:
            for host in names:
                hosts(state, "shape", host, tc_rate)

        yield shape_links
    finally:
        hosts(state, "down", check=False)


def steady_step(metrics: dict) -> dict:
    """A run's steady state, from its metrics.json: the median epoch after the first (which
    traces; the first if it is the only one), steps an epoch, ms a step, and the workers' mean
    compute ms a step in those epochs."""
    epoch = statistics.median(metrics["epoch_seconds"][1:] or metrics["epoch_seconds"])
    compute = ([e for e in metrics["compute_ms_per_step"] if e["epoch"] > 1]
               or metrics["compute_ms_per_step"])
    steps = metrics["history"][0]["optimizer_steps"]
    return {"epoch_seconds": epoch, "steps": steps, "step_ms": 1000 * epoch / steps,
            "compute_ms": statistics.mean(ms for e in compute for ms in e["ms"]),
            "parameters": metrics["params"]}


def job_run(state: str, data: str, tmp: str, name: str, workers: int, epochs: int,
            flags: list[str]) -> dict:
    """One run of the job from the head host: its steady_step."""
    out = f"{tmp}/{name}"
    hosts(state, "exec", "head", "--", sys.executable, "-m", "job", "train", "--data", data,
          "--ray-address", HEAD, "--num-workers", str(workers), "--epochs", str(epochs),
          "--progress-seconds", "0", "--name", name, "--output", f"{out}/out",
          "--storage-path", f"{out}/ckpt", *flags)
    return steady_step(json.loads(Path(out, "out", "metrics.json").read_text()))


def ring_ms(workers: int, wire_bytes: float, bytes_per_second: float) -> float:
    """A ring all-reduce's time on the link: each worker sends 2 (N - 1) / N of the bytes."""
    return 2 * (workers - 1) / workers * wire_bytes / bytes_per_second * 1000


def on_two_hosts(state: str, name: str, **kwargs) -> list[dict]:
    """A bench program (bench/programs.py) on w1 and w2 at once, as ranks 0 and 1 of `peers`."""
    addresses = json.loads(Path(state, "hosts.json").read_text())  # what `up` gave each host
    peers = [f"{addresses[f'w{rank + 1}']}:{PROFILE_PORT}" for rank in (0, 1)]
    env = {**os.environ, **HOSTS_ENV, "HOSTS_DIR": state}
    ranks = [subprocess.Popen(
        [sys.executable, "-m", "cluster.hosts", "exec", f"w{rank + 1}", "--", sys.executable, "-m",
         "bench.programs", name, json.dumps({"rank": rank, "peers": peers, **kwargs})],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [rank.communicate() for rank in ranks]
    for rank, (_, err) in zip(ranks, outputs, strict=True):
        if rank.returncode != 0:
            raise SystemExit(f"error: bench.programs {name} on 2 hosts: {err.strip()[-2000:]}")
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def profile(state: str, data: str, steps: int) -> dict:
    """Where a 2-worker step's time goes, per wire type: the link's own time for the ring's
    bytes (plain TCP), TensorFlow's all-reduce of the gradients alone, and the job's step without
    Ray (bench/programs.py); the slower rank's figure of each."""
    found = {}
    for wire, compression in (("float32", "none"), ("fp16", "fp16")):
        step = on_two_hosts(state, "mwms-step", data=data, grad_compression=compression, steps=steps)
        found["parameters"] = step[0]["parameters"]
        link = on_two_hosts(state, "link-exchange", nbytes=found["parameters"] * WIRE_BYTES[wire])
        found[wire] = {"link ms": max(r["ms"] for r in link),
                       "all-reduce alone ms": max(r["all_reduce_ms"] for r in step),
                       "step without Ray ms": max(r["step_ms"] for r in step)}
    return found


def network(source: str, tmp: str, rounds: int) -> dict:
    if os.geteuid() != 0:
        return {"skipped": "needs root (network namespaces)"}
    data = f"{tmp}/network-data"
    D.prepare_data(source, data, limit=TRAIN_IMAGES_LIMIT)
    train_images = TRAIN_IMAGES_LIMIT * 4 // 5
    state = f"{tmp}/network-hosts"
    runs: dict[str, dict[str, list[dict]]] = {r: {s: [] for s in SETTINGS} for r in RATES}
    profiles: dict[str, list[dict]] = {r: [] for r in RATES}
    with worker_hosts(state, 2) as shape_links:
        for round_ in range(rounds):  # interleaved: the machine's load moves
            for rate, tc_rate in RATES.items():
                shape_links(tc_rate)
                print(f"network: the step's profile, {rate}, round {round_ + 1}", flush=True)
                profiles[rate].append(profile(state, data, train_images // 64))
                for setting, flags in SETTINGS.items():
                    print(f"network: {setting}, {rate}, round {round_ + 1}", flush=True)
                    runs[rate][setting].append(
                        job_run(state, data, tmp, f"{setting}-{rate}-{round_}", 2, EPOCHS, flags))
    parameters = profiles["unshaped"][0]["parameters"]
    table = {}
    for setting in SETTINGS:
        seconds = {rate: min(r["epoch_seconds"] for r in runs[rate][setting]) for rate in RATES}
        steps = runs["unshaped"][setting][0]["steps"]
        wire = parameters * WIRE_BYTES["fp16" if setting.startswith("fp16") else "float32"]
        table[setting] = {
            **{f"epoch_seconds_{rate}": s for rate, s in seconds.items()},
            **{f"epoch_seconds_{rate}_by_round": [r["epoch_seconds"] for r in runs[rate][setting]]
               for rate in RATES},
            "1gbit / unshaped": seconds["1gbit"] / seconds["unshaped"],
            "ms a step added by the 1 Gbit/s link": (seconds["1gbit"] - seconds["unshaped"]) / steps * 1000,
            "ring all-reduce at 1 Gbit/s, ms a step (model)": ring_ms(
                2, wire, RATE_BYTES_PER_SECOND["1gbit"]),
            "bytes a step": wire,
        }
    base = table["float32_one_pack"]["epoch_seconds_1gbit"]
    for row in table.values():
        row["1gbit epoch / float32_one_pack's"] = row["epoch_seconds_1gbit"] / base
    return {"train_images": train_images, "steps_an_epoch": runs["unshaped"]["float32_one_pack"][0]["steps"],
            "parameters": parameters, "settings": SETTINGS, "table": table,
            "step_profile": step_profile(profiles, runs, parameters)}


def step_profile(profiles: dict[str, list[dict]], runs: dict[str, dict[str, list[dict]]],
                 parameters: int) -> dict:
    """Each part of a step at each rate (the fastest round) and what the 1 Gbit/s link adds to it;
    the job's own step and compute (its straggler watch's clock) from its one-pack runs."""
    found = {}
    for wire, setting in (("float32", "float32_one_pack"), ("fp16", "fp16_one_pack")):
        rows = {}
        for rate in RATES:
            parts = {part: min(p[wire][part] for p in profiles[rate]) for part in profiles[rate][0][wire]}
            job = min(runs[rate][setting], key=lambda r: r["step_ms"])
            rows[rate] = {**parts, "job step ms": job["step_ms"], "job compute ms": job["compute_ms"]}
        rows["added by 1gbit"] = {part: ms - rows["unshaped"][part] for part, ms in rows["1gbit"].items()}
        rows["ring model at 1gbit ms"] = ring_ms(2, parameters * WIRE_BYTES[wire],
                                                 RATE_BYTES_PER_SECOND["1gbit"])
        found[wire] = rows
    return found


def scaling(source: str, tmp: str) -> dict:
    """1, 2 and 3 worker hosts, each link unshaped and at 1 Gbit/s: a step's compute and the rest."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (network namespaces)"}
    data = f"{tmp}/scaling-data"  # 6 shards: any of 1, 2, 3 workers reads its own
    D.prepare_data(source, data, num_shards=6, limit=SCALING_TRAIN_IMAGES_LIMIT)
    state = f"{tmp}/scaling-hosts"
    rows = []
    with worker_hosts(state, max(SCALING_WORKERS), SCALING_CPU_PERCENT) as shape_links:
        for rate, tc_rate in RATES.items():
            shape_links(tc_rate)
            for workers in SCALING_WORKERS:
                print(f"network scaling: {workers} worker host(s), {rate}", flush=True)
                run = job_run(state, data, tmp, f"scaling-{workers}-{rate}", workers, SCALING_EPOCHS,
                              ["--batch-size", str(PER_WORKER_BATCH * workers)])
                step_ms = run["step_ms"]
                rows.append({"worker hosts": workers, "link": rate,
                             "global batch": PER_WORKER_BATCH * workers,
                             "epoch seconds": run["epoch_seconds"], "steps an epoch": run["steps"],
                             "step ms": step_ms, "compute ms a step": run["compute_ms"],
                             "the rest ms a step": step_ms - run["compute_ms"],
                             "ring all-reduce ms a step (model)": ring_ms(
                                 workers, run["parameters"] * WIRE_BYTES["float32"],
                                 RATE_BYTES_PER_SECOND.get(rate, float("inf"))),
                             "images a second": PER_WORKER_BATCH * workers / step_ms * 1000})
    for row in rows:
        one = next(r for r in rows if r["link"] == row["link"] and r["worker hosts"] == 1)
        row["scaling efficiency"] = row["images a second"] / (row["worker hosts"] * one["images a second"])
    return {"train_images": SCALING_TRAIN_IMAGES_LIMIT * 4 // 5, "cpu_percent_a_host": SCALING_CPU_PERCENT,
            "rows": rows}


def projection(parameters: int, step_ms: float = GPU_STEP_MS) -> list[dict]:
    """Epoch time on N GPUs against one, the model's all-reduce not overlapped (today's step): a
    ring's bytes at the link's rate plus HOP_LATENCY_US a hop, 2 (N - 1) hops. The global batch is
    the recipe's, so each GPU's share shrinks with N; a GPU step of this small CNN is bound by
    kernel launches below ~128 images (GPU_STEP_MS), above by arithmetic (GPU_US_AN_IMAGE)."""
    def gpu_step_ms(images: float) -> float:
        return max(step_ms, images * GPU_US_AN_IMAGE / 1000)

    rows = []
    for recipe, global_batch in PROJECTED_RECIPES.items():
        steps = FULL_TRAIN_IMAGES // global_batch
        one_gpu = steps * gpu_step_ms(global_batch)
        for gpus, gbit, wire in itertools.product(PROJECTED_GPUS, PROJECTED_GBIT, WIRE_BYTES):
            compute = gpu_step_ms(global_batch / gpus)
            comm = (ring_ms(gpus, parameters * WIRE_BYTES[wire], gbit * 1e9 / 8)
                    + 2 * (gpus - 1) * HOP_LATENCY_US / 1000)
            epoch = steps * (compute + comm)
            rows.append({"recipe": recipe, "GPUs": gpus, "Gbit/s": gbit, "all-reduce": wire,
                         "compute ms a step": compute, "all-reduce ms a step": comm,
                         "epoch seconds": epoch / 1000, "speed-up over 1 GPU": one_gpu / epoch,
                         "scaling efficiency": one_gpu / epoch / gpus})
    return rows


def at_least_one(text: str) -> int:
    """argparse's type for a count of rounds."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1 (got {text!r})")
    return int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=D.default_source(), help="official IDX files")
    parser.add_argument("--rounds", type=at_least_one, default=2, help="interleaved rounds of the settings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = network(args.source, tmp, args.rounds)
        print(json.dumps({"settings": settings, "scaling": scaling(args.source, tmp),
                          "projection": projection(settings["parameters"]) if "parameters" in settings
                          else settings}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
