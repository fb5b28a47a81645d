#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention, fp16, on the decode shapes of `kvq bench attn`.

The peer to beat: one query token per sequence over a full fp16 K/V cache, GQA through
`enable_gqa=True`. Timed with CUDA events (mean over --iters after 3 warm-ups) and
checked in the same run against an f32 reference on the first and last sequence.
Writes a JSON list that `kvq bench attn --peer FILE` reads.

    python3 bench/peers/sdpa_attn.py --out sdpa.json [--shapes name:B:Hq:Hkv:D:N,...]
"""
import argparse
import json

import torch
import torch.nn.functional as F

DEFAULT = ("llama3-8b:16:32:8:128:32768,llama3-8b:1:32:8:128:32768,llama3-8b:16:32:8:128:8192,"
           "smollm2:64:9:3:64:8192,smollm2:8:9:3:64:8192")


def parse(spec):
    name, *nums = spec.split(":")
    b, hq, hkv, d, n = map(int, nums)
    return dict(name=name, batch=b, q_heads=hq, kv_heads=hkv, head_dim=d, context=n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=DEFAULT)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for spec in args.shapes.split(","):
        s = parse(spec)
        b, hq, hkv, d, n = s["batch"], s["q_heads"], s["kv_heads"], s["head_dim"], s["context"]
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.float16)
        k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.float16)
        v = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.float16)
        run = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        for _ in range(3):
            run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            out = run()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / args.iters
        # f32 reference on the first and last sequence
        err, top = 0.0, 0.0
        for i in sorted({0, b - 1}):
            rep = hq // hkv
            kk = k[i].float().repeat_interleave(rep, 0)
            vv = v[i].float().repeat_interleave(rep, 0)
            p = torch.softmax(q[i].float() @ kk.transpose(1, 2) / d ** 0.5, -1)
            ref = p @ vv
            err = max(err, (out[i].float() - ref).abs().max().item())
            top = max(top, ref.abs().max().item())
        rows.append(dict(shape=s, ms=ms, max_rel_error=err / top, bytes=2 * b * hkv * n * d * 2,
                         device=torch.cuda.get_device_name(), torch=torch.__version__))
        print(f"{spec}: {ms * 1e3:.1f} µs, rel err {err / top:.1e}", flush=True)
        del q, k, v, out
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
