//! `kvq size`: bytes of a KV cache for a model, a length, a batch and each scheme.

use crate::table::Table;
use anyhow::Result;
use kvq::cache::{CacheConfig, FullPrecision, Overrides, Scheme, PRESETS};
use kvq::size::{cache_bytes, full_precision_bytes, human, with_commas, ModelGeometry};
use serde::Serialize;

#[derive(Serialize)]
pub struct SizeRow {
    pub cache: String,
    pub bytes: u128,
    pub human: String,
    pub ratio_vs_fp16: f64,
    pub compression_vs_fp16: f64,
    pub bits_per_element: f64,
    pub breakdown: kvq::size::Bytes,
}

#[derive(Serialize)]
pub struct SizeReport {
    pub model: ModelGeometry,
    pub attention: &'static str,
    pub seq: usize,
    pub batch: usize,
    pub formula: String,
    pub rows: Vec<SizeRow>,
}

pub fn report(g: &ModelGeometry, seq: usize, batch: usize, caches: &[String], ov: &Overrides) -> Result<SizeReport> {
    let fp16 = full_precision_bytes(g, seq, batch, FullPrecision::F16);
    let elements = fp16 / 2;
    let mut rows = Vec::new();
    for name in caches {
        let cfg = match name.as_str() {
            "fp8" => CacheConfig::new(Scheme::Full(FullPrecision::Fp8)),
            other => CacheConfig::from_spec(other, ov)?,
        };
        let b = cache_bytes(g, &cfg, seq, batch)?;
        let total = b.total() as u128;
        rows.push(SizeRow {
            cache: if name == "fp8" { "fp8 (size only)".into() } else { cfg.label() },
            bytes: total,
            human: human(total),
            ratio_vs_fp16: if fp16 > 0 { total as f64 / fp16 as f64 } else { 0.0 },
            compression_vs_fp16: if total > 0 { fp16 as f64 / total as f64 } else { 0.0 },
            bits_per_element: if elements > 0 { 8.0 * total as f64 / elements as f64 } else { 0.0 },
            breakdown: b,
        });
    }
    Ok(SizeReport {
        model: g.clone(),
        attention: g.attention_kind(),
        seq,
        batch,
        formula: format!(
            "fp16 = 2 · L · H_kv · d · S · B · 2 bytes = 2 · {} · {} · {} · {} · {} · 2 = {} bytes",
            g.layers,
            g.kv_heads,
            g.head_dim,
            seq,
            batch,
            with_commas(fp16)
        ),
        rows,
    })
}

pub fn print(r: &SizeReport) {
    println!(
        "{}: {} layers, {} query heads, {} KV heads ({}), head dim {}; {} tokens × batch {}",
        r.model.name, r.model.layers, r.model.q_heads, r.model.kv_heads, r.attention, r.model.head_dim, r.seq, r.batch
    );
    println!("{}\n", r.formula);
    let mut t = Table::new(&["cache", "bytes", "size", "vs fp16", "bits/elem", "codes", "scales+zeros", "full-precision", "outliers+sink+consts"]);
    for row in &r.rows {
        let b = &row.breakdown;
        t.row(vec![
            row.cache.clone(),
            with_commas(row.bytes),
            row.human.clone(),
            if row.bytes == 0 { "-".into() } else { format!("{:.1}% ({:.2}×)", 100.0 * row.ratio_vs_fp16, row.compression_vs_fp16) },
            format!("{:.2}", row.bits_per_element),
            with_commas(b.codes as u128),
            with_commas(b.params as u128),
            with_commas(b.full as u128),
            with_commas((b.outliers + b.sink + b.constants) as u128),
        ]);
    }
    print!("{}", t.markdown());
}

/// One row of the GPU budget table: how many sequences of `seq` tokens fit.
#[derive(Serialize)]
pub struct GpuBatchRow {
    pub cache: String,
    pub bytes_per_sequence: u128,
    pub max_batch: u128,
    pub batch_vs_fp16: f64,
}

/// The largest batch of `seq`-token sequences whose caches fit `budget` bytes of GPU
/// memory, for fp16 and each cache with a GPU layout (all but fp8).
pub fn gpu_batches(g: &ModelGeometry, seq: usize, caches: &[String], ov: &Overrides, budget: u128) -> Result<Vec<GpuBatchRow>> {
    let fp16 = kvq::size::gpu_sequence_bytes(g, &CacheConfig::new(Scheme::Full(FullPrecision::F16)), seq).unwrap_or(0);
    let fp16_batch = budget.checked_div(fp16).unwrap_or(0);
    let mut rows = Vec::new();
    for name in caches {
        if name == "fp8" {
            continue;
        }
        let cfg = CacheConfig::from_spec(name, ov)?;
        let Some(per) = kvq::size::gpu_sequence_bytes(g, &cfg, seq) else { continue };
        let max_batch = budget.checked_div(per).unwrap_or(0);
        rows.push(GpuBatchRow { cache: cfg.label(), bytes_per_sequence: per, max_batch, batch_vs_fp16: if fp16_batch > 0 { max_batch as f64 / fp16_batch as f64 } else { 0.0 } });
    }
    Ok(rows)
}

pub fn print_gpu(rows: &[GpuBatchRow], seq: usize, budget: u128) {
    println!("\nLargest batch of {seq}-token sequences in {} ({} bytes) of GPU memory, in kvq's GPU layouts", human(budget), with_commas(budget));
    println!("(KIVI and per-token: codes, f16 params, f16 rings for the window and the tokens waiting to be quantized;");
    println!("KVQuant: the f16 sink, codes, the values' f16 params, sparse outliers; full precision: plain K/V):\n");
    let mut t = Table::new(&["cache", "bytes per sequence", "max batch", "vs fp16"]);
    for r in rows {
        t.row(vec![r.cache.clone(), with_commas(r.bytes_per_sequence), with_commas(r.max_batch), format!("{:.2}×", r.batch_vs_fp16)]);
    }
    print!("{}", t.markdown());
    println!("Caches without a GPU cache (fp8) are left out.");
}

pub fn default_caches() -> Vec<String> {
    PRESETS.iter().filter(|p| **p != "none").map(|s| s.to_string()).chain(std::iter::once("fp8".to_string())).collect()
}
