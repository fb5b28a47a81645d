//! With the `cuda` feature, compiles `kernels/{kivi,full,kvquant}.cu` to fatbins with nvcc: machine
//! code for CUDA_COMPUTE_CAP (default 90: H100/H200) plus PTX for newer GPUs (found on PATH
//! or through NVCC / CUDA_HOME). The default build needs no CUDA at all.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    for header in ["f16_round.cuh", "mma_tile.cuh", "tc.cuh", "warp.cuh"] {
        println!("cargo:rerun-if-changed={}", PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../kernels").join(header).display());
    }
    let nvcc = std::env::var("NVCC").ok().or_else(|| std::env::var("CUDA_HOME").ok().map(|h| format!("{h}/bin/nvcc"))).unwrap_or_else(|| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    for name in ["kivi", "full", "kvquant"] {
        let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join(format!("../../kernels/{name}.cu"));
        println!("cargo:rerun-if-changed={}", src.display());
        let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join(format!("{name}.fatbin"));
        let status = Command::new(&nvcc)
            .args(["--fatbin", "-O3", "-std=c++17", "-lineinfo"])
            .args(["-gencode", &format!("arch=compute_{cap},code=sm_{cap}"), "-gencode", &format!("arch=compute_{cap},code=compute_{cap}"), "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("the cuda feature needs nvcc ({nvcc}): {e}; install a CUDA toolkit (bench/gpu.sh does)"));
        assert!(status.success(), "nvcc failed on {}", src.display());
    }
}
