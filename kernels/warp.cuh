// Warp-wide reductions shared by the decode-attention kernels (kivi.cu, kvquant.cu).
#pragma once
#include <stdint.h>

#ifndef FULL_MASK
#define FULL_MASK 0xffffffffu
#endif

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

// After each of a block's `W` warps has left its online-softmax state (running max m,
// sum l, unnormalized output acc per query) in shared memory: merges them and writes the
// split's partial result for queries r0 .. r0 + NQ of stream s (of `nq` a stream) to
// part_acc [stream][split][nq][D] and part_ml [..][2], which combine_splits (kivi.cu) reads.
template <int W, int D, int NQ>
__device__ __forceinline__ void merge_warps_write(const float (*sm_m)[NQ], const float (*sm_l)[NQ], const float (*sm_acc)[NQ][D],
                                                  float* part_acc, float* part_ml, int splits, int nq, int s, int split, int r0) {
    for (int idx = threadIdx.x; idx < NQ * D; idx += W * 32) {
        const int r = idx / D, c = idx % D;
        if (r0 + r >= nq) continue;
        float M = -INFINITY;
        for (int w = 0; w < W; w++) M = fmaxf(M, sm_m[w][r]);
        float L = 0.f, A = 0.f;
        for (int w = 0; w < W; w++) {
            if (sm_m[w][r] == -INFINITY) continue;
            const float e = exp2f(sm_m[w][r] - M);
            L += sm_l[w][r] * e;
            A += sm_acc[w][r][c] * e;
        }
        const long o = ((long)s * splits + split) * nq + r0 + r;
        part_acc[o * D + c] = A;
        if (c == 0) {
            part_ml[o * 2] = M;
            part_ml[o * 2 + 1] = L;
        }
    }
}
