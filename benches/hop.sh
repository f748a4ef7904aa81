#!/usr/bin/env bash
# hop.sh - what one Gatehouse hop costs: wrk against a real upstream, directly and through
# the gateway (an anonymous route), everything on 127.0.0.1, bounded in time. The side-by-side
# comparison with nginx is load.sh.
#
# What it does
#   1. installs wrk, nginx and curl with apt-get when they are missing (apt-get update once);
#   2. builds the gateway (cargo build --release);
#   3. starts an upstream: its own nginx instance, configured like benches/peers.sh's
#      (fixed 200 JSON body, keep-alive, its own temp prefix, pid and log files) on a free port;
#   4. writes a gatehouse.yaml with one anonymous route to it into a temp dir, starts
#      `gatehouse --log-format json serve --config …` on 127.0.0.1:0 and reads the bound address
#      from its "listening" log line; checks one request each way with curl;
#   5. runs wrk (a short warm-up, then the saturation run, then a light -t1 -c1 run) against the
#      upstream directly and through Gatehouse, ROUNDS times;
#   6. prints req/s, the ratio to direct, p50, p99, errors, the CPU each process spent per request
#      and the gateway's RSS; stops everything it started, by PID.
#
# Usage
#   bash benches/hop.sh
#   SKIP_INSTALL=1 SKIP_BUILD=1 DURATION=30s ROUNDS=3 bash benches/hop.sh
#
# Settings (environment)
#   DURATION=10s THREADS=2 CONNS=64   the saturation run (wrk -tTHREADS -cCONNS -dDURATION)
#   WARMUP=2s           a throw-away run before each saturation run (fills connection pools)
#   LIGHT_DURATION=5s   the light run, wrk -t1 -c1: the latency one hop adds with no queueing
#                       (0 skips it)
#   ROUNDS=1            repeat everything; ROUNDS>1 reports medians
#   BENCH_PATH=/api/v1/bench   the path every request asks for
#   UPSTREAM_WORKERS=auto      nginx worker_processes of the upstream
#   UPSTREAM_PORT=      default: a free port in 20000-31999 (below the ephemeral range)
#   SKIP_INSTALL=0      1: never call apt-get (fail if a tool is missing)
#   SKIP_BUILD=0        1: use the existing target/release/gatehouse
#   ALLOW_ERRORS=0      1: exit 0 even when a run saw socket errors or non-2xx answers
#   KEEP_WORK=0         1: keep the temp dir (configs, logs, raw wrk output)
#
# The numbers are for this machine only: wrk, nginx and the gateway share its cores, so the
# saturation rows measure the whole box, and the CPU columns say who spent it.
#
# Layout: the steps are functions (install_tools, build_gateway, start_upstream,
# write_gateway_config, start_gateway, run_target, report) called in order from main at the
# bottom, so that other modes can reuse them, e.g. handing the gateway command and its config to
# benches/peers.sh as GATEWAY_CMD / GATEWAY_URL.
set -uo pipefail

DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
LIGHT_DURATION=${LIGHT_DURATION:-5s}
ROUNDS=${ROUNDS:-1}
BENCH_PATH=${BENCH_PATH:-/api/v1/bench}
UPSTREAM_WORKERS=${UPSTREAM_WORKERS:-auto}
UPSTREAM_PORT=${UPSTREAM_PORT:-}
SKIP_INSTALL=${SKIP_INSTALL:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
ALLOW_ERRORS=${ALLOW_ERRORS:-0}
KEEP_WORK=${KEEP_WORK:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GATEHOUSE_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/gatehouse
UPSTREAM_BODY='{"ok":true,"service":"bench-upstream"}'

log() { printf '[hop] %s\n' "$*" >&2; }
die() { printf '[hop] error: %s\n' "$*" >&2; exit 1; }

secs_of() { # "10s" | "10" | "1m" -> seconds
  case "$1" in
    *m) echo $((${1%m} * 60)) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
  esac
}
DUR_S=$(secs_of "$DURATION")
WARM_S=$(secs_of "$WARMUP")
LIGHT_S=$(secs_of "$LIGHT_DURATION")
[[ "$DUR_S" =~ ^[0-9]+$ && "$DUR_S" -gt 0 && "$WARM_S" =~ ^[0-9]+$ && "$LIGHT_S" =~ ^[0-9]+$ ]] \
  || die "DURATION/WARMUP/LIGHT_DURATION must be whole seconds (e.g. 10s), DURATION more than 0"
[[ "$THREADS" =~ ^[1-9][0-9]*$ && "$CONNS" =~ ^[1-9][0-9]*$ && "$ROUNDS" =~ ^[1-9][0-9]*$ ]] \
  || die "THREADS, CONNS and ROUNDS must be positive integers"
[ "$CONNS" -ge "$THREADS" ] || die "CONNS must be at least THREADS (wrk needs a connection per thread)"

# ---------------------------------------------------------------- processes and cleanup
WORK=""
STARTED_PIDS=() # long-lived processes this script started (nginx master, gateway), stopped in reverse
WRK_PID=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$WRK_PID" ] && kill -0 "$WRK_PID" 2>/dev/null; then kill -TERM "$WRK_PID" 2>/dev/null; wait "$WRK_PID" 2>/dev/null; fi
  local i pid
  for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
    pid=${STARTED_PIDS[$i]}
    kill -0 "$pid" 2>/dev/null || continue
    kill -TERM "$pid" 2>/dev/null # nginx master: fast shutdown, its workers go with it
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [ -n "$WORK" ]; then
    if [ "$KEEP_WORK" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Something already uses 127.0.0.1:$1 (listening or as a connection's local port).
port_taken() {
  if command -v ss >/dev/null 2>&1; then
    [ -n "$(ss -Htan "( sport = :$1 )" 2>/dev/null)" ]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}
# A free port below the kernel's ephemeral range, so no outgoing connection can hold it.
free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 12000))
    port_taken "$p" || { echo "$p"; return 0; }
  done
  return 1
}
wait_listening() { # port seconds
  for _ in $(seq 1 $(($2 * 10))); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# ---------------------------------------------------------------- 1. tools
# First of the candidate package names that apt can install (Debian renames nginx flavours between
# releases; on bookworm nginx-light is only nginx plus an unused echo module).
apt_pick() {
  local name cand
  for name in "$@"; do
    cand=$(apt-cache policy "$name" 2>/dev/null | awk '/Candidate:/ { print $2; exit }')
    if [ -n "$cand" ] && [ "$cand" != "(none)" ]; then echo "$name"; return 0; fi
  done
  return 1
}

install_tools() {
  local missing=() pkgs=() p name
  command -v wrk >/dev/null 2>&1 || missing+=(wrk)
  command -v nginx >/dev/null 2>&1 || missing+=(nginx)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$SKIP_INSTALL" = 1 ] && die "missing: ${missing[*]} (and SKIP_INSTALL=1)"
  [ "$(id -u)" = 0 ] || die "missing: ${missing[*]}; run as root or install them"
  log "installing ${missing[*]} (apt-get update, then install)"
  apt-get update -q >/dev/null || die "apt-get update failed"
  for p in "${missing[@]}"; do
    if [ "$p" = nginx ]; then
      name=$(apt_pick nginx nginx-light) || die "no installable nginx package (tried nginx, nginx-light)"
    else
      name=$(apt_pick "$p") || die "apt has no candidate for $p"
    fi
    pkgs+=("$name")
  done
  log "apt-get install -y ${pkgs[*]}"
  # Debian's nginx postinst would start a system nginx on port 80; a policy-rc.d that answers 101
  # stops that. Only add one for the install when the machine has none, and take it away again.
  local tmp_policy=0 rc
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && tmp_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}" >/dev/null
  rc=$?
  [ "$tmp_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" -eq 0 ] || die "apt-get install ${pkgs[*]} failed"
  for p in wrk nginx curl; do command -v "$p" >/dev/null 2>&1 || die "$p still missing after install"; done
}

# ---------------------------------------------------------------- 2. gateway binary
build_gateway() {
  if [ "$SKIP_BUILD" = 1 ]; then
    log "SKIP_BUILD=1: using $GATEHOUSE_BIN"
  else
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
  fi
  [ -x "$GATEHOUSE_BIN" ] || die "$GATEHOUSE_BIN not found"
}

# ---------------------------------------------------------------- 3. upstream
# start_upstream <dir> <port>: the same nginx server as peers.sh's upstream. Sets UP_PID.
start_upstream() {
  local dir=$1 port=$2
  mkdir -p "$dir/logs"
  cat > "$dir/nginx.conf" <<EOF
worker_processes $UPSTREAM_WORKERS;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    server_tokens off;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    server {
        listen 127.0.0.1:$port reuseport backlog=4096;
        default_type application/json;
        location / {
            return 200 '$UPSTREAM_BODY';
        }
    }
}
EOF
  nginx -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" 2>"$dir/logs/configtest.log" \
    || { cat "$dir/logs/configtest.log" >&2; die "upstream: nginx config test failed"; }
  nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" > "$dir/logs/stdout.log" 2>&1 &
  UP_PID=$!
  STARTED_PIDS+=("$UP_PID")
  wait_listening "$port" 5 || { cat "$dir/logs/error.log" >&2; die "upstream did not listen on $port"; }
}

# ---------------------------------------------------------------- 4. gateway
# write_gateway_config <file> <listen address> <upstream url>: one anonymous catch-all route.
write_gateway_config() {
  cat > "$1" <<EOF
listeners:
  - address: $2
    name: bench
limits:
  shutdown_grace: 2s
routes:
  - name: bench
    path_prefix: /
    upstream: $3
    allow_anonymous: true
    timeout: 30s
EOF
}

# start_gateway <dir> <config>: starts it in <dir> (relative paths in the config resolve there)
# and waits for its "listening" line. Sets GW_PID and GW_URL.
start_gateway() {
  local dir=$1 config=$2 line addr
  (cd "$dir" && exec "$GATEHOUSE_BIN" --log-format json serve --config "$config") \
    > "$dir/gateway.out" 2> "$dir/gateway.log" &
  GW_PID=$!
  STARTED_PIDS+=("$GW_PID")
  for _ in $(seq 1 300); do
    line=$(grep -m1 '"message":"listening"' "$dir/gateway.log" 2>/dev/null) && break
    kill -0 "$GW_PID" 2>/dev/null || { cat "$dir/gateway.log" >&2; die "gateway exited during start"; }
    sleep 0.1
  done
  [ -n "${line:-}" ] || { tail -n 20 "$dir/gateway.log" >&2; die "no \"listening\" log line from the gateway within 30 s"; }
  addr=$(grep -o '"address":"[^"]*"' <<< "$line" | cut -d'"' -f4)
  [[ "$addr" =~ ^127\.0\.0\.1:[0-9]+$ ]] || die "unexpected listening address in: $line"
  GW_URL="http://$addr"
}

check_target() { # label url: one request must answer 200 with the upstream's body
  local body code
  body=$(curl -s --max-time 5 -o - -w '\n%{http_code}' "$2") || die "$1: curl $2 failed"
  code=${body##*$'\n'}
  body=${body%$'\n'*}
  [ "$code" = 200 ] && [ "$body" = "$UPSTREAM_BODY" ] || die "$1: $2 answered $code: $body"
  log "check ok   $1 ($2)"
}

# ---------------------------------------------------------------- 5. measuring
CLK_TCK=$(getconf CLK_TCK)
pid_ticks() { # utime+stime of a pid and its direct children (nginx workers), in clock ticks
  local total=0 t
  [ -n "$1" ] || { echo 0; return; }
  for t in $1 $(ps -o pid= --ppid "$1" 2>/dev/null); do
    [ -r "/proc/$t/stat" ] || continue
    total=$((total + $(sed 's/^.*) //' "/proc/$t/stat" | awk '{ print $12 + $13 }')))
  done
  echo "$total"
}
sys_ticks() { awk '/^cpu / { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6; exit }' /proc/stat; }
status_kb() { awk -v k="$2:" '$1 == k { print $2; exit }' "/proc/$1/status" 2>/dev/null; } # pid field

write_reporter() { # wrk Lua done(): one machine-readable RESULT line, latencies in microseconds
  cat > "$1" <<'EOF'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
EOF
}

# run_target <label> <url> <mode: load|light> <round> <gateway pid or empty>: warm-up (load mode),
# then the measured run; appends one tab-separated line to $RESULTS.
run_target() {
  local label=$1 url=$2 mode=$3 round=$4 gpid=$5
  local t=$THREADS c=$CONNS secs=$DUR_S
  [ "$mode" = light ] && { t=1; c=1; secs=$LIGHT_S; }
  [ "$secs" -gt 0 ] || return 0
  if [ "$mode" = load ] && [ "$WARM_S" -gt 0 ]; then
    wrk -t"$t" -c"$c" -d"${WARM_S}s" "$url" > "$WORK/wrk.$label.warm.txt" 2>&1 &
    WRK_PID=$!
    wait "$WRK_PID" || { cat "$WORK/wrk.$label.warm.txt" >&2; die "wrk warm-up failed for $label"; }
    WRK_PID=""
  fi
  local out="$WORK/wrk.$label.$mode.$round.txt" up0 gw0 s0 up1 gw1 s1 line
  up0=$(pid_ticks "$UP_PID"); gw0=$(pid_ticks "$gpid"); s0=$(sys_ticks)
  wrk -t"$t" -c"$c" -d"${secs}s" --latency -s "$WORK/report.lua" "$url" > "$out" 2>&1 &
  WRK_PID=$!
  wait "$WRK_PID" || { cat "$out" >&2; die "wrk failed for $label"; }
  WRK_PID=""
  up1=$(pid_ticks "$UP_PID"); gw1=$(pid_ticks "$gpid"); s1=$(sys_ticks)
  line=$(grep '^RESULT' "$out") || { cat "$out" >&2; die "no RESULT line from wrk for $label"; }
  [ -z "$gpid" ] || kill -0 "$gpid" 2>/dev/null || die "the gateway died during the $label run"
  printf '%s\t%s\t%s up_ticks=%s gw_ticks=%s sys_busy=%s sys_total=%s\n' "$label" "$mode" "${line#RESULT }" \
    "$((up1 - up0))" "$((gw1 - gw0))" "$((${s1% *} - ${s0% *}))" "$((${s1#* } - ${s0#* }))" >> "$RESULTS"
  log "$(printf '%-10s %-5s round %s: %s' "$label" "$mode" "$round" "$(grep -o 'requests=[0-9]* duration_us=[0-9]* p50_us=[0-9]* p99_us=[0-9]*' <<< "$line")")"
}

# ---------------------------------------------------------------- 6. report
# Medians over rounds of every column. The table's last line is
# "ERRORS <n>" (total socket errors and non-2xx answers), read by main and not shown.
report() {
  awk -F'\t' -v tck="$CLK_TCK" -v rounds="$ROUNDS" -v hdr="$1" -v threads="$THREADS" -v conns="$CONNS" '
  function kv(s, key,   m) { if (match(s, "(^| )" key "=[0-9]+")) { m = substr(s, RSTART, RLENGTH); sub(/^ ?[^=]*=/, "", m); return m + 0 } return 0 }
  function median(name, t,   i, j, x, a, n) {
    n = cnt[t]
    for (i = 1; i <= n; i++) a[i] = v[name, t, i]
    for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  {
    t = $1 SUBSEP $2
    if (!(t in cnt)) { order[++no] = t; cnt[t] = 0 }
    n = ++cnt[t]; s = $3; req = kv(s, "requests"); us = 1e6 / tck
    v["rps", t, n] = req / (kv(s, "duration_us") / 1e6)
    v["p50", t, n] = kv(s, "p50_us") / 1000
    v["p99", t, n] = kv(s, "p99_us") / 1000
    v["err", t, n] = kv(s, "connect") + kv(s, "read") + kv(s, "write") + kv(s, "status") + kv(s, "timeout")
    v["up", t, n] = kv(s, "up_ticks") * us / req
    v["gw", t, n] = kv(s, "gw_ticks") * us / req
    v["rest", t, n] = (kv(s, "sys_busy") - kv(s, "up_ticks") - kv(s, "gw_ticks")) * us / req
    v["idle", t, n] = 100 * (1 - kv(s, "sys_busy") / kv(s, "sys_total"))
    gw[t] = ($1 != "direct")
    errors += v["err", t, n]
  }
  END {
    printf "== hop.sh: %s; medians of %d round(s) ==\n", hdr, rounds
    printf "%-10s %-6s %9s %9s %8s %8s %7s | %-27s %5s\n", "target", "mode", "req/s", "vs direct", "p50 ms", "p99 ms", "errors", "CPU us/req: upstream gw rest", "idle%"
    for (k = 1; k <= no; k++) {
      t = order[k]; split(t, p, SUBSEP); d = "direct" SUBSEP p[2]
      ratio = (d in cnt) ? median("rps", t) / median("rps", d) : 0
      g = gw[t] ? sprintf("%5.1f", median("gw", t)) : "    -"
      printf "%-10s %-6s %9.0f %9.2f %8.3f %8.3f %7d | %13.1f %s %5.1f %5.1f\n", p[1], p[2], median("rps", t), ratio, median("p50", t), median("p99", t), median("err", t), median("up", t), g, median("rest", t), median("idle", t)
    }
    print "load = wrk -t" threads " -c" conns " (closed loop: latency is mostly queueing); light = wrk -t1 -c1 (what the hop adds)."
    print "CPU us/req: upstream = nginx, gw = gatehouse, rest = wrk + kernel + anything else on the box."
    print "ERRORS " errors
  }' "$RESULTS"
}

# ---------------------------------------------------------------- main
main() {
  install_tools
  build_gateway

  WORK=$(mktemp -d -t gatehouse-load.XXXXXX) || die "mktemp failed"
  chmod 755 "$WORK" # nginx workers may run as nobody and must reach their prefix
  mkdir -p "$WORK/up" "$WORK/gw"
  RESULTS="$WORK/results.tsv"
  : > "$RESULTS"
  write_reporter "$WORK/report.lua"

  if [ -z "$UPSTREAM_PORT" ]; then UPSTREAM_PORT=$(free_port) || die "no free port found in 20000-31999"; fi
  port_taken "$UPSTREAM_PORT" && die "127.0.0.1:$UPSTREAM_PORT is already in use"
  start_upstream "$WORK/up" "$UPSTREAM_PORT"
  local direct="http://127.0.0.1:$UPSTREAM_PORT"
  log "upstream nginx on $direct (pid $UP_PID, workers $UPSTREAM_WORKERS), work dir $WORK"

  write_gateway_config "$WORK/gw/gatehouse.yaml" "127.0.0.1:0" "$direct"
  start_gateway "$WORK/gw" "$WORK/gw/gatehouse.yaml"
  log "gatehouse on $GW_URL (pid $GW_PID)"

  check_target direct "$direct$BENCH_PATH"
  check_target gatehouse "$GW_URL$BENCH_PATH"
  local rss_idle
  rss_idle=$(status_kb "$GW_PID" VmRSS)

  log "wrk -t$THREADS -c$CONNS -d$DURATION (warm-up $WARMUP), light -t1 -c1 -d$LIGHT_DURATION, $ROUNDS round(s), $(nproc) CPUs"
  local round
  for round in $(seq 1 "$ROUNDS"); do
    run_target direct "$direct$BENCH_PATH" load "$round" ""
    run_target gatehouse "$GW_URL$BENCH_PATH" load "$round" "$GW_PID"
    run_target direct "$direct$BENCH_PATH" light "$round" ""
    run_target gatehouse "$GW_URL$BENCH_PATH" light "$round" "$GW_PID"
  done
  local rss_after hwm
  rss_after=$(status_kb "$GW_PID" VmRSS)
  hwm=$(status_kb "$GW_PID" VmHWM)

  local table errors
  table=$(report "$(nproc) CPUs, nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') (workers $UPSTREAM_WORKERS), wrk -t$THREADS -c$CONNS -d$DURATION, warm-up $WARMUP") \
    || die "report failed"
  errors=$(sed -n 's/^ERRORS //p' <<< "$table")
  sed '/^ERRORS /d' <<< "$table"
  awk -v i="$rss_idle" -v a="$rss_after" -v h="$hwm" \
    'BEGIN { printf "gatehouse RSS: %.1f MiB idle, %.1f MiB after the runs (peak %.1f MiB)\n", i / 1024, a / 1024, h / 1024 }'
  if [ "${errors:-0}" -gt 0 ] && [ "$ALLOW_ERRORS" != 1 ]; then
    die "$errors socket errors or non-2xx answers (see the table; ALLOW_ERRORS=1 to accept)"
  fi
}

main "$@"
