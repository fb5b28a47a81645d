use kvq::rng::SplitMix64;
use kvq_exercises::ex03_uniform::{dequantize, quantize};

#[test]
fn error_is_at_most_half_a_step() {
    let mut rng = SplitMix64::new(3);
    for bits in [1u32, 2, 3, 4, 8] {
        let xs: Vec<f32> = (0..64).map(|_| rng.normal() * 3.0).collect();
        let (codes, min, scale) = quantize(&xs, bits);
        let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(min, lo);
        assert!((scale - (hi - lo) / ((1u32 << bits) - 1) as f32).abs() < 1e-6);
        assert!(codes.iter().all(|&q| (q as u32) < (1 << bits)));
        for (x, y) in xs.iter().zip(dequantize(&codes, min, scale)) {
            assert!((x - y).abs() <= scale / 2.0 + 1e-5, "bits {bits}: {x} vs {y}");
        }
    }
}

#[test]
fn extremes_and_constants_are_exact() {
    let (codes, min, scale) = quantize(&[-1.0, 0.0, 2.0], 2);
    assert_eq!(codes, vec![0, 1, 3]);
    assert_eq!(dequantize(&codes, min, scale), vec![-1.0, 0.0, 2.0]);
    let (codes, min, scale) = quantize(&[0.5; 8], 4);
    assert_eq!(codes, vec![0; 8]);
    assert_eq!(dequantize(&codes, min, scale), vec![0.5; 8]);
}
