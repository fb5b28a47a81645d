#!/usr/bin/env bash
# Builds the browser demo (web/) and runs its end-to-end test in Chromium:
# kvq-wasm for wasm32, the JS glue (wasm-bindgen, the crate's pinned version), the real
# sample, the golden numbers from the native code, then web/test/browser.mjs.
# Serve web/ with any static server afterwards to use the page (e.g. python3 -m http.server -d web).
# KVQ_WEB_BENCH=path.md also writes the timing table there.
set -euo pipefail
cd "$(dirname "$0")/.."

# The CLI must match the crate's `wasm-bindgen = "=0.2.130"` exactly.
WASM_BINDGEN_VERSION=0.2.130

echo "== kvq-wasm for the browser (wasm32, release)"
rustup target add wasm32-unknown-unknown >/dev/null
cargo build -p kvq-wasm --release --target wasm32-unknown-unknown --locked

echo "== JS glue (wasm-bindgen $WASM_BINDGEN_VERSION)"
if ! wasm-bindgen --version 2>/dev/null | grep -qx "wasm-bindgen $WASM_BINDGEN_VERSION"; then
  # Not --locked: its lockfile pins webpki-roots 1.0.11, which crates.io no longer serves.
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 cargo install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
fi
rm -rf web/pkg
wasm-bindgen --target web --out-dir web/pkg target/wasm32-unknown-unknown/release/kvq_wasm.wasm
cp data/smollm2-kv-sample.kvs web/smollm2-kv-sample.kvs

# `web.sh build` stops here: the page is ready to serve (the book embeds it).
if [ "${1:-}" = build ]; then exit 0; fi

echo "== Golden numbers from the native code"
cargo run -p kvq-wasm --example golden --release --locked -- web/test/golden.json

echo "== Chromium and playwright-core"
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -eq 0 ]; then apt-get update && apt-get install -y chromium; else sudo apt-get update && sudo apt-get install -y chromium; fi
fi
(cd web && npm ci --no-audit --no-fund)

echo "== The page in Chromium"
node web/test/browser.mjs
