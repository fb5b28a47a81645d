//! The demo's and lessons' analysis on the real SmolLM2 sample.

use kvq::analysis::{quantize_head, scores, HeadData, Method, ViewConfig};
use kvq::cache::CacheConfig;
use kvq::quant::Axis;
use kvq::rope::RopeStyle;
use kvq::sample::KvSample;
use kvq::size::{cache_bytes, ModelGeometry};
use kvq::KvqError;

fn sample() -> KvSample {
    KvSample::from_bytes(&std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/smollm2-kv-sample.kvs")).unwrap()).unwrap()
}

fn head<'a>(s: &'a KvSample, layer: usize, keys: bool) -> HeadData<'a> {
    let style = if s.header.rope_style == "interleaved" { RopeStyle::Interleaved } else { RopeStyle::Half };
    HeadData {
        keys,
        data: s.get(layer, 0, if keys { "keys" } else { "values" }).unwrap(),
        pre_rope: keys.then(|| (s.get(layer, 0, "keys_pre_rope").unwrap(), s.header.rope_theta, style)),
        tokens: s.header.tokens,
        dim: s.header.head_dim,
    }
}

fn cfg(method: Method, bits: u32, group: usize) -> ViewConfig {
    ViewConfig { method, bits, group, residual: 0, outlier_fraction: 0.01 }
}

#[test]
fn keys_want_per_channel_groups() {
    let s = sample();
    for layer in [0, 15, 29] {
        let k = head(&s, layer, true);
        let per_token = quantize_head(&k, &cfg(Method::Uniform { axis: Axis::PerToken }, 2, 64)).unwrap();
        let per_channel = quantize_head(&k, &cfg(Method::Uniform { axis: Axis::PerChannel }, 2, 64)).unwrap();
        assert!(per_channel.relative_error < per_token.relative_error, "layer {layer}: {} vs {}", per_channel.relative_error, per_token.relative_error);
        assert_eq!(per_token.bytes, per_channel.bytes); // same number of groups
    }
}

#[test]
fn every_method_runs_and_more_bits_mean_less_error() {
    let s = sample();
    for keys in [true, false] {
        let h = head(&s, 15, keys);
        for method in [Method::PerToken, Method::Kivi, Method::KvQuant] {
            let e2 = quantize_head(&h, &cfg(method.clone(), 2, 32)).unwrap();
            let e4 = quantize_head(&h, &cfg(method.clone(), 4, 32)).unwrap();
            assert!(e4.relative_error < e2.relative_error && e2.relative_error < 1.0, "{method:?} keys={keys}");
            assert!(e4.bytes > e2.bytes);
            assert_eq!(e2.channel_rms_error.len(), 64);
        }
    }
}

#[test]
fn bytes_are_the_size_estimate() {
    let s = sample();
    let g = ModelGeometry::new("one head", 1, 1, 1, 64).unwrap();
    let (n, k, v) = (s.header.tokens, head(&s, 0, true), head(&s, 0, false));
    for (method, config) in [
        (Method::Kivi, CacheConfig::kivi(2, 2, 32, 128)),
        (Method::PerToken, CacheConfig::per_token(4, 32, 128)),
        (Method::KvQuant, CacheConfig::kvquant(3, 0.01)),
    ] {
        let c = ViewConfig { method, bits: config.bits().0, group: 32, residual: 128, outlier_fraction: 0.01 };
        let total = quantize_head(&k, &c).unwrap().bytes + quantize_head(&v, &c).unwrap().bytes;
        assert_eq!(total, cache_bytes(&g, &config, n, 1).unwrap().total(), "{}", config.label());
    }
    // A window as long as the sample keeps it exact (f16).
    let c = ViewConfig { method: Method::Kivi, bits: 2, group: 32, residual: n, outlier_fraction: 0.0 };
    assert!(quantize_head(&k, &c).unwrap().relative_error < 1e-3);
}

#[test]
fn scores_of_a_query() {
    let s = sample();
    let k = head(&s, 15, true);
    let q = &k.data[(k.tokens - 1) * 64..];
    let exact = scores(q, k.data, 64);
    let quant = quantize_head(&k, &cfg(Method::Kivi, 4, 32)).unwrap();
    let approx = scores(q, &quant.reconstruction, 64);
    assert_eq!(exact.len(), k.tokens);
    let err = exact.iter().zip(&approx).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err > 0.0 && err < 0.1 * exact.iter().map(|x| x.abs()).fold(0f32, f32::max), "{err}");
}

#[test]
fn bad_parameters_are_clear_errors() {
    let s = sample();
    let k = head(&s, 0, true);
    assert_eq!(quantize_head(&k, &cfg(Method::Kivi, 0, 32)).unwrap_err(), KvqError::InvalidBits(0));
    assert_eq!(quantize_head(&k, &cfg(Method::Uniform { axis: Axis::PerToken }, 9, 32)).unwrap_err(), KvqError::InvalidBits(9));
    assert!(matches!(quantize_head(&k, &cfg(Method::Uniform { axis: Axis::PerToken }, 2, 48)), Err(KvqError::GroupSizeNotDividing { .. })));
    assert!(matches!(quantize_head(&k, &cfg(Method::PerToken, 2, 48)), Err(KvqError::GroupSizeNotDividing { .. })));
    let too_many = ViewConfig { outlier_fraction: 1.5, ..cfg(Method::KvQuant, 2, 32) };
    assert!(matches!(quantize_head(&k, &too_many), Err(KvqError::InvalidParam(_))));
    let no_raw = HeadData { pre_rope: None, ..head(&s, 0, true) };
    assert!(matches!(quantize_head(&no_raw, &cfg(Method::KvQuant, 2, 32)), Err(KvqError::InvalidParam(_))));
}
