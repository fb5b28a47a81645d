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
