//! Dense-and-sparse decomposition (KVQuant): the few values farthest from the bulk are
//! kept aside exactly (as f16 value + u16 index within their vector), so they no longer
//! stretch the range the dense part is quantized over.

use crate::error::{KvqError, Result};
use half::f16;

/// The longest vector an outlier index (u16) can address.
pub const MAX_VECTOR: usize = 1 << 16;

/// Bytes one outlier takes: f16 value + u16 index.
pub const OUTLIER_BYTES: usize = 4;

// ANCHOR: outlier_count
/// How many of `len` values a fraction keeps: `ceil(frac · len)`, so any positive
/// fraction keeps at least one (1% of a 64-channel head is one value).
pub fn outlier_count(frac: f32, len: usize) -> usize {
    if frac <= 0.0 {
        0
    } else {
        ((frac as f64 * len as f64).ceil() as usize).min(len)
    }
}
// ANCHOR_END: outlier_count

/// The sparse part of one vector: indices (ascending) and f16 values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sparse {
    pub index: Vec<u16>,
    pub value: Vec<f16>,
}

/// Indices of the `count` entries with the largest `score` (ties → lower index first),
/// returned in ascending order. `score` is typically `|x − centre| / scale`.
/// `score` has at most 65,536 entries (indices are u16); callers check.
pub(crate) fn top_outliers(score: &[f32], count: usize, out: &mut Vec<u16>) {
    out.clear();
    if count == 0 || score.is_empty() {
        return;
    }
    let mut idx: Vec<u16> = (0..score.len() as u16).collect();
    let count = count.min(idx.len());
    idx.select_nth_unstable_by(count - 1, |&a, &b| {
        score[b as usize].total_cmp(&score[a as usize]).then(a.cmp(&b))
    });
    out.extend_from_slice(&idx[..count]);
    out.sort_unstable();
}

/// Splits `xs` into a dense vector (outliers replaced by `fill`) and the sparse outliers,
/// chosen as the `count` largest `|x|`.
pub fn split_by_magnitude(xs: &[f32], count: usize, fill: f32) -> Result<(Vec<f32>, Sparse)> {
    if xs.len() > MAX_VECTOR {
        return Err(KvqError::Shape(format!("outlier indices are u16: a vector may hold at most {MAX_VECTOR} values, got {}", xs.len())));
    }
    let score: Vec<f32> = xs.iter().map(|x| x.abs()).collect();
    let mut index = Vec::new();
    top_outliers(&score, count, &mut index);
    let mut dense = xs.to_vec();
    let value = index
        .iter()
        .map(|&i| {
            dense[i as usize] = fill;
            f16::from_f32(xs[i as usize])
        })
        .collect();
    Ok((dense, Sparse { index, value }))
}
