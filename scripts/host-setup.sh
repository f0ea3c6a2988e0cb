#!/bin/sh
# Install what softpage needs on the host (a fresh Debian 12 machine): the
# compiler and Xen headers for the cffi modules, kernel headers for the guest
# module, and the tools that build and boot the QEMU testbed. Idempotent.
set -eu

packages="gcc make libc6-dev python3-venv python3-dev libxen-dev
          linux-headers-amd64 linux-source-6.1 dkms
          qemu-system-x86 qemu-utils debootstrap busybox-static cpio e2fsprogs xz-utils"

missing=""
for package in $packages; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
        missing="$missing $package"
done
if [ -z "$missing" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "host-setup: these Debian packages are missing:$missing" >&2
    echo "host-setup: run 'make setup' as root (or install them) first" >&2
    exit 1
fi
echo "host-setup: installing$missing"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
