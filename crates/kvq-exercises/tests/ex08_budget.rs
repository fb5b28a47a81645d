use kvq::cache::CacheConfig;
use kvq::size::{cache_bytes, ModelGeometry};
use kvq_exercises::ex08_budget::max_batch;

#[test]
fn forty_gib_at_8k_tokens() {
    let g = ModelGeometry::preset("llama-3-8b").unwrap();
    let budget = 40usize << 30;
    // fp16: exactly 1 GiB per sequence at 8192 tokens.
    assert_eq!(max_batch(&g, &CacheConfig::preset("fp16").unwrap(), 8192, budget), 40);
    for preset in ["kivi-2", "kivi-4", "kvquant-2", "per-token-4"] {
        let cfg = CacheConfig::preset(preset).unwrap();
        let b = max_batch(&g, &cfg, 8192, budget);
        assert!(cache_bytes(&g, &cfg, 8192, b).unwrap().total() <= budget, "{preset}");
        assert!(cache_bytes(&g, &cfg, 8192, b + 1).unwrap().total() > budget, "{preset}");
        assert!(b > 100, "{preset}: {b}");
    }
}

#[test]
fn nothing_fits_in_a_tiny_budget() {
    let g = ModelGeometry::preset("llama-3-8b").unwrap();
    assert_eq!(max_batch(&g, &CacheConfig::preset("fp16").unwrap(), 8192, 1000), 0);
}
