#!/usr/bin/env bash
# Register SuperNode public keys on the SuperLink (run by the SuperLink operator, with the `flwr` CLI):
#   scripts/deploy/register.sh CONNECTION PUBLIC_KEY...
#   e.g. scripts/deploy/register.sh perfit certs/supernode-0.pub certs/supernode-1.pub
# CONNECTION names a [superlink.CONNECTION] table in $FLWR_HOME/config.toml (address and root-certificates of
# the SuperLink; see docs/deployment.md). Prints one line per key; a SuperNode whose key is not registered is
# refused by the SuperLink. `flwr supernode list CONNECTION` shows the registered nodes.
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n 2,7p "$0" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BIN=${BIN:-$REPO/.venv/bin}
[[ -d $BIN ]] && export PATH="$(cd "$BIN" && pwd):$PATH"
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}
CONNECTION=$1
shift
for key in "$@"; do
    flwr supernode register "$key" "$CONNECTION" --name "$(basename "$key" .pub)"
done
