//! Text ↔ token ids for GGUF models: a byte-level BPE tokenizer rebuilt from the GGUF
//! metadata (`tokenizer.ggml.*`), so no `tokenizer.json` is needed, and the ChatML
//! chat template of the instruct model.

use crate::error::{KvqError, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// GGUF token type of control tokens (`<|im_start|>`, `<|endoftext|>`, …).
const TOKEN_TYPE_CONTROL: i32 = 3;

pub struct TextTokenizer {
    inner: Tokenizer,
    pub bos: Option<u32>,
    pub eos: u32,
    pub pad: Option<u32>,
    /// The system message the chat template inserts when none is given.
    default_system: Option<String>,
    chatml: bool,
}

fn tok_err(e: impl std::fmt::Display) -> KvqError {
    KvqError::Tokenizer(e.to_string())
}

fn meta<'a>(m: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    m.get(key).ok_or_else(|| KvqError::Tokenizer(format!("the GGUF metadata has no {key}")))
}

impl TextTokenizer {
    /// Rebuilds the tokenizer from GGUF metadata (`tokenizer.ggml.model = gpt2`).
    pub fn from_gguf(m: &HashMap<String, Value>) -> Result<Self> {
        let model = meta(m, "tokenizer.ggml.model")?.to_string().map_err(tok_err)?;
        if model != "gpt2" {
            return Err(KvqError::Tokenizer(format!("tokenizer model '{model}' is not supported (byte-level BPE 'gpt2' only)")));
        }
        let tokens: Vec<String> = meta(m, "tokenizer.ggml.tokens")?
            .to_vec()
            .map_err(tok_err)?
            .iter()
            .map(|v| v.to_string().cloned().map_err(tok_err))
            .collect::<Result<_>>()?;
        let merges: Vec<(String, String)> = meta(m, "tokenizer.ggml.merges")?
            .to_vec()
            .map_err(tok_err)?
            .iter()
            .map(|v| {
                let s = v.to_string().map_err(tok_err)?;
                s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| KvqError::Tokenizer(format!("bad merge '{s}'")))
            })
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match m.get("tokenizer.ggml.token_type") {
            Some(v) => v.to_vec().map_err(tok_err)?.iter().map(|x| x.to_i32().map_err(tok_err)).collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        // GPT-2 byte-level BPE; SmolLM's pre-tokenizer also splits digits one by one.
        let pre = m.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str).unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, true);
        if pre == "smollm" {
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ])));
        } else {
            inner.with_pre_tokenizer(Some(byte_level));
        }
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner.add_special_tokens(specials).map_err(tok_err)?;
        let id = |k: &str| m.get(k).and_then(|v| v.to_u32().ok());
        let eos = id("tokenizer.ggml.eos_token_id").ok_or_else(|| KvqError::Tokenizer("no eos token id".into()))?;
        let template = m.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        let chatml = template.contains("<|im_start|>");
        let default_system = template
            .split_once("<|im_start|>system\\n")
            .or_else(|| template.split_once("<|im_start|>system\n"))
            .and_then(|(_, rest)| rest.split_once("<|im_end|>"))
            .map(|(s, _)| s.to_string());
        Ok(TextTokenizer { inner, bos: id("tokenizer.ggml.bos_token_id"), eos, pad: id("tokenizer.ggml.padding_token_id"), default_system, chatml })
    }

    /// Token ids of `text`; special tokens written in the text are recognized.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, false).map_err(tok_err)?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The instruct model's prompt for one user message (ChatML, with the template's
    /// default system message), ending where the assistant's answer begins.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        if !self.chatml {
            return Err(KvqError::Tokenizer("this model's chat template is not ChatML; --chat is not supported for it".into()));
        }
        let mut s = String::new();
        if let Some(sys) = &self.default_system {
            s += &format!("<|im_start|>system\n{sys}<|im_end|>\n");
        }
        s += &format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n");
        Ok(s)
    }

    /// Tokens that end a chat answer or a document.
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut v = vec![self.eos];
        v.extend(["<|im_end|>", "<|endoftext|>"].iter().filter_map(|t| self.id(t)));
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Turns a stream of token ids into text pieces, holding back bytes of a character
/// that is not complete yet.
pub struct StreamDecoder<'a> {
    tok: &'a TextTokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a TextTokenizer) -> Self {
        StreamDecoder { tok, ids: Vec::new(), printed: 0 }
    }

    /// The new text once `id` is added (empty while a character is incomplete).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.printed || !text.is_char_boundary(self.printed) {
            return Ok(String::new());
        }
        let piece = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(piece)
    }
}
