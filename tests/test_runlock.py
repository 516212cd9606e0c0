"""The lock files behind "one driver per run" and "one writer per dataset", across real processes
(the two-driver case runs in test_train_e2e.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from job.runlock import data_lock, run_lock
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
