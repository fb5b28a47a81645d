//! # kvq exercises
//!
//! Each module is one exercise: a function to complete, starting from `todo!()`.
//! Check your answer to exercise NN with
//!
//! ```sh
//! cargo test -p kvq-exercises --test exNN_…
//! ```
//!
//! The tests fail until the function is right. Reference solutions live in
//! `solutions/` and replace the stubs with `--features solutions`.

#[cfg_attr(feature = "solutions", path = "../solutions/ex01_generation_cost.rs")]
pub mod ex01_generation_cost;
#[cfg_attr(feature = "solutions", path = "../solutions/ex02_kv_bytes.rs")]
pub mod ex02_kv_bytes;
#[cfg_attr(feature = "solutions", path = "../solutions/ex03_uniform.rs")]
pub mod ex03_uniform;
#[cfg_attr(feature = "solutions", path = "../solutions/ex04_packing.rs")]
pub mod ex04_packing;
#[cfg_attr(feature = "solutions", path = "../solutions/ex05_kivi_window.rs")]
pub mod ex05_kivi_window;
#[cfg_attr(feature = "solutions", path = "../solutions/ex06_outliers.rs")]
pub mod ex06_outliers;
#[cfg_attr(feature = "solutions", path = "../solutions/ex07_attention.rs")]
pub mod ex07_attention;
#[cfg_attr(feature = "solutions", path = "../solutions/ex08_budget.rs")]
pub mod ex08_budget;
