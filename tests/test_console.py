"""The driver's console: a live progress line on a terminal, plain lines elsewhere."""

import fcntl
import io
import os
import pty
import struct
import termios

import pytest

from job.console import LIVE_SECONDS, Console, Progress, progress_interval
from job.health import WorkerGroupFailure, WorkerStarted

STEP = Progress(epoch=2, epochs=10, step=300, steps=750, loss=0.41, accuracy=0.85, seconds=12.0)


@pytest.fixture
def terminal():
    """Real pseudo-terminals: terminal(columns) -> (what the program writes to, what shows)."""
    opened = []

    def make(columns: int):
        leader, follower = pty.openpty()
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        opened.append((stream := open(follower, "w"), leader))  # noqa: SIM115 (closed below)
        return stream, leader

    yield make
    for stream, leader in opened:
        stream.close()
        os.close(leader)


def shown(leader: int) -> str:
    os.set_blocking(leader, False)
    out = b""
    try:
        while chunk := os.read(leader, 65536):
            out += chunk
    except BlockingIOError:
        pass
    return out.decode(errors="replace")


def test_off_a_terminal_each_progress_message_is_one_plain_line():
    out = io.StringIO()
    console = Console("run", out, after_failure=lambda count, epoch: f"failure {count} after {epoch}")
    console.show(STEP)
    console.show("[run] epoch 2/10: loss 0.4000 ...")
    console.show(WorkerStarted(1, "10.0.0.2"))
    console.show(WorkerGroupFailure({0: "... The actor is dead because its worker process has died."}, 2))
    assert out.getvalue().splitlines() == [
        "[run] epoch 2/10: 300/750 steps, loss 0.4100 acc 0.8500 (12s, ETA 18s)",
        "[run] epoch 2/10: loss 0.4000 ...",
        "[run] worker group failed: worker 0 on ?: its process died (killed, or crashed: see its "
        "log); failure 1 after 2",
    ]
    assert [c["workers"] for f in console.failures for c in f["causes"]] == [[{"rank": 0, "address": None}]]


def test_on_a_terminal_the_line_is_redrawn_then_replaced_by_the_summary(terminal):
    stream, leader = terminal(columns=100)
    console = Console("run", stream)
    console.show(STEP)
    console.show(Progress(2, 10, 600, 750, 0.40, 0.86, 24.0))
    console.show("[run] epoch 2/10: loss 0.4000 ...")
    stream.flush()
    screen = shown(leader).replace("\r\n", "\n")  # the terminal's own line ends
    assert "300/750" in screen and "600/750" in screen and "loss 0.4000 acc 0.8600" in screen
    redrawn, summary = screen.rsplit("\r", 1)
    assert "\r" in redrawn  # drawn in place, not line by line
    assert summary.strip().endswith("[run] epoch 2/10: loss 0.4000 ...")


def test_how_often_rank_0_sends_progress(terminal):
    assert progress_interval(30, io.StringIO()) == 30  # logs: at most every --progress-seconds
    assert progress_interval(0, terminal(100)[0]) == 0  # off
    assert progress_interval(30, terminal(100)[0]) == LIVE_SECONDS  # a live line
    assert progress_interval(30, terminal(0)[0]) == 30  # a pty without a width cannot redraw
