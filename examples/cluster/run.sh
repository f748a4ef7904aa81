#!/usr/bin/env bash
# Three gateways sharing one Redis, on 127.0.0.1 (docs/shared-state.md).
#
#   bash examples/cluster/run.sh        # Ctrl-C stops everything and removes its files
#
# Starts redis-server (installed from Debian when missing), a small static upstream
# (python3 -m http.server), an hmac API user, and gateways on ports 8081, 8082 and 8083 that
# share replay protection, rate limits and usage through the Redis. Then prints what to try.
# Ports: REDIS_PORT (6390), UPSTREAM_PORT (8090), FIRST_PORT (8081), ADMIN_PORT (9911…9913).
set -euo pipefail
cd "$(dirname "$0")/../.."
REDIS_PORT=${REDIS_PORT:-6390}
UPSTREAM_PORT=${UPSTREAM_PORT:-8090}
FIRST_PORT=${FIRST_PORT:-8081}
ADMIN_PORT=${ADMIN_PORT:-9911}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"; else return 1; fi; }
if ! command -v redis-server >/dev/null 2>&1; then
  echo "== installing redis-server (Debian)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
fi

echo "== building gatehouse (release)"
cargo build --release --locked -q
BIN=$PWD/target/release/gatehouse
DIR=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --lazyfree-lazy-expire yes --daemonize no --dir "$DIR" >"$DIR/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$REDIS_PORT" ping >/dev/null || { cat "$DIR/redis.log"; exit 1; }

mkdir -p "$DIR/www/api"
echo '{"orders": []}' >"$DIR/www/api/orders"
python3 -m http.server "$UPSTREAM_PORT" --bind 127.0.0.1 --directory "$DIR/www" >"$DIR/upstream.log" 2>&1 &
pids+=($!)

C="--credentials $DIR/credentials.yaml"
"$BIN" roles set shop --rule 'GET /api/**' $C >/dev/null
"$BIN" users create shop --auth-method hmac --role shop $C >/dev/null
KEY_JSON=$("$BIN" keys add shop --json $C)
KEY=$(printf '%s' "$KEY_JSON" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"]["id"])')
SECRET=$(printf '%s' "$KEY_JSON" | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')

for i in 0 1 2; do
  port=$((FIRST_PORT + i))
  cat >"$DIR/gateway-$i.yaml" <<YAML
listeners:
  - address: 127.0.0.1:$port
admin:
  address: 127.0.0.1:$((ADMIN_PORT + i))
credentials: $DIR/credentials.yaml
master_key: $DIR/master.key
usage_state: $DIR/usage-$i.json
shared_state:
  redis: redis://127.0.0.1:$REDIS_PORT
  key_prefix: "example:"
rate_limit: { per_second: 5, burst: 10 }
routes:
  - name: api
    path_prefix: /api/
    upstream: http://127.0.0.1:$UPSTREAM_PORT
YAML
  "$BIN" serve --config "$DIR/gateway-$i.yaml" 2>"$DIR/gateway-$i.log" &
  pids+=($!)
done
for i in 0 1 2; do
  for _ in $(seq 100); do grep -q "listening" "$DIR/gateway-$i.log" && break; sleep 0.1; done
  grep -q "listening" "$DIR/gateway-$i.log" || { cat "$DIR/gateway-$i.log"; exit 1; }
done

cat <<TRY

Three gateways on 127.0.0.1:$FIRST_PORT, :$((FIRST_PORT + 1)) and :$((FIRST_PORT + 2)) share Redis on :$REDIS_PORT.
API user shop (hmac): key id $KEY, secret $SECRET

Sign one request, send it to the first gateway, then replay it to the second:

  H=\$($BIN sign --key-id $KEY --secret $SECRET --method GET --path /api/orders --curl)
  curl -s -w ' %{http_code}\n' localhost:$FIRST_PORT/api/orders \$H        # 200
  curl -s -w ' %{http_code}\n' localhost:$((FIRST_PORT + 1))/api/orders \$H        # 401 Replayed request

The key's limit (5/s, burst 10) holds for the three together; stop Redis
(redis-cli -p $REDIS_PORT shutdown nosave) and signed requests get 503
shared_state_unavailable while the gateways fall back; the logs are in $DIR.

Ctrl-C stops everything.
TRY
wait
