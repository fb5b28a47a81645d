//! The `kvq` binary: the numbers it prints and its errors.

use std::process::Command;

fn kvq(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_kvq")).args(args).output().expect("run kvq");
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn gpu_budget_gives_the_largest_batch_in_the_gpu_layouts() {
    let (code, out, err) = kvq(&["size", "--model", "smollm2-135m", "--seq", "8192", "--cache", "fp16,kivi-2,kivi-2:group=64,per-token-4,kvquant-2,fp8", "--gpu-budget", "40GiB"]);
    assert_eq!(code, 0, "{err}");
    let gpu = &out[out.find("Largest batch").expect("the GPU table")..];
    let row = |start: &str| gpu.lines().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("no {start} row in {gpu}")).to_string();
    // fp16: 2 · 30 · 3 · 64 · 8192 · 2 bytes a sequence; 40 GiB / that = 227.
    assert!(row("| fp16 ").contains("188,743,680") && row("| fp16 ").contains(" 227 |"), "{gpu}");
    // kivi-2: per stream-layer 8192 · 48 bytes of codes and params + 45,056 of f16 rings.
    let k2 = row("| kivi-2 (g32");
    assert!(k2.contains("39,444,480") && k2.contains("1,088") && k2.contains("4.79×"), "{k2}");
    assert!(row("| kivi-2 (g64").contains("5.46×"), "{gpu}");
    // per-token-4: per stream-layer 8192 · (2 · 32 codes + 2 · 4 params) bytes + 2 · 256 · 64 · 2
    // of f16 rings (the 128-token window and a chunk of 128), × 90 stream-layers.
    let pt = row("| per-token-4 (");
    assert!(pt.contains("58,982,400") && pt.contains(" 728 |"), "{pt}");
    // kvquant-2: the f16 sink token (256 bytes), then 8191 · (2 · 16 codes + 4 + 2 · 4 outlier
    // bytes), × 90.
    assert!(row("| kvquant-2 (").contains("32,459,400"), "{gpu}");
    assert!(!gpu.contains("| fp8"), "fp8 has no GPU cache: {gpu}");
    for bad in ["40XB", "-3GB", "GiB", "0"] {
        let (code, _, err) = kvq(&["size", "--model", "smollm2-135m", "--seq", "8192", &format!("--gpu-budget={bad}")]);
        assert_eq!(code, 2, "{bad}: {err}");
        assert!((err.contains("unknown unit") || err.contains("not a positive size")) && !err.contains("panicked"), "{bad}: {err}");
    }
}

#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_kvq_without_a_panic() {
    use std::os::fd::FromRawFd;
    use std::os::unix::process::ExitStatusExt;
    // A pipe whose reading end is already closed: kvq's first write to stdout fails,
    // as in `kvq presets | head -0`, with no race.
    let mut fds = [0; 2];
    // SAFETY: pipe fills two fresh descriptors; the read end is closed at once and the
    // write end handed to an OwnedFd that the child's stdout takes over.
    let write_end = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        std::os::fd::OwnedFd::from_raw_fd(fds[1])
    };
    let out = Command::new(env!("CARGO_BIN_EXE_kvq")).arg("presets").stdout(write_end).output().expect("run kvq");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {err}", out.status);
}

#[test]
fn llama_3_8b_at_100k_tokens_is_13_gb_in_fp16() {
    let (code, out, _) = kvq(&["size", "--model", "llama-3-8b", "--seq", "100000"]);
    assert_eq!(code, 0);
    let fp16 = out.lines().find(|l| l.starts_with("| fp16 ")).expect("an fp16 row");
    assert!(fp16.contains("13,107,200,000"), "{fp16}");
    // kivi-2's real compression, scales and residual window included: 2,471,231,488 bytes.
    let kivi = out.lines().find(|l| l.starts_with("| kivi-2 ")).expect("a kivi-2 row");
    assert!(kivi.contains("2,471,231,488") && kivi.contains("5.30×"), "{kivi}");
}

#[test]
fn json_output_has_the_breakdown() {
    let (code, out, _) = kvq(&["size", "--model", "smollm2-135m", "--seq", "8192", "--batch", "200", "--cache", "fp16,kivi-2", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["rows"][0]["bytes"], 2u64 * 30 * 3 * 64 * 8192 * 200 * 2);
    let b = &v["rows"][1]["breakdown"];
    let total: u64 = ["codes", "params", "full", "outliers", "sink", "constants"].iter().map(|k| b[k].as_u64().unwrap()).sum();
    assert_eq!(v["rows"][1]["bytes"].as_u64().unwrap(), total);
    assert!(b["params"].as_u64().unwrap() > 0 && b["full"].as_u64().unwrap() > 0);
}

#[test]
fn nanogpt_at_1024_tokens_and_4_bits() {
    // The seed lesson's estimate ignores scales: 6 · 2 · 384 · 1024 · 0.5 B = 2,359,296 B.
    // kvq counts them: 4-bit codes plus f16 min and scale per group of 64 channels.
    let (code, out, _) = kvq(&["size", "--model", "nanogpt", "--seq", "1024", "--cache", "per-token-4", "--residual", "0", "--past-only", "false"]);
    assert_eq!(code, 0);
    let row = out.lines().find(|l| l.starts_with("| per-token-4")).unwrap();
    assert!(row.contains("2,654,208"), "{row}"); // 2,359,296 + 2·6·6·1024·4
}

#[test]
fn custom_geometry_and_overrides() {
    let (code, out, _) = kvq(&["size", "--model", "custom", "--layers", "2", "--q-heads", "4", "--kv-heads", "1", "--head-dim", "64", "--seq", "10", "--cache", "fp32"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("MQA") && out.contains("| fp32") && out.contains("10,240"), "{out}");
}

#[test]
fn bad_input_exits_non_zero_with_a_message() {
    for (args, needle) in [
        (vec!["size", "--model", "gpt-9", "--seq", "10"], "unknown model preset"),
        (vec!["size", "--seq", "10", "--cache", "kivi-9"], "unknown cache preset"),
        (vec!["size", "--seq", "10", "--cache", "kivi-2", "--bits", "9"], "bits must be between 1 and 8"),
        (vec!["size", "--seq", "10", "--cache", "kivi-2", "--bits", "0"], "bits must be between 1 and 8"),
        (vec!["size", "--seq", "10", "--cache", "kivi-2", "--group-size", "0"], "group size must be at least 1"),
        (vec!["size", "--seq", "10", "--cache", "per-token-4", "--group-size", "48"], "does not divide"),
        (vec!["size", "--seq", "10", "--cache", "kvquant-2", "--outliers", "1.5"], "outlier fraction"),
        (vec!["size", "--seq", "10", "--cache", "fp16", "--group-size", "32"], "does not apply"),
        (vec!["size", "--model", "custom", "--seq", "10"], "--model custom needs"),
        (vec!["size", "--model", "custom", "--layers", "2", "--q-heads", "6", "--kv-heads", "4", "--head-dim", "64", "--seq", "1"], "cannot share"),
    ] {
        let (code, _, err) = kvq(&args);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn generate_and_ppl_reject_bad_input_before_loading_anything() {
    let dir = std::env::temp_dir();
    let missing = dir.join("kvq-no-such-model.gguf");
    let m = missing.to_str().unwrap();
    let junk = dir.join(format!("kvq-junk-{}.gguf", std::process::id()));
    std::fs::write(&junk, b"GGUF but not really").unwrap();
    let (code, _, err) = kvq(&["generate", "--model", junk.to_str().unwrap(), "--prompt", "hi"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a readable GGUF") && !err.contains("panicked"), "{err}");
    std::fs::remove_file(&junk).ok();
    for (args, needle) in [
        (vec!["generate", "--model", m, "--prompt", "hi"], "not found"),
        (vec!["generate", "--model", m, "--prompt", "hi", "--cache", "kivi-7"], "unknown cache preset"),
        (vec!["generate", "--model", m, "--prompt", "hi", "--cache", "kivi-2", "--bits", "9"], "bits must be between 1 and 8"),
        (vec!["generate", "--model", m], "--prompt TEXT or --prompts FILE"),
        (vec!["generate", "--model", m, "--prompt", "hi", "--weights", "q3"], "unknown weight format"),
        (vec!["generate", "--model", m, "--hf-repo", "a/b", "--hf-file", "c.gguf", "--prompt", "hi"], "cannot be used with"),
        (vec!["generate", "--hf-repo", "a/b", "--prompt", "hi"], "--hf-file"),
        (vec!["ppl", "--model", m, "--text", "/nonexistent/text.txt"], "reading /nonexistent/text.txt"),
        (vec!["ppl", "--model", m, "--text", "Cargo.toml", "--caches", "fp16,wat"], "unknown cache preset"),
        (vec!["ppl", "--model", m, "--text", "Cargo.toml", "--caches", "kivi-2:group=x"], "whole number"),
        (vec!["ppl", "--model", m, "--text", "Cargo.toml", "--calibration-tokens", "0"], "--calibration-tokens must be at least 1"),
        (vec!["ppl", "--model", m, "--text", "Cargo.toml", "--device", "tpu"], "unknown device \"tpu\" (known: cpu, cuda)"),
        (vec!["ppl", "--model", m, "--text", "Cargo.toml", "--kv-noise", "0.7"], "--kv-noise must be in [0, 0.5), got 0.7"),
        (vec!["ppl", "--model", m, "--text", "Cargo.toml", "--kv-noise", "NaN"], "--kv-noise must be in [0, 0.5)"),
        (vec!["generate", "--model", m, "--prompt", "hi", "--device", "tpu"], "unknown device"),
        // The default build has no GPU code: a clear error before any model is read.
        #[cfg(not(feature = "cuda"))]
        (vec!["ppl", "--model", m, "--text", "Cargo.toml", "--device", "cuda"], "--device cuda needs kvq built with the cuda feature"),
        #[cfg(not(feature = "cuda"))]
        (vec!["generate", "--model", m, "--prompt", "hi", "--device", "cuda"], "--device cuda needs kvq built with the cuda feature"),
        #[cfg(not(feature = "cuda"))]
        (vec!["bench", "gpu-e2e"], "built without the GPU"),
        #[cfg(not(feature = "cuda"))]
        (vec!["bench", "gpu-model"], "built without the GPU"),
        (vec!["bench", "layers", "--model", m, "--text", "Cargo.toml", "--tokens", "1"], "--tokens must be at least 2"),
        (vec!["bench", "layers", "--model", m, "--text", "Cargo.toml", "--caches", "kivi-9"], "unknown cache preset"),
        (vec!["bench", "layers", "--model", m, "--text", "Cargo.toml", "--calibration-tokens", "0"], "--calibration-tokens must be at least 1"),
        // Overrides are for the compared caches, not the fp32 reference: this gets as far
        // as loading the (missing) model.
        (vec!["ppl", "--model", m, "--text", "Cargo.toml", "--caches", "kivi-2", "--bits", "4", "--group-size", "64"], "not found"),
    ] {
        let (code, _, err) = kvq(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
