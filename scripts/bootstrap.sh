#!/usr/bin/env bash
# Bring a fresh Debian/Ubuntu machine to where `make demo` and `make test` run: system
# packages, a Python >= 3.11 venv with the project's dependencies (read from pyproject.toml).
# Idempotent: each step checks before it acts, so a second run takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
APT_PACKAGES=(libnbd-dev libnbd-bin qemu-utils pkg-config restic openssl nbdkit)
# Live-migration tests: QEMU itself, and what scripts/guest.sh builds the test guest with.
APT_PACKAGES+=(qemu-system-x86 busybox-static cpio xz-utils)
# The bare-metal installer (scripts/installer-image.sh, scripts/uki.sh) and its tests: a
# Debian root, the EFI stub for UKIs, GPT and FAT without mounting, OVMF and a software TPM,
# depmod/modprobe for the installer's module tree (kmod: absent from minimal hosts).
APT_PACKAGES+=(mmdebstrap zstd binutils systemd-boot-efi gdisk mtools ovmf swtpm swtpm-tools
  tpm2-tools kmod)
# Bare-metal networking tests: FRR as the ToR (zebra, staticd, bgpd for a spine), lldpd on
# hosts and ToR, gobgpd for spine announcements, iproute2 for namespaces and `ip -j`, ping.
APT_PACKAGES+=(frr lldpd gobgpd iproute2 iputils-ping)

say() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

python=${PYTHON:-python3}
command -v "$python" >/dev/null || die "no python3 found; install Python 3.11 or newer"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$($python --version) is too old; nbdnats needs Python 3.11 or newer (set PYTHON=...)"
"$python" -c 'import ensurepip' 2>/dev/null || APT_PACKAGES+=(python3-venv)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  say "installing ${missing[*]}"
  $sudo apt-get update -qq
  # Debian bookworm's own qemu-system-x86 (7.2) cannot sit beside a backported qemu-utils
  # (they share qemu-block-extra): take QEMU from bookworm-backports when qemu-utils did.
  target=()
  if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]] \
     && dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q '~bpo12'; then
    if ! apt-cache policy | grep -q 'bookworm-backports'; then
      say "adding the bookworm-backports apt source"
      echo "deb http://deb.debian.org/debian bookworm-backports main" \
        | $sudo tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
      $sudo apt-get update -qq
    fi
    target=(-t bookworm-backports)
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${target[@]}" "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || die "no Rust toolchain (cargo); install one with rustup (1.89 or newer)"

[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$python" -m venv "$VENV"; }
stamp="$VENV/.deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "installing Python dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q -U pip
  "$VENV/bin/python" - <<'PY' > "$VENV/requirements.txt"
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))
reqs = p["build-system"]["requires"] + p["project"]["dependencies"]
reqs += p["project"]["optional-dependencies"]["dev"]
print("\n".join(reqs))
PY
  "$VENV/bin/python" -m pip install -q -r "$VENV/requirements.txt"
  rm -f "$VENV"/.deps-*
  touch "$stamp"
fi
