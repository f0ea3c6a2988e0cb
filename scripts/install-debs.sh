#!/bin/sh
# install-debs.sh WHO PACKAGE...: install the Debian packages of the list that are missing, with
# apt-get (as root; `apt-get update` first). WHO names the caller in its messages. Idempotent:
# nothing is run when every package is installed.
set -eu
who=$1
shift

missing=""
for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
        missing="$missing $package"
done
if [ -z "$missing" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "$who: these Debian packages are missing:$missing" >&2
    echo "$who: run it as root (or install them) first" >&2
    exit 1
fi
echo "$who: installing$missing"
apt-get update -qq
# shellcheck disable=SC2086  # one word per package
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
