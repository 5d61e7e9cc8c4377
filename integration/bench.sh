#!/usr/bin/env bash
# The benchmark in one command (root, cgroup v1):
#   integration/bench.sh            full run; writes integration/bench-results.{json,svg}
#                                   and integration/bench-growth.svg
#   integration/bench.sh --only growth   one scenario; the others stay in the JSON
#   integration/bench.sh --short    a short run (CI): numbers printed, nothing written
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bins
if [ "${1:-}" = "--short" ]; then
    exec target/release/oomwake-bench --short
fi
target/release/oomwake-bench --out integration/bench-results.json "$@"
if command -v rsvg-convert >/dev/null; then
    rsvg-convert integration/bench-results.svg -o integration/bench-results.png
    rsvg-convert integration/bench-growth.svg -o integration/bench-growth.png
fi
