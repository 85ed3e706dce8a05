#!/usr/bin/env bash
# A unified kernel image: systemd-boot's EFI stub with the kernel, initrd, command line and
# an os-release, as systemd 252 documents building one with objcopy (bookworm has no ukify).
#
#   scripts/uki.sh VMLINUZ INITRD CMDLINE OUT.efi
#
# Each section goes after the stub's last one, at a VMA rounded up to the stub's
# SectionAlignment. The stub: $NBDNATS_EFI_STUB, default systemd-boot-efi's.
set -euo pipefail
STUB=${NBDNATS_EFI_STUB:-/usr/lib/systemd/boot/efi/linuxx64.efi.stub}
die() { printf 'uki: error: %s\n' "$*" >&2; exit 1; }
[ $# -eq 4 ] || die "usage: $0 VMLINUZ INITRD CMDLINE OUT.efi"
kernel=$1 initrd=$2 cmdline=$3 out=$4
[ -f "$STUB" ] || die "$STUB missing; install systemd-boot-efi (or set NBDNATS_EFI_STUB)"
command -v objcopy >/dev/null || die "objcopy not found; install binutils"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/uki.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
printf '%s' "$cmdline" >"$tmp/cmdline"
cat >"$tmp/os-release" <<'OSREL'
NAME="nbdnats"
ID=nbdnats
PRETTY_NAME="nbdnats boot image (Debian kernel)"
OSREL
align=$((16#$(objdump -p "$STUB" | awk '$1 == "SectionAlignment" { print $2 }')))
next=0
while read -r _ _ size vma _; do
  end=$((16#$vma + 16#$size))
  [ $end -le $next ] || next=$end
done < <(objdump -h -w "$STUB" | awk 'NF >= 7 && $1 ~ /^[0-9]+$/')
args=()
for s in osrel:"$tmp/os-release" cmdline:"$tmp/cmdline" linux:"$kernel" initrd:"$initrd"; do
  name=${s%%:*} file=${s#*:}
  next=$(((next + align - 1) / align * align))
  args+=(--add-section ".$name=$file" --change-section-vma ".$name=$(printf '0x%x' $next)")
  next=$((next + $(stat -Lc %s "$file")))
done
objcopy "${args[@]}" "$STUB" "$out.tmp" || die "objcopy could not build $out"
mv "$out.tmp" "$out"
