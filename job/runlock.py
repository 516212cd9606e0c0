"""One driver per run, one writer per dataset: lock files held while their holder lives.

Two drivers of one run name (a CronJob retry, a manual "train now", a slow run overlapping the
next schedule) would train into the same checkpoint dir at once: the second one is refused with
one line naming the holder (`run_lock`, on `STORAGE/.RUN.lock`). Two first runs preparing the same
dataset would delete each other's half-written shards: the second waits for the first and then
finds the dataset (`data_lock`, on `DATA.lock`).

The locks are POSIX record locks (`fcntl.lockf`): the kernel releases one when its holder exits
or dies, and on NFS (v3 NLM, v4 leases), CephFS or EFS the server releases it when the holder's
node goes away, so a dead driver never leaves a stale lock to clean up. The files stay; only the
locks matter. `s3://` and `gs://` offer no such lock: there the guards are skipped (README).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

from job.config import JobError


class Busy(Exception):
    """Another live process holds the lock; the message says who (as the holder wrote it)."""


@contextlib.contextmanager
def file_lock(path: str, wait: bool = False):
    """Hold the lock on `path` (created if missing) for the block; without `wait`, raise Busy."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise JobError(f"cannot create the lock file {path}: {e.strerror} "
                       f"(running as UID {os.getuid()})") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise JobError(f"cannot lock {path}: {e.strerror}") from None
            raise Busy(holder(fd)) from None
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
def run_lock(storage_path: str, run_name: str):
    """Hold the run's lock for the block, or raise JobError if another live driver has it."""
    if "://" in storage_path:
        yield
        return
    path = os.path.join(storage_path, f".{run_name}.lock")
    try:
        with file_lock(path):
            yield
    except Busy as busy:
        raise JobError(f"run {run_name!r} is already being trained by {busy} (lock {path}); "
                       f"not starting a second training of it") from None


def data_lock(data: str):
    """Wait for any other writer of the dataset `data`, then hold its lock for the block."""
    return contextlib.nullcontext() if "://" in data else file_lock(data.rstrip("/") + ".lock", wait=True)
