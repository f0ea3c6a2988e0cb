#!/bin/sh
# Make Debian's verify-stream-v2 (Xen 4.17 tools/python/scripts) usable by the
# tests without installing xen-utils-4.17, whose dependencies would pull the
# whole Xen toolstack into the host.  The verifier itself is stdlib-only Python.
#
# Usage: tests/tools/fetch-verify-stream-v2.sh
# Prints the extraction root R on stdout; the verifier is then
#   PYTHONPATH=R/usr/lib/xen-4.17/lib/python python3 R/usr/lib/xen-4.17/bin/verify-stream-v2
# The cache lives in $SOFTPAGE_TOOLS_CACHE (default ~/.cache/softpage) and is
# reused on later runs.
set -eu

package=xen-utils-4.17
cache=${SOFTPAGE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/softpage}
root=$cache/$package
verifier=usr/lib/xen-4.17/bin/verify-stream-v2

if [ -f "$root/$verifier" ]; then
	echo "$root"
	exit 0
fi

mkdir -p "$cache/debs"
cd "$cache/debs"
# A fresh machine may have no package lists yet; update only when needed.
if ! apt-get download "$package" >&2; then
	apt-get update >&2
	apt-get download "$package" >&2
fi
deb=$(ls -t "$package"_*.deb | head -n 1)

# Extract beside the final place and rename, so an interrupted run never
# leaves a half-extracted tree that the check above would accept.
rm -rf "$root.partial"
mkdir -p "$root.partial"
dpkg-deb -x "$deb" "$root.partial"
test -f "$root.partial/$verifier"
rm -rf "$root"
mv "$root.partial" "$root"
echo "$root"
