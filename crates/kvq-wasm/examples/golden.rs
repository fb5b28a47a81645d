//! Golden values for the browser demo's test (`web/test/browser.mjs`): for a list of
//! control settings, the numbers the page must show, computed natively through the very
//! functions the page calls through wasm (`quantize_impl`, `compare_scores_impl`, which
//! runs `kvq::analysis::scores`), plus bad settings and the error each must show.
//!
//! `cargo run -p kvq-wasm --example golden --release -- [OUT]` (default `web/test/golden.json`).

use kvq::sample::KvSample;
use kvq_wasm::{compare_scores_impl, quantize_impl, Controls};
use serde_json::{json, Value};

/// The synthetic source's head dimension (the page's too).
const SYNTHETIC_DIM: usize = 64;

/// One setting of the page's controls.
struct Case {
    name: &'static str,
    /// `real` (the SmolLM2 sample) or `synthetic`.
    source: &'static str,
    seed: u64,
    tokens: usize,
    layer: usize,
    head: usize,
    keys: bool,
    method: &'static str,
    bits: u32,
    group: usize,
    axis: &'static str,
    residual: usize,
    outliers: f32,
    query: usize,
    /// For a bad setting: a part of the message the page must show.
    error: Option<&'static str>,
}

const BASE: Case = Case {
    name: "",
    source: "real",
    seed: 1,
    tokens: 1024,
    layer: 15,
    head: 0,
    keys: true,
    method: "kivi",
    bits: 2,
    group: 32,
    axis: "per-channel",
    residual: 128,
    outliers: 0.01,
    query: 511,
    error: None,
};

fn cases() -> Vec<Case> {
    vec![
        Case { name: "uniform 2-bit keys per channel", method: "uniform", group: 64, residual: 0, ..BASE },
        Case { name: "uniform 2-bit keys per token", method: "uniform", axis: "per-token", group: 64, residual: 0, ..BASE },
        Case { name: "per-token 4-bit values, window 128", method: "per-token", keys: false, layer: 0, head: 1, bits: 4, ..BASE },
        Case { name: "kivi 2-bit keys, layer 29", method: "kivi", layer: 29, head: 2, query: 300, ..BASE },
        Case { name: "kivi 3-bit values, no window", method: "kivi", keys: false, head: 1, bits: 3, group: 16, residual: 0, ..BASE },
        Case { name: "kvquant 3-bit keys, 1% outliers", method: "kvquant", layer: 0, bits: 3, query: 100, ..BASE },
        Case { name: "kvquant 2-bit values, 5% outliers", method: "kvquant", keys: false, head: 2, outliers: 0.05, ..BASE },
        Case { name: "synthetic kivi 2-bit keys", source: "synthetic", seed: 7, layer: 0, residual: 64, query: 1023, ..BASE },
        Case {
            name: "synthetic uniform 4-bit keys per token",
            source: "synthetic",
            seed: 7,
            layer: 0,
            method: "uniform",
            axis: "per-token",
            bits: 4,
            group: 64,
            residual: 0,
            query: 100,
            ..BASE
        },
        Case { name: "synthetic per-token 2-bit values", source: "synthetic", seed: 7, layer: 0, keys: false, method: "per-token", ..BASE },
        Case { name: "bad: 0 bits", bits: 0, error: Some("bits must be between 1 and 8"), ..BASE },
        Case { name: "bad: group 48 does not divide 64", method: "uniform", axis: "per-token", group: 48, error: Some("does not divide"), ..BASE },
        Case { name: "bad: outlier fraction 1.5", method: "kvquant", outliers: 1.5, error: Some("outlier fraction"), ..BASE },
    ]
}

fn run(case: &Case, real: &KvSample) -> Value {
    let synthetic;
    let sample = if case.source == "real" {
        real
    } else {
        synthetic = KvSample::synthetic(case.tokens, SYNTHETIC_DIM, case.seed).expect("a synthetic sample");
        &synthetic
    };
    let c = Controls {
        layer: case.layer,
        head: case.head,
        keys: case.keys,
        method: case.method,
        bits: case.bits,
        group: case.group,
        axis: case.axis,
        residual: case.residual,
        outlier_fraction: case.outliers,
    };
    let controls = json!({
        "source": case.source, "seed": case.seed, "tokens": case.tokens,
        "layer": case.layer, "head": case.head, "kind": if case.keys { "keys" } else { "values" },
        "method": case.method, "bits": case.bits, "group": case.group, "axis": case.axis,
        "residual": case.residual, "outliers": case.outliers.to_string().parse::<f64>().unwrap(), "query": case.query,
    });
    let expect = match (quantize_impl(sample, &c), case.error) {
        (Err(e), Some(part)) => {
            let message = e.to_string();
            assert!(message.contains(part), "{}: the message {message:?} does not contain {part:?}", case.name);
            json!({ "error_contains": part, "message": message })
        }
        (Ok(view), None) => {
            let score_error = if case.keys {
                let keys = kvq_wasm::array_impl(sample, case.layer, case.head, "keys").expect("keys");
                let s = compare_scores_impl(keys, &view.reconstruction, sample.header.head_dim, case.query).expect("scores");
                json!(s.max_abs_error as f64)
            } else {
                Value::Null
            };
            json!({
                "relative_error": view.relative_error,
                "bytes": view.bytes,
                "effective_bits": view.effective_bits,
                "score_max_abs_error": score_error,
            })
        }
        (Err(e), None) => panic!("{}: unexpected error: {e}", case.name),
        (Ok(_), Some(part)) => panic!("{}: expected an error containing {part:?}", case.name),
    };
    json!({ "name": case.name, "controls": controls, "expect": expect })
}

/// FNV-1a over the f32 bit patterns (32-bit words): a fingerprint of an array, which
/// the test computes in the browser too.
fn fingerprint(xs: &[f32]) -> String {
    let h = xs.iter().fold(0x811c_9dc5u32, |h, x| (h ^ x.to_bits()).wrapping_mul(0x0100_0193));
    format!("{h:08x}")
}

/// Fingerprints of each synthetic sample the cases use: the test checks whether the
/// browser builds the same arrays, bit for bit.
fn synthetic_fingerprints() -> Vec<Value> {
    let mut seen = Vec::new();
    for c in cases().iter().filter(|c| c.source == "synthetic") {
        if !seen.contains(&(c.seed, c.tokens)) {
            seen.push((c.seed, c.tokens));
        }
    }
    seen.into_iter()
        .map(|(seed, tokens)| {
            let s = KvSample::synthetic(tokens, SYNTHETIC_DIM, seed).expect("a synthetic sample");
            let arrays: serde_json::Map<String, Value> =
                ["keys_pre_rope", "keys", "values"].iter().map(|k| (k.to_string(), json!(fingerprint(s.get(0, 0, k).unwrap())))).collect();
            json!({ "seed": seed, "tokens": tokens, "fingerprints": arrays })
        })
        .collect()
}

fn main() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = std::env::args().nth(1).unwrap_or_else(|| format!("{root}/web/test/golden.json"));
    let path = format!("{root}/data/smollm2-kv-sample.kvs");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let real = KvSample::from_bytes(&bytes).expect("the SmolLM2 sample parses");
    let cases: Vec<Value> = cases().iter().map(|c| run(c, &real)).collect();
    let doc = json!({
        "generated_by": "cargo run -p kvq-wasm --example golden --release",
        "real_sample": { "file": "data/smollm2-kv-sample.kvs", "model": real.header.model, "tokens": real.header.tokens, "head_dim": real.header.head_dim },
        "synthetic_head_dim": SYNTHETIC_DIM,
        "synthetic_samples": synthetic_fingerprints(),
        "cases": cases,
    });
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap_or_else(|e| panic!("{out}: {e}"));
    println!("{} cases written to {out}", doc["cases"].as_array().unwrap().len());
}
