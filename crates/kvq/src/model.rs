//! A Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) whose
//! attention goes through a [`KvCache`]. Linear layers are candle `QMatMul`s, so the
//! same code runs float weights (the small test model) and GGUF quantized weights.
//!
//! ```text
//! x = embed(tokens)
//! for each layer:
//!     h = rms_norm(x)
//!     q, k, v = h·Wq, h·Wk, h·Wv
//!     q = rope(q);  k = rope(k)        (k stays unrotated if the cache wants it so)
//!     cache.append(k, v);  a = cache.attend(q)
//!     x = x + a·Wo
//!     h = rms_norm(x)
//!     x = x + (silu(h·Wgate) * h·Wup)·Wdown
//! logits = rms_norm(x)·Wout
//! ```

use crate::cache::{Cache, CacheConfig, CacheShape, KvCache, KvQuantCalibration, LayerSamples, Scheme, FullPrecision};
use crate::error::{KvqError, Result};
use crate::rng::SplitMix64;
use crate::rope::{Rope, RopeStyle};
use crate::size::ModelGeometry;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor, D};
// `Module` gives QMatMul its `forward`.
use std::sync::Arc;

/// The hyper-parameters of a Llama-family model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rms_eps: f64,
    pub max_seq_len: usize,
}

impl LlamaConfig {
    /// The small deterministic model of the tests: SmolLM2's shape of attention
    /// (3 query heads per KV head, head dim 64), scaled down to run in milliseconds.
    pub fn tiny() -> Self {
        LlamaConfig {
            vocab_size: 512,
            hidden_size: 192,
            intermediate_size: 512,
            layers: 4,
            q_heads: 6,
            kv_heads: 2,
            head_dim: 64,
            rope_theta: 10_000.0,
            rope_style: RopeStyle::Half,
            rms_eps: 1e-5,
            max_seq_len: 4096,
        }
    }

    pub fn geometry(&self, name: &str) -> ModelGeometry {
        ModelGeometry { name: name.into(), layers: self.layers, q_heads: self.q_heads, kv_heads: self.kv_heads, head_dim: self.head_dim }
    }

    fn validate(&self) -> Result<()> {
        if self.q_heads == 0 || self.kv_heads == 0 || self.q_heads % self.kv_heads != 0 {
            return Err(KvqError::InvalidParam(format!("{} query heads cannot share {} KV heads", self.q_heads, self.kv_heads)));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return Err(KvqError::InvalidParam(format!("head dim must be even, got {}", self.head_dim)));
        }
        if self.layers == 0 || self.vocab_size == 0 || self.hidden_size == 0 {
            return Err(KvqError::InvalidParam("layers, vocabulary and hidden size must be positive".into()));
        }
        Ok(())
    }
}

/// A linear layer `x · Wᵀ`: candle's (float or quantized) matmul, or kvq's SIMD
/// block matmul for weights kept as stored (Q4_1, Q8_0).
pub enum Linear {
    Candle(QMatMul),
    Blocks(crate::qmatmul::BlockMatrix),
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            // candle multiplies a [b, t, in] input as b separate products (at t = 1, a batch
            // of matrix-vector products, each reading all of W): one [b·t, in] product instead.
            Linear::Candle(m) => match *x.dims() {
                [b, t, n] => {
                    let y = m.forward(&x.reshape((b * t, n))?)?;
                    let out = y.dim(1)?;
                    Ok(y.reshape((b, t, out))?)
                }
                _ => Ok(m.forward(x)?),
            },
            Linear::Blocks(m) => m.forward(x),
        }
    }
}

impl From<QMatMul> for Linear {
    fn from(m: QMatMul) -> Self {
        Linear::Candle(m)
    }
}

/// One decoder layer's weights.
pub struct Block {
    pub attn_norm: Tensor,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub ffn_norm: Tensor,
    pub w_gate: Linear,
    pub w_up: Linear,
    pub w_down: Linear,
}

pub struct Llama {
    pub config: LlamaConfig,
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    pub lm_head: Linear,
    pub rope: Arc<Rope>,
    pub device: Device,
}

fn random_matrix(rng: &mut SplitMix64, out_dim: usize, in_dim: usize, gain: f32, dev: &Device) -> Result<Linear> {
    // Uniform with variance gain²/in_dim keeps activations at a steady scale.
    let a = gain * (3.0 / in_dim as f32).sqrt();
    let w: Vec<f32> = (0..out_dim * in_dim).map(|_| rng.uniform(a)).collect();
    Ok(Linear::Candle(QMatMul::Tensor(Tensor::from_vec(w, (out_dim, in_dim), dev)?)))
}

fn random_norm(rng: &mut SplitMix64, n: usize, dev: &Device) -> Result<Tensor> {
    let w: Vec<f32> = (0..n).map(|_| 1.0 + rng.uniform(0.1)).collect();
    Ok(Tensor::from_vec(w, n, dev)?)
}

impl Llama {
    /// A model with deterministic pseudo-random weights: no download, same on every machine.
    pub fn random(config: LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let mut rng = SplitMix64::new(seed);
        let (h, d) = (c.hidden_size, c.head_dim);
        let embed: Vec<f32> = (0..c.vocab_size * h).map(|_| rng.uniform(1.0)).collect();
        let embed = Tensor::from_vec(embed, (c.vocab_size, h), device)?;
        let mut blocks = Vec::with_capacity(c.layers);
        for _ in 0..c.layers {
            blocks.push(Block {
                attn_norm: random_norm(&mut rng, h, device)?,
                // A larger gain on Wq/Wk gives peaked attention, like trained models.
                wq: random_matrix(&mut rng, c.q_heads * d, h, 2.0, device)?,
                wk: random_matrix(&mut rng, c.kv_heads * d, h, 2.0, device)?,
                wv: random_matrix(&mut rng, c.kv_heads * d, h, 1.0, device)?,
                wo: random_matrix(&mut rng, h, c.q_heads * d, 0.5, device)?,
                ffn_norm: random_norm(&mut rng, h, device)?,
                w_gate: random_matrix(&mut rng, c.intermediate_size, h, 1.0, device)?,
                w_up: random_matrix(&mut rng, c.intermediate_size, h, 1.0, device)?,
                w_down: random_matrix(&mut rng, h, c.intermediate_size, 0.5, device)?,
            });
        }
        let norm = random_norm(&mut rng, h, device)?;
        let lm_head = random_matrix(&mut rng, c.vocab_size, h, 4.0, device)?;
        Llama::from_parts(config, embed, blocks, norm, lm_head, device.clone())
    }

    /// Assembles a model from weights (the GGUF loader uses this too).
    pub fn from_parts(config: LlamaConfig, embed: Tensor, blocks: Vec<Block>, norm: Tensor, lm_head: Linear, device: Device) -> Result<Self> {
        config.validate()?;
        if blocks.len() != config.layers {
            return Err(KvqError::Shape(format!("{} blocks for {} layers", blocks.len(), config.layers)));
        }
        let rope = Arc::new(Rope::new(config.rope_theta, config.head_dim, config.rope_style, config.max_seq_len));
        Ok(Llama { config, embed, blocks, norm, lm_head, rope, device })
    }

    /// Changes the RoPE base (tests use this to show a wrong base is caught).
    pub fn set_rope_theta(&mut self, theta: f32) {
        self.config.rope_theta = theta;
        self.rope = Arc::new(Rope::new(theta, self.config.head_dim, self.config.rope_style, self.config.max_seq_len));
    }

    /// The cache shape this model needs at batch `batch`.
    pub fn cache_shape(&self, batch: usize) -> CacheShape {
        CacheShape { layers: self.config.layers, batch, kv_heads: self.config.kv_heads, head_dim: self.config.head_dim }
    }

    /// A cache for this model (KVQuant needs `calibration`, see [`Llama::calibrate_kvquant`]).
    pub fn new_cache(&self, config: &CacheConfig, batch: usize, calibration: Option<Arc<KvQuantCalibration>>) -> Result<Cache> {
        Cache::new(config, self.cache_shape(batch), Some(self.rope.clone()), calibration)
    }

    /// Runs `batch` rows of `tokens.len() / batch` new tokens each through the model.
    /// Positions continue from `cache.seq_len()`; left padding declared on the cache
    /// ([`KvCache::set_padding`]) is skipped. Returns logits `[batch, t, vocab]` for every
    /// new position, or `[batch, 1, vocab]` for the last when `all_logits` is false.
    ///
    /// A forward that fails after it has started appending resets the cache, so the
    /// layers never disagree about how many tokens they hold.
    pub fn forward(&self, tokens: &[u32], batch: usize, cache: &mut dyn KvCache, all_logits: bool) -> Result<Tensor> {
        let c = &self.config;
        if batch == 0 || tokens.is_empty() || tokens.len() % batch != 0 {
            return Err(KvqError::Shape(format!("{} tokens cannot form {batch} equal rows", tokens.len())));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(KvqError::InvalidParam(format!("token id {t} is outside the vocabulary of {}", c.vocab_size)));
        }
        let shape = cache.shape();
        if shape != self.cache_shape(batch) {
            return Err(KvqError::Shape(format!("the cache is shaped {shape:?}, the model needs {:?}", self.cache_shape(batch))));
        }
        let t = tokens.len() / batch;
        let pos0 = cache.seq_len();
        if pos0 + t > c.max_seq_len {
            return Err(KvqError::ContextOverflow { len: pos0 + t, max: c.max_seq_len });
        }
        // On a worker of the thread pool, the parallel loops inside (attention, the
        // block matmul) run on this thread plus the others, with no wake-up of a
        // sleeping pool for every one of the ~200 matmuls of a decode step.
        // (candle's own matmuls have their own spinning pool: leave them where they are.)
        #[cfg(feature = "parallel")]
        let out = if self.uses_kvq_matmul() {
            rayon::scope(|_| self.forward_layers(tokens, batch, t, pos0, cache, all_logits))
        } else {
            self.forward_layers(tokens, batch, t, pos0, cache, all_logits)
        };
        #[cfg(not(feature = "parallel"))]
        let out = self.forward_layers(tokens, batch, t, pos0, cache, all_logits);
        if out.is_err() {
            cache.reset();
        }
        out
    }

    fn forward_layers(&self, tokens: &[u32], batch: usize, t: usize, pos0: usize, cache: &mut dyn KvCache, all_logits: bool) -> Result<Tensor> {
        let c = &self.config;
        let pad = cache.padding().to_vec();
        let (hq, hkv, d) = (c.q_heads, c.kv_heads, c.head_dim);
        let ids = Tensor::from_slice(tokens, batch * t, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.reshape((batch, t, c.hidden_size))?;
        let pre_rope = cache.wants_pre_rope_keys();
        // A cache on the model's device takes q/k/v as tensors there: no host round trip
        // (RoPE is done on the device too, with the same cos/sin values; keys stay
        // unrotated for a cache that stores them before RoPE).
        let on_device = pad.iter().all(|&p| p == 0) && cache.on_device().is_some();
        let rope_tables = if on_device {
            let (cos, sin) = self.rope.tables(pos0, t);
            let half = d / 2;
            Some((Tensor::from_vec(cos, (t, half), &self.device)?, Tensor::from_vec(sin, (t, half), &self.device)?))
        } else {
            None
        };
        let mut attn = vec![0f32; if on_device { 0 } else { batch * hq * t * d }];
        for (li, blk) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &blk.attn_norm, c.rms_eps as f32)?;
            if let (Some((cos, sin)), Some(dev_cache)) = (&rope_tables, cache.on_device()) {
                let heads = |y: Tensor, n: usize| -> Result<Tensor> { Ok(y.reshape((batch, t, n, d))?.transpose(1, 2)?.contiguous()?.to_dtype(DType::F32)?) };
                let q = self.rope_tensor(&heads(blk.wq.forward(&h)?, hq)?, cos, sin)?;
                let k = heads(blk.wk.forward(&h)?, hkv)?;
                let k = if pre_rope { k } else { self.rope_tensor(&k, cos, sin)? };
                let v = heads(blk.wv.forward(&h)?, hkv)?;
                dev_cache.append_tensors(li, &k, &v)?;
                let a = dev_cache.attend_tensors(li, &q)?.transpose(1, 2)?.reshape((batch, t, hq * d))?;
                x = (x + blk.wo.forward(&a)?)?;
            } else {
                let mut q = heads_major(&blk.wq.forward(&h)?, batch, t, hq, d)?;
                let mut k = heads_major(&blk.wk.forward(&h)?, batch, t, hkv, d)?;
                let v = heads_major(&blk.wv.forward(&h)?, batch, t, hkv, d)?;
                self.rotate(&mut q, hq, t, pos0, &pad);
                if !pre_rope {
                    self.rotate(&mut k, hkv, t, pos0, &pad);
                }
                cache.append(li, &k, &v, t)?;
                cache.attend(li, &q, hq, t, &mut attn)?;
                let a = Tensor::from_slice(&attn, (batch, hq, t, d), &self.device)?
                    .transpose(1, 2)?
                    .reshape((batch, t, hq * d))?;
                x = (x + blk.wo.forward(&a)?)?;
            }
            let h = candle_nn::ops::rms_norm(&x, &blk.ffn_norm, c.rms_eps as f32)?;
            let gate = candle_nn::ops::silu(&blk.w_gate.forward(&h)?)?;
            let up = blk.w_up.forward(&h)?;
            x = (x + blk.w_down.forward(&(gate * up)?)?)?;
        }
        let x = if all_logits { x } else { x.narrow(1, t - 1, 1)?.contiguous()? };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, c.rms_eps as f32)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// RoPE on a `[batch, heads, t, head_dim]` tensor with `[t, head_dim / 2]` tables.
    fn rope_tensor(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(match self.rope.style {
            crate::rope::RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(x, cos, sin)?,
            crate::rope::RopeStyle::Half => candle_nn::rotary_emb::rope(x, cos, sin)?,
        })
    }

    /// Whether the linear layers run on kvq's SIMD matmul (rather than candle's).
    fn uses_kvq_matmul(&self) -> bool {
        matches!(self.lm_head, Linear::Blocks(_)) || self.blocks.iter().any(|b| matches!(b.wq, Linear::Blocks(_)))
    }

    /// RoPE on `[batch][head][t][d]` rows: a row's positions count from its first real
    /// token (pads, which attention never sees, stay unrotated).
    fn rotate(&self, x: &mut [f32], heads: usize, t: usize, pos0: usize, pad: &[usize]) {
        let d = self.config.head_dim;
        for (i, row) in x.chunks_exact_mut(t * d).enumerate() {
            let p = pad[i / heads];
            let first = p.saturating_sub(pos0).min(t);
            self.rope.apply_rows(&mut row[first * d..], pos0 + first - p);
        }
    }

    /// Runs `tokens` and records, for each of `layers` and every KV head, the keys
    /// after RoPE, the keys before RoPE and the values: a [`KvSample`](crate::sample::KvSample).
    pub fn capture_sample(&self, tokens: &[u32], layers: &[usize], model_name: &str, source: &str, command: &str) -> Result<crate::sample::KvSample> {
        use crate::sample::{ArrayInfo, KvSample, SampleHeader};
        if tokens.is_empty() {
            return Err(KvqError::EmptyPrompt);
        }
        if let Some(&l) = layers.iter().find(|&&l| l >= self.config.layers) {
            return Err(KvqError::LayerOutOfRange { layer: l, layers: self.config.layers });
        }
        let rec = CacheConfig { pre_rope: true, ..CacheConfig::new(Scheme::Full(FullPrecision::F32)) };
        let mut cache = self.new_cache(&rec, 1, None)?;
        self.forward(tokens, 1, &mut cache, false)?;
        let (n, d) = (tokens.len(), self.config.head_dim);
        let mut arrays = Vec::new();
        let mut data = Vec::new();
        for &l in layers {
            let (k, v) = cache.materialize(l)?;
            let (k_raw, _) = cache.materialize_stored(l)?;
            for h in 0..self.config.kv_heads {
                for (kind, src) in [("keys", &k), ("keys_pre_rope", &k_raw), ("values", &v)] {
                    arrays.push(ArrayInfo { layer: l, head: h, kind: kind.into(), offset: 0 });
                    data.push(src[h * n * d..(h + 1) * n * d].to_vec());
                }
            }
        }
        let style = match self.config.rope_style {
            RopeStyle::Interleaved => "interleaved",
            RopeStyle::Half => "half",
        };
        let header = SampleHeader {
            format: "kvq K/V sample v1".into(),
            model: model_name.into(),
            source: source.into(),
            command: command.into(),
            tokens: n,
            head_dim: d,
            rope_theta: self.config.rope_theta,
            rope_style: style.into(),
            arrays,
        };
        Ok(KvSample { header, data })
    }

    /// Records K (before RoPE) and V on `tokens` and fits a KVQuant calibration.
    pub fn calibrate_kvquant(&self, tokens: &[u32], bits: u8, outlier_fraction: f32) -> Result<KvQuantCalibration> {
        if tokens.is_empty() {
            return Err(KvqError::EmptyPrompt);
        }
        let rec = CacheConfig { pre_rope: true, ..CacheConfig::new(Scheme::Full(FullPrecision::F32)) };
        let mut cache = self.new_cache(&rec, 1, None)?;
        self.forward(tokens, 1, &mut cache, false)?;
        let stored: Vec<(Vec<f32>, Vec<f32>)> = (0..self.config.layers).map(|l| cache.materialize_stored(l)).collect::<Result<_>>()?;
        let samples: Vec<LayerSamples> = stored.iter().map(|(k, v)| LayerSamples { keys: k, values: v, tokens: tokens.len() }).collect();
        KvQuantCalibration::fit(&samples, self.config.kv_heads, self.config.head_dim, bits as u32, outlier_fraction, true)
    }
}

/// `[batch, t, heads·d]` → `[batch][head][t][d]` as a flat vector.
fn heads_major(x: &Tensor, batch: usize, t: usize, heads: usize, d: usize) -> Result<Vec<f32>> {
    Ok(x.reshape((batch, t, heads, d))?.transpose(1, 2)?.contiguous()?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Log-softmax over the last dimension, as f32 values (for perplexity and KL).
pub fn log_softmax_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let v = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let dims = v.dims().to_vec();
    let vocab = *dims.last().unwrap_or(&0);
    let flat = v.flatten_all()?.to_vec1::<f32>()?;
    Ok(flat.chunks(vocab.max(1)).map(|r| r.to_vec()).collect())
}
