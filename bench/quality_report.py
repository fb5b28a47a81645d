#!/usr/bin/env python3
"""The quality-vs-bits report (the issue), from the raw outputs of bench/quality.sh.

Reads, in --raw (bench/quality.sh writes them there):
  meta.json               date, machine, commit, settings, versions (bench/quality.sh)
  commands.txt            the exact commands run, steps.jsonl their wall times
  ids.json                the ids `kvq tokenize` made: {"documents": [{"name", "text", "ids"}]}
  kvq-DOC-CONTEXT.json    `kvq ppl --json` of one document at one context (reference + one row per
                          cache of meta's cache list, in that order); kvq-ids-DOC-CONTEXT.json the
                          ids it scored (`--dump-ids`), checked against ids.json
  hf-DOC.json             bench/peers/hf_quality.py on ids-DOC.json (rows per context)
  llama-DOC.json          bench/peers/llama_cpp_quality.py on ids-DOC.json (rows per context)
and writes, in --out: quality.md, quality.json, quality.svg.

Per (tool, cache, context) the documents are combined by token-weighted averages (weights: the
predicted tokens of each document) of the mean NLL, the mean KL and top-1 agreement, and
PPL = exp(combined mean NLL) — as `kvq ppl` combines its windows. Bits per element: kvq's
`effective_bits` (bytes the cache holds at the end of the longest window, its full-precision
residual and sink included; with several documents, the row with the most bytes, as kvq merges
windows); transformers' `kv_bits_per_element_with_residual` (its residual included; a
token-weighted mean over documents) or, failing that, `kv_bits_per_element`; llama.cpp's block
formats. Bytes per token = bits per element x E / 8, E = K and V elements per token of the model
(2 x layers x KV heads x head dim), taken from kvq's own rows (bytes_per_token x 8 / effective_bits);
kvq's rows carry their own exact bytes per token.

ΔPPL % against: each tool's own 16-bit row (kvq: its fp16 cache; transformers: DynamicCache
fp16-model if present, else fp32; llama.cpp: f16), each tool's own full-precision reference (the
one its KL and top-1 are measured against: kvq fp32, transformers DynamicCache fp32, llama.cpp
f16), and kvq's fp32 reference. Goals are checked at every context (see the Goals section of the
report for each definition). Standard library only (the SVG is written by hand).

Usage: quality_report.py --raw bench/results/quality-raw --out bench/results
"""
import argparse
import json
import math
import os
import re
import sys
from html import escape

TOOLS = ("kvq", "transformers", "llama.cpp")
OWN_F16 = {"kvq": ["fp16"], "transformers": ["DynamicCache fp16-model", "DynamicCache fp32"], "llama.cpp": ["f16"]}
OWN_REF = {"kvq": ["fp32"], "transformers": ["DynamicCache fp32"], "llama.cpp": ["f16"]}
REF_NAME = {"kvq": "kvq's fp32 cache", "transformers": "transformers' DynamicCache fp32 (fp32 model)",
            "llama.cpp": "llama.cpp's f16 cache"}
PLOT_CONTEXT = 4096


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def expected_predicted(ids, context):
    """Predicted tokens over consecutive windows of `context` ids (windows of < 2 ids dropped)."""
    return sum(len(ids[s:s + context]) - 1 for s in range(0, len(ids), context) if len(ids[s:s + context]) >= 2)


# ---------------------------------------------------------------- reading the raw outputs

def read_kvq(raw, meta, problems):
    specs = meta["settings"]["caches"]
    out = []
    for name in sorted(os.listdir(raw)):
        m = re.fullmatch(r"kvq-(.+)-(\d+)\.json", name)
        if not m or name.startswith("kvq-ids-"):
            continue
        doc, ctx = m.group(1), int(m.group(2))
        j = load_json(os.path.join(raw, name))
        rows = j["rows"]
        if len(rows) != len(specs):
            problems.append(f"{name}: {len(rows)} rows for {len(specs)} caches")
            specs_here = [r["cache"] for r in rows]
        else:
            specs_here = specs
        for spec, r, is_ref in [("fp32", j["reference"], True)] + [(s, r, False) for s, r in zip(specs_here, rows)]:
            out.append({
                "tool": "kvq", "spec": spec, "details": r["cache"] + (" — the reference" if is_ref else ""),
                "doc": doc, "context": ctx, "n": r["predicted"], "nll": r["nll"], "kl": r["kl"],
                "top1": r["top1_agreement"], "bits": r["effective_bits"], "bytes_per_token": r["bytes_per_token"],
                "bytes": r["bytes"], "seconds": r["seconds"], "weights": j.get("weights"),
            })
    return out


def read_peer(raw, prefix, errors):
    out, versions = [], {}
    for name in sorted(os.listdir(raw)):
        m = re.fullmatch(re.escape(prefix) + r"-(.+)\.json", name)
        if not m:
            continue
        doc = m.group(1)
        j = load_json(os.path.join(raw, name))
        versions = j.get("versions", versions)
        for r in j["rows"]:
            tool = r["tool"]
            if tool == "transformers":
                if r.get("backend") == "dynamic":
                    spec = r["cache"]
                    details = f"{r['cache']}: model and cache in {r.get('model_dtype')}"
                else:
                    spec = f"QuantizedCache {r['backend']} int{r['nbits']}"
                    details = (f"{r['cache']} (q_group_size {r['q_group_size']}, residual {r['residual_length']}, "
                               f"axis {r['axis_key']}; fp32 model; quantized part {r['kv_bits_per_element']:.2f} bits)")
                bits = r.get("kv_bits_per_element_with_residual", r.get("kv_bits_per_element"))
            else:
                spec = r["type_k"] if r["type_k"] == r["type_v"] else f"K {r['type_k']} V {r['type_v']}"
                details = f"K {r['type_k']}, V {r['type_v']}, flash attention" + (" — the reference" if r.get("reference") else "")
                bits = r.get("kv_bits_per_element")
            row = {"tool": tool, "spec": spec, "details": details, "doc": doc, "context": r["context"],
                   "bits": bits, "seconds": r.get("seconds"), "bits_quantized_part": r.get("kv_bits_per_element")}
            if "error" in r or "ppl" not in r:
                row["error"] = r.get("error", "no tokens scored")
                errors.append(f"{name}: {spec} at context {r['context']}: {row['error']}")
            else:
                row.update({"n": r["tokens_scored"], "nll": r["nll_mean"], "kl": r["kl_mean"], "top1": r["top1_agree"]})
            out.append(row)
    return out, versions


# ---------------------------------------------------------------- combining and comparing

def combine(doc_rows, elems):
    groups = {}
    for r in doc_rows:
        groups.setdefault((r["tool"], r["spec"], r["context"]), []).append(r)
    out = []
    for (tool, spec, ctx), rs in groups.items():
        c = {"tool": tool, "spec": spec, "context": ctx, "details": rs[0]["details"],
             "docs": sorted(r["doc"] for r in rs), "seconds": sum(r.get("seconds") or 0.0 for r in rs)}
        errs = [f"{r['doc']}: {r['error']}" for r in rs if "error" in r]
        if errs:
            c["error"] = "; ".join(errs)
            c["bits"] = rs[0].get("bits")
        else:
            n = sum(r["n"] for r in rs)
            w = lambda k: sum(r[k] * r["n"] for r in rs) / n
            c.update({"n": n, "nll": w("nll"), "kl": w("kl"), "top1": w("top1")})
            c["ppl"] = math.exp(c["nll"])
            if tool == "kvq":
                big = max(rs, key=lambda r: r["bytes"])
                c["bits"], c["bytes_per_token"] = big["bits"], big["bytes_per_token"]
            else:
                c["bits"] = w("bits") if all(r.get("bits") is not None for r in rs) else None
            if tool == "transformers":
                c["bits_quantized_part"] = rs[0].get("bits_quantized_part")
        if c.get("bytes_per_token") is None and c.get("bits") is not None and elems:
            c["bytes_per_token"] = c["bits"] * elems / 8
        out.append(c)
    return out


def find(rows, tool, specs, ctx, doc=None):
    for s in specs:
        for r in rows:
            if r["tool"] == tool and r["spec"] == s and r["context"] == ctx and (doc is None or r["doc"] == doc) and "nll" in r:
                return r
    return None


def delta(r, base):
    if r is None or base is None or "nll" not in r:
        return None
    return 100.0 * (math.exp(r["nll"] - base["nll"]) - 1.0)


def add_deltas(rows, ctx_rows_of, key_doc=False):
    for r in rows:
        if "nll" not in r:
            continue
        doc = r["doc"] if key_doc else None
        pool = ctx_rows_of(r)
        r["dppl_own16"] = delta(r, find(pool, r["tool"], OWN_F16[r["tool"]], r["context"], doc))
        r["dppl_ownref"] = delta(r, find(pool, r["tool"], OWN_REF[r["tool"]], r["context"], doc))
        r["dppl_kvq32"] = delta(r, find(pool, "kvq", ["fp32"], r["context"], doc))


def pareto(rows):
    pts = [r for r in rows if "ppl" in r and r.get("bits") is not None]
    front = []
    for r in pts:
        dominated = any(s is not r and s["bits"] <= r["bits"] and s["ppl"] <= r["ppl"]
                        and (s["bits"] < r["bits"] or s["ppl"] < r["ppl"]) for s in pts)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r["bits"], r["ppl"]))


# ---------------------------------------------------------------- goals

def f_pct(x):
    return "n/a" if x is None else f"{x:+.2f}%"


def f_bits(r):
    return f"{r['bits']:.2f} bits/elem, {r['bytes_per_token']:.0f} B/token" if r and r.get("bytes_per_token") else "n/a"


def goals_at(ctx, rows, doc_rows, docs):
    """One dict per goal check at this context: goal, measured, target, verdict, met (True/False/None), detail."""
    k = lambda spec: find(rows, "kvq", [spec], ctx)
    g = []
    fp16 = k("fp16")

    # 1. kivi-4 within +0.5% of fp16
    kivi4 = k("kivi-4")
    d = kivi4.get("dppl_own16") if kivi4 else None
    g.append({"goal": "kivi-4 within +0.5% of fp16 PPL", "context": ctx, "target": "ΔPPL ≤ +0.50%",
              "measured": f_pct(d), "met": None if d is None else d <= 0.5,
              "verdict": "n/a (missing rows)" if d is None else ("met" if d <= 0.5 else f"missed by {d - 0.5:.2f} pp"),
              "detail": (f"kivi-4 PPL {kivi4['ppl']:.4f} vs fp16 {fp16['ppl']:.4f} ({f_bits(kivi4)})" if kivi4 and fp16 else "")})

    # 2. kivi-4 better than llama.cpp q4_0 / q4_1 at equal or fewer bytes
    for q in ("q4_0", "q4_1"):
        lq = find(rows, "llama.cpp", [q], ctx)
        name = f"kivi-4 better than llama.cpp {q} at equal or fewer bytes"
        if not (kivi4 and lq and kivi4.get("bytes_per_token") and lq.get("bytes_per_token")):
            g.append({"goal": name, "context": ctx, "target": "ΔPPL (vs own 16-bit) lower, bytes/token ≤",
                      "measured": "n/a", "met": None, "verdict": "n/a (missing rows)", "detail": ""})
            continue
        dk, dq = kivi4["dppl_own16"], lq["dppl_own16"]
        better = dk < dq
        fewer = kivi4["bytes_per_token"] <= lq["bytes_per_token"] + 1e-9
        why = []
        if not better:
            why.append(f"quality: ΔPPL {dk:+.2f}% vs {dq:+.2f}%, worse by {dk - dq:.2f} pp")
        if not fewer:
            extra = kivi4["bytes_per_token"] - lq["bytes_per_token"]
            why.append(f"bytes: {extra:.0f} B/token more (+{100 * extra / lq['bytes_per_token']:.1f}%, "
                       f"{kivi4['bits'] - lq['bits']:+.2f} bits/elem)")
        # The best kvq cache that does fit in q's bytes, for reference.
        fits = [r for r in rows if r["tool"] == "kvq" and r["context"] == ctx and "ppl" in r
                and r.get("bytes_per_token") is not None and r["bytes_per_token"] <= lq["bytes_per_token"] + 1e-9]
        best = min(fits, key=lambda r: r["ppl"]) if fits else None
        best_txt = (f"; the best kvq cache within {q}'s bytes: `{best['spec']}` ({f_bits(best)}), ΔPPL "
                    f"{best['dppl_own16']:+.2f}%, KL {best['kl']:.5f} — "
                    f"{'better' if best['dppl_own16'] < dq else 'not better'} than {q}") if best else \
                   f"; no kvq cache fits in {q}'s bytes"
        g.append({"goal": name, "context": ctx, "target": f"ΔPPL < {q}'s, bytes/token ≤ {lq['bytes_per_token']:.0f}",
                  "measured": f"ΔPPL {dk:+.2f}% vs {dq:+.2f}%; {kivi4['bytes_per_token']:.0f} vs {lq['bytes_per_token']:.0f} B/token",
                  "met": better and fewer, "verdict": "met" if better and fewer else "missed (" + "; ".join(why) + ")",
                  "detail": (f"kivi-4 {f_bits(kivi4)}, ΔPPL vs kvq fp16 {dk:+.2f}%, KL {kivi4['kl']:.5f} (vs kvq fp32); "
                             f"{q} {f_bits(lq)}, ΔPPL vs llama.cpp f16 {dq:+.2f}%, KL {lq['kl']:.5f} (vs llama.cpp f16)"
                             + best_txt)})

    # 3. per-token-4 reproduces transformers' quanto int4 within noise
    pt4 = k("per-token-4")
    qu4 = find(rows, "transformers", ["QuantizedCache quanto int4"], ctx)
    name = "per-token-4 reproduces HF quanto int4 within noise"
    if not (pt4 and qu4):
        g.append({"goal": name, "context": ctx, "target": "|ΔPPL difference| ≤ noise", "measured": "n/a",
                  "met": None, "verdict": "n/a (missing rows)", "detail": ""})
    else:
        dk, dh = pt4["dppl_ownref"], qu4["dppl_ownref"]
        diff = dk - dh
        per_doc = []
        for doc in docs:
            a = find(doc_rows, "kvq", ["per-token-4"], ctx, doc)
            b = find(doc_rows, "transformers", ["QuantizedCache quanto int4"], ctx, doc)
            if a and b and a.get("dppl_ownref") is not None and b.get("dppl_ownref") is not None:
                per_doc.append((doc, a["dppl_ownref"] - b["dppl_ownref"]))
        se = None
        if len(per_doc) >= 2:
            xs = [x for _, x in per_doc]
            mean = sum(xs) / len(xs)
            se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
        floors = [abs(x) for x in ((k("fp16") or {}).get("dppl_ownref"),
                  (find(rows, "transformers", ["DynamicCache fp16-model"], ctx) or {}).get("dppl_ownref")) if x is not None]
        floor = max(floors) if floors else 0.0
        noise = max(2 * se if se is not None else 0.0, floor)
        met = abs(diff) <= noise
        kl_ratio = pt4["kl"] / qu4["kl"] if qu4["kl"] > 0 else float("nan")
        g.append({"goal": name, "context": ctx, "target": f"|Δk − Δh| ≤ noise = {noise:.3f} pp",
                  "measured": f"Δk {dk:+.3f}%, Δh {dh:+.3f}%, difference {diff:+.3f} pp",
                  "met": met, "verdict": "met" if met else f"missed by {abs(diff) - noise:.3f} pp",
                  "detail": (f"ΔPPL of each against its own fp32 reference (kvq fp32 cache; transformers DynamicCache fp32); "
                             f"per document: {', '.join(f'{d} {x:+.3f}' for d, x in per_doc)} pp; noise = max(2 × standard "
                             f"error over documents = {'n/a' if se is None else f'{2 * se:.3f}'}, 16-bit floor = {floor:.3f}) pp "
                             f"(floor: the larger |ΔPPL| of kvq fp16 vs fp32 and transformers fp16-model vs fp32); "
                             f"KL {pt4['kl']:.5f} vs {qu4['kl']:.5f} (×{kl_ratio:.2f}), top-1 {100 * pt4['top1']:.2f}% vs "
                             f"{100 * qu4['top1']:.2f}%; bits/elem {pt4['bits']:.2f} (kvq, f16 scales) vs {qu4['bits']:.2f} "
                             f"(quanto, fp32 scales), residual included")})

    # 4-6. 2-bit caches within 1.3x of fp16; per-token-2 collapses
    for spec, collapse in (("kivi-2", False), ("kvquant-2", False), ("per-token-2", True)):
        r = k(spec)
        ratio = r["ppl"] / fp16["ppl"] if r and fp16 else None
        if collapse:
            g.append({"goal": "per-token-2 collapses (shown)", "context": ctx, "target": "PPL > 1.3× fp16 (shown, not a goal)",
                      "measured": "n/a" if ratio is None else f"×{ratio:.3f}", "met": None,
                      "verdict": "n/a" if ratio is None else ("collapses" if ratio > 1.3 else "does not collapse here"),
                      "detail": (f"per-token-2 PPL {r['ppl']:.4f} vs fp16 {fp16['ppl']:.4f}, KL {r['kl']:.5f}, top-1 "
                                 f"{100 * r['top1']:.2f}%, {f_bits(r)}") if ratio else ""})
        else:
            g.append({"goal": f"{spec} within 1.3× of fp16 PPL", "context": ctx, "target": "PPL ≤ 1.3× fp16",
                      "measured": "n/a" if ratio is None else f"×{ratio:.3f}", "met": None if ratio is None else ratio <= 1.3,
                      "verdict": "n/a" if ratio is None else ("met" if ratio <= 1.3 else f"missed by {ratio - 1.3:.3f} (×{ratio:.3f} > ×1.3: PPL {r['ppl']:.3f}, {r['ppl'] - 1.3 * fp16['ppl']:.3f} above 1.3 × fp16)"),
                      "detail": (f"{spec} PPL {r['ppl']:.4f} vs fp16 {fp16['ppl']:.4f}, KL {r['kl']:.5f}, {f_bits(r)}") if ratio else ""})

    # 7. kvquant-3 within +2%
    r = k("kvquant-3")
    d = r.get("dppl_own16") if r else None
    g.append({"goal": "kvquant-3 within +2% of fp16 PPL", "context": ctx, "target": "ΔPPL ≤ +2.00%", "measured": f_pct(d),
              "met": None if d is None else d <= 2.0,
              "verdict": "n/a" if d is None else ("met" if d <= 2.0 else f"missed by {d - 2.0:.2f} pp"),
              "detail": f"kvquant-3 PPL {r['ppl']:.4f} vs fp16 {fp16['ppl']:.4f}, KL {r['kl']:.5f}, {f_bits(r)}" if r and fp16 else ""})
    return g


# ---------------------------------------------------------------- the SVG

TOOL_STYLE = {"kvq": ("#1f77b4", "circle"), "transformers": ("#ff7f0e", "square"), "llama.cpp": ("#2ca02c", "triangle")}


def nice_ticks(lo, hi, n=6):
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    t = math.ceil(lo / step) * step
    out = []
    while t <= hi + 1e-12:
        out.append(round(t, 10))
        t += step
    return out


def svg_plot(rows, front, ctx, title):
    pts = [r for r in rows if "ppl" in r and r.get("bits")]
    W, H, L, R, T, B = 900, 560, 75, 230, 50, 55
    pw, ph = W - L - R, H - T - B
    if not pts:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="80"><text x="10" y="40">no rows at context {ctx}</text></svg>\n'
    bmin, bmax = min(r["bits"] for r in pts), max(r["bits"] for r in pts)
    xlo, xhi = math.log2(max(bmin / 1.15, 1.0)), math.log2(bmax * 1.15)
    pmin, pmax = min(r["ppl"] for r in pts), max(r["ppl"] for r in pts)
    ylo, yhi = math.log(pmin / 1.01), math.log(pmax * 1.03)
    if yhi - ylo < 1e-6:
        ylo, yhi = ylo - 0.01, yhi + 0.01
    X = lambda b: L + (math.log2(b) - xlo) / (xhi - xlo) * pw
    Y = lambda p: T + ph - (math.log(p) - ylo) / (yhi - ylo) * ph
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         f'font-family="DejaVu Sans, Arial, sans-serif" font-size="11">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{L + pw / 2}" y="22" text-anchor="middle" font-size="14" font-weight="bold">{escape(title)}</text>',
         f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>']
    # x ticks (log2 axis)
    for b in (1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64):
        if xlo <= math.log2(b) <= xhi:
            x = X(b)
            s.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{T + ph}" stroke="#e5e5e5"/>')
            s.append(f'<text x="{x:.1f}" y="{T + ph + 16}" text-anchor="middle">{b:g}</text>')
    # y ticks (log axis): 1-1.5-2-3-5-7 per decade over a wide range, else plain nice steps
    lo, hi = math.exp(ylo), math.exp(yhi)
    if hi / lo > 8:
        ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 1.5, 2, 3, 5, 7)]
        ticks = [t for t in ticks if lo <= t <= hi]
    else:
        ticks = [t for t in nice_ticks(lo, hi) if t > 0]
    for t in ticks:
        y = Y(t)
        s.append(f'<line x1="{L}" y1="{y:.1f}" x2="{L + pw}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        s.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    s.append(f'<text x="{L + pw / 2}" y="{H - 14}" text-anchor="middle" font-size="12">K/V bits per element '
             f'(log scale; residual and sink included)</text>')
    s.append(f'<text transform="translate(18,{T + ph / 2}) rotate(-90)" text-anchor="middle" font-size="12">'
             f'perplexity (log scale)</text>')
    # the Pareto front
    if len(front) >= 1:
        path = " ".join(f"{X(r['bits']):.1f},{Y(r['ppl']):.1f}" for r in front)
        s.append(f'<polyline points="{path}" fill="none" stroke="#d62728" stroke-width="1.5" stroke-dasharray="5,3"/>')
    # points and labels (labels nudged vertically to avoid overlaps)
    placed = []
    for r in sorted(pts, key=lambda r: (r["bits"], r["ppl"])):
        color, shape = TOOL_STYLE.get(r["tool"], ("#777", "circle"))
        x, y = X(r["bits"]), Y(r["ppl"])
        fill = "white" if r["spec"] in ("fp32", "DynamicCache fp32") or (r["tool"] == "llama.cpp" and r["spec"] == "f16") else color
        if shape == "circle":
            s.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{fill}" stroke="{color}" stroke-width="1.5"/>')
        elif shape == "square":
            s.append(f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{fill}" stroke="{color}" stroke-width="1.5"/>')
        else:
            s.append(f'<polygon points="{x:.1f},{y - 5:.1f} {x - 5:.1f},{y + 4:.1f} {x + 5:.1f},{y + 4:.1f}" fill="{fill}" '
                     f'stroke="{color}" stroke-width="1.5"/>')
        label = r["spec"].replace("QuantizedCache ", "").replace("DynamicCache ", "Dyn ")
        if r["tool"] != "kvq":
            label = f"{r['tool'] if r['tool'] != 'transformers' else 'HF'} {label}"
        w = 6.2 * len(label)
        ly = y + 4
        for dy in [0] + [d for k in range(1, 30) for d in (11 * k, -11 * k)]:
            cand = (x + 7, ly + dy - 9, x + 7 + w, ly + dy + 2)
            if T + 1 <= cand[1] and cand[3] <= T + ph - 1 and not any(
                    cand[0] < p[2] and p[0] < cand[2] and cand[1] < p[3] and p[1] < cand[3] for p in placed):
                break
        placed.append(cand)
        if dy:
            s.append(f'<line x1="{x + 4:.1f}" y1="{y:.1f}" x2="{x + 7:.1f}" y2="{ly + dy - 3:.1f}" stroke="#aaa" stroke-width="0.7"/>')
        s.append(f'<text x="{x + 8:.1f}" y="{ly + dy:.1f}" fill="{color}" font-size="10">{escape(label)}</text>')
    # legend
    lx, ly = W - R + 70, T + 10
    for i, (tool, (color, shape)) in enumerate(TOOL_STYLE.items()):
        y = ly + 18 * i
        s.append(f'<circle cx="{lx}" cy="{y}" r="4.5" fill="{color}"/>' if shape == "circle" else
                 f'<rect x="{lx - 4}" y="{y - 4}" width="8" height="8" fill="{color}"/>' if shape == "square" else
                 f'<polygon points="{lx},{y - 5} {lx - 5},{y + 4} {lx + 5},{y + 4}" fill="{color}"/>')
        s.append(f'<text x="{lx + 10}" y="{y + 4}">{escape(tool)}</text>')
    y = ly + 18 * len(TOOL_STYLE)
    s.append(f'<line x1="{lx - 6}" y1="{y}" x2="{lx + 6}" y2="{y}" stroke="#d62728" stroke-width="1.5" stroke-dasharray="5,3"/>')
    s.append(f'<text x="{lx + 10}" y="{y + 4}">Pareto front</text>')
    s.append(f'<text x="{lx - 6}" y="{y + 22}" font-size="10">hollow: each tool\'s reference</text>')
    s.append(f'<text x="{lx - 6}" y="{y + 36}" font-size="10">context {ctx}, chunk-streamed</text>')
    s.append("</svg>")
    return "\n".join(s) + "\n"


# ---------------------------------------------------------------- the Markdown

def cell(x):
    """Text for a Markdown table cell or list item (only what breaks a table is escaped)."""
    return str(x).replace("|", "\\|").replace("\n", " ")


def fmt(x, spec, none="—"):
    return none if x is None else format(x, spec)


def table(rows, front):
    on_front = {id(r) for r in front}
    head = ("| tool | cache | bits/elem | bytes/token | PPL | ΔPPL % own 16-bit | ΔPPL % own ref | ΔPPL % vs kvq fp32 "
            "| KL (nats) | top-1 agree | front | time (s) | details |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|:-:|--:|---|")
    lines = [head]
    key = lambda r: (r.get("bits") if r.get("bits") is not None else 1e9, r.get("ppl", 1e30), TOOLS.index(r["tool"]) if r["tool"] in TOOLS else 9)
    for r in sorted(rows, key=key):
        if "ppl" not in r:
            lines.append(f"| {r['tool']} | `{r['spec']}` | {fmt(r.get('bits'), '.2f')} | {fmt(r.get('bytes_per_token'), '.0f')} "
                         f"| error | | | | | | | {r['seconds']:.1f} | {cell(r['error'][:160])} |")
            continue
        lines.append(
            f"| {r['tool']} | `{r['spec']}` | {fmt(r.get('bits'), '.2f')} | {fmt(r.get('bytes_per_token'), '.0f')} | {r['ppl']:.4f} "
            f"| {fmt(r.get('dppl_own16'), '+.2f')} | {fmt(r.get('dppl_ownref'), '+.2f')} | {fmt(r.get('dppl_kvq32'), '+.2f')} "
            f"| {r['kl']:.5f} | {100 * r['top1']:.2f}% | {'★' if id(r) in on_front else ''} | {r['seconds']:.1f} | {cell(r['details'])} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raw", required=True, help="bench/quality.sh's raw outputs")
    ap.add_argument("--out", required=True, help="where quality.md, quality.json, quality.svg go")
    ap.add_argument("--notes", help="a Markdown file of hand-made analysis (why the misses, what fixes them), "
                    "inserted after the goals: its numbers come from the commands it names, not from this run")
    a = ap.parse_args()
    raw = a.raw
    meta = load_json(os.path.join(raw, "meta.json"))
    settings = meta["settings"]
    problems = []

    # The ids every tool scored.
    ids = {d["name"]: d["ids"] for d in load_json(os.path.join(raw, "ids.json"))["documents"]}
    docs = list(ids)
    ids_check = []
    for name in sorted(os.listdir(raw)):
        m = re.fullmatch(r"kvq-ids-(.+)-(\d+)\.json", name)
        if m:
            got = load_json(os.path.join(raw, name))["documents"][0]["ids"]
            same = got == ids.get(m.group(1))
            ids_check.append({"doc": m.group(1), "context": int(m.group(2)), "same": same, "n": len(got)})
            if not same:
                problems.append(f"kvq ppl scored other ids than kvq tokenize for {m.group(1)} at context {m.group(2)}")

    doc_rows = read_kvq(raw, meta, problems)
    errors = []  # rows a peer could not score (they carry "error"; shown, not fatal)
    hf_rows, hf_versions = read_peer(raw, "hf", errors)
    ll_rows, ll_versions = read_peer(raw, "llama", errors)
    doc_rows += hf_rows + ll_rows
    for r in doc_rows:  # every tool scored the same number of tokens of each document
        if "n" in r and r["doc"] in ids:
            want = expected_predicted(ids[r["doc"]], r["context"])
            if r["n"] != want:
                problems.append(f"{r['tool']} {r['spec']} {r['doc']}@{r['context']}: {r['n']} tokens scored, expected {want}")

    ref = next((r for r in doc_rows if r["tool"] == "kvq" and r["spec"] == "fp32"), None)
    elems = ref["bytes_per_token"] * 8 / ref["bits"] if ref else None
    rows = combine(doc_rows, elems)
    by_ctx = {}
    for r in rows:
        by_ctx.setdefault(r["context"], []).append(r)
    doc_by = {}
    for r in doc_rows:
        doc_by.setdefault((r["context"], r["doc"]), []).append(r)
    add_deltas(rows, lambda r: by_ctx[r["context"]])
    add_deltas(doc_rows, lambda r: doc_by[(r["context"], r["doc"])], key_doc=True)
    contexts = sorted(by_ctx)
    fronts = {c: pareto(by_ctx[c]) for c in contexts}
    goals = [g for c in contexts for g in goals_at(c, by_ctx[c], doc_rows, docs)]

    plot_ctx = PLOT_CONTEXT if PLOT_CONTEXT in by_ctx else (max(contexts) if contexts else None)
    os.makedirs(a.out, exist_ok=True)
    svg = svg_plot(by_ctx.get(plot_ctx, []), fronts.get(plot_ctx, []), plot_ctx,
                   f"SmolLM2-135M: perplexity vs KV bits per element, context {plot_ctx}")
    with open(os.path.join(a.out, "quality.svg"), "w") as f:
        f.write(svg)

    # A resumed run appends to these: keep the last time of each step and each command once.
    steps_path, cmd_path = os.path.join(raw, "steps.jsonl"), os.path.join(raw, "commands.txt")
    steps = list({s["step"]: s for s in (json.loads(l) for l in open(steps_path))}.values()) if os.path.exists(steps_path) else []
    commands = list(dict.fromkeys(open(cmd_path).read().splitlines())) if os.path.exists(cmd_path) else []

    # ---- Markdown
    m = meta["machine"]
    md = ["# Quality vs bits: kvq's KV caches and the peers' on the same token ids", ""]
    if not settings.get("full"):
        md += ["> **Not the issue's settings** (a quick or partial run: "
               f"{settings['tokens']} ids per document, contexts {', '.join(map(str, settings['contexts']))}, peers "
               f"{settings['peers']}). At contexts this short most of every quantized cache is still in its "
               "full-precision residual window, so these numbers check the pipeline, not the caches.", ""]
    if problems:
        md += ["> **Problems found while reading the outputs:**", ""] + [f"> - {cell(p)}" for p in problems] + [""]
    if errors:
        md += ["Rows a tool could not score (they show as errors below):", ""] + [f"- {cell(e)}" for e in errors] + [""]
    dirty = "clean tree" if not meta["dirty"] else (
        f"dirty tree: {meta.get('modified_files', '?')} tracked files modified"
        + (f" (git diff HEAD sha256 {meta['diff_sha256']})" if meta.get("diff_sha256") else "")
        + f", {meta.get('untracked_files', '?')} untracked; "
        + ("in paths that can change these numbers: " + ", ".join(f"`{p.strip()}`" for p in meta["dirty_relevant"][:12])
           + (" …" if len(meta["dirty_relevant"]) > 12 else "") if meta["dirty_relevant"] else "none in crates/, Cargo.*, bench/, scripts/corpus.sh"))
    total_s = sum(s["seconds"] for s in steps)
    v = meta["versions"]
    hfv = ", ".join(f"{k} {hf_versions[k]}" for k in ("torch", "transformers", "gguf", "optimum-quanto", "hqq", "numpy") if hf_versions.get(k))
    if hf_versions:
        hfv += f"; Python {hf_versions.get('python')}; device {hf_versions.get('device')}" + (
            f", torch threads {hf_versions['torch_threads']}" if hf_versions.get("torch_threads") else "") + (
            f", GPU {hf_versions['gpu']}" if hf_versions.get("gpu") else "")
    llv = ""
    if ll_versions:
        llv = (f"llama-cpp-python {ll_versions.get('llama-cpp-python')}, numpy {ll_versions.get('numpy')}, GPU offload "
               f"{ll_versions.get('gpu_offload')}, threads {ll_versions.get('threads') or 'default'}")
        if ll_versions.get("llama.cpp system_info"):
            llv += f" (system info: `{ll_versions['llama.cpp system_info'].strip()[:300]}`)"
    ctxs = ", ".join(map(str, settings["contexts"]))
    md += [
        f"- date: {meta['date_utc']}",
        f"- machine: {m['cpu_model']}, {m['cpus']} CPUs ({m['sockets']} socket × {m['cores_per_socket']} cores × "
        f"{m['threads_per_core']} threads), {m['memory_gib']} GiB" + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"),
        f"- commit: {meta['commit']} ({dirty})" + (
            f" — the tree's status is against the machine's own .git at {meta['git_head']}, not {meta['commit']}"
            + (f"; {meta['tree_check']}" if meta.get("tree_check") else "")
            if meta.get("git_head") and not str(meta["commit"]).startswith(str(meta["git_head"])) else ""),
        *[f"- {' and '.join(pt['tools'])}{' (some of its processes: the files named)' if 'kvq' in pt['tools'] else ''} "
          f"ran on another machine ({pt['machine']['cpu_model']}, {pt['machine']['nproc']} "
          f"CPUs{', GPU ' + pt['machine']['gpu'] if pt['machine'].get('gpu') else ''}), commit {pt['commit']}"
          f"{' (dirty tree)' if pt['dirty'] else ''}, {pt['date_utc']}, on the same ids (checked): "
          + ", ".join(f"`{f}`" for f in pt["files"]) for pt in meta.get("parts", [])],
        "- command: `" + "".join(f"{k}={val} " for k, val in sorted(meta["env"].items())) + "bash bench/quality.sh`"
        " (every step's exact command below)",
        f"- model: `{os.path.basename(meta['model']['path'])}` (sha256 {meta['model']['sha256'][:16]}…), kvq weights "
        f"`{settings['weights']}`; transformers dequantizes the GGUF to float32; llama.cpp runs it as stored",
        f"- corpus: {', '.join(f'`{d}` ({len(ids[d])} ids)' for d in docs)} — the first {settings['tokens']} ids of each "
        f"document as `kvq tokenize` makes them, the same ids for every tool ("
        + ("checked: kvq ppl scored exactly these ids in every run" if ids_check and all(c["same"] for c in ids_check) else
           "**kvq ppl's ids differ from kvq tokenize's**" if ids_check else "not checked") + ")",
        f"- scoring: windows of {ctxs} tokens, each from an empty cache, streamed in chunks of {settings['chunk']} "
        f"tokens through the cache; every tool's caches in lockstep with its own reference; documents combined by "
        f"token-weighted means of NLL, KL and top-1 (PPL = exp(mean NLL))",
        f"- versions: {v.get('kvq')} ({v.get('rustc')}); transformers peer: {hfv or 'not run'}; llama.cpp peer: {llv or 'not run'}",
        f"- wall time: {total_s:.0f} s in all (" + ", ".join(f"{s['step']} {s['seconds']:.0f} s" for s in steps) + ")",
        "",
    ]

    # Goals
    md += ["## Goals", "", "| goal | context | target | measured | verdict |", "|---|--:|---|---|---|"]
    for g in goals:
        mark = "✅ " if g["met"] is True else "❌ " if g["met"] is False else ""
        md.append(f"| {g['goal']} | {g['context']} | {cell(g['target'])} | {cell(g['measured'])} | {mark}{cell(g['verdict'])} |")
    md += [""]
    names = []
    for g in goals:
        if g["goal"] not in names:
            names.append(g["goal"])
    for n in names:
        gs = [g for g in goals if g["goal"] == n]
        if all(g["met"] is None for g in gs):
            summary = "; ".join(f"{g['context']}: {g['verdict']} ({g['measured']})" for g in gs)
        else:
            missed = [g for g in gs if g["met"] is False]
            summary = ("met at every context (" + ", ".join(f"{g['context']}: {g['measured']}" for g in gs) + ")") if not missed and all(
                g["met"] for g in gs) else "; ".join(f"{g['context']}: {g['verdict']}" for g in gs)
        md.append(f"- **{n}**: {cell(summary)}")
        for g in gs:
            if g["detail"]:
                md.append(f"  - {g['context']}: {cell(g['detail'])}")
    md += ["",
           "Definitions: ΔPPL % = 100 (PPL / PPL of the baseline − 1), the baseline being the tool's own 16-bit row "
           "(kvq fp16, llama.cpp f16) unless said otherwise; \"within 1.3×\" = PPL / PPL(kvq fp16) ≤ 1.3; "
           "\"better than q4_0/q4_1\" = a lower ΔPPL against the tool's own 16-bit cache (the two tools' baselines differ "
           "a little: other kernels) with bytes/token ≤ theirs; \"within noise\" compares ΔPPL against each tool's "
           "own fp32 reference (both quantize the same way on top of it), the noise being the larger of twice the "
           "standard error of the per-document difference and the 16-bit floor (how far each tool's 16-bit run already "
           "moves PPL).", ""]
    if a.notes:
        md += [open(a.notes).read().rstrip(), ""]

    # Tables
    md += ["## Results", "",
           f"bits/elem: bits of K/V storage per element at the end of the longest window, scales, full-precision "
           f"residual and sink included (kvq: `effective_bits`, from the bytes its packed cache really holds; "
           f"transformers: data + fp32 scale and zero-point per group of 64, plus its fp32 residual; llama.cpp: its "
           f"block formats, no residual). bytes/token = bits/elem × {fmt(elems, '.0f')} / 8 "
           f"({fmt(elems, '.0f')} = K and V elements per token = 2 × layers × KV heads × head dim; kvq's rows give "
           f"their own exact bytes). KL and top-1 are measured against each tool's own reference: "
           + "; ".join(f"{t}: {REF_NAME[t]}" for t in TOOLS) + ". ★: on the Pareto front of PPL vs bits at that "
           "context (all tools together). time: seconds in that cache's forward passes, both documents.", ""]
    for c in contexts:
        md += [f"### Context {c}", "", table(by_ctx[c], fronts[c]), ""]
    md += ["## PPL vs bits per element", "",
           f"![PPL vs bits per element at context {plot_ctx}](quality.svg)", "",
           f"Context {plot_ctx}; the dashed line is the Pareto front: "
           + " → ".join(f"{r['tool']} `{r['spec']}` ({r['bits']:.2f}, {r['ppl']:.3f})" for r in fronts.get(plot_ctx, [])) + ".", ""]

    # Time per tool and context (for planning runs)
    md += ["## Time", "", "| tool | context | caches | tokens scored per cache | seconds (all caches) | ms per token per cache |",
           "|---|--:|--:|--:|--:|--:|"]
    for c in contexts:
        for t in TOOLS:
            rs = [r for r in by_ctx[c] if r["tool"] == t]
            if rs:
                n = max(r.get("n", 0) for r in rs)
                sec = sum(r["seconds"] for r in rs)
                md.append(f"| {t} | {c} | {len(rs)} | {n} | {sec:.1f} | {1000 * sec / max(n, 1) / len(rs):.2f} |")
    md += ["", "## Commands", "", "```sh"] + commands + ["```", ""]
    with open(os.path.join(a.out, "quality.md"), "w") as f:
        f.write("\n".join(md))

    out = {"meta": meta, "versions": {"kvq": v, "transformers": hf_versions, "llama.cpp": ll_versions},
           "commands": commands, "steps": steps, "elements_per_token": elems, "ids_check": ids_check,
           "problems": problems, "row_errors": errors, "plot_context": plot_ctx,
           "pareto_front": {str(c): [{"tool": r["tool"], "spec": r["spec"], "bits": r["bits"], "ppl": r["ppl"]} for r in fronts[c]] for c in contexts},
           "goals": goals, "rows": sorted(rows, key=lambda r: (r["context"], r.get("bits") or 1e9)),
           "rows_per_document": doc_rows}
    with open(os.path.join(a.out, "quality.json"), "w") as f:
        json.dump(out, f, indent=1)
    log(f"wrote {a.out}/quality.md, quality.json, quality.svg ({len(rows)} rows, {len(goals)} goal checks"
        + (f", {len(problems)} problems" if problems else "") + ")")
    if problems:
        for p in problems:
            log(f"  problem: {p}")
        sys.exit(1)


if __name__ == "__main__":
    main()
