//! KVQuant (Hooper et al., 2024): non-uniform codebooks learned on calibration data,
//! keys normalized per channel with offline (calibrated) centre and scale — taken
//! *before* RoPE, where channels are well behaved — values normalized per token, and
//! the most extreme values of each vector kept aside as sparse f16 outliers.

use super::store::TokenStore;
use crate::error::{check_values, KvqError, Result};
use crate::quant::outliers::{outlier_count, top_outliers, OUTLIER_BYTES};
use crate::quant::pack::{check_bits, pack_unchecked, packed_len, unpack_unchecked};
use crate::quant::uniform::{f16_ceil, AFFINE_BYTES};
use crate::quant::Codebook;
use crate::size::Bytes;
use half::f16;
use std::sync::Arc;

/// Calibrated constants of one layer.
#[derive(Clone, Debug)]
pub struct LayerCalibration {
    /// Per (KV head, channel) centre of the keys, f16-rounded. `[kv_heads · head_dim]`.
    pub key_center: Vec<f32>,
    /// Per (KV head, channel) half-range of the keys (outliers excluded), f16-rounded.
    pub key_scale: Vec<f32>,
    /// Levels in normalized key space `[-1, 1]`.
    pub key_codebook: Codebook,
    /// Levels in normalized value space `[-1, 1]`.
    pub value_codebook: Codebook,
}

/// Everything a KVQuant cache needs from its calibration pass.
#[derive(Clone, Debug)]
pub struct KvQuantCalibration {
    pub bits: u8,
    /// Whether the keys were recorded before RoPE (a cache must store them the same way).
    pub keys_pre_rope: bool,
    pub outlier_fraction: f32,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: Vec<LayerCalibration>,
}

/// Calibration activations of one layer: keys (before RoPE) and values,
/// laid out `[kv_head][token][dim]`.
pub struct LayerSamples<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub tokens: usize,
}

/// Normalizes a value vector: drops its outliers, then maps the rest's range to [-1, 1].
/// Returns (centre, half-range) as f16, exactly what the cache stores.
fn value_normalizer(xs: &[f32], outliers: &[u16], is_out: &mut [bool]) -> (f16, f16) {
    is_out.iter_mut().for_each(|b| *b = false);
    for &i in outliers {
        is_out[i as usize] = true;
    }
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for (x, &o) in xs.iter().zip(is_out.iter()) {
        if !o {
            lo = lo.min(*x);
            hi = hi.max(*x);
        }
    }
    if lo > hi {
        (lo, hi) = (0.0, 0.0);
    }
    let center = f16::from_f32(0.5 * (lo + hi));
    let c = center.to_f32();
    // Half-range measured from the rounded centre, rounded up: the dense part stays in [-1, 1].
    let half = f16_ceil((hi - c).max(c - lo).max(0.0));
    (center, half)
}

/// Outlier scores of a value vector: distance from its median, so that both tails
/// count (a vector of tens with one zero has the zero as its outlier).
fn value_scores(xs: &[f32], tmp: &mut [f32], score: &mut [f32]) {
    tmp.copy_from_slice(xs);
    let mid = tmp.len() / 2;
    let (_, median, _) = tmp.select_nth_unstable_by(mid, f32::total_cmp);
    let median = *median;
    for (s, x) in score.iter_mut().zip(xs) {
        *s = (x - median).abs();
    }
}

#[inline]
fn normalize(x: f32, center: f32, half: f32) -> f32 {
    if half > 0.0 {
        (x - center) / half
    } else {
        0.0
    }
}

impl KvQuantCalibration {
    /// Fits the per-channel key normalization and both codebooks of every layer.
    pub fn fit(samples: &[LayerSamples], kv_heads: usize, head_dim: usize, bits: u32, outlier_fraction: f32, keys_pre_rope: bool) -> Result<Self> {
        let bits = check_bits(bits)?;
        if head_dim < 2 || head_dim % 2 != 0 || head_dim > u16::MAX as usize || kv_heads == 0 {
            return Err(KvqError::InvalidParam(format!(
                "calibration needs an even head dimension in 2..=65534 and at least one KV head, got {head_dim} and {kv_heads}"
            )));
        }
        if !(0.0..=1.0).contains(&outlier_fraction) {
            return Err(KvqError::InvalidParam(format!("outlier fraction must be between 0 and 1, got {outlier_fraction}")));
        }
        if samples.is_empty() {
            return Err(KvqError::InvalidParam("calibration needs at least one layer of samples".into()));
        }
        let d = head_dim;
        let n_out = outlier_count(outlier_fraction, d);
        let mut layers = Vec::with_capacity(samples.len());
        for s in samples {
            let n = s.tokens;
            if n == 0 || s.keys.len() != kv_heads * n * d || s.values.len() != kv_heads * n * d {
                return Err(KvqError::Shape(format!(
                    "calibration samples must hold {kv_heads} heads × {n} tokens × {d} (and at least one token)"
                )));
            }
            check_values("calibration keys", s.keys)?;
            check_values("calibration values", s.values)?;
            // ANCHOR: key_calibration
            // Keys: per channel, the central (1 − f) of the values sets centre and scale.
            let mut key_center = Vec::with_capacity(kv_heads * d);
            let mut key_scale = Vec::with_capacity(kv_heads * d);
            let mut col = vec![0f32; n];
            for h in 0..kv_heads {
                for c in 0..d {
                    for t in 0..n {
                        col[t] = s.keys[(h * n + t) * d + c];
                    }
                    col.sort_by(f32::total_cmp);
                    let cut = ((outlier_fraction as f64 / 2.0) * n as f64).floor() as usize;
                    let (lo, hi) = (col[cut.min(n - 1)], col[(n - 1).saturating_sub(cut)]);
                    let center = f16::from_f32(0.5 * (lo + hi)).to_f32();
                    let half = f16_ceil((hi - center).max(center - lo).max(1e-6)).to_f32();
                    key_center.push(center);
                    key_scale.push(half);
                }
            }
            // ANCHOR_END: key_calibration
            let mut key_norm = Vec::with_capacity(s.keys.len());
            for h in 0..kv_heads {
                for t in 0..n {
                    for c in 0..d {
                        let i = h * d + c;
                        let x = normalize(s.keys[(h * n + t) * d + c], key_center[i], key_scale[i]);
                        if x.abs() <= 1.0 {
                            key_norm.push(x);
                        }
                    }
                }
            }
            // Values: per token, outliers out, the rest mapped to [-1, 1].
            let mut value_norm = Vec::with_capacity(s.values.len());
            let (mut idx, mut is_out, mut score, mut tmp) = (Vec::new(), vec![false; d], vec![0f32; d], vec![0f32; d]);
            for v in s.values.chunks_exact(d) {
                value_scores(v, &mut tmp, &mut score);
                top_outliers(&score, n_out, &mut idx);
                let (c, h) = value_normalizer(v, &idx, &mut is_out);
                for (x, &o) in v.iter().zip(&is_out) {
                    if !o {
                        value_norm.push(normalize(*x, c.to_f32(), h.to_f32()).clamp(-1.0, 1.0));
                    }
                }
            }
            if key_norm.is_empty() {
                key_norm.push(0.0);
            }
            if value_norm.is_empty() {
                value_norm.push(0.0);
            }
            layers.push(LayerCalibration {
                key_center,
                key_scale,
                key_codebook: Codebook::kmeans(&key_norm, None, bits as u32, 100)?,
                value_codebook: Codebook::kmeans(&value_norm, None, bits as u32, 100)?,
            });
        }
        Ok(KvQuantCalibration { bits, keys_pre_rope, outlier_fraction, kv_heads, head_dim, layers })
    }

    /// Bytes of one layer's constants in the cache: f16 key centre and scale per
    /// channel, and the two f16 codebooks.
    pub fn layer_bytes(&self) -> usize {
        2 * self.kv_heads * self.head_dim * 2 + 2 * (1usize << self.bits) * 2
    }
}

/// Non-uniform codes for one head's vectors, plus sparse outliers per vector.
/// Keys use the calibrated per-channel normalization; values a per-token one.
#[derive(Clone)]
pub(crate) struct NuqStore {
    dim: usize,
    codebook: Codebook,
    /// `Some((centre, scale))` per channel for keys; `None` for values (per token).
    channel_norm: Option<Arc<(Vec<f32>, Vec<f32>)>>,
    n_out: usize,
    len: usize,
    codes: Vec<u8>,
    /// Values only: per-token f16 centre and half-range.
    token_norm: Vec<(f16, f16)>,
    out_index: Vec<u16>,
    out_value: Vec<f16>,
}

impl NuqStore {
    pub fn keys(dim: usize, codebook: Codebook, center: Vec<f32>, scale: Vec<f32>, n_out: usize) -> Self {
        Self::new(dim, codebook, Some(Arc::new((center, scale))), n_out)
    }

    pub fn values(dim: usize, codebook: Codebook, n_out: usize) -> Self {
        Self::new(dim, codebook, None, n_out)
    }

    /// What the store holds, as stored: packed codes, per-token (centre, half-range)
    /// (values only), outlier channels and values (the GPU kernel's check reads them).
    #[cfg(any(test, feature = "cuda"))]
    pub(crate) fn parts(&self) -> (&[u8], &[(f16, f16)], &[u16], &[f16]) {
        (&self.codes, &self.token_norm, &self.out_index, &self.out_value)
    }

    fn new(dim: usize, codebook: Codebook, channel_norm: Option<Arc<(Vec<f32>, Vec<f32>)>>, n_out: usize) -> Self {
        NuqStore {
            dim,
            codebook,
            channel_norm,
            n_out,
            len: 0,
            codes: Vec::new(),
            token_norm: Vec::new(),
            out_index: Vec::new(),
            out_value: Vec::new(),
        }
    }
}

impl TokenStore for NuqStore {
    fn len(&self) -> usize {
        self.len
    }
    fn quantized_len(&self) -> usize {
        self.len
    }
    // ANCHOR: nuq_push
    fn push(&mut self, rows: &[f32]) {
        let d = self.dim;
        let bits = self.codebook.bits();
        let mut norm = vec![0f32; d];
        let mut score = vec![0f32; d];
        let mut codes = vec![0u8; d];
        let mut idx = Vec::with_capacity(self.n_out);
        let mut is_out = vec![false; d];
        let mut tmp = vec![0f32; d];
        for x in rows.chunks_exact(d) {
            match &self.channel_norm {
                Some(cs) => {
                    let (center, scale) = (&cs.0, &cs.1);
                    for c in 0..d {
                        norm[c] = normalize(x[c], center[c], scale[c]);
                        score[c] = norm[c].abs();
                    }
                    top_outliers(&score, self.n_out, &mut idx);
                }
                None => {
                    value_scores(x, &mut tmp, &mut score);
                    top_outliers(&score, self.n_out, &mut idx);
                    let (c, h) = value_normalizer(x, &idx, &mut is_out);
                    for (n, v) in norm.iter_mut().zip(x) {
                        *n = normalize(*v, c.to_f32(), h.to_f32());
                    }
                    self.token_norm.push((c, h));
                }
            }
            for (code, &n) in codes.iter_mut().zip(&norm) {
                *code = self.codebook.encode(n);
            }
            pack_unchecked(&codes, bits, &mut self.codes);
            for &i in &idx {
                self.out_index.push(i);
                self.out_value.push(f16::from_f32(x[i as usize]));
            }
            self.len += 1;
        }
    }
    // ANCHOR_END: nuq_push
    fn read(&self, start: usize, end: usize, out: &mut [f32], scratch: &mut Vec<u8>) {
        let d = self.dim;
        let bits = self.codebook.bits();
        let tb = packed_len(d, bits);
        scratch.resize(d, 0);
        for t in start..end {
            let o = &mut out[(t - start) * d..(t - start + 1) * d];
            unpack_unchecked(&self.codes[t * tb..(t + 1) * tb], bits, scratch);
            match &self.channel_norm {
                Some(cs) => {
                    for c in 0..d {
                        o[c] = cs.0[c] + cs.1[c] * self.codebook.level(scratch[c]);
                    }
                }
                None => {
                    let (c, h) = self.token_norm[t];
                    let (c, h) = (c.to_f32(), h.to_f32());
                    for (x, &q) in o.iter_mut().zip(scratch.iter()) {
                        *x = c + h * self.codebook.level(q);
                    }
                }
            }
            for k in t * self.n_out..(t + 1) * self.n_out {
                o[self.out_index[k] as usize] = self.out_value[k].to_f32();
            }
        }
    }
    fn bytes(&self) -> Bytes {
        Bytes {
            codes: self.codes.len(),
            params: self.token_norm.len() * AFFINE_BYTES,
            outliers: self.out_index.len() * OUTLIER_BYTES,
            ..Bytes::default()
        }
    }
    fn box_clone(&self) -> Box<dyn TokenStore> {
        Box::new(self.clone())
    }
    fn clear(&mut self) {
        self.len = 0;
        self.codes.clear();
        self.token_norm.clear();
        self.out_index.clear();
        self.out_value.clear();
    }
}

/// Checks that a calibration fits a cache's geometry and scheme.
pub(crate) fn check_calibration(c: &KvQuantCalibration, layers: usize, kv_heads: usize, head_dim: usize, bits: u8, frac: f32, pre_rope: bool) -> Result<()> {
    if c.keys_pre_rope != pre_rope {
        return Err(KvqError::InvalidParam(format!(
            "the calibration recorded keys {} RoPE, the cache stores them {}",
            if c.keys_pre_rope { "before" } else { "after" },
            if pre_rope { "before" } else { "after" }
        )));
    }
    for (i, l) in c.layers.iter().enumerate() {
        if l.key_center.len() != kv_heads * head_dim || l.key_scale.len() != kv_heads * head_dim {
            return Err(KvqError::Shape(format!("calibration layer {i}: key centre/scale must hold {} values", kv_heads * head_dim)));
        }
        if l.key_codebook.bits() != bits || l.value_codebook.bits() != bits {
            return Err(KvqError::InvalidParam(format!("calibration layer {i}: codebooks are not {bits}-bit")));
        }
        if let Some(j) = l.key_scale.iter().chain(&l.key_center).position(|x| !x.is_finite()) {
            return Err(KvqError::NonFinite { what: "calibration key centre/scale", index: j, value: f32::NAN });
        }
    }
    if c.layers.len() != layers || c.kv_heads != kv_heads || c.head_dim != head_dim {
        return Err(KvqError::Shape(format!(
            "calibration is for {} layers × {} KV heads × {} dims, the cache has {layers} × {kv_heads} × {head_dim}",
            c.layers.len(),
            c.kv_heads,
            c.head_dim
        )));
    }
    if c.bits != bits || c.outlier_fraction != frac {
        return Err(KvqError::InvalidParam(format!(
            "calibration was fitted for {} bits and {} outliers, the cache asks for {bits} and {frac}",
            c.bits, c.outlier_fraction
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// The layout the GPU kernel (kernels/kvquant.cu) reproduces byte for byte: codes
    /// packed a vector at a time, one (centre, half-range) a value vector, `n_out`
    /// outliers a vector in ascending channel order, stored exactly as f16.
    #[test]
    fn stored_layout() {
        let (d, n, n_out, bits) = (64, 37, 2, 3u32);
        let mut rng = SplitMix64::new(5);
        let x: Vec<f32> = (0..n * d).map(|_| rng.next_f32() * 4.0 - 2.0).collect();
        let cb = Codebook::uniform(-1.0, 1.0, bits).unwrap();
        let center: Vec<f32> = (0..d).map(|c| 0.01 * c as f32).collect();
        for keys in [true, false] {
            let mut st = if keys { NuqStore::keys(d, cb.clone(), center.clone(), vec![1.5; d], n_out) } else { NuqStore::values(d, cb.clone(), n_out) };
            st.push(&x);
            let (codes, norm, idx, val) = st.parts();
            assert_eq!(codes.len(), n * packed_len(d, bits as u8));
            assert_eq!(norm.len(), if keys { 0 } else { n });
            assert_eq!((idx.len(), val.len()), (n * n_out, n * n_out));
            let mut back = vec![0f32; n * d];
            st.read(0, n, &mut back, &mut Vec::new());
            for t in 0..n {
                let i = &idx[t * n_out..(t + 1) * n_out];
                assert!(i.windows(2).all(|w| w[0] < w[1]) && i.iter().all(|&c| (c as usize) < d), "{i:?}");
                for (k, &c) in i.iter().enumerate() {
                    let want = f16::from_f32(x[t * d + c as usize]);
                    assert_eq!(val[t * n_out + k], want);
                    assert_eq!(back[t * d + c as usize], want.to_f32(), "an outlier reads back exactly");
                }
            }
        }
    }
}

