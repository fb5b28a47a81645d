//! # Exercise 8: how many sequences fit in a memory budget
//!
//! Serving many prompts at once multiplies the cache. Given a model, a context length,
//! a cache configuration and a byte budget, find the largest batch whose cache fits:
//! use `kvq::size::cache_bytes`, which counts everything the cache really stores.
//!
//! Hint: bytes grow linearly with the batch, but per-layer constants (KVQuant's
//! codebooks) do not; a search that tries `batch = 1, 2, …` (or a binary search) is exact.

use kvq::cache::CacheConfig;
use kvq::size::ModelGeometry;

/// The largest batch whose cache of `seq` tokens fits in `budget` bytes (0 if none).
pub fn max_batch(model: &ModelGeometry, cfg: &CacheConfig, seq: usize, budget: usize) -> usize {
    let _ = (model, cfg, seq, budget);
    todo!("kvq::size::cache_bytes(model, cfg, seq, batch)?.total() <= budget")
}
