#!/usr/bin/env bash
# Executes every lesson notebook (lessons/NN-*.ipynb) with the Rust kernel (evcxr_jupyter)
# into a temporary copy, so the committed notebooks are left as they are. Fails if any cell
# fails (a failed assert, a compile error, a panic); prints the time each notebook took.
#
# Installs what is missing: evcxr_jupyter 0.22.0 (cargo) with its Jupyter kernel, and
# Jupyter's notebook runner (pip, lessons/requirements.txt). Needs the model (`kvq fetch`, or
# KVQ_MODEL=path). `--inplace` writes the outputs into the committed notebooks instead.
#
# evcxr reports a panic (a failed assert!) or an error returned with `?` as text on stderr,
# not as a failed cell, so after each run this script also fails on any stderr output.
#
# Compilation: the notebooks share one evcxr build directory (EVCXR_TMPDIR), so kvq and its
# dependencies compile once for all eight; evcxr's own cache (`:cache` in each notebook's first
# cell, ~/.cache/evcxr) also keeps compiled crates from one run to the next.
set -euo pipefail
cd "$(dirname "$0")/.."

inplace=0
if [ "${1:-}" = "--inplace" ]; then
  inplace=1
  shift
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo install --list | grep -q "^evcxr_jupyter v0\.22\.0:"; then
  # opt-level 1 halves its build (~11 min on 2 cores); the kernel is fast enough.
  echo "== installing evcxr_jupyter 0.22.0 (cargo install, about 11 minutes on 2 cores)"
  CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_LTO=false cargo install evcxr_jupyter --version 0.22.0 --locked
fi
if ! python3 -c "import nbconvert, nbclient, nbformat, jupyter_client" >/dev/null 2>&1; then
  echo "== installing Jupyter's notebook runner (pip)"
  python3 -m pip install -r lessons/requirements.txt
fi
# Always (re)write the kernel spec: one left by an earlier install may point at a binary
# that is no longer there.
evcxr_jupyter --install >/dev/null

# Fails (and prints the cell) if an executed notebook holds an error or anything on stderr.
check_outputs() {
  python3 - "$1" <<'PY'
import sys, nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
bad = 0
for i, cell in enumerate(nb.cells):
    if cell.cell_type != "code":
        continue
    for out in cell.get("outputs", []):
        err = out.get("output_type") == "error"
        stderr = out.get("output_type") == "stream" and out.get("name") == "stderr"
        if err or stderr:
            bad += 1
            text = out.get("text") or (out.get("ename", "") + ": " + out.get("evalue", ""))
            print(f"cell {i}: {cell.source.splitlines()[0] if cell.source else ''}\n{text[:2000]}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export EVCXR_TMPDIR="${EVCXR_TMPDIR:-$work/evcxr}"
mkdir -p "$EVCXR_TMPDIR" "$work/out"

notebooks=("$@")
if [ ${#notebooks[@]} -eq 0 ]; then
  notebooks=(lessons/[0-9][0-9]-*.ipynb)
fi

start=$SECONDS
failed=0
printf '%-36s %8s\n' notebook seconds
for nb in "${notebooks[@]}"; do
  t0=$SECONDS
  # The kernel runs in the notebook's directory (lessons/), whatever --output-dir says.
  if [ $inplace = 1 ]; then
    dest=(--inplace)
    out=$nb
  else
    dest=(--output-dir "$work/out")
    out=$work/out/$(basename "$nb")
  fi
  if python3 -m jupyter nbconvert --to notebook --execute "${dest[@]}" \
      --ExecutePreprocessor.timeout=1200 --ExecutePreprocessor.kernel_name=rust \
      "$nb" >"$work/log" 2>&1 && check_outputs "$out"; then
    printf '%-36s %8d\n' "$(basename "$nb")" $((SECONDS - t0))
  else
    printf '%-36s %8s\n' "$(basename "$nb")" FAILED
    grep -v '^ *Compiling ' "$work/log" | tail -40 >&2
    failed=1
  fi
done
printf '%-36s %8d\n' total $((SECONDS - start))
if [ $failed = 0 ]; then
  echo "lessons: ${#notebooks[@]} notebooks executed, every cell ran without error or panic, in $((SECONDS - start)) s"
else
  echo "lessons: FAILED (see above)"
fi
exit $failed
