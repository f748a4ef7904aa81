# common.sh - the set-up the benchmark scripts share: sourced by load.sh, tls.sh, pair.sh and
# instructions.sh, not run. bench_gh, bench_key_user and bench_config expect BIN (the gatehouse
# binary), WORK (the run's temp dir) and CREDS (the credentials file to write) to be set when
# called; the others take what they need as arguments.

# A free TCP port on 127.0.0.1.
bench_free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# bench_upstream DIR PORT: starts a local nginx (one worker, keep-alive without limit)
# answering every request with 200 {"ok":true} on 127.0.0.1:PORT, its files in DIR, and
# appends its pid to the caller's PIDS array.
bench_upstream() {
  local dir=$1 port=$2
  mkdir -p "$dir/logs"
  cat >"$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 10000000;
    server { listen 127.0.0.1:$port; location / { return 200 '{"ok":true}'; } }
}
CONF
  nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" &
  PIDS+=($!)
}

# bench_cleanup DIR: for `trap 'bench_cleanup "$WORK"' EXIT`. Stops every pid in PIDS,
# puts back the guest's halt polling (bench_halt_poll) and removes DIR, unless KEEP_WORK=1.
bench_cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  bench_halt_poll_restore
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "kept $1" >&2; else rm -rf "$1"; fi
}

# The CLI on the run's credentials file.
bench_gh() { "$BIN" "$@" --credentials "$CREDS" --json; }

# Writes the `bench` role (every method and path) and the `bench-key` api_key user with one
# key, through the real CLI; prints the key's token.
bench_key_user() {
  bench_gh roles set bench --rule '* /**' >/dev/null
  bench_gh users create bench-key --auth-method api-key --role bench >/dev/null
  bench_gh keys add bench-key --label bench | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}

# bench_config FILE LISTENER PORT UPSTREAM_PORT [LISTENER_LINE] [TOP_LEVEL_YAML]
# Writes a gatehouse.yaml as every benchmark runs it: one listener on 127.0.0.1:PORT, the admin
# listener (metrics) and the audit log (a file) on, a rate limit that never triggers (its cost
# is still paid), one route / to 127.0.0.1:UPSTREAM_PORT. LISTENER_LINE is added to the
# listener (its `tls:`), TOP_LEVEL_YAML before `routes:`.
bench_config() {
  local file=$1 name=$2 port=$3 upstream=$4 listener_line=${5:-} top=${6:-}
  {
    printf 'listeners:\n  - name: %s\n    address: 127.0.0.1:%s\n' "$name" "$port"
    [ -z "$listener_line" ] || printf '    %s\n' "$listener_line"
    printf 'admin:\n  address: 127.0.0.1:0\ncredentials: %s\nmaster_key: %s\naudit_log: %s\n' \
      "$CREDS" "$WORK/master.key" "$WORK/audit.log"
    printf 'rate_limit: { per_second: 1000000, burst: 1000000 }\n'
    [ -z "$top" ] || printf '%s\n' "$top"
    printf 'routes:\n  - name: bench\n    path_prefix: /\n    upstream: http://127.0.0.1:%s\n' "$upstream"
  } >"$file"
}

# bench_halt_poll: prints how long an idle vCPU of this KVM guest polls before it halts
# (cpuidle-haltpoll's guest_halt_poll_ns) and, with GUEST_HALT_POLL_NS set (root), sets it
# for the run; bench_cleanup puts the old value back. Why it matters: a process asleep on a
# vCPU that halted is woken through the host, and on this box that costs ~40 µs per
# wake-up (redis-benchmark -c1: 0.055 ms with 0, the value this VM boots with; 0.015 ms
# with 200000, Linux's default). At light load every hop between processes (client,
# gateway, Redis, upstream) pays it, so the light-load rows say which value they ran with.
# Two runs that overlap would each put back what they found: run one at a time.
HALT_POLL_FILE=/sys/module/haltpoll/parameters/guest_halt_poll_ns
HALT_POLL_WAS=
bench_halt_poll() {
  if [ ! -r "$HALT_POLL_FILE" ]; then
    [ -z "${GUEST_HALT_POLL_NS:-}" ] || { echo "[bench] GUEST_HALT_POLL_NS: this machine has no $HALT_POLL_FILE" >&2; exit 1; }
    echo "[bench] guest halt polling: none here (not a KVM guest with cpuidle-haltpoll)" >&2
    return 0
  fi
  local was
  was=$(cat "$HALT_POLL_FILE")
  if [ -n "${GUEST_HALT_POLL_NS:-}" ]; then
    # Noted before the write: a run stopped between the two still puts it back.
    HALT_POLL_WAS=$was
    echo "$GUEST_HALT_POLL_NS" >"$HALT_POLL_FILE" || { echo "[bench] cannot set $HALT_POLL_FILE (root?)" >&2; exit 1; }
  fi
  echo "[bench] guest_halt_poll_ns=$(cat "$HALT_POLL_FILE") for this run (the machine's: $was)" >&2
}
bench_halt_poll_restore() {
  if [ -n "$HALT_POLL_WAS" ]; then echo "$HALT_POLL_WAS" >"$HALT_POLL_FILE" 2>/dev/null || true; fi
}
