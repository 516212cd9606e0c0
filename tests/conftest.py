"""Shared fixtures: a small but real Fashion-MNIST Parquet dataset, and a CLI runner."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from job.data import default_source, prepare_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = 1200  # first 1200 official train images (-> 960 train / 240 val) and 1200 test images


@pytest.fixture(scope="session")
def source_dir() -> str:
    source = default_source()
    if not os.path.exists(os.path.join(source, "train-images-idx3-ubyte.gz")):
        pytest.fail(f"official Fashion-MNIST IDX files not found in {source}: run `make test`, "
                    f"which installs Debian's dataset-fashion-mnist, or set FASHION_MNIST_DIR")
    return source


@pytest.fixture(scope="session")
def small_data(source_dir, tmp_path_factory) -> str:
    """A real, small dataset, shared read-only by the whole session."""
    out = str(tmp_path_factory.mktemp("data") / "fashion-mnist")
    prepare_data(source_dir, out, num_shards=4, seed=0, limit=SMALL)
    return out


@pytest.fixture
def data_copy(small_data, tmp_path) -> str:
    """A private copy of the small dataset that a test may damage."""
    return shutil.copytree(small_data, tmp_path / "data")


INTERRUPTED_EPOCHS = 4  # runs that tests interrupt: long enough to be killed mid-run


def train_args(data: str, tmp: Path, *extra: str, storage: Path | None = None) -> list[str]:
    """`python -m job train` arguments of a run that writes tmp/out, checkpoints in tmp/ckpt."""
    return ["train", "--data", data, "--output", str(tmp / "out"), "--storage-path",
            str(storage or tmp / "ckpt"), *extra]


def interrupted_run_args(data: str, tmp: Path, *extra: str, storage: Path | None = None) -> list[str]:
    """A run with the uninterrupted run's training settings, which its faults must not change."""
    return train_args(data, tmp, "--epochs", str(INTERRUPTED_EPOCHS), "--num-workers", "2",
                      *extra, storage=storage)


def metrics_of(tmp: Path, out: str = "out") -> dict:
    """The metrics.json a run wrote into tmp/out."""
    return json.loads((tmp / out / "metrics.json").read_text())


def token_env(cluster: dict) -> dict:
    """The environment of a process that talks to `cluster` (token auth)."""
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": cluster["token"]}


@pytest.fixture(scope="session")
def uninterrupted_run(small_data, tmp_path_factory) -> dict:
    """metrics.json of the run the interrupted ones must reproduce: the same training settings
    (2 workers, INTERRUPTED_EPOCHS), on a private local Ray, never interrupted."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    r = run_cli(*interrupted_run_args(small_data, tmp))
    assert r.returncode == 0, r.stderr[-3000:]
    return metrics_of(tmp)


def checkpoint_variables(metrics: dict) -> dict:
    """Every variable of a run's chosen checkpoint (weights, optimizer slots and step counter)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(metrics["checkpoint"], "ckpt"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def same_model(a: dict, b: dict) -> bool:
    """Two runs' metrics.json describe bit-identical models: every variable of the checkpoints
    they chose is equal, bit for bit, and so are their test loss and accuracy."""
    import numpy as np

    va, vb = checkpoint_variables(a), checkpoint_variables(b)
    return (va.keys() == vb.keys() and all(np.array_equal(va[k], vb[k]) for k in va)
            and (a["test_loss"], a["test_accuracy"]) == (b["test_loss"], b["test_accuracy"]))


# Another job holding CPUs of a Ray cluster: python -c HOLD_CPUS GCS_ADDRESS COUNT (one per node).
HOLD_CPUS = ("import sys, time, ray; ray.init(address=sys.argv[1], log_to_driver=False)\n"
             "pg = ray.util.placement_group([{'CPU': 1}] * int(sys.argv[2]), strategy='SPREAD')\n"
             "ray.get(pg.ready(), timeout=60); print('held', flush=True); time.sleep(600)")


def wait_for(condition, what: str, timeout: float = 300, log: Path | None = None):
    """Poll `condition`; on timeout fail, with the end of `log` if given."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, (f"timed out waiting for {what}" +
                                             (f":\n{log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.5)


def run_cli(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """`python -m job ARGS` in a subprocess, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "job", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's one-line error (TensorFlow may print start-up lines of its own before it), and
    no traceback beside it."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    assert "Traceback (most recent call last)" not in result.stderr + result.stdout, result.stderr
    return lines[0]


def pinned_ray_version() -> str:
    """The `ray[...]==X` pin in pyproject.toml, which every manifest and image must match."""
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        return re.search(r'"ray\[[^\]]*\]==([\d.]+)"', f.read()).group(1)


RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """One local multi-node Ray cluster for the session (cluster/local.sh: loopback, token auth):
    a head of 0 CPUs + 3 worker nodes of 1 CPU (test_cluster.py holds 2 of them), each
    advertising 1 GPU it does not have (test_gpu.py)."""
    state = tmp_path_factory.mktemp("cluster")
    gcs_port = free_port()
    env = {**os.environ, "CLUSTER_DIR": str(state), "GCS_PORT": str(gcs_port),
           "DASHBOARD_PORT": str(free_port()), "AGENT_PORT": str(free_port()), "RAY": RAY,
           "GPUS_PER_NODE": "1"}
    up = subprocess.run(["cluster/local.sh", "up", "3"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=180)
    assert up.returncode == 0, up.stderr
    ready = {"address": (state / "address").read_text().strip(), "token": str(state / "auth_token"),
             "gcs": f"127.0.0.1:{gcs_port}", "dir": state}
    try:
        yield ready
    finally:
        subprocess.run(["cluster/local.sh", "down"], cwd=REPO, env=env, capture_output=True,
                       timeout=120)


def can_unshare_mounts() -> bool:
    """A private mount namespace is possible here (root, and a kernel/container that allows it)."""
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


def ray_job(cluster, *args, token=True, timeout=60, home=None) -> subprocess.CompletedProcess:
    """`ray job ARGS` against `cluster`, with its token (or none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=cluster["token"])
    if home:
        env["HOME"] = home
    command, *rest = args
    return subprocess.run([RAY, "job", command, "--address", cluster["address"], *rest], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
