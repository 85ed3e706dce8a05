#!/usr/bin/env bash
# Boot node VM N of the Tilt `vm` profile with QEMU, in the foreground (Tilt's serve_cmd;
# stopping the resource stops the VM).
#
#   scripts/vm-node.sh debian|kairos|talos N
#
# debian: direct kernel boot of the image scripts/vm-image.sh debian builds (Debian's kernel,
# the root as one initramfs; scripts/installer-image.sh --out writes the node's copy in
# $NBDNATS_VM_DIR/nodeN/boot with its agent.env layer). The kernel command line carries
# `nbdnats.role=host nbdnats.node=nodeN nbdnats.ctl=URL nbdnats.data=URL
# nbdnats.export=disk=/dev/vda`; the login (user nodeN, password $NBDNATS_PASSWORD_NODE<N>,
# default nodeN-dev as compose) goes only into agent.env (mode 0600), never the command
# line. URLs: $NBDNATS_VM_CTL_URL (default nats://10.0.2.2:4222) and $NBDNATS_VM_DATA_URL
# (default nats://10.0.2.2:4322), without credentials. The VM's only disk, /dev/vda, is a
# sparse raw file nodeN/data.img ($VM_DISK_SIZE, default 1G), exported as `disk`.
#
# kairos, talos: the VM gets an overlay disk in $NBDNATS_VM_DIR (default .state/vm), a NoCloud "cidata"
# ISO with its identity (hostname nodeN) and, for Kairos, a cloud-config that installs the
# OS to the disk and writes the node's NATS settings to /etc/nbdnats/agent.env. QEMU's user
# network shows the host as 10.0.2.2, where compose publishes the ctl cluster (4222) and
# the data cluster (4322); the dev TLS certificate names 10.0.2.2 too. Forwarded to the
# host's loopback: SSH (Kairos) on 2220+N, the Talos API on 50000+N.
#
# Needs qemu-system-x86_64, and for kairos/talos qemu-img and genisoimage (or xorriso); KVM
# if /dev/kvm is usable, plain emulation (TCG) otherwise or with VM_ACCEL=tcg. Build or fetch
# the image first: scripts/vm-image.sh OS.
set -euo pipefail
cd "$(dirname "$0")/.."

os=${1:-}
n=${2:-}
case $os in debian|kairos|talos) ;; *) echo "usage: $0 debian|kairos|talos N" >&2; exit 2 ;; esac
[[ $n =~ ^[1-9][0-9]?$ ]] || { echo "usage: $0 debian|kairos|talos N (1-99)" >&2; exit 2; }
vm=${NBDNATS_VM_DIR:-.state/vm}
node=node$n
dir=$vm/$node
MEMORY=${VM_MEMORY:-2048}
CPUS=${VM_CPUS:-2}
DISK_SIZE=${VM_DISK_SIZE:-$([ "$os" = debian ] && echo 1G || echo 20G)}
# compose's development default; set NBDNATS_PASSWORD_NODE<N> as for compose.
pw_var=NBDNATS_PASSWORD_NODE$n
password=${!pw_var:-$node-dev}

say() { printf 'vm-node %s: %s\n' "$node" "$*" >&2; }
need() { command -v "$1" >/dev/null || { say "error: $1 not found; install it"; exit 1; }; }
die() { say "error: $*"; exit 1; }
need qemu-system-x86_64
accel=(-machine q35 -cpu max)
case ${VM_ACCEL:-} in
  tcg) ;;
  kvm) accel=(-machine "q35,accel=kvm" -cpu host) ;;
  "") if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then accel=(-machine "q35,accel=kvm" -cpu host); fi ;;
  *) die "VM_ACCEL=$VM_ACCEL: use kvm or tcg" ;;
esac

if [ "$os" = debian ]; then
  ctl=${NBDNATS_VM_CTL_URL:-nats://10.0.2.2:4222}
  data=${NBDNATS_VM_DATA_URL:-nats://10.0.2.2:4322}
  for v in NBDNATS_VM_CTL_URL NBDNATS_VM_DATA_URL; do
    u=$([ $v = NBDNATS_VM_CTL_URL ] && echo "$ctl" || echo "$data")
    # Not echoed when it holds a user: that may be a password.
    [[ $u != *@* ]] || die "$v: give it without a user (the password is $pw_var, kept off the kernel command line)"
    [[ $u =~ ^(nats|tls)://[][A-Za-z0-9.:%_~+,/-]+$ ]] \
      || die "$v='$u': give nats:// or tls://HOST:PORT[,...] without a user"
  done
  [[ $password =~ ^[A-Za-z0-9._~-]{1,256}$ ]] || die "$pw_var: letters, digits and ._~- only"
  mkdir -p "$dir/boot"
  # The login, only in the deployment's agent.env layer (0600), never the command line.
  (umask 077 && printf 'NBDNATS_NATS_USER=%s\nNBDNATS_NATS_PASSWORD=%s\n' "$node" "$password" >"$dir/agent.env")
  cmdline="nbdnats.role=host nbdnats.node=$node nbdnats.ctl=$ctl nbdnats.data=$data nbdnats.export=disk=/dev/vda"
  scripts/installer-image.sh --out "$dir/boot" --env "$dir/agent.env" --cmdline "$cmdline" \
    || die "writing $node's boot files failed (see above); scripts/vm-image.sh debian builds the image"
  [ -e "$dir/data.img" ] || truncate -s "$DISK_SIZE" "$dir/data.img"
  say "booting debian ($MEMORY MiB, $CPUS CPUs); serial console follows"
  exec qemu-system-x86_64 "${accel[@]}" -m "$MEMORY" -smp "$CPUS" -nographic \
    -name "nbdnats-$node" \
    -kernel "$dir/boot/vmlinuz" -initrd "$dir/boot/initrd.img" \
    -append "console=ttyS0 panic=-1 $cmdline" \
    -drive "file=$dir/data.img,if=virtio,format=raw" \
    -netdev "user,id=net0,hostname=$node" -device virtio-net-pci,netdev=net0,romfile= \
    -device virtio-rng-pci
fi

need qemu-img
if command -v genisoimage >/dev/null; then mkiso=(genisoimage -quiet)
elif command -v xorriso >/dev/null; then mkiso=(xorriso -as genisoimage -quiet)
else say "error: genisoimage or xorriso not found; install one"; exit 1
fi
mkdir -p "$dir/cidata"

# NoCloud seed: meta-data names the instance; user-data is what the OS reads at boot.
printf 'instance-id: nbdnats-%s\nlocal-hostname: %s\n' "$node" "$node" > "$dir/cidata/meta-data"
case $os in
  kairos)
    image=$vm/images/kairos.iso
    [ -e "$image" ] || { say "error: $image missing; run scripts/vm-image.sh kairos"; exit 1; }
    [ -e "$dir/disk.qcow2" ] || qemu-img create -q -f qcow2 "$dir/disk.qcow2" "$DISK_SIZE"
    keys=$(cat ~/.ssh/id_*.pub 2>/dev/null | sed 's/^/      - /' || true)
    [ -n "$keys" ] || keys="      []"
    # The dev CA, so the node verifies the servers: NBDNATS_VM_CA, or the one compose made.
    ca=${NBDNATS_VM_CA:-$dir/ca.pem}
    if [ ! -s "$ca" ] && command -v docker >/dev/null; then
      docker compose -f compose/compose.yaml cp tls:/tls/ca.pem "$ca" >/dev/null 2>&1 || true
    fi
    ca_file=""
    if [ -s "$ca" ]; then
      ca_file="        - path: /etc/nbdnats/ca.pem
          permissions: 0644
          content: |
$(sed 's/^/            /' "$ca")"
    else
      say "no dev CA found (start compose first, or set NBDNATS_VM_CA); TLS will not verify"
    fi
    cat > "$dir/cidata/user-data" <<CONFIG
#cloud-config
# Kairos: install to the VM disk on first boot, then reboot into it.
install:
  auto: true
  device: auto
  reboot: true
users:
  - name: kairos
    passwd: kairos
    groups: [admin]
    ssh_authorized_keys:
$keys
stages:
  boot:
    - name: nbdnats node identity
      hostname: $node
      files:
        - path: /etc/nbdnats/agent.env
          permissions: 0600
          content: |
            NBDNATS_NODE=$node
            NBDNATS_CTL_URL=tls://$node:$password@10.0.2.2:4222
            NBDNATS_DATA_URL=tls://$node:$password@10.0.2.2:4322
            SSL_CERT_FILE=/etc/nbdnats/ca.pem
$ca_file
      # The agent (nbd-nats agent, with the control-plane issue) is installed and started
      # here as a systemd unit reading /etc/nbdnats/agent.env.
CONFIG
    boot=(-cdrom "$image" -boot order=dc)
    fwd=hostfwd=tcp:127.0.0.1:$((2220 + n))-:22
    ;;
  talos)
    image=$vm/images/talos.raw
    [ -e "$image" ] || { say "error: $image missing; run scripts/vm-image.sh talos"; exit 1; }
    if [ ! -e "$dir/disk.qcow2" ]; then
      qemu-img create -q -f qcow2 -F raw -b "$(realpath "$image")" "$dir/disk.qcow2" "$DISK_SIZE"
    fi
    # Talos reads its machine config as NoCloud user-data. With talosctl, each node gets a
    # single-node control plane of its own; without, it boots into maintenance mode and
    # waits for `talosctl apply-config --insecure --nodes 127.0.0.1:$((50000 + n))`.
    if command -v talosctl >/dev/null; then
      [ -e "$dir/talos/controlplane.yaml" ] ||
        talosctl gen config "nbdnats-$node" https://127.0.0.1:6443 --output-dir "$dir/talos" \
          --config-patch '[{"op":"add","path":"/cluster/allowSchedulingOnControlPlanes","value":true}]' >/dev/null
      cp "$dir/talos/controlplane.yaml" "$dir/cidata/user-data"
    else
      say "talosctl not found: the node boots into maintenance mode"
      : > "$dir/cidata/user-data"
    fi
    boot=(-boot order=c)
    fwd=hostfwd=tcp:127.0.0.1:$((50000 + n))-:50000
    ;;
esac
"${mkiso[@]}" -output "$dir/cidata.iso" -volid cidata -joliet -rock "$dir/cidata"

say "booting $os ($MEMORY MiB, $CPUS CPUs); serial console follows"
exec qemu-system-x86_64 "${accel[@]}" -m "$MEMORY" -smp "$CPUS" -nographic \
  -name "nbdnats-$node" \
  -drive "file=$dir/disk.qcow2,if=virtio,format=qcow2" \
  -drive "file=$dir/cidata.iso,media=cdrom,readonly=on" \
  "${boot[@]}" \
  -netdev "user,id=net0,hostname=$node,$fwd" -device virtio-net-pci,netdev=net0
