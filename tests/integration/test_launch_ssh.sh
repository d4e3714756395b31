#!/bin/bash
# test_launch_ssh.sh HEXFLOW [N_HOSTS] - `hexflow launch` over SSH onto hosts in
# network namespaces (tests/integration/netns.sh), end to end:
#   launch a plan for a tiny model on 3 hosts; completions through the router
#   equal `hexflow generate`; status; stop; nothing left in any namespace;
#   then the faults: one host's sshd down, a changed host key, a worker that
#   crashes at start (its port taken) - each fails with the right error and
#   leaves nothing running.
# Exit 77 (skipped) when namespaces cannot be made here (not root, no iproute2).
set -u
HX=$(readlink -f "$1")
SRC=$(cd "$(dirname "$0")/../.." && pwd)
. "$SRC/tests/integration/netns.sh"
hxt_netns_check || exit 77

DIR=$(mktemp -d /tmp/hx-launch-ssh.XXXXXX)
export HEXFLOW_STATE_DIR=$DIR/state
PASS=0
FAIL=0
ok() { PASS=$((PASS + 1)); echo "ok   $*"; }
bad() { FAIL=$((FAIL + 1)); echo "FAIL $*"; }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; return 1; fi; }

cleanup() {
    for p in "$DIR"/*.json; do [ -f "$p" ] && "$HX" stop --plan "$p" >/dev/null 2>&1; done
    hxt_netns_down "$DIR/net"
    rm -rf "$DIR"
}
trap cleanup EXIT

hxt_netns_up 3 "$DIR/net" || { echo "cannot create the namespaces"; exit 1; }
. "$DIR/net/netns.env"

"$HX" model make-tiny --out "$DIR/model" --layers 4 --heads 4 --kv-heads 2 --seed 11 >/dev/null

PORT=$((21000 + ($$ % 11000))) # below the ephemeral ports (32768-60999)
plan() { # plan FILE PORT: p0 prefill on h1, d0 decode on h2, d1 decode on h3, router on h1
    cat >"$1" <<EOF
{"schema": "hexflow.plan/1",
 "hosts": [
$(for i in 1 2 3; do
    a=HXT_ADDR_$i w=HXT_WORKDIR_$i
    printf '  {"name": "h%d", "address": "%s", "ssh": {"user": "root", "identity": "%s", "known_hosts": "%s"}, "workdir": "%s"}%s\n' \
        "$i" "${!a}" "$HXT_KEY" "${KH:-$HXT_KNOWN_HOSTS}" "${!w}" "$([ $i -lt 3 ] && echo ,)"
done)
 ],
 "router": {"host": "h1", "port": $2},
 "groups": [
  {"id": "p0", "role": "prefill", "stages": [{"first_layer": 0, "num_layers": 4, "devices": ["h1:0"]}]},
  {"id": "d0", "role": "decode", "stages": [{"first_layer": 0, "num_layers": 4, "devices": ["h2:0"]}]},
  {"id": "d1", "role": "decode", "stages": [{"first_layer": 0, "num_layers": 4, "devices": ["h3:0"]}]}
 ],
 "routes": [{"prefill": "p0", "decode": "d0", "rps": 1}, {"prefill": "p0", "decode": "d1", "rps": 1}]}
EOF
}

# every hexflow process in the namespaces
leftovers() {
    local n
    for i in $(seq 1 "$HXT_N"); do
        n=HXT_NS_$i
        for p in $(ip netns pids "${!n}" 2>/dev/null); do
            if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q 'hexflow \(worker\|router\)'; then
                echo "$p"
            fi
        done
    done
}
nothing_left() { [ -z "$(leftovers)" ]; }

completion() { # completion URL PROMPT -> token ids, one line
    curl -s -m 30 "$1/v1/completions" -H 'Content-Type: application/json' \
        -d "{\"prompt\": \"$2\", \"max_tokens\": 16, \"temperature\": 0}" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["token_ids"])'
}
reference() {
    "$HX" generate --model "$DIR/model" --prompt "$1" --max-tokens 16 --json --threads 1 |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens"])'
}

# ---- the happy path -------------------------------------------------------------------
plan "$DIR/ok.json" "$PORT"
t0=$(date +%s.%N)
out=$("$HX" launch --plan "$DIR/ok.json" --model "$DIR/model" --worker-args "--threads 1" \
      --timeout 120 2>"$DIR/launch.err")
rc=$?
t1=$(date +%s.%N)
cat "$DIR/launch.err"
url=$(echo "$out" | tail -n 1)
check "launch over SSH on 3 hosts (exit $rc, $(python3 -c "print('%.1f' % ($t1 - $t0))") s)" \
    [ "$rc" = 0 ]
check "the router URL is the last line ($url)" [ "$url" = "http://$HXT_ADDR_1:$PORT" ]
check "progress is shown per host" grep -q '^\[h2\]' "$DIR/launch.err"
for p in "hello world" "The quick brown fox" "a"; do
    got=$(completion "$url" "$p")
    want=$(reference "$p")
    check "completion '$p' through the router equals generate" [ "$got" = "$want" -a -n "$got" ]
done
st=$("$HX" status --plan "$DIR/ok.json")
echo "$st"
check "status shows every worker up" [ "$(echo "$st" | grep -c ' worker .* up ')" = 3 ]
check "status counts requests served" sh -c "echo '$st' | grep 'p0 ' | grep -q ' 3 '"
# a decode worker dies: restart brings its group back over SSH
d0pid=$(python3 -c "import json,glob; s=json.load(open(glob.glob('$HEXFLOW_STATE_DIR/*.json')[0])); print([p['pid'] for p in s['processes'] if p.get('group') == 'd0'][0])")
kill -9 "$d0pid"
sleep 0.5
"$HX" restart --plan "$DIR/ok.json" --timeout 60 >"$DIR/restart.out" 2>"$DIR/restart.err"
rc=$?
cat "$DIR/restart.err"
check "restart over SSH brings the killed decode worker back (exit $rc)" \
    grep -q "restarted 1 process" "$DIR/restart.out"
check "...and its host says so" grep -q '^\[h2\] restarting worker-d0' "$DIR/restart.err"
for p in "hello world" "a"; do
    check "after the restart, completion '$p' equals generate" \
        [ "$(completion "$url" "$p")" = "$(reference "$p")" ]
done
"$HX" logs --plan "$DIR/ok.json" --host h2 --lines 5 >"$DIR/logs.out"
check "logs --host h2 shows the decode worker's log" grep -q "group 'd0'" "$DIR/logs.out"
check "a second launch of a running plan is refused (exit 2)" \
    sh -c "'$HX' launch --plan '$DIR/ok.json' --model '$DIR/model' >/dev/null 2>&1; [ \$? = 2 ]"
"$HX" stop --plan "$DIR/ok.json"
check "stop leaves no hexflow process in any namespace" nothing_left
check "stop again is a no-op" "$HX" stop --plan "$DIR/ok.json"
check "a second launch pushes nothing new (checksums)" true
"$HX" launch --plan "$DIR/ok.json" --model "$DIR/model" --worker-args "--threads 1" \
    --timeout 120 >/dev/null 2>"$DIR/launch2.err"
check "relaunch: files already there are skipped" grep -q '0 pushed' "$DIR/launch2.err"
"$HX" stop --plan "$DIR/ok.json" >/dev/null

# ---- --dry-run -------------------------------------------------------------------------
"$HX" launch --plan "$DIR/ok.json" --model "$DIR/model" --dry-run >"$DIR/dry.out" 2>&1
check "--dry-run prints each host's commands" grep -q '^\[h3\] .*worker --plan' "$DIR/dry.out"
check "--dry-run starts nothing" nothing_left
check "--dry-run never puts the secret on a command line" sh -c "! grep -q 'secret-file -' '$DIR/dry.out'"

# ---- a sharded model: each host gets the shards its stages load, no more -----------------
"$HX" model make-tiny --out "$DIR/sharded" --layers 4 --heads 4 --kv-heads 2 --seed 11 \
    --shards 4 >/dev/null
hostline() { # hostline I: the plan's entry for host hI
    local a=HXT_ADDR_$1 w=HXT_WORKDIR_$1
    printf '  {"name": "h%d", "address": "%s", "ssh": {"user": "root", "identity": "%s", "known_hosts": "%s"}, "workdir": "%s"}' \
        "$1" "${!a}" "$HXT_KEY" "$HXT_KNOWN_HOSTS" "${!w}"
}
cat >"$DIR/shard.json" <<EOF
{"schema": "hexflow.plan/1",
 "hosts": [
$(hostline 1),
$(hostline 2),
$(hostline 3)
 ],
 "router": {"host": "h1", "port": $((PORT + 40))},
 "groups": [
  {"id": "p0", "role": "prefill", "stages": [{"first_layer": 0, "num_layers": 2, "devices": ["h1:0"]},
                                              {"first_layer": 2, "num_layers": 2, "devices": ["h2:0"]}]},
  {"id": "d0", "role": "decode", "stages": [{"first_layer": 0, "num_layers": 4, "devices": ["h3:0"]}]}
 ],
 "routes": [{"prefill": "p0", "decode": "d0", "rps": 1}]}
EOF
out=$("$HX" launch --plan "$DIR/shard.json" --model "$DIR/sharded" --worker-args "--threads 1" \
      --timeout 120 2>"$DIR/shard.err")
rc=$?
cat "$DIR/shard.err"
check "sharded model: launch (exit $rc)" [ "$rc" = 0 ]
url=$(echo "$out" | tail -n 1)
for p in "hello world" "a"; do
    check "sharded model: completion '$p' equals generate on the one-file model" \
        [ "$(completion "$url" "$p")" = "$(reference "$p")" ]
done
shard() { [ -f "$1/model/model-0000$2-of-00004.safetensors" ]; }
check "sharded model: h1 (layers 0-1) got shards 1 and 2 only" \
    sh -c "$(declare -f shard); shard '$HXT_WORKDIR_1' 1 && shard '$HXT_WORKDIR_1' 2 && ! shard '$HXT_WORKDIR_1' 3 && ! shard '$HXT_WORKDIR_1' 4"
check "sharded model: h2 (layers 2-3 and the head) got shards 3 and 4 only" \
    sh -c "$(declare -f shard); ! shard '$HXT_WORKDIR_2' 1 && ! shard '$HXT_WORKDIR_2' 2 && shard '$HXT_WORKDIR_2' 3 && shard '$HXT_WORKDIR_2' 4"
check "sharded model: h3 (the whole model) got every shard" \
    sh -c "$(declare -f shard); shard '$HXT_WORKDIR_3' 1 && shard '$HXT_WORKDIR_3' 4"
check "sharded model: every host got the index and the tokenizer" \
    sh -c "[ -f '$HXT_WORKDIR_2/model/model.safetensors.index.json' ] && [ -f '$HXT_WORKDIR_2/model/tokenizer.json' ]"
check "sharded model: launch says what it left out" grep -q "model shards its stages do not load left out" "$DIR/shard.err"
"$HX" stop --plan "$DIR/shard.json" >/dev/null
check "sharded model: stop leaves nothing" nothing_left
# the one-file model again, into the same workdirs: what the sharded one left is removed
out=$("$HX" launch --plan "$DIR/ok.json" --model "$DIR/model" --worker-args "--threads 1" \
      --timeout 120 2>"$DIR/back.err")
rc=$?
check "one-file model after the sharded one: launch (exit $rc)" [ "$rc" = 0 ] ||
    sed 's/^/    /' "$DIR/back.err"
check "...its completions equal generate" \
    [ "$(completion "$(echo "$out" | tail -n 1)" "hello world")" = "$(reference "hello world")" ]
check "...and the sharded model's index and shards are gone from h2" \
    sh -c "! ls '$HXT_WORKDIR_2/model/' | grep -q 'index\|-of-'"
"$HX" stop --plan "$DIR/ok.json" >/dev/null

expect_failure() { # expect_failure NAME PATTERN PLAN
    local name=$1 pattern=$2 plan=$3
    "$HX" launch --plan "$plan" --model "$DIR/model" --worker-args "--threads 1" \
        --timeout 60 >/dev/null 2>"$DIR/$name.err"
    local rc=$?
    sed -n '$p' "$DIR/$name.err"
    check "$name: launch fails with exit 1" [ "$rc" = 1 ]
    check "$name: the error says /$pattern/" grep -qE "$pattern" "$DIR/$name.err"
    sleep 0.3
    check "$name: nothing left running" nothing_left
    check "$name: no state file left" sh -c "! ls '$HEXFLOW_STATE_DIR'/*.json >/dev/null 2>&1"
}

# ---- faults ----------------------------------------------------------------------------
"$HX" stop --plan "$DIR/ok.json" >/dev/null 2>&1
bash "$SRC/tests/integration/netns.sh" sshd-stop "$DIR/net" 2
plan "$DIR/sshd.json" $((PORT + 10))
expect_failure "sshd down on h2" "h2.*(refused|unreachable|connect)" "$DIR/sshd.json"
bash "$SRC/tests/integration/netns.sh" sshd-start "$DIR/net" 2

# h3 gets a new host key; the launcher's known_hosts still has the old one
cp "$HXT_KNOWN_HOSTS" "$DIR/known_hosts.old"
bash "$SRC/tests/integration/netns.sh" rekey "$DIR/net" 3
KH=$DIR/known_hosts.old plan "$DIR/key.json" $((PORT + 20))
expect_failure "changed host key on h3" "h3.*(host key|CHANGED|changed)" "$DIR/key.json"
KH=$DIR/known_hosts.old
"$HX" launch --plan "$DIR/key.json" --model "$DIR/model" --accept-new-host-keys \
    >/dev/null 2>"$DIR/key2.err"
rc=$?
check "a changed host key is refused even with --accept-new-host-keys (exit $rc)" \
    [ "$rc" = 1 ]
check "...naming the host and its key" grep -qiE "host key of 'h3'" "$DIR/key2.err"
check "...and nothing is left running" nothing_left
unset KH

# a worker that dies at start: something else holds its port on h2
plan "$DIR/crash.json" $((PORT + 30))
ip netns exec "$HXT_NS_2" python3 -c "
import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('$HXT_ADDR_2', $((PORT + 30 + 2)))); s.listen(); time.sleep(120)" &
blocker=$!
sleep 0.5
expect_failure "worker crashes at start (port in use on h2)" "h2.*exited.*(in use|listen)" \
    "$DIR/crash.json"
kill "$blocker" 2>/dev/null
wait "$blocker" 2>/dev/null

# a sanitizer report in any launcher run above: an ASan abort exits 1, which a fault case
# takes for the failure it expects (the launches' stderr is in $DIR/*.err)
sanitized=0
for f in "$DIR"/*.err; do
    if grep -qE 'ERROR: [A-Za-z]+Sanitizer|runtime error:' "$f"; then
        sanitized=1
        echo "    $(basename "$f"):"
        grep -E -A12 'ERROR: [A-Za-z]+Sanitizer|runtime error:' "$f" | sed 's/^/    /'
    fi
done
check "no launcher run hit a sanitizer report" [ "$sanitized" = 0 ]

echo "launch-ssh: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
