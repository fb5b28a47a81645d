//! [`TensorCache`]: a full-precision cache whose K/V are candle tensors on the model's
//! device. On a GPU it is the fp16 baseline the quantized caches are measured against:
//! K and V in f16 device memory; a decode step (one query a sequence) attends through
//! kvq's fused fp16 kernel (kernels/full.cu: K/V read once, at memory speed, like
//! flash-decoding), a chunk of several queries as two f16 matmuls around an f32 softmax
//! (as candle's own Llama attends). The model hands it q/k/v as device tensors through
//! [`DeviceKv`], with no trip through host memory. On the CPU the matmul path runs, so
//! CI checks it against the CPU [`Cache`](crate::cache::Cache).

use crate::cache::{CacheConfig, CacheInfo, CacheShape, DeviceKv, FullPrecision, HeldTokens, KvCache, Scheme};
use crate::error::{KvqError, Result};
use crate::size::Bytes;
use candle_core::{DType, Device, Tensor};

/// [`check_values`](crate::error::check_values) for K/V on a device: on a GPU one pass of
/// kvq's check kernel, elsewhere one sum and one max of |x|; a single read back, and the
/// offending value is located only when there is one.
pub fn check_values_on_device(what: &'static str, t: &Tensor) -> Result<()> {
    // On a GPU: one pass of kvq's check kernel (candle's reductions run one block an output).
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = t.device() {
        match crate::gpu_cache::tensor_values_in_range(dev, t)? {
            Some(true) => return Ok(()),
            Some(false) => return crate::error::check_values(what, &t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => {}
        }
    }
    let t = t.to_dtype(DType::F32)?;
    let stats = Tensor::stack(&[t.sum_all()?, t.abs()?.max_all()?], 0)?.to_vec1::<f32>()?;
    // A NaN or ±Inf makes the sum non-finite (max over |x| may skip a NaN).
    if !stats[0].is_finite() || stats[1] > crate::error::MAX_ABS_VALUE {
        crate::error::check_values(what, &t.flatten_all()?.to_vec1::<f32>()?)?;
    }
    Ok(())
}

pub struct TensorCache {
    config: CacheConfig,
    shape: CacheShape,
    device: Device,
    dtype: DType,
    capacity: usize,
    /// Per layer, K and V: `[batch, kv_heads, capacity, head_dim]`.
    layers: Vec<(Tensor, Tensor)>,
    len: Vec<usize>,
    padding: Vec<usize>,
}

impl TensorCache {
    /// A cache of `config` (fp16, bf16 or fp32) for `shape`, up to `capacity` tokens a
    /// sequence, allocated at once on `device`. (bf16 attends through the matmul path.)
    pub fn new(config: &CacheConfig, shape: CacheShape, capacity: usize, device: &Device) -> Result<Self> {
        let dtype = match config.scheme {
            Scheme::Full(FullPrecision::F16) => DType::F16,
            Scheme::Full(FullPrecision::Bf16) => DType::BF16,
            Scheme::Full(FullPrecision::F32) => DType::F32,
            _ => return Err(KvqError::Unsupported(format!("a tensor cache holds fp16, bf16 or fp32 K/V, not {}", config.label()))),
        };
        if config.pre_rope || config.sink_tokens != 0 || config.past_only {
            return Err(KvqError::Unsupported("a tensor cache stores keys after RoPE, with no sink, and attends causally".into()));
        }
        if capacity == 0 || shape.batch == 0 || shape.layers == 0 || shape.kv_heads == 0 || shape.head_dim == 0 {
            return Err(KvqError::InvalidParam(format!("a tensor cache needs a capacity and a shape of positive sizes, got {capacity} tokens and {shape:?}")));
        }
        let dims = (shape.batch, shape.kv_heads, capacity, shape.head_dim);
        let layers = (0..shape.layers).map(|_| Ok((Tensor::zeros(dims, dtype, device)?, Tensor::zeros(dims, dtype, device)?))).collect::<Result<Vec<_>>>()?;
        Ok(TensorCache { config: config.clone(), shape, device: device.clone(), dtype, capacity, layers, len: vec![0; shape.layers], padding: vec![0; shape.batch] })
    }

    fn layer(&self, layer: usize) -> Result<()> {
        if layer >= self.layers.len() {
            return Err(KvqError::InvalidParam(format!("layer {layer} of {}", self.layers.len())));
        }
        Ok(())
    }

    fn check(&self, what: &str, x: &Tensor, heads: usize) -> Result<usize> {
        let CacheShape { batch, head_dim, .. } = self.shape;
        match x.dims() {
            &[b, h, t, d] if b == batch && h == heads && d == head_dim && t > 0 => Ok(t),
            dims => Err(KvqError::Shape(format!("{what} must be [{batch}, {heads}, tokens, {head_dim}], got {dims:?}"))),
        }
    }
}

impl TensorCache {
    /// One query token a sequence over an fp16 cache on a GPU: kvq's fused decode kernel
    /// (kernels/full.cu) reads K/V once, as a serious fp16 baseline must; `None` where it
    /// does not apply (other devices, dtypes, shapes, several queries).
    #[cfg(feature = "cuda")]
    fn fused_decode(&self, layer: usize, q: &Tensor) -> Result<Option<Tensor>> {
        use crate::cuda::{fp16_attention_supported, fp16_decode_attention, FullAttnShape};
        use crate::gpu_cache::{tensor_of, with_cuda};
        let Device::Cuda(dev) = &self.device else { return Ok(None) };
        let CacheShape { batch, kv_heads, head_dim, .. } = self.shape;
        let q_heads = q.dims()[1];
        if self.dtype != DType::F16 || q.dims()[2] != 1 || !fp16_attention_supported(head_dim, q_heads, kv_heads) {
            return Ok(None);
        }
        let shape = FullAttnShape { batch, q_heads, kv_heads, head_dim, cap: self.capacity, n: self.len[layer] };
        let mut out = dev.alloc_zeros::<f32>(batch * q_heads * head_dim).map_err(crate::cuda::gpu)?;
        let (kc, vc) = &self.layers[layer];
        let q = q.to_dtype(DType::F32)?;
        with_cuda::<f32, _>(&q, |qd| with_cuda::<half::f16, _>(kc, |kd| with_cuda::<half::f16, _>(vc, |vd| fp16_decode_attention(dev, qd, kd, vd, shape, &mut out))))?;
        Ok(Some(tensor_of(out, dev, &[batch, q_heads, 1, head_dim])))
    }
}

impl DeviceKv for TensorCache {
    fn append_tensors(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        self.layer(layer)?;
        let t = self.check("keys", k, self.shape.kv_heads)?;
        if v.dims() != k.dims() {
            return Err(KvqError::Shape(format!("values {:?} and keys {:?} differ in shape", v.dims(), k.dims())));
        }
        check_values_on_device("keys", k)?;
        check_values_on_device("values", v)?;
        let at = self.len[layer];
        if at + t > self.capacity {
            return Err(KvqError::ContextOverflow { len: at + t, max: self.capacity });
        }
        let (kc, vc) = &self.layers[layer];
        kc.slice_set(&k.to_dtype(self.dtype)?.contiguous()?, 2, at)?;
        vc.slice_set(&v.to_dtype(self.dtype)?.contiguous()?, 2, at)?;
        self.len[layer] = at + t;
        Ok(())
    }

    fn attend_tensors(&mut self, layer: usize, q: &Tensor) -> Result<Tensor> {
        self.layer(layer)?;
        let CacheShape { batch, kv_heads, head_dim: d, .. } = self.shape;
        let q_heads = q.dims().get(1).copied().unwrap_or(0);
        if q_heads == 0 || q_heads % kv_heads != 0 {
            return Err(KvqError::Shape(format!("{q_heads} query heads cannot share {kv_heads} KV heads")));
        }
        let t = self.check("queries", q, q_heads)?;
        let n = self.len[layer];
        if t > n {
            return Err(KvqError::Shape(format!("{t} queries but the layer holds only {n} tokens")));
        }
        let rep = q_heads / kv_heads;
        #[cfg(feature = "cuda")]
        if let Some(out) = self.fused_decode(layer, q)? {
            return Ok(out);
        }
        let (kc, vc) = &self.layers[layer];
        let (k, v) = (kc.narrow(2, 0, n)?, vc.narrow(2, 0, n)?);
        // Query heads h·rep + r read KV head h: [b, hkv, rep·t, d] against [b, hkv, n, d].
        let q = q.reshape((batch, kv_heads, rep * t, d))?.to_dtype(self.dtype)?;
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * (1.0 / (d as f64).sqrt()))?;
        let scores = if t > 1 {
            // Query i (of t, the newest positions) sees keys up to n − t + i.
            let mask: Vec<f32> = (0..rep * t).flat_map(|row| (0..n).map(move |j| if j + t > n + row % t { f32::NEG_INFINITY } else { 0.0 })).collect();
            scores.broadcast_add(&Tensor::from_vec(mask, (rep * t, n), &self.device)?)?
        } else {
            scores
        };
        let p = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
        let out = p.matmul(&v)?.to_dtype(DType::F32)?;
        Ok(out.reshape((batch, q_heads, t, d))?)
    }
}

impl KvCache for TensorCache {
    fn config(&self) -> &CacheConfig {
        &self.config
    }
    fn shape(&self) -> CacheShape {
        self.shape
    }
    fn wants_pre_rope_keys(&self) -> bool {
        false
    }
    fn seq_len(&self) -> usize {
        self.len.first().copied().unwrap_or(0)
    }
    fn set_padding(&mut self, row_start: &[usize]) -> Result<()> {
        crate::cache::refuse_padding(row_start, self.shape.batch, "tensor cache")
    }
    fn padding(&self) -> &[usize] {
        &self.padding
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], tokens: usize) -> Result<()> {
        let CacheShape { batch, kv_heads, head_dim, .. } = self.shape;
        let dims = (batch, kv_heads, tokens, head_dim);
        if tokens == 0 || k.len() != batch * kv_heads * tokens * head_dim || v.len() != k.len() {
            return Err(KvqError::Shape(format!("append of {tokens} tokens needs {} values each for K and V, got {} and {}", batch * kv_heads * tokens * head_dim, k.len(), v.len())));
        }
        let (kt, vt) = (Tensor::from_slice(k, dims, &self.device)?, Tensor::from_slice(v, dims, &self.device)?);
        self.append_tensors(layer, &kt, &vt)
    }
    fn attend(&mut self, layer: usize, q: &[f32], q_heads: usize, tokens: usize, out: &mut [f32]) -> Result<()> {
        let CacheShape { batch, head_dim, .. } = self.shape;
        let want = batch * q_heads * tokens * head_dim;
        if tokens == 0 || q.len() != want || out.len() != want {
            return Err(KvqError::Shape(format!("queries and output need {want} values, got {} and {}", q.len(), out.len())));
        }
        let qt = Tensor::from_slice(q, (batch, q_heads, tokens, head_dim), &self.device)?;
        let o = self.attend_tensors(layer, &qt)?.flatten_all()?.to_vec1::<f32>()?;
        out.copy_from_slice(&o);
        Ok(())
    }
    fn materialize(&self, layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        self.layer(layer)?;
        let n = self.len[layer];
        let (kc, vc) = &self.layers[layer];
        let get = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.narrow(2, 0, n)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
        Ok((get(kc)?, get(vc)?))
    }
    fn bytes(&self) -> Bytes {
        let CacheShape { batch, kv_heads, head_dim, .. } = self.shape;
        let held: usize = self.len.iter().sum();
        Bytes { full: 2 * batch * kv_heads * head_dim * held * self.dtype.size_in_bytes(), ..Bytes::default() }
    }
    fn info(&self) -> CacheInfo {
        let total = self.seq_len();
        let elements = 2 * self.shape.layers * self.shape.kv_heads * self.shape.head_dim * total * self.shape.batch;
        let held = HeldTokens { total, quantized: 0, key_quantized: 0, sink: 0 };
        CacheInfo::new(format!("{} (tensors on {:?})", self.config.label(), self.device.location()), &self.config, self.shape, held, self.bytes(), elements)
    }
    fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(&r) = rows.iter().find(|&&r| r >= self.shape.batch) {
            return Err(KvqError::InvalidParam(format!("row {r} of a batch of {}", self.shape.batch)));
        }
        let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), &self.device)?;
        for (k, v) in self.layers.iter_mut() {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        self.shape.batch = rows.len();
        self.padding = vec![0; rows.len()];
        Ok(())
    }
    fn reset(&mut self) {
        self.len.iter_mut().for_each(|n| *n = 0);
    }
    fn on_device(&mut self) -> Option<&mut dyn DeviceKv> {
        Some(self)
    }
}
