"""A real multi-node Ray cluster on this machine (loopback, token auth) and `ray job submit`.

Worker nodes offer 1 CPU each; the head offers none, so training workers always run on the
worker nodes, which these tests kill: one training worker process, or a whole node's raylet.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import ray_job

pytestmark = pytest.mark.slow


EPOCHS = 6  # long enough to be killed mid-run


def submit(cluster, data, tmp, epochs=EPOCHS):
    job_id = f"fashion-{tmp.name}"
    r = ray_job(cluster, "submit", "--no-wait", "--submission-id", job_id, "--working-dir", ".",
                "--runtime-env",
                "cluster/runtime_env.yaml", "--", "python", "-m", "job", "train", "--data", data,
                "--epochs", str(epochs), "--num-workers", "2", "--max-failures", "2",
                "--output", str(tmp / "out"), "--storage-path", str(tmp / "ckpt"), "--name", "sub")
    assert r.returncode == 0, r.stderr
    return job_id


def wait_for(condition, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def has_checkpoint(tmp) -> bool:
    """A checkpoint Ray has registered (a checkpoint_* dir can exist while still uploading)."""
    return (tmp / "ckpt" / "sub" / "checkpoint_manager_snapshot.json").exists()


def job_status(cluster, job_id) -> str:
    return ray_job(cluster, "status", job_id).stdout


def finished(cluster, job_id) -> bool:
    status = job_status(cluster, job_id).lower()  # "Job '...' succeeded" / "failed" / "was stopped"
    return any(word in status for word in ("succeeded", "failed", "stopped"))


def wait_for_first_checkpoint(cluster, job_id, tmp):
    wait_for(lambda: has_checkpoint(tmp) or finished(cluster, job_id), "the first checkpoint")
    assert has_checkpoint(tmp), ray_job(cluster, "logs", job_id).stdout[-3000:]


def wait_until_done(cluster, job_id):
    try:
        wait_for(lambda: finished(cluster, job_id), "the job to finish", timeout=300)
    except AssertionError:
        raise AssertionError(ray_job(cluster, "logs", job_id).stdout[-5000:]) from None
    assert "succeeded" in job_status(cluster, job_id), ray_job(cluster, "logs", job_id).stdout[-3000:]


def train_worker_pids() -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::RayTrainWorker"):
            pids.append(int(pid))
    return pids


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def check_recovered(tmp):
    metrics = json.loads((tmp / "out" / "metrics.json").read_text())
    assert metrics["epochs_completed"] == EPOCHS
    assert metrics["restarts"] >= 1 and metrics["resumed_from_epochs"], metrics
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, EPOCHS + 1))
    return metrics


def test_submission_without_or_with_a_wrong_token_is_refused(cluster, tmp_path):
    r = ray_job(cluster, "list", token=False, home=str(tmp_path))
    assert r.returncode != 0
    assert "token" in (r.stdout + r.stderr).lower()
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 64)
    r = ray_job({**cluster, "token": str(wrong)}, "list")
    assert r.returncode != 0
    assert ray_job(cluster, "list").returncode == 0


def test_job_survives_a_killed_training_worker(cluster, small_data, tmp_path):
    job_id = submit(cluster, small_data, tmp_path)
    wait_for_first_checkpoint(cluster, job_id, tmp_path)
    victim = max(train_worker_pids())
    os.kill(victim, signal.SIGKILL)
    wait_until_done(cluster, job_id)
    check_recovered(tmp_path)


def test_job_survives_losing_a_worker_node(cluster, small_data, tmp_path):
    job_id = submit(cluster, small_data, tmp_path)
    wait_for_first_checkpoint(cluster, job_id, tmp_path)
    raylet = parent(max(train_worker_pids()))
    assert b"raylet" in Path(f"/proc/{raylet}/cmdline").read_bytes()
    os.kill(raylet, signal.SIGKILL)  # the node and every process on it go away
    wait_until_done(cluster, job_id)
    check_recovered(tmp_path)
