//! Where each code of a KIVI tile sits in the GPU cache: the *MMA tile layout*.
//!
//! The GPU cache (`cuda::PackedGpuLayer`) keeps KIVI's codes in tiles of 32 tokens, each
//! laid out for the tensor-core attention (`kernels/kivi.cu`, `tc::decode_attn`): a lane
//! of the warp reads its own 16-byte chunks, and every 32-bit word it reads holds, in each
//! 16-bit half, the codes of several MMA operand registers at fixed bit positions. One AND
//! (or a shift and an AND) then turns a word into an f16 operand register whose two halves
//! are codes as exact subnormals. The bytes are the CPU store's bytes permuted: the same
//! codes, the same count ([`keys_to_blocks`] and [`values_to_rows`] undo the permutation
//! for the byte-for-byte check). This file is the layout's one definition on the host;
//! `kernels/mma_tile.cuh` is its twin on the device.
//!
//! An `mma.m16n8k16` A operand (16 rows × 16 k) gives lane `4g + tq` the elements
//! (row g or g + 8, k 2tq + h or 2tq + 8 + h), h = 0, 1: register r holds rows
//! `g + 8(r & 1)`, ks `2tq + 8(r >> 1)` and `+ 1`, the second in the high half.
//!
//! Keys (scores: rows are tokens t, k are channels c): m-tile `mt = t / 16`, k-step
//! `ks = c / 16`. Values (output: rows are channels, k are tokens): `mt = c / 16`,
//! `ks = t / 16`. Each register's codes sit at one *slot* (bit `slot · bits` of both halves)
//! of one word; a lane's word `w` lies in chunk `w / 4`, word `w % 4` of it, and chunk `i`
//! of lane `l` at byte `16 (32 i + l)` of the tile.
//! - Values: register `(mt, ks, r)` → combo `cc = 2 mt + (r & 1)`, slot `cc % S` (S = 16 / bits
//!   slots a half), word `4 (cc / S) + 2 ks + (r >> 1)`. A row (channel) keeps its slot over
//!   every k-step and tile, so the kernel scales each output row back once, at the end.
//! - 4-bit keys: slot `2 mt + (r & 1)`, word `2 ks + (r >> 1)`.
//! - 2-bit keys: the k-steps split in two halves `kg = ks / (KS / 2)` (KS = D / 16) with
//!   slot `4 kg + 2 mt + (r & 1)` and word `2 (ks % (KS / 2)) + (r >> 1)`: eight slots a half,
//!   and each score row keeps one slot within a half of the channels.
//!
//! So one value token owns whole bytes (the per-token quantize kernel stores them
//! without races), and so does one key channel.
//!
//! Key params (a block's `(min, scale)` per channel, f16 each) are permuted too: the score
//! loop's lane `tq` needs, at k-step `ks`, the scales and mins of channels `c0, c0 + 1,
//! c0 + 8, c0 + 9` (`c0 = 16 ks + 2 tq`) as f16 pairs, so 16-byte chunk `4 ks + tq` of the
//! block's params holds the words (min c0 | c0 + 1, scale c0 | c0 + 1, min c0 + 8 | c0 + 9,
//! scale c0 + 8 | c0 + 9): one shared load and no byte permutes a k-step, and the four
//! registers it fills are as they are the A operand of the MMA that sums `q · min` (its rows
//! `g` hold the mins; rows `g + 8`, the scales, are never read).

use crate::error::{KvqError, Result};

/// Tokens in a tile.
pub const TILE: usize = 32;

fn check(bits: u8, head_dim: usize) -> Result<()> {
    if !matches!(bits, 2 | 4) || !matches!(head_dim, 64 | 128) {
        return Err(KvqError::Unsupported(format!("the MMA tile layout takes 2- or 4-bit codes and head dim 64 or 128, not {bits} bits at {head_dim}")));
    }
    Ok(())
}

/// Bytes of one tile of `head_dim` channels at `bits` bits.
pub fn tile_bytes(bits: u8, head_dim: usize) -> usize {
    TILE * head_dim * bits as usize / 8
}

/// (byte in the tile, bit in the byte) of a lane's word `w`, half `h`, slot `slot`.
fn place(bits: u8, lane: usize, w: usize, h: usize, slot: usize) -> (usize, u32) {
    let bit = 16 * h + slot * bits as usize;
    (16 * (32 * (w / 4) + lane) + 4 * (w % 4) + bit / 8, (bit % 8) as u32)
}

/// Where the code of token `t` (0..32) and channel `c` of a key tile sits: (byte, bit).
/// `bits` must be 2 or 4 and `head_dim` 64 or 128 (see [`tile_bytes`]).
fn key_pos(bits: u8, head_dim: usize, t: usize, c: usize) -> (usize, u32) {
    let (mt, rh, g) = (t / 16, (t / 8) % 2, t % 8);
    let (ks, khalf, tq, h) = (c / 16, (c / 8) % 2, (c / 2) % 4, c % 2);
    let (slot, w) = if bits == 2 {
        let half_ks = head_dim / 32;
        (4 * (ks / half_ks) + 2 * mt + rh, 2 * (ks % half_ks) + khalf)
    } else {
        (2 * mt + rh, 2 * ks + khalf)
    };
    place(bits, 4 * g + tq, w, h, slot)
}

/// Where the code of token `t` (0..32) and channel `c` of a value tile sits: (byte, bit).
fn value_pos(bits: u8, _head_dim: usize, t: usize, c: usize) -> (usize, u32) {
    let (ks, khalf, tq, h) = (t / 16, (t / 8) % 2, (t / 2) % 4, t % 2);
    let (mt, rh, g) = (c / 16, (c / 8) % 2, c % 8);
    let cc = 2 * mt + rh;
    let slots = 16 / bits as usize;
    place(bits, 4 * g + tq, 4 * (cc / slots) + 2 * ks + khalf, h, cc % slots)
}

fn get(bytes: &[u8], (byte, bit): (usize, u32), bits: u8) -> u8 {
    (bytes[byte] >> bit) & ((1u8 << bits) - 1)
}

/// A CPU store's code: the `i`-th code of a buffer packed least significant bit first.
fn packed(i: usize, bits: u8) -> (usize, u32) {
    let bit = i * bits as usize;
    (bit / 8, (bit % 8) as u32)
}

/// `out_len` bytes holding each code of `src` moved from its first place to its second.
fn move_codes(src: &[u8], out_len: usize, bits: u8, moves: impl Iterator<Item = ((usize, u32), (usize, u32))>) -> Vec<u8> {
    let mut out = vec![0u8; out_len];
    for (from, (byte, bit)) in moves {
        out[byte] |= get(src, from, bits) << bit;
    }
    out
}

/// Every key code of `len` bytes of whole blocks: (its place in the MMA tiles, in the CPU blocks).
fn key_places(bits: u8, head_dim: usize, group: usize, len: usize) -> Result<impl Iterator<Item = ((usize, u32), (usize, u32))>> {
    check(bits, head_dim)?;
    let block_bytes = head_dim * group * bits as usize / 8;
    if group == 0 || group % TILE != 0 || len % block_bytes != 0 {
        return Err(KvqError::Shape(format!("{len} bytes are not whole key blocks of {group} tokens")));
    }
    let tb = tile_bytes(bits, head_dim);
    Ok((0..len / block_bytes * group).flat_map(move |t| {
        (0..head_dim).map(move |c| {
            let (byte, bit) = key_pos(bits, head_dim, t % TILE, c);
            ((t / TILE * tb + byte, bit), packed((t / group * head_dim + c) * group + t % group, bits))
        })
    }))
}

/// Every value code of `tokens` tokens: (its place in the MMA tiles, in the CPU rows).
fn value_places(bits: u8, head_dim: usize, tokens: usize) -> Result<impl Iterator<Item = ((usize, u32), (usize, u32))>> {
    check(bits, head_dim)?;
    let tb = tile_bytes(bits, head_dim);
    Ok((0..tokens).flat_map(move |t| {
        (0..head_dim).map(move |c| {
            let (byte, bit) = value_pos(bits, head_dim, t % TILE, c);
            ((t / TILE * tb + byte, bit), packed(t * head_dim + c, bits))
        })
    }))
}

/// Where channel `c`'s key min (`scale == false`) or scale sits among its block's
/// `2 · head_dim` f16 params (the CPU store has them at `2c` and `2c + 1`).
fn key_param_pos(c: usize, scale: bool) -> usize {
    let (ks, khalf, tq, h) = (c / 16, (c / 8) % 2, (c / 2) % 4, c % 2);
    2 * (4 * (4 * ks + tq) + 2 * khalf + usize::from(scale)) + h
}

/// `words` of key params, whole blocks of `head_dim` channels, each word as the CPU store
/// has it (min in the low half, scale in the high half), with their f16s moved into the GPU order (`to_tiles`) or back.
fn move_key_params(head_dim: usize, words: &[u32], to_tiles: bool) -> Result<Vec<u32>> {
    if !matches!(head_dim, 64 | 128) || words.len() % head_dim != 0 {
        return Err(KvqError::Shape(format!("{} key params are not whole blocks of {head_dim} channels (head dim 64 or 128)", words.len())));
    }
    let half = |w: &[u32], i: usize| (w[i / 2] >> (16 * (i % 2))) & 0xFFFF;
    let mut out = vec![0u32; words.len()];
    for (src, dst) in words.chunks(head_dim).zip(out.chunks_mut(head_dim)) {
        for c in 0..head_dim {
            for scale in [false, true] {
                let (cpu, gpu) = (2 * c + usize::from(scale), key_param_pos(c, scale));
                let (from, to) = if to_tiles { (cpu, gpu) } else { (gpu, cpu) };
                dst[to / 2] |= half(src, from) << (16 * (to % 2));
            }
        }
    }
    Ok(out)
}

/// Key params as the CPU store keeps them (a word per channel: min | scale << 16) → the
/// GPU cache's order (see the module's doc).
pub fn params_to_key_tiles(head_dim: usize, words: &[u32]) -> Result<Vec<u32>> {
    move_key_params(head_dim, words, true)
}

/// The GPU cache's key params → the CPU store's order (the inverse of [`params_to_key_tiles`]).
pub fn key_tiles_to_params(head_dim: usize, words: &[u32]) -> Result<Vec<u32>> {
    move_key_params(head_dim, words, false)
}

/// KIVI key codes as the CPU store packs them (blocks of `group` tokens, each channel's
/// `group` codes together) → MMA tiles (tile `i` = tokens 32i .. 32i + 32).
pub fn blocks_to_keys(bits: u8, head_dim: usize, group: usize, blocks: &[u8]) -> Result<Vec<u8>> {
    Ok(move_codes(blocks, blocks.len(), bits, key_places(bits, head_dim, group, blocks.len())?.map(|(tile, cpu)| (cpu, tile))))
}

/// MMA key tiles → the CPU store's key blocks (the inverse of [`blocks_to_keys`]).
pub fn keys_to_blocks(bits: u8, head_dim: usize, group: usize, tiles: &[u8]) -> Result<Vec<u8>> {
    Ok(move_codes(tiles, tiles.len(), bits, key_places(bits, head_dim, group, tiles.len())?))
}

/// Value codes as the CPU store packs them (one row of `head_dim` codes a token) →
/// MMA tiles; a last partial tile is padded with zero codes.
pub fn rows_to_values(bits: u8, head_dim: usize, rows: &[u8]) -> Result<Vec<u8>> {
    check(bits, head_dim)?;
    let row = head_dim * bits as usize / 8;
    if rows.len() % row != 0 {
        return Err(KvqError::Shape(format!("{} bytes are not whole rows of {row}", rows.len())));
    }
    let tokens = rows.len() / row;
    let out_len = tokens.div_ceil(TILE) * tile_bytes(bits, head_dim);
    Ok(move_codes(rows, out_len, bits, value_places(bits, head_dim, tokens)?.map(|(tile, cpu)| (cpu, tile))))
}

/// The first `tokens` value rows held in MMA tiles (the inverse of [`rows_to_values`]).
pub fn values_to_rows(bits: u8, head_dim: usize, tiles: &[u8], tokens: usize) -> Result<Vec<u8>> {
    check(bits, head_dim)?;
    if tiles.len() < tokens.div_ceil(TILE) * tile_bytes(bits, head_dim) {
        return Err(KvqError::Shape(format!("{} bytes hold fewer than {tokens} tokens of value tiles", tiles.len())));
    }
    Ok(move_codes(tiles, tokens * head_dim * bits as usize / 8, bits, value_places(bits, head_dim, tokens)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (token, channel) gets its own bits, and together they fill the tile.
    fn is_bijection(bits: u8, d: usize, pos: fn(u8, usize, usize, usize) -> (usize, u32)) -> bool {
        let mut seen = vec![false; tile_bytes(bits, d) * 8];
        for t in 0..TILE {
            for c in 0..d {
                let (byte, bit) = pos(bits, d, t, c);
                for b in 0..bits as usize {
                    let i = 8 * byte + bit as usize + b;
                    if bit as usize + b >= 8 || i >= seen.len() || seen[i] {
                        return false;
                    }
                    seen[i] = true;
                }
            }
        }
        seen.iter().all(|&s| s)
    }

    #[test]
    fn positions_cover_the_tile_once() {
        for bits in [2, 4] {
            for d in [64, 128] {
                assert!(is_bijection(bits, d, key_pos), "keys {bits} bits, d {d}");
                assert!(is_bijection(bits, d, value_pos), "values {bits} bits, d {d}");
            }
        }
    }

    /// The register of the A operand that holds (row, k) on lane 4g + tq: (lane, r, half).
    fn operand(row: usize, k: usize) -> (usize, usize, usize) {
        (4 * (row % 8) + (k % 8) / 2, (row / 8) + 2 * (k / 8), k % 2)
    }

    /// What the kernel relies on: a lane's register sits in its own words at one slot,
    /// the same in both halves; for values a channel's slot never changes with the k-step,
    /// and for keys a token's slot is one within each half of the channels.
    #[test]
    fn registers_sit_where_the_kernel_reads_them() {
        for bits in [2u8, 4] {
            for d in [64usize, 128] {
                let slot_of = |byte: usize, bit: u32| ((8 * (byte % 4) + bit as usize) % 16) / bits as usize;
                for t in 0..TILE {
                    for c in 0..d {
                        // Keys: row t, k = c.
                        let (byte, bit) = key_pos(bits, d, t, c);
                        let (lane, r, h) = operand(t % 16, c % 16);
                        assert_eq!((byte / 16) % 32, lane);
                        assert_eq!(((8 * (byte % 4) + bit as usize) / 16), h);
                        let (kg, mt) = (if bits == 2 { (c / 16) / (d / 32) } else { 0 }, t / 16);
                        let want = if bits == 2 { 4 * kg + 2 * mt + (r & 1) } else { 2 * mt + (r & 1) };
                        assert_eq!(slot_of(byte, bit), want);
                        // Values: row c, k = t.
                        let (byte, bit) = value_pos(bits, d, t, c);
                        let (lane, r, h) = operand(c % 16, t % 16);
                        assert_eq!((byte / 16) % 32, lane);
                        assert_eq!(((8 * (byte % 4) + bit as usize) / 16), h);
                        assert_eq!(slot_of(byte, bit), (2 * (c / 16) + (r & 1)) % (16 / bits as usize));
                    }
                }
            }
        }
    }

    #[test]
    fn round_trips() {
        let mut rng = crate::rng::SplitMix64::new(7);
        for bits in [2u8, 4] {
            for d in [64usize, 128] {
                for group in [32usize, 64] {
                    let blocks: Vec<u8> = (0..3 * d * group * bits as usize / 8).map(|_| rng.next_u64() as u8).collect();
                    let tiles = blocks_to_keys(bits, d, group, &blocks).unwrap();
                    assert_ne!(tiles, blocks);
                    assert_eq!(keys_to_blocks(bits, d, group, &tiles).unwrap(), blocks);
                }
                let rows: Vec<u8> = (0..45 * d * bits as usize / 8).map(|_| rng.next_u64() as u8).collect();
                let tiles = rows_to_values(bits, d, &rows).unwrap();
                assert_eq!(tiles.len(), 2 * tile_bytes(bits, d));
                assert_eq!(values_to_rows(bits, d, &tiles, 45).unwrap(), rows);
            }
        }
        for d in [64usize, 128] {
            let words: Vec<u32> = (0..3 * d).map(|_| rng.next_u64() as u32).collect();
            let tiles = params_to_key_tiles(d, &words).unwrap();
            assert_ne!(tiles, words);
            assert_eq!(key_tiles_to_params(d, &tiles).unwrap(), words);
            // The words the score loop loads for lane tq at k-step ks.
            let f16_at = |c: usize, scale: bool| (words[c] >> (16 * usize::from(scale))) & 0xFFFF;
            for ks in 0..d / 16 {
                for tq in 0..4 {
                    let c0 = 16 * ks + 2 * tq;
                    let pair = |c: usize, scale: bool| f16_at(c, scale) | f16_at(c + 1, scale) << 16;
                    assert_eq!(tiles[4 * (4 * ks + tq)..4 * (4 * ks + tq) + 4], [pair(c0, false), pair(c0, true), pair(c0 + 8, false), pair(c0 + 8, true)]);
                }
            }
        }
        assert!(params_to_key_tiles(96, &[0; 96]).is_err());
        assert!(key_tiles_to_params(64, &[0; 65]).is_err());
        assert!(blocks_to_keys(3, 128, 32, &[]).is_err());
        assert!(keys_to_blocks(2, 128, 48, &[0; 1536]).is_err());
        assert!(values_to_rows(2, 64, &[0; 16], 1).is_err());
    }
}
