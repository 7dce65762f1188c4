#!/usr/bin/env bash
# Start one data owner's SuperNode (Flower Deployment Engine), connected to the SuperLink over TLS and
# authenticated with its own key:
#   scripts/deploy/supernode.sh SUPERLINK_ADDRESS CA_CERT PRIVATE_KEY PARTITION_ID NUM_PARTITIONS [extra flags]
#   e.g. scripts/deploy/supernode.sh superlink.example.org:9093 certs/ca.crt certs/supernode-0 0 2
# PARTITION_ID is the PerFIT client this node is (0..NUM_PARTITIONS-1): the ClientApp reads it from the node
# config (`partition-id`); NUM_PARTITIONS must equal the run's num_clients. The key's .pub must have been
# registered on the SuperLink (register.sh). App dependencies are never installed at run time (SuperNodes only
# do so with --allow-runtime-dependency-installation): the ClientApp runs the perfit installed here.
# Environment: PERFIT_DATA / PERFIT_MODEL (this machine's copy of the run's dataset / base model, when its path
# differs from the run config's; with `--split owner`, PERFIT_DATA is the owner's own file; no spaces),
# PERFIT_NAME (the owner's name in every output, `--split owner`; default the file's stem), PERFIT_STATE_DIR
# (where the node keeps its mask, the values that never leave it and, at the end, the owner's adapter: they
# survive a restart; with it, a long-lived worker keeps the model and the tokenised rows between messages,
# PERFIT_WORKER=0 turns that off), SUPERNODE_PORT (this node's local Runtime (ClientAppIo) API port on 127.0.0.1, default
# 9094; nodes sharing a machine need different ports), FLWR_HOME (default ~/.flwr), BIN (directory holding
# flower-supernode and flower-superexec, default the repo's .venv/bin).
set -euo pipefail
[[ $# -ge 5 ]] || { sed -n 2,17p "$0" >&2; exit 2; }
SUPERLINK=$1 CA=$2 KEY=$3 PARTITION=$4 PARTITIONS=$5
shift 5
source "$(dirname "$0")/env.sh"
[[ -f $CA ]] || { echo "$CA missing" >&2; exit 1; }
[[ -f $KEY ]] || { echo "$KEY missing" >&2; exit 1; }
NODE_CONFIG="partition-id=$PARTITION num-partitions=$PARTITIONS"
[[ -n ${PERFIT_DATA:-} ]] && NODE_CONFIG="$NODE_CONFIG data=\"$PERFIT_DATA\""
[[ -n ${PERFIT_MODEL:-} ]] && NODE_CONFIG="$NODE_CONFIG model=\"$PERFIT_MODEL\""
[[ -n ${PERFIT_NAME:-} ]] && NODE_CONFIG="$NODE_CONFIG name=\"$PERFIT_NAME\""
[[ -n ${PERFIT_STATE_DIR:-} ]] && NODE_CONFIG="$NODE_CONFIG state-dir=\"$PERFIT_STATE_DIR\""
[[ -n ${PERFIT_WORKER:-} ]] && NODE_CONFIG="$NODE_CONFIG worker=\"$PERFIT_WORKER\""

exec flower-supernode \
    --superlink "$SUPERLINK" \
    --root-certificates "$CA" \
    --auth-supernode-private-key "$KEY" \
    --node-config "$NODE_CONFIG" \
    --host 127.0.0.1 \
    --port "${SUPERNODE_PORT:-9094}" \
    "$@"
