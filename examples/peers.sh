#!/usr/bin/env bash
# The peer harness (issue #17): the same upstream reached directly, through one plain nginx proxy
# hop, through `flex up`, through the production split (`flex control` on Postgres with NATS +
# `flex proxy --state-dir`), and through LiteLLM's proxy and Portkey's gateway when they are
# installed; all in one run, on this machine. Prints one table per measurement, with ratios to
# direct and to the nginx hop. Never a test: a command whose results go in BENCHMARKS.md.
#
#   cargo build --release --bin flex --example loadgen
#   bash examples/peers.sh
#
# The flex processes run with their default log level, as users run them (FLEX_LOG unset).
#
# Two upstreams: `flex sim` with zero delays (a Rust server that builds each answer) and nginx
# serving the same answers as static text (the fastest server there is). Requests are Chat
# Completions with `start_within: "default"` (no race): "passthrough" is Chat Completions to
# OpenAI, "cross-format" is Anthropic Messages to OpenAI (Responses upstream). Measures:
#   - closed loop with wrk at concurrency 1 (p50, p99) and 32 (req/s, p99);
#   - open loop with `loadgen open` at fixed rates (latency of each request from its send);
#   - streaming with `loadgen stream` against the simulator, one stream at a time, paced like a
#     model and in one burst: time to the first byte, to the first token (the first event with
#     content: a proxy may hold the role-only first chunk until then), and the gaps between events;
#   - flex's RSS idle and with 1,000 streams open at once (`loadgen hold`).
#
# Environment: FLEX (target/release/flex), LOADGEN (target/release/examples/loadgen), DUR (wrk
# seconds, 5), RATES (open-loop req/s, "1000 4000"), STREAMS (1000), PEERS ("litellm portkey",
# or "" to skip them), LITELLM (a litellm executable; default /work/peers/litellm-venv/bin/litellm
# or `litellm` on PATH), PORTKEY (the gateway's build/start-server.js; default under
# /work/peers/portkey), PG_URL (a Postgres server where a scratch database is created;
# postgres://postgres@127.0.0.1:5432), ONLY (a space-separated subset of the paths to run).
# Install the peers with:
#   python3 -m venv /work/peers/litellm-venv && /work/peers/litellm-venv/bin/pip install 'litellm[proxy]'
#   mkdir -p /work/peers/portkey && (cd /work/peers/portkey && npm install @portkey-ai/gateway)
# Needs wrk, nginx, nats-server, psql, openssl, curl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
FLEX=${FLEX:-target/release/flex}
LOADGEN=${LOADGEN:-target/release/examples/loadgen}
DUR=${DUR:-5}
RATES=${RATES:-1000 4000}
STREAMS=${STREAMS:-1000}
PEERS=${PEERS-litellm portkey}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
LITELLM=${LITELLM:-$( [ -x /work/peers/litellm-venv/bin/litellm ] && echo /work/peers/litellm-venv/bin/litellm || command -v litellm || true)}
PORTKEY=${PORTKEY:-/work/peers/portkey/node_modules/@portkey-ai/gateway/build/start-server.js}
for tool in wrk nginx nats-server psql openssl curl python3; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (Debian: wrk, nginx-light, nats-server, postgresql-client)" >&2; exit 1; }
done
for bin in "$FLEX" "$LOADGEN"; do
  [ -x "$bin" ] || { echo "$bin is missing: cargo build --release --bin flex --example loadgen" >&2; exit 1; }
done

tmp=$(mktemp -d /tmp/flex-peers.XXXXXX)
# nginx's workers (another user) read the static answers from here.
chmod 755 "$tmp"
pids=()
cur=()   # the processes of the path being measured (stopped before the next one starts)
db=""
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 30); do
    alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "$db" ] && psql -q "$PG_URL/postgres" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  if [ -n "${KEEP:-}" ]; then echo "# kept $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
try_port() { for _ in $(seq 1 "${2:-600}"); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
wait_port() { try_port "$1" || { echo "port $1 never opened" >&2; exit 1; }; }
log() { echo "# $*" >&2; }
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# --- request bodies ---------------------------------------------------------------------------
CHAT='{"model":"gpt-5.5","messages":[{"role":"user","content":"Summarize Hamlet in one sentence."}],"max_completion_tokens":64,"start_within":"default"}'
MSGS='{"model":"gpt-5.5","max_tokens":64,"messages":[{"role":"user","content":"Summarize Hamlet in one sentence."}],"start_within":"default"}'
CHAT_STREAM='{"model":"gpt-5.5","stream":true,"messages":[{"role":"user","content":"#sim output_tokens=40 Summarize Hamlet."}],"max_completion_tokens":64,"start_within":"default"}'
CHAT_PACED='{"model":"gpt-5.5","stream":true,"messages":[{"role":"user","content":"#sim output_tokens=40 tokens_per_sec=1000 Summarize Hamlet."}],"max_completion_tokens":64,"start_within":"default"}'
CHAT_HOLD='{"model":"gpt-5.5","stream":true,"messages":[{"role":"user","content":"#sim output_tokens=200 tokens_per_sec=4 Summarize Hamlet."}],"max_completion_tokens":256,"start_within":"default"}'
# What a direct call to a provider sends instead (no start_within).
strip() { python3 -c 'import json,sys; b=json.loads(sys.argv[1]); b.pop("start_within",None); print(json.dumps(b))' "$1"; }
printf '%s' "$CHAT" > "$tmp/chat.json"; printf '%s' "$MSGS" > "$tmp/msgs.json"
printf '%s' "$CHAT_STREAM" > "$tmp/chat_stream.json"; printf '%s' "$CHAT_PACED" > "$tmp/chat_paced.json"; strip "$CHAT_PACED" > "$tmp/chat_paced_direct.json"; printf '%s' "$CHAT_HOLD" > "$tmp/chat_hold.json"
strip "$CHAT" > "$tmp/chat_direct.json"; strip "$CHAT_STREAM" > "$tmp/chat_stream_direct.json"
# Cross-format requests reach OpenAI's Responses API streaming (the proxy translates the events).
RESP_DIRECT='{"model":"gpt-5.5","stream":true,"input":[{"role":"user","content":"Summarize Hamlet in one sentence."}],"max_output_tokens":64}'
printf '%s' "$RESP_DIRECT" > "$tmp/resp_direct.json"

# --- upstreams --------------------------------------------------------------------------------
sim=$(free_port)
FLEX_LOG=error "$FLEX" sim --listen "127.0.0.1:$sim" --standard-delay-ms 0 --flex-delay-ms 0 --priority-delay-ms 0 >"$tmp/sim.log" 2>&1 & pids+=($!); cur+=($!)
wait_port "$sim"
# nginx's static answers are the simulator's own.
mkdir -p "$tmp/www/v1/chat" "$tmp/nginx"
curl -s -X POST -H 'content-type: application/json' -d @"$tmp/chat_direct.json" "http://127.0.0.1:$sim/v1/chat/completions" > "$tmp/www/v1/chat/completions"
curl -s -X POST -H 'content-type: application/json' -d @"$tmp/resp_direct.json" "http://127.0.0.1:$sim/v1/responses" > "$tmp/www/v1/responses"
static=$(free_port); hop_sim=$(free_port); hop_static=$(free_port)
cat > "$tmp/nginx/nginx.conf" <<NGINX
worker_processes 1;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log error;
daemon off;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $tmp/nginx/body;
  proxy_temp_path $tmp/nginx/proxy;
  keepalive_requests 1000000;
  upstream sim { server 127.0.0.1:$sim; keepalive 128; }
  upstream static { server 127.0.0.1:$static; keepalive 128; }
  server {
    listen 127.0.0.1:$static;
    root $tmp/www;
    default_type application/json;
    # A static file answers a POST: 405 becomes the file itself.
    error_page 405 =200 \$uri;
    location = /v1/responses { default_type text/event-stream; error_page 405 =200 \$uri; }
  }
  server {
    listen 127.0.0.1:$hop_sim;
    location / { proxy_pass http://sim; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
  server {
    listen 127.0.0.1:$hop_static;
    location / { proxy_pass http://static; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
}
NGINX
nginx -c "$tmp/nginx/nginx.conf" >"$tmp/nginx/out.log" 2>&1 & pids+=($!); cur+=($!)
wait_port "$static"; wait_port "$hop_sim"; wait_port "$hop_static"
upstream_port() { [ "$1" = sim ] && echo "$sim" || echo "$static"; }

# --- flex up (embedded: SQLite, in-process usage), one per upstream ----------------------------
declare -A URL KEY PID
start_up() { # upstream
  local u=$1 port admin dir
  port=$(free_port); admin=$(free_port); dir="$tmp/up-$u"
  local base="http://127.0.0.1:$(upstream_port "$u")"
  "$FLEX" up --demo --data-dir "$dir" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --dashboard-listen "127.0.0.1:$(free_port)" --openai-base-url "$base/v1" --anthropic-base-url "$base" \
    --gemini-base-url "$base" >"$tmp/up-$u.log" 2>&1 & PID[up,$u]=$!; pids+=(${PID[up,$u]}); cur+=(${PID[up,$u]})
  wait_port "$port"
  for _ in $(seq 1 300); do [ -s "$dir/demo.json" ] && break; sleep 0.1; done
  URL[up,$u]="http://127.0.0.1:$port"
  KEY[up,$u]=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["api_key"])' "$dir/demo.json")
}

# --- the production split: flex control (Postgres, NATS) + flex proxy --state-dir --------------
nats=""; cp=""
start_control() {
  nats=$(free_port); cp=$(free_port)
  rm -rf "$tmp/nats"
  nats-server -a 127.0.0.1 -p "$nats" -js -sd "$tmp/nats" >"$tmp/nats.log" 2>&1 & pids+=($!); cur+=($!)
  db="flex_peers_$$"
  psql -q "$PG_URL/postgres" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  psql -q "$PG_URL/postgres" -c "CREATE DATABASE $db" >/dev/null
  openssl rand -hex 32 > "$tmp/master.key"
  wait_port "$nats"
  "$FLEX" control --database-url "$PG_URL/$db" --nats-url "nats://127.0.0.1:$nats" --admin-token bench \
    --master-key-file "$tmp/master.key" --listen "127.0.0.1:$cp" >"$tmp/control.log" 2>&1 & PID[control]=$!; pids+=(${PID[control]}); cur+=(${PID[control]})
  wait_port "$cp"
  admin() { "$FLEX" admin --endpoint "http://127.0.0.1:$cp" --token bench --json "$@"; }
  org=$(admin org create bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["org_id"])')
  split_key=$(admin key create --org "$org" --name bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
  echo sk-bench | admin provider-key set --org "$org" --provider openai >/dev/null
}
start_proxy() { # path upstream: split (with --state-dir) or nolog (without)
  local p=$1 u=$2 port state=()
  port=$(free_port)
  [ "$p" = split ] && state=(--state-dir "$tmp/state-$u")
  "$FLEX" proxy --control-url "http://127.0.0.1:$cp" --master-key-file "$tmp/master.key" \
    --nats-url "nats://127.0.0.1:$nats" "${state[@]}" --listen "127.0.0.1:$port" \
    --metrics-listen "127.0.0.1:$(free_port)" \
    --openai-base-url "http://127.0.0.1:$(upstream_port "$u")/v1" >"$tmp/proxy-$p-$u.log" 2>&1 & PID[$p,$u]=$!; pids+=(${PID[$p,$u]}); cur+=(${PID[$p,$u]})
  URL[$p,$u]="http://127.0.0.1:$port"; KEY[$p,$u]=$split_key
  wait_port "$port"
}

# --- peers ---
LITELLM_KEY="sk-$(openssl rand -hex 32)"---------------------------------------------------------------------------------
start_litellm() { # upstream
  local u=$1 port
  port=$(free_port)
  cat > "$tmp/litellm-$u.yaml" <<YAML
model_list:
  - model_name: gpt-5.5
    litellm_params:
      model: openai/gpt-5.5
      api_base: http://127.0.0.1:$(upstream_port "$u")/v1
      api_key: sk-bench
litellm_settings:
  drop_params: true
general_settings:
  master_key: $LITELLM_KEY
YAML
  (cd "$tmp" && exec "$LITELLM" --config "$tmp/litellm-$u.yaml" --host 127.0.0.1 --port "$port" --num_workers 2) >"$tmp/litellm-$u.log" 2>&1 & pids+=($!); cur+=($!)
  URL[litellm,$u]="http://127.0.0.1:$port"; KEY[litellm,$u]=$LITELLM_KEY
  try_port "$port" 1200 || log "LiteLLM did not start: $(tail -5 "$tmp/litellm-$u.log")"
}
start_portkey() { # upstream
  local u=$1 port
  port=$(free_port)
  NODE_ENV=production node "$PORTKEY" --port="$port" --headless >"$tmp/portkey-$u.log" 2>&1 & pids+=($!); cur+=($!)
  URL[portkey,$u]="http://127.0.0.1:$port"; KEY[portkey,$u]=sk-bench
  try_port "$port" || log "Portkey did not start: $(tail -5 "$tmp/portkey-$u.log")"
}

# --- measuring --------------------------------------------------------------------------------
# Headers and body for a path: flex paths take the flex body and key; the others the provider's.
headers_for() { # path upstream -> wrk lua header lines
  local p=$1 u=$2
  case $p in
    up|split|nolog) echo "wrk.headers[\"authorization\"] = \"Bearer ${KEY[$p,$u]}\"" ;;
    litellm) echo "wrk.headers[\"authorization\"] = \"Bearer $LITELLM_KEY\"" ;;
    portkey) echo "wrk.headers[\"authorization\"] = \"Bearer sk-bench\"
wrk.headers[\"x-portkey-provider\"] = \"openai\"
wrk.headers[\"x-portkey-custom-host\"] = \"http://127.0.0.1:$(upstream_port "$u")/v1\"" ;;
    *) echo 'wrk.headers["authorization"] = "Bearer sk-bench"' ;;
  esac
}
lg_headers() { # path upstream -> loadgen -H args
  local p=$1 u=$2
  case $p in
    up|split|nolog|litellm) echo "-H" "authorization: Bearer ${KEY[$p,$u]}" ;;
    portkey) echo "-H" "authorization: Bearer sk-bench" "-H" "x-portkey-provider: openai" "-H" "x-portkey-custom-host: http://127.0.0.1:$(upstream_port "$u")/v1" ;;
    *) echo "-H" "authorization: Bearer sk-bench" ;;
  esac
}
url_for() { # path upstream endpoint
  local p=$1 u=$2 e=$3
  case $p in
    direct) echo "http://127.0.0.1:$(upstream_port "$u")$e" ;;
    nginx) [ "$u" = sim ] && echo "http://127.0.0.1:$hop_sim$e" || echo "http://127.0.0.1:$hop_static$e" ;;
    *) echo "${URL[$p,$u]}$e" ;;
  esac
}
body_for() { # path kind(chat|msgs|stream|hold)
  case $1 in
    up|split|nolog) case $2 in chat) echo "$tmp/chat.json" ;; msgs) echo "$tmp/msgs.json" ;; stream) echo "$tmp/chat_stream.json" ;; paced) echo "$tmp/chat_paced.json" ;; hold) echo "$tmp/chat_hold.json" ;; esac ;;
    *) case $2 in chat) echo "$tmp/chat_direct.json" ;; msgs) echo "$tmp/resp_direct.json" ;; stream) echo "$tmp/chat_stream_direct.json" ;; paced) echo "$tmp/chat_paced_direct.json" ;; hold) echo "$tmp/chat_stream_direct.json" ;; esac ;;
  esac
}
wrk_run() { # path upstream conns endpoint bodyfile -> "rps p50 p99 non2xx errors"
  local p=$1 u=$2 c=$3 e=$4 b=$5 url
  url=$(url_for "$p" "$u" "$e")
  { echo 'wrk.method = "POST"'; echo 'wrk.headers["content-type"] = "application/json"'; headers_for "$p" "$u";
    printf 'wrk.body = [==[%s]==]\n' "$(cat "$b")"; } > "$tmp/wrk.lua"
  wrk -t1 -c"$c" -d1s -s "$tmp/wrk.lua" "$url" >/dev/null 2>&1 || true
  wrk -t"$(( c > 1 ? 2 : 1 ))" -c"$c" -d"${DUR}s" --latency -s "$tmp/wrk.lua" "$url" > "$tmp/wrk.out" 2>&1 || true
  cp "$tmp/wrk.out" "$tmp/wrk-$p-$u-$c.out"
  python3 - "$tmp/wrk.out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
def us(v):
    n, u = re.match(r"([\d.]+)(us|ms|s|m)", v).groups()
    return float(n) * {"us": 1, "ms": 1e3, "s": 1e6, "m": 6e7}[u]
m = re.search(r"Requests/sec:\s+([\d.]+)", t)
if not m:
    print("0 0 0 0 1"); sys.exit()
p50 = us(re.search(r"^\s+50%\s+(\S+)", t, re.M).group(1)); p99 = us(re.search(r"^\s+99%\s+(\S+)", t, re.M).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
print(f"{float(m.group(1)):.0f} {p50:.0f} {p99:.0f} {bad.group(1) if bad else 0} {sum(map(int, err.groups())) if err else 0}")
PY
}
check() { # path upstream endpoint bodyfile: one request must answer 200
  local p=$1 u=$2 e=$3 b=$4 url code
  url=$(url_for "$p" "$u" "$e")
  local hs=(); while IFS= read -r h; do [ -n "$h" ] && hs+=(-H "$h"); done < <(lg_headers "$p" "$u" | python3 -c 'import sys; a=sys.stdin.read().split("-H ")[1:]; print("\n".join(x.strip() for x in a))')
  for _ in $(seq 1 100); do
    code=$(curl -s -o "$tmp/check.out" -w '%{http_code}' -X POST -H 'content-type: application/json' "${hs[@]}" -d @"$b" "$url" || true)
    [ "$code" = 200 ] && return 0; sleep 0.2
  done
  log "$p/$u $e answers $code: $(head -c 300 "$tmp/check.out")"; return 1
}
lg() { # mode path upstream endpoint bodyfile args...
  local m=$1 p=$2 u=$3 e=$4 b=$5; shift 5
  local hs=(); while IFS= read -r h; do [ -n "$h" ] && hs+=(-H "$h"); done < <(lg_headers "$p" "$u" | python3 -c 'import sys; a=sys.stdin.read().split("-H ")[1:]; print("\n".join(x.strip() for x in a))')
  "$LOADGEN" "$m" --url "$(url_for "$p" "$u" "$e")" --body-file "$b" "${hs[@]}" "$@"
}
jget() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d[sys.argv[2]])' "$1" "$2"; }

stop_cur() {
  for p in "${cur[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    alive=0; for p in "${cur[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.1
  done
  for p in "${cur[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  cur=()
}
# The upstreams stay up for the whole run; they are not a path's.
cur=()

echo "flex: $FLEX ($(git describe --always --dirty 2>/dev/null || echo unknown)); $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ)"

paths=(direct nginx up split nolog)
[[ " $PEERS " == *" litellm "* ]] && [ -n "$LITELLM" ] && paths+=(litellm)
[[ " $PEERS " == *" portkey "* ]] && [ -f "$PORTKEY" ] && paths+=(portkey)
sel=(); for p in "${paths[@]}"; do want "$p" && sel+=("$p"); done; paths=("${sel[@]}")
log "paths: ${paths[*]}"

label() { case $1 in direct) echo "provider reached directly" ;; nginx) echo "one nginx proxy hop" ;; up) echo "\`flex up\`" ;; split) echo "\`flex control\` + \`flex proxy --state-dir\` (Postgres, NATS)" ;; nolog) echo "the same \`flex proxy\` without \`--state-dir\` (no usage log)" ;; litellm) echo "LiteLLM proxy, 2 workers" ;; portkey) echo "Portkey gateway" ;; esac; }
ratio() { python3 -c 'import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f"{a/b:.2f}" if b else "-")' "$1" "$2"; }
minus() { python3 -c 'import sys; print(int(float(sys.argv[1])-float(sys.argv[2])))' "$1" "$2"; }
declare -A R
done_paths=()
cross_paths=()

# Each path in turn, alone on the machine beside the upstreams: started, measured, stopped.
for p in "${paths[@]}"; do
  for u in sim static; do
    case $p in
      up) start_up "$u" ;;
      split|nolog) [ -n "${PID[control]:-}" ] && kill -0 "${PID[control]}" 2>/dev/null || start_control; start_proxy "$p" "$u" ;;
      litellm) start_litellm "$u" ;;
      portkey) start_portkey "$u" ;;
    esac
  done
  good=1
  for u in sim static; do check "$p" "$u" /v1/chat/completions "$(body_for "$p" chat)" || good=0; done
  if [ $good = 0 ]; then log "$p left out: it does not answer"; stop_cur; continue; fi
  done_paths+=("$p")
  if [ "$p" = up ] || [ "$p" = split ] || [ "$p" = nolog ]; then R[rss_idle,$p]=$(rss_kib "${PID[$p,sim]}"); fi

  # 1. Closed loop (wrk), passthrough: concurrency 1 and 32.
  for u in sim static; do
    log "closed loop $p/$u"
    read -r R[rps1,$p,$u] R[p50,$p,$u] R[p99,$p,$u] R[bad1,$p,$u] R[err1,$p,$u] < <(wrk_run "$p" "$u" 1 /v1/chat/completions "$(body_for "$p" chat)")
    read -r R[rps32,$p,$u] R[p50_32,$p,$u] R[p99_32,$p,$u] R[bad32,$p,$u] R[err32,$p,$u] < <(wrk_run "$p" "$u" 32 /v1/chat/completions "$(body_for "$p" chat)")
  done

  # 2. Closed loop, cross-format (Anthropic Messages in, OpenAI Responses upstream, which the
  #    proxy streams): flex only; for direct and the nginx hop it is the Responses call itself.
  case $p in direct|nginx|up|split|nolog)
    cross_paths+=("$p")
    for u in sim static; do
      case $p in up|split|nolog) e=/v1/messages ;; *) e=/v1/responses ;; esac
      log "cross-format $p/$u"
      check "$p" "$u" "$e" "$(body_for "$p" msgs)" || true
      read -r _ R[x50,$p,$u] R[x99,$p,$u] R[xbad1,$p,$u] R[xerr1,$p,$u] < <(wrk_run "$p" "$u" 1 "$e" "$(body_for "$p" msgs)")
      read -r R[x32,$p,$u] _ _ R[xbad32,$p,$u] R[xerr32,$p,$u] < <(wrk_run "$p" "$u" 32 "$e" "$(body_for "$p" msgs)")
    done ;;
  esac

  # 3. Open loop at fixed rates (loadgen, one thread), passthrough. A rate the path cannot carry
  #    (closed-loop req/s at c=32 below 1.25 times the rate) is not sent.
  for u in sim static; do
    for r in $RATES; do
      if python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) >= 1.25*float(sys.argv[2]) else 1)' "${R[rps32,$p,$u]}" "$r"; then
        log "open loop $p/$u at $r"
        R[open,$p,$u,$r]=$(lg open "$p" "$u" /v1/chat/completions "$(body_for "$p" chat)" --rate "$r" --secs "$DUR")
      fi
    done
  done

  # 4. Streaming from the simulator, one stream at a time.
  log "streaming $p"
  # (200 answers from the peers: LiteLLM streams about 10 a second.)
  case $p in litellm|portkey) n=200 ;; *) n=1000 ;; esac
  R[stream,$p]=$(lg stream "$p" sim /v1/chat/completions "$(body_for "$p" stream)" --conns 1 --requests "$n")
  # Paced like a model (an event a millisecond): what a caller sees of each token.
  R[paced,$p]=$(lg stream "$p" sim /v1/chat/completions "$(body_for "$p" paced)" --conns 1 --requests 200)

  # 5. Memory of the flex processes: after the load, and with STREAMS streams open at once.
  if [ "$p" = up ] || [ "$p" = split ] || [ "$p" = nolog ]; then
    pid=${PID[$p,sim]}
    R[rss_loaded,$p]=$(rss_kib "$pid")
    rm -f "$tmp/hold.out"
    lg hold "$p" sim /v1/chat/completions "$(body_for "$p" hold)" --streams "$STREAMS" --secs 3 > "$tmp/hold.out" &
    hp=$!
    for _ in $(seq 1 900); do [ -s "$tmp/hold.out" ] && break; sleep 0.1; done
    sleep 1
    R[rss_held,$p]=$(rss_kib "$pid")
    R[held,$p]=$(jget "$(cat "$tmp/hold.out")" held)
    wait "$hp" || true
  fi
  stop_cur
done
paths=("${done_paths[@]}")

for u in sim static; do
  echo
  echo "### Closed loop (wrk, ${DUR}s each), Chat Completions passthrough, upstream: $u"
  echo
  echo "| path | c=1 p50 µs | c=1 p99 µs | added p50 / p99 µs | c=32 req/s | c=32 p99 µs | req/s ÷ direct | req/s ÷ nginx hop | non-2xx / socket errors |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for p in "${paths[@]}"; do
    echo "| $(label "$p") | ${R[p50,$p,$u]} | ${R[p99,$p,$u]} | $(minus "${R[p50,$p,$u]}" "${R[p50,direct,$u]:-0}") / $(minus "${R[p99,$p,$u]}" "${R[p99,direct,$u]:-0}") | ${R[rps32,$p,$u]} | ${R[p99_32,$p,$u]} | $(ratio "${R[rps32,$p,$u]}" "${R[rps32,direct,$u]:-0}") | $(ratio "${R[rps32,$p,$u]}" "${R[rps32,nginx,$u]:-0}") | $(( ${R[bad1,$p,$u]} + ${R[bad32,$p,$u]} )) / $(( ${R[err1,$p,$u]} + ${R[err32,$p,$u]} )) |"
  done
done

for u in sim static; do
  echo
  echo "### Closed loop, cross-format (Anthropic Messages to OpenAI Responses, streamed upstream), upstream: $u"
  echo
  echo "| path | c=1 p50 µs | c=1 p99 µs | added p50 / p99 µs | c=32 req/s | req/s ÷ direct | req/s ÷ nginx hop | non-2xx / socket errors |"
  echo "|---|---|---|---|---|---|---|---|"
  for p in "${cross_paths[@]}"; do
    echo "| $(label "$p") | ${R[x50,$p,$u]} | ${R[x99,$p,$u]} | $(minus "${R[x50,$p,$u]}" "${R[x50,direct,$u]:-0}") / $(minus "${R[x99,$p,$u]}" "${R[x99,direct,$u]:-0}") | ${R[x32,$p,$u]} | $(ratio "${R[x32,$p,$u]}" "${R[x32,direct,$u]:-0}") | $(ratio "${R[x32,$p,$u]}" "${R[x32,nginx,$u]:-0}") | $(( ${R[xbad1,$p,$u]} + ${R[xbad32,$p,$u]} )) / $(( ${R[xerr1,$p,$u]} + ${R[xerr32,$p,$u]} )) |"
  done
done

for u in sim static; do
  echo
  echo "### Open loop (loadgen open, ${DUR}s each), Chat Completions passthrough, upstream: $u"
  echo
  echo "| path | rate req/s | achieved | p50 µs | p90 µs | p99 µs | max µs | errors |"
  echo "|---|---|---|---|---|---|---|---|"
  for p in "${paths[@]}"; do
    for r in $RATES; do
      out=${R[open,$p,$u,$r]:-}
      if [ -n "$out" ]; then
        echo "| $(label "$p") | $r | $(jget "$out" achieved_rps) | $(jget "$out" latency_p50_us) | $(jget "$out" latency_p90_us) | $(jget "$out" latency_p99_us) | $(jget "$out" latency_max_us) | $(jget "$out" errors) |"
      else
        echo "| $(label "$p") | $r | not sent: over capacity (${R[rps32,$p,$u]} req/s closed loop) | | | | | |"
      fi
    done
  done
done

echo
for kind in paced stream; do
echo
if [ $kind = paced ]; then
  echo "### Streaming paced like a model (loadgen stream, 1 connection, 200 answers of 40 words at 1,000 words/s: about 42 SSE events 1 ms apart), upstream: sim"
else
  echo "### Streaming in one burst (loadgen stream, 1 connection, 1,000 answers of about 42 SSE events sent at once, 200 from the peers), upstream: sim"
fi
echo
echo "| path | first byte p50 µs | first token p50 µs | first token p99 µs | added first token p50 / p99 µs | gap between events p50 / p99 µs | added gap p50 / p99 µs | answers/s | errors |"
echo "|---|---|---|---|---|---|---|---|---|"
d=${R[$kind,direct]:-}
for p in "${paths[@]}"; do
  out=${R[$kind,$p]}
  b50=$(jget "$out" ttfb_p50_us); t50=$(jget "$out" ttft_p50_us); t99=$(jget "$out" ttft_p99_us); g50=$(jget "$out" chunk_gap_p50_us); g99=$(jget "$out" chunk_gap_p99_us)
  if [ -n "$d" ]; then
    a="$(minus "$t50" "$(jget "$d" ttft_p50_us)") / $(minus "$t99" "$(jget "$d" ttft_p99_us)")"
    b="$(minus "$g50" "$(jget "$d" chunk_gap_p50_us)") / $(minus "$g99" "$(jget "$d" chunk_gap_p99_us)")"
  else a=-; b=-; fi
  echo "| $(label "$p") | $b50 | $t50 | $t99 | $a | $g50 / $g99 | $b | $(jget "$out" rps) | $(jget "$out" errors) |"
done
done

echo
echo "### Memory (VmRSS of the process that serves the API), $STREAMS streams held open (upstream: sim)"
echo
echo "| process | idle MiB | after the load above MiB | with the streams MiB | streams open | per stream KiB |"
echo "|---|---|---|---|---|---|"
for p in up split nolog; do
  [ -n "${R[rss_held,$p]:-}" ] || continue
  per=$(python3 -c 'import sys; h,l,n=map(float,sys.argv[1:]); print(f"{(h-l)/n:.0f}" if n else "-")' "${R[rss_held,$p]}" "${R[rss_loaded,$p]}" "${R[held,$p]}")
  echo "| $(label "$p") | $(( R[rss_idle,$p] / 1024 )) | $(( R[rss_loaded,$p] / 1024 )) | $(( R[rss_held,$p] / 1024 )) | ${R[held,$p]} | $per |"
done
