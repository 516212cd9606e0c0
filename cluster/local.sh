#!/usr/bin/env bash
# A Ray cluster of several nodes on this machine, for development and tests: loopback only,
# token auth on.   cluster/local.sh up [WORKER_NODES]   |   cluster/local.sh down
#
# The head runs drivers only (0 CPUs); each worker node offers 1 CPU, so WORKER_NODES (default 2)
# is the most training workers a job can ask for. State (token, address) lives in $CLUSTER_DIR.
# GPUS_PER_NODE=N makes each worker node advertise N GPUs it does not have (tests of the GPU
# preflight: Ray grants them, TensorFlow sees none).
set -euo pipefail
RAY=${RAY:-.venv/bin/ray}
CLUSTER_DIR=${CLUSTER_DIR:-runs/cluster}
GCS_PORT=${GCS_PORT:-6380}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
AGENT_PORT=${AGENT_PORT:-52365}  # the head's dashboard agent, which takes job submissions
mkdir -p "$CLUSTER_DIR"
CLUSTER_DIR=$(cd "$CLUSTER_DIR" && pwd)
export RAY_AUTH_MODE=token
# Job entrypoints run `python` from the PATH the nodes started with: make it this project's venv.
export PATH="$(dirname "$(readlink -f "$RAY")"):$PATH"
export RAY_AUTH_TOKEN_PATH="$CLUSTER_DIR/auth_token"

case "${1:-}" in
  up)
    if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
      (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH")
    fi
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" --num-cpus=0 \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
      --dashboard-agent-listen-port="$AGENT_PORT" --disable-usage-stats >/dev/null
    for _ in $(seq "${2:-2}"); do
      "$RAY" start --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 --num-cpus=1 \
        --num-gpus="${GPUS_PER_NODE:-0}" --disable-usage-stats >/dev/null
    done
    # The head's job agent starts after `ray start` returns, and a job submitted before it
    # answers is refused ("No available agent"): wait for it, as KubeRay's readiness probe does.
    "$(dirname "$RAY")/python" - "$AGENT_PORT" <<'WAIT'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/api/local_raylet_healthz"
for _ in range(60):
    try:
        if urllib.request.urlopen(url, timeout=2).read() == b"success":
            sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(f"error: the head's job agent ({url}) did not answer in 60 s")
WAIT
    echo "http://127.0.0.1:$DASHBOARD_PORT" > "$CLUSTER_DIR/address"
    echo "Ray cluster up: head + ${2:-2} worker node(s); dashboard http://127.0.0.1:$DASHBOARD_PORT"
    echo "token: $RAY_AUTH_TOKEN_PATH (export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=...)"
    ;;
  down)
    # Only this cluster's processes: `ray stop` would end every Ray process of the machine.
    "$(dirname "$RAY")/python" -m cluster.stop "127.0.0.1:$GCS_PORT" >/dev/null
    rm -f "$CLUSTER_DIR/address"
    echo "Ray cluster down"
    ;;
  *)
    echo "usage: $0 up [WORKER_NODES] | down" >&2
    exit 2
    ;;
esac
