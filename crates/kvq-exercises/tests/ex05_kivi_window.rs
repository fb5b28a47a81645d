use kvq::cache::{Cache, CacheConfig, CacheShape, KvCache};
use kvq_exercises::ex05_kivi_window::kivi_quantized;

#[test]
fn the_hint() {
    assert_eq!(kivi_quantized(200, 32, 128), (64, 72));
    assert_eq!(kivi_quantized(100, 32, 128), (0, 0));
    assert_eq!(kivi_quantized(160, 32, 128), (32, 32));
}

#[test]
fn agrees_with_a_real_kivi_cache() {
    let shape = CacheShape { layers: 1, batch: 1, kv_heads: 1, head_dim: 8 };
    for (group, residual) in [(4usize, 0usize), (4, 6), (8, 5)] {
        let mut cache = Cache::new(&CacheConfig::kivi(2, 2, group, residual), shape, None, None).unwrap();
        for t in 1..=40 {
            let k: Vec<f32> = (0..8).map(|c| ((t * 8 + c) % 13) as f32).collect();
            cache.append(0, &k, &k, 1).unwrap();
            let info = cache.info();
            assert_eq!(kivi_quantized(t, group, residual), (info.key_quantized_len, info.quantized_len), "t={t} g={group} r={residual}");
        }
    }
}
