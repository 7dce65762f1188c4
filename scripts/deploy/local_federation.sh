#!/usr/bin/env bash
# Run PerFIT on Flower's Deployment Engine on this machine: one SuperLink and N SuperNodes on 127.0.0.1,
# with TLS and SuperNode authentication, exactly as on separate machines (see docs/deployment.md):
#   scripts/deploy/local_federation.sh --preset quick --num-clients 2 --data /abs/dolly.jsonl --out "$PWD/runs/dep"
# Arguments are `perfit config` flags; N = the config's num_clients. The script makes a CA, the SuperLink
# certificate and N node keys, starts the SuperLink, registers the N public keys, starts N SuperNodes
# (partition-id 0..N-1), submits `flwr run .`, streams the run's log, reads its final status and stops every
# process it started. Exit 0 only when the run finished completed. Ports are free ones (PERFIT_SUPERLINK_PORT
# to pin the SuperLink's); certificates, keys, logs and Flower homes go to DEPLOY_DIR (default a new /tmp dir).
# The ServerApp writes the outputs at --out (give an absolute path). PERFIT_DATA / PERFIT_MODEL, when set, reach
# every SuperNode (see supernode.sh). Data owners (`--split owner`): PERFIT_OWNERS_DIR holds one .jsonl per owner;
# SuperNode k gets the k-th file (by name) as its own `data` and the file's stem as its `name`, and the run
# config's `data` is never read. Each SuperNode keeps its state (its mask, what never leaves it, its final adapter)
# and its long-lived worker's address in PERFIT_STATE_ROOT/<owner name or node-k> (default DEPLOY_DIR/state).
set -euo pipefail
if [[ -n ${DEPLOY_DIR:-} ]]; then
    mkdir -p "$DEPLOY_DIR" && WORK=$(cd "$DEPLOY_DIR" && pwd)
else
    WORK=$(mktemp -d /tmp/perfit-deploy-XXXX)
fi
cd "$(dirname "$0")/../.."
REPO=$PWD
BIN=$(cd "${BIN:-.venv/bin}" && pwd)
export BIN PATH="$BIN:$PATH"   # SuperLink and SuperNodes start flower-superexec by name
export FLWR_TELEMETRY_ENABLED=0
export FLWR_HOME=${FLWR_HOME:-$WORK/flwr-home}   # the `flwr` CLI's home (its config.toml names the SuperLink)
CERTS=$WORK/certs
CONNECTION=perfit-deploy

RUN_CONFIG=$("$BIN/perfit" config --flwr "$@")
N=$("$BIN/perfit" config "$@" | sed -n 's/^num_clients = //p')
read -r -a PORTS <<< "$("$BIN/python" - "$((N + 1))" <<'PY'
import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in sockets))
PY
)"
PORT=${PERFIT_SUPERLINK_PORT:-${PORTS[0]}}

PIDS=()
descendants() { local child; for child in $(pgrep -P "$1" || true); do echo "$child"; descendants "$child"; done; }
cleanup() {
    local all=() pid
    for pid in "${PIDS[@]}"; do all+=("$pid" $(descendants "$pid")); done
    [[ ${#all[@]} -gt 0 ]] || return 0
    kill "${all[@]}" 2> /dev/null || true
    for _ in $(seq 1 50); do kill -0 "${all[@]}" 2> /dev/null || break; sleep 0.1; done
    kill -9 "${all[@]}" 2> /dev/null || true
    wait 2> /dev/null || true
}
trap cleanup EXIT

"$REPO/scripts/deploy/make_certs.sh" "$CERTS" "$N" > /dev/null
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "$CONNECTION"

[superlink.$CONNECTION]
address = "127.0.0.1:$PORT"
root-certificates = "$CERTS/ca.crt"
TOML

FLWR_HOME=$WORK/superlink-home SUPERLINK_HOST=127.0.0.1 SUPERLINK_PORT=$PORT \
    "$REPO/scripts/deploy/superlink.sh" "$CERTS" > "$WORK/superlink.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 300); do
    "$BIN/python" -c "import ssl, sys, urllib.request as u; u.urlopen('https://127.0.0.1:$PORT/health', \
context=ssl.create_default_context(cafile=sys.argv[1]))" "$CERTS/ca.crt" 2> /dev/null && break
    kill -0 "${PIDS[0]}" 2> /dev/null || { cat "$WORK/superlink.log" >&2; exit 1; }
    sleep 0.2
done
KEYS=()
for ((k = 0; k < N; k++)); do KEYS+=("$CERTS/supernode-$k.pub"); done
"$REPO/scripts/deploy/register.sh" "$CONNECTION" "${KEYS[@]}"

OWNER_FILES=()
if [[ -n ${PERFIT_OWNERS_DIR:-} ]]; then
    OWNER_FILES=("$PERFIT_OWNERS_DIR"/*.jsonl)
    [[ ${#OWNER_FILES[@]} -eq $N ]] || { echo "$PERFIT_OWNERS_DIR: ${#OWNER_FILES[@]} owner files, N=$N" >&2; exit 2; }
fi
STATE_ROOT=${PERFIT_STATE_ROOT:-$WORK/state}
for ((k = 0; k < N; k++)); do
    NODE=node-$k
    if [[ ${#OWNER_FILES[@]} -gt 0 ]]; then
        export PERFIT_DATA=${OWNER_FILES[k]} PERFIT_NAME=$(basename "${OWNER_FILES[k]}" .jsonl)
        NODE=$PERFIT_NAME
    fi
    export PERFIT_STATE_DIR=$STATE_ROOT/$NODE
    FLWR_HOME=$WORK/supernode-$k-home SUPERNODE_PORT=${PORTS[k + 1]} "$REPO/scripts/deploy/supernode.sh" \
        "127.0.0.1:$PORT" "$CERTS/ca.crt" "$CERTS/supernode-$k" "$k" "$N" > "$WORK/supernode-$k.log" 2>&1 &
    PIDS+=($!)
done
online() { "$BIN/flwr" supernode list "$CONNECTION" --format json | "$BIN/python" -c \
    'import json, sys; print(sum(n["status"] == "online" for n in json.load(sys.stdin)["nodes"]))'; }
ONLINE=0
for _ in $(seq 1 120); do
    ONLINE=$(online)
    [[ $ONLINE -ge $N ]] && break
    for pid in "${PIDS[@]:1}"; do
        kill -0 "$pid" 2> /dev/null || { tail -n 20 "$WORK"/supernode-*.log >&2; exit 1; }
    done
    sleep 0.5
done
[[ $ONLINE -ge $N ]] || { echo "only $ONLINE of $N SuperNodes came online; logs in $WORK" >&2; exit 1; }
echo "$N SuperNodes online (logs in $WORK)"

SUBMITTED=$("$BIN/flwr" run . "$CONNECTION" --format json --run-config "$RUN_CONFIG")
RUN_ID=$("$BIN/python" -c 'import json, sys; d = json.loads(sys.argv[1]); print(d["run-id"] if d["success"] else "")' \
    "$SUBMITTED")
[[ -n $RUN_ID ]] || { echo "flwr run was not accepted: $SUBMITTED" >&2; exit 2; }
"$BIN/flwr" log "$RUN_ID" "$CONNECTION"   # follows the run's log until it ends
STATUS=$("$BIN/flwr" list "$CONNECTION" --run-id "$RUN_ID" --format json |
    "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])')
echo "run $RUN_ID: $STATUS"
[[ $STATUS == finished:completed* ]]
