#!/usr/bin/env bash
# credential_db.sh - the credential database at size: how long a gateway takes to load
# USERS users from a local PostgreSQL, how long an import of them takes, and how long a
# revocation made through one gateway's admin API takes to be refused by another.
#
# What it does
#   1. builds the release binary (SKIP_BUILD=1 to reuse it);
#   2. starts Debian's PostgreSQL (installed when missing; as the `postgres` user when run
#      as root) on a free 127.0.0.1 port, in a temp dir, with fsync on (the defaults);
#   3. writes USERS api_key users (benches/fill_users.py) to a credentials file, runs
#      `gatehouse db migrate` and `gatehouse credentials import` (timed);
#   4. starts gateways A and B on the database (each logs its load time, load_ms);
#   5. REVOCATIONS times: adds a key through A's admin API, waits until B accepts it,
#      revokes it through A and measures until B refuses it (polling B with one
#      keep-alive connection); prints p50, p90 and max.
#
# Usage
#   bash benches/credential_db.sh                  # USERS=100000 REVOCATIONS=50
#   USERS=10000 SKIP_BUILD=1 bash benches/credential_db.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USERS=${USERS:-100000}
REVOCATIONS=${REVOCATIONS:-50}
SKIP_BUILD=${SKIP_BUILD:-0}
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/gatehouse
log() { printf '[credential_db] %s\n' "$*" >&2; }

if [ "$SKIP_BUILD" != 1 ]; then
  log "cargo build --release"
  (cd "$ROOT" && cargo build --release --locked --quiet)
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { log "PostgreSQL is missing: install postgresql or run as root"; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
PGBIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort | tail -n 1)")

WORK=$(mktemp -d /tmp/gatehouse-db.XXXXXX)
PIDS=()
source "$ROOT/benches/common.sh"
trap 'bench_cleanup "$WORK"' EXIT
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" = 0 ] && chown postgres "$WORK"

PGPORT=$(bench_free_port)
PASSWORD=bench-db-password
printf '%s' "$PASSWORD" >"$WORK/pw"
[ "$(id -u)" = 0 ] && chown postgres "$WORK/pw"
as_pg "$PGBIN/initdb" -D "$WORK/pg" -U gatehouse --auth=scram-sha-256 --pwfile="$WORK/pw" -E UTF8 --no-instructions >/dev/null
as_pg "$PGBIN/postgres" -D "$WORK/pg" -p "$PGPORT" -k "$WORK" -c listen_addresses=127.0.0.1 >"$WORK/pg.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q "ready to accept connections" "$WORK/pg.log" && break; sleep 0.1; done
grep -q "ready to accept connections" "$WORK/pg.log" || { cat "$WORK/pg.log" >&2; exit 1; }
export GATEHOUSE_BENCH_DB_PASSWORD=$PASSWORD
URL="postgres://gatehouse@127.0.0.1:$PGPORT/postgres?sslmode=disable"

CREDS=$WORK/credentials.yaml
bench_key_user >/dev/null
python3 "$ROOT/benches/fill_users.py" "$CREDS" "$((USERS - 1))"
ADMIN_TOKEN=$(python3 -c 'import os; print(os.urandom(24).hex())')
printf '%s\n' "$ADMIN_TOKEN" >"$WORK/admin.token"
chmod 600 "$WORK/admin.token"
UP_PORT=$(bench_free_port)
bench_upstream "$WORK/nginx" "$UP_PORT"
config() {  # config FILE PORT ADMIN_PORT
  cat >"$1" <<YAML
listeners:
  - address: 127.0.0.1:$2
admin:
  address: 127.0.0.1:$3
  token_file: $WORK/admin.token
credentials: "$URL"
credentials_password_env: GATEHOUSE_BENCH_DB_PASSWORD
master_key: $WORK/master.key
audit_log: $WORK/audit-$2.log
rate_limit: { per_second: 1000000, burst: 1000000 }
auth: { failed_per_ip_per_minute: 100000000 }
routes:
  - name: bench
    path_prefix: /
    upstream: http://127.0.0.1:$UP_PORT
    allow_anonymous: false
YAML
}
PORT_A=$(bench_free_port); ADMIN_A=$(bench_free_port); PORT_B=$(bench_free_port); ADMIN_B=$(bench_free_port)
config "$WORK/a.yaml" "$PORT_A" "$ADMIN_A"
config "$WORK/b.yaml" "$PORT_B" "$ADMIN_B"

"$BIN" db migrate --config "$WORK/a.yaml" >/dev/null
started=$(date +%s.%N)
"$BIN" credentials import "$CREDS" --config "$WORK/a.yaml" --json >/dev/null
import_s=$(python3 -c "import time; print(f'{time.time() - $started:.2f}')")
log "imported $USERS users in ${import_s}s"

start_gateway() {  # start_gateway NAME CONFIG
  "$BIN" --log-format json serve --config "$2" >"$WORK/$1.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 600); do grep -q '"admin listening"' "$WORK/$1.log" && break; sleep 0.1; done
  grep -q '"admin listening"' "$WORK/$1.log" || { tail -n 20 "$WORK/$1.log" >&2; exit 1; }
  python3 -c 'import json,sys
for l in open(sys.argv[1]):
    if "credentials loaded from the credential database" in l:
        d = json.loads(l); print(d["load_ms"], d["users"], d["keys"]); break' "$WORK/$1.log"
}
read -r load_a users_a keys_a < <(start_gateway a "$WORK/a.yaml")
read -r load_b _ _ < <(start_gateway b "$WORK/b.yaml")
log "gateway A loaded $users_a users / $keys_a keys in ${load_a} ms; gateway B in ${load_b} ms"

python3 - "$ADMIN_A" "$PORT_B" "$ADMIN_TOKEN" "$REVOCATIONS" <<'PY'
import http.client, json, sys, time
admin_a, port_b, token, n = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
adm = http.client.HTTPConnection("127.0.0.1", admin_a)
b = http.client.HTTPConnection("127.0.0.1", port_b)
def call(method, path, body=None):
    adm.request(method, path, body=json.dumps(body) if body is not None else None,
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    r = adm.getresponse(); data = r.read()
    return r.status, (json.loads(data) if data else None)
def status_b(key):
    b.request("GET", "/x", headers={"x-api-key": key}); r = b.getresponse(); r.read(); return r.status
took, adds = [], []
for i in range(n):
    t0 = time.monotonic()
    s, v = call("POST", "/admin/v1/users/bench-key/keys", {"label": f"r{i}"})
    assert s == 201, (s, v)
    adds.append(time.monotonic() - t0)
    key_id, tok = v["key"]["id"], v["token"]
    deadline = time.monotonic() + 30
    while status_b(tok) != 200:
        assert time.monotonic() < deadline, "B never accepted the new key"
    t0 = time.monotonic()
    s, v = call("DELETE", f"/admin/v1/users/bench-key/keys/{key_id}")
    assert s == 200, (s, v)
    while status_b(tok) != 401:
        assert time.monotonic() - t0 < 30, "B never refused the revoked key"
    took.append(time.monotonic() - t0)
took.sort(); adds.sort()
q = lambda xs, p: xs[min(len(xs) - 1, int(len(xs) * p))] * 1000
print(f"revocation through A refused by B: p50 {q(took, .5):.0f} ms, p90 {q(took, .9):.0f} ms, max {took[-1]*1000:.0f} ms over {n}")
print(f"admin write (add key) on A: p50 {q(adds, .5):.0f} ms, max {adds[-1]*1000:.0f} ms")
PY
echo "users: $USERS; import: ${import_s} s; start-up load: A ${load_a} ms, B ${load_b} ms"
