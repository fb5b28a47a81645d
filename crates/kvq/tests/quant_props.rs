//! Property tests of the quantization primitives.

use half::f16;
use kvq::quant::outliers::{outlier_count, split_by_magnitude};
use kvq::quant::{pack, packed_len, unpack, Axis, Codebook, QuantizedMatrix};
use kvq::KvqError;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// pack → unpack is exact for every width and any length, and uses ceil(n·b/8) bytes.
    #[test]
    fn pack_roundtrip(bits in 1u8..=8, raw in prop::collection::vec(any::<u8>(), 0..300)) {
        let codes: Vec<u8> = raw.iter().map(|&c| if bits == 8 { c } else { c % (1 << bits) }).collect();
        let packed = pack(&codes, bits).unwrap();
        prop_assert_eq!(packed.len(), packed_len(codes.len(), bits));
        prop_assert_eq!(packed.len(), (codes.len() * bits as usize).div_ceil(8));
        let mut back = vec![0u8; codes.len()];
        unpack(&packed, bits, &mut back).unwrap();
        prop_assert_eq!(back, codes);
    }

    /// Every element is within half a step of its reconstruction, on both axes.
    #[test]
    fn uniform_error_at_most_half_step(
        bits in 1u32..=8,
        tokens_groups in 1usize..5,
        channel_groups in 1usize..5,
        group in prop::sample::select(vec![1usize, 2, 3, 8, 16, 32]),
        per_channel in any::<bool>(),
        seed in any::<u64>(),
        spread in prop::sample::select(vec![1e-3f32, 1.0, 50.0, 5000.0]),
    ) {
        let axis = if per_channel { Axis::PerChannel } else { Axis::PerToken };
        let (tokens, channels) = match axis {
            Axis::PerChannel => (tokens_groups * group, channel_groups),
            Axis::PerToken => (tokens_groups, channel_groups * group),
        };
        let mut rng = kvq::rng::SplitMix64::new(seed);
        let data: Vec<f32> = (0..tokens * channels).map(|_| rng.normal() * spread + rng.uniform(spread)).collect();
        let q = QuantizedMatrix::quantize(&data, tokens, channels, axis, group, bits).unwrap();
        let back = q.dequantize();
        for t in 0..tokens {
            for c in 0..channels {
                let (x, y) = (data[t * channels + c], back[t * channels + c]);
                let bound = 0.5 * q.step_at(t, c).unwrap() * (1.0 + 1e-5) + 1e-6 * x.abs();
                prop_assert!((x - y).abs() <= bound, "x={x} y={y} bound={bound} bits={bits}");
            }
        }
        // The layout's bytes: packed codes per group + 4 bytes of f16 min/scale per group.
        let groups = tokens * channels / group;
        prop_assert_eq!(q.bytes(), groups * (packed_len(group, bits as u8) + 4));
    }

    /// A learned codebook encodes every value to its nearest level.
    #[test]
    fn codebook_nearest_level(bits in 1u32..=4, seed in any::<u64>(), n in 1usize..400) {
        let mut rng = kvq::rng::SplitMix64::new(seed);
        let xs: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let cb = Codebook::kmeans(&xs, None, bits, 50).unwrap();
        prop_assert_eq!(cb.levels().len(), 1 << bits);
        for &x in &xs {
            let code = cb.encode(x);
            let err = (cb.decode(code).unwrap() - x).abs();
            for &l in cb.levels() {
                prop_assert!(err <= (l - x).abs() + 1e-6);
            }
        }
    }

    /// Outliers are kept exactly (as f16) and are the largest magnitudes.
    #[test]
    fn outliers_exact(seed in any::<u64>(), len in 1usize..200, frac in 0.0f32..1.0) {
        let mut rng = kvq::rng::SplitMix64::new(seed);
        let xs: Vec<f32> = (0..len).map(|_| rng.normal() * 10.0).collect();
        let n = outlier_count(frac, len);
        let (dense, sparse) = split_by_magnitude(&xs, n, 0.0).unwrap();
        prop_assert_eq!(sparse.index.len(), n);
        let smallest_kept = sparse.index.iter().map(|&i| xs[i as usize].abs()).fold(f32::INFINITY, f32::min);
        for (i, &x) in xs.iter().enumerate() {
            match sparse.index.iter().position(|&j| j as usize == i) {
                Some(k) => {
                    prop_assert_eq!(sparse.value[k], f16::from_f32(x));
                    prop_assert_eq!(dense[i], 0.0);
                }
                None => prop_assert!(x.abs() <= smallest_kept),
            }
        }
    }
}

#[test]
fn k_means_finds_separated_clusters() {
    let mut xs = Vec::new();
    for c in [-3.0f32, -1.0, 1.0, 3.0] {
        for i in 0..100 {
            xs.push(c + (i as f32 - 50.0) * 1e-3);
        }
    }
    let cb = Codebook::kmeans(&xs, None, 2, 100).unwrap();
    for (l, c) in cb.levels().iter().zip([-3.0f32, -1.0, 1.0, 3.0]) {
        assert!((l - c).abs() < 2e-3, "{:?}", cb.levels());
    }
    // Weights pull a level: weight the left half of the +3 cluster heavily.
    let w: Vec<f32> = xs.iter().map(|&x| if (2.5..3.0).contains(&x) { 100.0 } else { 1.0 }).collect();
    let cbw = Codebook::kmeans(&xs, Some(&w), 2, 100).unwrap();
    assert!(cbw.levels()[3] < cb.levels()[3]);
}

#[test]
fn bad_quantizer_input_is_a_typed_error() {
    let data = vec![0.5f32; 64];
    assert_eq!(QuantizedMatrix::quantize(&data, 1, 64, Axis::PerToken, 32, 0).unwrap_err(), KvqError::InvalidBits(0));
    assert_eq!(QuantizedMatrix::quantize(&data, 1, 64, Axis::PerToken, 32, 9).unwrap_err(), KvqError::InvalidBits(9));
    assert_eq!(QuantizedMatrix::quantize(&data, 1, 64, Axis::PerToken, 0, 4).unwrap_err(), KvqError::ZeroGroupSize);
    assert!(matches!(
        QuantizedMatrix::quantize(&data, 1, 64, Axis::PerToken, 48, 4),
        Err(KvqError::GroupSizeNotDividing { group: 48, len: 64, .. })
    ));
    assert!(matches!(
        QuantizedMatrix::quantize(&data, 64, 1, Axis::PerChannel, 48, 4),
        Err(KvqError::GroupSizeNotDividing { group: 48, len: 64, .. })
    ));
    assert!(matches!(QuantizedMatrix::quantize(&data, 2, 64, Axis::PerToken, 32, 4), Err(KvqError::Shape(_))));
    let mut bad = data.clone();
    bad[7] = f32::NAN;
    assert!(matches!(QuantizedMatrix::quantize(&bad, 1, 64, Axis::PerToken, 32, 4), Err(KvqError::NonFinite { index: 7, .. })));
    bad[7] = f32::INFINITY;
    assert!(matches!(QuantizedMatrix::quantize(&bad, 1, 64, Axis::PerToken, 32, 4), Err(KvqError::NonFinite { index: 7, .. })));
    bad[7] = 1e6;
    assert!(matches!(QuantizedMatrix::quantize(&bad, 1, 64, Axis::PerToken, 32, 4), Err(KvqError::OutOfRange { index: 7, .. })));
    assert!(matches!(pack(&[0, 4], 2), Err(KvqError::CodeOutOfRange { code: 4, index: 1, bits: 2 })));
    assert_eq!(pack(&[1], 9).unwrap_err(), KvqError::InvalidBits(9));
    assert_eq!(pack(&[0], 0).unwrap_err(), KvqError::InvalidBits(0));
    assert_eq!(unpack(&[0], 40, &mut [0u8; 1]).unwrap_err(), KvqError::InvalidBits(40));
    assert!(split_by_magnitude(&[], 1, 0.0).unwrap().1.index.is_empty());
    assert!(split_by_magnitude(&vec![1.0; 70_000], 1, 0.0).is_err());
    let cb = Codebook::uniform(-1.0, 1.0, 2).unwrap();
    assert_eq!(cb.decode(5), None);
    assert!(kvq::cache::KvQuantCalibration::fit(&[kvq::cache::LayerSamples { keys: &[], values: &[], tokens: 1 }], 1, 0, 2, 0.01, true).is_err());
    assert!(Codebook::kmeans(&[], None, 2, 10).is_err());
    assert!(Codebook::kmeans(&[1.0], Some(&[-1.0]), 2, 10).is_err());
}

#[test]
fn extreme_ranges_keep_finite_scales() {
    // ±MAX_ABS_VALUE at 1 bit is the widest step an f16 scale must hold.
    let m = kvq::error::MAX_ABS_VALUE;
    let q = QuantizedMatrix::quantize(&[-m, m], 1, 2, Axis::PerToken, 2, 1).unwrap();
    assert!(q.params[0].scale.to_f32().is_finite() && q.params[0].min.to_f32() <= -m);
    assert_eq!(q.dequantize(), vec![q.params[0].min.to_f32(), q.params[0].min.to_f32() + q.params[0].scale.to_f32()]);
    // A constant group reconstructs exactly.
    let q = QuantizedMatrix::quantize(&[0.1f32; 32], 1, 32, Axis::PerToken, 32, 2).unwrap();
    assert!(q.dequantize().iter().all(|&y| (y - 0.1).abs() <= 0.5 * q.step_at(0, 0).unwrap() * (1.0 + 1e-5)));
    assert!(q.step_at(0, 0).unwrap() < 1e-4);
    assert_eq!(q.step_at(1, 0), None);
    assert_eq!(q.step_at(0, 32), None);
}
