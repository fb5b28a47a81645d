//! KV caches behind one trait that a model's attention calls.
//!
//! Every cache here is the same [`Cache`]: per layer, per sequence and KV head, one
//! store for keys and one for values, in the scheme's real packed layout (see
//! [`store`]). Attention is computed tile by tile straight from that storage: a tile
//! of keys and values is dequantized into a small scratch buffer, used, and dropped,
//! so the cache is never expanded to full precision in memory.

mod config;
mod kvquant;
mod store;

pub use config::{parse_cache_spec, CacheConfig, FullPrecision, Overrides, Scheme, PRESETS};
pub use kvquant::{KvQuantCalibration, LayerCalibration, LayerSamples};

use crate::error::{check_values, KvqError, Result};
use crate::quant::outliers::outlier_count;
use crate::rope::Rope;
use crate::size::Bytes;
use half::{bf16, f16};
pub(crate) use kvquant::check_calibration;
// (crate-wide: the GPU kernels' checks build these CPU stores as references)
pub(crate) use kvquant::NuqStore;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
pub use store::PackedView;
use store::{ChannelGroupStore, PlainStore, Residual, TokenGroupStore};
pub(crate) use store::TokenStore;

/// The shape of a cache: layers, sequences in the batch, KV heads, head dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheShape {
    pub layers: usize,
    pub batch: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// What a cache holds, like `get_cache_info()` of the seed KIVI cache, but with the
/// bytes counted for real (scales, residual and outliers included).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheInfo {
    pub scheme: String,
    pub num_layers: usize,
    pub batch: usize,
    pub total_seq_len: usize,
    /// Tokens whose values are held quantized.
    pub quantized_len: usize,
    /// Tokens whose keys are held quantized (KIVI quantizes keys a group at a time).
    pub key_quantized_len: usize,
    /// Tokens held at full precision outside the sink (the residual window).
    pub residual_len: usize,
    pub sink_len: usize,
    pub k_bits: u32,
    pub v_bits: u32,
    /// Bits per stored K/V element, every overhead included.
    pub effective_bits: f64,
    pub memory_bytes: usize,
    /// What an f16 cache of the same length would take.
    pub fp16_bytes: usize,
    /// `memory_bytes / fp16_bytes`.
    pub memory_ratio: f64,
    pub bytes: Bytes,
}

/// Tokens a cache holds, counted on its first sequence (for [`CacheInfo::new`]).
pub struct HeldTokens {
    pub total: usize,
    pub quantized: usize,
    pub key_quantized: usize,
    pub sink: usize,
}

impl CacheInfo {
    /// The info of a cache holding `held` tokens, `bytes`, and `elements` K/V values
    /// over all sequences: bits per element and the ratio to f16 follow from them.
    pub fn new(scheme: String, config: &CacheConfig, shape: CacheShape, held: HeldTokens, bytes: Bytes, elements: usize) -> Self {
        let memory = bytes.total();
        let (k_bits, v_bits) = config.bits();
        CacheInfo {
            scheme,
            num_layers: shape.layers,
            batch: shape.batch,
            total_seq_len: held.total,
            quantized_len: held.quantized,
            key_quantized_len: held.key_quantized,
            residual_len: held.total.saturating_sub(held.quantized + held.sink),
            sink_len: held.sink,
            k_bits,
            v_bits,
            effective_bits: if elements > 0 { 8.0 * memory as f64 / elements as f64 } else { 0.0 },
            memory_bytes: memory,
            fp16_bytes: 2 * elements,
            memory_ratio: if elements > 0 { memory as f64 / (2 * elements) as f64 } else { 0.0 },
            bytes,
        }
    }
}

// ANCHOR: kv_cache_trait
/// The interface a model's attention uses. Layouts are row-major:
/// keys/values `[batch][kv_head][token][dim]`, queries/outputs `[batch][q_head][token][dim]`.
pub trait KvCache: Send {
    fn config(&self) -> &CacheConfig;
    fn shape(&self) -> CacheShape;
    /// Whether `append` expects keys before RoPE (the cache rotates them on read).
    fn wants_pre_rope_keys(&self) -> bool;
    /// Tokens held: the position the next step starts at (always 0 without a cache).
    fn seq_len(&self) -> usize;
    /// Declares left padding: the first `row_start[b]` positions of sequence `b` are
    /// pads. Pads are never stored nor attended to, and RoPE positions of a sequence
    /// count from its first real token (like HF's `position_ids`), so a padded row
    /// computes what it would alone. Only allowed while the cache is empty.
    fn set_padding(&mut self, row_start: &[usize]) -> Result<()>;
    /// The left padding of each sequence (zeros when there is none).
    fn padding(&self) -> &[usize];
    /// Appends the K/V of `tokens` new tokens of one layer.
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], tokens: usize) -> Result<()>;
    /// Causal attention of `tokens` queries (the newest positions) over everything the
    /// layer holds.
    fn attend(&mut self, layer: usize, q: &[f32], q_heads: usize, tokens: usize, out: &mut [f32]) -> Result<()>;
    /// The layer's keys (after RoPE) and values as the attention sees them.
    fn materialize(&self, layer: usize) -> Result<(Vec<f32>, Vec<f32>)>;
    fn bytes(&self) -> Bytes;
    fn memory_bytes(&self) -> usize {
        self.bytes().total()
    }
    fn info(&self) -> CacheInfo;
    /// Keeps sequences `rows` (in that order, repeats allowed): beam search, batches.
    fn select_rows(&mut self, rows: &[usize]) -> Result<()>;
    fn reset(&mut self);
    /// A cache whose K/V live on the model's device (a GPU) takes q/k/v there, as
    /// tensors, with no trip through host memory. `None`: the model uses the slices above.
    #[cfg(feature = "model")]
    fn on_device(&mut self) -> Option<&mut dyn DeviceKv> {
        None
    }
}
// ANCHOR_END: kv_cache_trait

/// The device side of a cache (see [`KvCache::on_device`]): the same append and
/// attention as [`KvCache`], on f32 tensors of the model's device.
#[cfg(feature = "model")]
pub trait DeviceKv {
    /// `k`, `v`: `[batch, kv_heads, tokens, head_dim]`, keys after RoPE.
    fn append_tensors(&mut self, layer: usize, k: &candle_core::Tensor, v: &candle_core::Tensor) -> Result<()>;
    /// `q`: `[batch, q_heads, tokens, head_dim]` (the newest positions), after RoPE;
    /// returns the attention output, the same shape.
    fn attend_tensors(&mut self, layer: usize, q: &candle_core::Tensor) -> Result<candle_core::Tensor>;
}

#[derive(Clone)]
struct Stream {
    sink_k: Vec<f16>,
    sink_v: Vec<f16>,
    k: Box<dyn TokenStore>,
    v: Box<dyn TokenStore>,
}

#[derive(Clone, Default)]
struct Layer {
    streams: Vec<Stream>,
    len: usize,
    /// The K/V of the last `append`, full precision: what past-only attention and
    /// the no-cache path read for the current step. Not part of the cache's memory.
    fresh_k: Vec<f32>,
    fresh_v: Vec<f32>,
    fresh: usize,
}

#[derive(Clone, Default)]
struct Scratch {
    k: Vec<f32>,
    v: Vec<f32>,
    codes: Vec<u8>,
    scores: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
}

/// Tokens per attention tile.
const TILE: usize = 64;

/// A KV cache of any [`Scheme`].
#[derive(Clone)]
pub struct Cache {
    config: CacheConfig,
    shape: CacheShape,
    rope: Option<Arc<Rope>>,
    calibration: Option<Arc<KvQuantCalibration>>,
    layers: Vec<Layer>,
    scratch: Vec<Scratch>,
    /// Left padding per sequence.
    row_start: Vec<usize>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("scheme", &self.config.label())
            .field("shape", &self.shape)
            .field("seq_len", &self.seq_len())
            .field("memory_bytes", &self.memory_bytes())
            .finish()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Which {
    K,
    V,
}

impl Cache {
    /// A cache for `config`. `rope` is needed when keys are stored before RoPE;
    /// `calibration` for KVQuant.
    pub fn new(config: &CacheConfig, shape: CacheShape, rope: Option<Arc<Rope>>, calibration: Option<Arc<KvQuantCalibration>>) -> Result<Self> {
        config.validate(shape.head_dim)?;
        if shape.layers == 0 || shape.batch == 0 || shape.kv_heads == 0 {
            return Err(KvqError::InvalidParam("a cache needs at least one layer, sequence and KV head".into()));
        }
        if calibration.is_some() && !matches!(config.scheme, Scheme::KvQuant { .. }) {
            return Err(KvqError::InvalidParam(format!("a calibration is for KVQuant caches, not {}", config.label())));
        }
        if config.pre_rope {
            match &rope {
                None => return Err(KvqError::InvalidParam("a cache that stores keys before RoPE needs the model's RoPE".into())),
                Some(r) if r.head_dim != shape.head_dim => {
                    return Err(KvqError::Shape(format!("RoPE is for head dim {}, the cache has {}", r.head_dim, shape.head_dim)))
                }
                _ => {}
            }
        }
        if let Scheme::KvQuant { bits, outlier_fraction } = config.scheme {
            let c = calibration.as_ref().ok_or_else(|| {
                KvqError::InvalidParam("a KVQuant cache needs a calibration (KvQuantCalibration::fit)".into())
            })?;
            check_calibration(c, shape.layers, shape.kv_heads, shape.head_dim, bits, outlier_fraction, config.pre_rope)?;
        }
        let mut cache = Cache { config: config.clone(), shape, rope, calibration, layers: Vec::new(), scratch: Vec::new(), row_start: vec![0; shape.batch] };
        cache.layers = (0..shape.layers)
            .map(|l| Layer { streams: (0..shape.batch * shape.kv_heads).map(|s| cache.new_stream(l, s % shape.kv_heads)).collect(), ..Layer::default() })
            .collect();
        cache.scratch = vec![Scratch::default(); shape.batch * shape.kv_heads];
        Ok(cache)
    }

    /// The cache that keeps nothing (generation recomputes the prefix every step).
    pub fn none(shape: CacheShape) -> Result<Self> {
        Cache::new(&CacheConfig::new(Scheme::None), shape, None, None)
    }

    fn new_stream(&self, layer: usize, head: usize) -> Stream {
        let d = self.shape.head_dim;
        let (k, v): (Box<dyn TokenStore>, Box<dyn TokenStore>) = match self.config.scheme {
            Scheme::None | Scheme::Full(FullPrecision::F32) => (Box::new(PlainStore::<f32>::new(d)), Box::new(PlainStore::<f32>::new(d))),
            Scheme::Full(FullPrecision::F16) => (Box::new(PlainStore::<f16>::new(d)), Box::new(PlainStore::<f16>::new(d))),
            Scheme::Full(FullPrecision::Bf16) => (Box::new(PlainStore::<bf16>::new(d)), Box::new(PlainStore::<bf16>::new(d))),
            Scheme::Full(FullPrecision::Fp8) => unreachable!("rejected by validate"),
            Scheme::PerToken { bits, group_size, residual_length } => (
                Box::new(TokenGroupStore::new(d, bits, group_size, Residual::Flush(residual_length))),
                Box::new(TokenGroupStore::new(d, bits, group_size, Residual::Flush(residual_length))),
            ),
            Scheme::Kivi { k_bits, v_bits, group_size, residual_length } => (
                Box::new(ChannelGroupStore::new(d, k_bits, group_size, residual_length)),
                Box::new(TokenGroupStore::new(d, v_bits, group_size.min(d), Residual::Sliding(residual_length))),
            ),
            Scheme::KvQuant { outlier_fraction, .. } => {
                let c = &self.calibration.as_ref().expect("checked in new").layers[layer];
                let n_out = outlier_count(outlier_fraction, d);
                let (center, scale) = (c.key_center[head * d..(head + 1) * d].to_vec(), c.key_scale[head * d..(head + 1) * d].to_vec());
                (
                    Box::new(NuqStore::keys(d, c.key_codebook.clone(), center, scale, n_out)),
                    Box::new(NuqStore::values(d, c.value_codebook.clone(), n_out)),
                )
            }
        };
        Stream { sink_k: Vec::new(), sink_v: Vec::new(), k, v }
    }

    fn keeps_tokens(&self) -> bool {
        !matches!(self.config.scheme, Scheme::None)
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.shape.layers {
            Err(KvqError::LayerOutOfRange { layer, layers: self.shape.layers })
        } else {
            Ok(())
        }
    }

    /// Tokens the attention of `layer` sees now (the fresh ones included).
    fn visible(&self, layer: usize) -> usize {
        let l = &self.layers[layer];
        if self.keeps_tokens() {
            l.len
        } else {
            l.fresh
        }
    }

    // ANCHOR: past_only
    /// The first position read from the fresh full-precision copy instead of the store.
    fn fresh_from(&self, layer: usize) -> usize {
        let l = &self.layers[layer];
        if !self.keeps_tokens() {
            0
        } else if self.config.past_only {
            l.len - l.fresh
        } else {
            usize::MAX
        }
    }
    // ANCHOR_END: past_only

    /// Bytes held for keys and for values separately (their sum is `bytes()`).
    pub fn key_value_bytes(&self) -> (Bytes, Bytes) {
        let (mut k, mut v) = (Bytes::default(), Bytes::default());
        for l in &self.layers {
            for st in &l.streams {
                k += st.k.bytes();
                v += st.v.bytes();
                k.sink += 2 * st.sink_k.len();
                v.sink += 2 * st.sink_v.len();
            }
        }
        if let Some(c) = &self.calibration {
            // Per layer: the key centres and scales and the key codebook; the value codebook.
            let codebook = 2 * (1usize << c.bits);
            k.constants += self.shape.layers * (c.layer_bytes() - codebook);
            v.constants += self.shape.layers * codebook;
        }
        (k, v)
    }

    /// The packed keys and values of one stream (sequence `stream / kv_heads`, KV head
    /// `stream % kv_heads`) of a uniform scheme (per-token, KIVI), as held.
    pub fn packed_stream(&self, layer: usize, stream: usize) -> Result<(PackedView<'_>, PackedView<'_>)> {
        self.check_layer(layer)?;
        let st = self.layers[layer].streams.get(stream).ok_or_else(|| KvqError::InvalidParam(format!("stream {stream} is out of range")))?;
        match (st.k.packed(), st.v.packed()) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => Err(KvqError::Unsupported(format!("a {} cache holds no uniform packed codes", self.config.label()))),
        }
    }

    /// The layer's keys as stored (before RoPE for a pre-RoPE cache) and values,
    /// `[batch][kv_head][token][dim]`: what a calibration pass records.
    pub fn materialize_stored(&self, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.read_all(layer, false)
    }

    fn read_all(&self, layer: usize, rotate: bool) -> Result<(Vec<f32>, Vec<f32>)> {
        self.check_layer(layer)?;
        let n = self.visible(layer);
        let d = self.shape.head_dim;
        let streams = self.layers[layer].streams.len();
        let mut k = vec![0f32; streams * n * d];
        let mut v = vec![0f32; streams * n * d];
        let mut codes = Vec::new();
        for s in 0..streams {
            self.read_rows(layer, s, Which::K, 0, n, &mut k[s * n * d..(s + 1) * n * d], &mut codes, rotate);
            self.read_rows(layer, s, Which::V, 0, n, &mut v[s * n * d..(s + 1) * n * d], &mut codes, false);
        }
        Ok((k, v))
    }

    /// Reads positions `start..end` of one stream: sink, store or fresh copy.
    #[allow(clippy::too_many_arguments)]
    fn read_rows(&self, layer: usize, s: usize, which: Which, start: usize, end: usize, out: &mut [f32], codes: &mut Vec<u8>, rotate: bool) {
        let at = At { fresh_from: self.fresh_from(layer), pad: self.row_start[s / self.shape.kv_heads], d: self.shape.head_dim };
        let rope = if rotate && self.config.pre_rope { self.rope.as_deref() } else { None };
        read_stream_rows(&self.layers[layer], s, which, start, end, at, out, codes, rope);
    }
}

/// Where a stream's positions come from: the fresh copy from `fresh_from` on; the
/// first `pad` positions are padding (read as zeros).
#[derive(Clone, Copy)]
struct At {
    fresh_from: usize,
    pad: usize,
    d: usize,
}

/// Reads positions `start..end` of stream `s` of a layer into `out`: padding, sink,
/// store, or the fresh full-precision copy of the current step; pre-RoPE keys are
/// rotated to their position within the sequence.
#[allow(clippy::too_many_arguments)]
fn read_stream_rows(layer: &Layer, s: usize, which: Which, start: usize, end: usize, at: At, out: &mut [f32], codes: &mut Vec<u8>, rope: Option<&Rope>) {
    let At { fresh_from, pad, d } = at;
    let st = &layer.streams[s];
    let (sink, store, fresh) = match which {
        Which::K => (&st.sink_k, &st.k, &layer.fresh_k),
        Which::V => (&st.sink_v, &st.v, &layer.fresh_v),
    };
    let sink_n = sink.len() / d;
    let stored_end = fresh_from.clamp(start, end);
    // 1. Padding.
    let a = start;
    let b = pad.clamp(start, stored_end);
    out[(a - start) * d..(b - start) * d].fill(0.0);
    // 2. Sink tokens (the first real ones).
    let a = b;
    let b = (pad + sink_n).clamp(a, stored_end);
    if a < b {
        store::read_f16(&sink[(a - pad) * d..(b - pad) * d], &mut out[(a - start) * d..(b - start) * d]);
    }
    // 3. The store.
    let a = b;
    let b = stored_end;
    if a < b {
        store.read(a - pad - sink_n, b - pad - sink_n, &mut out[(a - start) * d..(b - start) * d], codes);
    }
    // 4. The fresh full-precision copy of the current step.
    let a = stored_end;
    if a < end {
        let base = s * layer.fresh * d;
        let f0 = a - fresh_from;
        out[(a - start) * d..(end - start) * d].copy_from_slice(&fresh[base + f0 * d..base + (f0 + end - a) * d]);
    }
    if let Some(r) = rope {
        let a = pad.clamp(start, end);
        r.apply_rows(&mut out[(a - start) * d..(end - start) * d], a - pad);
    }
}

/// One tile of keys/values (positions `t0..t1` of `n`) for the queries of a stream.
struct Tile<'a> {
    k: &'a [f32],
    v: &'a [f32],
    t0: usize,
    t1: usize,
    n: usize,
    tokens: usize,
    d: usize,
    scale: f32,
}

/// Online-softmax state of each query: running max, sum and weighted values.
struct Online<'a> {
    scores: &'a mut [f32],
    m: &'a mut [f32],
    l: &'a mut [f32],
    acc: &'a mut [f32],
}

/// Folds one tile into the online softmax of every query, with AVX2+FMA code when
/// the CPU has it (the same source, compiled twice).
fn attend_tile(q: &[f32], tile: &Tile, state: Online) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX2: OnceLock<bool> = OnceLock::new();
        if *AVX2.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            // SAFETY: the CPU supports avx2 and fma.
            return unsafe { attend_tile_avx2(q, tile, state) };
        }
    }
    attend_tile_generic(q, tile, state)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_tile_avx2(q: &[f32], tile: &Tile, state: Online) {
    attend_tile_generic(q, tile, state)
}

#[inline(always)]
fn attend_tile_generic(q: &[f32], tile: &Tile, st: Online) {
    let Tile { k, v, t0, t1, n, tokens, d, scale } = *tile;
    let nq = st.m.len();
    for qi in 0..nq {
        let i = qi % tokens;
        let jmax = t1.min(n - tokens + i + 1); // causal: keys up to the query's position
        if jmax <= t0 {
            continue;
        }
        let qrow = &q[qi * d..(qi + 1) * d];
        let mut mt = f32::NEG_INFINITY;
        for j in t0..jmax {
            let x = dot(qrow, &k[(j - t0) * d..(j - t0 + 1) * d]) * scale;
            st.scores[j - t0] = x;
            mt = mt.max(x);
        }
        let m_new = st.m[qi].max(mt);
        let acc = &mut st.acc[qi * d..(qi + 1) * d];
        if st.m[qi] > f32::NEG_INFINITY && st.m[qi] < m_new {
            let corr = (st.m[qi] - m_new).exp();
            st.l[qi] *= corr;
            acc.iter_mut().for_each(|a| *a *= corr);
        }
        for j in t0..jmax {
            let p = (st.scores[j - t0] - m_new).exp();
            st.l[qi] += p;
            axpy(p, &v[(j - t0) * d..(j - t0 + 1) * d], acc);
        }
        st.m[qi] = m_new;
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums let the compiler vectorize.
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

#[inline(always)]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// Below this many multiply-adds (or elements) a step runs on one thread: handing a
/// tiny step to the pool costs more than it saves. A decode step over a few hundred
/// tokens is above it (measured in bench/results/cpu-decode-vs-llamacpp.md: ~1.3×
/// faster decode on 2 cores than one thread).
#[cfg(feature = "parallel")]
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// `a · b`, or a shape error when it does not fit in `usize`.
/// `set_padding` for caches without left padding (the GPU caches): the right number of
/// rows, all zero.
pub fn refuse_padding(row_start: &[usize], batch: usize, cache: &str) -> Result<()> {
    if row_start.len() != batch {
        return Err(KvqError::Shape(format!("padding for {} rows, the cache has {batch}", row_start.len())));
    }
    if row_start.iter().any(|&p| p != 0) {
        return Err(KvqError::Unsupported(format!("left padding (prompts of different lengths) is not in the {cache} yet: give prompts of one length, or use the CPU")));
    }
    Ok(())
}

fn checked_product(xs: &[usize], what: &str) -> Result<usize> {
    xs.iter().try_fold(1usize, |acc, &x| acc.checked_mul(x)).ok_or_else(|| KvqError::Shape(format!("{what}: {xs:?} is too large")))
}

/// Runs `f` on every item, in parallel where the `parallel` feature is on and the
/// work is large enough to pay for it.
fn for_each<T: Send>(items: Vec<T>, work: usize, f: impl Fn(T) + Sync + Send) {
    #[cfg(feature = "parallel")]
    if work >= PARALLEL_MIN_WORK && items.len() > 1 {
        use rayon::prelude::*;
        items.into_par_iter().for_each(f);
        return;
    }
    let _ = work;
    items.into_iter().for_each(f);
}

impl KvCache for Cache {
    fn config(&self) -> &CacheConfig {
        &self.config
    }

    fn shape(&self) -> CacheShape {
        self.shape
    }

    fn wants_pre_rope_keys(&self) -> bool {
        self.config.pre_rope
    }

    fn seq_len(&self) -> usize {
        self.layers.last().map_or(0, |l| if self.keeps_tokens() { l.len } else { 0 })
    }

    fn set_padding(&mut self, row_start: &[usize]) -> Result<()> {
        if row_start.len() != self.shape.batch {
            return Err(KvqError::Shape(format!("{} padding lengths for a batch of {}", row_start.len(), self.shape.batch)));
        }
        if self.layers.iter().any(|l| l.len > 0) {
            return Err(KvqError::InvalidParam("padding can only be set on an empty cache (call reset first)".into()));
        }
        self.row_start.copy_from_slice(row_start);
        Ok(())
    }

    fn padding(&self) -> &[usize] {
        &self.row_start
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], tokens: usize) -> Result<()> {
        self.check_layer(layer)?;
        let CacheShape { batch, kv_heads, head_dim: d, .. } = self.shape;
        let want = checked_product(&[batch, kv_heads, tokens, d], "append size")?;
        if tokens == 0 {
            return Err(KvqError::Shape("append needs at least one token".into()));
        }
        if k.len() != want || v.len() != want {
            return Err(KvqError::Shape(format!(
                "append of {tokens} tokens needs {want} values each for K and V ({batch} × {kv_heads} × {tokens} × {d}), got {} and {}",
                k.len(),
                v.len()
            )));
        }
        check_values("keys", k)?;
        check_values("values", v)?;
        let keeps = self.keeps_tokens();
        let sink_tokens = self.config.sink_tokens;
        let l = &mut self.layers[layer];
        if !keeps || self.config.past_only {
            l.fresh_k.clear();
            l.fresh_k.extend_from_slice(k);
            l.fresh_v.clear();
            l.fresh_v.extend_from_slice(v);
        }
        l.fresh = tokens;
        if !keeps {
            return Ok(());
        }
        let len = l.len;
        let row_start = &self.row_start;
        let work: Vec<(usize, &mut Stream)> = l.streams.iter_mut().enumerate().collect();
        for_each(work, k.len().saturating_mul(8), |(s, st)| {
            // Pads are not stored; the first real tokens go to the sink.
            let pad = row_start[s / kv_heads];
            let skip = pad.saturating_sub(len).min(tokens);
            let n_sink = sink_tokens.saturating_sub(len.saturating_sub(pad)).min(tokens - skip);
            let (kr, vr) = (&k[s * tokens * d..(s + 1) * tokens * d], &v[s * tokens * d..(s + 1) * tokens * d]);
            store::extend_f16(&mut st.sink_k, &kr[skip * d..(skip + n_sink) * d]);
            store::extend_f16(&mut st.sink_v, &vr[skip * d..(skip + n_sink) * d]);
            if skip + n_sink < tokens {
                st.k.push(&kr[(skip + n_sink) * d..]);
                st.v.push(&vr[(skip + n_sink) * d..]);
            }
        });
        l.len += tokens;
        Ok(())
    }

    fn attend(&mut self, layer: usize, q: &[f32], q_heads: usize, tokens: usize, out: &mut [f32]) -> Result<()> {
        self.check_layer(layer)?;
        let CacheShape { batch, kv_heads, head_dim: d, .. } = self.shape;
        if q_heads == 0 || q_heads % kv_heads != 0 {
            return Err(KvqError::Shape(format!("{q_heads} query heads cannot share {kv_heads} KV heads")));
        }
        let want = checked_product(&[batch, q_heads, tokens, d], "attention size")?;
        if tokens == 0 {
            return Err(KvqError::Shape("attention needs at least one query token".into()));
        }
        if q.len() != want || out.len() != want {
            return Err(KvqError::Shape(format!("queries and output need {want} values, got {} and {}", q.len(), out.len())));
        }
        if let Some(index) = q.iter().position(|x| !x.is_finite()) {
            return Err(KvqError::NonFinite { what: "queries", index, value: q[index] });
        }
        let n = self.visible(layer);
        if tokens > n {
            return Err(KvqError::Shape(format!("{tokens} queries but the layer holds only {n} tokens")));
        }
        let rep = q_heads / kv_heads;
        let scale = 1.0 / (d as f32).sqrt();
        let fresh_from = self.fresh_from(layer);
        let rope = if self.config.pre_rope { self.rope.as_deref() } else { None };
        let lay = &self.layers[layer];
        let row_start = &self.row_start;
        let chunk = rep * tokens * d;
        let work: Vec<_> = self.scratch.iter_mut().zip(q.chunks(chunk).zip(out.chunks_mut(chunk))).enumerate().collect();
        for_each(work, q.len().saturating_mul(n).saturating_mul(2), |(s, (sc, (qs, os)))| {
            let lo = row_start[s / kv_heads];
            let at = At { fresh_from, pad: lo, d };
            let nq = rep * tokens;
            sc.k.resize(TILE * d, 0.0);
            sc.v.resize(TILE * d, 0.0);
            sc.scores.resize(TILE, 0.0);
            sc.m.clear();
            sc.m.resize(nq, f32::NEG_INFINITY);
            sc.l.clear();
            sc.l.resize(nq, 0.0);
            sc.acc.clear();
            sc.acc.resize(nq * d, 0.0);
            let mut t0 = lo;
            while t0 < n {
                let t1 = n.min(t0 + TILE);
                let rows = t1 - t0;
                read_stream_rows(lay, s, Which::K, t0, t1, at, &mut sc.k[..rows * d], &mut sc.codes, rope);
                read_stream_rows(lay, s, Which::V, t0, t1, at, &mut sc.v[..rows * d], &mut sc.codes, None);
                let tile = Tile { k: &sc.k[..rows * d], v: &sc.v[..rows * d], t0, t1, n, tokens, d, scale };
                let state = Online { scores: &mut sc.scores, m: &mut sc.m, l: &mut sc.l, acc: &mut sc.acc };
                attend_tile(qs, &tile, state);
                t0 = t1;
            }
            for qi in 0..nq {
                let o = &mut os[qi * d..(qi + 1) * d];
                let l = sc.l[qi];
                // A query with no visible key (inside the left padding) outputs zeros.
                let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
                for (x, a) in o.iter_mut().zip(&sc.acc[qi * d..(qi + 1) * d]) {
                    *x = a * inv;
                }
            }
        });
        Ok(())
    }

    fn materialize(&self, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.read_all(layer, true)
    }

    fn bytes(&self) -> Bytes {
        let mut b = Bytes::default();
        for l in &self.layers {
            for st in &l.streams {
                b += st.k.bytes() + st.v.bytes();
                b.sink += 2 * (st.sink_k.len() + st.sink_v.len());
            }
        }
        if let Some(c) = &self.calibration {
            b.constants += self.shape.layers * c.layer_bytes();
        }
        b
    }

    fn info(&self) -> CacheInfo {
        // Counted on layer 0, like the rest of the per-stream numbers below.
        let total = if self.keeps_tokens() { self.layers[0].len.saturating_sub(self.row_start[0]) } else { 0 };
        let (mut q, mut kq, mut sink) = (0, 0, 0);
        // Counts of the first sequence (with left padding, rows hold different numbers).
        if let Some(st) = self.layers.first().and_then(|l| l.streams.first()) {
            q = st.v.quantized_len();
            kq = st.k.quantized_len();
            sink = st.sink_v.len() / self.shape.head_dim;
        }
        let held = if self.keeps_tokens() { self.layers[0].len } else { 0 };
        let real_tokens: usize = self.row_start.iter().map(|&p| held.saturating_sub(p)).sum();
        let elements = 2 * self.shape.layers * self.shape.kv_heads * self.shape.head_dim * real_tokens;
        let counts = HeldTokens { total, quantized: q, key_quantized: kq, sink };
        CacheInfo::new(self.config.label(), &self.config, self.shape, counts, self.bytes(), elements)
    }

    fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if rows.is_empty() {
            return Err(KvqError::InvalidParam("select_rows needs at least one row".into()));
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= self.shape.batch) {
            return Err(KvqError::InvalidParam(format!("row {r} is out of range for a batch of {}", self.shape.batch)));
        }
        let h = self.shape.kv_heads;
        self.row_start = rows.iter().map(|&r| self.row_start[r]).collect();
        for l in &mut self.layers {
            l.streams = rows.iter().flat_map(|&r| l.streams[r * h..(r + 1) * h].iter().cloned()).collect::<Vec<_>>();
            l.fresh = 0;
            l.fresh_k.clear();
            l.fresh_v.clear();
        }
        self.shape.batch = rows.len();
        self.scratch = vec![Scratch::default(); rows.len() * h];
        Ok(())
    }

    fn reset(&mut self) {
        for l in &mut self.layers {
            for st in &mut l.streams {
                st.sink_k.clear();
                st.sink_v.clear();
                st.k.clear();
                st.v.clear();
            }
            l.len = 0;
            l.fresh = 0;
        }
        self.row_start.iter_mut().for_each(|p| *p = 0);
    }
}
