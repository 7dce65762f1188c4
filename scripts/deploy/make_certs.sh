#!/usr/bin/env bash
# Generate the keys of a secure PerFIT federation (Flower Deployment Engine):
#   scripts/deploy/make_certs.sh DIR [N] [HOSTS]
# DIR/ca.crt                    CA certificate: every SuperNode and the `flwr` CLI verify the SuperLink with it
# DIR/ca.key                    CA key (keep it offline; only needed to sign new SuperLink certificates)
# DIR/server.crt, server.key    SuperLink TLS certificate and key; SAN = localhost, 127.0.0.1 and HOSTS
# DIR/supernode-K, -K.pub       SuperNode K's authentication key pair (EC P-384, OpenSSH format), K = 0..N-1;
#                               the .pub goes to `flwr supernode register`, the private key stays on node K
# HOSTS: comma-separated extra DNS names / IPs of the SuperLink, e.g. "superlink.example.org,10.0.0.5".
# Needs openssl and ssh-keygen. Existing files are kept (re-running adds missing node keys only).
set -euo pipefail
[[ $# -ge 1 ]] || { sed -n 2,10p "$0" >&2; exit 2; }
DIR=$1 N=${2:-2} HOSTS=${3:-}
command -v openssl > /dev/null || { echo "openssl not found" >&2; exit 1; }
command -v ssh-keygen > /dev/null || { echo "ssh-keygen not found" >&2; exit 1; }
mkdir -p "$DIR"
cd "$DIR"
umask 077

SAN="DNS:localhost,IP:127.0.0.1"
IFS=',' read -r -a EXTRA <<< "$HOSTS"
for host in "${EXTRA[@]}"; do
    [[ -z $host ]] && continue
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then SAN="$SAN,IP:$host"; else SAN="$SAN,DNS:$host"; fi
done

EC=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -nodes)   # TLS keys: ECDSA P-256
if [[ ! -f ca.crt ]]; then
    openssl req -x509 "${EC[@]}" -days 365 -keyout ca.key -out ca.crt -subj "/CN=perfit-federation-ca" 2> /dev/null
fi
if [[ ! -f server.crt ]]; then
    openssl req "${EC[@]}" -keyout server.key -out server.csr -subj "/CN=perfit-superlink" 2> /dev/null
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n%s\n' \
        "$SAN" "extendedKeyUsage=serverAuth" > server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 365 \
        -sha256 -extfile server.ext 2> /dev/null
    rm -f server.csr server.ext ca.srl
fi
for ((k = 0; k < N; k++)); do
    [[ -f supernode-$k ]] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "perfit-supernode-$k" -f "supernode-$k"
done
chmod 644 ca.crt server.crt ./*.pub 2> /dev/null || true
echo "certificates and keys in $PWD (SuperLink SAN: $SAN)"
