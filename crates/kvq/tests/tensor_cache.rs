//! The tensor cache (K/V as candle tensors on the model's device) and the model's
//! device path (q/k/v handed over as tensors, RoPE on the device): on the CPU they must
//! compute what the host path with kvq's CPU cache computes. On a GPU the same code is
//! the fp16 baseline of `kvq bench gpu-e2e`.

use candle_core::Device;
use kvq::cache::{CacheConfig, FullPrecision, KvCache, Scheme};
use kvq::generate::{generate, GenerateOptions, Sampling};
use kvq::model::{Llama, LlamaConfig};
use kvq::tensor_cache::TensorCache;
use kvq::KvqError;

fn model() -> Llama {
    Llama::random(LlamaConfig::tiny(), 3, &Device::Cpu).unwrap()
}

fn config(p: FullPrecision) -> CacheConfig {
    CacheConfig::new(Scheme::Full(p))
}

/// max |a − b| / max |b| over the logits of a prompt fed in chunks, then decode steps.
fn logits_error(p: FullPrecision, batch: usize) -> f64 {
    let m = model();
    let cap = m.config.max_seq_len;
    let mut host = m.new_cache(&config(p), batch, None).unwrap();
    let mut dev = TensorCache::new(&config(p), m.cache_shape(batch), cap, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..batch * 40).map(|i| (i * 31 % 250) as u32).collect();
    let (mut err, mut max) = (0f64, 0f64);
    let mut compare = |a: candle_core::Tensor, b: candle_core::Tensor| {
        let (a, b) = (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        for (x, y) in a.iter().zip(&b) {
            err = err.max((x - y).abs() as f64);
            max = max.max(y.abs() as f64);
        }
    };
    // Prompts of 24 tokens in chunks of 8 (causal attention inside a chunk), then 16 steps.
    let row = |b: usize, r: std::ops::Range<usize>| ids[b * 40 + r.start..b * 40 + r.end].to_vec();
    for c in 0..3 {
        let chunk: Vec<u32> = (0..batch).flat_map(|b| row(b, 8 * c..8 * c + 8)).collect();
        compare(m.forward(&chunk, batch, &mut dev, true).unwrap(), m.forward(&chunk, batch, &mut host, true).unwrap());
    }
    for s in 24..40 {
        let step: Vec<u32> = (0..batch).flat_map(|b| row(b, s..s + 1)).collect();
        compare(m.forward(&step, batch, &mut dev, false).unwrap(), m.forward(&step, batch, &mut host, false).unwrap());
    }
    assert_eq!(dev.seq_len(), 40);
    let (hk, hv) = host.materialize(1).unwrap();
    let (dk, dv) = dev.materialize(1).unwrap();
    let kv_err = hk.iter().chain(&hv).zip(dk.iter().chain(&dv)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let kv_max = hk.iter().chain(&hv).map(|a| a.abs()).fold(0f32, f32::max);
    // Layer 1's K/V come from layer 0's attention: f16 (bf16) products move them by an ulp.
    let bound = match p {
        FullPrecision::F32 => 1e-5,
        FullPrecision::Bf16 => 5e-2,
        _ => 1e-2,
    };
    assert!(kv_err <= bound * kv_max, "{p:?}: stored K/V differ by {kv_err} (max {kv_max}), logits by {:.2e}", err / max);
    err / max
}

#[test]
fn the_device_path_computes_what_the_host_path_does() {
    let e32 = logits_error(FullPrecision::F32, 2);
    assert!(e32 < 1e-5, "fp32: logits differ by {e32:.2e}");
    // f16 K/V both ways; the tensor cache also multiplies in f16.
    let e16 = logits_error(FullPrecision::F16, 3);
    assert!(e16 < 2e-2, "fp16: logits differ by {e16:.2e}");
    // bf16: 8 significant bits where f16 has 11.
    let eb16 = logits_error(FullPrecision::Bf16, 2);
    assert!(eb16 < 1e-1, "bf16: logits differ by {eb16:.2e}");
    println!("fp32 {e32:.2e}, fp16 {e16:.2e}, bf16 {eb16:.2e}");
}

#[test]
fn greedy_generation_is_the_same_with_either_cache() {
    let m = model();
    let prompts = vec![vec![5u32, 17, 99, 3, 42, 8], vec![11u32, 2, 7, 200, 1, 64]];
    let opts = GenerateOptions { max_new_tokens: 20, sampling: Sampling::greedy(), stop_tokens: Vec::new(), pad_token: 0 };
    let mut host = m.new_cache(&config(FullPrecision::F32), 2, None).unwrap();
    let mut dev = TensorCache::new(&config(FullPrecision::F32), m.cache_shape(2), 64, &Device::Cpu).unwrap();
    let a = generate(&m, &mut host, &prompts, &opts, |_, _| {}).unwrap();
    let b = generate(&m, &mut dev, &prompts, &opts, |_, _| {}).unwrap();
    assert_eq!(a.tokens, b.tokens);
}

#[test]
fn the_tensor_cache_rejects_what_it_cannot_hold() {
    let m = model();
    let shape = m.cache_shape(1);
    let kivi = CacheConfig::from_spec("kivi-2", &Default::default()).unwrap();
    assert!(matches!(TensorCache::new(&kivi, shape, 64, &Device::Cpu), Err(KvqError::Unsupported(_))));
    assert!(matches!(TensorCache::new(&config(FullPrecision::F16), shape, 0, &Device::Cpu), Err(KvqError::InvalidParam(_))));
    let mut c = TensorCache::new(&config(FullPrecision::F16), shape, 8, &Device::Cpu).unwrap();
    assert!(matches!(c.set_padding(&[2]), Err(KvqError::Unsupported(_))));
    let ids: Vec<u32> = (0..6).collect();
    m.forward(&ids, 1, &mut c, false).unwrap();
    // 6 held + 6 more > 8: refused, and the failed forward leaves the cache empty.
    assert!(matches!(m.forward(&ids, 1, &mut c, false), Err(KvqError::ContextOverflow { .. })));
    assert_eq!(c.seq_len(), 0);
    assert!(matches!(c.attend(9, &[0.0; 64], 1, 1, &mut [0.0; 64]), Err(KvqError::InvalidParam(_))));
    // Non-finite or out-of-range K/V: a typed error naming the value, nothing stored.
    let n = 2 * 3 * 64;
    let mut k = vec![0.5f32; n];
    k[77] = f32::NAN;
    assert!(matches!(c.append(0, &k, &vec![0.5; n], 3), Err(KvqError::NonFinite { index: 77, .. })));
    k[77] = 1e6;
    assert!(matches!(c.append(0, &vec![0.5; n], &k, 3), Err(KvqError::OutOfRange { index: 77, .. })));
    assert_eq!(c.seq_len(), 0);
}
