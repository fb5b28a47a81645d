#!/usr/bin/env bash
# Runs every test of kvq. Installs what it needs (crates.io, rustup's wasm target).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== Rust tests (workspace)"
cargo test --workspace --locked

echo "== The quantizers build for the browser (wasm32, no candle)"
rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true
cargo build -p kvq --no-default-features --target wasm32-unknown-unknown --locked
