//! # Exercise 6: picking outliers
//!
//! KVQuant keeps the few largest-magnitude values of a vector aside, exactly, so they
//! do not stretch the range the rest is quantized over. Return the indices of the
//! `k` values with the largest `|x|`, in ascending index order. On ties, prefer the
//! lower index.
//!
//! Hint: sort the indices by `|x|` descending (then by index), keep `k`, sort again.

/// Indices of the `k` largest `|x|`, ascending.
pub fn top_k_outliers(xs: &[f32], k: usize) -> Vec<usize> {
    let _ = (xs, k);
    todo!()
}
