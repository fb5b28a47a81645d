//! SmolLM2-135M-Instruct from its GGUF against the Hugging Face transformers reference
//! in `tests/golden/smollm2_hf.json` (made by `scripts/golden/make_golden.py`).
//!
//! Needs the model file: `kvq fetch` (scripts/test.sh runs it) or `KVQ_MODEL=path`.
//! Set `KVQ_SKIP_REAL_MODEL=1` to skip these tests explicitly.

use candle_core::Device;
use kvq::cache::{Cache, CacheConfig};
use kvq::generate::{generate, GenerateOptions};
use kvq::gguf::{self, WeightFormat};
use kvq::model::Llama;
use kvq::tokenizer::TextTokenizer;
use kvq::{KvCache, KvqError};
use serde_json::Value;
use std::sync::OnceLock;

/// Logits of kvq with f32 weights vs transformers (f32): both dequantize the same
/// GGUF; only summation order differs.
const LOGIT_TOL: f32 = 2e-3;

fn golden() -> &'static Value {
    static G: OnceLock<Value> = OnceLock::new();
    G.get_or_init(|| serde_json::from_str(include_str!("golden/smollm2_hf.json")).unwrap())
}

fn skip() -> bool {
    if std::env::var_os("KVQ_SKIP_REAL_MODEL").is_some() {
        eprintln!("KVQ_SKIP_REAL_MODEL is set: skipping");
        return true;
    }
    false
}

fn load(w: WeightFormat) -> (Llama, TextTokenizer) {
    let path = gguf::find_model(None).unwrap_or_else(|e| panic!("{e}\n(set KVQ_SKIP_REAL_MODEL=1 to skip the real-model tests)"));
    let (m, t, _) = gguf::load(&path, w, &Device::Cpu).unwrap();
    (m, t)
}

fn f32_model() -> &'static (Llama, TextTokenizer) {
    static M: OnceLock<(Llama, TextTokenizer)> = OnceLock::new();
    M.get_or_init(|| load(WeightFormat::F32))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Largest |Δ| between our logits and the reference's recorded top-20 and logsumexp,
/// over every recorded position of every prompt (teacher-forced on the golden tokens).
fn max_logit_error(m: &Llama) -> f32 {
    let mut worst = 0f32;
    for p in golden()["prompts"].as_array().unwrap() {
        let mut seq = ids(&p["ids"]);
        seq.extend(ids(&p["generated_ids"]));
        let mut none = Cache::none(m.cache_shape(1)).unwrap();
        let logits = m.forward(&seq, 1, &mut none, true).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        for rec in p["logits"].as_array().unwrap() {
            // `position` is the 0-based index of the token whose next-token logits these are.
            let row = &logits[rec["position"].as_u64().unwrap() as usize];
            for pair in rec["top"].as_array().unwrap() {
                let (id, v) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
                worst = worst.max((row[id] - v).abs());
            }
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = m + row.iter().map(|x| ((x - m) as f64).exp()).sum::<f64>().ln() as f32;
            worst = worst.max((lse - rec["logsumexp"].as_f64().unwrap() as f32).abs());
        }
    }
    worst
}

#[test]
fn tokenizer_matches_the_reference() {
    if skip() {
        return;
    }
    let (_, tok) = f32_model();
    let g = &golden()["tokenizer"];
    for case in g["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        // Where transformers falls back to GPT-2 splitting, the GGUF's own "smollm"
        // pre-tokenizer (digits first) is the reference.
        let want = ids(case.get("ids_smollm_pretokenizer").unwrap_or(&case["ids"]));
        assert_eq!(tok.encode(text).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want).unwrap(), text);
    }
    assert_eq!(tok.eos as u64, g["eos_token_id"].as_u64().unwrap());
    assert_eq!(tok.bos.map(|b| b as u64), g["bos_token_id"].as_u64());
    let chat = &golden()["chat"];
    let user = chat["messages"][0]["content"].as_str().unwrap();
    let prompt = tok.chat_prompt(user).unwrap();
    assert_eq!(prompt, chat["text"].as_str().unwrap());
    assert_eq!(tok.encode(&prompt).unwrap(), ids(&chat["ids"]));
}

#[test]
fn greedy_tokens_and_logits_match_transformers() {
    if skip() {
        return;
    }
    let (m, _) = f32_model();
    for p in golden()["prompts"].as_array().unwrap() {
        let prompt = ids(&p["ids"]);
        let want = ids(&p["generated_ids"]);
        let mut cache = m.new_cache(&CacheConfig::preset("fp32").unwrap(), 1, None).unwrap();
        let opts = GenerateOptions { max_new_tokens: want.len(), ..GenerateOptions::default() };
        let got = generate(m, &mut cache, &[prompt], &opts, |_, _| {}).unwrap().tokens.remove(0);
        assert_eq!(got, want, "{}", p["name"]);
    }
    let err = max_logit_error(m);
    eprintln!("max |Δlogit| vs transformers: {err:.2e}");
    assert!(err <= LOGIT_TOL, "max |Δlogit| {err} > {LOGIT_TOL}");
}

#[test]
fn a_wrong_rope_base_or_norm_epsilon_is_caught() {
    if skip() {
        return;
    }
    let (mut m, _) = load(WeightFormat::F32);
    m.set_rope_theta(10_000.0);
    let e = max_logit_error(&m);
    assert!(e > 100.0 * LOGIT_TOL, "RoPE base 10000 instead of 100000 moved logits by only {e}");
    m.set_rope_theta(100_000.0);
    m.config.rms_eps = 1e-3;
    let e = max_logit_error(&m);
    assert!(e > 10.0 * LOGIT_TOL, "RMSNorm epsilon 1e-3 instead of 1e-5 moved logits by only {e}");
    m.config.rms_eps = 1e-5;
    assert!(max_logit_error(&m) <= LOGIT_TOL);
}

#[test]
fn cached_and_uncached_greedy_generation_agree_on_the_real_model() {
    if skip() {
        return;
    }
    // The weights as stored (Q4_1): the path `kvq generate` uses by default.
    let (m, tok) = load(WeightFormat::AsStored);
    let prompt = tok.encode("The KV cache stores").unwrap();
    let n = prompt.len();
    let opts = GenerateOptions { max_new_tokens: 24, ..GenerateOptions::default() };
    let mut fp32 = m.new_cache(&CacheConfig::preset("fp32").unwrap(), 1, None).unwrap();
    let cached = generate(&m, &mut fp32, &[prompt.clone()], &opts, |_, _| {}).unwrap().tokens;
    let mut none = Cache::none(m.cache_shape(1)).unwrap();
    let uncached = generate(&m, &mut none, &[prompt], &opts, |_, _| {}).unwrap().tokens;
    assert_eq!(cached, uncached);
    assert_eq!(fp32.info().total_seq_len, n + 24 - 1);
}

#[test]
fn bad_model_files_give_clear_errors() {
    let dir = std::env::temp_dir().join(format!("kvq-bad-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = |p: &std::path::Path| match gguf::load(p, WeightFormat::AsStored, &Device::Cpu) {
        Err(KvqError::ModelFile { reason, .. }) => reason,
        Err(e) => panic!("expected a model-file error, got {e}"),
        Ok(_) => panic!("{} loaded", p.display()),
    };
    assert!(err(&dir.join("missing.gguf")).contains("No such file"));
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"this is not a gguf file at all").unwrap();
    assert!(err(&junk).contains("not a readable GGUF"));
    // A GGUF of another architecture.
    let other = dir.join("gpt2.gguf");
    {
        use candle_core::quantized::gguf_file::{write, Value as V};
        let mut f = std::fs::File::create(&other).unwrap();
        let arch = V::String("gpt2".into());
        write(&mut f, &[("general.architecture", &arch)], &[]).unwrap();
    }
    assert!(err(&other).contains("architecture 'gpt2' is not supported"));
    assert!(matches!(gguf::find_model(Some(&dir.join("nope.gguf"))), Err(KvqError::ModelFile { .. })));
    if skip() {
        return;
    }
    // The real file, cut short.
    let real = std::fs::read(gguf::find_model(None).unwrap()).unwrap();
    let cut = dir.join("truncated.gguf");
    std::fs::write(&cut, &real[..real.len() / 2]).unwrap();
    assert!(err(&cut).contains("truncated"));
    std::fs::write(&cut, &real[..1000]).unwrap();
    assert!(!err(&cut).is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_prompt_longer_than_the_context_is_an_error() {
    if skip() {
        return;
    }
    let (m, _) = f32_model();
    let mut cache = m.new_cache(&CacheConfig::preset("fp16").unwrap(), 1, None).unwrap();
    let long = vec![42u32; m.config.max_seq_len + 1];
    let e = generate(m, &mut cache, &[long], &GenerateOptions::default(), |_, _| {}).unwrap_err();
    assert_eq!(e, KvqError::ContextOverflow { len: 8193, max: 8192 });
}
