"""Health of a run: what failed and where, and which worker is slow.

- Workers: each announces its address when it starts (`WorkerStarted`) and times its own compute
  per step, apart from its wait in the all-reduce (`JobSteps.train_step`, job/step.py, reads the
  clock before the forward pass and after the gradients exist); `StepTimer` sends the mean every
  REPORT_SECONDS to the driver's queue, like progress: no worker waits for another.
- The driver names the failed worker(s) and the cause from the exceptions Ray Train reports
  (`describe_failure`), and a straggler from the step times (`StragglerWatch`).
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass

REPORT_SECONDS = 2.0  # how often each worker sends its compute time per step
STRAGGLER_RATIO = 1.5  # slower than the other workers' median by this much ...
STRAGGLER_WINDOWS = 2  # ... in this many reports in a row: a straggler


@dataclass(frozen=True)
class WorkerStarted:
    """A worker of a (re)started group: its rank and the address of its node."""

    rank: int
    address: str


@dataclass(frozen=True)
class StepTime:
    """A worker's mean compute time per step over its last window of steps."""

    rank: int
    epoch: int
    ms: float


@dataclass(frozen=True)
class EpochComputeTimes:
    """Every worker's compute ms per step in one epoch, by rank."""

    epoch: int
    ms: list


@dataclass(frozen=True)
class WorkerGroupFailure:
    """What Ray Train reported when a worker group failed: rank -> the exception's text, and the
    last epoch checkpointed before it (the one a restart resumes after)."""

    errors: dict
    epoch: int


# --- the worker side ---------------------------------------------------------------------------

def announce(queue, rank: int) -> None:
    import ray

    queue.put_nowait(WorkerStarted(rank, ray.util.get_node_ip_address()))


def step_timer_callback(queue, rank: int, compute_seconds):
    """A Keras callback that sends this worker's compute ms per step every REPORT_SECONDS, and
    adds the epoch's figure to the epoch logs (`compute_ms_per_step`, reported to Ray)."""
    import tf_keras as keras

    class StepTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch + 1
            self.epoch_mark = self.mark = (time.monotonic(), float(compute_seconds.numpy()), 0)

        def on_train_batch_end(self, batch, logs=None):
            now = time.monotonic()
            if now - self.mark[0] >= REPORT_SECONDS:
                self.mark = self.send(self.mark, now, batch + 1)

        def send(self, mark, now, steps):
            total = float(compute_seconds.numpy())
            if steps > mark[2]:
                queue.put_nowait(StepTime(rank, self.epoch,
                                          1000 * (total - mark[1]) / (steps - mark[2])))
            return now, total, steps

        def on_epoch_end(self, epoch, logs=None):
            steps = self.params["steps"]
            self.send(self.mark, time.monotonic(), steps)
            total = float(compute_seconds.numpy())
            logs["compute_ms_per_step"] = 1000 * (total - self.epoch_mark[1]) / steps

    return StepTimer()


# --- the driver side ---------------------------------------------------------------------------

TASK = re.compile(r"/job:worker/replica:\d+/task:(\d+)")


def causes(rank: int, text: str, errors: dict, addresses: dict) -> list[tuple[tuple[int, ...], str]]:
    """(workers, what happened to them) as worker `rank`'s exception tells it. TensorFlow's
    health check names the peers whose heartbeats stopped (the coordination service runs on
    worker 0): two that blame each other lost the link between them; a peer that reported no
    error of its own hung, or its link to the observer is cut (Ray stops the group at the first
    error, so the peer's own view may never arrive)."""
    if "node has died" in text or "node died" in text or "NodeDiedError" in text:
        return [((rank,), "its node was declared dead (it missed Ray's heartbeats)")]
    if "worker process has died" in text or "actor died unexpectedly" in text:
        return [((rank,), "its process died (killed, or crashed: see its log)")]
    silent = re.search(r"unhealthy \(stopped sending heartbeats\):((?:\s*/job:\S+)+)", text)
    peers = ([int(t) for t in TASK.findall(silent.group(1))] if silent
             else [0] if "CoordinationService/Heartbeat" in text else [])
    if peers:
        return [((rank, peer), "lost contact with each other (no heartbeats either way: the link "
                               "between them)") if peer in errors else
                ((peer,), f"stopped answering the all-reduce (no heartbeats reached worker {rank} "
                          f"on {addresses.get(rank, '?')}: it hung, or the link between them is cut)")
                for peer in peers]
    if "CoordinationService/RegisterTask" in text:  # workarounds.bounded_peer_registration
        return [((rank, 0), "could not reach each other when the group started (the link between "
                            "them is cut, or worker 0 never came up)")]
    remote = re.search(r"remote target " + TASK.pattern, text)
    if remote:
        return [((int(remote.group(1)),), f"dropped its connection to worker {rank} "
                                          f"(its process went away)")]
    last = [line.strip() for line in text.strip().splitlines() if line.strip()][-1:] or ["?"]
    return [((rank,), f"failed: {last[0]}")]


def describe_failure(errors: dict, addresses: dict) -> tuple[str, list[dict]]:
    """One clause naming every worker involved, as `worker R on ADDRESS`, and the cause; and the
    same as records for metrics.json. A process or node that died explains its peers' errors."""
    found = [c for rank, text in sorted(errors.items()) for c in causes(rank, text, errors, addresses)]
    died = [c for c in found if c[1].startswith(("its node", "its process"))]
    chosen = died or [c for c in found if not c[1].startswith("failed:")] or found
    seen, clauses, records = set(), [], []
    for ranks, cause in chosen:
        key = (tuple(sorted(ranks)), cause.split(" (")[0])
        if key in seen:
            continue
        seen.add(key)
        who = " and ".join(f"worker {r} on {addresses.get(r, '?')}" for r in sorted(ranks))
        # An error that names its worker (e.g. job.gpu's) says it best, its class name aside.
        own = re.sub(r"^[\w.]+: (?=worker \d+ on )", "", cause.removeprefix("failed: "))
        clauses.append(own if own.startswith(f"worker {ranks[0]} on ") else f"{who}: {cause}")
        records.append({"workers": [{"rank": r, "address": addresses.get(r)} for r in sorted(ranks)],
                        "cause": cause})
    return "; ".join(clauses), records


class StragglerWatch:
    """Names a worker whose compute per step stays STRAGGLER_RATIO x above the median of the
    other workers' (with two workers: the other's) for STRAGGLER_WINDOWS reports in a row."""

    def __init__(self):
        self.latest, self.streak, self.named = {}, {}, set()

    def restart(self) -> None:
        self.latest.clear()
        self.streak.clear()

    def add(self, t: StepTime, address: str) -> str | None:
        self.latest[t.rank] = t.ms
        others = [ms for rank, ms in self.latest.items() if rank != t.rank]
        if not others:
            return None
        median = statistics.median(others)
        slow = t.ms > STRAGGLER_RATIO * median
        self.streak[t.rank] = self.streak.get(t.rank, 0) + 1 if slow else 0
        if self.streak[t.rank] < STRAGGLER_WINDOWS or t.rank in self.named:
            return None
        self.named.add(t.rank)
        return (f"straggler: worker {t.rank} on {address}: {t.ms:.0f} ms a step vs "
                f"{median:.0f} ms (median of the others), epoch {t.epoch}")
