//! Samples of real keys and values, as files: what the browser demo and the lessons
//! load to show quantization error on a real model's K/V. Plain Rust (builds for wasm).
//!
//! Format (little-endian): `b"KVQS"`, `u32` version (1), `u32` header length, a JSON
//! [`SampleHeader`], then the arrays as f16, each `tokens × head_dim`, at the byte
//! offsets (from the end of the header) the header lists.

use crate::error::{KvqError, Result};
use half::f16;
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 4] = b"KVQS";
pub const VERSION: u32 = 1;

/// One `tokens × head_dim` array of the sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArrayInfo {
    pub layer: usize,
    pub head: usize,
    /// `keys` (after RoPE, as attention sees them), `keys_pre_rope`, or `values`.
    pub kind: String,
    /// Byte offset of the f16 data, counted from the end of the header.
    pub offset: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleHeader {
    pub format: String,
    pub model: String,
    /// Where the tokens came from, and how the file was made.
    pub source: String,
    pub command: String,
    pub tokens: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rope_style: String,
    pub arrays: Vec<ArrayInfo>,
}

/// A sample in memory: the header and each array as f32.
#[derive(Clone, Debug, PartialEq)]
pub struct KvSample {
    pub header: SampleHeader,
    pub data: Vec<Vec<f32>>,
}

impl KvSample {
    /// The array of `kind` for a layer and head.
    pub fn get(&self, layer: usize, head: usize, kind: &str) -> Option<&[f32]> {
        self.header.arrays.iter().position(|a| a.layer == layer && a.head == head && a.kind == kind).map(|i| self.data[i].as_slice())
    }

    /// A synthetic sample (the demo's second source): one layer and head of Gaussian
    /// keys and values; before RoPE, four key channels are ten times larger than the
    /// rest, as in real models; the keys are then rotated (RoPE base 10000, half style).
    pub fn synthetic(tokens: usize, head_dim: usize, seed: u64) -> Result<Self> {
        if tokens == 0 || head_dim == 0 || head_dim % 2 != 0 {
            return Err(KvqError::InvalidParam(format!("a synthetic sample needs tokens ≥ 1 and an even head dim, got {tokens} × {head_dim}")));
        }
        let mut rng = crate::rng::SplitMix64::new(seed);
        let n = tokens * head_dim;
        let raw: Vec<f32> = (0..n).map(|i| rng.normal() * if i % head_dim < 4 { 10.0 } else { 1.0 }).collect();
        let values: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let mut keys = raw.clone();
        crate::rope::Rope::new(10_000.0, head_dim, crate::rope::RopeStyle::Half, tokens).apply_rows(&mut keys, 0);
        let arrays = ["keys", "keys_pre_rope", "values"]
            .iter()
            .map(|k| ArrayInfo { layer: 0, head: 0, kind: k.to_string(), offset: 0 })
            .collect();
        let header = SampleHeader {
            format: "kvq K/V sample v1".into(),
            model: "synthetic".into(),
            source: format!("Gaussian, 4 key channels ×10 before RoPE, seed {seed}"),
            command: "KvSample::synthetic".into(),
            tokens,
            head_dim,
            rope_theta: 10_000.0,
            rope_style: "half".into(),
            arrays,
        };
        Ok(KvSample { header, data: vec![keys, raw, values] })
    }

    /// Serializes the sample (offsets in the header are recomputed).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let n = self.header.tokens * self.header.head_dim;
        if self.data.len() != self.header.arrays.len() || self.data.iter().any(|d| d.len() != n) {
            return Err(KvqError::Shape(format!("every array must hold {} × {} values", self.header.tokens, self.header.head_dim)));
        }
        let mut header = self.header.clone();
        for (i, a) in header.arrays.iter_mut().enumerate() {
            a.offset = i * n * 2;
        }
        let json = serde_json::to_vec(&header).map_err(|e| KvqError::InvalidParam(e.to_string()))?;
        let mut out = Vec::with_capacity(12 + json.len() + self.data.len() * n * 2);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        for d in &self.data {
            for &x in d {
                out.extend_from_slice(&f16::from_f32(x).to_le_bytes());
            }
        }
        Ok(out)
    }

    /// Parses a sample; a wrong magic, version or size is an error.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let bad = |m: &str| KvqError::InvalidParam(format!("not a kvq K/V sample: {m}"));
        if b.len() < 12 || &b[..4] != MAGIC {
            return Err(bad("wrong magic"));
        }
        let version = u32::from_le_bytes(b[4..8].try_into().unwrap());
        if version != VERSION {
            return Err(bad(&format!("version {version}, this kvq reads {VERSION}")));
        }
        let hlen = u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize;
        let body = b.get(12 + hlen..).ok_or_else(|| bad("truncated header"))?;
        let header: SampleHeader = serde_json::from_slice(&b[12..12 + hlen]).map_err(|e| bad(&e.to_string()))?;
        let n = header.tokens.checked_mul(header.head_dim).ok_or_else(|| bad("sizes overflow"))?;
        let data = header
            .arrays
            .iter()
            .map(|a| {
                let bytes = body.get(a.offset..a.offset + 2 * n).ok_or_else(|| bad("truncated data"))?;
                Ok(bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
            })
            .collect::<Result<_>>()?;
        Ok(KvSample { header, data })
    }
}
