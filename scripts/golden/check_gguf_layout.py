#!/usr/bin/env python3
"""Independent check of the GGUF-layout math against the golden file.

Runs a small float32 Llama forward straight from the GGUF tensors, the way llama.cpp (and kvq) do:
q/k weights exactly as stored (no permutation) and *interleaved* RoPE (pairs x[2i], x[2i+1]).
transformers instead un-permutes q/k back to HF layout and uses half-split RoPE (x[i], x[i+d/2]).
The two are the same function; this prints the largest logit difference on the golden prompts.

Usage:
  python3 scripts/golden/check_gguf_layout.py --gguf PATH/TO/model.gguf --golden PATH/TO/golden.json
"""

import argparse
import json

import numpy as np
import torch
from gguf import GGUFReader, dequantize

torch.set_num_threads(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--golden", required=True)
    args = ap.parse_args()

    reader = GGUFReader(args.gguf)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    arch = meta["general.architecture"]
    n_layer = meta[f"{arch}.block_count"]
    n_head = meta[f"{arch}.attention.head_count"]
    n_kv = meta[f"{arch}.attention.head_count_kv"]
    eps = meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    base = meta[f"{arch}.rope.freq_base"]

    w = {}
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type)
        w[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
    emb = w["token_embd.weight"]  # [vocab, dim]
    out_w = w.get("output.weight", emb)  # tied when absent
    dim = emb.shape[1]
    hd = dim // n_head

    def rms(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def rope_interleaved(x, pos):  # x: [T, H, hd]
        i = torch.arange(hd // 2, dtype=torch.float64)
        inv = base ** (-2.0 * i / hd)
        ang = pos[:, None].double() * inv[None, :]
        cos, sin = ang.cos().float()[:, None, :], ang.sin().float()[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def forward(ids):
        T = len(ids)
        pos = torch.arange(T)
        x = emb[torch.tensor(ids)]
        mask = torch.full((T, T), float("-inf")).triu(1)
        for l in range(n_layer):
            p = f"blk.{l}."
            h = rms(x, w[p + "attn_norm.weight"])
            q = (h @ w[p + "attn_q.weight"].T).view(T, n_head, hd)
            k = (h @ w[p + "attn_k.weight"].T).view(T, n_kv, hd)
            v = (h @ w[p + "attn_v.weight"].T).view(T, n_kv, hd)
            q, k = rope_interleaved(q, pos), rope_interleaved(k, pos)
            rep = n_head // n_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            att = torch.einsum("thd,shd->hts", q, k) / hd**0.5 + mask
            o = torch.einsum("hts,shd->thd", att.softmax(-1), v).reshape(T, dim)
            x = x + o @ w[p + "attn_output.weight"].T
            h = rms(x, w[p + "ffn_norm.weight"])
            g = torch.nn.functional.silu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)
            x = x + g @ w[p + "ffn_down.weight"].T
        return rms(x, w["output_norm.weight"]) @ out_w.T

    golden = json.load(open(args.golden))
    worst = 0.0
    for p in golden["prompts"]:
        full = p["ids"] + p["generated_ids"]
        with torch.no_grad():
            logits = forward(full)
        for s in p["logits"]:
            row = logits[s["position"]]
            d_top = max(abs(row[i].item() - v) for i, v in s["top"])
            d_lse = abs(torch.logsumexp(row.double(), -1).item() - s["logsumexp"])
            worst = max(worst, d_top, d_lse)
        am = [int(logits[s["position"]].argmax()) for s in p["logits"]]
        ok = am == [s["next_token"] for s in p["logits"] if "next_token" in s][: len(am)]
        print(f"{p['name']!r}: argmax matches golden: {ok}")
    print(f"max |logit - golden| over recorded top-k and logsumexp: {worst:.6f}")


if __name__ == "__main__":
    main()
