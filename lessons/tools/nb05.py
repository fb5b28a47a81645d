from nbgen import SETUP, HELPERS, QUALITY, md, code, footer

def cells():
    return [
md(r"""
# Lesson 5 — KVQuant: pre-RoPE keys, learned levels, sparse outliers, the attention sink

KVQuant (Hooper et al., 2024) pushes the cache to 2–3 bits with four ideas, each aimed at a
property of real keys and values:

1. **pre-RoPE keys**: quantize keys *before* the rotary position embedding, where each channel
   keeps a stable range, and rotate them when reading;
2. **non-uniform levels** learned offline on calibration data (k-means), instead of evenly
   spaced ones;
3. **dense-and-sparse** storage: the ~1% most extreme values of each vector are kept exactly, as
   sparse f16, so they no longer stretch the range of the rest;
4. an **attention sink**: the first token, which many heads attend to heavily, stays in fp16.

kvq implements all four (`CacheConfig::kvquant(bits, outlier_fraction)`, presets `kvquant-4/3/2`,
calibrated with `KvQuantCalibration::fit` or `Llama::calibrate_kvquant`). We look at each one on
real data, then remove them one at a time on SmolLM2-135M and compare with KIVI at equal bits.
"""),
code(SETUP),
code(HELPERS),
md(r"""
## 1. Pre-RoPE keys

RoPE rotates each pair of key channels by an angle proportional to the position (SmolLM2's GGUF
pairs channels $(2i, 2i+1)$, with frequency $\theta^{-2i/d}$, $\theta = 100{,}000$). A channel with a
steady range before RoPE is mixed with its partner by a different angle at every position, which
blurs the per-channel statistics that per-channel quantization relies on — most for the fast
(low-index) pairs. The sample of lesson 3 holds both versions of the keys; we quantize each per
channel at 2 bits (groups of 64 tokens) and compare.
"""),
code(r'''
use kvq::analysis::{quantize_head, HeadData, Method, ViewConfig};
use kvq::quant::Axis;
use kvq::sample::KvSample;

let sample = KvSample::from_bytes(&std::fs::read("../data/smollm2-kv-sample.kvs")?)?;
let (n, d) = (sample.header.tokens, sample.header.head_dim);
fn per_channel(data: &[f32], n: usize, d: usize, bits: u32) -> kvq::Result<kvq::analysis::QuantView> {
    let h = HeadData { keys: true, data, pre_rope: None, tokens: n, dim: d };
    quantize_head(&h, &ViewConfig { method: Method::Uniform { axis: Axis::PerChannel }, bits, group: 64, residual: 0, outlier_fraction: 0.0 })
}
let mut rows = Vec::new();
for layer in [0, 15, 29] {
    for head in 0..3 {
        let post = per_channel(sample.get(layer, head, "keys").unwrap(), n, d, 2)?.relative_error;
        let pre = per_channel(sample.get(layer, head, "keys_pre_rope").unwrap(), n, d, 2)?.relative_error;
        assert!(pre < post, "layer {layer} head {head}");
        rows.push(vec![format!("{layer}/{head}"), format!("{post:.3}"), format!("{pre:.3}"), format!("{:.0}%", 100.0 * (1.0 - pre / post))]);
    }
}
print!("{}", table(&["layer/head", "after RoPE", "before RoPE", "error removed"], &rows));
let post15 = per_channel(sample.get(15, 0, "keys").unwrap(), n, d, 2)?.channel_rms_error;
let pre15 = per_channel(sample.get(15, 0, "keys_pre_rope").unwrap(), n, d, 2)?.channel_rms_error;
'''),
code(r'''
let top = post15.iter().chain(&pre15).copied().fold(0f32, f32::max) as f64;
figure(820, 400, |root| {
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Per-channel RMS error, 2-bit per-channel keys, layer 15 head 0", ("sans-serif", 18))
        .margin(12).x_label_area_size(40).y_label_area_size(60)
        .build_cartesian_2d(0f64..64f64, 0f64..top * 1.1)?;
    chart.configure_mesh().x_desc("channel (pairs 2i, 2i+1 rotate together; low i = fast rotation)").y_desc("RMS error")
        .x_label_formatter(&|x| format!("{x:.0}")).draw()?;
    for (i, (name, e)) in [("keys after RoPE", &post15), ("keys before RoPE", &pre15)].into_iter().enumerate() {
        let c = COLORS[i];
        chart.draw_series(LineSeries::new(e.iter().enumerate().map(|(j, &x)| (j as f64 + 0.5, x as f64)), c.stroke_width(2)))?
            .label(name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK)
        .position(SeriesLabelPosition::UpperMiddle).draw()?;
    Ok(())
})
'''),
md(r"""
Before RoPE, the fast-rotating channels (the left half) have much smaller errors; the slow ones
(the right half) barely rotate over 512 tokens, so both versions agree there.

The cost of pre-RoPE keys is arithmetic, not memory: the cache must rotate each dequantized key
by its position at every read (kvq's `Cache` does it tile by tile, with the model's own `Rope`).

## 2. Non-uniform levels from calibration

KVQuant normalizes each key channel with a centre and scale measured **offline** on calibration
data (so nothing per token needs storing for keys), normalizes each value vector per token, and
learns the $2^b$ levels of each layer by k-means over the normalized numbers. (The Russian seed says
KVQuant finds "optimal levels for each channel of the keys"; more precisely, the per-channel part is
the normalization, and one non-uniform codebook serves a whole layer. KVQuant also weights its
k-means by each value's sensitivity — Fisher information; kvq uses plain k-means.) kvq's
`Llama::calibrate_kvquant` records keys (before RoPE) and values on a text —
`data/calibration.txt`, which no evaluation uses — and fits them with `KvQuantCalibration::fit`.
"""),
code(r'''
use candle_core::Device;
use kvq::cache::{CacheConfig, KvCache, KvQuantCalibration};
use kvq::gguf::{self, WeightFormat};
use kvq::quant::Codebook;
use std::sync::Arc;
use std::time::Instant;

let (smol, tok, _) = gguf::load(&gguf::find_model(None)?, WeightFormat::AsStored, &Device::Cpu)?;
let cal_ids = tok.encode(&std::fs::read_to_string("../data/calibration.txt")?)?;
let t0 = Instant::now();
let calib3 = smol.calibrate_kvquant(&cal_ids, 3, 0.01)?;
println!("calibrated 3-bit KVQuant on {} tokens of data/calibration.txt in {:.1} s", cal_ids.len(), t0.elapsed().as_secs_f64());
let l15 = calib3.layers[15].clone();
let uniform3 = Codebook::uniform(-1.0, 1.0, 3)?;
println!("layer 15 key levels (k-means): {:?}", l15.key_codebook.levels().iter().map(|x| format!("{x:+.3}")).collect::<Vec<_>>());
println!("layer 15 value levels:         {:?}", l15.value_codebook.levels().iter().map(|x| format!("{x:+.3}")).collect::<Vec<_>>());
println!("uniform levels:                {:?}", uniform3.levels().iter().map(|x| format!("{x:+.3}")).collect::<Vec<_>>());
'''),
md(r"""
The learned levels crowd towards the centre, where normalized keys and values are dense. Does
that pay off on data the calibration has not seen? Normalize the sample's pre-RoPE keys of layer
15, head 0 (recorded on `tour.txt`) with the calibrated centres and scales, and quantize them with
both sets of 8 levels:
"""),
code(r'''
let keys_pre: Vec<f32> = sample.get(15, 0, "keys_pre_rope").unwrap().to_vec();
let mut normalized = Vec::new();
for t in 0..n {
    for c in 0..d {
        // head 0 → the first d entries of the layer's per-(head, channel) centre and scale
        let x = (keys_pre[t * d + c] - l15.key_center[c]) / l15.key_scale[c];
        if x.abs() <= 1.0 {
            normalized.push(x); // beyond ±1 the value is an outlier, kept exactly
        }
    }
}
fn mse(xs: &[f32], cb: &Codebook) -> f64 {
    xs.iter().map(|&x| (x - cb.decode(cb.encode(x)).unwrap()) as f64).map(|e| e * e).sum::<f64>() / xs.len() as f64
}
let (e_kmeans, e_uniform) = (mse(&normalized, &l15.key_codebook), mse(&normalized, &uniform3));
println!("{} of {} normalized keys within ±1; mean squared error: k-means levels {:.5}, uniform levels {:.5} ({:.0}% less)",
    normalized.len(), n * d, e_kmeans, e_uniform, 100.0 * (1.0 - e_kmeans / e_uniform));
assert!(e_kmeans < e_uniform);

let bins = 50usize;
let mut hist = vec![0usize; bins];
for &x in &normalized {
    hist[(((x + 1.0) / 2.0 * bins as f32) as usize).min(bins - 1)] += 1;
}
let hmax = *hist.iter().max().unwrap() as f64;
figure(820, 400, |root| {
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Normalized pre-RoPE keys (layer 15, head 0) and the 8 levels of 3-bit codes", ("sans-serif", 18))
        .margin(12).x_label_area_size(40).y_label_area_size(60)
        .build_cartesian_2d(-1.05f64..1.05f64, 0f64..hmax * 1.15)?;
    chart.configure_mesh().disable_mesh().x_desc("normalized key value").y_desc("count")
        .y_label_formatter(&|y| format!("{y:.0}")).draw()?;
    chart.draw_series(hist.iter().enumerate().map(|(i, &h)| {
        let x0 = -1.0 + 2.0 * i as f64 / bins as f64;
        Rectangle::new([(x0, 0.0), (x0 + 2.0 / bins as f64, h as f64)], RGBColor(200, 210, 225).filled())
    }))?;
    for (k, (name, cb)) in [("k-means levels (calibrated)", &l15.key_codebook), ("uniform levels", &uniform3)].into_iter().enumerate() {
        let c = COLORS[k + 1];
        let y = hmax * (1.1 - 0.08 * k as f64);
        chart.draw_series(cb.levels().iter().map(|&l| PathElement::new(vec![(l as f64, 0.0), (l as f64, y)], c.stroke_width(2))))?
            .label(name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.9)).border_style(BLACK).draw()?;
    Ok(())
})
'''),
md(r"""
## 3. Dense-and-sparse outliers

kvq keeps $\lceil 1\% \cdot d \rceil$ values of each vector exactly, each as an f16 value plus a
u16 index (4 bytes). With $d = 128$ that is 2 outliers, 8 bytes per vector — half a bit per element
at 2-bit codes — and the remaining dense part is quantized over a much narrower range.
"""),
code(r'''
use kvq::quant::outliers::{outlier_count, split_by_magnitude, OUTLIER_BYTES};
use kvq::size::{cache_bytes, with_commas, ModelGeometry};

assert_eq!(outlier_count(0.01, 128) * OUTLIER_BYTES, 8);
assert_eq!(outlier_count(0.01, 64), 1); // SmolLM2's head dim: one outlier per vector
let v = [0.3f32, -0.8, 14.0, 0.1, -0.5, 0.9, -2.5, 0.2];
let (dense, sparse) = split_by_magnitude(&v, 2, 0.0)?;
println!("{v:?} → dense {dense:?} + sparse {:?} at {:?}", sparse.value, sparse.index);

// On the sample: KVQuant at 2 bits (calibrated on the same head), without and with 1% outliers.
fn kvquant_error(s: &KvSample, layer: usize, head: usize, kind: &str, frac: f32) -> kvq::Result<f64> {
    let (n, d) = (s.header.tokens, s.header.head_dim);
    let h = HeadData {
        keys: kind == "keys", data: s.get(layer, head, kind).unwrap(),
        pre_rope: Some((s.get(layer, head, "keys_pre_rope").unwrap(), s.header.rope_theta, kvq::rope::RopeStyle::Interleaved)),
        tokens: n, dim: d,
    };
    Ok(quantize_head(&h, &ViewConfig { method: Method::KvQuant, bits: 2, group: 32, residual: 0, outlier_fraction: frac })?.relative_error)
}
let mut rows = Vec::new();
for layer in [0, 15, 29] {
    for head in 0..3 {
        let mut row = vec![format!("{layer}/{head}")];
        for kind in ["keys", "values"] {
            let (e0, e1) = (kvquant_error(&sample, layer, head, kind, 0.0)?, kvquant_error(&sample, layer, head, kind, 0.01)?);
            assert!(e1 < e0, "{kind}, layer {layer} head {head}");
            row.push(format!("{e0:.3} → {e1:.3}"));
        }
        rows.push(row);
    }
}
println!("2-bit KVQuant relative error, no outliers → 1% outliers:");
print!("{}", table(&["layer/head", "keys", "values"], &rows));

// What kvquant-2 stores for Llama-3-8B (d = 128): 2.625 bits per element.
let llama3 = ModelGeometry::preset("llama-3-8b")?;
let b = cache_bytes(&llama3, &CacheConfig::preset("kvquant-2")?, 100_000, 1)?;
let bits = 8.0 * b.total() as f64 / (llama3.elements_per_token() * 100_000) as f64;
println!("Llama-3-8B, 100k tokens, kvquant-2: {} bytes ({:.1}% of fp16), {bits:.3} bits/element: codes {}, per-token value scales {}, outliers {}, sink {}, constants {}",
    with_commas(b.total() as u128), 100.0 * b.total() as f64 / 13_107_200_000.0, b.codes, b.params, b.outliers, b.sink, b.constants);
assert_eq!(b.total(), 2_150_641_152);
assert!((bits - 2.625).abs() < 0.001);
'''),
md(r"""
## 4. The attention sink

Many heads park a large share of their attention on the **first token**, whatever it says: an
"attention sink". An error in its key shifts the whole softmax, an error in its value enters
almost every output, so KVQuant keeps it in fp16. One token costs nothing: 131,072 bytes for all
of Llama-3-8B.

kvq's cache API does not expose attention weights, but the `KvCache` trait makes them easy to
observe: the wrapper below hands every call to an fp32 cache and, in `attend`, recomputes the
softmax of the last 64 queries to measure the weight they give token 0.
"""),
code(r'''
use kvq::cache::{Cache, CacheInfo, CacheShape};
use kvq::size::Bytes;

/// An fp32 cache that records, per layer, the mean attention the last queries pay to token 0.
struct SinkProbe { inner: Cache, share: Vec<f64> }

impl KvCache for SinkProbe {
    fn config(&self) -> &CacheConfig { self.inner.config() }
    fn shape(&self) -> CacheShape { self.inner.shape() }
    fn wants_pre_rope_keys(&self) -> bool { self.inner.wants_pre_rope_keys() }
    fn seq_len(&self) -> usize { self.inner.seq_len() }
    fn set_padding(&mut self, rows: &[usize]) -> kvq::Result<()> { self.inner.set_padding(rows) }
    fn padding(&self) -> &[usize] { self.inner.padding() }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], tokens: usize) -> kvq::Result<()> { self.inner.append(layer, k, v, tokens) }
    fn attend(&mut self, layer: usize, q: &[f32], q_heads: usize, tokens: usize, out: &mut [f32]) -> kvq::Result<()> {
        let (keys, _) = self.inner.materialize(layer)?; // [kv_head][token][dim], after RoPE (batch 1)
        let CacheShape { kv_heads, head_dim: d, .. } = self.inner.shape();
        let n = keys.len() / (kv_heads * d);
        let (mut total, mut count) = (0.0, 0);
        for h in 0..q_heads {
            let k = &keys[(h / (q_heads / kv_heads)) * n * d..][..n * d];
            for i in tokens.saturating_sub(64)..tokens {
                let pos = n - tokens + i; // causal: this query sees keys 0..=pos
                let qv = &q[(h * tokens + i) * d..][..d];
                let s: Vec<f32> = (0..=pos).map(|j| k[j * d..][..d].iter().zip(qv).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()).collect();
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = s.iter().map(|x| (x - m).exp()).sum();
                total += ((s[0] - m).exp() / z) as f64;
                count += 1;
            }
        }
        self.share[layer] = total / count as f64;
        self.inner.attend(layer, q, q_heads, tokens, out)
    }
    fn materialize(&self, layer: usize) -> kvq::Result<(Vec<f32>, Vec<f32>)> { self.inner.materialize(layer) }
    fn bytes(&self) -> Bytes { self.inner.bytes() }
    fn info(&self) -> CacheInfo { self.inner.info() }
    fn select_rows(&mut self, rows: &[usize]) -> kvq::Result<()> { self.inner.select_rows(rows) }
    fn reset(&mut self) { self.inner.reset() }
}

let mut ids = tok.encode(&std::fs::read_to_string("../data/tour.txt")?)?;
ids.truncate(256);
let mut probe = SinkProbe { inner: smol.new_cache(&CacheConfig::preset("fp32")?, 1, None)?, share: vec![0.0; smol.config.layers] };
smol.forward(&ids, 1, &mut probe, false)?;
let uniform: f64 = (192..256).map(|p| 1.0 / (p + 1) as f64).sum::<f64>() / 64.0; // if attention were spread evenly
let deep = probe.share[12..].iter().sum::<f64>() / 18.0;
println!("share of attention on token 0, per layer: {:?}", probe.share.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>());
println!("layers 12–29: {:.0}% on average; an even spread would give {:.2}%", 100.0 * deep, 100.0 * uniform);
assert!(deep > 0.2 && deep > 50.0 * uniform);
'''),
md(r"""
In the first layers attention is spread out, but from layer 12 on, a quarter to a half of all
attention lands on token 0 — one token out of two hundred or more.

## KVQuant on the model, one idea at a time, and against KIVI

`kvq::eval::evaluate` streams 256 tokens of `data/tour.txt` through SmolLM2-135M with each
cache (8 tokens at a time) and compares with an fp32 cache. KVQuant caches are calibrated on
`data/calibration.txt`. Every cache here uses past-only quantization (lesson 6), so the
comparison is about storage alone. KIVI runs with no window ($R = 0$), as KVQuant has none.
"""),
code(r'''
use kvq::cache::LayerSamples;
use kvq::eval::evaluate;

let t0 = Instant::now();
let mut caches: Vec<(String, Box<dyn KvCache>)> = Vec::new();
fn kvquant(bits: u8) -> CacheConfig {
    CacheConfig { past_only: true, ..CacheConfig::kvquant(bits, 0.01) }
}
for bits in [4u8, 3, 2] {
    let calib = Arc::new(if bits == 3 { calib3.clone() } else { smol.calibrate_kvquant(&cal_ids, bits, 0.01)? });
    caches.push((format!("kvquant-{bits}"), Box::new(smol.new_cache(&kvquant(bits), 1, Some(calib.clone()))?)));
    if bits == 2 {
        let no_sink = CacheConfig { sink_tokens: 0, ..kvquant(2) };
        caches.push(("kvquant-2, no sink".into(), Box::new(smol.new_cache(&no_sink, 1, Some(calib))?)));
        let no_outliers = CacheConfig { past_only: true, ..CacheConfig::kvquant(2, 0.0) };
        let calib0 = Arc::new(smol.calibrate_kvquant(&cal_ids, 2, 0.0)?);
        caches.push(("kvquant-2, no outliers".into(), Box::new(smol.new_cache(&no_outliers, 1, Some(calib0))?)));
        // Keys after RoPE: record them so, and calibrate on them.
        let calib_post = {
            let mut rec = smol.new_cache(&CacheConfig::preset("fp32")?, 1, None)?;
            smol.forward(&cal_ids, 1, &mut rec, false)?;
            let stored: Vec<(Vec<f32>, Vec<f32>)> = (0..smol.config.layers).map(|l| rec.materialize_stored(l)).collect::<kvq::Result<_>>()?;
            let samples: Vec<LayerSamples> = stored.iter().map(|(k, v)| LayerSamples { keys: k, values: v, tokens: cal_ids.len() }).collect();
            KvQuantCalibration::fit(&samples, smol.config.kv_heads, smol.config.head_dim, 2, 0.01, false)?
        };
        let post = CacheConfig { pre_rope: false, ..kvquant(2) };
        caches.push(("kvquant-2, keys after RoPE".into(), Box::new(smol.new_cache(&post, 1, Some(Arc::new(calib_post)))?)));
    }
}
for bits in [3u8, 2] {
    caches.push((format!("kivi-{bits} (R = 0)"), Box::new(smol.new_cache(&CacheConfig { past_only: true, ..CacheConfig::kivi(bits, bits, 32, 0) }, 1, None)?)));
}
println!("calibrations: {:.1} s", t0.elapsed().as_secs_f64());
let t0 = Instant::now();
let mut reference = smol.new_cache(&CacheConfig::preset("fp32")?, 1, None)?;
let (r, rows) = evaluate(&smol, &ids, ("fp32", &mut reference), &mut caches, 8, |_, _| {})?;
println!("evaluation of {} caches on {} tokens: {:.1} s", rows.len(), ids.len(), t0.elapsed().as_secs_f64());
let mut cells = Vec::new();
for row in std::iter::once(&r).chain(&rows) {
    cells.push(vec![row.cache.clone(), format!("{:.2}", row.effective_bits), format!("{:.3}", row.ppl),
        format!("{:+.1}%", 100.0 * (row.ppl / r.ppl - 1.0)), format!("{:.4}", row.kl), format!("{:.1}%", 100.0 * row.top1_agreement)]);
}
print!("{}", table(&["cache", "bits/element", "PPL", "ΔPPL", "KL vs fp32", "top-1 agree"], &cells));
'''),
code(r'''
// rows: kvquant-4, kvquant-3, kvquant-2, no sink, no outliers, keys after RoPE, kivi-3, kivi-2
fn kl_of(rows: &[kvq::eval::EvalRow], name: &str) -> f64 {
    rows.iter().find(|r| r.cache == name).map(|r| r.kl).unwrap()
}
assert!(kl_of(&rows, "kvquant-2") > kl_of(&rows, "kvquant-3") && kl_of(&rows, "kvquant-3") > kl_of(&rows, "kvquant-4"));
assert!(kl_of(&rows, "kivi-2 (R = 0)") > kl_of(&rows, "kivi-3 (R = 0)"));
// At about equal bits per element, KVQuant is closer to fp32: kvquant-3 vs kivi-2, kvquant-4 vs kivi-3.
assert!(kl_of(&rows, "kvquant-3") < kl_of(&rows, "kivi-2 (R = 0)") && kl_of(&rows, "kvquant-4") < kl_of(&rows, "kivi-3 (R = 0)"));
for ablation in ["kvquant-2, no sink", "kvquant-2, no outliers", "kvquant-2, keys after RoPE"] {
    println!("{ablation}: KL {:.4} vs {:.4} with everything", kl_of(&rows, ablation), kl_of(&rows, "kvquant-2"));
    assert!(kl_of(&rows, ablation) > kl_of(&rows, "kvquant-2"), "{ablation} should be worse than kvquant-2");
}
let series = vec![
    ("KVQuant 4, 3, 2 bits".to_string(), rows[0..3].iter().map(|r| (r.effective_bits, r.kl)).collect::<Vec<_>>()),
    ("KIVI 3 and 2 bits, no window".to_string(), rows[6..8].iter().map(|r| (r.effective_bits, r.kl)).collect()),
];
loglog("KL from fp32 vs bits per element (SmolLM2-135M, 256 tokens)", "bits per element (everything counted)", "KL (nats)", &series)
'''),
md(r"""
### Reading the result

- Each of KVQuant's ideas matters at 2 bits: removing the sink, the outliers or the pre-RoPE
  keys each makes the cache worse than the full method (the table's three ablation rows).
- **At equal bits per element, on this short text** — the figure — KVQuant is ahead (the 8k measurement below reverses this at 4 bits): kvquant-3 stores about as
  many bits per element as kivi-2 and is several times closer to fp32, and kvquant-4 beats kivi-3
  the same way. The code bits alone mislead: with $d = 64$, KIVI's f16 scale and minimum per 32
  values cost a whole extra bit per element (kivi-2 stores about 3.8 bits here, its codes 2), while
  KVQuant's key scales are calibrated constants and its per-token value scales and outliers cost less.
- At equal *code* bits the comparison flatters KIVI, which spends the extra bit on its scales;
  even so, 2-bit KVQuant is closer to fp32 in KL than 2-bit KIVI here.
- The price is a calibration pass on representative data, done once per model; KIVI needs none.
"""),
md(r"""
## Measured at scale: the picture changes

The comparison above ran 256 tokens of the tour's text. `bench/results/quality.md` (written by
`bash bench/quality.sh`) streams 8192 tokens of two other documents through every cache. Read its
8k table: KVQuant is calibrated *once*, on `data/calibration.txt` (461 tokens of a short story),
and the evaluation text is unlike it.
"""),
code(QUALITY),
code(r'''
let q8k = quality_rows(8192);
let wanted = ["fp16", "kvquant-4", "kvquant-3", "kvquant-2", "kvquant-3:outliers=0:sink=0", "kvquant-2:outliers=0:sink=0", "kivi-4", "kivi-4:group=128", "kivi-2"];
let kv_rows: Vec<QualityRow> = q8k.iter().filter(|r| r.tool == "kvq" && wanted.contains(&r.cache.as_str())).cloned().collect();
print_quality(&kv_rows);
{
    // (A block: evcxr cannot keep a closure that borrows a variable.)
    let dppl = |c: &str| quality_row(&q8k, "kvq", c).dppl;
    // Outliers and the sink still pay for themselves...
    assert!(dppl("kvquant-3") < dppl("kvquant-3:outliers=0:sink=0") && dppl("kvquant-2") < dppl("kvquant-2:outliers=0:sink=0"));
    // ...but at 4 bits KIVI, with no calibration at all, is far closer to fp16.
    assert!(dppl("kivi-4") < dppl("kvquant-4"));
}
'''),
md(r"""
### Reading the measurement

- On long text unlike the calibration text, **kvquant-4 loses about 6.6% of perplexity at 8k, kivi-4
  0.7%**. The earlier ranking came from a short text close to the calibration text.
- The cause is the calibration: keys are normalized by per-channel ranges fixed offline, and both
  codebooks are fitted offline. The report's notes measure it on 1024 tokens of *Alice*:
  kvquant-4 costs +7.95% calibrated on the default text, +2.7% calibrated on 512 tokens of
  *Paradise Lost* (another text, still not the evaluated one), and +2.0% calibrated on *Alice*
  itself — the best calibration can do here, still worse than kivi-4's +0.5% on the same run.
- So: calibrate on much more, and more varied, text (the paper uses 16 × 2048 tokens), or keep a
  per-group dynamic range for the keys. `kvq ppl --calibration FILE --calibration-tokens N` is
  the experiment.
- Outliers and the sink still help: without them kvquant-3 and kvquant-2 are much worse.
"""),
footer("05-kvquant.toml", ["ex06_outliers"], ("Lesson 6: HF transformers and WKVQuant", "06-hf-and-wkvquant.ipynb")),
    ]
