// kvq's GPU kernels: quantize + pack new K/V tokens into KIVI's layout (and the
// per-token layout), and decode attention that reads the packed cache directly.
//
// Layouts (per layer; a "stream" is one KV head of one sequence; `cap` tokens per stream):
//   key codes    [stream][block = token / G][channel][G codes packed]     (KIVI: per channel)
//   key params   [stream][block][channel]  half2 (min, scale)
//   value codes  [stream][token][D codes packed]                          (per token)
//   value params [stream][token][D / Gv]   half2 (min, scale)
//   tails        [stream][ring slot = token % ring][D] f16: tokens not yet quantized
// Bytes of one stream are exactly the bytes kvq's CPU stores hold (crates/kvq/src/cache/
// store.rs): codes packed least significant bit first, params f16 rounded outward.
//
// Quantization follows kvq::quant::uniform bit for bit: min = f16_floor(lo),
// scale = f16_ceil((hi − min) / qmax), q = clamp(floor((x − min) · (1/scale) + 0.5)),
// every step an IEEE-rounded f32 operation (explicit __f*_rn: nvcc would otherwise fuse
// the multiply and add, and the codes would differ from the CPU's).
#include <cuda_fp16.h>
#include <stdint.h>

#define FULL_MASK 0xffffffffu

// ---------------------------------------------------------------- f16 rounding
__device__ __forceinline__ unsigned short f16_next_up_bits(unsigned short b) {
    if ((b & 0x7fff) == 0) return 1;
    return (b & 0x8000) == 0 ? (unsigned short)(b + 1) : (unsigned short)(b - 1);
}
__device__ __forceinline__ unsigned short f16_next_down_bits(unsigned short b) {
    if ((b & 0x7fff) == 0) return 0x8001;
    return (b & 0x8000) == 0 ? (unsigned short)(b - 1) : (unsigned short)(b + 1);
}
// Largest f16 ≤ x.
__device__ __forceinline__ __half f16_floor(float x) {
    __half h = __float2half_rn(x);
    if (__half2float(h) > x) h = __ushort_as_half(f16_next_down_bits(__half_as_ushort(h)));
    return h;
}
// Smallest f16 ≥ x.
__device__ __forceinline__ __half f16_ceil(float x) {
    __half h = __float2half_rn(x);
    if (__half2float(h) < x) h = __ushort_as_half(f16_next_up_bits(__half_as_ushort(h)));
    return h;
}

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
template <int BITS>
__device__ void quant_token_groups(const __half* __restrict__ ring, int ring_len, int D, int group,
                                   long t0, long t1, int streams, uint8_t* __restrict__ codes,
                                   __half2* __restrict__ params, long cap) {
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
    uint8_t* out = codes + ((long)s * cap + t) * (D * BITS / 8) + g * group * BITS / 8;
    constexpr int PER_BYTE = 8 / BITS;
    for (int j = 0; j < group; j += PER_BYTE) {
        uint32_t b = 0;
        for (int k = 0; k < PER_BYTE; k++) b |= quant_code(__half2float(x[j + k]), mn, inv, qmax) << (BITS * k);
        out[j / PER_BYTE] = (uint8_t)b;
    }
    params[((long)s * cap + t) * gpt + g] = a;
}

// Per-channel blocks (KIVI keys): blocks [b0, b1) of G tokens, one thread per
// (stream, block, channel); the G codes of a channel are packed together.
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
    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0; j < G; j++) {
        float v = __half2float(x[((blk * G + j) % ring_len) * D]);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
    }
    const float qmax = (float)((1 << BITS) - 1);
    __half2 a = fit_affine(lo, hi, qmax);
    float mn = __low2float(a), inv = inv_scale(__high2float(a));
    long at = ((long)s * blocks_per_stream + blk) * D + c;
    uint8_t* out = codes + at * (G * BITS / 8);
    constexpr int PER_BYTE = 8 / BITS;
    for (int j = 0; j < G; j += PER_BYTE) {
        uint32_t b = 0;
        for (int k = 0; k < PER_BYTE; k++)
            b |= quant_code(__half2float(x[((blk * G + j + k) % ring_len) * D]), mn, inv, qmax) << (BITS * k);
        out[j / PER_BYTE] = (uint8_t)b;
    }
    params[at] = a;
}

// Fast paths for the common groups: the group's f16 values are loaded once, 16 bytes at
// a time, kept in registers, and the codes are stored as whole words. Same arithmetic.
template <int BITS, int GROUP>
__device__ void quant_token_groups_fast(const __half* __restrict__ ring, int ring_len, int D, long t0, long t1,
                                        int streams, uint8_t* __restrict__ codes, __half2* __restrict__ params,
                                        long cap) {
    const int gpt = D / GROUP;
    const long n = t1 - t0;
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)streams * n * gpt) return;
    int g = (int)(i % gpt);
    long r = i / gpt;
    long t = t0 + r % n;
    int s = (int)(r / n);
    const uint4* src = (const uint4*)(ring + ((long)s * ring_len + t % ring_len) * D + g * GROUP);
    float x[GROUP];
#pragma unroll
    for (int k = 0; k < GROUP / 8; k++) {
        const uint4 u = src[k];
        const __half2* h = (const __half2*)&u;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float2 f = __half22float2(h[e]);
            x[8 * k + 2 * e] = f.x;
            x[8 * k + 2 * e + 1] = f.y;
        }
    }
    float lo = x[0], hi = x[0];
#pragma unroll
    for (int j = 1; j < GROUP; j++) {
        lo = fminf(lo, x[j]);
        hi = fmaxf(hi, x[j]);
    }
    const float qmax = (float)((1 << BITS) - 1);
    const __half2 a = fit_affine(lo, hi, qmax);
    const float mn = __low2float(a), inv = inv_scale(__high2float(a));
    constexpr int WORDS = GROUP * BITS / 32, PER_WORD = 32 / BITS;
    uint32_t w[WORDS];
#pragma unroll
    for (int k = 0; k < WORDS; k++) {
        uint32_t b = 0;
#pragma unroll
        for (int e = 0; e < PER_WORD; e++) b |= quant_code(x[k * PER_WORD + e], mn, inv, qmax) << (BITS * e);
        w[k] = b;
    }
    uint32_t* out = (uint32_t*)(codes + ((long)s * cap + t) * (D * BITS / 8) + g * GROUP * BITS / 8);
#pragma unroll
    for (int k = 0; k < WORDS; k++) out[k] = w[k];
    params[((long)s * cap + t) * gpt + g] = a;
}

// KIVI keys with blocks of 32 tokens: a thread takes two adjacent channels (one half2
// per token: a warp reads 128 contiguous bytes of each token row).
template <int BITS>
__device__ void quant_channel_blocks_32(const __half* __restrict__ ring, int ring_len, int D, long b0, long b1,
                                        int streams, uint8_t* __restrict__ codes, __half2* __restrict__ params,
                                        long cap) {
    constexpr int G = 32;
    const int pairs = D / 2;
    const long nb = b1 - b0;
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)streams * nb * pairs) return;
    const int c = 2 * (int)(i % pairs);
    long r = i / pairs;
    const long blk = b0 + r % nb;
    const int s = (int)(r / nb);
    const __half* base = ring + (long)s * ring_len * D + c;
    float x0[G], x1[G];
#pragma unroll
    for (int j = 0; j < G; j++) {
        const float2 f = __half22float2(*(const __half2*)(base + ((blk * G + j) % ring_len) * D));
        x0[j] = f.x;
        x1[j] = f.y;
    }
    const float qmax = (float)((1 << BITS) - 1);
    const long at = ((long)s * (cap / G) + blk) * D + c;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const float* x = h == 0 ? x0 : x1;
        float lo = x[0], hi = x[0];
#pragma unroll
        for (int j = 1; j < G; j++) {
            lo = fminf(lo, x[j]);
            hi = fmaxf(hi, x[j]);
        }
        const __half2 a = fit_affine(lo, hi, qmax);
        const float mn = __low2float(a), inv = inv_scale(__high2float(a));
        constexpr int WORDS = G * BITS / 32, PER_WORD = 32 / BITS;
        uint32_t* out = (uint32_t*)(codes + (at + h) * (G * BITS / 8));
#pragma unroll
        for (int k = 0; k < WORDS; k++) {
            uint32_t b = 0;
#pragma unroll
            for (int e = 0; e < PER_WORD; e++) b |= quant_code(x[k * PER_WORD + e], mn, inv, qmax) << (BITS * e);
            out[k] = b;
        }
        params[at + h] = a;
    }
}

#define QUANT_ENTRY(BITS)                                                                               \
    extern "C" __global__ void quant_token_groups_b##BITS(const __half* ring, int ring_len, int D,      \
        int group, long t0, long t1, int streams, uint8_t* codes, __half2* params, long cap) {          \
        if (group == 32) quant_token_groups_fast<BITS, 32>(ring, ring_len, D, t0, t1, streams, codes, params, cap); \
        else if (group == 64) quant_token_groups_fast<BITS, 64>(ring, ring_len, D, t0, t1, streams, codes, params, cap); \
        else quant_token_groups<BITS>(ring, ring_len, D, group, t0, t1, streams, codes, params, cap);   \
    }                                                                                                   \
    extern "C" __global__ void quant_channel_blocks_b##BITS(const __half* ring, int ring_len, int D,    \
        int G, long b0, long b1, int streams, uint8_t* codes, __half2* params, long cap) {              \
        if (G == 32) quant_channel_blocks_32<BITS>(ring, ring_len, D, b0, b1, streams, codes, params, cap); \
        else quant_channel_blocks<BITS>(ring, ring_len, D, G, b0, b1, streams, codes, params, cap);     \
    }
QUANT_ENTRY(2)
QUANT_ENTRY(4)

// ---------------------------------------------------------------- decode attention
// One query token per sequence. Grid: (stream, split, query chunk); 4 warps a block.
// A warp takes tiles of 32 tokens. Keys: each lane owns D/32 channels and adds its
// share of every token's score (for packed keys, score = Σ q·min + Σ (q·scale)·code),
// then a reduce-scatter leaves token j's score in lane j. Values: each lane owns the
// same channels and accumulates p_j · (min + scale · code). Online softmax in base 2.
// Writes, per (stream, split, query): the running max, sum and unnormalized output;
// `combine_splits` merges them.
constexpr int WARPS = 4;

// Sum over lanes of v[0..32), lane j receives the total for index j: five halving
// steps, each lane keeping the half of the indices its lane bit selects.
template <int OFF, int N>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[N], int lane) {
    const bool upper = lane & OFF;
#pragma unroll
    for (int i = 0; i < OFF; i++) {
        const float send = upper ? v[i] : v[i + OFF];
        const float keep = upper ? v[i + OFF] : v[i];
        v[i] = keep + __shfl_xor_sync(FULL_MASK, send, OFF);
    }
    if constexpr (OFF > 1) reduce_scatter_step<OFF / 2>(v, lane);
}
template <int N>
__device__ __forceinline__ float reduce_scatter32(float (&v)[N], int lane) {
    reduce_scatter_step<16>(v, lane);
    return v[0];
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o >= 1; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, o));
    return x;
}

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
};

template <int D, int KB, int VB, int REP>
__device__ __forceinline__ void kivi_decode_attn(const AttnArgs& a) {
    constexpr int C = D / 32;          // channels per lane
    constexpr int KW = 32 * KB / 32;   // u32 words of one channel's codes in a 32-token tile
    const int s = blockIdx.x, split = blockIdx.y, r0 = blockIdx.z * REP;
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
    float m[REP], l[REP], accm[REP], acc[REP][C];
#pragma unroll
    for (int r = 0; r < REP; r++) {
        m[r] = -INFINITY;
        l[r] = 0.f;
        accm[r] = 0.f;
#pragma unroll
        for (int i = 0; i < C; i++) acc[r][i] = 0.f;
    }

    const long ntiles = (a.n + 31) / 32;
    const long tb = (long)split * a.tiles_per_split;
    const long te = min(ntiles, tb + a.tiles_per_split);
    const long kblocks = a.cap / a.G;
    const int vrow = D * VB / 8;          // bytes of one token's value codes
    const int vgpt = D / a.Gv;            // value groups per token
    const int vg = c0 / a.Gv;             // this lane's value group
    const int vbit = c0 * VB;             // bit offset of this lane's codes in a row

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
        if (t0 + 32 <= a.nqk) {
            // Packed keys: the tile lies inside one block of G tokens.
            const long blk = t0 / a.G;
            const int jj0 = (int)(t0 % a.G);
            const long at = ((long)s * kblocks + blk) * D + c0;
            const int cbytes = a.G * KB / 8;
#pragma unroll
            for (int i = 0; i < C; i++) {
                const float2 p = __half22float2(a.kparams[at + i]);
                const uint32_t* cw = (const uint32_t*)(a.kcodes + (at + i) * cbytes + jj0 * KB / 8);
                uint32_t w[KW];
                if constexpr (KW == 2) {
                    uint2 x = *(const uint2*)cw;
                    w[0] = x.x; w[1] = x.y;
                } else {
                    uint4 x = *(const uint4*)cw;
                    w[0] = x.x; w[1] = x.y; w[2] = x.z; w[3] = x.w;
                }
                float qs[REP];
#pragma unroll
                for (int r = 0; r < REP; r++) {
                    base[r] = fmaf(qr[r][i], p.x, base[r]);
                    qs[r] = qr[r][i] * p.y;
                }
#pragma unroll
                for (int j = 0; j < 32; j++) {
                    const float cf = code_to_float((w[j * KB / 32] >> ((j * KB) % 32)) & ((1u << KB) - 1));
#pragma unroll
                    for (int r = 0; r < REP; r++) part[r][j] = fmaf(qs[r], cf, part[r][j]);
                }
            }
        } else {
            // Full-precision keys from the ring.
#pragma unroll
            for (int j = 0; j < 32; j++) {
                const long t = t0 + j;
                if (t < a.n) {
                    const __half* kp = a.ktail + ((long)s * a.kring + t % a.kring) * D + c0;
                    float k[C];
#pragma unroll
                    for (int i = 0; i < C; i += 2) {
                        const float2 x = __half22float2(*(const __half2*)(kp + i));
                        k[i] = x.x;
                        k[i + 1] = x.y;
                    }
#pragma unroll
                    for (int r = 0; r < REP; r++)
#pragma unroll
                        for (int i = 0; i < C; i++) part[r][j] = fmaf(qr[r][i], k[i], part[r][j]);
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
            const uint32_t* rows = (const uint32_t*)(a.vcodes + ((long)s * a.cap + t0) * vrow) + vbit / 32;
            const __half2* prs = a.vparams + ((long)s * a.cap + t0) * vgpt + vg;
            uint32_t w[32];
            __half2 pr[32];
#pragma unroll
            for (int j = 0; j < 32; j++) {
                w[j] = __ldg(rows + j * (vrow / 4));
                pr[j] = prs[j * vgpt];
            }
#pragma unroll
            for (int j = 0; j < 32; j++) {
                const float2 mp = __half22float2(pr[j]);
                const uint32_t x = w[j] >> (vbit % 32);
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
        // The tile that straddles the window's edge, and the window itself.
        const int jn = (int)min(32L, a.n - t0);
        for (int j = 0; j < jn; j++) {
            const long t = t0 + j;
            float pv[REP];
#pragma unroll
            for (int r = 0; r < REP; r++) pv[r] = __shfl_sync(FULL_MASK, p[r], j);
            if (t < a.nqv) {
                const uint8_t* row = a.vcodes + ((long)s * a.cap + t) * vrow;
                const uint32_t w = ((const uint32_t*)row)[vbit / 32] >> (vbit % 32);
                const float2 pr = __half22float2(a.vparams[((long)s * a.cap + t) * vgpt + vg]);
#pragma unroll
                for (int r = 0; r < REP; r++) {
                    accm[r] = fmaf(pv[r], pr.x, accm[r]);
                    const float ps = pv[r] * pr.y;
#pragma unroll
                    for (int i = 0; i < C; i++)
                        acc[r][i] = fmaf(ps, code_to_float((w >> (i * VB)) & ((1u << VB) - 1)), acc[r][i]);
                }
            } else {
                const __half* vp = a.vtail + ((long)s * a.vring + t % a.vring) * D + c0;
#pragma unroll
                for (int i = 0; i < C; i += 2) {
                    const float2 x = __half22float2(*(const __half2*)(vp + i));
#pragma unroll
                    for (int r = 0; r < REP; r++) {
                        acc[r][i] = fmaf(pv[r], x.x, acc[r][i]);
                        acc[r][i + 1] = fmaf(pv[r], x.y, acc[r][i + 1]);
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
    for (int idx = threadIdx.x; idx < REP * D; idx += WARPS * 32) {
        const int r = idx / D, c = idx % D;
        if (r0 + r >= a.rep) continue;
        float M = -INFINITY;
        for (int w = 0; w < WARPS; w++) M = fmaxf(M, sm_m[w][r]);
        float L = 0.f, A = 0.f;
        for (int w = 0; w < WARPS; w++) {
            if (sm_m[w][r] == -INFINITY) continue;
            const float e = exp2f(sm_m[w][r] - M);
            L += sm_l[w][r] * e;
            A += sm_acc[w][r][c] * e;
        }
        const long o = ((long)s * a.splits + split) * a.rep + r0 + r;
        a.part_acc[o * D + c] = A;
        if (c == 0) {
            a.part_ml[o * 2] = M;
            a.part_ml[o * 2 + 1] = L;
        }
    }
}

#define ATTN_ENTRY(D, KB, VB, REP)                                                         \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                \
        kivi_decode_attn_d##D##_k##KB##_v##VB##_r##REP(const AttnArgs a) {                 \
        kivi_decode_attn<D, KB, VB, REP>(a);                                               \
    }
#define ATTN_REPS(D, KB, VB) ATTN_ENTRY(D, KB, VB, 1) ATTN_ENTRY(D, KB, VB, 2) ATTN_ENTRY(D, KB, VB, 3) ATTN_ENTRY(D, KB, VB, 4)
ATTN_REPS(64, 2, 2)
ATTN_REPS(64, 4, 4)
ATTN_REPS(64, 2, 4)
ATTN_REPS(64, 4, 2)
ATTN_REPS(128, 2, 2)
ATTN_REPS(128, 4, 4)
ATTN_REPS(128, 2, 4)
ATTN_REPS(128, 4, 2)

// Merges the splits of every (stream, query): out = Σ acc·2^(m−M) / Σ l·2^(m−M).
// Grid: streams · rep blocks of D threads. out: [batch][Hq][D].
extern "C" __global__ void combine_splits(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                          float* __restrict__ out, int splits, int rep, int Hkv, int D) {
    const int sr = blockIdx.x;
    const int s = sr / rep, r = sr % rep;
    const int c = threadIdx.x;
    if (c >= D) return;
    float M = -INFINITY;
    for (int k = 0; k < splits; k++) M = fmaxf(M, part_ml[(((long)s * splits + k) * rep + r) * 2]);
    float L = 0.f, A = 0.f;
    for (int k = 0; k < splits; k++) {
        const long o = ((long)s * splits + k) * rep + r;
        const float mk = part_ml[o * 2];
        if (mk == -INFINITY) continue;
        const float e = exp2f(mk - M);
        L += part_ml[o * 2 + 1] * e;
        A += part_acc[o * D + c] * e;
    }
    const int b = s / Hkv, h = s % Hkv;
    out[((long)b * Hkv * rep + h * rep + r) * D + c] = L > 0.f ? A / L : 0.f;
}
