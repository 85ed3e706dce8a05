#!/usr/bin/env bash
# Build or fetch a node OS image for the Tilt `vm` profile.
#
#   scripts/vm-image.sh debian|kairos|talos
#
# debian  (the default of the vm profile) built here, nothing downloaded but Debian packages
#         and PyPI wheels: the installer image (scripts/installer-image.sh, cached by its
#         inputs in $NBDNATS_IMAGE_DIR, default .cache/images): Debian's kernel and a
#         minbase root with the agent as one initramfs. scripts/vm-node.sh boots it directly
#         (kernel + initrd) as role host. Linked as $NBDNATS_VM_DIR/images/debian.
# kairos  the generic "core" ISO of a Kairos release; the VM installs itself from it to
#         its disk, driven by the cloud-config scripts/vm-node.sh hands it.
# talos   the nocloud disk image of a Talos release from the Talos Image Factory (default
#         schematic: no extensions); the VM boots it directly.
#
# Images land in $NBDNATS_VM_DIR/images (default .state/vm/images) and are fetched once
# (kairos and talos: downloads, on a developer's machine).
# Versions: KAIROS_VERSION, KAIROS_FLAVOR, TALOS_VERSION, TALOS_SCHEMATIC.
set -euo pipefail
cd "$(dirname "$0")/.."

os=${1:-}
case $os in debian|kairos|talos) ;; *) echo "usage: $0 debian|kairos|talos" >&2; exit 2 ;; esac
dir=${NBDNATS_VM_DIR:-.state/vm}/images
KAIROS_VERSION=${KAIROS_VERSION:-v3.5.3}
KAIROS_FLAVOR=${KAIROS_FLAVOR:-ubuntu-24.04}
TALOS_VERSION=${TALOS_VERSION:-v1.10.6}
# The Image Factory's id of the schematic without customizations.
TALOS_SCHEMATIC=${TALOS_SCHEMATIC:-376567988ad370138ad8b2698212367b8edcb69b5fd68c80be1f2ec7d603b4ba}

say() { printf 'vm-image: %s\n' "$*" >&2; }
need() { command -v "$1" >/dev/null || { say "error: $1 not found; install it"; exit 1; }; }
fetch() { # url file: download to file.part, then rename, so an interrupted fetch is redone
  say "fetching $1"
  curl -fL --retry 3 --connect-timeout 20 -o "$2.part" "$1"
  mv "$2.part" "$2"
}
mkdir -p "$dir"
if [ "$os" = debian ]; then
  scripts/installer-image.sh || { say "error: building the Debian node image failed (see above)"; exit 1; }
  base=$(realpath "${NBDNATS_IMAGE_DIR:-.cache/images}/installer")
  ln -sfn "$base" "$dir/debian"
  say "ready: $dir/debian (vmlinuz, rootfs.cpio.zst)"
  exit 0
fi
need curl
need sha256sum

case $os in
  kairos)
    name=kairos-$KAIROS_FLAVOR-core-amd64-generic-$KAIROS_VERSION.iso
    url=https://github.com/kairos-io/kairos/releases/download/$KAIROS_VERSION/$name
    if [ ! -s "$dir/$name" ]; then
      fetch "$url" "$dir/$name"
      # Releases publish NAME.sha256 beside each ISO: check it when it is there.
      if curl -fsSL -o "$dir/$name.sha256" "$url.sha256"; then
        want=$(cut -d' ' -f1 "$dir/$name.sha256")
        have=$(sha256sum "$dir/$name" | cut -d' ' -f1)
        [ "$want" = "$have" ] || { rm -f "$dir/$name"; say "error: checksum mismatch for $name"; exit 1; }
      else
        say "note: no checksum published for $name; not verified"
      fi
    fi
    ln -sfn "$name" "$dir/kairos.iso"
    ;;
  talos)
    need xz
    name=talos-$TALOS_VERSION-nocloud-amd64.raw
    url=https://factory.talos.dev/image/$TALOS_SCHEMATIC/$TALOS_VERSION/nocloud-amd64.raw.xz
    if [ ! -s "$dir/$name" ]; then
      fetch "$url" "$dir/$name.xz"
      xz -d -f "$dir/$name.xz"
    fi
    ln -sfn "$name" "$dir/talos.raw"
    ;;
esac
say "ready: $dir/$( [ "$os" = kairos ] && echo kairos.iso || echo talos.raw )"
