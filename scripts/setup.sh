#!/usr/bin/env bash
# Sets up everything vmckpt needs on a fresh Debian machine, as root: system packages (QEMU
# included), a virtualenv in .venv with vmckpt installed editable (its C core is built by the
# install), redis-server (the cluster store's tests start their own cluster) and the test guest
# (kernel + initramfs, cached outside the tree).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in gcc libc6-dev libssl-dev libnbd-dev python3 python3-venv python3-dev qemu-system-x86 \
           busybox-static cpio redis-server redis-tools; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q -U pip
.venv/bin/pip install -q -e '.[test]'
.venv/bin/vmckpt --help >/dev/null
bash engine/qemu/guest/build.sh >/dev/null  # the test guest
echo "vmckpt is set up: .venv/bin/vmckpt"
