#!/usr/bin/env bash
# The tiny test guest and what boots it: QEMU (TCG here), the Debian cloud
# kernel, busybox-static, and the tools that pack an initramfs and a config drive.
set -euo pipefail
need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86)
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || need+=(linux-image-cloud-amd64)
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx udhcpc || need+=(busybox-static)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v genisoimage >/dev/null 2>&1 || need+=(genisoimage)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian's qemu-system-x86 conflicts with a backported qemu-utils and apt
# removes it: put qemu-img back in the same run, not the next one.
if ! command -v qemu-img >/dev/null 2>&1; then
  echo "setup: installing qemu-utils"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
fi
