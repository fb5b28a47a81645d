use kvq::cache::FullPrecision;
use kvq::size::{full_precision_bytes, ModelGeometry, MODEL_PRESETS};
use kvq_exercises::ex02_kv_bytes::kv_cache_bytes;

#[test]
fn the_seed_numbers() {
    // Llama-3-8B (32 layers, 8 KV heads, d 128), 100k tokens, fp16: the seed's "13 GB".
    assert_eq!(kv_cache_bytes(32, 8, 128, 100_000, 1, 2.0), 13_107_200_000);
    // nanoGPT (6 layers, 6 heads, d 64), 1024 tokens, 4 bits, no scales counted.
    assert_eq!(kv_cache_bytes(6, 6, 64, 1024, 1, 0.5), 2_359_296);
}

#[test]
fn agrees_with_kvq_for_every_preset() {
    for &(name, ..) in MODEL_PRESETS {
        let g = ModelGeometry::preset(name).unwrap();
        for (seq, batch) in [(1, 1), (8192, 1), (4096, 200)] {
            let want = full_precision_bytes(&g, seq, batch, FullPrecision::F16) as u64;
            let got = kv_cache_bytes(g.layers as u64, g.kv_heads as u64, g.head_dim as u64, seq as u64, batch as u64, 2.0);
            assert_eq!(got, want, "{name} at {seq} tokens × {batch}");
        }
    }
}
