#!/bin/bash
# Per-session payload disk: the CURRENT checkout, built for dom0 and the guest, on an ext4 image
# that dom0 mounts read-only at /opt/softpage (see dom0/softpage-agent.service). Cheap by design:
# nothing here is compiled under TCG and the cached rootfs is only used through an overlay.
#
#   /opt/softpage/py-bookworm/ the softpage package (pip --target), cffi modules built against
#   /opt/softpage/py-trixie/   each dom0's own Python and libxen-dev, inside a chroot of its rootfs;
#   /opt/softpage/py/          empty: the dom0 binds its own build there at boot
#   /opt/softpage/debs/bookworm/ the Debian packages softpage and softpage-dkms as `make deb`
#   /opt/softpage/debs/trixie/   builds them, on this (Debian 12) host and inside the trixie rootfs,
#                              for each dom0 to install as an admin would (tests/e2e/helpers.py
#                              installed_package)
#   /opt/softpage/guest/SERIES/  vmlinuz, vmlinux (the same kernel as an ELF file, which the
#                              test guests boot: guest/vmlinux-of) + initrd.cpio.gz per guest kernel (6.1: Debian 12's,
#                              6.12: Debian 13's): busybox, guest/init, workload, freemem, the block
#                              and ext4 modules, and that kernel's softpage.ko when it built
#   /opt/softpage/guest_kmod/SERIES/  softpage.ko as built (or absent)
#   /opt/softpage/distro/RELEASE/ vmlinuz + initrd.img of a distro guest (PVH direct boot), from
#                              the guest's own /boot; its root disk is beside OUT (below)
#   /opt/softpage/distro/hot-set.lua  wrk's request generator for the guests' nginx
#   /opt/softpage/PAYLOAD-INFO key=value lines: checkout revision, what was built, what failed
#
# Beside OUT, per distro guest whose root disk the cache has (build.sh stage distro_RELEASE):
# distro-RELEASE.img, a copy of that disk configured (distro/configure.sh) and with the payload's
# softpage-dkms installed by apt-get in a chroot, so DKMS builds the module for the guest's kernel
# and modules-load.d loads it at boot. The harness gives it to QEMU with snapshot=on
# (softpage_testbed.host).
#
# Called by build.sh with OUT, CACHE, ROOTFS, ROOTFS_TRIXIE, REPO_DIR, TESTBED_DIR set.
set -euo pipefail
: "${OUT:?}" "${CACHE:?}" "${ROOTFS:?}" "${ROOTFS_TRIXIE:?}" "${REPO_DIR:?}" "${TESTBED_DIR:?}"
KERNEL_ABI=$(cat "$CACHE/boot/kernel-abi")
[ -d "$CACHE/boot/guest-modules" ] || { echo "testbed cache incomplete: run 'make testbed'" >&2; exit 1; }

WORK=$(mktemp -d)
STAGING=$WORK/payload
OVERLAY=$WORK/overlay
mkdir -p "$STAGING/guest" "$STAGING/guest_kmod" "$STAGING/bin"
INFO=$STAGING/PAYLOAD-INFO

# umount_settled DIR: a process of the chroot (dkms's progress indicator) may still be exiting
# right after the command returned; give it a few seconds before unmounting lazily.
umount_settled() {
    local try
    for try in 1 2 3 4 5 6 7 8 9 10; do
        umount "$1" 2>/dev/null && return
        sleep 0.5
    done
    umount -l "$1"
}
cleanup_overlay() {
    local m
    for m in dev/pts dev proc sys; do
        if mountpoint -q "$OVERLAY/merged/$m"; then umount_settled "$OVERLAY/merged/$m"; fi
    done
    if mountpoint -q "$OVERLAY/merged"; then umount_settled "$OVERLAY/merged"; fi
    rm -rf "$OVERLAY"
}
# A distro guest's disk is loop-mounted at $WORK/distro-root while it is being configured.
cleanup_distro_root() {
    local m
    for m in dev/pts dev proc ""; do
        if mountpoint -q "$WORK/distro-root/$m"; then umount_settled "$WORK/distro-root/$m"; fi
    done
}
cleanup() { cleanup_distro_root; cleanup_overlay; rm -rf --one-file-system "$WORK"; }
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

# 2. The Python package, built natively inside each dom0's rootfs (bookworm: Python 3.11, numpy
#    1.24, libxen 4.17; trixie: Python 3.13, numpy 2.2, libxen 4.20), through an overlay so the
#    cached rootfs is never written. Each dom0 binds its own build on /opt/softpage/py at boot
#    (dom0/softpage-agent.service).
mkdir -p "$STAGING/py"
# chroot_overlay ROOTFS: mount a fresh overlay of ROOTFS on $OVERLAY/merged with /proc and /dev.
chroot_overlay() {
    cleanup_overlay
    mkdir -p "$OVERLAY/upper" "$OVERLAY/work" "$OVERLAY/merged"
    mount -t overlay overlay -o "lowerdir=$1,upperdir=$OVERLAY/upper,workdir=$OVERLAY/work" "$OVERLAY/merged"
    mount -t proc proc "$OVERLAY/merged/proc"
    mount --bind /dev "$OVERLAY/merged/dev"
}
in_chroot() { chroot "$OVERLAY/merged" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }

build_python() {  # CODENAME ROOTFS
    local codename=$1
    chroot_overlay "$2"
    mkdir -p "$OVERLAY/merged/tmp/softpage-src" "$OVERLAY/merged/tmp/softpage-py"
    cp -a "$WORK/src/." "$OVERLAY/merged/tmp/softpage-src/"
    # setuptools refuses a readme outside the project directory (pyproject's "../README.md") when
    # building from a path; the readme is only package metadata, so this copy goes without it.
    sed -i '/^readme *=/d' "$OVERLAY/merged/tmp/softpage-src/python/pyproject.toml"
    if in_chroot python3 -m pip install --quiet --no-deps --no-build-isolation --no-index --break-system-packages \
        --target /tmp/softpage-py /tmp/softpage-src/python > "$WORK/pip.log" 2>&1; then
        mkdir -p "$STAGING/py-$codename"
        cp -a "$OVERLAY/merged/tmp/softpage-py/." "$STAGING/py-$codename/"
        note "python_package_$codename" built
        note "python_extensions_$codename" "$(cd "$STAGING/py-$codename" && find . -name '*.so' -printf '%f ' )"
    else
        note "python_package_$codename" FAILED
        sed "s/^/payload: pip ($codename): /" "$WORK/pip.log" | tail -30 >&2
    fi
}
build_python bookworm "$ROOTFS"
# The bookworm build keeps its old name in PAYLOAD-INFO too: that is what the e2e suite checks.
grep -q '^python_package_bookworm=built$' "$INFO" && note python_package built || note python_package FAILED
if [ -d "$ROOTFS_TRIXIE/usr/bin" ]; then build_python trixie "$ROOTFS_TRIXIE"; else note python_package_trixie absent; fi

# 2b. The Debian packages, as `make deb` builds them (lintian included), from the same snapshot of
#     the checkout: the Debian 12 dom0's on this (Debian 12) host, the Debian 13 dom0's inside the
#     trixie rootfs (which has their build dependencies and lintian: build.sh).
# keep_debs CODENAME DIR: the .debs of DIR go to debs/CODENAME/, noted in PAYLOAD-INFO.
keep_debs() {
    mkdir -p "$STAGING/debs/$1"
    cp "$2"/*.deb "$STAGING/debs/$1/"
    note "debs_$1" "$(cd "$STAGING/debs/$1" && ls | tr '\n' ' ')"
}
if (cd "$WORK/src" && scripts/build-deb.sh "$WORK/deb") > "$WORK/deb.log" 2>&1; then
    keep_debs bookworm "$WORK/deb"
else
    note debs_bookworm FAILED
    tail -30 "$WORK/deb.log" | sed 's/^/payload: make deb: /' >&2
fi
if [ -d "$ROOTFS_TRIXIE/usr/bin" ]; then
    chroot_overlay "$ROOTFS_TRIXIE"
    mkdir -p "$OVERLAY/merged/tmp/softpage-src"
    cp -a "$WORK/src/." "$OVERLAY/merged/tmp/softpage-src/"
    if in_chroot /tmp/softpage-src/scripts/build-deb.sh /tmp/softpage-deb > "$WORK/deb-trixie.log" 2>&1; then
        keep_debs trixie "$OVERLAY/merged/tmp/softpage-deb"
    else
        note debs_trixie FAILED
        tail -30 "$WORK/deb-trixie.log" | sed 's/^/payload: make deb (trixie): /' >&2
    fi
fi

# 3. The guest module for each guest kernel: 6.1 built on the host against its headers (same ABI),
#    6.12 through DKMS inside the trixie rootfs (its gcc 14, linux-headers and dkms), from source
#    only: objects copied along from the checkout may be for another kernel.
clean_kmod() {
    find "$1" -maxdepth 1 \( -name '*.o' -o -name '*.ko' -o -name '*.mod' -o -name '*.mod.c' \
        -o -name '.*.cmd' -o -name 'Module.symvers' -o -name 'modules.order' \) -delete
}
# keep_kmod SERIES ABI BUILT_KO: the module goes to guest_kmod/SERIES/ if its vermagic is ABI; notes what built.
keep_kmod() {
    local series=$1 abi=$2 built=$3 vermagic
    mkdir -p "$STAGING/guest_kmod/$series"
    cp "$built" "$STAGING/guest_kmod/$series/softpage.ko"
    vermagic=$(modinfo -F vermagic "$built" 2>/dev/null | cut -d' ' -f1)
    note "guest_kmod_vermagic_$series" "$vermagic"
    if [ "$vermagic" != "$abi" ]; then
        note "guest_kmod_$series" "FAILED(vermagic $vermagic, guest runs $abi)"
        rm -f "$STAGING/guest_kmod/$series/softpage.ko"
    else
        note "guest_kmod_$series" built
    fi
}
kmod_src=$WORK/src/guest_kmod
clean_kmod "$kmod_src"
if make -C "$kmod_src" KVER="$KERNEL_ABI" KDIR="/usr/src/linux-headers-$KERNEL_ABI" modules > "$WORK/kmod.log" 2>&1 &&
    [ -f "$kmod_src/softpage.ko" ]; then
    keep_kmod 6.1 "$KERNEL_ABI" "$kmod_src/softpage.ko"
else
    note guest_kmod_6.1 FAILED
    tail -30 "$WORK/kmod.log" | sed 's/^/payload: kmod 6.1: /' >&2
fi
TRIXIE_ABI=$(cat "$CACHE/boot/trixie/kernel-abi" 2>/dev/null || true)
if [ -n "$TRIXIE_ABI" ]; then
    # Through DKMS, as softpage-guest-install builds it in a Debian 13 guest (dkms build, private
    # trees; its MAKE[0] is guest_kmod's Makefile).
    version=$(sed -n 's/^PACKAGE_VERSION="\(.*\)"$/\1/p' "$kmod_src/dkms.conf")
    chroot_overlay "$ROOTFS_TRIXIE"
    mkdir -p "$OVERLAY/merged/tmp/dkms/src/softpage-$version" "$OVERLAY/merged/tmp/dkms/tree"
    cp -a "$kmod_src/." "$OVERLAY/merged/tmp/dkms/src/softpage-$version/"
    clean_kmod "$OVERLAY/merged/tmp/dkms/src/softpage-$version"
    built=""
    if in_chroot LC_ALL=C dkms build --dkmstree /tmp/dkms/tree --sourcetree /tmp/dkms/src -m softpage \
        -v "$version" -k "$TRIXIE_ABI" > "$WORK/kmod612.log" 2>&1; then
        built=$(find "$OVERLAY/merged/tmp/dkms/tree/softpage/$version/$TRIXIE_ABI" -name 'softpage.ko*' | head -1)
    fi
    case "$built" in
        *.xz) xz -dc "$built" > "$WORK/softpage-6.12.ko"; keep_kmod 6.12 "$TRIXIE_ABI" "$WORK/softpage-6.12.ko" ;;
        *.zst) zstd -qdc "$built" > "$WORK/softpage-6.12.ko"; keep_kmod 6.12 "$TRIXIE_ABI" "$WORK/softpage-6.12.ko" ;;
        ?*) keep_kmod 6.12 "$TRIXIE_ABI" "$built" ;;
        *) note guest_kmod_6.12 FAILED
           cat "$OVERLAY/merged/tmp/dkms/tree/softpage/$version/build/make.log" >> "$WORK/kmod612.log" 2>/dev/null || true
           grep -E 'rror|warning' "$WORK/kmod612.log" | head -30 | sed 's/^/payload: kmod 6.12: /' >&2 ;;
    esac
    if grep -q 'warning:' "$OVERLAY/merged/tmp/dkms/tree/softpage/$version/build/make.log" 2>/dev/null; then
        note guest_kmod_6.12_warnings "$(grep -c 'warning:' "$OVERLAY/merged/tmp/dkms/tree/softpage/$version/build/make.log")"
    fi
    cleanup_overlay
fi
# The 6.1 result keeps its old name too: the e2e suite checks it.
note guest_kmod "$(sed -n 's/^guest_kmod_6.1=//p' "$INFO" | tail -1)"

# 4. The guests: a busybox initramfs per guest kernel, with the workload and freemem (static, built
#    here once), that kernel's block and ext4 modules and its softpage.ko when it built.
mkdir -p "$WORK/bin"
gcc -O2 -static -Wall -Wextra -o "$WORK/bin/workload" "$TESTBED_DIR/guest/workload.c"
gcc -O2 -static -Wall -Wextra -o "$WORK/bin/freemem" "$TESTBED_DIR/guest/freemem.c"
build_guest() {  # SERIES VMLINUZ MODULES_TREE
    local series=$1 initrd=$WORK/initrd-$1
    mkdir -p "$initrd/bin" "$initrd/dev" "$initrd/proc" "$initrd/sys" "$initrd/data" "$initrd/run" "$initrd/tmp"
    cp /bin/busybox "$initrd/bin/busybox"
    install -m 755 "$TESTBED_DIR/guest/init" "$initrd/init"
    cp "$WORK/bin/workload" "$WORK/bin/freemem" "$initrd/bin/"
    cp -a "$3/lib" "$initrd/lib"
    if [ -f "$STAGING/guest_kmod/$series/softpage.ko" ]; then
        cp "$STAGING/guest_kmod/$series/softpage.ko" "$initrd/softpage.ko"
    fi
    # Without /dev/console in the archive, init starts with no stdout.
    mknod -m 600 "$initrd/dev/console" c 5 1
    mkdir -p "$STAGING/guest/$series"
    (cd "$initrd" && find . | cpio -o -H newc --quiet | gzip -6) > "$STAGING/guest/$series/initrd.cpio.gz"
    cp "$2" "$STAGING/guest/$series/vmlinuz"
    "$TESTBED_DIR/guest/vmlinux-of" "$2" "$STAGING/guest/$series/vmlinux"
    note "guest_initrd_bytes_$series" "$(stat -c %s "$STAGING/guest/$series/initrd.cpio.gz")"
}
build_guest 6.1 "$CACHE/boot/vmlinuz" "$CACHE/boot/guest-modules"
if [ -n "$TRIXIE_ABI" ]; then
    build_guest 6.12 "$CACHE/boot/trixie/vmlinuz" "$CACHE/boot/trixie/guest-modules"
    note guest_kernel_6.12 "$TRIXIE_ABI"
fi

install -m 755 "$TESTBED_DIR/dom0/count-bytes" "$STAGING/bin/count-bytes"

# 4b. The distro guests: per cached root disk, a copy configured for the testbed and given
#     softpage-dkms as a user installs it (apt-get install ./softpage-dkms_*.deb in a chroot: DKMS
#     builds the module for the guest's kernel), beside OUT; its kernel and initramfs go here.
build_distro_guest() {  # RELEASE
    local release=$1 disk kernel abi deb module root=$WORK/distro-root started
    disk=$(dirname "$OUT")/distro-$release.img
    started=$(date +%s.%N)
    cp --sparse=always "$CACHE/distro-$release.img" "$disk.tmp"
    mkdir -p "$root"
    mount -o loop "$disk.tmp" "$root"
    mount -t proc proc "$root/proc"
    mount --bind /dev "$root/dev"
    mount -t devpts -o newinstance devpts "$root/dev/pts"
    ROOT="$root" TESTBED_DIR="$TESTBED_DIR" bash "$TESTBED_DIR/distro/configure.sh"
    # built on this Debian 12 host, and for every release: the package is architecture-independent
    deb=$(ls "$STAGING"/debs/bookworm/softpage-dkms_*.deb 2>/dev/null | head -1)
    kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -1)
    abi=${kernel##*/vmlinuz-}
    if [ -n "$deb" ]; then
        cp "$deb" "$root/tmp/"
        if chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root DEBIAN_FRONTEND=noninteractive \
            LC_ALL=C apt-get install -y -q "/tmp/${deb##*/}" > "$WORK/distro-$release.log" 2>&1; then
            module=$(find "$root/lib/modules/$abi/updates" -name 'softpage.ko*' 2>/dev/null | head -1)
            if [ -n "$module" ]; then note "distro_kmod_$release" built
            else note "distro_kmod_$release" "FAILED(no softpage.ko for $abi)"; fi
        else
            note "distro_kmod_$release" FAILED
        fi
        grep -i -E 'error|warning|dkms|softpage' "$WORK/distro-$release.log" | tail -20 | sed "s/^/payload: distro $release: /" >&2
        rm -f "$root/tmp/${deb##*/}"
    else
        note "distro_kmod_$release" "FAILED(no softpage-dkms package)"
    fi
    note "distro_kernel_$release" "$abi"
    mkdir -p "$STAGING/distro/$release"
    cp "$kernel" "$STAGING/distro/$release/vmlinuz"
    cp "$root/boot/initrd.img-$abi" "$STAGING/distro/$release/initrd.img"
    cleanup_distro_root
    mv "$disk.tmp" "$disk"
    note "distro_seconds_$release" "$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')"
}
# SOFTPAGE_PAYLOAD_DISTRO=0 (the e2e suite, when none of its tests boots a distro guest): none,
# which saves copying gigabytes of disk and running DKMS twice.
if [ "${SOFTPAGE_PAYLOAD_DISTRO:-1}" = 0 ]; then
    note distro_guests skipped
else
    for disk in "$CACHE"/distro-*.img; do
        [ -f "$disk" ] || continue
        release=${disk##*/distro-}; release=${release%.img}
        build_distro_guest "$release"
    done
fi
if [ -d "$STAGING/distro" ]; then
    install -m 644 "$TESTBED_DIR/distro/hot-set.lua" "$STAGING/distro/hot-set.lua"
fi

# 5. The image.
size_mb=$(( $(du -sm "$STAGING" | cut -f1) * 2 + 32 ))
rm -f "$OUT.tmp"
mkfs.ext4 -q -F -L softpage-payload -d "$STAGING" "$OUT.tmp" "${size_mb}M"
mv "$OUT.tmp" "$OUT"
echo "payload: $OUT (${size_mb} MiB)" >&2
