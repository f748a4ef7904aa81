#!/usr/bin/env bash
# instructions.sh - user-space instructions per proxied request, counted by callgrind: a
# figure that does not move with the machine's load, for comparing two builds on a shared box
# where wall-clock rounds vary by ±15 %.
#
# What it does: writes 1,000 API users (the CLI plus benches/fill_users.py), starts a local
# nginx upstream and the gateway under `valgrind --tool=callgrind` with instrumentation off,
# warms up, switches instrumentation on for a wrk run against the key-authenticated route
# (metrics, audit log and rate limit on, as in load.sh), switches it off, and divides the
# instructions by the requests the audit log recorded in that window. The kernel's share
# (about half of the gateway's CPU) is not counted.
#
# Usage
#   bash benches/instructions.sh [BIN]          # BIN defaults to target/release/gatehouse
#   DURATION=10 CONNS=4 KEEP_WORK=1 bash benches/instructions.sh /tmp/old-gatehouse
# Needs valgrind, nginx, wrk, curl, python3 (installs none of them).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${1:-${CARGO_TARGET_DIR:-$ROOT/target}/release/gatehouse}
DURATION=${DURATION:-10}
CONNS=${CONNS:-4}
log() { printf '[instructions] %s\n' "$*" >&2; }
for t in valgrind callgrind_control callgrind_annotate nginx wrk curl python3; do
  command -v "$t" >/dev/null || { log "missing: $t"; exit 1; }
done
[ -x "$BIN" ] || { log "no binary at $BIN (cargo build --release)"; exit 1; }

source "$ROOT/benches/common.sh"
WORK=$(mktemp -d /tmp/gatehouse-instructions.XXXXXX)
chmod 755 "$WORK"
PIDS=()
trap 'bench_cleanup "$WORK"' EXIT
UP_PORT=$(bench_free_port)
GW_PORT=$(bench_free_port)
bench_upstream "$WORK/up" "$UP_PORT"

CREDS=$WORK/credentials.yaml
KEY=$(bench_key_user)
python3 "$ROOT/benches/fill_users.py" "$CREDS" 999
bench_config "$WORK/gatehouse.yaml" bench "$GW_PORT" "$UP_PORT"

valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/callgrind.out" \
  "$BIN" serve --config "$WORK/gatehouse.yaml" 2>"$WORK/gateway.log" &
GW=$!
PIDS+=("$GW")
URL=http://127.0.0.1:$GW_PORT/api/v1/bench
for _ in $(seq 1 200); do
  curl -sf -o /dev/null -H "X-API-Key: $KEY" "$URL" && break
  kill -0 "$GW" 2>/dev/null || { tail "$WORK/gateway.log" >&2; exit 1; }
  sleep 0.3
done
wrk -t1 -c"$CONNS" -d3s -H "X-API-Key: $KEY" "$URL" >/dev/null # warm-up: pools, caches
sleep 0.5
before=$(wc -l <"$WORK/audit.log")
callgrind_control -i on "$GW" >/dev/null 2>&1
wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "X-API-Key: $KEY" "$URL" >"$WORK/wrk.txt"
callgrind_control -i off "$GW" >/dev/null 2>&1
sleep 0.5 # the audit writer flushes every 10 ms
after=$(wc -l <"$WORK/audit.log")
callgrind_control -d "$GW" >/dev/null 2>&1
sleep 1
ir=$(callgrind_annotate "$WORK/callgrind.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
n=$((after - before))
[ "$n" -gt 0 ] && [ -n "$ir" ] || { log "no requests or no count (see $WORK with KEEP_WORK=1)"; exit 1; }
echo "requests=$n instructions=$ir per_request=$((ir / n)) binary=$BIN"
