//! How the GPU decode attention cuts its work into blocks (pure arithmetic, so CI tests
//! it without a GPU; `cuda.rs` uses it).
//!
//! A stream's tiles of 32 tokens are cut into splits; each split is a block of `warps`
//! warps, and `blocks_per_split` blocks (streams × head chunks) share a split count. The
//! GPU runs `wave` blocks at once (blocks an SM × SMs). A block's time is about the tiles
//! its busiest warp reads plus about one tile's worth of set-up and merging, and a partial
//! last wave idles SMs, so the time of a plan is `waves × (⌈tiles a split / warps⌉ + 1)`:
//! [`plan_splits`] takes the fewest splits within 3% of the best, since every split adds
//! a partial result for `combine_splits` to merge.
//!
//! The tensor-core kernels are different: an SM's own throughput bounds them (ncu: their
//! instructions wait on each other, not on memory), so extra warps on an SM add little
//! speed past a few. [`plan_splits_sm_bound`] models
//! that: a wave takes as long as its busiest SM's tiles over `min(its warps, busy_warps)`,
//! plus one tile of set-up. On an H100 (kivi-2, bench attn --splits) both goal shapes ran
//! fastest at 2 splits, 2 or 3 blocks an SM: Llama-3-8B B16 32k 150.6 µs against 154.2,
//! 156.0 and 206.3 µs at 3, 4 and 5; SmolLM2 B64 8k 40.9 against 42.6, 45.6 and 44.8 at 3,
//! 5 and 6, where `plan_splits` had picked 4 and 3.

/// (splits, tiles a split) for `tiles` tiles a stream; 0 tiles gives (0, 1).
pub fn plan_splits(tiles: usize, blocks_per_split: usize, wave: usize, warps: usize) -> (usize, usize) {
    if tiles == 0 {
        return (0, 1);
    }
    let (bps, wave, warps) = (blocks_per_split.max(1), wave.max(1), warps.max(1));
    // More splits than tiles/warps would leave warps without a tile.
    let max_splits = tiles.div_ceil(warps);
    let plan = |want: usize| {
        let per = tiles.div_ceil(want);
        let splits = tiles.div_ceil(per);
        let waves = (splits * bps).div_ceil(wave);
        (splits, per, waves * (per.div_ceil(warps) + 1))
    };
    fewest_near_best(max_splits, |k| {
        let (splits, per, time) = plan(k);
        (splits, per, time as f64)
    })
}

/// The plan with the fewest splits whose time is within 3% of the best over 1..=max_splits.
fn fewest_near_best(max_splits: usize, plan: impl Fn(usize) -> (usize, usize, f64)) -> (usize, usize) {
    let best = (1..=max_splits).map(|k| plan(k).2).fold(f64::INFINITY, f64::min);
    let (splits, per, _) = (1..=max_splits).map(&plan).find(|p| p.2 <= best * 1.03).unwrap_or_else(|| plan(1));
    (splits, per)
}

/// (splits, tiles a split) for a kernel whose SMs saturate at `busy_warps` warps: each wave's
/// blocks spread over `sms` SMs (at most `blocks_per_sm` each), and a wave takes
/// `n · per / min(n · warps, busy_warps) + 1` tile-times, `n` the blocks on its busiest SM.
/// The fewest splits within 3% of the best, as [`plan_splits`].
pub fn plan_splits_sm_bound(tiles: usize, blocks_per_split: usize, blocks_per_sm: usize, sms: usize, warps: usize, busy_warps: usize) -> (usize, usize) {
    if tiles == 0 {
        return (0, 1);
    }
    let (bps, sms, warps) = (blocks_per_split.max(1), sms.max(1), warps.max(1));
    let (slots, busy) = (blocks_per_sm.max(1) * sms, busy_warps.max(1));
    let max_splits = tiles.div_ceil(warps);
    let plan = |want: usize| {
        let per = tiles.div_ceil(want);
        let splits = tiles.div_ceil(per);
        let (mut left, mut time) = (splits * bps, 0.0);
        while left > 0 {
            let wave = left.min(slots);
            let n = wave.div_ceil(sms);
            time += (n * per) as f64 / (n * warps).min(busy) as f64 + 1.0;
            left -= wave;
        }
        (splits, per, time)
    };
    fewest_near_best(max_splits, plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_whole_waves() {
        // Llama-3-8B at batch 16, 32k: 128 streams, 1020 packed tiles; 4 blocks an SM × 132.
        let (splits, per) = plan_splits(1020, 128, 4 * 132, 4);
        assert_eq!((splits, per), (4, 255), "512 blocks: one wave, 97% of the slots");
        // The old rule (8 blocks an SM as a target) gave 9 splits: 1,152 blocks, 2.2 waves.
        let time = |s: usize, per: usize| (s * 128).div_ceil(528) * (per.div_ceil(4) + 1);
        assert!(time(splits, per) < time(9, 1020usize.div_ceil(9)));
    }

    #[test]
    fn covers_every_tile_and_keeps_warps_busy() {
        for tiles in [1, 3, 4, 5, 31, 64, 255, 1000, 4093] {
            for bps in [1, 8, 32, 128, 192, 1024] {
                let (splits, per) = plan_splits(tiles, bps, 528, 4);
                assert!(splits >= 1 && splits * per >= tiles && (splits - 1) * per < tiles, "{tiles} {bps}: {splits}×{per}");
                assert!(splits <= tiles.div_ceil(4), "{tiles} {bps}: {splits} splits leave warps without a tile");
            }
        }
        assert_eq!(plan_splits(0, 8, 528, 4), (0, 1));
    }

    #[test]
    fn small_batches_spread_over_the_gpu() {
        // One sequence of Llama-3-8B (8 streams × 4 head chunks): many splits, not one.
        let (splits, _) = plan_splits(1020, 32, 528, 4);
        assert!(splits >= 16, "{splits}");
    }

    #[test]
    fn sm_bound_kernels_take_few_long_blocks() {
        // The two goal shapes on an H100 (132 SMs), 8 busy warps: both at 2 splits, as measured.
        assert_eq!(plan_splits_sm_bound(1020, 128, 4, 132, 4, 8), (2, 510));
        assert_eq!(plan_splits_sm_bound(252, 192, 5, 132, 4, 8), (2, 126));
        // One sequence still spreads over the GPU: 2 blocks on most SMs, not 1 on a few.
        let (splits, per) = plan_splits_sm_bound(1020, 8, 4, 132, 4, 8);
        assert!(8 * splits > 132 && 8 * splits <= 2 * 132, "{splits}×{per}");
        for tiles in [1, 3, 4, 5, 31, 64, 255, 1000, 4093] {
            for bps in [1, 8, 32, 128, 192, 1024] {
                let (splits, per) = plan_splits_sm_bound(tiles, bps, 4, 132, 4, 8);
                assert!(splits >= 1 && splits * per >= tiles && (splits - 1) * per < tiles, "{tiles} {bps}: {splits}×{per}");
                assert!(splits <= tiles.div_ceil(4), "{tiles} {bps}");
            }
        }
        assert_eq!(plan_splits_sm_bound(0, 8, 4, 132, 4, 8), (0, 1));
    }
}
