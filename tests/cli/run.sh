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
for c in inventory discover model plan simulate whatif generate launch status stop logs worker router; do
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

# --- plan ----------------------------------------------------------------
INV="$SRC/inventories/mixed.yaml"
expect "plan --help" 0 "usage: hexflow plan" -- "$HX" plan --help
expect "plan mixed" 0 "throughput" -- "$HX" plan --inventory "$INV" --model llama-2-70b
expect "plan shows routes" 0 "PREFILL  DECODE" -- "$HX" plan --inventory "$INV" --model llama-2-70b
expect "plan shows bottleneck" 0 "bottleneck" -- "$HX" plan --inventory "$INV" --model llama-2-70b
expect "plan shows cost" 0 "per million output tokens" -- "$HX" plan --inventory "$INV" --model llama-2-70b
if "$HX" plan --inventory "$INV" --model llama-2-70b --json --out "$TMP/plan.json" >"$TMP/plan-stdout.json" 2>"$TMP/plan.err" &&
    python3 - "$TMP/plan.json" "$TMP/plan-stdout.json" <<'PY' 2>"$TMP/py.err"
import json, sys
a = json.load(open(sys.argv[1])); b = json.load(open(sys.argv[2]))
assert a["schema"] == "hexflow.plan/1"
for k in ("model", "workload", "hosts", "router", "groups", "routes", "throughput", "cost", "search"):
    assert k in a, k
assert a["router"]["host"] in [h["name"] for h in a["hosts"]]
seen = set()
for g in a["groups"]:
    nxt = 0
    for st in g["stages"]:
        assert st["first_layer"] == nxt; nxt += st["num_layers"]
        for d in st["devices"]:
            assert d not in seen; seen.add(d)
    assert nxt == a["model"]["num_layers"]
rps = sum(r["rps"] for r in a["routes"]) + sum(g["capacity_rps"] for g in a["groups"] if g["role"] == "both")
assert abs(rps - a["throughput"]["rps"]) < 1e-6 * max(1, rps)
a["search"].pop("seconds"); b["search"].pop("seconds")
assert a == b
PY
then
    ok "plan --json --out writes a valid plan (devices once, layers covered, routes sum)"
else
    not_ok "plan --json --out writes a valid plan" "$(cat "$TMP/plan.err" "$TMP/py.err")"
fi
for s in colocated homogeneous; do
    expect "plan --strategy $s" 0 "strategy $s" -- "$HX" plan --inventory "$INV" --model llama-2-70b --strategy $s
done
cat >"$TMP/small.yaml" <<'YAML'
hosts:
  - {name: a, address: 10.0.0.1, gpus: {type: L40S, count: 4}, intra: {kind: pcie}}
  - {name: b, address: 10.0.0.2, gpus: {type: A100-80G, count: 2}, intra: {kind: nvlink}}
YAML
expect "plan --strategy exact" 0 "strategy exact" -- "$HX" plan --inventory "$TMP/small.yaml" --model llama-2-13b --strategy exact
expect "plan exact too big" 2 "at most 16 devices" -- "$HX" plan --inventory "$INV" --model llama-2-7b --strategy exact
expect "plan localhost" 0 "throughput" -- "$HX" plan --inventory "$SRC/inventories/localhost.yaml" --model "$SRC/tests/data/tiny-config.json" --slo-ttft 10 --slo-tpot 1
expect "plan missing inventory" 2 "missing --inventory" -- "$HX" plan --model llama-2-7b
expect "plan missing model" 2 "missing --model" -- "$HX" plan --inventory "$INV"
expect "plan unknown model" 2 "unknown model 'llama-9'" -- "$HX" plan --inventory "$INV" --model llama-9
expect "plan model too big" 2 "needs" -- "$HX" plan --inventory "$SRC/inventories/localhost.yaml" --model llama-2-70b
expect "plan bad strategy" 2 "unknown strategy 'best'" -- "$HX" plan --inventory "$INV" --model llama-2-7b --strategy best
expect "plan bad rate" 2 "--rate: 'fast' is not a number" -- "$HX" plan --inventory "$INV" --model llama-2-7b --rate fast
expect "plan bad slo" 2 "--slo-ttft" -- "$HX" plan --inventory "$INV" --model llama-2-7b --slo-ttft -1
expect "plan unknown option" 2 "unknown option" -- "$HX" plan --inventory "$INV" --model llama-2-7b --frob
expect "plan bad inventory" 2 "has 1 error" -- "$HX" plan --inventory "$TMP/bad.yaml" --model llama-2-7b
expect "plan unreachable SLO" 2 "no replica" -- "$HX" plan --inventory "$INV" --model llama-2-70b --slo-tpot 0.0001
printf 'input_tokens: 1024\noutput_tokens: 64\nslo: {ttft: 3s, tpot: 80ms}\n' >"$TMP/wl.yaml"
expect "plan --workload" 0 "1024 input / 64 output tokens" -- "$HX" plan --inventory "$INV" --model llama-2-13b --workload "$TMP/wl.yaml"
printf 'input_tokens: many\n' >"$TMP/badwl.yaml"
expect "plan bad workload" 2 "$TMP/badwl.yaml:1:15: input_tokens: 'many' is not a token count" -- "$HX" plan --inventory "$INV" --model llama-2-13b --workload "$TMP/badwl.yaml"
expect "plan --out to a missing dir" 1 "cannot write" -- "$HX" plan --inventory "$INV" --model llama-2-13b --out "$TMP/no/such/dir/plan.json"
[ ! -e "$TMP/no/such/dir/plan.json" ] && ok "nothing half-written" || not_ok "nothing half-written"

# --- simulate --------------------------------------------------------------
"$HX" plan --inventory "$INV" --model llama-2-13b --out "$TMP/p13.json" >/dev/null 2>&1
expect "simulate --help" 0 "usage: hexflow simulate" -- "$HX" simulate --help
expect "simulate" 0 "SLO met" -- "$HX" simulate --plan "$TMP/p13.json" --requests 3000
if "$HX" simulate --plan "$TMP/p13.json" --requests 3000 --json >"$TMP/s1.json" 2>"$TMP/s.err" &&
    "$HX" simulate --plan "$TMP/p13.json" --requests 3000 --json >"$TMP/s2.json" 2>>"$TMP/s.err" &&
    python3 - "$TMP/s1.json" "$TMP/s2.json" <<'PY' 2>"$TMP/py.err"
import json, sys
a = json.load(open(sys.argv[1])); b = json.load(open(sys.argv[2]))
for k in ("throughput_rps", "slo_attainment", "ttft_s", "tpot_s", "groups", "links"):
    assert k in a, k
for k in ("p50", "p90", "p99"):
    assert a["ttft_s"][k] > 0 and a["tpot_s"][k] > 0
assert 0 <= a["slo_attainment"] <= 1
a.pop("wall_s"); b.pop("wall_s")
assert a == b, "same seed, different results"
PY
then
    ok "simulate --json: fields, and the same seed gives the same output"
else
    not_ok "simulate --json" "$(cat "$TMP/s.err" "$TMP/py.err")"
fi
expect "simulate --csv" 0 "requests written to" -- "$HX" simulate --plan "$TMP/p13.json" --requests 500 --csv "$TMP/req.csv"
rows=$(($(wc -l <"$TMP/req.csv") - 1))
[ "$rows" -eq 500 ] && ok "csv has one row per request" || not_ok "csv has one row per request" "rows: $rows"
expect "simulate --svg --find-goodput" 0 "goodput" -- "$HX" simulate --plan "$TMP/p13.json" --duration 20 --find-goodput --svg "$TMP/sim.svg"
if python3 -c "import sys,xml.dom.minidom; d=xml.dom.minidom.parse(sys.argv[1]); assert d.documentElement.tagName=='svg'" "$TMP/sim.svg" 2>"$TMP/py.err"; then
    ok "simulate --svg writes a valid SVG document"
else
    not_ok "simulate --svg writes a valid SVG document" "$(cat "$TMP/py.err")"
fi
expect "simulate mooncake trace" 0 "trace lengths" -- "$HX" simulate --plan "$TMP/p13.json" --trace "$SRC/tests/data/sample-mooncake.jsonl"
expect "simulate azure trace" 0 "trace lengths" -- "$HX" simulate --plan "$TMP/p13.json" --trace "$SRC/tests/data/sample-azure.csv" --rate 20
printf '{"timestamp": 0, "input_length": 10, "output_length": 5}\n{"timestamp": 5, "input_length": -1, "output_length": 5}\n' >"$TMP/bad.jsonl"
expect "simulate malformed trace" 2 "$TMP/bad.jsonl:2" -- "$HX" simulate --plan "$TMP/p13.json" --trace "$TMP/bad.jsonl"
expect "simulate missing plan arg" 2 "missing --plan" -- "$HX" simulate
expect "simulate missing plan file" 2 "cannot open plan" -- "$HX" simulate --plan "$TMP/none.json"
cat >"$TMP/hand.json" <<'JSON'
{"schema": "hexflow.plan/1", "hosts": [{"name": "local", "address": "local"}],
 "router": {"host": "local", "port": 8123},
 "groups": [{"id": "g0", "role": "both", "stages": [{"num_layers": 40, "devices": ["local:0"]}]}]}
JSON
expect "simulate a plan without cluster" 2 "no 'cluster'" -- "$HX" simulate --plan "$TMP/hand.json" --model llama-2-13b
expect "simulate bad lengths" 2 "unknown distribution" -- "$HX" simulate --plan "$TMP/p13.json" --lengths zipf
expect "simulate exponential lengths" 0 "exponential lengths" -- "$HX" simulate --plan "$TMP/p13.json" --lengths exponential --requests 500

# --- whatif ----------------------------------------------------------------
expect "whatif --help" 0 "usage: hexflow whatif" -- "$HX" whatif --help
expect "whatif add and remove" 0 "+ 8 x H100-SXM (h100-c)" -- "$HX" whatif --inventory "$INV" --model llama-2-13b --add h100-c:H100-SXM:8@tor-a --remove L40S --duration 20
if "$HX" whatif --inventory "$INV" --model llama-2-13b --add x:L4:4 --duration 20 --json --svg "$TMP/wi.svg" >"$TMP/wi.json" 2>"$TMP/wi.err" &&
    python3 - "$TMP/wi.json" "$TMP/wi.svg" <<'PY' 2>"$TMP/py.err"
import json, sys, xml.dom.minidom
d = json.load(open(sys.argv[1]))
sc = d["scenarios"]
assert sc[0]["name"] == "current" and len(sc) == 2
for s in sc:
    for k in ("name", "plan_rps", "goodput_rps", "usd_per_hour", "usd_per_million_output_tokens", "ttft_p90_s", "tpot_p90_s"):
        assert k in s, k
assert sc[1]["plan_rps"] >= sc[0]["plan_rps"] * (1 - 1e-9)
assert xml.dom.minidom.parse(sys.argv[2]).documentElement.tagName == "svg"
PY
then
    ok "whatif --json lists the current cluster first, --svg writes a chart"
else
    not_ok "whatif --json / --svg" "$(cat "$TMP/wi.err" "$TMP/py.err")"
fi
expect "whatif budget" 0 "purchase options" -- "$HX" whatif --inventory "$INV" --model llama-2-13b --budget 5 --duration 20
expect "whatif bad --add" 2 "expected NAME:TYPE:COUNT" -- "$HX" whatif --inventory "$INV" --model llama-2-13b --add h100
expect "whatif unknown --remove" 2 "--remove nope" -- "$HX" whatif --inventory "$INV" --model llama-2-13b --remove nope
expect "whatif nothing to compare" 2 "nothing to compare" -- "$HX" whatif --inventory "$INV" --model llama-2-13b

# --- model make-tiny and generate (the CPU runtime) ---------------------------
expect "model make-tiny" 0 "wrote $TMP/tiny" -- "$HX" model make-tiny --out "$TMP/tiny" --layers 2 --hidden 64
expect "model make-tiny refuses to overwrite" 2 "already holds a model" -- "$HX" model make-tiny --out "$TMP/tiny"
expect "model make-tiny --shards more than layers" 2 "shards: 3 is not in [1, layers 2]" -- "$HX" model make-tiny --out "$TMP/tiny-bad" --shards 3
expect "model make-tiny --shards writes an index" 0 "wrote $TMP/tiny-sh" -- "$HX" model make-tiny --out "$TMP/tiny-sh" --layers 2 --shards 2
expect "a sharded tiny model generates what the one-file one does" 0 "" -- sh -c "[ \"\$('$HX' generate --model '$TMP/tiny-sh' --prompt hi --max-tokens 6 --json --threads 1 | tr -d ' \n')\" = \"\$('$HX' generate --model '$TMP/tiny' --prompt hi --max-tokens 6 --json --threads 1 | tr -d ' \n')\" ] && [ -f '$TMP/tiny-sh/model.safetensors.index.json' ] && [ -f '$TMP/tiny-sh/model-00002-of-00002.safetensors' ]"
expect "model show tiny" 0 "layers           2" -- "$HX" model show "$TMP/tiny"
expect "generate --help" 0 "usage: hexflow generate" -- "$HX" generate --help
if "$HX" generate --model "$TMP/tiny" --prompt "Hello" --max-tokens 8 --json >"$TMP/g1.json" 2>"$TMP/g.err" &&
    "$HX" generate --model "$TMP/tiny" --prompt "Hello" --max-tokens 8 --json >"$TMP/g2.json" 2>>"$TMP/g.err" &&
    python3 -c 'import json,sys; a=json.load(open(sys.argv[1])); b=json.load(open(sys.argv[2])); assert a["tokens"] and isinstance(a["text"], str) and a == b' "$TMP/g1.json" "$TMP/g2.json" 2>"$TMP/py.err"; then
    ok "generate --json is valid and greedy decoding is repeatable"
else
    not_ok "generate --json" "$(cat "$TMP/g.err" "$TMP/py.err")"
fi
expect "generate missing model" 2 "" -- "$HX" generate --model "$TMP/none" --prompt hi
expect "plan a tiny model on localhost" 0 "throughput" -- "$HX" plan --inventory "$SRC/inventories/localhost.yaml" --model "$TMP/tiny" --slo-ttft 10 --slo-tpot 1

# --- serving: bad input to the process commands (running them is tests/integration) ---
export HEXFLOW_STATE_DIR="$TMP/state"
cat >"$TMP/p.json" <<JSON
{"schema": "hexflow.plan/1", "hosts": [{"name": "local", "address": "local"}],
 "router": {"host": "local", "port": 18500},
 "groups": [{"id": "b0", "role": "both", "stages": [{"num_layers": 2, "devices": ["local:0"]}]}]}
JSON
expect "launch needs --plan and --model" 2 "--plan and --model are required" -- "$HX" launch --plan "$TMP/p.json"
expect "launch missing plan" 2 "cannot open plan '$TMP/none.json'" -- "$HX" launch --plan "$TMP/none.json" --model "$TMP/tiny"
expect "launch missing model" 2 "cannot open model directory '$TMP/none'" -- "$HX" launch --plan "$TMP/p.json" --model "$TMP/none"
expect "launch refuses shell in --worker-args" 2 "only plain options" -- "$HX" launch --plan "$TMP/p.json" --model "$TMP/tiny" --worker-args '--threads 1; true'
expect "launch --dry-run prints the commands" 0 "worker --plan" -- "$HX" launch --plan "$TMP/p.json" --model "$TMP/tiny" --dry-run
expect "status of a plan not launched" 2 "is not launched" -- "$HX" status --plan "$TMP/p.json"
expect "restart of a plan not launched" 2 "is not launched" -- "$HX" restart --plan "$TMP/p.json"
expect "restart needs --plan" 2 "--plan is required" -- "$HX" restart
expect "restart help" 0 "usage: hexflow restart" -- "$HX" restart --help
expect "stop of a plan not launched does nothing" 0 "stopped 0 processes" -- "$HX" stop --plan "$TMP/p.json"
expect "logs of a plan not launched" 2 "is not launched" -- "$HX" logs --plan "$TMP/p.json"
expect "worker needs its options" 2 "--plan, --model, --device and --secret-file are required" -- "$HX" worker --plan "$TMP/p.json"
expect "worker unknown backend" 2 "unknown backend 'gpu'" -- "$HX" worker --backend gpu
expect "worker unknown TP transport" 2 "--tp-transport: unknown transport 'ib'" -- "$HX" worker --tp-transport ib
expect "worker unknown KV transport" 2 "--kv-transport: unknown transport 'rdma'" -- "$HX" worker --kv-transport rdma
expect "worker help names the TP transport" 0 "--tp-transport NAME" -- "$HX" worker --help
expect "worker peer timeout out of range" 2 "--peer-timeout: '0' is not a number from 1 to 86400" -- "$HX" worker --peer-timeout 0
expect "worker help names the peer timeout" 0 "--peer-timeout S" -- "$HX" worker --help
expect "router needs its options" 2 "--plan, --model and --secret-file are required" -- "$HX" router --plan "$TMP/p.json"
printf 'short' >"$TMP/weak.secret"
chmod 600 "$TMP/weak.secret"
expect "worker refuses a short secret" 2 "at least 16" -- "$HX" worker --plan "$TMP/p.json" --model "$TMP/tiny" --device local:0 --secret-file "$TMP/weak.secret"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$TMP/ok.secret"
chmod 600 "$TMP/ok.secret"
expect "worker for a device not in the plan" 2 "device 'local:7' is in no group" -- "$HX" worker --plan "$TMP/p.json" --model "$TMP/tiny" --device local:7 --secret-file "$TMP/ok.secret"

echo "cli: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
