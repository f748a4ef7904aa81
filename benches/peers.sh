#!/usr/bin/env bash
# peers.sh - side-by-side load test of reference "API-key gateway" peers (nginx) and, optionally,
# our own gateway, all on 127.0.0.1, on this machine, in one run.
#
# What it does
#   1. installs nginx, libnginx-mod-http-js (njs) and wrk with apt-get when they are missing;
#   2. starts a tiny upstream (its own nginx instance: fixed 200 JSON body);
#   3. starts the peers (a second nginx instance):
#        nginx-key   X-API-Key (or Authorization: Bearer) looked up in a `map` of NKEYS keys,
#                    401 JSON when missing/unknown, per-key limit_req (rate set so it never
#                    triggers, so its cost is paid), X-Authenticated-User injected, credential
#                    headers stripped, keepalive pool to the upstream;
#        (both authenticating peers write one buffered JSON access line per request, as a
#        gateway's audit log does; PEER_AUDIT=0 turns that off)
#        nginx-hmac  njs verifies X-API-Key (key id) + X-Timestamp + X-Signature =
#                    hex HMAC-SHA256(secret, ts + METHOD + request_uri + body), rejects
#                    |now - ts| > MAX_SKEW (300 s), then internal-redirects to the same proxy block;
#   4. optionally starts our gateway (GATEWAY_CMD) pointed at the same upstream;
#   5. runs wrk against each target: req/s, p50, p99, error counts, CPU microseconds per request
#      of the upstream, of the proxy under test and of the rest (wrk + kernel), and the proxy's
#      memory (PSS); then a light run (1 connection) for the latency a hop adds without queueing;
#   6. prints a table with each target's ratio to direct; stops everything it started, by PID.
#
# HMAC load: wrk's LuaJIT has no HMAC, and computing one in Lua per request would tax the load
# generator that shares the 2 cores. So every HMAC request is pre-signed by python3 just before its
# run: a distinct path (?load<round>=<i>) per request, one timestamp (now) for the whole run, so no signature
# repeats (a replay-protecting gateway accepts every one). wrk replays them through a Lua
# request() callback, which costs the generator a little more than static requests; the row
# `direct-lua` sends the same pre-formatted requests straight to the upstream so that the HMAC
# rows can be compared like for like.
#
# Usage
#   bash benches/peers.sh                                   # peers only
#   GATEWAY_URL=http://127.0.0.1:8080 GATEWAY_KEY=ghk_... bash benches/peers.sh
#   GATEWAY_URL=http://127.0.0.1:8080 GATEWAY_KEY=ghk_... \
#     GATEWAY_HMAC_KEY_ID=key_123 GATEWAY_HMAC_SECRET=... \
#     GATEWAY_CMD='target/release/gatehouse serve --config gw.yaml' bash benches/peers.sh
#   The upstream listens on 127.0.0.1:$BASE_PORT (default 18080); configure the gateway's route to
#   forward there. GATEWAY_CMD is started after the upstream is up, with UPSTREAM_URL exported,
#   and is stopped at the end. When the gateway is started by hand, its CPU is found from the
#   listening socket (or give GATEWAY_PID).
#
# Settings (environment)
#   DURATION=10s WARMUP=2s THREADS=2 CONNS=64   the saturation run of each target
#   LIGHT_DURATION=5s LIGHT_CONNS=1   then a light run (wrk -t1 -cLIGHT_CONNS): latency with no
#                       queueing, i.e. what one hop adds (LIGHT_DURATION=0 skips it)
#   ROUNDS=1            repeat everything; ROUNDS>1 reports medians
#   BASE_PORT=18080     upstream = BASE_PORT, nginx-key = +1, nginx-hmac = +2, nginx-pass = +3
#   NKEYS=1000          keys in the nginx-key map (and HMAC key ids in the njs peer)
#   BENCH_PATH=/api/v1/bench   path requested on every target
#   UPSTREAM_WORKERS=auto PEER_WORKERS=auto   nginx worker_processes of each instance
#   RESP_BYTES=0        pad the upstream body to this many bytes (0 = a 40-byte JSON)
#   MAX_SKEW=300        HMAC timestamp window of the njs peer, seconds
#   CALIBRATE=1         also run `direct-lua` (0 to skip)
#   PASS=1              also run `nginx-pass`: the same proxy block with no authentication, i.e.
#                       what the hop alone costs (0 to skip)
#   CHECKS=1            functional checks (curl) before the load runs (0 to skip)
#   SKIP_INSTALL=0      1: never call apt-get
#   KEEP_WORK=0         1: keep the temp dir (configs, wrk outputs, results.tsv)
#   RESULTS_OUT=        also copy the final table to this file
#   UPSTREAM_TLS_DIR=   a directory holding ca.pem, cert.pem and key.pem (a certificate for
#                       localhost): the upstream also listens with TLS on BASE_PORT+4, and the
#                       rows nginx-key-tls (:BASE_PORT+5, proxy_pass https with proxy_ssl_verify
#                       and session reuse) and, with GATEWAY_*, gateway-key-tls (GATEWAY_URL/tls,
#                       a route to the TLS upstream; load.sh writes it) measure an https upstream
#   UPSTREAM_H2=0       1: the upstream also speaks HTTP/2 without TLS (h2c) on BASE_PORT+6, and
#                       the rows nginx-key-h2 (:BASE_PORT+7, grpc_pass to it with a keep-alive
#                       pool) and, with GATEWAY_*, gateway-key-h2 (GATEWAY_URL/h2, a route to
#                       h2c://; load.sh writes it) measure an HTTP/2 upstream
#   SHARED_URL= SHARED_PID=   a second gateway, already running (the same binary with
#                       shared_state: in Redis; load.sh starts it), measured as shared-key /
#                       shared-hmac with the GATEWAY_* keys
set -uo pipefail

DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-1}
LIGHT_DURATION=${LIGHT_DURATION:-5s}
LIGHT_CONNS=${LIGHT_CONNS:-1}
BASE_PORT=${BASE_PORT:-18080}
NKEYS=${NKEYS:-1000}
BENCH_PATH=${BENCH_PATH:-/api/v1/bench}
UPSTREAM_WORKERS=${UPSTREAM_WORKERS:-auto}
PEER_WORKERS=${PEER_WORKERS:-auto}
RESP_BYTES=${RESP_BYTES:-0}
MAX_SKEW=${MAX_SKEW:-300}
CALIBRATE=${CALIBRATE:-1}
PASS=${PASS:-1}
CHECKS=${CHECKS:-1}
SKIP_INSTALL=${SKIP_INSTALL:-0}
KEEP_WORK=${KEEP_WORK:-0}
RESULTS_OUT=${RESULTS_OUT:-}
GATEWAY_URL=${GATEWAY_URL:-}
GATEWAY_KEY=${GATEWAY_KEY:-}
GATEWAY_HMAC_KEY_ID=${GATEWAY_HMAC_KEY_ID:-}
GATEWAY_HMAC_SECRET=${GATEWAY_HMAC_SECRET:-}
GATEWAY_CMD=${GATEWAY_CMD:-}
GATEWAY_PID=${GATEWAY_PID:-}
SHARED_URL=${SHARED_URL:-}
SHARED_PID=${SHARED_PID:-}

UPSTREAM_PORT=$BASE_PORT
KEY_PORT=$((BASE_PORT + 1))
HMAC_PORT=$((BASE_PORT + 2))
PASS_PORT=$((BASE_PORT + 3))
UPSTREAM_TLS_PORT=$((BASE_PORT + 4))
KEY_TLS_PORT=$((BASE_PORT + 5))
UPSTREAM_TLS_DIR=${UPSTREAM_TLS_DIR:-}
UPSTREAM_H2=${UPSTREAM_H2:-0}
UPSTREAM_H2_PORT=$((BASE_PORT + 6))
KEY_H2_PORT=$((BASE_PORT + 7))
NGX_JS_MODULE=/usr/lib/nginx/modules/ngx_http_js_module.so

log() { printf '[peers] %s\n' "$*" >&2; }
die() { printf '[peers] error: %s\n' "$*" >&2; exit 1; }

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
[[ "$DUR_S" =~ ^[0-9]+$ && "$WARM_S" =~ ^[0-9]+$ && "$LIGHT_S" =~ ^[0-9]+$ ]] || die "DURATION/WARMUP/LIGHT_DURATION must be whole seconds (e.g. 10s)"
if [ $((DUR_S + WARM_S + 30)) -ge "$MAX_SKEW" ]; then
  die "DURATION+WARMUP must stay well inside the ${MAX_SKEW}s HMAC window (signatures are made just before each run)"
fi

# ---------------------------------------------------------------- targets must be loopback only
if [ -n "$GATEWAY_URL" ]; then
  [[ "$GATEWAY_URL" =~ ^https?://127\.0\.0\.1:([0-9]+)/?$ ]] || die "GATEWAY_URL must be http(s)://127.0.0.1:PORT"
  GATEWAY_PORT=${BASH_REMATCH[1]}
  GATEWAY_URL=${GATEWAY_URL%/}
  [ -n "$GATEWAY_KEY" ] || [ -n "$GATEWAY_HMAC_KEY_ID" ] || die "GATEWAY_URL needs GATEWAY_KEY and/or GATEWAY_HMAC_KEY_ID + GATEWAY_HMAC_SECRET"
  if [ -n "$GATEWAY_HMAC_KEY_ID" ] && [ -z "$GATEWAY_HMAC_SECRET" ]; then die "GATEWAY_HMAC_KEY_ID needs GATEWAY_HMAC_SECRET"; fi
fi

if [ -n "$SHARED_URL" ]; then
  [[ "$SHARED_URL" =~ ^http://127\.0\.0\.1:([0-9]+)/?$ ]] || die "SHARED_URL must be http://127.0.0.1:PORT"
  SHARED_PORT=${BASH_REMATCH[1]}
  SHARED_URL=${SHARED_URL%/}
  [ -n "$GATEWAY_URL" ] || die "SHARED_URL needs GATEWAY_URL (its keys are the same)"
  [ -n "$SHARED_PID" ] || die "SHARED_URL needs SHARED_PID (its CPU is reported)"
fi

# ---------------------------------------------------------------- 1. install (idempotent)
need_pkgs=()
command -v nginx >/dev/null 2>&1 || need_pkgs+=(nginx)
[ -f "$NGX_JS_MODULE" ] || need_pkgs+=(libnginx-mod-http-js)
command -v wrk >/dev/null 2>&1 || need_pkgs+=(wrk)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  [ "$SKIP_INSTALL" = 1 ] && die "missing: ${need_pkgs[*]} (and SKIP_INSTALL=1)"
  [ "$(id -u)" = 0 ] || die "missing: ${need_pkgs[*]}; run as root or install them"
  log "installing ${need_pkgs[*]}"
  # Debian's nginx postinst would start a system nginx on port 80; a policy-rc.d that answers 101
  # stops that. Only add one for the install when the machine has none, and take it away again.
  tmp_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && tmp_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >/dev/null
  rc=$?
  if [ "$rc" -ne 0 ]; then
    log "apt-get install failed; running apt-get update once and retrying"
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >/dev/null
    rc=$?
  fi
  [ "$tmp_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" -eq 0 ] || die "apt-get install ${need_pkgs[*]} failed"
fi

# ---------------------------------------------------------------- process bookkeeping + cleanup
WORK=$(mktemp -d -t peers.XXXXXX) || die "mktemp failed"
chmod 755 "$WORK"   # nginx workers run as nobody and must reach their temp dirs
STARTED_PIDS=()     # every long-lived process this script started (nginx masters, gateway)
WRK_PID=""

descendants() { # pid -> all its descendants' pids
  local c
  for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$c"; descendants "$c"; done
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$WRK_PID" ] && kill -0 "$WRK_PID" 2>/dev/null; then kill -TERM "$WRK_PID" 2>/dev/null; wait "$WRK_PID" 2>/dev/null; fi
  local pid kids
  for pid in "${STARTED_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || continue
    # nginx workers go with their master; a gateway started through a wrapper (e.g. `cargo run`)
    # may leave its real process behind, so its descendants are noted first and stopped after it.
    kids=""
    [ "$pid" = "${GATEWAY_PID:-}" ] && kids=$(descendants "$pid")
    for p in $pid $kids; do
      kill -0 "$p" 2>/dev/null || continue
      kill -TERM "$p" 2>/dev/null
      for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
      wait "$p" 2>/dev/null
    done
  done
  if [ "$KEEP_WORK" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port seconds
  local i
  for i in $(seq 1 $(($2 * 10))); do port_in_use "$1" && return 0; sleep 0.1; done
  return 1
}
for p in "$UPSTREAM_PORT" "$KEY_PORT" "$HMAC_PORT" "$PASS_PORT" $([ -n "$UPSTREAM_TLS_DIR" ] && echo "$UPSTREAM_TLS_PORT $KEY_TLS_PORT") $([ "$UPSTREAM_H2" = 1 ] && echo "$UPSTREAM_H2_PORT $KEY_H2_PORT"); do
  port_in_use "$p" && die "127.0.0.1:$p is already in use (set BASE_PORT)"
done

# ---------------------------------------------------------------- 2./3. configs
mkdir -p "$WORK/up/logs" "$WORK/peer/logs"

body='{"ok":true,"service":"bench-upstream"}'
if [ "$RESP_BYTES" -gt ${#body} ]; then
  pad=$((RESP_BYTES - ${#body} - 9))
  body="{\"ok\":true,\"pad\":\"$(head -c "$pad" /dev/zero | tr '\0' 'x')\"}"
fi

# key_peer NAME UPSTREAM_PORT LISTEN_PORT PROXY_LINES: an nginx-key peer (the same API-key
# check as nginx-key) on LISTEN_PORT whose requests go to a keep-alive pool NAME of
# 127.0.0.1:UPSTREAM_PORT by PROXY_LINES (proxy_pass or grpc_pass and their settings).
key_peer() {
  printf '    upstream %s {\n        server 127.0.0.1:%s;\n        keepalive 128;\n        keepalive_requests 10000000;\n    }\n' "$1" "$2"
  printf '    server {\n        listen 127.0.0.1:%s reuseport backlog=4096;\n        default_type application/json;\n        location / {\n' "$3"
  printf '            if ($api_user = "") {\n                return 401 %s;\n            }\n' \
    "'{\"success\":false,\"message\":\"\$auth_error\",\"code\":\"authentication_error\"}'"
  printf '            limit_req zone=per_key burst=1000000 nodelay;\n%s\n        }\n    }\n' "$4"
}

# upstream_server LISTEN_LINE [MORE_LINES]: another server of the upstream nginx, with the same answer.
upstream_server() {
  printf '    server {\n        %s\n%s        default_type application/json;\n        location / {\n            return 200 %s;\n        }\n    }\n' \
    "$1" "${2:-}" "'$body'"
}

UPSTREAM_TLS_SERVER=""
PEER_TLS_SERVER=""
if [ -n "$UPSTREAM_TLS_DIR" ]; then
  UPSTREAM_TLS_SERVER=$(upstream_server "listen 127.0.0.1:$UPSTREAM_TLS_PORT ssl reuseport backlog=4096;" \
"        ssl_certificate $UPSTREAM_TLS_DIR/cert.pem;
        ssl_certificate_key $UPSTREAM_TLS_DIR/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:up_tls:10m;
")
  # API key, to the upstream over TLS: verified, sessions reused, connections kept alive.
  PEER_TLS_SERVER=$(key_peer bench_upstream_tls "$UPSTREAM_TLS_PORT" "$KEY_TLS_PORT" \
"            proxy_pass https://bench_upstream_tls;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate $UPSTREAM_TLS_DIR/ca.pem;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header X-Authenticated-User \$api_user;
            proxy_set_header X-API-Key \"\";
            proxy_set_header Authorization \"\";")
fi

UPSTREAM_H2_SERVER=""
PEER_H2_SERVER=""
if [ "$UPSTREAM_H2" = 1 ]; then
  UPSTREAM_H2_SERVER=$(upstream_server "listen 127.0.0.1:$UPSTREAM_H2_PORT http2 reuseport backlog=4096;")
  # API key, to the upstream over HTTP/2 (nginx proxies HTTP/2 upstreams with grpc_pass).
  PEER_H2_SERVER=$(key_peer bench_upstream_h2 "$UPSTREAM_H2_PORT" "$KEY_H2_PORT" \
"            grpc_pass grpc://bench_upstream_h2;
            grpc_set_header X-Authenticated-User \$api_user;
            grpc_set_header X-API-Key \"\";
            grpc_set_header Authorization \"\";")
fi

cat > "$WORK/up/nginx.conf" <<EOF
worker_processes $UPSTREAM_WORKERS;
daemon off;
pid $WORK/up/nginx.pid;
error_log $WORK/up/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    server_tokens off;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT reuseport backlog=4096;
        default_type application/json;
        # what the upstream was told: identity headers and any credential that leaked through
        location = /__whoami {
            return 200 "user=\$http_x_authenticated_user gatehouse_user=\$http_x_gatehouse_user x_api_key=\$http_x_api_key authorization=\$http_authorization x_signature=\$http_x_signature\n";
        }
        location / {
            return 200 '$body';
        }
    }
$UPSTREAM_TLS_SERVER
$UPSTREAM_H2_SERVER
}
EOF

# NKEYS api keys (48 hex chars after a prefix) and NKEYS hmac key ids with secrets
head -c $((NKEYS * 24)) /dev/urandom | od -An -v -tx1 | tr -d ' \n' | fold -w48 | awk -v n="$NKEYS" 'NR <= n' > "$WORK/keys.txt"
head -c $((NKEYS * 32)) /dev/urandom | od -An -v -tx1 | tr -d ' \n' | fold -w64 | awk -v n="$NKEYS" 'NR <= n' > "$WORK/hmac_secrets.txt"
[ "$(wc -l < "$WORK/keys.txt")" -eq "$NKEYS" ] || die "key generation failed"
awk '{ printf "\"pk_%s\" \"user-%04d\";\n", $1, NR }' "$WORK/keys.txt" > "$WORK/peer/keys.map"
awk '{ printf "\"hk_%04d\" \"%s\";\n", NR, $1 }' "$WORK/hmac_secrets.txt" > "$WORK/peer/hmac_secrets.map"
awk '{ printf "\"hk_%04d\" \"hmac-user-%04d\";\n", NR, NR }' "$WORK/hmac_secrets.txt" > "$WORK/peer/hmac_users.map"
MID=$(((NKEYS + 1) / 2))
PEER_KEY="pk_$(sed -n "${MID}p" "$WORK/keys.txt")"
PEER_USER=$(printf 'user-%04d' "$MID")
PEER_HMAC_ID=$(printf 'hk_%04d' "$MID")
PEER_HMAC_SECRET=$(sed -n "${MID}p" "$WORK/hmac_secrets.txt")
MAP_MAX=$(( NKEYS * 2 > 2048 ? NKEYS * 2 : 2048 ))

cat > "$WORK/peer/hmac.js" <<'EOF'
// HMAC-SHA256 request signing check: the scheme of docs/authentication.md, without replay
// protection (nginx has no cheap shared store for it; the Rust gateway pays for one).
const crypto = require('crypto');

function deny(r, message) {
    r.headersOut['Content-Type'] = 'application/json';
    r.headersOut['WWW-Authenticate'] = 'HMAC-SHA256';
    r.return(401, JSON.stringify({ success: false, message: message, code: 'authentication_error' }));
}

// Compare two hex strings without an early exit.
function sameHex(a, b) {
    if (a.length !== b.length) return false;
    let diff = 0;
    for (let i = 0; i < a.length; i++) diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
    return diff === 0;
}

function verify(r) {
    const keyId = r.headersIn['X-API-Key'];
    const ts = r.headersIn['X-Timestamp'];
    const sig = r.headersIn['X-Signature'];
    if (!keyId || !ts || !sig) return deny(r, 'API key is missing');
    const secret = r.variables.hmac_secret;
    if (!secret) return deny(r, 'Invalid API key');
    if (!/^[0-9]{1,12}$/.test(ts)) return deny(r, 'Request timestamp is outside the allowed window');
    const skew = Math.floor(Date.now() / 1000) - Number(ts);
    if (skew > Number(r.variables.hmac_max_skew) || -skew > Number(r.variables.hmac_max_skew)) {
        return deny(r, 'Request timestamp is outside the allowed window');
    }
    const mac = crypto.createHmac('sha256', secret);
    mac.update(ts + r.method + r.variables.request_uri);
    const body = r.requestBuffer;
    if (body && body.length) mac.update(body);
    if (!sameHex(mac.digest('hex'), sig.toLowerCase())) return deny(r, 'Invalid signature');
    r.internalRedirect('@upstream');
}

export default { verify };
EOF

if [ "${PEER_AUDIT:-1}" = 1 ]; then
  PEER_AUDIT_KEY="access_log $WORK/peer/logs/key-audit.log audit buffer=256k flush=1s;"
  PEER_AUDIT_HMAC="access_log $WORK/peer/logs/hmac-audit.log audit buffer=256k flush=1s;"
else
  PEER_AUDIT_KEY="" PEER_AUDIT_HMAC=""
fi
cat > "$WORK/peer/nginx.conf" <<EOF
load_module $NGX_JS_MODULE;
worker_processes $PEER_WORKERS;
daemon off;
pid $WORK/peer/nginx.pid;
error_log $WORK/peer/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    server_tokens off;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    map_hash_bucket_size 128;
    map_hash_max_size $MAP_MAX;
    # One JSON line per request on the authenticating peers, as a gateway's audit log
    # (PEER_AUDIT=0 turns it off); buffered as a production nginx would be.
    log_format audit escape=json '{"ts":"\$time_iso8601","request_id":"\$request_id","user":"\$api_user\$hmac_user",'
                                 '"method":"\$request_method","path":"\$request_uri","status":\$status,'
                                 '"duration_ms":\$request_time,"upstream_ms":"\$upstream_response_time","client":"\$remote_addr"}';

    upstream bench_upstream {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 128;
        keepalive_requests 10000000;
    }

    # ---- API key: X-API-Key, else Authorization: Bearer <token>
    map \$http_authorization \$bearer_token {
        default "";
        "~^Bearer +(?<tok>[^ ]+)\$" \$tok;
    }
    map \$http_x_api_key \$presented_key {
        ""      \$bearer_token;
        default \$http_x_api_key;
    }
    map \$presented_key \$api_user {
        default "";
        include $WORK/peer/keys.map;
    }
    map \$presented_key \$auth_error {
        ""      "API key is missing";
        default "Invalid API key";
    }
    # per-key limit whose rate never triggers: its shared-memory cost is paid on every request
    limit_req_zone \$api_user zone=per_key:10m rate=1000000r/s;
    limit_req_status 429;

    server {
        listen 127.0.0.1:$KEY_PORT reuseport backlog=4096;
        default_type application/json;
        $PEER_AUDIT_KEY
        location / {
            if (\$api_user = "") {
                add_header WWW-Authenticate 'ApiKey' always;
                return 401 '{"success":false,"message":"\$auth_error","code":"authentication_error"}';
            }
            limit_req zone=per_key burst=1000000 nodelay;
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Authenticated-User \$api_user;
            proxy_set_header X-API-Key "";
            proxy_set_header Authorization "";
        }
    }

$PEER_TLS_SERVER
$PEER_H2_SERVER

    # ---- no authentication: the cost of the hop itself
    server {
        listen 127.0.0.1:$PASS_PORT reuseport backlog=4096;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }

    # ---- HMAC-SHA256 signature (njs)
    js_import hmac from $WORK/peer/hmac.js;
    map \$http_x_api_key \$hmac_secret {
        default "";
        include $WORK/peer/hmac_secrets.map;
    }
    map \$http_x_api_key \$hmac_user {
        default "";
        include $WORK/peer/hmac_users.map;
    }
    limit_req_zone \$hmac_user zone=per_hmac_key:10m rate=1000000r/s;

    server {
        listen 127.0.0.1:$HMAC_PORT reuseport backlog=4096;
        default_type application/json;
        $PEER_AUDIT_HMAC
        set \$hmac_max_skew $MAX_SKEW;
        client_max_body_size 10m;
        client_body_buffer_size 10m;   # keep bodies in memory so njs sees them
        location / {
            js_content hmac.verify;
        }
        location @upstream {
            limit_req zone=per_hmac_key burst=1000000 nodelay;
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Authenticated-User \$hmac_user;
            proxy_set_header X-API-Key "";
            proxy_set_header X-Signature "";
            proxy_set_header X-Timestamp "";
        }
    }
}
EOF

start_nginx() { # name dir -> sets LAST_PID (no subshell: the PID must be our own child)
  nginx -t -q -p "$2" -c "$2/nginx.conf" -e "$2/logs/error.log" 2>"$2/logs/configtest.log" \
    || { cat "$2/logs/configtest.log" >&2; die "$1: nginx config test failed"; }
  nginx -p "$2" -c "$2/nginx.conf" -e "$2/logs/error.log" > "$2/logs/stdout.log" 2>&1 &
  LAST_PID=$!
  STARTED_PIDS+=("$LAST_PID")
}
start_nginx upstream "$WORK/up"; UP_PID=$LAST_PID
wait_port "$UPSTREAM_PORT" 5 || die "upstream did not start (see $WORK/up/logs/error.log)"
start_nginx peers "$WORK/peer"; PEER_PID=$LAST_PID
{ wait_port "$KEY_PORT" 5 && wait_port "$HMAC_PORT" 5 && wait_port "$PASS_PORT" 5; } || die "peers did not start (see $WORK/peer/logs/error.log)"
if [ -n "$UPSTREAM_TLS_DIR" ]; then
  { wait_port "$UPSTREAM_TLS_PORT" 5 && wait_port "$KEY_TLS_PORT" 5; } || die "TLS upstream or nginx-key-tls did not start"
fi
if [ "$UPSTREAM_H2" = 1 ]; then
  { wait_port "$UPSTREAM_H2_PORT" 5 && wait_port "$KEY_H2_PORT" 5; } || die "h2c upstream or nginx-key-h2 did not start"
fi
log "upstream 127.0.0.1:$UPSTREAM_PORT (pid $UP_PID), nginx-key :$KEY_PORT, nginx-hmac :$HMAC_PORT, nginx-pass :$PASS_PORT (pid $PEER_PID), work dir $WORK"

# ---------------------------------------------------------------- 4. our gateway, when asked
if [ -n "$GATEWAY_CMD" ]; then
  [ -n "$GATEWAY_URL" ] || die "GATEWAY_CMD needs GATEWAY_URL"
  port_in_use "$GATEWAY_PORT" && die "127.0.0.1:$GATEWAY_PORT is in use before GATEWAY_CMD started"
  export UPSTREAM_URL="http://127.0.0.1:$UPSTREAM_PORT"
  bash -c "exec $GATEWAY_CMD" > "$WORK/gateway.log" 2>&1 &
  GATEWAY_PID=$!
  STARTED_PIDS+=("$GATEWAY_PID")
  wait_port "$GATEWAY_PORT" 60 || { tail -n 20 "$WORK/gateway.log" >&2; die "gateway did not listen on $GATEWAY_PORT within 60 s"; }
  log "gateway started: pid $GATEWAY_PID (its output: $WORK/gateway.log; the command is not echoed, it may hold secrets)"
elif [ -n "$GATEWAY_URL" ]; then
  port_in_use "$GATEWAY_PORT" || die "nothing listens on $GATEWAY_URL"
  if [ -z "$GATEWAY_PID" ]; then
    GATEWAY_PID=$(ss -Hltnp "sport = :$GATEWAY_PORT" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2)
  fi
  log "gateway at $GATEWAY_URL (pid ${GATEWAY_PID:-unknown: its CPU is not reported})"
fi

if [ -n "$SHARED_URL" ]; then
  port_in_use "$SHARED_PORT" || die "nothing listens on $SHARED_URL"
  log "shared-state gateway at $SHARED_URL (pid $SHARED_PID)"
fi

# ---------------------------------------------------------------- helpers: signing, CPU, wrk
sign() { # secret ts method path [bodyfile]
  python3 - "$@" <<'PY'
import hashlib, hmac, sys
secret, ts, method, path = sys.argv[1:5]
body = open(sys.argv[5], 'rb').read() if len(sys.argv) > 5 else b''
print(hmac.new(secret.encode(), ts.encode() + method.encode() + path.encode() + body, hashlib.sha256).hexdigest())
PY
}

make_signed() { # outprefix count keyid secret prefix hostport
  # Writes THREADS files <outprefix>.<k> of fixed-length raw GET requests (request i goes to file
  # i mod THREADS), each with its own path (?<prefix>=<zero-padded i>) and ts=now, and prints the
  # record length. wrk only slices them (signed.lua), so the generator's per-request cost stays small.
  python3 - "$@" "$BENCH_PATH" "$THREADS" <<'PY'
import hashlib, hmac, sys, time
out, n, keyid, secret, prefix, hostport, path, nthreads = sys.argv[1:9]
n, nthreads = int(n), int(nthreads)
ts = str(int(time.time()))
sep = '&' if '?' in path else '?'
width = len(str(n - 1))
base = hmac.new(secret.encode(), digestmod=hashlib.sha256)
bufs = [[] for _ in range(nthreads)]
for i in range(n):
    p = f"{path}{sep}{prefix}={i:0{width}d}"
    h = base.copy()
    h.update(f"{ts}GET{p}".encode())
    bufs[i % nthreads].append(
        f"GET {p} HTTP/1.1\r\nHost: {hostport}\r\nX-API-Key: {keyid}\r\n"
        f"X-Timestamp: {ts}\r\nX-Signature: {h.hexdigest()}\r\n\r\n")
for k in range(nthreads):
    with open(f"{out}.{k}", "w", newline="") as f:
        f.write("".join(bufs[k]))
print(len(bufs[0][0]))
PY
}

CLK_TCK=$(getconf CLK_TCK)
pid_ticks() { # sum of utime+stime of the given pids and their children (ticks)
  local total=0 p t kids
  for p in "$@"; do
    [ -n "$p" ] || continue
    kids=$(ps -o pid= --ppid "$p" 2>/dev/null)
    for t in $p $kids; do
      [ -r "/proc/$t/stat" ] || continue
      total=$((total + $(sed 's/^.*) //' "/proc/$t/stat" | awk '{print $12 + $13}')))
    done
  done
  echo "$total"
}
sys_ticks() { awk '/^cpu /{ busy=$2+$3+$4+$7+$8+$9; print busy, busy+$5+$6; exit }' /proc/stat; }
pss_kb() { # proportional set size of a pid and its children, kB (shared pages split, not counted twice)
  local p=$1 total=0 t
  [ -n "$p" ] || { echo 0; return; }
  for t in $p $(ps -o pid= --ppid "$p" 2>/dev/null); do
    total=$((total + $(awk '/^Pss:/{print $2; exit}' "/proc/$t/smaps_rollup" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

cat > "$WORK/report.lua" <<'EOF'
-- report part, shared by every run: one machine-readable RESULT line, latency in microseconds.
-- It wraps any setup() defined above it (signed.lua's) so that it can ask each thread for `wraps`.
local threads, inner_setup = {}, setup
function setup(thread)
  table.insert(threads, thread)
  if inner_setup then inner_setup(thread) end
end
done = function(summary, latency, requests)
  local wraps = 0
  for _, t in ipairs(threads) do wraps = wraps + (tonumber(t:get("wraps")) or 0) end
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d connect=%d read=%d write=%d status=%d timeout=%d wraps=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout, wraps))
end
EOF

cat > "$WORK/signed.lua" <<'EOF'
-- replays pre-signed, fixed-length raw requests; args: <file prefix> <record length>.
-- Thread k reads <prefix>.<k>, so no two threads send the same signature. A thread that runs out
-- starts over (counted in `wraps`): a replay-protecting gateway then answers 401 (status errors).
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end
local buf, len, pos = "", 0, 1
wraps = 0
function init(args)
  local f = assert(io.open(args[1] .. "." .. tid, "rb"))
  buf = f:read("*a")
  f:close()
  len = tonumber(args[2])
end
function request()
  if pos > #buf then pos = 1; wraps = wraps + 1 end
  local r = string.sub(buf, pos, pos + len - 1)
  pos = pos + len
  return r
end
EOF
cat "$WORK/report.lua" >> "$WORK/signed.lua"

RESULTS="$WORK/results.tsv"
: > "$RESULTS"
DIRECT_RPS=""

# run_wrk <label> <round> <proxy-pid-or-empty> <url> <warm|main> [wrk options] [-- script args]
# MODE=load: THREADS x CONNS for DURATION (after a WARMUP run); MODE=light: 1 thread, LIGHT_CONNS
# connections for LIGHT_DURATION, to see the latency a hop adds when nothing queues.
MODE=load
run_wrk() {
  local label=$1 round=$2 ppid=$3 url=$4 phase=$5
  shift 5
  local secs=$DUR_S t=$THREADS c=$CONNS
  [ "$MODE" = light ] && { secs=$LIGHT_S; t=1; c=$LIGHT_CONNS; }
  [ "$phase" = warm ] && secs=$WARM_S
  [ "$secs" -gt 0 ] || return 0
  local out="$WORK/wrk.$label.$MODE.$round.$phase.txt"
  local opts=() sargs=()
  while [ $# -gt 0 ]; do
    if [ "$1" = "--" ]; then shift; sargs=("$@"); break; fi
    opts+=("$1"); shift
  done
  local up0 px0 up1 px1 s0 s1
  up0=$(pid_ticks "$UP_PID"); px0=$(pid_ticks "$ppid"); s0=$(sys_ticks)
  wrk -t"$t" -c"$c" -d"${secs}s" --latency "${opts[@]}" "$url" -- "${sargs[@]}" > "$out" 2>&1 &
  WRK_PID=$!
  wait "$WRK_PID"
  local rc=$?
  WRK_PID=""
  up1=$(pid_ticks "$UP_PID"); px1=$(pid_ticks "$ppid"); s1=$(sys_ticks)
  local pss
  pss=$(pss_kb "$ppid")
  [ "$rc" -eq 0 ] || { cat "$out" >&2; die "wrk failed for $label"; }
  [ "$phase" = warm ] && return 0
  local line
  line=$(grep '^RESULT' "$out") || { cat "$out" >&2; die "no RESULT line from wrk for $label"; }
  printf '%s\t%s\t%s\tmode=%s pss_kb=%s up_ticks=%s peer_ticks=%s sys_busy=%s sys_total=%s has_peer=%s\n' \
    "$label" "$round" "${line#RESULT }" "$MODE" "$pss" "$((up1 - up0))" "$((px1 - px0))" \
    "$(( ${s1% *} - ${s0% *} ))" "$(( ${s1#* } - ${s0#* } ))" "$([ -n "$ppid" ] && echo 1 || echo 0)" >> "$RESULTS"
  local rps
  rps=$(awk -v l="$line" 'BEGIN{ match(l, /requests=[0-9]+/); r = substr(l, RSTART + 9, RLENGTH - 9);
                                 match(l, /duration_us=[0-9]+/); d = substr(l, RSTART + 12, RLENGTH - 12);
                                 printf "%d", r / (d / 1e6) }')
  log "$(printf '%-13s %-5s round %s: %8d req/s  %s' "$label" "$MODE" "$round" "$rps" "$(grep -o 'p50_us=[0-9]* p90_us=[0-9]* p99_us=[0-9]*' <<< "$line")")"
  if [ "$label" = direct ] && [ "$MODE" = load ]; then DIRECT_RPS=$rps; fi
}

# signed-request runs: fresh signatures for each run (never reused across runs), sized from the
# direct rate: a proxy on these 2 shared cores cannot reach 0.8 of it.
run_signed() { # label round proxy-pid url keyid secret
  local label=$1 round=$2 ppid=$3 url=$4 keyid=$5 secret=$6
  local expect=${DIRECT_RPS:-50000} secs=$DUR_S
  [ "$MODE" = light ] && secs=$LIGHT_S
  local hostport=${url#*://}
  hostport=${hostport%%/*}
  local f="$WORK/signed.$label.$MODE.$round" len
  if [ "$MODE" = load ] && [ "$WARM_S" -gt 0 ]; then
    len=$(make_signed "$f.warm" $(( expect * WARM_S * 8 / 10 + 5000 )) "$keyid" "$secret" "w${round}" "$hostport") || die "signing failed"
    run_wrk "$label" "$round" "$ppid" "$url" warm -s "$WORK/signed.lua" -- "$f.warm" "$len"
  fi
  len=$(make_signed "$f.main" $(( expect * secs * 8 / 10 + 20000 )) "$keyid" "$secret" "${MODE}${round}" "$hostport") || die "signing failed"
  run_wrk "$label" "$round" "$ppid" "$url" main -s "$WORK/signed.lua" -- "$f.main" "$len"
  rm -f "$f".warm.* "$f".main.*
}

# bench_target <label> <proxy-pid> <url> key <header>   |   <label> <proxy-pid> <base-url> hmac <keyid> <secret>
bench_target() {
  local label=$1 ppid=$2 url=$3 kind=$4
  if [ "$kind" = hmac ]; then
    run_signed "$label" "$round" "$ppid" "$url" "$5" "$6"
  elif [ -n "${5:-}" ]; then
    [ "$MODE" = load ] && run_wrk "$label" "$round" "$ppid" "$url" warm -s "$WORK/report.lua" -H "$5"
    run_wrk "$label" "$round" "$ppid" "$url" main -s "$WORK/report.lua" -H "$5"
  else
    [ "$MODE" = load ] && run_wrk "$label" "$round" "$ppid" "$url" warm -s "$WORK/report.lua"
    run_wrk "$label" "$round" "$ppid" "$url" main -s "$WORK/report.lua"
  fi
}

# ---------------------------------------------------------------- functional checks
check_fail=0
expect() { # name expected-status actual-status [detail]
  if [ "$2" = "$3" ]; then log "check ok   $1 ($3)"; else log "check FAIL $1: expected $2, got $3 ${4:-}"; check_fail=1; fi
}
http_code() { curl -sk -o "$WORK/check.body" -w '%{http_code}' --max-time 5 "$@"; }

if [ "$CHECKS" = 1 ]; then
  U="http://127.0.0.1:$UPSTREAM_PORT"; K="http://127.0.0.1:$KEY_PORT"; H="http://127.0.0.1:$HMAC_PORT"
  expect "upstream direct" 200 "$(http_code "$U$BENCH_PATH")"
  expect "nginx-pass" 200 "$(http_code "http://127.0.0.1:$PASS_PORT$BENCH_PATH")"
  if [ -n "$UPSTREAM_TLS_DIR" ]; then
    expect "upstream over TLS" 200 "$(http_code --cacert "$UPSTREAM_TLS_DIR/ca.pem" --resolve "localhost:$UPSTREAM_TLS_PORT:127.0.0.1" "https://localhost:$UPSTREAM_TLS_PORT$BENCH_PATH")"
    expect "nginx-key-tls" 200 "$(http_code -H "X-API-Key: $PEER_KEY" "http://127.0.0.1:$KEY_TLS_PORT$BENCH_PATH")"
  fi
  if [ "$UPSTREAM_H2" = 1 ]; then
    expect "upstream over h2c" 200 "$(http_code --http2-prior-knowledge "http://127.0.0.1:$UPSTREAM_H2_PORT$BENCH_PATH")"
    expect "nginx-key-h2" 200 "$(http_code -H "X-API-Key: $PEER_KEY" "http://127.0.0.1:$KEY_H2_PORT$BENCH_PATH")"
  fi
  expect "key: missing" 401 "$(http_code "$K$BENCH_PATH")" "$(cat "$WORK/check.body")"
  grep -q '"API key is missing"' "$WORK/check.body" || { log "check FAIL key: missing body: $(cat "$WORK/check.body")"; check_fail=1; }
  expect "key: unknown" 401 "$(http_code -H 'X-API-Key: pk_nope' "$K$BENCH_PATH")"
  grep -q '"Invalid API key"' "$WORK/check.body" || { log "check FAIL key: unknown body: $(cat "$WORK/check.body")"; check_fail=1; }
  expect "key: valid X-API-Key" 200 "$(http_code -H "X-API-Key: $PEER_KEY" "$K$BENCH_PATH")"
  expect "key: valid Bearer" 200 "$(http_code -H "Authorization: Bearer $PEER_KEY" "$K$BENCH_PATH")"
  code=$(http_code -H "X-API-Key: $PEER_KEY" -H 'X-Authenticated-User: admin' "$K/__whoami")
  if [ "$code" = 200 ] && grep -q "^user=$PEER_USER gatehouse_user= x_api_key= authorization=" "$WORK/check.body"; then
    log "check ok   key: upstream sees user=$PEER_USER, spoofed header replaced, key stripped"
  else log "check FAIL key: upstream saw: $(cat "$WORK/check.body")"; check_fail=1; fi

  now=$(date +%s)
  sig=$(sign "$PEER_HMAC_SECRET" "$now" GET "$BENCH_PATH")
  expect "hmac: valid" 200 "$(http_code -H "X-API-Key: $PEER_HMAC_ID" -H "X-Timestamp: $now" -H "X-Signature: $sig" "$H$BENCH_PATH")"
  SIG_UP=$(tr 'a-f' 'A-F' <<< "$sig")
  expect "hmac: valid, upper-case hex" 200 "$(http_code -H "X-API-Key: $PEER_HMAC_ID" -H "X-Timestamp: $now" -H "X-Signature: $SIG_UP" "$H$BENCH_PATH")"
  expect "hmac: missing" 401 "$(http_code "$H$BENCH_PATH")"
  expect "hmac: unknown key id" 401 "$(http_code -H 'X-API-Key: hk_nope' -H "X-Timestamp: $now" -H "X-Signature: $sig" "$H$BENCH_PATH")"
  expect "hmac: other path" 401 "$(http_code -H "X-API-Key: $PEER_HMAC_ID" -H "X-Timestamp: $now" -H "X-Signature: $sig" "$H$BENCH_PATH/x")"
  old=$((now - MAX_SKEW - 5)); sig_old=$(sign "$PEER_HMAC_SECRET" "$old" GET "$BENCH_PATH")
  expect "hmac: stale timestamp" 401 "$(http_code -H "X-API-Key: $PEER_HMAC_ID" -H "X-Timestamp: $old" -H "X-Signature: $sig_old" "$H$BENCH_PATH")"
  grep -q 'outside the allowed window' "$WORK/check.body" || { log "check FAIL hmac: stale body: $(cat "$WORK/check.body")"; check_fail=1; }
  fut=$((now + MAX_SKEW + 5)); sig_fut=$(sign "$PEER_HMAC_SECRET" "$fut" GET "$BENCH_PATH")
  expect "hmac: future timestamp" 401 "$(http_code -H "X-API-Key: $PEER_HMAC_ID" -H "X-Timestamp: $fut" -H "X-Signature: $sig_fut" "$H$BENCH_PATH")"
  printf '{"order":42,"items":[1,2,3]}' > "$WORK/check.post"
  sig_post=$(sign "$PEER_HMAC_SECRET" "$now" POST "$BENCH_PATH?x=1" "$WORK/check.post")
  expect "hmac: POST with body" 200 "$(http_code -X POST --data-binary @"$WORK/check.post" -H "X-API-Key: $PEER_HMAC_ID" -H "X-Timestamp: $now" -H "X-Signature: $sig_post" "$H$BENCH_PATH?x=1")"
  expect "hmac: POST, body changed" 401 "$(http_code -X POST --data-binary '{"order":43,"items":[1,2,3]}' -H "X-API-Key: $PEER_HMAC_ID" -H "X-Timestamp: $now" -H "X-Signature: $sig_post" "$H$BENCH_PATH?x=1")"
  sig_who=$(sign "$PEER_HMAC_SECRET" "$now" GET "/__whoami")
  code=$(http_code -H "X-API-Key: $PEER_HMAC_ID" -H "X-Timestamp: $now" -H "X-Signature: $sig_who" -H 'X-Authenticated-User: admin' "$H/__whoami")
  if [ "$code" = 200 ] && grep -q "^user=hmac-user-$(printf '%04d' "$MID") gatehouse_user= x_api_key= authorization= x_signature=$" "$WORK/check.body"; then
    log "check ok   hmac: upstream sees the key's user, credentials stripped"
  else log "check FAIL hmac: upstream saw: $(cat "$WORK/check.body")"; check_fail=1; fi

  if [ -n "$GATEWAY_URL" ]; then
    expect "gateway: missing credentials" 401 "$(http_code "$GATEWAY_URL$BENCH_PATH")"
    if [ -n "$GATEWAY_KEY" ]; then
      code=$(http_code -H "X-API-Key: $GATEWAY_KEY" "$GATEWAY_URL$BENCH_PATH")
      [[ "$code" =~ ^2 ]] && log "check ok   gateway: valid key ($code)" || { log "check FAIL gateway: valid key got $code: $(head -c 300 "$WORK/check.body")"; check_fail=1; }
      if [ "$UPSTREAM_H2" = 1 ]; then
        code=$(http_code -H "X-API-Key: $GATEWAY_KEY" "$GATEWAY_URL/h2$BENCH_PATH")
        [[ "$code" =~ ^2 ]] && log "check ok   gateway: valid key, h2c upstream ($code)" || { log "check FAIL gateway: h2c upstream got $code: $(head -c 300 "$WORK/check.body")"; check_fail=1; }
      fi
      if [ -n "$UPSTREAM_TLS_DIR" ]; then
        code=$(http_code -H "X-API-Key: $GATEWAY_KEY" "$GATEWAY_URL/tls$BENCH_PATH")
        [[ "$code" =~ ^2 ]] && log "check ok   gateway: valid key, https upstream ($code)" || { log "check FAIL gateway: https upstream got $code: $(head -c 300 "$WORK/check.body")"; check_fail=1; }
      fi
    fi
    if [ -n "$GATEWAY_HMAC_KEY_ID" ]; then
      sig=$(sign "$GATEWAY_HMAC_SECRET" "$now" GET "$BENCH_PATH?check=1")
      code=$(http_code -H "X-API-Key: $GATEWAY_HMAC_KEY_ID" -H "X-Timestamp: $now" -H "X-Signature: $sig" "$GATEWAY_URL$BENCH_PATH?check=1")
      [[ "$code" =~ ^2 ]] && log "check ok   gateway: valid signature ($code)" || { log "check FAIL gateway: valid signature got $code: $(head -c 300 "$WORK/check.body")"; check_fail=1; }
    fi
  fi
  [ "$check_fail" = 0 ] || die "functional checks failed; not measuring"
fi

# ---------------------------------------------------------------- 5. load
log "load: wrk -t$THREADS -c$CONNS -d$DURATION (warm-up $WARMUP); light: -t1 -c$LIGHT_CONNS -d$LIGHT_DURATION; $ROUNDS round(s), $(nproc) CPUs"
all_targets() {
  bench_target direct "" "http://127.0.0.1:$UPSTREAM_PORT$BENCH_PATH" key ""
  [ "$PASS" = 1 ] && bench_target nginx-pass "$PEER_PID" "http://127.0.0.1:$PASS_PORT$BENCH_PATH" key ""
  bench_target nginx-key "$PEER_PID" "http://127.0.0.1:$KEY_PORT$BENCH_PATH" key "X-API-Key: $PEER_KEY"
  [ -n "$UPSTREAM_TLS_DIR" ] && bench_target nginx-key-tls "$PEER_PID" "http://127.0.0.1:$KEY_TLS_PORT$BENCH_PATH" key "X-API-Key: $PEER_KEY"
  [ "$UPSTREAM_H2" = 1 ] && bench_target nginx-key-h2 "$PEER_PID" "http://127.0.0.1:$KEY_H2_PORT$BENCH_PATH" key "X-API-Key: $PEER_KEY"
  [ "$CALIBRATE" = 1 ] && bench_target direct-lua "" "http://127.0.0.1:$UPSTREAM_PORT" hmac "$PEER_HMAC_ID" "$PEER_HMAC_SECRET"
  bench_target nginx-hmac "$PEER_PID" "http://127.0.0.1:$HMAC_PORT" hmac "$PEER_HMAC_ID" "$PEER_HMAC_SECRET"
  if [ -n "$GATEWAY_URL" ] && [ -n "$GATEWAY_KEY" ]; then
    bench_target gateway-key "$GATEWAY_PID" "$GATEWAY_URL$BENCH_PATH" key "X-API-Key: $GATEWAY_KEY"
    [ -n "$UPSTREAM_TLS_DIR" ] && bench_target gateway-key-tls "$GATEWAY_PID" "$GATEWAY_URL/tls$BENCH_PATH" key "X-API-Key: $GATEWAY_KEY"
    [ "$UPSTREAM_H2" = 1 ] && bench_target gateway-key-h2 "$GATEWAY_PID" "$GATEWAY_URL/h2$BENCH_PATH" key "X-API-Key: $GATEWAY_KEY"
    [ -n "$SHARED_URL" ] && bench_target shared-key "$SHARED_PID" "$SHARED_URL$BENCH_PATH" key "X-API-Key: $GATEWAY_KEY"
  fi
  if [ -n "$GATEWAY_URL" ] && [ -n "$GATEWAY_HMAC_KEY_ID" ]; then
    bench_target gateway-hmac "$GATEWAY_PID" "$GATEWAY_URL" hmac "$GATEWAY_HMAC_KEY_ID" "$GATEWAY_HMAC_SECRET"
    [ -n "$SHARED_URL" ] && bench_target shared-hmac "$SHARED_PID" "$SHARED_URL" hmac "$GATEWAY_HMAC_KEY_ID" "$GATEWAY_HMAC_SECRET"
  fi
  return 0
}
for round in $(seq 1 "$ROUNDS"); do
  MODE=load; all_targets
  if [ "$LIGHT_S" -gt 0 ]; then MODE=light; all_targets; fi
done

# ---------------------------------------------------------------- 6. report
report() {
  awk -F'\t' -v tck="$CLK_TCK" -v rounds="$ROUNDS" -v lc="$LIGHT_CONNS" \
      -v hdr="$(nproc) CPUs, nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), wrk -t$THREADS -c$CONNS -d$DURATION" '
  function kv(s, key,   m) { if (match(s, "(^| )" key "=[-0-9A-Za-z]+")) { m = substr(s, RSTART, RLENGTH); sub(/^ ?[^=]*=/, "", m); return m } return "" }
  function median(arr, n,   i, j, t, a) {
    for (i = 1; i <= n; i++) a[i] = arr[i]
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  {
    s = $3 " " $4; mode = kv(s, "mode"); t = $1 SUBSEP mode
    if (!(t in cnt)) { cnt[t] = 0; if (mode == "load") lorder[++nl] = $1; else gorder[++ng] = $1 }
    n = ++cnt[t]
    req = kv(s, "requests") + 0
    v["rps", t, n] = req / (kv(s, "duration_us") / 1e6)
    v["p50", t, n] = kv(s, "p50_us") / 1000; v["p90", t, n] = kv(s, "p90_us") / 1000; v["p99", t, n] = kv(s, "p99_us") / 1000
    v["err", t, n] = kv(s, "connect") + kv(s, "read") + kv(s, "write") + kv(s, "status") + kv(s, "timeout")
    v["wraps", t, n] = kv(s, "wraps") + 0
    us = 1e6 / tck
    v["cup", t, n] = kv(s, "up_ticks") * us / req
    v["cpx", t, n] = kv(s, "peer_ticks") * us / req
    v["crest", t, n] = (kv(s, "sys_busy") - kv(s, "up_ticks") - kv(s, "peer_ticks")) * us / req
    v["idle", t, n] = 100 * (1 - kv(s, "sys_busy") / kv(s, "sys_total"))
    v["pss", t, n] = kv(s, "pss_kb") / 1024
    haspeer[$1] = kv(s, "has_peer") + 0
  }
  function M(name, label, mode,   t, i, arr) { t = label SUBSEP mode; for (i = 1; i <= cnt[t]; i++) arr[i] = v[name, t, i]; return median(arr, cnt[t]) }
  function has(label, mode) { return ((label SUBSEP mode) in cnt) }
  END {
    printf "== peers.sh: %s; medians of %d round(s); shared machine: treat ~10%% as noise ==\n", hdr, rounds
    print "-- saturation (closed loop: latency here is mostly queueing, = connections / throughput)"
    printf "%-13s %9s %9s %8s %8s %7s | %-24s %6s %9s\n", "target", "req/s", "vs direct", "p50 ms", "p99 ms", "errors", "CPU us/req: up proxy rest", "idle%", "proxy MB"
    d = has("direct", "load") ? M("rps", "direct", "load") : 0
    for (k = 1; k <= nl; k++) {
      l = lorder[k]
      px = haspeer[l] ? sprintf("%5.1f", M("cpx", l, "load")) : "    -"
      mb = haspeer[l] ? sprintf("%9.1f", M("pss", l, "load")) : "        -"
      printf "%-13s %9.0f %9.2f %8.2f %8.2f %7d | %5.1f %s %5.1f          %6.1f %s\n", l, M("rps", l, "load"), d ? M("rps", l, "load") / d : 0, M("p50", l, "load"), M("p99", l, "load"), M("err", l, "load"), M("cup", l, "load"), px, M("crest", l, "load"), M("idle", l, "load"), mb
    }
    if (has("direct-lua", "load") && has("nginx-hmac", "load")) printf "nginx-hmac   / direct-lua  = %.2f (same load-generator path)\n", M("rps", "nginx-hmac", "load") / M("rps", "direct-lua", "load")
    if (has("direct-lua", "load") && has("gateway-hmac", "load")) printf "gateway-hmac / direct-lua  = %.2f\n", M("rps", "gateway-hmac", "load") / M("rps", "direct-lua", "load")
    if (has("gateway-key", "load") && has("nginx-key", "load")) printf "gateway-key  / nginx-key   = %.2f throughput; proxy CPU %.1f vs %.1f us/req\n", M("rps", "gateway-key", "load") / M("rps", "nginx-key", "load"), M("cpx", "gateway-key", "load"), M("cpx", "nginx-key", "load")
    if (has("gateway-hmac", "load") && has("nginx-hmac", "load")) printf "gateway-hmac / nginx-hmac  = %.2f throughput; proxy CPU %.1f vs %.1f us/req\n", M("rps", "gateway-hmac", "load") / M("rps", "nginx-hmac", "load"), M("cpx", "gateway-hmac", "load"), M("cpx", "nginx-hmac", "load")
    if (has("gateway-key-tls", "load") && has("nginx-key-tls", "load")) printf "gateway-key-tls / nginx-key-tls = %.2f throughput (https upstream); proxy CPU %.1f vs %.1f us/req\n", M("rps", "gateway-key-tls", "load") / M("rps", "nginx-key-tls", "load"), M("cpx", "gateway-key-tls", "load"), M("cpx", "nginx-key-tls", "load")
    if (has("gateway-key-h2", "load") && has("nginx-key-h2", "load")) printf "gateway-key-h2 / nginx-key-h2 = %.2f throughput (HTTP/2 upstream); proxy CPU %.1f vs %.1f us/req\n", M("rps", "gateway-key-h2", "load") / M("rps", "nginx-key-h2", "load"), M("cpx", "gateway-key-h2", "load"), M("cpx", "nginx-key-h2", "load")
    if (has("gateway-key-tls", "load") && has("gateway-key", "load")) printf "gateway-key-tls / gateway-key = %.2f throughput (https vs http upstream)\n", M("rps", "gateway-key-tls", "load") / M("rps", "gateway-key", "load")
    if (has("shared-key", "load") && has("gateway-key", "load")) printf "shared-key   / gateway-key = %.2f throughput (shared_state in Redis vs in process); proxy CPU %.1f vs %.1f us/req\n", M("rps", "shared-key", "load") / M("rps", "gateway-key", "load"), M("cpx", "shared-key", "load"), M("cpx", "gateway-key", "load")
    if (has("shared-hmac", "load") && has("gateway-hmac", "load")) printf "shared-hmac  / gateway-hmac = %.2f throughput; proxy CPU %.1f vs %.1f us/req\n", M("rps", "shared-hmac", "load") / M("rps", "gateway-hmac", "load"), M("cpx", "shared-hmac", "load"), M("cpx", "gateway-hmac", "load")
    if (ng > 0) {
      printf "-- light load (wrk -t1 -c%d: no queueing; added = this target minus its direct row)\n", lc
      printf "%-13s %9s %8s %8s %8s %10s %10s\n", "target", "req/s", "p50 ms", "p90 ms", "p99 ms", "added p50", "added p99"
      for (k = 1; k <= ng; k++) {
        l = gorder[k]; base = (l ~ /hmac|lua/ && has("direct-lua", "light")) ? "direct-lua" : "direct"
        ap50 = has(base, "light") ? sprintf("%+10.3f", M("p50", l, "light") - M("p50", base, "light")) : "         -"
        ap99 = has(base, "light") ? sprintf("%+10.3f", M("p99", l, "light") - M("p99", base, "light")) : "         -"
        printf "%-13s %9.0f %8.3f %8.3f %8.3f %s %s\n", l, M("rps", l, "light"), M("p50", l, "light"), M("p90", l, "light"), M("p99", l, "light"), ap50, ap99
      }
    }
    if (has("shared-key", "light") && has("gateway-key", "light")) printf "shared-key p50 at light load: %+.3f ms over gateway-key\n", M("p50", "shared-key", "light") - M("p50", "gateway-key", "light")
    if (has("shared-hmac", "light") && has("gateway-hmac", "light")) printf "shared-hmac p50 at light load: %+.3f ms over gateway-hmac\n", M("p50", "shared-hmac", "light") - M("p50", "gateway-hmac", "light")
    for (k = 1; k <= nl; k++) if (lorder[k] ~ /^(gateway|shared)/ && M("wraps", lorder[k], "load") > 0) printf "note: %s ran out of pre-signed requests: its repeats are replays (raise the sizing in run_signed)\n", lorder[k]
    print "CPU us/req: up = upstream nginx, proxy = the target under test, rest = wrk + kernel + anything else on the box."
    print "proxy MB: proportional set size (PSS) of the proxy process(es) at the end of the saturation run; the nginx rows are one instance serving all four peers."
  }' "$RESULTS"
}
report | tee "$WORK/summary.txt"
[ -n "$RESULTS_OUT" ] && cp "$WORK/summary.txt" "$RESULTS_OUT"
exit 0
