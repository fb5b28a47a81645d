from nbgen import SETUP, HELPERS, md, code, footer

def cells():
    return [
md(r"""
# Lesson 3 — Quantization basics: bits, groups, axes

To store a number in $b$ bits instead of 16 we keep, for each **group** of values, its minimum
$m$ and a **scale** (the step between levels), and for each value a $b$-bit code:

$$s = \frac{M - m}{2^b - 1}, \qquad q = \operatorname{round}\!\Big(\frac{x - m}{s}\Big) \in \{0, \dots, 2^b - 1\}, \qquad \hat x = m + q \cdot s .$$

This is **uniform asymmetric** quantization: $2^b$ evenly spaced levels from the group's minimum
$M$ to its maximum, so the rounding error is at most half a step, $|x - \hat x| \le s/2$.
Three choices decide how well it works: the number of **bits**, the **group size** (how many
values share one $m$ and $s$), and the **axis** along which groups run (channels of one token,
or one channel over several tokens). We try all three, first on synthetic numbers, then on real
keys and values of SmolLM2-135M — where the axis turns out to matter most.
"""),
code(SETUP),
code(HELPERS),
md(r"""
## One group by hand

`kvq::quant::QuantizedMatrix` quantizes a `tokens × channels` matrix in groups along either axis;
it is what every kvq cache is built from. kvq stores $m$ and $s$ as f16, rounded outward ($m$
down, $s$ up) so that the group's whole range stays covered.

A group $[-1, 0, 0.3, 2]$ at 2 bits: $s = 3/3 = 1$, levels $-1, 0, 1, 2$. (Dividing by $2^b = 4$
instead of $2^b - 1 = 3$ is the classic off-by-one.) Four 2-bit codes fit in one byte, least
significant bits first.
"""),
code(r'''
use kvq::quant::{Axis, QuantizedMatrix};

let x = [-1.0f32, 0.0, 0.3, 2.0];
let q2 = QuantizedMatrix::quantize(&x, 1, 4, Axis::PerToken, 4, 2)?; // 1 token × 4 channels, one group of 4, 2 bits
let mut codes = vec![0u8; 4];
kvq::quant::unpack(&q2.codes, 2, &mut codes)?;
let back = q2.dequantize();
println!("2 bits: min {} scale {} → codes {:?} (packed into the byte {:#010b}) → {:?}",
    q2.params[0].min, q2.params[0].scale, codes, q2.codes[0], back);
assert_eq!(q2.params[0].scale.to_f32(), 1.0);
assert_eq!(codes, vec![0, 1, 1, 3]);         // 0.3 → code 1 → 0.0: error 0.3 ≤ s/2 = 0.5
assert_eq!(back, vec![-1.0, 0.0, 0.0, 2.0]);
assert_eq!(q2.codes, vec![0b11_01_01_00]);   // code i in bits 2i and 2i+1
println!("bytes held: {} (1 byte of codes + 4 bytes of f16 min and scale): {:.0} bits per value for a group of 4",
    q2.bytes(), q2.effective_bits());

let q4 = QuantizedMatrix::quantize(&x, 1, 4, Axis::PerToken, 4, 4)?;
let s4 = q4.params[0].scale.to_f32();
println!("4 bits: scale {s4} (3/15 rounded up to f16), largest error {:.4}", x.iter().zip(q4.dequantize()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max));
assert!((s4 - 0.2).abs() < 1e-3);
// Going from 4 to 2 bits multiplies the step (and the error bound) by (2^4 − 1)/(2^2 − 1) = 5, not 4.
assert!((q2.params[0].scale.to_f32() / s4 - 5.0).abs() < 0.01);
'''),
md(r"""
## Bits and group size

On 2048 × 128 Gaussian numbers: each bit removed roughly doubles the error (exactly, the step
grows by $(2^{b+1}-1)/(2^b-1)$), and every element stays within half a step of its original.
The price of the groups' parameters is $32/G$ bits per element (f16 min + f16 scale): a smaller
group spans a narrower range (less error) but stores more parameters.
"""),
code(r'''
use kvq::rng::SplitMix64;

let (rows_n, cols) = (2048usize, 128usize);
let mut rng = SplitMix64::new(3);
let gauss: Vec<f32> = (0..rows_n * cols).map(|_| rng.normal()).collect();
fn rel_error(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

let mut rows = Vec::new();
let mut gauss_err = Vec::new();
for bits in 1..=8u32 {
    let q = QuantizedMatrix::quantize(&gauss, rows_n, cols, Axis::PerToken, 64, bits)?;
    let back = q.dequantize();
    // Every element is within half a step of its original.
    for t in 0..rows_n {
        for c in 0..cols {
            let i = t * cols + c;
            assert!((gauss[i] - back[i]).abs() <= q.step_at(t, c).unwrap() / 2.0 + 1e-6);
        }
    }
    let e = rel_error(&back, &gauss);
    gauss_err.push((bits as f64, e));
    rows.push(vec![bits.to_string(), format!("{e:.4}"), format!("{:.2}", q.effective_bits())]);
}
print!("{}", table(&["bits", "relative error ‖x̂−x‖/‖x‖", "bits/element (g64)"], &rows));
assert!(gauss_err.windows(2).all(|w| w[1].1 < w[0].1 * 0.6)); // each extra bit cuts the error by ~2

let mut rows = Vec::new();
let mut prev_err = 0.0;
for group in [16usize, 32, 64, 128] {
    let q = QuantizedMatrix::quantize(&gauss, rows_n, cols, Axis::PerToken, group, 4)?;
    let e = rel_error(&q.dequantize(), &gauss);
    rows.push(vec![group.to_string(), format!("{e:.4}"), format!("{:.2}", q.effective_bits())]);
    assert_eq!(q.effective_bits(), 4.0 + 32.0 / group as f64); // 6, 5, 4.5, 4.25
    assert!(e > prev_err); // bigger groups, bigger error
    prev_err = e;
}
println!();
print!("{}", table(&["group size (4 bits)", "relative error", "bits/element"], &rows));
'''),
md(r"""
## One outlier spoils its whole group

A key vector whose 63 ordinary channels lie in $[-1, 1]$ but one channel holds 14. Quantized per
token at 4 bits in one group of 64, the range is $[-1, 14]$: the step is $15/15 = 1$ and the
ordinary channels get errors up to 0.5 — a quarter of their whole range. Without the outlier the
step would be $2/15$.
"""),
code(r'''
let mut v: Vec<f32> = (0..64).map(|i| -1.0 + 2.0 * i as f32 / 63.0).collect();
let ordinary = v[5];
v[5] = 14.0; // one outlier channel
let with = QuantizedMatrix::quantize(&v, 1, 64, Axis::PerToken, 64, 4)?;
let mut clean = v.clone();
clean[5] = ordinary;
let without = QuantizedMatrix::quantize(&clean, 1, 64, Axis::PerToken, 64, 4)?;
/// Largest error over every channel but the outlier's (5).
fn err(q: &QuantizedMatrix, x: &[f32]) -> f32 {
    x.iter().zip(q.dequantize()).enumerate().filter(|(i, _)| *i != 5).map(|(_, (a, b))| (a - b).abs()).fold(0f32, f32::max)
}
println!("step with the outlier {}, largest error of the other 63 channels {:.3}", with.params[0].scale, err(&with, &v));
println!("step without it       {:.4}, largest error {:.3}", without.params[0].scale.to_f32(), err(&without, &clean));
assert_eq!(with.params[0].scale.to_f32(), 1.0);
assert!(err(&with, &v) <= 0.5 && err(&with, &v) > 0.4);
assert!((without.params[0].scale.to_f32() - 2.0 / 15.0).abs() < 1e-3);
'''),
md(r"""
## Real keys and values: SmolLM2-135M

`data/smollm2-kv-sample.kvs` holds keys (after RoPE, as attention sees them, and before RoPE)
and values of SmolLM2-135M, recorded by `kvq capture` on 512 tokens of `data/tour.txt`: layers 0,
15 and 29, all 3 KV heads, head dimension 64. `kvq::sample::KvSample` reads it.

The map below shows $|k|$ for layer 15, KV head 0. A few **channels** (columns) are large at
almost every token: outlier channels, a known property of keys in trained LLMs.
"""),
code(r'''
use kvq::sample::KvSample;

let sample = KvSample::from_bytes(&std::fs::read("../data/smollm2-kv-sample.kvs")?)?;
let (n, d) = (sample.header.tokens, sample.header.head_dim);
println!("{}\n{} tokens × head dim {}, {} arrays; source: {}", sample.header.model, n, d, sample.header.arrays.len(), sample.header.source);
let keys15: Vec<f32> = sample.get(15, 0, "keys").expect("layer 15, head 0").to_vec();

// max |k| over bins of 16 tokens, per channel
let (bins, per) = (32usize, n / 32);
let mut cell = vec![0f32; bins * d];
for t in 0..n {
    for c in 0..d {
        let i = (t / per) * d + c;
        cell[i] = cell[i].max(keys15[t * d + c].abs());
    }
}
let top = cell.iter().copied().fold(0f32, f32::max);
figure(820, 430, |root| {
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("|key|, SmolLM2-135M layer 15, KV head 0 (darkest = {top:.1})"), ("sans-serif", 18))
        .margin(12).x_label_area_size(40).y_label_area_size(56)
        .build_cartesian_2d(0..d as i32, 0..n as i32)?;
    chart.configure_mesh().disable_mesh().x_desc("channel").y_desc("token").draw()?;
    chart.draw_series((0..bins * d).map(|i| {
        let (b, c) = (i / d, i % d);
        let v = (cell[i] / top) as f64;
        let mix = |lo: f64, hi: f64| (lo * (1.0 - v) + hi * v) as u8;
        Rectangle::new([(c as i32, (b * per) as i32), (c as i32 + 1, ((b + 1) * per) as i32)],
            RGBColor(mix(255.0, 8.0), mix(255.0, 48.0), mix(255.0, 107.0)).filled())
    }))?;
    Ok(())
})
'''),
md(r"""
How uneven are the channels? For each head: the root-mean-square of the largest channel (over
the 512 tokens) divided by that of the median channel, for keys and for values.
"""),
code(r'''
/// RMS of the largest channel over the median channel's, and which channel it is.
fn channel_spread(a: &[f32], n: usize, d: usize) -> (f32, usize) {
    let mut rms: Vec<(f32, usize)> = (0..d).map(|c| (((0..n).map(|t| a[t * d + c].powi(2)).sum::<f32>() / n as f32).sqrt(), c)).collect();
    rms.sort_by(|x, y| y.0.total_cmp(&x.0));
    (rms[0].0 / rms[d / 2].0, rms[0].1)
}
let mut rows = Vec::new();
for layer in [0, 15, 29] {
    for head in 0..3 {
        let (ks, kc) = channel_spread(sample.get(layer, head, "keys").unwrap(), n, d);
        let (vs, vc) = channel_spread(sample.get(layer, head, "values").unwrap(), n, d);
        assert!(ks > 3.0, "layer {layer} head {head}: keys have an outlier channel");
        rows.push(vec![layer.to_string(), head.to_string(), format!("{ks:.1}× (channel {kc})"), format!("{vs:.1}× (channel {vc})")]);
    }
}
print!("{}", table(&["layer", "KV head", "keys: largest / median channel RMS", "values"], &rows));
'''),
md(r"""
Every head's keys have a channel 3.6 to 10 times larger than the median one. The values of layers
15 and 29 are more even (mostly under 3×), but layer 0's values have strong channels too.
"""),
md(r"""
## Per token or per channel?

Quantize each head's 512 × 64 keys and values at 2 and 4 bits, in groups of 64 either **per
token** (a group = the 64 channels of one token) or **per channel** (a group = one channel over
64 consecutive tokens). Both use the same number of groups, so the same bytes.
`kvq::analysis::quantize_head` runs the library's own quantizer and reports the relative error.
"""),
code(r'''
use kvq::analysis::{quantize_head, HeadData, Method, ViewConfig};

fn head_error(data: &[f32], keys: bool, n: usize, d: usize, axis: Axis, bits: u32) -> kvq::Result<(f64, usize)> {
    let h = HeadData { keys, data, pre_rope: None, tokens: n, dim: d };
    let v = quantize_head(&h, &ViewConfig { method: Method::Uniform { axis }, bits, group: 64, residual: 0, outlier_fraction: 0.0 })?;
    Ok((v.relative_error, v.bytes))
}
let mut rows = Vec::new();
for layer in [0, 15, 29] {
    for head in 0..3 {
        let mut row = vec![format!("{layer}/{head}")];
        for kind in ["keys", "values"] {
            let data = sample.get(layer, head, kind).unwrap();
            for bits in [2u32, 4] {
                let (tok, b1) = head_error(data, kind == "keys", n, d, Axis::PerToken, bits)?;
                let (ch, b2) = head_error(data, kind == "keys", n, d, Axis::PerChannel, bits)?;
                assert_eq!(b1, b2); // same bytes either way
                if kind == "keys" {
                    assert!(ch < tok, "layer {layer} head {head}, {bits} bits: per-channel keys should win");
                }
                row.push(format!("{tok:.3} / {ch:.3}"));
            }
        }
        rows.push(row);
    }
}
println!("relative error, per token / per channel (groups of 64):");
print!("{}", table(&["layer/head", "keys 2-bit", "keys 4-bit", "values 2-bit", "values 4-bit"], &rows));
'''),
code(r'''
// Mean relative error over the 9 heads vs bits, and the Gaussian numbers from above.
let mut series: Vec<(String, Vec<(f64, f64)>)> = vec![("Gaussian N(0,1), per token".into(), gauss_err[1..].to_vec())];
for (kind, axis, label) in [("keys", Axis::PerToken, "keys, per token"), ("keys", Axis::PerChannel, "keys, per channel"),
                            ("values", Axis::PerToken, "values, per token"), ("values", Axis::PerChannel, "values, per channel")] {
    let mut pts = Vec::new();
    for bits in [2u32, 3, 4, 6, 8] {
        let mut e = 0.0;
        for layer in [0, 15, 29] {
            for head in 0..3 {
                e += head_error(sample.get(layer, head, kind).unwrap(), kind == "keys", n, d, axis, bits)?.0 / 9.0;
            }
        }
        pts.push((bits as f64, e));
    }
    series.push((format!("SmolLM2 {label}"), pts));
}
loglog("Quantization error vs bits (groups of 64)", "bits per code", "relative error ‖x̂ − x‖ / ‖x‖", &series)
'''),
md(r"""
### What this shows

- **Keys** have outlier channels (the map, and a largest channel several times the median).
  Per token, every group contains those channels and must stretch its range over them; per
  channel, an outlier channel gets its own scale and the ordinary channels keep small ones. At
  the same bytes, per-channel groups cut the key error by a factor of 2–3 in every head. This is
  why KIVI and KVQuant quantize keys per channel (lessons 4 and 5).
- **Values** are more even, except in layer 0, where per-channel groups help them the most. On
  this sample per-channel groups lower the values' element error too, but the reasons KIVI gives for quantizing values **per token** are elsewhere: the attention
  output is a weighted sum of value *rows*, so a per-token group keeps each token's error in its
  own row, and a per-token group is complete as soon as the token arrives, while a per-channel
  group must wait for $G$ tokens. Lesson 4 measures what matters in the end: the model's output.
- Fewer bits: each bit removed roughly doubles the error, on real data as on Gaussian numbers.
"""),
footer("03-quantization-basics.toml", ["ex03_uniform", "ex04_packing"], ("Lesson 4: KIVI", "04-kivi.ipynb")),
    ]
