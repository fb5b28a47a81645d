#!/usr/bin/env bash
# The guided tour: builds kvq and walks through the KV cache story.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kvq-cli --locked
kvq=target/release/kvq

echo "== 1. How big is a KV cache? Llama-3-8B at 100k tokens (the seed's '13 GB'):"
$kvq size --model llama-3-8b --seq 100000 --cache fp16,kivi-4,kivi-2,kvquant-2
echo
echo "== 2. GQA and batch: SmolLM2-135M at 8k tokens, 200 prompts at once:"
$kvq size --model smollm2-135m --seq 8192 --batch 200 --cache fp16,per-token-4,kivi-2
echo
echo "== 3. Generation cost without and with a cache (small decoder): quadratic vs linear per token"
$kvq bench decode --contexts 64,256,1024 --steps 8 --caches none,fp16,kivi-2
