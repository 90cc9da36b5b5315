#!/usr/bin/env bash
# Builds the Cirrus tiny test guest from Debian packages, idempotently:
#   <out>/vmlinuz        the linux-image-cloud-amd64 kernel   (image: aki)
#   <out>/initramfs.img  busybox-static + virtio modules + /init (image: ari)
#   <out>/root.qcow2     a small empty root disk              (image: qcow2)
# Usage: scripts/guest/build.sh [OUT_DIR]   (default: target/guest)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../../target/guest}"
mkdir -p "$out"
# Tests build it on first use, several at once on a clean clone: one at a
# time (the others then find it built).
exec 9>"$out/.lock"
flock 9

need=()
ls /boot/vmlinuz-*-cloud-amd64 >/dev/null 2>&1 || need+=(linux-image-cloud-amd64)
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx udhcpc || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v genisoimage >/dev/null || need+=(genisoimage)
if [ ${#need[@]} -gt 0 ]; then
  echo "guest: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

kernel=$(ls /boot/vmlinuz-*-cloud-amd64 | sort -V | tail -n1)
kver=${kernel#/boot/vmlinuz-}
stamp="$kver $(sha256sum "$here/init" /bin/busybox | sha256sum | cut -c1-16)"
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ] && [ -f "$out/root.qcow2" ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/modules"
cp /bin/busybox "$work/bin/busybox"
cp "$here/init" "$work/init"
chmod 755 "$work/init" "$work/bin/busybox"
: > "$work/modules.list"
# Each module once, in dependency order (modprobe -a: the names are all modules).
modprobe -S "$kver" --show-depends -a virtio_pci virtio_net virtio_blk isofs button evdev \
  | awk '$1 == "insmod" { print $2 }' | awk '!seen[$0]++' | while read -r ko; do
    cp "$ko" "$work/modules/"
    basename "$ko" >> "$work/modules.list"
  done
(cd "$work" && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initramfs.img.tmp"
mv "$out/initramfs.img.tmp" "$out/initramfs.img"
cp "$kernel" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
qemu-img create -q -f qcow2 "$out/root.qcow2.tmp" 64M && mv "$out/root.qcow2.tmp" "$out/root.qcow2"
echo "$stamp" > "$out/.stamp"
echo "guest: built $out (kernel $kver)"
