#!/usr/bin/env bash
# tls.sh - Gatehouse's TLS listener beside an nginx TLS proxy doing the same job, in one run.
#
# benches/peers.sh measures plain HTTP only. This script terminates TLS in both:
#   - nginx-key-tls: nginx configured like peers.sh's nginx-key (X-API-Key looked up in a `map`
#     of 1 000 keys, 401 JSON otherwise, per-key limit_req that never triggers, identity header,
#     credential headers stripped, keep-alive pool to the upstream) on a TLS listener
#     (TLS 1.2 + 1.3, the same certificate and key as Gatehouse);
#   - gatehouse-key-tls: Gatehouse with 1 000 users, metrics and the audit log on, on a TLS
#     listener with that certificate.
# Both forward to one upstream (its own nginx instance: fixed 200 JSON). wrk runs over https with
# keep-alive (handshakes happen once per connection), ROUNDS times; the table shows medians:
# req/s, p50/p99, errors and the CPU each proxy spent per request (from /proc/<pid>/stat).
#
# Usage: bash benches/tls.sh    (ROUNDS=3 DURATION=10s CONNS=64 THREADS=2 SKIP_BUILD=0
#        SKIP_INSTALL=0 BASE_PORT=18180: upstream, +1 nginx TLS, +2 Gatehouse TLS)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
SKIP_BUILD=${SKIP_BUILD:-0}
SKIP_INSTALL=${SKIP_INSTALL:-0}
BASE_PORT=${BASE_PORT:-18180}
UP_PORT=$BASE_PORT NGX_PORT=$((BASE_PORT + 1)) GH_PORT=$((BASE_PORT + 2))
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/gatehouse
BENCH_PATH=/api/v1/bench

log() { printf '[tls] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need=()
for t in nginx wrk openssl curl python3; do command -v "$t" >/dev/null || need+=("$t"); done
if [ ${#need[@]} -gt 0 ]; then
  [ "$SKIP_INSTALL" = 1 ] && die "missing: ${need[*]}"
  pkgs=("${need[@]/python3/python3-minimal}")
  as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
if [ "$SKIP_BUILD" != 1 ]; then
  log "cargo build --release"
  (cd "$ROOT" && cargo build --release --locked --quiet)
fi

source "$ROOT/benches/common.sh"
WORK=$(mktemp -d /tmp/gatehouse-tls.XXXXXX)
PIDS=()
trap 'bench_cleanup "$WORK"' EXIT

# One certificate for both proxies.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
  -addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null

# Credentials: the CLI for the user whose key the run uses, generated YAML for 999 others; the
# nginx map gets 1 000 keys too (the run's token among them).
CREDS=$WORK/credentials.yaml
KEY=$(bench_key_user)
python3 "$ROOT/benches/fill_users.py" "$CREDS" 999 "$WORK/keys.map" "$KEY" bench-key

mkdir -p "$WORK/up/logs" "$WORK/ngx/logs"
cat >"$WORK/up/nginx.conf" <<EOF
worker_processes auto; daemon off; pid $WORK/up/nginx.pid; error_log $WORK/up/logs/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 10000000;
  server { listen 127.0.0.1:$UP_PORT reuseport backlog=4096; default_type application/json;
    location / { return 200 '{"ok":true,"service":"bench-upstream"}'; } } }
EOF
cat >"$WORK/ngx/nginx.conf" <<EOF
worker_processes auto; daemon off; pid $WORK/ngx/nginx.pid; error_log $WORK/ngx/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; server_tokens off; keepalive_requests 10000000; keepalive_timeout 75s;
  map_hash_bucket_size 128; map_hash_max_size 16384;
  upstream bench_upstream { server 127.0.0.1:$UP_PORT; keepalive 128; keepalive_requests 10000000; }
  map \$http_x_api_key \$api_user { default ""; include $WORK/keys.map; }
  limit_req_zone \$api_user zone=per_key:10m rate=1000000r/s;
  limit_req_status 429;
  server {
    listen 127.0.0.1:$NGX_PORT ssl reuseport backlog=4096;
    ssl_certificate $WORK/cert.pem; ssl_certificate_key $WORK/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m;
    default_type application/json;
    location / {
      if (\$api_user = "") { return 401 '{"success":false,"message":"Invalid API key","code":"authentication_error"}'; }
      limit_req zone=per_key burst=1000000 nodelay;
      proxy_pass http://bench_upstream; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header X-Authenticated-User \$api_user;
      proxy_set_header X-API-Key ""; proxy_set_header Authorization "";
    }
  }
}
EOF
bench_config "$WORK/gatehouse.yaml" bench-tls "$GH_PORT" "$UP_PORT" "tls: { cert: $WORK/cert.pem, key: $WORK/key.pem }"

nginx -p "$WORK/up" -c "$WORK/up/nginx.conf" & PIDS+=($!)
nginx -p "$WORK/ngx" -c "$WORK/ngx/nginx.conf" & PIDS+=($!)
"$BIN" --log-format json serve --config "$WORK/gatehouse.yaml" 2>"$WORK/gatehouse.log" & GH_PID=$!
PIDS+=("$GH_PID")
for _ in $(seq 50); do
  curl -sk -o /dev/null "https://127.0.0.1:$GH_PORT/" && curl -sk -o /dev/null "https://127.0.0.1:$NGX_PORT/" && break
  sleep 0.1
done
for port in "$NGX_PORT" "$GH_PORT"; do
  code=$(curl -sk -o /dev/null -w '%{http_code}' -H "X-API-Key: $KEY" "https://127.0.0.1:$port$BENCH_PATH")
  [ "$code" = 200 ] || die "check failed on :$port ($code)"
  code=$(curl -sk -o /dev/null -w '%{http_code}' -H "X-API-Key: ghk_nope" "https://127.0.0.1:$port$BENCH_PATH")
  [ "$code" = 401 ] || die "unknown key not refused on :$port ($code)"
done
log "checks ok; wrk -t$THREADS -c$CONNS -d$DURATION, $ROUNDS round(s)"

ticks() { # utime+stime of a process and its children threads/workers, in clock ticks
  local total=0 p
  for p in "$@"; do total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done
  echo "$total"
}
ngx_pids() { pgrep -P "$(cat "$WORK/ngx/nginx.pid")"; }
HZ=$(getconf CLK_TCK)

run() { # name port pids... -> "req/s p50_ms p99_ms errors cpu_us_per_req"
  local name=$1 port=$2; shift 2
  wrk -t"$THREADS" -c"$CONNS" -d2s -H "X-API-Key: $KEY" "https://127.0.0.1:$port$BENCH_PATH" >/dev/null
  local t0 out t1
  t0=$(ticks "$@")
  out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -H "X-API-Key: $KEY" "https://127.0.0.1:$port$BENCH_PATH")
  t1=$(ticks "$@")
  python3 - "$out" "$((t1 - t0))" "$HZ" <<'EOF'
import re, sys
out, ticks, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def ms(label):
    m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)", out, re.M)
    v = float(m.group(1)); return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
total = int(re.search(r"(\d+) requests in", out).group(1))
errs = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
errs += int(m.group(1)) if m else 0
print(f"{rps:.0f} {ms('50%'):.2f} {ms('99%'):.2f} {errs} {ticks / hz * 1e6 / max(total, 1):.1f}")
EOF
}

RES=$WORK/results.tsv
for r in $(seq "$ROUNDS"); do
  echo "nginx-key-tls $(run nginx "$NGX_PORT" $(ngx_pids))" >>"$RES"
  echo "gatehouse-key-tls $(run gatehouse "$GH_PORT" "$GH_PID")" >>"$RES"
  log "round $r: $(tail -2 "$RES" | tr '\n' ' ')"
done
python3 - "$RES" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, *vals = line.split()
    rows.setdefault(name, []).append([float(v) for v in vals])
med = {n: [statistics.median(c) for c in zip(*v)] for n, v in rows.items()}
print(f"== TLS, medians of {len(rows['nginx-key-tls'])} round(s)")
print(f"{'target':<20}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'proxy CPU us/req':>18}")
for n, (rps, p50, p99, err, cpu) in med.items():
    print(f"{n:<20}{rps:>9.0f}{p50:>9.2f}{p99:>9.2f}{err:>8.0f}{cpu:>18.1f}")
g, x = med["gatehouse-key-tls"], med["nginx-key-tls"]
print(f"gatehouse-key-tls / nginx-key-tls = {g[0] / x[0]:.2f} throughput; proxy CPU {g[4]:.1f} vs {x[4]:.1f} us/req ({g[4] / x[4]:.2f}x); p99 {g[2] / x[2]:.2f}x")
EOF
