//! # Exercise 7: one query attending over a cache
//!
//! Decoding one token, its query `q` meets every cached key: scores
//! `s_j = q·k_j / √d`, weights `p = softmax(s)`, and the output is `Σ_j p_j v_j`.
//!
//! Hint: subtract the largest score before `exp`, so nothing overflows.

/// Attention of one query over cached keys and values (each a vector of length `d`).
pub fn attend(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f32> {
    let scale = 1.0 / (q.len() as f32).sqrt();
    let scores: Vec<f32> = keys.iter().map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale).collect();
    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
    let z: f32 = w.iter().sum();
    let mut out = vec![0f32; values.first().map_or(0, Vec::len)];
    for (p, v) in w.iter().zip(values) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += p / z * x;
        }
    }
    out
}
