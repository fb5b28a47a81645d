//! A lane-by-lane model of the tensor-core decode attention in `kernels/kivi.cu`
//! (`tc::decode_attn`), run on the CPU against the CPU cache.
//!
//! CI has no GPU, and the GPU benchmark (`bench/gpu.sh run`) checks the kernel itself
//! only where a GPU is lent. This test replays the kernel's arithmetic for each of a
//! warp's 32 lanes on the bytes the CPU cache packs (KIVI's through `kvq::mma_tile`, the
//! GPU cache's tile layout): the bit tricks that turn packed codes into f16 MMA operands, the fragment layouts of `mma.m16n8k16` and `movmatrix`
//! (as the PTX ISA defines them), the shuffles, the subnormal scale factors, the online softmax and
//! the merge of the warps. Its output must match the CPU cache's attention. It is a
//! model, not the kernel: a change to one must be made to the other.

use half::f16;
use kvq::cache::{Cache, CacheConfig, CacheShape, KvCache, Overrides, Scheme};
use kvq::rng::SplitMix64;

type Lanes<T> = [T; 32];
const WARPS: usize = 4;
const NQ: usize = 8;

fn lanes<T>(f: impl FnMut(usize) -> T) -> Lanes<T> {
    std::array::from_fn(f)
}

// ---- the device intrinsics
/// `__byte_perm(x, y, s)`: byte i of the result is byte `s[4i..4i+3]` of y:x.
fn byte_perm(x: u32, y: u32, s: u32) -> u32 {
    let bytes = ((y as u64) << 32) | x as u64;
    (0..4).fold(0, |r, i| r | ((((bytes >> (8 * ((s >> (4 * i)) & 7))) & 0xff) as u32) << (8 * i)))
}
/// `__floats2half2_rn`: round to nearest even, `lo` in the low half.
fn h2(lo: f32, hi: f32) -> u32 {
    f16::from_f32(lo).to_bits() as u32 | (f16::from_f32(hi).to_bits() as u32) << 16
}
fn h2h(lo: f16, hi: f16) -> u32 {
    lo.to_bits() as u32 | (hi.to_bits() as u32) << 16
}
/// `__hmul2` / `__hfma2` on one half: the exact product (and sum, exact in f64 for
/// f16 inputs) rounded once to f16, as the hardware does.
fn hmul(a: f16, b: f32) -> f16 {
    f16::from_f64(a.to_f64() * b as f64)
}
fn hfma(a: f16, b: f32, c: f16) -> f16 {
    f16::from_f64(a.to_f64() * b as f64 + c.to_f64())
}
fn unh2(x: u32) -> (f32, f32) {
    (f16::from_bits(x as u16).to_f32(), f16::from_bits((x >> 16) as u16).to_f32())
}
/// `mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`. Lane l (g = l/4, t = l%4) holds
/// A (16×16) elements (g, 2t..2t+1) in register 0, (g+8, 2t..) in 1, (g, 2t+8..) in 2,
/// (g+8, 2t+8..) in 3; B (16×8) (2t..2t+1, g) in b0 and (2t+8..2t+9, g) in b1;
/// C (16×8) (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
fn mma(c: &mut Lanes<[f32; 4]>, a: &Lanes<[u32; 4]>, b0: &Lanes<u32>, b1: &Lanes<u32>) {
    let mut am = [[0f32; 16]; 16];
    let mut bm = [[0f32; 8]; 16];
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for (r, (row, col)) in [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)].into_iter().enumerate() {
            (am[row][col], am[row][col + 1]) = unh2(a[l][r]);
        }
        (bm[2 * t][g], bm[2 * t + 1][g]) = unh2(b0[l]);
        (bm[2 * t + 8][g], bm[2 * t + 9][g]) = unh2(b1[l]);
    }
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for (i, (row, col)) in [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)].into_iter().enumerate() {
            let dot: f64 = (0..16).map(|k| am[row][k] as f64 * bm[k][col] as f64).sum();
            c[l][i] = (c[l][i] as f64 + dot) as f32;
        }
    }
}
/// `movmatrix.sync.aligned.m8n8.trans.b16`: lane l holds row l/4, columns 2(l%4), +1.
fn transpose8x8(x: &Lanes<u32>) -> Lanes<u32> {
    let mut m = [[0u16; 8]; 8];
    for l in 0..32 {
        m[l / 4][2 * (l % 4)] = x[l] as u16;
        m[l / 4][2 * (l % 4) + 1] = (x[l] >> 16) as u16;
    }
    lanes(|l| {
        let (r, c) = (l / 4, 2 * (l % 4));
        m[c][r] as u32 | (m[c + 1][r] as u32) << 16
    })
}
fn shfl_xor(v: &Lanes<f32>, mask: usize) -> Lanes<f32> {
    lanes(|l| v[l ^ mask])
}

// ---- the kernel's helpers
// Codes become f16 subnormals: code c at bit `pos` of a half is c·2^(pos − 24).
fn pair2(u: u32, v: u32, sel: u32, mask: u32) -> (u32, u32) {
    (byte_perm(u, v, sel) & mask, byte_perm(u, v, sel + 0x0202) & mask)
}
fn pair4(u: u32, v: u32, sel: u32, mask: u32) -> u32 {
    byte_perm(u, v, sel) & mask
}

/// `slot_operand`: slot j of an MMA-tile word as an f16 operand register (kernels/kivi.cu).
/// The slots of a half's low byte after one AND, those of its high byte after a shift by 8.
fn slot_operand(w: u32, j: usize, bits: usize) -> u32 {
    let low = 8 / bits;
    let mask = (if bits == 2 { 0x0003_0003 } else { 0x000F_000F }) << (bits * (j % low));
    if j < low { w & mask } else { (w >> 8) & mask }
}
/// Where slot j's code sits in the operand (code · 2^(p − 24)).
fn slot_pos(j: usize, bits: usize) -> i32 {
    (bits * (j % (8 / bits))) as i32
}
/// Key slot of score rows (m-tile mt, row half rh) in channel half kg.
fn key_slot(kg: usize, mt: usize, rh: usize, bits: usize) -> usize {
    if bits == 2 { 4 * kg + 2 * mt + rh } else { 2 * mt + rh }
}
/// Word w of lane ln in an MMA tile (chunk w / 4 at 16(32(w / 4) + ln)).
fn lane_word(tile: &[u8], ln: usize, w: usize) -> u32 {
    word(tile, 16 * (32 * (w / 4) + ln) + 4 * (w % 4))
}

/// What the kernel sees of one stream: the CPU cache's packed bytes.
struct Stream<'a> {
    /// Keys per token (the per-token cache) rather than per channel (KIVI).
    tk: bool,
    d: usize,
    kb: usize,
    vb: usize,
    group: usize,
    gpt: usize,
    kcodes: &'a [u8],
    kparams: Vec<(f32, f32)>,
    vcodes: &'a [u8],
    vparams: Vec<(f32, f32)>,
}

impl Stream<'_> {
    /// One tile's shared-memory stage, laid out as the kernel's cp.async copies it: the
    /// per-token cache's rows, or KIVI's MMA tiles (the GPU cache's layout: the CPU
    /// cache's bytes through kvq::mma_tile's permutation; key params as words in its order).
    fn stage(&self, tile: usize) -> (Vec<u8>, Vec<(f32, f32)>, Vec<u8>, Vec<(f32, f32)>) {
        let (d, t0) = (self.d, tile * 32);
        let vrow = d * self.vb / 8;
        let mut vc = self.vcodes[t0 * vrow..(t0 + 32) * vrow].to_vec();
        let vp = self.vparams[t0 * self.gpt..(t0 + 32) * self.gpt].to_vec();
        if self.tk {
            let krow = d * self.kb / 8;
            let kc = self.kcodes[t0 * krow..(t0 + 32) * krow].to_vec();
            let kp = self.kparams[t0 * self.gpt..(t0 + 32) * self.gpt].to_vec();
            return (kc, kp, vc, vp);
        }
        vc = kvq::mma_tile::rows_to_values(self.vb as u8, d, &vc).unwrap();
        let blk = t0 / self.group;
        let block_bytes = d * self.group * self.kb / 8;
        let tiles = kvq::mma_tile::blocks_to_keys(self.kb as u8, d, self.group, &self.kcodes[blk * block_bytes..(blk + 1) * block_bytes]).unwrap();
        let tb = kvq::mma_tile::tile_bytes(self.kb as u8, d);
        let kc = tiles[(t0 % self.group) / 32 * tb..][..tb].to_vec();
        // The block's key params in the GPU cache's order: word i as an (f16, f16) pair.
        let words: Vec<u32> = self.kparams[blk * d..(blk + 1) * d].iter().map(|&(mn, sc)| h2(mn, sc)).collect();
        let kp = kvq::mma_tile::params_to_key_tiles(d, &words).unwrap().into_iter().map(unh2).collect();
        (kc, kp, vc, vp)
    }
}

fn token_row(buf: &[f32], stream: usize, n: usize, d: usize, t: usize) -> &[f32] {
    &buf[(stream * n + t) * d..(stream * n + t + 1) * d]
}

fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

/// Per-token keys' scores for one tile: per key group, MMAs of the tokens' codes (rows) with
/// the pre-scaled q, then each row times its token's scale (×2^24) plus min · Σq.
#[allow(clippy::too_many_arguments)]
fn token_scores(st: &Stream, kc: &[u8], kp: &[(f32, f32)], hi: &[Vec<f16>], lo: &[Vec<f16>], qsum: &[Vec<f32>], sc: &mut [Lanes<[f32; 4]>; 2]) {
    let (d, kb, gpt) = (st.d, st.kb, st.gpt);
    let krow = d * kb / 8;
    let spg = d / 16 / gpt;
    let selt = |ln: usize| (if kb == 2 { (ln % 4) >> 1 } else { ln % 4 }) as u32 * 0x0101 + 0x4040;
    let maskt = |ln: usize| if kb == 2 { let p = 4 * ((ln % 4) & 1); (3u32 << p) | (3u32 << (16 + p + 2)) } else { 0x000F | 0x00F0_0000 };
    for gr in 0..gpt {
        let mut acc2: [Lanes<[f32; 4]>; 2] = [[[0.0; 4]; 32]; 2];
        for kk in 0..spg {
            let ks = gr * spg + kk;
            let (mut a0, mut a1) = ([[0u32; 4]; 32], [[0u32; 4]; 32]);
            let (mut bh0, mut bh1, mut bl0, mut bl1) = ([0u32; 32], [0u32; 32], [0u32; 32], [0u32; 32]);
            for ln in 0..32 {
                let (g, tq) = (ln / 4, ln % 4);
                let c0 = 16 * ks + 2 * tq;
                (bh0[ln], bh1[ln]) = (h2h(hi[g][c0], hi[g][c0 + 1]), h2h(hi[g][c0 + 8], hi[g][c0 + 9]));
                (bl0[ln], bl1[ln]) = (h2h(lo[g][c0], lo[g][c0 + 1]), h2h(lo[g][c0 + 8], lo[g][c0 + 9]));
                let regs = |t: usize| -> (u32, u32) {
                    if kb == 2 {
                        let w = word(kc, t * krow + 4 * ks);
                        (byte_perm(w, 0, selt(ln)) & maskt(ln), byte_perm(w, 0, selt(ln) + 0x0202) & maskt(ln))
                    } else {
                        let (w0, w1) = (word(kc, t * krow + 8 * ks), word(kc, t * krow + 8 * ks + 4));
                        (byte_perm(w0, 0, selt(ln)) & maskt(ln), byte_perm(w1, 0, selt(ln)) & maskt(ln))
                    }
                };
                let ((x0, x2), (x1, x3)) = (regs(g), regs(g + 8));
                a0[ln] = [x0, x1, x2, x3];
                let ((y0, y2), (y1, y3)) = (regs(g + 16), regs(g + 24));
                a1[ln] = [y0, y1, y2, y3];
            }
            mma(&mut acc2[0], &a0, &bh0, &bh1);
            mma(&mut acc2[0], &a0, &bl0, &bl1);
            mma(&mut acc2[1], &a1, &bh0, &bh1);
            mma(&mut acc2[1], &a1, &bl0, &bl1);
        }
        for mt in 0..2 {
            for ln in 0..32 {
                let (g, tq) = (ln / 4, ln % 4);
                for e in 0..4 {
                    let (mn, scale) = kp[(16 * mt + g + 8 * (e >> 1)) * gpt + gr];
                    sc[mt][ln][e] = acc2[mt][ln][e].mul_add(scale * 16_777_216.0, mn.mul_add(qsum[2 * tq + (e & 1)][gr], sc[mt][ln][e]));
                }
            }
        }
    }
}

/// One warp's online-softmax state after its tiles: per query, (max, sum, output[D]).
struct WarpState {
    m: Vec<f32>,
    l: Vec<f32>,
    out: Vec<Vec<f32>>,
}

/// The kernel's loop body for every tile of `tiles`, one warp. `sq`: [NQ][D] queries
/// times the softmax scale in log2 units (zero rows past `rep`). `half` (KIVI, at most 4
/// queries): the score MMAs' columns 0–3 take x's hi part, 4–7 its lo part, of queries 0–3.
fn warp_tiles(st: &Stream, sq: &[Vec<f32>], tiles: &[usize], half: bool) -> WarpState {
    let (d, kb, vb, gpt) = (st.d, st.kb, st.vb, st.gpt);
    let ks_n = d / 16;
    let vrow = d * vb / 8;
    let mut m: Lanes<[f32; 2]> = [[f32::NEG_INFINITY; 2]; 32];
    let mut l: Lanes<[f32; 2]> = [[0.0; 2]; 32];
    let mut acc: Vec<Lanes<[f32; 4]>> = vec![[[0.0; 4]; 32]; ks_n];
    // Σ p·min_v of group g % gpt (MMA rows g, g + 8), queries 2tq, 2tq + 1.
    let mut extra: Lanes<[f32; 4]> = [[0.0; 4]; 32];
    // Per lane (g = l / 4): byte selectors, masks, and the factor back from subnormals.
    let sel2 = |l: usize| ((l / 4) >> 2) as u32 | ((4 + ((l / 4) >> 2)) as u32) << 8;
    let mask2 = |l: usize| (3u32 << (2 * ((l / 4) & 3))) * 0x0001_0001;
    let sel4 = |l: usize| ((l / 4) >> 1) as u32 | ((4 + ((l / 4) >> 1)) as u32) << 8;
    let mask4 = |l: usize| (15u32 << (4 * ((l / 4) & 1))) * 0x0001_0001;
    let pos = |l: usize, bits: usize| if bits == 2 { 2 * ((l / 4) & 3) } else { 4 * ((l / 4) & 1) } as i32;
    let vf = |l: usize| 2f32.powi(24 - pos(l, vb));
    // The queries as the kernel keeps them in shared memory: f16 hi + lo.
    let sq_hi: Vec<Vec<f16>> = sq.iter().map(|r| r.iter().map(|&x| f16::from_f32(x)).collect()).collect();
    let sq_lo: Vec<Vec<f16>> = sq.iter().zip(&sq_hi).map(|(r, h)| r.iter().zip(h).map(|(&x, &h)| f16::from_f32(x - h.to_f32())).collect()).collect();
    // Per-token keys: q times 2^-(bit of its channel's code in the operand half), then hi + lo;
    // and Σ q over each key group (summed in channel order, as the kernel does).
    let code_bit = |c: usize| {
        let t = (c % 16 % 8) / 2;
        let lo = if kb == 2 { 4 * (t & 1) } else { 0 };
        if c % 2 == 0 { lo } else if kb == 2 { lo + 2 } else { 4 }
    };
    let tq_x: Vec<Vec<f32>> = sq.iter().map(|r| r.iter().enumerate().map(|(c, &x)| x * 2f32.powi(-(code_bit(c) as i32))).collect()).collect();
    let tq_hi: Vec<Vec<f16>> = tq_x.iter().map(|r| r.iter().map(|&x| f16::from_f32(x)).collect()).collect();
    let tq_lo: Vec<Vec<f16>> = tq_x.iter().zip(&tq_hi).map(|(r, h)| r.iter().zip(h).map(|(&x, &h)| f16::from_f32(x - h.to_f32())).collect()).collect();
    let qsum: Vec<Vec<f32>> = sq.iter().map(|r| r.chunks(d / gpt).map(|g| g.iter().fold(0f32, |a, &x| a + x)).collect()).collect();
    for &tile in tiles {
        let (kc, kp, vc, vp) = st.stage(tile);
        // Scores: x = q·scale as f16 hi + lo from q's f16 hi + lo (f16 products, the
        // rounding error of hi recovered exactly by an FMA); Σ q·min by an MMA whose A
        // rows all hold the mins.
        let mut sc: [Lanes<[f32; 4]>; 2] = [[[0.0; 4]; 32]; 2];
        if st.tk {
            token_scores(st, &kc, &kp, &tq_hi, &tq_lo, &qsum, &mut sc);
        } else {
        let mut bc: Lanes<[f32; 4]> = [[0.0; 4]; 32];
        for ks in 0..ks_n {
            let (mut a0, mut a1, mut mins) = ([[0u32; 4]; 32], [[0u32; 4]; 32], [[0u32; 4]; 32]);
            let (mut bh0, mut bh1, mut bl0, mut bl1) = ([0u32; 32], [0u32; 32], [0u32; 32], [0u32; 32]);
            let (mut qh0, mut qh1, mut ql0, mut ql1) = ([0u32; 32], [0u32; 32], [0u32; 32], [0u32; 32]);
            for ln in 0..32 {
                let (g, tq) = (ln / 4, ln % 4);
                let c0 = 16 * ks + 2 * tq;
                // half: lane g < 4 holds query g's hi where the lo part goes and 0 where the hi
                // part goes (its "lo" is then its hi), lane g ≥ 4 query g − 4's hi and lo.
                let (qh, ql) = match (half, g) {
                    (true, 0..4) => (vec![f16::ZERO; d], sq_hi[g].clone()),
                    (true, _) => (sq_hi[g - 4].clone(), sq_lo[g - 4].clone()),
                    (false, _) => (sq_hi[g].clone(), sq_lo[g].clone()),
                };
                // One 16-byte chunk: (min c0 | c0 + 1, scale c0 | c0 + 1, min c0 + 8 | c0 + 9, scale c0 + 8 | c0 + 9).
                let u = 4 * (4 * ks + tq);
                let (p0, p1) = ((kp[u].0, kp[u + 1].0), (kp[u].1, kp[u + 1].1));
                let (p8, p9) = ((kp[u + 2].0, kp[u + 3].0), (kp[u + 2].1, kp[u + 3].1));
                let pair = |q: &[f16], c: usize, s: (f32, f32), t: (f32, f32)| {
                    let (h, l) = (hmul(q[c], s.1), hmul(q[c + 1], t.1));
                    (h2h(h, l), [h, l])
                };
                let (h01, hi01) = pair(&qh, c0, p0, p1);
                let (h89, hi89) = pair(&qh, c0 + 8, p8, p9);
                let lo = |c: usize, s: f32, hi: f16| hfma(ql[c], s, hfma(qh[c], s, -hi));
                (bh0[ln], bh1[ln]) = (h01, h89);
                bl0[ln] = h2h(lo(c0, p0.1, hi01[0]), lo(c0 + 1, p1.1, hi01[1]));
                bl1[ln] = h2h(lo(c0 + 8, p8.1, hi89[0]), lo(c0 + 9, p9.1, hi89[1]));
                (qh0[ln], qh1[ln]) = (h2h(qh[c0], qh[c0 + 1]), h2h(qh[c0 + 8], qh[c0 + 9]));
                (ql0[ln], ql1[ln]) = (h2h(ql[c0], ql[c0 + 1]), h2h(ql[c0 + 8], ql[c0 + 9]));
                // The params' load as it is: rows g get the mins, rows g + 8 the scales (unread).
                let (m01, m89) = (h2(p0.0, p1.0), h2(p8.0, p9.0));
                mins[ln] = [m01, h2(p0.1, p1.1), m89, h2(p8.1, p9.1)];
                // Register r of m-tile mt: word wi + (r >> 1) at slot key_slot(kg, mt, r & 1).
                let (kg, wi) = if kb == 2 { (ks / (ks_n / 2), 2 * (ks % (ks_n / 2))) } else { (0, 2 * ks) };
                let reg = |mt: usize, r: usize| slot_operand(lane_word(&kc, ln, wi + (r >> 1)), key_slot(kg, mt, r & 1, kb), kb);
                a0[ln] = std::array::from_fn(|r| reg(0, r));
                a1[ln] = std::array::from_fn(|r| reg(1, r));
            }
            // (2-bit: the second half of the channels reads slots 4–7 at slots 0–3's positions,
            // so the sums add as they are.)
            if half {
                mma(&mut sc[0], &a0, &bl0, &bl1);
                mma(&mut sc[1], &a1, &bl0, &bl1);
                mma(&mut bc, &mins, &ql0, &ql1);
            } else {
                mma(&mut sc[0], &a0, &bh0, &bh1);
                mma(&mut sc[0], &a0, &bl0, &bl1);
                mma(&mut sc[1], &a1, &bh0, &bh1);
                mma(&mut sc[1], &a1, &bl0, &bl1);
                mma(&mut bc, &mins, &qh0, &qh1);
                mma(&mut bc, &mins, &ql0, &ql1);
            }
        }
        for (mt, s) in sc.iter_mut().enumerate() {
            for ln in 0..32 {
                for e in 0..4 {
                    let kf = 2f32.powi(24 - slot_pos(key_slot(usize::from(kb == 2), mt, e >> 1, kb), kb));
                    s[ln][e] = s[ln][e].mul_add(kf, bc[ln][e & 1]);
                }
            }
            if half {
                // Column n + 4 (lo) sits in lane tq + 2 of column n (hi): a shuffle adds them.
                let before = *s;
                for ln in 0..32 {
                    for e in 0..4 {
                        s[ln][e] += before[ln ^ 2][e];
                    }
                }
            }
        }
        }

        // Online softmax.
        let mut corr: Lanes<[f32; 2]> = [[0.0; 2]; 32];
        for j in 0..2 {
            let mut mx: Lanes<f32> = lanes(|ln| sc[0][ln][j].max(sc[0][ln][j + 2]).max(sc[1][ln][j].max(sc[1][ln][j + 2])));
            for o in [4, 8, 16] {
                let other = shfl_xor(&mx, o);
                mx = lanes(|ln| mx[ln].max(other[ln]));
            }
            for ln in 0..32 {
                let mn = m[ln][j].max(mx[ln]);
                corr[ln][j] = (m[ln][j] - mn).exp2();
                m[ln][j] = mn;
                let mut ps = 0.0;
                for mt in 0..2 {
                    sc[mt][ln][j] = (sc[mt][ln][j] - mn).exp2();
                    sc[mt][ln][j + 2] = (sc[mt][ln][j + 2] - mn).exp2();
                    ps += sc[mt][ln][j] + sc[mt][ln][j + 2];
                }
                l[ln][j] = l[ln][j] * corr[ln][j] + ps;
            }
        }
        for ln in 0..32 {
            for a in acc.iter_mut() {
                for i in 0..4 {
                    a[ln][i] *= corr[ln][i & 1];
                }
            }
            extra[ln][0] *= corr[ln][0];
            extra[ln][1] *= corr[ln][1];
        }

        // Output: p to f16, transposed to the B layout, scaled per value group in f16;
        // Σ p·min_v by an MMA whose row g holds group g % gpt's mins.
        for ks in 0..2 {
            let pt0 = transpose8x8(&lanes(|ln| h2(sc[ks][ln][0], sc[ks][ln][1])));
            let pt8 = transpose8x8(&lanes(|ln| h2(sc[ks][ln][2], sc[ks][ln][3])));
            let t0 = |ln: usize| 16 * ks + 2 * (ln % 4);
            let scaled = |pt: &Lanes<u32>, ln: usize, t: usize, gr: usize| {
                let (a, b) = unh2(pt[ln]);
                h2h(hmul(f16::from_f32(a), vp[t * gpt + gr].1), hmul(f16::from_f32(b), vp[(t + 1) * gpt + gr].1))
            };
            let b0s: Vec<Lanes<u32>> = (0..gpt).map(|gr| lanes(|ln| scaled(&pt0, ln, t0(ln), gr))).collect();
            let b1s: Vec<Lanes<u32>> = (0..gpt).map(|gr| lanes(|ln| scaled(&pt8, ln, t0(ln) + 8, gr))).collect();
            let mins: Lanes<[u32; 4]> = lanes(|ln| {
                let (t, gr) = (t0(ln), (ln / 4) % gpt);
                let (m01, m89) = (h2(vp[t * gpt + gr].0, vp[(t + 1) * gpt + gr].0), h2(vp[(t + 8) * gpt + gr].0, vp[(t + 9) * gpt + gr].0));
                [m01, m01, m89, m89]
            });
            mma(&mut extra, &mins, &pt0, &pt8);
            if !st.tk {
                // KIVI's MMA tile: register r of m-tile mt is word 4(cc / vs) + 2ks + (r >> 1)
                // at slot cc % vs, cc = 2mt + (r & 1).
                let vs = 16 / vb;
                for mt in 0..ks_n {
                    let gr = mt * gpt / ks_n;
                    let a: Lanes<[u32; 4]> = lanes(|ln| {
                        std::array::from_fn(|r| {
                            let cc = 2 * mt + (r & 1);
                            slot_operand(lane_word(&vc, ln, 4 * (cc / vs) + 2 * ks + (r >> 1)), cc % vs, vb)
                        })
                    });
                    mma(&mut acc[mt], &a, &b0s[gr], &b1s[gr]);
                }
                continue;
            }
            for w4 in 0..vrow / 16 {
                let row = |ln: usize, dt: usize, e: usize| word(&vc, (16 * ks + 2 * (ln % 4) + dt) * vrow + 16 * w4 + 4 * e);
                if vb == 2 {
                    for e in 0..4 {
                        let mt = 4 * w4 + e;
                        let gr = mt * gpt / ks_n;
                        let a: Lanes<[u32; 4]> = lanes(|ln| {
                            let (x0, x1) = pair2(row(ln, 0, e), row(ln, 1, e), sel2(ln), mask2(ln));
                            let (x2, x3) = pair2(row(ln, 8, e), row(ln, 9, e), sel2(ln), mask2(ln));
                            [x0, x1, x2, x3]
                        });
                        mma(&mut acc[mt], &a, &b0s[gr], &b1s[gr]);
                    }
                } else {
                    for e in 0..2 {
                        let mt = 2 * w4 + e;
                        let gr = mt * gpt / ks_n;
                        let a: Lanes<[u32; 4]> = lanes(|ln| {
                            let p = |u: u32, v: u32| pair4(u, v, sel4(ln), mask4(ln));
                            [
                                p(row(ln, 0, 2 * e), row(ln, 1, 2 * e)),
                                p(row(ln, 0, 2 * e + 1), row(ln, 1, 2 * e + 1)),
                                p(row(ln, 8, 2 * e), row(ln, 9, 2 * e)),
                                p(row(ln, 8, 2 * e + 1), row(ln, 9, 2 * e + 1)),
                            ]
                        });
                        mma(&mut acc[mt], &a, &b0s[gr], &b1s[gr]);
                    }
                }
            }
        }
    }
    // Sums over the lanes' tokens, then what the block merge reads.
    for o in [4, 8, 16] {
        for j in 0..2 {
            let lj: Lanes<f32> = lanes(|ln| l[ln][j]);
            let other = shfl_xor(&lj, o);
            for ln in 0..32 {
                l[ln][j] += other[ln];
            }
        }
    }
    let mut ws = WarpState { m: vec![0.0; NQ], l: vec![0.0; NQ], out: vec![vec![0.0; d]; NQ] };
    for ln in 0..32 {
        let (g, tq) = (ln / 4, ln % 4);
        for j in 0..2 {
            if g == 0 {
                ws.m[2 * tq + j] = m[ln][j];
                ws.l[2 * tq + j] = l[ln][j];
            }
            for mt in 0..ks_n {
                let e = extra[4 * (mt * gpt / ks_n) + tq][j];
                // Back from subnormals: KIVI's rows by their slot, per-token rows by the lane's bit.
                let vs = 16 / vb;
                let (vf0, vf1) = if st.tk { (vf(ln), vf(ln)) } else { (2f32.powi(24 - slot_pos(2 * mt % vs, vb)), 2f32.powi(24 - slot_pos((2 * mt + 1) % vs, vb))) };
                ws.out[2 * tq + j][16 * mt + g] = acc[mt][ln][j].mul_add(vf0, e);
                ws.out[2 * tq + j][16 * mt + g + 8] = acc[mt][ln][j + 2].mul_add(vf1, e);
            }
        }
    }
    ws
}

/// The model's attention for every query head of every stream, next to the CPU cache's.
fn model_vs_cpu(spec: &str, kv_heads: usize, rep: usize, d: usize, n: usize, seed: u64) -> f64 {
    let config = CacheConfig { past_only: false, ..CacheConfig::from_spec(spec, &Overrides::default()).unwrap() };
    let (tk, k_bits, v_bits, group_size) = match config.scheme {
        Scheme::Kivi { k_bits, v_bits, group_size, .. } => (false, k_bits, v_bits, group_size),
        Scheme::PerToken { bits, group_size, .. } => (true, bits, bits, group_size),
        _ => panic!("{spec} is neither KIVI nor per-token"),
    };
    let shape = CacheShape { layers: 1, batch: 1, kv_heads, head_dim: d };
    let mut cache = Cache::new(&config, shape, None, None).unwrap();
    let mut rng = SplitMix64::new(seed);
    // Keys with a few large channels, like real keys; values plain.
    let mut k = vec![0f32; kv_heads * n * d];
    let mut v = vec![0f32; kv_heads * n * d];
    for (i, x) in k.iter_mut().enumerate() {
        *x = rng.normal() * if i % d < 4 { 8.0 } else { 1.0 } + 0.5;
    }
    for x in v.iter_mut() {
        *x = rng.normal();
    }
    // Appended in the GPU layer's chunks of one key group.
    let mut t = 0;
    while t < n {
        let c = (n - t).min(group_size);
        let (mut kc, mut vc) = (Vec::new(), Vec::new());
        for s in 0..kv_heads {
            kc.extend_from_slice(&k[(s * n + t) * d..(s * n + t + c) * d]);
            vc.extend_from_slice(&v[(s * n + t) * d..(s * n + t + c) * d]);
        }
        cache.append(0, &kc, &vc, c).unwrap();
        t += c;
    }
    let hq = kv_heads * rep;
    let q: Vec<f32> = (0..hq * d).map(|_| rng.normal()).collect();
    let mut want = vec![0f32; hq * d];
    cache.attend(0, &q, hq, 1, &mut want).unwrap();
    let (keys, values) = cache.materialize(0).unwrap();
    let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();

    let (mut max_err, mut max_abs) = (0f64, 0f64);
    for h in 0..kv_heads {
        let (ck, cv) = cache.packed_stream(0, h).unwrap();
        let params = |p: &[kvq::quant::Affine]| p.iter().map(|a| (a.min.to_f32(), a.scale.to_f32())).collect::<Vec<_>>();
        let value_group = group_size.min(d);
        let st = Stream { tk, d, kb: k_bits as usize, vb: v_bits as usize, group: group_size, gpt: d / value_group, kcodes: ck.codes, kparams: params(ck.params), vcodes: cv.codes, vparams: params(cv.params) };
        // The tensor-core kernel takes the tiles whose keys and values are all packed,
        // round robin over a block's warps; the rest is the CUDA-core kernel's (here: f64).
        let packed = ck.quantized.min(cv.quantized) / 32;
        assert!(packed >= 2 * WARPS, "{spec}: only {packed} packed tiles; the test needs a longer context");
        // Block z of the grid serves query heads 8z .. 8z + 7 of the KV head.
        let blocks: Vec<Vec<WarpState>> = (0..rep.div_ceil(NQ))
            .map(|z| {
                let sq: Vec<Vec<f32>> = (0..NQ).map(|r| (0..d).map(|c| if z * NQ + r < rep { q[(h * rep + z * NQ + r) * d + c] * scale_log2 } else { 0.0 }).collect()).collect();
                let half = !tk && rep <= NQ / 2;
                (0..WARPS).map(|w| warp_tiles(&st, &sq, &(w..packed).step_by(WARPS).collect::<Vec<_>>(), half)).collect()
            })
            .collect();
        for r in 0..rep {
            let (warps, rz) = (&blocks[r / NQ], r % NQ);
            let sq_r: Vec<f32> = (0..d).map(|c| q[(h * rep + r) * d + c] * scale_log2).collect();
            // Merge the warps (write_split) and the window (tokens packed·32 .. n) in f64.
            let mut parts: Vec<(f64, f64, Vec<f64>)> = warps.iter().map(|w| (w.m[rz] as f64, w.l[rz] as f64, w.out[rz].iter().map(|&x| x as f64).collect())).collect();
            let scores: Vec<f64> = (packed * 32..n).map(|t| token_row(&keys, h, n, d, t).iter().zip(&sq_r).map(|(&a, &b)| a as f64 * b as f64).sum()).collect();
            let mw = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut aw = vec![0f64; d];
            let mut lw = 0.0;
            for (i, s) in scores.iter().enumerate() {
                let p = (s - mw).exp2();
                lw += p;
                for (a, &x) in aw.iter_mut().zip(token_row(&values, h, n, d, packed * 32 + i)) {
                    *a += p * x as f64;
                }
            }
            parts.push((mw, lw, aw));
            let mm = parts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
            let lsum: f64 = parts.iter().map(|p| p.1 * (p.0 - mm).exp2()).sum();
            for c in 0..d {
                let got = parts.iter().map(|p| p.2[c] * (p.0 - mm).exp2()).sum::<f64>() / lsum;
                let w = want[(h * rep + r) * d + c] as f64;
                max_err = max_err.max((got - w).abs());
                max_abs = max_abs.max(w.abs());
            }
        }
    }
    max_err / max_abs
}

#[test]
fn tensor_core_model_matches_the_cpu_cache() {
    // Both head dims, 2- and 4-bit keys and values (and both mixes), value groups of
    // 32, 64 and 128 channels (1, 2 or 4 a token), 2 to 12 query heads a KV head,
    // contexts that end mid-group.
    let mut errs = Vec::new();
    for (spec, kv_heads, rep, d, n) in [
        ("kivi-2", 2, 4, 128, 700),
        ("kivi-4", 1, 3, 64, 650),
        ("kivi-4:k-bits=2", 1, 8, 128, 555),
        ("kivi-2:v-bits=4", 2, 3, 64, 420),
        ("kivi-2:group=64", 1, 4, 128, 900),
        ("kivi-4:group=128", 1, 3, 64, 1100),
        ("kivi-2:group=128", 1, 2, 128, 1100),
        ("kivi-2:k-bits=4", 1, 3, 128, 640),
        // More than 8 query heads a KV head: two blocks (grid z) of 8.
        ("kivi-2", 1, 12, 64, 500),
        // Per-token keys (token_decode_attn_tc): groups of 32, 64 and 128 channels.
        ("per-token-4", 2, 4, 128, 700),
        ("per-token-2", 1, 3, 64, 650),
        ("per-token-2:group=32", 1, 4, 128, 555),
        ("per-token-4:group=32", 1, 3, 64, 600),
        ("per-token-2:group=128", 1, 2, 128, 640),
    ] {
        let err = model_vs_cpu(spec, kv_heads, rep, d, n, 17);
        println!("{spec} d={d} rep={rep} n={n}: max rel error {err:.2e}");
        errs.push((spec, err));
    }
    for (spec, err) in errs {
        assert!(err < 5e-4, "{spec}: the lane model is off by {err:.2e}");
    }
}
