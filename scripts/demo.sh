#!/usr/bin/env bash
# The main job on the embedded default: a 1 GiB disk, part random data and part holes,
# served read-only by qemu-nbd on a unix socket, copied through a nats-server this run
# starts itself into an empty qcow2 target (also behind qemu-nbd), verified by re-reading.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(pwd)/.demo
rm -rf "$dir" && mkdir -p "$dir"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "demo: making a 1 GiB sparse disk with 384 MiB of random data in $dir"
truncate -s 1G "$dir/source.img"
for at in 0 200 520 900; do   # MiB offsets of 96 MiB data runs; the rest stays holes
  head -c 96M /dev/urandom | dd of="$dir/source.img" bs=1M seek="$at" conv=notrunc,sparse status=none
done
qemu-img create -q -f qcow2 "$dir/target.qcow2" 1G

qemu-nbd --read-only --persistent --shared=4 -f raw -x disk -k "$dir/source.sock" "$dir/source.img" &
pids+=($!)
qemu-nbd --persistent --shared=4 -f qcow2 -x disk -k "$dir/target.sock" "$dir/target.qcow2" &
pids+=($!)
for s in source target; do
  for _ in $(seq 100); do [ -S "$dir/$s.sock" ] && break; sleep 0.05; done
done
src="nbd+unix:///disk?socket=$dir/source.sock"
dst="nbd+unix:///disk?socket=$dir/target.sock"

echo "demo: nbd-nats copy $src $dst --verify"
nbd-nats copy "$src" "$dst" --verify

src_sum=$(nbdcopy "$src" - | sha256sum | cut -d' ' -f1)
dst_sum=$(nbdcopy "$dst" - | sha256sum | cut -d' ' -f1)
echo "demo: sha256 source $src_sum"
echo "demo: sha256 target $dst_sum"
[ "$src_sum" = "$dst_sum" ] || { echo "demo: MISMATCH" >&2; exit 1; }
# The content digest names the bytes, not how they travelled: recomputed from the target
# alone, it is the one the copy printed.
echo "demo: content digest of the target $(nbd-nats digest --algo blk64k-xxh3-128 "$dst" | cut -d' ' -f1)"
alloc=$(qemu-img info -U --output=json "$dir/target.qcow2" | sed -n 's/.*"actual-size": \([0-9]*\).*/\1/p' | head -n1)
echo "demo: target allocation $((alloc / 1048576)) MiB on disk for the 1 GiB disk (384 MiB of data)"
