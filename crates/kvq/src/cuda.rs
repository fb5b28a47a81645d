//! The GPU path (feature `cuda`): KIVI's packed cache in device memory, filled and
//! read by the kernels of `kernels/kivi.cu`.
//!
//! [`PackedGpuLayer`] holds one layer of a KIVI cache for `streams` = batch × KV heads,
//! with the same bytes, stream by stream, as the CPU cache (`cache::Cache` with a
//! KIVI config): keys per channel in blocks of `group` tokens, values per token in
//! groups of `min(group, head_dim)` channels, f16 (min, scale) per group, the newest
//! tokens in f16 rings. Appending quantizes on the GPU; [`PackedGpuLayer::attend`] runs
//! decode attention straight from the packed codes, never expanding K/V to f16.
//! [`check_packed`] compares both against the CPU reference.

use crate::cache::{Cache, CacheConfig, CacheShape, KvCache, Scheme};
use crate::error::{KvqError, Result};
use crate::gpu_plan::{plan_splits, plan_splits_sm_bound};
use crate::quant::packed_len;
use crate::rng::SplitMix64;
use crate::size::PackedGpuLayout;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaModule, CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::CudaDevice;
use half::f16;
use std::sync::{Arc, Mutex};

/// kernels/kivi.cu and kernels/full.cu, compiled by build.rs (machine code for sm_90 and PTX).
const FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kivi.fatbin"));
const FULL_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/full.fatbin"));
const KVQUANT_FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kvquant.fatbin"));
/// Warps per attention block (`WARPS` in kivi.cu).
const WARPS: u32 = 4;
/// Tokens per attention tile (a warp's 32 lanes).
const TILE: usize = 32;

pub(crate) fn gpu<E: std::fmt::Display>(e: E) -> KvqError {
    KvqError::Gpu(e.to_string())
}

/// The CUDA device behind a candle device, or a typed error on any other device.
pub fn cuda_device(device: &candle_core::Device) -> Result<CudaDevice> {
    match device {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        other => Err(KvqError::Unsupported(format!("the GPU cache needs a CUDA device, got {other:?}"))),
    }
}

/// Opens GPU `ordinal` through candle.
pub fn open(ordinal: usize) -> Result<CudaDevice> {
    let d = candle_core::Device::new_cuda(ordinal).map_err(gpu)?;
    cuda_device(&d)
}

/// The GPU's name and memory, for results files.
pub fn describe(dev: &CudaDevice) -> Result<String> {
    let ctx = dev.cuda_stream().context().clone();
    let name = ctx.name().map_err(gpu)?;
    let mem = ctx.total_mem().map_err(gpu)?;
    let (ma, mi) = ctx.compute_capability().map_err(gpu)?;
    Ok(format!("{name}, {:.0} GiB, sm_{ma}{mi}", mem as f64 / (1u64 << 30) as f64))
}

/// kvq's kernel module (kivi.cu) on `dev`'s context, loaded once per context.
fn module(dev: &CudaDevice) -> Result<Arc<CudaModule>> {
    load_module(dev, FATBIN)
}

/// The full-precision kernels (full.cu): fp16 decode attention, the value check.
fn full_module(dev: &CudaDevice) -> Result<Arc<CudaModule>> {
    load_module(dev, FULL_FATBIN)
}

/// KVQuant's quantize kernel (kvquant.cu).
fn kvquant_module(dev: &CudaDevice) -> Result<Arc<CudaModule>> {
    load_module(dev, KVQUANT_FATBIN)
}

fn load_module(dev: &CudaDevice, fatbin: &'static [u8]) -> Result<Arc<CudaModule>> {
    static MODULES: Mutex<Vec<(usize, usize, Arc<CudaModule>)>> = Mutex::new(Vec::new());
    let ctx = dev.cuda_stream().context().clone();
    let key = (Arc::as_ptr(&ctx) as usize, fatbin.as_ptr() as usize);
    let mut mods = MODULES.lock().map_err(|_| KvqError::Gpu("module cache poisoned".into()))?;
    if let Some((_, _, m)) = mods.iter().find(|(c, f, _)| (*c, *f) == key) {
        return Ok(m.clone());
    }
    let m = ctx.load_module(Ptx::from_binary(fatbin.to_vec())).map_err(gpu)?;
    mods.push((key.0, key.1, m.clone()));
    Ok(m)
}

/// Launches kernel `name` of kvq's module (`full:` / `kvquant:` first: of that module) with `args`.
macro_rules! launch {
    (@go $f:ident, $dev:expr, $cfg:expr, $($arg:expr),*) => {{
        let f = $f;
        let stream = $dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        $( b.arg($arg); )*
        // SAFETY: the arguments match the kernel's signature (kernels/*.cu), and every
        // index the kernel computes stays inside the buffers sized in `new`.
        unsafe { b.launch($cfg) }.map_err(gpu)?;
    }};
    (kvquant: $dev:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let f = kvquant_module(&$dev)?.load_function($name).map_err(gpu)?;
        launch!(@go f, $dev, $cfg, $($arg),*)
    }};
    (full: $dev:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let f = full_module(&$dev)?.load_function($name).map_err(gpu)?;
        launch!(@go f, $dev, $cfg, $($arg),*)
    }};
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let f = module(&$dev)?.load_function($name).map_err(gpu)?;
        launch!(@go f, $dev, $cfg, $($arg),*)
    }};
}

/// Launches kernel `name` of kvq's module so that it may start before the kernel ahead of it
/// in the stream has ended: once every block of that one has run `pdl_trigger` (programmatic
/// dependent launch, sm_90; kivi.cu says which kernels allow it). `params`: a pointer to
/// each argument, in the kernel's order.
fn launch_after(dev: &CudaDevice, name: &str, cfg: LaunchConfig, params: &mut [*mut std::ffi::c_void]) -> Result<()> {
    let f = module(dev)?.load_function(name).map_err(gpu)?;
    let stream = dev.cuda_stream();
    stream.context().bind_to_thread().map_err(gpu)?;
    // SAFETY: an all-zero launch attribute is valid (id 0 is "ignore"); id and value are then set.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let lc = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: `params` point at live values of the kernel's parameter types, in its order
    // (the callers below mirror kivi.cu's signatures); `f` outlives the call.
    unsafe { sys::cuLaunchKernelEx(&lc, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }.result().map_err(gpu)
}

/// `x` as a kernel parameter for [`launch_after`].
fn param<T>(x: &T) -> *mut std::ffi::c_void {
    x as *const T as *mut std::ffi::c_void
}

fn grid_1d(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// The kernel's argument block (`AttnArgs` in kivi.cu; same field order and types).
#[repr(C)]
#[derive(Clone, Copy)]
struct AttnArgs {
    q: u64,
    part_acc: u64,
    part_ml: u64,
    kcodes: u64,
    kparams: u64,
    ktail: u64,
    vcodes: u64,
    vparams: u64,
    vtail: u64,
    cap: i64,
    kring: i32,
    vring: i32,
    g: i32,
    gv: i32,
    hq: i32,
    hkv: i32,
    rep: i32,
    n: i64,
    nqk: i64,
    nqv: i64,
    tiles_per_split: i32,
    splits: i32,
    scale_log2: f32,
    tile0: i32,
    tile_end: i32,
    split0: i32,
    out: u64,
}
// SAFETY: plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for AttnArgs {}

/// Which decode-attention kernel reads the packed tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// The default: [`AttnKernel::TensorCores`]' kernels, each after the first launched so
    /// that it may start before the one ahead of it ends (programmatic dependent launch).
    Auto,
    /// Both products on tensor cores (`tc::decode_attn` in kivi.cu) for the tiles whose
    /// keys and values are all packed; the tile across the window's edge goes to the
    /// CUDA-core kernel, the window's own tiles to `window_decode_attn`; each kernel
    /// launched the ordinary way, after the one ahead of it.
    TensorCores,
    /// Everything on CUDA cores, `heads_per_block` (1..=4) query heads a block: the
    /// first kernel, kept as a second implementation to check and time against.
    CudaCores { heads_per_block: usize },
}

/// Query heads a tensor-core block serves (the MMA's 8 columns); more take more blocks.
const TC_QUERIES: usize = 8;
/// Warps past which an SM runs the tensor-core kernels no faster (their issue slots bound
/// them; H100, gpu_plan.rs): the planner spreads splits for that many, not for every slot.
const TC_BUSY_WARPS: usize = 8;

/// Blocks of kivi.cu's kernel `name` that fit one SM at once (registers, shared memory, warps).
fn blocks_per_sm(dev: &CudaDevice, name: &str) -> Result<usize> {
    blocks_per_sm_of(&module(dev)?.load_function(name).map_err(gpu)?)
}

fn blocks_per_sm_of(f: &candle_core::cuda_backend::cudarc::driver::CudaFunction) -> Result<usize> {
    Ok(f.occupancy_max_active_blocks_per_multiprocessor(WARPS * 32, 0, None).map_err(gpu)?.max(1) as usize)
}

/// The GPU's streaming multiprocessors.
fn sm_count(dev: &CudaDevice) -> Result<usize> {
    let attr = candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
    Ok(dev.cuda_stream().context().attribute(attr).map_err(gpu)? as usize)
}

/// A launch's thread count as the kernels index it: 32-bit.
fn threads_i32(n: usize) -> Result<usize> {
    if n > i32::MAX as usize {
        return Err(KvqError::Unsupported(format!("{n} threads in one launch: the quantize kernels index with 32 bits")));
    }
    Ok(n)
}

/// One layer of a packed cache on the GPU: KIVI (keys per channel) or per-token (keys
/// per token), laid out as [`PackedGpuLayout`] says.
pub struct PackedGpuLayer {
    dev: CudaDevice,
    layout: PackedGpuLayout,
    k_bits: u8,
    v_bits: u8,
    group: usize,
    value_group: usize,
    streams: usize,
    head_dim: usize,
    capacity: usize,
    kring: usize,
    vring: usize,
    kcodes: CudaSlice<u8>,
    kparams: CudaSlice<u32>,
    ktail: CudaSlice<f16>,
    vcodes: CudaSlice<u8>,
    vparams: CudaSlice<u32>,
    vtail: CudaSlice<f16>,
    len: usize,
    nqk: usize,
    nqv: usize,
    part_acc: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    /// SMs of the GPU: how many blocks the attention should spread over.
    sms: usize,
}

/// What the packed GPU kernels accept: KIVI or per-token caches of 2- or 4-bit codes,
/// head dim 64 or 128; KIVI key blocks of a multiple of 32 tokens; per-token groups of
/// 32, 64 or 128 channels (a lane's channels in one group, whole 32-bit words of codes).
pub fn check_supported(config: &CacheConfig, head_dim: usize) -> Result<PackedGpuLayout> {
    config.validate(head_dim)?;
    let (k_bits, v_bits) = match config.scheme {
        Scheme::Kivi { k_bits, v_bits, .. } => (k_bits, v_bits),
        Scheme::PerToken { bits, .. } => (bits, bits),
        _ => return Err(KvqError::Unsupported(format!("the packed GPU kernels run KIVI and per-token caches, not {}", config.label()))),
    };
    if ![2, 4].contains(&k_bits) || ![2, 4].contains(&v_bits) {
        return Err(KvqError::Unsupported(format!("the GPU kernels take 2- or 4-bit codes, not {k_bits}/{v_bits}")));
    }
    match config.scheme {
        Scheme::Kivi { group_size, .. } if group_size % TILE != 0 => {
            return Err(KvqError::Unsupported(format!("the GPU kernels need a key group that is a multiple of {TILE} tokens, not {group_size}")));
        }
        Scheme::PerToken { group_size, .. } if ![32, 64, 128].contains(&group_size) => {
            return Err(KvqError::Unsupported(format!("the GPU per-token kernels take groups of 32, 64 or 128 channels, not {group_size}")));
        }
        _ => {}
    }
    if head_dim != 64 && head_dim != 128 {
        return Err(KvqError::Unsupported(format!("the GPU kernels are built for head dim 64 and 128, not {head_dim}")));
    }
    if config.sink_tokens != 0 || config.pre_rope {
        return Err(KvqError::Unsupported("the packed GPU cache has no sink and stores keys after RoPE".into()));
    }
    PackedGpuLayout::of(config, head_dim, 1).ok_or_else(|| KvqError::Unsupported(format!("no GPU layout for {}", config.label())))
}

/// Quantizes values `[t0, t1)` of every stream from `src` (f16 rings of `ring` slots)
/// into a layer's value codes and params. KIVI's MMA tiles: the whole tiles of the range
/// are made in shared memory and stored 16 bytes at a time (kernel mode 2), the tokens of
/// partial tiles byte by byte (mode 1); the per-token cache's rows in one launch (mode 0).
#[allow(clippy::too_many_arguments)]
/// The kernel that quantizes tokens in groups of `group` channels (32 and 64: kernels of their own).
fn token_groups_kernel(bits: u8, group: usize) -> String {
    match group {
        32 | 64 => format!("quant_token_groups{group}_b{bits}"),
        _ => format!("quant_token_groups_b{bits}"),
    }
}

/// The kernel that quantizes KIVI's key blocks of `group` tokens, and the channels each of
/// its threads takes (blocks of 32: a pair, in a kernel of its own).
fn channel_blocks_kernel(k_bits: u8, group: usize) -> (String, usize) {
    if group == 32 {
        (format!("quant_channel_blocks32_b{k_bits}"), 2)
    } else {
        (format!("quant_channel_blocks_b{k_bits}"), 1)
    }
}

fn quantize_values(dev: &CudaDevice, layout: PackedGpuLayout, streams: usize, (src, ring): (&CudaSlice<f16>, usize), t0: usize, t1: usize, vcodes: &mut CudaSlice<u8>, vparams: &mut CudaSlice<u32>) -> Result<()> {
    let d = layout.head_dim;
    let name = token_groups_kernel(layout.v_bits, layout.value_group);
    let (vr, di, gv, si, cap) = (ring as i32, d as i32, layout.value_group as i32, streams as i32, layout.capacity as i64);
    let (a, b) = (t0.next_multiple_of(TILE), t1 / TILE * TILE);
    let parts: Vec<(usize, usize, i32)> = if layout.token_keys {
        vec![(t0, t1, 0)]
    } else if a < b {
        vec![(t0, a, 1), (a, b, 2), (b, t1, 1)]
    } else {
        vec![(t0, t1, 1)]
    };
    for (x, y, mode) in parts.into_iter().filter(|&(x, y, _)| x < y) {
        let n = threads_i32(streams * (y - x) * (d / layout.value_group))?;
        let (x, y) = (x as i64, y as i64);
        launch!(dev, &name, grid_1d(n), src, &vr, &di, &gv, &x, &y, &si, &mut *vcodes, &mut *vparams, &cap, &mode);
    }
    Ok(())
}

impl PackedGpuLayer {
    /// A layer for `streams` = batch × KV heads streams of up to `capacity` tokens.
    pub fn new(dev: &CudaDevice, config: &CacheConfig, streams: usize, head_dim: usize, capacity: usize) -> Result<Self> {
        check_supported(config, head_dim)?;
        if streams == 0 || capacity == 0 {
            return Err(KvqError::InvalidParam("a GPU cache needs at least one stream and one token of capacity".into()));
        }
        let d = head_dim;
        let layout = PackedGpuLayout::of(config, d, capacity).ok_or_else(|| KvqError::Unsupported("no GPU layout for this cache".into()))?;
        let PackedGpuLayout { k_bits, v_bits, group, value_group, capacity, kring, vring, .. } = layout;
        let s = streams;
        let kcodes = dev.alloc_zeros::<u8>(s * capacity * packed_len(d, k_bits)).map_err(gpu)?;
        let kparams = dev.alloc_zeros::<u32>(s * layout.key_params(capacity)).map_err(gpu)?;
        let ktail = dev.alloc_zeros::<f16>(s * kring * d).map_err(gpu)?;
        let vcodes = dev.alloc_zeros::<u8>(s * capacity * packed_len(d, v_bits)).map_err(gpu)?;
        let vparams = dev.alloc_zeros::<u32>(s * capacity * (d / value_group)).map_err(gpu)?;
        let vtail = dev.alloc_zeros::<f16>(s * vring * d).map_err(gpu)?;
        let part_acc = dev.alloc_zeros::<f32>(1).map_err(gpu)?;
        let part_ml = dev.alloc_zeros::<f32>(1).map_err(gpu)?;
        let sms = sm_count(dev)?;
        Ok(PackedGpuLayer {
            dev: dev.clone(),
            layout,
            k_bits,
            v_bits,
            group,
            value_group,
            streams,
            head_dim,
            capacity,
            kring,
            vring,
            kcodes,
            kparams,
            ktail,
            vcodes,
            vparams,
            vtail,
            len: 0,
            nqk: 0,
            nqv: 0,
            part_acc,
            part_ml,
            sms,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens whose keys / values are held quantized.
    pub fn quantized(&self) -> (usize, usize) {
        (self.nqk, self.nqv)
    }

    /// Device bytes this layer reserves (codes and params for `capacity` tokens, rings).
    pub fn allocated_bytes(&self) -> usize {
        self.streams * self.layout.stream_bytes()
    }

    /// Whether keys are stored per token (the per-token cache) rather than per channel (KIVI).
    pub fn token_keys(&self) -> bool {
        self.layout.token_keys
    }

    /// What the layer holds now, by kind (as the CPU cache counts it).
    pub fn held_bytes(&self) -> crate::size::Bytes {
        let (s, d) = (self.streams, self.head_dim);
        crate::size::Bytes {
            codes: s * (self.nqk * packed_len(d, self.k_bits) + self.nqv * packed_len(d, self.v_bits)),
            params: s * 4 * (self.layout.key_params(self.nqk) + self.nqv * (d / self.value_group)),
            full: s * 2 * d * ((self.len - self.nqk) + (self.len - self.nqv)),
            ..Default::default()
        }
    }

    /// Bytes the decode attention must read at the current length: packed codes and
    /// params of the quantized tokens, f16 rows of the rest.
    pub fn bytes_read(&self) -> usize {
        let d = self.head_dim;
        let k = self.nqk * packed_len(d, self.k_bits) + self.layout.key_params(self.nqk) * 4 + (self.len - self.nqk) * d * 2;
        let v = self.nqv * (packed_len(d, self.v_bits) + d / self.value_group * 4) + (self.len - self.nqv) * d * 2;
        self.streams * (k + v)
    }

    /// Appends `tokens` tokens of every stream: keys from `k`, values from `v` (f32,
    /// `[stream][src_tokens][D]`, from token `src_t0` of each stream), quantizing what
    /// leaves the window.
    pub fn append(&mut self, k: &CudaSlice<f32>, v: &CudaSlice<f32>, src_tokens: usize, src_t0: usize, tokens: usize) -> Result<()> {
        let (s, d) = (self.streams, self.head_dim);
        let need = s * src_tokens * d;
        if tokens == 0 || src_t0 + tokens > src_tokens || k.len() < need || v.len() < need {
            return Err(KvqError::Shape(format!(
                "append of tokens {src_t0}..{} of {src_tokens} per stream needs {need} floats each for K and V, got {} and {}",
                src_t0 + tokens,
                k.len(),
                v.len()
            )));
        }
        if self.len + tokens > self.capacity {
            return Err(KvqError::ContextOverflow { len: self.len + tokens, max: self.capacity });
        }
        let dev = self.dev.clone();
        let mut done = 0;
        while done < tokens {
            // At most one chunk at a time: what the rings are sized for.
            let c = (tokens - done).min(self.layout.chunk);
            let n = s * c * d;
            let (stride, t0, ci, di, si) = ((src_tokens * d) as i64, (src_t0 + done) as i32, c as i32, d as i32, s as i32);
            let (kr, vr, pos) = (self.kring as i32, self.vring as i32, self.len as i64);
            launch!(dev, "append_ring_f32", grid_1d(n), k, &stride, &t0, &ci, &di, &si, &mut self.ktail, &kr, &pos);
            launch!(dev, "append_ring_f32", grid_1d(n), v, &stride, &t0, &ci, &di, &si, &mut self.vtail, &vr, &pos);
            self.len += c;
            done += c;
            self.quantize_due()?;
        }
        Ok(())
    }

    // The CPU stores' rules (PackedGpuLayout::quantized_after).
    fn quantize_due(&mut self) -> Result<()> {
        let (s, d, g) = (self.streams, self.head_dim, self.group);
        let dev = self.dev.clone();
        let (nqk, nqv) = self.layout.quantized_after(self.len, self.nqk);
        if nqk > self.nqk && self.layout.token_keys {
            let (t0, t1) = (self.nqk as i64, nqk as i64);
            let n = threads_i32(s * (nqk - self.nqk) * (d / g))?;
            let name = token_groups_kernel(self.k_bits, g);
            let (kr, di, gi, si, cap) = (self.kring as i32, d as i32, g as i32, s as i32, self.capacity as i64);
            // Mode 0: the per-token cache's keys as rows.
            launch!(dev, &name, grid_1d(n), &self.ktail, &kr, &di, &gi, &t0, &t1, &si, &mut self.kcodes, &mut self.kparams, &cap, &0i32);
            self.nqk = nqk;
        } else if nqk > self.nqk {
            let (b0, b1) = ((self.nqk / g) as i64, (nqk / g) as i64);
            let (name, per_thread) = channel_blocks_kernel(self.k_bits, g);
            let n = threads_i32(s * (nqk - self.nqk) / g * d / per_thread)?;
            let (kr, di, gi, si, cap) = (self.kring as i32, d as i32, g as i32, s as i32, self.capacity as i64);
            launch!(dev, &name, grid_1d(n), &self.ktail, &kr, &di, &gi, &b0, &b1, &si, &mut self.kcodes, &mut self.kparams, &cap);
            self.nqk = nqk;
        }
        if nqv > self.nqv {
            quantize_values(&self.dev, self.layout, self.streams, (&self.vtail, self.vring), self.nqv, nqv, &mut self.vcodes, &mut self.vparams)?;
            self.nqv = nqv;
        }
        Ok(())
    }

    /// Decode attention: one query token per sequence, `q` `[batch][q_heads][D]` (f32),
    /// over every token held; writes `out` (same shape). `splits` = 0 picks a split count.
    pub fn attend(&mut self, q: &CudaSlice<f32>, q_heads: usize, out: &mut CudaSlice<f32>, splits: usize) -> Result<()> {
        self.attend_with(q, q_heads, out, splits, AttnKernel::Auto)
    }

    /// [`PackedGpuLayer::attend`] with a chosen kernel. The tensor-core kernel takes the
    /// tiles of 32 tokens whose keys and values are all packed and the CUDA-core kernel
    /// the rest (the window), each into its own splits; the window's kernel merges them all
    /// when the window is short, `combine_splits` otherwise.
    /// `splits` > 0 fixes the splits of the main part.
    pub fn attend_with(&mut self, q: &CudaSlice<f32>, q_heads: usize, out: &mut CudaSlice<f32>, splits: usize, kernel: AttnKernel) -> Result<()> {
        self.attend_inner(q, q_heads, self.len, None, out, splits, kernel)
    }

    /// The attention of a chunk of `tokens` queries a sequence (`q`, `out`:
    /// `[batch][q_heads][tokens][D]`) that has just been appended, past-only (kvq's
    /// `past_only`): each query sees the tokens held before the chunk, read from the
    /// packed store and the window, and the chunk's own K/V `fresh_k`/`fresh_v`
    /// (`[stream][tokens][D]`, f32, what `append` took) causally at full precision.
    pub fn attend_chunk(&mut self, q: &CudaSlice<f32>, q_heads: usize, tokens: usize, fresh_k: &CudaSlice<f32>, fresh_v: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<()> {
        self.attend_chunk_with(q, q_heads, tokens, fresh_k, fresh_v, out, AttnKernel::Auto)
    }

    /// [`PackedGpuLayer::attend_chunk`] with a chosen kernel for the past.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_chunk_with(&mut self, q: &CudaSlice<f32>, q_heads: usize, tokens: usize, fresh_k: &CudaSlice<f32>, fresh_v: &CudaSlice<f32>, out: &mut CudaSlice<f32>, kernel: AttnKernel) -> Result<()> {
        let need = self.streams * tokens * self.head_dim;
        if tokens == 0 || tokens > self.len || fresh_k.len() < need || fresh_v.len() < need {
            return Err(KvqError::Shape(format!("a chunk of {tokens} tokens over {} held needs {need} fresh floats each, got {} and {}", self.len, fresh_k.len(), fresh_v.len())));
        }
        let past = self.len - tokens;
        self.attend_inner(q, q_heads * tokens, past, Some((fresh_k, fresh_v, tokens)), out, 0, kernel)
    }

    /// Attention of `q_heads` queries a sequence (a chunk's tokens count as heads, token
    /// fastest) over the first `n` tokens held, plus a fresh chunk if given.
    #[allow(clippy::too_many_arguments)]
    fn attend_inner(
        &mut self,
        q: &CudaSlice<f32>,
        q_heads: usize,
        n: usize,
        fresh: Option<(&CudaSlice<f32>, &CudaSlice<f32>, usize)>,
        out: &mut CudaSlice<f32>,
        splits: usize,
        kernel: AttnKernel,
    ) -> Result<()> {
        let (s, d) = (self.streams, self.head_dim);
        if n == 0 && fresh.is_none() {
            return Err(KvqError::Shape("attention over an empty cache".into()));
        }
        let batch = q.len() / (q_heads.max(1) * d);
        if q_heads == 0 || q.len() != batch * q_heads * d || out.len() != q.len() || batch == 0 || s % batch != 0 {
            return Err(KvqError::Shape(format!("queries of {} floats do not fit {q_heads} heads × {d} over {s} streams", q.len())));
        }
        let kv_heads = s / batch;
        if q_heads % kv_heads != 0 {
            return Err(KvqError::Shape(format!("{q_heads} query heads cannot share {kv_heads} KV heads")));
        }
        let rep = q_heads / kv_heads;
        let (tensor_cores, heads_per_block) = match kernel {
            // The window's few tiles on CUDA cores: 2 query heads a block, not 4, gives them
            // more blocks and fewer registers (H100: kivi-2 at Llama-3-8B B16 8k 96 → 89 µs,
            // kivi-4 at SmolLM2 B64 8k 85 → 76 µs; 1 head a block: 91 and 83).
            AttnKernel::Auto | AttnKernel::TensorCores => (true, 2),
            AttnKernel::CudaCores { heads_per_block: h } if !(1..=4).contains(&h) => {
                return Err(KvqError::InvalidParam(format!("heads per block must be 1 to 4, got {h}")));
            }
            AttnKernel::CudaCores { heads_per_block: h } => (false, h),
        };
        let ntiles = n.div_ceil(TILE);
        let packed = if tensor_cores { self.nqk.min(self.nqv).min(n) / TILE } else { 0 };
        // From `window` on, a tile's keys and values all sit in the f16 rings: a kernel of its own.
        let window = self.nqk.max(self.nqv).min(n).div_ceil(TILE).max(packed);
        let rep_chunk = rep.min(heads_per_block);
        let chunks = rep.div_ceil(rep_chunk);
        let tc_chunks = rep.div_ceil(TC_QUERIES);
        let fixed = |tiles: usize| {
            let per = tiles.div_ceil(splits.min(tiles));
            (tiles.div_ceil(per), per)
        };
        let tc_name = if self.layout.token_keys {
            format!("token_decode_attn_tc_d{d}_b{}_g{}", self.k_bits, d / self.value_group)
        } else {
            // At most 4 query heads a KV head: x's hi and lo parts share one MMA (kivi.cu: HALF).
            let half = if rep <= TC_QUERIES / 2 { "_half" } else { "" };
            format!("kivi_decode_attn_tc_d{d}_k{}_v{}_g{}{half}", self.k_bits, self.v_bits, d / self.value_group)
        };
        let cc_name = if self.layout.token_keys {
            format!("token_decode_attn_d{d}_b{}_r{rep_chunk}", self.k_bits)
        } else {
            format!("kivi_decode_attn_d{d}_k{}_v{}_r{rep_chunk}", self.k_bits, self.v_bits)
        };
        let window_name = format!("window_decode_attn_d{d}_r{rep_chunk}");
        let w = WARPS as usize;
        let (tc_splits, tc_per) = match packed {
            0 => (0, 1),
            t if splits > 0 => fixed(t),
            t => plan_splits_sm_bound(t, s * tc_chunks, blocks_per_sm(&self.dev, &tc_name)?, self.sms, w, TC_BUSY_WARPS),
        };
        let (cc_splits, cc_per) = match window - packed {
            0 => (0, 1),
            t if splits > 0 && packed == 0 => fixed(t),
            t => plan_splits(t, s * chunks, blocks_per_sm(&self.dev, &cc_name)? * self.sms, w),
        };
        // A short window, read in one split a stream, is the step's last kernel and merges
        // every split itself (kivi.cu: window_decode_attn), so no combine_splits follows it.
        let merge_in_window = fresh.is_none() && ntiles > window && ntiles - window <= 2 * w;
        let (win_splits, win_per) = match ntiles - window {
            0 => (0, 1),
            t if merge_in_window => (1, t),
            t if splits > 0 && window == 0 => fixed(t),
            t => plan_splits(t, s * chunks, blocks_per_sm(&self.dev, &window_name)? * self.sms, w),
        };
        let total = tc_splits + cc_splits + win_splits + usize::from(fresh.is_some());
        let need_acc = s * total * rep * d;
        if self.part_acc.len() < need_acc {
            self.part_acc = self.dev.alloc_zeros::<f32>(need_acc).map_err(gpu)?;
            self.part_ml = self.dev.alloc_zeros::<f32>(s * total * rep * 2).map_err(gpu)?;
        }
        let stream = self.dev.cuda_stream();
        let args = {
            let (q_p, _g1) = q.device_ptr(&stream);
            let (acc_p, _g2) = self.part_acc.device_ptr(&stream);
            let (ml_p, _g3) = self.part_ml.device_ptr(&stream);
            let (kc, _g4) = self.kcodes.device_ptr(&stream);
            let (kp, _g5) = self.kparams.device_ptr(&stream);
            let (kt, _g6) = self.ktail.device_ptr(&stream);
            let (vc, _g7) = self.vcodes.device_ptr(&stream);
            let (vp, _g8) = self.vparams.device_ptr(&stream);
            let (vt, _g9) = self.vtail.device_ptr(&stream);
            AttnArgs {
                q: q_p,
                part_acc: acc_p,
                part_ml: ml_p,
                kcodes: kc,
                kparams: kp,
                ktail: kt,
                vcodes: vc,
                vparams: vp,
                vtail: vt,
                cap: self.capacity as i64,
                kring: self.kring as i32,
                vring: self.vring as i32,
                g: self.group as i32,
                gv: self.value_group as i32,
                hq: q_heads as i32,
                hkv: kv_heads as i32,
                rep: rep as i32,
                n: n as i64,
                nqk: self.nqk as i64,
                nqv: self.nqv as i64,
                tiles_per_split: tc_per as i32,
                splits: total as i32,
                scale_log2: std::f32::consts::LOG2_E / (d as f32).sqrt(),
                tile0: 0,
                tile_end: packed as i32,
                split0: 0,
                out: 0,
            }
        };
        let block = (WARPS * 32, 1, 1);
        if tc_splits > 0 {
            let cfg = LaunchConfig { grid_dim: (s as u32, tc_splits as u32, tc_chunks as u32), block_dim: block, shared_mem_bytes: 0 };
            launch!(self.dev, &tc_name, cfg, &args);
        }
        // The first attention kernel starts after the appends that filled the cache; the
        // others and combine_splits may start early (kivi.cu: pdl_trigger, pdl_wait).
        let early = matches!(kernel, AttnKernel::Auto);
        let mut started = tc_splits > 0;
        let out_p = if merge_in_window { out.device_ptr_mut(&stream).0 } else { 0 };
        for (splits_here, per, tile0, tile_end, split0, name, out) in [
            (cc_splits, cc_per, packed, window, tc_splits, &cc_name, 0),
            (win_splits, win_per, window, ntiles, tc_splits + cc_splits, &window_name, out_p),
        ] {
            if splits_here == 0 {
                continue;
            }
            let args = AttnArgs { tiles_per_split: per as i32, tile0: tile0 as i32, tile_end: tile_end as i32, split0: split0 as i32, out, ..args };
            let cfg = LaunchConfig { grid_dim: (s as u32, splits_here as u32, chunks as u32), block_dim: block, shared_mem_bytes: 0 };
            if started && early {
                launch_after(&self.dev, name, cfg, &mut [param(&args)])?;
            } else {
                launch!(self.dev, name, cfg, &args);
            }
            started = true;
        }
        if merge_in_window {
            return Ok(());
        }
        let after = started && early && fresh.is_none();
        if let Some((fk, fv, t)) = fresh {
            let cfg = LaunchConfig { grid_dim: (s as u32, rep as u32, 1), block_dim: (d as u32, 1, 1), shared_mem_bytes: 0 };
            let (ti, di, hk, ri, sp, last, sl) = (t as i32, d as i32, kv_heads as i32, (rep / t) as i32, total as i32, (total - 1) as i32, args.scale_log2);
            launch!(self.dev, "fresh_attn", cfg, q, fk, fv, &self.part_acc, &self.part_ml, &ti, &di, &hk, &ri, &sp, &last, &sl);
        }
        let cfg = LaunchConfig { grid_dim: ((s * rep) as u32, 1, 1), block_dim: (d as u32, 1, 1), shared_mem_bytes: 0 };
        let (sp, ri, hk, di) = (total as i32, rep as i32, kv_heads as i32, d as i32);
        if after {
            let (acc, _g1) = self.part_acc.device_ptr(&stream);
            let (ml, _g2) = self.part_ml.device_ptr(&stream);
            let (o, _g3) = out.device_ptr_mut(&stream);
            launch_after(&self.dev, "combine_splits", cfg, &mut [param(&acc), param(&ml), param(&o), param(&sp), param(&ri), param(&hk), param(&di)])?;
        } else {
            launch!(self.dev, "combine_splits", cfg, &self.part_acc, &self.part_ml, out, &sp, &ri, &hk, &di);
        }
        Ok(())
    }

    /// Forgets every token (the buffers stay allocated).
    pub fn reset(&mut self) {
        (self.len, self.nqk, self.nqv) = (0, 0, 0);
    }

    /// Copies one stream's quantized codes and params back (for the byte-for-byte check),
    /// KIVI's codes and key params taken out of their MMA tile order into the CPU store's layout
    /// ([`crate::mma_tile`]).
    pub fn download_stream(&self, stream: usize) -> Result<StreamBytes> {
        let d = self.head_dim;
        if stream >= self.streams {
            return Err(KvqError::InvalidParam(format!("stream {stream} of {}", self.streams)));
        }
        let st = self.dev.cuda_stream();
        let kb = packed_len(d, self.k_bits);
        let vb = packed_len(d, self.v_bits);
        let kc0 = stream * self.capacity * kb;
        let kp0 = stream * self.layout.key_params(self.capacity);
        let vc0 = stream * self.capacity * vb;
        let vgpt = d / self.value_group;
        let vp0 = stream * self.capacity * vgpt;
        let kcodes = st.clone_dtoh(&self.kcodes.slice(kc0..kc0 + self.nqk * kb)).map_err(gpu)?;
        let kparams = st.clone_dtoh(&self.kparams.slice(kp0..kp0 + self.layout.key_params(self.nqk))).map_err(gpu)?;
        if !self.layout.token_keys {
            // Whole tiles of values (the last may be partly quantized: only its first rows count).
            let tiles = st.clone_dtoh(&self.vcodes.slice(vc0..vc0 + self.nqv.div_ceil(TILE) * TILE * vb)).map_err(gpu)?;
            let vcodes = crate::mma_tile::values_to_rows(self.v_bits, d, &tiles, self.nqv)?;
            let kcodes = crate::mma_tile::keys_to_blocks(self.k_bits, d, self.group, &kcodes)?;
            let kparams = crate::mma_tile::key_tiles_to_params(d, &kparams)?;
            let vparams = st.clone_dtoh(&self.vparams.slice(vp0..vp0 + self.nqv * vgpt)).map_err(gpu)?;
            return Ok(StreamBytes { kcodes, kparams, vcodes, vparams });
        }
        let vcodes = st.clone_dtoh(&self.vcodes.slice(vc0..vc0 + self.nqv * vb)).map_err(gpu)?;
        let vparams = st.clone_dtoh(&self.vparams.slice(vp0..vp0 + self.nqv * vgpt)).map_err(gpu)?;
        Ok(StreamBytes { kcodes, kparams, vcodes, vparams })
    }

    pub fn synchronize(&self) -> Result<()> {
        self.dev.cuda_stream().synchronize().map_err(gpu)
    }
}

/// One stream's quantized bytes as copied back from the GPU; params as u32 words
/// (low half: f16 min, high half: f16 scale).
pub struct StreamBytes {
    pub kcodes: Vec<u8>,
    pub kparams: Vec<u32>,
    pub vcodes: Vec<u8>,
    pub vparams: Vec<u32>,
}

/// The first index where two slices differ (a length difference counts).
pub fn first_difference<T: PartialEq>(x: &[T], y: &[T]) -> Option<usize> {
    x.iter().zip(y).position(|(a, b)| a != b).or(if x.len() != y.len() { Some(x.len().min(y.len())) } else { None })
}

/// Where a GPU stream's packed bytes first differ from a CPU stream's (`None`: equal).
fn stream_difference(g: &StreamBytes, ck: &crate::cache::PackedView, cv: &crate::cache::PackedView, s: usize) -> Option<String> {
    for (what, x, y) in [("key codes", &g.kcodes[..], ck.codes), ("value codes", &g.vcodes[..], cv.codes)] {
        if let Some(j) = first_difference(x, y) {
            return Some(format!("{what} of stream {s} differ at byte {j} (of {} / {})", x.len(), y.len()));
        }
    }
    for (what, x, y) in [("key params", &g.kparams, &param_words(ck.params)), ("value params", &g.vparams, &param_words(cv.params))] {
        if let Some(j) = first_difference(x, y) {
            return Some(format!("{what} of stream {s} differ at group {j}: GPU {:08x}, CPU {:08x}", x.get(j).copied().unwrap_or(0), y.get(j).copied().unwrap_or(0)));
        }
    }
    None
}

fn param_words(params: &[crate::quant::Affine]) -> Vec<u32> {
    params.iter().map(|a| a.min.to_bits() as u32 | (a.scale.to_bits() as u32) << 16).collect()
}

/// What a correctness check found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    /// Streams compared with the CPU reference.
    pub streams_checked: usize,
    pub packed_bytes_equal: bool,
    /// The first difference found, if any (which buffer, stream and index).
    pub mismatch: Option<String>,
    /// max |gpu − cpu| / max |cpu| over the attention outputs compared.
    pub max_rel_error: f64,
}

/// Random K/V `[stream][tokens][D]` with a few large key channels (like real keys),
/// deterministic: stream `s` draws from seed `seed + s`, in parallel.
pub fn random_kv(seed: u64, streams: usize, tokens: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let per = tokens * d;
    let mut k = vec![0f32; streams * per];
    let mut v = vec![0f32; streams * per];
    k.par_chunks_mut(per).zip(v.par_chunks_mut(per)).enumerate().for_each(|(s, (ks, vs))| {
        let mut rng = SplitMix64::new(seed.wrapping_add(s as u64));
        for (i, x) in ks.iter_mut().enumerate() {
            *x = rng.normal() * if i % d < 4 { 8.0 } else { 1.0 } + 0.5;
        }
        for x in vs.iter_mut() {
            *x = rng.normal();
        }
    });
    (k, v)
}

/// Mean milliseconds of `f` over `iters` runs after `warmup`: the runs are queued back
/// to back and the clock stops when the GPU has finished them all. (Host clock: the
/// link-only libcuda of GPU-less build machines lacks cuEventElapsedTime_v2.)
pub fn time_ms(dev: &CudaDevice, warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let stream = dev.cuda_stream();
    for _ in 0..warmup {
        f()?;
    }
    stream.synchronize().map_err(gpu)?;
    let start = std::time::Instant::now();
    for _ in 0..iters {
        f()?;
    }
    stream.synchronize().map_err(gpu)?;
    Ok(start.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64)
}

/// Like [`time_ms`] for `variants` ways of doing one thing, timed in turns (each warmed up,
/// then `rounds` rounds of `iters` calls of each): the median milliseconds a call of each.
/// Side by side, so that no variant is the one timed first (or last) on a warmer GPU.
pub fn time_ms_in_turns(dev: &CudaDevice, rounds: usize, iters: usize, variants: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<Vec<f64>> {
    let mut times = vec![Vec::new(); variants];
    for v in 0..variants {
        for _ in 0..3 {
            f(v)?;
        }
    }
    for _ in 0..rounds.max(1) {
        for (v, t) in times.iter_mut().enumerate() {
            t.push(time_ms(dev, 0, iters, || f(v))?);
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect())
}

/// Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written
/// (the yardstick the kernels' bandwidth is compared with).
pub fn copy_bandwidth(dev: &CudaDevice, bytes: usize) -> Result<f64> {
    let src = dev.alloc_zeros::<u8>(bytes).map_err(gpu)?;
    let mut dst = dev.alloc_zeros::<u8>(bytes).map_err(gpu)?;
    let stream = dev.cuda_stream();
    let ms = time_ms(dev, 2, 10, || stream.memcpy_dtod(&src, &mut dst).map_err(gpu))?;
    Ok(2.0 * bytes as f64 / (ms * 1e-3) / 1e9)
}

/// Converts f32 `[n]` on the device to f16 (the append kernel with one ring as long as
/// the data: a plain conversion).
pub fn to_f16(dev: &CudaDevice, src: &CudaSlice<f32>, streams: usize, tokens: usize, d: usize) -> Result<CudaSlice<f16>> {
    let mut dst = dev.alloc_zeros::<f16>(streams * tokens * d).map_err(gpu)?;
    let (stride, t0, ti, di, si, ring, pos) = ((tokens * d) as i64, 0i32, tokens as i32, d as i32, streams as i32, tokens as i32, 0i64);
    launch!(dev, "append_ring_f32", grid_1d(streams * tokens * d), src, &stride, &t0, &ti, &di, &si, &mut dst, &ring, &pos);
    Ok(dst)
}

impl PackedGpuLayer {
    /// Quantizes the first `tokens` tokens of `keys`/`values` (f16, `[stream][src_tokens][D]`) into this
    /// layer's code buffers in one launch each: the bulk throughput of the quantize+pack
    /// kernels (a benchmark; the cache's own path is [`PackedGpuLayer::append`]).
    /// Returns the bytes read and written.
    pub fn quantize_bulk(&mut self, keys: &CudaSlice<f16>, values: &CudaSlice<f16>, src_tokens: usize, tokens: usize) -> Result<usize> {
        self.quantize_bulk_parts(keys, values, src_tokens, tokens, (true, true))
    }

    /// [`PackedGpuLayer::quantize_bulk`] of the keys only, the values only, or both
    /// (`(keys, values)`): to time the two kernels apart. Returns the bytes the parts moved.
    pub fn quantize_bulk_parts(&mut self, keys: &CudaSlice<f16>, values: &CudaSlice<f16>, src_tokens: usize, tokens: usize, (do_keys, do_values): (bool, bool)) -> Result<usize> {
        let (s, d, g) = (self.streams, self.head_dim, self.group);
        let block = if self.layout.token_keys { 1 } else { g };
        if tokens > self.capacity || tokens > src_tokens || src_tokens > i32::MAX as usize || tokens % block != 0 || keys.len() < s * src_tokens * d || values.len() < s * src_tokens * d {
            return Err(KvqError::Shape(format!("bulk quantization of {tokens} tokens (a multiple of {block}, at most {})", self.capacity)));
        }
        let dev = self.dev.clone();
        // The source as one long "ring" per stream: token t of stream s at s·src_tokens + t.
        let (ring, di, gi, si, cap) = (src_tokens as i32, d as i32, g as i32, s as i32, self.capacity as i64);
        let (t0, t1) = (0i64, tokens as i64);
        if !do_keys {
        } else if self.layout.token_keys {
            let name = token_groups_kernel(self.k_bits, g);
            launch!(dev, &name, grid_1d(threads_i32(s * tokens * (d / g))?), keys, &ring, &di, &gi, &t0, &t1, &si, &mut self.kcodes, &mut self.kparams, &cap, &0i32);
        } else {
            let (b0, b1) = (0i64, (tokens / g) as i64);
            let (name, per_thread) = channel_blocks_kernel(self.k_bits, g);
            let threads = threads_i32(s * tokens / g * d / per_thread)?;
            launch!(dev, &name, grid_1d(threads), keys, &ring, &di, &gi, &b0, &b1, &si, &mut self.kcodes, &mut self.kparams, &cap);
        }
        if do_values {
            quantize_values(&self.dev, self.layout, self.streams, (values, src_tokens), 0, tokens, &mut self.vcodes, &mut self.vparams)?;
        }
        // Every token is now held quantized (no window): what download_stream reads.
        (self.len, self.nqk, self.nqv) = (tokens, tokens, tokens);
        let read = s * tokens * d * 2;  // f16 keys or values
        let key_bytes = read + s * tokens * packed_len(d, self.k_bits) + s * self.layout.key_params(tokens) * 4;
        let value_bytes = read + s * tokens * packed_len(d, self.v_bits) + s * tokens * (d / self.value_group) * 4;
        Ok(if do_keys { key_bytes } else { 0 } + if do_values { value_bytes } else { 0 })
    }
}

/// Checks a filled GPU layer against the CPU cache fed the same K/V for the sequences
/// in `rows`: packed bytes equal stream by stream, and decode attention within tolerance.
/// `k`/`v` are `[stream][tokens][D]` host copies of what was appended; `q` the queries
/// (`[batch][q_heads][D]`) and `gpu_out` the GPU's attention output.
#[allow(clippy::too_many_arguments)]
pub fn check_packed(
    layer: &PackedGpuLayer,
    config: &CacheConfig,
    rows: &[usize],
    kv_heads: usize,
    k: &[f32],
    v: &[f32],
    q: &[f32],
    q_heads: usize,
    gpu_out: &[f32],
) -> Result<Check> {
    let d = layer.head_dim;
    let n = layer.len;
    // The CPU reference reads every token from the store, like the kernel.
    let cpu_config = CacheConfig { past_only: false, ..config.clone() };
    let shape = CacheShape { layers: 1, batch: rows.len(), kv_heads, head_dim: d };
    let mut cpu = Cache::new(&cpu_config, shape, None, None)?;
    let per = n * d;
    let mut kr = Vec::with_capacity(rows.len() * kv_heads * per);
    let mut vr = Vec::with_capacity(rows.len() * kv_heads * per);
    let mut qr = Vec::new();
    for &b in rows {
        for h in 0..kv_heads {
            let s = b * kv_heads + h;
            kr.extend_from_slice(&k[s * per..(s + 1) * per]);
            vr.extend_from_slice(&v[s * per..(s + 1) * per]);
        }
        qr.extend_from_slice(&q[b * q_heads * d..(b + 1) * q_heads * d]);
    }
    // Append in the GPU's chunks, so the reference sees the same sequence of pushes
    // (the result does not depend on chunking; this keeps the comparison literal).
    let chunk = layer.layout.chunk;
    let mut t = 0;
    while t < n {
        let c = (n - t).min(chunk);
        let mut kc = Vec::with_capacity(rows.len() * kv_heads * c * d);
        let mut vc = Vec::with_capacity(kc.capacity());
        for s in 0..rows.len() * kv_heads {
            kc.extend_from_slice(&kr[s * per + t * d..s * per + (t + c) * d]);
            vc.extend_from_slice(&vr[s * per + t * d..s * per + (t + c) * d]);
        }
        cpu.append(0, &kc, &vc, c)?;
        t += c;
    }
    let mut mismatch = None;
    for (i, &b) in rows.iter().enumerate() {
        for h in 0..kv_heads {
            let s = b * kv_heads + h;
            let g = layer.download_stream(s)?;
            let (ck, cv) = cpu.packed_stream(0, i * kv_heads + h)?;
            if (ck.quantized, cv.quantized) != (layer.nqk, layer.nqv) {
                mismatch.get_or_insert(format!("quantized lengths: GPU {}/{}, CPU {}/{}", layer.nqk, layer.nqv, ck.quantized, cv.quantized));
            }
            if let Some(m) = stream_difference(&g, &ck, &cv, s) {
                mismatch.get_or_insert(m);
            }
        }
    }
    let mut out = vec![0f32; qr.len()];
    cpu.attend(0, &qr, q_heads, 1, &mut out)?;
    let mut max_abs = 0f64;
    let mut max_err = 0f64;
    for (i, &b) in rows.iter().enumerate() {
        let g = &gpu_out[b * q_heads * d..(b + 1) * q_heads * d];
        let c = &out[i * q_heads * d..(i + 1) * q_heads * d];
        for (x, y) in g.iter().zip(c) {
            max_abs = max_abs.max(y.abs() as f64);
            max_err = max_err.max((x - y).abs() as f64);
        }
    }
    Ok(Check { streams_checked: rows.len() * kv_heads, packed_bytes_equal: mismatch.is_none(), mismatch, max_rel_error: if max_abs > 0.0 { max_err / max_abs } else { max_err } })
}

// ---------------------------------------------------------------- full precision (full.cu)

/// Whether every value of `x` (f32 or f16 in device memory) is finite and within
/// ±[`MAX_ABS_VALUE`](crate::error::MAX_ABS_VALUE), the rule of
/// [`check_values`](crate::error::check_values): one pass over `x` and one flag read back.
pub fn values_in_range<T: CheckedElement>(dev: &CudaDevice, x: &CudaSlice<T>) -> Result<bool> {
    if x.len() == 0 {
        return Ok(true);
    }
    let mut flag = dev.alloc_zeros::<i32>(1).map_err(gpu)?;
    // A few blocks an SM stream through the whole buffer (grid-stride loop).
    let blocks = x.len().div_ceil(256).min(8 * sm_count(dev)?);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (n, max_abs) = (x.len() as i64, crate::error::MAX_ABS_VALUE);
    launch!(full: dev, T::CHECK_KERNEL, cfg, x, &n, &max_abs, &mut flag);
    let flag = dev.cuda_stream().clone_dtoh(&flag).map_err(gpu)?;
    Ok(flag[0] == 0)
}

/// Checks the KVQuant quantize kernels' short division (a reciprocal shared by every
/// dividend, kvquant.cu's `div_rn_short`) against IEEE division on the pairs `(a[i], b[i])`:
/// returns how many pairs the short path takes and on how many it differs.
pub fn kvquant_div_probe(dev: &CudaDevice, a: &[f32], b: &[f32]) -> Result<(u64, u64)> {
    if a.len() != b.len() || a.len() > i32::MAX as usize {
        return Err(KvqError::Shape(format!("division probe: {} dividends, {} divisors", a.len(), b.len())));
    }
    let (ad, bd) = (dev.clone_htod(a).map_err(gpu)?, dev.clone_htod(b).map_err(gpu)?);
    let mut counts = dev.alloc_zeros::<u64>(2).map_err(gpu)?;
    let n = a.len() as i32;
    launch!(kvquant: dev, "kvquant_div_probe", grid_1d(a.len()), &ad, &bd, &n, &mut counts);
    let c = dev.cuda_stream().clone_dtoh(&counts).map_err(gpu)?;
    Ok((c[0], c[1]))
}

/// The element types [`values_in_range`] reads.
pub trait CheckedElement: DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits {
    const CHECK_KERNEL: &'static str;
}
impl CheckedElement for f32 {
    const CHECK_KERNEL: &'static str = "any_bad_f32";
}
impl CheckedElement for f16 {
    const CHECK_KERNEL: &'static str = "any_bad_f16";
}

/// The shape of a full-precision cache for [`fp16_decode_attention`]: `batch` sequences of
/// `kv_heads` streams, each `cap` tokens of `head_dim` f16 values, the first `n` held.
#[derive(Clone, Copy, Debug)]
pub struct FullAttnShape {
    pub batch: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub cap: usize,
    pub n: usize,
}

/// Whether [`fp16_decode_attention`] has a kernel for this head size and GQA ratio.
pub fn fp16_attention_supported(head_dim: usize, q_heads: usize, kv_heads: usize) -> bool {
    kv_heads > 0 && q_heads % kv_heads == 0 && (1..=8).contains(&(q_heads / kv_heads)) && matches!(head_dim, 64 | 128)
}

/// Decode attention over an fp16 cache (full.cu's fused kernel, the end-to-end baseline):
/// one query token a sequence, `q` `[batch][q_heads][head_dim]` (f32), `k`/`v`
/// `[batch·kv_heads][cap][head_dim]` (f16); writes `out` like `q`. Scores and softmax in
/// f32, as kvq's CPU fp16 cache computes them.
pub fn fp16_decode_attention(dev: &CudaDevice, q: &CudaSlice<f32>, k: &CudaSlice<f16>, v: &CudaSlice<f16>, shape: FullAttnShape, out: &mut CudaSlice<f32>) -> Result<()> {
    let FullAttnShape { batch, q_heads, kv_heads, head_dim: d, cap, n } = shape;
    if !fp16_attention_supported(d, q_heads, kv_heads) {
        return Err(KvqError::Unsupported(format!("fp16 decode attention has kernels for head sizes 64 and 128 and 1 to 8 query heads a KV head, not {d} and {q_heads}/{kv_heads}")));
    }
    let streams = batch * kv_heads;
    if n == 0 || n > cap || n > i32::MAX as usize || q.len() != batch * q_heads * d || out.len() != q.len() || k.len() < streams * cap * d || v.len() < streams * cap * d {
        return Err(KvqError::Shape(format!(
            "fp16 attention of {n} tokens (of {cap}) over {streams} streams × {d}: q {} and out {} floats (want {}), k {} and v {} halves (want {})",
            q.len(),
            out.len(),
            batch * q_heads * d,
            k.len(),
            v.len(),
            streams * cap * d
        )));
    }
    let rep = q_heads / kv_heads;
    let name = format!("fp16_decode_attn_d{d}_r{rep}");
    let f = full_module(dev)?.load_function(&name).map_err(gpu)?;
    let (splits, per) = plan_splits(n.div_ceil(TILE), streams, blocks_per_sm_of(&f)? * sm_count(dev)?, WARPS as usize);
    let mut part_acc = dev.alloc_zeros::<f32>(streams * splits * rep * d).map_err(gpu)?;
    let mut part_ml = dev.alloc_zeros::<f32>(streams * splits * rep * 2).map_err(gpu)?;
    let cfg = LaunchConfig { grid_dim: (streams as u32, splits as u32, 1), block_dim: (WARPS * 32, 1, 1), shared_mem_bytes: 0 };
    let (capl, ni, hk, sp, pi, sl) = (cap as i64, n as i32, kv_heads as i32, splits as i32, per as i32, std::f32::consts::LOG2_E / (d as f32).sqrt());
    launch!(@go f, dev, cfg, q, k, v, &capl, &ni, &hk, &sp, &pi, &sl, &mut part_acc, &mut part_ml);
    let cfg = LaunchConfig { grid_dim: ((streams * rep) as u32, 1, 1), block_dim: (d as u32, 1, 1), shared_mem_bytes: 0 };
    let (ri, di) = (rep as i32, d as i32);
    launch!(dev, "combine_splits", cfg, &part_acc, &part_ml, out, &sp, &ri, &hk, &di);
    Ok(())
}

// ---------------------------------------------------------------- KVQuant and per-token quantize

/// KVQuant's codes for `streams × tokens` vectors on the GPU (kernels/kvquant.cu), in the
/// bytes of kvq's CPU store (`NuqStore`), stream after stream: packed codes, per-token
/// f16 (centre, half-range) for values, and `n_out` sparse (u16 channel, f16 value)
/// outliers a vector.
pub struct KvQuantGpu {
    dev: CudaDevice,
    pub streams: usize,
    pub tokens: usize,
    pub head_dim: usize,
    pub bits: u8,
    pub n_out: usize,
    codes: CudaSlice<u8>,
    token_norm: CudaSlice<u32>,
    out_index: CudaSlice<u16>,
    out_value: CudaSlice<f16>,
}

impl KvQuantGpu {
    /// Room for `streams × tokens` vectors of `head_dim` (32, 64, 96, 128 or 256).
    pub fn new(dev: &CudaDevice, streams: usize, tokens: usize, head_dim: usize, bits: u8, n_out: usize) -> Result<Self> {
        crate::quant::check_bits(bits as u32)?;
        if !matches!(head_dim, 32 | 64 | 96 | 128 | 256) || n_out > head_dim || streams == 0 || tokens == 0 {
            return Err(KvqError::Unsupported(format!(
                "the KVQuant kernel takes head sizes 32, 64, 96, 128 and 256 and at most one outlier a channel, not {head_dim} with {n_out} ({streams} streams of {tokens} tokens)"
            )));
        }
        let rows = streams * tokens;
        if rows > i32::MAX as usize {
            return Err(KvqError::Unsupported(format!("{rows} vectors in one KVQuant launch: the kernel indexes them with 32 bits")));
        }
        Ok(KvQuantGpu {
            dev: dev.clone(),
            streams,
            tokens,
            head_dim,
            bits,
            n_out,
            codes: dev.alloc_zeros::<u8>(rows * packed_len(head_dim, bits)).map_err(gpu)?,
            // Values' (centre, half-range): allocated by the first values' quantize (keys have none).
            token_norm: dev.alloc_zeros::<u32>(1).map_err(gpu)?,
            out_index: dev.alloc_zeros::<u16>((rows * n_out).max(1)).map_err(gpu)?,
            out_value: dev.alloc_zeros::<f16>((rows * n_out).max(1)).map_err(gpu)?,
        })
    }

    /// Quantizes `x` (`[stream][tokens][head_dim]`, f32) with `codebook`: keys when
    /// `key_norm` gives the calibrated (centre, scale), `[kv_heads][head_dim]` each;
    /// values (per token) when it is `None`. Returns the bytes moved (read + written).
    pub fn quantize(&mut self, x: &CudaSlice<f32>, kv_heads: usize, codebook: &CudaCodebook, key_norm: Option<(&CudaSlice<f32>, &CudaSlice<f32>)>) -> Result<usize> {
        self.quantize_into(x, (self.tokens, 0), self.tokens, 0, kv_heads, codebook, key_norm)
    }

    /// [`KvQuantGpu::quantize`] of `tokens` tokens a stream, read from `x`
    /// (`[stream][src_tokens][head_dim]`, from token `src_t0`), written to rows
    /// `dst_t0 ..` of each stream (what a cache appends).
    #[allow(clippy::too_many_arguments)]
    pub fn quantize_into(&mut self, x: &CudaSlice<f32>, (src_tokens, src_t0): (usize, usize), tokens: usize, dst_t0: usize, kv_heads: usize, codebook: &CudaCodebook, key_norm: Option<(&CudaSlice<f32>, &CudaSlice<f32>)>) -> Result<usize> {
        let (rows, d) = (self.streams * tokens, self.head_dim);
        if tokens == 0 || src_t0 + tokens > src_tokens || dst_t0 + tokens > self.tokens || src_tokens > i32::MAX as usize {
            return Err(KvqError::Shape(format!("KVQuant quantize of tokens {src_t0}..{} of {src_tokens} into rows {dst_t0}.. of {}", src_t0 + tokens, self.tokens)));
        }
        if x.len() < self.streams * src_tokens * d || kv_heads == 0 || self.streams % kv_heads != 0 || codebook.bits != self.bits {
            return Err(KvqError::Shape(format!("KVQuant quantize: {} floats for {rows} vectors of {d}, {kv_heads} KV heads, a {}-bit codebook for {}-bit codes", x.len(), codebook.bits, self.bits)));
        }
        if let Some((c, s)) = key_norm {
            if c.len() < kv_heads * d || s.len() < kv_heads * d {
                return Err(KvqError::Shape(format!("key centre and scale need {} values each", kv_heads * d)));
            }
        }
        if key_norm.is_none() && self.token_norm.len() < self.streams * self.tokens {
            self.token_norm = self.dev.alloc_zeros::<u32>(self.streams * self.tokens).map_err(gpu)?;
        }
        // A kernel for keys or values, built for the code width where there is one (the
        // presets' 2, 3, 4 bits).
        let kind = if key_norm.is_some() { "keys" } else { "values" };
        let name = if (2..=4).contains(&self.bits) { format!("kvquant_quantize_{kind}_d{}_b{}", d / 32, self.bits) } else { format!("kvquant_quantize_{kind}_d{}", d / 32) };
        let f = kvquant_module(&self.dev)?.load_function(&name).map_err(gpu)?;
        // Each warp takes a run of consecutive rows: as many blocks as the GPU holds at once
        // (one wave, so the runs end together), fewer when there are fewer rows.
        let blocks = rows.div_ceil(WARPS as usize).min(blocks_per_sm_of(&f)? * sm_count(&self.dev)?);
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (WARPS * 32, 1, 1), shared_mem_bytes: 0 };
        let (rl, ti, hk, bi, no) = (rows as i32, tokens as i32, kv_heads as i32, self.bits as i32, self.n_out as i32);
        let (sti, st0, cap, dt0) = (src_tokens as i32, src_t0 as i32, self.tokens as i64, dst_t0 as i32);
        let null = 0u64;
        match key_norm {
            Some((c, s)) => launch!(@go f, self.dev, cfg, x, &rl, &ti, &sti, &st0, &cap, &dt0, &hk, &bi, c, s, &codebook.bounds, &no, &mut self.codes, &mut self.token_norm, &mut self.out_index, &mut self.out_value),
            None => launch!(@go f, self.dev, cfg, x, &rl, &ti, &sti, &st0, &cap, &dt0, &hk, &bi, &null, &null, &codebook.bounds, &no, &mut self.codes, &mut self.token_norm, &mut self.out_index, &mut self.out_value),
        }
        let written = rows * (packed_len(d, self.bits) + self.n_out * crate::quant::outliers::OUTLIER_BYTES) + if key_norm.is_none() { rows * 4 } else { 0 };
        Ok(rows * d * 4 + written)
    }

    /// One stream's bytes, copied back: codes, (centre, half-range) words, outliers.
    pub fn download_stream(&self, s: usize) -> Result<(Vec<u8>, Vec<u32>, Vec<u16>, Vec<u16>)> {
        if s >= self.streams {
            return Err(KvqError::InvalidParam(format!("stream {s} of {}", self.streams)));
        }
        let (t, pl, no) = (self.tokens, packed_len(self.head_dim, self.bits), self.n_out);
        let st = self.dev.cuda_stream();
        let codes = st.clone_dtoh(&self.codes.slice(s * t * pl..(s + 1) * t * pl)).map_err(gpu)?;
        let norm = if self.token_norm.len() >= self.streams * t { st.clone_dtoh(&self.token_norm.slice(s * t..(s + 1) * t)).map_err(gpu)? } else { Vec::new() };
        let (idx, val) = if no == 0 {
            (Vec::new(), Vec::new())
        } else {
            let idx = st.clone_dtoh(&self.out_index.slice(s * t * no..(s + 1) * t * no)).map_err(gpu)?;
            let val = st.clone_dtoh(&self.out_value.slice(s * t * no..(s + 1) * t * no)).map_err(gpu)?;
            (idx, val.iter().map(|v| v.to_bits()).collect())
        };
        Ok((codes, norm, idx, val))
    }
}

/// A codebook on the GPU: its bounds (what [`KvQuantGpu::quantize`] counts codes
/// against) and levels (what attention reads a code as).
pub struct CudaCodebook {
    bits: u8,
    bounds: CudaSlice<f32>,
    levels: CudaSlice<f32>,
}

impl CudaCodebook {
    pub fn new(dev: &CudaDevice, codebook: &crate::quant::Codebook) -> Result<Self> {
        Ok(CudaCodebook { bits: codebook.bits(), bounds: dev.clone_htod(codebook.bounds()).map_err(gpu)?, levels: dev.clone_htod(codebook.levels()).map_err(gpu)? })
    }
}

/// Compares streams `streams` of a [`KvQuantGpu`] with kvq's CPU KVQuant store fed the
/// same vectors (`x`: `[stream][tokens][head_dim]` host copy): `None` when every byte is
/// equal, else where the first difference is.
pub fn check_kvquant(g: &KvQuantGpu, x: &[f32], streams: &[usize], kv_heads: usize, codebook: &crate::quant::Codebook, key_norm: Option<(&[f32], &[f32])>) -> Result<Option<String>> {
    use crate::cache::{NuqStore, TokenStore};
    let (t, d) = (g.tokens, g.head_dim);
    for &s in streams {
        let h = s % kv_heads;
        let mut cpu = match key_norm {
            Some((c, sc)) => NuqStore::keys(d, codebook.clone(), c[h * d..(h + 1) * d].to_vec(), sc[h * d..(h + 1) * d].to_vec(), g.n_out),
            None => NuqStore::values(d, codebook.clone(), g.n_out),
        };
        cpu.push(&x[s * t * d..(s + 1) * t * d]);
        let (codes, norm, idx, val) = cpu.parts();
        let norm: Vec<u32> = norm.iter().map(|(c, h)| c.to_bits() as u32 | (h.to_bits() as u32) << 16).collect();
        let val: Vec<u16> = val.iter().map(|v| v.to_bits()).collect();
        let (gc, gn, gi, gv) = g.download_stream(s)?;
        let gn = if key_norm.is_some() { Vec::new() } else { gn };
        let diffs = [
            ("codes", first_difference(&gc, codes)),
            ("centre/half-range", first_difference(&gn, &norm)),
            ("outlier channels", first_difference(&gi, idx)),
            ("outlier values", first_difference(&gv, &val)),
        ];
        if let Some((what, Some(j))) = diffs.iter().find(|(_, d)| d.is_some()) {
            return Ok(Some(format!("stream {s}: {what} differ at element {j}")));
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------- KVQuant cache layer

/// The kernel's argument block (`KvqAttnArgs` in kvquant.cu; same field order and types).
#[repr(C)]
#[derive(Clone, Copy)]
struct KvqAttnArgs {
    q: u64,
    part_acc: u64,
    part_ml: u64,
    ksink: u64,
    vsink: u64,
    kcodes: u64,
    vcodes: u64,
    vnorm: u64,
    kout_idx: u64,
    kout_val: u64,
    vout_idx: u64,
    vout_val: u64,
    kcenter: u64,
    kscale: u64,
    klevels: u64,
    vlevels: u64,
    cos: u64,
    sin: u64,
    cap: i64,
    sink_cap: i32,
    sink: i32,
    bits: i32,
    n_out: i32,
    hkv: i32,
    t: i32,
    nq: i32,
    n: i64,
    tiles_per_split: i32,
    splits: i32,
    scale_log2: f32,
}
// SAFETY: plain old data with the C layout of the kernel's struct.
unsafe impl DeviceRepr for KvqAttnArgs {}

/// Outliers a vector `kvquant_attn_*` reads (`MAX_OUTLIERS` in kvquant.cu).
pub const KVQUANT_MAX_OUTLIERS: usize = 4;

/// The model's RoPE on the GPU: cos and sin of every position, `[positions][head_dim / 2]`
/// (the very table kvq's CPU rotates by), for caches that store keys before RoPE.
pub struct CudaRope {
    pub half_style: bool,
    pub positions: usize,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
}

impl CudaRope {
    pub fn new(dev: &CudaDevice, rope: &crate::rope::Rope, positions: usize) -> Result<Self> {
        // (at least 2 rows: the attention kernel steps angles by position 1's)
        let (cos, sin) = rope.tables(0, positions.max(2));
        Ok(CudaRope {
            half_style: rope.style == crate::rope::RopeStyle::Half,
            positions,
            cos: dev.clone_htod(&cos).map_err(gpu)?,
            sin: dev.clone_htod(&sin).map_err(gpu)?,
        })
    }
}

/// One layer of a KVQuant cache on the GPU: the first `sink` tokens of each stream in f16,
/// the rest in KVQuant's store (kernels/kvquant.cu quantizes them as they come, byte for
/// byte the CPU's `NuqStore`), keys before RoPE; attention reads the store in place
/// (`kvquant_attn_*`), causally over the chunk just appended.
pub struct KvQuantGpuLayer {
    dev: CudaDevice,
    streams: usize,
    kv_heads: usize,
    head_dim: usize,
    sink_cap: usize,
    len: usize,
    ksink: CudaSlice<f16>,
    vsink: CudaSlice<f16>,
    keys: KvQuantGpu,
    values: KvQuantGpu,
    key_codebook: CudaCodebook,
    value_codebook: CudaCodebook,
    key_center: CudaSlice<f32>,
    key_scale: CudaSlice<f32>,
    rope: Arc<CudaRope>,
    part_acc: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    sms: usize,
}

impl KvQuantGpuLayer {
    /// A layer of `streams` = batch × KV heads streams holding up to `capacity` tokens,
    /// `sink` of them in f16, quantized with `calibration` (this layer's constants).
    #[allow(clippy::too_many_arguments)]
    pub fn new(dev: &CudaDevice, streams: usize, kv_heads: usize, head_dim: usize, capacity: usize, sink: usize, n_out: usize, calibration: &crate::cache::LayerCalibration, rope: Arc<CudaRope>) -> Result<Self> {
        let d = head_dim;
        if head_dim != 64 && head_dim != 128 {
            return Err(KvqError::Unsupported(format!("the KVQuant attention kernel is built for head dim 64 and 128, not {head_dim}")));
        }
        if rope.positions < capacity {
            return Err(KvqError::Shape(format!("a RoPE table of {} positions for a cache of {capacity}", rope.positions)));
        }
        if calibration.key_center.len() != kv_heads * d || calibration.key_scale.len() != kv_heads * d || kv_heads == 0 || streams % kv_heads != 0 {
            return Err(KvqError::Shape(format!("key centre/scale must hold {kv_heads} × {d} values, and {streams} streams be whole sequences")));
        }
        if n_out > KVQUANT_MAX_OUTLIERS {
            return Err(KvqError::Unsupported(format!("the KVQuant attention kernel reads at most {KVQUANT_MAX_OUTLIERS} outliers a vector, not {n_out}")));
        }
        let bits = calibration.key_codebook.bits();
        let rows = capacity.saturating_sub(sink).max(1);
        let sink_rows = streams * sink.max(1) * d;
        let mut values = KvQuantGpu::new(dev, streams, rows, d, bits, n_out)?;
        // The attention kernel reads a (centre, half-range) for every row it touches.
        values.token_norm = dev.alloc_zeros::<u32>(streams * rows).map_err(gpu)?;
        Ok(KvQuantGpuLayer {
            dev: dev.clone(),
            streams,
            kv_heads,
            head_dim,
            sink_cap: sink,
            len: 0,
            ksink: dev.alloc_zeros::<f16>(sink_rows).map_err(gpu)?,
            vsink: dev.alloc_zeros::<f16>(sink_rows).map_err(gpu)?,
            keys: KvQuantGpu::new(dev, streams, rows, d, bits, n_out)?,
            values,
            key_codebook: CudaCodebook::new(dev, &calibration.key_codebook)?,
            value_codebook: CudaCodebook::new(dev, &calibration.value_codebook)?,
            key_center: dev.clone_htod(&calibration.key_center).map_err(gpu)?,
            key_scale: dev.clone_htod(&calibration.key_scale).map_err(gpu)?,
            rope,
            part_acc: dev.alloc_zeros::<f32>(1).map_err(gpu)?,
            part_ml: dev.alloc_zeros::<f32>(1).map_err(gpu)?,
            sms: sm_count(dev)?,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens in the sink (f16) and in the store.
    pub fn held(&self) -> (usize, usize) {
        let sink = self.len.min(self.sink_cap);
        (sink, self.len - sink)
    }

    /// What the layer holds now, by kind (as the CPU cache counts it; the per-layer
    /// constants are the cache's to count).
    pub fn held_bytes(&self) -> crate::size::Bytes {
        let (sink, stored) = self.held();
        let (s, d, bits, n_out) = (self.streams, self.head_dim, self.keys.bits, self.keys.n_out);
        crate::size::Bytes {
            codes: 2 * s * stored * packed_len(d, bits),
            params: s * stored * crate::quant::uniform::AFFINE_BYTES,
            outliers: 2 * s * stored * n_out * crate::quant::outliers::OUTLIER_BYTES,
            sink: 2 * s * sink * d * 2,
            ..Default::default()
        }
    }

    /// Appends `tokens` tokens of every stream from `k` (before RoPE) and `v` (f32,
    /// `[stream][tokens][D]`): the first ones of a sequence to the sink, the rest quantized.
    pub fn append(&mut self, k: &CudaSlice<f32>, v: &CudaSlice<f32>, tokens: usize) -> Result<()> {
        let (s, d) = (self.streams, self.head_dim);
        if tokens == 0 || k.len() < s * tokens * d || v.len() < s * tokens * d {
            return Err(KvqError::Shape(format!("append of {tokens} tokens needs {} floats each for K and V, got {} and {}", s * tokens * d, k.len(), v.len())));
        }
        if self.len + tokens > self.sink_cap + self.keys.tokens {
            return Err(KvqError::ContextOverflow { len: self.len + tokens, max: self.sink_cap + self.keys.tokens });
        }
        let to_sink = self.sink_cap.saturating_sub(self.len).min(tokens);
        if to_sink > 0 {
            let (stride, t0, ti, di, si, ring, pos) = ((tokens * d) as i64, 0i32, to_sink as i32, d as i32, s as i32, self.sink_cap as i32, self.len as i64);
            launch!(self.dev, "append_ring_f32", grid_1d(s * to_sink * d), k, &stride, &t0, &ti, &di, &si, &mut self.ksink, &ring, &pos);
            launch!(self.dev, "append_ring_f32", grid_1d(s * to_sink * d), v, &stride, &t0, &ti, &di, &si, &mut self.vsink, &ring, &pos);
        }
        let rest = tokens - to_sink;
        if rest > 0 {
            let row = self.len + to_sink - self.sink_cap;
            let norm = Some((&self.key_center, &self.key_scale));
            self.keys.quantize_into(k, (tokens, to_sink), rest, row, self.kv_heads, &self.key_codebook, norm)?;
            self.values.quantize_into(v, (tokens, to_sink), rest, row, self.kv_heads, &self.value_codebook, None)?;
        }
        self.len += tokens;
        Ok(())
    }

    /// Attention of the last `tokens` positions' queries (`q`: `[batch][q_heads][tokens][D]`,
    /// f32, rotated) over every position up to their own (causal); writes `out` (same shape).
    /// A decode step (one token) on tensor cores for 2- to 4-bit codes (`kvquant_attn_tc_*`);
    /// chunks of several tokens (prefill, scoring) on CUDA cores in f32. Why: the tensor-core
    /// kernel's f16 roundings (1-4e-4 of the output) are far inside the attention check, but
    /// KVQuant's quantizer is discontinuous (a level boundary, an outlier rank), so they flip
    /// codes of the next layers' K/V, and a perplexity scored through them moved past the
    /// CPU's own noise (kvq's small model, chunks of 16: kvquant-2 PPL 246.8 on the CPU, 232.2
    /// on the GPU). Scoring must match the CPU; decoding is where the bytes cost time.
    pub fn attend(&mut self, q: &CudaSlice<f32>, q_heads: usize, tokens: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        let tensor_cores = tokens == 1 && (2..=4).contains(&self.keys.bits);
        self.attend_with(q, q_heads, tokens, out, tensor_cores)
    }

    /// [`Self::attend`] with the kernel named: the tensor-core one (`tensor_cores`: codes of
    /// 2 to 4 bits) or the CUDA-core one (a second implementation, any width).
    pub fn attend_with(&mut self, q: &CudaSlice<f32>, q_heads: usize, tokens: usize, out: &mut CudaSlice<f32>, tensor_cores: bool) -> Result<()> {
        let (s, d, hkv) = (self.streams, self.head_dim, self.kv_heads);
        let batch = s / hkv;
        if q_heads == 0 || q_heads % hkv != 0 || tokens == 0 || tokens > self.len || q.len() != batch * q_heads * tokens * d || out.len() != q.len() {
            return Err(KvqError::Shape(format!("{tokens} queries of {q_heads} heads over {} held: {} floats do not fit", self.len, q.len())));
        }
        if self.len > i32::MAX as usize {
            return Err(KvqError::Unsupported(format!("{} tokens: the KVQuant kernels count a stream's rows in 32 bits", self.len)));
        }
        let nq = q_heads / hkv * tokens;
        let style = if self.rope.half_style { "half" } else { "interleaved" };
        let (name, chunks) = if tensor_cores {
            if !(2..=4).contains(&self.keys.bits) {
                return Err(KvqError::Unsupported(format!("the tensor-core KVQuant kernel takes 2- to 4-bit codes, not {}", self.keys.bits)));
            }
            (format!("kvquant_attn_tc_d{}_b{}_{style}", d / 64, self.keys.bits), nq.div_ceil(TC_QUERIES))
        } else {
            let rep = match nq {
                1 => 1,
                2 => 2,
                _ => 4,
            };
            (format!("kvquant_attn_d{}_r{rep}_{style}", d / 64), nq.div_ceil(rep))
        };
        let f = kvquant_module(&self.dev)?.load_function(&name).map_err(gpu)?;
        let (splits, per) = plan_splits(self.len.div_ceil(TILE), s * chunks, blocks_per_sm_of(&f)? * self.sms, WARPS as usize);
        let need = s * splits * nq * d;
        if self.part_acc.len() < need {
            self.part_acc = self.dev.alloc_zeros::<f32>(need).map_err(gpu)?;
            self.part_ml = self.dev.alloc_zeros::<f32>(s * splits * nq * 2).map_err(gpu)?;
        }
        let stream = self.dev.cuda_stream();
        let args = {
            let (q_p, _g1) = q.device_ptr(&stream);
            let (acc, _g2) = self.part_acc.device_ptr(&stream);
            let (ml, _g3) = self.part_ml.device_ptr(&stream);
            let (ks, _g4) = self.ksink.device_ptr(&stream);
            let (vs, _g5) = self.vsink.device_ptr(&stream);
            let (kc, _g6) = self.keys.codes.device_ptr(&stream);
            let (vc, _g7) = self.values.codes.device_ptr(&stream);
            let (vn, _g8) = self.values.token_norm.device_ptr(&stream);
            let (ki, _g9) = self.keys.out_index.device_ptr(&stream);
            let (kv, _g10) = self.keys.out_value.device_ptr(&stream);
            let (vi, _g11) = self.values.out_index.device_ptr(&stream);
            let (vv, _g12) = self.values.out_value.device_ptr(&stream);
            let (kce, _g13) = self.key_center.device_ptr(&stream);
            let (ksc, _g14) = self.key_scale.device_ptr(&stream);
            let (kl, _g15) = self.key_codebook.levels.device_ptr(&stream);
            let (vl, _g16) = self.value_codebook.levels.device_ptr(&stream);
            let (co, _g17) = self.rope.cos.device_ptr(&stream);
            let (si, _g18) = self.rope.sin.device_ptr(&stream);
            KvqAttnArgs {
                q: q_p,
                part_acc: acc,
                part_ml: ml,
                ksink: ks,
                vsink: vs,
                kcodes: kc,
                vcodes: vc,
                vnorm: vn,
                kout_idx: ki,
                kout_val: kv,
                vout_idx: vi,
                vout_val: vv,
                kcenter: kce,
                kscale: ksc,
                klevels: kl,
                vlevels: vl,
                cos: co,
                sin: si,
                cap: self.keys.tokens as i64,
                sink_cap: self.sink_cap.max(1) as i32,
                sink: self.len.min(self.sink_cap) as i32,
                bits: self.keys.bits as i32,
                n_out: self.keys.n_out as i32,
                hkv: hkv as i32,
                t: tokens as i32,
                nq: nq as i32,
                n: self.len as i64,
                tiles_per_split: per as i32,
                splits: splits as i32,
                scale_log2: std::f32::consts::LOG2_E / (d as f32).sqrt(),
            }
        };
        let cfg = LaunchConfig { grid_dim: (s as u32, splits as u32, chunks as u32), block_dim: (WARPS * 32, 1, 1), shared_mem_bytes: 0 };
        launch!(@go f, self.dev, cfg, &args);
        let cfg = LaunchConfig { grid_dim: ((s * nq) as u32, 1, 1), block_dim: (d as u32, 1, 1), shared_mem_bytes: 0 };
        let (sp, ri, hk, di) = (splits as i32, nq as i32, hkv as i32, d as i32);
        launch!(self.dev, "combine_splits", cfg, &self.part_acc, &self.part_ml, out, &sp, &ri, &hk, &di);
        Ok(())
    }

    /// Forgets every token (the buffers stay allocated).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// The quantized store of keys and of values (for the byte-for-byte check).
    pub fn stores(&self) -> (&KvQuantGpu, &KvQuantGpu) {
        (&self.keys, &self.values)
    }
}
