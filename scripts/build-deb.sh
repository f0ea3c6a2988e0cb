#!/bin/sh
# make deb: build the Debian packages softpage (dom0) and softpage-dkms (guests) for this
# machine's Debian with dpkg-buildpackage, then check them with lintian.
#
#   scripts/build-deb.sh OUTDIR
#   scripts/build-deb.sh --deps     only install what the build needs (make setup does)
#
# The build runs in a copy of the checkout (its tracked files and new files git does not ignore;
# outside a git checkout, as in an unpacked source tree, every file), so no build product lands
# in the checkout. OUTDIR receives the .debs, the .buildinfo and the
# .changes; the copy is removed after a successful build. Any lintian error or warning fails.
# Missing build dependencies are installed with apt-get (as root).
set -eu

top=$(cd "$(dirname "$0")/.." && pwd)

# install_build_deps: debian/control's Build-Depends as the field says them (apt-get satisfy
# reads the relations, virtual packages included), and lintian.
install_build_deps() {
    if ! dpkg-checkbuilddeps "$top/debian/control" >/dev/null 2>&1; then
        if [ "$(id -u)" != 0 ]; then
            echo "build-deb: unmet build dependencies (dpkg-checkbuilddeps debian/control): run it as root" >&2
            exit 1
        fi
        echo "build-deb: installing the build dependencies of debian/control"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get satisfy -y -qq --no-install-recommends \
            "$(build_depends)" >/dev/null
    fi
    "$top/scripts/install-debs.sh" build-deb lintian
}

# build_depends: the Build-Depends field of debian/control's source paragraph, on one line.
build_depends() {
    awk '/^Build-Depends:/ { field = 1; sub(/^Build-Depends:/, ""); print; next }
         field && /^[ \t]/ { print; next }
         { field = 0 }' "$top/debian/control" | tr -s ' \n' ' '
}

"$top/scripts/install-debs.sh" build-deb build-essential dpkg-dev
install_build_deps
if [ "${1:-}" = --deps ]; then
    exit 0
fi
out=${1:?usage: $0 OUTDIR | --deps}

version=$(dpkg-parsechangelog -l "$top/debian/changelog" -S Version)
tree=$out/softpage-$version
rm -rf "$out"
mkdir -p "$tree"
if command -v git >/dev/null && git -C "$top" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$top" && git ls-files -z --cached --others --exclude-standard) |
        tar -C "$top" --null --verbatim-files-from --files-from=- --ignore-failed-read -cf - |
        tar -C "$tree" -xf -
else
    tar -C "$top" --exclude=./.git --exclude=./.venv -cf - . | tar -C "$tree" -xf -
fi

# Debian's python3 builds Debian's package: a python3.11 earlier in PATH (pyenv, a venv) would
# be the one pybuild runs.
started=$(date +%s)
(cd "$tree" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b)
echo "build-deb: dpkg-buildpackage took $(($(date +%s) - started)) s"
rm -rf "$tree"

changes=$(ls "$out"/softpage_"$version"_*.changes)
lintian --fail-on error,warning --display-info "$changes"
echo "build-deb: lintian: no errors or warnings"
ls -l "$out"
