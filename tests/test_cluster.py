"""A real multi-node Ray cluster on this machine (loopback, token auth) and `ray job submit`.

Worker nodes offer 1 CPU each; the head offers none, so training workers always run on the
worker nodes, which these tests kill: one training worker process, or whole nodes' raylets.
Every interrupted run must end with the model of the same run uninterrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cluster.stop import cluster_pids
from job.guards import processes
from tests.conftest import INTERRUPTED_EPOCHS, RAY, error_line, ray_job, run_cli, same_model, wait_for

pytestmark = pytest.mark.slow


def submit(cluster, data, tmp, *flags):
    job_id = f"fashion-{tmp.name}"
    r = ray_job(cluster, "submit", "--no-wait", "--submission-id", job_id, "--working-dir", ".",
                "--runtime-env",
                "cluster/runtime_env.yaml", "--", "python", "-m", "job", "train", "--data", data,
                "--epochs", str(INTERRUPTED_EPOCHS), "--num-workers", "2",
                "--output", str(tmp / "out"), "--storage-path", str(tmp / "ckpt"), "--name", "sub",
                *flags)
    assert r.returncode == 0, r.stderr
    return job_id


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


def train_worker_pids(cluster) -> list[int]:
    """The cluster's training worker processes (not another cluster's of this machine)."""
    table = processes()
    return [pid for pid in cluster_pids(cluster["gcs"])
            if table.get(pid, (0, b""))[1].startswith(b"ray::RayTrainWorker")]


def parent(pid: int) -> int:
    return processes()[pid][0]


def check_recovered(tmp):
    metrics = json.loads((tmp / "out" / "metrics.json").read_text())
    assert metrics["epochs_completed"] == INTERRUPTED_EPOCHS
    assert metrics["restarts"] >= 1 and metrics["resumed_from_epochs"], metrics
    assert len(metrics["worker_group_failures"]) >= 1, metrics  # as Ray reported them
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, INTERRUPTED_EPOCHS + 1))
    return metrics


def raylets(cluster) -> dict[int, bytes]:
    """pid -> command line of each of the cluster's raylets."""
    table = processes()
    return {pid: table[pid][1] for pid in cluster_pids(cluster["gcs"])
            if pid in table and table[pid][1].split(b"\0")[0].endswith(b"/raylet")}


def add_worker_node(cluster):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": cluster["token"]}
    r = subprocess.run([RAY, "start", f"--address={cluster['gcs']}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=1", "--num-gpus=1", "--disable-usage-stats"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_submission_without_or_with_a_wrong_token_is_refused(cluster, tmp_path):
    r = ray_job(cluster, "list", token=False, home=str(tmp_path))
    assert r.returncode != 0
    assert "token" in (r.stdout + r.stderr).lower()
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 64)
    r = ray_job({**cluster, "token": str(wrong)}, "list")
    assert r.returncode != 0
    assert ray_job(cluster, "list").returncode == 0


def test_a_killed_training_worker_changes_nothing(cluster, small_data, uninterrupted_run, tmp_path):
    job_id = submit(cluster, small_data, tmp_path, "--max-failures", "2")
    wait_for_first_checkpoint(cluster, job_id, tmp_path)
    victim = max(train_worker_pids(cluster))
    os.kill(victim, signal.SIGKILL)
    wait_until_done(cluster, job_id)
    metrics = check_recovered(tmp_path)
    assert same_model(metrics, uninterrupted_run)  # deterministic resumption
    logs = ray_job(cluster, "logs", job_id).stdout
    assert "its process" in logs and "restarting from epoch" in logs, logs[-3000:]
    assert "(raylet)" not in logs, logs[-3000:]  # Ray's own report of the death stays in its logs


def test_an_elastic_run_goes_on_with_fewer_workers_after_losing_nodes(
        cluster, small_data, uninterrupted_run, tmp_path):
    # 2 workers on 2 of the 3 one-CPU worker nodes. Take the spare node and one worker's node
    # away: with no capacity for a second worker left, the run must finish on one. With the
    # default flags: an elastic run gets ELASTIC_MAX_FAILURES restarts unless told otherwise.
    job_id = submit(cluster, small_data, tmp_path, "--min-workers", "1")
    wait_for_first_checkpoint(cluster, job_id, tmp_path)
    busy = {parent(pid) for pid in train_worker_pids(cluster)}
    spare = [pid for pid, cmdline in raylets(cluster).items()
             if pid not in busy and b"--head" not in cmdline and b"CPU,1" in cmdline]
    try:
        for raylet in [*spare, max(busy)]:
            os.kill(raylet, signal.SIGKILL)  # the node and every process on it go away
        wait_until_done(cluster, job_id)
    finally:
        for _ in range(len(spare)):  # what test_kuberay.py and test_gpu.py expect: 2 nodes
            add_worker_node(cluster)
    metrics = check_recovered(tmp_path)
    assert metrics["world_sizes"][0] == 2 and metrics["world_sizes"][-1] == 1, metrics["world_sizes"]
    assert metrics["resizes"] and metrics["resizes"][0]["to"] == 1
    # The same global batches on 1 worker as on 2: only summation order differs.
    assert abs(metrics["test_loss"] - uninterrupted_run["test_loss"]) <= 0.002
    assert abs(metrics["test_accuracy"] - uninterrupted_run["test_accuracy"]) <= 0.002
    logs = ray_job(cluster, "logs", job_id).stdout
    assert "] resized: 2 -> 1 worker(s) (elastic)" in logs, logs[-3000:]


HOLD_CPUS = ("import sys, time, ray; ray.init(address=sys.argv[1], log_to_driver=False)\n"
             "pg = ray.util.placement_group([{'CPU': 1}, {'CPU': 1}], strategy='SPREAD')\n"
             "ray.get(pg.ready(), timeout=60); print('held', flush=True); time.sleep(600)")


def test_a_worker_group_that_cannot_be_placed_fails_after_bounded_attempts(cluster, small_data,
                                                                            tmp_path):
    # 2 of the 3 worker nodes' CPUs are held: the cluster is big enough on paper (the driver's
    # check passes) but a 2-worker group cannot be placed. Ray Train would retry that for ever;
    # the driver's FailureConfig stops after PLACEMENT_ATTEMPTS (each 2 s here, 60 s by default).
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": cluster["token"]}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CPUS, cluster["gcs"]], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        r = run_cli("train", "--data", small_data, "--ray-address", cluster["gcs"], "--epochs", "1",
                    "--output", str(tmp_path / "out"), "--storage-path", str(tmp_path / "ckpt"),
                    env={**env, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "2"}, timeout=300)
    finally:
        holder.kill()
        holder.communicate()
    assert r.returncode == 2, r.stderr[-3000:]
    line = error_line(r)
    assert line.startswith("error: training failed: The worker group startup timed out after 2.0 "
                           "seconds waiting for 2 workers"), line
    assert time.monotonic() - started < 240
    assert not (tmp_path / "out").exists()
