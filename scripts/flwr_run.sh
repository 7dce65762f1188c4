#!/usr/bin/env bash
# Run the perfit Flower app with `flwr run .` on a local simulation SuperLink (127.0.0.1 only).
#   scripts/flwr_run.sh --preset quick --method fit --data /abs/path/dolly.jsonl
# Arguments are `perfit config` flags; the resolved config becomes flwr's --run-config. The script
# starts its own SuperLink, streams the run, reads the run's final status, and stops every process
# it started. Exit 0 only when the run finished completed.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(cd "${BIN:-.venv/bin}" && pwd)
export PATH="$BIN:$PATH"   # the SuperLink starts flower-superexec by name
export FLWR_HOME=${FLWR_HOME:-$PWD/.flwr}
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1   # else flwr installs a multi-GB CUDA torch
export FLWR_TELEMETRY_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
export RAY_TMPDIR=${RAY_TMPDIR:-$(mktemp -d /tmp/perfit-ray-XXXX)}
PORT=${PERFIT_SUPERLINK_PORT:-$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

RUN_CONFIG=$("$BIN/perfit" config --flwr "$@")
NUM_CLIENTS=$("$BIN/perfit" config "$@" | sed -n 's/^num_clients = //p')

mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "perfit"

[superlink.perfit]
address = "127.0.0.1:$PORT"
insecure = true
TOML

"$BIN/flower-superlink" --insecure --simulation --host 127.0.0.1 --port "$PORT" \
    --database "$FLWR_HOME/state.db" > "$FLWR_HOME/superlink.log" 2>&1 &
SUPERLINK=$!
trap 'kill $SUPERLINK 2>/dev/null; wait $SUPERLINK 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    "$BIN/python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health')" 2>/dev/null && break
    kill -0 $SUPERLINK 2>/dev/null || { cat "$FLWR_HOME/superlink.log"; exit 1; }
    sleep 0.2
done

SUBMITTED=$("$BIN/flwr" run . perfit --format json --run-config "$RUN_CONFIG" \
    --federation-config "num-supernodes=$NUM_CLIENTS client-resources-num-cpus=${PERFIT_CPUS_PER_CLIENT:-2}")
RUN_ID=$("$BIN/python" -c 'import json, sys; d = json.loads(sys.argv[1]); print(d["run-id"] if d.get("success") else "")' "$SUBMITTED")
[[ -n $RUN_ID ]] || { echo "flwr run was not accepted: $SUBMITTED" >&2; exit 2; }
"$BIN/flwr" log "$RUN_ID" perfit   # follows the run's log until it ends
STATUS=$("$BIN/flwr" list perfit --run-id "$RUN_ID" --format json | "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])')
echo "run $RUN_ID: $STATUS"
[[ $STATUS == finished:completed* ]]
