#!/usr/bin/env bash
# Proxy overhead with metrics on vs off, on what users run: `flex control` (SQLite) and
# `flex proxy` (usage over gRPC, no state dir) as separate processes, `flex sim` as the provider
# with zero start delay, and wrk as the client (Chat Completions, non-streaming,
# `start_within: "default"`, so no race). Rounds alternate on/off so machine noise hits both.
#
#   cargo build --release --bin flex
#   bash examples/metrics_ab.sh            # FLEX=target/release/flex ROUNDS=3 DUR=10 CONNS=1,32
#
# Needs wrk (Debian: apt-get install wrk) and openssl. Prints one line per run and a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
FLEX=${FLEX:-target/release/flex}
ROUNDS=${ROUNDS:-3}
DUR=${DUR:-10}
CONNS=${CONNS:-1,32}
command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)" >&2; exit 1; }
[ -x "$FLEX" ] || { echo "$FLEX is missing: cargo build --release --bin flex" >&2; exit 1; }

tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

openssl rand -hex 32 > "$tmp/master.key"
sim=$(free_port); cp=$(free_port)
FLEX_LOG=error "$FLEX" sim --listen "127.0.0.1:$sim" --standard-delay-ms 0 --flex-delay-ms 0 --priority-delay-ms 0 >"$tmp/sim.log" 2>&1 & pids+=($!)
FLEX_LOG=error "$FLEX" control --database-url "sqlite://$tmp/flex.db?mode=rwc" --admin-token bench \
  --master-key-file "$tmp/master.key" --listen "127.0.0.1:$cp" >"$tmp/control.log" 2>&1 & pids+=($!)
wait_port "$sim"; wait_port "$cp"
admin() { "$FLEX" admin --endpoint "http://127.0.0.1:$cp" --token bench --json "$@"; }
org=$(admin org create bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["org_id"])')
key=$(admin key create --org "$org" --name bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
echo sk-bench | admin provider-key set --org "$org" --provider openai >/dev/null

cat > "$tmp/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer $key"
wrk.body = '{"model":"gpt-5.5","messages":[{"role":"user","content":"Summarize Hamlet in one sentence."}],"max_completion_tokens":64,"start_within":"default"}'
LUA

run() { # mode conns -> "req/s p50 p99" (µs)
  local mode=$1 conns=$2 port metrics=()
  port=$(free_port)
  [ "$mode" = on ] && metrics=(--metrics-listen "127.0.0.1:$(free_port)")
  FLEX_LOG=error "$FLEX" proxy --control-url "http://127.0.0.1:$cp" --master-key-file "$tmp/master.key" \
    --listen "127.0.0.1:$port" --openai-base-url "http://127.0.0.1:$sim/v1" "${metrics[@]}" \
    >"$tmp/proxy.log" 2>&1 & local p=$!
  for _ in $(seq 1 300); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "authorization: Bearer $key" -H 'content-type: application/json' \
      -d '{"model":"gpt-5.5","messages":[{"role":"user","content":"hi"}],"start_within":"default"}' \
      "http://127.0.0.1:$port/v1/chat/completions" || true)
    [ "$code" = 200 ] && break; sleep 0.1
  done
  wrk -t1 -c"$conns" -d2s -s "$tmp/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
  wrk -t"$(( conns > 1 ? 2 : 1 ))" -c"$conns" -d"${DUR}s" --latency -s "$tmp/post.lua" \
    "http://127.0.0.1:$port/v1/chat/completions" > "$tmp/wrk.out"
  kill "$p"; wait "$p" 2>/dev/null || true
  python3 - "$tmp/wrk.out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def us(v):
    n, u = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 1, "ms": 1e3, "s": 1e6}[u]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
p50 = us(re.search(r"50%\s+(\S+)", t).group(1))
p99 = us(re.search(r"99%\s+(\S+)", t).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
print(f"{rps:.0f} {p50:.0f} {p99:.0f} {errs.group(1) if errs else 0}")
PY
}

echo "flex: $FLEX ($("$FLEX" --version 2>/dev/null || echo unknown)); $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
declare -A sum
for conns in ${CONNS//,/ }; do
  for r in $(seq 1 "$ROUNDS"); do
    for mode in on off; do
      read -r rps p50 p99 bad < <(run "$mode" "$conns")
      echo "c=$conns round $r metrics $mode: $rps req/s, p50 $p50 µs, p99 $p99 µs, non-2xx $bad"
      sum[$conns,$mode]="${sum[$conns,$mode]:-} $rps"
    done
  done
done
echo
echo "| concurrency | metrics | req/s per round | median req/s |"
echo "|---|---|---|---|"
for conns in ${CONNS//,/ }; do
  for mode in on off; do
    med=$(python3 -c 'import statistics,sys; print(round(statistics.median(map(float, sys.argv[1:]))))' ${sum[$conns,$mode]})
    echo "| $conns | $mode |${sum[$conns,$mode]} | $med |"
  done
done
