//! `kvq bench layers`: where a cache loses its accuracy, layer by layer. The model runs
//! once with an f32 cache; its keys and values are then fed, chunk by chunk, to each cache
//! under test, and what each cache gives back to attention (keys after RoPE, values) is
//! compared with the f32 ones. Every cache sees the very same K/V, so the errors are the
//! cache's alone, not errors carried over from earlier layers.

use crate::run_cmd::{build_cache, load_model};
use anyhow::{bail, Context, Result};
use kvq::cache::{CacheConfig, FullPrecision, KvCache, Overrides, Scheme};
use kvq::gguf::WeightFormat;
use std::path::Path;

/// ‖x̂ − x‖ / ‖x‖ over a whole layer.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += ((g - w) as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    if den == 0.0 {
        0.0
    } else {
        (num / den).sqrt()
    }
}

/// The systematic part of a layer's error: the error averaged over tokens, per (head,
/// channel), relative to the typical size of a vector. Noise that averages out over tokens
/// leaves this near zero; a shifted range or centre does not, and a shift common to all keys
/// moves every attention score the same way.
fn rel_bias(got: &[f32], want: &[f32], heads: usize, n: usize, d: usize) -> f64 {
    let (mut bias2, mut norm2) = (0f64, 0f64);
    for h in 0..heads {
        for c in 0..d {
            let mut e = 0f64;
            for t in 0..n {
                let i = (h * n + t) * d + c;
                e += (got[i] - want[i]) as f64;
                norm2 += (want[i] as f64).powi(2);
            }
            bias2 += (e / n as f64).powi(2);
        }
    }
    // Per vector: ‖mean error‖ over ‖x‖ (RMS over the vectors).
    let vectors = (heads * n) as f64;
    if norm2 == 0.0 {
        0.0
    } else {
        (bias2 / heads as f64).sqrt() / (norm2 / vectors).sqrt()
    }
}

pub struct LayerErrorArgs<'a> {
    pub model: Option<&'a Path>,
    pub weights: WeightFormat,
    pub text: &'a Path,
    pub tokens: usize,
    pub chunk: usize,
    pub caches: &'a [String],
    pub calibration: (&'a str, usize),
}

pub fn run(a: LayerErrorArgs) -> Result<String> {
    if a.tokens < 2 || a.chunk == 0 {
        bail!("--tokens must be at least 2 and --chunk at least 1");
    }
    if a.caches.is_empty() {
        bail!("--caches names no cache");
    }
    for name in a.caches {
        CacheConfig::from_spec(name, &Overrides::default())?;
    }
    let body = std::fs::read_to_string(a.text).with_context(|| format!("reading {}", a.text.display()))?;
    let (model, tok, _) = load_model(a.model, a.weights)?;
    let mut ids = tok.encode(&body)?;
    ids.truncate(a.tokens);
    if ids.len() < 2 {
        bail!("{} has fewer than 2 tokens", a.text.display());
    }
    let (n, layers) = (ids.len(), model.config.layers);

    // The reference: f32 K/V as the model makes them, keys stored before RoPE.
    let rec = CacheConfig { pre_rope: true, ..CacheConfig::new(Scheme::Full(FullPrecision::F32)) };
    let mut reference = model.new_cache(&rec, 1, None)?;
    model.forward(&ids, 1, &mut reference, false)?;
    let stored: Vec<(Vec<f32>, Vec<f32>)> = (0..layers).map(|l| reference.materialize_stored(l)).collect::<kvq::Result<_>>()?;
    let seen: Vec<(Vec<f32>, Vec<f32>)> = (0..layers).map(|l| reference.materialize(l)).collect::<kvq::Result<_>>()?;
    let (heads, d) = (model.config.kv_heads, model.config.head_dim);

    let mut cols = Vec::new();
    for name in a.caches {
        let (cfg, mut cache) = build_cache(&model, &tok, name, &Overrides::default(), 1, a.calibration)?;
        // Feed it chunk by chunk, every layer in turn, as a forward pass would.
        let mut kc = Vec::new();
        let mut vc = Vec::new();
        let mut t0 = 0;
        while t0 < n {
            let t = a.chunk.min(n - t0);
            for (l, (k_pre, v)) in stored.iter().enumerate() {
                let k_src = if cache.wants_pre_rope_keys() { k_pre } else { &seen[l].0 };
                kc.clear();
                vc.clear();
                for h in 0..heads {
                    kc.extend_from_slice(&k_src[(h * n + t0) * d..(h * n + t0 + t) * d]);
                    vc.extend_from_slice(&v[(h * n + t0) * d..(h * n + t0 + t) * d]);
                }
                cache.append(l, &kc, &vc, t)?;
            }
            t0 += t;
        }
        let errs: Vec<(f64, f64, f64)> = (0..layers)
            .map(|l| {
                let (k, v) = cache.materialize(l)?;
                Ok((rel_err(&k, &seen[l].0), rel_err(&v, &seen[l].1), rel_bias(&k, &seen[l].0, heads, n, d)))
            })
            .collect::<kvq::Result<_>>()?;
        cols.push((cfg.label(), errs));
    }

    let mut md = format!(
        "Relative error ‖x̂ − x‖/‖x‖ of the keys (after RoPE, as attention reads them) and values each cache gives back, \
         per layer, on the first {n} tokens of {} fed in chunks of {} (every cache gets the f32 K/V of the same forward pass). \
         K bias: the key error averaged over tokens, per channel, relative to a key's size — the part of the error that \
         does not average out.\n\n| layer |",
        a.text.display(),
        a.chunk
    );
    for (label, _) in &cols {
        md += &format!(" {label} K | K bias | V |");
    }
    md += "\n|--:|";
    md += &"--:|--:|--:|".repeat(cols.len());
    md += "\n";
    for l in 0..layers {
        md += &format!("| {l} |");
        for (_, e) in &cols {
            md += &format!(" {:.4} | {:.4} | {:.4} |", e[l].0, e[l].2, e[l].1);
        }
        md += "\n";
    }
    md += "| mean |";
    for (_, e) in &cols {
        let (k, b, v) = e.iter().fold((0.0, 0.0, 0.0), |(a, c, x), (k, v, b)| (a + k, c + b, x + v));
        md += &format!(" {:.4} | {:.4} | {:.4} |", k / layers as f64, b / layers as f64, v / layers as f64);
    }
    md += "\n\nThe five layers with the largest key error, per cache:\n\n";
    for (label, e) in &cols {
        let mut idx: Vec<usize> = (0..layers).collect();
        idx.sort_by(|&x, &y| e[y].0.total_cmp(&e[x].0));
        let worst: Vec<String> = idx.iter().take(5).map(|&l| format!("{l} ({:.3})", e[l].0)).collect();
        md += &format!("- {label}: {}\n", worst.join(", "));
    }
    Ok(md)
}
