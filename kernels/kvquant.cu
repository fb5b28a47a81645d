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
constexpr int MAX_PER_LANE = 8;  // head dims up to 256, a multiple of 32
constexpr int MAX_D = 32 * MAX_PER_LANE;

// Rust's f32::total_cmp as an unsigned key: negatives below positives, -0 below +0.
__device__ __forceinline__ uint32_t total_key(float x) {
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// x: [rows = stream · tokens][D] f32. center/scale: [kv_heads][D] (keys) or null (values).
// bounds: the codebook's 2^bits − 1 midpoints. Outputs for row r: codes[r][packed],
// token_norm[r] (values: half2 (centre, half-range)), out_index/out_value[r][n_out].
extern "C" __global__ void __launch_bounds__(WARPS * 32)
    kvquant_quantize(const float* __restrict__ x, long rows, int tokens, int D, int kv_heads, int bits,
                     const float* __restrict__ center, const float* __restrict__ scale,
                     const float* __restrict__ bounds, int n_out, uint8_t* __restrict__ codes,
                     __half2* __restrict__ token_norm, uint16_t* __restrict__ out_index,
                     __half* __restrict__ out_value) {
    __shared__ float s_bounds[255];
    __shared__ float s_x[WARPS][MAX_D];
    __shared__ uint8_t s_code[WARPS][MAX_D];
    const int nb = (1 << bits) - 1;
    for (int i = threadIdx.x; i < nb; i += blockDim.x) s_bounds[i] = bounds[i];
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long r = (long)blockIdx.x * WARPS + warp;
    if (r >= rows) return;  // whole warps, after the block's only barrier
    const int per = D / 32;
    const int h = (int)(r / tokens) % kv_heads;
    const float* xr = x + r * D;
    float v[MAX_PER_LANE], norm[MAX_PER_LANE], score[MAX_PER_LANE];
    bool out[MAX_PER_LANE];
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        out[i] = false;
        if (i < per) {
            v[i] = xr[lane + 32 * i];
            s_x[warp][lane + 32 * i] = v[i];
        }
    }
    __syncwarp();
    if (center != nullptr) {
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) {
            if (i < per) {
                const int c = h * D + lane + 32 * i;
                const float sc = scale[c];
                norm[i] = sc > 0.f ? __fdiv_rn(__fsub_rn(v[i], center[c]), sc) : 0.f;
                score[i] = fabsf(norm[i]);
            }
        }
    } else {
        // The median: the element whose rank range [less, less + equal) holds D/2.
        const int mid = D / 2;
        bool found = false;
        float med = 0.f;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) {
            if (i < per) {
                const uint32_t key = total_key(v[i]);
                int less = 0, equal = 0;
                for (int j = 0; j < D; j++) {
                    const uint32_t kj = total_key(s_x[warp][j]);
                    less += kj < key;
                    equal += kj == key;
                }
                if (!found && less <= mid && mid < less + equal) found = true, med = v[i];
            }
        }
        // Every finder holds the same bits; take the first.
        const unsigned who = __ballot_sync(FULL_MASK, found);
        const float median = __shfl_sync(FULL_MASK, med, __ffs(who) - 1);
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++)
            if (i < per) score[i] = fabsf(__fsub_rn(v[i], median));
    }
    // The n_out largest scores, ties to the lower channel: n_out rounds of a warp argmax.
    for (int k = 0; k < n_out; k++) {
        float best = -1.f;
        int at = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) {
            if (i < per && !out[i] && score[i] > best) best = score[i], at = lane + 32 * i;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float b2 = __shfl_xor_sync(FULL_MASK, best, o);
            const int a2 = __shfl_xor_sync(FULL_MASK, at, o);
            if (b2 > best || (b2 == best && a2 < at)) best = b2, at = a2;
        }
        if ((at & 31) == lane) {
#pragma unroll
            for (int i = 0; i < MAX_PER_LANE; i++)
                if (lane + 32 * i == at) out[i] = true;
        }
    }
    if (center == nullptr) {
        // Values: centre and half-range of the vector without its outliers.
        float lo = INFINITY, hi = -INFINITY;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) {
            if (i < per && !out[i]) lo = fminf(lo, v[i]), hi = fmaxf(hi, v[i]);
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
        for (int i = 0; i < MAX_PER_LANE; i++)
            if (i < per) norm[i] = half > 0.f ? __fdiv_rn(__fsub_rn(v[i], c), half) : 0.f;
        if (lane == 0) token_norm[r] = __halves2half2(ch, hh);
    }
    // Codes: the number of bounds below each normalized value.
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        if (i < per) {
            int code = 0;
            for (int j = 0; j < nb; j++) code += s_bounds[j] < norm[i];
            s_code[warp][lane + 32 * i] = (uint8_t)code;
        }
    }
    __syncwarp();
    const int plen = (D * bits + 7) / 8;
    for (int byte = lane; byte < plen; byte += 32) {
        uint32_t b = 0;
        for (int p = 0; p < 8; p++) {
            const int g = 8 * byte + p, i = g / bits;
            if (i < D) b |= (uint32_t)((s_code[warp][i] >> (g % bits)) & 1) << p;
        }
        codes[r * plen + byte] = (uint8_t)b;
    }
    // Outliers in ascending channel order: chunk by chunk, lanes in order.
    int pos = 0;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        if (i < per) {
            const unsigned m = __ballot_sync(FULL_MASK, out[i]);
            if (out[i]) {
                const long k = r * n_out + pos + __popc(m & ((1u << lane) - 1));
                out_index[k] = (uint16_t)(lane + 32 * i);
                out_value[k] = __float2half_rn(v[i]);
            }
            pos += __popc(m);
        }
    }
}
