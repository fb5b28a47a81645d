// KVQuant's quantize kernel: non-uniform codes from a calibrated codebook plus sparse f16
// outliers, byte for byte what kvq's CPU store holds (crates/kvq/src/cache/kvquant.rs,
// NuqStore::push). One warp a vector (a token of one KV head):
//
//   keys   (per channel, calibrated):  n = (x − centre[c]) / scale[c], outliers = the n_out
//          largest |n|;
//   values (per token):  outliers = the n_out farthest from the vector's median; centre and
//          half-range of the rest, f16 (centre rounded to nearest, half-range up);
//          n = (x − centre) / half.
//   code = how many codebook bounds (midpoints between levels) lie below n; codes packed
//   least significant bit first; outliers stored as (u16 channel, f16 value), ascending.
//
// Ties follow the CPU: outliers by score, then lower channel; the median is the element of
// rank D/2 in Rust's f32::total_cmp order. Every f32 step is IEEE-rounded (__f*_rn), as the
// CPU computes it.
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "f16_round.cuh"
#include "tc.cuh"
#include "warp.cuh"

constexpr int WARPS = 4;

// Rust's f32::total_cmp as an unsigned key: negatives below positives, -0 below +0.
__device__ __forceinline__ uint32_t total_key(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
// The float whose total_key is k.
__device__ __forceinline__ float from_total_key(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// This lane's PER channels of a row, lane·PER .. lane·PER + PER − 1: one 16-byte load a
// lane where PER allows (a warp reads the row in one coalesced sweep).
template <int PER>
__device__ __forceinline__ void load_lane_channels(const float* __restrict__ p, float (&v)[PER]) {
    if constexpr (PER % 4 == 0) {
#pragma unroll
        for (int j = 0; j < PER / 4; j++) {
            const float4 f = reinterpret_cast<const float4*>(p)[j];
            v[4 * j] = f.x, v[4 * j + 1] = f.y, v[4 * j + 2] = f.z, v[4 * j + 3] = f.w;
        }
    } else if constexpr (PER % 2 == 0) {
#pragma unroll
        for (int j = 0; j < PER / 2; j++) {
            const float2 f = reinterpret_cast<const float2*>(p)[j];
            v[2 * j] = f.x, v[2 * j + 1] = f.y;
        }
    } else {
#pragma unroll
        for (int i = 0; i < PER; i++) v[i] = p[i];
    }
}

// The element of rank D/2 (0-based) of a warp's D = 32·PER keys in unsigned order: the
// largest K with #(key < K) ≤ D/2, built bit by bit from the top (a warp-wide count a bit:
// one compare an element; the rounds unrolled, so each bit is an immediate). Once a single
// key is left in the range the bits so far allow, it is the answer (distinct values part
// after a dozen bits or so; ties run all 32).
template <int PER>
__device__ __forceinline__ uint32_t warp_median_key(const uint32_t (&key)[PER]) {
    constexpr uint32_t WANT = 16 * PER;  // D / 2
    uint32_t ans = 0, below = 0, below_hi = 32 * PER;  // #(key < ans), #(key < ans + 2^(bit+1))
    uint32_t span = 0;  // 2^bit where one key was left, 0 if none
#pragma unroll
    for (int bit = 31; bit >= 0; bit--) {
        const uint32_t cand = ans | (1u << bit);
        uint32_t c = 0;
#pragma unroll
        for (int i = 0; i < PER; i++) c += key[i] < cand ? 1u : 0u;
        c = __reduce_add_sync(FULL_MASK, c);
        if (c <= WANT) ans = cand, below = c;
        else below_hi = c;
        if (bit > 0 && below_hi - below == 1) {  // warp-uniform
            span = 1u << bit;
            break;
        }
    }
    if (span == 0) return ans;
    // The one key in [ans, ans + span).
    uint32_t mine = 0;
    bool has = false;
#pragma unroll
    for (int i = 0; i < PER; i++)
        if (key[i] >= ans && key[i] - ans < span) mine = key[i], has = true;
    return __shfl_sync(FULL_MASK, mine, __ffs(__ballot_sync(FULL_MASK, has)) - 1);
}

// The same element by sorting (PER a power of two): a bitonic sort of the warp's keys in
// ascending order, element e = lane·PER + i, every merge starting with its mirror step
// (e against e ^ (k − 1)), so the lower element always keeps the minimum. It stops after
// the last merge's mirror step, which leaves the D/2 smallest keys in lanes 0–15: the
// answer is the least key of lanes 16–31. About 11 steps across lanes (a shuffle and a
// min or max a key) whatever the data, where the count above takes a dozen or more.
template <int PER>
__device__ __forceinline__ uint32_t warp_median_key_sorted(uint32_t (&x)[PER], int lane) {
    static_assert((PER & (PER - 1)) == 0, "a power of two");
    constexpr int D = 32 * PER;
#pragma unroll
    for (int k = 2; k <= D; k <<= 1) {
        // Mirror step: e against e ^ (k − 1).
        if (k <= PER) {
#pragma unroll
            for (int i = 0; i < PER; i++) {
                const int p = i ^ (k - 1);
                if (p > i) {
                    const uint32_t lo = min(x[i], x[p]), hi = max(x[i], x[p]);
                    x[i] = lo, x[p] = hi;
                }
            }
        } else {
            const bool low = (lane & (k / (2 * PER))) == 0;
            uint32_t y[PER];
#pragma unroll
            for (int i = 0; i < PER; i++) y[i] = __shfl_xor_sync(FULL_MASK, x[PER - 1 - i], k / PER - 1);
#pragma unroll
            for (int i = 0; i < PER; i++) x[i] = low ? min(x[i], y[i]) : max(x[i], y[i]);
        }
        if (k == D) break;
        // Half-cleaner steps: e against e ^ j.
#pragma unroll
        for (int j = k / 4; j >= 1; j >>= 1) {
            if (j < PER) {
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    if ((i & j) == 0) {
                        const uint32_t lo = min(x[i], x[i | j]), hi = max(x[i], x[i | j]);
                        x[i] = lo, x[i | j] = hi;
                    }
                }
            } else {
                const bool low = (lane & (j / PER)) == 0;
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    const uint32_t y = __shfl_xor_sync(FULL_MASK, x[i], j / PER);
                    x[i] = low ? min(x[i], y) : max(x[i], y);
                }
            }
        }
    }
    uint32_t m = 0xffffffffu;
    if (lane >= 16) {
#pragma unroll
        for (int i = 0; i < PER; i++) m = min(m, x[i]);
    }
    return __reduce_min_sync(FULL_MASK, m);
}

// a / b rounded to nearest even (as __fdiv_rn and the CPU's f32 division) when b's
// reciprocal `r` comes from div_rn_reciprocal(b): the compiler's own short path for
// div.rn.f32 (a reciprocal refined by one Newton step, a product, one correction), with
// the reciprocal shared by every a of the same b. That path rounds correctly while a, b,
// the quotient and the remainder stay normal numbers; div_rn_fits checks a range inside
// that, and the caller falls back to __fdiv_rn outside it.
__device__ __forceinline__ float div_rn_reciprocal(float b) {
    float r0;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r0) : "f"(b));
    return __fmaf_rn(r0, __fmaf_rn(-b, r0, 1.f), r0);
}
__device__ __forceinline__ float div_rn_short(float a, float b, float r) {
    const float q0 = __fmaf_rn(a, r, 0.f);
    return __fmaf_rn(r, __fmaf_rn(-b, q0, a), q0);
}
// |x| in [2^-63, 2^63) (biased exponent 64 .. 189), or x = ±0: with a and b there, the
// quotient is in (2^-126, 2^126) and the remainder, about 2^-24·|a|, is normal too.
__device__ __forceinline__ bool div_rn_fits(float x) {
    const uint32_t e = (__float_as_uint(x) >> 23) & 0xffu;
    return e - 64u <= 125u || (__float_as_uint(x) & 0x7fffffffu) == 0;
}
// div_rn_fits of every a[i] at once: on |a| as bits (NaN and ∞ above 2^63's, ±0 wrapped
// to the top by the − 1), a max and a min over the lane's values, then two compares.
template <int PER>
__device__ __forceinline__ bool div_rn_fits_all(const float (&a)[PER]) {
    uint32_t hi = 0, lo_m1 = 0xffffffffu;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        const uint32_t m = __float_as_uint(a[i]) & 0x7fffffffu;
        hi = max(hi, m);
        lo_m1 = min(lo_m1, m - 1u);
    }
    return hi < 0x5f000000u && lo_m1 >= 0x1fffffffu;  // |a| < 2^63; |a| ≥ 2^-63 or 0
}

// Checks div_rn_short against __fdiv_rn on n pairs (b > 0): counts the pairs the short
// path takes (both in range) and those where the two differ (other than in a zero's sign).
extern "C" __global__ void kvquant_div_probe(const float* a, const float* b, int n, unsigned long long* taken_wrong) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        if (!(b[i] > 0.f) || !div_rn_fits(a[i]) || !div_rn_fits(b[i]) || a[i] == 0.f) continue;
        const float q = div_rn_short(a[i], b[i], div_rn_reciprocal(b[i])), want = __fdiv_rn(a[i], b[i]);
        atomicAdd(&taken_wrong[0], 1ull);
        if (__float_as_uint(q) != __float_as_uint(want) && !(q == 0.f && want == 0.f)) atomicAdd(&taken_wrong[1], 1ull);
    }
}

// The number of sorted bounds below n (2^BITS − 1 of them, from shared-space address a):
// BITS halving steps, each a load at a fixed offset from a walking address (one load, one
// compare, one add a step, no index arithmetic), branch-free. Returns the address reached,
// 4 bytes a bound past the first.
template <int STEP>
__device__ __forceinline__ uint32_t bounds_below(uint32_t a, float n) {
    if constexpr (STEP == 0) {
        return a;
    } else {
        float b;
        asm volatile("ld.shared.f32 %0, [%1+%2];" : "=f"(b) : "r"(a), "n"(4 * (STEP - 1)));
        return bounds_below<STEP / 2>(b < n ? a + 4 * STEP : a, n);
    }
}

// x: [stream][src_tokens][D] f32, tokens src_t0 .. src_t0 + tokens of each (rows = stream · tokens). center/scale: [kv_heads][D] (keys).
// bounds: the codebook's 2^bits − 1 midpoints. Token j of stream s lands in row
// s · dst_cap + dst_t0 + j of the outputs: codes[row][packed], token_norm[row] (values:
// half2 (centre, half-range)), out_index/out_value[row][n_out].
// KEYS: keys (centre and scale per channel) or values (per token).
// PER: channels a lane holds, consecutive (D = 32·PER), so every per-lane loop has a fixed
// length and a lane's codes are one run of PER·bits bits of the packed row.
// BITS: the code width fixed at compile time (2, 3, 4: the presets; the search for a code
// and the packing then have fixed shapes), or 0 for the `bits` argument's.
template <bool KEYS, int PER, int BITS = 0>
__device__ void kvquant_quantize(const float* __restrict__ x, int rows, int tokens, int src_tokens, int src_t0,
                     long dst_cap, int dst_t0, int kv_heads, int bits,
                     const float* __restrict__ center, const float* __restrict__ scale,
                     const float* __restrict__ bounds, int n_out, uint8_t* __restrict__ codes,
                     __half2* __restrict__ token_norm, uint16_t* __restrict__ out_index,
                     __half* __restrict__ out_value) {
    constexpr int D = 32 * PER;
    __shared__ float s_bounds[255];
    __shared__ uint32_t s_words[WARPS][D / 4];  // a packed row (≤ 8 bits a code), for runs that are not whole bytes
    if constexpr (BITS != 0) bits = BITS;
    const int nb = (1 << bits) - 1;
    for (int i = threadIdx.x; i < nb; i += blockDim.x) s_bounds[i] = bounds[i];
    __syncthreads();
    const uint32_t bounds_at = tc::smem_addr(s_bounds);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // Each warp quantizes a run of consecutive rows (the host sizes the grid to the GPU, so
    // the runs are even); whole warps leave together, after the block's only barrier.
    // 32-bit row math: the host keeps rows below 2^31.
    const long nwarps = (long)gridDim.x * WARPS, per_warp = (rows + nwarps - 1) / nwarps;
    const long first_row = (blockIdx.x * WARPS + warp) * per_warp;
    if (first_row >= rows) return;
    int r = (int)first_row;
    const int r_end = (int)min((long)rows, first_row + per_warp);
    int s = r / tokens, t = r - s * tokens, h = s % kv_heads;
    const int plen = D * bits / 8;  // bytes a packed row (D is a multiple of 32: whole words)
    const int lane_bits = PER * bits, bit0 = lane * lane_bits;
    auto row_ptr = [&](int s_, int t_) { return x + ((long)s_ * src_tokens + src_t0 + t_) * D + lane * PER; };
    const float* xp = row_ptr(s, t);
    long dr = (long)s * dst_cap + dst_t0 + t;  // the output row
    float v[PER], cen[PER], scl[PER], rcp[PER];
    load_lane_channels<PER>(xp, v);
    int loaded_head = -1;
    bool head_slow = false;  // a key scale outside div_rn_fits: that head's rows divide the long way
    for (;;) {
        // The next row, loaded now so that its bytes are in flight while this one is quantized.
        int t2 = t + 1, h2 = h;
        const float* xn = xp + D;
        long dn = dr + 1;
        if (t2 == tokens) {  // warp-uniform: the next stream
            t2 = 0, s++, h2 = h + 1 == kv_heads ? 0 : h + 1;
            xn = row_ptr(s, 0), dn = (long)s * dst_cap + dst_t0;
        }
        const bool more = r + 1 < r_end;
        float vn[PER];
        if (more) load_lane_channels<PER>(xn, vn);

        float norm[PER];
        uint32_t score[PER];  // outlier scores as ordered keys, bits of |n| + 1 (0: taken)
        if constexpr (KEYS) {
            if (h != loaded_head) {  // warp-uniform: rows of a stream share the head
                load_lane_channels<PER>(center + (long)h * D + lane * PER, cen);
                load_lane_channels<PER>(scale + (long)h * D + lane * PER, scl);
                bool slow = false;
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    slow |= scl[i] > 0.f && !div_rn_fits(scl[i]);
                    rcp[i] = scl[i] > 0.f ? div_rn_reciprocal(scl[i]) : 0.f;  // 0: n = 0, as a scale ≤ 0 gives
                }
                head_slow = __any_sync(FULL_MASK, slow);
                loaded_head = h;
            }
            float a[PER];
#pragma unroll
            for (int i = 0; i < PER; i++) {
                a[i] = __fsub_rn(v[i], cen[i]);
                norm[i] = div_rn_short(a[i], scl[i], rcp[i]);
            }
            if (!__all_sync(FULL_MASK, !head_slow && div_rn_fits_all<PER>(a))) {  // rare: the long division for the whole row
#pragma unroll
                for (int i = 0; i < PER; i++) norm[i] = scl[i] > 0.f ? __fdiv_rn(__fsub_rn(v[i], cen[i]), scl[i]) : 0.f;
            }
#pragma unroll
            for (int i = 0; i < PER; i++) score[i] = __float_as_uint(fabsf(norm[i])) + 1u;
        } else {
            // Distance from the median (rank D/2 in Rust's f32::total_cmp order).
            uint32_t key[PER];
#pragma unroll
            for (int i = 0; i < PER; i++) key[i] = total_key(v[i]);
            uint32_t mk;
            if constexpr ((PER & (PER - 1)) == 0) mk = warp_median_key_sorted<PER>(key, lane);
            else mk = warp_median_key<PER>(key);
            const float median = from_total_key(mk);
#pragma unroll
            for (int i = 0; i < PER; i++) score[i] = __float_as_uint(fabsf(__fsub_rn(v[i], median))) + 1u;
        }
        // The n_out largest scores (f32::total_cmp order: |x| as bits), ties to the lower
        // channel: a round is a warp max, then the lowest lane holding it, its lowest channel.
        // The picks so far, in channel order, one a lane (while there are at most 32): each
        // new one goes in at its place and those above it move up a lane.
        // (A channel not yet taken scores at least 1, so each round's max is one of them.)
        const int n_pick = min(n_out, D);
        int picked = 0, my_ch = 0;
        float my_val = 0.f;
        for (; picked < n_pick; picked++) {
            uint32_t m = score[0];
#pragma unroll
            for (int i = 1; i < PER; i++) m = max(m, score[i]);
            m = __reduce_max_sync(FULL_MASK, m);
            int first = -1;
            float first_v = 0.f;
#pragma unroll
            for (int i = PER - 1; i >= 0; i--)
                if (score[i] == m) first = i, first_v = v[i];
            const int winner = __ffs(__ballot_sync(FULL_MASK, first >= 0)) - 1;
            if (lane == winner) {
#pragma unroll
                for (int i = 0; i < PER; i++)
                    if (i == first) score[i] = 0;
            }
            const int ch = winner * PER + __shfl_sync(FULL_MASK, first, winner);
            const float fv = __shfl_sync(FULL_MASK, first_v, winner);
            const int place = __popc(__ballot_sync(FULL_MASK, lane < picked && my_ch < ch));
            const int up_ch = __shfl_up_sync(FULL_MASK, my_ch, 1);
            const float up_val = __shfl_up_sync(FULL_MASK, my_val, 1);
            if (lane == place) my_ch = ch, my_val = fv;
            else if (lane > place && lane <= picked) my_ch = up_ch, my_val = up_val;
        }
        if constexpr (!KEYS) {
            // Centre and half-range of the vector without its outliers (min and max as
            // ordered keys; NaNs are skipped, as f32::min and max skip them).
            uint32_t kmin = 0xffffffffu, kmax = 0;
#pragma unroll
            for (int i = 0; i < PER; i++) {
                if (score[i] != 0 && !isnan(v[i])) {
                    kmin = min(kmin, total_key(v[i]));
                    kmax = max(kmax, total_key(v[i]));
                }
            }
            kmin = __reduce_min_sync(FULL_MASK, kmin);
            kmax = __reduce_max_sync(FULL_MASK, kmax);
            float lo = 0.f, hi = 0.f;
            if (kmin != 0xffffffffu && kmin <= kmax) {
                lo = from_total_key(kmin);
                hi = from_total_key(kmax);
            }
            const __half ch = __float2half_rn(__fmul_rn(0.5f, __fadd_rn(lo, hi)));
            const float c = __half2float(ch);
            const __half hh = f16_ceil(fmaxf(fmaxf(__fsub_rn(hi, c), __fsub_rn(c, lo)), 0.f));
            const float half = __half2float(hh);
            // One reciprocal for the row (half is the same in every lane).
            const float hr = half > 0.f ? div_rn_reciprocal(half) : 0.f;
            float a[PER];
#pragma unroll
            for (int i = 0; i < PER; i++) {
                a[i] = __fsub_rn(v[i], c);
                norm[i] = div_rn_short(a[i], half, hr);
            }
            if (!__all_sync(FULL_MASK, (half <= 0.f || div_rn_fits(half)) && div_rn_fits_all<PER>(a))) {
#pragma unroll
                for (int i = 0; i < PER; i++) norm[i] = half > 0.f ? __fdiv_rn(__fsub_rn(v[i], c), half) : 0.f;
            }
            if (lane == 0) token_norm[dr] = __halves2half2(ch, hh);
        }
        // Codes: the number of bounds below each normalized value, this lane's run of them.
        using Run = typename std::conditional<(BITS != 0 && PER * BITS <= 32), uint32_t, uint64_t>::type;
        Run run = 0;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            // The number of bounds below: a binary search of the sorted bounds (2^BITS − 1
            // of them: BITS halving steps, no branches).
            int lo = 0;
            if constexpr (BITS != 0) {
                lo = (int)((bounds_below<(1 << (BITS - 1))>(bounds_at, norm[i]) - bounds_at) >> 2);
            } else {
                int hi = nb;
                while (lo < hi) {
                    const int m = (lo + hi) >> 1;
                    if (s_bounds[m] < norm[i]) lo = m + 1;
                    else hi = m;
                }
            }
            run |= (Run)lo << (i * bits);
        }
        uint8_t* crow = codes + dr * plen;
        constexpr int RUN_BITS = PER * BITS;
        if constexpr (RUN_BITS == 8 || RUN_BITS == 16 || RUN_BITS == 32) {
            // Whole bytes a lane: stored straight (a warp writes the row in one sweep).
            if constexpr (RUN_BITS == 8) crow[lane] = (uint8_t)run;
            else if constexpr (RUN_BITS == 16) reinterpret_cast<uint16_t*>(crow)[lane] = (uint16_t)run;
            else reinterpret_cast<uint32_t*>(crow)[lane] = (uint32_t)run;
        } else {
            // Runs that straddle bytes: ORed into the row's words in shared memory, then
            // stored a word a lane.
            const int words = plen / 4;
            for (int w = lane; w < words; w += 32) s_words[warp][w] = 0;
            __syncwarp();
            const int w0 = bit0 >> 5, sh = bit0 & 31;
            const uint64_t wide = (uint64_t)run;
            atomicOr(&s_words[warp][w0], (uint32_t)(wide << sh));
            if (sh + lane_bits > 32) atomicOr(&s_words[warp][w0 + 1], (uint32_t)((wide << sh) >> 32));
            if (sh + lane_bits > 64) atomicOr(&s_words[warp][w0 + 2], (uint32_t)(wide >> (64 - sh)));
            __syncwarp();
            for (int w = lane; w < words; w += 32) reinterpret_cast<uint32_t*>(crow)[w] = s_words[warp][w];
            __syncwarp();  // s_words is the warp's next row's
        }
        // Outliers in ascending channel order: lane k holds the k-th; past 32 picks, places
        // counted from every lane's taken channels instead.
        if (picked > 0) {
            const long o = dr * n_out;
            if (picked <= 32) {
                if (lane < picked) {
                    out_index[o + lane] = (uint16_t)my_ch;
                    out_value[o + lane] = __float2half_rn(my_val);
                }
            } else {
                const unsigned lower = (1u << lane) - 1;
                int pos = 0;
#pragma unroll
                for (int i = 0; i < PER; i++) pos += __popc(__ballot_sync(FULL_MASK, score[i] == 0) & lower);
#pragma unroll
                for (int i = 0; i < PER; i++) {
                    if (score[i] == 0) {
                        out_index[o + pos] = (uint16_t)(lane * PER + i);
                        out_value[o + pos] = __float2half_rn(v[i]);
                        pos++;
                    }
                }
            }
        }
        if (!more) break;
        r++, t = t2, h = h2, xp = xn, dr = dn;
#pragma unroll
        for (int i = 0; i < PER; i++) v[i] = vn[i];
    }
}

#define KVQ_ENTRY_NAMED(KEYS, PER, BITS, NAME)                                                           \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) NAME(                                       \
        const float* x, int rows, int tokens, int src_tokens, int src_t0, long dst_cap, int dst_t0,     \
        int kv_heads, int bits,                                                                          \
        const float* center, const float* scale, const float* bounds, int n_out, uint8_t* codes,         \
        __half2* token_norm, uint16_t* out_index, __half* out_value) {                                   \
        kvquant_quantize<KEYS, PER, BITS>(x, rows, tokens, src_tokens, src_t0, dst_cap, dst_t0, kv_heads, \
                                          bits, center, scale, bounds,                                   \
                                          n_out, codes, token_norm, out_index, out_value);               \
    }
// Kernels for keys and values, head sizes 32, 64, 96, 128 and 256 (named by channels a
// lane: d1 .. d8), any code width (d*), and for 2-, 3- and 4-bit codes (d*_b*).
#define KVQ_ENTRY_KV(KIND, KEYS, PER)                                            \
    KVQ_ENTRY_NAMED(KEYS, PER, 0, kvquant_quantize_##KIND##_d##PER)              \
    KVQ_ENTRY_NAMED(KEYS, PER, 2, kvquant_quantize_##KIND##_d##PER##_b2)         \
    KVQ_ENTRY_NAMED(KEYS, PER, 3, kvquant_quantize_##KIND##_d##PER##_b3)         \
    KVQ_ENTRY_NAMED(KEYS, PER, 4, kvquant_quantize_##KIND##_d##PER##_b4)
#define KVQ_ENTRY(PER) KVQ_ENTRY_KV(keys, true, PER) KVQ_ENTRY_KV(values, false, PER)
KVQ_ENTRY(1)
KVQ_ENTRY(2)
KVQ_ENTRY(3)
KVQ_ENTRY(4)
KVQ_ENTRY(8)

// ---------------------------------------------------------------- attention
// Attention over KVQuant's store, read where it lies (nothing dequantized to memory):
// position t < sink from the f16 sink, else codes of row t − sink, each value
// level[code] scaled (keys: centre[c] + scale[c]·level, values: centre_t + half_t·level),
// outliers put back, keys rotated to position t (they are stored before RoPE, with the
// model's cos/sin table). Causal over a chunk of T queries a sequence (`past_only` off, as
// the KVQuant presets): query i of the chunk sees positions 0 .. n − T + i.
// Grid: (stream, split, group of REP queries); 4 warps a block, a warp a tile of 32
// positions at a time. A lane owns PP RoPE pairs (p = lane + 32k: channels (p, p + D/2)
// for Hugging Face's rotate_half, (2p, 2p + 1) interleaved), so a key is rotated in the
// lane that holds both halves; scores are summed over lanes by a reduce-scatter (lane j
// ends with position j's), values accumulated per channel. Splits are merged by kivi.cu's
// combine_splits. CUDA cores, f32 throughout: a reference-grade kernel, not a fast one.
struct KvqAttnArgs {
    const float* q;            // [stream][nq][D]: [batch][Hq][T][D], rotated
    float* part_acc;           // [stream][split][nq][D]
    float* part_ml;            // [stream][split][nq][2]
    const __half* ksink;       // [stream][sink_cap][D] (keys before RoPE)
    const __half* vsink;
    const uint8_t* kcodes;     // [stream][cap][plen]
    const uint8_t* vcodes;
    const __half2* vnorm;      // [stream][cap] (centre, half-range)
    const uint16_t* kout_idx;  // [stream][cap][n_out]
    const __half* kout_val;
    const uint16_t* vout_idx;
    const __half* vout_val;
    const float* kcenter;      // [Hkv][D]
    const float* kscale;
    const float* klevels;      // [2^bits]
    const float* vlevels;
    const float* cos;          // [positions][D/2]
    const float* sin;
    long cap;                  // rows the code buffers hold a stream
    int sink_cap, sink;        // sink rows a stream, of them filled
    int bits, n_out, Hkv, T, nq;
    long n;                    // positions held, the chunk included
    int tiles_per_split, splits;
    float scale_log2;
};

// Outliers a vector the attention kernel reads (1% of 64 or 128 channels is 1 or 2).
constexpr int MAX_OUTLIERS = 4;

// Code of channel c in a packed row of `u32` words (least significant bit first; a code
// may straddle two words, then both are read).
__device__ __forceinline__ int code_at(const uint32_t* row, int c, int bits) {
    const int bit = c * bits, w = bit >> 5, sh = bit & 31;
    const uint32_t lo = row[w];
    const uint32_t hi = sh + bits > 32 ? row[w + 1] : 0u;
    return (int)(((((uint64_t)hi << 32) | lo) >> sh) & ((1u << bits) - 1));
}

// This lane's channels of one stored vector from its packed row: a level of the codebook,
// scaled per channel for keys (`norm` false: centre + scale · level), by the token's
// (centre c0, half-range h0) for values.
template <int PP, bool TOKEN_NORM>
__device__ __forceinline__ void dequant_row(const uint32_t* row, int bits, const float* levels, float c0, float h0,
                                            const int (&ca)[PP], const int (&cb)[PP], const float (&ca_c)[PP],
                                            const float (&ca_s)[PP], const float (&cb_c)[PP], const float (&cb_s)[PP],
                                            float (&xa)[PP], float (&xb)[PP]) {
#pragma unroll
    for (int k = 0; k < PP; k++) {
        const float la = levels[code_at(row, ca[k], bits)], lb = levels[code_at(row, cb[k], bits)];
        xa[k] = TOKEN_NORM ? c0 + h0 * la : ca_c[k] + ca_s[k] * la;
        xb[k] = TOKEN_NORM ? c0 + h0 * lb : cb_c[k] + cb_s[k] * lb;
    }
}

// An outlier (channel c, value x) put back where it is one of this lane's channels (c < 0: none).
template <int PP>
__device__ __forceinline__ void put_back(int c, float x, const int (&ca)[PP], const int (&cb)[PP], float (&xa)[PP], float (&xb)[PP]) {
#pragma unroll
    for (int k = 0; k < PP; k++) {
        xa[k] = c == ca[k] ? x : xa[k];
        xb[k] = c == cb[k] ? x : xb[k];
    }
}

// Position t's vector (keys or values) at this lane's channels, read from device memory:
// from the f16 sink or the store. Branch-free, so that the loads of a tile can be in
// flight at once: the caller passes a valid t (< n), both sources are read and one kept.
// Used for the tiles that hold sink positions (the others are staged: staged_vector).
template <int PP, int D, bool TOKEN_NORM>
__device__ __forceinline__ void load_vector(const KvqAttnArgs& a, int s, long t, const __half* sink, const uint8_t* codes,
                                            const __half2* tnorm, const uint16_t* oidx, const __half* oval,
                                            const float* levels, const int (&ca)[PP], const int (&cb)[PP],
                                            const float (&ca_c)[PP], const float (&ca_s)[PP], const float (&cb_c)[PP],
                                            const float (&cb_s)[PP], float (&xa)[PP], float (&xb)[PP]) {
    const bool in_sink = t < a.sink;
    const long i = (long)s * a.cap + (in_sink ? 0 : t - a.sink);
    const __half* srow = sink + ((long)s * a.sink_cap + (in_sink ? t : 0)) * D;
    float2 cn = make_float2(0.f, 0.f);
    if (TOKEN_NORM) cn = __half22float2(tnorm[i]);
    dequant_row<PP, TOKEN_NORM>((const uint32_t*)(codes + i * (D * a.bits / 8)), a.bits, levels, cn.x, cn.y, ca, cb, ca_c, ca_s, cb_c, cb_s, xa, xb);
#pragma unroll
    for (int k = 0; k < PP; k++) {
        xa[k] = in_sink ? __half2float(srow[ca[k]]) : xa[k];
        xb[k] = in_sink ? __half2float(srow[cb[k]]) : xb[k];
    }
    // Up to MAX_OUTLIERS a vector (the host refuses more), each read whether used or not.
#pragma unroll
    for (int o = 0; o < MAX_OUTLIERS; o++) {
        const long oi = a.n_out > 0 ? i * a.n_out + min(o, a.n_out - 1) : 0;
        put_back<PP>((o < a.n_out && !in_sink) ? (int)oidx[oi] : -1, __half2float(oval[oi]), ca, cb, xa, xb);
    }
}

// Stages stored rows t0 − sink .. + 31 of stream s (past the last one: the last, whose
// scores are masked and whose weights are 0) into a warp's shared buffers, every load
// coalesced: codes word by word, outliers packed as (channel | f16 value << 16), and the
// values' (centre, half-range) when `tnorm` is given. Ends with __syncwarp.
template <int D>
__device__ __forceinline__ void stage_tile(const KvqAttnArgs& a, int s, long t0, const uint8_t* codes, const __half2* tnorm,
                                           const uint16_t* oidx, const __half* oval, uint32_t* s_codes, uint32_t* s_out,
                                           __half2* s_norm, int lane) {
    __syncwarp();  // the buffers' last readers are done
    const int rw = D * a.bits / 32;  // u32 words a row
    const long base = (long)s * a.cap, first = t0 - a.sink, last = a.n - 1 - a.sink;
    const uint32_t* cw = (const uint32_t*)codes;
    for (int w = lane; w < 32 * rw; w += 32) {
        const int r = w / rw;
        s_codes[w] = cw[(base + min(first + r, last)) * rw + (w - r * rw)];
    }
    for (int k = lane; k < 32 * a.n_out; k += 32) {
        const int r = k / a.n_out, o = k - r * a.n_out;
        const long at = (base + min(first + r, last)) * a.n_out + o;
        s_out[r * MAX_OUTLIERS + o] = (uint32_t)oidx[at] | (uint32_t)__half_as_ushort(oval[at]) << 16;
    }
    if (tnorm != nullptr) s_norm[lane] = tnorm[base + min(first + lane, last)];
    __syncwarp();
}

// Row j of a staged tile at this lane's channels (load_vector's result, from shared memory).
template <int PP, int D, bool TOKEN_NORM>
__device__ __forceinline__ void staged_vector(const KvqAttnArgs& a, int j, const uint32_t* s_codes, const uint32_t* s_out,
                                              const __half2* s_norm, const float* levels, const int (&ca)[PP],
                                              const int (&cb)[PP], const float (&ca_c)[PP], const float (&ca_s)[PP],
                                              const float (&cb_c)[PP], const float (&cb_s)[PP], float (&xa)[PP],
                                              float (&xb)[PP]) {
    float2 cn = make_float2(0.f, 0.f);
    if (TOKEN_NORM) cn = __half22float2(s_norm[j]);
    dequant_row<PP, TOKEN_NORM>(s_codes + j * (D * a.bits / 32), a.bits, levels, cn.x, cn.y, ca, cb, ca_c, ca_s, cb_c, cb_s, xa, xb);
#pragma unroll
    for (int o = 0; o < MAX_OUTLIERS; o++) {
        const uint32_t u = s_out[j * MAX_OUTLIERS + o];
        put_back<PP>(o < a.n_out ? (int)(u & 0xffffu) : -1, __half2float(__ushort_as_half((unsigned short)(u >> 16))), ca, cb, xa, xb);
    }
}

template <int PP, int REP, bool HALF>
__device__ __forceinline__ void kvquant_attn(const KvqAttnArgs& a) {
    constexpr int D = 64 * PP;
    __shared__ float s_kl[256], s_vl[256];
    // A warp's tile of 32 stored vectors, staged by coalesced loads: codes (up to 8 bits a
    // channel), outliers as (channel | f16 value << 16), values' (centre, half-range).
    __shared__ uint32_t s_codes[WARPS][32 * D / 4];
    __shared__ uint32_t s_out[WARPS][32 * MAX_OUTLIERS];
    __shared__ __half2 s_norm[WARPS][32];
    const int nl = 1 << a.bits;
    for (int i = threadIdx.x; i < nl; i += blockDim.x) s_kl[i] = a.klevels[i], s_vl[i] = a.vlevels[i];
    __syncthreads();
    const int s = blockIdx.x, split = blockIdx.y, r0 = blockIdx.z * REP;
    const int h = s % a.Hkv;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int ca[PP], cb[PP];
#pragma unroll
    for (int k = 0; k < PP; k++) {
        const int p = lane + 32 * k;
        ca[k] = HALF ? p : 2 * p;
        cb[k] = HALF ? p + D / 2 : 2 * p + 1;
    }
    float qa[REP][PP], qb[REP][PP], m[REP], l[REP], acca[REP][PP], accb[REP][PP];
    long lim[REP];  // positions query r sees
#pragma unroll
    for (int r = 0; r < REP; r++) {
        const bool ok = r0 + r < a.nq;
        const float* qp = a.q + ((long)s * a.nq + r0 + r) * D;
#pragma unroll
        for (int k = 0; k < PP; k++) {
            qa[r][k] = ok ? qp[ca[k]] * a.scale_log2 : 0.f;
            qb[r][k] = ok ? qp[cb[k]] * a.scale_log2 : 0.f;
            acca[r][k] = 0.f;
            accb[r][k] = 0.f;
        }
        m[r] = -INFINITY;
        l[r] = 0.f;
        lim[r] = ok ? a.n - a.T + (r0 + r) % a.T + 1 : 0;
    }
    float kc_a[PP], kc_b[PP], ks_a[PP], ks_b[PP];
#pragma unroll
    for (int k = 0; k < PP; k++) {
        kc_a[k] = a.kcenter[h * D + ca[k]];
        kc_b[k] = a.kcenter[h * D + cb[k]];
        ks_a[k] = a.kscale[h * D + ca[k]];
        ks_b[k] = a.kscale[h * D + cb[k]];
    }
    // RoPE angles of this lane's pairs advance by one step a position: cos/sin of a tile's
    // first position come from the table, the next 31 by rotating with position 1's
    // (a few f32 roundings of drift in 31 steps, far below the check's 1e-3).
    float step_c[PP], step_s[PP];
#pragma unroll
    for (int k = 0; k < PP; k++) step_c[k] = a.cos[D / 2 + lane + 32 * k], step_s[k] = a.sin[D / 2 + lane + 32 * k];
    const long tiles = (a.n + 31) / 32;
    const long tb = (long)split * a.tiles_per_split;
    const long te = min(tiles, tb + a.tiles_per_split);
    for (long tile = tb + warp; tile < te; tile += WARPS) {
        const long t0 = tile * 32;
        // Position j's score for query r ends in lane j: a warp sum a position (the loop
        // need not unroll fully, which keeps registers and code small).
        float score[REP];
#pragma unroll
        for (int r = 0; r < REP; r++) score[r] = 0.f;
        float rc[PP], rs[PP];  // cos/sin of position t0 + j at this lane's pairs
#pragma unroll
        for (int k = 0; k < PP; k++) rc[k] = a.cos[t0 * (D / 2) + lane + 32 * k], rs[k] = a.sin[t0 * (D / 2) + lane + 32 * k];
        // Tiles past the sink: stage the tile's stored rows in shared memory first.
        const bool staged = t0 >= a.sink;
        if (staged) stage_tile<D>(a, s, t0, a.kcodes, nullptr, a.kout_idx, a.kout_val, s_codes[warp], s_out[warp], s_norm[warp], lane);
#pragma unroll 4
        for (int j = 0; j < 32; j++) {
            const long t = min(t0 + j, a.n - 1);  // past the end: any valid token (masked below)
            float xa[PP], xb[PP];
            if (staged)
                staged_vector<PP, D, false>(a, j, s_codes[warp], s_out[warp], s_norm[warp], s_kl, ca, cb, kc_a, ks_a, kc_b, ks_b, xa, xb);
            else
                load_vector<PP, D, false>(a, s, t, a.ksink, a.kcodes, a.vnorm, a.kout_idx, a.kout_val, s_kl, ca, cb, kc_a, ks_a, kc_b, ks_b, xa, xb);
            float part[REP];
#pragma unroll
            for (int r = 0; r < REP; r++) part[r] = 0.f;
#pragma unroll
            for (int k = 0; k < PP; k++) {
                const float c = rc[k], sn = rs[k];
                const float ra = xa[k] * c - xb[k] * sn, rb = xa[k] * sn + xb[k] * c;
                rc[k] = c * step_c[k] - sn * step_s[k];
                rs[k] = sn * step_c[k] + c * step_s[k];
#pragma unroll
                for (int r = 0; r < REP; r++) part[r] = fmaf(qa[r][k], ra, fmaf(qb[r][k], rb, part[r]));
            }
#pragma unroll
            for (int r = 0; r < REP; r++) {
                const float total = warp_sum(part[r]);
                score[r] = lane == j ? total : score[r];
            }
        }
        const long t = t0 + lane;
        float p[REP];
#pragma unroll
        for (int r = 0; r < REP; r++) {
            const float sc = t < lim[r] ? score[r] : -INFINITY;
            const float mnew = fmaxf(m[r], warp_max(sc));
            if (mnew == -INFINITY) {  // nothing visible yet for this query
                p[r] = 0.f;
                continue;
            }
            const float corr = exp2f(m[r] - mnew);
            p[r] = t < lim[r] ? exp2f(sc - mnew) : 0.f;
            l[r] = l[r] * corr + warp_sum(p[r]);
#pragma unroll
            for (int k = 0; k < PP; k++) acca[r][k] *= corr, accb[r][k] *= corr;
            m[r] = mnew;
        }
        // Values: p is 0 past the end, where any valid token is read.
        if (staged) stage_tile<D>(a, s, t0, a.vcodes, a.vnorm, a.vout_idx, a.vout_val, s_codes[warp], s_out[warp], s_norm[warp], lane);
#pragma unroll 8
        for (int j = 0; j < 32; j++) {
            const long tt = min(t0 + j, a.n - 1);
            float xa[PP], xb[PP];
            if (staged)
                staged_vector<PP, D, true>(a, j, s_codes[warp], s_out[warp], s_norm[warp], s_vl, ca, cb, kc_a, ks_a, kc_b, ks_b, xa, xb);
            else
                load_vector<PP, D, true>(a, s, tt, a.vsink, a.vcodes, a.vnorm, a.vout_idx, a.vout_val, s_vl, ca, cb, kc_a, ks_a, kc_b, ks_b, xa, xb);
#pragma unroll
            for (int r = 0; r < REP; r++) {
                const float pv = __shfl_sync(FULL_MASK, p[r], j);
#pragma unroll
                for (int k = 0; k < PP; k++) acca[r][k] = fmaf(pv, xa[k], acca[r][k]), accb[r][k] = fmaf(pv, xb[k], accb[r][k]);
            }
        }
    }
    // Merge the warps' states, then write the split's partial result.
    __shared__ float sm_m[WARPS][REP], sm_l[WARPS][REP], sm_acc[WARPS][REP][D];
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < REP; r++) sm_m[warp][r] = m[r], sm_l[warp][r] = l[r];
    }
#pragma unroll
    for (int r = 0; r < REP; r++)
#pragma unroll
        for (int k = 0; k < PP; k++) sm_acc[warp][r][ca[k]] = acca[r][k], sm_acc[warp][r][cb[k]] = accb[r][k];
    __syncthreads();
    merge_warps_write<WARPS, D, REP>(sm_m, sm_l, sm_acc, a.part_acc, a.part_ml, a.splits, a.nq, s, split, r0);
}

#define KVQ_ATTN(PP, REP, HALF, NAME)                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) kvquant_attn_d##PP##_r##REP##_##NAME( \
        const KvqAttnArgs a) {                                                                     \
        kvquant_attn<PP, REP, HALF>(a);                                                            \
    }
#define KVQ_ATTN_REPS(PP, HALF, NAME) KVQ_ATTN(PP, 1, HALF, NAME) KVQ_ATTN(PP, 2, HALF, NAME) KVQ_ATTN(PP, 4, HALF, NAME)
// Head sizes 64 and 128 (d1, d2: RoPE pairs a lane), both RoPE layouts.
KVQ_ATTN_REPS(1, true, half)
KVQ_ATTN_REPS(1, false, interleaved)
KVQ_ATTN_REPS(2, true, half)
KVQ_ATTN_REPS(2, false, interleaved)

// ---------------------------------------------------------------- attention on tensor cores
// The same attention with both products on tensor cores (mma.sync m16n8k16, f16 in, f32
// accumulate), the layout of kivi.cu's tensor-core kernel: the MMA's 16 rows are tokens
// (scores) and channels (output), its 8 columns 8 queries of the stream (block z takes
// queries 8z .. 8z + 7). KVQuant's levels are not evenly spaced and its keys must be
// rotated token by token, so a warp first dequantizes each tile of 32 tokens into an f16
// tile in shared memory, which the MMAs read through ldmatrix:
//   keys    a lane owns PP RoPE pairs (as the CUDA-core kernel) and walks the 32 tokens:
//           level → centre + scale · level → rotated by the token's angle (cos/sin of the
//           tile's first token from the table, then stepped by position 1's) → f16;
//           outliers after: lane j recomputes the pair an outlier of token j sits in;
//   values  lane j dequantizes token j's row (centre + half-range · level, its outliers
//           put back) from codes it loaded a tile ahead into registers.
// Key codes stream into shared memory by cp.async, issued a tile ahead. p goes to f16 once
// and becomes the value product's operand through movmatrix. Every f32 step as the CUDA-
// core kernel's; the f16 roundings of rotated keys, q and p are the error added (the
// bench's check against the CPU cache: relative error ≤ 1e-3).
namespace kvq_tc {
using namespace tc;

// Code of channel c (a compile-time constant once unrolled) in a packed row, from shared
// memory or from registers, as a byte offset into a table of floats (4 · code), for one
// LDS [table + offset]: shifted right by sh − 2 through a funnel of (word >> 30 : word << 2),
// so sh = 0 works too. Codes that straddle two words (3 bits) funnel the two words first.
template <int BITS>
__device__ __forceinline__ uint32_t funnel_offset(uint32_t w, int sh) {
    return __funnelshift_r(w << 2, w >> 30, sh) & (((1u << BITS) - 1) << 2);
}
template <int BITS, typename Row>
__device__ __forceinline__ uint32_t code_offset(const Row& row, int c) {
    const int bit = c * BITS, w = bit >> 5, sh = bit & 31;
    if constexpr (32 % BITS == 0) {
        return funnel_offset<BITS>(row[w], sh);
    } else {
        const uint32_t hi = sh + BITS > 32 ? row[w + 1] : 0u;
        return (__funnelshift_r(row[w], hi, sh) << 2) & (((1u << BITS) - 1) << 2);
    }
}
__device__ __forceinline__ float lut(const float* table, uint32_t offset) {
    return *(const float*)((const char*)table + offset);
}

__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) { return bits(__floats2half2_rn(lo, hi)); }

// Channels of this lane's RoPE pair k: (p, p + D/2) for Hugging Face's rotate_half, (2p, 2p + 1)
// interleaved, p = PP · lane + k.
template <int PP, bool HALF>
__device__ __forceinline__ int chan_a(int lane, int k) { return HALF ? PP * lane + k : 2 * (PP * lane + k); }

template <int PP, bool HALF>
__device__ __forceinline__ int chan_b(int lane, int k) { return HALF ? PP * lane + k + 32 * PP : 2 * (PP * lane + k) + 1; }


// Table offsets of this lane's key codes in a packed row (chan_a / chan_b's channels),
// each code word read once: adjacent channels of a lane share a word when codes do not
// straddle words (2 and 4 bits).
template <int PP, int BITS, bool HALF>
__device__ __forceinline__ void key_offsets(const uint32_t* row, int lane, uint32_t (&oa)[PP], uint32_t (&ob)[PP]) {
    if constexpr (32 % BITS != 0 || (HALF && PP == 1)) {
#pragma unroll
        for (int k = 0; k < PP; k++) {
            oa[k] = code_offset<BITS>(row, chan_a<PP, HALF>(lane, k));
            ob[k] = code_offset<BITS>(row, chan_b<PP, HALF>(lane, k));
        }
    } else if constexpr (HALF) {  // PP = 2: channels (2l, 2l + 1) and (2l + 64, 2l + 65)
        const int bit = 2 * lane * BITS, sh = bit & 31;
        const uint32_t wa = row[bit >> 5], wb = row[(bit + 64 * BITS) >> 5];
        oa[0] = funnel_offset<BITS>(wa, sh), oa[1] = funnel_offset<BITS>(wa, sh + BITS);
        ob[0] = funnel_offset<BITS>(wb, sh), ob[1] = funnel_offset<BITS>(wb, sh + BITS);
    } else {  // interleaved: channels 2PP·l .. 2PP·l + 2PP − 1, (a, b) pair after pair
        const int bit = 2 * PP * lane * BITS, sh = bit & 31;
        const uint32_t w = row[bit >> 5];
#pragma unroll
        for (int k = 0; k < PP; k++) {
            oa[k] = funnel_offset<BITS>(w, sh + 2 * k * BITS);
            ob[k] = funnel_offset<BITS>(w, sh + (2 * k + 1) * BITS);
        }
    }
}

// x as f16 hi + lo (x − hi), two values at a time: the key tile keeps f32-like precision
// (f16 keys alone: errors past 1e-3 of the output where a few channels are large).
__device__ __forceinline__ void hi_lo(float x, float y, uint32_t& hi, uint32_t& lo) {
    const __half2 h = __floats2half2_rn(x, y);
    const float2 back = __half22float2(h);
    hi = bits(h);
    lo = pack_h2(x - back.x, y - back.y);
}
__device__ __forceinline__ void store_lo_hi_halves(__half* row, int i0, int i1, uint32_t w) {
    row[i0] = __ushort_as_half((unsigned short)(w & 0xffffu));
    row[i1] = __ushort_as_half((unsigned short)(w >> 16));
}

// A lane's rotated pairs into a tile row of hi parts and one of lo parts, as wide as its
// channels are adjacent.
template <int PP, bool HALF>
__device__ __forceinline__ void store_pairs(__half* hi_row, __half* lo_row, int lane, const float (&ra)[PP], const float (&rb)[PP]) {
    if constexpr (HALF && PP == 1) {
        uint32_t h, l;
        hi_lo(ra[0], rb[0], h, l);
        store_lo_hi_halves(hi_row, lane, lane + 32, h);
        store_lo_hi_halves(lo_row, lane, lane + 32, l);
    } else if constexpr (HALF) {
        uint32_t ha, la, hb, lb;
        hi_lo(ra[0], ra[1], ha, la);
        hi_lo(rb[0], rb[1], hb, lb);
        *(uint32_t*)(hi_row + 2 * lane) = ha, *(uint32_t*)(hi_row + 2 * lane + 64) = hb;
        *(uint32_t*)(lo_row + 2 * lane) = la, *(uint32_t*)(lo_row + 2 * lane + 64) = lb;
    } else if constexpr (PP == 1) {
        uint32_t h, l;
        hi_lo(ra[0], rb[0], h, l);
        *(uint32_t*)(hi_row + 2 * lane) = h, *(uint32_t*)(lo_row + 2 * lane) = l;
    } else {
        uint32_t h0, l0, h1, l1;
        hi_lo(ra[0], rb[0], h0, l0);
        hi_lo(ra[1], rb[1], h1, l1);
        *(uint2*)(hi_row + 4 * lane) = make_uint2(h0, h1);
        *(uint2*)(lo_row + 4 * lane) = make_uint2(l0, l1);
    }
}

template <int PP, int BITS, bool HALF>
__device__ __forceinline__ void attn(const KvqAttnArgs& a) {
    constexpr int D = 64 * PP, RW = D * BITS / 32, RB = 4 * RW;  // a code row: words, bytes
    constexpr int LD = D + 8;  // tile row stride in halves: rows 16 bytes apart mod 128, ldmatrix conflict-free
    constexpr int NQ = 8, KS = D / 16;
    constexpr int CH = RB % 16 == 0 ? 16 : 8, CPR = RB / CH;  // cp.async chunk, chunks a row
    __shared__ __align__(16) uint32_t s_kcodes[WARPS][32 * RW];
    __shared__ __align__(16) __half s_tile[WARPS][32 * LD];
    __shared__ float s_kl[16], s_vl[16];
    __shared__ float sm_m[WARPS][NQ], sm_l[WARPS][NQ];
    // q (times the softmax scale, in log2 units) as the score MMA's B operand, f16 hi + lo
    // (q's rounding would shift every score of a query alike, an error no average hides):
    // (b0, b1) of hi and of lo for k-step ks at [ks][lane]. Column g is query r0 + g; zero
    // past the stream's queries.
    __shared__ uint4 s_q[KS][32];
    const int s = blockIdx.x, split = blockIdx.y, r0 = blockIdx.z * NQ;
    const int h = s % a.Hkv;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    if (threadIdx.x < (1 << BITS)) s_kl[threadIdx.x] = a.klevels[threadIdx.x], s_vl[threadIdx.x] = a.vlevels[threadIdx.x];
    {
        const bool ok = r0 + g < a.nq;
        const float* qp = a.q + ((long)s * a.nq + (ok ? r0 + g : 0)) * D;
        const float f = ok ? a.scale_log2 : 0.f;
        for (int ks = warp; ks < KS; ks += WARPS) {
            const int c = 16 * ks + 2 * tq;
            const float2 x0 = *(const float2*)(qp + c), x1 = *(const float2*)(qp + c + 8);
            const __half2 h0 = __floats2half2_rn(x0.x * f, x0.y * f), h1 = __floats2half2_rn(x1.x * f, x1.y * f);
            const float2 b0 = __half22float2(h0), b1 = __half22float2(h1);
            s_q[ks][lane] = make_uint4(bits(h0), bits(h1), pack_h2(x0.x * f - b0.x, x0.y * f - b0.y), pack_h2(x1.x * f - b1.x, x1.y * f - b1.y));
        }
    }
    __syncthreads();
    uint32_t* kst = s_kcodes[warp];
    __half* tile_h = s_tile[warp];
    const uint32_t tile_addr = smem_addr(tile_h);
    // Online softmax of this lane's queries 2tq, 2tq + 1 (l: this lane's tokens only,
    // summed over the row's lanes at the end).
    float m[2], l[2];
    long lim[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int r = r0 + 2 * tq + i;
        m[i] = -INFINITY;
        l[i] = 0.f;
        lim[i] = r < a.nq ? a.n - a.T + r % a.T + 1 : 0;
    }
    float acc[KS][4];  // output: channels 16mc + g (+8), queries 2tq, 2tq + 1
#pragma unroll
    for (int mc = 0; mc < KS; mc++) acc[mc][0] = acc[mc][1] = acc[mc][2] = acc[mc][3] = 0.f;

    int ca[PP], cb[PP];
    float kc_a[PP], kc_b[PP], ks_a[PP], ks_b[PP], step_c[PP], step_s[PP];
#pragma unroll
    for (int k = 0; k < PP; k++) {
        ca[k] = chan_a<PP, HALF>(lane, k);
        cb[k] = chan_b<PP, HALF>(lane, k);
        kc_a[k] = a.kcenter[h * D + ca[k]], kc_b[k] = a.kcenter[h * D + cb[k]];
        ks_a[k] = a.kscale[h * D + ca[k]], ks_b[k] = a.kscale[h * D + cb[k]];
        step_c[k] = a.cos[D / 2 + PP * lane + k], step_s[k] = a.sin[D / 2 + PP * lane + k];
    }

    const long tiles = (a.n + 31) / 32;
    const long tb = (long)split * a.tiles_per_split;
    const long te = min(tiles, tb + a.tiles_per_split);
    // A stream's rows in 32 bits (the host keeps the tokens held below 2^31).
    const uint8_t* kcodes = a.kcodes + (long)s * a.cap * RB;
    const uint8_t* vcodes = a.vcodes + (long)s * a.cap * RB;
    const long base = (long)s * a.cap;
    const int last = max((int)a.n - 1 - a.sink, 0);
    // Stored row of tile token r (sink tokens and tokens past the end: a valid row, whose
    // keys are replaced or whose weight is 0).
    auto row_of = [&](long t0, int r) { return max(min((int)t0 - a.sink + r, last), 0); };
    auto stage_keys = [&](long t0) {
#pragma unroll
        for (int c = lane; c < 32 * CPR; c += 32) {
            const int r = c / CPR, w = c % CPR;
            const uint8_t* src = kcodes + row_of(t0, r) * RB + w * CH;
            if constexpr (CH == 16) cp_async(smem_addr(kst) + r * RB + w * CH, src);
            else cp_async8(smem_addr(kst) + r * RB + w * CH, src);
        }
        cp_commit();
    };
    // Lane j's per-token data of a tile, a tile ahead in registers: value codes, the
    // values' (centre, half-range), outliers as (channel | f16 value << 16).
    uint32_t vw[RW], kout[MAX_OUTLIERS], vout[MAX_OUTLIERS];
    __half2 vn;
    auto load_rows = [&](long t0) {
        const int rr = row_of(t0, lane);
        const long row = base + rr;
        const uint8_t* src = vcodes + rr * RB;
#pragma unroll
        for (int w = 0; w < RW; w += CH / 4) {
            if constexpr (CH == 16) {
                const uint4 u = *(const uint4*)(src + 4 * w);
                vw[w] = u.x, vw[w + 1] = u.y, vw[w + 2] = u.z, vw[w + 3] = u.w;
            } else {
                const uint2 u = *(const uint2*)(src + 4 * w);
                vw[w] = u.x, vw[w + 1] = u.y;
            }
        }
        vn = a.vnorm[row];
#pragma unroll
        for (int o = 0; o < MAX_OUTLIERS; o++) {
            const long at = row * a.n_out + min(o, max(a.n_out - 1, 0));
            const bool use = o < a.n_out;
            kout[o] = use ? (uint32_t)a.kout_idx[at] | (uint32_t)__half_as_ushort(a.kout_val[at]) << 16 : 0u;
            vout[o] = use ? (uint32_t)a.vout_idx[at] | (uint32_t)__half_as_ushort(a.vout_val[at]) << 16 : 0u;
        }
    };
    if (tb + warp < te) {
        stage_keys((tb + warp) * 32);
        load_rows((tb + warp) * 32);
    }

    for (long tile = tb + warp; tile < te; tile += WARPS) {
        const long t0 = tile * 32;
        const bool sink_tile = t0 < a.sink;
        float rc[PP], rs[PP];  // cos/sin of token t0 + j at this lane's pairs
#pragma unroll
        for (int k = 0; k < PP; k++) rc[k] = a.cos[t0 * (D / 2) + PP * lane + k], rs[k] = a.sin[t0 * (D / 2) + PP * lane + k];
        cp_wait<0>();
        __syncwarp();
        // Keys, 16 tokens at a time (the tile's rows 0-15 take their hi parts, rows 16-31
        // their lo parts), then their scores S[token][query] (A = keys, 16 tokens × 16
        // channels; B = q): k_hi·q_hi + k_hi·q_lo + k_lo·q_hi.
        float sc[2][4] = {};
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            // Dequantize and rotate, a lane its pairs, token after token (the tile that
            // holds sink tokens takes them from the f16 sink: a loop of its own).
            auto keys = [&](auto with_sink) {
#pragma unroll 4
                for (int r = 0; r < 16; r++) {
                    const int j = 16 * hf + r;
                    uint32_t oa[PP], ob[PP];
                    key_offsets<PP, BITS, HALF>(kst + j * RW, lane, oa, ob);
                    float xa[PP], xb[PP];
#pragma unroll
                    for (int k = 0; k < PP; k++) {
                        xa[k] = fmaf(ks_a[k], lut(s_kl, oa[k]), kc_a[k]);
                        xb[k] = fmaf(ks_b[k], lut(s_kl, ob[k]), kc_b[k]);
                    }
                    if constexpr (decltype(with_sink)::value) {
                        if (t0 + j < a.sink) {  // the same j in every lane
                            const __half* sr = a.ksink + ((long)s * a.sink_cap + t0 + j) * D;
#pragma unroll
                            for (int k = 0; k < PP; k++) xa[k] = __half2float(sr[ca[k]]), xb[k] = __half2float(sr[cb[k]]);
                        }
                    }
                    float ra[PP], rb[PP];
#pragma unroll
                    for (int k = 0; k < PP; k++) {
                        const float c = rc[k], sn = rs[k];
                        ra[k] = xa[k] * c - xb[k] * sn;
                        rb[k] = xa[k] * sn + xb[k] * c;
                        rc[k] = c * step_c[k] - sn * step_s[k];
                        rs[k] = sn * step_c[k] + c * step_s[k];
                    }
                    store_pairs<PP, HALF>(tile_h + r * LD, tile_h + (16 + r) * LD, lane, ra, rb);
                }
            };
            if (sink_tile) keys(std::true_type{});
            else keys(std::false_type{});
            __syncwarp();
            // Key outliers: lane 16hf + r redoes the pair each of token r's outliers sits in.
            {
                const int r = lane & 15;
                const long t = t0 + lane;
                if ((lane >> 4) == hf && t >= a.sink && t < a.n) {
                    const uint32_t* row = kst + lane * RW;
#pragma unroll
                    for (int o = 0; o < MAX_OUTLIERS; o++) {
                        if (o >= a.n_out) break;
                        const int c = (int)(kout[o] & 0xffffu);
                        const int p = HALF ? c % (D / 2) : c / 2;
                        const int cA = HALF ? p : 2 * p, cB = HALF ? p + D / 2 : 2 * p + 1;
                        float xa = fmaf(a.kscale[h * D + cA], lut(s_kl, code_offset<BITS>(row, cA)), a.kcenter[h * D + cA]);
                        float xb = fmaf(a.kscale[h * D + cB], lut(s_kl, code_offset<BITS>(row, cB)), a.kcenter[h * D + cB]);
#pragma unroll
                        for (int o2 = 0; o2 < MAX_OUTLIERS; o2++) {
                            if (o2 >= a.n_out) break;
                            const int c2 = (int)(kout[o2] & 0xffffu);
                            const float x2 = __half2float(__ushort_as_half((unsigned short)(kout[o2] >> 16)));
                            xa = c2 == cA ? x2 : xa;
                            xb = c2 == cB ? x2 : xb;
                        }
                        const float c0 = a.cos[t * (D / 2) + p], s0 = a.sin[t * (D / 2) + p];
                        uint32_t hw, lw;
                        hi_lo(xa * c0 - xb * s0, xa * s0 + xb * c0, hw, lw);
                        store_lo_hi_halves(tile_h + r * LD, cA, cB, hw);
                        store_lo_hi_halves(tile_h + (16 + r) * LD, cA, cB, lw);
                    }
                }
            }
            __syncwarp();
            // The next tile's key codes stream in while this one's scores and values are made.
            if (hf == 1 && tile + WARPS < te) stage_keys((tile + WARPS) * 32);
#pragma unroll
            for (int ks = 0; ks < KS; ks++) {
                const uint4 qv = s_q[ks][lane];
                uint32_t khi[4], klo[4];
                const int r = (lane & 7) + 8 * ((lane >> 3) & 1), col = 16 * ks + 8 * (lane >> 4);
                ldmatrix_x4(khi, tile_addr + 2 * (r * LD + col));
                ldmatrix_x4(klo, tile_addr + 2 * ((16 + r) * LD + col));
                mma(sc[hf], khi, qv.x, qv.y);
                mma(sc[hf], khi, qv.z, qv.w);
                mma(sc[hf], klo, qv.x, qv.y);
            }
            __syncwarp();  // every lane's key fragments are read: the tile takes the next rows
        }
        // Online softmax: a lane holds tokens g, g + 8, g + 16, g + 24 of queries 2tq, 2tq + 1.
        uint32_t pf[2][2];
        float p[2][4];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float x[4], mx = -INFINITY;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const long t = t0 + 8 * e + g;
                x[e] = t < lim[i] ? sc[e >> 1][2 * (e & 1) + i] : -INFINITY;
                mx = fmaxf(mx, x[e]);
            }
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 4));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 8));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 16));
            const float mnew = fmaxf(m[i], mx);
            const bool none = mnew == -INFINITY;  // nothing visible yet for this query
            const float corr = none ? 1.f : ex2(m[i] - mnew);
            float sum = 0.f;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                p[i][e] = none ? 0.f : ex2(x[e] - mnew);
                sum += p[i][e];
            }
            l[i] = l[i] * corr + sum;
            m[i] = mnew;
#pragma unroll
            for (int mc = 0; mc < KS; mc++) acc[mc][i] *= corr, acc[mc][2 + i] *= corr;
        }
        // p as the value product's B operand: token rows → query rows, one 8×8 transpose each.
#pragma unroll
        for (int ks = 0; ks < 2; ks++) {
            pf[ks][0] = transpose8x8(pack_h2(p[0][2 * ks], p[1][2 * ks]));
            pf[ks][1] = transpose8x8(pack_h2(p[0][2 * ks + 1], p[1][2 * ks + 1]));
        }
        // Values: lane j dequantizes token j into the tile.
        {
            const long t = t0 + lane;
            __half* row = tile_h + lane * LD;
            if (t < a.sink) {
                const uint4* sr = (const uint4*)(a.vsink + ((long)s * a.sink_cap + t) * D);
#pragma unroll
                for (int u = 0; u < D / 8; u++) *(uint4*)(row + 8 * u) = sr[u];
            } else {
                const float2 cn = __half22float2(vn);
#pragma unroll
                for (int u = 0; u < D / 8; u++) {
                    uint32_t w4[4];
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        w4[e] = pack_h2(fmaf(cn.y, lut(s_vl, code_offset<BITS>(vw, 8 * u + 2 * e)), cn.x),
                                        fmaf(cn.y, lut(s_vl, code_offset<BITS>(vw, 8 * u + 2 * e + 1)), cn.x));
                    *(uint4*)(row + 8 * u) = make_uint4(w4[0], w4[1], w4[2], w4[3]);
                }
#pragma unroll
                for (int o = 0; o < MAX_OUTLIERS; o++)
                    if (o < a.n_out) row[vout[o] & 0xffffu] = __ushort_as_half((unsigned short)(vout[o] >> 16));
            }
        }
        __syncwarp();
        if (tile + WARPS < te) load_rows((tile + WARPS) * 32);
        // Output O[channel][query] += V^T (16 channels × 16 tokens) · p.
#pragma unroll
        for (int mc = 0; mc < KS; mc++) {
#pragma unroll
            for (int ks = 0; ks < 2; ks++) {
                uint32_t af[4];
                const int r = 16 * ks + (lane & 7) + 8 * (lane >> 4);
                ldmatrix_x4_trans(af, tile_addr + 2 * (r * LD + 16 * mc + 8 * ((lane >> 3) & 1)));
                mma(acc[mc], af, pf[ks][0], pf[ks][1]);
            }
        }
        __syncwarp();  // the tile's value fragments are read before the next keys land
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(FULL_MASK, l[i], 4);
        l[i] += __shfl_xor_sync(FULL_MASK, l[i], 8);
        l[i] += __shfl_xor_sync(FULL_MASK, l[i], 16);
    }
    // Merge the warps' states (the tiles' memory holds the outputs now), write the split.
    __syncthreads();
    float(*sm_acc)[NQ][D] = reinterpret_cast<float(*)[NQ][D]>(&s_tile[0][0]);
    static_assert(sizeof(float) * WARPS * NQ * D <= sizeof(__half) * WARPS * 32 * LD, "the merge fits the tiles");
    if (g == 0) {
#pragma unroll
        for (int i = 0; i < 2; i++) sm_m[warp][2 * tq + i] = m[i], sm_l[warp][2 * tq + i] = l[i];
    }
#pragma unroll
    for (int mc = 0; mc < KS; mc++) {
        sm_acc[warp][2 * tq][16 * mc + g] = acc[mc][0];
        sm_acc[warp][2 * tq + 1][16 * mc + g] = acc[mc][1];
        sm_acc[warp][2 * tq][16 * mc + g + 8] = acc[mc][2];
        sm_acc[warp][2 * tq + 1][16 * mc + g + 8] = acc[mc][3];
    }
    __syncthreads();
    merge_warps_write<WARPS, D, NQ>(sm_m, sm_l, sm_acc, a.part_acc, a.part_ml, a.splits, a.nq, s, split, r0);
}
}  // namespace kvq_tc

#define KVQ_ATTN_TC(PP, BITS, HALF, NAME)                                                               \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, PP == 1 ? 4 : 3) kvquant_attn_tc_d##PP##_b##BITS##_##NAME( \
        const KvqAttnArgs a) {                                                                          \
        kvq_tc::attn<PP, BITS, HALF>(a);                                                                \
    }
#define KVQ_ATTN_TC_BITS(PP, HALF, NAME) KVQ_ATTN_TC(PP, 2, HALF, NAME) KVQ_ATTN_TC(PP, 3, HALF, NAME) KVQ_ATTN_TC(PP, 4, HALF, NAME)
// Head sizes 64 and 128, 2- to 4-bit codes, both RoPE layouts.
KVQ_ATTN_TC_BITS(1, true, half)
KVQ_ATTN_TC_BITS(1, false, interleaved)
KVQ_ATTN_TC_BITS(2, true, half)
KVQ_ATTN_TC_BITS(2, false, interleaved)
