//! # Exercise 5: what KIVI keeps at full precision
//!
//! kvq's KIVI cache keeps the `residual` most recent tokens at full precision.
//! Values older than that are quantized one token at a time, as soon as they leave
//! the window. Keys are quantized per channel over groups of `group` tokens, so a
//! group is quantized only when all its `group` tokens have left the window.
//!
//! Return how many tokens of a `seq`-token sequence have quantized keys and values.
//!
//! Hint: with seq = 200, group = 32, residual = 128: 72 values are quantized, and
//! 64 keys (two whole groups of 32 fit in the 72 older tokens).

/// `(quantized keys, quantized values)` after `seq` tokens.
pub fn kivi_quantized(seq: usize, group: usize, residual: usize) -> (usize, usize) {
    let _ = (seq, group, residual);
    todo!("values: the tokens older than the window; keys: whole groups of them")
}
