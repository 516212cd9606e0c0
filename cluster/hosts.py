"""A Ray cluster of hosts on this machine: each Ray node in its own network namespace with its
own address, for tests and for trying faults the way real clusters meet them (needs root).

    python -m cluster.hosts up [WORKER_HOSTS]     head (0 CPUs, runs drivers) + hosts of 1 CPU
    python -m cluster.hosts exec HOST -- CMD...   run CMD on HOST (head, w1, w2, ...)
    python -m cluster.hosts cut A B | heal A B    silently drop | restore the link between two hosts
    python -m cluster.hosts isolate H | rejoin H  take a host off the network | put it back
    python -m cluster.hosts restart H [H ...]     end hosts' processes, start their Ray nodes again
    python -m cluster.hosts throttle H PERCENT    cap a host's CPU (100: no cap)
    python -m cluster.hosts shape H RATE          cap a host's link, e.g. 1gbit (0: no cap)
    python -m cluster.hosts down                  stop this cluster's processes, remove what up made

The hosts sit on a private bridge with no route off it (SUBNET); Ray runs with token auth (the
token in STATE/auth_token). Faults are injected the silent way: packets vanish, nobody gets an
error. A cut is a permanent neighbour entry with a MAC address nobody has (a blackhole route is
not silent: senders get EINVAL at once); isolating unplugs the host's port from the bridge.
`down` ends only the processes of this cluster's namespaces (`ray stop` would end every Ray
process of the machine) and removes only what `up` made. State lives in $HOSTS_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cluster.stop import alive, end

PREFIX = os.environ.get("HOSTS_PREFIX", "fjob")  # namespaces, bridge, veths and cgroups
SUBNET = os.environ.get("HOSTS_SUBNET", "10.251.7")  # a /24 of our own on the bridge
STATE = Path(os.environ.get("HOSTS_DIR", "runs/hosts")).absolute()
RAY = os.environ.get("RAY", str(Path(sys.executable).with_name("ray")))
GCS_PORT, DASHBOARD_PORT = 6379, 8265
CPU_CGROUP = Path("/sys/fs/cgroup/cpu")
CFS_PERIOD_US = 100_000
UNUSED_MAC = "02:00:00:00:de:ad"  # locally administered; no interface has it


class HostsError(Exception):
    """One line for the user, exit 2."""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise HostsError(f"{' '.join(args)}: {(r.stderr or r.stdout).strip()}")
    return r


def bridge() -> str:
    return f"{PREFIX}br0"


def namespace(host: str) -> str:
    return f"{PREFIX}-{host}"


def address(host: str) -> str:
    return f"{SUBNET}.{1 if host == 'head' else 10 + int(host[1:])}"


def port(host: str) -> str:  # the bridge side of the host's veth pair (<= 15 characters)
    return f"{PREFIX}-{host}-p"


def cgroup(host: str) -> Path:
    return CPU_CGROUP / f"{PREFIX}-{host}"


def hosts() -> list[str]:
    """The hosts `up` made, head first (from the namespaces that exist)."""
    names = [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line]
    found = [n.removeprefix(f"{PREFIX}-") for n in names if n.startswith(f"{PREFIX}-")]
    return sorted(found, key=lambda h: (h != "head", int(h[1:]) if h != "head" else 0))


def ray_env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(STATE / "auth_token"),
            # Job entrypoints run `python` from the PATH the node started with: this venv's.
            "PATH": f"{Path(RAY).parent}:{os.environ['PATH']}"}


def on_host(host: str, *command: str) -> list[str]:
    """`command` in the host's network namespace and CPU cgroup (so `throttle` reaches it)."""
    join = f"echo $$ > {cgroup(host)}/cgroup.procs && exec \"$@\""
    return ["sh", "-c", join, "sh", "ip", "netns", "exec", namespace(host), *command]


def add_host(host: str) -> None:
    ns, addr = namespace(host), address(host)
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", port(host), "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "link", "set", port(host), "master", bridge(), "up")
    sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    cgroup(host).mkdir(exist_ok=True)


def up(worker_hosts: int) -> None:
    if hosts():
        raise HostsError(f"a hosts cluster is already up ({', '.join(hosts())}): run `down` first")
    if f"{SUBNET}." in sh("ip", "route").stdout:
        raise HostsError(f"{SUBNET}.0/24 is routed on this machine already: set HOSTS_SUBNET")
    STATE.mkdir(parents=True, exist_ok=True)
    token = STATE / "auth_token"
    if not token.exists():
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
    sh("ip", "link", "add", bridge(), "type", "bridge")
    sh("ip", "link", "set", bridge(), "up")  # no address: the machine itself is not on it
    names = ["head", *(f"w{i}" for i in range(1, worker_hosts + 1))]
    for host in names:
        add_host(host)
    start_ray("head")
    for host in names[1:]:
        start_ray(host)
    wait_for_nodes(names)
    (STATE / "hosts.json").write_text(json.dumps({h: address(h) for h in names}, indent=1))
    print(f"hosts cluster up: {', '.join(f'{h} {address(h)}' for h in names)}; dashboard "
          f"http://{address('head')}:{DASHBOARD_PORT} (from the head: `exec head -- ...`)")


def start_ray(host: str) -> None:
    common = [f"--node-ip-address={address(host)}", "--disable-usage-stats"]
    if host == "head":
        args = ["--head", f"--port={GCS_PORT}", "--num-cpus=0", "--include-dashboard=true",
                f"--dashboard-host={address(host)}", f"--dashboard-port={DASHBOARD_PORT}"]
    else:
        args = [f"--address={address('head')}:{GCS_PORT}", "--num-cpus=1"]
    r = subprocess.run(on_host(host, RAY, "start", *args, *common), env=ray_env(),
                       capture_output=True, text=True, timeout=180)
    if r.returncode != 0:
        raise HostsError(f"ray start on {host} failed: {r.stderr.strip()[-500:]}")


def wait_for_nodes(names: list[str], timeout: float = 120) -> None:
    """Until the head's job agent answers and the Ray nodes of these hosts are alive."""
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False, "
             "logging_level='ERROR'); print(' '.join(n['NodeManagerAddress'] for n in ray.nodes() "
             "if n['Alive']))")
    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run(on_host("head", sys.executable, "-c", probe,
                                   f"{address('head')}:{GCS_PORT}"),
                           env=ray_env(), capture_output=True, text=True, timeout=120)
        jobs = subprocess.run(on_host("head", RAY, "job", "list", "--address",
                                      f"http://{address('head')}:{DASHBOARD_PORT}"),
                              env=ray_env(), capture_output=True, text=True, timeout=120)
        alive = set((r.stdout.strip().splitlines() or [""])[-1].split())
        if {address(name) for name in names} <= alive and jobs.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise HostsError(f"the cluster did not come up: {r.stderr.strip()[-300:]}")
        time.sleep(1)


def host_pids(host: str) -> set[int]:
    """Every process of the host: in its namespace or its cgroup (a process can leave neither)."""
    pids = set(map(int, sh("ip", "netns", "pids", namespace(host), check=False).stdout.split()))
    procs = cgroup(host) / "cgroup.procs"
    if procs.exists():
        pids |= set(map(int, procs.read_text().split()))
    return pids


def stop_processes(names: list[str]) -> None:
    end(lambda: {pid for host in names for pid in host_pids(host) if alive(pid)})


def restart(names: list[str]) -> None:
    """A host whose Ray node was declared dead (off the network too long) stays dead: Ray does
    not take a node back. Start a new one there (on each host, then wait for all at once)."""
    stop_processes(names)
    for host in names:
        start_ray(host)
    wait_for_nodes(names)


def down() -> None:
    names = hosts()
    stop_processes(names)
    for host in names:
        sh("ip", "link", "del", port(host), check=False)
        sh("ip", "netns", "del", namespace(host), check=False)
        if cgroup(host).exists():
            try:
                cgroup(host).rmdir()  # empty once its processes are gone
            except OSError:
                left = host_pids(host)
                raise HostsError(f"{host}: processes {sorted(left)} did not end (stuck in the "
                                 f"kernel?); run `down` again once they have") from None
    sh("ip", "link", "del", bridge(), check=False)
    shutil.rmtree(STATE, ignore_errors=True)
    # `ray start --head` made the head this machine's default cluster (Ray's own `ray stop`
    # forgets it): `ray status` or ray.init() without an address would try the gone head.
    from ray._common.utils import get_ray_address_file, reset_ray_address

    default_cluster = Path(get_ray_address_file(None))  # Ray's temp dir: $RAY_TMPDIR or /tmp/ray
    if default_cluster.exists() and default_cluster.read_text().strip() == f"{address('head')}:{GCS_PORT}":
        reset_ray_address()
    print(f"hosts cluster down ({len(names)} host(s))")


def mac(host: str) -> str:
    out = sh("ip", "-n", namespace(host), "-j", "link", "show", "eth0").stdout
    return json.loads(out)[0]["address"]


def cut(a: str, b: str, heal: bool = False) -> None:
    """Each host's frames to the other go to a MAC nobody has: silently lost, both ways."""
    for src, dst in ((a, b), (b, a)):
        if heal:
            sh("ip", "-n", namespace(src), "neigh", "replace", address(dst), "lladdr", mac(dst),
               "dev", "eth0", "nud", "reachable")
        else:
            sh("ip", "-n", namespace(src), "neigh", "replace", address(dst), "lladdr", UNUSED_MAC,
               "dev", "eth0", "nud", "permanent")


def isolate(host: str, rejoin: bool = False) -> None:
    if rejoin:
        sh("ip", "link", "set", port(host), "master", bridge())
    else:
        sh("ip", "link", "set", port(host), "nomaster")


def throttle(host: str, percent: int) -> None:
    quota = -1 if percent >= 100 else max(1000, CFS_PERIOD_US * percent // 100)
    (cgroup(host) / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
    (cgroup(host) / "cpu.cfs_quota_us").write_text(str(quota))


def shape(host: str, rate: str) -> None:
    """A token bucket on the host's egress (its side of the link)."""
    sh("ip", "netns", "exec", namespace(host), "tc", "qdisc", "del", "dev", "eth0", "root",
       check=False)
    if rate != "0":
        sh("ip", "netns", "exec", namespace(host), "tc", "qdisc", "add", "dev", "eth0", "root",
           "tbf", "rate", rate, "burst", "256kb", "latency", "50ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.hosts", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    verbs.add_parser("up").add_argument("worker_hosts", nargs="?", type=int, default=2)
    verbs.add_parser("down")
    run = verbs.add_parser("exec")
    run.add_argument("host")
    run.add_argument("command", nargs=argparse.REMAINDER)
    for verb in ("cut", "heal"):
        pair = verbs.add_parser(verb)
        pair.add_argument("a")
        pair.add_argument("b")
    for verb in ("isolate", "rejoin"):
        verbs.add_parser(verb).add_argument("host")
    verbs.add_parser("restart").add_argument("hosts", nargs="+")
    cap = verbs.add_parser("throttle")
    cap.add_argument("host")
    cap.add_argument("percent", type=int)
    rate = verbs.add_parser("shape")
    rate.add_argument("host")
    rate.add_argument("rate")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("error: the hosts cluster needs root (network namespaces, a bridge, cgroups)",
              file=sys.stderr)
        return 2
    try:
        named = {getattr(args, k, None) for k in ("host", "a", "b")} | set(getattr(args, "hosts", []))
        for host in named - {None}:
            if host not in hosts():
                raise HostsError(f"no host {host!r} (hosts: {', '.join(hosts()) or 'none, run up'})")
        if args.verb == "up":
            up(args.worker_hosts)
        elif args.verb == "down":
            down()
        elif args.verb == "exec":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            return subprocess.run(on_host(args.host, *command), env=ray_env()).returncode
        elif args.verb in ("cut", "heal"):
            cut(args.a, args.b, heal=args.verb == "heal")
        elif args.verb in ("isolate", "rejoin"):
            isolate(args.host, rejoin=args.verb == "rejoin")
        elif args.verb == "restart":
            restart(args.hosts)
        elif args.verb == "throttle":
            throttle(args.host, args.percent)
        elif args.verb == "shape":
            shape(args.host, args.rate)
    except HostsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
