#!/usr/bin/env bash
# Checks the files under deploy/ with the real tools (installed by .ci/run):
#   deploy/validate.sh [prometheus|kubernetes|docker|systemd]...   (default: all four)
# Needs target/debug/gatehouse for systemd (see below).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(prometheus kubernetes docker systemd)
scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')

for step in "${steps[@]}"; do
  case "$step" in
    prometheus)
      echo "== promtool check rules / test rules (deploy/prometheus)"
      promtool check rules deploy/prometheus/alerts.yaml
      (cd deploy/prometheus && promtool test rules alerts_test.yaml)
      ;;
    kubernetes)
      echo "== kubernetes-validate --strict (deploy/kubernetes), bundled schema for the ServiceMonitor"
      # Built-in kinds against the schemas kubernetes-validate ships (offline); it only
      # warns on a custom resource, which validate-crds.py checks against schemas/.
      python3 -m kubernetes_validate --strict --quiet deploy/kubernetes/*.yaml deploy/kubernetes/examples/*.yaml
      # and against the oldest version the README supports (preStop's sleep action is on
      # by default from 1.30)
      python3 -m kubernetes_validate --strict --quiet --kubernetes-version 1.30 deploy/kubernetes/*.yaml deploy/kubernetes/examples/*.yaml
      python3 deploy/kubernetes/validate-crds.py deploy/kubernetes/*.yaml
      # `kubectl apply -f deploy/kubernetes/` must never carry a Secret: it would replace
      # the operator's real credentials and admin token with example data.
      if grep -l '^kind: *Secret' deploy/kubernetes/*.yaml; then
        echo "the applied directory deploy/kubernetes/ holds a Secret (above): move it to deploy/kubernetes/examples/"
        exit 1
      fi
      ;;
    docker)
      echo "== hadolint deploy/Dockerfile"
      "$scripts/hadolint" --no-color deploy/Dockerfile
      ;;
    systemd)
      echo "== systemd-analyze verify deploy/systemd/gatehouse.service"
      # verify insists that ExecStart's binary exists, and /usr/local/bin/gatehouse is not
      # installed here: check a copy whose paths point at the binary cargo just built.
      bin="${CARGO_TARGET_DIR:-$PWD/target}/debug/gatehouse"
      [ -x "$bin" ] || { echo "$bin missing: build first (cargo build)"; exit 1; }
      tmp=$(mktemp -d)
      trap 'rm -rf "$tmp"' EXIT
      sed "s#/usr/local/bin/gatehouse#$bin#g" deploy/systemd/gatehouse.service > "$tmp/gatehouse.service"
      # verify prints problems but exits 0 for some of them: any output is a failure.
      out=$(systemd-analyze verify "$tmp/gatehouse.service" 2>&1) || { echo "$out"; exit 1; }
      if [ -n "$out" ]; then echo "$out"; exit 1; fi
      echo "gatehouse.service: OK"
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
