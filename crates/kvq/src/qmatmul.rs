//! A fast CPU matmul for GGUF's Q4_1 and Q8_0 weights (what the default model ships:
//! Q4_1 layers, a Q8_0 embedding that is also the LM head).
//!
//! candle's Q4_1 dot product is scalar; this one uses AVX2 (the same idea as
//! llama.cpp): activations are quantized to 8 bits per block of 32 (scale `d`, and
//! `s = d·Σq`), and a block's dot product is `d_w·d_x·Σ q_w·q_x + m_w·s_x` for Q4_1
//! (`d_w·d_x·Σ q_w·q_x` for Q8_0), the integer products summed by `maddubs`. Weight
//! rows are processed in small tiles so that, when many input rows come at once
//! (prefill), a tile stays in cache while every row passes over it.

use crate::error::{KvqError, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

const QK: usize = 32;
/// ggml's `block_q4_1`: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles
/// (weight `j` in the low nibble of byte `j`, weight `j + 16` in the high one).
const BLOCK_BYTES: usize = 20;
/// ggml's `block_q8_0`: f16 scale `d`, 32 signed bytes.
const Q8_BLOCK_BYTES: usize = 34;

/// The block format of a [`BlockMatrix`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockFormat {
    Q4_1,
    Q8_0,
}

impl BlockFormat {
    fn bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 => BLOCK_BYTES,
            BlockFormat::Q8_0 => Q8_BLOCK_BYTES,
        }
    }
}
/// Weight rows per tile.
const TILE_ROWS: usize = 16;

/// A `rows × cols` matrix of Q4_1 or Q8_0 blocks, exactly as stored in the GGUF file.
pub struct BlockMatrix {
    rows: usize,
    cols: usize,
    format: BlockFormat,
    data: Vec<u8>,
}

/// Activations quantized to 8 bits per block of 32.
pub struct Q8Rows {
    n: usize,
    blocks: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl BlockMatrix {
    /// Takes a Q4_1 or Q8_0 tensor of shape `(rows, cols)`.
    pub fn from_qtensor(t: &QTensor) -> Result<Self> {
        let format = match t.dtype() {
            GgmlDType::Q4_1 => BlockFormat::Q4_1,
            GgmlDType::Q8_0 => BlockFormat::Q8_0,
            other => return Err(KvqError::Unsupported(format!("kvq's CPU matmul takes Q4_1 or Q8_0 weights, got {other:?}"))),
        };
        let dims = t.shape().dims();
        if dims.len() != 2 || dims[1] % QK != 0 {
            return Err(KvqError::Shape(format!("Q4_1 weights must be 2-D with a multiple of 32 columns, got {dims:?}")));
        }
        let data = t.data()?.into_owned();
        let (rows, cols) = (dims[0], dims[1]);
        if data.len() != rows * cols / QK * format.bytes() {
            return Err(KvqError::Shape(format!("{} bytes for a {rows} × {cols} {format:?} matrix", data.len())));
        }
        Ok(BlockMatrix { rows, cols, format, data })
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The weights as f32, `rows × cols` (for tests and references).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for b in self.data.chunks_exact(self.format.bytes()) {
            let mut vals = [0f32; QK];
            match self.format {
                BlockFormat::Q4_1 => {
                    let (d, m) = dm(b);
                    for j in 0..16 {
                        vals[j] = d * (b[4 + j] & 15) as f32 + m;
                        vals[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
                    }
                }
                BlockFormat::Q8_0 => {
                    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                    for j in 0..QK {
                        vals[j] = d * b[2 + j] as i8 as f32;
                    }
                }
            }
            out.extend_from_slice(&vals);
        }
        out
    }

    /// `x · Wᵀ` for `x` of shape `(..., cols)`: shape `(..., rows)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.last() != Some(&self.cols) {
            return Err(KvqError::Shape(format!("input {dims:?} does not end in {} columns", self.cols)));
        }
        let xs = x.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let q = Q8Rows::quantize(&xs, self.cols);
        let out = self.matmul_q8(&q);
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.rows;
        Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?)
    }

    /// `out[i][r] = Σ_c x[i][c] · W[r][c]` over quantized activations.
    pub fn matmul_q8(&self, x: &Q8Rows) -> Vec<f32> {
        let (n, rows) = (x.n, self.rows);
        let mut out = vec![0f32; n * rows];
        let tiles = rows.div_ceil(TILE_ROWS);
        let ptr = SendPtr(out.as_mut_ptr());
        let run_tile = |t: usize| {
            let p = &ptr;
            let r0 = t * TILE_ROWS;
            let r1 = (r0 + TILE_ROWS).min(rows);
            let row_bytes = self.cols / QK * self.format.bytes();
            for i in 0..n {
                for r in r0..r1 {
                    let w = &self.data[r * row_bytes..(r + 1) * row_bytes];
                    let v = dot(self.format, w, x, i);
                    // SAFETY: each (i, r) is written by exactly one tile.
                    unsafe { *p.0.add(i * rows + r) = v };
                }
            }
        };
        let work = n * rows * self.cols;
        #[cfg(feature = "parallel")]
        if work >= 1 << 16 && tiles > 1 {
            use rayon::prelude::*;
            (0..tiles).into_par_iter().for_each(run_tile);
            return out;
        }
        let _ = work;
        (0..tiles).for_each(run_tile);
        out
    }
}

struct SendPtr(*mut f32);
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

impl Q8Rows {
    /// Quantizes rows of `cols` values (cols a multiple of 32): per block of 32,
    /// `d = max|x| / 127`, `q = round(x / d)`, `s = d · Σq`.
    pub fn quantize(xs: &[f32], cols: usize) -> Self {
        let n = xs.len() / cols;
        let blocks = cols / QK;
        let mut q = Q8Rows { n, blocks, qs: vec![0; n * cols], d: vec![0.0; n * blocks], s: vec![0.0; n * blocks] };
        for (bi, (src, dst)) in xs.chunks_exact(QK).zip(q.qs.chunks_exact_mut(QK)).enumerate() {
            let amax = src.iter().fold(0f32, |a, x| a.max(x.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (o, &x) in dst.iter_mut().zip(src) {
                let v = (x * inv).round() as i32;
                *o = v as i8;
                sum += v;
            }
            q.d[bi] = d;
            q.s[bi] = d * sum as f32;
        }
        q
    }
}

#[inline]
fn dm(b: &[u8]) -> (f32, f32) {
    (f16::from_le_bytes([b[0], b[1]]).to_f32(), f16::from_le_bytes([b[2], b[3]]).to_f32())
}

/// Dot product of one weight row with activation row `i`.
#[inline]
fn dot(format: BlockFormat, w: &[u8], x: &Q8Rows, i: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports avx2, fma and f16c (checked above).
            return unsafe {
                match format {
                    BlockFormat::Q4_1 => dot_avx2(w, x, i),
                    BlockFormat::Q8_0 => dot_q8_avx2(w, x, i),
                }
            };
        }
    }
    match format {
        BlockFormat::Q4_1 => dot_scalar(w, x, i),
        BlockFormat::Q8_0 => dot_q8_scalar(w, x, i),
    }
}

/// The portable reference of the dot product.
pub fn dot_scalar_reference(m: &BlockMatrix, x: &Q8Rows, i: usize, r: usize) -> f32 {
    let row_bytes = m.cols / QK * m.format.bytes();
    let w = &m.data[r * row_bytes..(r + 1) * row_bytes];
    match m.format {
        BlockFormat::Q4_1 => dot_scalar(w, x, i),
        BlockFormat::Q8_0 => dot_q8_scalar(w, x, i),
    }
}

fn dot_q8_scalar(w: &[u8], x: &Q8Rows, i: usize) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(Q8_BLOCK_BYTES).enumerate() {
        let k = i * x.blocks + b;
        let qx = &x.qs[k * QK..(k + 1) * QK];
        let sum: i32 = (0..QK).map(|j| blk[2 + j] as i8 as i32 * qx[j] as i32).sum();
        acc += f16::from_le_bytes([blk[0], blk[1]]).to_f32() * x.d[k] * sum as f32;
    }
    acc
}

fn dot_scalar(w: &[u8], x: &Q8Rows, i: usize) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(BLOCK_BYTES).enumerate() {
        let k = i * x.blocks + b;
        let qx = &x.qs[k * QK..(k + 1) * QK];
        let mut sum = 0i32;
        for j in 0..16 {
            sum += (blk[4 + j] & 15) as i32 * qx[j] as i32 + (blk[4 + j] >> 4) as i32 * qx[j + 16] as i32;
        }
        let (d, m) = dm(blk);
        acc += d * x.d[k] * sum as f32 + m * x.s[k];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
}

/// Whether the SIMD path runs on this CPU.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(w: &[u8], x: &Q8Rows, i: usize) -> f32 {
    use std::arch::x86_64::*;
    let nb = w.len() / BLOCK_BYTES;
    let low = _mm_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    let base = i * x.blocks;
    let wp = w.as_ptr();
    let xq = x.qs.as_ptr().add(base * QK);
    for b in 0..nb {
        let blk = wp.add(b * BLOCK_BYTES);
        // d and m, two f16 side by side → two f32.
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(blk as *const i32)));
        let d_w = _mm_cvtss_f32(dm);
        let m_w = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
        let nib = _mm_loadu_si128(blk.add(4) as *const __m128i);
        let lo = _mm_and_si128(nib, low);
        let hi = _mm_and_si128(_mm_srli_epi16(nib, 4), low);
        let q4 = _mm256_set_m128i(hi, lo);
        let q8 = _mm256_loadu_si256(xq.add(b * QK) as *const __m256i);
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d_w * *x.d.get_unchecked(base + b)), _mm256_cvtepi32_ps(p), acc);
        acc_m = _mm_add_ss(acc_m, _mm_set_ss(m_w * *x.s.get_unchecked(base + b)));
    }
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s) + _mm_cvtss_f32(acc_m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_avx2(w: &[u8], x: &Q8Rows, i: usize) -> f32 {
    use std::arch::x86_64::*;
    let nb = w.len() / Q8_BLOCK_BYTES;
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let base = i * x.blocks;
    let wp = w.as_ptr();
    let xq = x.qs.as_ptr().add(base * QK);
    for b in 0..nb {
        let blk = wp.add(b * Q8_BLOCK_BYTES);
        let d_w = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(blk as *const u16) as i32)));
        let qw = _mm256_loadu_si256(blk.add(2) as *const __m256i);
        let qx = _mm256_loadu_si256(xq.add(b * QK) as *const __m256i);
        // maddubs wants unsigned × signed: |w| × (x · sign w).
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw)), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d_w * *x.d.get_unchecked(base + b)), _mm256_cvtepi32_ps(p), acc);
    }
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}
