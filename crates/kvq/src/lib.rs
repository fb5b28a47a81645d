//! # kvq — the KV cache of LLM inference, and how to quantize it
//!
//! - [`size`]: how many bytes a KV cache takes, for any model geometry and scheme.
//! - [`quant`]: the quantization math (uniform, bit packing, k-means codebooks,
//!   dense-and-sparse outliers) in plain Rust; compiles to wasm.
//! - [`cache`]: caches with real packed storage behind one trait, [`cache::KvCache`].
//! - `model` and `generate` (feature `model`): a Llama-family decoder on candle whose
//!   attention calls the cache, and generation with and without a cache.
//! - `cuda` (feature `cuda`): KIVI's packed cache on the GPU and the kernels that
//!   quantize into it and attend over it (`kernels/kivi.cu`).

pub mod analysis;
pub mod cache;
pub mod error;
pub mod gpu_plan;
pub mod mma_tile;
pub mod quant;
pub mod rng;
pub mod rope;
pub mod sample;
pub mod size;

#[cfg(feature = "model")]
pub mod eval;
#[cfg(feature = "model")]
pub mod generate;
#[cfg(feature = "model")]
pub mod gguf;
#[cfg(feature = "model")]
pub mod tokenizer;
#[cfg(feature = "model")]
pub mod model;
#[cfg(feature = "model")]
pub mod qmatmul;
#[cfg(feature = "model")]
pub mod tensor_cache;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod gpu_cache;

pub use cache::{Cache, CacheConfig, CacheInfo, CacheShape, KvCache, Scheme};
pub use error::{KvqError, Result};
pub use size::ModelGeometry;
