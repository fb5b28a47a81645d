//! `kvq bench attn` (feature `cuda`): decode attention over KIVI's packed cache on the
//! GPU, side by side with fp16 attention through candle (and PyTorch SDPA, from the
//! JSON that bench/peers/sdpa_attn.py writes in the same device call). Every row is
//! checked against the CPU reference in the same run.

use crate::table::Table;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use kvq::cache::{Cache, CacheConfig, CacheShape, FullPrecision, KvCache, Scheme};
use kvq::cuda::{self, AttnKernel, PackedGpuLayer};
use serde::{Deserialize, Serialize};

/// The bound on the attention output vs the CPU reference.
const MAX_REL_ERROR: f64 = 1e-3;
/// fp16 K/V (and candle's f16 matmuls) against f32: a looser, sanity bound.
const FP16_REL_ERROR: f64 = 2e-2;

/// One attention problem: `batch` sequences of `context` tokens.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AttnShape {
    pub name: String,
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub context: usize,
}

impl std::str::FromStr for AttnShape {
    type Err = anyhow::Error;
    /// `name:batch:q_heads:kv_heads:head_dim:context`.
    fn from_str(s: &str) -> Result<Self> {
        let p: Vec<&str> = s.split(':').collect();
        if p.len() != 6 {
            bail!("a shape is name:batch:q_heads:kv_heads:head_dim:context, got '{s}'");
        }
        let n = |i: usize| p[i].parse::<usize>().with_context(|| format!("'{}' in shape '{s}' is not a number", p[i]));
        let shape = AttnShape { name: p[0].into(), batch: n(1)?, q_heads: n(2)?, kv_heads: n(3)?, head_dim: n(4)?, context: n(5)? };
        if shape.batch == 0 || shape.context == 0 || shape.kv_heads == 0 || shape.q_heads % shape.kv_heads != 0 {
            bail!("shape '{s}': batch and context must be positive and query heads a multiple of KV heads");
        }
        Ok(shape)
    }
}

/// A peer's timing (PyTorch SDPA), as bench/peers/sdpa_attn.py writes it.
#[derive(Clone, Debug, Deserialize)]
pub struct PeerRow {
    pub shape: AttnShape,
    pub ms: f64,
    pub max_rel_error: f64,
    pub bytes: usize,
}

#[derive(Serialize)]
struct Row {
    shape: AttnShape,
    variant: String,
    bytes_read: usize,
    ms: f64,
    gb_s: f64,
    pct_copy: f64,
    packed_bytes_equal: Option<bool>,
    max_rel_error: f64,
}

/// fp16 attention through candle: scores = q·Kᵀ per KV head (its query heads as rows),
/// softmax, ·V. K/V are read once per KV head, as in a GQA kernel.
fn candle_fp16(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let s = (q.matmul(&k.t()?)? * scale)?;
    let p = candle_nn::ops::softmax_last_dim(&s.to_dtype(DType::F32)?)?.to_dtype(DType::F16)?;
    Ok(p.matmul(v)?)
}

/// max |x − y| / max |y|.
fn rel_error(x: &[f32], y: &[f32]) -> f64 {
    let (mut e, mut m) = (0f64, 0f64);
    for (a, b) in x.iter().zip(y) {
        e = e.max((a - b).abs() as f64);
        m = m.max(b.abs() as f64);
    }
    if m > 0.0 {
        e / m
    } else {
        e
    }
}

pub fn attn(shapes: &[AttnShape], variants: &[String], iters: usize, splits: usize, peer: Option<&std::path::Path>, json: Option<&std::path::Path>) -> Result<String> {
    let dev = cuda::open(0)?;
    let device = Device::Cuda(dev.clone());
    let peers: Vec<PeerRow> = match peer {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
            .with_context(|| format!("parsing {}", p.display()))?,
        None => Vec::new(),
    };
    let copy = cuda::copy_bandwidth(&dev, 1 << 30)?;
    let mut out = format!("- GPU: {}\n\nDevice-to-device copy: {copy:.0} GB/s (bytes read + written).\n\n", cuda::describe(&dev)?);
    if splits > 0 {
        out += &format!("Attend rows: each stream's packed tiles in {splits} splits (not the planner's choice).\n\n");
    }
    let mut t = Table::new(&["shape", "B", "ctx", "variant", "MB read", "µs", "GB/s", "% copy", "× candle fp16", "× SDPA", "check"]);
    let mut rows = Vec::new();
    let mut failures = value_check_probes(&dev)?;
    failures.extend(kvquant_tie_probes(&dev)?);
    for sh in shapes {
        let AttnShape { batch: b, q_heads: hq, kv_heads: hkv, head_dim: d, context: n, .. } = *sh;
        let s = b * hkv;
        let rep = hq / hkv;
        let (k, v) = cuda::random_kv(7, s, n, d);
        let q: Vec<f32> = cuda::random_kv(11, b * hq, 1, d).1;
        let kd = dev.clone_htod(&k)?;
        let vd = dev.clone_htod(&v)?;
        let qd = dev.clone_htod(&q)?;
        let check_rows: Vec<usize> = if b > 1 { vec![0, b - 1] } else { vec![0] };

        // fp16 through candle, checked against the CPU's f32 attention on the same rows.
        let scale = 1.0 / (d as f64).sqrt();
        let kt = Tensor::from_slice(&k, (b, hkv, n, d), &device)?.to_dtype(DType::F16)?;
        let vt = Tensor::from_slice(&v, (b, hkv, n, d), &device)?.to_dtype(DType::F16)?;
        let qt = Tensor::from_slice(&q, (b, hkv, rep, d), &device)?.to_dtype(DType::F16)?;
        let fp16_ms = cuda::time_ms(&dev, 3, iters, || {
            candle_fp16(&qt, &kt, &vt, scale).map(|_| ()).map_err(|e| kvq::KvqError::Gpu(e.to_string()))
        })?;
        let got = candle_fp16(&qt, &kt, &vt, scale)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let reference = cpu_attention(&CacheConfig::new(Scheme::Full(FullPrecision::F32)), &check_rows, hkv, d, n, &k, &v, &q, hq)?;
        let fp16_err = rel_error(&pick_rows(&got, &check_rows, hq * d), &reference);
        let fp16_bytes = 2 * s * n * d * 2;
        let peer = peers.iter().find(|p| p.shape.batch == b && p.shape.q_heads == hq && p.shape.kv_heads == hkv && p.shape.head_dim == d && p.shape.context == n);
        // `err`: None for rows whose check is on bytes alone (quantize+pack).
        let mut push = |variant: &str, bytes: usize, ms: f64, equal: Option<bool>, err: Option<f64>, t: &mut Table| {
            let gbs = bytes as f64 / (ms * 1e-3) / 1e9;
            let bytes_word = |e: bool| if e { "equal" } else { "DIFFER" };
            let check = match (equal, err) {
                (Some(e), Some(err)) => format!("bytes {} · err {err:.1e}", bytes_word(e)),
                (Some(e), None) => format!("bytes {}", bytes_word(e)),
                (None, Some(err)) => format!("err {err:.1e}"),
                (None, None) => "–".into(),
            };
            let err = err.unwrap_or(0.0);
            t.row(vec![
                sh.name.clone(),
                b.to_string(),
                n.to_string(),
                variant.into(),
                format!("{:.1}", bytes as f64 / 1e6),
                format!("{:.1}", ms * 1e3),
                format!("{gbs:.0}"),
                format!("{:.0}%", 100.0 * gbs / copy),
                format!("{:.2}", fp16_ms / ms),
                peer.map_or("–".into(), |p| format!("{:.2}", p.ms / ms)),
                check,
            ]);
            rows.push(Row { shape: sh.clone(), variant: variant.into(), bytes_read: bytes, ms, gb_s: gbs, pct_copy: 100.0 * gbs / copy, packed_bytes_equal: equal, max_rel_error: err });
        };
        if let Some(p) = peer {
            push("torch SDPA fp16", p.bytes, p.ms, None, Some(p.max_rel_error), &mut t);
        }
        push("candle fp16", fp16_bytes, fp16_ms, None, Some(fp16_err), &mut t);
        if fp16_err > FP16_REL_ERROR {
            failures.push(format!("{} candle fp16: error {fp16_err:.2e} vs the f32 reference", sh.name));
        }
        drop((kt, vt, qt));
        // kvq's fused fp16 decode kernel (the end-to-end fp16 baseline), checked the same way.
        if cuda::fp16_attention_supported(d, hq, hkv) {
            let (kf, vf) = (cuda::to_f16(&dev, &kd, s, n, d)?, cuda::to_f16(&dev, &vd, s, n, d)?);
            let shape = cuda::FullAttnShape { batch: b, q_heads: hq, kv_heads: hkv, head_dim: d, cap: n, n };
            let mut od = dev.alloc_zeros::<f32>(b * hq * d)?;
            let ms = cuda::time_ms(&dev, 3, iters, || cuda::fp16_decode_attention(&dev, &qd, &kf, &vf, shape, &mut od))?;
            let err = rel_error(&pick_rows(&dev.clone_dtoh(&od)?, &check_rows, hq * d), &reference);
            push("kvq fp16 (fused)", fp16_bytes, ms, None, Some(err), &mut t);
            if err > FP16_REL_ERROR {
                failures.push(format!("{} kvq fp16: error {err:.2e} vs the f32 reference", sh.name));
            }
        }

        for name in variants {
            let config = CacheConfig::from_spec(name, &kvq::cache::Overrides::default())?;
            // KVQuant: quantize kernels only (its cache attends on the CPU).
            if let Scheme::KvQuant { bits, outlier_fraction } = config.scheme {
                // A real calibration: KVQuant's fit on the first sequence's first 512 tokens (the
                // random keys stand for keys before RoPE, as the KVQuant presets store them).
                let ct = n.min(512);
                let take = |x: &[f32]| -> Vec<f32> { (0..hkv).flat_map(|h| x[h * n * d..(h * n + ct) * d].to_vec()).collect() };
                let (ck, cv) = (take(&k), take(&v));
                let cal = kvq::cache::KvQuantCalibration::fit(&[kvq::cache::LayerSamples { keys: &ck, values: &cv, tokens: ct }], hkv, d, bits as u32, outlier_fraction, true)?;
                let l = &cal.layers[0];
                let n_out = kvq::quant::outlier_count(outlier_fraction, d);
                let (center, scale) = (dev.clone_htod(&l.key_center)?, dev.clone_htod(&l.key_scale)?);
                for (what, x, xd, cb, norm) in [("keys", &k, &kd, &l.key_codebook, Some((&center, &scale))), ("values", &v, &vd, &l.value_codebook, None)] {
                    let gcb = cuda::CudaCodebook::new(&dev, cb)?;
                    let mut g = cuda::KvQuantGpu::new(&dev, s, n, d, bits, n_out)?;
                    let mut moved = 0;
                    let ms = cuda::time_ms(&dev, 2, iters, || {
                        moved = g.quantize(xd, hkv, &gcb, norm)?;
                        Ok(())
                    })?;
                    let streams: Vec<usize> = check_rows.iter().flat_map(|&b| (0..hkv).map(move |h| b * hkv + h)).collect();
                    let host_norm = norm.map(|_| (&l.key_center[..], &l.key_scale[..]));
                    let diff = cuda::check_kvquant(&g, x, &streams, hkv, cb, host_norm)?;
                    if let Some(m) = &diff {
                        failures.push(format!("{} {name} {what}: {m}", sh.name));
                    }
                    push(&format!("{name} quantize {what}"), moved, ms, Some(diff.is_none()), None, &mut t);
                }
                // Decode attention over KVQuant's store (keys taken as pre-RoPE keys, rotated as
                // read; the first token in the f16 sink), against kvq's CPU cache of the same
                // preset, calibration and RoPE fed the same K/V.
                // RoPE with Hugging Face's rotate_half pairs; on the small shapes also with
                // interleaved pairs (GGUF models, SmolLM2's among them): the kernels differ in
                // which channels a lane rotates together.
                let styles: &[(kvq::rope::RopeStyle, &str)] = if n <= 1024 { &[(kvq::rope::RopeStyle::Half, ""), (kvq::rope::RopeStyle::Interleaved, ", interleaved RoPE")] } else { &[(kvq::rope::RopeStyle::Half, "")] };
                for &(style, tag) in styles.iter().filter(|_| d == 64 || d == 128) {
                    let rope = std::sync::Arc::new(kvq::rope::Rope::new(10_000.0, d, style, n));
                    let table = std::sync::Arc::new(cuda::CudaRope::new(&dev, &rope, n)?);
                    let mut layer = cuda::KvQuantGpuLayer::new(&dev, s, hkv, d, n, config.sink_tokens, n_out, l, table)?;
                    layer.append(&kd, &vd, n)?;
                    // Both kernels (tensor cores, the default; CUDA cores, a second
                    // implementation), timed in turns.
                    let kernels = [(true, tag.to_string()), (false, format!("{tag}, CUDA cores"))];
                    let mut outs = Vec::new();
                    for _ in &kernels {
                        outs.push(dev.alloc_zeros::<f32>(b * hq * d)?);
                    }
                    let times = cuda::time_ms_in_turns(&dev, 3, iters, kernels.len(), |i| layer.attend_with(&qd, hq, 1, &mut outs[i], kernels[i].0))?;
                    let cal = std::sync::Arc::new(cal.clone());
                    let shape = CacheShape { layers: 1, batch: check_rows.len(), kv_heads: hkv, head_dim: d };
                    let mut cpu = Cache::new(&config, shape, Some(rope), Some(cal))?;
                    let (mut kr, mut vr) = (Vec::new(), Vec::new());
                    for &row in &check_rows {
                        kr.extend_from_slice(&k[row * hkv * n * d..(row + 1) * hkv * n * d]);
                        vr.extend_from_slice(&v[row * hkv * n * d..(row + 1) * hkv * n * d]);
                    }
                    cpu.append(0, &kr, &vr, n)?;
                    let qr = pick_rows(&q, &check_rows, hq * d);
                    let mut want = vec![0f32; qr.len()];
                    cpu.attend(0, &qr, hq, 1, &mut want)?;
                    let (sink, stored) = layer.held();
                    let plen = kvq::quant::packed_len(d, bits);
                    // Codes, value (centre, half-range), outliers of K and V; the f16 sink; the
                    // cos/sin table (shared by every stream: read once from memory).
                    let bytes = s * stored * (2 * plen + 4 + 2 * n_out * 4) + s * sink * d * 2 * 2 + n * d / 2 * 8;
                    for (((_, label), od), ms) in kernels.iter().zip(&outs).zip(times) {
                        let got = pick_rows(&dev.clone_dtoh(od)?, &check_rows, hq * d);
                        let err = rel_error(&got, &want);
                        push(&format!("{name} attend{label}"), bytes, ms, None, Some(err), &mut t);
                        if err > MAX_REL_ERROR {
                            failures.push(format!("{} {name}{label}: attention error {err:.2e} > {MAX_REL_ERROR:e}", sh.name));
                        }
                    }
                }
                continue;
            }
            let mut layer = PackedGpuLayer::new(&dev, &config, s, d, n)?;
            layer.append(&kd, &vd, n, 0, n)?;
            // The default launches; the same kernels launched one after another (no early
            // start); the first kernel, all on CUDA cores (a second implementation). Timed in
            // turns, the median of 3 rounds each: timed one after the other, two rows running
            // the very same kernels once read 261 and 242 µs (per-token-4, H100).
            let kernels = [(AttnKernel::Auto, ""), (AttnKernel::TensorCores, ", no early launch"), (AttnKernel::CudaCores { heads_per_block: 4 }, ", CUDA cores")];
            let mut outs = Vec::new();
            for _ in &kernels {
                outs.push(dev.alloc_zeros::<f32>(b * hq * d)?);
            }
            let times = cuda::time_ms_in_turns(&dev, 3, iters, kernels.len(), |i| layer.attend_with(&qd, hq, &mut outs[i], splits, kernels[i].0))?;
            for (((_, label), od), ms) in kernels.iter().zip(&outs).zip(times) {
                let got = dev.clone_dtoh(od)?;
                let c = cuda::check_packed(&layer, &config, &check_rows, hkv, &k, &v, &q, hq, &got)?;
                push(&format!("{name} attend{label}"), layer.bytes_read(), ms, Some(c.packed_bytes_equal), Some(c.max_rel_error), &mut t);
                if let (Some(m), "") = (&c.mismatch, *label) {
                    failures.push(format!("{} {name}: {m}", sh.name));
                }
                if c.max_rel_error > MAX_REL_ERROR {
                    failures.push(format!("{} {name}{label}: attention error {:.2e} > {MAX_REL_ERROR:e}", sh.name, c.max_rel_error));
                }
            }

            // Quantize + pack, bulk: every token of K and V in one launch each.
            let tokens = n - n % config_group(&config);
            if tokens > 0 {
                let kf = cuda::to_f16(&dev, &kd, s, n, d)?;
                let vf = cuda::to_f16(&dev, &vd, s, n, d)?;
                let mut bulk = PackedGpuLayer::new(&dev, &config, s, d, n)?;
                let mut moved = 0;
                let ms = cuda::time_ms(&dev, 2, iters, || {
                    moved = bulk.quantize_bulk(&kf, &vf, n, tokens)?;
                    Ok(())
                })?;
                // The bulk codes must equal the cache's own for every token both quantized.
                let (x, y) = (bulk.download_stream(s - 1)?, layer.download_stream(s - 1)?);
                let (nk, nv) = (y.kcodes.len(), y.vcodes.len());
                let equal = x.kcodes[..nk] == y.kcodes[..] && x.vcodes[..nv] == y.vcodes[..] && x.kparams[..y.kparams.len()] == y.kparams[..] && x.vparams[..y.vparams.len()] == y.vparams[..];
                if !equal {
                    failures.push(format!("{} {name}: bulk quantization differs from the cache's", sh.name));
                }
                push(&format!("{name} quantize+pack"), moved, ms, Some(equal), None, &mut t);
                // The two kernels apart (their bytes: checked in the row above).
                for (part, parts) in [("keys", (true, false)), ("values", (false, true))] {
                    let ms = cuda::time_ms(&dev, 2, iters, || {
                        moved = bulk.quantize_bulk_parts(&kf, &vf, n, tokens, parts)?;
                        Ok(())
                    })?;
                    push(&format!("{name} quantize+pack {part}"), moved, ms, None, None, &mut t);
                }
            }
        }
    }
    out.push_str(&t.markdown());
    out.push_str(
        "\n`MB read`: bytes the kernel must read (packed codes, f16 params, the f16 residual window; \
         for fp16, all of K and V). `% copy`: achieved bandwidth over the device-to-device copy's. \
         `× candle fp16` / `× SDPA`: their time over this row's. `check`: packed bytes vs the CPU \
         cache's, and max |GPU − CPU| / max |CPU| of the attention output on the first and last \
         sequence (for fp16 rows: vs the CPU's f32 attention). Quantize+pack rows count f16 input \
         read plus codes and params written.\n",
    );
    if let Some(p) = json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?).with_context(|| format!("writing {}", p.display()))?;
    }
    if !failures.is_empty() {
        print!("{out}");
        bail!("correctness checks failed:\n  {}", failures.join("\n  "));
    }
    Ok(out)
}

/// The GPU value check (full.cu's any_bad_*) against kvq::error::check_values on
/// buffers with one bad value at a time (NaN, ±Inf, just over the limit) or none.
fn value_check_probes(dev: &candle_core::cuda_backend::CudaDevice) -> Result<Vec<String>> {
    let limit = kvq::error::MAX_ABS_VALUE;
    let mut failures = Vec::new();
    let base: Vec<f32> = (0..100_003).map(|i| ((i * 37 % 1000) as f32 - 500.0) * 0.01).collect();
    for (what, bad) in [("none", None), ("NaN", Some(f32::NAN)), ("+Inf", Some(f32::INFINITY)), ("-Inf", Some(f32::NEG_INFINITY)), ("over", Some(-limit * 1.001)), ("at the limit", Some(limit))] {
        let mut x = base.clone();
        if let Some(b) = bad {
            x[77_777] = b;
        }
        let want = kvq::error::check_values("probe", &x).is_ok();
        let got32 = cuda::values_in_range(dev, &dev.clone_htod(&x)?)?;
        let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
        let got16 = cuda::values_in_range(dev, &dev.clone_htod(&h)?)?;
        if got32 != want || got16 != want {
            failures.push(format!("value check ({what}): GPU says f32 {got32}, f16 {got16}; the CPU rule says {want}"));
        }
    }
    Ok(failures)
}

/// KVQuant's quantize kernels on vectors built to tie: values on a coarse grid, constant
/// rows, zeros, two-valued rows (the median and the outlier scores tie), a channel with
/// scale 0; every head size the kernels take (32, 64, 96, 128, 256), code widths 2, 3, 4 (kernels built for them) and 5 (the
/// runtime-width kernel), 0 to 5 outliers a vector. Bytes must equal the CPU store's.
/// Each warp takes a run of rows that crosses stream boundaries (37 tokens a stream).
fn kvquant_tie_probes(dev: &candle_core::cuda_backend::CudaDevice) -> Result<Vec<String>> {
    let (streams, kv_heads, tokens) = (6, 3, 37);
    let all: Vec<usize> = (0..streams).collect();
    let mut failures = Vec::new();
    // The kernels divide with a reciprocal shared by a row (values) or a head (keys): checked
    // against IEEE division on 4M pairs over the range where they use it, half of the
    // divisors with mantissas near 1 or 2 (where a reciprocal rounds worst).
    let mut rng = kvq::rng::SplitMix64::new(2024);
    let (mut a, mut b) = (Vec::with_capacity(1 << 22), Vec::with_capacity(1 << 22));
    for i in 0..1u32 << 22 {
        let (ra, rb) = (rng.next_u64(), rng.next_u64());
        let exp = |r: u64| (60 + (r >> 40) % 136) as u32;
        let mant_b = if i % 2 == 0 { (rb as u32) & 0x7f_ffff } else if i % 4 == 1 { 0x7f_ffff - ((rb as u32) & 0xff) } else { (rb as u32) & 0xff };
        a.push(f32::from_bits(((ra >> 63) as u32) << 31 | exp(ra) << 23 | (ra as u32) & 0x7f_ffff));
        b.push(f32::from_bits(exp(rb) << 23 | mant_b));
    }
    let (taken, wrong) = cuda::kvquant_div_probe(dev, &a, &b)?;
    if wrong > 0 || taken < (1 << 21) {
        failures.push(format!("KVQuant quantize's short division: {wrong} of {taken} quotients differ from IEEE division"));
    }
    for d in [32, 64, 96, 128, 256] {
        let mut rng = kvq::rng::SplitMix64::new(99 + d as u64);
        let mut x = vec![0f32; streams * tokens * d];
        for (r, row) in x.chunks_mut(d).enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                *v = match r % 6 {
                    0 => (2.0 * rng.normal()).round() * 0.5,
                    1 => 1.25,
                    2 => 0.0,
                    3 => rng.normal(),
                    4 => if c % 2 == 0 { 3.0 } else { -3.0 },
                    _ => (rng.normal() * 4.0).round() * 0.25 + if c % 17 == 3 { 8.0 } else { 0.0 },
                };
            }
        }
        let center: Vec<f32> = (0..kv_heads * d).map(|i| ((i % 7) as f32 - 3.0) * 0.25).collect();
        let scale: Vec<f32> = (0..kv_heads * d).map(|i| if i % d == 5 { 0.0 } else { 0.5 + (i % 5) as f32 * 0.25 }).collect();
        let xd = dev.clone_htod(&x)?;
        let (cd, sd) = (dev.clone_htod(&center)?, dev.clone_htod(&scale)?);
        for bits in [2u8, 3, 4, 5] {
            let cb = kvq::quant::Codebook::uniform(-1.0, 1.0, bits as u32)?;
            let gcb = cuda::CudaCodebook::new(dev, &cb)?;
            for n_out in [0, 1, 2, 5] {
                for keys in [true, false] {
                    let mut g = cuda::KvQuantGpu::new(dev, streams, tokens, d, bits, n_out)?;
                    g.quantize(&xd, kv_heads, &gcb, if keys { Some((&cd, &sd)) } else { None })?;
                    if let Some(m) = cuda::check_kvquant(&g, &x, &all, kv_heads, &cb, if keys { Some((&center[..], &scale[..])) } else { None })? {
                        failures.push(format!("KVQuant quantize, tied vectors (d {d}, {bits} bits, {n_out} outliers, {}): {m}", if keys { "keys" } else { "values" }));
                    }
                }
            }
        }
    }
    Ok(failures)
}

fn config_group(c: &CacheConfig) -> usize {
    match c.scheme {
        Scheme::Kivi { group_size, .. } => group_size,
        _ => 1,
    }
}

fn pick_rows(x: &[f32], rows: &[usize], per: usize) -> Vec<f32> {
    rows.iter().flat_map(|&r| x[r * per..(r + 1) * per].iter().copied()).collect()
}

/// The CPU cache's decode attention for sequences `rows` (all their heads).
#[allow(clippy::too_many_arguments)]
fn cpu_attention(config: &CacheConfig, rows: &[usize], hkv: usize, d: usize, n: usize, k: &[f32], v: &[f32], q: &[f32], hq: usize) -> Result<Vec<f32>> {
    let shape = CacheShape { layers: 1, batch: rows.len(), kv_heads: hkv, head_dim: d };
    let mut cache = Cache::new(config, shape, None, None)?;
    let per = n * d;
    let (mut kr, mut vr, mut qr) = (Vec::new(), Vec::new(), Vec::new());
    for &b in rows {
        kr.extend_from_slice(&k[b * hkv * per..(b + 1) * hkv * per]);
        vr.extend_from_slice(&v[b * hkv * per..(b + 1) * hkv * per]);
        qr.extend_from_slice(&q[b * hq * d..(b + 1) * hq * d]);
    }
    cache.append(0, &kr, &vr, n)?;
    let mut out = vec![0f32; qr.len()];
    cache.attend(0, &qr, hq, 1, &mut out)?;
    Ok(out)
}

/// What `kvq bench gpu-model` compares.
pub struct GpuModelArgs<'a> {
    /// A GGUF; `None`: the small deterministic model kvq builds itself (no file needed).
    pub model: Option<&'a std::path::Path>,
    pub weights: kvq::gguf::WeightFormat,
    pub tokens: usize,
    pub chunk: usize,
    pub caches: &'a [String],
    pub batch: usize,
    pub new_tokens: usize,
}

/// The model on the GPU against the model on the CPU: the same token ids scored with
/// each cache on both (CPU caches there; the weights' matmuls and the KIVI caches on
/// the GPU here), perplexities compared to 3 significant digits; then greedy decoding
/// of `batch` sequences on the GPU, tokens/s.
pub fn model(a: &GpuModelArgs) -> Result<String> {
    use kvq::eval::evaluate;
    use kvq::generate::{generate, GenerateOptions, Sampling};
    use kvq::model::{Llama, LlamaConfig};
    let gpu = Device::new_cuda(0)?;
    let dev = cuda::cuda_device(&gpu)?;
    let (cpu_m, gpu_m, name, ids) = match a.model {
        Some(p) => {
            let (c, tok, info) = kvq::gguf::load(p, a.weights, &Device::Cpu)?;
            let (g, _, _) = kvq::gguf::load(p, a.weights, &gpu)?;
            let mut ids = tok.encode(crate::run_cmd::CALIBRATION_TEXT)?;
            while ids.len() < a.tokens {
                ids.extend_from_within(..);
            }
            ids.truncate(a.tokens);
            (c, g, format!("{} ({:?} weights), {} tokens of data/calibration.txt", info.name, a.weights, a.tokens), ids)
        }
        None => {
            let cfg = LlamaConfig::tiny();
            let c = Llama::random(cfg.clone(), 1, &Device::Cpu)?;
            let g = Llama::random(cfg, 1, &gpu)?;
            // Text the model itself samples (temperature 1, from 4 random ids): random ids
            // would sit far out of its distribution, where a random model's loss swings
            // with any rounding (PPL ~4·10^5 over 512 ids), and no check could agree.
            let mut rng = kvq::rng::SplitMix64::new(5);
            let prompt: Vec<u32> = (0..4).map(|_| (rng.next_u64() % c.config.vocab_size as u64) as u32).collect();
            let opts = GenerateOptions { max_new_tokens: a.tokens.saturating_sub(4), sampling: Sampling { temperature: 1.0, top_p: 1.0, seed: 5 }, stop_tokens: Vec::new(), pad_token: 0 };
            let mut cache = c.new_cache(&CacheConfig::new(Scheme::Full(FullPrecision::F32)), 1, None)?;
            let sampled = generate(&c, &mut cache, std::slice::from_ref(&prompt), &opts, |_, _| {})?;
            let ids: Vec<u32> = prompt.iter().chain(&sampled.tokens[0]).copied().collect();
            (c, g, format!("kvq's small deterministic model (LlamaConfig::tiny), {} ids it sampled itself (temperature 1)", ids.len()), ids)
        }
    };
    if ids.len() < 2 {
        bail!("gpu-model needs at least 2 tokens");
    }
    let shape = |m: &Llama, batch: usize| m.cache_shape(batch);
    let mut t = Table::new(&["cache", "PPL (CPU)", "PPL (GPU)", "rel. diff", "KL vs fp32 (CPU)", "KL vs fp32 (GPU)", "verdict", "attn err, same K/V", "s"]);
    let mut noise_t = Table::new(&["cache", "K/V noise", "seed", "PPL (CPU)", "rel. diff vs no noise"]);
    // A quantized cache's PPL is ill-conditioned: a value at a rounding boundary, or a
    // group's f16 min or scale, flips when only the last bits of its input change, and
    // the next layers carry the flip on. Two machines' matmuls differ in those bits, so
    // "equal to 3 digits" can fail for either machine against itself. Each preset's CPU
    // run is therefore repeated with relative K/V noise of one ulp (1e-7) and a few (1e-6);
    // the GPU's PPL must equal the CPU's to 3 significant digits, or differ by no more
    // than twice the most the CPU moved under that noise. The kernel's own correctness is
    // gated separately and tightly: every attention call against a CPU cache fed the
    // same K/V.
    let noises: [(f32, u64); 6] = [(1e-7, 1), (1e-7, 2), (1e-6, 1), (1e-6, 2), (1e-6, 3), (1e-6, 4)];
    let mut failures = Vec::new();
    let three = |x: f64| format!("{:.2e}", x);
    // KVQuant's calibration: fitted once on the CPU model (the first 512 ids), used by both sides.
    let calibration = |cfg: &CacheConfig| -> Result<Option<std::sync::Arc<kvq::cache::KvQuantCalibration>>> {
        Ok(match cfg.scheme {
            Scheme::KvQuant { bits, outlier_fraction } => Some(std::sync::Arc::new(cpu_m.calibrate_kvquant(&ids[..ids.len().min(512)], bits, outlier_fraction)?)),
            _ => None,
        })
    };
    // The GPU cache of a preset (KIVI and per-token with the chosen kernel).
    let gpu_cache = |cfg: &CacheConfig, batch: usize, kernel: AttnKernel, calib: Option<std::sync::Arc<kvq::cache::KvQuantCalibration>>| -> Result<Box<dyn KvCache>> {
        if kvq::gpu_cache::runs_on_gpu(cfg, gpu_m.config.head_dim) {
            return Ok(Box::new(kvq::gpu_cache::PackedGpuCache::new(&dev, cfg, shape(&gpu_m, batch), gpu_m.config.max_seq_len)?.with_kernel(kernel)));
        }
        kvq::gpu_cache::gpu_cache_for(&gpu, cfg, shape(&gpu_m, batch), gpu_m.config.max_seq_len, &gpu_m.rope, calib)?.with_context(|| format!("{}: no GPU cache for this preset", cfg.label()))
    };
    for name in a.caches {
        let cfg = CacheConfig::from_spec(name, &kvq::cache::Overrides::default())?;
        if matches!(cfg.scheme, Scheme::Full(_) | Scheme::None) {
            bail!("{name}: gpu-model compares the quantized GPU caches (fp32 is its reference row)");
        }
        let calib = calibration(&cfg)?;
        let reference = CacheConfig::new(Scheme::Full(FullPrecision::F32));
        let mut cpu_ref = cpu_m.new_cache(&reference, 1, None)?;
        let mut cpu_caches: Vec<(String, Box<dyn KvCache>)> = vec![(cfg.label(), Box::new(cpu_m.new_cache(&cfg, 1, calib.clone())?))];
        for &(sigma, seed) in &noises {
            let inner: Box<dyn KvCache> = Box::new(cpu_m.new_cache(&cfg, 1, calib.clone())?);
            cpu_caches.push((cfg.label(), Box::new(kvq::eval::NoisyKv::new(inner, sigma, seed)?)));
        }
        let (cpu_fp32, cpu_rows) = evaluate(&cpu_m, &ids, ("fp32", &mut cpu_ref), &mut cpu_caches, a.chunk, |_, _| {})?;
        let mut band = 0f64;
        for (&(sigma, seed), r) in noises.iter().zip(&cpu_rows[1..]) {
            let rel = (r.ppl / cpu_rows[0].ppl - 1.0).abs();
            band = band.max(rel);
            noise_t.row(vec![cfg.label(), format!("{sigma:.0e}"), seed.to_string(), format!("{:.5}", r.ppl), format!("{rel:.1e}")]);
        }
        // Both packed kernels: tensor cores (the default) and the CUDA-core kernel (f32
        // throughout), for KIVI and per-token; KVQuant has one (CUDA cores).
        let kernels: &[(AttnKernel, &str)] = if matches!(cfg.scheme, Scheme::Kivi { .. } | Scheme::PerToken { .. }) { &[(AttnKernel::Auto, ""), (AttnKernel::CudaCores { heads_per_block: 4 }, ", CUDA cores")] } else { &[(AttnKernel::Auto, "")] };
        for &(kernel, kname) in kernels {
            let mut gpu_ref = gpu_m.new_cache(&reference, 1, None)?;
            let gcache = gpu_cache(&cfg, 1, kernel, calib.clone())?;
            let err = std::sync::Arc::new(MaxErr::default());
            let shadowed = Shadowed { gpu: gcache, cpu: gpu_m.new_cache(&cfg, 1, calib.clone())?, max_err: err.clone() };
            let mut gpu_caches: Vec<(String, Box<dyn KvCache>)> = vec![(cfg.label(), Box::new(shadowed))];
            let (gpu_fp32, gpu_rows) = evaluate(&gpu_m, &ids, ("fp32", &mut gpu_ref), &mut gpu_caches, a.chunk, |_, _| {})?;
            if name == &a.caches[0] && kname.is_empty() {
                // The uncompressed cache on both sides: what the weights' matmuls alone differ by.
                let (c, g) = (&cpu_fp32, &gpu_fp32);
                let same = three(c.ppl) == three(g.ppl);
                if !same {
                    failures.push(format!("fp32: PPL {:.5} on the CPU, {:.5} on the GPU", c.ppl, g.ppl));
                }
                t.row(vec!["fp32 (both in host memory)".into(), format!("{:.5}", c.ppl), format!("{:.5}", g.ppl), format!("{:.1e}", (g.ppl / c.ppl - 1.0).abs()), "0".into(), "0".into(), if same { "equal (3 s.f.)".into() } else { "DIFFER".into() }, "–".into(), format!("{:.1}", g.seconds)]);
            }
            let (c, g) = (&cpu_rows[0], &gpu_rows[0]);
            let rel = (g.ppl / c.ppl - 1.0).abs();
            let label = format!("{}{kname}", cfg.label());
            let verdict = if three(c.ppl) == three(g.ppl) {
                "equal (3 s.f.)".to_string()
            } else if rel <= 2.0 * band {
                format!("within CPU noise (≤ 2 × {band:.1e})")
            } else {
                failures.push(format!("{label}: PPL {:.5} on the CPU, {:.5} on the GPU (rel. {rel:.1e}; the CPU under K/V noise moved ≤ {band:.1e})", c.ppl, g.ppl));
                "DIFFER".to_string()
            };
            if err.get() > MAX_REL_ERROR {
                failures.push(format!("{label}: an attention call's output is {:.2e} from the CPU cache's on the same K/V", err.get()));
            }
            t.row(vec![label, format!("{:.5}", c.ppl), format!("{:.5}", g.ppl), format!("{rel:.1e}"), format!("{:.5}", c.kl), format!("{:.5}", g.kl), verdict, format!("{:.1e}", err.get()), format!("{:.1}", g.seconds)]);
        }
    }
    let mut out = format!("- GPU: {}\n- model: {name}; scored in chunks of {} tokens (past-only, as `kvq ppl`)\n\n", cuda::describe(&dev)?, a.chunk);
    out.push_str(&t.markdown());
    out.push_str(&format!(
        "\n`attn err, same K/V`: the largest max |GPU − CPU| / max |CPU| over every attention call of the GPU run, where a CPU cache of the same preset was fed the very K/V the GPU cache got (must be ≤ {MAX_REL_ERROR:e}). `verdict`: the PPLs equal to 3 significant digits, or within twice the most the CPU's own PPL moved when its K/V got relative noise of 1e-7 or 1e-6 (below); anything else fails the run.\n\nThe CPU against itself (K/V × (1 + σ·u), u uniform in [-1, 1), `kvq::eval::NoisyKv`; also `kvq ppl --kv-noise σ`):\n\n"
    ));
    out.push_str(&noise_t.markdown());

    // Greedy decoding on the GPU: `batch` equal-length prompts (the GPU cache has no left padding yet).
    let prompt_len = (ids.len() / 2).max(1);
    let prompts: Vec<Vec<u32>> = (0..a.batch).map(|b| ids.iter().cycle().skip(b).take(prompt_len).copied().collect()).collect();
    let opts = GenerateOptions { max_new_tokens: a.new_tokens, sampling: Sampling::greedy(), stop_tokens: Vec::new(), pad_token: 0 };
    let mut d = Table::new(&["cache", "batch", "prompt", "new tokens", "prefill s", "decode tok/s (all rows)"]);
    for name in a.caches {
        let cfg = CacheConfig::from_spec(name, &kvq::cache::Overrides::default())?;
        let mut cache = gpu_cache(&cfg, a.batch, AttnKernel::Auto, calibration(&cfg)?)?;
        let g = generate(&gpu_m, cache.as_mut(), &prompts, &opts, |_, _| {})?;
        d.row(vec![cfg.label(), a.batch.to_string(), prompt_len.to_string(), a.new_tokens.to_string(), format!("{:.3}", g.steps.first().map_or(0.0, |s| s.latency_s)), format!("{:.0}", g.decode_tokens_per_s())]);
    }
    out.push_str("\nDecoding on the GPU (weights' matmuls through candle, the cache through kvq's kernels; q/k/v stay on the GPU: the model's device path):\n\n");
    out.push_str(&d.markdown());
    if !failures.is_empty() {
        print!("{out}");
        bail!("the GPU model disagrees with the CPU:\n  {}", failures.join("\n  "));
    }
    Ok(out)
}

/// The largest error seen (f64 bits in an atomic: the trait wants `Send`).
#[derive(Default)]
struct MaxErr(std::sync::atomic::AtomicU64);

impl MaxErr {
    fn raise(&self, e: f64) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self.0.fetch_update(Relaxed, Relaxed, |b| (e > f64::from_bits(b)).then(|| e.to_bits()));
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// A GPU cache with a CPU cache of the same preset beside it: both get every append, both
/// attend, the GPU's output is returned and the largest relative difference kept. The
/// check of the GPU cache inside the model that does not depend on the model's
/// conditioning (both sides see the same K/V).
struct Shadowed {
    gpu: Box<dyn KvCache>,
    cpu: Cache,
    max_err: std::sync::Arc<MaxErr>,
}

impl KvCache for Shadowed {
    fn config(&self) -> &CacheConfig {
        self.gpu.config()
    }
    fn shape(&self) -> CacheShape {
        self.gpu.shape()
    }
    fn wants_pre_rope_keys(&self) -> bool {
        self.gpu.wants_pre_rope_keys()
    }
    fn seq_len(&self) -> usize {
        self.gpu.seq_len()
    }
    fn set_padding(&mut self, row_start: &[usize]) -> kvq::error::Result<()> {
        self.cpu.set_padding(row_start)?;
        self.gpu.set_padding(row_start)
    }
    fn padding(&self) -> &[usize] {
        self.gpu.padding()
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], tokens: usize) -> kvq::error::Result<()> {
        self.cpu.append(layer, k, v, tokens)?;
        self.gpu.append(layer, k, v, tokens)
    }
    fn attend(&mut self, layer: usize, q: &[f32], q_heads: usize, tokens: usize, out: &mut [f32]) -> kvq::error::Result<()> {
        let mut reference = vec![0f32; out.len()];
        self.cpu.attend(layer, q, q_heads, tokens, &mut reference)?;
        self.gpu.attend(layer, q, q_heads, tokens, out)?;
        self.max_err.raise(rel_error(out, &reference));
        Ok(())
    }
    fn materialize(&self, layer: usize) -> kvq::error::Result<(Vec<f32>, Vec<f32>)> {
        self.gpu.materialize(layer)
    }
    fn bytes(&self) -> kvq::size::Bytes {
        self.gpu.bytes()
    }
    fn info(&self) -> kvq::cache::CacheInfo {
        self.gpu.info()
    }
    fn select_rows(&mut self, rows: &[usize]) -> kvq::error::Result<()> {
        self.cpu.select_rows(rows)?;
        self.gpu.select_rows(rows)
    }
    fn reset(&mut self) {
        self.cpu.reset();
        self.gpu.reset();
    }
}

/// What `kvq bench gpu-e2e` measures.
pub struct GpuE2eArgs<'a> {
    /// A GGUF; `None`: the small deterministic model.
    pub model: Option<&'a std::path::Path>,
    pub weights: kvq::gguf::WeightFormat,
    /// `None`: the most the model's context leaves room for.
    pub context: Option<usize>,
    pub budget: u128,
    pub caches: &'a [String],
    pub steps: usize,
    /// Cap on the batch (0: the budget's batch).
    pub max_batch: usize,
}

/// End to end on the GPU: for each cache, the largest batch whose cache fits `budget`
/// bytes at `context` tokens (kvq's GPU layouts, as `kvq size --gpu-budget`), the cache
/// filled to `context` tokens of random K/V through its own append path, then greedy
/// decode steps of the whole model at that batch, q/k/v on the GPU throughout (the
/// model's device path). Checked in the same run: each cache's device path against a
/// validated host path at batch 2 (quantized caches: a CPU cache of the same preset fed the same K/V
/// call by call; fp16: kvq's CPU fp16 cache), logits within bounds.
pub fn e2e(a: &GpuE2eArgs) -> Result<String> {
    use kvq::model::{Llama, LlamaConfig};
    use kvq::tensor_cache::TensorCache;
    let gpu = Device::new_cuda(0)?;
    let dev = cuda::cuda_device(&gpu)?;
    let (m, name) = match a.model {
        Some(p) => {
            let (g, _, info) = kvq::gguf::load(p, a.weights, &gpu)?;
            (g, format!("{} ({:?} weights)", info.name, a.weights))
        }
        None => (Llama::random(LlamaConfig::tiny(), 1, &gpu)?, "kvq's small deterministic model (LlamaConfig::tiny)".into()),
    };
    let c = m.config.clone();
    // Room for the timed steps, two warm-up steps and a spare group's worth.
    let context = a.context.unwrap_or(c.max_seq_len.saturating_sub(a.steps + 8) / 32 * 32);
    if context == 0 || context + a.steps + 8 > c.max_seq_len {
        bail!("a context of {context} plus {} steps (and 8 spare) does not fit the model's {} tokens", a.steps, c.max_seq_len);
    }
    let geometry = kvq::ModelGeometry::new("model", c.layers, c.q_heads, c.kv_heads, c.head_dim)?;
    let capacity = context + a.steps + 8;
    let fp16 = CacheConfig::new(Scheme::Full(FullPrecision::F16));
    let mut failures = Vec::new();

    // 1. The checks: batch 2, a 96-token prompt in chunks of 32, then 8 greedy steps.
    let mut checks = Table::new(&["cache", "device path vs", "max rel. error of the logits", "bound", "attn err vs CPU, same K/V"]);
    let ids: Vec<u32> = (0..2 * 104).map(|i| ((i * 7919 + 13) % c.vocab_size) as u32).collect();
    let run = |cache: &mut dyn KvCache| -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        for part in 0..3 {
            let chunk: Vec<u32> = (0..2).flat_map(|b| ids[b * 104 + 32 * part..b * 104 + 32 * part + 32].to_vec()).collect();
            logits.extend(m.forward(&chunk, 2, cache, false)?.flatten_all()?.to_vec1::<f32>()?);
        }
        for s in 96..104 {
            let step: Vec<u32> = (0..2).map(|b| ids[b * 104 + s]).collect();
            logits.extend(m.forward(&step, 2, cache, false)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(logits)
    };
    // KVQuant's calibration, fitted on the checks' ids (its quality does not change a step's time).
    let calibration = |cfg: &CacheConfig| -> Result<Option<std::sync::Arc<kvq::cache::KvQuantCalibration>>> {
        Ok(match cfg.scheme {
            Scheme::KvQuant { bits, outlier_fraction } => Some(std::sync::Arc::new(m.calibrate_kvquant(&ids[..104], bits, outlier_fraction)?)),
            _ => None,
        })
    };
    let gpu_cache = |cfg: &CacheConfig, batch: usize, cap: usize, calib: Option<std::sync::Arc<kvq::cache::KvQuantCalibration>>| -> Result<Box<dyn KvCache>> {
        kvq::gpu_cache::gpu_cache_for(&gpu, cfg, m.cache_shape(batch), cap, &m.rope, calib)?.with_context(|| format!("{} has no GPU cache", cfg.label()))
    };
    for spec in a.caches {
        let cfg = if spec == "fp16" { fp16.clone() } else { CacheConfig::from_spec(spec, &kvq::cache::Overrides::default())? };
        let (err, bound, attn) = if spec == "fp16" {
            let mut host = m.new_cache(&fp16, 2, None)?;
            let mut devc = TensorCache::new(&fp16, m.cache_shape(2), 128, &gpu)?;
            (rel_error(&run(&mut devc)?, &run(&mut host)?), FP16_REL_ERROR, "–".to_string())
        } else {
            let e = std::sync::Arc::new(MaxErr::default());
            let calib = calibration(&cfg)?;
            let mut host = Shadowed { gpu: gpu_cache(&cfg, 2, 128, calib.clone())?, cpu: m.new_cache(&cfg, 2, calib.clone())?, max_err: e.clone() };
            let mut want = run(&mut host)?;
            drop(host);
            if e.get() > MAX_REL_ERROR {
                failures.push(format!("{spec}: the host path's attention is {:.2e} from the CPU cache's", e.get()));
            }
            // KVQuant quantizes every token at once, and a code or an outlier flips when its
            // input moves by an ulp (the two paths round q's RoPE differently): its logits
            // are compared with every token of the check in the f16 sink, which exercises
            // the device path's plumbing (keys handed over before RoPE, rotated by the
            // kernel); its store is checked call by call above and in `kvq bench gpu-model`.
            let cfg = if matches!(cfg.scheme, Scheme::KvQuant { .. }) {
                let sunk = CacheConfig { sink_tokens: 104, ..cfg.clone() };
                // (Shadowed hides the device path: the host path runs, checked against the CPU too.)
                let mut host = Shadowed { gpu: gpu_cache(&sunk, 2, 128, calib.clone())?, cpu: m.new_cache(&sunk, 2, calib.clone())?, max_err: e.clone() };
                want = run(&mut host)?;
                sunk
            } else {
                cfg.clone()
            };
            let mut devc = gpu_cache(&cfg, 2, 128, calib)?;
            // Same kernels both ways; the paths differ in where RoPE runs. With f32 weights
            // that is float rounding (1e-4); with 16-bit weights the activations round to
            // f16 between layers, and a last-bit difference becomes an f16 ulp (1e-3).
            let bound = if a.weights == kvq::gguf::WeightFormat::F32 { MAX_REL_ERROR } else { FP16_REL_ERROR };
            (rel_error(&run(devc.as_mut())?, &want), bound, format!("{:.1e}", e.get()))
        };
        if err > bound {
            failures.push(format!("{spec}: the device path's logits are {err:.2e} from the host path's"));
        }
        let against = match cfg.scheme {
            _ if spec == "fp16" => "the GPU model with kvq's CPU fp16 cache (host path)",
            Scheme::KvQuant { .. } => "the same GPU cache through the host path, all 104 tokens in its f16 sink",
            _ => "the same GPU cache through the host path",
        };
        checks.row(vec![cfg.label(), against.into(), format!("{err:.1e}"), format!("{bound:e}"), attn]);
    }

    // 2. Throughput at the budget's batch. `timed(cfg, batch, tokens)`: a cache of `batch`
    // sequences filled to `tokens` tokens of random K/V through its own append (in chunks
    // of up to 1024; the values do not change a step's time, their count does), then
    // greedy steps, argmax on the GPU: (seconds to fill, seconds a step).
    let timed = |cfg: &CacheConfig, batch: usize, tokens: usize| -> Result<(f64, f64)> {
        let shape = m.cache_shape(batch);
        let cap = tokens + a.steps + 8;
        let mut cache = gpu_cache(cfg, shape.batch, cap, calibration(cfg)?)?;
        let t0 = std::time::Instant::now();
        let chunk = tokens.min(1024);
        let noise = Tensor::randn(0f32, 1f32, (batch, c.kv_heads, chunk, c.head_dim), &gpu)?;
        {
            let dk = cache.on_device().context("the cache has no device path")?;
            for layer in 0..c.layers {
                let mut done = 0;
                while done < tokens {
                    let n = chunk.min(tokens - done);
                    let part = if n == chunk { noise.clone() } else { noise.narrow(2, 0, n)?.contiguous()? };
                    dk.append_tensors(layer, &part, &part)?;
                    done += n;
                }
            }
        }
        drop(noise);
        gpu.synchronize()?;
        let fill_s = t0.elapsed().as_secs_f64();
        let mut next: Vec<u32> = (0..batch).map(|b| ((b * 7919 + 1) % c.vocab_size) as u32).collect();
        let mut step = |next: &mut Vec<u32>| -> Result<()> {
            let logits = m.forward(next, batch, cache.as_mut(), false)?;
            *next = logits.squeeze(1)?.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
            Ok(())
        };
        for _ in 0..2 {
            step(&mut next)?;
        }
        if std::env::var_os("KVQ_PROFILE_STEP").is_some() {
            // One more step between cuProfilerStart/Stop, for `ncu --profile-from-start off`
            // (bench/gpu.sh e2e-profile): every kernel of a decode step, by name and time.
            gpu.synchronize()?;
            // SAFETY: plain driver calls on the current context, no arguments.
            unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuProfilerStart() };
            step(&mut next)?;
            gpu.synchronize()?;
            unsafe { candle_core::cuda_backend::cudarc::driver::sys::cuProfilerStop() };
        }
        let t1 = std::time::Instant::now();
        for _ in 0..a.steps {
            step(&mut next)?;
        }
        let per_step = t1.elapsed().as_secs_f64() / a.steps as f64;
        drop(cache);
        gpu.synchronize()?;
        Ok((fill_s, per_step))
    };
    let mut t = Table::new(&["cache", "bytes a sequence", "batch", "× fp16 batch", "cache GiB", "fill s", "ms a step", "of it the cache", "decode tok/s", "× fp16 tok/s"]);
    let mut fp16_row: Option<(usize, f64)> = None;
    for spec in a.caches {
        let cfg = if spec == "fp16" { fp16.clone() } else { CacheConfig::from_spec(spec, &kvq::cache::Overrides::default())? };
        let per = kvq::size::gpu_sequence_bytes(&geometry, &cfg, capacity).with_context(|| format!("{spec} has no GPU layout"))?;
        let mut batch = (a.budget / per) as usize;
        if a.max_batch > 0 {
            batch = batch.min(a.max_batch);
        }
        if batch == 0 {
            bail!("{spec}: not one sequence of {capacity} tokens fits the budget");
        }
        let (fill_s, step_s) = timed(&cfg, batch, context)?;
        // The same batch at 64 tokens: the step without the long cache (the model's
        // matmuls, norms, logits), so the difference is what the cache's context costs.
        let (_, short_s) = timed(&cfg, batch, context.min(64))?;
        let tok_s = batch as f64 / step_s;
        let gib = (per as f64 * batch as f64) / (1u64 << 30) as f64;
        let (xb, xt) = match fp16_row {
            Some((b, s)) => (format!("{:.2}", batch as f64 / b as f64), format!("{:.2}", tok_s / s)),
            None => ("–".into(), "–".into()),
        };
        if spec == "fp16" {
            fp16_row = Some((batch, tok_s));
        }
        t.row(vec![
            cfg.label(),
            kvq::size::with_commas(per),
            batch.to_string(),
            xb,
            format!("{gib:.1}"),
            format!("{fill_s:.1}"),
            format!("{:.1}", 1e3 * step_s),
            format!("{:.1}", 1e3 * (step_s - short_s)),
            format!("{tok_s:.0}"),
            xt,
        ]);
    }
    let mut out = format!(
        "- GPU: {}\n- model: {name}; context {} tokens; KV budget {} ({} bytes); {} timed decode steps after 2 warm-up steps\n\n",
        cuda::describe(&dev)?,
        context,
        kvq::size::human(a.budget),
        kvq::size::with_commas(a.budget),
        a.steps
    );
    out.push_str("Checks (batch 2: a 96-token prompt in chunks of 32, then 8 greedy steps; logits compared over all of them):\n\n");
    out.push_str(&checks.markdown());
    out.push_str("\nThroughput at the largest batch whose cache fits the budget (bytes a sequence: kvq's GPU layout for context + steps tokens; fp16: K/V as f16 tensors, a decode step's attention through kvq's fused fp16 kernel (kernels/full.cu; `kvq bench attn` times it against SDPA); KIVI, per-token, KVQuant: kvq's layouts and kernels; KVQuant calibrated on the checks' 104 ids). q/k/v stay on the GPU; each step's sampled ids cross to the host. `of it the cache`: the step minus the same batch's step at 64 tokens (the model alone):\n\n");
    out.push_str(&t.markdown());
    if !failures.is_empty() {
        print!("{out}");
        bail!("gpu-e2e checks failed:\n  {}", failures.join("\n  "));
    }
    Ok(out)
}
