// f16 rounding in a chosen direction, as kvq's CPU code rounds (kvq::quant::uniform's
// f16_floor / f16_ceil): the params every quantized layout stores. Shared by kivi.cu and
// kvquant.cu.
#pragma once
#include <cuda_fp16.h>

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
