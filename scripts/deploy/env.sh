# Sourced by superlink.sh and supernode.sh: the venv's Flower commands on PATH (the SuperLink and
# SuperNodes start flower-superexec by name), FLWR_HOME, telemetry off.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${BIN:-$REPO/.venv/bin}
[[ -d $BIN ]] && export PATH="$(cd "$BIN" && pwd):$PATH"
export FLWR_HOME=${FLWR_HOME:-$HOME/.flwr}
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}
mkdir -p "$FLWR_HOME"
