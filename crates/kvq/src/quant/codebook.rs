//! Non-uniform quantization: a codebook of `2^bits` levels learned from calibration data
//! by 1-D k-means (Lloyd's algorithm), optionally weighted by each sample's sensitivity
//! (KVQuant weights by Fisher information; any non-negative weights work here).

use super::pack::check_bits;
use crate::error::{check_values, KvqError, Result};
use half::f16;

/// Sorted quantization levels, stored as f16 (2 bytes a level in the cache).
#[derive(Clone, Debug, PartialEq)]
pub struct Codebook {
    levels: Vec<f32>,
    /// Midpoints between adjacent levels: a value's code is how many lie below it.
    bounds: Vec<f32>,
    bits: u8,
}

impl Codebook {
    /// A codebook from explicit levels (rounded to f16 and sorted).
    pub fn from_levels(levels: &[f32], bits: u32) -> Result<Self> {
        let bits = check_bits(bits)?;
        if levels.len() != 1 << bits {
            return Err(KvqError::InvalidParam(format!(
                "a {bits}-bit codebook needs {} levels, got {}",
                1 << bits,
                levels.len()
            )));
        }
        check_values("codebook levels", levels)?;
        let mut lv: Vec<f32> = levels.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        lv.sort_by(f32::total_cmp);
        let bounds = lv.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        Ok(Codebook { levels: lv, bounds, bits })
    }

    /// Uniform levels over `[lo, hi]` (what k-means starts from when data is scarce).
    pub fn uniform(lo: f32, hi: f32, bits: u32) -> Result<Self> {
        let b = check_bits(bits)?;
        let n = 1usize << b;
        let lv: Vec<f32> = (0..n).map(|i| lo + (hi - lo) * i as f32 / (n - 1).max(1) as f32).collect();
        Codebook::from_levels(&lv, bits)
    }

    /// Learns levels by weighted 1-D k-means on `samples` (deterministic).
    ///
    /// Exact Lloyd iterations on the sorted samples with prefix sums: each iteration
    /// costs `O(k log n)`, so millions of calibration values are cheap.
    pub fn kmeans(samples: &[f32], weights: Option<&[f32]>, bits: u32, iters: usize) -> Result<Self> {
        let b = check_bits(bits)?;
        let k = 1usize << b;
        check_values("calibration samples", samples)?;
        if samples.is_empty() {
            return Err(KvqError::InvalidParam("k-means needs at least one sample".into()));
        }
        if let Some(w) = weights {
            if w.len() != samples.len() {
                return Err(KvqError::Shape(format!("{} weights for {} samples", w.len(), samples.len())));
            }
            if let Some(i) = w.iter().position(|&x| !(x >= 0.0 && x.is_finite())) {
                return Err(KvqError::InvalidParam(format!("weight {i} is {} (weights must be finite and ≥ 0)", w[i])));
            }
        }
        let mut pairs: Vec<(f32, f32)> = match weights {
            Some(w) => samples.iter().copied().zip(w.iter().copied()).collect(),
            None => samples.iter().map(|&x| (x, 1.0)).collect(),
        };
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let xs: Vec<f32> = pairs.iter().map(|p| p.0).collect();
        // Prefix sums in f64: cum_w[i] = Σ_{j<i} w_j, cum_wx[i] = Σ_{j<i} w_j x_j.
        let mut cum_w = vec![0f64; xs.len() + 1];
        let mut cum_wx = vec![0f64; xs.len() + 1];
        for (i, &(x, w)) in pairs.iter().enumerate() {
            cum_w[i + 1] = cum_w[i] + w as f64;
            cum_wx[i + 1] = cum_wx[i] + w as f64 * x as f64;
        }
        let total_w = cum_w[xs.len()];
        // Start from weighted quantiles: the centre of each of k equal-weight slices.
        let mut centers: Vec<f64> = (0..k)
            .map(|i| {
                let target = total_w * (i as f64 + 0.5) / k as f64;
                let idx = cum_w[1..].partition_point(|&c| c < target).min(xs.len() - 1);
                xs[idx] as f64
            })
            .collect();
        // ANCHOR: lloyd
        for _ in 0..iters {
            let mut moved = false;
            let mut start = 0usize;
            for c in 0..k {
                let end = if c + 1 == k {
                    xs.len()
                } else {
                    let bound = 0.5 * (centers[c] + centers[c + 1]);
                    start.max(xs.partition_point(|&x| (x as f64) < bound))
                };
                let w = cum_w[end] - cum_w[start];
                if w > 0.0 {
                    let m = (cum_wx[end] - cum_wx[start]) / w;
                    if (m - centers[c]).abs() > 1e-9 * (1.0 + m.abs()) {
                        moved = true;
                    }
                    centers[c] = m;
                }
                start = end;
            }
            centers.sort_by(f64::total_cmp);
            if !moved {
                break;
            }
        }
        // ANCHOR_END: lloyd
        let lv: Vec<f32> = centers.iter().map(|&c| c as f32).collect();
        Codebook::from_levels(&lv, bits)
    }

    pub fn bits(&self) -> u8 {
        self.bits
    }

    pub fn levels(&self) -> &[f32] {
        &self.levels
    }

    /// The midpoints between adjacent levels, ascending: a value's code is how many lie
    /// below it ([`Codebook::encode`]; the GPU kernel counts the same way).
    pub fn bounds(&self) -> &[f32] {
        &self.bounds
    }

    // ANCHOR: encode
    /// Index of the nearest level.
    #[inline]
    pub fn encode(&self, x: f32) -> u8 {
        self.bounds.partition_point(|&b| b < x) as u8
    }
    // ANCHOR_END: encode

    /// The level of a code, or `None` for a code beyond the codebook.
    pub fn decode(&self, code: u8) -> Option<f32> {
        self.levels.get(code as usize).copied()
    }

    /// The level of a code produced by [`Codebook::encode`].
    #[inline]
    pub(crate) fn level(&self, code: u8) -> f32 {
        self.levels[code as usize]
    }

    /// Bytes the codebook takes in a cache (f16 levels).
    pub fn bytes(&self) -> usize {
        2 * self.levels.len()
    }
}
