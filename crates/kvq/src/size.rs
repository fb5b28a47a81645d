//! KV cache size math: `2 · L · H_kv · d · S · B · bytes` for full precision, and the
//! exact byte count of every quantized scheme — codes, f16 scales and zero-points,
//! the full-precision residual window, outliers, sink tokens, codebooks.
//!
//! The formulas here are written from the schemes' definitions, not by asking a cache;
//! tests check that a real cache holds exactly this many bytes after `seq` tokens.

use crate::cache::{CacheConfig, FullPrecision, Scheme};
use crate::error::{KvqError, Result};
use crate::quant::outliers::{outlier_count, OUTLIER_BYTES};
use crate::quant::packed_len;
use crate::quant::uniform::AFFINE_BYTES;
use serde::{Deserialize, Serialize};

/// The attention geometry that decides KV cache size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelGeometry {
    pub name: String,
    pub layers: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// (preset name, layers, query heads, KV heads, head dim, source).
/// Values from each model's published config.json (head_dim = hidden / heads).
pub const MODEL_PRESETS: &[(&str, usize, usize, usize, usize, &str)] = &[
    ("nanogpt", 6, 6, 6, 64, "Karpathy's ng-video-lecture gpt.py: n_layer 6, n_head 6, n_embd 384"),
    ("smollm2-135m", 30, 9, 3, 64, "HuggingFaceTB/SmolLM2-135M-Instruct config.json"),
    ("llama-2-7b", 32, 32, 32, 128, "meta-llama/Llama-2-7b-hf config.json"),
    ("llama-3-8b", 32, 32, 8, 128, "meta-llama/Meta-Llama-3-8B config.json"),
    ("llama-3-70b", 80, 64, 8, 128, "meta-llama/Meta-Llama-3-70B config.json"),
    ("mistral-7b", 32, 32, 8, 128, "mistralai/Mistral-7B-v0.1 config.json"),
    ("qwen2-7b", 28, 28, 4, 128, "Qwen/Qwen2-7B config.json"),
];

impl ModelGeometry {
    pub fn new(name: &str, layers: usize, q_heads: usize, kv_heads: usize, head_dim: usize) -> Result<Self> {
        if layers == 0 || q_heads == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(KvqError::InvalidParam("layers, heads and head dimension must all be at least 1".into()));
        }
        if q_heads % kv_heads != 0 {
            return Err(KvqError::InvalidParam(format!(
                "{q_heads} query heads cannot share {kv_heads} KV heads evenly"
            )));
        }
        Ok(ModelGeometry { name: name.into(), layers, q_heads, kv_heads, head_dim })
    }

    pub fn preset(name: &str) -> Result<Self> {
        MODEL_PRESETS
            .iter()
            .find(|p| p.0 == name)
            .map(|&(n, l, q, kv, d, _)| ModelGeometry { name: n.into(), layers: l, q_heads: q, kv_heads: kv, head_dim: d })
            .ok_or_else(|| KvqError::UnknownPreset {
                kind: "model preset",
                name: name.into(),
                known: MODEL_PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", "),
            })
    }

    /// MHA, GQA or MQA.
    pub fn attention_kind(&self) -> &'static str {
        if self.kv_heads == self.q_heads {
            "MHA"
        } else if self.kv_heads == 1 {
            "MQA"
        } else {
            "GQA"
        }
    }

    /// K and V elements per token over all layers: `2 · L · H_kv · d`.
    pub fn elements_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim
    }
}

/// Where a cache's bytes go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes {
    /// Packed quantization codes.
    pub codes: usize,
    /// Per-group f16 scales and zero-points (or centres and half-ranges).
    pub params: usize,
    /// Elements held at full precision (a full cache, or a residual window).
    pub full: usize,
    /// Sparse outliers: f16 value + u16 index each.
    pub outliers: usize,
    /// Attention-sink tokens kept in f16.
    pub sink: usize,
    /// Per-layer constants: codebooks, calibrated per-channel centres and scales.
    pub constants: usize,
}

impl Bytes {
    pub fn total(&self) -> usize {
        self.codes + self.params + self.full + self.outliers + self.sink + self.constants
    }
}

impl std::ops::Add for Bytes {
    type Output = Bytes;
    fn add(self, o: Bytes) -> Bytes {
        Bytes {
            codes: self.codes + o.codes,
            params: self.params + o.params,
            full: self.full + o.full,
            outliers: self.outliers + o.outliers,
            sink: self.sink + o.sink,
            constants: self.constants + o.constants,
        }
    }
}

impl std::ops::AddAssign for Bytes {
    fn add_assign(&mut self, o: Bytes) {
        *self = *self + o;
    }
}

impl std::ops::Mul<usize> for Bytes {
    type Output = Bytes;
    fn mul(self, k: usize) -> Bytes {
        Bytes {
            codes: self.codes * k,
            params: self.params * k,
            full: self.full * k,
            outliers: self.outliers * k,
            sink: self.sink * k,
            constants: self.constants * k,
        }
    }
}

// ANCHOR: full_precision_bytes
/// Bytes of a plain full-precision cache: `2 · L · H_kv · d · S · B · bytes`.
pub fn full_precision_bytes(g: &ModelGeometry, seq: usize, batch: usize, p: FullPrecision) -> u128 {
    2 * g.layers as u128 * g.kv_heads as u128 * g.head_dim as u128 * seq as u128 * batch as u128 * p.bytes() as u128
}
// ANCHOR_END: full_precision_bytes

/// Exact bytes a cache of configuration `cfg` holds after `seq` tokens at batch `batch`.
pub fn cache_bytes(g: &ModelGeometry, cfg: &CacheConfig, seq: usize, batch: usize) -> Result<Bytes> {
    if let Scheme::Full(FullPrecision::Fp8) = cfg.scheme {
        if full_precision_bytes(g, seq, batch, FullPrecision::F32) > (usize::MAX / 4) as u128 {
            return Err(KvqError::InvalidParam(format!("{seq} tokens × batch {batch} is too large to count in bytes")));
        }
        // Size-only element type: plain arithmetic, no cache behind it.
        let n = seq.saturating_sub(cfg.sink_tokens.min(seq));
        let per_stream = Bytes { full: 2 * n * g.head_dim, sink: 2 * (seq - n) * g.head_dim * 2, ..Bytes::default() };
        return Ok(per_stream * (g.layers * g.kv_heads * batch));
    }
    cfg.validate(g.head_dim)?;
    // Every scheme takes at most 4 bytes an element plus small constants: if fp32 fits
    // comfortably in usize, no sum below can overflow.
    if full_precision_bytes(g, seq, batch, FullPrecision::F32) > (usize::MAX / 4) as u128 {
        return Err(KvqError::InvalidParam(format!("{seq} tokens × batch {batch} is too large to count in bytes")));
    }
    let d = g.head_dim;
    let sink = if matches!(cfg.scheme, Scheme::None) { 0 } else { cfg.sink_tokens.min(seq) };
    let n = seq - sink; // tokens in the store proper
    let mut stream = Bytes { sink: 2 * sink * d * 2, ..Bytes::default() };
    let mut layer_constants = 0;
    match cfg.scheme {
        Scheme::None => {}
        Scheme::Full(p) => stream.full += 2 * n * d * p.bytes(),
        // ANCHOR: per_token_bytes
        Scheme::PerToken { bits, group_size, residual_length } => {
            let q = if residual_length == 0 { n } else { n - n % residual_length };
            let groups = q * (d / group_size);
            stream.codes += 2 * groups * packed_len(group_size, bits);
            stream.params += 2 * groups * AFFINE_BYTES;
            stream.full += 2 * (n - q) * d * 2;
        }
        // ANCHOR_END: per_token_bytes
        // ANCHOR: kivi_bytes
        Scheme::Kivi { k_bits, v_bits, group_size, residual_length } => {
            // Keys: whole groups of `group_size` tokens, once they have left the window.
            let kq = group_size * (n.saturating_sub(residual_length) / group_size);
            let key_groups = (kq / group_size) * d;
            stream.codes += key_groups * packed_len(group_size, k_bits);
            stream.params += key_groups * AFFINE_BYTES;
            stream.full += (n - kq) * d * 2;
            // Values: each token as soon as it leaves the window.
            let vg = group_size.min(d);
            let vq = n.saturating_sub(residual_length);
            let value_groups = vq * (d / vg);
            stream.codes += value_groups * packed_len(vg, v_bits);
            stream.params += value_groups * AFFINE_BYTES;
            stream.full += (n - vq) * d * 2;
        }
        // ANCHOR_END: kivi_bytes
        // ANCHOR: kvquant_bytes
        Scheme::KvQuant { bits, outlier_fraction } => {
            stream.codes += 2 * n * packed_len(d, bits);
            stream.params += n * AFFINE_BYTES; // values: per-token centre and half-range
            stream.outliers += 2 * n * outlier_count(outlier_fraction, d) * OUTLIER_BYTES;
            // Per layer: f16 centre and scale per key channel, one f16 codebook each for K and V.
            layer_constants = 2 * g.kv_heads * d * 2 + 2 * (1usize << bits) * 2;
        }
        // ANCHOR_END: kvquant_bytes
    }
    let mut total = stream * (g.kv_heads * batch);
    total.constants += layer_constants;
    Ok(total * g.layers)
}

/// How kvq's GPU cache of packed codes (`cuda::PackedGpuLayer`) lays out one stream (one
/// KV head of one sequence) of one layer: codes and f16 (min, scale) params for `capacity`
/// tokens, and f16 rings for the tokens not yet quantized. KIVI: keys per channel in
/// blocks of `group` tokens (capacity rounded up to a whole block; the key ring holds the
/// window plus the blocks being filled), values per token. Per-token: keys and values
/// per token in groups of `group` channels; the window is flushed whole (HF's
/// `QuantizedCache` rule), so the rings hold it plus one chunk of appended tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedGpuLayout {
    pub k_bits: u8,
    pub v_bits: u8,
    pub head_dim: usize,
    /// Keys per token (the per-token cache) rather than per channel (KIVI).
    pub token_keys: bool,
    /// KIVI: tokens of a key block. Per-token: channels of a key group.
    pub group: usize,
    /// Channels of a value group.
    pub value_group: usize,
    /// The residual window: KIVI slides it, the per-token cache flushes it when full.
    pub residual: usize,
    /// Tokens the code buffers hold (KIVI: a multiple of `group`; per-token: of 4).
    pub capacity: usize,
    /// Tokens one append step takes at most (the rings are sized for it).
    pub chunk: usize,
    /// Ring slots for f16 keys and values.
    pub kring: usize,
    pub vring: usize,
}

impl PackedGpuLayout {
    /// The layout of a KIVI or per-token `config` (other schemes have no packed GPU
    /// layout: `None`).
    pub fn of(config: &CacheConfig, head_dim: usize, capacity: usize) -> Option<Self> {
        if head_dim == 0 {
            return None;
        }
        match config.scheme {
            Scheme::Kivi { k_bits, v_bits, group_size: g, residual_length: r } if g > 0 => Some(PackedGpuLayout {
                k_bits,
                v_bits,
                head_dim,
                token_keys: false,
                group: g,
                value_group: g.min(head_dim),
                residual: r,
                capacity: capacity.div_ceil(g) * g,
                chunk: g,
                kring: r + 2 * g,
                vring: r + g,
            }),
            Scheme::PerToken { bits, group_size: g, residual_length: r } if g > 0 => {
                let chunk = r.max(32);
                // A multiple of 4 tokens: every stream's (min, scale) rows then start 16-byte
                // aligned, as the tensor-core kernel's 16-byte cp.async copies need.
                let capacity = capacity.div_ceil(4) * 4;
                Some(PackedGpuLayout { k_bits: bits, v_bits: bits, head_dim, token_keys: true, group: g, value_group: g, residual: r, capacity, chunk, kring: r + chunk, vring: r + chunk })
            }
            _ => None,
        }
    }

    /// Key params (f16 min and scale, 4 bytes) for `quantized` tokens.
    pub fn key_params(&self, quantized: usize) -> usize {
        if self.token_keys {
            quantized * (self.head_dim / self.group)
        } else {
            quantized / self.group * self.head_dim
        }
    }

    /// Tokens quantized once `len` are held (the CPU stores' rules, store.rs): KIVI keys
    /// a whole block once all of it is older than the window, values (and per-token
    /// keys) as soon as they leave it, or, per-token, when the window is full.
    pub fn quantized_after(&self, len: usize, keys_quantized: usize) -> (usize, usize) {
        let r = self.residual;
        if self.token_keys {
            let q = if r == 0 { len } else { len - len % r };
            return (q, q);
        }
        let mut nqk = keys_quantized;
        while len - nqk >= r + self.group {
            nqk += self.group;
        }
        (nqk, len.saturating_sub(r))
    }

    /// Bytes one stream reserves: codes, params and rings.
    pub fn stream_bytes(&self) -> usize {
        let (d, n) = (self.head_dim, self.capacity);
        n * (packed_len(d, self.k_bits) + packed_len(d, self.v_bits)) + self.key_params(n) * 4 + n * (d / self.value_group) * 4 + (self.kring + self.vring) * d * 2
    }
}

/// Bytes a whole sequence's cache takes on the GPU, over every layer and KV head:
/// KIVI, per-token and KVQuant in kvq's GPU layouts, full precision as plain K/V buffers. `None` for schemes
/// with no GPU cache.
pub fn gpu_sequence_bytes(g: &ModelGeometry, cfg: &CacheConfig, seq: usize) -> Option<u128> {
    let streams = (g.layers * g.kv_heads) as u128;
    match cfg.scheme {
        Scheme::Full(p) => Some(full_precision_bytes(g, seq, 1, p)),
        Scheme::Kivi { .. } | Scheme::PerToken { .. } => PackedGpuLayout::of(cfg, g.head_dim, seq).map(|l| streams * l.stream_bytes() as u128),
        Scheme::KvQuant { bits, outlier_fraction } => {
            // `cuda::KvQuantGpuLayer`: the f16 sink, then codes of K and V, the values' f16
            // (centre, half-range), n_out (u16, f16) outliers a vector of each; the
            // calibration's constants and the RoPE table are per model, not per sequence.
            let (d, sink) = (g.head_dim, cfg.sink_tokens.min(seq));
            let n_out = crate::quant::outlier_count(outlier_fraction, d);
            let rows = seq - sink;
            Some(streams * (sink * d * 2 * 2 + rows * (2 * packed_len(d, bits) + 4 + 2 * n_out * 4)) as u128)
        }
        _ => None,
    }
}

/// "40GiB", "512 MB", "1e9" or a plain number of bytes.
pub fn parse_bytes(text: &str) -> Result<u128> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        _ => return Err(KvqError::InvalidParam(format!("{text:?}: unknown unit {unit:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"))),
    };
    match num.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok((x * mult).round() as u128),
        _ => Err(KvqError::InvalidParam(format!("{text:?} is not a positive size like 40GiB"))),
    }
}

/// Formats a byte count as `13,107,200,000`.
pub fn with_commas(n: u128) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Formats a byte count in binary units (`12.21 GiB`).
pub fn human(n: u128) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.2} {}", UNITS[u])
    }
}
