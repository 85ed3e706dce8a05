#!/usr/bin/env bash
# Make development TLS material for the nbdnats NATS servers: a CA, a server certificate
# (also used by the servers as the client side of routes and leafnode links, so it carries
# both serverAuth and clientAuth) and a client certificate for agents and tools.
#
#   control/gen-dev-tls.sh DIR [NAME...]
#
# DIR is a state directory (never the repository); NAME adds a DNS name to the server
# certificate besides localhost, 127.0.0.1, ::1, the compose service names and 10.0.2.2
# (the host as QEMU's user network shows it to the `vm` profile's node VMs). Existing
# material is kept, so this is idempotent; delete DIR to start over. Keys are EC P-256,
# readable only by their owner. These certificates are for development only.
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 DIR [NAME...]" >&2; exit 2; }
dir=$1
shift
command -v openssl >/dev/null || { echo "gen-dev-tls: openssl not found" >&2; exit 1; }
mkdir -p "$dir"
cd "$dir"
umask 077

if [ -s ca.pem ] && [ -s server.pem ] && [ -s client.pem ] &&
   openssl verify -CAfile ca.pem server.pem client.pem >/dev/null 2>&1; then
  exit 0
fi

days=825
names=(localhost nats-ctl-1 nats-ctl-2 nats-ctl-3 nats-data-1 nats-data-2 nats-data-3
       nats-rack-1 nats-rack-2 "$@")
san="IP:127.0.0.1,IP:::1,IP:10.0.2.2"
for n in "${names[@]}"; do san+=",DNS:$n"; done

openssl ecparam -name prime256v1 -genkey -noout -out ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=nbdnats dev CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.pem

issue() { # name subject extendedKeyUsage [subjectAltName]
  local name=$1 subject=$2 eku=$3 alt=${4:-}
  local ext="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=$eku"
  [ -n "$alt" ] && ext+="
subjectAltName=$alt"
  openssl ecparam -name prime256v1 -genkey -noout -out "$name.key"
  openssl req -new -key "$name.key" -subj "$subject" -out "$name.csr"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
    -days "$days" -extfile <(printf '%s\n' "$ext") -out "$name.pem" 2>/dev/null
  rm -f "$name.csr"
}
issue server "/CN=nbdnats dev server" serverAuth,clientAuth "$san"
issue client "/CN=nbdnats dev client" clientAuth
rm -f ca.srl
chmod 644 ca.pem server.pem client.pem
openssl verify -CAfile ca.pem server.pem client.pem >/dev/null
