//! The SIMD Q4_1 matmul against its scalar reference, the dequantized f32 matmul,
//! and candle's own Q4_1 matmul.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use kvq::qmatmul::{dot_scalar_reference, BlockMatrix, Q8Rows};
use kvq::rng::SplitMix64;

fn setup(rows: usize, cols: usize, n: usize, seed: u64) -> (BlockMatrix, QTensor, Vec<f32>) {
    setup_as(GgmlDType::Q4_1, rows, cols, n, seed)
}

fn setup_as(dtype: GgmlDType, rows: usize, cols: usize, n: usize, seed: u64) -> (BlockMatrix, QTensor, Vec<f32>) {
    let mut rng = SplitMix64::new(seed);
    let w: Vec<f32> = (0..rows * cols).map(|i| rng.normal() * if i % 7 == 0 { 0.5 } else { 0.05 } + 0.01).collect();
    let qt = QTensor::quantize(&Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap(), dtype).unwrap();
    let x: Vec<f32> = (0..n * cols).map(|_| rng.normal()).collect();
    (BlockMatrix::from_qtensor(&qt).unwrap(), qt, x)
}

#[test]
fn simd_equals_the_scalar_reference() {
    for (dtype, rows, cols, n) in [(GgmlDType::Q4_1, 16, 32, 1), (GgmlDType::Q4_1, 37, 576, 3), (GgmlDType::Q4_1, 100, 1536, 2), (GgmlDType::Q8_0, 16, 32, 1), (GgmlDType::Q8_0, 53, 576, 3)] {
        let (m, _, x) = setup_as(dtype, rows, cols, n, rows as u64);
        let q = Q8Rows::quantize(&x, cols);
        let out = m.matmul_q8(&q);
        for i in 0..n {
            for r in 0..rows {
                let want = dot_scalar_reference(&m, &q, i, r);
                let got = out[i * rows + r];
                // Integer block sums are exact; only the order of the f32 sum over
                // blocks differs (8 lanes vs one), so allow a few ulps per block.
                let tol = 1e-6 * (cols / 32) as f32 * (1.0 + want.abs());
                assert!((got - want).abs() <= tol, "{rows}×{cols} row {r}: {got} vs {want}");
            }
        }
    }
    eprintln!("SIMD path available: {}", kvq::qmatmul::simd_available());
}

#[test]
fn close_to_the_dequantized_f32_matmul_and_to_candle() {
  for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
    let (rows, cols, n) = (64, 576, 5);
    let (m, qt, x) = setup_as(dtype, rows, cols, n, 9);
    let xt = Tensor::from_vec(x.clone(), (1, n, cols), &Device::Cpu).unwrap();
    let ours = m.forward(&xt).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = m.dequantize();
    let candle = QMatMul::from_qtensor(qt).unwrap().forward(&xt).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (mut err_exact, mut err_candle, mut norm) = (0f64, 0f64, 0f64);
    for i in 0..n {
        for r in 0..rows {
            let exact: f64 = (0..cols).map(|c| x[i * cols + c] as f64 * w[r * cols + c] as f64).sum();
            let o = ours[i * rows + r] as f64;
            err_exact += (o - exact).powi(2);
            err_candle += (o - candle[i * rows + r] as f64).powi(2);
            norm += exact.powi(2);
        }
    }
    let (rel_exact, rel_candle) = ((err_exact / norm).sqrt(), (err_candle / norm).sqrt());
    eprintln!("relative error vs f32: {rel_exact:.2e}, vs candle Q4_1: {rel_candle:.2e}");
    // Only the 8-bit activations (max|x|/127 per 32) separate us from the exact
    // product: about half a percent. candle quantizes activations the same way.
    assert!(rel_exact < 1e-2, "{rel_exact}");
    assert!(rel_candle < 2e-3, "{rel_candle}");
  }
}

#[test]
fn wrong_inputs_are_errors() {
    let (m, _, _) = setup(16, 64, 1, 1);
    let x = Tensor::zeros((2, 63), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(m.forward(&x).is_err());
    let f = QTensor::quantize(&Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::Q4_0).unwrap();
    assert!(BlockMatrix::from_qtensor(&f).is_err());
}
