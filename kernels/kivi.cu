// kvq's GPU kernels: quantize + pack new K/V tokens into KIVI's layout (and the
// per-token layout), and decode attention that reads the packed cache directly.
//
// Layouts (per layer; a "stream" is one KV head of one sequence; `cap` tokens per stream):
//   key codes    [stream][block = token / G][channel][G codes packed]     (KIVI: per channel)
//   key params   [stream][block][channel]  half2 (min, scale)
//   value codes  [stream][token][D codes packed]                          (per token)
// except that KIVI's codes (keys and values) are held in tiles of 32 tokens laid out for
// the tensor-core attention (mma_tile.cuh): the same bytes permuted within each tile.
//   value params [stream][token][D / Gv]   half2 (min, scale)
//   tails        [stream][ring slot = token % ring][D] f16: tokens not yet quantized
// Bytes of one stream are exactly the bytes kvq's CPU stores hold (crates/kvq/src/cache/
// store.rs; for KIVI's codes, through the permutation kvq::mma_tile defines): codes packed
// least significant bit first, params f16 rounded outward.
//
// Quantization follows kvq::quant::uniform bit for bit: min = f16_floor(lo),
// scale = f16_ceil((hi − min) / qmax), q = clamp(floor((x − min) · (1/scale) + 0.5)),
// every step an IEEE-rounded f32 operation (explicit __f*_rn: nvcc would otherwise fuse
// the multiply and add, and the codes would differ from the CPU's).
#include <cuda_fp16.h>
#include <stdint.h>

#define FULL_MASK 0xffffffffu

#include "f16_round.cuh"
#include "mma_tile.cuh"
#include "tc.cuh"
#include "warp.cuh"

// Affine parameters covering [lo, hi] (kvq: Affine::fit).
__device__ __forceinline__ __half2 fit_affine(float lo, float hi, float qmax) {
    __half mn = f16_floor(lo);
    float range = __fsub_rn(hi, __half2float(mn));
    __half sc = range > 0.f ? f16_ceil(__fdiv_rn(range, qmax)) : __float2half_rn(0.f);
    return __halves2half2(mn, sc);
}

// One code (kvq: Affine::quantize).
__device__ __forceinline__ uint32_t quant_code(float x, float mn, float inv, float qmax) {
    float q = floorf(__fadd_rn(__fmul_rn(__fsub_rn(x, mn), inv), 0.5f));
    return (uint32_t)fminf(fmaxf(q, 0.f), qmax);
}

__device__ __forceinline__ float inv_scale(float s) { return s > 0.f ? __fdiv_rn(1.f, s) : 0.f; }

// ---------------------------------------------------------------- append
// New tokens [stream][t][D] (f32, `src_stride` floats between streams, starting at token
// `src_t0`) → f16 ring slots (pos0 + t) % ring.
extern "C" __global__ void append_ring_f32(const float* __restrict__ src, long src_stride, int src_t0,
                                           int tokens, int D, int streams, __half* __restrict__ ring,
                                           int ring_len, long pos0) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long total = (long)streams * tokens * D;
    if (i >= total) return;
    int c = (int)(i % D);
    long r = i / D;
    int t = (int)(r % tokens);
    int s = (int)(r / tokens);
    float x = src[(long)s * src_stride + (long)(src_t0 + t) * D + c];
    ring[((long)s * ring_len + (pos0 + t) % ring_len) * D + c] = __float2half_rn(x);
}

// ---------------------------------------------------------------- quantize + pack
// Per-token groups (KIVI values; both K and V of the per-token cache): tokens
// [t0, t1) of every stream, one thread per (stream, token, group of `group` channels).
// `mma`: store the codes in KIVI's MMA tile layout (cap a multiple of 32), where the
// token's channels g8 + 8cc, cc = 4k.. (2-bit) or 2k.. (4-bit), make one byte
// (the token owns it whole); otherwise as a row.
template <int BITS>
__device__ void quant_token_groups(const __half* __restrict__ ring, int ring_len, int D, int group,
                                   long t0, long t1, int streams, uint8_t* __restrict__ codes,
                                   __half2* __restrict__ params, long cap, int mma) {
    const int gpt = D / group;
    const long n = t1 - t0;
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)streams * n * gpt) return;
    int g = (int)(i % gpt);
    long r = i / gpt;
    long t = t0 + r % n;
    int s = (int)(r / n);
    const __half* x = ring + ((long)s * ring_len + t % ring_len) * D + g * group;
    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0; j < group; j++) {
        float v = __half2float(x[j]);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
    const float qmax = (float)((1 << BITS) - 1);
    __half2 a = fit_affine(lo, hi, qmax);
    float mn = __low2float(a), inv = inv_scale(__high2float(a));
    constexpr int PER_BYTE = 8 / BITS;
    if (mma) {
        uint8_t* tile = codes + ((long)s * cap + (t & ~31L)) * (D * BITS / 8);
        for (int g8 = 0; g8 < 8; g8++)
            for (int cc = g * group / 8; cc < (g + 1) * group / 8; cc += PER_BYTE) {
                uint32_t b = 0;
                for (int k = 0; k < PER_BYTE; k++)
                    b |= quant_code(__half2float(x[g8 + 8 * (cc + k) - g * group]), mn, inv, qmax) << (BITS * k);
                int bit;
                tile[mma_value_pos<BITS>((int)(t & 31), g8 + 8 * cc, &bit)] = (uint8_t)b;
            }
    } else {
        uint8_t* out = codes + ((long)s * cap + t) * (D * BITS / 8) + g * group * BITS / 8;
        for (int j = 0; j < group; j += PER_BYTE) {
            uint32_t b = 0;
            for (int k = 0; k < PER_BYTE; k++) b |= quant_code(__half2float(x[j + k]), mn, inv, qmax) << (BITS * k);
            out[j / PER_BYTE] = (uint8_t)b;
        }
    }
    params[((long)s * cap + t) * gpt + g] = a;
}

// Per-channel blocks (KIVI keys): blocks [b0, b1) of G tokens, one thread per
// (stream, block, channel), written in the MMA tile layout: in each tile of the block the
// channel's tokens g8 + 8i, i = 0..3, make one byte (2-bit) or two (4-bit).
template <int BITS>
__device__ void quant_channel_blocks(const __half* __restrict__ ring, int ring_len, int D, int G,
                                     long b0, long b1, int streams, uint8_t* __restrict__ codes,
                                     __half2* __restrict__ params, long cap) {
    const long nb = b1 - b0;
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)streams * nb * D) return;
    int c = (int)(i % D);
    long r = i / D;
    long blk = b0 + r % nb;
    int s = (int)(r / nb);
    const long blocks_per_stream = cap / G;
    const __half* x = ring + (long)s * ring_len * D + c;
    const int first = (int)((blk * G) % ring_len);
    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0, slot = first; j < G; j++, slot = slot + 1 == ring_len ? 0 : slot + 1) {
        float v = __half2float(x[(long)slot * D]);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
    const float qmax = (float)((1 << BITS) - 1);
    __half2 a = fit_affine(lo, hi, qmax);
    float mn = __low2float(a), inv = inv_scale(__high2float(a));
    const long at = ((long)s * blocks_per_stream + blk) * D + c;  // in the CPU store's order
    constexpr int PER_BYTE = 8 / BITS;
    for (int tt = 0; tt < G / 32; tt++) {
        uint8_t* tile = codes + ((long)s * cap + blk * G + 32 * tt) * (D * BITS / 8);
        for (int g8 = 0; g8 < 8; g8++)
            for (int i0 = 0; i0 < 4; i0 += PER_BYTE) {
                uint32_t b = 0;
                for (int k = 0; k < PER_BYTE; k++) {
                    int slot = first + 32 * tt + g8 + 8 * (i0 + k);
                    slot = slot >= ring_len ? slot - ring_len : slot;
                    b |= quant_code(__half2float(x[(long)slot * D]), mn, inv, qmax) << (BITS * k);
                }
                int bit;
                tile[mma_key_pos<BITS>(D, g8 + 8 * i0, c, &bit)] = (uint8_t)b;
            }
    }
    __half* blk_params = (__half*)(params + at - c);  // the block's params, in mma_key_param's order
    blk_params[mma_key_param(c, false)] = __low2half(a);
    blk_params[mma_key_param(c, true)] = __high2half(a);
}

// One (stream, token, group) of quant_token_groups_fast.
template <int BITS, int GROUP>
__device__ __forceinline__ void quant_token_group_fast_one(const __half* __restrict__ ring, int ring_len, int D, long t0, int n,
                                                           int i, uint8_t* __restrict__ codes, __half2* __restrict__ params,
                                                           long cap, int mma, uint8_t* stage) {
    const int gpt = D / GROUP;
    const int g = i % gpt;
    const int r = i / gpt;
    const long t = t0 + r % n;
    const int s = r / n;
    const int slot = (int)((unsigned)t % (unsigned)ring_len);
    const uint4* src = (const uint4*)(ring + ((long)s * ring_len + slot) * D + g * GROUP);
    __half2 x[GROUP / 2];
#pragma unroll
    for (int k = 0; k < GROUP / 8; k++) {
        const uint4 u = src[k];
        const __half2* h = (const __half2*)&u;
#pragma unroll
        for (int e = 0; e < 4; e++) x[4 * k + e] = h[e];
    }
    __half2 lo2 = x[0], hi2 = x[0];
#pragma unroll
    for (int j = 1; j < GROUP / 2; j++) {
        lo2 = __hmin2(lo2, x[j]);
        hi2 = __hmax2(hi2, x[j]);
    }
    const float lo = fminf(__low2float(lo2), __high2float(lo2)), hi = fmaxf(__low2float(hi2), __high2float(hi2));
    const float qmax = (float)((1 << BITS) - 1);
    const __half2 a = fit_affine(lo, hi, qmax);
    const float mn = __low2float(a), inv = inv_scale(__high2float(a));
    if (mma) {
        // The MMA tile layout (see quant_token_groups): a byte per (g8, run of cc), into
        // the tile itself or (mma == 2: the block holds whole tiles) into shared memory first.
        constexpr int PER_BYTE = 8 / BITS;
        uint8_t* tile = mma == 2 ? stage + (threadIdx.x / gpt / 32) * (32 * D * BITS / 8)
                                 : codes + ((long)s * cap + (t & ~31L)) * (D * BITS / 8);
        const int cc0 = g * GROUP / 8;
#pragma unroll
        for (int g8 = 0; g8 < 8; g8++)
#pragma unroll
            for (int cc = 0; cc < GROUP / 8; cc += PER_BYTE) {
                uint32_t b = 0;
#pragma unroll
                for (int k = 0; k < PER_BYTE; k++) {
                    const int j = g8 + 8 * (cc + k);  // channel in the group
                    const __half v = j & 1 ? __high2half(x[j / 2]) : __low2half(x[j / 2]);
                    b |= quant_code(__half2float(v), mn, inv, qmax) << (BITS * k);
                }
                int bit;
                tile[mma_value_pos<BITS>((int)(t & 31), g8 + 8 * (cc0 + cc), &bit)] = (uint8_t)b;
            }
    } else {
        constexpr int WORDS = GROUP * BITS / 32, PER_WORD = 32 / BITS;
        uint32_t w[WORDS];
#pragma unroll
        for (int k = 0; k < WORDS; k++) {
            uint32_t b = 0;
#pragma unroll
            for (int e = 0; e < PER_WORD; e += 2) {
                const float2 f = __half22float2(x[(k * PER_WORD + e) / 2]);
                b |= quant_code(f.x, mn, inv, qmax) << (BITS * e);
                b |= quant_code(f.y, mn, inv, qmax) << (BITS * (e + 1));
            }
            w[k] = b;
        }
        uint32_t* out = (uint32_t*)(codes + ((long)s * cap + t) * (D * BITS / 8) + g * GROUP * BITS / 8);
#pragma unroll
        for (int k = 0; k < WORDS; k++) out[k] = w[k];
    }
    params[((long)s * cap + t) * gpt + g] = a;
}

// Fast paths for the common groups: the group's f16 values are loaded once, 16 bytes at
// a time, and kept in registers *as f16 pairs* (half the registers of f32: more threads
// per SM, more loads in flight; the kernels wait on memory). min/max of f16 are exact,
// and each value is widened to f32 only to be coded, so the arithmetic, and every byte,
// is the generic path's. Rows are stored as whole words; KIVI's MMA tiles byte by byte,
// or, for whole tiles, made in shared memory and stored 16 bytes at a time.
template <int BITS, int GROUP>
__device__ void quant_token_groups_fast(const __half* __restrict__ ring, int ring_len, int D, long t0, long t1,
                                        int streams, uint8_t* __restrict__ codes, __half2* __restrict__ params,
                                        long cap, int mma) {
    // 32-bit index math (the host keeps streams · tokens · groups below 2^31): 64-bit
    // division costs more than quantizing the group.
    const int gpt = D / GROUP;
    const int n = (int)(t1 - t0);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    // mma == 2: [t0, t1) is whole tiles and the block's 256 threads make 256 / gpt / 32
    // of them in shared memory, then write them out 16 bytes a thread.
    __shared__ __align__(16) uint8_t stage[8192];
    if (mma == 2) {
        if (i < streams * n * gpt) quant_token_group_fast_one<BITS, GROUP>(ring, ring_len, D, t0, n, i, codes, params, cap, mma, stage);
        __syncthreads();
        // 32-bit index math (streams · tiles < 2^31): a 64-bit division per store was slow.
        const int cpt = 2 * D * BITS / 8, tiles = 256 / gpt / 32;  // 16-byte chunks a tile
        const int first = blockIdx.x * tiles, total = streams * (n / 32), per = n / 32;
        for (int j = threadIdx.x; j < tiles * cpt; j += blockDim.x) {
            const int tile = first + j / cpt;
            if (tile >= total) break;
            const int sidx = tile / per;
            const long tt = t0 / 32 + (tile - sidx * per);
            ((uint4*)(codes + ((long)sidx * cap + 32 * tt) * (D * BITS / 8)))[j % cpt] = ((const uint4*)stage)[j];
        }
        return;
    }
    if (i >= streams * n * gpt) return;
    quant_token_group_fast_one<BITS, GROUP>(ring, ring_len, D, t0, n, i, codes, params, cap, mma, nullptr);
}

// KIVI keys with blocks of 32 tokens: a thread takes two adjacent channels (one half2
// per token: a warp reads 128 contiguous bytes of each token row) and stores whole 32-bit
// words of the MMA tile. A word holds, per half, 16 bits of codes: at 4 bits, one channel's
// tokens g8 + 8i, so channels c and c + 1 make a word; at 2 bits, a byte each of channels
// c and c + D/2 (the two halves of the channels), so lanes l and l ^ 16 take those and
// swap bytes with a shuffle.
template <int BITS>
__device__ void quant_channel_blocks_32(const __half* __restrict__ ring, int ring_len, int D, long b0, long b1,
                                        int streams, uint8_t* __restrict__ codes, __half2* __restrict__ params,
                                        long cap) {
    constexpr int G = 32;
    const int pairs = D / 2;
    const int nb = (int)(b1 - b0);
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= streams * nb * pairs) return;  // whole warps (pairs is 32 or 64)
    const int j = i % pairs, l = j % 32;
    // At 2 bits lane l ^ 16 takes the pair D/4 further: the other half of the channels.
    const int p = BITS == 2 ? (j / 32) * 16 + (l % 16) + (l / 16) * (pairs / 2) : j;
    const int c = 2 * p;
    const int r = i / pairs;
    const long blk = b0 + r % nb;
    const int s = r / nb;
    const __half* base = ring + (long)s * ring_len * D + c;
    // The block's first ring slot, once; then step and wrap (a 64-bit % per token was
    // most of this kernel's time).
    int slot = (int)((blk * G) % ring_len);
    __half2 x[G];  // token j: channels c (low) and c + 1 (high)
#pragma unroll
    for (int t = 0; t < G; t++) {
        x[t] = *(const __half2*)(base + (long)slot * D);
        slot = slot + 1 == ring_len ? 0 : slot + 1;
    }
    __half2 lo2 = x[0], hi2 = x[0];
#pragma unroll
    for (int t = 1; t < G; t++) {
        lo2 = __hmin2(lo2, x[t]);
        hi2 = __hmax2(hi2, x[t]);
    }
    const float qmax = (float)((1 << BITS) - 1);
    float mn[2], inv[2];
    __half2 fit[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        fit[h] = fit_affine(h == 0 ? __low2float(lo2) : __high2float(lo2), h == 0 ? __low2float(hi2) : __high2float(hi2), qmax);
        mn[h] = __low2float(fit[h]), inv[h] = inv_scale(__high2float(fit[h]));
    }
    // Channels c and c + 1 (c even) are adjacent f16s of the block's mins and of its scales.
    __half2* blk_params = params + ((long)s * (cap / G) + blk) * D;
    const __half2 mins = __lows2half2(fit[0], fit[1]), scales = __highs2half2(fit[0], fit[1]);
    blk_params[mma_key_param(c, false) / 2] = mins;
    blk_params[mma_key_param(c, true) / 2] = scales;
    uint32_t* tile = (uint32_t*)(codes + ((long)s * cap + blk * G) * (D * BITS / 8));  // the block is one tile
    // Tokens g8 + 8k of channel c in the low half, of c + 1 in the high half.
    auto codes_of = [&](int g8) {
        uint32_t v = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const float2 f = __half22float2(x[g8 + 8 * k]);
            v |= quant_code(f.x, mn[0], inv[0], qmax) << (BITS * k);
            v |= quant_code(f.y, mn[1], inv[1], qmax) << (16 + BITS * k);
        }
        return v;
    };
    int bit;
    if constexpr (BITS == 4) {
#pragma unroll
        for (int g8 = 0; g8 < 8; g8++) tile[mma_key_pos<BITS>(D, g8, c, &bit) / 4] = codes_of(g8);
    } else {
        // Lane l < 16 holds the first half of the channels (byte 0 of each half), l ^ 16
        // the second (byte 1). Per g8 and g8 + 4, the first stores g8's word and the second
        // g8 + 4's, each sending the other its byte of that word: one shuffle, no idle lane.
        const bool first = l < 16;
#pragma unroll
        for (int g8 = 0; g8 < 4; g8++) {
            const uint32_t va = codes_of(g8), vb = codes_of(g8 + 4);
            const uint32_t o = __shfl_xor_sync(FULL_MASK, first ? vb : va, 16);
            if (first) tile[mma_key_pos<BITS>(D, g8, c, &bit) / 4] = va | o << 8;
            else tile[mma_key_pos<BITS>(D, g8 + 4, c - D / 2, &bit) / 4] = o | vb << 8;
        }
    }
}

// Quantize kernels wait on memory: at least 4 blocks of 256 an SM (64 registers a thread)
// keeps enough loads in flight (kivi-2's keys took 72 registers, 3 blocks: 76% of copy;
// with 4, 87%), except 4-bit groups of 64, which ran at 67% of copy in 64 registers and
// 85% in 80 (3 blocks). The fast paths are kernels of their own so that the generic
// paths' registers do not count against them (one kernel for all spilled at 64).
#define QUANT_ENTRY(BITS)                                                                               \
    extern "C" __global__ void __launch_bounds__(256, QUANT_BLOCKS) quant_token_groups_b##BITS(const __half* ring, int ring_len, int D,      \
        int group, long t0, long t1, int streams, uint8_t* codes, __half2* params, long cap, int mma) { \
        quant_token_groups<BITS>(ring, ring_len, D, group, t0, t1, streams, codes, params, cap, mma);  \
    }                                                                                                   \
    /* Groups of 32 and 64 channels: kernels of their own (their registers are not the generic path's). */ \
    extern "C" __global__ void __launch_bounds__(256, QUANT_BLOCKS) quant_token_groups32_b##BITS(const __half* ring, int ring_len, int D,      \
        int group, long t0, long t1, int streams, uint8_t* codes, __half2* params, long cap, int mma) { \
        quant_token_groups_fast<BITS, 32>(ring, ring_len, D, t0, t1, streams, codes, params, cap, mma); \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256, BITS == 4 ? 3 : QUANT_BLOCKS) quant_token_groups64_b##BITS(const __half* ring, int ring_len, int D,      \
        int group, long t0, long t1, int streams, uint8_t* codes, __half2* params, long cap, int mma) { \
        quant_token_groups_fast<BITS, 64>(ring, ring_len, D, t0, t1, streams, codes, params, cap, mma); \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256, QUANT_BLOCKS) quant_channel_blocks_b##BITS(const __half* ring, int ring_len, int D,    \
        int G, long b0, long b1, int streams, uint8_t* codes, __half2* params, long cap) {              \
        quant_channel_blocks<BITS>(ring, ring_len, D, G, b0, b1, streams, codes, params, cap);          \
    }                                                                                                   \
    /* Blocks of 32 tokens, a kernel of its own: its registers are not the generic path's. */         \
    extern "C" __global__ void __launch_bounds__(256, QUANT_BLOCKS) quant_channel_blocks32_b##BITS(const __half* ring, int ring_len, int D,  \
        int G, long b0, long b1, int streams, uint8_t* codes, __half2* params, long cap) {              \
        quant_channel_blocks_32<BITS>(ring, ring_len, D, b0, b1, streams, codes, params, cap);          \
    }
#ifndef QUANT_BLOCKS
#define QUANT_BLOCKS 4
#endif

QUANT_ENTRY(2)
QUANT_ENTRY(4)

// ---------------------------------------------------------------- decode attention
// One query token per sequence. Grid: (stream, split, query chunk); 4 warps a block.
// A warp takes tiles of 32 tokens. Keys: each lane owns D/32 channels and adds its
// share of every token's score (for packed keys, score = Σ q·min + Σ (q·scale)·code),
// then a reduce-scatter leaves token j's score in lane j. Values: each lane owns the
// same channels and accumulates p_j · (min + scale · code). Online softmax in base 2.
// Writes, per (stream, split, query): the running max, sum and unnormalized output;
// the window's kernel (a short window) or `combine_splits` merges them.
constexpr int WARPS = 4;

// Window tokens whose loads the CUDA-core kernel puts in flight together (one round trip
// to memory each): as many as fit in the registers its packed path takes anyway.
#define JB_OF(D) ((D) == 64 ? 32 : 16)

// Small unsigned integer → float exactly, in one OR and one FADD (no slow I2F).
__device__ __forceinline__ float code_to_float(uint32_t c) {
    return __uint_as_float(0x4B000000u | c) - 8388608.f;
}

struct AttnArgs {
    const float* q;          // [batch][Hq][D]
    float* part_acc;         // [stream][split][rep][D]
    float* part_ml;          // [stream][split][rep][2]
    const uint8_t* kcodes;
    const __half2* kparams;
    const __half* ktail;
    const uint8_t* vcodes;
    const __half2* vparams;
    const __half* vtail;
    long cap;                // tokens per stream the code buffers hold
    int kring, vring;        // ring lengths of the f16 tails
    int G, Gv;               // key block (tokens), value group (channels)
    int Hq, Hkv, rep;
    long n, nqk, nqv;        // tokens held; keys quantized; values quantized
    int tiles_per_split, splits;
    float scale_log2;        // softmax scale · log2(e)
    int tile0, tile_end;     // this launch's tiles: [tile0, tile_end)
    int split0;              // its first split's index among `splits`
    // The window's kernel, when it is the step's last and runs one split a stream: with
    // `out` set it merges every split into out [batch][Hq][D] (no combine_splits after).
    float* out;
};

// Programmatic dependent launch (sm_90). A step's attention kernels (tensor cores, the
// window's edge, the window) write disjoint splits, and only combine_splits reads them, so
// each lets the next one start as soon as all its own blocks run (pdl_trigger, first
// thing), and the host launches the later ones with that allowed (cuda.rs: launch_after).
// pdl_wait returns once the kernel ahead has ended and its writes are visible (at once
// for a kernel launched the ordinary way). The window's few blocks then run beside the
// packed tiles' instead of after them, and launches overlap.
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

// Query r, channel c of stream s from its `splits` partial results:
// Σ acc·2^(m−M) / Σ l·2^(m−M). The splits come from other blocks and kernels: read from L2
// (ld.global.cg), never from a line this SM's L1 may hold from an earlier launch. The
// merge is on a step's critical path, so four splits' loads go out together: one round
// trip to L2 for up to four splits, not one a pass of a loop. Past four, each batch of
// four rescales the sums so far.
__device__ __forceinline__ float merged_output(const float* part_acc, const float* part_ml, int splits, int rep, int D, int s, int r,
                                               int c) {
    float M = -INFINITY, L = 0.f, A = 0.f;
    for (int k0 = 0; k0 < splits; k0 += 4) {
        float mk[4], lk[4], ak[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const long o = ((long)s * splits + k0 + j) * rep + r;
            const bool in = k0 + j < splits;
            mk[j] = in ? __ldcg(part_ml + o * 2) : -INFINITY;
            lk[j] = in ? __ldcg(part_ml + o * 2 + 1) : 0.f;
            ak[j] = in ? __ldcg(part_acc + o * D + c) : 0.f;
        }
        float Mn = M;
#pragma unroll
        for (int j = 0; j < 4; j++) Mn = fmaxf(Mn, mk[j]);
        if (Mn == -INFINITY) continue;
        const float back = exp2f(M - Mn);  // 0 while nothing is summed (M = −∞)
        L *= back, A *= back, M = Mn;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            if (mk[j] == -INFINITY) continue;
            const float e = exp2f(mk[j] - M);
            L += lk[j] * e;
            A += ak[j] * e;
        }
    }
    return L > 0.f ? A / L : 0.f;
}

// After every warp of the block has left its online-softmax state (max, sum,
// unnormalized output per query) in shared memory: merges them and writes the split's
// partial result for queries r0 .. r0 + NQ of stream s.
template <int D, int NQ>
__device__ __forceinline__ void write_split(const AttnArgs& a, const float (*sm_m)[NQ], const float (*sm_l)[NQ],
                                            const float (*sm_acc)[NQ][D], int s, int split, int r0) {
    merge_warps_write<WARPS, D, NQ>(sm_m, sm_l, sm_acc, a.part_acc, a.part_ml, a.splits, a.rep, s, split, r0);
    // End no earlier than the kernel ahead: combine_splits waits for the last kernel
    // alone, and this makes that one's end mean every split is written.
    pdl_wait();
}

// 32 consecutive rows of a per-token layout, from `row0`: the u32 word of each row that
// holds this lane's codes (from bit `bit` of a row of `row_bytes`) and the (min, scale) of
// its group `g` (of `gpt` a row). Every load is issued first: one round trip to memory a tile.
__device__ __forceinline__ void load_token_tile(const uint8_t* codes, const __half2* params, long row0, int row_bytes, int gpt,
                                                int bit, int g, uint32_t (&w)[32], __half2 (&pr)[32]) {
    const uint32_t* rows = (const uint32_t*)(codes + row0 * row_bytes) + bit / 32;
    const __half2* prs = params + row0 * gpt + g;
#pragma unroll
    for (int j = 0; j < 32; j++) {
        w[j] = __ldg(rows + j * (row_bytes / 4));
        pr[j] = prs[j * gpt];
    }
}

// A lane's C channels c0 .. in KIVI's value MMA tiles: a code's byte is a channel part
// plus a token part (mma_value_pos split in two), so each token costs C byte loads.
template <int D, int VB, int C>
struct MmaValueLane {
    int off[C], bit[C];
    __device__ __forceinline__ explicit MmaValueLane(int c0) {
#pragma unroll
        for (int i = 0; i < C; i++) off[i] = mma_value_pos<VB>(0, c0 + i, &bit[i]);
    }
    // Token t's codes, packed as a row's bits would be (code i at bit VB·i). `stream_t0` = stream · cap.
    __device__ __forceinline__ uint32_t codes(const uint8_t* vcodes, long stream_t0, long t) const {
        const int tt = (int)(t & 31);
        int unused;
        const uint8_t* at = vcodes + (stream_t0 + (t & ~31L)) * (D * VB / 8) + mma_value_pos<VB>(tt, 0, &unused);
        uint32_t x = 0;
#pragma unroll
        for (int i = 0; i < C; i++) x |= (uint32_t)((at[off[i]] >> bit[i]) & ((1u << VB) - 1)) << (VB * i);
        return x;
    }
};

// TK: keys per token (the per-token cache: `G` is then the keys' channel group, and a
// token's score is Σ_g min_g · Σ_{c∈g} q_c + Σ_g scale_g · Σ_{c∈g} q_c · code_c, a lane's
// channels lying in one group); otherwise per channel in blocks of G tokens (KIVI).
template <int D, int KB, int VB, int REP, bool TK>
__device__ __forceinline__ void kivi_decode_attn(const AttnArgs& a) {
    pdl_trigger();
    constexpr int C = D / 32;          // channels per lane
    constexpr int JB = JB_OF(D);       // window tokens whose loads are in flight together
    const int s = blockIdx.x, split = a.split0 + blockIdx.y, r0 = blockIdx.z * REP;
    const int b = s / a.Hkv, h = s % a.Hkv;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c0 = lane * C;

    float qr[REP][C];
#pragma unroll
    for (int r = 0; r < REP; r++) {
        const bool ok = r0 + r < a.rep;
        const float* qp = a.q + ((long)b * a.Hq + h * a.rep + r0 + r) * D + c0;
#pragma unroll
        for (int i = 0; i < C; i++) qr[r][i] = ok ? qp[i] * a.scale_log2 : 0.f;
    }
    // Per-token keys: the lane's share of Σ_{c∈g} q_c (what each key's min multiplies).
    float qsum[REP];
#pragma unroll
    for (int r = 0; r < REP; r++) {
        qsum[r] = 0.f;
#pragma unroll
        for (int i = 0; i < C; i++) qsum[r] += qr[r][i];
    }
    const int krow = D * KB / 8;          // per-token keys: bytes of one token's codes
    const int kgpt = D / a.G;             // per-token keys: groups per token
    const int kbit = c0 * KB;             // per-token keys: this lane's bit offset in a row
    float m[REP], l[REP], accm[REP], acc[REP][C];
#pragma unroll
    for (int r = 0; r < REP; r++) {
        m[r] = -INFINITY;
        l[r] = 0.f;
        accm[r] = 0.f;
#pragma unroll
        for (int i = 0; i < C; i++) acc[r][i] = 0.f;
    }

    const long tb = a.tile0 + (long)blockIdx.y * a.tiles_per_split;
    const long te = min((long)a.tile_end, tb + a.tiles_per_split);
    const long kblocks = a.cap / a.G;
    const int vrow = D * VB / 8;          // bytes of one token's value codes
    const int vgpt = D / a.Gv;            // value groups per token
    const int vg = c0 / a.Gv;             // this lane's value group
    const int vbit = c0 * VB;             // bit offset of this lane's codes in a row
    const MmaValueLane<D, VB, C> vlane(c0);  // KIVI: where this lane's value codes sit in a tile

    for (long tile = tb + warp; tile < te; tile += WARPS) {
        const long t0 = tile * 32;
        float part[REP][32];
        float base[REP];
#pragma unroll
        for (int r = 0; r < REP; r++) {
            base[r] = 0.f;
#pragma unroll
            for (int j = 0; j < 32; j++) part[r][j] = 0.f;
        }
        if (TK && t0 + 32 <= a.nqk) {
            // Packed per-token keys: every load of the tile first, then the scores.
            uint32_t w[32];
            __half2 pr[32];
            load_token_tile(a.kcodes, a.kparams, (long)s * a.cap + t0, krow, kgpt, kbit, c0 / a.G, w, pr);
#pragma unroll
            for (int j = 0; j < 32; j++) {
                const float2 mp = __half22float2(pr[j]);
                const uint32_t x = w[j] >> (kbit % 32);
#pragma unroll
                for (int r = 0; r < REP; r++) {
                    float dot = 0.f;
#pragma unroll
                    for (int i = 0; i < C; i++) dot = fmaf(qr[r][i], code_to_float((x >> (i * KB)) & ((1u << KB) - 1)), dot);
                    part[r][j] = fmaf(mp.y, dot, mp.x * qsum[r]);
                }
            }
        } else if (TK) {
            // Per-token keys across the window's edge and in it: eight tokens' loads in
            // flight at a time, each from the packed rows or the ring.
            const long p0 = t0 % a.kring;
#pragma unroll
            for (int j0 = 0; j0 < 32; j0 += JB) {
                uint32_t w[JB];
                __half2 pr[JB], kk[JB][C / 2];
#pragma unroll
                for (int jj = 0; jj < JB; jj++) {
                    const long t = t0 + j0 + jj;
                    long pos = p0 + j0 + jj;
                    pos = pos >= a.kring ? pos - a.kring : pos;
                    const bool packed = t < a.nqk, live = !packed && t < a.n;
                    const uint8_t* row = a.kcodes + ((long)s * a.cap + t) * krow;
                    w[jj] = packed ? ((const uint32_t*)row)[kbit / 32] >> (kbit % 32) : 0u;
                    pr[jj] = packed ? a.kparams[((long)s * a.cap + t) * kgpt + c0 / a.G] : __half2{};
                    const __half2* kp = (const __half2*)(a.ktail + ((long)s * a.kring + pos) * D + c0);
#pragma unroll
                    for (int i = 0; i < C / 2; i++) kk[jj][i] = live ? kp[i] : __half2{};
                }
#pragma unroll
                for (int jj = 0; jj < JB; jj++) {
                    // A packed token's ring slot reads as 0, a window token's (min, scale) too.
                    const float2 mp = __half22float2(pr[jj]);
#pragma unroll
                    for (int r = 0; r < REP; r++) {
                        float dot = 0.f, full = 0.f;
#pragma unroll
                        for (int i = 0; i < C / 2; i++) {
                            const float2 x = __half22float2(kk[jj][i]);
                            dot = fmaf(qr[r][2 * i], code_to_float((w[jj] >> (2 * i * KB)) & ((1u << KB) - 1)), dot);
                            dot = fmaf(qr[r][2 * i + 1], code_to_float((w[jj] >> ((2 * i + 1) * KB)) & ((1u << KB) - 1)), dot);
                            full = fmaf(qr[r][2 * i], x.x, full);
                            full = fmaf(qr[r][2 * i + 1], x.y, full);
                        }
                        part[r][j0 + jj] = fmaf(mp.y, dot, fmaf(mp.x, qsum[r], full));
                    }
                }
            }
        } else if (t0 + 32 <= a.nqk) {
            // Packed keys (the tile lies inside one block of G tokens), from KIVI's MMA tile:
            // channel c's tokens g8 + 8i, i = 0..3, are one byte (2-bit) or two (4-bit).
            const long blk = t0 / a.G;
            const __half* kpb = (const __half*)(a.kparams + ((long)s * kblocks + blk) * D);  // mma_key_param's order
            const uint8_t* ktile = a.kcodes + ((long)s * a.cap + t0) * (D * KB / 8);
#pragma unroll
            for (int i = 0; i < C; i++) {
                const float2 p = make_float2(__half2float(kpb[mma_key_param(c0 + i, false)]), __half2float(kpb[mma_key_param(c0 + i, true)]));
                uint32_t w8[8];  // token g8 + 8i' at bit KB·i'
#pragma unroll
                for (int g8 = 0; g8 < 8; g8++) {
                    int bit;
                    const int o = mma_key_pos<KB>(D, g8, c0 + i, &bit);
                    w8[g8] = KB == 2 ? (uint32_t)ktile[o] : (uint32_t)*(const uint16_t*)(ktile + o);
                }
                float qs[REP];
#pragma unroll
                for (int r = 0; r < REP; r++) {
                    base[r] = fmaf(qr[r][i], p.x, base[r]);
                    qs[r] = qr[r][i] * p.y;
                }
#pragma unroll
                for (int j = 0; j < 32; j++) {
                    const float cf = code_to_float((w8[j & 7] >> (KB * (j >> 3))) & ((1u << KB) - 1));
#pragma unroll
                    for (int r = 0; r < REP; r++) part[r][j] = fmaf(qs[r], cf, part[r][j]);
                }
            }
        } else {
            // Full-precision keys from the ring: eight tokens' loads in flight at a time
            // (one at a time made the window cost ~64 round trips to memory a tile).
            const long p0 = t0 % a.kring;
#pragma unroll
            for (int j0 = 0; j0 < 32; j0 += JB) {
                __half2 kk[JB][C / 2];
#pragma unroll
                for (int jj = 0; jj < JB; jj++) {
                    long pos = p0 + j0 + jj;  // < 2·kring: one step wraps it
                    pos = pos >= a.kring ? pos - a.kring : pos;
                    const __half2* kp = (const __half2*)(a.ktail + ((long)s * a.kring + pos) * D + c0);
                    const bool live = t0 + j0 + jj < a.n;
#pragma unroll
                    for (int i = 0; i < C / 2; i++) kk[jj][i] = live ? kp[i] : __half2{};
                }
#pragma unroll
                for (int jj = 0; jj < JB; jj++) {
#pragma unroll
                    for (int i = 0; i < C / 2; i++) {
                        const float2 x = __half22float2(kk[jj][i]);
#pragma unroll
                        for (int r = 0; r < REP; r++) {
                            part[r][j0 + jj] = fmaf(qr[r][2 * i], x.x, part[r][j0 + jj]);
                            part[r][j0 + jj] = fmaf(qr[r][2 * i + 1], x.y, part[r][j0 + jj]);
                        }
                    }
                }
            }
        }
        const bool valid = t0 + lane < a.n;
        float p[REP];
#pragma unroll
        for (int r = 0; r < REP; r++) {
            float sc = reduce_scatter32(part[r], lane) + warp_sum(base[r]);
            sc = valid ? sc : -INFINITY;
            const float mnew = fmaxf(m[r], warp_max(sc));
            const float corr = exp2f(m[r] - mnew);
            p[r] = valid ? exp2f(sc - mnew) : 0.f;
            l[r] = l[r] * corr + warp_sum(p[r]);
            accm[r] *= corr;
#pragma unroll
            for (int i = 0; i < C; i++) acc[r][i] *= corr;
            m[r] = mnew;
        }
        if (t0 + 32 <= a.nqv) {
            // A whole tile of packed values: issue every load first (one round trip to
            // memory per tile, not one per token), then accumulate.
            uint32_t w[32];
            __half2 pr[32];
            if constexpr (TK) {
                load_token_tile(a.vcodes, a.vparams, (long)s * a.cap + t0, vrow, vgpt, vbit, vg, w, pr);
            } else {
                // KIVI's MMA tile (only the tiles the tensor-core kernel leaves: the window's edge).
#pragma unroll
                for (int j = 0; j < 32; j++) {
                    w[j] = vlane.codes(a.vcodes, (long)s * a.cap, t0 + j);
                    pr[j] = a.vparams[((long)s * a.cap + t0 + j) * vgpt + vg];
                }
            }
#pragma unroll
            for (int j = 0; j < 32; j++) {
                const float2 mp = __half22float2(pr[j]);
                const uint32_t x = TK ? w[j] >> (vbit % 32) : w[j];
#pragma unroll
                for (int r = 0; r < REP; r++) {
                    const float pv = __shfl_sync(FULL_MASK, p[r], j);
                    accm[r] = fmaf(pv, mp.x, accm[r]);
                    const float ps = pv * mp.y;
#pragma unroll
                    for (int i = 0; i < C; i++)
                        acc[r][i] = fmaf(ps, code_to_float((x >> (i * VB)) & ((1u << VB) - 1)), acc[r][i]);
                }
            }
            continue;
        }
        // The tile that straddles the window's edge, and the window itself: eight tokens'
        // loads in flight at a time, each from the packed rows or the ring.
        const long p0 = t0 % a.vring;
#pragma unroll
        for (int j0 = 0; j0 < 32; j0 += JB) {
            uint32_t w[JB];
            __half2 pr[JB], vv[JB][C / 2];
#pragma unroll
            for (int jj = 0; jj < JB; jj++) {
                const long t = t0 + j0 + jj;
                long pos = p0 + j0 + jj;
                pos = pos >= a.vring ? pos - a.vring : pos;
                const bool packed = t < a.nqv, live = !packed && t < a.n;
                const uint8_t* row = a.vcodes + ((long)s * a.cap + t) * vrow;
                if constexpr (TK) w[jj] = packed ? ((const uint32_t*)row)[vbit / 32] >> (vbit % 32) : 0u;
                else w[jj] = packed ? vlane.codes(a.vcodes, (long)s * a.cap, t) : 0u;
                pr[jj] = packed ? a.vparams[((long)s * a.cap + t) * vgpt + vg] : __half2{};
                const __half2* vp = (const __half2*)(a.vtail + ((long)s * a.vring + pos) * D + c0);
#pragma unroll
                for (int i = 0; i < C / 2; i++) vv[jj][i] = live ? vp[i] : __half2{};
            }
#pragma unroll
            for (int jj = 0; jj < JB; jj++) {
                const float2 mp = __half22float2(pr[jj]);
#pragma unroll
                for (int r = 0; r < REP; r++) {
                    // p is 0 past the last token, and a packed token's ring slot reads as 0.
                    const float pv = __shfl_sync(FULL_MASK, p[r], j0 + jj);
                    accm[r] = fmaf(pv, mp.x, accm[r]);
                    const float ps = pv * mp.y;
#pragma unroll
                    for (int i = 0; i < C / 2; i++) {
                        const float2 x = __half22float2(vv[jj][i]);
                        const float c0f = code_to_float((w[jj] >> (2 * i * VB)) & ((1u << VB) - 1));
                        const float c1f = code_to_float((w[jj] >> ((2 * i + 1) * VB)) & ((1u << VB) - 1));
                        acc[r][2 * i] = fmaf(ps, c0f, fmaf(pv, x.x, acc[r][2 * i]));
                        acc[r][2 * i + 1] = fmaf(ps, c1f, fmaf(pv, x.y, acc[r][2 * i + 1]));
                    }
                }
            }
        }
    }

    // Merge the warps' online-softmax states, then write this split's partial result.
    __shared__ float sm_m[WARPS][REP], sm_l[WARPS][REP];
    __shared__ float sm_acc[WARPS][REP][D];
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < REP; r++) {
            sm_m[warp][r] = m[r];
            sm_l[warp][r] = l[r];
        }
    }
#pragma unroll
    for (int r = 0; r < REP; r++)
#pragma unroll
        for (int i = 0; i < C; i++) sm_acc[warp][r][c0 + i] = acc[r][i] + accm[r];
    __syncthreads();
    write_split<D, REP>(a, sm_m, sm_l, sm_acc, s, split, r0);
}

#define ATTN_ENTRY(D, KB, VB, REP)                                                         \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                \
        kivi_decode_attn_d##D##_k##KB##_v##VB##_r##REP(const AttnArgs a) {                 \
        kivi_decode_attn<D, KB, VB, REP, false>(a);                                        \
    }
#define TOKEN_ATTN_ENTRY(D, B, REP)                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                \
        token_decode_attn_d##D##_b##B##_r##REP(const AttnArgs a) {                         \
        kivi_decode_attn<D, B, B, REP, true>(a);                                           \
    }
#define ATTN_REPS(D, KB, VB) ATTN_ENTRY(D, KB, VB, 1) ATTN_ENTRY(D, KB, VB, 2) ATTN_ENTRY(D, KB, VB, 3) ATTN_ENTRY(D, KB, VB, 4)
#define TOKEN_ATTN_REPS(D, B) TOKEN_ATTN_ENTRY(D, B, 1) TOKEN_ATTN_ENTRY(D, B, 2) TOKEN_ATTN_ENTRY(D, B, 3) TOKEN_ATTN_ENTRY(D, B, 4)
TOKEN_ATTN_REPS(64, 2)
TOKEN_ATTN_REPS(64, 4)
TOKEN_ATTN_REPS(128, 2)
TOKEN_ATTN_REPS(128, 4)
ATTN_REPS(64, 2, 2)
ATTN_REPS(64, 4, 4)
ATTN_REPS(64, 2, 4)
ATTN_REPS(64, 4, 2)
ATTN_REPS(128, 2, 2)
ATTN_REPS(128, 4, 4)
ATTN_REPS(128, 2, 4)
ATTN_REPS(128, 4, 2)

// ---------------------------------------------------------------- the residual window
// Tiles of 32 tokens whose keys and values all sit in the f16 rings (the last
// ceil(window / 32) tiles of a stream, the ragged last one included). A stream has a few,
// each read once: the cost is round trips to memory and instruction fetch, not bandwidth.
// (kivi_decode_attn on these tiles ran 13k straight-line instructions and one round trip
// per 16 tokens: 38 us at Llama-3-8B B16 32k on an H100.) So a warp issues every load of
// its tile at once, keys and values, before q is even in shared memory: one round trip.
// Then, as in full.cu's fp16_attn, lane j scores token j from its key row (the queries
// broadcast from shared memory), and lane c accumulates channels c·D/32.. of Σ p_j·v_j.
// Grid (stream, split, query chunk of REP).
template <int D, int REP>
__device__ __forceinline__ void window_decode_attn(const AttnArgs& a) {
    pdl_trigger();
    constexpr int C = D / 32;  // channels a lane accumulates
    __shared__ __align__(16) float sq[REP][D];
    __shared__ float sp[WARPS][REP][32];
    __shared__ float sm_m[WARPS][REP], sm_l[WARPS][REP];
    __shared__ float sm_acc[WARPS][REP][D];
    const int s = blockIdx.x, split = a.split0 + blockIdx.y, r0 = blockIdx.z * REP;
    const int b = s / a.Hkv, h = s % a.Hkv;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long tb = a.tile0 + (long)blockIdx.y * a.tiles_per_split;
    const long te = min((long)a.tile_end, tb + a.tiles_per_split);
    const __half* kring = a.ktail + (long)s * a.kring * D;
    const __half* vring = a.vtail + (long)s * a.vring * D + lane * C;

    // A tile's loads: lane j's key row (token j), and this lane's C channels of every
    // token's value row; zeros past the last token.
    uint4 kr[D / 8];
    __half2 vr[32][C / 2];
    auto load = [&](long tile) {
        const long t0 = tile * 32;
        const int count = tile < te ? (int)min(32L, a.n - t0) : 0;
        long kp = t0 % a.kring + lane;  // < 2·kring: one step wraps it
        kp = kp >= a.kring ? kp - a.kring : kp;
        const uint4* row = reinterpret_cast<const uint4*>(kring + kp * D);
#pragma unroll
        for (int i = 0; i < D / 8; i++) kr[i] = lane < count ? __ldg(row + i) : make_uint4(0, 0, 0, 0);
        const long v0 = t0 % a.vring;
#pragma unroll
        for (int j = 0; j < 32; j++) {
            long vp = v0 + j;
            vp = vp >= a.vring ? vp - a.vring : vp;
            const __half2* at = reinterpret_cast<const __half2*>(vring + vp * D);
#pragma unroll
            for (int i = 0; i < C / 2; i++) vr[j][i] = j < count ? at[i] : __half2{};
        }
    };
    load(tb + warp);
    for (int i = threadIdx.x; i < REP * D; i += WARPS * 32) {
        const int r = i / D, c = i % D;
        sq[r][c] = r0 + r < a.rep ? a.q[((long)b * a.Hq + h * a.rep + r0 + r) * D + c] * a.scale_log2 : 0.f;
    }
    __syncthreads();

    float m[REP], l[REP], acc[REP][C];
#pragma unroll
    for (int r = 0; r < REP; r++) {
        m[r] = -INFINITY;
        l[r] = 0.f;
#pragma unroll
        for (int c = 0; c < C; c++) acc[r][c] = 0.f;
    }
    for (long tile = tb + warp; tile < te; tile += WARPS) {
        if (tile != tb + warp) load(tile);
        const bool live = tile * 32 + lane < a.n;
        float sc[REP];
#pragma unroll
        for (int r = 0; r < REP; r++) sc[r] = 0.f;
#pragma unroll
        for (int i = 0; i < D / 8; i++) {
            const __half2* k2 = reinterpret_cast<const __half2*>(&kr[i]);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float2 kf = __half22float2(k2[e]);
#pragma unroll
                for (int r = 0; r < REP; r++) {
                    const float2 qf = *reinterpret_cast<const float2*>(&sq[r][8 * i + 2 * e]);
                    sc[r] = fmaf(qf.x, kf.x, fmaf(qf.y, kf.y, sc[r]));
                }
            }
        }
#pragma unroll
        for (int r = 0; r < REP; r++) {
            const float x = live ? sc[r] : -INFINITY;
            const float mn = fmaxf(m[r], warp_max(x)), corr = exp2f(m[r] - mn);
            const float p = exp2f(x - mn);  // 0 for the tile's missing tokens
            l[r] = l[r] * corr + p;
#pragma unroll
            for (int c = 0; c < C; c++) acc[r][c] *= corr;
            m[r] = mn;
            sp[warp][r][lane] = p;
        }
        __syncwarp();
#pragma unroll
        for (int j = 0; j < 32; j++) {
#pragma unroll
            for (int r = 0; r < REP; r++) {
                const float p = sp[warp][r][j];
#pragma unroll
                for (int i = 0; i < C / 2; i++) {
                    const float2 v = __half22float2(vr[j][i]);
                    acc[r][2 * i] = fmaf(p, v.x, acc[r][2 * i]);
                    acc[r][2 * i + 1] = fmaf(p, v.y, acc[r][2 * i + 1]);
                }
            }
        }
        __syncwarp();
    }
#pragma unroll
    for (int r = 0; r < REP; r++) {
        const float ls = warp_sum(l[r]);
        if (lane == 0) sm_m[warp][r] = m[r], sm_l[warp][r] = ls;
#pragma unroll
        for (int c = 0; c < C; c++) sm_acc[warp][r][lane * C + c] = acc[r][c];
    }
    __syncthreads();
    write_split<D, REP>(a, sm_m, sm_l, sm_acc, s, split, r0);
    // The kernels ahead have ended (write_split's pdl_wait) and this block holds the
    // stream's only window split: every split of its queries is in memory, so it merges
    // them here and the step needs no combine_splits (one kernel's end and start fewer).
    if (a.out != nullptr) {
        __syncthreads();  // this block's own split, written by its other threads
        for (int i = threadIdx.x; i < REP * D; i += WARPS * 32) {
            const int r = r0 + i / D, c = i % D;
            if (r < a.rep) a.out[((long)b * a.Hq + h * a.rep + r) * D + c] = merged_output(a.part_acc, a.part_ml, a.splits, a.rep, D, s, r, c);
        }
    }
}
#define WINDOW_ENTRY(D, REP)                                                               \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                \
        window_decode_attn_d##D##_r##REP(const AttnArgs a) {                               \
        window_decode_attn<D, REP>(a);                                                     \
    }
WINDOW_ENTRY(64, 1) WINDOW_ENTRY(64, 2) WINDOW_ENTRY(64, 3) WINDOW_ENTRY(64, 4)
WINDOW_ENTRY(128, 1) WINDOW_ENTRY(128, 2) WINDOW_ENTRY(128, 3) WINDOW_ENTRY(128, 4)

// ---------------------------------------------------------------- decode attention on tensor cores
// The same attention over whole tiles of 32 tokens whose keys and values are both packed,
// with both products on tensor cores (mma.sync m16n8k16: f16 in, f32 accumulate):
//   scores  S[t][q] = Σ_c code_k[t][c] · x[c][q] + Σ_c min_k[c] · q[c],  x = q · scale_k
//   output  O[c][q] = Σ_t code_v[t][c] · p[t][q] · scale_v[t] + Σ_t p[t][q] · min_v[t]
// The MMA's 16 rows are tokens (scores) and channels (output); its 8 columns are 8 of
// the query heads that share a KV head (block z takes heads 8z .. 8z + 7). A code enters
// as an exact f16 subnormal, code·2^(pos−24) (see pair2/pair4), and each lane scales its
// rows of the results back by 2^(24−pos). q (times the softmax scale) sits in shared memory
// as f16 hi + lo; x = q·scale_k is made hi + lo by f16 products (two MMAs: keys keep
// f32-like precision). The min terms are MMAs too, with A rows that repeat the mins.
// p goes to f16 once, becomes the value product's operand through movmatrix (an 8×8
// transpose), and is scaled by each value group's per-token scale in f16.
// Each warp streams its tiles through shared memory with cp.async, STAGES deep.
// crates/kvq/tests/tc_model.rs replays this kernel lane by lane on the CPU cache's bytes
// (CI has no GPU): change one, change the other. There the f16 roundings of p and p·scale_v
// are the error left (up to 3e-4 of the output's largest value); without q's lo part the
// keys' error alone passes 1e-3.
namespace tc {
// Chunks 32c + lane of a region of N 16-byte chunks (N < 32: the first N lanes); dst and
// src already point at this lane's first chunk.
template <int N>
__device__ __forceinline__ void copy_chunks(uint32_t dst, const unsigned char* src, int lane) {
#pragma unroll
    for (int c = 0; c < (N + 31) / 32; c++)
        if (N % 32 == 0 || 32 * c + lane < N) cp_async(dst + 512 * c, src + 512 * c);
}

// The GPT (min, scale) words of one token's value groups, in as few shared loads as fit.
template <int GPT>
__device__ __forceinline__ void load_row_params(const __half2* p, uint32_t (&w)[GPT]) {
    if constexpr (GPT == 4) {
        const uint4 v = *(const uint4*)p;
        w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
    } else if constexpr (GPT == 2) {
        const uint2 v = *(const uint2*)p;
        w[0] = v.x, w[1] = v.y;
    } else {
        w[0] = *(const uint32_t*)p;
    }
}

// Codes become f16 *subnormals*: a code c at bit `pos` of a half's mantissa (exponent 0)
// is the f16 value c·2^(pos−24), exactly. So one byte permute (byte `pos/8`… of u to the
// low half, of v to the high half) and one AND make an MMA operand, whatever the lane's
// bit position; the lane scales its rows of the result by 2^(24−pos) once (scores: per
// tile, fused into the add of the min term; output: at the end). Tensor cores take f16
// subnormals as they are (the bench's check against the CPU would catch a flush).
//
// 2-bit codes: u and v hold 16 codes each; this lane's sit at bits 2g (row g) and 2g + 16
// (row g + 8): byte g/4 and g/4 + 2, bit pos = 2(g & 3) of the byte.
__device__ __forceinline__ void pair2(uint32_t u, uint32_t v, uint32_t sel, uint32_t mask, uint32_t& row_g, uint32_t& row_g8) {
    row_g = __byte_perm(u, v, sel) & mask;
    row_g8 = __byte_perm(u, v, sel + 0x0202u) & mask;
}
// 4-bit codes: nibble g of u and of v: byte g/2, bit pos = 4(g & 1) of the byte.
__device__ __forceinline__ uint32_t pair4(uint32_t u, uint32_t v, uint32_t sel, uint32_t mask) {
    return __byte_perm(u, v, sel) & mask;
}

// KIVI's MMA tiles (mma_tile.cuh, kvq::mma_tile) hold a register's eight or four codes at
// one slot of a word's halves: slot j at bit j·BITS. The slots in a half's low byte are an
// operand after one AND (code·2^(p−24), p = j·BITS); those in its high byte after a shift
// by 8 first (one shift a word serves them all), which puts slot j + 8/BITS at slot j's
// p: the two halves of a word's slots scale alike (the score loop needs no rescale).
template <int BITS>
__device__ __forceinline__ uint32_t slot_operand(uint32_t w, int j) {
    constexpr int LOW = 8 / BITS;  // slots in the low byte
    const uint32_t mask = (BITS == 2 ? 0x00030003u : 0x000F000Fu) << (BITS * (j % LOW));
    return j < LOW ? w & mask : (w >> 8) & mask;
}
// Where slot j's code sits once it is an operand (the p of code·2^(p−24)).
template <int BITS>
__host__ __device__ constexpr int slot_pos(int j) {
    return BITS * (j % (8 / BITS));
}
__device__ __forceinline__ float pow2(int e) { return __int_as_float((127 + e) << 23); }  // 2^e, |e| < 127
// Key slot of score rows (m-tile mt, row half rh) in channel half kg (2-bit: two halves).
template <int KB>
__host__ __device__ constexpr int key_slot(int kg, int mt, int rh) {
    return KB == 2 ? 4 * kg + 2 * mt + rh : 2 * mt + rh;
}

// Where 16-byte chunk w of value row r sits in a stage (CPR chunks a row). The rows a
// quarter-warp reads together (2tq + const, tq = 0..3) would share banks for CPR 2 and 4:
// an XOR of the chunk index with bits of the row spreads them over the 128-byte line.
template <int CPR>
__device__ __forceinline__ int vchunk(int r, int w) {
    if constexpr (CPR == 2) return r * 2 + (w ^ ((r >> 2) & 1));
    else if constexpr (CPR == 4) return r * 4 + (w ^ ((r >> 1) & 3));
    else return r * CPR + w;
}

// One warp's tile in shared memory: key codes (channel by channel, 32 tokens each), key
// params, 32 value rows, their params.
template <int D, int KB, int VB>
struct Tile {
    static constexpr int KC = D * 4 * KB;
    static constexpr int KP = D * 4;
    static constexpr int VC = 32 * D * VB / 8;
    static constexpr int VP = 32 * (D / 32) * 4;
    static constexpr int BYTES = KC + KP + VC + VP;
    static constexpr int STAGES = WARPS * 3 * BYTES <= 40 * 1024 ? 3 : 2;
};
constexpr int NQ = 8;  // query heads a KV head may serve here (the MMA's columns)

// TK: keys per token (the per-token cache), read like the values: rows of D·KB/8 bytes,
// (min, scale) per token and group of G = D/GPT channels. A score is then
//   S[t][q] = Σ_g scale[t][g] · Σ_{c∈g} code[t][c]·q[c] + Σ_g min[t][g] · Σ_{c∈g} q[c]:
// an MMA per group over its channels (A = the token's codes, B = q), its rows scaled after.
// HALF (KIVI, at most 4 query heads a KV head): the score MMAs' columns 0–3 take x's hi
// part and columns 4–7 its lo part, of queries 0–3 (so do those of Σ q·min: q's hi and
// lo), and a shuffle adds the halves: one MMA where two were, since 4 of the 8 columns
// would be padding anyway. Lanes tq and tq + 2 then hold the same scores (bit for bit:
// the sum is commutative), and the output's columns 4–7 repeat 0–3 (never written).
template <int D, int KB, int VB, int GPT, bool TK, bool HALF>
__device__ __forceinline__ void decode_attn(const AttnArgs& a) {
    static_assert(!(TK && HALF), "HALF is KIVI's");
    pdl_trigger();
    using T = Tile<D, KB, VB>;
    constexpr int KS = D / 16;        // channel steps of 16: k-steps of the scores, m-tiles of the output
    constexpr int VROW = D * VB / 8;  // bytes of one value row
    static_assert(2 * WARPS * NQ * 4 + WARPS * NQ * D * 4 <= WARPS * T::STAGES * T::BYTES, "merge area");
    __shared__ __align__(16) unsigned char sm[WARPS * T::STAGES * T::BYTES];
    // q · scale_log2 split into f16 hi + lo, laid out as the B fragments of the score MMAs:
    // for query g, k-step ks and lane column tq, {hi(2tq, 2tq+1), hi(2tq+8, 2tq+9), lo(..), lo(..)}
    // (channels counted from 16ks): one 16-byte load a k-step. Rows padded by 16 words so
    // that each quarter-warp's loads hit distinct banks.
    constexpr int QROW = 4 * KS + 4;  // uint4s a query row
    __shared__ __align__(16) uint4 sq[NQ][QROW];
    __shared__ float sqsum[NQ][GPT];  // TK: Σ q·scale_log2 over each key group's channels
    constexpr int KROW = D * KB / 8;  // bytes of one key row (TK); KIVI's key tile is 32 · KROW bytes too

    // Block z serves queries r0 .. r0 + 8 of the KV head's `rep`.
    const int s = blockIdx.x, split = a.split0 + blockIdx.y, r0 = blockIdx.z * NQ;
    const int b = s / a.Hkv, h = s % a.Hkv;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, tq = lane & 3;
    const long kblocks = a.cap / a.G;
    const long tb = a.tile0 + (long)blockIdx.y * a.tiles_per_split;
    const long te = min((long)a.tile_end, tb + a.tiles_per_split);
    const int count = te > tb + warp ? (int)((te - tb - warp + WARPS - 1) / WARPS) : 0;
    unsigned char* mine = sm + warp * T::STAGES * T::BYTES;
    // A warp's tiles are WARPS·32 tokens apart: the source pointers step by constants,
    // with one wrap into the next key block (no division in the loop).
    const long t_first = (tb + warp) * 32;
    int off = (int)(t_first % a.G);                          // token offset in its key block
    const int doff = (WARPS * 32) % a.G, dblk = (WARPS * 32) / a.G;
    const long kat0 = ((long)s * kblocks + t_first / a.G) * D;
    // Key codes: KIVI's MMA tiles, or (TK) rows; either way 32 tokens are KROW·32 bytes in a row.
    // Sources point at this lane's first chunk (TK's swizzled rows: at the tile) and step by
    // constants; destinations are one shared address + constant offsets.
    const uint8_t* ld_kc = a.kcodes + ((long)s * a.cap + t_first) * KROW + (TK ? 0 : 16 * lane);
    const unsigned char* ld_kp = (const unsigned char*)(TK ? a.kparams + ((long)s * a.cap + t_first) * GPT : a.kparams + kat0) + 16 * lane;
    const uint8_t* ld_vc = a.vcodes + ((long)s * a.cap + t_first) * VROW + (TK ? 0 : 16 * lane);
    const unsigned char* ld_vp = (const unsigned char*)(a.vparams + ((long)s * a.cap + t_first) * GPT) + 16 * lane;
    uint32_t sm_lane = smem_addr(mine) + 16 * lane;
    uint32_t ld_off = 0;  // the stage being filled, in bytes
    int ld_lane = lane;
    auto load = [&]() {
        // KIVI: opaque to the compiler, which would rebuild these from the thread index and
        // the arguments every tile (about 40 instructions) rather than keep them in registers.
        // (The per-token kernel has no registers to spare for them: it would spill.)
        if constexpr (!TK) asm volatile("" : "+r"(sm_lane), "+r"(ld_lane), "+l"(ld_kc), "+l"(ld_kp), "+l"(ld_vc), "+l"(ld_vp));
        const uint32_t st = sm_lane + ld_off;
        if constexpr (TK) {
            // 32 key rows, swizzled as the value rows; 32 tokens' (min, scale) per group.
            const uint32_t st0 = st - 16 * ld_lane;
            for (int j = ld_lane; j < T::KC / 16; j += 32) cp_async(st0 + 16 * vchunk<KROW / 16>(j / (KROW / 16), j % (KROW / 16)), ld_kc + 16 * j);
            copy_chunks<8 * GPT>(st + T::KC, ld_kp, ld_lane);
            ld_kp += WARPS * 32 * GPT * 4;
            for (int j = ld_lane; j < T::VC / 16; j += 32) cp_async(st0 + T::KC + T::KP + 16 * vchunk<VROW / 16>(j / (VROW / 16), j % (VROW / 16)), ld_vc + 16 * j);
        } else {
            // The MMA tiles as they are: lane l's chunk i lands at 16(32i + l), conflict-free.
            copy_chunks<T::KC / 16>(st, ld_kc, ld_lane);
            copy_chunks<T::KP / 16>(st + T::KC, ld_kp, ld_lane);
            copy_chunks<T::VC / 16>(st + T::KC + T::KP, ld_vc, ld_lane);
        }
        copy_chunks<8 * GPT>(st + T::KC + T::KP + T::VC, ld_vp, ld_lane);
        // On to this warp's next tile.
        ld_off = ld_off == (T::STAGES - 1) * T::BYTES ? 0 : ld_off + T::BYTES;
        if constexpr (!TK) {
            off += doff, ld_kp += dblk * D * 4;
            if (off >= a.G) off -= a.G, ld_kp += D * 4;
        }
        ld_kc += WARPS * 32 * KROW, ld_vc += WARPS * 32 * VROW, ld_vp += WARPS * 32 * GPT * 4;
    };

    // The pipeline's first tiles in flight before q is staged: the two round trips to
    // memory overlap (q's loads were a block's first stall, the tiles' its second).
#pragma unroll
    for (int i = 0; i < T::STAGES - 1; i++) {
        if (i < count) load();
        cp_commit();
    }

    for (int i = threadIdx.x; i < NQ * 4 * KS; i += WARPS * 32) {
        const int r = i / (4 * KS), ks = i / 4 % KS, t = i % 4;
        const int qi = HALF ? r & 3 : r;  // HALF: rows r and r + 4 both hold query r
        const float* qr = a.q + ((long)b * a.Hq + h * a.rep + r0 + qi) * D + 16 * ks + 2 * t;
        float x[4] = {0.f, 0.f, 0.f, 0.f};  // channels 2t, 2t + 1, 2t + 8, 2t + 9 of the k-step
        if (r0 + qi < a.rep) {
            x[0] = qr[0] * a.scale_log2, x[1] = qr[1] * a.scale_log2;
            x[2] = qr[8] * a.scale_log2, x[3] = qr[9] * a.scale_log2;
        }
        if constexpr (TK) {
            // A token-row code of channel 2t (2t + 1) enters at bit pL (pH) of its half: q
            // takes the factor 2^-pL (2^-pH) so every product is code·q·2^-24 (exact powers of 2).
            const int pl = KB == 2 ? 4 * (t & 1) : 0, ph = KB == 2 ? pl + 2 : 4;
            const float fl = __int_as_float((127 - pl) << 23), fh = __int_as_float((127 - ph) << 23);
            x[0] *= fl, x[1] *= fh, x[2] *= fl, x[3] *= fh;
        }
        const __half2 h01 = __floats2half2_rn(x[0], x[1]), h89 = __floats2half2_rn(x[2], x[3]);
        const float2 f01 = __half22float2(h01), f89 = __half22float2(h89);
        const uint32_t l01 = bits(__floats2half2_rn(x[0] - f01.x, x[1] - f01.y)), l89 = bits(__floats2half2_rn(x[2] - f89.x, x[3] - f89.y));
        // HALF: row r < 4 (the hi columns) holds {0, 0, hi} (see the score loop), row r + 4 {hi, lo}.
        sq[r][4 * ks + t] = HALF && r < 4 ? make_uint4(0u, 0u, bits(h01), bits(h89)) : make_uint4(bits(h01), bits(h89), l01, l89);
    }
    if constexpr (TK) {
        for (int i = threadIdx.x; i < NQ * GPT; i += WARPS * 32) {
            const int r = i / GPT, gr = i % GPT;
            const float* qr = a.q + ((long)b * a.Hq + h * a.rep + r0 + r) * D + gr * (D / GPT);
            float sum = 0.f;
            if (r0 + r < a.rep)
                for (int c = 0; c < D / GPT; c++) sum += qr[c] * a.scale_log2;
            sqsum[r][gr] = sum;
        }
    }
    __syncthreads();

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // queries 2tq, 2tq + 1
    float acc[KS][4];     // output fragments: channels 16mt + g (+ 8) × queries 2tq (+ 1)
    // Σ p·min_v of value group g % GPT (MMA row g), queries 2tq, 2tq + 1 (2, 3: unused rows).
    float extra[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int mt = 0; mt < KS; mt++) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.f;
    // This lane's byte selectors, masks and the scale back from subnormals (rows g, g + 8).
    // (A selector's nibble i names the source byte of result byte i: 0–3 from u, 4–7 from v.)
    const uint32_t sel2 = (uint32_t)(g >> 2) | (uint32_t)(4 + (g >> 2)) << 8;
    const uint32_t mask2 = (3u << (2 * (g & 3))) * 0x00010001u;
    const uint32_t sel4 = (uint32_t)(g >> 1) | (uint32_t)(4 + (g >> 1)) << 8;
    const uint32_t mask4 = (15u << (4 * (g & 1))) * 0x00010001u;
    const int pos2 = 2 * (g & 3), pos4 = 4 * (g & 1);
    const int vsw = VROW == 32 ? (tq >> 1) & 1 : VROW == 64 ? tq : 0;  // vchunk's XOR on rows 2tq + {0, 1, 8, 9} (+16)
    // TK: byte tq/2 (2-bit) or tq (4-bit) of a key row's word into both halves (the other
    // bytes from zero); channel 2tq's code stays at bit pl of the low half, 2tq + 1's at bit
    // ph of the high half. ksw: vchunk's XOR on key rows g + 8i.
    const uint32_t selt = (uint32_t)(KB == 2 ? tq >> 1 : tq) * 0x0101u + 0x4040u;
    const uint32_t maskt = KB == 2 ? (3u << (4 * (tq & 1))) | (3u << (16 + 4 * (tq & 1) + 2)) : 0x000Fu | 0x00F00000u;
    const int ksw = KROW == 32 ? (g >> 2) & 1 : KROW == 64 ? (g >> 1) & 3 : 0;
    // KIVI: this lane's q fragments (query g, every k-step) kept in registers across the
    // tiles; read from shared memory every tile (cp.async's memory clobbers force that) they
    // were about a sixth of the tile's shared-memory traffic.
    uint4 qf[TK ? 1 : KS];
    if constexpr (!TK) {
#pragma unroll
        for (int ks = 0; ks < KS; ks++) qf[ks] = sq[g][4 * ks + tq];
    }
    float qsum[GPT][2];  // TK: Σ q over each key group, queries 2tq, 2tq + 1
#pragma unroll
    for (int gr = 0; gr < GPT; gr++) qsum[gr][0] = sqsum[2 * tq][gr], qsum[gr][1] = sqsum[2 * tq + 1][gr];
    // 2^(24 − pos), built from its exponent bits.
    const float vf = __int_as_float((127 + 24 - (VB == 2 ? pos2 : pos4)) << 23);

    for (int i = 0, rd_stage = 0; i < count; i++, rd_stage = rd_stage == T::STAGES - 1 ? 0 : rd_stage + 1) {
        if (i + T::STAGES - 1 < count) load();
        cp_commit();
        cp_wait<T::STAGES - 1>();
        __syncwarp();
        const unsigned char* st = mine + rd_stage * T::BYTES;
        const uint32_t* kc = (const uint32_t*)st;
        const unsigned char* kc8 = st;
        const __half2* kp = (const __half2*)(st + T::KC);
        const unsigned char* vc = st + T::KC + T::KP;
        const __half2* vp = (const __half2*)(st + T::KC + T::KP + T::VC);

        // Scores: rows = tokens (two m-tiles of 16), k = channels, columns = queries.
        // x = q·scale_k as f16 hi + lo from q's hi + lo by f16 products: hi = q_hi·s rounded,
        // lo = (q_hi·s − hi) + q_lo·s, the first part exact in an FMA. Σ q·min on tensor
        // cores too: an A whose 16 rows all hold the mins (rows of `bc` are equal).
        float sc[2][4] = {};
        if constexpr (!TK) {
            // This lane's key words (word w: chunk w / 4 at 16(32(w / 4) + lane)): register r
            // of m-tile mt at k-step ks is word 2ks' + (r >> 1) at slot key_slot(kg, mt, r & 1),
            // kg the half of the channels (2-bit: ks' = ks % (KS / 2)), see kvq::mma_tile.
            constexpr int KWL = D * KB / 32;
            uint32_t kw[KWL];
#pragma unroll
            for (int i = 0; i < KWL / 4; i++) {
                const uint4 v = *(const uint4*)(kc8 + 16 * (32 * i + lane));
                kw[4 * i] = v.x, kw[4 * i + 1] = v.y, kw[4 * i + 2] = v.z, kw[4 * i + 3] = v.w;
            }
            float bc[4] = {};  // Σ q·min: queries 2tq, 2tq + 1 (elements 2, 3: unused rows)
#pragma unroll
            for (int ks = 0; ks < KS; ks++) {
                const uint4 qv = qf[ks];
                // Mins and scales of channels c0, c0 + 1 and c0 + 8, c0 + 9, c0 = 16ks + 2tq (mma_key_param's order).
                const uint4 pv = *(const uint4*)&kp[4 * (4 * ks + tq)];
                const uint32_t m01 = pv.x, s01 = pv.y, m89 = pv.z, s89 = pv.w;
                const __half2 qh01 = as_h2(qv.x), qh89 = as_h2(qv.y), ql01 = as_h2(qv.z), ql89 = as_h2(qv.w);
                const __half2 h01 = __hmul2(qh01, as_h2(s01)), h89 = __hmul2(qh89, as_h2(s89));
                // HALF: a hi lane holds q's hi where the lo part goes and 0 where the hi part
                // goes, so its h and residual are 0 and its "lo" is q_hi·s rounded once.
                const uint32_t l01 = bits(__hfma2(ql01, as_h2(s01), __hfma2(qh01, as_h2(s01), __hneg2(h01))));
                const uint32_t l89 = bits(__hfma2(ql89, as_h2(s89), __hfma2(qh89, as_h2(s89), __hneg2(h89))));
                const int kg = KB == 2 ? ks / (KS / 2) : 0, wi = KB == 2 ? 2 * (ks % (KS / 2)) : 2 * ks;
                // 2-bit: the second half of the channels reads slots 4–7 of the same rows,
                // at the same bit positions as slots 0–3 (slot_operand): the sums add as they are.
                static_assert(KB != 2 || (slot_pos<KB>(key_slot<KB>(1, 0, 0)) == slot_pos<KB>(key_slot<KB>(0, 0, 0)) &&
                                          slot_pos<KB>(key_slot<KB>(1, 1, 1)) == slot_pos<KB>(key_slot<KB>(0, 1, 1))), "key slots");
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    uint32_t A[4];
#pragma unroll
                    for (int r = 0; r < 4; r++) A[r] = slot_operand<KB>(kw[wi + (r >> 1)], key_slot<KB>(kg, mt, r & 1));
                    if constexpr (!HALF) mma(sc[mt], A, bits(h01), bits(h89));
                    mma(sc[mt], A, l01, l89);
                }
                // A's rows g hold the mins, its rows g + 8 the scales (bc[2], bc[3]: never
                // read): the registers of the params' load as they are, no copies.
                const uint32_t M[4] = {m01, s01, m89, s89};
                if constexpr (HALF) {
                    // Σ q·min: q's hi (hi lanes) or lo (lo lanes), both where the lo part goes.
                    mma(bc, M, qv.z, qv.w);
                } else {
                    mma(bc, M, qv.x, qv.y);
                    mma(bc, M, qv.z, qv.w);
                }
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int e = 0; e < 4; e++) sc[mt][e] = fmaf(sc[mt][e], pow2(24 - slot_pos<KB>(key_slot<KB>(KB == 2, mt, e >> 1))), bc[e & 1]);
            if constexpr (HALF) {
                // Column n + 4 (lo) sits in lane tq + 2 of column n (hi).
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) sc[mt][e] += __shfl_xor_sync(FULL_MASK, sc[mt][e], 2);
            }
        } else {
            // Per-token keys: one group's k-steps into acc2, then its rows scaled by each
            // token's scale (×2^24, the subnormal factor) plus min · Σq of the group.
            constexpr int SPG = KS / GPT;  // k-steps a group
            uint32_t pr[4][GPT];           // (min, scale) of tokens g, g + 8, g + 16, g + 24
#pragma unroll
            for (int i = 0; i < 4; i++) load_row_params<GPT>(kp + (g + 8 * i) * GPT, pr[i]);
#pragma unroll
            for (int gr = 0; gr < GPT; gr++) {
                float acc2[2][4] = {};
#pragma unroll
                for (int kk = 0; kk < SPG; kk++) {
                    const int ks = gr * SPG + kk;
                    const uint4 qv = sq[g][4 * ks + tq];
                    uint32_t w[4][2];  // rows g + 8i: the word(s) of channels 16ks .. 16ks + 15
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        const unsigned char* row = kc8 + (g + 8 * i) * KROW;
                        if constexpr (KB == 2) {
                            w[i][0] = *(const uint32_t*)(row + 16 * ((ks >> 2) ^ ksw) + 4 * (ks & 3));
                        } else {
                            const uint2 x = *(const uint2*)(row + 16 * ((ks >> 1) ^ ksw) + 8 * (ks & 1));
                            w[i][0] = x.x, w[i][1] = x.y;
                        }
                    }
                    uint32_t A0[4], A1[4];
#pragma unroll
                    for (int i = 0; i < 2; i++) {
                        // A row g (i = 0) or g + 8 (i = 1): channels 2tq, 2tq + 1 in reg i, + 8 in reg i + 2.
                        if constexpr (KB == 2) {
                            A0[i] = __byte_perm(w[i][0], 0, selt) & maskt;
                            A0[i + 2] = __byte_perm(w[i][0], 0, selt + 0x0202) & maskt;
                            A1[i] = __byte_perm(w[i + 2][0], 0, selt) & maskt;
                            A1[i + 2] = __byte_perm(w[i + 2][0], 0, selt + 0x0202) & maskt;
                        } else {
                            A0[i] = __byte_perm(w[i][0], 0, selt) & maskt;
                            A0[i + 2] = __byte_perm(w[i][1], 0, selt) & maskt;
                            A1[i] = __byte_perm(w[i + 2][0], 0, selt) & maskt;
                            A1[i + 2] = __byte_perm(w[i + 2][1], 0, selt) & maskt;
                        }
                    }
                    mma(acc2[0], A0, qv.x, qv.y);
                    mma(acc2[0], A0, qv.z, qv.w);
                    mma(acc2[1], A1, qv.x, qv.y);
                    mma(acc2[1], A1, qv.z, qv.w);
                }
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const float2 p = __half22float2(as_h2(pr[2 * mt + (e >> 1)][gr]));
                        sc[mt][e] = fmaf(acc2[mt][e], p.y * 16777216.f, fmaf(p.x, qsum[gr][e & 1], sc[mt][e]));
                    }
            }
        }

        // Online softmax (base 2) per query; this lane holds tokens g, g + 8, g + 16, g + 24.
        float corr[2];
        bool grew = false;
#pragma unroll
        for (int j = 0; j < 2; j++) {
            float mx = fmaxf(fmaxf(sc[0][j], sc[0][j + 2]), fmaxf(sc[1][j], sc[1][j + 2]));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 4));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 8));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 16));
            const float mn = fmaxf(m[j], mx);
            grew |= mn != m[j];
            corr[j] = ex2(m[j] - mn);
            m[j] = mn;
            float ps = 0.f;
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                sc[mt][j] = ex2(sc[mt][j] - mn);
                sc[mt][j + 2] = ex2(sc[mt][j + 2] - mn);
                ps += sc[mt][j] + sc[mt][j + 2];
            }
            l[j] = l[j] * corr[j] + ps;
        }
        // Once the running maxima settle, corr is exactly 1 in every lane: skip the rescale.
        if (__any_sync(FULL_MASK, grew)) {
#pragma unroll
            for (int mt = 0; mt < KS; mt++) {
                acc[mt][0] *= corr[0];
                acc[mt][1] *= corr[1];
                acc[mt][2] *= corr[0];
                acc[mt][3] *= corr[1];
            }
            extra[0] *= corr[0];
            extra[1] *= corr[1];
        }

        // Output: rows = channels (KS m-tiles), k = tokens (two steps of 16), columns = queries.
        // p goes to f16 once and through movmatrix to the B layout (k = tokens), then is
        // scaled by each value group's per-token scale in f16; Σ p·min_v is an MMA whose
        // A rows all hold the mins.
        constexpr int VS = 16 / VB;         // KIVI: slots a half of a value word
        constexpr int VWL = D * VB / 32;    // KIVI: value words a lane
        uint32_t vw[TK ? 1 : VWL];          // KIVI: this lane's value words (chunk i at 16(32i + lane))
        if constexpr (!TK) {
#pragma unroll
            for (int i = 0; i < VWL / 4; i++) {
                const uint4 v = *(const uint4*)(vc + 16 * (32 * i + lane));
                vw[4 * i] = v.x, vw[4 * i + 1] = v.y, vw[4 * i + 2] = v.z, vw[4 * i + 3] = v.w;
            }
        }
#pragma unroll
        for (int ks = 0; ks < 2; ks++) {
            // B fragments of p: tokens 2tq, 2tq + 1 (pt0) and 2tq + 8, 2tq + 9 (pt8) of the k-step, query g.
            const uint32_t pt0 = transpose8x8(bits(__floats2half2_rn(sc[ks][0], sc[ks][1])));
            const uint32_t pt8 = transpose8x8(bits(__floats2half2_rn(sc[ks][2], sc[ks][3])));
            const int t0 = 16 * ks + 2 * tq;  // (min, scale) of this lane's four tokens, every group
            uint32_t pr0[GPT], pr1[GPT], pr8[GPT], pr9[GPT];
            load_row_params<GPT>(vp + t0 * GPT, pr0);
            load_row_params<GPT>(vp + (t0 + 1) * GPT, pr1);
            load_row_params<GPT>(vp + (t0 + 8) * GPT, pr8);
            load_row_params<GPT>(vp + (t0 + 9) * GPT, pr9);
            uint32_t b0[GPT], b1[GPT];
#pragma unroll
            for (int gr = 0; gr < GPT; gr++) {
                b0[gr] = bits(__hmul2(as_h2(pt0), as_h2(__byte_perm(pr0[gr], pr1[gr], 0x7632))));
                b1[gr] = bits(__hmul2(as_h2(pt8), as_h2(__byte_perm(pr8[gr], pr9[gr], 0x7632))));
            }
            {
                // Row g of the mins' A holds group g % GPT: one MMA for every group.
                const __half2* mp = vp + t0 * GPT + g % GPT;
                const uint32_t m0 = *(const uint32_t*)mp, m1 = *(const uint32_t*)(mp + GPT);
                const uint32_t m8 = *(const uint32_t*)(mp + 8 * GPT), m9 = *(const uint32_t*)(mp + 9 * GPT);
                const uint32_t m01 = __byte_perm(m0, m1, 0x5410), m89 = __byte_perm(m8, m9, 0x5410);
                // Rows g + 8 (extra[2], extra[3]) are never read: any registers do there.
                const uint32_t M[4] = {m01, m0, m89, m8};
                mma(extra, M, pt0, pt8);
            }
            if constexpr (!TK) {
                // KIVI's MMA tile: register r of m-tile mt is word 4(cc / VS) + 2ks + (r >> 1)
                // at slot cc % VS, cc = 2mt + (r & 1) (kvq::mma_tile): a row keeps its slot.
#pragma unroll
                for (int mt = 0; mt < KS; mt++) {
                    const int gr = mt * GPT / KS;
                    uint32_t A[4];
#pragma unroll
                    for (int r = 0; r < 4; r++) {
                        const int cc = 2 * mt + (r & 1);
                        A[r] = slot_operand<VB>(vw[4 * (cc / VS) + 2 * ks + (r >> 1)], cc % VS);
                    }
                    mma(acc[mt], A, b0[gr], b1[gr]);
                }
            } else {
                // Value rows (tokens) 2tq, +1, +8, +9 of the k-step; for all four vchunk's XOR is vsw.
                const unsigned char* rows = vc + (16 * ks + 2 * tq) * VROW;
                auto row = [&](int dr, int w4) { return *(const uint4*)(rows + dr * VROW + 16 * (w4 ^ vsw)); };
#pragma unroll
                for (int w4 = 0; w4 < VROW / 16; w4++) {
                    const uint4 ra = row(0, w4), rb = row(1, w4), r8 = row(8, w4), r9 = row(9, w4);
                    const uint32_t wa[4] = {ra.x, ra.y, ra.z, ra.w}, wb[4] = {rb.x, rb.y, rb.z, rb.w};
                    const uint32_t w8[4] = {r8.x, r8.y, r8.z, r8.w}, w9[4] = {r9.x, r9.y, r9.z, r9.w};
                    if constexpr (VB == 2) {
                        // A word holds 16 channels: one m-tile.
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int mt = 4 * w4 + e, gr = mt * GPT / KS;
                            uint32_t A[4];
                            pair2(wa[e], wb[e], sel2, mask2, A[0], A[1]);
                            pair2(w8[e], w9[e], sel2, mask2, A[2], A[3]);
                            mma(acc[mt], A, b0[gr], b1[gr]);
                        }
                    } else {
                        // Two words (channels 0–7, 8–15) per m-tile.
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            const int mt = 2 * w4 + e, gr = mt * GPT / KS;
                            const uint32_t A[4] = {pair4(wa[2 * e], wb[2 * e], sel4, mask4), pair4(wa[2 * e + 1], wb[2 * e + 1], sel4, mask4),
                                                   pair4(w8[2 * e], w9[2 * e], sel4, mask4), pair4(w8[2 * e + 1], w9[2 * e + 1], sel4, mask4)};
                            mma(acc[mt], A, b0[gr], b1[gr]);
                        }
                    }
                }
            }
        }
        __syncwarp();  // the stage is refilled next iteration
    }
    cp_wait<0>();

    // Sums over the lanes' tokens, then the block merge (the tile buffers are reused).
#pragma unroll
    for (int o = 4; o <= 16; o <<= 1) {
#pragma unroll
        for (int j = 0; j < 2; j++) {
            l[j] += __shfl_xor_sync(FULL_MASK, l[j], o);
        }
    }
    __syncthreads();
    auto sm_m = reinterpret_cast<float (*)[NQ]>(sm);
    auto sm_l = reinterpret_cast<float (*)[NQ]>(sm + WARPS * NQ * 4);
    auto sm_acc = reinterpret_cast<float (*)[NQ][D]>(sm + 2 * WARPS * NQ * 4);
    if (g == 0) {
#pragma unroll
        for (int j = 0; j < 2; j++) {
            sm_m[warp][2 * tq + j] = m[j];
            sm_l[warp][2 * tq + j] = l[j];
        }
    }
    float ex[GPT][2];  // every group's Σ p·min_v, from the lanes whose row g holds it
#pragma unroll
    for (int gr = 0; gr < GPT; gr++) {
        ex[gr][0] = __shfl_sync(FULL_MASK, extra[0], 4 * gr + tq);
        ex[gr][1] = __shfl_sync(FULL_MASK, extra[1], 4 * gr + tq);
    }
#pragma unroll
    for (int mt = 0; mt < KS; mt++) {
        const int gr = mt * GPT / KS;
        // Back from subnormals: KIVI's rows by their slot, the per-token rows by this lane's bit.
        constexpr int VS = 16 / VB;
        const float vf0 = TK ? vf : pow2(24 - slot_pos<VB>((2 * mt) % VS)), vf1 = TK ? vf : pow2(24 - slot_pos<VB>((2 * mt + 1) % VS));
#pragma unroll
        for (int j = 0; j < 2; j++) {
            sm_acc[warp][2 * tq + j][16 * mt + g] = fmaf(acc[mt][j], vf0, ex[gr][j]);
            sm_acc[warp][2 * tq + j][16 * mt + g + 8] = fmaf(acc[mt][j + 2], vf1, ex[gr][j]);
        }
    }
    __syncthreads();
    write_split<D, NQ>(a, sm_m, sm_l, sm_acc, s, split, r0);
}
}  // namespace tc

// KIVI: at least 4 blocks an SM at head size 64 (128 registers a thread at most), 3 at 128
// (168: its q fragments alone take 32). An SM runs these kernels no faster past 8 warps
// (gpu_plan.rs), and the planner asks for 2 or 3 blocks an SM at the goal shapes.
// Per-token keys: 4 (without the bound the compiler took 154 registers at head size 128;
// with 5 blocks, 96, it spilled).
#define TC_ENTRY(D, KB, VB, GPT)                                                            \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, D == 64 ? 4 : 3)               \
        kivi_decode_attn_tc_d##D##_k##KB##_v##VB##_g##GPT(const AttnArgs a) {               \
        tc::decode_attn<D, KB, VB, GPT, false, false>(a);                                    \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, D == 64 ? 4 : 3)               \
        kivi_decode_attn_tc_d##D##_k##KB##_v##VB##_g##GPT##_half(const AttnArgs a) {         \
        tc::decode_attn<D, KB, VB, GPT, false, true>(a);                                     \
    }
#define TOKEN_TC_ENTRY(D, B, GPT)                                                            \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, 4)                              \
        token_decode_attn_tc_d##D##_b##B##_g##GPT(const AttnArgs a) {                        \
        tc::decode_attn<D, B, B, GPT, true, false>(a);                                              \
    }
#define TC_BITS(D, GPT) TC_ENTRY(D, 2, 2, GPT) TC_ENTRY(D, 4, 4, GPT) TC_ENTRY(D, 2, 4, GPT) TC_ENTRY(D, 4, 2, GPT)
TC_BITS(64, 1)
TC_BITS(64, 2)
TC_BITS(128, 1)
TC_BITS(128, 2)
TC_BITS(128, 4)
// Per-token keys: 2 or 4 bits, 1, 2 or 4 groups a token (at head size 64: groups of 64 or 32).
#define TOKEN_TC_BITS(D, GPT) TOKEN_TC_ENTRY(D, 2, GPT) TOKEN_TC_ENTRY(D, 4, GPT)
TOKEN_TC_BITS(64, 1)
TOKEN_TC_BITS(64, 2)
TOKEN_TC_BITS(128, 1)
TOKEN_TC_BITS(128, 2)
TOKEN_TC_BITS(128, 4)


// ---------------------------------------------------------------- the chunk's own tokens
// Past-only attention (kvq's `past_only`): the t queries of a chunk see the past from
// the store (the kernels above, with n = the past's length) and the chunk's own K/V at
// full precision, causally. This kernel does the latter for one (stream, query head,
// token) a block, D threads, and writes it as split `split` for combine_splits.
// q: [batch][Hq][t][D]; k, v: [stream][t][D] (what was appended); queries are counted
// as rep·t "heads" a KV head, token fastest, as in the other kernels' partial results.
extern "C" __global__ void fresh_attn(const float* __restrict__ q, const float* __restrict__ k,
                                      const float* __restrict__ v, float* __restrict__ part_acc,
                                      float* __restrict__ part_ml, int t, int D, int Hkv, int rep, int splits,
                                      int split, float scale_log2) {
    __shared__ float red[4];
    const int s = blockIdx.x, rv = blockIdx.y;  // rv = head · t + token
    const int i = rv % t, c = threadIdx.x;
    const int b = s / Hkv, h = s % Hkv;
    const int lane = c & 31, warp = c >> 5, warps = D / 32;
    const float qc = q[(((long)b * Hkv + h) * rep * t + rv) * D + c] * scale_log2;
    float m = -INFINITY, l = 0.f, acc = 0.f;
    for (int j = 0; j <= i; j++) {
        float x = warp_sum(qc * k[((long)s * t + j) * D + c]);
        if (lane == 0) red[warp] = x;
        __syncthreads();
        float sc = 0.f;
        for (int w = 0; w < warps; w++) sc += red[w];
        __syncthreads();
        const float mn = fmaxf(m, sc), corr = exp2f(m - mn), p = exp2f(sc - mn);
        l = l * corr + p;
        acc = acc * corr + p * v[((long)s * t + j) * D + c];
        m = mn;
    }
    const long o = ((long)s * splits + split) * rep * t + rv;
    part_acc[o * D + c] = acc;
    if (c == 0) {
        part_ml[o * 2] = m;
        part_ml[o * 2 + 1] = l;
    }
}


// Merges the splits of every (stream, query): out = Σ acc·2^(m−M) / Σ l·2^(m−M).
// Grid: streams · rep blocks of D threads. out: [batch][Hq][D].
extern "C" __global__ void combine_splits(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                          float* __restrict__ out, int splits, int rep, int Hkv, int D) {
    pdl_wait();  // the attention kernels' splits (cuda.rs may launch this one early)
    const int sr = blockIdx.x;
    const int s = sr / rep, r = sr % rep;
    const int c = threadIdx.x;
    if (c >= D) return;
    const int b = s / Hkv, h = s % Hkv;
    out[((long)b * Hkv * rep + h * rep + r) * D + c] = merged_output(part_acc, part_ml, splits, rep, D, s, r, c);
}
