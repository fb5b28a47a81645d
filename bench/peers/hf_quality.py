#!/usr/bin/env python3
"""Quality vs bits of Hugging Face transformers' KV caches, on the same GGUF and the same token
ids as kvq: perplexity, KL divergence and top-1 agreement against transformers' own
full-precision run.

What it measures, and how it maps to kvq (`crates/kvq/src/eval.rs`, `kvq ppl`):

* Input: `--ids FILE.json` = {"documents": [{"name": str, "ids": [int, ...]}, ...]}, token ids made
  by kvq's tokenizer (never re-tokenized here). Each document's first `--max-tokens` (8192) ids are
  cut into non-overlapping windows of each `--contexts` length (a shorter tail window of at least 2
  ids is scored too, unless `--drop-partial`). Every window starts from an empty cache; within it,
  positions 0..n-2 predict tokens 1..n-1 (n-1 predictions per window), each from its whole prefix
  in the window, exactly as `kvq::eval::evaluate` does on one text.
* Streaming: a window goes through the model `--chunk` tokens per forward call (kvq's `--chunk`),
  so the prefill itself reads the cache in pieces and a quantized cache is really used for
  attention. The reference (fp32 model, `DynamicCache`) and every tested cache run in lockstep,
  chunk by chunk, over the same ids, so no logits are stored: per chunk, each cache's
  log-softmax (float64) is scored against the reference's.
* Per row: `nll_mean` = mean of -log p(next token); `ppl` = exp(nll_mean); `kl_mean` = mean over
  predicted positions of KL(reference || this) in nats; `top1_agree` = fraction of positions whose
  argmax equals the reference's; `seconds` = time in this cache's forward calls (+ log-softmax);
  all summed over every window of that context (as kvq sums over one text).
* Caches (rows):
  - `DynamicCache fp32` — the reference: GGUF weights dequantized to float32, cache in float32
    (kl_mean 0, top1_agree 1 by construction).
  - `DynamicCache fp16-model` — the same model cast to float16 (unless `--no-fp16`): compute and
    cache both in fp16, so its drift is not the cache's alone.
  - `QuantizedCache` backend `quanto` (optimum-quanto), nbits 4 and 2; backend `hqq`, nbits 4
    and 2 — all with the fp32 model.
* transformers' `QuantizedCache` (transformers/cache_utils.py, `QuantizedLayer.update`): the
  first update of a layer quantizes its whole input and returns it unquantized; later, each
  update attends to dequantize(quantized part) ++ the residual buffer (full precision) ++ the
  new chunk (full precision). When residual + new tokens reach `residual_length`, everything
  (the dequantized old part too) is re-quantized from scratch and the residual buffer is emptied.
  So a chunk attends to its own keys/values at full precision and to up to residual_length-1
  recent tokens at full precision, and to the rest quantized: kvq's `per-token-N` presets
  (group 64, residual 128, `past_only`) model this cache.
  Grouping: quanto with axis 0 groups `q_group_size` consecutive elements of the flattened
  [batch, heads, seq, head_dim] tensor, i.e. with q_group_size = head_dim = 64 one group is one
  token's vector in one head (per-token, asymmetric min/max: MaxOptimizer). HQQ's axis 1 is the
  same grouping (rows of q_group_size consecutive elements), with HQQ's half-quadratic optimizer
  (20 proximal iterations; float16 internally on CUDA, float32 on CPU); HQQ's axis 0 (the
  transformers default) would group elements strided across heads and tokens, so `--hqq-axis`
  defaults to 1. HQQ packs rows of codes in halves (4-bit) or quarters (2-bit), so with axis 1 the
  number of groups quantized at once (batch x kv_heads x tokens = 3 x tokens here) must be even
  (4-bit) or a multiple of 4 (2-bit): true for chunk 64 at contexts 1024/4096/8192 (quantization
  happens at 64, 192, 320, ... tokens), not for odd chunks (the row then carries "error").
* `kv_bits_per_element` is the storage cost of the quantized part of the cache per element:
  nbits for the data plus, per group of G elements, one scale and one zero-point (quanto: scale
  and shift; HQQ: scale and zero), each stored in the model's dtype (here float32, 32 bits):
  nbits + 2 * 32 / G = nbits + 1.0 for G = 64 (5.0 for int4, 3.0 for int2; with an fp16 model it
  would be nbits + 0.5). The full-precision residual is left out of it;
  `kv_bits_per_element_with_residual` counts it too, over the caches as they stand at the end of
  every window (like kvq's `effective_bits`, which includes its residual window).
  DynamicCache: 32 (fp32) or 16 (fp16).

Run on CUDA if available (else CPU), deterministically (seed 0, deterministic algorithms, eager
attention by default). optimum-quanto unpacks its int2/int4 codes with a C++/CUDA extension that
it compiles at first use (needs a compiler, and nvcc on CUDA); by default this script replaces that
with quanto's own pure-PyTorch unpack (the same bit operations, so the same numbers);
`--quanto-native-unpack` keeps the extension.

The input options, windows, chunking, scoring and output rows are shared with the other peer
script: bench/peers/quality_common.py (imported from this script's directory).

Tested on the CPU only (the CUDA path is written but was not run). Pinned versions tested:
bench/peers/requirements-quality.txt (transformers 5.23.0, torch 2.15.0, gguf 0.19.0,
optimum-quanto 0.2.7, hqq 0.2.8.post1, numpy 2.4.6).

Usage:
  hf_quality.py --model ~/.cache/kvq/SmolLM2-135M-Instruct.Q4_1.gguf --ids ids.json \
      --contexts 1024,4096,8192 --chunk 64 --out hf.json [--max-windows N] [--no-fp16]
      [--backends quanto,hqq] [--bits 4,2] [--group-size 64] [--residual 128]
"""
import argparse
import copy
import os
import sys
import time
import traceback

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402
from transformers.cache_utils import QuantizedCache  # noqa: E402

sys.dont_write_bytecode = True  # no bench/peers/__pycache__: quality.sh records untracked files
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality_common import (Acc, add_input_args, base_versions, check_chunk, chunk_spans,  # noqa: E402
                            load_windows, log, log_progress, log_row, parse_contexts, pkg_version,
                            predicted_tokens, result_row, score_chunk, write_output)

TOOL = "transformers"


def versions(device):
    v = {**base_versions(),
         "torch": torch.__version__, "transformers": transformers.__version__,
         "gguf": pkg_version("gguf"), "numpy": np.__version__,
         "optimum-quanto": pkg_version("optimum-quanto"), "hqq": pkg_version("hqq"),
         "device": str(device)}
    if device.type == "cuda":
        v["gpu"] = torch.cuda.get_device_name(device)
        v["cuda"] = torch.version.cuda
    else:
        v["torch_threads"] = torch.get_num_threads()
    return v


class TorchAcc(Acc):
    """quality_common's `Acc`, scored in torch (on the device)."""

    def score(self, lp, ref_lp, targets):
        """lp, ref_lp: float64 [t, vocab] log-probs; targets: long [t]."""
        self.nll -= lp.gather(1, targets[:, None]).sum().item()
        p = ref_lp.exp()
        kl = torch.where(p > 0, p * (ref_lp - lp), torch.zeros_like(p)).sum(-1).clamp(min=0.0)
        self.kl += kl.sum().item()
        self.agree += (lp.argmax(-1) == ref_lp.argmax(-1)).sum().item()
        self.n += lp.shape[0]


class Run:
    """One cache configuration: which model it uses and how to make a fresh cache."""

    def __init__(self, name, model_key, make_cache, bits, meta):
        self.name, self.model_key, self.make_cache, self.bits, self.meta = name, model_key, make_cache, bits, meta
        self.label = name
        self.acc = TorchAcc()
        self.error = None
        self.cache = None


def dtype_bits(dt):
    return torch.finfo(dt).bits


def build_runs(models, a):
    cfg = models["fp32"].config
    runs = [Run("DynamicCache fp32", "fp32", lambda: DynamicCache(config=cfg), 32.0,
                {"backend": "dynamic", "model_dtype": "float32", "reference": True})]
    if "fp16" in models:
        cfg16 = models["fp16"].config
        runs.append(Run("DynamicCache fp16-model", "fp16", lambda: DynamicCache(config=cfg16), 16.0,
                        {"backend": "dynamic", "model_dtype": "float16"}))
    for backend in a.backends:
        for nbits in a.bits:
            axis = a.hqq_axis if backend == "hqq" else 0
            kw = dict(backend=backend, config=cfg, nbits=nbits, axis_key=axis, axis_value=axis,
                      q_group_size=a.group_size, residual_length=a.residual)
            # data bits + one scale and one zero-point per group, both in the model dtype (fp32).
            bits = nbits + 2 * dtype_bits(torch.float32) / a.group_size
            name = f"QuantizedCache {backend} int{nbits} g{a.group_size} r{a.residual}"
            meta = {"backend": backend, "nbits": nbits, "q_group_size": a.group_size,
                    "residual_length": a.residual, "axis_key": axis, "axis_value": axis,
                    "model_dtype": "float32"}
            runs.append(Run(name, "fp32", (lambda kw=kw: QuantizedCache(**kw)), bits, meta))
    return runs


def end_of_window_bits(run, full_bits):
    """Bits and elements held by the cache at the end of a window (layer 0 stands for all)."""
    layer = run.cache.layers[0]
    total = layer.get_seq_length()
    if run.meta["backend"] == "dynamic" or total == 0:
        return run.bits * total, total
    keys = layer.keys
    resid = keys.shape[-2] if keys is not None and keys.dim() == 4 else 0
    return run.bits * (total - resid) + full_bits * resid, total


def use_python_quanto_unpack():
    """Route optimum-quanto's unpack through its pure-PyTorch implementation instead of the C++/CUDA
    extensions it would compile at first use (same bit operations, no compiler needed)."""
    try:
        from optimum.quanto.library.extensions import get_extension, is_extension_available
    except Exception as e:  # quanto missing: its rows will carry the error
        log(f"optimum-quanto not importable: {e}")
        return

    def py_unpack(packed, bits):
        # optimum/quanto/library/unpack.py (its "default" implementation; the decorator that
        # registers it returns None, so it is restated here): value i of each byte is
        # (byte & (2^(bits*(i+1)) - 1)) >> (bits*i), the values concatenated along dim 0.
        parts = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]
        return torch.cat(parts).to(torch.uint8)

    class _Shim:
        unpack = staticmethod(py_unpack)

    for name in ("quanto_cpp", "quanto_cuda", "quanto_mps", "quanto_hip"):
        if is_extension_available(name):
            get_extension(name)._lib = _Shim()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_input_args(ap)
    ap.add_argument("--backends", default="quanto,hqq")
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--hqq-axis", type=int, default=1, choices=[0, 1])
    ap.add_argument("--no-fp16", action="store_true", help="skip the fp16-model DynamicCache row")
    ap.add_argument("--attn", default="eager", help="attn_implementation (eager, sdpa)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--quanto-native-unpack", action="store_true")
    a = ap.parse_args()
    a.backends = [b for b in a.backends.split(",") if b]
    a.bits = [int(b) for b in a.bits.split(",") if b]
    contexts = parse_contexts(a.contexts)
    check_chunk(ap, a.chunk)

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not a.quanto_native_unpack:
        use_python_quanto_unpack()

    path = os.path.abspath(os.path.expanduser(a.model))
    log(f"loading {path} (dequantized to float32) on {device}")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32, attn_implementation=a.attn)
    model = model.to(device).eval()
    models = {"fp32": model}
    if not a.no_fp16:
        models["fp16"] = copy.deepcopy(model).to(torch.float16).eval()
    log(f"  loaded in {time.perf_counter() - t0:.1f} s")
    vers = versions(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def log_probs(run, feed, pos):
        m = models[run.model_key]
        ids = torch.tensor([feed], dtype=torch.long, device=device)
        position_ids = torch.arange(pos, pos + len(feed), device=device)[None]
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = m(input_ids=ids, past_key_values=run.cache, position_ids=position_ids,
                       use_cache=True).logits[0]
            lp = torch.log_softmax(logits.to(torch.float64), dim=-1)
        sync()
        run.acc.seconds += time.perf_counter() - t0
        return lp

    def on_error(run):
        log(traceback.format_exc())
        run.cache = None

    rows = []
    for ctx in contexts:
        windows = load_windows(a.ids, ctx, a.max_tokens, a.max_windows, a.drop_partial)
        runs = build_runs(models, a)
        ref, tests = runs[0], runs[1:]
        total = predicted_tokens(windows)
        log(f"context {ctx}: {len(windows)} windows, {total} predicted tokens, chunk {a.chunk}, "
            f"caches: {', '.join(r.name for r in runs)}")
        t_ctx = time.perf_counter()
        done = 0
        for wi, (doc, start, w) in enumerate(windows):
            for r in runs:
                if r.error is None:
                    try:
                        r.cache = r.make_cache()
                    except Exception as e:
                        r.error = f"{type(e).__name__}: {e}"
                        log(f"\n  {r.name}: cannot build the cache: {r.error}")
            if ref.error is not None:
                raise SystemExit(f"the reference failed: {ref.error}")
            for pos, end in chunk_spans(len(w), a.chunk):
                feed = w[pos:end]
                targets = torch.tensor(w[pos + 1:end + 1], dtype=torch.long, device=device)
                score_chunk(ref, tests, log_probs, feed, pos, targets, wi, on_error=on_error)
                done += end - pos
                log_progress(ctx, wi, len(windows), doc, start, done, total, t_ctx)
            for r in runs:
                if r.error is None and r.cache is not None:
                    b, e = end_of_window_bits(r, 32.0 if r.model_key == "fp32" else 16.0)
                    r.acc.bits_sum += b
                    r.acc.elems += e
                r.cache = None
        log("")
        for r in runs:
            row = result_row({"tool": TOOL, "cache": r.name, "context": ctx, "chunk": a.chunk,
                              "windows": len(windows), **r.meta}, r.acc, r.error, r.bits, vers)
            rows.append(row)
            log_row(f"{r.name:40s}", row)
        # Written after every context, so a long run leaves what it has finished.
        write_output(a.out, TOOL, path, a.ids, a.chunk, contexts, vers, rows)
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
