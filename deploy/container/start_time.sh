#!/usr/bin/env bash
# Time from start to the first /health 200: the image (`<engine> run -d`) against the same server
# started natively from the project's venv (make install), alternating, RUNS times each; prints the
# load average beside each, as the time follows the machine's load (docs/deploy.md, "Measured").
#   deploy/container/start_time.sh [IMAGE]        (default llm-server:<version>; RUNS=2)
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=engine.sh
source deploy/container/engine.sh
pick_engine >/dev/null
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)"
IMAGE="${1:-llm-server:$VERSION}"
NATIVE="${NATIVE:-.venv/bin/start_llm_server}"
[ -x "$NATIVE" ] || { echo "error: $NATIVE is missing: run make install first" >&2; exit 1; }
NAME="llm-server-start-time-$$"
trap '$ENGINE rm -f "$NAME" >/dev/null 2>&1 || true' EXIT

seconds_to_ready() {  # $1: port, $2: start time; waits at most 300 s
    until curl -sf "http://127.0.0.1:$1/health" >/dev/null; do
        sleep 0.1
        if awk -v a="$2" -v b="$(date +%s.%N)" 'BEGIN { exit !(b - a > 300) }'; then echo "timeout"; return; fi
    done
    awk -v a="$2" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f s", b - a }'
}

for i in $(seq "${RUNS:-2}"); do
    started=$(date +%s.%N)
    $ENGINE run -d --name "$NAME" -p 127.0.0.1:18125:8000 -e CHAT_SERVER_API_KEY=start-time "$IMAGE" >/dev/null 2>&1
    echo "container, run $i: $(seconds_to_ready 18125 "$started") (load $(cut -d' ' -f1 /proc/loadavg))"
    $ENGINE rm -f "$NAME" >/dev/null 2>&1
    started=$(date +%s.%N)
    CHAT_SERVER_API_KEY=start-time "$NATIVE" --host 127.0.0.1 --port 18126 >/dev/null 2>&1 &
    pid=$!
    echo "native,    run $i: $(seconds_to_ready 18126 "$started") (load $(cut -d' ' -f1 /proc/loadavg))"
    kill "$pid" && wait "$pid" || true
done
