#!/bin/sh
# Installs the Debian packages hexflow builds and tests with.
# Idempotent: does nothing (and needs no network) when everything is present.
set -eu

PKGS="build-essential cmake pkg-config
libfyaml-dev libjansson-dev libglpk-dev libmetis-dev
liblapacke-dev libopenblas-dev libhwloc-dev libssh2-1-dev
libmicrohttpd-dev libcmocka-dev libssl-dev
python3 python3-numpy openssh-server openssh-client iproute2 procps curl"

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

echo "install-deps: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# shellcheck disable=SC2086
$SUDO apt-get install -y -q --no-install-recommends $missing
