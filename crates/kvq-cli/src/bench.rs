//! `kvq bench`: programs that print tables, never timed assertions.

use crate::table::Table;
use anyhow::Result;
use candle_core::Device;
use kvq::cache::{Cache, CacheConfig, CacheShape, KvCache, KvQuantCalibration, LayerSamples, Scheme, PRESETS};
use kvq::generate::{generate, GenerateOptions};
use kvq::model::{Llama, LlamaConfig};
use kvq::rng::SplitMix64;
use kvq::rope::{Rope, RopeStyle};
use std::sync::Arc;
use std::time::Instant;

/// Where and when a benchmark ran: the header of every results file.
pub fn provenance() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // KVQ_COMMIT first: a copy on another machine (the GPU's) may carry a stale .git.
    let commit = std::env::var("KVQ_COMMIT").ok().or_else(|| {
        std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    let commit = commit.unwrap_or_else(|| "unknown".into());
    let args: Vec<String> = std::env::args().collect();
    format!(
        "- date: {}\n- machine: {cpu}, {threads} threads\n- commit: {commit}\n- command: `{}`\n",
        utc_date(),
        args.join(" ").replace(&args[0], "kvq")
    )
}

fn utc_date() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (secs / 86_400) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", (secs % 86_400) / 3600, (secs % 3600) / 60)
}

fn synthetic(rng: &mut SplitMix64, n: usize, d: usize) -> Vec<f32> {
    // Keys of real models have a few channels with large magnitude; mimic that.
    (0..n).map(|i| rng.normal() * if i % d < 4 { 10.0 } else { 1.0 }).collect()
}

/// Quantize+pack throughput of each scheme: GB/s of f32 K/V input appended.
pub fn quant(tokens: usize, kv_heads: usize, head_dim: usize, reps: usize) -> Result<String> {
    let shape = CacheShape { layers: 1, batch: 1, kv_heads, head_dim };
    let rope = Arc::new(Rope::new(10_000.0, head_dim, RopeStyle::Half, tokens + 1));
    let mut rng = SplitMix64::new(1);
    let n = kv_heads * tokens * head_dim;
    let (k, v) = (synthetic(&mut rng, n, head_dim), synthetic(&mut rng, n, head_dim));
    let mut t = Table::new(&["cache", "append", "tokens", "best time (ms)", "GB/s of f32 input", "bytes held", "bits/elem"]);
    for name in PRESETS.iter().filter(|p| **p != "none") {
        let cfg = CacheConfig::preset(name)?;
        let calib = match cfg.scheme {
            Scheme::KvQuant { bits, outlier_fraction } => {
                let samples = [LayerSamples { keys: &k, values: &v, tokens }];
                Some(Arc::new(KvQuantCalibration::fit(&samples, kv_heads, head_dim, bits as u32, outlier_fraction, true)?))
            }
            _ => None,
        };
        for (mode, chunk) in [("prefill", tokens), ("token by token", 1)] {
            let mut best = f64::INFINITY;
            let mut cache = Cache::new(&cfg, shape, Some(rope.clone()), calib.clone())?;
            for _ in 0..reps {
                cache.reset();
                let t0 = Instant::now();
                if chunk == tokens {
                    cache.append(0, &k, &v, tokens)?;
                } else {
                    // One token at a time, as in decoding: gather its rows of each head.
                    let mut kt = vec![0f32; kv_heads * head_dim];
                    let mut vt = vec![0f32; kv_heads * head_dim];
                    for i in 0..tokens {
                        for h in 0..kv_heads {
                            let src = (h * tokens + i) * head_dim;
                            kt[h * head_dim..(h + 1) * head_dim].copy_from_slice(&k[src..src + head_dim]);
                            vt[h * head_dim..(h + 1) * head_dim].copy_from_slice(&v[src..src + head_dim]);
                        }
                        cache.append(0, &kt, &vt, 1)?;
                    }
                }
                best = best.min(t0.elapsed().as_secs_f64());
            }
            let info = cache.info();
            t.row(vec![
                cfg.label(),
                mode.into(),
                tokens.to_string(),
                format!("{:.2}", best * 1e3),
                format!("{:.2}", (2 * n * 4) as f64 / best / 1e9),
                kvq::size::with_commas(info.memory_bytes as u128),
                format!("{:.2}", info.effective_bits),
            ]);
        }
    }
    Ok(format!(
        "### Quantize + pack throughput (CPU)\n\nOne layer, {kv_heads} KV heads × head dim {head_dim}, {tokens} tokens of synthetic K/V; best of {reps}.\n\n{}",
        t.markdown()
    ))
}

/// Per-token decode latency with and without a cache: on the small decoder, or on the
/// real model (`real = Some((model, text ids))`).
pub fn decode(contexts: &[usize], steps: usize, caches: &[String], real: Option<(&Llama, Vec<u32>)>) -> Result<String> {
    let tiny;
    let (m, source): (&Llama, Vec<u32>) = match real {
        Some((m, ids)) => (m, ids),
        None => {
            tiny = Llama::random(LlamaConfig::tiny(), 1234, &Device::Cpu)?;
            let max = contexts.iter().copied().max().unwrap_or(0) as u32;
            (&tiny, (0..max).map(|i| (i * 37 + 5) % 512).collect())
        }
    };
    let mut t = Table::new(&["context", "cache", "ms / token", "× vs fp32 cache", "cache bytes"]);
    for &ctx in contexts {
        if ctx > source.len() {
            anyhow::bail!("context {ctx} is longer than the {} tokens of text at hand", source.len());
        }
        let prompt: Vec<u32> = source[..ctx].to_vec();
        let mut base = 0.0;
        let mut names = vec!["fp32".to_string()];
        names.extend(caches.iter().filter(|c| *c != "fp32").cloned());
        for name in &names {
            let cfg = CacheConfig::preset(name)?;
            let calib = match cfg.scheme {
                Scheme::KvQuant { bits, outlier_fraction } => Some(Arc::new(m.calibrate_kvquant(&prompt[..ctx.min(256)], bits, outlier_fraction)?)),
                _ => None,
            };
            let mut cache = m.new_cache(&cfg, 1, calib)?;
            // Without a cache every step recomputes the prefix: a few steps suffice.
            let n = if cfg.scheme == Scheme::None { steps.min(3) } else { steps } + 1;
            let g = generate(&m, &mut cache, &[prompt.clone()], &GenerateOptions { max_new_tokens: n, ..GenerateOptions::default() }, |_, _| {})?;
            let lat: Vec<f64> = g.steps.iter().skip(1).map(|s| s.latency_s).collect();
            let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
            if name == "fp32" {
                base = mean;
            }
            t.row(vec![
                ctx.to_string(),
                cfg.label(),
                format!("{:.3}", mean * 1e3),
                format!("{:.2}", mean / base),
                kvq::size::with_commas(cache.memory_bytes() as u128),
            ]);
        }
    }
    let c = &m.config;
    let which = if m.config == LlamaConfig::tiny() { "the small test decoder" } else { "SmolLM2-135M-Instruct (weights as stored: Q4_1, Q8_0), text of data/tour.txt repeated" };
    Ok(format!(
        "### Decode latency with and without a cache (CPU)\n\nModel: {which}: {} layers, {} query heads, {} KV heads, head dim {}, hidden {}. Prompt of `context` tokens, then greedy steps; mean latency of the steps after the first (without a cache each step recomputes the whole prefix).\n\n{}",
        c.layers,
        c.q_heads,
        c.kv_heads,
        c.head_dim,
        c.hidden_size,
        t.markdown()
    ))
}
