#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python from PyPI) on the same GGUF and the same prompt token ids
as `kvq generate --json`: prefill time and greedy decode tokens/s for several KV cache
types. Prints one JSON object per cache type.

Usage: llama_cpp_decode.py --gguf FILE --kvq-json FILE [--new-tokens 128] [--threads 2]
"""
import argparse, json, time

import numpy as np
import llama_cpp
from llama_cpp import Llama

TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
         "q4_0": llama_cpp.GGML_TYPE_Q4_0, "q4_1": llama_cpp.GGML_TYPE_Q4_1}


def run(gguf, ids, new_tokens, threads, kv):
    kwargs = dict(model_path=gguf, n_ctx=len(ids) + new_tokens + 8, n_threads=threads,
                  n_threads_batch=threads, n_batch=512, verbose=False,
                  type_k=TYPES[kv], type_v=TYPES[kv])
    # A quantized V cache needs flash attention in llama.cpp.
    kwargs["flash_attn"] = True
    llm = Llama(**kwargs)
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_logits():
        # Without logits_all, llama.cpp keeps the logits of the last token only.
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    out = []
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        tok = int(np.argmax(last_logits()))
        out.append(tok)
        if len(out) == new_tokens:
            break
        llm.eval([tok])
    decode = time.perf_counter() - t1
    return {"peer": "llama.cpp", "version": llama_cpp.__version__, "cache": f"llama.cpp {kv}",
            "prompt_tokens": len(ids), "new_tokens": len(out), "prefill_s": prefill,
            # new_tokens - 1 evaluations follow the first token, which comes from the prefill.
            "decode_tokens_per_s": (len(out) - 1) / decode, "tokens": out}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--kvq-json", required=True, help="output of kvq generate --json (for the prompt ids)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--reps", type=int, default=3, help="runs per cache type; the median is reported")
    a = ap.parse_args()
    ids = json.load(open(a.kvq_json))["prompt_ids"][0]
    for kv in a.types.split(","):
        runs = sorted((run(a.gguf, ids, a.new_tokens, a.threads, kv) for _ in range(a.reps)),
                      key=lambda r: r["decode_tokens_per_s"])
        med = runs[len(runs) // 2]
        med["runs_decode_tokens_per_s"] = [r["decode_tokens_per_s"] for r in runs]
        print(json.dumps(med), flush=True)


if __name__ == "__main__":
    main()
