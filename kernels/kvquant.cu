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

#include "f16_round.cuh"

#define FULL_MASK 0xffffffffu
constexpr int WARPS = 4;

// Rust's f32::total_cmp as an unsigned key: negatives below positives, -0 below +0.
__device__ __forceinline__ uint32_t total_key(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// x: [rows = stream · tokens][D] f32. center/scale: [kv_heads][D] (keys) or null (values).
// bounds: the codebook's 2^bits − 1 midpoints. Outputs for row r: codes[r][packed],
// token_norm[r] (values: half2 (centre, half-range)), out_index/out_value[r][n_out].
// PER: values a lane holds (D = 32·PER), so every per-lane loop has a fixed length.
template <int PER>
__device__ void kvquant_quantize(const float* __restrict__ x, int rows, int tokens, int kv_heads, int bits,
                     const float* __restrict__ center, const float* __restrict__ scale,
                     const float* __restrict__ bounds, int n_out, uint8_t* __restrict__ codes,
                     __half2* __restrict__ token_norm, uint16_t* __restrict__ out_index,
                     __half* __restrict__ out_value) {
    __shared__ float s_bounds[255];
    constexpr int D = 32 * PER;
    __shared__ uint8_t s_code[WARPS][D];
    const int nb = (1 << bits) - 1;
    for (int i = threadIdx.x; i < nb; i += blockDim.x) s_bounds[i] = bounds[i];
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // Each warp takes vector after vector (whole warps leave together, after the
    // block's only barrier); 32-bit index math (the host keeps rows below 2^31).
    for (int r = blockIdx.x * WARPS + warp; r < rows; r += gridDim.x * WARPS) {
        const int h = (r / tokens) % kv_heads;
        const float* xr = x + (long)r * D;
        float v[PER], norm[PER], score[PER];
        bool out[PER];
#pragma unroll
        for (int i = 0; i < PER; i++) {
            out[i] = false;
            v[i] = xr[lane + 32 * i];
        }
        if (center != nullptr) {
#pragma unroll
            for (int i = 0; i < PER; i++) {
                const int c = h * D + lane + 32 * i;
                const float sc = scale[c];
                norm[i] = sc > 0.f ? __fdiv_rn(__fsub_rn(v[i], center[c]), sc) : 0.f;
                score[i] = fabsf(norm[i]);
            }
        } else {
            // The median, the element of rank D/2 in total order: a radix select over the
            // order-preserving keys, most significant bit first (a warp-wide count a bit).
            uint32_t key[PER];
#pragma unroll
            for (int i = 0; i < PER; i++) key[i] = total_key(v[i]);
            uint32_t prefix = 0, want = D / 2;
            for (int bit = 31; bit >= 0; bit--) {
                const uint32_t high = bit == 31 ? 0u : ~0u << (bit + 1);
                uint32_t zeros = 0;
#pragma unroll
                for (int i = 0; i < PER; i++)
                    zeros += ((key[i] & high) == prefix && !((key[i] >> bit) & 1u));
                zeros = __reduce_add_sync(FULL_MASK, zeros);
                if (want >= zeros) want -= zeros, prefix |= 1u << bit;
            }
            const float median = __uint_as_float((prefix & 0x80000000u) ? (prefix & 0x7fffffffu) : ~prefix);
#pragma unroll
            for (int i = 0; i < PER; i++)
                score[i] = fabsf(__fsub_rn(v[i], median));
        }
        // The n_out largest scores, ties to the lower channel: n_out rounds of a warp argmax.
        for (int k = 0; k < n_out; k++) {
            float best = -1.f;
            int at = 0x7fffffff;
#pragma unroll
            for (int i = 0; i < PER; i++) {
                if (!out[i] && score[i] > best) best = score[i], at = lane + 32 * i;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float b2 = __shfl_xor_sync(FULL_MASK, best, o);
                const int a2 = __shfl_xor_sync(FULL_MASK, at, o);
                if (b2 > best || (b2 == best && a2 < at)) best = b2, at = a2;
            }
            if ((at & 31) == lane) {
#pragma unroll
                for (int i = 0; i < PER; i++)
                    if (lane + 32 * i == at) out[i] = true;
            }
        }
        if (center == nullptr) {
            // Values: centre and half-range of the vector without its outliers.
            float lo = INFINITY, hi = -INFINITY;
#pragma unroll
            for (int i = 0; i < PER; i++) {
                if (!out[i]) lo = fminf(lo, v[i]), hi = fmaxf(hi, v[i]);
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                lo = fminf(lo, __shfl_xor_sync(FULL_MASK, lo, o));
                hi = fmaxf(hi, __shfl_xor_sync(FULL_MASK, hi, o));
            }
            if (lo > hi) lo = 0.f, hi = 0.f;
            const __half ch = __float2half_rn(__fmul_rn(0.5f, __fadd_rn(lo, hi)));
            const float c = __half2float(ch);
            const __half hh = f16_ceil(fmaxf(fmaxf(__fsub_rn(hi, c), __fsub_rn(c, lo)), 0.f));
            const float half = __half2float(hh);
#pragma unroll
            for (int i = 0; i < PER; i++)
                norm[i] = half > 0.f ? __fdiv_rn(__fsub_rn(v[i], c), half) : 0.f;
            if (lane == 0) token_norm[r] = __halves2half2(ch, hh);
        }
        // Codes: the number of bounds below each normalized value.
#pragma unroll
        for (int i = 0; i < PER; i++) {
            // The number of bounds below: a binary search of the sorted bounds.
            int lo = 0, hi = nb;
            while (lo < hi) {
                const int m = (lo + hi) >> 1;
                if (s_bounds[m] < norm[i]) lo = m + 1;
                else hi = m;
            }
            s_code[warp][lane + 32 * i] = (uint8_t)lo;
        }
        __syncwarp();
        const int plen = (D * bits + 7) / 8;
        for (int byte = lane; byte < plen; byte += 32) {
            uint32_t b = 0;
            if (8 % bits == 0) {  // whole codes a byte
                const int each = 8 / bits;
                for (int e = 0; e < each; e++) b |= (uint32_t)s_code[warp][byte * each + e] << (bits * e);
            } else {  // codes straddle bytes: bit by bit
                for (int p = 0; p < 8; p++) {
                    const int g = 8 * byte + p, i = g / bits;
                    if (i < D) b |= (uint32_t)((s_code[warp][i] >> (g % bits)) & 1) << p;
                }
            }
            codes[(long)r * plen + byte] = (uint8_t)b;
        }
        // Outliers in ascending channel order: chunk by chunk, lanes in order.
        int pos = 0;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            const unsigned m = __ballot_sync(FULL_MASK, out[i]);
            if (out[i]) {
                const long k = (long)r * n_out + pos + __popc(m & ((1u << lane) - 1));
                out_index[k] = (uint16_t)(lane + 32 * i);
                out_value[k] = __float2half_rn(v[i]);
            }
            pos += __popc(m);
        }
        __syncwarp();  // s_code is reused by the warp's next vector
    }
}

#define KVQ_ENTRY(PER)                                                                                   \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) kvquant_quantize_d##PER(                    \
        const float* x, int rows, int tokens, int kv_heads, int bits, const float* center,              \
        const float* scale, const float* bounds, int n_out, uint8_t* codes, __half2* token_norm,         \
        uint16_t* out_index, __half* out_value) {                                                        \
        kvquant_quantize<PER>(x, rows, tokens, kv_heads, bits, center, scale, bounds, n_out, codes,      \
                              token_norm, out_index, out_value);                                         \
    }
// Kernels for head sizes 32, 64, 96, 128 and 256 (named by values a lane: d1 .. d8).
KVQ_ENTRY(1)
KVQ_ENTRY(2)
KVQ_ENTRY(3)
KVQ_ENTRY(4)
KVQ_ENTRY(8)
