#!/bin/bash
# test_ssh.sh TEST_HOST_BINARY - runs the ssh_* tests of test_host against three
# SSH hosts in network namespaces (tests/integration/netns.sh).
#
# Exits 77 (skipped; CTest's SKIP_RETURN_CODE) when not root or `ip netns` is
# unavailable. The namespaces are torn down on every exit path (trap), also
# when the test binary fails or crashes.
set -u
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:?usage: test_ssh.sh TEST_HOST_BINARY}
# shellcheck source=netns.sh
. "$here/netns.sh"

if ! hxt_netns_check; then
    echo "SKIPPED: the SSH host tests need root and 'ip netns' (see message above)"
    exit 77
fi

dir=$(mktemp -d /tmp/hxt-ssh.XXXXXX) || exit 1
child=
cleanup() {
    if [ -n "$child" ]; then kill -9 "$child" 2>/dev/null; wait "$child" 2>/dev/null; fi
    hxt_netns_down "$dir"
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

hxt_netns_up 3 "$dir" || { echo "FAILED: cannot set up the namespace hosts" >&2; exit 1; }
set -a
# shellcheck disable=SC1091
. "$dir/netns.env"
set +a
export HXT_NETNS_SH="$here/netns.sh"
export HXT_TEST_FILTER="${HXT_TEST_FILTER:-ssh_*}"
# In the background and waited for, so that a signal runs the traps at once.
"$bin" &
child=$!
wait "$child"
rc=$?
child=
if [ "$rc" -ne 0 ]; then
    for i in 1 2 3; do
        echo "--- sshd log of host $i:"; tail -n 20 "$dir/hosts/$i/sshd.log" 2>/dev/null
    done
fi
exit "$rc"
