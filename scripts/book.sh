#!/usr/bin/env bash
# Builds the book (book/ → book/build) with the demo embedded, checks its links, and runs
# `mdbook test` on its Rust listings. Installs the pinned tools from crates.io and npm.
set -euo pipefail
cd "$(dirname "$0")/.."

# mdbook 0.5.4 and mdbook-katex 0.10.0 go together (katex is built on mdbook 0.5's
# preprocessor crate). opt-level 1 halves their build time; they are fast enough.
install() { # crate version
  if ! "$1" --version 2>/dev/null | grep -q "$2"; then
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_LTO=false cargo install "$1" --version "$2" --locked
  fi
}
install mdbook 0.5.4
install mdbook-katex 0.10.0

echo "-- the quiz preprocessor"
cargo build --release --locked -p kvq-book

echo "-- KaTeX's stylesheet and fonts (npm katex, the version mdbook-katex renders with)"
(cd book && npm ci --no-audit --no-fund --silent)
rm -rf book/src/katex && mkdir -p book/src/katex
cp -r book/node_modules/katex/dist/katex.min.css book/node_modules/katex/dist/fonts book/src/katex/

echo "-- the browser demo, embedded as book/src/demo"
bash scripts/web.sh build
rm -rf book/src/demo && mkdir -p book/src/demo
cp -r web/index.html web/demo.js web/style.css web/pkg web/smollm2-kv-sample.kvs book/src/demo/

echo "-- the quality report's figure (the page includes bench/results/quality.md)"
cp bench/results/quality.svg book/src/quality.svg

echo "-- mdbook build, links, test"
rm -rf book/build
export PATH="$PWD/target/release:$PATH" # mdbook runs mdbook-kvq from PATH
mdbook build book
target/release/mdbook-kvq check-links book/build
mdbook test book
