#!/usr/bin/env bash
# load.sh - Gatehouse side by side with nginx doing its job (benches/peers.sh), in one run.
#
# What it does
#   1. builds the release binary (SKIP_BUILD=1 to reuse it);
#   2. writes, into a temp dir, a credentials file with USERS API users (one api_key user whose
#      token the run uses, one hmac user, the rest api_key users with a key each) through the
#      real CLI for the two used users and a generated YAML block for the others, and a
#      gatehouse.yaml with one route /  -> the peers script's upstream, metrics (admin listener)
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
# Settings: USERS=1000, SKIP_BUILD=0, GATEWAY_PORT=18090, BASE_PORT=18080 (the upstream), plus
# every setting of benches/peers.sh (DURATION, ROUNDS, CONNS, …), passed through.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=${PEERS:-$ROOT/benches/peers.sh}
USERS=${USERS:-1000}
SKIP_BUILD=${SKIP_BUILD:-0}
BASE_PORT=${BASE_PORT:-18080}
GATEWAY_PORT=${GATEWAY_PORT:-18090}
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
[ "${KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
CREDS=$WORK/credentials.yaml
source "$ROOT/benches/common.sh"

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
"$BIN" check-config --config "$WORK/gatehouse.yaml" >/dev/null

log "running $PEERS (ROUNDS=$ROUNDS)"
GATEWAY_URL=http://127.0.0.1:$GATEWAY_PORT GATEWAY_KEY=$KEY \
  GATEWAY_HMAC_KEY_ID=$HMAC_ID GATEWAY_HMAC_SECRET=$HMAC_SECRET \
  GATEWAY_CMD="$BIN --log-format json serve --config $WORK/gatehouse.yaml" \
  bash "$PEERS"
log "audit log: $(wc -l <"$WORK/audit.log") records"
