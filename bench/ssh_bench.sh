#!/bin/bash
# ssh_bench.sh SSH_BENCH_BINARY [REPEAT] - opens SSH sessions to 3, 8 and 16
# network-namespace hosts (tests/integration/netns.sh) in parallel and runs
# `true` on each; prints the times. Needs root and `ip netns`.
#   cmake --build BUILD --target ssh_bench && bench/ssh_bench.sh BUILD/ssh_bench
set -u
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:?usage: ssh_bench.sh SSH_BENCH_BINARY [REPEAT]}
repeat=${2:-7}
. "$here/../tests/integration/netns.sh"
hxt_netns_check || exit 77
dir=$(mktemp -d /tmp/hxt-bench.XXXXXX) || exit 1
trap 'hxt_netns_down "$dir"; rm -rf "$dir"' EXIT
trap 'exit 130' INT TERM HUP
hxt_netns_up 16 "$dir" || exit 1
. "$dir/netns.env"
addrs=()
for i in $(seq 1 16); do v="HXT_ADDR_$i"; addrs+=("${!v}"); done
for n in 3 8 16; do
    for mode in "" --sequential; do
        "$bin" --key "$HXT_KEY" --known-hosts "$HXT_KNOWN_HOSTS" --user root \
            --repeat "$repeat" $mode "${addrs[@]:0:$n}" | tail -n 1
    done
done
