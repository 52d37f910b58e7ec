#!/usr/bin/env bash
# Create what a TLS deployment with SuperNode authentication needs (openssl and ssh-keygen):
#   <out>/certs/ca.crt, ca.key        a private CA (ca.key stays with whoever runs the CA)
#   <out>/certs/server.pem, server.key the SuperLink's certificate, signed by the CA, with
#                                      SANs superlink, localhost, 127.0.0.1 and every -s
#   <out>/keys/supernode-<i>, .pub     one ECDSA P-384 key pair per SuperNode, OpenSSH format
#                                      (what `flower-supernode --auth-supernode-private-key`
#                                      and `flwr supernode register` read)
# Usage: generate_certs.sh [-o OUT_DIR] [-n NUM_SUPERNODES] [-s SAN]... [-d DAYS] [-f]
#   -o  output directory (default: this script's directory)
#   -n  number of SuperNode key pairs (default 3)
#   -s  extra SAN of the SuperLink certificate, e.g. -s DNS:link.example.org -s IP:10.0.0.5
#   -d  validity in days (default 365)
#   -f  overwrite existing files
set -euo pipefail

out="$(cd "$(dirname "$0")" && pwd)"
nodes=3
days=365
force=0
sans="DNS:superlink,DNS:localhost,IP:127.0.0.1,IP:::1"
while getopts "o:n:s:d:fh" opt; do
  case "$opt" in
    o) out="$OPTARG" ;;
    n) nodes="$OPTARG" ;;
    s) sans="$sans,$OPTARG" ;;
    d) days="$OPTARG" ;;
    f) force=1 ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
  esac
done
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done

certs="$out/certs"
keys="$out/keys"
if [ "$force" -eq 0 ] && { [ -e "$certs/ca.crt" ] || [ -e "$keys/supernode-0" ]; }; then
  echo "error: $certs or $keys already holds files (use -f to overwrite)" >&2
  exit 1
fi
mkdir -p "$certs" "$keys"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# CA
openssl ecparam -name secp384r1 -genkey -noout -out "$certs/ca.key"
openssl req -x509 -new -key "$certs/ca.key" -sha384 -days "$days" \
  -subj "/CN=cmfl-flower CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$certs/ca.crt"

# SuperLink server certificate
openssl ecparam -name secp384r1 -genkey -noout -out "$certs/server.key"
openssl req -new -key "$certs/server.key" -subj "/CN=superlink" -out "$tmp/server.csr"
cat > "$tmp/server.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyAgreement
extendedKeyUsage=serverAuth
subjectAltName=$sans
EOF
openssl x509 -req -in "$tmp/server.csr" -CA "$certs/ca.crt" -CAkey "$certs/ca.key" \
  -CAcreateserial -days "$days" -sha384 -extfile "$tmp/server.ext" -out "$certs/server.pem"
rm -f "$certs/ca.srl"
openssl verify -CAfile "$certs/ca.crt" "$certs/server.pem" >/dev/null

# SuperNode authentication keys
for ((i = 0; i < nodes; i++)); do
  rm -f "$keys/supernode-$i" "$keys/supernode-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "$keys/supernode-$i"
done
chmod 600 "$certs"/*.key "$keys"/supernode-*[0-9]

echo "CA and SuperLink certificate (SAN $sans) in $certs"
echo "$nodes SuperNode key pair(s) in $keys; register each public key with:"
echo "  flwr supernode register $keys/supernode-<i>.pub <connection>"
