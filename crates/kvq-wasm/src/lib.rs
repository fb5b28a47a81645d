//! The browser demo's interface to kvq: load a K/V sample (real, or synthetic),
//! quantize one head's keys or values with any method, read back the error.
//! Every number comes from `kvq::analysis` — the same code the library and the
//! lessons run. The `*_impl` functions are the plain-Rust core (tested natively);
//! the `#[wasm_bindgen]` ones only turn their errors into JavaScript errors.

use kvq::analysis::{self, HeadData, Method, QuantView, ViewConfig};
use kvq::quant::Axis;
use kvq::rope::RopeStyle;
use kvq::sample::KvSample;
use kvq::{KvqError, Result};
use wasm_bindgen::prelude::*;

fn js(e: KvqError) -> JsError {
    JsError::new(&e.to_string())
}

/// A K/V sample: layers × heads of keys (after and before RoPE) and values.
#[wasm_bindgen]
pub struct Sample(KvSample);

#[wasm_bindgen]
impl Sample {
    /// Parses a `.kvs` file (see `kvq capture`).
    #[wasm_bindgen(constructor)]
    pub fn new(bytes: &[u8]) -> std::result::Result<Sample, JsError> {
        KvSample::from_bytes(bytes).map(Sample).map_err(js)
    }

    /// Gaussian keys and values with four outlier key channels.
    pub fn synthetic(tokens: usize, head_dim: usize, seed: u64) -> std::result::Result<Sample, JsError> {
        KvSample::synthetic(tokens, head_dim, seed).map(Sample).map_err(js)
    }

    pub fn tokens(&self) -> usize {
        self.0.header.tokens
    }

    pub fn head_dim(&self) -> usize {
        self.0.header.head_dim
    }

    /// The layers in the sample.
    pub fn layers(&self) -> Vec<u32> {
        let mut l: Vec<u32> = self.0.header.arrays.iter().map(|a| a.layer as u32).collect();
        l.dedup();
        l
    }

    /// How many KV heads each layer has.
    pub fn heads(&self) -> usize {
        self.0.header.arrays.iter().map(|a| a.head + 1).max().unwrap_or(0)
    }

    /// The whole header (model, source, command, arrays) as JSON.
    pub fn header_json(&self) -> String {
        header_json_impl(&self.0)
    }

    /// One array, `tokens × head_dim` (`keys`, `keys_pre_rope` or `values`).
    pub fn array(&self, layer: usize, head: usize, kind: &str) -> std::result::Result<Vec<f32>, JsError> {
        array_impl(&self.0, layer, head, kind).map(<[f32]>::to_vec).map_err(js)
    }
}

/// The result of quantizing one array.
#[wasm_bindgen]
pub struct View(QuantView);

#[wasm_bindgen]
impl View {
    pub fn reconstruction(&self) -> Vec<f32> {
        self.0.reconstruction.clone()
    }
    pub fn bytes(&self) -> usize {
        self.0.bytes
    }
    pub fn effective_bits(&self) -> f64 {
        self.0.effective_bits
    }
    pub fn relative_error(&self) -> f64 {
        self.0.relative_error
    }
    pub fn channel_rms_error(&self) -> Vec<f32> {
        self.0.channel_rms_error.clone()
    }
}

/// The controls of the demo, as they come from the page.
#[derive(Clone, Debug)]
pub struct Controls<'a> {
    pub layer: usize,
    pub head: usize,
    pub keys: bool,
    /// `uniform`, `per-token`, `kivi` or `kvquant`.
    pub method: &'a str,
    pub bits: u32,
    pub group: usize,
    /// `per-token` or `per-channel` (the uniform method only).
    pub axis: &'a str,
    pub residual: usize,
    pub outlier_fraction: f32,
}

/// Quantizes one head's keys or values of the sample.
#[wasm_bindgen]
#[allow(clippy::too_many_arguments)]
pub fn quantize(
    sample: &Sample,
    layer: usize,
    head: usize,
    keys: bool,
    method: &str,
    bits: u32,
    group: usize,
    axis: &str,
    residual: usize,
    outlier_fraction: f32,
) -> std::result::Result<View, JsError> {
    let c = Controls { layer, head, keys, method, bits, group, axis, residual, outlier_fraction };
    quantize_impl(&sample.0, &c).map(View).map_err(js)
}

/// Attention scores `q·k / √d` of one query against `tokens × dim` keys.
#[wasm_bindgen]
pub fn scores(q: &[f32], keys: &[f32], dim: usize) -> Vec<f32> {
    analysis::scores(q, keys, dim)
}

/// Attention scores of one query token against the exact and the quantized keys.
#[wasm_bindgen]
pub struct ScoreComparison(Scores);

/// What [`compare_scores_impl`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    /// `q·k_t / √d` against the exact keys, one per token.
    pub exact: Vec<f32>,
    /// The same query against the quantized keys.
    pub quantized: Vec<f32>,
    /// `max_t |exact_t − quantized_t|`.
    pub max_abs_error: f32,
}

#[wasm_bindgen]
impl ScoreComparison {
    pub fn exact(&self) -> Vec<f32> {
        self.0.exact.clone()
    }
    pub fn quantized(&self) -> Vec<f32> {
        self.0.quantized.clone()
    }
    pub fn max_abs_error(&self) -> f32 {
        self.0.max_abs_error
    }
}

/// Scores of token `query` against every key, exact and quantized (`tokens × dim` each).
/// The samples hold no queries: the token's exact key stands in for its query.
#[wasm_bindgen]
pub fn compare_scores(exact_keys: &[f32], quantized_keys: &[f32], dim: usize, query: usize) -> std::result::Result<ScoreComparison, JsError> {
    compare_scores_impl(exact_keys, quantized_keys, dim, query).map(ScoreComparison).map_err(js)
}

pub fn compare_scores_impl(exact_keys: &[f32], quantized_keys: &[f32], dim: usize, query: usize) -> Result<Scores> {
    if dim == 0 || exact_keys.len() % dim != 0 || quantized_keys.len() != exact_keys.len() {
        return Err(KvqError::Shape(format!("{} exact and {} quantized key values for a head dim of {dim}", exact_keys.len(), quantized_keys.len())));
    }
    let tokens = exact_keys.len() / dim;
    if query >= tokens {
        return Err(KvqError::InvalidParam(format!("query token {query} is out of range: the sample has {tokens} tokens (0 to {})", tokens.saturating_sub(1))));
    }
    let q = &exact_keys[query * dim..(query + 1) * dim];
    let exact = analysis::scores(q, exact_keys, dim);
    let quantized = analysis::scores(q, quantized_keys, dim);
    let max_abs_error = exact.iter().zip(&quantized).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    Ok(Scores { exact, quantized, max_abs_error })
}

pub fn header_json_impl(s: &KvSample) -> String {
    serde_json::to_string(&s.header).expect("a header of strings and numbers always serializes")
}

pub fn array_impl<'a>(s: &'a KvSample, layer: usize, head: usize, kind: &str) -> Result<&'a [f32]> {
    s.get(layer, head, kind).ok_or_else(|| KvqError::InvalidParam(format!("the sample has no {kind} for layer {layer}, head {head}")))
}

pub fn quantize_impl(s: &KvSample, c: &Controls) -> Result<QuantView> {
    let method = match c.method {
        "uniform" => Method::Uniform { axis: c.axis.parse::<Axis>()? },
        "per-token" => Method::PerToken,
        "kivi" => Method::Kivi,
        "kvquant" => Method::KvQuant,
        other => return Err(KvqError::UnknownPreset { kind: "method", name: other.into(), known: "uniform, per-token, kivi, kvquant".into() }),
    };
    let style = if s.header.rope_style == "interleaved" { RopeStyle::Interleaved } else { RopeStyle::Half };
    let data = array_impl(s, c.layer, c.head, if c.keys { "keys" } else { "values" })?;
    let pre = if c.keys { Some((array_impl(s, c.layer, c.head, "keys_pre_rope")?, s.header.rope_theta, style)) } else { None };
    let head = HeadData { keys: c.keys, data, pre_rope: pre, tokens: s.header.tokens, dim: s.header.head_dim };
    analysis::quantize_head(&head, &ViewConfig { method, bits: c.bits, group: c.group, residual: c.residual, outlier_fraction: c.outlier_fraction })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controls(method: &str) -> Controls<'_> {
        Controls { layer: 0, head: 0, keys: true, method, bits: 2, group: 32, axis: "per-channel", residual: 0, outlier_fraction: 0.01 }
    }

    #[test]
    fn every_method_on_a_synthetic_sample() {
        let s = KvSample::synthetic(256, 64, 1).unwrap();
        for m in ["uniform", "per-token", "kivi", "kvquant"] {
            let v = quantize_impl(&s, &controls(m)).unwrap();
            assert!(v.relative_error > 0.0 && v.relative_error < 1.0, "{m}");
            assert_eq!(v.reconstruction.len(), 256 * 64);
        }
        // The synthetic keys have outlier channels: per-channel beats per-token.
        let pc = quantize_impl(&s, &controls("uniform")).unwrap();
        let pt = quantize_impl(&s, &Controls { axis: "per-token", ..controls("uniform") }).unwrap();
        assert!(pc.relative_error < pt.relative_error);
    }

    #[test]
    fn scores_of_a_query_token_against_exact_and_quantized_keys() {
        let s = KvSample::synthetic(128, 64, 4).unwrap();
        let keys = s.get(0, 0, "keys").unwrap();
        let v = quantize_impl(&s, &Controls { method: "kivi", ..controls("kivi") }).unwrap();
        let c = compare_scores_impl(keys, &v.reconstruction, 64, 127).unwrap();
        assert_eq!(c.exact, analysis::scores(&keys[127 * 64..], keys, 64));
        assert_eq!(c.quantized, analysis::scores(&keys[127 * 64..], &v.reconstruction, 64));
        let worst = c.exact.iter().zip(&c.quantized).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(c.max_abs_error > 0.0 && c.max_abs_error == worst);
        // Exact keys against themselves: no error.
        assert_eq!(compare_scores_impl(keys, keys, 64, 0).unwrap().max_abs_error, 0.0);
        let msg = compare_scores_impl(keys, keys, 64, 128).unwrap_err().to_string();
        assert!(msg.contains("query token 128 is out of range"), "{msg}");
        assert!(compare_scores_impl(keys, &keys[64..], 64, 0).is_err());
        assert!(compare_scores_impl(keys, keys, 0, 0).is_err());
    }

    #[test]
    fn header_is_json_even_with_non_ascii_text() {
        let mut s = KvSample::synthetic(4, 8, 3).unwrap();
        s.header.source = "café \"quoted\" 日本".into();
        let v: serde_json::Value = serde_json::from_str(&header_json_impl(&s)).unwrap();
        assert_eq!(v["source"], "café \"quoted\" 日本");
        assert_eq!(v["tokens"], 4);
    }

    #[test]
    fn bad_controls_say_what_is_wrong() {
        let s = KvSample::synthetic(64, 64, 2).unwrap();
        let msg = |c: Controls| quantize_impl(&s, &c).unwrap_err().to_string();
        assert!(msg(Controls { bits: 0, ..controls("kivi") }).contains("bits must be between 1 and 8"));
        assert!(msg(Controls { group: 48, ..controls("uniform") }).contains("does not divide"));
        assert!(msg(Controls { outlier_fraction: 1.5, ..controls("kvquant") }).contains("outlier fraction"));
        assert!(msg(controls("magic")).contains("unknown method"));
        assert!(msg(Controls { axis: "diagonal", ..controls("uniform") }).contains("unknown axis"));
        assert!(msg(Controls { layer: 7, ..controls("kivi") }).contains("no keys for layer 7"));
    }
}
