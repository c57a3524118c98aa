#!/usr/bin/env bash
# Rebuilds web/pkg (the browser's WASM build of crates/polydev-zk) and target/zk-node (the same
# for Node, used by tests/wasm). Needs the wasm32-unknown-unknown target and wasm-bindgen-cli at
# the version of the wasm-bindgen crate in Cargo.lock (.ci/run installs both).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p polydev-zk --locked --release --target wasm32-unknown-unknown --features wasm
wasm=target/wasm32-unknown-unknown/release/polydev_zk.wasm
wasm-bindgen --target web --no-typescript --out-dir web/pkg "$wasm"
wasm-bindgen --target nodejs --no-typescript --out-dir target/zk-node "$wasm"
