//! [`PackedGpuCache`]: a KIVI or per-token cache in GPU memory behind kvq's [`KvCache`]
//! trait, so the model runs with its K/V packed on the GPU (feature `cuda`).
//!
//! Each layer is a [`PackedGpuLayer`]: appends quantize and pack on the GPU, attention
//! reads the packed codes there (KIVI's packed tiles on tensor cores, per-token keys on
//! CUDA cores). The model hands it
//! q/k/v as GPU tensors ([`DeviceKv`]: nothing crosses to the host); through the
//! trait's host slices (`append`/`attend`, as wrappers like `kvq bench gpu-model`'s
//! checker use) a step copies its new q/k/v up and the attention output down. The cache
//! itself never leaves the GPU. Attention follows the CPU cache's rules: with
//! `past_only` (the KIVI presets' default) a chunk's queries see the tokens held before
//! it from the store and the chunk's own K/V at full precision, causally.

use crate::cache::{CacheConfig, CacheInfo, CacheShape, DeviceKv, HeldTokens, KvCache, KvQuantCalibration, Scheme};
use crate::cuda::{AttnKernel, CudaRope, KvQuantGpuLayer, PackedGpuLayer, gpu};
use crate::rope::Rope;
use std::sync::Arc;
use crate::error::{KvqError, Result};
use crate::size::Bytes;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{op::BackpropOp, CudaStorage, Storage, Tensor};

pub struct PackedGpuCache {
    dev: CudaDevice,
    config: CacheConfig,
    shape: CacheShape,
    layers: Vec<PackedGpuLayer>,
    /// Each layer's last append, on the GPU: what past-only attention reads as the chunk
    /// (from host slices, or as the model's tensors on the device path).
    fresh: Vec<Option<(CudaSlice<f32>, CudaSlice<f32>, usize)>>,
    fresh_tensors: Vec<Option<(Tensor, Tensor)>>,
    padding: Vec<usize>,
    kernel: AttnKernel,
}

impl PackedGpuCache {
    /// A cache for `shape` holding up to `capacity` tokens a sequence.
    pub fn new(dev: &CudaDevice, config: &CacheConfig, shape: CacheShape, capacity: usize) -> Result<Self> {
        let streams = shape.batch * shape.kv_heads;
        let layers = (0..shape.layers).map(|_| PackedGpuLayer::new(dev, config, streams, shape.head_dim, capacity)).collect::<Result<Vec<_>>>()?;
        Ok(PackedGpuCache { dev: dev.clone(), config: config.clone(), shape, fresh: (0..shape.layers).map(|_| None).collect(), fresh_tensors: (0..shape.layers).map(|_| None).collect(), layers, padding: vec![0; shape.batch], kernel: AttnKernel::Auto })
    }

    /// Which kernel reads the packed tiles (the default: tensor cores); `kvq bench
    /// gpu-model` runs the model with both.
    pub fn with_kernel(mut self, kernel: AttnKernel) -> Self {
        self.kernel = kernel;
        self
    }

    fn layer(&self, layer: usize) -> Result<()> {
        if layer >= self.layers.len() {
            return Err(KvqError::InvalidParam(format!("layer {layer} of {}", self.layers.len())));
        }
        Ok(())
    }
}

// The checks both GPU caches make, in one place.

/// New K/V from host slices (`[batch][kv_heads][tokens][head_dim]`): checked by kvq's
/// value rule and copied to the GPU.
fn upload_kv(dev: &CudaDevice, shape: CacheShape, k: &[f32], v: &[f32], tokens: usize) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let need = shape.batch * shape.kv_heads * tokens * shape.head_dim;
    if tokens == 0 || k.len() != need || v.len() != need {
        return Err(KvqError::Shape(format!("append of {tokens} tokens needs {need} values each for K and V, got {} and {}", k.len(), v.len())));
    }
    crate::error::check_values("keys", k)?;
    crate::error::check_values("values", v)?;
    Ok((dev.clone_htod(k).map_err(gpu)?, dev.clone_htod(v).map_err(gpu)?))
}

/// Queries from a host slice (`[batch][q_heads][tokens][head_dim]`) for a layer holding
/// `held` tokens: checked, copied to the GPU, with an output buffer of the same size.
fn upload_queries(dev: &CudaDevice, shape: CacheShape, held: usize, q: &[f32], q_heads: usize, tokens: usize, out: &[f32]) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let CacheShape { batch, kv_heads, head_dim: d, .. } = shape;
    if q_heads == 0 || q_heads % kv_heads != 0 {
        return Err(KvqError::Shape(format!("{q_heads} query heads cannot share {kv_heads} KV heads")));
    }
    let want = batch * q_heads * tokens * d;
    if tokens == 0 || q.len() != want || out.len() != want {
        return Err(KvqError::Shape(format!("queries and output need {want} values, got {} and {}", q.len(), out.len())));
    }
    if let Some(index) = q.iter().position(|x| !x.is_finite()) {
        return Err(KvqError::NonFinite { what: "queries", index, value: q[index] });
    }
    if tokens > held {
        return Err(KvqError::Shape(format!("{tokens} queries but the layer holds only {held} tokens")));
    }
    Ok((dev.clone_htod(q).map_err(gpu)?, dev.alloc_zeros::<f32>(want).map_err(gpu)?))
}

/// What `materialize` says: the quantized GPU caches do not copy their K/V back.
fn stays_on_gpu() -> KvqError {
    KvqError::Unsupported("the GPU cache's K/V stay on the GPU; materialize a CPU cache of the same preset".into())
}

/// `select_rows` of a quantized GPU cache: only the identity (no beam search yet).
fn keep_all_rows(rows: &[usize], batch: usize) -> Result<()> {
    if rows.iter().copied().eq(0..batch) {
        return Ok(());
    }
    Err(KvqError::Unsupported("reordering or dropping sequences (beam search) is not in the GPU cache yet".into()))
}

/// Tokens of new K/V tensors (`[batch, kv_heads, tokens, head_dim]` on the GPU), checked
/// by kvq's value rule in one pass on the device.
fn kv_tensor_tokens(shape: CacheShape, k: &Tensor, v: &Tensor) -> Result<usize> {
    let CacheShape { batch, kv_heads, head_dim, .. } = shape;
    let tokens = match k.dims() {
        &[b, h, t, d] if b == batch && h == kv_heads && d == head_dim && t > 0 && v.dims() == k.dims() => t,
        dims => return Err(KvqError::Shape(format!("keys and values must be [{batch}, {kv_heads}, tokens, {head_dim}], got {dims:?} and {:?}", v.dims()))),
    };
    crate::tensor_cache::check_values_on_device("keys", k)?;
    crate::tensor_cache::check_values_on_device("values", v)?;
    Ok(tokens)
}

/// (query heads, tokens) of a query tensor `[batch, q_heads, tokens, head_dim]` for a
/// layer holding `held` tokens.
fn query_tensor_dims(shape: CacheShape, held: usize, q: &Tensor) -> Result<(usize, usize)> {
    let CacheShape { batch, kv_heads, head_dim: d, .. } = shape;
    let (q_heads, tokens) = match q.dims() {
        &[b, h, t, dd] if b == batch && dd == d && h > 0 && h % kv_heads == 0 && t > 0 => (h, t),
        dims => return Err(KvqError::Shape(format!("queries must be [{batch}, a multiple of {kv_heads}, tokens, {d}], got {dims:?}"))),
    };
    if tokens > held {
        return Err(KvqError::Shape(format!("{tokens} queries but the layer holds only {held} tokens")));
    }
    Ok((q_heads, tokens))
}

impl KvCache for PackedGpuCache {
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
        self.layers.first().map_or(0, PackedGpuLayer::len)
    }

    fn set_padding(&mut self, row_start: &[usize]) -> Result<()> {
        crate::cache::refuse_padding(row_start, self.shape.batch, "GPU cache")
    }

    fn padding(&self) -> &[usize] {
        &self.padding
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], tokens: usize) -> Result<()> {
        self.layer(layer)?;
        let (kd, vd) = upload_kv(&self.dev, self.shape, k, v, tokens)?;
        self.layers[layer].append(&kd, &vd, tokens, 0, tokens)?;
        self.fresh[layer] = Some((kd, vd, tokens));
        self.fresh_tensors[layer] = None;
        Ok(())
    }

    fn attend(&mut self, layer: usize, q: &[f32], q_heads: usize, tokens: usize, out: &mut [f32]) -> Result<()> {
        self.layer(layer)?;
        let (qd, mut od) = upload_queries(&self.dev, self.shape, self.layers[layer].len(), q, q_heads, tokens, out)?;
        let lay = &mut self.layers[layer];
        if self.config.past_only {
            let Some((fk, fv, t)) = self.fresh[layer].as_ref() else {
                return Err(KvqError::Shape("past-only attention reads the chunk just appended, and nothing was".into()));
            };
            if *t != tokens {
                return Err(KvqError::Shape(format!("past-only attention of {tokens} queries, but the last append held {t} tokens")));
            }
            lay.attend_chunk_with(&qd, q_heads, tokens, fk, fv, &mut od, self.kernel)?;
        } else if tokens == 1 {
            lay.attend_with(&qd, q_heads, &mut od, 0, self.kernel)?;
        } else {
            return Err(KvqError::Unsupported(
                "causal attention of several queries over the packed store (past-only off) is not on the GPU: use past-only (the default) or chunks of one token".into(),
            ));
        }
        let host = self.dev.cuda_stream().clone_dtoh(&od).map_err(gpu)?;
        out.copy_from_slice(&host);
        Ok(())
    }

    fn materialize(&self, _layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        Err(stays_on_gpu())
    }

    fn bytes(&self) -> Bytes {
        self.layers.iter().fold(Bytes::default(), |a, l| {
            let b = l.held_bytes();
            Bytes { codes: a.codes + b.codes, params: a.params + b.params, full: a.full + b.full, ..a }
        })
    }

    fn info(&self) -> CacheInfo {
        let total = self.seq_len();
        let (kq, q) = self.layers.first().map_or((0, 0), PackedGpuLayer::quantized);
        let elements = 2 * self.shape.layers * self.shape.kv_heads * self.shape.head_dim * total * self.shape.batch;
        let held = HeldTokens { total, quantized: q, key_quantized: kq, sink: 0 };
        CacheInfo::new(format!("{} (GPU)", self.config.label()), &self.config, self.shape, held, self.bytes(), elements)
    }

    fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        keep_all_rows(rows, self.shape.batch)
    }

    fn reset(&mut self) {
        self.layers.iter_mut().for_each(PackedGpuLayer::reset);
        self.fresh.iter_mut().for_each(|f| *f = None);
        self.fresh_tensors.iter_mut().for_each(|f| *f = None);
    }

    fn on_device(&mut self) -> Option<&mut dyn DeviceKv> {
        Some(self)
    }
}

/// `f` on the device buffer of `t`, a GPU tensor of `T`s (a copy when the tensor is a
/// view: the kernels read `[stream][token][dim]` from the buffer's start).
pub(crate) fn with_cuda<T: CudaDType, R>(t: &Tensor, f: impl FnOnce(&CudaSlice<T>) -> Result<R>) -> Result<R> {
    let t = if t.is_contiguous() && t.layout().start_offset() == 0 { t.clone() } else { t.copy()? };
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(cs) => f(cs.as_cuda_slice::<T>()?),
        _ => Err(KvqError::Shape("the GPU cache takes tensors in GPU memory".into())),
    }
}

/// A GPU tensor of shape `dims` over `buf`.
pub(crate) fn tensor_of<T: CudaDType>(buf: CudaSlice<T>, dev: &CudaDevice, dims: &[usize]) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, dev.clone()));
    Tensor::from_storage(storage, dims, BackpropOp::none(), false)
}

/// [`check_values`](crate::error::check_values)'s rule on a GPU tensor in one pass:
/// `Some(true)`/`Some(false)` for f32 and f16 tensors, `None` for other dtypes.
pub(crate) fn tensor_values_in_range(dev: &CudaDevice, t: &Tensor) -> Result<Option<bool>> {
    Ok(match t.dtype() {
        candle_core::DType::F32 => Some(with_cuda::<f32, _>(t, |x| crate::cuda::values_in_range(dev, x))?),
        candle_core::DType::F16 => Some(with_cuda::<half::f16, _>(t, |x| crate::cuda::values_in_range(dev, x))?),
        _ => None,
    })
}

impl DeviceKv for PackedGpuCache {
    fn append_tensors(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        self.layer(layer)?;
        let tokens = kv_tensor_tokens(self.shape, k, v)?;
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let lay = &mut self.layers[layer];
        with_cuda::<f32, _>(&k, |kd| with_cuda::<f32, _>(&v, |vd| lay.append(kd, vd, tokens, 0, tokens)))?;
        self.fresh[layer] = None;
        self.fresh_tensors[layer] = Some((k, v));
        Ok(())
    }

    fn attend_tensors(&mut self, layer: usize, q: &Tensor) -> Result<Tensor> {
        self.layer(layer)?;
        let (q_heads, tokens) = query_tensor_dims(self.shape, self.layers[layer].len(), q)?;
        let CacheShape { batch, head_dim: d, .. } = self.shape;
        let mut od = self.dev.alloc_zeros::<f32>(batch * q_heads * tokens * d).map_err(gpu)?;
        let (kernel, past_only) = (self.kernel, self.config.past_only);
        let fresh = self.fresh_tensors[layer].clone();
        let lay = &mut self.layers[layer];
        with_cuda::<f32, _>(q, |qd| {
            if past_only {
                let Some((fk, fv)) = fresh.as_ref() else {
                    return Err(KvqError::Shape("past-only attention reads the chunk just appended, and nothing was (as tensors)".into()));
                };
                if fk.dims()[2] != tokens {
                    return Err(KvqError::Shape(format!("past-only attention of {tokens} queries, but the last append held {} tokens", fk.dims()[2])));
                }
                with_cuda::<f32, _>(fk, |fks| with_cuda::<f32, _>(fv, |fvs| lay.attend_chunk_with(qd, q_heads, tokens, fks, fvs, &mut od, kernel)))
            } else if tokens == 1 {
                lay.attend_with(qd, q_heads, &mut od, 0, kernel)
            } else {
                Err(KvqError::Unsupported("causal attention of several queries over the packed store (past-only off) is not on the GPU: use past-only (the default) or chunks of one token".into()))
            }
        })?;
        Ok(tensor_of(od, &self.dev, &[batch, q_heads, tokens, d]))
    }
}

/// The cache a preset gets on a GPU: KIVI and per-token packed by kvq's kernels
/// ([`PackedGpuCache`]), KVQuant in its store ([`KvQuantGpuCache`], given its
/// `calibration` and the model's `rope`), fp16/bf16/fp32 as tensors
/// ([`TensorCache`](crate::tensor_cache::TensorCache)); `None` for presets that stay in
/// host memory (full precision with a sink, pre-RoPE keys or past-only attention; KVQuant
/// with post-RoPE keys, at head sizes the kernel lacks, or with more than
/// [`KVQUANT_MAX_OUTLIERS`](crate::cuda::KVQUANT_MAX_OUTLIERS) outliers a vector).
pub fn gpu_cache_for(device: &candle_core::Device, config: &CacheConfig, shape: CacheShape, capacity: usize, rope: &Arc<Rope>, calibration: Option<Arc<KvQuantCalibration>>) -> Result<Option<Box<dyn KvCache>>> {
    let candle_core::Device::Cuda(dev) = device else { return Ok(None) };
    if runs_on_gpu(config, shape.head_dim) {
        return Ok(Some(Box::new(PackedGpuCache::new(dev, config, shape, capacity)?)));
    }
    if let Scheme::KvQuant { outlier_fraction, .. } = config.scheme {
        let Some(c) = calibration else { return Ok(None) };
        let n_out = crate::quant::outlier_count(outlier_fraction, shape.head_dim);
        if config.pre_rope && !config.past_only && matches!(shape.head_dim, 64 | 128) && n_out <= crate::cuda::KVQUANT_MAX_OUTLIERS {
            return Ok(Some(Box::new(KvQuantGpuCache::new(dev, config, shape, capacity, rope, c)?)));
        }
        return Ok(None);
    }
    let full = matches!(config.scheme, Scheme::Full(crate::cache::FullPrecision::F16 | crate::cache::FullPrecision::Bf16 | crate::cache::FullPrecision::F32));
    if full && !config.pre_rope && config.sink_tokens == 0 && !config.past_only {
        return Ok(Some(Box::new(crate::tensor_cache::TensorCache::new(config, shape, capacity, device)?)));
    }
    Ok(None)
}

/// Whether a preset runs in [`PackedGpuCache`] (a KIVI or per-token scheme the kernels take).
pub fn runs_on_gpu(config: &CacheConfig, head_dim: usize) -> bool {
    crate::cuda::check_supported(config, head_dim).is_ok()
}

/// A KVQuant cache in GPU memory ([`KvQuantGpuLayer`] a layer): keys stored before RoPE
/// (the model hands them unrotated, the kernel rotates them as it reads), the first
/// `sink_tokens` of a sequence in f16, the rest quantized on the GPU byte for byte as the
/// CPU's `NuqStore` holds them; attention causal over the chunk just appended (the
/// KVQuant presets are not past-only), read from the store in place.
pub struct KvQuantGpuCache {
    dev: CudaDevice,
    config: CacheConfig,
    shape: CacheShape,
    calibration: Arc<KvQuantCalibration>,
    layers: Vec<KvQuantGpuLayer>,
    padding: Vec<usize>,
}

impl KvQuantGpuCache {
    pub fn new(dev: &CudaDevice, config: &CacheConfig, shape: CacheShape, capacity: usize, rope: &Arc<Rope>, calibration: Arc<KvQuantCalibration>) -> Result<Self> {
        let Scheme::KvQuant { bits, outlier_fraction } = config.scheme else {
            return Err(KvqError::InvalidParam(format!("{} is not a KVQuant cache", config.label())));
        };
        config.validate(shape.head_dim)?;
        if !config.pre_rope || config.past_only {
            return Err(KvqError::Unsupported("the GPU KVQuant cache stores keys before RoPE and attends causally (past-only off), as the KVQuant presets do".into()));
        }
        crate::cache::check_calibration(&calibration, shape.layers, shape.kv_heads, shape.head_dim, bits, outlier_fraction, config.pre_rope)?;
        let n_out = crate::quant::outlier_count(outlier_fraction, shape.head_dim);
        let table = Arc::new(CudaRope::new(dev, rope, capacity)?);
        let streams = shape.batch * shape.kv_heads;
        let layers = calibration
            .layers
            .iter()
            .map(|c| KvQuantGpuLayer::new(dev, streams, shape.kv_heads, shape.head_dim, capacity, config.sink_tokens, n_out, c, table.clone()))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvQuantGpuCache { dev: dev.clone(), config: config.clone(), shape, calibration, layers, padding: vec![0; shape.batch] })
    }

    fn layer(&self, layer: usize) -> Result<()> {
        if layer >= self.layers.len() {
            return Err(KvqError::LayerOutOfRange { layer, layers: self.layers.len() });
        }
        Ok(())
    }

    /// The layer's GPU store (for checks against the CPU cache).
    pub fn gpu_layer(&self, layer: usize) -> Option<&KvQuantGpuLayer> {
        self.layers.get(layer)
    }
}

impl KvCache for KvQuantGpuCache {
    fn config(&self) -> &CacheConfig {
        &self.config
    }

    fn shape(&self) -> CacheShape {
        self.shape
    }

    fn wants_pre_rope_keys(&self) -> bool {
        true
    }

    fn seq_len(&self) -> usize {
        self.layers.first().map_or(0, KvQuantGpuLayer::len)
    }

    fn set_padding(&mut self, row_start: &[usize]) -> Result<()> {
        crate::cache::refuse_padding(row_start, self.shape.batch, "GPU cache")
    }

    fn padding(&self) -> &[usize] {
        &self.padding
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], tokens: usize) -> Result<()> {
        self.layer(layer)?;
        let (kd, vd) = upload_kv(&self.dev, self.shape, k, v, tokens)?;
        self.layers[layer].append(&kd, &vd, tokens)
    }

    fn attend(&mut self, layer: usize, q: &[f32], q_heads: usize, tokens: usize, out: &mut [f32]) -> Result<()> {
        self.layer(layer)?;
        let (qd, mut od) = upload_queries(&self.dev, self.shape, self.layers[layer].len(), q, q_heads, tokens, out)?;
        self.layers[layer].attend(&qd, q_heads, tokens, &mut od)?;
        out.copy_from_slice(&self.dev.cuda_stream().clone_dtoh(&od).map_err(gpu)?);
        Ok(())
    }

    fn materialize(&self, _layer: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        Err(stays_on_gpu())
    }

    fn bytes(&self) -> Bytes {
        let mut b = self.layers.iter().fold(Bytes::default(), |a, l| {
            let x = l.held_bytes();
            Bytes { codes: a.codes + x.codes, params: a.params + x.params, outliers: a.outliers + x.outliers, sink: a.sink + x.sink, ..a }
        });
        b.constants = self.shape.layers * self.calibration.layer_bytes();
        b
    }

    fn info(&self) -> CacheInfo {
        let total = self.seq_len();
        let (sink, stored) = self.layers.first().map_or((0, 0), KvQuantGpuLayer::held);
        let elements = 2 * self.shape.layers * self.shape.kv_heads * self.shape.head_dim * total * self.shape.batch;
        let held = HeldTokens { total, quantized: stored, key_quantized: stored, sink };
        CacheInfo::new(format!("{} (GPU)", self.config.label()), &self.config, self.shape, held, self.bytes(), elements)
    }

    fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        keep_all_rows(rows, self.shape.batch)
    }

    fn reset(&mut self) {
        self.layers.iter_mut().for_each(KvQuantGpuLayer::reset);
    }

    fn on_device(&mut self) -> Option<&mut dyn DeviceKv> {
        Some(self)
    }
}

impl DeviceKv for KvQuantGpuCache {
    fn append_tensors(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        self.layer(layer)?;
        let tokens = kv_tensor_tokens(self.shape, k, v)?;
        let lay = &mut self.layers[layer];
        with_cuda::<f32, _>(k, |kd| with_cuda::<f32, _>(v, |vd| lay.append(kd, vd, tokens)))
    }

    fn attend_tensors(&mut self, layer: usize, q: &Tensor) -> Result<Tensor> {
        self.layer(layer)?;
        let (q_heads, tokens) = query_tensor_dims(self.shape, self.layers[layer].len(), q)?;
        let CacheShape { batch, head_dim: d, .. } = self.shape;
        let mut od = self.dev.alloc_zeros::<f32>(batch * q_heads * tokens * d).map_err(gpu)?;
        let lay = &mut self.layers[layer];
        with_cuda::<f32, _>(q, |qd| lay.attend(qd, q_heads, tokens, &mut od))?;
        Ok(tensor_of(od, &self.dev, &[batch, q_heads, tokens, d]))
    }
}
