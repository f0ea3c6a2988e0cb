#!/bin/sh
# Install what softpage needs on the host (a fresh Debian 12 machine): the
# compiler and Xen headers for the cffi modules, kernel headers for the guest
# module, the tools that build and boot the QEMU testbed, and what `make deb` needs. Idempotent.
set -eu

packages="gcc make libc6-dev python3-venv python3-dev libxen-dev
          linux-headers-amd64 linux-source-6.1 dkms
          qemu-system-x86 qemu-utils debootstrap busybox-static cpio e2fsprogs xz-utils"

# shellcheck disable=SC2086  # one word per package
"$(dirname "$0")/install-debs.sh" host-setup $packages
# The testbed's payload builds the Debian packages too (make deb): their build dependencies.
exec "$(dirname "$0")/build-deb.sh" --deps
