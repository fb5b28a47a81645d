//! The quantization math, in plain Rust over slices: no tensors, no allocation in the
//! hot loops, and it compiles to `wasm32-unknown-unknown`. The caches, the browser demo
//! and the GPU kernels' tests all call this one module.

pub mod codebook;
pub mod matrix;
pub mod outliers;
pub mod pack;
pub mod uniform;

pub use codebook::Codebook;
pub use matrix::{Axis, QuantizedMatrix};
pub use outliers::{outlier_count, Sparse};
pub use pack::{check_bits, pack, packed_len, unpack};
pub use uniform::Affine;
