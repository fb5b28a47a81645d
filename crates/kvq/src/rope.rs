//! Rotary position embedding (RoPE), in plain Rust so that caches that store keys
//! *before* RoPE (KVQuant) can rotate them on read with the model's exact rotation.

use serde::{Deserialize, Serialize};

/// How channel pairs are formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: GGUF / llama.cpp's layout for Llama weights.
    Interleaved,
    /// Pairs `(i, i + d/2)`: Hugging Face's `rotate_half`.
    Half,
}

/// RoPE for one head dimension, with a cos/sin table for the first `max_positions`.
#[derive(Clone, Debug)]
pub struct Rope {
    pub theta: f32,
    pub head_dim: usize,
    pub style: RopeStyle,
    inv_freq: Vec<f64>,
    table_positions: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(theta: f32, head_dim: usize, style: RopeStyle, max_positions: usize) -> Self {
        let half = head_dim / 2;
        // Computed in f64 and rounded once: f32 `powf`/`sin`/`cos` differ by an ulp between
        // glibc (native) and Rust's libm (wasm), and the browser demo must give the same keys.
        let inv_freq: Vec<f64> =
            (0..half).map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / head_dim as f64)).collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in &inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Rope { theta, head_dim, style, inv_freq, table_positions: max_positions, cos, sin }
    }

    /// Rotates one vector of `head_dim` values to position `pos`.
    #[inline]
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.head_dim / 2;
        if pos < self.table_positions {
            let c = &self.cos[pos * half..(pos + 1) * half];
            let s = &self.sin[pos * half..(pos + 1) * half];
            self.rotate(x, |i| (c[i], s[i]));
        } else {
            let inv = &self.inv_freq;
            self.rotate(x, |i| {
                let a = pos as f64 * inv[i];
                (a.cos() as f32, a.sin() as f32)
            });
        }
    }

    #[inline]
    fn rotate(&self, x: &mut [f32], cs: impl Fn(usize) -> (f32, f32)) {
        let half = self.head_dim / 2;
        match self.style {
            RopeStyle::Interleaved => {
                for i in 0..half {
                    let (c, s) = cs(i);
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    x[2 * i] = a * c - b * s;
                    x[2 * i + 1] = a * s + b * c;
                }
            }
            RopeStyle::Half => {
                for i in 0..half {
                    let (c, s) = cs(i);
                    let (a, b) = (x[i], x[i + half]);
                    x[i] = a * c - b * s;
                    x[i + half] = a * s + b * c;
                }
            }
        }
    }

    /// cos and sin of positions `pos0 .. pos0 + t`, `[t][head_dim / 2]` each: the very
    /// values `apply` rotates by (for a rotation done elsewhere, e.g. on a GPU).
    pub fn tables(&self, pos0: usize, t: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.head_dim / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
        for pos in pos0..pos0 + t {
            if pos < self.table_positions {
                cos.extend_from_slice(&self.cos[pos * half..(pos + 1) * half]);
                sin.extend_from_slice(&self.sin[pos * half..(pos + 1) * half]);
            } else {
                for &f in &self.inv_freq {
                    let a = pos as f64 * f;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        (cos, sin)
    }

    /// Rotates `rows` consecutive vectors, the first at position `pos0`.
    pub fn apply_rows(&self, xs: &mut [f32], pos0: usize) {
        for (i, row) in xs.chunks_exact_mut(self.head_dim).enumerate() {
            self.apply(row, pos0 + i);
        }
    }
}
