//! # Exercise 3: asymmetric uniform quantization of one group
//!
//! With `b` bits there are `2^b` levels, evenly spaced from the group's minimum `m`
//! to its maximum `M`: `scale = (M − m) / (2^b − 1)`, and each value is stored as the
//! code of its nearest level, `q = round((x − m) / scale)`. Reading it back gives
//! `m + q · scale`, at most half a step away from `x`.
//!
//! Hint: when all values are equal, `scale` is 0: every code is 0.

/// Quantizes `xs` to `bits`-bit codes. Returns `(codes, min, scale)`.
pub fn quantize(xs: &[f32], bits: u32) -> (Vec<u8>, f32, f32) {
    let _ = (xs, bits);
    todo!("min, max, scale = (max − min) / (2^bits − 1), then round each value")
}

/// Reads codes back: `min + q · scale`.
pub fn dequantize(codes: &[u8], min: f32, scale: f32) -> Vec<f32> {
    let _ = (codes, min, scale);
    todo!()
}
