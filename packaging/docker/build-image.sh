#!/bin/sh
# Builds the oomwake sidecar image without network access and without a base image:
#   packaging/docker/build-image.sh [TAG]        (default tag: oomwake:latest)
# oomwake is built as a static-pie (glibc, +crt-static), so the image is FROM scratch:
# the binary, the audit-only default policy and the example policies, nothing else.
# Needs cargo, a C toolchain with the static glibc (libc6-dev) and docker.
# CARGO_TARGET_DIR defaults to target/static: the static build does not disturb the
# normal one (different RUSTFLAGS) and does not wait for a running `cargo test`.
set -eu
tag=${1:-oomwake:latest}
repo=$(cd "$(dirname "$0")/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target/static}
triple=x86_64-unknown-linux-gnu

RUSTFLAGS='-C target-feature=+crt-static' cargo build --manifest-path "$repo/Cargo.toml" \
    --release --locked --target "$triple" --target-dir "$target_dir" --bin oomwake
bin=$target_dir/$triple/release/oomwake

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
# Modes set here, not inherited from the checkout: the agent refuses policies that are
# writable by group or others (StrictModes), and COPY keeps the modes it is given.
install -m 0755 "$bin" "$ctx/oomwake"
install -d -m 0755 "$ctx/policies"
install -m 0644 "$repo"/policies/*.toml "$ctx/policies/"
install -m 0644 "$repo/packaging/docker/Dockerfile.scratch" "$ctx/Dockerfile"
docker build -q -t "$tag" "$ctx"
