#!/usr/bin/env bash
# Start the PerFIT federation's SuperLink (Flower Deployment Engine) with TLS and SuperNode authentication:
#   scripts/deploy/superlink.sh CERTS_DIR [extra flower-superlink flags]
# CERTS_DIR holds ca.crt, server.crt and server.key from make_certs.sh. One HTTPS port serves the Fleet API
# (SuperNodes), the Control API (`flwr` CLI) and the Runtime API (ServerApp). Only SuperNodes whose public keys
# were registered with `flwr supernode register` (register.sh) can connect. Runtime installation of app
# dependencies is disabled: every machine runs the perfit installed in its own environment.
# Environment: SUPERLINK_HOST (bind address, default 127.0.0.1; 0.0.0.0 to accept other machines),
# SUPERLINK_PORT (default 9093), FLWR_HOME (default ~/.flwr; the state database lives there so registrations
# survive restarts), BIN (directory holding flower-superlink and flower-superexec, default the repo's .venv/bin).
set -euo pipefail
[[ $# -ge 1 ]] || { sed -n 2,10p "$0" >&2; exit 2; }
CERTS=$(cd "$1" && pwd)
shift
source "$(dirname "$0")/env.sh"
for file in ca.crt server.crt server.key; do
    [[ -f $CERTS/$file ]] || { echo "$CERTS/$file missing (run make_certs.sh)" >&2; exit 1; }
done

exec flower-superlink \
    --ssl-ca-certfile "$CERTS/ca.crt" \
    --ssl-certfile "$CERTS/server.crt" \
    --ssl-keyfile "$CERTS/server.key" \
    --enable-supernode-auth \
    --disable-runtime-dependency-installation \
    --host "${SUPERLINK_HOST:-127.0.0.1}" \
    --port "${SUPERLINK_PORT:-9093}" \
    --database "$FLWR_HOME/superlink.db" \
    "$@"
