"""Stop one Ray cluster of this machine and nothing else (`ray stop` ends every Ray process of
the machine: another user's cluster, a test's).

    python -m cluster.stop GCS_ADDRESS      e.g. 127.0.0.1:6380

Its processes: those whose command line names its session directory (found from the GCS
server listening on the port: raylets, the dashboard and its agents, log monitors), and all
their descendants (workers, whose titles Ray rewrites).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from pathlib import Path

from job.guards import processes, with_descendants


def cluster_pids(gcs_address: str) -> set[int]:
    """The cluster's processes: its GCS server's (found by port), every process naming the GCS
    server's session directory, and their descendants."""
    port = gcs_address.rsplit(":", 1)[1]
    table = processes()
    sessions = {re.search(rb"(/[^\0=]*/session_[^/\0]+)", cmdline).group(1)
                for _, cmdline in table.values()
                if f"--gcs_server_port={port}\0".encode() in cmdline + b"\0"
                and re.search(rb"/session_[^/\0]+", cmdline)}
    named = {pid for pid, (_, cmdline) in table.items() if any(s in cmdline for s in sessions)}
    return with_descendants(named, table) - {os.getpid()}


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def end(find, grace: float = 10) -> set[int]:
    """End the processes `find()` returns: SIGTERM, then SIGKILL for those left after `grace`
    seconds. `find` is asked again each time: a dying parent may start or reparent children."""
    ended = set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in (pids := find()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        ended |= pids
        deadline = time.monotonic() + grace
        while any(map(alive, find())) and time.monotonic() < deadline:
            time.sleep(0.2)
    return ended


def stop(gcs_address: str) -> int:
    return len(end(lambda: cluster_pids(gcs_address)))


if __name__ == "__main__":
    if len(sys.argv) != 2 or ":" not in sys.argv[1]:
        print("usage: python -m cluster.stop GCS_HOST:PORT", file=sys.stderr)
        sys.exit(2)
    print(f"stopped {stop(sys.argv[1])} process(es) of the Ray cluster at {sys.argv[1]}")
