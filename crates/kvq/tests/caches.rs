//! Caches: real bytes equal the size math; attention equals a naive reference over what
//! the cache holds; scheme-specific guarantees; bad input gives typed errors.

use kvq::cache::{Cache, CacheConfig, CacheShape, FullPrecision, KvCache, KvQuantCalibration, LayerSamples, Scheme, PRESETS};
use kvq::rng::SplitMix64;
use kvq::rope::{Rope, RopeStyle};
use kvq::size::{cache_bytes, ModelGeometry};
use kvq::KvqError;
use std::sync::Arc;

const D: usize = 64;
const SHAPE: CacheShape = CacheShape { layers: 2, batch: 2, kv_heads: 2, head_dim: D };

fn geometry() -> ModelGeometry {
    ModelGeometry::new("test", SHAPE.layers, 6, SHAPE.kv_heads, SHAPE.head_dim).unwrap()
}

fn rope() -> Arc<Rope> {
    Arc::new(Rope::new(10_000.0, SHAPE.head_dim, RopeStyle::Half, 1024))
}

fn random(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    // Keys with a few large channels, like real models.
    (0..n).map(|i| rng.normal() * if i % D == 3 { 8.0 } else { 1.0 }).collect()
}

fn calibration(bits: u8, frac: f32) -> Arc<KvQuantCalibration> {
    let mut rng = SplitMix64::new(7);
    let n = 256;
    let data: Vec<(Vec<f32>, Vec<f32>)> = (0..SHAPE.layers)
        .map(|_| (random(&mut rng, SHAPE.kv_heads * n * D), random(&mut rng, SHAPE.kv_heads * n * D)))
        .collect();
    let samples: Vec<LayerSamples> = data.iter().map(|(k, v)| LayerSamples { keys: k, values: v, tokens: n }).collect();
    Arc::new(KvQuantCalibration::fit(&samples, SHAPE.kv_heads, SHAPE.head_dim, bits as u32, frac, true).unwrap())
}

fn build(cfg: &CacheConfig) -> Cache {
    let calib = match cfg.scheme {
        Scheme::KvQuant { bits, outlier_fraction } => Some(calibration(bits, outlier_fraction)),
        _ => None,
    };
    Cache::new(cfg, SHAPE, Some(rope()), calib).unwrap()
}

fn configs() -> Vec<CacheConfig> {
    let mut v: Vec<CacheConfig> = PRESETS.iter().map(|p| CacheConfig::preset(p).unwrap()).collect();
    // Small windows and groups so the tests cross many boundaries.
    v.push(CacheConfig::kivi(2, 4, 8, 0));
    v.push(CacheConfig::kivi(3, 3, 8, 12));
    v.push(CacheConfig::kivi(2, 2, 128, 5)); // value groups: min(128, 64) channels 
    v.push(CacheConfig::per_token(3, 8, 10));
    v.push(CacheConfig::per_token(4, 16, 0));
    v.push(CacheConfig { sink_tokens: 3, ..CacheConfig::kivi(2, 2, 4, 6) });
    v.push(CacheConfig::kvquant(3, 0.0));
    v.push(CacheConfig::kvquant(2, 0.2));
    v
}

/// Appends `total` tokens in chunks of `chunk` to every layer.
fn fill(cache: &mut Cache, rng: &mut SplitMix64, total: usize, chunk: usize) {
    let per_token = SHAPE.batch * SHAPE.kv_heads * SHAPE.head_dim;
    let mut done = 0;
    while done < total {
        let t = chunk.min(total - done);
        for l in 0..SHAPE.layers {
            let (k, v) = (random(rng, per_token * t), random(rng, per_token * t));
            cache.append(l, &k, &v, t).unwrap();
        }
        done += t;
    }
}

#[test]
fn memory_bytes_equal_the_size_estimate() {
    let g = geometry();
    for cfg in configs() {
        for &total in &[1usize, 2, 3, 7, 8, 31, 32, 33, 64, 127, 128, 129, 160, 161, 200] {
            for &chunk in &[1usize, 5, 200] {
                let mut cache = build(&cfg);
                fill(&mut cache, &mut SplitMix64::new(total as u64), total, chunk);
                let est = cache_bytes(&g, &cfg, total, SHAPE.batch).unwrap();
                let real = cache.bytes();
                let expect_len = if cfg.scheme == Scheme::None { 0 } else { total };
                assert_eq!(cache.seq_len(), expect_len);
                assert_eq!(real, est, "{} at {total} tokens in chunks of {chunk}", cfg.label());
                assert_eq!(cache.memory_bytes(), est.total());
            }
        }
    }
}

#[test]
fn fp16_size_matches_the_seed_formula() {
    // 2 · L · H · d · S · P for Llama-3-8B at 100k tokens: the seed's "13 GB".
    let g = ModelGeometry::preset("llama-3-8b").unwrap();
    let b = cache_bytes(&g, &CacheConfig::preset("fp16").unwrap(), 100_000, 1).unwrap();
    assert_eq!(b.total(), 13_107_200_000);
    assert_eq!(kvq::size::full_precision_bytes(&g, 100_000, 1, FullPrecision::F16), 13_107_200_000);
}

/// Naive attention over materialized K/V (post-RoPE), causal, GQA, left padding.
fn reference_attention(k: &[f32], v: &[f32], q: &[f32], n: usize, t: usize, hq: usize, row_start: &[usize]) -> Vec<f32> {
    let CacheShape { batch, kv_heads, head_dim: d, .. } = SHAPE;
    let rep = hq / kv_heads;
    let mut out = vec![0f32; batch * hq * t * d];
    for b in 0..batch {
        for h in 0..hq {
            let s = b * kv_heads + h / rep;
            for i in 0..t {
                let pos = n - t + i;
                let lo = row_start.get(b).copied().unwrap_or(0);
                let qrow = &q[((b * hq + h) * t + i) * d..][..d];
                let scores: Vec<f64> = (lo..=pos)
                    .map(|j| {
                        let krow = &k[(s * n + j) * d..][..d];
                        qrow.iter().zip(krow).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                if scores.is_empty() {
                    continue;
                }
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - m).exp()).sum();
                let o = &mut out[((b * hq + h) * t + i) * d..][..d];
                for (jj, sc) in scores.iter().enumerate() {
                    let p = (sc - m).exp() / z;
                    let vrow = &v[(s * n + lo + jj) * d..][..d];
                    for c in 0..d {
                        o[c] += (p * vrow[c] as f64) as f32;
                    }
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_naive_reference_over_what_the_cache_holds() {
    let hq = 6;
    for cfg in configs().into_iter().filter(|c| !c.past_only && c.scheme != Scheme::None) {
        for &(prefill, steps) in &[(5usize, 3usize), (70, 2), (150, 1)] {
            let mut cache = build(&cfg);
            let row_start = [0usize, 3];
            cache.set_padding(&row_start).unwrap();
            let mut rng = SplitMix64::new(42);
            fill(&mut cache, &mut rng, prefill, prefill);
            for step in 0..steps {
                let t = if step == 0 { 3 } else { 1 };
                fill(&mut cache, &mut rng, t, t);
                let n = cache.seq_len();
                let q = random(&mut rng, SHAPE.batch * hq * t * SHAPE.head_dim);
                let mut out = vec![0f32; q.len()];
                cache.attend(1, &q, hq, t, &mut out).unwrap();
                let (k, v) = cache.materialize(1).unwrap();
                let want = reference_attention(&k, &v, &q, n, t, hq, &row_start);
                for (a, b) in out.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{}: {a} vs {b}", cfg.label());
                }
            }
        }
    }
}

#[test]
fn no_cache_attends_over_the_current_step_only() {
    let mut cache = Cache::none(SHAPE).unwrap();
    let mut rng = SplitMix64::new(1);
    let t = 9;
    let per = SHAPE.batch * SHAPE.kv_heads * t * D;
    let (k, v) = (random(&mut rng, per), random(&mut rng, per));
    let q = random(&mut rng, SHAPE.batch * 6 * t * D);
    cache.append(0, &k, &v, t).unwrap();
    let mut out = vec![0f32; q.len()];
    cache.attend(0, &q, 6, t, &mut out).unwrap();
    let want = reference_attention(&k, &v, &q, t, t, 6, &[]);
    for (a, b) in out.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()));
    }
    assert_eq!(cache.seq_len(), 0);
    assert_eq!(cache.memory_bytes(), 0);
}

#[test]
fn kivi_window_holds_exact_f16_and_groups_are_quantized_when_full() {
    let cfg = CacheConfig::kivi(2, 2, 8, 12);
    let mut cache = build(&cfg);
    let mut rng = SplitMix64::new(3);
    fill(&mut cache, &mut rng, 12, 1);
    let info = cache.info();
    assert_eq!((info.quantized_len, info.key_quantized_len, info.residual_len), (0, 0, 12));
    fill(&mut cache, &mut rng, 7, 1); // 19 tokens: values 7 quantized, keys wait for a full group
    let info = cache.info();
    assert_eq!((info.quantized_len, info.key_quantized_len), (7, 0));
    fill(&mut cache, &mut rng, 1, 1); // 20 = 12 + 8: the first key group leaves the window
    assert_eq!(cache.info().key_quantized_len, 8);
}

#[test]
fn kivi_with_a_window_longer_than_the_sequence_is_exactly_fp16() {
    let mut rng = SplitMix64::new(11);
    let per_token = SHAPE.batch * SHAPE.kv_heads * SHAPE.head_dim;
    let mut kivi = build(&CacheConfig::kivi(2, 2, 8, 64));
    let mut fp16 = build(&CacheConfig::preset("fp16").unwrap());
    for _ in 0..40 {
        let (k, v) = (random(&mut rng, per_token), random(&mut rng, per_token));
        for c in [&mut kivi, &mut fp16] {
            for l in 0..SHAPE.layers {
                c.append(l, &k, &v, 1).unwrap();
            }
        }
    }
    assert!(kivi.materialize(0).unwrap() == fp16.materialize(0).unwrap());
}

#[test]
fn quantization_error_shrinks_with_bits() {
    let mut errs = Vec::new();
    for bits in [2u8, 3, 4, 8] {
        let mut c = build(&CacheConfig::kivi(bits, bits, 8, 0));
        let mut fp = build(&CacheConfig::preset("fp32").unwrap());
        for (cache, seed) in [(&mut c, 5u64), (&mut fp, 5)] {
            fill(cache, &mut SplitMix64::new(seed), 64, 64);
        }
        let (a, b) = (c.materialize(0).unwrap().1, fp.materialize(0).unwrap().1);
        errs.push(a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f32>());
    }
    assert!(errs.windows(2).all(|w| w[1] < w[0] / 2.0), "{errs:?}");
}

#[test]
fn kvquant_rotates_pre_rope_keys_on_read_and_keeps_the_sink() {
    // Outliers catch keys beyond the calibrated range (without them, those clip).
    let cfg = CacheConfig::kvquant(8, 0.05);
    let mut kvq = build(&cfg);
    let mut fp = build(&CacheConfig::preset("fp32").unwrap());
    let mut rng = SplitMix64::new(9);
    let t = 20;
    let per = SHAPE.batch * SHAPE.kv_heads * t * D;
    let (k, v) = (random(&mut rng, per), random(&mut rng, per));
    // The fp32 cache gets keys rotated by the caller, KVQuant raw keys.
    let r = rope();
    let mut k_rot = k.clone();
    for row in k_rot.chunks_exact_mut(t * D) {
        r.apply_rows(row, 0);
    }
    kvq.append(0, &k, &v, t).unwrap();
    fp.append(0, &k_rot, &v, t).unwrap();
    let (ka, _) = kvq.materialize(0).unwrap();
    let (kb, _) = fp.materialize(0).unwrap();
    // What attention reads is exactly the stored (pre-RoPE) keys rotated to their positions.
    let (mut stored, _) = kvq.materialize_stored(0).unwrap();
    for row in stored.chunks_exact_mut(t * D) {
        r.apply_rows(row, 0);
    }
    assert!(stored == ka);
    let mean_err = ka.iter().zip(&kb).map(|(a, b)| (a - b).abs()).sum::<f32>() / ka.len() as f32;
    assert!(mean_err < 0.05, "8-bit KVQuant keys after RoPE: mean error {mean_err}");
    // The sink token is f16-exact.
    assert_eq!(kvq.info().sink_len, 1);
    for s in 0..SHAPE.batch * SHAPE.kv_heads {
        for c in 0..D {
            let (a, b) = (ka[s * t * D + c], kb[s * t * D + c]);
            assert!((a - b).abs() <= 2e-3 * (1.0 + b.abs()), "sink {a} vs {b}");
        }
    }
}

#[test]
fn past_only_attends_to_the_current_step_at_full_precision() {
    let base = CacheConfig::kivi(2, 2, 4, 0);
    let past_only = CacheConfig { past_only: true, ..base.clone() };
    let mut rng = SplitMix64::new(21);
    let per = SHAPE.batch * SHAPE.kv_heads * D;
    let (k, v) = (random(&mut rng, per * 4), random(&mut rng, per * 4));
    let q = random(&mut rng, SHAPE.batch * 6 * 4 * D);
    let run = |cfg: &CacheConfig| {
        let mut c = build(cfg);
        c.append(0, &k, &v, 4).unwrap();
        let mut out = vec![0f32; q.len()];
        c.attend(0, &q, 6, 4, &mut out).unwrap();
        out
    };
    let (a, b, exact) = (run(&past_only), run(&base), run(&CacheConfig::preset("fp32").unwrap()));
    // With one 4-token step and no past, past-only attention is the full-precision one.
    for (x, y) in a.iter().zip(&exact) {
        assert!((x - y).abs() <= 1e-5);
    }
    assert!(b.iter().zip(&exact).any(|(x, y)| (x - y).abs() > 1e-3));
}

#[test]
fn select_rows_reorders_sequences_and_reset_empties() {
    let mut cache = build(&CacheConfig::kivi(2, 2, 8, 4));
    fill(&mut cache, &mut SplitMix64::new(2), 40, 40);
    let (k, _) = cache.materialize(0).unwrap();
    let row = SHAPE.kv_heads * 40 * D;
    cache.select_rows(&[1, 1, 0]).unwrap();
    assert_eq!(cache.shape().batch, 3);
    let (k2, _) = cache.materialize(0).unwrap();
    assert!(k2[..row] == k[row..2 * row]);
    assert!(k2[row..2 * row] == k[row..2 * row]);
    assert!(k2[2 * row..] == k[..row]);
    assert!(matches!(cache.select_rows(&[3]), Err(KvqError::InvalidParam(_))));
    assert!(cache.select_rows(&[]).is_err());
    cache.reset();
    assert_eq!((cache.seq_len(), cache.memory_bytes()), (0, 0));
}

#[test]
fn bad_cache_input_is_a_typed_error() {
    let mut cache = build(&CacheConfig::preset("kivi-2").unwrap());
    let per = SHAPE.batch * SHAPE.kv_heads * D;
    let good = vec![0.5f32; per];
    let mut nan = good.clone();
    nan[3] = f32::NAN;
    assert!(matches!(cache.append(0, &nan, &good, 1), Err(KvqError::NonFinite { .. })));
    let mut inf = good.clone();
    inf[0] = f32::NEG_INFINITY;
    assert!(matches!(cache.append(0, &good, &inf, 1), Err(KvqError::NonFinite { .. })));
    assert!(matches!(cache.append(0, &good[1..], &good, 1), Err(KvqError::Shape(_))));
    assert!(matches!(cache.append(5, &good, &good, 1), Err(KvqError::LayerOutOfRange { layer: 5, layers: 2 })));
    assert_eq!(cache.seq_len(), 0, "failed appends must leave the cache untouched");
    cache.append(0, &good, &good, 1).unwrap();
    let mut out = vec![0f32; SHAPE.batch * 6 * D];
    assert!(matches!(cache.attend(0, &out.clone(), 4, 1, &mut out), Err(KvqError::Shape(_))));
    assert!(matches!(cache.attend(0, &vec![0f32; SHAPE.batch * 6 * 2 * D], 6, 2, &mut vec![0f32; SHAPE.batch * 6 * 2 * D]), Err(KvqError::Shape(_))));
    assert!(matches!(cache.attend(0, &[], 6, 0, &mut []), Err(KvqError::Shape(_))));
    let mut nan_q = vec![0f32; SHAPE.batch * 6 * D];
    nan_q[5] = f32::NAN;
    assert!(matches!(cache.attend(0, &nan_q, 6, 1, &mut out), Err(KvqError::NonFinite { .. })));
    assert!(matches!(cache.append(0, &[], &[], usize::MAX / 2), Err(KvqError::Shape(_))));
    assert!(matches!(cache.set_padding(&[0, 1]), Err(KvqError::InvalidParam(_))), "padding on a non-empty cache");
    assert!(matches!(cache.set_padding(&[0]), Err(KvqError::Shape(_))));

    let bad = |cfg: CacheConfig| Cache::new(&cfg, SHAPE, Some(rope()), None).unwrap_err();
    assert_eq!(bad(CacheConfig::kivi(0, 2, 8, 0)), KvqError::InvalidBits(0));
    assert_eq!(bad(CacheConfig::kivi(2, 9, 8, 0)), KvqError::InvalidBits(9));
    assert_eq!(bad(CacheConfig::kivi(2, 2, 0, 0)), KvqError::ZeroGroupSize);
    assert!(matches!(bad(CacheConfig::per_token(4, 6, 0)), KvqError::GroupSizeNotDividing { group: 6, len: 64, .. }));
    assert!(matches!(bad(CacheConfig::kivi(2, 2, 6, 0)), KvqError::GroupSizeNotDividing { .. }));
    assert!(matches!(bad(CacheConfig::kvquant(4, 0.01)), KvqError::InvalidParam(_)), "KVQuant without calibration");
    assert!(matches!(bad(CacheConfig::kvquant(4, 1.5)), KvqError::InvalidParam(_)));
    assert!(matches!(bad(CacheConfig::new(Scheme::Full(FullPrecision::Fp8))), KvqError::Unsupported(_)));
    let pre = CacheConfig { pre_rope: true, ..CacheConfig::preset("fp16").unwrap() };
    assert!(matches!(Cache::new(&pre, SHAPE, None, None), Err(KvqError::InvalidParam(_))));
    // A calibration for other bits is refused.
    assert!(matches!(Cache::new(&CacheConfig::kvquant(3, 0.01), SHAPE, Some(rope()), Some(calibration(2, 0.01))), Err(KvqError::InvalidParam(_))));
    assert!(matches!(CacheConfig::preset("kivi-3"), Err(KvqError::UnknownPreset { .. })));
    // Lengths beyond any sane cache are refused, not overflowed.
    assert!(matches!(bad(CacheConfig::kivi(2, 2, 32, usize::MAX)), KvqError::InvalidParam(_)));
    assert!(matches!(bad(CacheConfig::kivi(2, 2, 1 << 40, 0)), KvqError::InvalidParam(_)));
    assert!(matches!(bad(CacheConfig { sink_tokens: 1, ..CacheConfig::preset("fp32").unwrap() }), KvqError::InvalidParam(_)));
    assert!(Cache::none(CacheShape { head_dim: 3, ..SHAPE }).is_err());
    assert!(Cache::none(CacheShape { batch: 0, ..SHAPE }).is_err());
    // A calibration only goes with KVQuant, and with keys stored the same way.
    assert!(matches!(Cache::new(&CacheConfig::preset("fp16").unwrap(), SHAPE, Some(rope()), Some(calibration(2, 0.01))), Err(KvqError::InvalidParam(_))));
    let post = CacheConfig { pre_rope: false, ..CacheConfig::kvquant(2, 0.01) };
    assert!(matches!(Cache::new(&post, SHAPE, Some(rope()), Some(calibration(2, 0.01))), Err(KvqError::InvalidParam(_))));
    let mut broken = (*calibration(2, 0.01)).clone();
    broken.layers[1].key_scale.pop();
    assert!(matches!(Cache::new(&CacheConfig::kvquant(2, 0.01), SHAPE, Some(rope()), Some(Arc::new(broken))), Err(KvqError::Shape(_))));
    let g = geometry();
    assert!(cache_bytes(&g, &CacheConfig::preset("fp16").unwrap(), usize::MAX / 2, 1000).is_err());
}

#[test]
fn cache_specs_name_a_preset_and_its_overrides() {
    use kvq::cache::parse_cache_spec;
    let (name, o) = parse_cache_spec("kivi-2:group=128:residual=64").unwrap();
    assert_eq!(name, "kivi-2");
    let cfg = o.apply(CacheConfig::preset("kivi-2").unwrap()).unwrap();
    assert_eq!(cfg.label(), "kivi-2 (g128 r64) past-only");
    let (_, o) = parse_cache_spec("kvquant-2:outliers=0:sink=0").unwrap();
    let cfg = o.apply(CacheConfig::preset("kvquant-2").unwrap()).unwrap();
    assert!(cfg.label().starts_with("kvquant-2 (0% outliers) sink0"), "{}", cfg.label());
    // A spec's own value wins over a global one.
    let global = kvq::cache::Overrides { group_size: Some(32), residual_length: Some(16), ..Default::default() };
    let merged = global.then(&parse_cache_spec("kivi-4:group=64").unwrap().1);
    assert_eq!((merged.group_size, merged.residual_length), (Some(64), Some(16)));
    for (bad, why) in [
        ("kivi-2:group", "not key=value"),
        ("kivi-2:group=x", "whole number"),
        ("kivi-2:colour=red", "unknown key"),
        ("kivi-2:outliers=0.1", "does not apply"),
        ("kvquant-2:outliers=2", "between 0 and 1"),
        ("kivi-2:past-only=maybe", "true or false"),
        ("kivi-2:bits=9", "bits must be between 1 and 8"),
        ("nope-3:bits=2", "unknown"),
    ] {
        let e = parse_cache_spec(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn packed_stream_exposes_the_bytes_the_cache_counts() {
    // The GPU kernels' check compares their bytes with this view, so it must be what
    // the cache holds: codes and params for the quantized tokens, the rest in the tail.
    let cfg = CacheConfig::kivi(2, 4, 8, 12);
    let mut cache = build(&cfg);
    let mut rng = SplitMix64::new(5);
    fill(&mut cache, &mut rng, 45, 7);
    let (mut codes, mut params, mut tail) = (0, 0, 0);
    for s in 0..SHAPE.batch * SHAPE.kv_heads {
        let (k, v) = cache.packed_stream(1, s).unwrap();
        // Keys: blocks of 8 tokens once they leave the 12-token window; values at once.
        assert_eq!((k.quantized, v.quantized), (32, 33));
        assert_eq!(k.codes.len(), 32 * D * 2 / 8);
        assert_eq!(k.params.len(), 32 / 8 * D);
        assert_eq!(v.codes.len(), 33 * D * 4 / 8);
        assert_eq!(v.params.len(), 33 * D / 8);
        assert_eq!((k.tail.len(), v.tail.len()), ((45 - 32) * D, 12 * D));
        codes += k.codes.len() + v.codes.len();
        params += 4 * (k.params.len() + v.params.len());
        tail += 2 * (k.tail.len() + v.tail.len());
    }
    let (kb, vb) = cache.key_value_bytes();
    assert_eq!(codes * SHAPE.layers, kb.codes + vb.codes);
    assert_eq!(params * SHAPE.layers, kb.params + vb.params);
    assert_eq!(tail * SHAPE.layers, kb.full + vb.full);
    assert!(matches!(cache.packed_stream(0, 99), Err(KvqError::InvalidParam(_))));
    assert!(matches!(cache.packed_stream(2, 0), Err(KvqError::LayerOutOfRange { .. })));
    let fp16 = build(&CacheConfig::preset("fp16").unwrap());
    assert!(matches!(fp16.packed_stream(0, 0), Err(KvqError::Unsupported(_))));
}

#[test]
fn the_gpu_layout_is_the_cpu_cache_bytes_plus_its_rings() {
    // Two independent formulas: the GPU layer's (kvq::size::PackedGpuLayout, which
    // cuda::PackedGpuLayer allocates by) and the CPU size math, with no window so that
    // every token is packed on the CPU side too.
    for (spec, d, n) in [("kivi-2", 64, 8192), ("kivi-4:group=128", 128, 4096), ("kivi-2:group=64", 64, 1000), ("kivi-4:k-bits=2", 128, 96), ("per-token-4", 64, 1000), ("per-token-2:group=32", 128, 777)] {
        let cfg = CacheConfig::from_spec(&format!("{spec}:residual=0"), &kvq::cache::Overrides::default()).unwrap();
        let l = kvq::size::PackedGpuLayout::of(&cfg, d, n).unwrap();
        assert!(l.capacity >= n && (l.token_keys || l.capacity % l.group == 0), "{spec}");
        let g = ModelGeometry { name: "one stream".into(), layers: 1, q_heads: 1, kv_heads: 1, head_dim: d };
        let cpu = cache_bytes(&g, &cfg, l.capacity, 1).unwrap();
        assert_eq!(cpu.full, 0, "{spec}");
        assert_eq!(l.stream_bytes(), cpu.codes + cpu.params + (l.kring + l.vring) * d * 2, "{spec}");
    }
    assert!(kvq::size::PackedGpuLayout::of(&CacheConfig::preset("kvquant-2").unwrap(), 64, 100).is_none());
}

#[test]
fn the_gpu_layout_quantizes_when_the_cpu_cache_does() {
    // The GPU layer quantizes by PackedGpuLayout::quantized_after and appends at most
    // `chunk` tokens a step (its rings are sized for that); the CPU stores have their own
    // rules (store.rs). Fed the same appends, both must hold the same tokens quantized,
    // and no more tokens may wait unquantized than the rings hold.
    let mut rng = SplitMix64::new(3);
    for spec in ["kivi-2", "kivi-4:group=64", "kivi-2:residual=0", "per-token-4", "per-token-2:residual=100", "per-token-4:residual=0:group=32"] {
        let cfg = CacheConfig::from_spec(spec, &kvq::cache::Overrides::default()).unwrap();
        let l = kvq::size::PackedGpuLayout::of(&cfg, D, 4096).unwrap();
        let shape = CacheShape { layers: 1, batch: 1, kv_heads: 1, head_dim: D };
        let mut cpu = Cache::new(&cfg, shape, None, None).unwrap();
        let (mut len, mut nqk, mut nqv) = (0, 0, 0);
        for step in [1, 7, l.chunk, 3, l.chunk, l.chunk, 100, 1, 1, 250, l.chunk, 64] {
            let mut left = step;
            while left > 0 {
                let c = left.min(l.chunk);
                let (k, v) = (random(&mut rng, c * D), random(&mut rng, c * D));
                cpu.append(0, &k, &v, c).unwrap();
                len += c;
                left -= c;
                // The append lands in the rings before anything is quantized.
                assert!(len - nqk <= l.kring && len - nqv <= l.vring, "{spec}: {len} held, {nqk}/{nqv} quantized, rings {}/{}", l.kring, l.vring);
                let (qk, qv) = l.quantized_after(len, nqk);
                let info = cpu.info();
                assert_eq!((qk, qv), (info.key_quantized_len, info.quantized_len), "{spec} at {len} tokens");
                (nqk, nqv) = (qk, qv);
            }
        }
    }
}
