//! Generation on the small deterministic decoder: cached and uncached agree, KIVI with a
//! long window equals fp16, batches equal single runs, and bad input gives typed errors.

use candle_core::Device;
use kvq::generate::{generate, GenerateOptions, Sampler, Sampling};
use kvq::model::{Llama, LlamaConfig};
use kvq::{Cache, CacheConfig, KvCache, KvqError};
use std::sync::Arc;

fn model() -> Llama {
    Llama::random(LlamaConfig::tiny(), 1234, &Device::Cpu).unwrap()
}

fn opts(n: usize) -> GenerateOptions {
    GenerateOptions { max_new_tokens: n, ..GenerateOptions::default() }
}

fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 37 + seed * 101 + 5) % 512).collect()
}

fn run(m: &Llama, cfg: &str, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let cfg = CacheConfig::preset(cfg).unwrap();
    let calib = match cfg.scheme {
        kvq::Scheme::KvQuant { bits, outlier_fraction } => Some(Arc::new(m.calibrate_kvquant(&prompt(200, 99), bits, outlier_fraction).unwrap())),
        _ => None,
    };
    let mut cache = m.new_cache(&cfg, prompts.len(), calib).unwrap();
    generate(m, &mut cache, prompts, &opts(n), |_, _| {}).unwrap().tokens
}

#[test]
fn greedy_with_f32_cache_equals_generation_without_cache() {
    let m = model();
    let p = vec![prompt(11, 1)];
    let cached = run(&m, "fp32", &p, 40);
    let uncached = run(&m, "none", &p, 40);
    assert_eq!(cached, uncached);
    assert_eq!(cached[0].len(), 40);
    // And the tokens are not degenerate (the test would pass trivially on a constant model).
    let distinct: std::collections::BTreeSet<_> = cached[0].iter().collect();
    assert!(distinct.len() > 5, "{cached:?}");
}

#[test]
fn logits_with_and_without_cache_agree_step_by_step() {
    let m = model();
    let toks = prompt(30, 2);
    let mut full = Cache::none(m.cache_shape(1)).unwrap();
    let all = m.forward(&toks, 1, &mut full, true).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut cache = m.new_cache(&CacheConfig::preset("fp32").unwrap(), 1, None).unwrap();
    m.forward(&toks[..10], 1, &mut cache, false).unwrap();
    let v = 512;
    for i in 10..30 {
        let step = m.forward(&toks[i..i + 1], 1, &mut cache, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in step.iter().zip(&all[i * v..(i + 1) * v]) {
            assert!((a - b).abs() < 1e-3 * (1.0 + b.abs()), "position {i}: {a} vs {b}");
        }
    }
}

#[test]
fn kivi_with_residual_covering_the_sequence_equals_fp16() {
    let m = model();
    let p = vec![prompt(20, 3)];
    let long_window = CacheConfig::kivi(2, 2, 32, 1000);
    let mut kivi = m.new_cache(&long_window, 1, None).unwrap();
    let mut fp16 = m.new_cache(&CacheConfig::preset("fp16").unwrap(), 1, None).unwrap();
    let a = generate(&m, &mut kivi, &p, &opts(30), |_, _| {}).unwrap();
    let b = generate(&m, &mut fp16, &p, &opts(30), |_, _| {}).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert!(kivi.materialize(2).unwrap() == fp16.materialize(2).unwrap());
    // With the window shorter than the sequence, KIVI really quantizes.
    let mut short = m.new_cache(&CacheConfig::kivi(2, 2, 8, 8), 1, None).unwrap();
    generate(&m, &mut short, &p, &opts(30), |_, _| {}).unwrap();
    assert!(short.materialize(2).unwrap() != fp16.materialize(2).unwrap());
    assert!(short.memory_bytes() < fp16.memory_bytes());
}

#[test]
fn every_preset_generates() {
    let m = model();
    let p = vec![prompt(40, 4)];
    let reference = run(&m, "fp32", &p, 12);
    for name in kvq::cache::PRESETS {
        let out = run(&m, name, &p, 12);
        assert_eq!(out[0].len(), 12, "{name}");
        if matches!(*name, "fp16" | "bf16" | "kivi-4" | "kivi-2") {
            // 40 + 12 tokens fit in KIVI's 128-token window: full precision throughout.
            assert_eq!(out[0][..4], reference[0][..4], "{name}");
        }
    }
}

#[test]
fn a_batch_of_prompts_equals_each_prompt_alone() {
    let m = model();
    let prompts = vec![prompt(7, 5), prompt(15, 6), prompt(11, 7)];
    let batched = run(&m, "fp32", &prompts, 10);
    for (p, b) in prompts.iter().zip(&batched) {
        assert_eq!(&run(&m, "fp32", &[p.clone()], 10)[0], b);
    }
    let uncached = run(&m, "none", &prompts, 10);
    assert_eq!(uncached, batched);
}

#[test]
fn padded_rows_of_quantized_caches_equal_their_solo_runs() {
    // Pads are neither stored nor quantized, sinks start at each row's first real
    // token and RoPE positions restart per row, so a padded row is its solo run.
    let m = model();
    let prompts = vec![prompt(21, 5), prompt(9, 6)];
    for cfg in [CacheConfig::kivi(2, 2, 8, 4), CacheConfig::preset("kvquant-2").unwrap(), CacheConfig::per_token(2, 32, 0)] {
        let calib = match cfg.scheme {
            kvq::Scheme::KvQuant { bits, outlier_fraction } => Some(Arc::new(m.calibrate_kvquant(&prompt(200, 99), bits, outlier_fraction).unwrap())),
            _ => None,
        };
        let mut batch = m.new_cache(&cfg, 2, calib.clone()).unwrap();
        let together = generate(&m, &mut batch, &prompts, &opts(12), |_, _| {}).unwrap().tokens;
        for (row, p) in prompts.iter().enumerate() {
            let mut solo = m.new_cache(&cfg, 1, calib.clone()).unwrap();
            let alone = generate(&m, &mut solo, &[p.clone()], &opts(12), |_, _| {}).unwrap().tokens;
            assert_eq!(together[row], alone[0], "{} row {row}", cfg.label());
        }
        // The padded row holds only its real tokens.
        let mut solo = m.new_cache(&cfg, 1, calib.clone()).unwrap();
        generate(&m, &mut solo, &[prompts[1].clone()], &opts(12), |_, _| {}).unwrap();
        let info = batch.info();
        assert_eq!(info.total_seq_len, 21 + 11);
        assert!(batch.memory_bytes() < 2 * solo.memory_bytes() + 2 * 4 * 2 * 2 * 64 * 12 * 2);
    }
}

#[test]
fn streaming_callback_sees_every_token_and_stats_are_recorded() {
    let m = model();
    let mut cache = m.new_cache(&CacheConfig::preset("kivi-2").unwrap(), 1, None).unwrap();
    let mut seen = Vec::new();
    let g = generate(&m, &mut cache, &[prompt(9, 8)], &opts(15), |row, t| seen.push((row, t))).unwrap();
    assert_eq!(seen.iter().map(|s| s.1).collect::<Vec<_>>(), g.tokens[0]);
    assert_eq!(g.steps.len(), 15);
    assert_eq!(g.steps[0].tokens_fed, 9);
    assert!(g.steps[1..].iter().all(|s| s.tokens_fed == 1));
    assert!(g.steps.windows(2).all(|w| w[1].cache_bytes > w[0].cache_bytes));
    let mut none = Cache::none(m.cache_shape(1)).unwrap();
    let g = generate(&m, &mut none, &[prompt(9, 8)], &opts(5), |_, _| {}).unwrap();
    assert_eq!(g.steps.iter().map(|s| s.tokens_fed).collect::<Vec<_>>(), vec![9, 10, 11, 12, 13]);
}

#[test]
fn sampling_is_seeded_and_top_p_narrows() {
    let m = model();
    let sample = |seed: u64, top_p: f32| {
        let mut cache = m.new_cache(&CacheConfig::preset("fp32").unwrap(), 1, None).unwrap();
        let o = GenerateOptions { max_new_tokens: 20, sampling: Sampling { temperature: 1.0, top_p, seed }, ..GenerateOptions::default() };
        generate(&m, &mut cache, &[prompt(5, 9)], &o, |_, _| {}).unwrap().tokens
    };
    assert_eq!(sample(1, 0.9), sample(1, 0.9));
    assert_ne!(sample(1, 0.9), sample(2, 0.9));
    // A vanishing nucleus keeps only the most likely token: greedy.
    assert_eq!(sample(3, 1e-6), run(&m, "fp32", &[prompt(5, 9)], 20));
    let mut s = Sampler::new(Sampling { temperature: 0.5, top_p: 1.0, seed: 0 }).unwrap();
    assert!(matches!(s.sample(&[0.0, f32::NAN]), Err(KvqError::NonFinite { .. })));
}

#[test]
fn stop_tokens_end_a_row() {
    let m = model();
    let p = prompt(6, 10);
    let free = run(&m, "fp32", &[p.clone()], 10);
    let stop = free[0][3];
    let mut cache = m.new_cache(&CacheConfig::preset("fp32").unwrap(), 1, None).unwrap();
    let o = GenerateOptions { max_new_tokens: 10, stop_tokens: vec![stop], ..GenerateOptions::default() };
    let g = generate(&m, &mut cache, &[p], &o, |_, _| {}).unwrap();
    let first = free[0].iter().position(|&t| t == stop).unwrap();
    assert_eq!(g.tokens[0], free[0][..=first]);
}

#[test]
fn bad_generation_input_is_a_typed_error() {
    let m = model();
    let mut cache = m.new_cache(&CacheConfig::preset("fp16").unwrap(), 1, None).unwrap();
    assert_eq!(generate(&m, &mut cache, &[vec![]], &opts(3), |_, _| {}).unwrap_err(), KvqError::EmptyPrompt);
    assert_eq!(generate(&m, &mut cache, &[], &opts(3), |_, _| {}).unwrap_err(), KvqError::EmptyPrompt);
    assert!(matches!(generate(&m, &mut cache, &[prompt(3, 1), prompt(3, 2)], &opts(3), |_, _| {}), Err(KvqError::Shape(_))));
    assert!(matches!(generate(&m, &mut cache, &[vec![600]], &opts(3), |_, _| {}), Err(KvqError::InvalidParam(_))));
    assert!(matches!(generate(&m, &mut cache, &[prompt(5000, 1)], &opts(3), |_, _| {}), Err(KvqError::ContextOverflow { len: 5000, max: 4096 })));
    let bad = GenerateOptions { sampling: Sampling { temperature: -1.0, top_p: 1.0, seed: 0 }, ..opts(3) };
    assert!(matches!(generate(&m, &mut cache, &[prompt(3, 1)], &bad, |_, _| {}), Err(KvqError::InvalidParam(_))));
    let bad = GenerateOptions { sampling: Sampling { temperature: 1.0, top_p: 0.0, seed: 0 }, ..opts(3) };
    assert!(matches!(generate(&m, &mut cache, &[prompt(3, 1)], &bad, |_, _| {}), Err(KvqError::InvalidParam(_))));
    assert!(m.calibrate_kvquant(&[], 2, 0.01).is_err());
    let mut wrong = Cache::none(kvq::CacheShape { layers: 3, batch: 1, kv_heads: 2, head_dim: 64 }).unwrap();
    assert!(matches!(m.forward(&[1, 2], 1, &mut wrong, false), Err(KvqError::Shape(_))));
    let bad = GenerateOptions { pad_token: 9999, ..opts(3) };
    assert!(matches!(generate(&m, &mut cache, &[prompt(3, 1)], &bad, |_, _| {}), Err(KvqError::InvalidParam(_))));
    // A prompt that fills the context exactly still yields one token.
    let mut c1 = m.new_cache(&CacheConfig::preset("fp16").unwrap(), 1, None).unwrap();
    assert_eq!(generate(&m, &mut c1, &[prompt(4096, 1)], &opts(3), |_, _| {}).unwrap().tokens[0].len(), 1);
    let mut s = Sampler::new(Sampling { temperature: 1.0, top_p: 1.0, seed: 0 }).unwrap();
    assert!(s.sample(&[0.0, f32::INFINITY]).is_err());
    assert!(s.sample(&[f32::NEG_INFINITY; 3]).is_err());
    assert_eq!(s.sample(&[f32::NEG_INFINITY, 0.0]).unwrap(), 1);
}
