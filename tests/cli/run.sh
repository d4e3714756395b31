#!/usr/bin/env bash
# End-to-end tests of the hexflow command line: exit statuses, messages, outputs.
# usage: tests/cli/run.sh HEXFLOW SOURCE_DIR
set -u
HX=${1:?usage: run.sh HEXFLOW SOURCE_DIR}
SRC=${2:?usage: run.sh HEXFLOW SOURCE_DIR}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
pass=0
fail=0

ok() { pass=$((pass + 1)); echo "ok - $1"; }
not_ok() { fail=$((fail + 1)); echo "not ok - $1"; shift; for l in "$@"; do echo "#   $l"; done; }

# expect NAME STATUS NEEDLE -- CMD...: runs CMD, checks exit status and that
# stdout+stderr contains NEEDLE (skipped when NEEDLE is empty).
expect() {
    local name=$1 want=$2 needle=$3
    shift 4
    local out rc
    out=$("$@" 2>&1)
    rc=$?
    if [ "$rc" -ne "$want" ]; then
        not_ok "$name" "exit status $rc, want $want" "output: $(echo "$out" | head -5)"
    elif [ -n "$needle" ] && ! grep -qF -- "$needle" <<<"$out"; then
        not_ok "$name" "missing: $needle" "output: $(echo "$out" | head -5)"
    else
        ok "$name"
    fi
}

# --- the command ----------------------------------------------------------
expect "help" 0 "usage: hexflow" -- "$HX" --help
expect "no arguments" 2 "usage: hexflow" -- "$HX"
expect "version" 0 "hexflow 0." -- "$HX" --version
expect "version lists backends" 0 "backends: cpu" -- "$HX" --version
expect "unknown command" 2 "'frobnicate' is not a hexflow command" -- "$HX" frobnicate
expect "unknown global option" 2 "unknown option '--nope'" -- "$HX" --nope
for c in inventory discover model; do
    expect "$c --help" 0 "usage: hexflow $c" -- "$HX" "$c" --help
done

# --- inventory ------------------------------------------------------------
for f in mixed h100-32 localhost; do
    expect "inventory check $f" 0 ": ok:" -- "$HX" inventory check "$SRC/inventories/$f.yaml"
    expect "inventory show $f" 0 "devices" -- "$HX" inventory show "$SRC/inventories/$f.yaml"
done
expect "inventory check counts" 0 "8 hosts, 48 devices (16 x H100-SXM, 16 x A100-80G, 16 x L40S)" \
    -- "$HX" inventory check "$SRC/inventories/mixed.yaml"
expect "inventory show bandwidth matrix" 0 "bandwidth between hosts" \
    -- "$HX" inventory show "$SRC/inventories/mixed.yaml"
expect "inventory show --json" 0 '"devices": 48' -- "$HX" inventory show --json "$SRC/inventories/mixed.yaml"
if "$HX" inventory show "$SRC/inventories/mixed.yaml" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["totals"]["devices"]==48 and len(d["hosts"])==8 and len(d["bandwidth"]["bytes_per_s"])==8' 2>"$TMP/py.err"; then
    ok "inventory show --json is valid JSON with hosts and bandwidth"
else
    not_ok "inventory show --json is valid JSON with hosts and bandwidth" "$(cat "$TMP/py.err")"
fi
expect "inventory missing action" 2 "missing action" -- "$HX" inventory
expect "inventory unknown action" 2 "unknown action 'lint'" -- "$HX" inventory lint x.yaml
expect "inventory missing file arg" 2 "missing FILE" -- "$HX" inventory check
expect "inventory unknown option" 2 "unknown option" -- "$HX" inventory check --frob "$SRC/inventories/mixed.yaml"
expect "inventory missing file" 2 "cannot open inventory '$TMP/none.yaml': no such file" \
    -- "$HX" inventory check "$TMP/none.yaml"

# Each malformed inventory: exit 2 and a located message.
bad() {
    local name=$1 needle=$2 text=$3
    printf '%s' "$text" >"$TMP/bad.yaml"
    expect "rejects $name" 2 "$needle" -- "$HX" inventory check "$TMP/bad.yaml"
}
H='hosts:
  - name: a
    address: 10.0.0.1
'
bad "yaml syntax" "$TMP/bad.yaml:3:15: yaml: " "hosts:
  - name: a
    address: x: y
"
bad "not a mapping" "the document is a list" "- 1
- 2
"
bad "unknown gpu type" "$TMP/bad.yaml:4:18: hosts[0].gpus.type: unknown GPU type 'H10'; did you mean H100-SXM" \
    "${H}    gpus: {type: H10, count: 8}
"
bad "zero count" "hosts[0].gpus.count: '0' is not a positive whole number" "${H}    gpus: {type: L4, count: 0}
"
bad "duplicate host" "duplicate host name 'a'" "${H}    gpus: {type: L4, count: 1}
  - {name: a, address: b, gpus: {type: L4, count: 1}}
"
bad "malformed unit" "hosts[0].nic.bandwidth: '100Gbx' is not a bandwidth" "${H}    gpus: {type: L4, count: 1}
    nic: {bandwidth: 100Gbx}
"
bad "link to unknown host" "network.links[0].b: unknown host 'zz'" "${H}    gpus: {type: L4, count: 1}
network:
  links:
    - {a: a, b: zz, bandwidth: 10Gb/s}
"
bad "missing address" "hosts[0].address: missing" "hosts:
  - name: a
    gpus: {type: L4, count: 1}
"
printf 'hosts:\n  - name: \x00\x01\x02\n' >"$TMP/bin.yaml"
expect "rejects binary garbage" 2 "not a text file" -- "$HX" inventory check "$TMP/bin.yaml"
head -c 4096 /dev/urandom >"$TMP/rand.yaml"
expect "rejects random bytes" 2 "$TMP/rand.yaml:" -- "$HX" inventory check "$TMP/rand.yaml"
expect "reports error count" 2 "has 1 error" -- "$HX" inventory check "$TMP/bad.yaml"

# --- discover ---------------------------------------------------------------
if "$HX" discover >"$TMP/disc.yaml" 2>"$TMP/disc.err"; then
    ok "discover runs"
    expect "discover output passes inventory check" 0 ": ok:" -- "$HX" inventory check "$TMP/disc.yaml"
else
    not_ok "discover runs" "$(cat "$TMP/disc.err")"
fi
if "$HX" discover --json | python3 -c 'import json,sys; json.load(sys.stdin)' 2>"$TMP/py.err"; then
    ok "discover --json is valid JSON"
else
    not_ok "discover --json is valid JSON" "$(cat "$TMP/py.err")"
fi
expect "discover unknown option" 2 "unknown option" -- "$HX" discover --frob

# --- model ---------------------------------------------------------------
for m in llama-2-7b llama-2-13b llama-2-70b llama-3-8b llama-3-70b mistral-7b qwen2.5-72b opt-30b; do
    expect "model show $m" 0 "$m" -- "$HX" model show "$m"
done
expect "model show 70b parameters" 0 "68.98" -- "$HX" model show llama-2-70b
expect "model show 70b kv bytes" 0 "327680" -- "$HX" model show llama-2-70b --json
expect "model show dir" 0 "llama" -- "$HX" model show "$SRC/models/llama-2-7b"
expect "model unknown" 2 "unknown model 'llama-9'" -- "$HX" model show llama-9
expect "model unknown option" 2 "unknown option" -- "$HX" model show llama-2-7b --frob
expect "model missing name" 2 "" -- "$HX" model show
if "$HX" model show llama-2-70b --json | python3 -c 'import json,sys; json.load(sys.stdin)' 2>"$TMP/py.err"; then
    ok "model show --json is valid JSON"
else
    not_ok "model show --json is valid JSON" "$(cat "$TMP/py.err")"
fi

echo "cli: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
