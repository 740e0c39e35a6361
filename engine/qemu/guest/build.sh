#!/usr/bin/env bash
# Builds the vmckpt test guest from Debian packages, as root on Debian 12: a stock kernel
# (vmlinuz) and an initramfs (busybox + init + workload), cached outside the source tree.
# Prints the cache dir as the last stdout line; everything else goes to stderr.
set -euo pipefail
exec 3>&1 1>&2
src=$(cd "$(dirname "$0")" && pwd)
out=${VMCKPT_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmckpt/guest}
mkdir -p "$out"

# Fast path: both outputs newer than every input.
fresh() {
  local o s
  for o in vmlinuz initramfs.cpio.gz; do
    for s in init workload.c build.sh; do [ "$out/$o" -nt "$src/$s" ] || return 1; done
  done
}
if fresh; then echo "$out" >&3; exit 0; fi

export DEBIAN_FRONTEND=noninteractive
updated=
update() { [ -n "$updated" ] || apt-get update -qq; updated=1; }

need=()
for pkg in busybox-static cpio gcc libc6-dev qemu-system-x86; do
  dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed' || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  update
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

tmp=$(mktemp -d "$out/.build.XXXXXX") # same filesystem: the final mv is atomic
trap 'rm -rf "$tmp"' EXIT

# Kernel: the image package linux-image-amd64 points at, unpacked only (no install scripts).
kernel_pkg() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-amd64$/ { print $2; exit }'
}
download_kernel() {
  local pkg
  pkg=$(kernel_pkg)
  [ -n "$pkg" ] || return 1
  echo "guest kernel: $pkg"
  # As root, apt drops to _apt, which cannot write to our 0700 temp dir: stay root.
  (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$pkg")
}
download_kernel || { update; download_kernel; } # stale or missing package lists
dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/kernel"
cp "$tmp"/kernel/boot/vmlinuz-* "$tmp/vmlinuz"

# Initramfs: static busybox, our init, the static workload, and the virtio block modules
# (Debian builds virtio as modules; init loads them in this order when the guest has a disk).
r=$tmp/root
mkdir -p "$r"/{bin,proc,sys,dev,tmp,lib/modules}
cp /bin/busybox "$r/bin/busybox"
for a in sh mount cat echo poweroff insmod sleep; do ln -s busybox "$r/bin/$a"; done
for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev \
         virtio/virtio_pci_modern_dev virtio/virtio_pci block/virtio_blk; do
  cp "$tmp"/kernel/lib/modules/*/kernel/drivers/$m.ko "$r/lib/modules/"
done
install -m 755 "$src/init" "$r/init"
gcc -O2 -static -s -Wall -Wextra -o "$r/bin/workload" "$src/workload.c"
# The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
mknod -m 600 "$r/dev/console" c 5 1 2>/dev/null || true
(cd "$r" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -9) >"$tmp/initramfs.cpio.gz"

# Move into place last, so an interrupted build never looks fresh.
mv "$tmp/vmlinuz" "$out/vmlinuz"
mv "$tmp/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
echo "$out" >&3
