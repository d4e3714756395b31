#!/bin/bash
# launch_bench.sh HEXFLOW [N ...] - time from `hexflow launch` to healthy for N
# SSH hosts in network namespaces (default 3 8 16), each running one worker of
# a tiny model (a prefill group on the first host, a decode group on each of
# the others, the router on the first). Prints one line per N: the first
# launch (everything pushed) and a second one (every file already there).
# Needs root (tests/integration/netns.sh); prints numbers, asserts nothing.
set -u
HX=$(readlink -f "$1")
shift
SIZES=${*:-3 8 16}
SRC=$(cd "$(dirname "$0")/.." && pwd)
. "$SRC/tests/integration/netns.sh"
hxt_netns_check || exit 77
DIR=$(mktemp -d /tmp/hx-launch-bench.XXXXXX)
export HEXFLOW_STATE_DIR=$DIR/state
NET=
trap 'for p in "$DIR"/plan-*.json; do [ -f "$p" ] && "$HX" stop --plan "$p" >/dev/null 2>&1; done; [ -n "$NET" ] && hxt_netns_down "$NET"; rm -rf "$DIR"' EXIT
"$HX" model make-tiny --out "$DIR/model" --layers 4 --heads 4 --kv-heads 2 >/dev/null

now() { date +%s.%N; }
printf '%-6s %14s %14s\n' hosts "first (s)" "again (s)"
for n in $SIZES; do
    [ -n "${NET:-}" ] && hxt_netns_down "$NET"
    NET=$DIR/net-$n
    hxt_netns_up "$n" "$NET" >/dev/null || { echo "cannot make $n namespaces"; exit 1; }
    . "$NET/netns.env"
    plan=$DIR/plan-$n.json
    {
        echo '{"schema": "hexflow.plan/1", "hosts": ['
        for i in $(seq 1 "$n"); do
            a=HXT_ADDR_$i w=HXT_WORKDIR_$i
            printf '{"name": "h%d", "address": "%s", "ssh": {"user": "root", "identity": "%s", "known_hosts": "%s"}, "workdir": "%s"}%s\n' \
                "$i" "${!a}" "$HXT_KEY" "$HXT_KNOWN_HOSTS" "${!w}" "$([ "$i" -lt "$n" ] && echo ,)"
        done
        echo '], "router": {"host": "h1", "port": 24000}, "groups": ['
        echo '{"id": "p0", "role": "prefill", "stages": [{"first_layer": 0, "num_layers": 4, "devices": ["h1:0"]}]}'
        for i in $(seq 2 "$n"); do
            printf ',{"id": "d%d", "role": "decode", "stages": [{"first_layer": 0, "num_layers": 4, "devices": ["h%d:0"]}]}\n' "$i" "$i"
        done
        echo '], "routes": ['
        for i in $(seq 2 "$n"); do
            printf '{"prefill": "p0", "decode": "d%d"}%s\n' "$i" "$([ "$i" -lt "$n" ] && echo ,)"
        done
        echo ']}'
    } >"$plan"
    t0=$(now)
    "$HX" launch --plan "$plan" --model "$DIR/model" --worker-args "--threads 1" >/dev/null 2>"$DIR/err" ||
        { cat "$DIR/err"; exit 1; }
    t1=$(now)
    "$HX" stop --plan "$plan" >/dev/null 2>&1
    t2=$(now)
    "$HX" launch --plan "$plan" --model "$DIR/model" --worker-args "--threads 1" >/dev/null 2>"$DIR/err" ||
        { cat "$DIR/err"; exit 1; }
    t3=$(now)
    "$HX" stop --plan "$plan" >/dev/null 2>&1
    python3 -c "print('%-6d %14.2f %14.2f' % ($n, $t1 - $t0, $t3 - $t2))"
done
