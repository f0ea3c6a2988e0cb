#!/bin/bash
# Build the cached Xen-in-QEMU testbed for softpage, from Debian packages and this directory only.
#
#   testbed/build.sh all               deps fetch rootfs image data trixie_rootfs trixie_image
#                                      distro_bookworm distro_trixie app_data
#                                      (what `make testbed` runs: the Debian 12 host, the guest data
#                                      disk, the Debian 13 host, the Debian 12 and 13 distro guests
#                                      and their application's files)
#   testbed/build.sh <stage>...        one or more stages, in order
#   testbed/build.sh payload [OUT]     per-session payload disk from the CURRENT checkout (cheap)
#   testbed/build.sh env               print the paths the harness uses (KEY=VALUE lines)
#
# Every cached stage writes $CACHE/stamps/<stage> holding a hash of its inputs (the files of this
# directory it reads, the Debian package versions it installs, and the stamps of the stages it
# depends on). A stage whose stamp matches is skipped, so a second `make testbed` costs seconds and
# a changed input rebuilds exactly the stages downstream of it. Stage times go to stdout and to
# $CACHE/stage-times.txt.
#
# Knobs (environment):
#   SOFTPAGE_TESTBED_CACHE   cache directory (default ${XDG_CACHE_HOME:-~/.cache}/softpage/testbed)
#   SOFTPAGE_DATA_MB         size of the guest data-disk files (default 512)
#   SOFTPAGE_APP_DATA_MB     size of the distro guests' application files (default 256)
#   SOFTPAGE_PG_SCALE        pgbench scale of the Debian 12 distro guest's database (default 100)
#   SOFTPAGE_SKIP_APT=1      deps stage: do not apt-get install on the host (already provisioned)
set -euo pipefail
TESTBED_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(cd "$TESTBED_DIR/.." && pwd)
CACHE=${SOFTPAGE_TESTBED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/softpage/testbed}
DATA_MB=${SOFTPAGE_DATA_MB:-512}
# PV live migration needs shadow paging, which the current bookworm-security build compiled out
# (XSA-495); the bookworm point release still has it. Both boot the same dom0 and toolstack.
XEN_OLD_VERSION=4.17.5+72-g01140da4e8-1
ROOTFS=$CACHE/rootfs
DOM0_IMG=$CACHE/dom0.img
DOM0_IMG_SIZE=4G
STAMPS=$CACHE/stamps
# The two-host testbed's ssh keys (dom0 host key, root's key), made once per cache: every dom0
# image built from this cache, Debian 12's and 13's, gets the same ones (dom0/configure.sh).
SSH_KEYS=$CACHE/ssh-keys

# What an admin's dom0 runs beside xl, for the tests that use it: QEMU as HVM guests' device model,
# libvirt's libxl driver with virsh, ssh between the two hosts of a two-host testbed, wrk as a
# load generator for guests' applications.
DOM0_TOOLSTACK_PACKAGES="qemu-system-xen libvirt-daemon-system libvirt-daemon-driver-xen libvirt-clients
 openssh-server openssh-client wrk"
DOM0_PACKAGES="xen-utils-4.17 xen-utils-common xenstore-utils python3 python3-numpy python3-cffi
 python3-pyxs python3-dev python3-pip python3-setuptools gcc make libc6-dev libxen-dev
 initramfs-tools systemd-sysv udev kmod iproute2 procps busybox e2fsprogs less file
 $DOM0_TOOLSTACK_PACKAGES"
# The Debian 13 ("trixie") host: Xen 4.20 and Linux 6.12 from trixie's own packages, in a rootfs of
# its own. Its kernel (and headers) also make the testbed's 6.12 guests and build softpage.ko for them.
# Its dpkg-dev, debhelper ... lintian build the Debian 13 packages of softpage (testbed/payload.sh);
# pkgconf and systemd-dev tell debian/rules where Debian 13 keeps systemd units (systemd.pc).
ROOTFS_TRIXIE=$CACHE/rootfs-trixie
DOM0_IMG_TRIXIE=$CACHE/dom0-trixie.img
TRIXIE_DOM0_PACKAGES="xen-hypervisor-4.20-amd64 xen-utils-4.20 xen-utils-common xenstore-utils python3
 python3-numpy python3-cffi python3-pyxs python3-dev python3-pip python3-setuptools gcc make libc6-dev
 libxen-dev initramfs-tools systemd-sysv udev kmod iproute2 procps busybox e2fsprogs less file
 linux-image-amd64 linux-headers-amd64 dkms $DOM0_TOOLSTACK_PACKAGES
 build-essential dpkg-dev debhelper dh-dkms dh-python pybuild-plugin-pyproject python3-all-dev lintian
 pkgconf systemd-dev"
# The distro guests (issue 21): a Debian release as a user installs it in a Xen guest, minbase +
# systemd, udev, its own kernel with the headers and dkms that softpage-dkms builds against, and
# nginx serving the application's files (a disk of its own, stage app_data). payload.sh configures
# each per session (distro/configure.sh) and installs the checkout's softpage-dkms into it.
DISTRO_GUEST_PACKAGES="systemd-sysv udev kmod iproute2 procps e2fsprogs initramfs-tools dkms"
APP_DATA_MB=${SOFTPAGE_APP_DATA_MB:-256}
APP_FILE_KB=64
# The Debian 12 distro guest's second application (issue 21): PostgreSQL 15 with a pgbench
# database of scale PG_SCALE (pgbench_accounts: 100,000 rows a unit, about 15 MiB with its index),
# added to the guest's built disk (add_postgresql). Its service is not started at boot: the
# guest's-view bench starts it when it measures it (SOFTPAGE_GUESTVIEW_APP=postgresql).
PG_SCALE=${SOFTPAGE_PG_SCALE:-100}
PG_PACKAGES="postgresql-15"
HOST_PACKAGES="qemu-system-x86 qemu-utils debootstrap busybox-static cpio e2fsprogs gzip xz-utils
 gcc make libc6-dev libxen-dev python3 kmod openssh-client"

log() { echo "[testbed $(date -u +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The Debian mirror comes from the host's own apt configuration, so nothing here names a host.
debian_mirror() {
    if [ -n "${SOFTPAGE_DEBIAN_MIRROR:-}" ]; then echo "$SOFTPAGE_DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(awk '/^URIs:/{print $2}' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1)
    [ -n "$uri" ] || uri=$(awk '$1=="deb" && $3 ~ /^bookworm$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
    [ -n "$uri" ] || die "no Debian mirror found in /etc/apt; set SOFTPAGE_DEBIAN_MIRROR"
    echo "$uri"
}

debian_security_mirror() {  # the host's security archive, for trixie-security
    local uri
    uri=$(awk '/^URIs:/{print $2}' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep security | head -1)
    [ -n "$uri" ] || uri=$(awk '$1=="deb" && $3 ~ /-security$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
    echo "${uri:-}"
}

# trixie_sources: the one-line sources of the trixie suites, from the host's own mirrors.
trixie_sources() {
    local mirror security
    mirror=$(debian_mirror); security=$(debian_security_mirror)
    echo "deb $mirror trixie main"
    echo "deb $mirror trixie-updates main"
    [ -z "$security" ] || echo "deb $security trixie-security main"
}

# trixie_apt TOOL ARGS...: apt-get / apt-cache against trixie with a state of its own under
# $CACHE/apt-trixie (the host's own apt stays on bookworm). Its lists are refreshed once a day.
trixie_apt() {
    local tool=$1 dir=$CACHE/apt-trixie; shift
    local options=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
                   -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o Dir::State::status=/dev/null)
    if [ -z "$(find "$dir/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
        mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
        trixie_sources > "$dir/sources.list"
        apt-get "${options[@]}" update -qq >&2 || die "cannot read the trixie package lists"
    fi
    "$tool" "${options[@]}" "$@"
}

trixie_package_versions() {  # as package_versions, for trixie's packages
    trixie_apt apt-cache policy "$@" 2>/dev/null |
        awk '/^[^ ].*:$/{name=substr($1, 1, length($1)-1)} /Candidate:/{print name "=" $2}' | sort
}

# ABI name of the kernel behind linux-image-amd64 (e.g. 6.1.0-56-amd64): dom0 and guest both run it.
KERNEL_ABI_RESOLVED=""
kernel_abi() {
    if [ -n "$KERNEL_ABI_RESOLVED" ]; then echo "$KERNEL_ABI_RESOLVED"; return; fi
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/{sub("linux-image-","",$2); print $2; exit}'
}

package_versions() {  # "name=version" for every package given, sorted: part of stage keys
    # one apt-cache call for all of them: a call per package costs seconds on a loaded machine
    apt-cache policy "$@" 2>/dev/null |
        awk '/^[^ ].*:$/{name=substr($1, 1, length($1)-1)} /Candidate:/{print name "=" $2}' | sort
}

hash_inputs() {  # stdin text + named files -> sha256
    { cat; local f; for f in "$@"; do echo "== $f"; cat "$TESTBED_DIR/$f"; done; } | sha256sum | cut -c1-16
}

stamp_of() { cat "$STAMPS/$1" 2>/dev/null || echo none; }

# run_stage NAME KEY: runs stage_NAME unless its stamp already holds KEY; prints the time taken.
run_stage() {
    local name=$1 key=$2 t0 dt
    if [ "$(stamp_of "$name")" = "$key" ]; then
        log "stage $name: cached ($key)"
        echo "stage $name cached 0" >> "$CACHE/stage-times.txt"
        return
    fi
    log "stage $name: building ($key)"
    t0=$(date +%s.%N)
    rm -f "$STAMPS/$name"
    "stage_$name"
    echo "$key" > "$STAMPS/$name"
    dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
    log "stage $name: took ${dt} s"
    echo "stage $name built $dt" >> "$CACHE/stage-times.txt"
}

key_deps() { { echo "deps $HOST_PACKAGES"; declare -f stage_deps; } | hash_inputs; }
key_fetch() {
    local k; k=$(kernel_abi)
    { echo "fetch $XEN_OLD_VERSION $k $GUEST_MODULES"; declare -f stage_fetch guest_modules; package_versions xen-hypervisor-4.17-amd64 "linux-image-$k"; } |
        hash_inputs
}
key_rootfs() {
    local k; k=$(kernel_abi)
    { echo "rootfs $DOM0_PACKAGES $k"; package_versions $DOM0_PACKAGES "linux-image-$k"; } |
        hash_inputs rootfs.sh
}
DOM0_FILES="dom0/softpage-agent.py dom0/softpage-agent.service dom0/configure.sh dom0/link-hosts
 dom0/softpage-link dom0/softpage-link.service hvc0-autologin.conf"
key_image() {
    # shellcheck disable=SC2086
    { echo "image $(stamp_of rootfs) $DOM0_IMG_SIZE"; declare -f stage_image; ssh_public_keys; } |
        hash_inputs $DOM0_FILES
}
key_trixie_rootfs() {
    # shellcheck disable=SC2086
    { echo "trixie_rootfs $TRIXIE_DOM0_PACKAGES"; trixie_sources; declare -f stage_trixie_rootfs guest_modules
      trixie_package_versions $TRIXIE_DOM0_PACKAGES; } | hash_inputs rootfs.sh
}
key_trixie_image() {
    # shellcheck disable=SC2086
    { echo "trixie_image $(stamp_of trixie_rootfs) $DOM0_IMG_SIZE"; declare -f stage_trixie_image stage_image
      ssh_public_keys; } | hash_inputs $DOM0_FILES
}

# ensure_ssh_keys: the keys of SSH_KEYS, made on first use (ssh-keygen, no passphrase).
ensure_ssh_keys() {
    [ -s "$SSH_KEYS/ssh_host_ed25519_key" ] && [ -s "$SSH_KEYS/id_ed25519" ] && return
    rm -rf "$SSH_KEYS.tmp"; mkdir -p "$SSH_KEYS.tmp"
    ssh-keygen -q -t ed25519 -N "" -C "softpage-testbed-host" -f "$SSH_KEYS.tmp/ssh_host_ed25519_key"
    ssh-keygen -q -t ed25519 -N "" -C "root@softpage-testbed" -f "$SSH_KEYS.tmp/id_ed25519"
    rm -rf "$SSH_KEYS"; mv "$SSH_KEYS.tmp" "$SSH_KEYS"
}
ssh_public_keys() { cat "$SSH_KEYS/ssh_host_ed25519_key.pub" "$SSH_KEYS/id_ed25519.pub" 2>/dev/null || true; }
key_distro_bookworm() {
    local packages; packages=$(distro_guest_packages bookworm)
    # shellcheck disable=SC2086
    { echo "distro_bookworm $packages $PG_PACKAGES $PG_SCALE"
      declare -f stage_distro_bookworm build_distro_guest distro_guest_packages add_postgresql
      package_versions $packages $PG_PACKAGES; } | hash_inputs rootfs.sh
}
key_distro_trixie() {
    local packages; packages=$(distro_guest_packages trixie)
    # shellcheck disable=SC2086
    { echo "distro_trixie $packages"; trixie_sources; declare -f stage_distro_trixie build_distro_guest distro_guest_packages
      trixie_package_versions $packages; } | hash_inputs rootfs.sh
}
key_app_data() { { echo "app_data $APP_DATA_MB $APP_FILE_KB"; declare -f stage_app_data; } | hash_inputs; }
key_data() { { echo "data $DATA_MB"; declare -f stage_data; } | hash_inputs guest/workload.c guest/say.h; }

stage_deps() {
    if [ "${SOFTPAGE_SKIP_APT:-0}" = 1 ]; then log "SOFTPAGE_SKIP_APT=1: not installing host packages"; return; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=900 update -qq
    local k; k=$(kernel_abi)
    [ -n "$k" ] || die "cannot resolve linux-image-amd64 to a kernel ABI"
    # shellcheck disable=SC2086
    apt-get install -o DPkg::Lock::Timeout=900 -y -qq --no-install-recommends $HOST_PACKAGES "linux-headers-$k" >/dev/null
}

stage_fetch() {
    local k debs boot
    k=$(kernel_abi); debs=$CACHE/debs; boot=$CACHE/boot
    rm -rf "$debs" "$boot"; mkdir -p "$debs/new" "$debs/old" "$boot"
    # apt-get download warns about the _apt sandbox when run as root: harmless.
    ( cd "$debs/new" && apt-get download -q xen-hypervisor-4.17-amd64 "linux-image-$k" 2>&1 ) | grep -v -i sandbox || true
    ( cd "$debs/old" && apt-get download -q "xen-hypervisor-4.17-amd64=$XEN_OLD_VERSION" 2>&1 ) | grep -v -i sandbox || true
    local x; x=$(mktemp -d)
    dpkg-deb -x "$(ls "$debs"/new/xen-hypervisor-4.17-amd64_*.deb)" "$x/new"
    dpkg-deb -x "$(ls "$debs"/old/xen-hypervisor-4.17-amd64_*.deb)" "$x/old"
    dpkg-deb -x "$(ls "$debs"/new/linux-image-"$k"_*.deb)" "$x/kernel"
    # QEMU's multiboot loader takes the 32-bit ELF, not the gzip.
    zcat "$x/new/boot/xen-4.17-amd64.gz" > "$boot/xen-4.17.7"
    zcat "$x/old/boot/xen-4.17-amd64.gz" > "$boot/xen-4.17.5"
    grep -q '^CONFIG_SHADOW_PAGING=y' "$x/old/boot/xen-4.17-amd64.config" ||
        die "pinned $XEN_OLD_VERSION has no shadow paging: PV live migration would not work"
    cp "$x/kernel/boot/vmlinuz-$k" "$boot/vmlinuz"
    # The guest is a busybox initramfs: it needs the block frontend as a module (console and
    # xenbus are built in). Decompress so busybox insmod can load it whatever the packaging.
    guest_modules "$x/kernel" "$k" "$boot/guest-modules"
    echo "$k" > "$boot/kernel-abi"
    rm -rf "$x"
    ls -l "$boot"
}

# guest_modules KERNEL_TREE ABI OUT: the modules the busybox guest loads (block frontend, ext4
# for the data disk, the crc32c that ext4 asks for at mount) with their dependencies, in a
# lib/modules tree of their own with a modules.dep, ready to copy into the guest initramfs.
GUEST_MODULES="xen_blkfront ext4 crc32c_generic"
guest_modules() {
    local tree=$1 k=$2 out=$3 wanted dep
    depmod -b "$tree" "$k"
    rm -rf "$out"; mkdir -p "$out/lib/modules/$k"
    wanted=$(for m in $GUEST_MODULES; do
        dep=$(awk -v m="$m" -F: '{n=$1; sub(".*/","",n); sub("[.]ko.*","",n); gsub("-","_",n)
              if (n==m) {print $1 $2; exit}}' "$tree/lib/modules/$k/modules.dep")
        [ -n "$dep" ] || die "module $m not found in linux-image-$k"
        echo "$dep"
    done | tr ' ' '\n' | grep . | sort -u)
    for dep in $wanted; do
        mkdir -p "$out/lib/modules/$k/$(dirname "$dep")"
        case "$dep" in
            *.xz) xz -dc "$tree/lib/modules/$k/$dep" > "$out/lib/modules/$k/${dep%.xz}" ;;
            *.zst) zstd -dc "$tree/lib/modules/$k/$dep" > "$out/lib/modules/$k/${dep%.zst}" ;;
            *) cp "$tree/lib/modules/$k/$dep" "$out/lib/modules/$k/$dep" ;;
        esac
    done
    depmod -b "$out" "$k"
    echo "guest modules: $(find "$out" -name '*.ko' | wc -l) files"
}

stage_rootfs() {
    MIRROR=$(debian_mirror) KERNEL_ABI=$(kernel_abi) ROOTFS=$ROOTFS DOM0_PACKAGES=$DOM0_PACKAGES \
        bash "$TESTBED_DIR/rootfs.sh"
}

# stage_image [ROOTFS IMAGE]: the dom0 disk image of a rootfs (default: the Debian 12 host's).
stage_image() {
    local rootfs=${1:-$ROOTFS} image=${2:-$DOM0_IMG} staging; staging=$(mktemp -d)
    # The agent and its configuration are small and change more often than the packages: they
    # go into a copy-on-write overlay of the rootfs, so changing them never re-runs debootstrap.
    mount_overlay "$staging" "$rootfs"
    ROOT="$staging/merged" TESTBED_DIR="$TESTBED_DIR" SSH_KEYS="$SSH_KEYS" bash "$TESTBED_DIR/dom0/configure.sh"
    rm -f "$image.tmp"
    mkfs.ext4 -q -F -L softpage-dom0 -d "$staging/merged" "$image.tmp" "$DOM0_IMG_SIZE"
    umount_overlay "$staging"
    mv "$image.tmp" "$image"
    du -h --apparent-size "$image"; du -h "$image"
}

# The Debian 13 host: trixie's dom0 with Xen 4.20 and Linux 6.12, whose kernel, modules and
# hypervisor go to $CACHE/boot/trixie/ (the 6.12 guests boot the same kernel).
stage_trixie_rootfs() {
    local boot=$CACHE/boot/trixie xen kernel abi
    MIRROR=$(debian_mirror) SUITE=trixie SOURCES="$(trixie_sources)" KERNEL_ABI="" ROOTFS=$ROOTFS_TRIXIE \
        DOM0_PACKAGES=$TRIXIE_DOM0_PACKAGES bash "$TESTBED_DIR/rootfs.sh"
    rm -rf "$boot"; mkdir -p "$boot"
    kernel=$(ls "$ROOTFS_TRIXIE"/boot/vmlinuz-* | sort -V | tail -1)
    abi=${kernel##*/vmlinuz-}
    cp "$kernel" "$boot/vmlinuz"
    echo "$abi" > "$boot/kernel-abi"
    xen=$(ls "$ROOTFS_TRIXIE"/boot/xen-4.20*-amd64.gz | head -1)
    zcat "$xen" > "$boot/xen"
    cp "${xen%.gz}.config" "$boot/xen.config"
    dpkg-query --admindir="$ROOTFS_TRIXIE/var/lib/dpkg" -W -f='${Version}\n' xen-hypervisor-4.20-amd64 > "$boot/xen-version"
    guest_modules "$ROOTFS_TRIXIE" "$abi" "$boot/guest-modules"
    ls -l "$boot"
}

stage_trixie_image() { stage_image "$ROOTFS_TRIXIE" "$DOM0_IMG_TRIXIE"; }

stage_data() {
    local build; build=$(mktemp -d)
    gcc -O2 -static -Wall -Wextra -o "$build/workload" "$TESTBED_DIR/guest/workload.c"
    mkdir -p "$build/files"
    "$build/workload" gendata "$build/files" "$DATA_MB"
    ( cd "$build/files" && sha256sum data-* > SHA256SUMS )
    rm -f "$CACHE/data.img"
    mkfs.ext4 -q -F -L softpage-data -d "$build/files" "$CACHE/data.img.tmp" "$(( DATA_MB + DATA_MB / 8 + 32 ))M"
    mv "$CACHE/data.img.tmp" "$CACHE/data.img"
    cp "$build/files/MANIFEST" "$CACHE/data.manifest"
    rm -rf "$build"
    du -h "$CACHE/data.img"
}

# distro_guest_packages RELEASE: what that release's distro guest installs, its kernel and headers
# included (Debian 12: the ABI the testbed's other guests and dom0 run).
distro_guest_packages() {
    case "$1" in
        bookworm) echo "$DISTRO_GUEST_PACKAGES nginx-light linux-image-$(kernel_abi) linux-headers-$(kernel_abi)" ;;
        # Debian 13 has no nginx-light: its nginx is as small (the modules are packages of their own)
        trixie) echo "$DISTRO_GUEST_PACKAGES nginx linux-image-amd64 linux-headers-amd64" ;;
        *) die "no distro guest for Debian release '$1'" ;;
    esac
}

# build_distro_guest RELEASE: the guest's root disk $CACHE/distro-RELEASE.img (ext4, the whole disk,
# a quarter free): its tree made by rootfs.sh as the dom0s' are (debootstrap minbase, then apt-get;
# no daemon starts in the chroot), then packed and removed.
build_distro_guest() {
    local release=$1 tree=$CACHE/distro-$1.tree image=$CACHE/distro-$1.img size_mb
    if [ "$release" = bookworm ]; then  # the host's own release
        MIRROR=$(debian_mirror) KERNEL_ABI=$(kernel_abi) ROOTFS=$tree DOM0_PACKAGES="$(distro_guest_packages "$release")" \
            bash "$TESTBED_DIR/rootfs.sh"
    else
        MIRROR=$(debian_mirror) SUITE=$release SOURCES="$(trixie_sources)" KERNEL_ABI="" ROOTFS=$tree \
            DOM0_PACKAGES="$(distro_guest_packages "$release")" bash "$TESTBED_DIR/rootfs.sh"
    fi
    ls "$tree"/boot/vmlinuz-* "$tree"/boot/initrd.img-* >/dev/null || die "distro guest $release has no kernel or initramfs"
    size_mb=$(( $(du -sm "$tree" | cut -f1) * 5 / 4 + 256 ))
    rm -f "$image" "$image.tmp"
    mkfs.ext4 -q -F -L "sp-$release" -d "$tree" "$image.tmp" "${size_mb}M"
    mv "$image.tmp" "$image"
    rm -rf "$tree"
    du -h --apparent-size "$image"; du -h "$image"
}
stage_distro_bookworm() { build_distro_guest bookworm; add_postgresql "$CACHE/distro-bookworm.img"; }

# add_postgresql IMAGE: PG_PACKAGES installed into a built distro guest's disk (grown for the
# database first), the cluster Debian's package makes started in the chroot, the database "bench"
# filled by `pgbench -i` at PG_SCALE (with wal_level=minimal for the fill alone: pgbench loads each
# table in the transaction that truncates it, so no WAL copy of the data needs the disk twice),
# the cluster stopped cleanly. Done on the image rather than in
# build_distro_guest so that the Debian 13 guest, which shares that function, is not rebuilt.
add_postgresql() {
    local image=$1
    truncate -s "+$(( PG_SCALE * 20 + 768 ))M" "$image"
    e2fsck -f -p "$image" >/dev/null
    resize2fs "$image" >/dev/null 2>&1
    mkdir -p "$PG_ROOT"
    mount -o loop "$image" "$PG_ROOT"
    trap unmount_pg_root EXIT
    printf '#!/bin/sh\nexit 101\n' > "$PG_ROOT/usr/sbin/policy-rc.d"
    chmod +x "$PG_ROOT/usr/sbin/policy-rc.d"
    mount -t proc proc "$PG_ROOT/proc"
    mount --bind /dev "$PG_ROOT/dev"
    mount --bind /dev/pts "$PG_ROOT/dev/pts"
    mount -t sysfs sys "$PG_ROOT/sys"
    # shellcheck disable=SC2086
    chroot "$PG_ROOT" /bin/sh -c "export DEBIAN_FRONTEND=noninteractive LC_ALL=C
        apt-get update -qq && apt-get install -y -qq --no-install-recommends $PG_PACKAGES >/dev/null &&
        apt-get clean &&
        pg_ctlcluster 15 main start -- -o '-c wal_level=minimal -c max_wal_senders=0' &&
        su postgres -c 'createdb bench && /usr/lib/postgresql/15/bin/pgbench -i -q -s $PG_SCALE bench' &&
        pg_ctlcluster 15 main stop"
    rm -f "$PG_ROOT/usr/sbin/policy-rc.d"
    du -sh "$PG_ROOT/var/lib/postgresql"
    unmount_pg_root
    trap - EXIT
    rmdir "$PG_ROOT"
}
PG_ROOT=$CACHE/distro-pg.mnt
unmount_pg_root() {
    local m
    if [ -f "$PG_ROOT/var/run/postgresql/15-main.pid" ]; then  # a fill that failed midway
        chroot "$PG_ROOT" pg_ctlcluster 15 main stop -m fast || true
    fi
    for m in dev/pts dev sys proc; do
        if mountpoint -q "$PG_ROOT/$m"; then umount -l "$PG_ROOT/$m"; fi
    done
    if mountpoint -q "$PG_ROOT"; then umount "$PG_ROOT"; fi
}
stage_distro_trixie() { build_distro_guest trixie; }

# The application's files: APP_DATA_MB of random bytes in APP_FILE_KB files (f00000, f00001, ...)
# and their SHA256SUMS on an ext4 disk of their own, app-data.img; SHA256SUMS is also kept beside
# (app-data.sha256) for the harness to check what the guest serves.
stage_app_data() {
    local build; build=$(mktemp -d)
    mkdir -p "$build/files"
    head -c "$(( APP_DATA_MB << 20 ))" /dev/urandom | (cd "$build/files" && split -a 5 -d -b "${APP_FILE_KB}K" - f)
    ( cd "$build/files" && sha256sum f* > SHA256SUMS )
    rm -f "$CACHE/app-data.img"
    mkfs.ext4 -q -F -L softpage-app -d "$build/files" "$CACHE/app-data.img.tmp" "$(( APP_DATA_MB + APP_DATA_MB / 8 + 32 ))M"
    mv "$CACHE/app-data.img.tmp" "$CACHE/app-data.img"
    cp "$build/files/SHA256SUMS" "$CACHE/app-data.sha256"
    rm -rf "$build"
    du -h "$CACHE/app-data.img"
}

# mount_overlay DIR [ROOTFS]: DIR/merged = copy-on-write view of a cached rootfs (default the
# Debian 12 host's; nothing is written to it).
mount_overlay() {
    mkdir -p "$1/upper" "$1/work" "$1/merged"
    mount -t overlay overlay -o "lowerdir=${2:-$ROOTFS},upperdir=$1/upper,workdir=$1/work" "$1/merged"
}
umount_overlay() {
    local m
    for m in dev/pts dev proc sys; do
        mountpoint -q "$1/merged/$m" && umount "$1/merged/$m"
    done
    umount "$1/merged"
    rm -rf "$1"
}

stage_payload() {
    OUT=${1:-$CACHE/payload.img} CACHE=$CACHE ROOTFS=$ROOTFS ROOTFS_TRIXIE=$ROOTFS_TRIXIE REPO_DIR=$REPO_DIR \
        TESTBED_DIR=$TESTBED_DIR \
        bash "$TESTBED_DIR/payload.sh"
}

print_env() {
    cat <<EOF
SOFTPAGE_TESTBED_CACHE=$CACHE
DOM0_IMG=$DOM0_IMG
DATA_IMG=$CACHE/data.img
XEN_4_17_7=$CACHE/boot/xen-4.17.7
XEN_4_17_5=$CACHE/boot/xen-4.17.5
VMLINUZ=$CACHE/boot/vmlinuz
DOM0_INITRD=$(ls "$ROOTFS"/boot/initrd.img-* 2>/dev/null | head -1)
TRIXIE_DOM0_IMG=$DOM0_IMG_TRIXIE
TRIXIE_XEN=$CACHE/boot/trixie/xen
TRIXIE_VMLINUZ=$CACHE/boot/trixie/vmlinuz
TRIXIE_DOM0_INITRD=$(ls "$ROOTFS_TRIXIE"/boot/initrd.img-* 2>/dev/null | head -1)
DISTRO_BOOKWORM_IMG=$CACHE/distro-bookworm.img
DISTRO_TRIXIE_IMG=$CACHE/distro-trixie.img
APP_DATA_IMG=$CACHE/app-data.img
EOF
}

main() {
    [ $# -ge 1 ] || { sed -n 2,20p "$0"; exit 2; }
    mkdir -p "$CACHE" "$STAMPS"
    [ "$(id -u)" = 0 ] || die "the testbed build needs root (debootstrap, chroot, mount)"
    case "$1" in
        env) print_env; return ;;
        payload) shift; local t0; t0=$(date +%s.%N); stage_payload "$@"
            log "payload: took $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"; return ;;
        all) set -- deps fetch rootfs image data trixie_rootfs trixie_image distro_bookworm distro_trixie app_data ;;
    esac
    # One build at a time per cache: two engineers running `make testbed` must not race.
    exec 9>"$CACHE/.build.lock"
    flock 9
    : > "$CACHE/stage-times.txt"
    ensure_ssh_keys
    local stage
    for stage in "$@"; do
        case "$stage" in
            deps|fetch|rootfs|image|data|trixie_rootfs|trixie_image|distro_bookworm|distro_trixie|app_data)
                [ "$stage" = deps ] || [ -n "$KERNEL_ABI_RESOLVED" ] || KERNEL_ABI_RESOLVED=$(kernel_abi)
                run_stage "$stage" "$("key_$stage")" ;;
            *) die "unknown stage '$stage'" ;;
        esac
    done
    log "stage times:"; sed 's/^/    /' "$CACHE/stage-times.txt" >&2
}

main "$@"
