#!/usr/bin/env bash
# CI for packaging/ (called by .ci/run, as root): the Debian package (built, installed,
# checked, removed and purged by deb/ci.sh), the Prometheus alert rules (promtool check
# and unit tests), the Kubernetes manifest (parsed and cross-checked by
# kubernetes/check.py; its policies checked by `oomwake check`).
#
# Usage: packaging/ci.sh PROMTOOL
# Prints "packaging: N checks passed" last; exits non-zero at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
promtool=$1
checks=0

echo "-- release build of the packaged binary"
start=$(date +%s)
cargo build --release --locked --bin oomwake
echo "release build: $(($(date +%s) - start)) s"

echo "-- Debian package"
packaging/deb/ci.sh target/release/oomwake 2>&1 | tee target/ci-deb.log
n=$(sed -n 's/^deb: \([0-9]*\) checks passed$/\1/p' target/ci-deb.log)
[ -n "$n" ] || exit 1
checks=$((checks + n))

if command -v cargo-deb >/dev/null; then
    # Where cargo-deb is installed (not on a fresh machine: it takes 13 min to compile),
    # the package it builds from the same metadata must hold the same files.
    # cargo deb empties target/debian/: compare against a copy of ours.
    mkdir -p target/cargo-deb
    ours=target/cargo-deb/build-deb.deb
    cp target/debian/oomwake_*.deb "$ours"
    cdeb=$(cargo deb --no-build --no-strip --output target/cargo-deb/oomwake.deb 2>/dev/null | tail -1)
    list() { dpkg-deb -c "$1" | awk '$1 !~ /^d/ { print $6 }' | sed 's/\.gz$//' | sort; }
    if ! diff <(list "$ours") <(list "$cdeb"); then
        echo "packaging: build-deb.py and cargo-deb package different files" >&2
        exit 1
    fi
    echo "ok: cargo deb packages the same files as build-deb.py"
    checks=$((checks + 1))
else
    echo "cargo-deb not installed: the comparison with build-deb.py is skipped"
fi

echo "-- Prometheus alert rules"
"$promtool" check rules packaging/prometheus/alerts.yaml
"$promtool" test rules packaging/prometheus/alerts.test.yaml
groups=$(grep -c '^  - name:' packaging/prometheus/alerts.test.yaml)
echo "ok: promtool check rules; promtool test rules ($groups test groups)"
checks=$((checks + 1 + groups))

echo "-- Kubernetes manifest"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
/usr/bin/python3 packaging/kubernetes/check.py "$out"
target/release/oomwake check --policies "$out/mounted"
target/release/oomwake check "$out"/examples/*.toml >/dev/null
echo "ok: daemonset.yaml parses; its policies pass oomwake check"
checks=$((checks + 2))

echo "packaging: $checks checks passed"
