#!/usr/bin/env bash
# The GPU benchmark in two steps: build where you are, run on the GPU machine.
#
#   bash bench/gpu.sh build        # CUDA toolkit (if nvcc is missing) + cargo build --features cuda
#                                  # → .gpu/kvq (stripped; carry it to the GPU machine)
#   bash bench/gpu.sh run OUTDIR   # on the GPU: compute-sanitizer memcheck + racecheck on small
#                                  # problems, PyTorch SDPA (the peer), then `kvq bench attn`
#                                  # with its checks, then `kvq bench gpu-model` (the model on
#                                  # the GPU vs the CPU) and `kvq bench gpu-e2e` (batch and
#                                  # tokens/s in a 40 GiB KV budget), each with the real GGUF
#                                  # too if $KVQ_MODEL names one there; all lands in OUTDIR
#
# A device call carries at most 64 MiB, so the real model (98 MB) and the binary (18 MB)
# travel in two calls to the same (warm) machine: here `bash bench/gpu.sh pack-model`
# (→ .gpu/model.a, .gpu/model.b); there, call 1 carrying .gpu/kvq.gz, .gpu/COMMIT and
# .gpu/model.b: `bash bench/gpu.sh stash && bash bench/gpu.sh run OUT attn`; call 2
# carrying .gpu/model.a: `bash bench/gpu.sh run OUT model` (and `... run OUT e2e`). `stash` keeps what a call
# carried in /tmp/kvq-gpu for the next; with everything on one machine, `run OUT` does both.
#
# The results table goes to OUTDIR/gpu-attn.md; copy it to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/model.env
source bench/model.env
STASH=/tmp/kvq-gpu
case "${1:-}" in
pack-model)
  model=${KVQ_MODEL:-$HOME/.cache/kvq/SmolLM2-135M-Instruct.Q4_1.gguf}
  echo "$MODEL_SHA  $model" | sha256sum -c --quiet
  mkdir -p .gpu
  head -c $HALF "$model" >.gpu/model.a
  tail -c +$((HALF + 1)) "$model" >.gpu/model.b
  ls -la .gpu/model.a .gpu/model.b
  ;;
stash|stash-model)
  mkdir -p $STASH
  for f in model.a model.b kvq.gz COMMIT; do [[ -f .gpu/$f ]] && cp .gpu/$f $STASH/$f; done
  ls -la $STASH
  ;;
build)
  if ! command -v nvcc >/dev/null; then
    TK=${KVQ_CUDA_TOOLKIT:-../shared/cuda/toolkit.sh}
    [[ -f $TK ]] || { echo "gpu.sh: no nvcc; install a CUDA 13.0 toolkit or point KVQ_CUDA_TOOLKIT at a script that does" >&2; exit 1; }
    # shellcheck disable=SC1090
    source "$(bash "$TK")"
  fi
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda} cargo build --release --features cuda -p kvq-cli
  mkdir -p .gpu
  # Stripped and gzipped (about 16 MB): small enough to carry to a GPU machine.
  strip -o .gpu/kvq "${CARGO_TARGET_DIR:-target/cuda}/release/kvq"
  gzip -9f .gpu/kvq
  # The commit it was built from (with "+dirty" for uncommitted changes), for results files.
  echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates kernels || echo +dirty)" >.gpu/COMMIT
  ls -la .gpu/kvq.gz
  ;;
run)
  OUT=${2:?usage: bench/gpu.sh run OUTDIR [all|attn|model|e2e]}
  PART=${3:-all}
  # What a call carried, or what an earlier call on this machine stashed.
  carried() { if [[ -f .gpu/$1 ]]; then echo .gpu/$1; elif [[ -f $STASH/$1 ]]; then echo $STASH/$1; fi; }
  # The commit the binary was built from (recorded by the build step).
  c=$(carried COMMIT)
  export KVQ_COMMIT=${KVQ_COMMIT:-$(cat ${c:-/dev/null} 2>/dev/null || echo unknown)}
  mkdir -p "$OUT"
  a=$(carried model.a) b=$(carried model.b)
  if [[ -z ${KVQ_MODEL:-} && -n $a && -n $b ]]; then
    mkdir -p $STASH && cat "$a" "$b" >$STASH/model.gguf
    echo "$MODEL_SHA  $STASH/model.gguf" | sha256sum -c --quiet && export KVQ_MODEL=$STASH/model.gguf
  fi
  export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  KVQ=${KVQ_BIN:-}
  if [[ -z $KVQ ]]; then
    z=$(carried kvq.gz)
    [[ -n $z ]] || { echo "gpu.sh: no .gpu/kvq.gz (run 'bash bench/gpu.sh build' and carry it)" >&2; exit 1; }
    KVQ=$(mktemp -d)/kvq; gunzip -c "$z" >"$KVQ"; chmod +x "$KVQ"
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  if [[ $PART == all || $PART == attn ]]; then
  small=(--shapes tiny64:2:9:3:64:700,tiny128:2:8:2:128:333 --caches kivi-2,kivi-4,kivi-2:group=64,kivi-4:k-bits=2,per-token-4,per-token-2,kvquant-4,kvquant-3,kvquant-2 --iters 1)
  if [[ ${KVQ_SANITIZE:-1} == 1 ]]; then
    for tool in memcheck racecheck; do
      if compute-sanitizer --tool "$tool" --error-exitcode 9 "$KVQ" bench attn "${small[@]}" >"$OUT/sanitizer-$tool.txt" 2>&1; then
        echo "compute-sanitizer $tool: clean ($(grep -c 'bytes equal' "$OUT/sanitizer-$tool.txt") checked rows)" | tee -a "$OUT/sanitizer.txt"
      else
        echo "compute-sanitizer $tool: FAILED (see sanitizer-$tool.txt)" | tee -a "$OUT/sanitizer.txt"
        tail -30 "$OUT/sanitizer-$tool.txt"
      fi
    done
  fi
  python3 bench/peers/sdpa_attn.py --out "$OUT/sdpa.json" ${KVQ_SHAPES:+--shapes "$KVQ_SHAPES"}
  "$KVQ" bench attn --peer "$OUT/sdpa.json" --json "$OUT/gpu-attn.json" --out "$OUT/gpu-attn.md" ${KVQ_SHAPES:+--shapes "$KVQ_SHAPES"}
  # A profile of the decode kernels on the goal's problem, where Nsight Compute is at hand.
  NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
  if [[ -n $NCU && ${KVQ_NCU:-1} == 1 ]]; then
    # The first launches of the decode kernels (tensor cores, then the window's), of the
    # quantize kernels (keys, values), and of KVQuant's decode kernel, on the goal's problem;
    # then why warps waited. Each entry: name:kernel regex:cache.
    for what in attn:kivi_decode_attn:kivi-2 quant:quant_:kivi-2 kvquant:kvquant_attn:kvquant-4; do
      IFS=: read -r tag regex cache <<<"$what"
      timeout 200 "$NCU" --kernel-name regex:"$regex" --launch-count 2 --set full -o "$OUT/$tag-profile" \
        "$KVQ" bench attn --shapes llama3-8b:16:32:8:128:32768 --caches "$cache" --iters 1 >>"$OUT/ncu.log" 2>&1 || echo "ncu ($tag): failed (see ncu.log)"
      rep=$OUT/$tag-profile.ncu-rep
      [[ -f $rep ]] || continue
      "$NCU" --import "$rep" --page details >"$OUT/$tag-profile.txt" 2>&1 || true
      # Cycles per issued instruction each kernel's warps spent waiting, by reason.
      "$NCU" --import "$rep" --page raw --csv 2>/dev/null | python3 -c '
import csv, sys
rows = list(csv.reader(sys.stdin))
head = rows[0]
for r in rows[2:]:
    name = r[head.index("Kernel Name")]
    stalls = [(float(v.replace(",", "")), h.split("stalled_")[1].split("_per")[0]) for h, v in zip(head, r)
              if h.startswith("smsp__average_warps_issue_stalled_") and h.endswith("_per_issue_active.ratio") and v]
    print(name, " ".join(f"{n}={v:.2f}" for v, n in sorted(stalls, reverse=True)[:10]))
' >>"$OUT/stalls.txt" 2>&1 || true
      rm -f "$rep"
    done
  else
    echo "ncu: not on this machine" >"$OUT/ncu.log"
  fi
  fi
  if [[ $PART == all || $PART == model ]]; then
  # The model on the GPU (KIVI, per-token and KVQuant caches there) vs the CPU: kvq's small model always
  # (no file to carry); the real GGUF too when $KVQ_MODEL names one on this machine.
  if [[ ${KVQ_SANITIZE:-1} == 1 ]]; then
    if compute-sanitizer --tool memcheck --error-exitcode 9 "$KVQ" bench gpu-model --tokens 96 --chunk 16 --batch 2 --new-tokens 4 >"$OUT/sanitizer-model.txt" 2>&1; then
      echo "compute-sanitizer memcheck (gpu-model): clean" | tee -a "$OUT/sanitizer.txt"
    else
      echo "compute-sanitizer memcheck (gpu-model): FAILED (see sanitizer-model.txt)" | tee -a "$OUT/sanitizer.txt"
      tail -30 "$OUT/sanitizer-model.txt"
    fi
  fi
  "$KVQ" bench gpu-model --out "$OUT/gpu-model.md" || echo "gpu-model (small model): FAILED" | tee -a "$OUT/gpu-model-failed.txt"
  if [[ -n ${KVQ_MODEL:-} && -f ${KVQ_MODEL:-} ]]; then
    # (KVQ_MODEL_CACHES: a subset, to fit one device call)
    "$KVQ" bench gpu-model --model "$KVQ_MODEL" --tokens 1024 --batch 16 ${KVQ_MODEL_CACHES:+--caches "$KVQ_MODEL_CACHES"} --out "$OUT/gpu-model-real.md" || echo "gpu-model (real model): FAILED" | tee -a "$OUT/gpu-model-failed.txt"
  fi
  fi
  if [[ $PART == e2e-profile && -n ${KVQ_MODEL:-} && -f ${KVQ_MODEL:-} ]]; then
    # Every kernel of one decode step at the budget's batch and full context, by time
    # (ncu; the step runs between cuProfilerStart/Stop when KVQ_PROFILE_STEP is set).
    NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu)
    for cache in ${KVQ_PROFILE_CACHES:-fp16 kivi-2}; do
      KVQ_PROFILE_STEP=1 timeout 280 "$NCU" --profile-from-start off --metrics gpu__time_duration.sum --csv \
        "$KVQ" bench gpu-e2e --model "$KVQ_MODEL" --caches "$cache" --steps 2 ${KVQ_E2E_ARGS:-} >"$OUT/ncu-e2e-$cache.log" 2>&1 || echo "e2e-profile ($cache): failed"
      grep '^"' "$OUT/ncu-e2e-$cache.log" >"$OUT/e2e-kernels-$cache.csv" || true
      python3 - "$OUT/e2e-kernels-$cache.csv" "$cache" >>"$OUT/e2e-kernels.md" <<'PY' || echo "e2e-profile ($cache): no kernels read"
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 5]
head, rows = rows[0], rows[1:]
name, val = head.index("Kernel Name"), head.index("Metric Value")
ids = collections.OrderedDict()
for r in rows:
    ids.setdefault(r[head.index("ID")], (r[name], float(r[val].replace(",", ""))))
# The first profiled step is the full-context one (the second, at 64 tokens: the model
# alone); the second starts where the first step's first kernel comes again.
ks = list(ids.values())
n = next((i for i in range(1, len(ks)) if ks[i][0] == ks[0][0]), len(ks))
tot = collections.Counter(); cnt = collections.Counter()
for i, (k, ns) in enumerate(ids.values()):
    part = "context" if i < n else "64 tokens"
    k = k.split("(")[0][:60]
    tot[(part, k)] += ns; cnt[(part, k)] += 1
print(f"\n### {sys.argv[2]}: {n} kernels a step\n\n| step | kernel | launches | µs |\n|---|---|---:|---:|")
for part in ("context", "64 tokens"):
    s = sum(v for (p, _), v in tot.items() if p == part)
    print(f"| {part} | all | {sum(c for (p, _), c in cnt.items() if p == part)} | {s / 1e3:.0f} |")
    for (p, k), v in sorted(tot.items(), key=lambda x: -x[1]):
        if p == part and v > 0.01 * s:
            print(f"| {part} | {k} | {cnt[(p, k)]} | {v / 1e3:.0f} |")
PY
    done
  fi
  if [[ $PART == all || $PART == e2e ]]; then
  # End to end: the largest batch in a 40 GiB KV budget at 8k tokens, decode tokens/s
  # (small model at 1k tokens first: no file needed).
  "$KVQ" bench gpu-e2e --context 1024 --budget 256MiB --steps 8 --out "$OUT/gpu-e2e-small.md" || echo "gpu-e2e (small model): FAILED" | tee -a "$OUT/gpu-e2e-failed.txt"
  if [[ -n ${KVQ_MODEL:-} && -f ${KVQ_MODEL:-} ]]; then
    # (the context: as much as SmolLM2's 8,192 tokens leave room for, 8,160)
    "$KVQ" bench gpu-e2e --model "$KVQ_MODEL" --caches fp16,kivi-2,kivi-2:group=64,kivi-4,per-token-4,kvquant-4 --out "$OUT/gpu-e2e.md" || echo "gpu-e2e (real model): FAILED" | tee -a "$OUT/gpu-e2e-failed.txt"
  fi
  fi
  ;;
*)
  sed -n '2,18p' "$0"
  exit 2
  ;;
esac
