#!/usr/bin/env bash
# load.sh - Gatehouse side by side with nginx doing its job (benches/peers.sh), in one run.
#
# What it does
#   1. builds the release binary (SKIP_BUILD=1 to reuse it);
#   2. writes, into a temp dir, a credentials file with USERS API users (one api_key user whose
#      token the run uses, one hmac user, the rest api_key users with a key each) through the
#      real CLI for the two used users and a generated YAML block for the others, and a
#      gatehouse.yaml with one route /  -> the peers script's upstream (and a route /tls to the
#      same upstream over TLS, verified against a CA made with openssl: the https-upstream
#      rows gateway-key-tls and nginx-key-tls; and a route /h2 to it over HTTP/2 without TLS:
#      gateway-key-h2 beside nginx-key-h2, nginx's grpc_pass), metrics (admin listener)
#      and the audit log (a file) on, and a rate limit that never triggers (nginx-key's
#      limit_req is set the same way, so both pay for the check);
#   3. runs benches/peers.sh with GATEWAY_CMD / GATEWAY_URL / GATEWAY_KEY /
#      GATEWAY_HMAC_*, which starts everything, checks it, load-tests each target with wrk and
#      prints the table (ratios to direct, CPU µs per request per process, p50/p99, PSS).
#
# Usage
#   bash benches/load.sh                      # ROUNDS=3 by default
#   ROUNDS=1 DURATION=5s bash benches/load.sh # a quick look
#   USERS=100000 bash benches/load.sh         # the large-snapshot figure
#
#   4. with SHARED=1 (the default): starts redis-server (Debian's; installed when missing) and
#      the same gateway a second time with `shared_state:` in it (rows shared-key, shared-hmac);
#      afterwards prints Redis's own count of commands per request it served (INFO
#      commandstats over the usage it recorded) and its CPU time, and Redis's own round trip
#      at light load (redis-benchmark -c1), the floor of the p50 a signed request gains —
#      also with the benchmark and Redis pinned to one CPU and to two (taskset), to show
#      what waking a process on the other CPU costs on this box.
#
# Settings: USERS=1000, SKIP_BUILD=0, GATEWAY_PORT=18090, SHARED_PORT=18091, REDIS_PORT=18092,
# BASE_PORT=18080 (the upstream), SHARED=1, GUEST_HALT_POLL_NS (unset: the machine's own;
# see benches/common.sh), plus every setting of benches/peers.sh (DURATION, ROUNDS, CONNS,
# …), passed through.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=${PEERS:-$ROOT/benches/peers.sh}
USERS=${USERS:-1000}
SKIP_BUILD=${SKIP_BUILD:-0}
BASE_PORT=${BASE_PORT:-18080}
GATEWAY_PORT=${GATEWAY_PORT:-18090}
SHARED_PORT=${SHARED_PORT:-18091}
REDIS_PORT=${REDIS_PORT:-18092}
SHARED=${SHARED:-1}
export ROUNDS=${ROUNDS:-3} BASE_PORT
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/gatehouse

log() { printf '[load] %s\n' "$*" >&2; }
[ -e "$PEERS" ] || { log "no $PEERS"; exit 1; }
command -v python3 >/dev/null || { log "python3 is needed"; exit 1; }
[[ "$USERS" =~ ^[0-9]+$ && "$USERS" -ge 2 ]] || { log "USERS must be at least 2"; exit 1; }

if [ "$SKIP_BUILD" != 1 ]; then
  log "cargo build --release"
  (cd "$ROOT" && cargo build --release --locked --quiet)
fi

WORK=$(mktemp -d /tmp/gatehouse-peers.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  bench_halt_poll_restore
  [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
}
CREDS=$WORK/credentials.yaml
source "$ROOT/benches/common.sh"
trap cleanup EXIT
bench_halt_poll

log "writing $USERS users to $CREDS"
KEY=$(bench_key_user)
bench_gh users create bench-hmac --auth-method hmac --role bench >/dev/null
read -r HMAC_ID HMAC_SECRET < <(bench_gh keys add bench-hmac --label bench |
  python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["key"]["id"], d["secret"])')
python3 "$ROOT/benches/fill_users.py" "$CREDS" "$((USERS - 2))"

# Every accepted signature is remembered for its window (max_skew after its timestamp); a
# 3-round run signs about a million requests with one key inside one window.
bench_config "$WORK/gatehouse.yaml" bench "$GATEWAY_PORT" "$BASE_PORT" "" "auth:
  hmac:
    replay_cache_entries: 3000000"
# The https-upstream rows: a CA and a certificate for localhost (openssl), the upstream
# nginx listening with it on BASE_PORT+4 (peers.sh), and a route /tls to it that strips
# its prefix, so the upstream sees the same path as on the plain route. The HTTP/2 rows:
# a route /h2 to the upstream's h2c listener on BASE_PORT+6.
TLS_DIR=$WORK/upstream-tls
mkdir -p "$TLS_DIR"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=bench CA" \
  -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
  -keyout "$TLS_DIR/key.pem" -out "$TLS_DIR/cert.csr" 2>/dev/null
openssl x509 -req -in "$TLS_DIR/cert.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" -CAcreateserial -days 2 \
  -extfile <(printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n') -out "$TLS_DIR/cert.pem" 2>/dev/null
cat >>"$WORK/gatehouse.yaml" <<YAML
  - name: bench-tls
    path_prefix: /tls
    strip_prefix: true
    upstream: https://127.0.0.1:$((BASE_PORT + 4))
    upstream_tls: { ca: $TLS_DIR/ca.pem, server_name: localhost }
  - name: bench-h2
    path_prefix: /h2
    strip_prefix: true
    upstream: h2c://127.0.0.1:$((BASE_PORT + 6))
YAML
"$BIN" check-config --config "$WORK/gatehouse.yaml" >/dev/null

SHARED_ENV=()
if [ "$SHARED" = 1 ]; then
  if ! command -v redis-server >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || { log "redis-server is missing: install it, run as root, or SHARED=0"; exit 1; }
    log "installing redis-server (Debian)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
  fi
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --lazyfree-lazy-expire yes --daemonize no \
    --dir "$WORK" >"$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  bench_config "$WORK/gatehouse-shared.yaml" shared "$SHARED_PORT" "$BASE_PORT" "" "shared_state:
  redis: redis://127.0.0.1:$REDIS_PORT
  key_prefix: \"bench:\""
  # Its own audit log: two processes appending to one file would interleave.
  sed -i "s#$WORK/audit.log#$WORK/audit-shared.log#" "$WORK/gatehouse-shared.yaml"
  "$BIN" check-config --config "$WORK/gatehouse-shared.yaml" >/dev/null
  # A known admin port, to read its operation counts after the run.
  SHARED_ADMIN_PORT=$(bench_free_port)
  sed -i "s#^  address: 127.0.0.1:0#  address: 127.0.0.1:$SHARED_ADMIN_PORT#" "$WORK/gatehouse-shared.yaml"
  "$BIN" --log-format json serve --config "$WORK/gatehouse-shared.yaml" >"$WORK/shared.log" 2>&1 &
  SHARED_PID=$!
  PIDS+=("$SHARED_PID")
  for _ in $(seq 100); do grep -q '"admin listening"' "$WORK/shared.log" && break; sleep 0.1; done
  grep -q '"admin listening"' "$WORK/shared.log" || { tail -n 20 "$WORK/shared.log" >&2; exit 1; }
  redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
  SHARED_ENV=(SHARED_URL=http://127.0.0.1:$SHARED_PORT SHARED_PID=$SHARED_PID)
fi

log "running $PEERS (ROUNDS=$ROUNDS)"
env "${SHARED_ENV[@]}" \
UPSTREAM_TLS_DIR=$TLS_DIR UPSTREAM_H2=1 GATEWAY_URL=http://127.0.0.1:$GATEWAY_PORT GATEWAY_KEY=$KEY \
  GATEWAY_HMAC_KEY_ID=$HMAC_ID GATEWAY_HMAC_SECRET=$HMAC_SECRET \
  GATEWAY_CMD="$BIN --log-format json serve --config $WORK/gatehouse.yaml" \
  bash "$PEERS"
log "audit log: $(wc -l <"$WORK/audit.log") records"
if [ "$SHARED" = 1 ]; then
  # Round trips: the shared gateway's own count of Redis operations (each one round trip),
  # heartbeats and usage flushes included, over the requests it served.
  curl -s "http://127.0.0.1:$SHARED_ADMIN_PORT/metrics" >"$WORK/shared.metrics"
  served=$(awk '/^gatehouse_requests_total/ { n += $NF } END { print n + 0 }' "$WORK/shared.metrics")
  ops=$(awk '/^gatehouse_shared_state_op_duration_seconds_count/ { n += $NF } END { print n + 0 }' "$WORK/shared.metrics")
  grep '^gatehouse_shared_state_op_duration_seconds_count' "$WORK/shared.metrics" | sed 's/^/[load]   /' >&2
  redis_cpu=$(awk '{ printf "%.1f", ($14 + $15) / '"$(getconf CLK_TCK)"' }' "/proc/$REDIS_PID/stat")
  log "redis: $ops operations for $served requests served in shared mode = $(awk -v c="$ops" -v s="$served" 'BEGIN { printf "%.4f", s ? c / s : 0 }') round trips per request; redis-server CPU ${redis_cpu}s"
  redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' | grep -E '^cmdstat_(evalsha|eval|set|sadd|pexpire):' | sed 's/^/[load]   /' >&2
  # Commands as Redis counted them (a pipeline of records is one round trip of many
  # commands; scripts' inner commands count too), and its read events: each read is one
  # batch from one connection, so reads per request are the round trips Redis served.
  cmds=$(redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' | awk -F'[=,:]' '/^cmdstat_/ && !/^cmdstat_(info|config)/ { s += $3 } END { print s + 0 }')
  reads=$(redis-cli -p "$REDIS_PORT" info stats | tr -d '\r' | awk -F: '/^total_reads_processed:/ { print $2 }')
  log "redis: $cmds commands in $reads reads for $served requests = $(awk -v c="$cmds" -v r="$reads" -v s="$served" 'BEGIN { printf "%.3f commands and %.4f reads", s ? c / s : 0, s ? r / s : 0 }') per request"
  # A signed request waits for one round trip to Redis before it goes upstream, so the p50
  # it adds at light load cannot be below Redis's own: measured here, in the same run, by
  # Redis's benchmark with one connection (its keys are its own, after the counts above).
  rtt=$(redis-benchmark -p "$REDIS_PORT" -c 1 -n 20000 -t set -q 2>/dev/null | tr '\r' '\n' | sed -n 's/.*p50=\([0-9.]*\) msec.*/\1/p' | tail -n 1)
  echo "redis round trip at light load (redis-benchmark -c1 SET): p50 ${rtt:-?} ms, the floor of what shared-hmac adds over gateway-hmac"
  # The same with the benchmark on Redis's CPU: how much of that round trip is waking a
  # process on another CPU (on a VM without halt polling, most of it), which a request
  # pays whenever the scheduler put its worker and Redis on different CPUs.
  if command -v taskset >/dev/null && [ "$(nproc)" -gt 1 ]; then
    taskset -pc 0 "$REDIS_PID" >/dev/null
    same=$(taskset -c 0 redis-benchmark -p "$REDIS_PORT" -c 1 -n 20000 -t set -q 2>/dev/null | tr '\r' '\n' | sed -n 's/.*p50=\([0-9.]*\) msec.*/\1/p' | tail -n 1)
    other=$(taskset -c 1 redis-benchmark -p "$REDIS_PORT" -c 1 -n 20000 -t set -q 2>/dev/null | tr '\r' '\n' | sed -n 's/.*p50=\([0-9.]*\) msec.*/\1/p' | tail -n 1)
    echo "redis round trip, benchmark and Redis on one CPU: p50 ${same:-?} ms; on two CPUs: p50 ${other:-?} ms"
  fi
fi
