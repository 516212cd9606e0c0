"""Checkpoint storage that stops answering (a stalled NFS/EFS): a file-backed ext4 mount frozen
with `fsfreeze`, so every write to it blocks in the kernel. A short stall changes nothing; a
lasting one ends the run with one line within --storage-timeout. Needs root (loop mounts)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from job.guards import PROBE_SECONDS
from tests.conftest import REPO, interrupted_run_args, wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="loop mounts and fsfreeze need root")]


@pytest.fixture
def storage(tmp_path):
    """A mounted ext4 file system, and a switch that freezes (True) or thaws (False) it. Thawed
    and unmounted on every way out: frozen, it would keep processes stuck in the kernel."""
    image, mount = tmp_path / "storage.img", tmp_path / "storage"
    mount.mkdir()
    subprocess.run(["truncate", "-s", "256M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)

    def frozen(on: bool) -> None:
        subprocess.run(["fsfreeze", "-f" if on else "-u", str(mount)], check=on,
                       capture_output=not on)  # thawing a thawed mount: harmless

    try:
        yield mount, frozen
    finally:
        frozen(False)
        if subprocess.run(["umount", str(mount)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)])  # a process still inside: detach


def start(data, tmp, storage, *flags) -> subprocess.Popen:
    with open(tmp / "console.log", "w") as log:  # the driver writes to its own copy of the fd
        args = interrupted_run_args(data, tmp, "--name", "run", *flags, storage=storage)
        return subprocess.Popen([sys.executable, "-m", "job", *args], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, text=True)


def first_checkpoint(driver, storage, tmp) -> None:
    snapshot = storage / "run" / "checkpoint_manager_snapshot.json"
    wait_for(lambda: snapshot.exists() or driver.poll() is not None, "the first checkpoint")
    assert snapshot.exists(), (tmp / "console.log").read_text()[-3000:]


def test_a_stall_shorter_than_the_bound_passes_and_one_for_good_ends_the_run(storage, small_data,
                                                                             tmp_path):
    mount, frozen = storage
    driver = start(small_data, tmp_path, mount, "--storage-timeout", "30", "--epochs", "12")
    first_checkpoint(driver, mount, tmp_path)
    frozen(True)
    try:
        time.sleep(15)  # the checkpoint write of epoch 2 blocks in the kernel meanwhile
    finally:
        frozen(False)
    log = tmp_path / "console.log"
    wait_for(lambda: "] epoch 2/12: loss" in log.read_text() or driver.poll() is not None,
             "epoch 2 after the stall")
    assert driver.poll() is None, log.read_text()[-3000:]  # the short stall changed nothing
    frozen(True)
    stalled = time.monotonic()
    try:
        status = driver.wait(120)  # its workers stay stuck in the kernel: it must not wait on them
        waited = time.monotonic() - stalled
    finally:
        frozen(False)
    console = log.read_text()
    assert status == 2, console[-3000:]
    # The last write that completed was at most PROBE_SECONDS before the stall began.
    assert 30 - PROBE_SECONDS <= waited <= 30 + 5, waited
    errors = [line for line in console.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, console
    assert errors[0].startswith(f"error: the storage at {mount} has not completed a write for "), errors
    assert "(--storage-timeout 30)" in errors[0]
    assert not (tmp_path / "out").exists()
