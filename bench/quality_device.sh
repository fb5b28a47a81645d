#!/usr/bin/env bash
# The quality run (bench/quality.sh) on a lent GPU machine: kvq's caches on its CPU cores, many
# processes at once (KVQ_QUALITY_JOBS, KVQ_QUALITY_SPLIT), and the transformers peer on its GPU,
# side by side. That machine reaches no registry and takes at most 64 MiB a call, so the model
# (98 MB) travels in two halves, and what the peer needs travels as wheels.
#
#   here:   bash bench/quality_device.sh pack           # builds .qa/ and .qb/ (git-ignored)
#   there:  bash bench/quality_device.sh stash          # call 1, carry .qa: keeps half the model
#           bash bench/quality_device.sh start          # call 2, carry .qb: the rest, then starts
#                                                       # both runs in their own session (setsid)
#           bash bench/quality_device.sh collect OUT [SECONDS]
#                                                       # waits up to SECONDS for the runs, then
#                                                       # packs what is done into OUT/raw.tgz
#   here:   bench/quality_merge.py peers ... joins llama.cpp's outputs (run here), then
#           bench/quality_report.py writes the report.
# A run cut off by the machine's return goes on in a new one: `start` with RESUME=1 and the
# finished outputs in .qb/raw.tgz skips every part already done (KVQ_QUALITY_RESUME).
set -euo pipefail
cd "$(dirname "$0")/.."
W=/tmp/kvq-quality                          # on the device: model, wheels, runs, logs
# shellcheck source=bench/model.env
source bench/model.env

case "${1:-}" in
pack)
  model=${KVQ_MODEL:-$HOME/.cache/kvq/SmolLM2-135M-Instruct.Q4_1.gguf}
  echo "$MODEL_SHA  $model" | sha256sum -c --quiet
  cargo build --release -p kvq-cli --locked --quiet
  bash scripts/corpus.sh
  rm -rf .qa .qb && mkdir -p .qa .qb/whl .qb/corpus
  head -c $HALF "$model" > .qa/model.a
  tail -c +$((HALF + 1)) "$model" > .qb/model.b
  strip -o .qb/kvq target/release/kvq && gzip -9 .qb/kvq
  cp data/corpus/*.txt .qb/corpus/
  git rev-parse --short HEAD > .qb/COMMIT
  git diff --quiet HEAD -- crates Cargo.toml Cargo.lock || echo "+dirty" >> .qb/COMMIT
  # The transformers peer's packages that the machine lacks (its Python is 3.12).
  pip_dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .qb/whl "$@"; }
  pip_dl transformers==5.23.0 gguf==0.19.0 optimum-quanto==0.2.7 termcolor==3.3.0
  # hqq ships no wheel: the one pip built here (pure Python) travels.
  hqq=$(find "${PIP_CACHE_DIR:-$HOME/.cache/pip}" -name 'hqq-0.2.8.post1-py3-none-any.whl' | head -n1)
  if [ -n "$hqq" ]; then cp "$hqq" .qb/whl/; else echo "pack: no hqq wheel here (pip install hqq==0.2.8.post1 once); HQQ rows will be missing" >&2; fi
  [ -f "${RAW_TGZ:-}" ] && cp "$RAW_TGZ" .qb/raw.tgz
  du -sh .qa .qb
  ;;
stash)
  mkdir -p $W && cp .qa/model.a $W/model.a && ls -la $W
  nproc; lscpu | grep -E '^(Model name|CPU\(s\)|Thread|Core|Socket)'; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  ;;
start)
  [ -f $W/model.a ] || { echo "start: no $W/model.a (run stash first, on this same machine)" >&2; exit 1; }
  cat $W/model.a .qb/model.b > $W/model.gguf
  echo "$MODEL_SHA  $W/model.gguf" | sha256sum -c --quiet
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $W/site .qb/whl/*.whl
  gunzip -c .qb/kvq.gz > $W/kvq && chmod +x $W/kvq
  mkdir -p data/corpus && cp .qb/corpus/*.txt data/corpus/
  mkdir -p $W/kvq-run/quality-raw $W/hf-run/quality-raw
  resume=0
  if [ -f .qb/raw.tgz ]; then tar -xzf .qb/raw.tgz -C $W && resume=1; fi
  commit=$(cat .qb/COMMIT)
  cpus=$(nproc)
  jobs=${JOBS:-$cpus}
  cat > $W/run.sh <<EOF
set -u
cd $(pwd)
export KVQ_BIN=$W/kvq KVQ_MODEL=$W/model.gguf KVQ_COMMIT=$commit KVQ_QUALITY_RESUME=$resume
# transformers on the GPU, beside kvq
( KVQ_QUALITY_KVQ=0 KVQ_QUALITY_PEERS=hf KVQ_QUALITY_OUT=$W/hf-run PYTHONPATH=$W/site PYTHONUNBUFFERED=1 \
    bash bench/quality.sh > $W/hf.log 2>&1; echo \$? > $W/hf.rc ) &
# kvq on the CPU cores
KVQ_QUALITY_PEERS=none KVQ_QUALITY_JOBS=$jobs KVQ_QUALITY_SPLIT=${SPLIT:-2} KVQ_QUALITY_OUT=$W/kvq-run \
  bash bench/quality.sh > $W/kvq.log 2>&1; echo \$? > $W/kvq.rc
wait
EOF
  rm -f $W/hf.rc $W/kvq.rc
  setsid bash $W/run.sh < /dev/null > $W/run.log 2>&1 &
  echo "started: $jobs kvq processes at once on $cpus CPUs, split ${SPLIT:-2}, resume $resume, commit $commit"
  ;;
collect)
  out=${2:?collect OUT [SECONDS]}
  end=$(( $(date +%s) + ${3:-0} ))
  while [ "$(date +%s)" -lt "$end" ] && ! { [ -f $W/kvq.rc ] && [ -f $W/hf.rc ]; }; do sleep 10; done
  for f in kvq hf; do echo "$f: exit $(cat $W/$f.rc 2>/dev/null || echo 'still running')"; done
  grep -h 'done in\|already done' $W/kvq.log | tail -n 60 || true
  tail -n 5 $W/hf.log || true
  ls $W/kvq-run/quality-raw | grep -c '^part-kvq-[a-z-]*-[0-9]*-[0-9]*\.json$' | sed 's/^/finished kvq parts: /' || true
  tar -czf "$out/raw.tgz" -C $W kvq-run hf-run kvq.log hf.log run.sh
  uptime
  ;;
*)
  sed -n '2,20p' "$0"; exit 2 ;;
esac
