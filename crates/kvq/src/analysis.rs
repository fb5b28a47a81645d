//! Quantization error on one head's keys or values: what the browser demo and the
//! lessons show. Every method runs the library's own quantizers and caches.

use crate::cache::{Cache, CacheConfig, CacheShape, KvCache, KvQuantCalibration, LayerSamples};
use crate::error::{KvqError, Result};
use crate::quant::{Axis, QuantizedMatrix};
use crate::rope::{Rope, RopeStyle};
use std::sync::Arc;

/// How to quantize.
#[derive(Clone, Debug, PartialEq)]
pub enum Method {
    /// Plain groups along one axis (no window): the quantizer by itself.
    Uniform { axis: Axis },
    /// HF-style per-token cache (groups of channels, flushed residual window).
    PerToken,
    /// KIVI: keys per channel, values per token, a window of recent tokens.
    Kivi,
    /// KVQuant: calibrated non-uniform levels (calibrated on this same array), outliers.
    KvQuant,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ViewConfig {
    pub method: Method,
    pub bits: u32,
    pub group: usize,
    pub residual: usize,
    pub outlier_fraction: f32,
}

/// Keys (after RoPE, pre-RoPE too for KVQuant) or values of one head, `tokens × dim`.
pub struct HeadData<'a> {
    pub keys: bool,
    pub data: &'a [f32],
    /// Keys before RoPE, with the RoPE that turns them into `data` (KVQuant stores these).
    pub pre_rope: Option<(&'a [f32], f32, RopeStyle)>,
    pub tokens: usize,
    pub dim: usize,
}

/// The array after quantization, and how far it moved.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantView {
    pub reconstruction: Vec<f32>,
    /// Bytes the quantized form takes (codes, scales, window, outliers, constants).
    pub bytes: usize,
    pub effective_bits: f64,
    /// ‖x̂ − x‖ / ‖x‖.
    pub relative_error: f64,
    /// Root-mean-square error of each channel.
    pub channel_rms_error: Vec<f32>,
}

/// Quantizes one head's array with `cfg`.
pub fn quantize_head(h: &HeadData, cfg: &ViewConfig) -> Result<QuantView> {
    let (n, d) = (h.tokens, h.dim);
    if h.data.len() != n * d || n == 0 {
        return Err(KvqError::Shape(format!("{} values for {n} tokens × {d}", h.data.len())));
    }
    let (reconstruction, bytes) = match cfg.method {
        Method::Uniform { axis } => {
            let q = QuantizedMatrix::quantize(h.data, n, d, axis, cfg.group, cfg.bits)?;
            (q.dequantize(), q.bytes())
        }
        _ => {
            let bits = crate::quant::check_bits(cfg.bits)?;
            let config = match cfg.method {
                Method::PerToken => CacheConfig::per_token(bits, cfg.group, cfg.residual),
                Method::Kivi => CacheConfig::kivi(bits, bits, cfg.group, cfg.residual),
                _ => CacheConfig::kvquant(bits, cfg.outlier_fraction),
            };
            let shape = CacheShape { layers: 1, batch: 1, kv_heads: 1, head_dim: d };
            // KVQuant stores keys before RoPE and rotates them on read.
            let input = match (&cfg.method, h.keys, h.pre_rope) {
                (Method::KvQuant, true, Some((raw, ..))) => raw,
                (Method::KvQuant, true, None) => {
                    return Err(KvqError::InvalidParam("KVQuant quantizes keys before RoPE: the pre-RoPE keys are needed".into()))
                }
                _ => h.data,
            };
            let (theta, style) = h.pre_rope.map(|(_, t, s)| (t, s)).unwrap_or((10_000.0, RopeStyle::Half));
            let calib = if matches!(cfg.method, Method::KvQuant) {
                let s = [LayerSamples { keys: input, values: input, tokens: n }];
                Some(Arc::new(KvQuantCalibration::fit(&s, 1, d, cfg.bits, cfg.outlier_fraction, true)?))
            } else {
                None
            };
            // The array goes in as both keys and values; the side it belongs to is read back.
            let mut cache = Cache::new(&config, shape, Some(Arc::new(Rope::new(theta, d, style, n))), calib)?;
            cache.append(0, input, input, n)?;
            let (k, v) = cache.materialize(0)?;
            let (kb, vb) = cache.key_value_bytes();
            if h.keys {
                (k, kb.total())
            } else {
                (v, vb.total())
            }
        }
    };
    let num: f64 = reconstruction.iter().zip(h.data).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = h.data.iter().map(|b| (*b as f64).powi(2)).sum();
    let channel_rms_error = (0..d)
        .map(|c| ((0..n).map(|t| ((reconstruction[t * d + c] - h.data[t * d + c]) as f64).powi(2)).sum::<f64>() / n as f64).sqrt() as f32)
        .collect();
    Ok(QuantView {
        reconstruction,
        bytes,
        effective_bits: 8.0 * bytes as f64 / (n * d) as f64,
        relative_error: if den > 0.0 { (num / den).sqrt() } else { 0.0 },
        channel_rms_error,
    })
}

/// Attention scores `q·k_t / √d` of one query against exact and quantized keys.
pub fn scores(q: &[f32], keys: &[f32], dim: usize) -> Vec<f32> {
    let s = 1.0 / (dim as f32).sqrt();
    keys.chunks_exact(dim).map(|k| k.iter().zip(q).map(|(a, b)| a * b).sum::<f32>() * s).collect()
}
