"""What bench/peers/hf_quality.py and bench/peers/llama_cpp_quality.py share: the command-line
options about the input, the windows over the token ids, the chunks a window is fed in, the
accumulator of NLL, KL and top-1 agreement (as kvq's `Acc`), and the rows and the JSON file they
write. Plain Python and numpy only (no torch, no llama_cpp), so each script brings its own model.

The scripts run as `python3 bench/peers/NAME.py`; they import this module with their own
directory on sys.path.
"""
import json
import math
import os
import platform
import sys
import time

import numpy as np


def log(msg, end="\n"):
    print(msg, file=sys.stderr, end=end, flush=True)


def pkg_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def base_versions():
    """The start of a script's `versions`: Python and the platform."""
    return {"python": platform.python_version(), "platform": platform.platform()}


def add_input_args(ap):
    """The options both scripts take first: the model, the ids, the windows and chunks, the output."""
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--ids", required=True, help='JSON {"documents": [{"name", "ids"}]}')
    ap.add_argument("--contexts", default="1024,4096,8192")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tokens", type=int, default=8192, help="ids used per document")
    ap.add_argument("--max-windows", type=int, default=0, help="windows per context (0: all)")
    ap.add_argument("--drop-partial", action="store_true", help="skip a document's shorter tail window")


def parse_contexts(text):
    return [int(c) for c in text.split(",")]


def check_chunk(ap, chunk):
    if chunk < 1:
        ap.error("--chunk must be at least 1")


def load_windows(path, context, max_tokens, max_windows, drop_partial):
    """Non-overlapping windows of `context` ids over each document's first `max_tokens` ids."""
    docs = json.load(open(path))["documents"]
    out = []
    for d in docs:
        ids = [int(t) for t in d["ids"][:max_tokens]]
        for s in range(0, len(ids), context):
            w = ids[s:s + context]
            if len(w) < 2 or (drop_partial and len(w) < context):
                continue
            out.append((d.get("name", "?"), s, w))
    return out[:max_windows] if max_windows else out


def predicted_tokens(windows):
    """Positions scored over `windows` (n-1 per window of n ids)."""
    return sum(len(w) - 1 for _, _, w in windows)


def chunk_spans(n, chunk):
    """(pos, end) of each call over a window of n ids: ids pos..end-1 are fed, and they predict
    ids pos+1..end; the last id is never fed."""
    pos = 0
    while pos < n - 1:
        end = min(pos + chunk, n - 1)
        yield pos, end
        pos = end


def log_progress(ctx, wi, n_windows, doc, start, done, total, t_ctx):
    el = time.perf_counter() - t_ctx
    log(f"\r  context {ctx}: window {wi + 1}/{n_windows} ({doc}@{start}), "
        f"{done}/{total} tokens, {el:.0f} s elapsed, ~{el / done * (total - done):.0f} s left   ",
        end="")


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


class Acc:
    """Sums over predicted positions, as kvq's `Acc`. `score` takes numpy arrays; a script whose
    log-probs are in another array type subclasses it and overrides `score`."""

    def __init__(self):
        self.nll = self.kl = 0.0
        self.agree = self.n = 0
        self.seconds = 0.0
        self.bits_sum = self.elems = 0.0  # for kv_bits_per_element_with_residual (if set)

    def score(self, lp, ref_lp, targets):
        """lp, ref_lp: float64 [t, vocab] log-probs; targets: int64 [t]."""
        rows = np.arange(len(targets))
        self.nll -= float(lp[rows, targets].sum())
        p = np.exp(ref_lp)
        with np.errstate(invalid="ignore"):
            kl = np.where(p > 0, p * (ref_lp - lp), 0.0).sum(axis=-1)
        self.kl += float(np.maximum(kl, 0.0).sum())
        self.agree += int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
        self.n += len(targets)


def score_chunk(ref, tests, log_probs, feed, pos, targets, wi, on_error=None):
    """Score one chunk: the reference against itself, then each test run that has not failed
    against the reference. Runs have .label, .acc and .error; `log_probs(run, feed, pos)` returns
    the log-probs of the chunk's positions. A run that raises keeps its error and is skipped from
    then on; `on_error(run)` is then called inside the except clause."""
    ref_lp = log_probs(ref, feed, pos)
    ref.acc.score(ref_lp, ref_lp, targets)
    for r in tests:
        if r.error is not None:
            continue
        try:
            r.acc.score(log_probs(r, feed, pos), ref_lp, targets)
        except Exception as e:
            r.error = f"{type(e).__name__}: {e}"
            log(f"\n  {r.label} failed at window {wi} position {pos}: {r.error}")
            if on_error is not None:
                on_error(r)


def result_row(head, acc, error, bits, versions):
    """One output row: `head` (tool, cache, context, ...), then the error if any, the scores, the
    bits per element, the seconds and the versions."""
    row = dict(head)
    if error is not None:
        row["error"] = error
    if acc.n and error is None:
        nll = acc.nll / acc.n
        row.update({"tokens_scored": acc.n, "ppl": math.exp(nll), "nll_mean": nll,
                    "kl_mean": acc.kl / acc.n, "top1_agree": acc.agree / acc.n})
    row["kv_bits_per_element"] = bits
    if acc.elems and error is None:
        row["kv_bits_per_element_with_residual"] = acc.bits_sum / acc.elems
    row["seconds"] = acc.seconds
    row["versions"] = versions
    return row


def log_row(label, row):
    """`label` comes padded to the script's column width."""
    if "ppl" in row:
        log(f"  {label} ppl {row['ppl']:.4f}  kl {row['kl_mean']:.5f}  "
            f"top1 {100 * row['top1_agree']:.2f}%  bits {row['kv_bits_per_element']:.2f}  {row['seconds']:.1f} s")
    else:
        log(f"  {label} error: {row.get('error')}")


def write_output(out, tool, model_path, ids_path, chunk, contexts, versions, rows):
    with open(out, "w") as f:
        json.dump({"tool": tool, "model": model_path, "ids": os.path.abspath(ids_path), "chunk": chunk,
                   "contexts": contexts, "versions": versions, "rows": rows}, f, indent=1)
