//! What a cache is: its scheme and options, the named presets, and their validation.

use crate::error::{KvqError, Result};
use crate::quant::check_bits;
use serde::{Deserialize, Serialize};

/// Element type of a full-precision cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FullPrecision {
    F32,
    F16,
    Bf16,
    /// 8-bit floats (E4M3/E5M2): counted by the size math only; no cache stores it.
    Fp8,
}

impl FullPrecision {
    pub fn name(self) -> &'static str {
        match self {
            FullPrecision::F32 => "fp32",
            FullPrecision::F16 => "fp16",
            FullPrecision::Bf16 => "bf16",
            FullPrecision::Fp8 => "fp8",
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            FullPrecision::F32 => 4,
            FullPrecision::F16 | FullPrecision::Bf16 => 2,
            FullPrecision::Fp8 => 1,
        }
    }
}

/// How the keys and values are stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Scheme {
    /// Nothing is kept: every step recomputes K and V of the whole prefix.
    None,
    /// Every element at full precision.
    Full(FullPrecision),
    /// Keys and values per token, groups of `group_size` channels (the algorithm of
    /// HF's quanto/HQQ `QuantizedCache`). New tokens gather at full precision until
    /// `residual_length` of them are there; then they are quantized together, so
    /// `seq % residual_length` tokens are full precision (0: quantize at once).
    /// HF differs in one respect: it quantizes the whole prompt at prefill, so its
    /// residual holds decode tokens only; here the rule does not depend on chunking.
    PerToken { bits: u8, group_size: usize, residual_length: usize },
    /// KIVI: keys per channel in groups of `group_size` tokens, values per token in
    /// groups of `min(group_size, head_dim)` channels. The `residual_length` most
    /// recent tokens stay full precision; an older key group is quantized as soon as all
    /// its `group_size` tokens have left the window, an older value at once. (KIVI's
    /// reference code instead quantizes the whole key window when it reaches
    /// `residual_length`, keeping 0 to R−1 recent keys; here at least R are kept.)
    Kivi { k_bits: u8, v_bits: u8, group_size: usize, residual_length: usize },
    /// KVQuant: `bits`-bit non-uniform codes from calibrated codebooks; keys per channel
    /// (offline per-channel centre and scale), values per token; `outlier_fraction` of
    /// each vector kept exactly as sparse f16.
    KvQuant { bits: u8, outlier_fraction: f32 },
}

/// A cache configuration: the scheme plus options that apply to every scheme.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheConfig {
    pub scheme: Scheme,
    /// Store keys before RoPE and rotate them on read (KVQuant).
    pub pre_rope: bool,
    /// The first `sink_tokens` tokens stay in f16 (the attention sink).
    pub sink_tokens: usize,
    /// WKVQuant's past-only quantization: the tokens of the current step attend to
    /// their own K/V at full precision; only the past is read back quantized.
    pub past_only: bool,
}

/// The named presets, in the order the CLI lists them.
pub const PRESETS: &[&str] = &[
    "none", "fp32", "fp16", "bf16", "per-token-4", "per-token-2", "kivi-4", "kivi-2", "kvquant-4",
    "kvquant-3", "kvquant-2",
];

/// Largest group size, residual window or sink a configuration may ask for.
pub const MAX_LENGTH_PARAM: usize = 1 << 20;

// ANCHOR: defaults
/// KIVI's published defaults.
pub const KIVI_GROUP: usize = 32;
pub const KIVI_RESIDUAL: usize = 128;
/// HF `QuantizedCacheConfig` defaults (q_group_size = 64, residual_length = 128).
pub const PER_TOKEN_GROUP: usize = 64;
pub const PER_TOKEN_RESIDUAL: usize = 128;
/// KVQuant: 1% outliers, one sink token.
pub const KVQUANT_OUTLIERS: f32 = 0.01;
// ANCHOR_END: defaults

impl CacheConfig {
    pub fn new(scheme: Scheme) -> Self {
        CacheConfig { scheme, pre_rope: false, sink_tokens: 0, past_only: false }
    }

    pub fn kivi(k_bits: u8, v_bits: u8, group_size: usize, residual_length: usize) -> Self {
        Self::new(Scheme::Kivi { k_bits, v_bits, group_size, residual_length })
    }

    pub fn per_token(bits: u8, group_size: usize, residual_length: usize) -> Self {
        Self::new(Scheme::PerToken { bits, group_size, residual_length })
    }

    pub fn kvquant(bits: u8, outlier_fraction: f32) -> Self {
        CacheConfig {
            scheme: Scheme::KvQuant { bits, outlier_fraction },
            pre_rope: true,
            sink_tokens: 1,
            past_only: false,
        }
    }

    // ANCHOR: presets
    /// A named preset (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self> {
        let cfg = match name {
            "none" => Self::new(Scheme::None),
            "fp32" => Self::new(Scheme::Full(FullPrecision::F32)),
            "fp16" => Self::new(Scheme::Full(FullPrecision::F16)),
            "bf16" => Self::new(Scheme::Full(FullPrecision::Bf16)),
            // HF's QuantizedCache attends to the current step at full precision.
            "per-token-4" => Self { past_only: true, ..Self::per_token(4, PER_TOKEN_GROUP, PER_TOKEN_RESIDUAL) },
            "per-token-2" => Self { past_only: true, ..Self::per_token(2, PER_TOKEN_GROUP, PER_TOKEN_RESIDUAL) },
            // KIVI's reference code attends to the prompt at full precision during prefill.
            "kivi-4" => Self { past_only: true, ..Self::kivi(4, 4, KIVI_GROUP, KIVI_RESIDUAL) },
            "kivi-2" => Self { past_only: true, ..Self::kivi(2, 2, KIVI_GROUP, KIVI_RESIDUAL) },
            "kvquant-4" => Self::kvquant(4, KVQUANT_OUTLIERS),
            "kvquant-3" => Self::kvquant(3, KVQUANT_OUTLIERS),
            "kvquant-2" => Self::kvquant(2, KVQUANT_OUTLIERS),
            _ => {
                return Err(KvqError::UnknownPreset {
                    kind: "cache preset",
                    name: name.into(),
                    known: PRESETS.join(", "),
                })
            }
        };
        Ok(cfg)
    }
    // ANCHOR_END: presets

    /// A short name that says what the cache is, e.g. `kivi-2 (g32 r128)`.
    pub fn label(&self) -> String {
        let mut s = match &self.scheme {
            Scheme::None => "none".to_string(),
            Scheme::Full(p) => p.name().to_string(),
            Scheme::PerToken { bits, group_size, residual_length } => {
                format!("per-token-{bits} (g{group_size} r{residual_length})")
            }
            Scheme::Kivi { k_bits, v_bits, group_size, residual_length } => {
                let b = if k_bits == v_bits { format!("{k_bits}") } else { format!("k{k_bits}v{v_bits}") };
                format!("kivi-{b} (g{group_size} r{residual_length})")
            }
            Scheme::KvQuant { bits, outlier_fraction } => {
                format!("kvquant-{bits} ({}% outliers)", outlier_fraction * 100.0)
            }
        };
        if matches!(self.scheme, Scheme::KvQuant { .. }) {
            if self.sink_tokens != 1 {
                s += &format!(" sink{}", self.sink_tokens);
            }
            if !self.pre_rope {
                s += " post-rope";
            }
        } else {
            if self.sink_tokens > 0 {
                s += &format!(" sink{}", self.sink_tokens);
            }
            if self.pre_rope {
                s += " pre-rope";
            }
        }
        if self.past_only {
            s += " past-only";
        }
        s
    }

    /// Bits of the stored key and value codes (16 or 32 for full precision).
    pub fn bits(&self) -> (u32, u32) {
        match self.scheme {
            Scheme::None => (0, 0),
            Scheme::Full(p) => (8 * p.bytes() as u32, 8 * p.bytes() as u32),
            Scheme::PerToken { bits, .. } | Scheme::KvQuant { bits, .. } => (bits as u32, bits as u32),
            Scheme::Kivi { k_bits, v_bits, .. } => (k_bits as u32, v_bits as u32),
        }
    }

    /// Checks the configuration against a head dimension.
    pub fn validate(&self, head_dim: usize) -> Result<()> {
        let too_big = |what: &str, x: usize| {
            if x > MAX_LENGTH_PARAM {
                Err(KvqError::InvalidParam(format!("{what} of {x} is beyond the limit of {MAX_LENGTH_PARAM}")))
            } else {
                Ok(())
            }
        };
        too_big("sink", self.sink_tokens)?;
        match self.scheme {
            Scheme::PerToken { group_size, residual_length, .. } | Scheme::Kivi { group_size, residual_length, .. } => {
                too_big("group size", group_size)?;
                too_big("residual length", residual_length)?;
            }
            Scheme::None | Scheme::Full(_) if self.sink_tokens > 0 => {
                return Err(KvqError::InvalidParam(format!("an attention sink applies to quantized caches, not {}", self.label())));
            }
            _ => {}
        }
        match self.scheme {
            Scheme::None | Scheme::Full(_) => {}
            Scheme::PerToken { bits, group_size, .. } => {
                check_bits(bits as u32)?;
                check_group(group_size, head_dim, "the head dimension")?;
            }
            Scheme::Kivi { k_bits, v_bits, group_size, .. } => {
                check_bits(k_bits as u32)?;
                check_bits(v_bits as u32)?;
                check_group(group_size.min(head_dim), head_dim, "the head dimension")?;
                if group_size == 0 {
                    return Err(KvqError::ZeroGroupSize);
                }
            }
            Scheme::KvQuant { bits, outlier_fraction } => {
                check_bits(bits as u32)?;
                if !(0.0..=1.0).contains(&outlier_fraction) {
                    return Err(KvqError::InvalidParam(format!(
                        "outlier fraction must be between 0 and 1, got {outlier_fraction}"
                    )));
                }
            }
        }
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > u16::MAX as usize {
            return Err(KvqError::InvalidParam(format!(
                "head dimension must be even and between 2 and 65534, got {head_dim}"
            )));
        }
        if matches!(self.scheme, Scheme::Full(FullPrecision::Fp8)) {
            return Err(KvqError::Unsupported(
                "fp8 is counted by the size math, but kvq has no fp8 cache".into(),
            ));
        }
        Ok(())
    }
}

fn check_group(group: usize, len: usize, what: &'static str) -> Result<()> {
    if group == 0 {
        Err(KvqError::ZeroGroupSize)
    } else if len % group != 0 {
        Err(KvqError::GroupSizeNotDividing { group, len, what })
    } else {
        Ok(())
    }
}

/// Explicit parameters that override a preset's (the CLI's flags).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Overrides {
    pub bits: Option<u8>,
    pub k_bits: Option<u8>,
    pub v_bits: Option<u8>,
    pub group_size: Option<usize>,
    pub residual_length: Option<usize>,
    pub outlier_fraction: Option<f32>,
    pub sink_tokens: Option<usize>,
    pub past_only: Option<bool>,
    pub pre_rope: Option<bool>,
}

impl Overrides {
    /// Applies the overrides; one that the scheme has no use for is an error, and so
    /// is a value out of range (what depends on the head dimension is checked when
    /// the cache is built).
    pub fn apply(&self, mut cfg: CacheConfig) -> Result<CacheConfig> {
        for b in [self.bits, self.k_bits, self.v_bits].into_iter().flatten() {
            check_bits(b as u32)?;
        }
        if self.group_size == Some(0) {
            return Err(KvqError::ZeroGroupSize);
        }
        if let Some(f) = self.outlier_fraction {
            if !(0.0..=1.0).contains(&f) {
                return Err(KvqError::InvalidParam(format!("outlier fraction must be between 0 and 1, got {f}")));
            }
        }
        let label = cfg.label();
        let bad = |flag: &str| Err(KvqError::InvalidParam(format!("{flag} does not apply to the {label} cache")));
        match &mut cfg.scheme {
            Scheme::None | Scheme::Full(_) => {
                if self.bits.is_some() || self.k_bits.is_some() || self.v_bits.is_some() {
                    return bad("bits");
                }
                if self.group_size.is_some() {
                    return bad("group size");
                }
                if self.residual_length.is_some() {
                    return bad("residual length");
                }
                if self.outlier_fraction.is_some() {
                    return bad("outlier fraction");
                }
            }
            Scheme::PerToken { bits, group_size, residual_length } => {
                if self.k_bits.is_some() || self.v_bits.is_some() {
                    return bad("separate key/value bits");
                }
                if self.outlier_fraction.is_some() {
                    return bad("outlier fraction");
                }
                set(bits, self.bits);
                set(group_size, self.group_size);
                set(residual_length, self.residual_length);
            }
            Scheme::Kivi { k_bits, v_bits, group_size, residual_length } => {
                if self.outlier_fraction.is_some() {
                    return bad("outlier fraction");
                }
                set(k_bits, self.bits);
                set(v_bits, self.bits);
                set(k_bits, self.k_bits);
                set(v_bits, self.v_bits);
                set(group_size, self.group_size);
                set(residual_length, self.residual_length);
            }
            Scheme::KvQuant { bits, outlier_fraction } => {
                if self.k_bits.is_some() || self.v_bits.is_some() {
                    return bad("separate key/value bits");
                }
                if self.group_size.is_some() {
                    return bad("group size");
                }
                if self.residual_length.is_some() {
                    return bad("residual length");
                }
                set(bits, self.bits);
                set(outlier_fraction, self.outlier_fraction);
            }
        }
        set(&mut cfg.sink_tokens, self.sink_tokens);
        set(&mut cfg.past_only, self.past_only);
        set(&mut cfg.pre_rope, self.pre_rope);
        Ok(cfg)
    }
}

impl Overrides {
    /// These overrides, with each one `other` sets taking their place.
    pub fn then(&self, other: &Overrides) -> Overrides {
        Overrides {
            bits: other.bits.or(self.bits),
            k_bits: other.k_bits.or(self.k_bits),
            v_bits: other.v_bits.or(self.v_bits),
            group_size: other.group_size.or(self.group_size),
            residual_length: other.residual_length.or(self.residual_length),
            outlier_fraction: other.outlier_fraction.or(self.outlier_fraction),
            sink_tokens: other.sink_tokens.or(self.sink_tokens),
            past_only: other.past_only.or(self.past_only),
            pre_rope: other.pre_rope.or(self.pre_rope),
        }
    }
}

/// A cache named on a command line: a preset and its own overrides,
/// `kivi-2:group=128:residual=64`, `kvquant-2:outliers=0:sink=0`, `per-token-4:past-only=false`.
/// Keys: `bits`, `k-bits`, `v-bits`, `group`, `residual`, `outliers` (a fraction),
/// `sink`, `past-only`, `pre-rope`.
pub fn parse_cache_spec(spec: &str) -> Result<(String, Overrides)> {
    let mut parts = spec.trim().split(':');
    let preset = parts.next().unwrap_or("").trim().to_string();
    CacheConfig::preset(&preset)?;
    let mut o = Overrides::default();
    for kv in parts {
        let bad = |why: String| KvqError::InvalidParam(format!("cache {spec:?}: {why}"));
        let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("{kv:?} is not key=value")))?;
        let (k, v) = (k.trim(), v.trim());
        let int = || v.parse::<usize>().map_err(|_| bad(format!("{k} must be a whole number, got {v:?}")));
        let bits = || v.parse::<u8>().map_err(|_| bad(format!("{k} must be a whole number, got {v:?}")));
        let flag = || v.parse::<bool>().map_err(|_| bad(format!("{k} must be true or false, got {v:?}")));
        match k {
            "bits" => o.bits = Some(bits()?),
            "k-bits" => o.k_bits = Some(bits()?),
            "v-bits" => o.v_bits = Some(bits()?),
            "group" => o.group_size = Some(int()?),
            "residual" => o.residual_length = Some(int()?),
            "sink" => o.sink_tokens = Some(int()?),
            "outliers" => o.outlier_fraction = Some(v.parse::<f32>().ok().filter(|f| f.is_finite()).ok_or_else(|| bad(format!("outliers must be a fraction, got {v:?}")))?),
            "past-only" => o.past_only = Some(flag()?),
            "pre-rope" => o.pre_rope = Some(flag()?),
            other => return Err(bad(format!("unknown key {other:?} (known: bits, k-bits, v-bits, group, residual, outliers, sink, past-only, pre-rope)"))),
        }
    }
    // Checks the values against the scheme now, with a message that names the spec.
    o.apply(CacheConfig::preset(&preset)?)?;
    Ok((preset, o))
}

impl CacheConfig {
    /// The configuration a command-line spec names (see [`parse_cache_spec`]), with
    /// `global` overrides under the spec's own.
    pub fn from_spec(spec: &str, global: &Overrides) -> Result<CacheConfig> {
        let (preset, own) = parse_cache_spec(spec)?;
        global.then(&own).apply(CacheConfig::preset(&preset)?)
    }
}

fn set<T: Copy>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}
