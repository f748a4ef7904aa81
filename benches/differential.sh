#!/usr/bin/env bash
# differential.sh - the differential test of the upstream client (tests/it/differential.rs)
# at scale: millions of generated upstream responses read by Gatehouse and by hyper's
# client, in a release build, in parallel runs with consecutive seeds, bounded in time.
#
# Usage
#   bash benches/differential.sh                        # 2,000,000 response cases
#   CASES=10000000 JOBS=4 bash benches/differential.sh  # more, on more cores
#   SEED=0x1234 bash benches/differential.sh            # another seed
#
# Settings: CASES=2000000 (in all), JOBS=2 (runs at once, each CASES/JOBS cases with seed
# SEED+i), SEED=0x6761746568... (the CI seed), REQUESTS=0 (client requests through a real
# gateway per run; slower, a few thousand is plenty), TIMEOUT=3600 (seconds per run).
# A failing case prints its seed and case number: GATEHOUSE_DIFF_SEED with
# GATEHOUSE_DIFF_CASES=<case+1> replays it in `cargo test --test it differential`.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CASES=${CASES:-2000000}
JOBS=${JOBS:-2}
SEED=${SEED:-0x67617465686f7573}
REQUESTS=${REQUESTS:-0}
TIMEOUT=${TIMEOUT:-3600}

log() { printf '[differential] %s\n' "$*" >&2; }
[[ "$CASES" =~ ^[0-9]+$ && "$JOBS" =~ ^[1-9][0-9]*$ ]] || { log "CASES and JOBS must be numbers"; exit 1; }

cd "$ROOT"
# Release optimisations without the shipped binary's whole-program LTO, which would only
# make the test binary take many minutes longer to link.
export CARGO_PROFILE_RELEASE_LTO=${CARGO_PROFILE_RELEASE_LTO:-off}
export CARGO_PROFILE_RELEASE_CODEGEN_UNITS=${CARGO_PROFILE_RELEASE_CODEGEN_UNITS:-16}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
log "cargo test --release --no-run"
cargo test --locked --release --test it --no-run >"$dir/build.log" 2>&1 || { cat "$dir/build.log" >&2; exit 1; }
bin=$(sed -n 's/.*Executable tests\/it\/main.rs (\(.*\))$/\1/p' "$dir/build.log" | tail -1)
[ -x "$bin" ] || { log "no test binary found"; exit 1; }

per=$(( (CASES + JOBS - 1) / JOBS ))
start=$(date +%s)
pids=()
for i in $(seq 0 $((JOBS - 1))); do
  seed=$(printf '0x%x' $(( SEED + i )))
  log "run $i: seed $seed, $per cases"
  RUST_BACKTRACE=0 GATEHOUSE_DIFF_SEED=$seed GATEHOUSE_DIFF_CASES=$per GATEHOUSE_DIFF_REQUESTS=$REQUESTS \
    timeout "$TIMEOUT" "$bin" differential --nocapture --test-threads 1 \
    >"$dir/$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    status=1
    log "run $i failed:"
    grep -E '^(seed|case|request|    |thread)' "$dir/$i.log" | cut -c1-2000 | head -60 >&2
  fi
  grep -o 'differential \(responses\|requests\): .*' "$dir/$i.log" || true
done
log "$((per * JOBS)) response cases in $(( $(date +%s) - start )) s, status $status"
exit $status
