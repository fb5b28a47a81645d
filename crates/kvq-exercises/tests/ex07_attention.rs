use kvq::cache::{Cache, CacheConfig, CacheShape, KvCache};
use kvq::rng::SplitMix64;
use kvq_exercises::ex07_attention::attend;

#[test]
fn two_keys_by_hand() {
    // Equal scores: the output is the mean of the values.
    let out = attend(&[1.0, 0.0], &[vec![1.0, 0.0], vec![1.0, 0.0]], &[vec![2.0, 0.0], vec![0.0, 4.0]]);
    assert!((out[0] - 1.0).abs() < 1e-6 && (out[1] - 2.0).abs() < 1e-6);
}

#[test]
fn same_as_kvq_over_an_fp32_cache() {
    let d = 16;
    let shape = CacheShape { layers: 1, batch: 1, kv_heads: 1, head_dim: d };
    let mut cache = Cache::new(&CacheConfig::preset("fp32").unwrap(), shape, None, None).unwrap();
    let mut rng = SplitMix64::new(7);
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    for _ in 0..50 {
        let k: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
        let v: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
        cache.append(0, &k, &v, 1).unwrap();
        keys.push(k);
        values.push(v);
    }
    let q: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
    let mut want = vec![0f32; d];
    cache.attend(0, &q, 1, 1, &mut want).unwrap();
    for (a, b) in attend(&q, &keys, &values).iter().zip(&want) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}
