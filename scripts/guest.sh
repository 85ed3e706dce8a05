#!/usr/bin/env bash
# Build the tiny test guest of the live-migration tests: a Debian kernel and a busybox
# initramfs whose /init keeps writing an increasing counter to its virtio disk.
#
#   scripts/guest.sh            prints the directory holding vmlinuz and initrd.img
#
# The kernel is Debian's linux-image-<version>-amd64 (the one linux-image-amd64 depends on,
# or GUEST_KERNEL_PACKAGE), fetched with `apt-get download` and unpacked with dpkg-deb, not
# installed. Its virtio modules go into the initramfs beside the static busybox of the
# busybox-static package. Results are cached in $NBDNATS_GUEST_DIR (default
# $XDG_CACHE_HOME/nbdnats/guest), keyed by the kernel package, busybox and this script, so
# a second run only prints the directory.
#
# The guest's /init, once /dev/vda is there, loops from n = 1: it writes a 512-byte record
# "NBDNATS-COUNTER <n, 12 digits>" to sector (n mod counter_slots) of /dev/vda with O_DIRECT
# and fsync, and only when that write was acknowledged prints "COUNTER <n>" on the console
# (ttyS0), then sleeps counter_sleep seconds. counter_slots (default 2048) and
# counter_sleep (default 0.03) come from the kernel command line. So every acknowledged
# write leaves its own record, and n never goes backwards while the guest runs.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'guest: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

BUSYBOX=${BUSYBOX:-/bin/busybox}
# In dependency order (each module's modinfo "depends"): busybox insmod resolves nothing.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)
cache=${NBDNATS_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nbdnats/guest}

if ! { [ -x "$BUSYBOX" ] && "$BUSYBOX" --list | grep -x insmod >/dev/null; }; then
  die "no static busybox at $BUSYBOX; install busybox-static (scripts/bootstrap.sh does)"
fi
command -v apt-get >/dev/null || die "apt-get is needed to fetch the Debian kernel package"
command -v cpio >/dev/null || die "cpio not found; install it (scripts/bootstrap.sh does)"

pkg=${GUEST_KERNEL_PACKAGE:-}
if [ -z "$pkg" ]; then
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1)
  [ -n "$pkg" ] || die "cannot resolve linux-image-amd64 to a kernel package (run apt-get update)"
fi
version=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
if [ -z "$version" ] || [ "$version" = "(none)" ]; then die "no candidate version of $pkg"; fi

key=$({ echo "$pkg=$version"; sha256sum "$BUSYBOX" "$0" | cut -d' ' -f1; } | sha256sum | cut -c1-16)
out=$cache/$key
if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
# The kernel package is kept apart from the builds: a change of this script rebuilds the
# initramfs without fetching 70 MB again.
debs=$cache/debs/$pkg=$version
if [ -z "$(find "$debs" -name '*.deb' 2>/dev/null)" ]; then
  say "fetching $pkg $version"
  mkdir -p "$work/debs"
  (cd "$work/debs" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$version" >/dev/null)
  mkdir -p "$cache/debs"
  mv -T "$work/debs" "$debs" 2>/dev/null || true
fi
dpkg-deb -x "$(find "$debs" -name '*.deb' | head -n1)" "$work/kernel"

root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules}
cp "$BUSYBOX" "$root/bin/busybox"
for m in "${MODULES[@]}"; do
  f=$(find "$work/kernel/lib/modules" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \
      | head -n1)
  [ -n "$f" ] || die "$pkg has no module $m"
  case $f in
    *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
    *.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
done

cat > "$root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in ${MODULES[*]}; do
  insmod /lib/modules/\$m.ko || echo "GUEST-ERROR insmod \$m"
done
slots=\${counter_slots:-2048}
pause=\${counter_sleep:-0.03}
i=0
while [ ! -b /dev/vda ]; do
  i=\$((i + 1))
  [ \$i -gt 1000 ] && { echo "GUEST-ERROR no /dev/vda"; poweroff -f; }
  sleep 0.01
done
echo GUEST-READY
n=1
while :; do
  if printf 'NBDNATS-COUNTER %012d\n' \$n \\
     | dd of=/dev/vda bs=512 count=1 seek=\$((n % slots)) conv=sync,fsync,notrunc \\
          oflag=direct 2>/dev/null; then
    echo "COUNTER \$n"
    n=\$((n + 1))
  else
    echo "WRITE-FAILED \$n"
  fi
  sleep \$pause
done
EOF
chmod 0755 "$root/init"

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.img"
cp "$work"/kernel/boot/vmlinuz-* "$work/vmlinuz"
mkdir "$work/out"
mv "$work/vmlinuz" "$work/initrd.img" "$work/out/"
# One rename: a concurrent or interrupted build never leaves a half-filled $out.
mv -T "$work/out" "$out" 2>/dev/null || [ -s "$out/initrd.img" ] || die "cannot create $out"
say "built $out"
echo "$out"
