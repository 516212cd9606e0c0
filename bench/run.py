"""`make bench`: epoch times of plain Keras vs the Ray job, data read time and Ray start-up, in one run.

    python bench/run.py --data data/fashion-mnist --out bench/results.json

Every number comes from this one run on this machine (machines are noisy: compare the ratios).
An epoch time is the median over epochs 2..EPOCHS (the first includes tracing), on the first
`--train-rows` training rows, so the whole benchmark takes about ten minutes on 2 cores.
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from job import data as D  # noqa: E402

EPOCHS = 3


def steady_epoch_seconds(epoch_seconds: list[float]) -> float:
    return statistics.median(epoch_seconds[1:])


def data_read_seconds(data: str) -> float:
    started = time.perf_counter()
    manifest = D.load_manifest(data)
    for split in D.SPLITS:
        D.read_split(data, split, manifest)
    return time.perf_counter() - started


def plain_keras_epoch(data: str, batch: int, threads: int) -> float:
    """The reference recipe in one process, no Ray, no strategy: the baseline.

    Same work per epoch as a Ray worker: the training pass plus the validation pass.
    """
    code = f"""
import json, time, tensorflow as tf, tf_keras as keras
from job import data as D
from job.model import build_model
from job.train import normalize
tf.config.threading.set_intra_op_parallelism_threads({threads})
tf.config.threading.set_inter_op_parallelism_threads({threads})
keras.utils.set_random_seed(0)
def dataset(split, shuffle):
    x, y = D.read_split({data!r}, split)
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shuffle(len(y), seed=0) if shuffle else ds
    return ds.batch({batch}, drop_remainder=True).map(normalize).prefetch(tf.data.AUTOTUNE)
times = []
class T(keras.callbacks.Callback):
    def on_epoch_begin(self, e, logs=None): self.t = time.perf_counter()
    def on_epoch_end(self, e, logs=None): times.append(time.perf_counter() - self.t)
build_model("seed", 1e-3).fit(dataset("train", True), validation_data=dataset("val", False),
                              epochs={EPOCHS}, verbose=0, callbacks=[T()])
print(json.dumps(times))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    return steady_epoch_seconds(json.loads(out.stdout.strip().splitlines()[-1]))


def ray_job_epoch(data: str, workers: int, cpus: int, *flags: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "job", "train", "--data", data, "--epochs", str(EPOCHS),
             "--num-workers", str(workers), "--cpus-per-worker", str(cpus),
             "--output", f"{tmp}/out", "--storage-path", f"{tmp}/ckpt", *flags],
            cwd=REPO, capture_output=True, text=True, check=True)
        with open(f"{tmp}/out/metrics.json") as f:
            metrics = json.load(f)
    return {"epoch_seconds": steady_epoch_seconds(metrics["epoch_seconds"]),
            "batch_size": metrics["config"]["batch_size"], "wall_seconds": metrics["wall_seconds"]}


def ray_start_seconds() -> float:
    code = """
import os, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
t = time.perf_counter()
ray.init(address="local", include_dashboard=False, logging_config=ray.LoggingConfig(log_level="ERROR"))
print(time.perf_counter() - t)
ray.shutdown()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=D.default_source())
    parser.add_argument("--train-rows", type=int, default=15000,
                        help="official train images to use (80%% train / 20%% val)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results.json"))
    args = parser.parse_args()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/data"
        D.prepare_data(args.source, data, num_shards=8, limit=args.train_rows)
        full = f"{tmp}/full"
        D.prepare_data(args.source, full, num_shards=8)
        results = {"machine": f"{platform.machine()}, {cores} cores, {platform.processor() or '?'}, "
                              f"Python {platform.python_version()}",
                   "train_rows": int(args.train_rows * 0.8)}
        print("timing: data read", flush=True)
        results["read_all_shards_seconds"] = min(data_read_seconds(full) for _ in range(3))
        print("timing: Ray start-up", flush=True)
        results["ray_init_seconds"] = ray_start_seconds()
        print("timing: plain Keras, 1 process, batch 64", flush=True)
        results["plain_keras_epoch_seconds"] = plain_keras_epoch(data, 64, cores)
        print("timing: Ray job, 1 worker, batch 64", flush=True)
        results["ray_1_worker"] = ray_job_epoch(data, 1, cores, "--batch-size", "64")
        print("timing: Ray job, 2 workers, 64 per worker", flush=True)
        results["ray_2_workers"] = ray_job_epoch(data, 2, cores // 2, "--batch-size", "128")
        print("timing: Ray job as `make train-local` runs it: 2 workers, global batch 64", flush=True)
        results["default_job"] = ray_job_epoch(data, 2, cores // 2)
        print("timing: the same job with --fast", flush=True)
        results["default_job_fast"] = ray_job_epoch(data, 2, cores // 2, "--fast")
        # XLA cannot compile CPU collectives: on CPU it can only be tried with one worker.
        print("timing: Ray job, 1 worker, batch 64, XLA", flush=True)
        results["ray_1_worker_xla"] = ray_job_epoch(data, 1, cores, "--batch-size", "64", "--jit-compile")
    rows = args.train_rows * 0.8
    full_epoch_estimate = results["default_job"]["epoch_seconds"] * 48000 / rows

    def ratio(a: str, b: str) -> float:
        return results[a]["epoch_seconds"] / results[b]["epoch_seconds"]

    results["ratios"] = {
        "ray_1_worker / plain_keras": results["ray_1_worker"]["epoch_seconds"]
        / results["plain_keras_epoch_seconds"],
        "ray_2_workers / ray_1_worker": ratio("ray_2_workers", "ray_1_worker"),
        "default_job_fast / default_job": ratio("default_job_fast", "default_job"),
        "ray_1_worker_xla / ray_1_worker": ratio("ray_1_worker_xla", "ray_1_worker"),
        "read_all_shards / full_epoch": results["read_all_shards_seconds"] / full_epoch_estimate,
    }
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
