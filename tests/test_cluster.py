"""A real multi-node Ray cluster on this machine (loopback, token auth): who may submit, and a
worker group Ray cannot place. (Faults of running workers, nodes and links, and elastic runs:
tests/test_hosts.py.)
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.conftest import (
    HOLD_CPUS,
    error_line,
    ray_job,
    run_cli,
    token_env,
    train_args,
)

pytestmark = pytest.mark.slow


def test_submission_without_or_with_a_wrong_token_is_refused(cluster, tmp_path):
    r = ray_job(cluster, "list", token=False, home=str(tmp_path))
    assert r.returncode != 0
    assert "token" in (r.stdout + r.stderr).lower()
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 64)
    r = ray_job({**cluster, "token": str(wrong)}, "list")
    assert r.returncode != 0
    assert ray_job(cluster, "list").returncode == 0


def test_a_worker_group_that_cannot_be_placed_fails_after_bounded_attempts(cluster, small_data,
                                                                            tmp_path):
    # 2 of the 3 worker nodes' CPUs are held: the cluster is big enough on paper (the driver's
    # check passes) but a 2-worker group cannot be placed. Ray Train would retry that for ever;
    # the driver's FailureConfig stops after PLACEMENT_ATTEMPTS (each 2 s here, 60 s by default).
    env = token_env(cluster)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CPUS, cluster["gcs"], "2"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        r = run_cli(*train_args(small_data, tmp_path, "--ray-address", cluster["gcs"], "--epochs", "1"),
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

