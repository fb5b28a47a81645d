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
//! The tensor-core kernels are cut differently: every stream's packed tiles end to end,
//! in equal blocks ([`plan_flat`]), as many as fill the SMs' slots at the blocks an SM the
//! caller picks; a block that spans two streams writes a split for each ([`flat_splits`]:
//! the room a stream needs). Cutting by splits a stream, the block count had to be a
//! multiple of the streams: on an H100 (kivi-2, bench attn --splits) both goal shapes ran
//! fastest at 2 splits, 2 or 3 blocks an SM: Llama-3-8B B16 32k 150.6 µs against 154.2,
//! 156.0 and 206.3 µs at 3, 4 and 5; SmolLM2 B64 8k 40.9 against 42.6, 45.6 and 44.8 at 3,
//! 5 and 6 (3 splits there meant 576 blocks: more than one wave of 4 blocks an SM).

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

/// The tensor-core kernels' flat cut (kivi.cu: `tc::decode_attn`): `total` tiles (every
/// stream's, end to end) in blocks of `per` tiles, at most `slots` blocks (one wave: the
/// SMs' slots for this kernel) and at least `min_per` tiles a block. Returns (blocks, per).
/// Every block gets the same work whatever the stream count, so the blocks an SM holds can
/// be chosen for speed alone.
pub fn plan_flat(total: usize, slots: usize, min_per: usize) -> (usize, usize) {
    if total == 0 {
        return (0, 1);
    }
    let per = total.div_ceil(slots.max(1)).max(min_per.max(1));
    (total.div_ceil(per), per)
}

/// The most splits (blocks) any of `streams` streams of `tiles` tiles touches in the flat
/// cut at `per` tiles a block: the partial results each stream needs room for.
pub fn flat_splits(streams: usize, tiles: usize, per: usize) -> usize {
    let per = per.max(1);
    (0..streams).map(|s| (s * tiles + tiles - 1) / per - s * tiles / per + 1).max().unwrap_or(0)
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
    fn flat_cut_fills_one_wave_evenly() {
        // SmolLM2 at batch 64, 8k: 192 streams × 252 packed tiles over 4 blocks × 132 SMs.
        let (blocks, per) = plan_flat(192 * 252, 4 * 132, 8);
        assert_eq!((blocks, per), (526, 92), "one wave (of 528 slots), 92 tiles a block");
        // A block spans at most two streams here, so a stream has at most 4 splits.
        assert_eq!(flat_splits(192, 252, per), 4);
        // Few tiles: no block gets fewer than min_per (each warp has work).
        assert_eq!(plan_flat(20, 528, 8), (3, 8));
        assert_eq!(plan_flat(0, 528, 8), (0, 1));
        for (streams, tiles) in [(1, 1), (3, 7), (8, 1020), (128, 1020), (192, 252), (5, 3)] {
            for slots in [1, 7, 132, 396, 528, 660] {
                let (blocks, per) = plan_flat(streams * tiles, slots, 8);
                assert!(blocks * per >= streams * tiles && (blocks - 1) * per < streams * tiles, "{streams}×{tiles} / {slots}");
                assert!(blocks <= slots.max(streams * tiles / 8 + 1), "{streams}×{tiles} / {slots}");
                // Count each stream's blocks the slow way: every tile's block, distinct.
                let most = (0..streams)
                    .map(|s| {
                        let mut b: Vec<usize> = (0..tiles).map(|t| (s * tiles + t) / per).collect();
                        b.dedup();
                        b.len()
                    })
                    .max()
                    .unwrap();
                assert_eq!(flat_splits(streams, tiles, per), most, "{streams}×{tiles} at {per}");
            }
        }
    }
}
