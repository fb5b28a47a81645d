//! K/V sample files: capture, round trip, and the committed SmolLM2 sample.

use candle_core::Device;
use kvq::model::{Llama, LlamaConfig};
use kvq::rope::{Rope, RopeStyle};
use kvq::sample::KvSample;

#[test]
fn capture_round_trips_and_keys_are_the_rotated_raw_keys() {
    let m = Llama::random(LlamaConfig::tiny(), 1234, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 512).collect();
    let s = m.capture_sample(&ids, &[0, 3], "tiny", "test ids", "test").unwrap();
    assert_eq!(s.data.len(), 2 * 2 * 3);
    let back = KvSample::from_bytes(&s.to_bytes().unwrap()).unwrap();
    assert_eq!(back.header.arrays.len(), s.header.arrays.len());
    for (a, b) in s.data.iter().zip(&back.data) {
        for (x, y) in a.iter().zip(b) {
            assert_eq!(half::f16::from_f32(*x).to_f32(), *y);
        }
    }
    let rope = Rope::new(s.header.rope_theta, s.header.head_dim, RopeStyle::Half, 64);
    let mut raw = s.get(3, 1, "keys_pre_rope").unwrap().to_vec();
    rope.apply_rows(&mut raw, 0);
    for (x, y) in raw.iter().zip(s.get(3, 1, "keys").unwrap()) {
        assert!((x - y).abs() < 1e-4);
    }
    assert!(m.capture_sample(&ids, &[4], "tiny", "", "").is_err());
    assert!(m.capture_sample(&[], &[0], "tiny", "", "").is_err());
}

#[test]
fn bad_sample_files_are_errors() {
    assert!(KvSample::from_bytes(b"nope").is_err());
    assert!(KvSample::from_bytes(b"KVQS\x02\x00\x00\x00\x00\x00\x00\x00").is_err());
    let m = Llama::random(LlamaConfig::tiny(), 1, &Device::Cpu).unwrap();
    let bytes = m.capture_sample(&[1, 2, 3], &[0], "tiny", "", "").unwrap().to_bytes().unwrap();
    assert!(KvSample::from_bytes(&bytes[..bytes.len() - 1]).is_err());
}

#[test]
fn the_committed_smollm2_sample() {
    let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/smollm2-kv-sample.kvs")).unwrap();
    let s = KvSample::from_bytes(&bytes).unwrap();
    assert_eq!((s.header.tokens, s.header.head_dim), (512, 64));
    assert_eq!(s.data.len(), 3 * 3 * 3);
    // Real keys have outlier channels: some channel's mean |k| is several times the median channel's.
    let k = s.get(15, 0, "keys_pre_rope").unwrap();
    let mut chan: Vec<f32> = (0..64).map(|c| (0..512).map(|t| k[t * 64 + c].abs()).sum::<f32>() / 512.0).collect();
    chan.sort_by(f32::total_cmp);
    assert!(chan[63] > 4.0 * chan[32], "max channel {} vs median {}", chan[63], chan[32]);
}
