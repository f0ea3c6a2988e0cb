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

# shellcheck disable=SC2086  # one word per package
"$top/scripts/install-debs.sh" build-deb $build_depends

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
