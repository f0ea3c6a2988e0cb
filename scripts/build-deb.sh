#!/bin/sh
# make deb: build the Debian packages softpage (dom0) and softpage-dkms (guests) for this
# machine's Debian with dpkg-buildpackage, then check them with lintian.
#
#   scripts/build-deb.sh OUTDIR
#
# The build runs in a copy of the checkout (its tracked files and new files git does not ignore),
# so no build product lands in the checkout. OUTDIR receives the .debs, the .buildinfo and the
# .changes; the copy is removed after a successful build. Any lintian error or warning fails.
# Missing build dependencies are installed with apt-get (as root).
set -eu

out=${1:?usage: $0 OUTDIR}
top=$(git rev-parse --show-toplevel)
build_depends="debhelper dh-python dh-dkms pybuild-plugin-pyproject python3-all-dev
               python3-setuptools python3-cffi python3-numpy libxen-dev lintian"

missing=""
for package in $build_depends; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
        missing="$missing $package"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "build-deb: these Debian packages are missing:$missing" >&2
        echo "build-deb: run 'make deb' as root (or install them) first" >&2
        exit 1
    fi
    echo "build-deb: installing$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

version=$(dpkg-parsechangelog -l "$top/debian/changelog" -S Version)
tree=$out/softpage-$version
rm -rf "$out"
mkdir -p "$tree"
(cd "$top" && git ls-files -z --cached --others --exclude-standard) |
    tar -C "$top" --null --verbatim-files-from --files-from=- --ignore-failed-read -cf - |
    tar -C "$tree" -xf -

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
