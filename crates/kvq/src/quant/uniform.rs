//! Asymmetric uniform quantization: `x ≈ min + q · scale`, `q ∈ {0 … 2^bits − 1}`.
//!
//! `min` and `scale` are stored as f16 (as KIVI and HF's quantized caches do), so they
//! count 4 bytes per group. They are rounded *outward* (min down, scale up) so that the
//! whole range of the group stays covered and every element's error is at most half a
//! step: `|x − x̂| ≤ scale / 2`.
//!
//! Rounding rule (the GPU kernels use the same one, so codes are bit-exact):
//! `q = clamp(floor((x − min) · (1/scale) + 0.5), 0, 2^bits − 1)`, all in f32.

use half::f16;

/// The affine parameters of one quantization group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine {
    pub min: f16,
    pub scale: f16,
}

/// Bytes one group's parameters take in a cache (f16 min + f16 scale).
pub const AFFINE_BYTES: usize = 4;

pub(crate) fn f16_next_up(h: f16) -> f16 {
    let b = h.to_bits();
    if b & 0x7fff == 0 {
        f16::from_bits(1)
    } else if b & 0x8000 == 0 {
        f16::from_bits(b + 1)
    } else {
        f16::from_bits(b - 1)
    }
}

pub(crate) fn f16_next_down(h: f16) -> f16 {
    let b = h.to_bits();
    if b & 0x7fff == 0 {
        f16::from_bits(0x8001)
    } else if b & 0x8000 == 0 {
        f16::from_bits(b - 1)
    } else {
        f16::from_bits(b + 1)
    }
}

/// Largest f16 that is ≤ x.
pub fn f16_floor(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() > x {
        f16_next_down(h)
    } else {
        h
    }
}

/// Smallest f16 that is ≥ x.
pub fn f16_ceil(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() < x {
        f16_next_up(h)
    } else {
        h
    }
}

impl Affine {
    // ANCHOR: fit
    /// Parameters covering `[lo, hi]` with `bits`-bit codes (`bits` in 1..=8, checked
    /// by the callers: this runs once per group in the hot loops).
    pub(crate) fn fit(lo: f32, hi: f32, bits: u8) -> Affine {
        let qmax = ((1u32 << bits) - 1) as f32;
        let min = f16_floor(lo);
        let range = hi - min.to_f32();
        let scale = if range > 0.0 { f16_ceil(range / qmax) } else { f16::ZERO };
        Affine { min, scale }
    }
    // ANCHOR_END: fit

    /// Parameters for a group of values.
    pub(crate) fn fit_values(xs: &[f32], bits: u8) -> Affine {
        let (lo, hi) = min_max(xs);
        Affine::fit(lo, hi, bits)
    }

    /// The quantization step (distance between adjacent levels).
    pub fn step(&self) -> f32 {
        self.scale.to_f32()
    }

    // ANCHOR: quantize
    /// Quantizes `xs` into `codes` (same length).
    #[inline]
    pub(crate) fn quantize(&self, xs: &[f32], bits: u8, codes: &mut [u8]) {
        let qmax = ((1u32 << bits) - 1) as f32;
        let min = self.min.to_f32();
        let s = self.scale.to_f32();
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for (c, &x) in codes.iter_mut().zip(xs) {
            *c = ((x - min) * inv + 0.5).floor().clamp(0.0, qmax) as u8;
        }
    }

    /// Reconstructs values from codes.
    #[inline]
    pub fn dequantize(&self, codes: &[u8], out: &mut [f32]) {
        let min = self.min.to_f32();
        let s = self.scale.to_f32();
        for (o, &c) in out.iter_mut().zip(codes) {
            *o = min + c as f32 * s;
        }
    }
    // ANCHOR_END: quantize
}

pub(crate) fn min_max(xs: &[f32]) -> (f32, f32) {
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for &x in xs {
        lo = lo.min(x);
        hi = hi.max(x);
    }
    if xs.is_empty() {
        (0.0, 0.0)
    } else {
        (lo, hi)
    }
}
