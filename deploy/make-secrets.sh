#!/usr/bin/env bash
# Makes the keys and certificates of a FlexInference fleet (see deploy/README.md):
#
#   deploy/make-secrets.sh OUT_DIR [PROXY_ID ...]        (default proxies: edge-1 edge-2)
#
# In OUT_DIR:
#   ca.pem, ca.key            a private CA (keep ca.key offline once the fleet is enrolled)
#   nats.pem, nats.key        nats-server's certificate (names: $NATS_NAMES, 127.0.0.1)
#   control.pem, control.key  flex control: its gRPC server certificate (names: $CONTROL_NAMES,
#                             127.0.0.1) and its NATS client certificate (CN=flex-control)
#   PROXY_ID.pem, .key        each proxy's client certificate (CN=PROXY_ID), for NATS and for
#                             the control plane's mTLS
#   master.key                the master key (seals provider keys): control plane and proxies
#   admin-token               the admin token operators present to the admin API
#   pg-password               the password of the Postgres role `flex`
#   control-secrets.env       FLEX_ADMIN_TOKEN and PGPASSWORD for flex control (an env file)
#
# Files that already exist are kept: run it again with a new PROXY_ID to enrol one more proxy
# under the same CA. Private keys and secrets are written 0640 (owner and group), certificates
# 0644. Needs bash and openssl (1.1.1 or 3.x).
set -euo pipefail

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
out=$1
shift
proxies=("$@")
[ ${#proxies[@]} -gt 0 ] || proxies=(edge-1 edge-2)
NATS_NAMES=${NATS_NAMES:-"nats nats.internal localhost"}
CONTROL_NAMES=${CONTROL_NAMES:-"control control.internal localhost"}
DAYS=${DAYS:-825}

umask 027
mkdir -p "$out"
cd "$out"

say() { printf '%s\n' "$*" >&2; }

sans() {
  local list="" n
  for n in $1; do list="${list}DNS:${n},"; done
  printf '%sIP:127.0.0.1' "$list"
}

# A P-256 key and a certificate signed by the CA: issue NAME CN EKU [SANS]
issue() {
  local name=$1 cn=$2 eku=$3 san=${4:-}
  if [ -e "$name.pem" ] && [ -e "$name.key" ]; then
    say "kept    $name.pem"
    return
  fi
  local ext
  ext=$(mktemp)
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature"
    echo "extendedKeyUsage=$eku"
    [ -z "$san" ] || echo "subjectAltName=$san"
  } >"$ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=$cn" -keyout "$name.key" -out "$name.csr" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
    -days "$DAYS" -sha256 -extfile "$ext" -out "$name.pem" 2>/dev/null
  rm -f "$name.csr" "$ext"
  chmod 0640 "$name.key"
  chmod 0644 "$name.pem"
  say "made    $name.pem (CN=$cn, $eku${san:+, $san})"
}

# A random hex secret: secret FILE BYTES
secret() {
  if [ -e "$1" ]; then
    say "kept    $1"
    return
  fi
  openssl rand -hex "$2" >"$1"
  chmod 0640 "$1"
  say "made    $1"
}

if [ ! -e ca.pem ] || [ ! -e ca.key ]; then
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 -sha256 \
    -subj "/CN=FlexInference fleet CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout ca.key -out ca.pem 2>/dev/null
  chmod 0640 ca.key
  chmod 0644 ca.pem
  say "made    ca.pem"
else
  say "kept    ca.pem"
fi

issue nats nats serverAuth "$(sans "$NATS_NAMES")"
issue control flex-control serverAuth,clientAuth "$(sans "$CONTROL_NAMES")"
for p in "${proxies[@]}"; do
  case $p in
    *[!A-Za-z0-9_-]* | "") say "proxy id '$p': use letters, digits, '-' and '_' only"; exit 2 ;;
  esac
  issue "$p" "$p" clientAuth
done

secret master.key 32
secret admin-token 32
secret pg-password 24
if [ ! -e control-secrets.env ]; then
  {
    echo "# flex control's secrets (EnvironmentFile / env_file): keep this file 0600 or 0640."
    echo "FLEX_ADMIN_TOKEN=$(cat admin-token)"
    echo "PGPASSWORD=$(cat pg-password)"
  } >control-secrets.env
  chmod 0640 control-secrets.env
  say "made    control-secrets.env"
else
  say "kept    control-secrets.env"
fi
rm -f ca.srl
