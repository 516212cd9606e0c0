"""The programs `make bench` times that are not the job itself. bench/run.py runs each in a fresh
process (its own TensorFlow thread pools, its own Ray):

    python -m bench.programs plain-keras '{"data": "...", "threads": 2, "epochs": 3}'

and reads the JSON line it prints last.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from job import data as D
from job.config import JobConfig
from job.env import set_job_env


def epoch_timer(keras, seconds: list[float]):
    """A Keras callback appending each epoch's seconds, measured as the job's ReportEachEpoch does."""

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.started)

    return EpochTimer()


def scaled_arrays(data: str, split: str, rank: int = 0, world: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A split's images in [0, 1] and one-hot labels, as NumPy arrays (this rank's shards)."""
    images, labels = D.read_split(data, split, rank=rank, world=world)
    return images.astype(np.float32) / 255.0, np.eye(D.NUM_CLASSES, dtype=np.float32)[labels]


def plain_keras(data: str, threads: int, epochs: int, lib: str = "tf_keras", test: bool = False,
                batch_size: int = 64) -> dict:
    """The baseline: the reference notebook's way to train. NumPy arrays into `model.fit`, one
    process, no Ray, no strategy, no tf.data of our own; train + validation pass per epoch, then
    (`test`) the test set scored. `lib`: tf_keras (the job's Keras) or keras (Keras 3, the
    notebook's); the same seed CNN and Adam either way."""
    import importlib

    import tensorflow as tf

    from job.model import seed_cnn

    keras = importlib.import_module(lib)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    keras.utils.set_random_seed(0)

    model = seed_cnn(keras.Sequential, keras)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    seconds: list[float] = []
    model.fit(*scaled_arrays(data, "train"), batch_size=batch_size, epochs=epochs,
              validation_data=scaled_arrays(data, "val"),
              verbose=0, callbacks=[epoch_timer(keras, seconds)])
    result = {"epoch_seconds": seconds}
    if test:
        result["test_accuracy"] = model.evaluate(*scaled_arrays(data, "test"), batch_size=1000, verbose=0)[1]
    return result


def ray_start() -> dict:
    """Seconds for the job's own start of a private local Ray (driver.start_ray)."""
    import ray

    from job.driver import start_ray

    started = time.perf_counter()
    start_ray(JobConfig(data="-", num_workers=1))
    seconds = time.perf_counter() - started
    ray.shutdown()
    return {"seconds": seconds}


def test_curve(data: str, run_dir: str, model: str = "seed") -> dict:
    """Test accuracy of every epoch's checkpoint of a finished run (in epoch order)."""
    import glob
    import os

    import ray.train

    from job.results import load_checkpoint_model, score
    from job.train import load_state

    images, labels = D.read_split(data, "test")
    cfg = JobConfig(data=data, model=model)
    curve = []
    for checkpoint in filter(os.path.isdir, glob.glob(os.path.join(run_dir, "checkpoint_*"))):
        net = load_checkpoint_model(cfg, ray.train.Checkpoint.from_directory(checkpoint))
        curve.append({"epoch": load_state(checkpoint)["epoch"],
                      "test_accuracy": score(net, images, labels)["test_accuracy"]})
    return {"curve": sorted(curve, key=lambda point: point["epoch"])}


def step_timing(data: str, threads: int, rounds: int = 3) -> dict:
    """What the straggler watch's step timing costs: the job's step function (JobSteps,
    one process, no Ray) timed per epoch with its compute clock on and off, interleaved."""
    import tensorflow as tf
    import tf_keras as keras

    from job.model import build_model
    from job.step import JobSteps

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    images, labels = D.read_split(data, "train")
    x, y = images.astype(np.float32)[..., None] / 255.0, np.eye(D.NUM_CLASSES, dtype=np.float32)[labels]
    models = {}
    for timed in (False, True):
        keras.utils.set_random_seed(0)
        models[timed] = build_model("seed", 1e-3, steps_per_execution=8, sequential=JobSteps)
        if timed:
            models[timed].configure_steps(tf.Variable(0.0, dtype=tf.float64, trainable=False))
    seconds = {"off": [], "on": []}
    for _ in range(rounds):
        for timed, name in ((False, "off"), (True, "on")):
            models[timed].fit(x, y, batch_size=64, epochs=2, verbose=0,
                              callbacks=[epoch_timer(keras, seconds[name])])
    return {name: [s for i, s in enumerate(times) if i % 2] for name, times in seconds.items()}


def link_exchange(rank: int, peers: list[str], nbytes: int, rounds: int = 40) -> dict:
    """The link's own time for a 2-worker ring all-reduce's traffic: both hosts send `nbytes` to
    each other at once over one TCP connection (plain sockets, no TensorFlow); the median ms."""
    import socket
    import threading

    host, port = peers[1].rsplit(":", 1)
    if rank == 1:
        with socket.create_server(("", int(port))) as server:
            conn, _ = server.accept()
    else:
        conn = _connect((host, int(port)))
    payload, times = bytes(nbytes), []
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            conn.sendall(b".")  # a byte each way: both start together
            conn.recv(1)
            started = time.perf_counter()
            sender = threading.Thread(target=conn.sendall, args=(payload,))
            sender.start()
            received = 0
            while received < nbytes:  # exactly the payload: the next round's byte may follow
                chunk = conn.recv(min(1 << 20, nbytes - received))
                if not chunk:
                    raise ConnectionError("the peer closed the link exchange")
                received += len(chunk)
            sender.join()
            times.append((time.perf_counter() - started) * 1000)
    return {"ms": float(np.median(times))}


def _connect(address: tuple[str, int], timeout: float = 60):
    """A TCP connection to a peer that may not be listening yet."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(address)
        except ConnectionRefusedError:  # the peer is not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def mwms_step(rank: int, peers: list[str], data: str, grad_compression: str, steps: int,
              batch_size: int = 64, rounds: int = 40) -> dict:
    """The job's step on 2 MWMS workers without Ray (TF_CONFIG, one thread each, as on a host of
    1 CPU), on this rank's half of the training images: the gradients' all-reduce alone (the
    step's own `all_reduced`, no compute; median ms of `rounds`), then training steps (the
    median ms a step of epochs 2..3 of `steps` steps, 8 steps a call as the job runs them)."""
    import tensorflow as tf
    import tf_keras as keras

    from job.model import build_model
    from job.step import JobSteps

    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": peers},
                                          "task": {"type": "worker", "index": rank}})
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model("seed", 1e-3, steps_per_execution=8, sequential=JobSteps)
        model.configure_steps(grad_compression=grad_compression)
    grads_and_vars = [(tf.ones_like(v), v) for v in model.trainable_variables]
    all_reduce = tf.function(lambda: strategy.run(model.all_reduced, args=(grads_and_vars,)))
    for _ in range(2):  # traces, then connects the workers
        all_reduce()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), all_reduce())
        times.append((time.perf_counter() - started) * 1000)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    batches = (tf.data.Dataset.from_tensor_slices(scaled_arrays(data, "train", rank, len(peers)))
               .repeat().batch(batch_size // len(peers)).with_options(options))
    seconds: list[float] = []
    model.fit(batches, steps_per_epoch=steps, epochs=3, verbose=0, callbacks=[epoch_timer(keras, seconds)])
    return {"parameters": model.count_params(), "all_reduce_ms": float(np.median(times)),
            "step_ms": float(np.median(seconds[1:])) / steps * 1000}


PROGRAMS = {"plain-keras": plain_keras, "ray-start": ray_start, "test-curve": test_curve,
            "step-timing": step_timing, "link-exchange": link_exchange, "mwms-step": mwms_step}

if __name__ == "__main__":
    name, kwargs = sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")
    if name != "plain-keras":  # the baseline runs as the notebook does: TensorFlow's defaults
        set_job_env()
    elif kwargs.get("lib") == "keras":  # Keras 3, which tf_keras' setting would replace
        os.environ.pop("TF_USE_LEGACY_KERAS", None)
    print(json.dumps(PROGRAMS[name](**kwargs)))
