//! Token stores: one sequence of `dim`-wide vectors (the keys or the values of one
//! KV head of one sequence), held in a scheme's real packed layout.

use crate::quant::pack::{pack_unchecked, packed_len, unpack_unchecked};
use crate::quant::uniform::{Affine, AFFINE_BYTES};
use crate::size::Bytes;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Appends `src` to `dst` as f16 (vectorized conversion).
pub(crate) fn extend_f16(dst: &mut Vec<f16>, src: &[f32]) {
    let n = dst.len();
    dst.resize(n + src.len(), f16::ZERO);
    dst[n..].convert_from_f32_slice(src);
}

/// Writes `src` to `dst` as f32 (vectorized conversion).
#[inline]
pub(crate) fn read_f16(src: &[f16], dst: &mut [f32]) {
    src.convert_to_f32_slice(dst);
}

/// One stream of vectors. `push` takes inputs already checked (finite, in range).
pub(crate) trait TokenStore: Send + Sync {
    /// Vectors held.
    fn len(&self) -> usize;
    /// Vectors held in quantized form.
    fn quantized_len(&self) -> usize;
    /// Appends `rows.len() / dim` vectors.
    fn push(&mut self, rows: &[f32]);
    /// Writes vectors `start..end`, dequantized, to `out` (`(end − start) · dim`).
    fn read(&self, start: usize, end: usize, out: &mut [f32], scratch: &mut Vec<u8>);
    /// Bytes really held.
    fn bytes(&self) -> Bytes;
    fn box_clone(&self) -> Box<dyn TokenStore>;
    fn clear(&mut self);
    /// The packed parts as held, for stores that have them (the GPU kernels' tests
    /// compare their bytes with these).
    fn packed(&self) -> Option<PackedView<'_>> {
        None
    }
}

/// A uniform store's memory as held: codes and f16 (min, scale) per group of the
/// first `quantized` vectors, then the f16 tail.
#[derive(Clone, Copy, Debug)]
pub struct PackedView<'a> {
    pub quantized: usize,
    pub codes: &'a [u8],
    pub params: &'a [Affine],
    pub tail: &'a [f16],
}

impl Clone for Box<dyn TokenStore> {
    fn clone(&self) -> Self {
        self.box_clone()
    }
}

/// An element type a full-precision store can hold.
pub(crate) trait Element: Copy + Default + Send + Sync + 'static {
    fn extend_from_f32(dst: &mut Vec<Self>, src: &[f32]);
    fn write_f32(src: &[Self], dst: &mut [f32]);
}
impl Element for f32 {
    fn extend_from_f32(dst: &mut Vec<Self>, src: &[f32]) {
        dst.extend_from_slice(src);
    }
    fn write_f32(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}
impl Element for f16 {
    fn extend_from_f32(dst: &mut Vec<Self>, src: &[f32]) {
        extend_f16(dst, src);
    }
    fn write_f32(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}
impl Element for bf16 {
    fn extend_from_f32(dst: &mut Vec<Self>, src: &[f32]) {
        let n = dst.len();
        dst.resize(n + src.len(), bf16::ZERO);
        dst[n..].convert_from_f32_slice(src);
    }
    fn write_f32(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

/// Unpacks and dequantizes one group (`out.len()` codes): 2- and 4-bit codes straight
/// from their bytes, other widths through `scratch`.
#[inline]
fn dequantize_group(packed: &[u8], bits: u8, a: &Affine, out: &mut [f32], scratch: &mut Vec<u8>) {
    let (min, s) = (a.min.to_f32(), a.scale.to_f32());
    match bits {
        2 if out.len() % 4 == 0 => {
            for (o, &b) in out.chunks_exact_mut(4).zip(packed) {
                o[0] = min + (b & 3) as f32 * s;
                o[1] = min + ((b >> 2) & 3) as f32 * s;
                o[2] = min + ((b >> 4) & 3) as f32 * s;
                o[3] = min + (b >> 6) as f32 * s;
            }
        }
        4 if out.len() % 2 == 0 => {
            for (o, &b) in out.chunks_exact_mut(2).zip(packed) {
                o[0] = min + (b & 15) as f32 * s;
                o[1] = min + (b >> 4) as f32 * s;
            }
        }
        _ => {
            scratch.resize(out.len(), 0);
            unpack_unchecked(packed, bits, scratch);
            a.dequantize(scratch, out);
        }
    }
}

/// Full precision: every element as `T`.
#[derive(Clone)]
pub(crate) struct PlainStore<T> {
    dim: usize,
    data: Vec<T>,
}

impl<T: Element> PlainStore<T> {
    pub fn new(dim: usize) -> Self {
        PlainStore { dim, data: Vec::new() }
    }
}

impl<T: Element> TokenStore for PlainStore<T> {
    fn len(&self) -> usize {
        self.data.len() / self.dim
    }
    fn quantized_len(&self) -> usize {
        0
    }
    fn push(&mut self, rows: &[f32]) {
        T::extend_from_f32(&mut self.data, rows);
    }
    fn read(&self, start: usize, end: usize, out: &mut [f32], _: &mut Vec<u8>) {
        T::write_f32(&self.data[start * self.dim..end * self.dim], &mut out[..(end - start) * self.dim]);
    }
    fn bytes(&self) -> Bytes {
        Bytes { full: self.data.len() * std::mem::size_of::<T>(), ..Bytes::default() }
    }
    fn box_clone(&self) -> Box<dyn TokenStore> {
        Box::new(self.clone())
    }
    fn clear(&mut self) {
        self.data.clear();
    }
}

/// When vectors leave the full-precision tail of a [`TokenGroupStore`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Residual {
    /// HF `QuantizedCache`: the tail fills to `r` vectors, then all of them are
    /// quantized together (`len % r` stay full precision; `r = 0`: none).
    Flush(usize),
    /// KIVI values: the `r` most recent vectors stay full precision.
    Sliding(usize),
}

/// What both group stores hold: packed codes and f16 (min, scale) per group for the
/// first `quantized` vectors, the rest in an f16 tail.
#[derive(Clone, Default)]
struct Packed {
    quantized: usize,
    codes: Vec<u8>,
    params: Vec<Affine>,
    tail: Vec<f16>,
}

impl Packed {
    fn view(&self) -> PackedView<'_> {
        PackedView { quantized: self.quantized, codes: &self.codes, params: &self.params, tail: &self.tail }
    }

    fn bytes(&self) -> Bytes {
        Bytes { codes: self.codes.len(), params: self.params.len() * AFFINE_BYTES, full: self.tail.len() * 2, ..Bytes::default() }
    }

    fn clear(&mut self) {
        *self = Packed::default();
    }
}

/// Per-token groups: each vector split into groups of `group` channels, each group
/// with its own f16 min and scale. Unquantized vectors wait in an f16 tail.
#[derive(Clone)]
pub(crate) struct TokenGroupStore {
    dim: usize,
    bits: u8,
    group: usize,
    residual: Residual,
    st: Packed,
}

impl TokenGroupStore {
    pub fn new(dim: usize, bits: u8, group: usize, residual: Residual) -> Self {
        TokenGroupStore { dim, bits, group, residual, st: Packed::default() }
    }

    // ANCHOR: residual_rules
    fn target_quantized(&self, len: usize) -> usize {
        match self.residual {
            Residual::Flush(0) => len,
            Residual::Flush(r) => len - len % r,
            Residual::Sliding(r) => len.saturating_sub(r),
        }
    }
    // ANCHOR_END: residual_rules

    fn group_bytes(&self) -> usize {
        packed_len(self.group, self.bits)
    }
}

impl TokenStore for TokenGroupStore {
    fn len(&self) -> usize {
        self.st.quantized + self.st.tail.len() / self.dim
    }
    fn quantized_len(&self) -> usize {
        self.st.quantized
    }
    fn push(&mut self, rows: &[f32]) {
        let d = self.dim;
        extend_f16(&mut self.st.tail, rows);
        let target = self.target_quantized(self.len());
        let n = target - self.st.quantized;
        if n == 0 {
            return;
        }
        // Quantize the n oldest tail vectors. Values are read back from the f16 tail,
        // so a vector is quantized from exactly what the residual window held.
        let mut vals = vec![0f32; self.group];
        let mut codes = vec![0u8; self.group];
        for g in self.st.tail[..n * d].chunks_exact(self.group) {
            for (v, h) in vals.iter_mut().zip(g) {
                *v = h.to_f32();
            }
            let a = Affine::fit_values(&vals, self.bits);
            a.quantize(&vals, self.bits, &mut codes);
            pack_unchecked(&codes, self.bits, &mut self.st.codes);
            self.st.params.push(a);
        }
        self.st.tail.drain(..n * d);
        self.st.quantized = target;
    }
    fn read(&self, start: usize, end: usize, out: &mut [f32], scratch: &mut Vec<u8>) {
        let d = self.dim;
        let gpt = d / self.group; // groups per token
        let gb = self.group_bytes();
        scratch.resize(self.group, 0);
        for t in start..end {
            let o = &mut out[(t - start) * d..(t - start + 1) * d];
            if t < self.st.quantized {
                for gi in 0..gpt {
                    let i = t * gpt + gi;
                    dequantize_group(&self.st.codes[i * gb..(i + 1) * gb], self.bits, &self.st.params[i], &mut o[gi * self.group..(gi + 1) * self.group], scratch);
                }
            } else {
                let r = t - self.st.quantized;
                read_f16(&self.st.tail[r * d..(r + 1) * d], o);
            }
        }
    }
    fn bytes(&self) -> Bytes {
        self.st.bytes()
    }
    fn box_clone(&self) -> Box<dyn TokenStore> {
        Box::new(self.clone())
    }
    fn clear(&mut self) {
        self.st.clear();
    }
    fn packed(&self) -> Option<PackedView<'_>> {
        Some(self.st.view())
    }
}

/// Per-channel groups (KIVI keys): blocks of `group` tokens; within a block each
/// channel's `group` values form one group with its own f16 min and scale. Codes are
/// stored channel by channel (`block → channel → token`). The `residual` most recent
/// tokens stay in an f16 tail; a block is quantized once all its tokens are older.
#[derive(Clone)]
pub(crate) struct ChannelGroupStore {
    dim: usize,
    bits: u8,
    group: usize,
    residual: usize,
    st: Packed,
}

impl ChannelGroupStore {
    pub fn new(dim: usize, bits: u8, group: usize, residual: usize) -> Self {
        ChannelGroupStore { dim, bits, group, residual, st: Packed::default() }
    }
}

impl TokenStore for ChannelGroupStore {
    fn len(&self) -> usize {
        self.st.quantized + self.st.tail.len() / self.dim
    }
    fn quantized_len(&self) -> usize {
        self.st.quantized
    }
    // ANCHOR: kivi_keys
    fn push(&mut self, rows: &[f32]) {
        let (d, g) = (self.dim, self.group);
        extend_f16(&mut self.st.tail, rows);
        let mut vals = vec![0f32; g];
        let mut codes = vec![0u8; g];
        while self.len() - self.st.quantized >= self.residual + g {
            // The oldest g tail tokens form a full block that has left the window.
            for c in 0..d {
                for (j, v) in vals.iter_mut().enumerate() {
                    *v = self.st.tail[j * d + c].to_f32();
                }
                let a = Affine::fit_values(&vals, self.bits);
                a.quantize(&vals, self.bits, &mut codes);
                pack_unchecked(&codes, self.bits, &mut self.st.codes);
                self.st.params.push(a);
            }
            self.st.tail.drain(..g * d);
            self.st.quantized += g;
        }
    }
    // ANCHOR_END: kivi_keys
    fn read(&self, start: usize, end: usize, out: &mut [f32], scratch: &mut Vec<u8>) {
        let (d, g) = (self.dim, self.group);
        let gb = packed_len(g, self.bits);
        scratch.resize(g, 0);
        let qend = end.min(self.st.quantized);
        let mut t = start;
        let mut col = vec![0f32; g];
        while t < qend {
            let block = t / g;
            let (b0, b1) = (t, qend.min((block + 1) * g));
            let (j0, j1) = (b0 - block * g, b1 - block * g);
            for c in 0..d {
                let i = block * d + c;
                dequantize_group(&self.st.codes[i * gb..(i + 1) * gb], self.bits, &self.st.params[i], &mut col, scratch);
                for (j, &x) in col[j0..j1].iter().enumerate() {
                    out[(b0 - start + j) * d + c] = x;
                }
            }
            t = b1;
        }
        let t0 = qend.max(start);
        if t0 < end {
            let (r0, r1) = (t0 - self.st.quantized, end - self.st.quantized);
            read_f16(&self.st.tail[r0 * d..r1 * d], &mut out[(t0 - start) * d..(end - start) * d]);
        }
    }
    fn bytes(&self) -> Bytes {
        self.st.bytes()
    }
    fn box_clone(&self) -> Box<dyn TokenStore> {
        Box::new(self.clone())
    }
    fn clear(&mut self) {
        self.st.clear();
    }
    fn packed(&self) -> Option<PackedView<'_>> {
        Some(self.st.view())
    }
}
