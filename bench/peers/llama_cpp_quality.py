#!/usr/bin/env python3
"""Quality vs bits of llama.cpp's KV cache types (llama-cpp-python from PyPI), on the same GGUF
and the same token ids as kvq: perplexity, KL divergence and top-1 agreement against llama.cpp's
own f16 cache.

What it measures, and how it maps to kvq (`crates/kvq/src/eval.rs`, `kvq ppl`):

* Input: `--ids FILE.json` = {"documents": [{"name": str, "ids": [int, ...]}, ...]}, token ids made
  by kvq's tokenizer (never re-tokenized here; no BOS is added). Each document's first
  `--max-tokens` (8192) ids are cut into non-overlapping windows of each `--contexts` length (a
  shorter tail window of at least 2 ids is scored too, unless `--drop-partial`). Every window
  starts from an empty cache (`Llama.reset()` plus clearing llama.cpp's memory); within it,
  positions 0..n-2 predict tokens 1..n-1, each from its whole prefix in the window.
* Streaming: `Llama.eval()` gets `--chunk` ids per call, with n_batch = n_ubatch = chunk, so each
  call is one llama_decode of one micro-batch: the prefill goes through the cache in pieces, as
  with kvq's `--chunk`. In llama.cpp the new tokens' K/V are first written into the cache
  (converted to its type) and attention then reads the cache, so a chunk attends to its own
  tokens quantized too (unlike transformers' QuantizedCache and kvq's `past_only` presets).
  A quantized V cache needs flash attention, so flash attention is on for every type, f16 included.
* The reference (f16 K and V) and each tested type run in lockstep, chunk by chunk: one Llama
  object per cache type, all alive at once, each with n_ctx = the context, `logits_all=True`;
  after each chunk the logits of its positions are read from `llm.scores` and scored (log-softmax
  in float64); nothing is kept between chunks. (`llm.scores` is an n_ctx x 49152 float32 array per
  object, 1.6 GB at n_ctx 8192, filled only as far as the window goes.)
* Per row: `nll_mean`, `ppl` = exp(nll_mean), `kl_mean` = mean KL(f16 || this) in nats,
  `top1_agree` = fraction of positions with the reference's argmax, `seconds` = time in this
  type's `eval()` calls (+ log-softmax), summed over every window of that context.
* `kv_bits_per_element`: ggml's block formats, blocks of 32 elements along head_dim (per token
  and head, for K and V alike) with an f16 scale (and an f16 min for the _1 types):
  f16 16, q8_0 (32 x 8 + 16) / 32 = 8.5, q4_0 (32 x 4 + 16) / 32 = 4.5,
  q4_1 (32 x 4 + 2 x 16) / 32 = 5.0, q5_0 5.5, q5_1 6.0, iq4_nl 4.5. No full-precision window:
  every token is stored in the cache type.
* Noise floor: llama.cpp's own kernel paths disagree at about this level. On the CPU (AVX-512
  build, 2 threads; data/tour.txt's first 128 ids, chunk 32) the f16 cache with flash attention
  vs without gives KL 0.0042, and q8_0 for V alone 0.0043, for K alone 0.0045, both 0.0045; an f32
  cache with flash attention gives the same logits as f16. So a KL near 0.004 here says "another
  arithmetic path", not "a lossy cache".
* Weights stay as stored in the GGUF (Q4_1, Q8_0 embedding/output) on llama.cpp's kernels, so its
  f16 baseline differs a little from transformers' (float32 dequantized) and from kvq's; compare
  each tool's rows with its own reference.

GPU: n_gpu_layers = -1 when llama-cpp-python was built with GPU offload
(`llama_supports_gpu_offload()`), else 0 (CPU; `--threads`). seed = 0; the computation is
deterministic for a given build, machine and thread count.

The input options, windows, chunking, scoring and output rows are shared with the other peer
script: bench/peers/quality_common.py (imported from this script's directory).

Tested on the CPU only (a CPU build; the GPU offload path was not run). Pinned versions tested:
bench/peers/requirements-quality.txt (llama-cpp-python 0.3.36, numpy 2.4.6).

Usage:
  llama_cpp_quality.py --model ~/.cache/kvq/SmolLM2-135M-Instruct.Q4_1.gguf --ids ids.json \
      --contexts 1024,4096,8192 --chunk 64 --out llama.json [--max-windows N] [--types q8_0,q4_0,q4_1]
"""
import argparse
import os
import sys
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama

sys.dont_write_bytecode = True  # no bench/peers/__pycache__: quality.sh records untracked files
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality_common import (Acc, add_input_args, base_versions, check_chunk, chunk_spans,  # noqa: E402
                            load_windows, log, log_progress, log_row, log_softmax, parse_contexts,
                            predicted_tokens, result_row, score_chunk, write_output)

TOOL = "llama.cpp"

# name -> (GGML type id, bits per element including the block scales/mins)
TYPES = {
    "f16": (llama_cpp.GGML_TYPE_F16, 16.0),
    "q8_0": (llama_cpp.GGML_TYPE_Q8_0, 8.5),
    "q4_0": (llama_cpp.GGML_TYPE_Q4_0, 4.5),
    "q4_1": (llama_cpp.GGML_TYPE_Q4_1, 5.0),
    "q5_0": (llama_cpp.GGML_TYPE_Q5_0, 5.5),
    "q5_1": (llama_cpp.GGML_TYPE_Q5_1, 6.0),
    "iq4_nl": (llama_cpp.GGML_TYPE_IQ4_NL, 4.5),
}


class Run:
    def __init__(self, kind):
        self.kind = self.label = kind
        self.type_id, self.bits = TYPES[kind]
        self.llm = None
        self.acc = Acc()
        self.error = None


def clear(llm):
    """Empty the model state and the KV cache (eval() also drops positions >= n_tokens)."""
    llm.reset()
    ctx = llm._ctx
    if hasattr(ctx, "kv_cache_clear"):
        ctx.kv_cache_clear()
    else:  # older llama-cpp-python
        llama_cpp.llama_kv_cache_clear(ctx.ctx)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_input_args(ap)
    ap.add_argument("--types", default="q8_0,q4_0,q4_1", help=f"tested K=V cache types, of {','.join(TYPES)}")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: llama-cpp-python's default)")
    ap.add_argument("--cpu", action="store_true", help="n_gpu_layers = 0 even with a GPU build")
    a = ap.parse_args()
    contexts = parse_contexts(a.contexts)
    kinds = [t for t in a.types.split(",") if t]
    for t in kinds:
        if t not in TYPES:
            ap.error(f"unknown cache type {t}; known: {', '.join(TYPES)}")
    check_chunk(ap, a.chunk)

    path = os.path.abspath(os.path.expanduser(a.model))
    gpu = bool(llama_cpp.llama_supports_gpu_offload()) and not a.cpu
    vers = {**base_versions(),
            "llama-cpp-python": llama_cpp.__version__, "numpy": np.__version__,
            "gpu_offload": gpu, "threads": a.threads or None}
    try:
        vers["llama.cpp system_info"] = llama_cpp.llama_print_system_info().decode()
    except Exception:
        pass

    def make(kind, ctx):
        kw = dict(model_path=path, n_ctx=ctx, n_batch=a.chunk, n_ubatch=a.chunk, logits_all=True,
                  type_k=TYPES[kind][0], type_v=TYPES[kind][0], flash_attn=True,
                  n_gpu_layers=-1 if gpu else 0, seed=0, verbose=False)
        if a.threads:
            kw.update(n_threads=a.threads, n_threads_batch=a.threads)
        return Llama(**kw)

    rows = []
    for ctx in contexts:
        windows = load_windows(a.ids, ctx, a.max_tokens, a.max_windows, a.drop_partial)
        runs = [Run("f16")] + [Run(k) for k in kinds if k != "f16"]
        ref, tests = runs[0], runs[1:]
        for r in runs:
            try:
                r.llm = make(r.kind, ctx)
            except Exception as e:
                r.error = f"{type(e).__name__}: {e}"
                log(f"  {r.kind}: cannot create the context: {r.error}")
        if ref.error is not None:
            raise SystemExit(f"the f16 reference failed: {ref.error}")
        n_vocab = ref.llm.n_vocab()
        total = predicted_tokens(windows)
        log(f"context {ctx}: {len(windows)} windows, {total} predicted tokens, chunk {a.chunk}, "
            f"gpu offload {gpu}, caches: {', '.join(r.kind for r in runs)}")

        def log_probs(r, feed, pos):
            t0 = time.perf_counter()
            r.llm.eval(feed)
            # eval() wrote the logits of positions pos..pos+len(feed)-1 into llm.scores.
            lp = log_softmax(r.llm.scores[pos:pos + len(feed), :n_vocab])
            r.acc.seconds += time.perf_counter() - t0
            return lp

        t_ctx = time.perf_counter()
        done = 0
        for wi, (doc, start, w) in enumerate(windows):
            for r in runs:
                if r.error is None:
                    clear(r.llm)
            for pos, end in chunk_spans(len(w), a.chunk):
                feed = w[pos:end]
                targets = np.array(w[pos + 1:end + 1], dtype=np.int64)
                score_chunk(ref, tests, log_probs, feed, pos, targets, wi)
                done += end - pos
                log_progress(ctx, wi, len(windows), doc, start, done, total, t_ctx)
        log("")
        for r in runs:
            row = result_row({"tool": TOOL, "cache": f"{r.kind} K+V", "type_k": r.kind, "type_v": r.kind,
                              "context": ctx, "chunk": a.chunk, "windows": len(windows), "flash_attn": True,
                              "reference": r is ref}, r.acc, r.error, r.bits, vers)
            rows.append(row)
            log_row(f"{r.kind:8s}", row)
            if r.llm is not None:
                r.llm.close()
                r.llm = None
        write_output(a.out, TOOL, path, a.ids, a.chunk, contexts, vers, rows)
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
