"""One driver per run, one writer per dataset and per OUTPUT, one promotion at a time: lock
files held while their holder lives.

Two drivers of one run name (a CronJob retry, a manual "train now", a slow run overlapping the
next schedule) would train into the same checkpoint dir at once: the second one is refused with
one line naming the holder (`run_lock`, on `STORAGE/.RUN.lock`). Two runs of different names
writing one OUTPUT would swap a mix into place: the second is refused (`output_lock`, on
`OUTPUT.lock`). Two first runs preparing the same dataset would delete each other's half-written
shards: the second waits for the first and then finds the dataset (`data_lock`, on `DATA.lock`);
promotions into one MODELS dir take turns (`promote.py`).

The locks are POSIX record locks (`fcntl.lockf`): the kernel releases one when its holder exits
or dies. On shared file systems that holds where the server ends a dead client's locks itself:
NFSv4 (leases), EFS, CephFS. Under NFSv3 (NLM) a dead node's locks stay until its statd tells the
server it rebooted, so the waits here are bounded (LOCK_WAIT_SECONDS) and end with one line.
Object storage (`s3://`, `gs://`) offers no lock: the run lock is skipped there, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time

from job.config import JobError

LOCK_WAIT_SECONDS = 1800  # the longest a waiting lock (dataset, promotion) waits for its holder


class Busy(Exception):
    """Another live process holds the lock; the message says who (as the holder wrote it)."""


@contextlib.contextmanager
def file_lock(path: str, wait: float = 0):
    """Hold the lock on `path` (created if missing) for the block. If another process holds it,
    wait up to `wait` seconds for it, then raise Busy."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise JobError(f"cannot create the lock file {path}: {e.strerror} "
                       f"(running as UID {os.getuid()})") from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise JobError(f"cannot lock {path}: {e.strerror}") from None
                if time.monotonic() >= deadline:
                    raise Busy(holder(fd)) from None
                time.sleep(min(1.0, wait))
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def holder(fd: int) -> str:
    """Who holds the lock, as the holder wrote it (best effort: it may be mid-write)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"driver pid {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another driver"


@contextlib.contextmanager
def lock_or_refuse(path: str, refusal, wait: float = 0):
    """Hold `path`'s lock for the block (waiting up to `wait` s for another holder), or raise
    JobError(refusal(holder))."""
    try:
        with file_lock(path, wait=wait):
            yield
    except Busy as busy:
        raise JobError(refusal(busy)) from None


def run_lock(storage_path: str, run_name: str):
    """Hold the run's lock for the block, or raise JobError if another live driver has it."""
    if "://" in storage_path and not storage_path.startswith("file://"):
        print(f"warning: {storage_path} cannot be locked: nothing stops a second driver of run "
              f"{run_name!r} from training into it at the same time", file=sys.stderr, flush=True)
        return contextlib.nullcontext()
    path = os.path.join(storage_path.removeprefix("file://"), f".{run_name}.lock")
    return lock_or_refuse(path, lambda holder: f"run {run_name!r} is already being trained by "
                          f"{holder} (lock {path}); not starting a second training of it")


def output_lock(output: str):
    """Hold OUTPUT's lock for the block, or raise JobError if another live driver writes it."""
    path = output.rstrip("/") + ".lock"
    return lock_or_refuse(path, lambda holder: f"output dir {output} is being written by {holder} "
                          f"(lock {path}); choose another --output")


def waiting_lock(path: str, what: str, wait: float = LOCK_WAIT_SECONDS):
    """Wait for any other holder of `path` (up to `wait` s), then hold it for the block."""
    return lock_or_refuse(path, lambda holder: f"{what} has been locked by {holder} for over "
                          f"{wait:g} s (lock {path}; a holder on a dead NFSv3 node keeps it until "
                          f"that node's statd reports)", wait=wait)


def data_lock(data: str):
    """Wait for any other writer of the dataset `data`, then hold its lock for the block."""
    if "://" in data and not data.startswith("file://"):
        return contextlib.nullcontext()
    return waiting_lock(data.removeprefix("file://").rstrip("/") + ".lock", f"dataset {data}")
