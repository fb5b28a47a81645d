//! `kvq tour`: the course's story on the real model, in numbers and figures.

use crate::plot::{loglog, Series};
use crate::run_cmd::{build_cache, load_model, CALIBRATION_TEXT, CALIBRATION_TOKENS};
use crate::table::Table;
use anyhow::Result;
use kvq::cache::{Cache, CacheConfig, KvCache, Overrides};
use kvq::generate::{generate, GenerateOptions};
use kvq::gguf::WeightFormat;
use kvq::model::Llama;
use kvq::size::{cache_bytes, human, with_commas, ModelGeometry};
use std::path::{Path, PathBuf};
use std::time::Instant;

const TOUR_TEXT: &str = include_str!("../../../data/tour.txt");

pub fn run(out: &Path, model_path: Option<&Path>, weights: WeightFormat, quick: bool) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let (model, tok, _) = load_model(model_path, weights)?;
    let mut figures: Vec<PathBuf> = Vec::new();
    let max_pos = if quick { 128 } else { 512 };

    println!("\n## 1. Generating without and with a KV cache\n");
    println!("Without a cache every step runs the whole text through the model again; with one, only the newest token.");
    let prompt: Vec<u32> = {
        let mut ids = tok.encode(TOUR_TEXT)?;
        ids.truncate(max_pos);
        ids
    };
    let mut cache = model.new_cache(&CacheConfig::preset("fp16")?, 1, None)?;
    let opts = GenerateOptions { max_new_tokens: max_pos - 8, ..GenerateOptions::default() };
    let g = generate(&model, &mut cache, &[prompt[..8].to_vec()], &opts, |_, _| {})?;
    let mut positions = vec![8usize];
    while positions.last().unwrap() * 2 <= max_pos {
        positions.push(positions.last().unwrap() * 2);
    }
    let mut with_cache = Vec::new();
    let mut without = Vec::new();
    let mut t = Table::new(&["position", "with cache (ms/token)", "without cache (ms/token)", "ratio"]);
    for &p in &positions {
        // Cached: the mean latency of the steps that ran near position p.
        let near: Vec<f64> = g.steps.iter().skip(1).filter(|s| s.seq_len + 4 >= p && s.seq_len <= p + 4).map(|s| s.latency_s).collect();
        let cached = if near.is_empty() { f64::NAN } else { near.iter().sum::<f64>() / near.len() as f64 };
        // Uncached: one step at position p is a forward over all p tokens.
        let mut none = Cache::none(model.cache_shape(1))?;
        let t0 = Instant::now();
        model.forward(&prompt[..p.min(prompt.len())], 1, &mut none, false)?;
        let uncached = t0.elapsed().as_secs_f64();
        with_cache.push((p as f64, cached * 1e3));
        without.push((p as f64, uncached * 1e3));
        t.row(vec![p.to_string(), format!("{:.2}", cached * 1e3), format!("{:.1}", uncached * 1e3), format!("{:.0}×", uncached / cached)]);
    }
    print!("{}", t.markdown());
    let n = positions.last().copied().unwrap_or(1) as f64;
    println!(
        "\nTotal work to write n tokens: with a cache Σ O(i) = O(n²); without, Σ O(i²) = O(n³). At n = {n}: the last token alone costs {:.0}× more without a cache.",
        without.last().unwrap().1 / with_cache.last().unwrap().1
    );
    let f = out.join("1-latency-with-without-cache.svg");
    loglog(&f, "Latency per generated token (SmolLM2-135M, CPU)", "position in the sequence (tokens)", "milliseconds per token", &[
        Series { name: "without cache (recompute the prefix)".into(), points: without },
        Series { name: "with fp16 KV cache".into(), points: with_cache },
    ])?;
    figures.push(f);

    println!("\n## 2. How big the cache gets\n");
    let presets = ["fp16", "per-token-4", "kivi-4", "kivi-2", "kvquant-2"];
    for geo in ["smollm2-135m", "llama-3-8b"] {
        let g = ModelGeometry::preset(geo)?;
        let mut series = Vec::new();
        let mut t = Table::new(&["cache", "8k tokens", "100k tokens", "vs fp16"]);
        for p in presets {
            let cfg = CacheConfig::preset(p)?;
            let pts: Vec<(f64, f64)> = [1024usize, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
                .iter()
                .map(|&s| Ok((s as f64, cache_bytes(&g, &cfg, s, 1)?.total() as f64)))
                .collect::<kvq::Result<_>>()?;
            let b8 = cache_bytes(&g, &cfg, 8192, 1)?.total() as u128;
            let b100 = cache_bytes(&g, &cfg, 100_000, 1)?.total() as u128;
            let f100 = cache_bytes(&g, &CacheConfig::preset("fp16")?, 100_000, 1)?.total() as f64;
            t.row(vec![cfg.label(), human(b8), format!("{} ({} B)", human(b100), with_commas(b100)), format!("{:.1}%", 100.0 * b100 as f64 / f100)]);
            series.push(Series { name: cfg.label(), points: pts });
        }
        println!("{} ({}: {} layers × {} KV heads × head dim {}):", geo, g.attention_kind(), g.layers, g.kv_heads, g.head_dim);
        print!("{}", t.markdown());
        println!();
        let f = out.join(format!("2-kv-bytes-{geo}.svg"));
        loglog(&f, &format!("KV cache bytes vs context, {geo}, batch 1"), "context (tokens)", "bytes", &series)?;
        figures.push(f);
    }

    println!("## 3. Quantization error on real keys and values\n");
    let (series, table) = error_vs_bits(&model, &tok, quick)?;
    print!("{table}");
    let f = out.join("3-error-vs-bits.svg");
    loglog(&f, "Relative error of K and V (SmolLM2-135M, all layers)", "bits per element (codes)", "‖K̂ − K‖ / ‖K‖", &series)?;
    figures.push(f);
    println!("Keys have a few channels with large values: per-token groups must stretch over them, per-channel groups (KIVI, KVQuant) need not.");

    println!("\n## 4. Quality vs memory: perplexity of a text through each cache\n");
    let mut ids = tok.encode(TOUR_TEXT)?;
    ids.truncate(if quick { 128 } else { 512 });
    let chunk = 8;
    let caches = ["fp16", "per-token-4", "per-token-2", "kivi-4", "kivi-2", "kvquant-4", "kvquant-3", "kvquant-2"];
    let (ref_cfg, mut reference) = build_cache(&model, &tok, "fp32", &Overrides::default(), 1, (CALIBRATION_TEXT, CALIBRATION_TOKENS))?;
    let mut cs: Vec<(String, Box<dyn KvCache>)> = Vec::new();
    for c in caches {
        // A short text fits in the default 128-token windows; shrink them so the test bites.
        let ov = if c.starts_with("kivi") || c.starts_with("per-token") { Overrides { residual_length: Some(32), ..Overrides::default() } } else { Overrides::default() };
        let (cfg, cache) = build_cache(&model, &tok, c, &ov, 1, (CALIBRATION_TEXT, CALIBRATION_TOKENS))?;
        cs.push((cfg.label(), cache));
    }
    let (r, rows) = kvq::eval::evaluate(&model, &ids, (&ref_cfg.label(), reference.as_mut()), &mut cs, chunk, |_, _| {})?;
    let mut t = Table::new(&["cache", "PPL", "ΔPPL %", "KL (nats)", "top-1 agree", "bytes/token"]);
    let mut pts = Vec::new();
    for row in std::iter::once(&r).chain(&rows) {
        t.row(vec![row.cache.clone(), format!("{:.3}", row.ppl), format!("{:+.2}", 100.0 * (row.ppl / r.ppl - 1.0)), format!("{:.4}", row.kl), format!("{:.1}%", 100.0 * row.top1_agreement), format!("{:.0}", row.bytes_per_token)]);
        pts.push(Series { name: row.cache.clone(), points: vec![(row.bytes_per_token, row.ppl)] });
    }
    println!("{} tokens of data/tour.txt, fed {chunk} at a time; the residual windows are 32 tokens here.\n", ids.len());
    print!("{}", t.markdown());
    let f = out.join("4-ppl-vs-bytes.svg");
    loglog(&f, "Perplexity vs KV bytes per token (SmolLM2-135M)", "cache bytes per token", "perplexity", &pts)?;
    figures.push(f);

    println!("\nFigures:");
    for f in &figures {
        println!("  {}", f.display());
    }
    Ok(())
}

/// Relative error of each scheme on K/V captured from the model, for 2–8 bits.
fn error_vs_bits(model: &Llama, tok: &kvq::tokenizer::TextTokenizer, quick: bool) -> Result<(Vec<Series>, String)> {
    let mut ids = tok.encode(TOUR_TEXT)?;
    ids.truncate(if quick { 128 } else { 256 });
    let n = ids.len();
    // Full-precision K/V, keys both before and after RoPE.
    let rec = CacheConfig { pre_rope: true, ..CacheConfig::preset("fp32")? };
    let mut cache = model.new_cache(&rec, 1, None)?;
    model.forward(&ids, 1, &mut cache, false)?;
    let layers = model.config.layers;
    let mut raw = Vec::new();
    let mut rotated = Vec::new();
    for l in 0..layers {
        raw.push(cache.materialize_stored(l)?);
        rotated.push(cache.materialize(l)?);
    }
    let rel = |a: &[f32], b: &[f32]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den).sqrt()
    };
    let mut series = Vec::new();
    let mut t = Table::new(&["scheme", "bits", "K rel. error", "V rel. error"]);
    for scheme in ["per-token", "kivi", "kvquant"] {
        let mut kp = Vec::new();
        let mut vp = Vec::new();
        for bits in [2u8, 3, 4, 8] {
            let cfg = match scheme {
                "per-token" => CacheConfig::per_token(bits, 64, 0),
                "kivi" => CacheConfig::kivi(bits, bits, 32, 0),
                _ => CacheConfig { sink_tokens: 0, ..CacheConfig::kvquant(bits, 0.01) },
            };
            let calib = if scheme == "kvquant" {
                let cal = tok.encode(CALIBRATION_TEXT)?;
                Some(std::sync::Arc::new(model.calibrate_kvquant(&cal[..cal.len().min(512)], bits, 0.01)?))
            } else {
                None
            };
            let mut c = model.new_cache(&cfg, 1, calib)?;
            let (mut ek, mut ev) = (0.0, 0.0);
            for l in 0..layers {
                let (k_in, v) = if cfg.pre_rope { (&raw[l].0, &raw[l].1) } else { (&rotated[l].0, &rotated[l].1) };
                c.append(l, k_in, v, n)?;
                let (k2, v2) = c.materialize(l)?;
                ek += rel(&k2, &rotated[l].0) / layers as f64;
                ev += rel(&v2, &rotated[l].1) / layers as f64;
            }
            kp.push((bits as f64, ek));
            vp.push((bits as f64, ev));
            t.row(vec![scheme.to_string(), bits.to_string(), format!("{ek:.4}"), format!("{ev:.4}")]);
        }
        series.push(Series { name: format!("{scheme}: keys"), points: kp });
        series.push(Series { name: format!("{scheme}: values"), points: vp });
    }
    Ok((series, format!("{n} tokens of data/tour.txt; groups of 64 channels (per-token), 32 tokens (KIVI keys), 1% outliers (KVQuant, calibrated on another text); no residual window.\n\n{}", t.markdown())))
}
