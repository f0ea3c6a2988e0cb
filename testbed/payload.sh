#!/bin/bash
# Per-session payload disk: the CURRENT checkout, built for dom0 and the guest, on an ext4 image
# that dom0 mounts read-only at /opt/softpage (see dom0/softpage-agent.service). Cheap by design:
# nothing here is compiled under TCG and the cached rootfs is only used through an overlay.
#
#   /opt/softpage/py/          the softpage package (pip --target), cffi modules built against
#                              dom0's own Python and libxen-dev, inside a chroot of the rootfs
#   /opt/softpage/guest/       vmlinuz + initrd.cpio.gz (busybox, guest/init, workload, the block
#                              and ext4 modules, and guest_kmod's softpage.ko when there is one)
#   /opt/softpage/guest_kmod/  softpage.ko as built (or absent)
#   /opt/softpage/PAYLOAD-INFO key=value lines: checkout revision, what was built, what failed
#
# Called by build.sh with OUT, CACHE, ROOTFS, REPO_DIR, TESTBED_DIR set.
set -euo pipefail
: "${OUT:?}" "${CACHE:?}" "${ROOTFS:?}" "${REPO_DIR:?}" "${TESTBED_DIR:?}"
KERNEL_ABI=$(cat "$CACHE/boot/kernel-abi")
[ -d "$CACHE/boot/guest-modules" ] || { echo "testbed cache incomplete: run 'make testbed'" >&2; exit 1; }

WORK=$(mktemp -d)
STAGING=$WORK/payload
OVERLAY=$WORK/overlay
mkdir -p "$STAGING/py" "$STAGING/guest" "$STAGING/guest_kmod" "$STAGING/bin"
INFO=$STAGING/PAYLOAD-INFO

cleanup() {
    local m
    for m in dev/pts dev proc sys; do
        if mountpoint -q "$OVERLAY/merged/$m"; then umount "$OVERLAY/merged/$m"; fi
    done
    if mountpoint -q "$OVERLAY/merged"; then umount "$OVERLAY/merged"; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
note() { echo "$1=$2" >> "$INFO"; echo "payload: $1=$2" >&2; }

note revision "$(git -C "$REPO_DIR" rev-parse HEAD 2>/dev/null || echo unknown)"
note dirty_files "$(git -C "$REPO_DIR" status --porcelain 2>/dev/null | wc -l)"
note kernel_abi "$KERNEL_ABI"

# 1. The checkout as it is now (tracked and untracked files, .gitignore'd ones left out).
mkdir -p "$WORK/src"
if git -C "$REPO_DIR" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$REPO_DIR" ls-files -z --cached --others --exclude-standard |
        (cd "$REPO_DIR" && xargs -0 tar --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$WORK/src"
else
    tar -C "$REPO_DIR" --exclude=.venv --exclude=.git -cf - . | tar -xf - -C "$WORK/src"
fi

# 2. The Python package, built natively inside the dom0 rootfs (its Python 3.11, numpy 1.24,
#    libxen-dev headers), through an overlay so the cached rootfs is never written.
mkdir -p "$OVERLAY/upper" "$OVERLAY/work" "$OVERLAY/merged"
mount -t overlay overlay -o "lowerdir=$ROOTFS,upperdir=$OVERLAY/upper,workdir=$OVERLAY/work" "$OVERLAY/merged"
mount -t proc proc "$OVERLAY/merged/proc"
mount --bind /dev "$OVERLAY/merged/dev"
mkdir -p "$OVERLAY/merged/tmp/softpage-src" "$OVERLAY/merged/tmp/softpage-py"
cp -a "$WORK/src/." "$OVERLAY/merged/tmp/softpage-src/"
# setuptools refuses a readme outside the project directory (pyproject's "../README.md") when
# building from a path; the readme is only package metadata, so this copy goes without it.
sed -i '/^readme *=/d' "$OVERLAY/merged/tmp/softpage-src/python/pyproject.toml"
if chroot "$OVERLAY/merged" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    python3 -m pip install --quiet --no-deps --no-build-isolation --no-index --break-system-packages \
    --target /tmp/softpage-py /tmp/softpage-src/python > "$WORK/pip.log" 2>&1; then
    cp -a "$OVERLAY/merged/tmp/softpage-py/." "$STAGING/py/"
    note python_package built
    note python_extensions "$(cd "$STAGING/py" && find . -name '*.so' -printf '%f ' )"
else
    note python_package FAILED
    sed 's/^/payload: pip: /' "$WORK/pip.log" | tail -30 >&2
fi

# 3. The guest module: built on the host against the guest kernel's headers (same ABI).
kmod_src=$WORK/src/guest_kmod
if [ -f "$kmod_src/Kbuild" ] || [ -f "$kmod_src/Makefile" ]; then
    # Build from source only: objects copied along from the checkout may be for another kernel.
    find "$kmod_src" -maxdepth 1 \( -name '*.o' -o -name '*.ko' -o -name '*.mod' -o -name '*.mod.c' \
        -o -name '.*.cmd' -o -name 'Module.symvers' -o -name 'modules.order' \) -delete
    if make -C "$kmod_src" KVER="$KERNEL_ABI" KDIR="/usr/src/linux-headers-$KERNEL_ABI" modules \
        > "$WORK/kmod.log" 2>&1 &&
        [ -f "$kmod_src/softpage.ko" ]; then
        cp "$kmod_src/softpage.ko" "$STAGING/guest_kmod/softpage.ko"
        note guest_kmod built
    else
        note guest_kmod FAILED
        tail -30 "$WORK/kmod.log" | sed 's/^/payload: kmod: /' >&2
    fi
elif [ -f "$kmod_src/softpage.ko" ]; then
    cp "$kmod_src/softpage.ko" "$STAGING/guest_kmod/softpage.ko"
    note guest_kmod prebuilt
else
    note guest_kmod absent
fi
if [ -f "$STAGING/guest_kmod/softpage.ko" ]; then
    vermagic=$(modinfo -F vermagic "$STAGING/guest_kmod/softpage.ko" 2>/dev/null | cut -d' ' -f1)
    note guest_kmod_vermagic "$vermagic"
    if [ "$vermagic" != "$KERNEL_ABI" ]; then
        note guest_kmod "FAILED(vermagic $vermagic, guest runs $KERNEL_ABI)"
        rm -f "$STAGING/guest_kmod/softpage.ko"
    fi
fi

# 4. The guest: busybox initramfs with the workload and freemem (static, built here) and the
#    modules.
initrd=$WORK/initrd
mkdir -p "$initrd/bin" "$initrd/dev" "$initrd/proc" "$initrd/sys" "$initrd/data" "$initrd/run" "$initrd/tmp"
cp /bin/busybox "$initrd/bin/busybox"
install -m 755 "$TESTBED_DIR/guest/init" "$initrd/init"
gcc -O2 -static -Wall -Wextra -o "$initrd/bin/workload" "$TESTBED_DIR/guest/workload.c"
gcc -O2 -static -Wall -Wextra -o "$initrd/bin/freemem" "$TESTBED_DIR/guest/freemem.c"
cp -a "$CACHE/boot/guest-modules/lib" "$initrd/lib"
if [ -f "$STAGING/guest_kmod/softpage.ko" ]; then cp "$STAGING/guest_kmod/softpage.ko" "$initrd/softpage.ko"; fi
# Without /dev/console in the archive, init starts with no stdout.
mknod -m 600 "$initrd/dev/console" c 5 1
(cd "$initrd" && find . | cpio -o -H newc --quiet | gzip -6) > "$STAGING/guest/initrd.cpio.gz"
cp "$CACHE/boot/vmlinuz" "$STAGING/guest/vmlinuz"
note guest_initrd_bytes "$(stat -c %s "$STAGING/guest/initrd.cpio.gz")"

install -m 755 "$TESTBED_DIR/dom0/count-bytes" "$STAGING/bin/count-bytes"

# 5. The image.
size_mb=$(( $(du -sm "$STAGING" | cut -f1) * 2 + 32 ))
rm -f "$OUT.tmp"
mkfs.ext4 -q -F -L softpage-payload -d "$STAGING" "$OUT.tmp" "${size_mb}M"
mv "$OUT.tmp" "$OUT"
echo "payload: $OUT (${size_mb} MiB)" >&2
