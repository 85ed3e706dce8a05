#!/usr/bin/env bash
# Boot node VM N of the Tilt `vm` profile with QEMU, in the foreground (Tilt's serve_cmd;
# stopping the resource stops the VM).
#
#   scripts/vm-node.sh kairos|talos N
#
# The VM gets an overlay disk in $NBDNATS_VM_DIR (default .state/vm), a NoCloud "cidata"
# ISO with its identity (hostname nodeN) and, for Kairos, a cloud-config that installs the
# OS to the disk and writes the node's NATS settings to /etc/nbdnats/agent.env. QEMU's user
# network shows the host as 10.0.2.2, where compose publishes the ctl cluster (4222) and
# the data cluster (4322); the dev TLS certificate names 10.0.2.2 too. Forwarded to the
# host's loopback: SSH (Kairos) on 2220+N, the Talos API on 50000+N.
#
# Needs qemu-system-x86_64, qemu-img and genisoimage (or xorriso); KVM if /dev/kvm is
# usable, plain emulation otherwise. Fetch the image first: scripts/vm-image.sh OS.
set -euo pipefail
cd "$(dirname "$0")/.."

os=${1:-}
n=${2:-}
case $os in kairos|talos) ;; *) echo "usage: $0 kairos|talos N" >&2; exit 2 ;; esac
[[ $n =~ ^[1-9][0-9]?$ ]] || { echo "usage: $0 kairos|talos N (1-99)" >&2; exit 2; }
vm=${NBDNATS_VM_DIR:-.state/vm}
node=node$n
dir=$vm/$node
MEMORY=${VM_MEMORY:-2048}
CPUS=${VM_CPUS:-2}
DISK_SIZE=${VM_DISK_SIZE:-20G}
# compose's development default; set NBDNATS_PASSWORD_NODE<N> as for compose.
pw_var=NBDNATS_PASSWORD_NODE$n
password=${!pw_var:-$node-dev}

say() { printf 'vm-node %s: %s\n' "$node" "$*" >&2; }
need() { command -v "$1" >/dev/null || { say "error: $1 not found; install it"; exit 1; }; }
need qemu-system-x86_64
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

accel=(-machine q35 -cpu max)
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then accel=(-machine "q35,accel=kvm" -cpu host); fi
say "booting $os ($MEMORY MiB, $CPUS CPUs); serial console follows"
exec qemu-system-x86_64 "${accel[@]}" -m "$MEMORY" -smp "$CPUS" -nographic \
  -name "nbdnats-$node" \
  -drive "file=$dir/disk.qcow2,if=virtio,format=qcow2" \
  -drive "file=$dir/cidata.iso,media=cdrom,readonly=on" \
  "${boot[@]}" \
  -netdev "user,id=net0,hostname=$node,$fwd" -device virtio-net-pci,netdev=net0
