#!/usr/bin/env bash
# libvirt for the compute agent and its tests, installed when missing and
# started when down, idempotently. No systemd here: virtlogd and libvirtd run
# as daemons (-d). The agent's tests use libvirt's test driver
# (`test:///default`, in-process, no daemon needed); real guests (qemu:///system)
# need the daemons and QEMU.
set -euo pipefail

need_apt=()
command -v libvirtd >/dev/null 2>&1 || need_apt+=(libvirt-daemon-system)
command -v virsh >/dev/null 2>&1 || need_apt+=(libvirt-clients)
pkg-config --exists libvirt 2>/dev/null || need_apt+=(libvirt-dev)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_apt+=(qemu-system-x86)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! pgrep -x virtlogd >/dev/null 2>&1; then
  echo "setup: starting virtlogd"
  virtlogd -d
fi
if ! pgrep -x libvirtd >/dev/null 2>&1; then
  echo "setup: starting libvirtd"
  libvirtd -d
fi

# The test driver answers without any daemon; check it and the daemon.
virsh -c test:///default list --all >/dev/null
for _ in $(seq 1 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.1
done
virsh -c qemu:///system version >/dev/null 2>&1 || echo "setup: warning: libvirtd does not answer on qemu:///system" >&2
