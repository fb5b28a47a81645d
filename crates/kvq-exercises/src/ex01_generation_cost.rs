//! # Exercise 1: what generation costs, with and without a KV cache
//!
//! A model generates `new_tokens` tokens after a prompt of `prompt_len` tokens. Count
//! the token positions the model must run through its layers:
//!
//! - **without a cache**, every step feeds the whole sequence so far (prompt plus the
//!   tokens generated before this step);
//! - **with a cache**, the first step feeds the prompt, and each later step feeds only
//!   the token chosen at the step before. (The last token chosen is never fed.)
//!
//! Each fed position also attends to every position up to itself, so the attention
//! work of one step without a cache grows with the square of the length: that is
//! why the total is O(n³) without a cache and O(n²) with one.
//!
//! Hint: a step that runs at sequence length `L` costs `L` positions without a cache.

/// Positions fed through the model to generate `new_tokens` without a cache.
pub fn positions_without_cache(prompt_len: u64, new_tokens: u64) -> u64 {
    let _ = (prompt_len, new_tokens);
    todo!("sum the sequence length of every step")
}

/// Positions fed through the model to generate `new_tokens` with a cache.
pub fn positions_with_cache(prompt_len: u64, new_tokens: u64) -> u64 {
    let _ = (prompt_len, new_tokens);
    todo!("the prompt once, then one token per later step")
}
