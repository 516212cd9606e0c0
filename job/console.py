"""What the driver prints while a run trains: the job's own lines, and progress inside each epoch.

Rank 0 sends its running step count, loss and accuracy (train.ProgressToDriver) through a Ray
queue on the driver's node; the driver prints them here:

- on a terminal, one live line per epoch, redrawn in place (tqdm) and replaced by the epoch's
  summary line;
- elsewhere (`ray job logs`, pod logs, CI), a plain line per message, which rank 0 sends at most
  every `--progress-seconds`.

The same queue carries every worker's messages of job/health.py: its address when it starts,
its compute time per step (a `straggler:` line when one lags), and each failure Ray reported,
printed as one line naming the workers, the cause and what comes next.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from job.health import (
    EpochComputeTimes,
    StepTime,
    StragglerWatch,
    WorkerGroupFailure,
    WorkerStarted,
    describe_failure,
)

LIVE_SECONDS = 0.5  # how often rank 0 sends progress for a live terminal line


@dataclass(frozen=True)
class Progress:
    """Rank 0's position inside an epoch: its own replica's running loss and accuracy."""

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    accuracy: float
    seconds: float  # since the epoch began

    def line(self, run_name: str) -> str:
        eta = self.seconds * (self.steps - self.step) / max(self.step, 1)
        return (f"[{run_name}] epoch {self.epoch}/{self.epochs}: {self.step}/{self.steps} steps, "
                f"loss {self.loss:.4f} acc {self.accuracy:.4f} ({self.seconds:.0f}s, ETA {eta:.0f}s)")


def is_live(stream) -> bool:
    """A terminal with a width: a live line can be redrawn there (a 0-column pty cannot)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):
        return False


def progress_interval(progress_seconds: float, stream=None) -> float:
    """How often rank 0 should send progress (0: never)."""
    if not progress_seconds:
        return 0.0
    return LIVE_SECONDS if is_live(stream or sys.stdout) else progress_seconds


class Console:
    """Prints the job's lines and the workers' messages, in the order they arrive, and keeps
    what metrics.json records of them: the failures and every worker's compute time per step.

    `after_failure(count, epoch)` says what happens after the count-th failure (a restart, or
    none left), given the last epoch checkpointed before it (None: not known to this driver).
    """

    def __init__(self, run_name: str, stream=None, after_failure=None):
        self.run_name, self.stream = run_name, stream or sys.stdout
        self.after_failure = after_failure or (lambda count, epoch: "")
        self.live = is_live(self.stream)
        self.bar = None  # the live line of the epoch in progress (terminal only)
        self.addresses = {}  # rank -> node address, of the group that runs now
        self.failures = []  # one record per failure Ray reported: metrics.json
        self.compute_ms = []  # per epoch: every worker's compute ms per step
        self.stragglers = StragglerWatch()

    def show(self, message) -> None:
        if isinstance(message, Progress):
            self.progress(message)
        elif isinstance(message, WorkerStarted):
            self.addresses[message.rank] = message.address
        elif isinstance(message, StepTime):
            line = self.stragglers.add(message, self.addresses.get(message.rank, "?"))
            if line:
                self.print(f"[{self.run_name}] {line}")
        elif isinstance(message, EpochComputeTimes):
            self.compute_ms.append({"epoch": message.epoch, "ms": message.ms})
        elif isinstance(message, WorkerGroupFailure):
            self.failed(message)
        else:
            self.print(message)

    def failed(self, failure: WorkerGroupFailure) -> None:
        what, causes = describe_failure(failure.errors, self.addresses)
        after = self.after_failure(len(self.failures) + 1, failure.epoch)
        self.failures.append({"what": what, "causes": causes, "next": after,
                              "after_epoch": failure.epoch})
        self.stragglers.restart()
        self.print(f"[{self.run_name}] worker group failed: {what}; {after}")

    def print(self, line: str) -> None:
        self.close_bar()
        print(line, file=self.stream, flush=True)

    def progress(self, p: Progress) -> None:
        if not self.live:
            print(p.line(self.run_name), file=self.stream, flush=True)
            return
        from tqdm import tqdm

        if self.bar is None or self.bar.epoch != p.epoch:
            self.close_bar()
            self.bar = tqdm(total=p.steps, desc=f"[{self.run_name}] epoch {p.epoch}/{p.epochs}",
                            unit="step", leave=False, file=self.stream, dynamic_ncols=True,
                            mininterval=0)  # rank 0 already sends at most every LIVE_SECONDS
            self.bar.epoch = p.epoch
        self.bar.set_postfix_str(f"loss {p.loss:.4f} acc {p.accuracy:.4f}", refresh=False)
        self.bar.update(p.step - self.bar.n)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()  # leave=False: the line is cleared, the summary line takes its place
            self.bar = None

    def print_until_none(self, queue) -> None:
        while (message := queue.get()) is not None:
            self.show(message)
        self.close_bar()
