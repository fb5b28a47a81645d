//! The README's example: a KIVI-2 cache in a small model, generation, and what the
//! cache holds. Run with `cargo run -p kvq --example quickstart`.

use candle_core::Device;
use kvq::generate::{generate, GenerateOptions};
use kvq::model::{Llama, LlamaConfig};
use kvq::{CacheConfig, KvCache};

fn main() -> kvq::Result<()> {
    let model = Llama::random(LlamaConfig::tiny(), 1234, &Device::Cpu)?;
    let mut cache = model.new_cache(&CacheConfig::preset("kivi-2")?, 1, None)?;
    let out = generate(&model, &mut cache, &[vec![1, 2, 3]], &GenerateOptions::default(), |_, _| {})?;
    println!("generated {:?}", out.tokens[0]);
    println!("{:#?}", cache.info()); // lengths, bits, effective bits, memory vs fp16
    Ok(())
}
