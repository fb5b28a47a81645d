from nbgen import SETUP, HELPERS, md, code, footer

def cells():
    return [
md(r"""
# Lesson 8 — Choosing a configuration

Two things decide which cache to use:

- **memory**, a hard limit: the cache must fit, at the real context length and batch, with its
  scales, windows and outliers counted — `kvq::size` does it exactly;
- **quality**, measured against full precision on your own data — perplexity, KL divergence,
  top-1 agreement (`kvq::eval::evaluate`, or `kvq ppl`).

Among the configurations that fit, take one that meets the quality target, preferring more
margin. This lesson computes the first for Llama-3-8B, measures the second on SmolLM2-135M, and
puts them together in a small decision table.
"""),
code(SETUP),
code(HELPERS),
md(r"""
## What fits: the longest context and the largest batch for a budget

`largest(ok)` finds by bisection the largest $x$ with `ok(x)` true ($x$ is a context length or a
batch size; bytes only grow with either). For every preset, Llama-3-8B:
"""),
code(r'''
use kvq::cache::{CacheConfig, FullPrecision, Scheme};
use kvq::size::{cache_bytes, human, with_commas, ModelGeometry};

/// The largest x in 0..=hi with ok(x) (ok must be true up to some x, then false).
fn largest(hi: usize, ok: impl Fn(usize) -> kvq::Result<bool>) -> kvq::Result<usize> {
    let (mut lo, mut hi) = (0usize, hi);
    while lo < hi {
        let mid = lo + (hi - lo + 1) / 2;
        if ok(mid)? { lo = mid } else { hi = mid - 1 }
    }
    Ok(lo)
}
fn config(name: &str) -> kvq::Result<CacheConfig> {
    if name == "fp8" { Ok(CacheConfig::new(Scheme::Full(FullPrecision::Fp8))) } else { CacheConfig::preset(name) }
}
let llama3 = ModelGeometry::preset("llama-3-8b")?;
let gib16: usize = 16 << 30;
let gib40: usize = 40 << 30;
let names = ["fp16", "fp8", "per-token-4", "per-token-2", "kivi-4", "kivi-2", "kvquant-4", "kvquant-3", "kvquant-2"];
let mut budget_rows = Vec::new(); // (name, bits/element at 100k, max context in 16 GiB, max batch at 8k in 40 GiB)
for name in names {
    let cfg = config(name)?;
    let b100 = cache_bytes(&llama3, &cfg, 100_000, 1)?.total();
    let bits = 8.0 * b100 as f64 / (llama3.elements_per_token() * 100_000) as f64;
    let ctx = largest(1 << 26, |s| Ok(cache_bytes(&llama3, &cfg, s, 1)?.total() <= gib16))?;
    let batch = largest(1 << 16, |b| Ok(cache_bytes(&llama3, &cfg, 8192, b)?.total() <= gib40))?;
    budget_rows.push((name.to_string(), bits, ctx, batch));
}
let cells: Vec<Vec<String>> = budget_rows.iter().map(|(n, bits, ctx, batch)|
    vec![n.clone(), format!("{bits:.2}"), with_commas(*ctx as u128), batch.to_string()]).collect();
print!("{}", table(&["cache", "bits/element (100k tokens)", "longest context, batch 1, 16 GiB", "sequences of 8k in 40 GiB"], &cells));

fn row_of(rows: &[(String, f64, usize, usize)], name: &str) -> (String, f64, usize, usize) {
    rows.iter().find(|r| r.0 == name).unwrap().clone()
}
assert_eq!(row_of(&budget_rows, "fp16").2, 131_072); // 16 GiB / 131,072 bytes per token
assert_eq!(row_of(&budget_rows, "fp16").3, 40);
assert_eq!(row_of(&budget_rows, "kivi-2").3, 199);   // not 320 (8×) nor 212 (5.3×): at 8k the window still weighs
assert_eq!(cache_bytes(&llama3, &config("kivi-2")?, 8192, 1)?.total(), 214_958_080);
'''),
md(r"""
Three details that the bit width alone does not tell:

- **The group size can decide whether it fits.** At 100,000 tokens and a budget of 4,000,000,000
  bytes, per-token-4 (groups of 64: 4.5 bits) fits and KIVI-4 (groups of 32: 5 bits) does not.
- **Short contexts gain nothing from a window scheme.** Up to 128 tokens KIVI keeps everything in
  fp16.
- **Architecture and quantization multiply.** Llama-2-7B (MHA) in fp16 against Llama-3-8B (GQA) with
  KIVI-2: 4× from GQA times 5.3× from KIVI-2.
"""),
code(r'''
/// Bytes of a model preset's cache, batch 1.
fn b(model: &str, cache: &str, seq: usize) -> kvq::Result<usize> {
    Ok(cache_bytes(&ModelGeometry::preset(model)?, &config(cache)?, seq, 1)?.total())
}
let budget = 4_000_000_000usize;
for c in ["fp8", "kivi-4", "per-token-4"] {
    let x = b("llama-3-8b", c, 100_000)?;
    println!("{c:>12} at 100k tokens: {:>13} bytes — {}", with_commas(x as u128), if x <= budget { "fits in 4 GB" } else { "does not fit" });
}
assert_eq!(b("llama-3-8b", "per-token-4", 100_000)?, 3_689_414_656);
assert_eq!(b("llama-3-8b", "kivi-4", 100_000)?, 4_107_534_336);
assert_eq!(b("llama-3-8b", "kivi-2", 128)?, b("llama-3-8b", "fp16", 128)?); // 100% of fp16 up to the window
let ratio = b("llama-2-7b", "fp16", 100_000)? as f64 / b("llama-3-8b", "kivi-2", 100_000)? as f64;
println!("Llama-2-7B fp16 / Llama-3-8B kivi-2 at 100k tokens: {ratio:.1}× (= 4 × 5.3, not 4 + 5.3)");
assert!((ratio - 21.2).abs() < 0.05);
'''),
code(r'''
// The largest batch in 40 GiB, across contexts.
let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
for name in ["fp16", "per-token-4", "kivi-4", "kivi-2", "kvquant-2"] {
    let cfg = config(name)?;
    let mut pts = Vec::new();
    for s in [1024usize, 2048, 4096, 8192, 16384, 32768, 65536, 131072] {
        let n = largest(1 << 20, |bt| Ok(cache_bytes(&llama3, &cfg, s, bt)?.total() <= gib40))?;
        pts.push((s as f64, n as f64));
    }
    series.push((cfg.label(), pts));
}
loglog("How many sequences fit in 40 GiB of KV cache (Llama-3-8B)", "context per sequence (tokens)", "largest batch", &series)
'''),
md(r"""
### "From 8k to 128k without new GPUs"

The Russian seed opens with this promise. In the memory an 8k-token fp16 cache takes (1 GiB for
Llama-3-8B), how long a context does each scheme hold?
"""),
code(r'''
let one_gib: usize = 1 << 30;
let mut cells = Vec::new();
for name in ["fp16", "per-token-4", "kivi-4", "kivi-2", "kvquant-2"] {
    let cfg = config(name)?;
    let ctx = largest(1 << 24, |s| Ok(cache_bytes(&llama3, &cfg, s, 1)?.total() <= one_gib))?;
    cells.push(vec![name.to_string(), with_commas(ctx as u128), format!("{:.1}×", ctx as f64 / 8192.0)]);
    if name == "fp16" {
        assert_eq!(ctx, 8192);
    }
    assert!(ctx < 16 * 8192, "{name}"); // none reaches 128k in the memory of 8k
}
print!("{}", table(&["cache", "longest context in 1 GiB", "vs fp16"], &cells));
'''),
md(r"""
128k tokens in the memory of 8k would need 16× compression; 4-bit caches give 3–3.5×, 2-bit
ones 5–6× once their scales are counted: 8k becomes roughly 26k–50k. Going further takes other
tools as well — GQA (lesson 2), offloading, or evicting tokens.

## How good: quality on the real model

Bytes are only half of the decision. We stream 256 tokens of `data/tour.txt` through SmolLM2-135M
with each preset (8 tokens at a time) and compare with fp32. The text is short, so the 128-token
windows of the per-token and KIVI presets are shrunk to 32 — otherwise they would hardly quantize
anything. KVQuant is calibrated on `data/calibration.txt`. The presets are used as kvq defines
them: the per-token and KIVI ones read the current step at full precision (past-only, lesson 6),
the KVQuant ones do not. This is a small model on a short text:
use it to rank the schemes, and measure your own model on your own data before deciding.
"""),
code(r'''
use candle_core::Device;
use kvq::cache::{KvCache, Overrides};
use kvq::eval::evaluate;
use kvq::gguf::{self, WeightFormat};
use std::sync::Arc;
use std::time::Instant;

let (smol, tok, _) = gguf::load(&gguf::find_model(None)?, WeightFormat::AsStored, &Device::Cpu)?;
let mut ids = tok.encode(&std::fs::read_to_string("../data/tour.txt")?)?;
ids.truncate(256);
let cal_ids = tok.encode(&std::fs::read_to_string("../data/calibration.txt")?)?;
let t0 = Instant::now();
let mut caches: Vec<(String, Box<dyn KvCache>)> = Vec::new();
for name in ["fp16", "per-token-4", "per-token-2", "kivi-4", "kivi-2", "kvquant-4", "kvquant-3", "kvquant-2"] {
    let mut cfg = CacheConfig::preset(name)?;
    if name.starts_with("kivi") || name.starts_with("per-token") {
        cfg = Overrides { residual_length: Some(32), ..Overrides::default() }.apply(cfg)?;
    }
    let calib = match cfg.scheme {
        Scheme::KvQuant { bits, outlier_fraction } => Some(Arc::new(smol.calibrate_kvquant(&cal_ids, bits, outlier_fraction)?)),
        _ => None,
    };
    caches.push((name.to_string(), Box::new(smol.new_cache(&cfg, 1, calib)?)));
}
let mut reference = smol.new_cache(&CacheConfig::preset("fp32")?, 1, None)?;
let (r, quality) = evaluate(&smol, &ids, ("fp32", &mut reference), &mut caches, 8, |_, _| {})?;
println!("{} caches, {} tokens: {:.1} s", quality.len(), ids.len(), t0.elapsed().as_secs_f64());
println!("fp32 reference perplexity {:.3}", r.ppl);
'''),
md(r"""
## The decision table

Each row puts the memory of Llama-3-8B next to the quality measured on SmolLM2. The rule below
picks, for a scenario, the configuration with the **lowest KL** among those that fit the budget and
meet the quality target (fp8 has no cache in kvq, so no quality number: it is listed for its size).
"""),
code(r'''
let kl_target = 0.05; // nats, mean KL divergence from fp32 per token
let mut cells = Vec::new();
for (name, bits, ctx, batch) in &budget_rows {
    let q = quality.iter().find(|q| &q.cache == name);
    cells.push(vec![name.clone(), format!("{bits:.2}"), with_commas(*ctx as u128), batch.to_string(),
        q.map_or("-".into(), |q| format!("{:+.1}%", 100.0 * (q.ppl / r.ppl - 1.0))),
        q.map_or("-".into(), |q| format!("{:.4}", q.kl)),
        q.map_or("-".into(), |q| format!("{:.1}%", 100.0 * q.top1_agreement)),
        q.map_or("-".into(), |q| if q.kl <= kl_target { "yes".into() } else { "no".into() })]);
}
print!("{}", table(&["cache", "bits/elem", "max context (16 GiB)", "max batch (8k, 40 GiB)", "ΔPPL", "KL", "top-1", "KL ≤ 0.05"], &cells));

/// The measured cache with the lowest KL among those whose Llama-3-8B cache of `batch × seq` fits `budget`.
fn choose(g: &ModelGeometry, quality: &[kvq::eval::EvalRow], budget: usize, seq: usize, batch: usize, kl_target: f64) -> kvq::Result<Option<String>> {
    let mut best: Option<(f64, String)> = None;
    for q in quality {
        let fits = cache_bytes(g, &CacheConfig::preset(&q.cache)?, seq, batch)?.total() <= budget;
        if fits && q.kl <= kl_target && best.as_ref().map_or(true, |b| q.kl < b.0) {
            best = Some((q.kl, q.cache.clone()));
        }
    }
    Ok(best.map(|b| b.1))
}
let scenarios = [
    ("64 chats of 8k tokens in 40 GiB", gib40, 8192, 64),
    ("one 200k-token document in 16 GiB", gib16, 200_000, 1),
    ("200 sequences of 8k tokens in 40 GiB", gib40, 8192, 200),
];
let mut picks = Vec::new();
for (what, budget, seq, batch) in scenarios {
    let pick = choose(&llama3, &quality, budget, seq, batch, kl_target)?;
    println!("{what:>38}: {}", pick.clone().unwrap_or("nothing meets both: relax the quality target, shorten, or add memory".into()));
    picks.push(pick);
}
assert!(picks[0].is_some() && picks[0] != Some("fp16".into())); // fp16 fits only 40 such chats
assert!(picks[1].is_some());
assert!(picks[2].is_none()); // only 2-bit caches fit 200 × 8k, and none of them meets KL ≤ 0.05 here
'''),
md(r"""
## How many digits to trust

Before ranking caches by small differences, ask how much the numbers move when nothing but the
last bits change. `kvq::eval::NoisyKv` feeds a cache its K/V times $1 + \sigma u$, $u$ uniform in
$[-1, 1]$: with $\sigma = 10^{-6}$, a few float ulps. We score fp32 and kivi-2 with and without
that noise, once with the weights as stored (kvq's matmul then rounds each layer's input to 8
bits, like llama.cpp) and once with f32 weights.
"""),
code(r'''
use kvq::eval::NoisyKv;
let (smol32, _, _) = gguf::load(&gguf::find_model(None)?, WeightFormat::F32, &Device::Cpu)?;
let mut rows = Vec::new();
let mut moved = std::collections::HashMap::new();
for (weights, m) in [("stored", &smol), ("f32", &smol32)] {
    let mut caches: Vec<(String, Box<dyn KvCache>)> = Vec::new();
    for name in ["fp32", "kivi-2"] {
        let cfg = CacheConfig::preset(name)?;
        caches.push((name.to_string(), Box::new(m.new_cache(&cfg, 1, None)?)));
        caches.push((format!("{name} + noise 1e-6"), Box::new(NoisyKv::new(Box::new(m.new_cache(&cfg, 1, None)?), 1e-6, 1)?)));
    }
    let mut reference = m.new_cache(&CacheConfig::preset("fp32")?, 1, None)?;
    let (_, q) = evaluate(m, &ids, ("fp32", &mut reference), &mut caches, 8, |_, _| {})?;
    for pair in q.chunks(2) {
        let rel = (pair[1].ppl / pair[0].ppl - 1.0).abs();
        moved.insert((weights, pair[0].cache.clone()), (rel, pair[1].kl));
        rows.push(vec![weights.to_string(), pair[0].cache.clone(), format!("{:.4}", pair[0].ppl), format!("{:.4}", pair[1].ppl), format!("{:.1e}", rel), format!("{:.5}", pair[1].kl)]);
    }
}
print!("{}", table(&["weights", "cache", "PPL", "PPL, K/V noise 1e-6", "moved by", "KL of the noisy run vs fp32"], &rows));
// Stored weights: even fp32 moves by a KL of the size fp16's row shows above: a floor, not a cost.
assert!(moved[&("stored", "fp32".to_string())].1 > 5e-4);
// f32 weights: fp32 does not move; kivi-2 does, through its own rounding.
assert!(moved[&("f32", "fp32".to_string())].1 < 1e-5);
assert!(moved[&("f32", "kivi-2".to_string())].0 > 10.0 * moved[&("f32", "fp32".to_string())].0);
'''),
md(r"""
With stored weights every cache sits on a floor of KL ≈ 0.004: fp16's row in the table above is
that floor, not a cost of fp16. With f32 weights full precision is stable (it moves by 1e-7), but
a 2-bit cache still moves, here by 3e-4 of its perplexity and by up to 7e-3 on other texts
(`bench/results/gpu-model.md`): a code at a rounding boundary flips and later layers carry it on.
Two correct implementations of kivi-2 (a CPU and a GPU) can differ that much; compare caches
only by differences larger than this spread.
"""),
md(r"""
### The rule, in short

1. Compute the bytes exactly, at the real context and batch, with every overhead: the group size,
   the window and the outliers decide as much as the bit width.
2. Measure quality against full precision on representative text, with the cache streamed the
   way decoding uses it.
3. Among what fits, prefer the most quality margin; when nothing fits, something else must give —
   the batch, the context, the quality target or the hardware.
4. KVQuant needs a calibration pass on representative data; KIVI and the per-token caches need none.
"""),
footer("08-choosing.toml", ["ex08_budget"]),
    ]
