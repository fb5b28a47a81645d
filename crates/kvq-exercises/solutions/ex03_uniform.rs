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
    let min = xs.iter().copied().fold(f32::INFINITY, f32::min);
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let qmax = ((1u32 << bits) - 1) as f32;
    let scale = (max - min) / qmax;
    let codes = xs
        .iter()
        .map(|&x| if scale > 0.0 { ((x - min) / scale).round().clamp(0.0, qmax) as u8 } else { 0 })
        .collect();
    (codes, min, scale)
}

/// Reads codes back: `min + q · scale`.
pub fn dequantize(codes: &[u8], min: f32, scale: f32) -> Vec<f32> {
    codes.iter().map(|&q| min + q as f32 * scale).collect()
}
