//! Quality of a cache: perplexity of a text streamed through the model with that
//! cache, and how far its next-token distributions drift from a full-precision
//! reference (KL divergence, top-1 agreement) — all caches run in lockstep over the
//! same tokens, so no logits need to be stored.

use crate::cache::KvCache;
use crate::error::{KvqError, Result};
use crate::model::Llama;
use candle_core::D;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// What one cache scored on one text.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRow {
    pub cache: String,
    /// Tokens predicted (the text's length minus one).
    pub predicted: usize,
    pub nll: f64,
    pub ppl: f64,
    /// Mean KL(reference ‖ cache) over positions, in nats.
    pub kl: f64,
    /// Fraction of positions whose argmax equals the reference's.
    pub top1_agreement: f64,
    /// Bytes the cache held at the end, and per token.
    pub bytes: usize,
    pub bytes_per_token: f64,
    pub effective_bits: f64,
    pub seconds: f64,
}

#[derive(Default)]
struct Acc {
    nll: f64,
    kl: f64,
    agree: usize,
    n: usize,
    seconds: f64,
}

/// Streams `ids` through the model `chunk` tokens at a time (1 = token by token,
/// exactly as in decoding) with the reference cache and each cache in `caches`.
/// `progress(done, total)` is called after each chunk.
pub fn evaluate(model: &Llama, ids: &[u32], reference: (&str, &mut dyn KvCache), caches: &mut [(String, Box<dyn KvCache>)], chunk: usize, mut progress: impl FnMut(usize, usize)) -> Result<(EvalRow, Vec<EvalRow>)> {
    if ids.len() < 2 {
        return Err(KvqError::InvalidParam("perplexity needs at least two tokens".into()));
    }
    if chunk == 0 {
        return Err(KvqError::InvalidParam("chunk must be at least 1".into()));
    }
    if ids.len() > model.config.max_seq_len {
        return Err(KvqError::ContextOverflow { len: ids.len(), max: model.config.max_seq_len });
    }
    let (ref_name, ref_cache) = reference;
    ref_cache.reset();
    for (_, c) in caches.iter_mut() {
        c.reset();
    }
    let mut ref_acc = Acc::default();
    let mut accs: Vec<Acc> = caches.iter().map(|_| Acc::default()).collect();
    let mut pos = 0;
    while pos < ids.len() - 1 {
        // Positions pos..end predict tokens pos+1..end+1.
        let end = (pos + chunk).min(ids.len() - 1);
        let feed = &ids[pos..end];
        let targets = &ids[pos + 1..end + 1];
        let t0 = Instant::now();
        let ref_lp = log_probs(model, feed, ref_cache)?;
        ref_acc.seconds += t0.elapsed().as_secs_f64();
        score(&mut ref_acc, &ref_lp, &ref_lp, targets);
        for ((_, c), acc) in caches.iter_mut().zip(accs.iter_mut()) {
            let t0 = Instant::now();
            let lp = log_probs(model, feed, c.as_mut())?;
            acc.seconds += t0.elapsed().as_secs_f64();
            score(acc, &lp, &ref_lp, targets);
        }
        pos = end;
        progress(pos + 1, ids.len());
    }
    let row = |name: &str, a: &Acc, c: &dyn KvCache| {
        let info = c.info();
        let tokens = info.total_seq_len.max(1);
        EvalRow {
            cache: name.to_string(),
            predicted: a.n,
            nll: a.nll / a.n as f64,
            ppl: (a.nll / a.n as f64).exp(),
            kl: a.kl / a.n as f64,
            top1_agreement: a.agree as f64 / a.n as f64,
            bytes: info.memory_bytes,
            bytes_per_token: info.memory_bytes as f64 / tokens as f64,
            effective_bits: info.effective_bits,
            seconds: a.seconds,
        }
    };
    let reference_row = row(ref_name, &ref_acc, ref_cache);
    let rows = caches.iter().zip(&accs).map(|((n, c), a)| row(n, a, c.as_ref())).collect();
    Ok((reference_row, rows))
}

/// [`evaluate`] over consecutive windows of `window` tokens (the last one may be shorter,
/// if it has at least two), each from an empty cache: the same tokens are scored at any
/// context length, only how much of the past they see changes. Rows are averaged over
/// all predicted tokens; bytes are those of the longest window.
pub fn evaluate_windows(model: &Llama, ids: &[u32], window: usize, reference: (&str, &mut dyn KvCache), caches: &mut [(String, Box<dyn KvCache>)], chunk: usize, mut progress: impl FnMut(usize, usize)) -> Result<(EvalRow, Vec<EvalRow>)> {
    if window < 2 {
        return Err(KvqError::InvalidParam(format!("a window needs at least two tokens, got {window}")));
    }
    let (ref_name, ref_cache) = reference;
    let windows: Vec<&[u32]> = ids.chunks(window).filter(|w| w.len() >= 2).collect();
    if windows.is_empty() {
        return Err(KvqError::InvalidParam("perplexity needs at least two tokens".into()));
    }
    let mut sums: Option<(EvalRow, Vec<EvalRow>)> = None;
    let mut done = 0;
    for w in windows {
        let (r, rows) = evaluate(model, w, (ref_name, &mut *ref_cache), caches, chunk, |d, _| progress(done + d, ids.len()))?;
        done += w.len();
        sums = Some(match sums {
            None => (r, rows),
            Some((acc_r, acc_rows)) => (merge(acc_r, &r), acc_rows.into_iter().zip(&rows).map(|(a, b)| merge(a, b)).collect()),
        });
    }
    Ok(sums.expect("at least one window"))
}

/// Two rows of the same cache over different tokens, weighted by tokens predicted.
fn merge(a: EvalRow, b: &EvalRow) -> EvalRow {
    let n = (a.predicted + b.predicted) as f64;
    let avg = |x: f64, y: f64| (x * a.predicted as f64 + y * b.predicted as f64) / n;
    let nll = avg(a.nll, b.nll);
    let longest = if b.bytes > a.bytes { b } else { &a };
    EvalRow {
        cache: a.cache.clone(),
        predicted: a.predicted + b.predicted,
        nll,
        ppl: nll.exp(),
        kl: avg(a.kl, b.kl),
        top1_agreement: avg(a.top1_agreement, b.top1_agreement),
        bytes: longest.bytes,
        bytes_per_token: longest.bytes_per_token,
        effective_bits: longest.effective_bits,
        seconds: a.seconds + b.seconds,
    }
}

/// Log-probabilities `[t][vocab]` of the next token at each fed position.
fn log_probs(model: &Llama, feed: &[u32], cache: &mut dyn KvCache) -> Result<Vec<Vec<f32>>> {
    let logits = model.forward(feed, 1, cache, true)?;
    let lp = candle_nn::ops::log_softmax(&logits.squeeze(0)?, D::Minus1)?;
    Ok(lp.to_vec2::<f32>()?)
}

fn score(acc: &mut Acc, lp: &[Vec<f32>], ref_lp: &[Vec<f32>], targets: &[u32]) {
    for ((row, r), &t) in lp.iter().zip(ref_lp).zip(targets) {
        acc.nll -= row[t as usize] as f64;
        let mut kl = 0f64;
        for (&q, &p) in row.iter().zip(r) {
            let pf = (p as f64).exp();
            if pf > 0.0 {
                kl += pf * (p as f64 - q as f64);
            }
        }
        acc.kl += kl.max(0.0);
        if argmax(row) == argmax(r) {
            acc.agree += 1;
        }
        acc.n += 1;
    }
}

fn argmax(xs: &[f32]) -> usize {
    xs.iter().enumerate().fold(0, |b, (i, &x)| if x > xs[b] { i } else { b })
}

/// A cache fed K/V with relative noise of size `sigma`: each value is multiplied by
/// `1 + sigma·u`, `u` uniform in [-1, 1) from a seeded generator. With `sigma` a few f32
/// ulps (1e-7 .. 1e-6) it asks how far a cache's perplexity moves when only the last bits
/// of its inputs change, which is all two machines' matmuls differ by. A full-precision
/// cache barely moves; a 2-bit cache can move in the third digit, because a value at a
/// rounding boundary (or a group's min or scale) flips and the next layers carry it on.
pub struct NoisyKv {
    inner: Box<dyn KvCache>,
    sigma: f32,
    rng: crate::rng::SplitMix64,
}

impl NoisyKv {
    pub fn new(inner: Box<dyn KvCache>, sigma: f32, seed: u64) -> Result<Self> {
        if !(sigma.is_finite() && (0.0..0.5).contains(&sigma)) {
            return Err(KvqError::InvalidParam(format!("K/V noise must be in [0, 0.5), got {sigma}")));
        }
        Ok(NoisyKv { inner, sigma, rng: crate::rng::SplitMix64::new(seed) })
    }

    fn noised(&mut self, xs: &[f32]) -> Vec<f32> {
        xs.iter().map(|&x| x * (1.0 + self.rng.uniform(self.sigma))).collect()
    }
}

impl KvCache for NoisyKv {
    fn config(&self) -> &crate::cache::CacheConfig {
        self.inner.config()
    }
    fn shape(&self) -> crate::cache::CacheShape {
        self.inner.shape()
    }
    fn wants_pre_rope_keys(&self) -> bool {
        self.inner.wants_pre_rope_keys()
    }
    fn seq_len(&self) -> usize {
        self.inner.seq_len()
    }
    fn set_padding(&mut self, row_start: &[usize]) -> Result<()> {
        self.inner.set_padding(row_start)
    }
    fn padding(&self) -> &[usize] {
        self.inner.padding()
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], tokens: usize) -> Result<()> {
        let (k, v) = (self.noised(k), self.noised(v));
        self.inner.append(layer, &k, &v, tokens)
    }
    fn attend(&mut self, layer: usize, q: &[f32], q_heads: usize, tokens: usize, out: &mut [f32]) -> Result<()> {
        self.inner.attend(layer, q, q_heads, tokens, out)
    }
    fn materialize(&self, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.inner.materialize(layer)
    }
    fn bytes(&self) -> crate::size::Bytes {
        self.inner.bytes()
    }
    fn info(&self) -> crate::cache::CacheInfo {
        self.inner.info()
    }
    fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        self.inner.select_rows(rows)
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{CacheConfig, FullPrecision, Scheme};
    use crate::model::{Llama, LlamaConfig};
    use candle_core::Device;

    fn fp32(m: &Llama) -> Box<dyn KvCache> {
        Box::new(m.new_cache(&CacheConfig::new(Scheme::Full(FullPrecision::F32)), 1, None).unwrap())
    }

    #[test]
    fn noisy_kv_perturbs_by_at_most_sigma_and_zero_noise_changes_nothing() {
        let m = Llama::random(LlamaConfig::tiny(), 1, &Device::Cpu).unwrap();
        let ids: Vec<u32> = (0..40).map(|i| (i * 37 % 200) as u32).collect();
        let mut plain = fp32(&m);
        let mut quiet = NoisyKv::new(fp32(&m), 0.0, 1).unwrap();
        let mut loud = NoisyKv::new(fp32(&m), 1e-3, 1).unwrap();
        m.forward(&ids, 1, plain.as_mut(), false).unwrap();
        m.forward(&ids, 1, &mut quiet, false).unwrap();
        m.forward(&ids, 1, &mut loud, false).unwrap();
        // Layer 0's K/V come from the embeddings alone: the noise is all that differs.
        let (k0, v0) = plain.materialize(0).unwrap();
        let (kq, vq) = quiet.materialize(0).unwrap();
        assert_eq!((&k0, &v0), (&kq, &vq));
        let (kl, vl) = loud.materialize(0).unwrap();
        let mut moved = 0;
        for (a, b) in k0.iter().chain(&v0).zip(kl.iter().chain(&vl)) {
            assert!((a - b).abs() <= 1.0001e-3 * a.abs(), "{a} vs {b}");
            moved += (a != b) as usize;
        }
        assert!(moved > k0.len(), "noise left most values unchanged ({moved} moved)");
    }

    #[test]
    fn noisy_kv_rejects_bad_sigma() {
        let m = Llama::random(LlamaConfig::tiny(), 1, &Device::Cpu).unwrap();
        for s in [f32::NAN, -1e-6, 0.5, f32::INFINITY] {
            assert!(matches!(NoisyKv::new(fp32(&m), s, 0), Err(KvqError::InvalidParam(_))), "{s}");
        }
    }
}
