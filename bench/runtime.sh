#!/usr/bin/env bash
# Runtime benchmarks (docs/runtime.md): claim latency with 100 warm containers and 32 claimers,
# and a sealed `true` job end to end on the local driver against `true` in a sandbox directly.
# Needs bubblewrap and a PostgreSQL server (DATABASE_URL; default the local one on 5432).
# Usage: bench/runtime.sh [--rounds N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p polydev -p polydev-bench --bin polydev-agent --bin runtime
exec target/release/runtime --agent "$PWD/target/release/polydev-agent" "$@"
