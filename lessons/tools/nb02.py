from nbgen import SETUP, HELPERS, md, code, footer

def cells():
    return [
md(r"""
# Lesson 2 — Memory math: how big the KV cache gets

The cache keeps one key vector and one value vector of $d$ numbers per layer, per KV head,
per token and per sequence of the batch:

$$\text{bytes} = 2 \cdot L \cdot H_{kv} \cdot d \cdot S \cdot B \cdot P$$

with $L$ layers, $H_{kv}$ KV heads, head dimension $d$, $S$ tokens, batch $B$ and $P$ bytes per
element (2 for fp16). The 2 counts keys **and** values. This lesson recomputes the seed texts'
figures with `kvq::size` — two of them are wrong — compares MHA, GQA and MQA, and looks at what
a batch of 200 prompts costs.
"""),
code(SETUP),
code(HELPERS),
md(r"""
## The models

`kvq::size::MODEL_PRESETS` holds the attention geometry of a few models, copied from their
published `config.json`. Only the **KV heads** enter the formula: with grouped-query attention
(GQA) several query heads share one KV head, and queries are never cached.
"""),
code(r'''
use kvq::cache::{CacheConfig, FullPrecision};
use kvq::size::{cache_bytes, full_precision_bytes, human, with_commas, ModelGeometry, MODEL_PRESETS};

let mut rows = Vec::new();
for &(name, ..) in MODEL_PRESETS {
    let g = ModelGeometry::preset(name)?;
    rows.push(vec![
        name.to_string(), g.attention_kind().to_string(), g.layers.to_string(), g.q_heads.to_string(),
        g.kv_heads.to_string(), g.head_dim.to_string(),
        with_commas(full_precision_bytes(&g, 1, 1, FullPrecision::F16)),
        human(full_precision_bytes(&g, 8192, 1, FullPrecision::F16)),
    ]);
}
print!("{}", table(&["model", "attention", "L", "query heads", "H_kv", "d", "fp16 bytes/token", "8k tokens"], &rows));
'''),
md(r"""
## The seed figures, recomputed

**"Llama-8B: about 2 GB per 8k tokens"** (the Russian lesson, §1.1). Llama-3-8B has 32 layers,
8 KV heads and $d = 128$: at 8192 tokens its fp16 cache is exactly **1 GiB**. Llama-2-7B has the
same $L$ and $d$ but 32 KV heads (multi-head attention): **4 GiB**. Neither is 2 GB.

**"An 8B model needs 13 GB of KV cache for 100k tokens"** (the KV-cache talk). For Llama-3-8B:
131,072 bytes per token × 100,000 = **13,107,200,000 bytes** = 13.1 GB (12.21 GiB). This one is right.
"""),
code(r'''
let llama3 = ModelGeometry::preset("llama-3-8b")?;
let llama2 = ModelGeometry::preset("llama-2-7b")?;
let per_token = full_precision_bytes(&llama3, 1, 1, FullPrecision::F16);
let l3_8k = full_precision_bytes(&llama3, 8192, 1, FullPrecision::F16);
let l2_8k = full_precision_bytes(&llama2, 8192, 1, FullPrecision::F16);
let l3_100k = full_precision_bytes(&llama3, 100_000, 1, FullPrecision::F16);
println!("Llama-3-8B: 2·32·8·128·2 = {} bytes per token", with_commas(per_token));
println!("Llama-3-8B,   8,192 tokens: {} bytes = {}", with_commas(l3_8k), human(l3_8k));
println!("Llama-2-7B,   8,192 tokens: {} bytes = {}", with_commas(l2_8k), human(l2_8k));
println!("Llama-3-8B, 100,000 tokens: {} bytes = {:.1} GB = {}", with_commas(l3_100k), l3_100k as f64 / 1e9, human(l3_100k));
assert_eq!(per_token, 131_072);
assert_eq!(l3_8k, 1 << 30);          // exactly 1 GiB, not "about 2 GB"
assert_eq!(l2_8k, 4 << 30);          // exactly 4 GiB
assert_eq!(l3_100k, 13_107_200_000); // the seed's "13 GB" is right
'''),
md(r"""
**The nanoGPT estimate.** The Russian lesson's code computes nanoGPT's cache (6 layers, 6 heads,
embedding 384, so $d = 64$) at 1024 tokens and 4 bits:

```python
def estimate_kv_cache_size_bytes(seq_len, n_layer=6, n_head=6, n_embd=384, precision=4):
    head_dim = n_embd // n_head
    return 2 * n_layer * n_head * head_dim * seq_len * (precision / 8)
print(f"nanoGPT KV-Cache (1024 tokens, 4-bit): {estimate_kv_cache_size_bytes(1024)/1024:.1f} KB")
```

It prints "2304.0 KB". Two corrections: dividing by 1024 gives **KiB**, and the formula counts
the 4-bit **codes only**. A real 4-bit cache also stores how to read the codes back: a scale
and a minimum (f16 each) per group of values — lesson 3. With kvq's per-token 4-bit cache
(groups of 64, the default of Hugging Face's quantized cache, no residual window) the same
cache takes 2,654,208 bytes, 12.5% more.
"""),
code(r'''
/// The seed's Python function, line for line.
fn estimate_kv_cache_size_bytes(seq_len: usize, n_layer: usize, n_head: usize, n_embd: usize, precision: f64) -> f64 {
    let head_dim = n_embd / n_head;
    2.0 * (n_layer * n_head * head_dim * seq_len) as f64 * (precision / 8.0)
}
let seed = estimate_kv_cache_size_bytes(1024, 6, 6, 384, 4.0);
println!("the seed prints: nanoGPT KV-Cache (1024 tokens, 4-bit): {:.1} KB  (that is KiB: {seed} bytes)", seed / 1024.0);
assert_eq!(seed, 2_359_296.0);

let nano = ModelGeometry::preset("nanogpt")?;
let real = cache_bytes(&nano, &CacheConfig::per_token(4, 64, 0), 1024, 1)?;
println!("kvq, per-token 4-bit (g64): codes {} + scales and minimums {} = {} bytes ({:.2} bits per element)",
    with_commas(real.codes as u128), with_commas(real.params as u128), with_commas(real.total() as u128),
    8.0 * real.total() as f64 / nano.elements_per_token() as f64 / 1024.0);
assert_eq!(real.codes, 2_359_296);
assert_eq!(real.params, 294_912); // 2·6·6·1024 groups × 4 bytes
assert_eq!(real.total(), 2_654_208);
'''),
md(r"""
## MHA, GQA, MQA

Take Llama's shape — 32 layers, 32 query heads, $d = 128$ — and vary only the number of KV heads:
multi-head attention (32), grouped-query attention (8, Llama-3-8B) and multi-query attention (1).
The cache shrinks in proportion to $H_{kv}$; the query heads do not appear.
"""),
code(r'''
let mut rows = Vec::new();
let mut per_kind = Vec::new();
for (kind, kv_heads) in [("MHA", 32), ("GQA", 8), ("MQA", 1)] {
    let g = ModelGeometry::new(kind, 32, 32, kv_heads, 128)?;
    assert_eq!(g.attention_kind(), kind);
    let b = full_precision_bytes(&g, 1, 1, FullPrecision::F16);
    per_kind.push(b);
    rows.push(vec![kind.to_string(), kv_heads.to_string(), with_commas(b), human(full_precision_bytes(&g, 100_000, 1, FullPrecision::F16))]);
}
print!("{}", table(&["attention", "KV heads", "fp16 bytes/token", "100k tokens"], &rows));
assert_eq!(per_kind, vec![524_288, 131_072, 16_384]);

// kvq's real model: SmolLM2-135M, 30 layers, 9 query heads sharing 3 KV heads, d = 64.
let smol = ModelGeometry::preset("smollm2-135m")?;
let smol_8k = full_precision_bytes(&smol, 8192, 1, FullPrecision::F16);
println!("SmolLM2-135M: {} bytes per token; 8192 tokens = {} bytes = {}",
    with_commas(full_precision_bytes(&smol, 1, 1, FullPrecision::F16)), with_commas(smol_8k), human(smol_8k));
assert_eq!(full_precision_bytes(&smol, 1, 1, FullPrecision::F16), 23_040);
assert_eq!(smol_8k, 180 << 20); // exactly 180 MiB
'''),
md(r"""
## Batches: what 200 concurrent prompts cost

The weights are shared by every sequence of a batch; the cache is not. The HF-transformers
experiment in the seeds found that quantizing the cache saves little for one short prompt but
a lot for **200 prompts at once**. Here is why, for Llama-3-8B (about 16 GB of weights in fp16/bf16:
8.03 billion parameters × 2 bytes) at 1024 tokens per sequence:
"""),
code(r'''
let fp16 = CacheConfig::preset("fp16")?;
let pt4 = CacheConfig::preset("per-token-4")?; // HF's quantized cache: 4 bits, groups of 64, residual 128
let kivi2 = CacheConfig::preset("kivi-2")?;
let weights = 8_030_261_248f64 * 2.0; // Llama-3-8B parameters × 2 bytes
let mut rows = Vec::new();
for (seq, batch) in [(500, 1), (1024, 1), (1024, 8), (1024, 200), (8192, 200)] {
    let b = |cfg: &CacheConfig| -> kvq::Result<u128> { Ok(cache_bytes(&llama3, cfg, seq, batch)?.total() as u128) };
    let f = b(&fp16)?;
    rows.push(vec![seq.to_string(), batch.to_string(), human(f), format!("{:.1}%", 100.0 * f as f64 / weights),
        human(b(&pt4)?), human(b(&kivi2)?)]);
}
print!("{}", table(&["tokens", "batch", "fp16 cache", "vs weights", "per-token-4", "kivi-2"], &rows));

let batch200 = cache_bytes(&llama3, &fp16, 1024, 200)?.total();
let batch200_4bit = cache_bytes(&llama3, &pt4, 1024, 200)?.total();
println!("200 × 1024 tokens: fp16 {} bytes = {}; 4-bit per-token {} bytes = {}",
    with_commas(batch200 as u128), human(batch200 as u128), with_commas(batch200_4bit as u128), human(batch200_4bit as u128));
assert_eq!(batch200, 26_843_545_600);     // 25 GiB: more than the weights
assert_eq!(batch200_4bit, 7_549_747_200); // 25 GiB × 4.5/16 = 7.03125 GiB (1024 is a multiple of the 128-token window)
assert_eq!(cache_bytes(&llama3, &fp16, 500, 1)?.total(), 65_536_000); // one short prompt: 62.5 MiB, 0.4% of the weights
'''),
md(r"""
One prompt of 500 tokens holds 62.5 MiB of cache next to 16 GB of weights: quantizing it cannot
save much. 200 prompts of 1024 tokens hold 25 GiB — more than the weights — and a 4-bit cache
cuts that to about 7 GiB. Lesson 6 comes back to the seed's GPU measurements.

## Bytes vs context, per scheme

The figure shows every cache scheme of kvq for Llama-3-8B, batch 1, with the bytes counted as
the caches really store them (codes, scales, the full-precision window, outliers). The
quantized curves bend at short contexts: there, most tokens are still in the fp16 window.
"""),
code(r'''
let contexts = [128usize, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072];
let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
for name in ["fp32", "fp16", "per-token-4", "kivi-4", "kivi-2", "kvquant-2"] {
    let cfg = CacheConfig::preset(name)?;
    let mut pts = Vec::new();
    for &s in &contexts {
        pts.push((s as f64, cache_bytes(&llama3, &cfg, s, 1)?.total() as f64));
    }
    series.push((cfg.label(), pts));
}
series.push(("guide: the weights of Llama-3-8B (16 GB in fp16)".into(), vec![(128.0, weights), (131072.0, weights)]));
loglog("KV cache bytes vs context, Llama-3-8B, batch 1", "context (tokens)", "bytes", &series)
'''),
footer("02-memory-math.toml", ["ex02_kv_bytes"], ("Lesson 3: quantization basics", "03-quantization-basics.ipynb")),
    ]
