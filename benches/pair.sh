#!/usr/bin/env bash
# pair.sh - compares two gatehouse binaries on a shared, noisy box: both run side by side
# against one local nginx upstream, and short wrk rounds alternate between them (A B, B A,
# A B, ...) so that the machine's drift hits both alike. Prints each round and the median,
# over rounds, of B's figure divided by A's in the same round: requests/s, and the proxy's
# user, kernel and total CPU per request (from /proc/<pid>/stat).
#
# Run it once with the same binary on both sides (an A/A run) to see the noise band of the
# box at that moment: a B/A ratio inside that band is no evidence either way.
#
# MODE=hmac measures the signed route instead of the API-key one. wrk cannot compute an
# HMAC per request without taxing the load generator, so before each round python3 signs
# more requests than the round can send (each with its own query string, one timestamp), and
# wrk replays them from a Lua request() callback; a round that ran out of them would send
# replays, which the gateway refuses (reported as non-2xx answers).
#
# SHARED_B=1 gives side B `shared_state:` in a redis-server that pair.sh starts on a free port
# (Debian's; it must be installed): run with the same binary on both sides, it compares
# shared mode with local mode in one alternating run (the shared-state rows: B/A req/s,
# and at CONNS=1 the p50 shared mode adds). Redis's CPU is the box's, shared by both sides.
#
# Usage
#   bash benches/pair.sh OLD_BIN NEW_BIN
#   SHARED_B=1 MODE=hmac bash benches/pair.sh BIN BIN            # shared vs local, saturated
#   SHARED_B=1 MODE=hmac CONNS=1 bash benches/pair.sh BIN BIN    # the same at light load
#   ROUNDS=20 DURATION=3 CONNS=64 bash benches/pair.sh /tmp/a /tmp/b
#   MODE=hmac bash benches/pair.sh /tmp/a /tmp/b
#   GUEST_HALT_POLL_NS=200000 SHARED_B=1 MODE=hmac CONNS=1 bash benches/pair.sh BIN BIN
#                                   # with idle vCPUs polling first (benches/common.sh)
# Needs nginx, wrk, curl, python3 (installs none of them; benches/load.sh does).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ $# -eq 2 ] || { echo "usage: $0 BIN_A BIN_B" >&2; exit 2; }
ROUNDS=${ROUNDS:-10}
DURATION=${DURATION:-3}
CONNS=${CONNS:-64}
THREADS=$([ "$CONNS" -ge 2 ] && echo 2 || echo 1)
MODE=${MODE:-key}
SHARED_B=${SHARED_B:-0}
log() { printf '[pair] %s\n' "$*" >&2; }
[ "$MODE" = key ] || [ "$MODE" = hmac ] || { log "MODE is key or hmac, not $MODE"; exit 2; }
for t in nginx wrk curl python3; do
  command -v "$t" >/dev/null || { log "missing: $t"; exit 1; }
done
for b in "$1" "$2"; do [ -x "$b" ] || { log "not an executable: $b"; exit 1; }; done

source "$ROOT/benches/common.sh"
BASE=$(mktemp -d /tmp/gatehouse-pair.XXXXXX)
chmod 755 "$BASE"
PIDS=()
trap 'bench_cleanup "$BASE"' EXIT
bench_halt_poll
UP_PORT=$(bench_free_port)
bench_upstream "$BASE/up" "$UP_PORT"
SHARED_YAML=""
if [ "$SHARED_B" = 1 ]; then
  command -v redis-server >/dev/null || { log "SHARED_B=1 needs redis-server"; exit 1; }
  REDIS_PORT=$(bench_free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --lazyfree-lazy-expire yes --dir "$BASE" >"$BASE/redis.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  SHARED_YAML="shared_state:
  redis: redis://127.0.0.1:$REDIS_PORT
  key_prefix: \"pair:\""
fi

# One gateway per binary, each with its own directory, 1,000 users and key (its own CLI).
declare -A PID PORT ADMIN_PORT TOKEN HMAC_ID HMAC_SECRET
for side in A B; do
  BIN=$([ "$side" = A ] && echo "$1" || echo "$2")
  WORK=$BASE/$side
  CREDS=$WORK/credentials.yaml
  mkdir -p "$WORK"
  TOKEN[$side]=$(bench_key_user)
  bench_gh users create bench-hmac --auth-method hmac --role bench >/dev/null
  read -r "HMAC_ID[$side]" "HMAC_SECRET[$side]" < <(bench_gh keys add bench-hmac --label bench |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["key"]["id"], d["secret"])')
  python3 "$ROOT/benches/fill_users.py" "$CREDS" 998
  PORT[$side]=$(bench_free_port)
  # Every accepted signature is remembered for its window: room for every round's.
  bench_config "$WORK/gatehouse.yaml" bench "${PORT[$side]}" "$UP_PORT" "" "auth:
  hmac:
    replay_cache_entries: 3000000
$([ "$side" = B ] && printf '%s' "$SHARED_YAML")"
  # A known admin port: the end of the run reads B's shared-state error counters.
  ADMIN_PORT[$side]=$(bench_free_port)
  sed -i "s#^  address: 127.0.0.1:0#  address: 127.0.0.1:${ADMIN_PORT[$side]}#" "$WORK/gatehouse.yaml"
  "$BIN" serve --config "$WORK/gatehouse.yaml" 2>"$WORK/gateway.log" &
  PID[$side]=$!
  PIDS+=("${PID[$side]}")
done
for side in A B; do
  url=http://127.0.0.1:${PORT[$side]}/api/v1/bench
  for _ in $(seq 1 100); do
    curl -sf -o /dev/null -H "X-API-Key: ${TOKEN[$side]}" "$url" && break
    kill -0 "${PID[$side]}" 2>/dev/null || { tail "$BASE/$side/gateway.log" >&2; exit 1; }
    sleep 0.2
  done
  curl -sf -o /dev/null -H "X-API-Key: ${TOKEN[$side]}" "$url" || { log "$side does not answer"; exit 1; }
  wrk -t"$THREADS" -c"$CONNS" -d2s -H "X-API-Key: ${TOKEN[$side]}" "$url" >/dev/null # warm-up
  # Requests signed for a round (more than 100,000 req/s would send some twice, answered
  # 401 as replays and reported); then twice what the previous round sent.
  echo $((DURATION * 100000)) >"$BASE/$side/to_sign"
done

# Replays pre-signed, fixed-length raw requests; args: <file prefix> <record length>.
# Thread k reads <prefix>.<k>, so no two threads send the same signature.
cat >"$BASE/signed.lua" <<'EOF'
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end
local buf, len, pos = "", 0, 1
function init(args)
  local f = assert(io.open(args[1] .. "." .. tid, "rb"))
  buf = f:read("*a")
  f:close()
  len = tonumber(args[2])
end
function request()
  if pos > #buf then pos = 1 end
  local r = string.sub(buf, pos, pos + len - 1)
  pos = pos + len
  return r
end
EOF

# sign SIDE TAG: THREADS files $BASE/SIDE/signed.<k> of fixed-length signed GETs (request i
# to file i mod THREADS), each with its own query string; prints the record length.
sign() {
  python3 - "$BASE/$1/signed" "$(cat "$BASE/$1/to_sign")" "${HMAC_ID[$1]}" "${HMAC_SECRET[$1]}" \
    "$2" "127.0.0.1:${PORT[$1]}" "$THREADS" <<'PY'
import hashlib, hmac, sys, time
out, n, keyid, secret, tag, hostport, nthreads = sys.argv[1:8]
n, nthreads = int(n), int(nthreads)
ts, width = str(int(time.time())), len(str(n - 1))
base = hmac.new(secret.encode(), digestmod=hashlib.sha256)
bufs = [[] for _ in range(nthreads)]
for i in range(n):
    p = f"/api/v1/bench?{tag}={i:0{width}d}"
    h = base.copy()
    h.update(f"{ts}GET{p}".encode())
    bufs[i % nthreads].append(f"GET {p} HTTP/1.1\r\nHost: {hostport}\r\nX-API-Key: {keyid}\r\n"
                              f"X-Timestamp: {ts}\r\nX-Signature: {h.hexdigest()}\r\n\r\n")
for k in range(nthreads):
    with open(f"{out}.{k}", "w", newline="") as f:
        f.write("".join(bufs[k]))
print(len(bufs[0][0]))
PY
}

# One round of one side: "req/s user_us sys_us" (CPU per request, clock ticks of the pid).
# `round SIDE N`; runs in a subshell, so what must outlive it goes to files.
round() {
  local side=$1 before after out n len
  local url=http://127.0.0.1:${PORT[$side]}/api/v1/bench
  local args=(-H "X-API-Key: ${TOKEN[$side]}" "$url")
  if [ "$MODE" = hmac ]; then
    len=$(sign "$side" "r$2") || { log "signing failed"; exit 1; }
    args=(-s "$BASE/signed.lua" "$url" -- "$BASE/$side/signed" "$len")
  fi
  before=$(awk '{print $14, $15}' "/proc/${PID[$side]}/stat")
  out=$(wrk -t"$THREADS" -c"$CONNS" -d"${DURATION}s" --latency "${args[@]}")
  after=$(awk '{print $14, $15}' "/proc/${PID[$side]}/stat")
  n=$(awk '/requests in/ { print $1 }' <<<"$out")
  if grep -q "Non-2xx" <<<"$out"; then log "round $2 of $side: $(grep -o 'Non-2xx.*' <<<"$out")"; fi
  # Twice what this round sent, for the next: no round may run out of signatures.
  echo $((n * 2 + 20000)) >"$BASE/$side/to_sign"
  python3 -c "import os,sys; t=os.sysconf('SC_CLK_TCK'); b=list(map(int,'$before'.split())); a=list(map(int,'$after'.split())); n=$n
print(round(n/$DURATION), round((a[0]-b[0])*1e6/t/n, 2), round((a[1]-b[1])*1e6/t/n, 2), $(p50_us <<<"$out"))"
}

# The p50 of a wrk --latency report, in microseconds.
p50_us() {
  awk '$1 == "50%" { v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
    print (u == "ms" ? v * 1000 : (u == "s" ? v * 1000000 : v)); exit }'
}

log "A=$1"
log "B=$2"
log "MODE=$MODE: $ROUNDS alternating rounds of wrk -t$THREADS -c$CONNS -d${DURATION}s each; per round: req/s user_us sys_us p50_us"
[ "$SHARED_B" = 1 ] && log "SHARED_B=1: B keeps replay records, limits and usage in Redis at 127.0.0.1:$REDIS_PORT"
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then a=$(round A "$r"); b=$(round B "$r"); else b=$(round B "$r"); a=$(round A "$r"); fi
  echo "$a | $b"
done | tee "$BASE/rounds.txt" >&2
python3 - "$BASE/rounds.txt" <<'EOF'
import statistics as st, sys
rows = [line.split("|") for line in open(sys.argv[1]) if "|" in line]
A = [list(map(float, r[0].split())) for r in rows]
B = [list(map(float, r[1].split())) for r in rows]
def show(name, fa, fb):
    ra = [fa(a) for a in A]; rb = [fb(b) for b in B]
    ratio = [y / x for x, y in zip(ra, rb) if x]
    print(f"{name:14s} A {st.median(ra):10.2f}  B {st.median(rb):10.2f}  B/A median {st.median(ratio):.3f} "
          f"(rounds {min(ratio):.2f}-{max(ratio):.2f})")
show("req/s", lambda r: r[0], lambda r: r[0])
show("user us/req", lambda r: r[1], lambda r: r[1])
show("kernel us/req", lambda r: r[2], lambda r: r[2])
show("CPU us/req", lambda r: r[1] + r[2], lambda r: r[1] + r[2])
show("p50 us", lambda r: r[3], lambda r: r[3])
d = [b[3] - a[3] for a, b in zip(A, B)]
print(f"p50 B-A us     median {st.median(d):+.1f} (rounds {min(d):+.1f} to {max(d):+.1f})")
EOF
if [ "$SHARED_B" = 1 ]; then
  ops=$(redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' | awk -F'[=,:]' '/^cmdstat_/ { s += $3 } END { print s + 0 }')
  log "redis served $ops commands in all (B's rounds, warm-up and checks included)"
  # Each read event of Redis's is one batch from a gateway connection: commands per read
  # is the pipeline depth the batching achieved (1.0: a round trip per request).
  reads=$(redis-cli -p "$REDIS_PORT" info stats | tr -d '\r' | awk -F: '/^total_reads_processed:/ { print $2 }')
  log "redis processed $reads reads: $(python3 -c "print(f'{$ops / max($reads, 1):.2f}')") commands per read"
  # Redis's own CPU (user + kernel) per request of B's rounds: the part of the shared
  # mode's cost that the gateway's CPU per request above does not show.
  cpu=$(redis-cli -p "$REDIS_PORT" info cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ { s += $2 } END { print s + 0 }')
  served=$(awk -F'|' -v d="$DURATION" '{ split($2, b, " "); s += b[1] * d } END { print s + 0 }' "$BASE/rounds.txt")
  # A signed request in B waits for one round trip to Redis: Redis's own, with one
  # connection, is the floor of the p50 that B adds at CONNS=1.
  rtt=$(redis-benchmark -p "$REDIS_PORT" -c 1 -n 20000 -q SADD pair:rtt __rand_int__ 2>/dev/null | tr '\r' '\n' | sed -n 's/.*p50=\([0-9.]*\) msec.*/\1/p' | tail -n 1)
  log "redis round trip (redis-benchmark -c 1 SADD): p50 ${rtt:-?} ms"
  # Anything B decided without Redis (a timeout, an error, the breaker open) shows here.
  curl -s "http://127.0.0.1:${ADMIN_PORT[B]}/metrics" | grep -E '^gatehouse_shared_state_(errors|fallbacks)_total' |
    awk '$NF != 0' | sed 's/^/[pair] B: /' >&2 || true
  log "redis used $cpu s of CPU: $(python3 -c "print(f'{$cpu * 1e6 / max($served, 1):.2f}')") us per request of B's rounds ($served)"
fi
