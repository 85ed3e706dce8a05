#!/usr/bin/env bash
# A transfer through an existing topology: a small random disk sent through the data
# plane and back into a file, checked by sha256. Used by the Tiltfile (compose, vm and
# lab profiles) against whatever NBDNATS_DATA_URL and NBDNATS_CTL_URL point at; works
# against `nbd-nats dev up` too (it prints both URLs).
#
#   NBDNATS_DATA_URL=nats://... NBDNATS_CTL_URL=nats://... scripts/dev-smoke.sh [SIZE_MIB]
set -euo pipefail
: "${NBDNATS_DATA_URL:?set NBDNATS_DATA_URL to the data cluster}"
size=${1:-8}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
truncate -s "${size}M" "$dir/src.img"
head -c "$((size * 1024 * 1024 / 2))" /dev/urandom | dd of="$dir/src.img" conv=notrunc status=none
id=smoke-$$-$RANDOM
nbd-nats copy "$dir/src.img" "$dir/dst.img" --id "$id" --data-url "$NBDNATS_DATA_URL" \
  ${NBDNATS_CTL_URL:+--ctl-url "$NBDNATS_CTL_URL"} --verify --timeout 30
want=$(sha256sum < "$dir/src.img")
have=$(sha256sum < "$dir/dst.img")
[ "$want" = "$have" ] || { echo "dev-smoke: sha256 differs" >&2; exit 1; }
echo "dev-smoke: ${size} MiB through the data plane, sha256 ${want%% *}"  # no URL: it may hold a password
