//! Autoregressive generation, with a cache or without one.
//!
//! With a cache, the prompt goes through the model once (prefill) and each later step
//! feeds only the newest token: `O(n)` work per token, `O(n²)` for `n` tokens. Without
//! one ([`Cache::none`](crate::Cache::none)), every step feeds the whole sequence
//! again: `O(n²)` per token, `O(n³)` for `n` tokens. The loop below is the same for
//! both: it feeds whatever the cache does not hold yet.

use crate::cache::KvCache;
use crate::error::{KvqError, Result};
use crate::model::Llama;
use crate::rng::SplitMix64;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability.
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling { temperature: 0.0, top_p: 1.0, seed: 0 }
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(KvqError::InvalidParam(format!("temperature must be ≥ 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(KvqError::InvalidParam(format!("top-p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// Picks tokens from logits.
pub struct Sampler {
    params: Sampling,
    rng: SplitMix64,
    order: Vec<usize>,
    probs: Vec<f32>,
}

impl Sampler {
    pub fn new(params: Sampling) -> Result<Self> {
        params.validate()?;
        let rng = SplitMix64::new(params.seed);
        Ok(Sampler { params, rng, order: Vec::new(), probs: Vec::new() })
    }

    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(KvqError::InvalidParam("no logits to sample from".into()));
        }
        // -inf is a legitimate (masked) logit; NaN and +inf are not.
        if let Some(i) = logits.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
            return Err(KvqError::NonFinite { what: "logits", index: i, value: logits[i] });
        }
        if logits.iter().all(|x| *x == f32::NEG_INFINITY) {
            return Err(KvqError::InvalidParam("every logit is -inf: nothing to sample".into()));
        }
        let argmax = || logits.iter().enumerate().fold(0, |b, (i, &x)| if x > logits[b] { i } else { b }) as u32;
        if self.params.temperature == 0.0 {
            return Ok(argmax());
        }
        let t = self.params.temperature;
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.probs.clear();
        self.probs.extend(logits.iter().map(|&x| ((x - m) / t).exp()));
        let total: f32 = self.probs.iter().sum();
        self.order.clear();
        self.order.extend(0..logits.len());
        let p = &self.probs;
        self.order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        // The nucleus: most likely first, until top_p of the mass is covered.
        let mut kept = 0.0;
        let mut n = 0;
        for &i in &self.order {
            kept += p[i] / total;
            n += 1;
            if kept >= self.params.top_p {
                break;
            }
        }
        let mut r = self.rng.next_f32() * self.order[..n].iter().map(|&i| p[i]).sum::<f32>();
        for &i in &self.order[..n] {
            r -= p[i];
            if r <= 0.0 {
                return Ok(i as u32);
            }
        }
        Ok(self.order[n - 1] as u32)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// A row stops when it produces one of these.
    pub stop_tokens: Vec<u32>,
    /// Fills the left padding of shorter prompts and the steps after a row stopped.
    pub pad_token: u32,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 32, sampling: Sampling::greedy(), stop_tokens: Vec::new(), pad_token: 0 }
    }
}

/// One step of the generation loop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    pub step: usize,
    /// Tokens fed to the model per row in this step (the prompt, 1, or the whole prefix).
    pub tokens_fed: usize,
    /// Sequence length the step ran on (padding included; the sampled token not yet).
    pub seq_len: usize,
    pub latency_s: f64,
    pub cache_bytes: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// New tokens of each row (stop token included, padding not).
    pub tokens: Vec<Vec<u32>>,
    pub steps: Vec<StepStats>,
    pub time_to_first_token_s: f64,
    pub total_s: f64,
}

impl Generation {
    /// Decode throughput after the first token, in tokens per second over all rows.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let decode: f64 = self.steps.iter().skip(1).map(|s| s.latency_s).sum();
        let n: usize = self.tokens.iter().map(|t| t.len().saturating_sub(1)).sum();
        if decode > 0.0 {
            n as f64 / decode
        } else {
            0.0
        }
    }
}

/// Generates up to `max_new_tokens` for each prompt, as one batch. The cache must be
/// shaped for `prompts.len()` rows; it is reset first. `on_token(row, token)` is called
/// as each token is chosen (streaming).
pub fn generate(model: &Llama, cache: &mut dyn KvCache, prompts: &[Vec<u32>], opts: &GenerateOptions, mut on_token: impl FnMut(usize, u32)) -> Result<Generation> {
    if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
        return Err(KvqError::EmptyPrompt);
    }
    let batch = prompts.len();
    if cache.shape().batch != batch {
        return Err(KvqError::Shape(format!("the cache holds {} rows, {batch} prompts given", cache.shape().batch)));
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let max_seq = model.config.max_seq_len;
    if longest > max_seq {
        return Err(KvqError::ContextOverflow { len: longest, max: max_seq });
    }
    if opts.pad_token as usize >= model.config.vocab_size {
        return Err(KvqError::InvalidParam(format!("pad token {} is outside the vocabulary of {}", opts.pad_token, model.config.vocab_size)));
    }
    if let Some(&t) = prompts.iter().flatten().find(|&&t| t as usize >= model.config.vocab_size) {
        return Err(KvqError::InvalidParam(format!("token id {t} is outside the vocabulary of {}", model.config.vocab_size)));
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    cache.reset();
    // Left padding: every row ends at the same position; attention skips the pads.
    let row_start: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let mut seqs: Vec<Vec<u32>> = prompts.iter().zip(&row_start).map(|(p, &s)| {
        let mut v = vec![opts.pad_token; s];
        v.extend_from_slice(p);
        v
    }).collect();
    cache.set_padding(&row_start)?;
    let mut out = vec![Vec::new(); batch];
    let mut done = vec![false; batch];
    let mut steps = Vec::new();
    let t_start = Instant::now();
    let mut ttft = 0.0;
    let mut feed = Vec::new();
    for step in 0..opts.max_new_tokens {
        let len = seqs[0].len();
        if len > max_seq {
            break; // the context is full: the last token can be produced but not fed
        }
        // ANCHOR: decode_step
        let from = cache.seq_len();
        feed.clear();
        for s in &seqs {
            feed.extend_from_slice(&s[from..]);
        }
        let t0 = Instant::now();
        let logits = model.forward(&feed, batch, cache, false)?;
        // ANCHOR_END: decode_step
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        let vocab = logits.len() / batch;
        for b in 0..batch {
            let tok = if done[b] { opts.pad_token } else { sampler.sample(&logits[b * vocab..(b + 1) * vocab])? };
            seqs[b].push(tok);
            if !done[b] {
                out[b].push(tok);
                on_token(b, tok);
                done[b] = opts.stop_tokens.contains(&tok);
            }
        }
        let latency = t0.elapsed().as_secs_f64();
        if step == 0 {
            ttft = t_start.elapsed().as_secs_f64();
        }
        steps.push(StepStats { step, tokens_fed: len - from, seq_len: len, latency_s: latency, cache_bytes: cache.memory_bytes() });
        if done.iter().all(|&d| d) {
            break;
        }
    }
    Ok(Generation { tokens: out, steps, time_to_first_token_s: ttft, total_s: t_start.elapsed().as_secs_f64() })
}
