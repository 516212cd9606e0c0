"""The lock files behind "one driver per run" and "one writer per dataset", across real processes
(the two-driver case runs in test_train_e2e.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from job.config import JobError
from job.runlock import data_lock, output_lock, run_lock, waiting_lock
from tests.conftest import REPO, error_line

TAKE_RUN_LOCK = ("import sys; from job.config import JobError; from job.runlock import run_lock\n"
                 "try:\n    with run_lock(sys.argv[1], 'nightly'): print('trained')\n"
                 "except JobError as e: print(f'error: {e}', file=sys.stderr); sys.exit(2)")


def test_a_second_process_is_refused_the_run_and_told_who_has_it(tmp_path):
    with run_lock(str(tmp_path), "nightly"):
        r = subprocess.run([sys.executable, "-c", TAKE_RUN_LOCK, str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert error_line(r).startswith(f"error: run 'nightly' is already being trained by driver pid "
                                        f"{os.getpid()} on host {socket.gethostname()} since ")
    r = subprocess.run([sys.executable, "-c", TAKE_RUN_LOCK, str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "trained\n")  # released with its holder


def test_a_second_writer_of_a_dataset_waits_for_the_first(tmp_path):
    data = str(tmp_path / "fashion-mnist")
    wait = ("import sys, time; from job.runlock import data_lock\n"
            "with data_lock(sys.argv[1]): print(time.time())")
    with data_lock(data):
        waiter = subprocess.Popen([sys.executable, "-c", wait, data], cwd=REPO, stdout=subprocess.PIPE,
                                  text=True)
        time.sleep(3)
        assert waiter.poll() is None  # still waiting
        released = time.time()
    assert float(waiter.communicate(timeout=60)[0]) >= released


def test_a_second_run_on_a_busy_output_is_refused_before_anything_is_written(tmp_path, small_data):
    out = tmp_path / "out"
    with output_lock(str(out)):
        r = subprocess.run([sys.executable, "-m", "job", "train", "--data", small_data, "--output",
                            str(out), "--storage-path", str(tmp_path / "ckpt"), "--name", "other"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert error_line(r).startswith(f"error: output dir {out} is being written by driver pid "
                                    f"{os.getpid()} on host {socket.gethostname()} since ")
    assert not out.exists() and os.listdir(tmp_path / "ckpt") == [".other.lock"]  # no training


def test_a_lock_that_is_never_freed_ends_the_wait_with_one_line(tmp_path):
    # NFSv3: a dead node's lock stays; the wait ends at its bound instead of hanging.
    wait = ("import sys; from job.config import JobError; from job.runlock import waiting_lock\n"
            "try:\n    with waiting_lock(sys.argv[1], 'dataset d', wait=2): pass\n"
            "except JobError as e: print(f'error: {e}', file=sys.stderr); sys.exit(2)")
    lock = str(tmp_path / "d.lock")
    with waiting_lock(lock, "dataset d"):
        r = subprocess.run([sys.executable, "-c", wait, lock], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 2
    assert error_line(r).startswith(f"error: dataset d has been locked by driver pid {os.getpid()}")


def test_object_storage_runs_unlocked_with_a_warning_and_file_uris_are_locked(tmp_path, capsys):
    with run_lock("s3://bucket/checkpoints", "nightly"):
        pass
    assert capsys.readouterr().err.startswith("warning: s3://bucket/checkpoints cannot be locked")
    with run_lock(f"file://{tmp_path}", "nightly"):
        assert (tmp_path / ".nightly.lock").exists()
    assert capsys.readouterr().err == ""
    with pytest.raises(JobError, match="cannot create the lock file"), \
            waiting_lock("/proc/no/such.lock", "dataset d"):
        pass
