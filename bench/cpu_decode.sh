#!/usr/bin/env bash
# CPU decode, side by side in one run: kvq (fp16, kivi-4, kivi-2 caches) and llama.cpp
# (f16, q8_0, q4_0 caches) on the same GGUF and the same prompt token ids.
# Needs: `pip install llama-cpp-python` (builds llama.cpp from source, ~10 min).
# Writes bench/results/cpu-decode-vs-llamacpp.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kvq-cli --locked >/dev/null
kvq=target/release/kvq
model=$($kvq fetch 2>/dev/null)
tmp=$(mktemp -d)
python3 -c "print(open('data/tour.txt').read().replace(chr(10), ' ')[:2400])" > "$tmp/prompt.txt"
NEW=${NEW:-128}
REPS=${REPS:-3}
configs=()
for weights in stored q8_0; do
  for cache in fp16 kivi-4 kivi-2; do
    configs+=("$weights-$cache")
    for r in $(seq 1 "$REPS"); do
      $kvq generate --model "$model" --weights $weights --cache $cache --prompts "$tmp/prompt.txt" \
        --max-new-tokens "$NEW" --ignore-eos --json > "$tmp/kvq-$weights-$cache-$r.json" 2>/dev/null
    done
  done
done
python3 bench/peers/llama_cpp_decode.py --gguf "$model" --kvq-json "$tmp/kvq-stored-fp16-1.json" --new-tokens "$NEW" --reps "$REPS" > "$tmp/llama.jsonl"
python3 - "$tmp" "$REPS" "${configs[@]}" <<'PY' > bench/results/cpu-decode-vs-llamacpp.md
import json, sys, subprocess, datetime, os
tmp, reps, configs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
kvq = []
for c in configs:
    runs = sorted((json.load(open(os.path.join(tmp, f"kvq-{c}-{r}.json"))) for r in range(1, reps + 1)), key=lambda k: k["decode_tokens_per_s"])
    med = runs[len(runs) // 2]
    med["runs"] = [k["decode_tokens_per_s"] for k in runs]
    kvq.append(med)
peers = [json.loads(l) for l in open(os.path.join(tmp, "llama.jsonl"))]
base = next(p for p in peers if p["cache"] == "llama.cpp f16")["decode_tokens_per_s"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print("# CPU decode: kvq vs llama.cpp, same GGUF, same prompt ids\n")
print(f"- date: {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC\n- machine: {cpu}, {os.cpu_count()} threads (2 used by each)")
print(f"- commit: {commit}\n- command: `bash bench/cpu_decode.sh`\n- model: SmolLM2-135M-Instruct.Q4_1.gguf; {kvq[0]['prompt_ids'][0].__len__()}-token prompt, then {kvq[0]['new_tokens']} greedy tokens (end-of-text ignored)")
print(f"- llama.cpp: llama-cpp-python {peers[0]['version']}, flash attention on, n_batch 512")
print(f"- each row: the median of {reps} runs (decode tokens/s of every run in the last column)\n")
print("| engine | weights in memory | KV cache | prefill (s) | decode tokens/s | × llama.cpp f16 | runs |")
print("|---|---|---|--:|--:|--:|---|")
fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs)
for p in peers:
    print(f"| llama.cpp | Q4_1 + Q8_0 (as stored) | {p['cache'].split()[-1]} | {p['prefill_s']:.2f} | {p['decode_tokens_per_s']:.1f} | {p['decode_tokens_per_s']/base:.2f} | {fmt(p['runs_decode_tokens_per_s'])} |")
for k in kvq:
    w = "Q8_0 (re-quantized at load; candle matmul)" if k["weights"] == "Q8_0" else "Q4_1 + Q8_0 (as stored; kvq AVX2 matmul)"
    print(f"| kvq | {w} | {k['cache']} | {k['prefill_s']:.2f} | {k['decode_tokens_per_s']:.1f} | {k['decode_tokens_per_s']/base:.2f} | {fmt(k['runs'])} |")
ref = next(p for p in peers if p["cache"] == "llama.cpp f16")["tokens"]
ours = kvq[0]["tokens"][0]
agree = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
print(f"\nCorrectness check in the same run: kvq (as stored, fp16 cache) and llama.cpp (f16 cache) produce the same first {agree} greedy tokens of {len(ref)}.")
PY
cat bench/results/cpu-decode-vs-llamacpp.md
