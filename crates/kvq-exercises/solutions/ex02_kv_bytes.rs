//! # Exercise 2: how many bytes a KV cache takes
//!
//! For every layer, every KV head and every token, the cache keeps one key and one
//! value vector of `head_dim` numbers:
//! `bytes = 2 · layers · kv_heads · head_dim · seq · batch · bytes_per_element`.
//!
//! With grouped-query attention (GQA) only the KV heads count, not the query heads.
//! `bytes_per_element` may be fractional (4-bit codes are 0.5 bytes).
//!
//! Hint: multiply in f64, then round to the nearest whole byte.

/// Bytes of a KV cache holding `seq` tokens for `batch` sequences.
pub fn kv_cache_bytes(layers: u64, kv_heads: u64, head_dim: u64, seq: u64, batch: u64, bytes_per_element: f64) -> u64 {
    (2.0 * (layers * kv_heads * head_dim * seq * batch) as f64 * bytes_per_element).round() as u64
}
