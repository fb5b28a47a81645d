//! Group-wise uniform quantization of a `tokens × channels` matrix along either axis.
//! This is the primitive every cache scheme is built from, and what the browser demo
//! calls directly.

use super::pack::{check_bits, pack_unchecked, packed_len, unpack_unchecked};
use super::uniform::{Affine, AFFINE_BYTES};
use crate::error::{check_values, KvqError, Result};
use serde::{Deserialize, Serialize};

// ANCHOR: axis
/// Which way a quantization group runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Axis {
    /// A group is `group` consecutive channels of one token (values in KIVI, HF's caches).
    PerToken,
    /// A group is `group` consecutive tokens of one channel (keys in KIVI).
    PerChannel,
}
// ANCHOR_END: axis

impl std::str::FromStr for Axis {
    type Err = KvqError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "token" | "per-token" => Ok(Axis::PerToken),
            "channel" | "per-channel" => Ok(Axis::PerChannel),
            _ => Err(KvqError::UnknownPreset {
                kind: "axis",
                name: s.into(),
                known: "per-token, per-channel".into(),
            }),
        }
    }
}

/// A quantized matrix: packed codes group by group, and one [`Affine`] per group.
///
/// Group order: per-token groups go row by row (`(token, channel group)`), per-channel
/// groups go block by block (`(token block, channel)`); each group's `group` codes are
/// packed on their own into `ceil(group · bits / 8)` bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedMatrix {
    pub tokens: usize,
    pub channels: usize,
    pub axis: Axis,
    pub group: usize,
    pub bits: u8,
    pub codes: Vec<u8>,
    pub params: Vec<Affine>,
}

/// Checks `bits` and that `group` divides the length of the quantized axis.
pub fn check_layout(tokens: usize, channels: usize, axis: Axis, group: usize, bits: u32) -> Result<u8> {
    let bits = check_bits(bits)?;
    if group == 0 {
        return Err(KvqError::ZeroGroupSize);
    }
    let (len, what) = match axis {
        Axis::PerToken => (channels, "the number of channels"),
        Axis::PerChannel => (tokens, "the number of tokens"),
    };
    if len % group != 0 {
        return Err(KvqError::GroupSizeNotDividing { group, len, what });
    }
    Ok(bits)
}

impl QuantizedMatrix {
    /// Quantizes `data` (`tokens × channels`, row-major).
    pub fn quantize(data: &[f32], tokens: usize, channels: usize, axis: Axis, group: usize, bits: u32) -> Result<Self> {
        let n = tokens.checked_mul(channels).ok_or_else(|| KvqError::Shape(format!("{tokens} × {channels} is too large")))?;
        if data.len() != n {
            return Err(KvqError::Shape(format!(
                "{} values given for a {tokens} × {channels} matrix",
                data.len()
            )));
        }
        let bits = check_layout(tokens, channels, axis, group, bits)?;
        check_values("the matrix to quantize", data)?;
        let groups = tokens * channels / group.max(1);
        let mut q = QuantizedMatrix {
            tokens,
            channels,
            axis,
            group,
            bits,
            codes: Vec::with_capacity(groups * packed_len(group, bits)),
            params: Vec::with_capacity(groups),
        };
        let mut vals = vec![0f32; group];
        let mut codes = vec![0u8; group];
        match axis {
            Axis::PerToken => {
                for chunk in data.chunks_exact(group) {
                    q.push_group(chunk, &mut codes);
                }
            }
            Axis::PerChannel => {
                for block in 0..tokens / group {
                    for c in 0..channels {
                        for (j, v) in vals.iter_mut().enumerate() {
                            *v = data[(block * group + j) * channels + c];
                        }
                        q.push_group(&vals, &mut codes);
                    }
                }
            }
        }
        Ok(q)
    }

    fn push_group(&mut self, vals: &[f32], codes: &mut [u8]) {
        let a = Affine::fit_values(vals, self.bits);
        a.quantize(vals, self.bits, codes);
        pack_unchecked(codes, self.bits, &mut self.codes);
        self.params.push(a);
    }

    /// Reconstructs the matrix (`tokens × channels`, row-major).
    pub fn dequantize(&self) -> Vec<f32> {
        let g = self.group;
        let mut out = vec![0f32; self.tokens * self.channels];
        let mut codes = vec![0u8; g];
        let mut vals = vec![0f32; g];
        let gb = packed_len(g, self.bits);
        for (i, a) in self.params.iter().enumerate() {
            unpack_unchecked(&self.codes[i * gb..(i + 1) * gb], self.bits, &mut codes);
            a.dequantize(&codes, &mut vals);
            match self.axis {
                Axis::PerToken => out[i * g..(i + 1) * g].copy_from_slice(&vals),
                Axis::PerChannel => {
                    let (block, c) = (i / self.channels, i % self.channels);
                    for (j, &v) in vals.iter().enumerate() {
                        out[(block * g + j) * self.channels + c] = v;
                    }
                }
            }
        }
        out
    }

    /// The quantization step of the group holding element `(token, channel)`,
    /// or `None` outside the matrix.
    pub fn step_at(&self, token: usize, channel: usize) -> Option<f32> {
        if token >= self.tokens || channel >= self.channels {
            return None;
        }
        let i = match self.axis {
            Axis::PerToken => token * (self.channels / self.group) + channel / self.group,
            Axis::PerChannel => (token / self.group) * self.channels + channel,
        };
        Some(self.params[i].step())
    }

    /// Bytes this matrix really holds: packed codes plus f16 min and scale per group.
    pub fn bytes(&self) -> usize {
        self.codes.len() + self.params.len() * AFFINE_BYTES
    }

    /// Bits per element, overhead included.
    pub fn effective_bits(&self) -> f64 {
        8.0 * self.bytes() as f64 / (self.tokens * self.channels).max(1) as f64
    }
}
