#!/bin/bash
# A Debian dom0 root filesystem (bookworm, or trixie for the Debian 13 host): debootstrap minbase +
# the Xen toolstack, the Debian kernel (its postinst builds dom0's initramfs) and what building and
# running softpage inside dom0 needs.
# Called by build.sh with MIRROR, KERNEL_ABI, ROOTFS and DOM0_PACKAGES set, and for a suite other
# than the host's own SUITE and SOURCES (its one-line apt sources; KERNEL_ABI empty: the kernel is
# among DOM0_PACKAGES). Host-specific
# configuration (agent, xen defaults) is NOT done here but in dom0/configure.sh, so that changing
# it does not redo these minutes.
set -euo pipefail
: "${MIRROR:?}" "${ROOTFS:?}" "${DOM0_PACKAGES:?}"
SUITE=${SUITE:-bookworm}
[ "$SUITE" != bookworm ] || : "${KERNEL_ABI:?}"

unmount_chroot() {
    local m
    for m in dev/pts dev sys proc; do
        if mountpoint -q "$ROOTFS/$m"; then umount -l "$ROOTFS/$m"; fi
    done
}

rm -rf "$ROOTFS"
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR"
rm -f "$ROOTFS/etc/apt/sources.list"
if [ -n "${SOURCES:-}" ]; then
    # Another suite: the sources its stage key was resolved against (build.sh trixie_sources).
    echo "$SOURCES" > "$ROOTFS/etc/apt/sources.list"
else
    # Same package sources as the host (bookworm, -updates, -security): the host's apt
    # configuration is what the versions in the stage key were resolved against.
    cp /etc/apt/sources.list.d/*.sources "$ROOTFS/etc/apt/sources.list.d/" 2>/dev/null || true
    if [ -f /etc/apt/sources.list ]; then cp /etc/apt/sources.list "$ROOTFS/etc/apt/sources.list"; fi
fi
find "$ROOTFS/etc/apt/sources.list.d" -name '*disabled*' -delete

# No daemons may start inside the chroot during package installation.
printf '#!/bin/sh\nexit 101\n' > "$ROOTFS/usr/sbin/policy-rc.d"
chmod +x "$ROOTFS/usr/sbin/policy-rc.d"
trap unmount_chroot EXIT
mount -t proc proc "$ROOTFS/proc"
mount --bind /dev "$ROOTFS/dev"
mount --bind /dev/pts "$ROOTFS/dev/pts"
mount -t sysfs sys "$ROOTFS/sys"
# shellcheck disable=SC2086
chroot "$ROOTFS" /bin/sh -c "export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq &&
    apt-get install -y -qq --no-install-recommends $(echo $DOM0_PACKAGES) ${KERNEL_ABI:+linux-image-$KERNEL_ABI} >/dev/null &&
    apt-get clean"
unmount_chroot
trap - EXIT
rm -f "$ROOTFS/usr/sbin/policy-rc.d"
ls "$ROOTFS"/boot/initrd.img-"${KERNEL_ABI:-}"* >/dev/null 2>&1 || { echo "dom0 initramfs was not built" >&2; exit 1; }
du -sh "$ROOTFS"
