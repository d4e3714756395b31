#!/bin/bash
# demo-serve.sh HEXFLOW BUILD_DIR - serve a small random-weight Llama model on
# this machine: plan it on inventories/localhost.yaml (two CPU devices), launch
# the plan, send a completion through the OpenAI-compatible router, show the
# deployment's status, and stop it (also when anything fails).
set -eu
HX=$1
B=$2
MODEL=$B/demo-model
PLAN=$B/demo-plan.json
run() { echo "\$ hexflow $*"; "$HX" "$@"; }

[ -f "$MODEL/config.json" ] || "$HX" model make-tiny --out "$MODEL" --layers 4 --hidden 128 \
    --heads 4 --kv-heads 2 --intermediate 256 >/dev/null
run plan --inventory inventories/localhost.yaml --model "$MODEL" --input-tokens 64 \
    --output-tokens 32 --out "$PLAN"
echo
trap '"$HX" stop --plan "$PLAN" >/dev/null 2>&1 || true' EXIT
"$HX" stop --plan "$PLAN" >/dev/null 2>&1 || true
echo "\$ hexflow launch --plan $PLAN --model $MODEL"
URL=$("$HX" launch --plan "$PLAN" --model "$MODEL" | tail -n 1)
echo "$URL"
echo
echo "\$ curl $URL/v1/completions -d '{\"prompt\": \"Once upon a time\", \"max_tokens\": 16, \"temperature\": 0}'"
curl -s -m 30 "$URL/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}'
echo
echo
run status --plan "$PLAN"
echo
run stop --plan "$PLAN"
trap - EXIT
