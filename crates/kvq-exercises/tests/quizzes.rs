//! The quizzes (`lessons/quizzes/*.toml`, mdbook-quiz format): well formed, at least
//! three questions a lesson, and every numeric answer recomputed here with kvq.

use kvq::cache::CacheConfig;
use kvq::size::{cache_bytes, with_commas, ModelGeometry};
use kvq_book::quiz::{load_dir, Question};
use std::collections::{BTreeMap, HashSet};

fn quizzes() -> BTreeMap<String, Vec<Question>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../lessons/quizzes");
    load_dir(std::path::Path::new(dir)).unwrap_or_else(|e| panic!("{e}")).into_iter().map(|(f, q)| (f, q.questions)).collect()
}

fn question<'a>(all: &'a BTreeMap<String, Vec<Question>>, id: &str) -> &'a Question {
    all.values().flatten().find(|q| q.id == id).unwrap_or_else(|| panic!("no question {id}"))
}

fn bytes(model: &str, cache: &str, seq: usize, batch: usize) -> usize {
    cache_bytes(&ModelGeometry::preset(model).unwrap(), &CacheConfig::preset(cache).unwrap(), seq, batch).unwrap().total()
}

#[test]
fn every_quiz_is_well_formed() {
    let all = quizzes();
    assert_eq!(all.len(), 8, "one quiz per lesson: {:?}", all.keys());
    let mut ids = HashSet::new();
    for (file, qs) in &all {
        assert!(qs.len() >= 3, "{file}: {} questions", qs.len());
        for q in qs {
            assert!(ids.insert(q.id.clone()), "duplicate id {}", q.id);
            assert_eq!(q.kind, "MultipleChoice", "{}", q.id);
            assert!((2..=4).contains(&q.prompt.distractors.len()), "{}", q.id);
            assert!(!q.prompt.distractors.contains(&q.answer.answer), "{}: the answer is also a distractor", q.id);
            let d: HashSet<_> = q.prompt.distractors.iter().collect();
            assert_eq!(d.len(), q.prompt.distractors.len(), "{}: repeated distractor", q.id);
            assert!(!q.prompt.prompt.trim().is_empty() && !q.context.trim().is_empty(), "{}", q.id);
        }
    }
}

#[test]
fn the_seed_quiz_with_its_answers() {
    let all = quizzes();
    assert_eq!(question(&all, "seed-with-cache").answer.answer, "O(n^2)");
    assert_eq!(question(&all, "seed-without-cache").answer.answer, "O(n^3)");
    // The same by counting: fed positions × attended positions per step.
    let work = |n: u64, cache: bool| -> u64 {
        (1..=n).map(|len| if cache { len } else { len * (len + 1) / 2 }).sum()
    };
    let ratio = |cache: bool| work(2000, cache) as f64 / work(1000, cache) as f64;
    assert!((ratio(true) - 4.0).abs() < 0.02, "with a cache: ×4 when n doubles (n²)");
    assert!((ratio(false) - 8.0).abs() < 0.05, "without: ×8 when n doubles (n³)");
}

#[test]
fn numeric_answers_are_what_kvq_computes() {
    let all = quizzes();
    let fp16_100k = bytes("llama-3-8b", "fp16", 100_000, 1);
    assert!(question(&all, "mem-llama3-100k").answer.answer.contains(&with_commas(fp16_100k as u128)));
    assert_eq!(bytes("llama-3-8b", "fp16", 8192, 1), 1 << 30);
    assert_eq!(bytes("llama-2-7b", "fp16", 8192, 1), 4 << 30);
    let a = &question(&all, "mem-seed-2gb-correction").answer.answer;
    assert!(a.contains("1 GiB") && a.contains("4 GiB"), "{a}");
    assert!(question(&all, "mem-nanogpt-seed").answer.answer.contains(&with_commas(2 * 6 * 6 * 64 * 1024 / 2)));
    let per_token_4 = CacheConfig::per_token(4, 64, 0);
    let nano = cache_bytes(&ModelGeometry::preset("nanogpt").unwrap(), &per_token_4, 1024, 1).unwrap().total();
    assert_eq!(question(&all, "q-nanogpt-with-scales").answer.answer, with_commas(nano as u128));
    let kivi2 = bytes("llama-3-8b", "kivi-2", 100_000, 1);
    let q = question(&all, "kivi-real-compression");
    assert!(q.prompt.prompt.contains(&with_commas(kivi2 as u128)));
    assert!(q.answer.answer.contains(&format!("{:.2}×", fp16_100k as f64 / kivi2 as f64)), "{}", q.answer.answer);
    assert_eq!(question(&all, "kivi-seed-effective-bits").answer.answer, format!("{}", (384.0 * 2.0 + 128.0 * 16.0) / 512.0));
    // 4 GB budget at 100k tokens: per-token-4 fits, KIVI-4 (smaller groups, more scales) does not.
    assert!(bytes("llama-3-8b", "per-token-4", 100_000, 1) <= 4_000_000_000);
    assert!(bytes("llama-3-8b", "kivi-4", 100_000, 1) > 4_000_000_000);
    // The largest KIVI-2 batch in 40 GiB at 8192 tokens.
    let per_seq = bytes("llama-3-8b", "kivi-2", 8192, 1);
    assert!(question(&all, "choose-batch-in-budget").prompt.prompt.contains(&with_commas(per_seq as u128)));
    let budget = 40usize << 30;
    let best = (1..10_000).take_while(|&b| bytes("llama-3-8b", "kivi-2", 8192, b) <= budget).last().unwrap();
    assert_eq!(question(&all, "choose-batch-in-budget").answer.answer, best.to_string());
}

/// The number a quiz quotes from the quality report: kvq's ΔPPL (against its fp16 cache) for
/// one cache at one context, from `bench/results/quality.md`'s tables.
fn quality_dppl(cache: &str, context: usize) -> f64 {
    let report = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../bench/results/quality.md")).unwrap();
    let table = report.split(&format!("### Context {context}")).nth(1).expect("no table for that context");
    let row = table.lines().find(|l| l.starts_with(&format!("| kvq | `{cache}` |"))).expect("no row");
    row.split('|').map(str::trim).nth(6).unwrap().trim_start_matches('+').parse().unwrap()
}

#[test]
fn the_calibration_quiz_quotes_the_report() {
    let all = quizzes();
    let q = question(&all, "kvquant-calibration-bias");
    let (kvquant, kivi) = (quality_dppl("kvquant-4", 8192), quality_dppl("kivi-4", 8192));
    assert!(q.prompt.prompt.contains(&format!("+{kvquant:.1}%")), "kvquant-4 at 8k is +{kvquant:.2}%: {}", q.prompt.prompt);
    assert!(q.prompt.prompt.contains(&format!("+{kivi:.1}%")), "kivi-4 at 8k is +{kivi:.2}%: {}", q.prompt.prompt);
}

/// One layer's K/V bytes for a decode call, as `kvq bench attn` counts what attention reads.
fn layer_bytes(cache: &str, seq: usize, batch: usize) -> f64 {
    let layers = ModelGeometry::preset("smollm2-135m").unwrap().layers;
    bytes("smollm2-135m", cache, seq, batch) as f64 / layers as f64
}

#[test]
fn the_fixed_cost_quiz_adds_up() {
    let all = quizzes();
    let q = question(&all, "gpu-fixed-cost");
    // The prompt's model of a call (bench/results/gpu-attn.md, "A cost a call, not a byte"):
    // fixed µs + bytes / rate.
    let call = |fixed: f64, rate: f64, bytes: f64| fixed + bytes / rate * 1e6;
    let speedup = |seq: usize| call(6.0, 3.1e12, layer_bytes("fp16", seq, 64)) / call(9.0, 2.7e12, layer_bytes("kivi-2", seq, 64));
    let (at8k, at32k, far) = (speedup(8192), speedup(32768), speedup(1 << 24));
    assert!(at8k > 3.4 && at8k < 3.6 && at32k > 4.2 && at32k < 4.4, "{at8k} {at32k}");
    assert!(q.answer.answer.contains(&format!("about {far:.1}×")), "the limit is {far:.2}: {}", q.answer.answer);
    // The megabytes the context quotes are kvq's.
    for (mb, seq, cache) in [("80.6", 8192, "kivi-2"), ("402.7", 8192, "fp16"), ("307.1", 32768, "kivi-2"), ("1,610.6", 32768, "fp16")] {
        let got = format!("{:.1}", layer_bytes(cache, seq, 64) / 1e6);
        assert!(got == mb.replace(',', "") && q.context.contains(mb), "{cache} at {seq}: {got} MB, the quiz says {mb}");
    }
}
