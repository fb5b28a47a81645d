//! One error type for the whole library: every bad input is a typed value, never a panic.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Error)]
pub enum KvqError {
    #[error("bits must be between 1 and 8, got {0}")]
    InvalidBits(u32),
    #[error("group size must be at least 1")]
    ZeroGroupSize,
    #[error("group size {group} does not divide {what} ({len})")]
    GroupSizeNotDividing { group: usize, len: usize, what: &'static str },
    #[error("{what} contains a non-finite value ({value}) at index {index}")]
    NonFinite { what: &'static str, index: usize, value: f32 },
    #[error("{what} has a value ({value}) at index {index} beyond ±{limit}, outside what an f16 cache can hold")]
    OutOfRange { what: &'static str, index: usize, value: f32, limit: f32 },
    #[error("code {code} at index {index} does not fit in {bits} bits")]
    CodeOutOfRange { code: u8, index: usize, bits: u8 },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("unknown {kind} '{name}'; known: {known}")]
    UnknownPreset { kind: &'static str, name: String, known: String },
    #[error("invalid parameter: {0}")]
    InvalidParam(String),
    #[error("the prompt is empty: generation needs at least one token")]
    EmptyPrompt,
    #[error("layer {layer} is out of range: the cache has {layers} layers")]
    LayerOutOfRange { layer: usize, layers: usize },
    #[error("sequence of {len} tokens exceeds the model's context of {max}")]
    ContextOverflow { len: usize, max: usize },
    #[error("{0}")]
    Unsupported(String),
    #[error("model error: {0}")]
    Model(String),
    #[error("model file {path}: {reason}")]
    ModelFile { path: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("GPU: {0}")]
    Gpu(String),
}

pub type Result<T> = std::result::Result<T, KvqError>;

/// Rejects NaN and ±Inf, and values an f16 cache cannot represent with room to spare
/// (scales are stored as f16, so ranges must stay well inside ±65504).
pub fn check_values(what: &'static str, xs: &[f32]) -> Result<()> {
    for (index, &value) in xs.iter().enumerate() {
        if !value.is_finite() {
            return Err(KvqError::NonFinite { what, index, value });
        }
        if value.abs() > MAX_ABS_VALUE {
            return Err(KvqError::OutOfRange { what, index, value, limit: MAX_ABS_VALUE });
        }
    }
    Ok(())
}

/// Largest |x| a quantized cache accepts. A range of 2·MAX_ABS_VALUE still has an
/// f16 step size for 1-bit codes (the worst case), so no scale overflows to infinity.
pub const MAX_ABS_VALUE: f32 = 30_000.0;

#[cfg(feature = "model")]
impl From<candle_core::Error> for KvqError {
    fn from(e: candle_core::Error) -> Self {
        // candle appends a backtrace when RUST_BACKTRACE is set: keep the message only.
        let msg = e.to_string();
        KvqError::Model(msg.lines().next().unwrap_or("").to_string())
    }
}
