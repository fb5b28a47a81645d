// kvq's kernels over full-precision K/V (the tensors of kvq::tensor_cache::TensorCache):
//
// 1. fp16 decode attention, the baseline the packed caches are measured against end to
//    end. It reads the f16 cache once, at memory speed, as a fused decode kernel does
//    (flash-decoding: splits of the context a block each, online softmax, the splits
//    merged by kivi.cu's combine_splits), so the quantized caches win only by the bytes
//    they save, not by a slow baseline.
// 2. The value check every GPU cache runs on new K/V (kvq::error::check_values: NaN, ±Inf
//    or |x| > MAX_ABS_VALUE is a typed error): one pass, one flag.
#include <cuda_fp16.h>
#include <stdint.h>

#define FULL_MASK 0xffffffffu
#define WARPS 4

// ---------------------------------------------------------------- value check
// flag |= 1 if any of x[0..n) is NaN, ±Inf or larger than max_abs in magnitude.
template <typename T>
__device__ __forceinline__ float as_float(T x);
template <>
__device__ __forceinline__ float as_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float as_float<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ void any_bad(const T* __restrict__ x, long n, float max_abs, int* flag) {
    int bad = 0;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        // NaN fails every comparison, so `!(|x| <= max)` catches it with ±Inf.
        bad |= !(fabsf(as_float<T>(x[i])) <= max_abs);
    }
    if (__syncthreads_or(bad) && threadIdx.x == 0) atomicOr(flag, 1);
}
extern "C" __global__ void any_bad_f32(const float* x, long n, float max_abs, int* flag) { any_bad<float>(x, n, max_abs, flag); }
extern "C" __global__ void any_bad_f16(const __half* x, long n, float max_abs, int* flag) { any_bad<__half>(x, n, max_abs, flag); }

// ---------------------------------------------------------------- fp16 decode attention
// One query token a sequence. q: [batch][Hq][D] f32; k, v: [stream = batch·Hkv + h][cap][D]
// f16 (the first n tokens held). Query head h·REP + r reads KV head h (GQA).
// Grid (streams, splits); 4 warps a block; split `sp` covers tiles of 32 tokens
// [sp·per, (sp + 1)·per), the block's warps taking every 4th tile. Writes, like kivi.cu's
// decode kernels, part_acc [stream][split][REP][D] (Σ p·v) and part_ml [..][REP][2]
// (max, Σ p), scores in log2 units (q pre-scaled by log2(e)/√D).
//
// A warp's tile: lane j scores token j against the REP queries (its key row read as
// 16-byte loads, the queries broadcast from shared memory), the warp's running max moves,
// then the lanes switch roles: lane c accumulates channels c·D/32.. of Σ p_j·v_j over the
// tile's tokens (each value row read as one coalesced line, p_j broadcast from shared).
template <int D, int REP, bool AHEAD>
__device__ void fp16_attn(const float* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v, long cap,
                          int n, int Hkv, int splits, int per, float scale_log2, float* __restrict__ part_acc,
                          float* __restrict__ part_ml) {
    constexpr int C = D / 32;  // channels a lane accumulates
    __shared__ __align__(16) float sq[REP][D];
    __shared__ float sp[WARPS][REP][32];
    __shared__ float sm_m[WARPS][REP], sm_l[WARPS][REP];
    __shared__ float sm_acc[WARPS][REP][D];
    const int s = blockIdx.x, split = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int b = s / Hkv, h = s % Hkv;
    for (int i = threadIdx.x; i < REP * D; i += WARPS * 32)
        sq[i / D][i % D] = q[((long)b * Hkv * REP + (long)h * REP) * D + i] * scale_log2;
    __syncthreads();
    const __half* ks = k + (long)s * cap * D;
    const __half* vs = v + (long)s * cap * D;
    float m[REP], l[REP], acc[REP][C];
#pragma unroll
    for (int r = 0; r < REP; r++) {
        m[r] = -INFINITY;
        l[r] = 0.f;
#pragma unroll
        for (int c = 0; c < C; c++) acc[r][c] = 0.f;
    }
    const int tile_end = min((split + 1) * per, (n + 31) / 32);
    // AHEAD: the lane's key row of the warp's next tile is loaded a tile ahead (while the
    // values of the current one stream in), two tiles of reads in flight a warp. Measured
    // on an H100 (bench/results/gpu-attn.md): 893 -> 771 us at D = 128, batch 16, 32k
    // tokens; no gain at D = 64, where the extra registers cost blocks an SM.
    uint4 kr[D / 8];
    auto load_keys = [&](int tile) {
        const int j = tile * 32 + lane;
        const uint4* row = reinterpret_cast<const uint4*>(ks + (long)j * D);
#pragma unroll
        for (int i = 0; i < D / 8; i++) kr[i] = (tile < tile_end && j < n) ? __ldg(row + i) : make_uint4(0, 0, 0, 0);
    };
    if constexpr (AHEAD) load_keys(split * per + warp);
    for (int tile = split * per + warp; tile < tile_end; tile += WARPS) {
        if constexpr (!AHEAD) load_keys(tile);
        const int t0 = tile * 32, count = min(32, n - t0);
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
        if (lane >= count) {
#pragma unroll
            for (int r = 0; r < REP; r++) sc[r] = -INFINITY;
        }
        if constexpr (AHEAD) load_keys(tile + WARPS);
#pragma unroll
        for (int r = 0; r < REP; r++) {
            float mx = sc[r];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, o));
            const float mn = fmaxf(m[r], mx), corr = exp2f(m[r] - mn);
            const float p = exp2f(sc[r] - mn);  // 0 for the tile's missing tokens
            l[r] = l[r] * corr + p;
#pragma unroll
            for (int c = 0; c < C; c++) acc[r][c] *= corr;
            m[r] = mn;
            sp[warp][r][lane] = p;
        }
        __syncwarp();
        const __half* vt = vs + (long)t0 * D + lane * C;
#pragma unroll 16
        for (int jj = 0; jj < count; jj++) {
            float vf[C];
            if constexpr (C == 2) {
                const float2 x = __half22float2(*reinterpret_cast<const __half2*>(vt + (long)jj * D));
                vf[0] = x.x, vf[1] = x.y;
            } else {
                const uint2 u = *reinterpret_cast<const uint2*>(vt + (long)jj * D);
                const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
                const float2 y = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
                vf[0] = x.x, vf[1] = x.y, vf[2] = y.x, vf[3] = y.y;
            }
#pragma unroll
            for (int r = 0; r < REP; r++) {
                const float p = sp[warp][r][jj];
#pragma unroll
                for (int c = 0; c < C; c++) acc[r][c] = fmaf(p, vf[c], acc[r][c]);
            }
        }
        __syncwarp();
    }
    // The block's warps merge into one partial result for this split.
#pragma unroll
    for (int r = 0; r < REP; r++) {
        float ls = l[r];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ls += __shfl_xor_sync(FULL_MASK, ls, o);
        if (lane == 0) sm_m[warp][r] = m[r], sm_l[warp][r] = ls;
#pragma unroll
        for (int c = 0; c < C; c++) sm_acc[warp][r][lane * C + c] = acc[r][c];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < REP * D; i += WARPS * 32) {
        const int r = i / D, c = i % D;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; w++) M = fmaxf(M, sm_m[w][r]);
        float A = 0.f, L = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            if (sm_m[w][r] == -INFINITY) continue;  // a warp without a tile
            const float e = exp2f(sm_m[w][r] - M);
            A += sm_acc[w][r][c] * e;
            L += sm_l[w][r] * e;
        }
        const long o = ((long)s * splits + split) * REP + r;
        part_acc[o * D + c] = A;
        if (c == 0) part_ml[o * 2] = M, part_ml[o * 2 + 1] = L;
    }
}

#define FP16_ENTRY(D, REP)                                                                                      \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                    \
        fp16_decode_attn_d##D##_r##REP(const float* q, const __half* k, const __half* v, long cap, int n, int Hkv, \
                                       int splits, int per, float scale_log2, float* part_acc, float* part_ml) { \
        fp16_attn<D, REP, D == 128>(q, k, v, cap, n, Hkv, splits, per, scale_log2, part_acc, part_ml);                   \
    }
#define FP16_REPS(D) \
    FP16_ENTRY(D, 1) FP16_ENTRY(D, 2) FP16_ENTRY(D, 3) FP16_ENTRY(D, 4) FP16_ENTRY(D, 5) FP16_ENTRY(D, 6) FP16_ENTRY(D, 7) FP16_ENTRY(D, 8)
FP16_REPS(64)
FP16_REPS(128)
