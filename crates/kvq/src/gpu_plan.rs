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
    let best = (1..=max_splits).map(|k| plan(k).2).min().unwrap_or(1);
    let (splits, per, _) = (1..=max_splits).map(plan).find(|p| p.2 as f64 <= best as f64 * 1.03).unwrap_or_else(|| plan(1));
    (splits, per)
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
}
