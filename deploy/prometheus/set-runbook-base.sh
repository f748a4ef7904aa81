#!/usr/bin/env bash
# Points every alert's runbook_url at BASE#<section>, in alerts.yaml and in the tests that
# check its annotations (alerts_test.yaml). BASE is where you publish docs/runbook.md (a
# wiki page, your Git host's view of a tagged release):
#   bash deploy/prometheus/set-runbook-base.sh https://git.example.com/you/gatehouse/blob/v1/docs/runbook.md
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 BASE_URL (where docs/runbook.md is published)" >&2; exit 2; }
dir=$(cd "$(dirname "$0")" && pwd)
python3 - "$1" "$dir/alerts.yaml" "$dir/alerts_test.yaml" <<'PY'
import re, sys
base, files = sys.argv[1], sys.argv[2:]
if not re.fullmatch(r"https?://[^\s#\"']+", base):
    sys.exit(f"not an http(s) URL without '#', quotes or spaces: {base!r}")
for f in files:
    text = open(f).read()
    text, n = re.subn(r"(runbook_url: )[^#\s]*#", lambda m: m.group(1) + base + "#", text)
    open(f, "w").write(text)
    print(f"{f}: {n} runbook_url(s) now under {base}")
PY
