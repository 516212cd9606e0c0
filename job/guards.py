"""What stops a run from the driver, whatever its workers do: its time budget, and storage that
stops answering.

- `TimeBudget` (--time-budget): past it, training is aborted through Ray Train's own abort.
- `StorageWatch` (--storage-timeout): a child process writes to --storage-path every
  PROBE_SECONDS; when no write has completed for the bound the driver ends the run with one
  line (`stop_now`), without waiting on workers that may be stuck in the kernel on that storage.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

from job.config import JobError

PROBE_SECONDS = 10.0  # storage: one small write this often


class TimeBudget:
    """The driver's own deadline (--time-budget; 0: none).

    A RayJob's activeDeadlineSeconds only marks it Failed: the operator stops nothing. So the
    driver ends training itself when its budget runs out, through Ray Train's own abort (the
    SIGINT handler `trainer.fit` installs: it aborts the controller and its workers), and checks
    the budget again before it writes OUTPUT or promotes.
    """

    def __init__(self, seconds: int):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds if seconds else None
        self.exceeded = False

    def check(self) -> None:
        if self.exceeded or (self.deadline and time.monotonic() > self.deadline):
            raise JobError(f"time budget of {self.seconds} s (--time-budget) exceeded: training "
                           f"stopped, nothing written or promoted (a rerun resumes from the last "
                           f"checkpoint)")

    @contextlib.contextmanager
    def aborting(self):
        """Run the block (trainer.fit); abort it like Ctrl-C would when the budget runs out."""
        if not self.deadline:
            yield
            return

        def abort():
            self.exceeded = True
            os.kill(os.getpid(), signal.SIGINT)

        timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), abort)
        previous = signal.getsignal(signal.SIGINT)
        timer.start()
        try:
            yield
        except BaseException:  # what the abort raised (KeyboardInterrupt, a training error)
            self.check()
            raise
        finally:
            timer.cancel()
            signal.signal(signal.SIGINT, previous)  # fit leaves its handler installed
        self.check()


PROBE = """
import os, sys, time
path = os.path.join(sys.argv[1], f".storage-probe-{os.uname().nodename}-{os.getppid()}")
while True:
    if "://" in sys.argv[1]:
        import pyarrow.fs as pafs
        fs, p = pafs.FileSystem.from_uri(path)
        with fs.open_output_stream(p) as f:
            f.write(b"probe")
        fs.delete_file(p)
    else:
        os.makedirs(sys.argv[1], exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
        os.unlink(path)
    print("ok", flush=True)
    time.sleep(float(sys.argv[2]))
"""


class StorageWatch:
    """While the block runs, a child process writes to `path` every PROBE_SECONDS; when none has
    completed for `timeout` seconds, `on_stall(seconds)` is called (once). The child, not this
    process, waits on the storage: a process stuck in the kernel on it cannot be killed."""

    def __init__(self, path: str, timeout: float, on_stall):
        self.path, self.timeout, self.on_stall = path, timeout, on_stall
        self.last_ok = time.monotonic()
        self.done = threading.Event()

    def __enter__(self):
        if not self.timeout:
            return self
        self.child = subprocess.Popen([sys.executable, "-c", PROBE, self.path, str(PROBE_SECONDS)],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self.read, daemon=True).start()
        threading.Thread(target=self.watch, daemon=True).start()
        return self

    def read(self) -> None:
        for _ in self.child.stdout:
            self.last_ok = time.monotonic()

    def watch(self) -> None:
        while not self.done.wait(1.0):
            silent = time.monotonic() - self.last_ok
            if silent > self.timeout:
                self.on_stall(silent)
                return

    def __exit__(self, *exc):
        self.done.set()
        if self.timeout:
            self.child.kill()  # not waited for: it may be stuck on the storage


def processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every process of this machine."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with (contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{pid}/stat") as stat,
              open(f"/proc/{pid}/cmdline", "rb") as cmdline):
            found[int(pid)] = (int(stat.read().rsplit(")", 1)[1].split()[1]), cmdline.read())
    return found


def with_descendants(pids: set[int], table: dict) -> set[int]:
    pids = set(pids)
    while children := {pid for pid, (parent, _) in table.items() if parent in pids} - pids:
        pids |= children
    return pids


def stop_now(line: str, status: int = 2) -> None:
    """Print `line` and end this process at once, with its children (a private local Ray): a
    signal each, no wait, as a worker stuck in the kernel would hold up any cleanup."""
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    for pid in with_descendants({os.getpid()}, processes()) - {os.getpid()}:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    os._exit(status)
