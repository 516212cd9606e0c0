"""One driver per run: a lock file beside the run's checkpoints, held while the driver lives.

Two drivers of one run name (a CronJob retry, a manual "train now", a slow run overlapping the
next schedule) would train into the same checkpoint dir at once. The second one is refused with
one line naming the holder. The lock is a POSIX record lock (`fcntl.lockf`) on
`STORAGE/.RUN.lock`: the kernel releases it when the holder exits or dies, and on NFS (v3 NLM,
v4 leases), CephFS or EFS the server releases it when the holder's node goes away, so a dead
driver never leaves a stale lock to clean up. The file itself stays; only the lock matters.

`s3://` and `gs://` storage offers no such lock: there the guard is skipped (README).
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


def lock_path(storage_path: str, run_name: str) -> str:
    return os.path.join(storage_path, f".{run_name}.lock")


@contextlib.contextmanager
def run_lock(storage_path: str, run_name: str):
    """Hold the run's lock for the duration of the block, or raise JobError if another has it."""
    if "://" in storage_path:
        yield None
        return
    path = lock_path(storage_path, run_name)
    try:
        os.makedirs(storage_path, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise JobError(f"cannot create the run lock {path}: {e.strerror}") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise JobError(f"cannot lock {path}: {e.strerror}") from None
            raise JobError(f"run {run_name!r} is already being trained by {holder(fd)} "
                           f"(lock {path}); not starting a second training of it") from None
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def holder(fd: int) -> str:
    """Who holds the lock, as the holder wrote it (best effort: it may be mid-write)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"driver pid {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another driver"
