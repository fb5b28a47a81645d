#!/usr/bin/env bash
# Quality vs bits (the issue): kvq's caches and the peers (HF transformers' DynamicCache and
# QuantizedCache, llama.cpp's cache types) on the very same token ids, windows and chunks,
# in one run. Writes $KVQ_QUALITY_OUT/quality.md, quality.json and quality.svg
# (bench/quality_report.py), and keeps every raw output in $KVQ_QUALITY_OUT/quality-raw/.
#
#   bash bench/quality.sh                                    # the full run: 8192 ids of each
#                                                            # document, contexts 1024,4096,8192
#   KVQ_QUALITY_TOKENS=256 KVQ_QUALITY_CONTEXTS=128 KVQ_QUALITY_OUT=/tmp/q bash bench/quality.sh
#
# Steps: (a) scripts/corpus.sh; (b) `kvq tokenize` the two documents (first N ids of each);
# (c) `kvq ppl` per document and context, all caches in lockstep, fp32 reference;
# (d) bench/peers/hf_quality.py and bench/peers/llama_cpp_quality.py per document on those ids;
# (e) bench/quality_report.py. The peers need bench/peers/requirements-quality.txt.
#
# Environment (defaults in brackets):
#   KVQ_QUALITY_TOKENS    ids per document [8192]
#   KVQ_QUALITY_CONTEXTS  window lengths, comma-separated [1024,4096,8192]
#   KVQ_QUALITY_CHUNK     tokens per forward call, for every tool [64]
#   KVQ_QUALITY_OUT       where the report goes [bench/results]; a run with other settings than
#                         the defaults refuses to write into bench/results (KVQ_QUALITY_FORCE=1)
#   KVQ_QUALITY_RAW       raw outputs [$KVQ_QUALITY_OUT/quality-raw]
#   KVQ_QUALITY_PEERS     peers to run: hf,llama.cpp [hf,llama.cpp]; "none" for kvq alone
#   KVQ_QUALITY_WEIGHTS   kvq's --weights [stored] (as the GGUF stores them, as llama.cpp runs them)
#   KVQ_QUALITY_CACHES    kvq's --caches [the issue's list, below]
#   KVQ_QUALITY_THREADS   --threads for both peers [their defaults]
#   KVQ_QUALITY_KVQ       0: skip kvq's own runs (a peers-only part of a split run) [1]
#   KVQ_QUALITY_JOBS      kvq ppl processes at once, each with RAYON_NUM_THREADS = cores / jobs [1]
#   KVQ_QUALITY_SPLIT     caches per kvq ppl process [all]; each process also runs the fp32
#                         reference, and their rows are merged (the references checked equal)
#   KVQ_BIN               a kvq binary built beforehand (no cargo on the machine) [cargo build]
#   KVQ_QUALITY_RESUME    1: keep the raw outputs of an interrupted run with the same settings and
#                         skip the kvq ppl / peer steps whose output is already complete [0]
#                         (meta.json, and so the report's commit and date, are those of the resumed run)
#   KVQ_MODEL             the GGUF [what `kvq fetch` saves]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

DEFAULT_TOKENS=8192
DEFAULT_CONTEXTS=1024,4096,8192
DEFAULT_CHUNK=64
DEFAULT_CACHES=fp16,per-token-4,per-token-2,per-token-4:past-only=false,kivi-4,kivi-2,kivi-4:group=128,kivi-2:group=128,kivi-2:past-only=false,kvquant-4,kvquant-3,kvquant-2,kvquant-3:outliers=0:sink=0,kvquant-2:outliers=0:sink=0
TOKENS=${KVQ_QUALITY_TOKENS:-$DEFAULT_TOKENS}
CONTEXTS=${KVQ_QUALITY_CONTEXTS:-$DEFAULT_CONTEXTS}
CHUNK=${KVQ_QUALITY_CHUNK:-$DEFAULT_CHUNK}
CACHES=${KVQ_QUALITY_CACHES:-$DEFAULT_CACHES}
WEIGHTS=${KVQ_QUALITY_WEIGHTS:-stored}
PEERS=${KVQ_QUALITY_PEERS:-hf,llama.cpp}
RUN_KVQ=${KVQ_QUALITY_KVQ:-1}
JOBS=${KVQ_QUALITY_JOBS:-1}
SPLIT=${KVQ_QUALITY_SPLIT:-0}
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || { echo "quality.sh: bad KVQ_QUALITY_JOBS '$JOBS'" >&2; exit 2; }
[[ "$SPLIT" =~ ^[0-9]+$ ]] || { echo "quality.sh: bad KVQ_QUALITY_SPLIT '$SPLIT'" >&2; exit 2; }
THREADS=${KVQ_QUALITY_THREADS:-}
OUT=${KVQ_QUALITY_OUT:-bench/results}
RAW=${KVQ_QUALITY_RAW:-$OUT/quality-raw}
DOCS=(alice loc-workshop)

# defaults: the issue's settings; full: those, and every tool ran here (a split run becomes full
# when bench/quality_merge.py brings the other tools' outputs in).
defaults=1
[ "$TOKENS" = "$DEFAULT_TOKENS" ] && [ "$CONTEXTS" = "$DEFAULT_CONTEXTS" ] && [ "$CHUNK" = "$DEFAULT_CHUNK" ] \
  && [ "$CACHES" = "$DEFAULT_CACHES" ] || defaults=0
full=$defaults
[ "$PEERS" = "hf,llama.cpp" ] && [ "$RUN_KVQ" = 1 ] || full=0
if [ "$full" = 0 ] && [ "$(realpath -m "$OUT")" = "$root/bench/results" ] && [ "${KVQ_QUALITY_FORCE:-0}" != 1 ]; then
  echo "quality.sh: not the issue's settings (tokens $TOKENS, contexts $CONTEXTS, chunk $CHUNK, peers $PEERS)," >&2
  echo "  so it will not overwrite bench/results: set KVQ_QUALITY_OUT=/some/dir (or KVQ_QUALITY_FORCE=1)" >&2
  exit 2
fi
for c in ${CONTEXTS//,/ }; do
  [[ "$c" =~ ^[0-9]+$ ]] && [ "$c" -ge 2 ] || { echo "quality.sh: bad context '$c'" >&2; exit 2; }
done
run_hf=0; run_llama=0
case ",$PEERS," in *,hf,*) run_hf=1 ;; esac
case ",$PEERS," in *,llama.cpp,*) run_llama=1 ;; esac

RESUME=${KVQ_QUALITY_RESUME:-0}
mkdir -p "$OUT" "$RAW"
if [ "$RESUME" != 1 ]; then
  rm -f "$RAW"/kvq-*.json "$RAW"/hf-*.json "$RAW"/llama-*.json "$RAW"/ids*.json "$RAW"/steps.jsonl "$RAW"/commands.txt "$RAW"/*.part
fi
# complete FILE: 0 if FILE holds a finished kvq ppl output, or a peer's output with every context.
complete() {
  [ "$RESUME" = 1 ] && [ -s "$1" ] && python3 - "$1" "$CONTEXTS" <<'PY'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except Exception:
    sys.exit(1)
want = {int(c) for c in sys.argv[2].split(",")}
done = {r["context"] for r in j.get("rows", [])} if "tool" in j else ({j["context"]} if "reference" in j else set())
sys.exit(0 if ("tool" in j and want <= done) or ("reference" in j and done) else 1)
PY
}
T0=$(date +%s.%N)
say() { printf '[quality %s +%ss] %s\n' "$(date -u +%H:%M:%S)" "$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.0f}')" "$T0" "$(date +%s.%N)")" "$*" >&2; }

# step NAME STDOUT_FILE|- CMD...: prints, records the exact command and its wall time, runs it.
step() {
  local name=$1 out=$2; shift 2
  local cmd; cmd=$(printf '%q ' "$@"); cmd=${cmd% }
  [ "$out" != - ] && cmd="$cmd > $(printf '%q' "$out")"
  say "$name: $cmd"
  local t0 t1; t0=$(date +%s.%N)
  if [ "$out" = - ]; then
    "$@"
  else
    "$@" > "$out.part"
    mv "$out.part" "$out"
  fi
  t1=$(date +%s.%N)
  printf '%s\n' "$cmd" >> "$RAW/commands.txt"
  python3 - "$name" "$t0" "$t1" "$cmd" >> "$RAW/steps.jsonl" <<'PY'
import json, sys
n, t0, t1, cmd = sys.argv[1:]
print(json.dumps({"step": n, "seconds": round(float(t1) - float(t0), 3), "command": cmd}))
PY
  say "$name: done in $(tail -n1 "$RAW/steps.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["seconds"])') s"
}

say "settings: tokens $TOKENS per document, contexts $CONTEXTS, chunk $CHUNK, weights $WEIGHTS, peers $PEERS; report in $OUT, raw outputs in $RAW"

# (a) the corpus, and kvq itself
step corpus - bash scripts/corpus.sh
if [ -n "${KVQ_BIN:-}" ]; then
  kvq=$KVQ_BIN
  [ -x "$kvq" ] || { echo "quality.sh: KVQ_BIN '$kvq' is not an executable" >&2; exit 2; }
else
  step build - cargo build --release -p kvq-cli --locked --quiet
  kvq=target/release/kvq
fi
model=${KVQ_MODEL:-$($kvq fetch 2>/dev/null)}
[ -f "$model" ] || { echo "quality.sh: no model at '$model'" >&2; exit 1; }

# What the report records about this run (the tools' own versions come with their outputs).
python3 - "$RAW/meta.json" <<PY
import json, os, subprocess, sys, datetime, platform
def sh(*a):
    try:
        return subprocess.run(a, capture_output=True, text=True, check=True).stdout.strip()
    except Exception as e:
        return None
lscpu = sh("lscpu") or ""
field = lambda k: next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith(k + ":")), None)
status = sh("git", "status", "--porcelain") or ""
relevant = sh("git", "status", "--porcelain", "--", "crates", "Cargo.toml", "Cargo.lock", "bench", "scripts/corpus.sh") or ""
meta = {
    "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "machine": {"cpu_model": field("Model name"), "cpus": field("CPU(s)"), "cores_per_socket": field("Core(s) per socket"),
                "sockets": field("Socket(s)"), "threads_per_core": field("Thread(s) per core"), "nproc": os.cpu_count(),
                "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                "platform": platform.platform(), "gpu": sh("nvidia-smi", "--query-gpu=name", "--format=csv,noheader")},
    # KVQ_COMMIT: the commit a copied tree was made from (bench/quality_device.sh); the status
    # below is then against the copy's own .git, whose HEAD is recorded beside it.
    "commit": os.environ.get("KVQ_COMMIT") or sh("git", "rev-parse", "--short", "HEAD"),
    "git_head": sh("git", "rev-parse", "--short", "HEAD"),
    "dirty": bool(status),
    "modified_files": sum(1 for l in status.splitlines() if not l.startswith("??")),
    "untracked_files": sum(1 for l in status.splitlines() if l.startswith("??")),
    "dirty_relevant": relevant.splitlines(),
    "diff_sha256": sh("bash", "-c", "git diff HEAD | sha256sum | cut -c1-16") if any(not l.startswith("??") for l in status.splitlines()) else None,
    "settings": {"tokens": int("$TOKENS"), "contexts": [int(c) for c in "$CONTEXTS".split(",")], "chunk": int("$CHUNK"),
                 "weights": "$WEIGHTS", "caches": "$CACHES".split(","), "reference": "fp32", "peers": "$PEERS",
                 "threads": "$THREADS" or None, "documents": "${DOCS[*]}".split(), "full": bool($full),
                 "defaults": bool($defaults), "kvq": bool($RUN_KVQ), "jobs": $JOBS, "split": $SPLIT},
    "model": {"path": os.path.abspath("$model"), "bytes": os.path.getsize("$model"),
              "sha256": sh("bash", "-c", "sha256sum '$model' | cut -d' ' -f1")},
    "versions": {"kvq": sh("$kvq", "--version"), "rustc": sh("rustc", "--version"), "cargo": sh("cargo", "--version"),
                 "python": platform.python_version()},
    "env": {k: v for k, v in os.environ.items() if k.startswith("KVQ_QUALITY_") or k in ("KVQ_MODEL", "RAYON_NUM_THREADS", "OMP_NUM_THREADS")},
}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
PY
say "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD && echo '' || echo ' (dirty tree)'), model $model"

# (b) the token ids every tool scores
texts=$(printf 'data/corpus/%s.txt,' "${DOCS[@]}"); texts=${texts%,}
step tokenize - $kvq tokenize --model "$model" --texts "$texts" --max-tokens "$TOKENS" --out "$RAW/ids.json"
python3 - "$RAW" <<'PY'
import json, sys, os
raw = sys.argv[1]
for d in json.load(open(os.path.join(raw, "ids.json")))["documents"]:
    json.dump({"documents": [d]}, open(os.path.join(raw, f"ids-{d['name']}.json"), "w"))
    print(f"  {d['name']}: {len(d['ids'])} ids", file=sys.stderr)
PY

# (c) kvq: one process per document and context (or per part of the cache list, KVQ_QUALITY_SPLIT),
# every cache in lockstep with the fp32 reference; KVQ_QUALITY_JOBS processes at once.
n_ctx=$(tr ',' '\n' <<<"$CONTEXTS" | wc -l)
IFS=, read -ra cache_list <<<"$CACHES"
per=${#cache_list[@]}; [ "$SPLIT" -gt 0 ] && [ "$SPLIT" -lt "$per" ] && per=$SPLIT
n_parts=$(( (${#cache_list[@]} + per - 1) / per ))
threads=$(( $(nproc) / JOBS )); [ "$threads" -ge 1 ] || threads=1
running=0; failed=0
# kvq_ppl OUT CACHES: one kvq ppl process (in the background when JOBS > 1)
kvq_ppl() {
  local out=$1 caches=$2 ids=$3; shift 3
  step "$*" "$out" env RAYON_NUM_THREADS="$threads" \
    $kvq ppl --model "$model" --weights "$WEIGHTS" --json --chunk "$CHUNK" --context "$c" --max-tokens "$TOKENS" \
    --text "data/corpus/$doc.txt" --caches "$caches" --dump-ids "$ids"
}
i=0
# The longest contexts first: with several jobs, the longest processes start first.
for c in $(tr ',' '\n' <<<"$CONTEXTS" | sort -rn); do
  for doc in "${DOCS[@]}"; do
    i=$((i + 1))
    [ "$RUN_KVQ" = 1 ] || continue
    if complete "$RAW/kvq-$doc-$c.json"; then say "kvq ppl $doc context $c: already done (resume)"; continue; fi
    for ((p = 0; p < n_parts; p++)); do
      part=$(IFS=,; echo "${cache_list[*]:$((p * per)):$per}")
      if [ "$n_parts" = 1 ]; then out="$RAW/kvq-$doc-$c.json"; ids="$RAW/kvq-ids-$doc-$c.json"
      else out="$RAW/part-kvq-$doc-$c-$p.json"; ids="$RAW/part-kvq-ids-$doc-$c-$p.json"; fi
      if [ "$n_parts" -gt 1 ] && complete "$out"; then say "$(basename "$out"): already done (resume)"; continue; fi
      name="kvq ppl $doc context $c ($i/$(( ${#DOCS[@]} * n_ctx )))"
      [ "$n_parts" = 1 ] || name="$name part $((p + 1))/$n_parts"
      if [ "$JOBS" = 1 ]; then
        kvq_ppl "$out" "$part" "$ids" "$name"
      else
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || failed=1; done
        kvq_ppl "$out" "$part" "$ids" "$name" &
      fi
    done
  done
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
[ "$failed" = 0 ] || { echo "quality.sh: a kvq ppl process failed (see above)" >&2; exit 1; }
if [ "$RUN_KVQ" = 1 ] && [ "$n_parts" -gt 1 ]; then
  for doc in "${DOCS[@]}"; do
    for c in ${CONTEXTS//,/ }; do
      complete "$RAW/kvq-$doc-$c.json" && continue
      step "merge kvq $doc context $c" - python3 bench/quality_merge.py parts --out "$RAW/kvq-$doc-$c.json" \
        --ids-out "$RAW/kvq-ids-$doc-$c.json" $(for ((p = 0; p < n_parts; p++)); do echo "$RAW/part-kvq-$doc-$c-$p.json"; done)
    done
  done
fi

# (d) the peers, per document, on the ids of (b)
thr=(); [ -n "$THREADS" ] && thr=(--threads "$THREADS")
for doc in "${DOCS[@]}"; do
  if [ "$run_hf" = 1 ] && complete "$RAW/hf-$doc.json"; then
    say "transformers $doc: already done (resume)"
  elif [ "$run_hf" = 1 ]; then
    step "transformers $doc" - python3 bench/peers/hf_quality.py --model "$model" --ids "$RAW/ids-$doc.json" \
      --contexts "$CONTEXTS" --chunk "$CHUNK" --max-tokens "$TOKENS" "${thr[@]}" --out "$RAW/hf-$doc.json"
  fi
  if [ "$run_llama" = 1 ] && complete "$RAW/llama-$doc.json"; then
    say "llama.cpp $doc: already done (resume)"
  elif [ "$run_llama" = 1 ]; then
    step "llama.cpp $doc" - python3 bench/peers/llama_cpp_quality.py --model "$model" --ids "$RAW/ids-$doc.json" \
      --contexts "$CONTEXTS" --chunk "$CHUNK" --max-tokens "$TOKENS" --types q8_0,q4_0,q4_1 "${thr[@]}" \
      --out "$RAW/llama-$doc.json"
  fi
done

# (e) the report (not for a peers-only part: bench/quality_merge.py brings its outputs to the kvq run)
[ "$RUN_KVQ" = 1 ] || { say "peers-only run: outputs in $RAW (no report)"; exit 0; }
notes=(); [ -f bench/results/quality-notes.md ] && notes=(--notes bench/results/quality-notes.md)
step report - python3 bench/quality_report.py --raw "$RAW" --out "$OUT" "${notes[@]}"
say "wrote $OUT/quality.md, $OUT/quality.json, $OUT/quality.svg"
