#!/usr/bin/env bash
# Make, with openssl, everything TLS needs on your machine, in DIR (default: certs):
#   ca.crt, ca.key          a local certificate authority (CA) that signs the other two
#   server.crt, server.key  the servers' certificate, valid for localhost, 127.0.0.1 and ::1,
#                           and for docker compose's names: greeter and logger, and greeters
#                           and loggers (every replica of each)
#   client.crt, client.key  a client certificate (CN=greeter-client), for mutual TLS
#
#   ./gen_certs.sh [DIR]
#
# Keys are secrets: they are never committed (.gitignore), and this script makes them
# readable by you only. The certificates are valid for 30 days; run it again when they expire.
set -euo pipefail

dir="${1:-certs}"
days=30
client_name="${GREETER_CLIENT_NAME:-greeter-client}"
mkdir -p "$dir"
cd "$dir"
umask 077  # the keys are created readable by their owner only

# Elliptic-curve keys (P-256): as strong as RSA-3072, and generated in milliseconds.
new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
serial() { echo "0x$(openssl rand -hex 16)"; }

# 1. The CA: a self-signed certificate allowed to sign others (and nothing else).
new_key ca.key
openssl req -x509 -new -key ca.key -out ca.crt -days "$days" -subj "/CN=gRPC Mastery local CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

# sign NAME SUBJECT EXTENSIONS: a certificate for NAME.key, signed by the CA.
sign() {
  new_key "$1.key"
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -set_serial "$(serial)" \
    -days "$days" -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  rm "$1.csr" "$1.ext"
}

# 2. The servers (the Greeter and the Logger share it): clients check that the name they
# dialled is in subjectAltName.
sign server "/CN=localhost" "subjectAltName=DNS:localhost,DNS:greeter,DNS:logger,DNS:greeters,DNS:loggers,IP:127.0.0.1,IP:::1
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature"

# 3. A client, for mutual TLS: the server reads who is calling from its common name.
sign client "/CN=$client_name" "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature"

chmod 644 ./*.crt
echo "wrote $dir/: ca.crt ca.key server.crt server.key client.crt client.key"
