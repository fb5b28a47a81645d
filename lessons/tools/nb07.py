from nbgen import SETUP, HELPERS, md, code, footer

def cells():
    return [
md(r"""
# Lesson 7 — The GPU: decode attention is memory-bound

During decoding, each step brings one new query per sequence, and attention must compare it with
**every** cached key and mix **every** cached value: each step reads the whole cache. On a GPU
that read, not the arithmetic, sets the time. This is why a quantized cache can make attention
*faster*, not only smaller — if the kernel reads the packed codes directly.

This lesson computes the bytes per step with `kvq::size`, the time bound they imply on an H100,
then measures kvq's CPU attention (`KvCache::attend`) over long packed caches, and ends with what
kvq's CUDA kernels measured on an H100.
"""),
code(SETUP),
code(HELPERS),
md(r"""
## Bytes per step, and the time they take

For Llama-3-8B at 100,000 tokens, one decode step of one sequence reads the whole cache of every
layer. Arithmetic intensity: each cached fp16 element (2 bytes) is used by the 4 query heads that
share its KV head, one multiply-add (2 FLOPs) each: **4 FLOPs per byte**. An H100 SXM does about
989 dense fp16 TFLOPS on 3.35 TB/s of memory bandwidth, so it needs about 295 FLOPs per byte to be
limited by compute. At 4, decode attention is memory-bound by two orders of magnitude, and its
time is about bytes / bandwidth.
"""),
code(r'''
use kvq::cache::CacheConfig;
use kvq::size::{cache_bytes, human, with_commas, ModelGeometry};

let llama3 = ModelGeometry::preset("llama-3-8b")?;
let bandwidth = 3.35e12; // H100 SXM, bytes per second
let flops_per_byte = (llama3.q_heads / llama3.kv_heads) as f64 * 2.0 / 2.0;
println!("arithmetic intensity of decode attention, fp16: {flops_per_byte} FLOPs/byte; H100 balance point: {:.0} FLOPs/byte", 989e12 / bandwidth);
assert_eq!(flops_per_byte, 4.0);

let fp16 = cache_bytes(&llama3, &CacheConfig::preset("fp16")?, 100_000, 1)?.total();
let mut rows = Vec::new();
for name in ["fp32", "fp16", "per-token-4", "kivi-4", "kivi-2", "kvquant-2"] {
    let b = cache_bytes(&llama3, &CacheConfig::preset(name)?, 100_000, 1)?.total();
    rows.push(vec![name.to_string(), with_commas(b as u128), human(b as u128),
        format!("{:.2} ms", b as f64 / bandwidth * 1e3), format!("{:.2}×", fp16 as f64 / b as f64)]);
}
println!("Llama-3-8B, 100,000 tokens, one sequence: bytes read per decode step, and the least time to read them at 3.35 TB/s");
print!("{}", table(&["cache", "bytes", "size", "time bound", "speedup bound vs fp16"], &rows));

let kivi2 = cache_bytes(&llama3, &CacheConfig::preset("kivi-2")?, 100_000, 1)?.total();
assert_eq!(fp16, 13_107_200_000);
assert_eq!(kivi2, 2_471_231_488);
assert!((fp16 as f64 / bandwidth * 1e3 - 3.91).abs() < 0.01);   // 3.9 ms per step for attention alone
assert!((kivi2 as f64 / bandwidth * 1e3 - 0.74).abs() < 0.01);  // 0.74 ms
assert!((fp16 as f64 / kivi2 as f64 - 5.30).abs() < 0.01);      // the bound is the byte ratio: 5.3×, not 8×
'''),
md(r"""
Two consequences:

- **Dequantizing first throws the gain away.** A kernel that expands the KIVI-2 cache into an fp16
  buffer and then runs ordinary attention reads the codes (0.19×), writes fp16 (1×) and reads it
  again (1×): about 2.2× the bytes of a plain fp16 cache. Only a **fused** kernel — load packed
  codes, dequantize in registers, multiply — turns fewer bytes into less time. (The seed's fake
  quantization saves neither memory nor time.)
- **The cache, not the weights, dominates at large batch.** The weights are read once per step for
  the whole batch; each sequence's cache is read separately.
"""),
code(r'''
let naive = kivi2 as f64 / fp16 as f64 + 1.0 + 1.0;
println!("dequantize-then-attend moves {naive:.2}× the bytes of an fp16 cache");
assert!((naive - 2.19).abs() < 0.01);
let batch16 = cache_bytes(&llama3, &CacheConfig::preset("fp16")?, 8192, 16)?.total();
println!("batch 16 × 8192 tokens: {} of cache read per step, against ~16 GB of fp16 weights", human(batch16 as u128));
assert_eq!(batch16, 16 << 30);
'''),
md(r"""
## A live measurement: kvq's attention on this CPU

Now the clock, on this machine. One layer shaped like Llama-3-8B's (8 KV heads, 32 query heads,
$d = 128$), filled with `n` tokens of synthetic keys and values (with a few large key channels),
then one decode query: we time `KvCache::attend` (median of 9) for an fp32, fp16, KIVI-4 and
KIVI-2 cache. `attend` reads the packed storage tile by tile — 64 tokens are dequantized into a
small buffer, used and dropped — so the cache is never expanded in memory. As a yardstick we also
time a plain read of a 256 MiB array on the same two threads.
"""),
code(r'''
use kvq::cache::{Cache, CacheShape, KvCache};
use kvq::rng::SplitMix64;
use std::time::Instant;

// Read bandwidth of this machine: sum a 256 MiB array on two threads.
let big: Vec<f32> = (0..64 << 20).map(|i| (i % 7) as f32).collect();
let mut best = f64::INFINITY;
for _ in 0..3 {
    let t0 = Instant::now();
    let s: f32 = std::thread::scope(|sc| {
        let hs: Vec<_> = big.chunks(big.len() / 2).map(|c| sc.spawn(move || c.chunks_exact(16).fold([0f32; 16], |mut a, x| { for i in 0..16 { a[i] += x[i]; } a }).iter().sum::<f32>())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    best = best.min(t0.elapsed().as_secs_f64());
    assert!(s > 0.0);
}
let read_gbs = (big.len() * 4) as f64 / best / 1e9;
drop(big);
println!("plain read bandwidth, 2 threads: {read_gbs:.1} GB/s");

let (kv_heads, d, q_heads) = (8usize, 128usize, 32usize);
let layer = ModelGeometry::new("one Llama-3-8B layer", 1, q_heads, kv_heads, d)?;
let shape = CacheShape { layers: 1, batch: 1, kv_heads, head_dim: d };
let contexts = [2048usize, 4096, 8192, 16384];
let mut rng = SplitMix64::new(7);
let maxn = contexts[contexts.len() - 1];
let keys: Vec<f32> = (0..kv_heads * maxn * d).map(|i| rng.normal() * if i % d < 4 { 10.0 } else { 1.0 }).collect();
let values: Vec<f32> = (0..kv_heads * maxn * d).map(|_| rng.normal()).collect();
let q: Vec<f32> = (0..q_heads * d).map(|_| rng.normal()).collect();
/// Rows `from..to` of every head, laid out [head][token][dim] as `append` wants them.
fn head_rows(x: &[f32], heads: usize, maxn: usize, d: usize, from: usize, to: usize) -> Vec<f32> {
    (0..heads).flat_map(|h| x[(h * maxn + from) * d..(h * maxn + to) * d].iter().copied()).collect()
}
let mut measured: Vec<(String, usize, usize, f64)> = Vec::new(); // (cache, tokens, bytes, ms)
for &n in &contexts {
    for name in ["fp32", "fp16", "kivi-4", "kivi-2"] {
        let cfg = CacheConfig::preset(name)?;
        let mut cache = Cache::new(&cfg, shape, None, None)?;
        cache.append(0, &head_rows(&keys, kv_heads, maxn, d, 0, n - 1), &head_rows(&values, kv_heads, maxn, d, 0, n - 1), n - 1)?; // the past
        cache.append(0, &head_rows(&keys, kv_heads, maxn, d, n - 1, n), &head_rows(&values, kv_heads, maxn, d, n - 1, n), 1)?;    // this step
        assert_eq!(cache.memory_bytes(), cache_bytes(&layer, &cfg, n, 1)?.total());
        let mut out = vec![0f32; q_heads * d];
        let mut times = Vec::new();
        for _ in 0..9 {
            let t0 = Instant::now();
            cache.attend(0, &q, q_heads, 1, &mut out)?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        measured.push((cfg.label(), n, cache.memory_bytes(), times[4]));
    }
}
let cells: Vec<Vec<String>> = measured.iter().map(|(c, n, b, ms)| vec![n.to_string(), c.clone(), with_commas(*b as u128),
    format!("{ms:.2}"), format!("{:.2}", *b as f64 / ms / 1e6)]).collect();
print!("{}", table(&["tokens", "cache", "bytes stored", "attend (ms)", "GB/s of cache read"], &cells));
'''),
code(r'''
let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
for name in ["fp32", "fp16", "kivi-4", "kivi-2"] {
    let label = CacheConfig::preset(name)?.label();
    series.push((label.clone(), measured.iter().filter(|m| m.0 == label).map(|m| (m.2 as f64, m.3)).collect()));
}
let (lo, hi) = (measured.iter().map(|m| m.2).min().unwrap() as f64, measured.iter().map(|m| m.2).max().unwrap() as f64);
series.push((format!("guide: reading the bytes at {read_gbs:.0} GB/s (memory-bound)"), vec![(lo, lo / read_gbs / 1e6), (hi, hi / read_gbs / 1e6)]));
loglog("kvq CPU decode attention: time vs bytes stored (one Llama-3-8B layer, 2k–16k tokens)", "bytes stored in the cache", "milliseconds per attend", &series)
'''),
md(r"""
### What the CPU shows — and why it differs from a GPU

On this CPU the quantized caches are no faster than fp16 — usually somewhat slower — although
KIVI-2 stores about 5× fewer bytes: every curve sits far above the memory-bound guide. kvq's CPU attention is
limited by **arithmetic** — unpacking, scaling and the f32 dot products, on two cores with a few
dozen GFLOPS — not by memory. Fewer bytes then buy little time, and the dequantization adds
work; the CPU decode benchmark
([`bench/results/cpu-decode-vs-llamacpp.md`](../bench/results/cpu-decode-vs-llamacpp.md)) shows the
same: kvq with KIVI caches decodes at 69–71 tokens/s against 84 with fp16 (and llama.cpp's
quantized caches are slower than its f16 cache too).

A GPU is the opposite case: ~1000 TFLOPS against 3.35 TB/s leaves the arithmetic units mostly idle
during decode, so the time follows the bytes, and a fused 2-bit kernel can approach the 5.3× bound
computed above. Prefill is different again: there many queries reuse each loaded key and value,
the arithmetic intensity grows with the prompt length, and the GPU becomes compute-bound — so a
quantized cache speeds up decode much more than prefill.

## What kvq's GPU kernels measured

`kernels/kivi.cu` quantizes and packs new tokens into KIVI's layout and runs decode attention
straight from the packed codes, on tensor cores. The rounding rule in `kvq::quant::uniform` is
specified so that the GPU produces the CPU's bytes exactly, and the benchmark checks this on every
run. The measurements (`bash bench/gpu.sh`, on an H100) are in `bench/results/gpu-attn.md`. Here
are its Llama-3-8B rows at batch 16 and 32k tokens. Read the `µs` column against the bytes: the
fused kivi-2 kernel reads 5.2× fewer bytes than PyTorch's SDPA, and is faster, but by less than
5.2×: it is bound by the instructions that unpack the codes, not by memory.
"""),
code(r'''
// (A block: evcxr cannot keep a variable that borrows another.)
let gpu_rows: Vec<String> = {
    let report = std::fs::read_to_string("../bench/results/gpu-attn.md")?;
    report.lines().filter(|l| l.starts_with("| shape") || l.starts_with("| llama3-8b | 16 | 32768")).map(String::from).collect()
};
for r in &gpu_rows {
    println!("{r}");
}
// Every kvq row of the run passed its check against the CPU cache.
assert!(gpu_rows.iter().filter(|r| r.contains("kivi")).all(|r| r.contains("bytes equal")));
// A row's µs, found by its variant (fields split at '|': the first is empty).
let (sdpa, kivi2) = {
    let micros = |variant: &str| -> f64 {
        let row = gpu_rows.iter().find(|r| r.split('|').nth(4).map(str::trim) == Some(variant)).expect("row");
        row.split('|').nth(6).unwrap().trim().parse().unwrap()
    };
    (micros("torch SDPA fp16"), micros("kivi-2 attend"))
};
println!("kivi-2 is {:.2}x faster than SDPA; its bytes alone would allow 5.24x", sdpa / kivi2);
'''),
md(r"""
## End to end, and the speed of the baseline

`kvq bench gpu-e2e` runs all of SmolLM2 on the GPU at 8,160 tokens: for each cache, the largest
batch whose cache fits 40 GiB, and greedy decode tokens/s at that batch
([`bench/results/gpu-e2e.md`](../bench/results/gpu-e2e.md)). Saved bytes become batch, and
batch becomes throughput. But a ratio is only as honest as its denominator: the file also keeps
an earlier run whose fp16 cache attended through candle's matmul–softmax–matmul (0.4× SDPA's
speed), against which kivi-2 looked 6.7× faster. The rows below are against kvq's fused fp16
kernel (0.8–0.9× SDPA's speed). The cell recomputes each ratio from the batch and step time.
"""),
code(r'''
let e2e: Vec<Vec<String>> = {
    let report = std::fs::read_to_string("../bench/results/gpu-e2e.md")?;
    // The first throughput table: from its fp16 row to the first line that is not a row.
    let mut rows = Vec::new();
    for l in report.lines().skip_while(|l| !(l.starts_with("| fp16 ") && l.contains("188,559,360"))) {
        if !l.starts_with('|') { break; }
        rows.push(l.split('|').map(|c| c.trim().to_string()).collect::<Vec<_>>());
    }
    rows
};
// Cells (the first is empty): cache, bytes a sequence, batch, × fp16 batch, GiB, fill s,
// ms a step, of it the cache, tok/s, × fp16 tok/s.
let (fp16_batch, fp16_ms): (f64, f64) = (e2e[0][3].parse()?, e2e[0][7].parse()?);
for r in &e2e {
    let (batch, ms): (f64, f64) = (r[3].parse()?, r[7].parse()?);
    let ratio = (batch / ms) / (fp16_batch / fp16_ms);
    println!("{:<28} batch {:>5} ({:.2}x)  {:>5.1} ms a step  {:>6.0} tok/s  {:.2}x fp16's tokens/s", r[1], batch, batch / fp16_batch, ms, batch / ms * 1e3, ratio);
    if r[10] != "–" {
        // The file's own ratio, recomputed from its batch and step columns.
        assert!((ratio - r[10].parse::<f64>()?).abs() < 0.02, "{} vs {}", ratio, r[10]);
    }
}
'''),
footer("07-gpu.toml", ["ex07_attention"], ("Lesson 8: choosing a configuration", "08-choosing.ipynb")),
    ]
