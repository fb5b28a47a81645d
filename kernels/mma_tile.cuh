// The MMA tile layout of KIVI's codes on the GPU: where code (token t of a 32-token tile,
// channel c) sits. The definition, with the reasons, is crates/kvq/src/mma_tile.rs;
// this is its twin (the host's byte-for-byte check undoes the permutation with that file,
// so a change here that is not made there fails every benchmark's check).
#pragma once

// Byte offset in the tile of a lane's word w, half h, slot `slot` (the bit in that byte: *bit).
template <int BITS>
__device__ __forceinline__ int mma_place(int lane, int w, int h, int slot, int* bit) {
    const int b = 16 * h + slot * BITS;
    *bit = b & 7;
    return 16 * (32 * (w >> 2) + lane) + 4 * (w & 3) + (b >> 3);
}

template <int BITS>
__device__ __forceinline__ int mma_key_pos(int D, int t, int c, int* bit) {
    const int mt = t >> 4, rh = (t >> 3) & 1, g = t & 7;
    const int ks = c >> 4, khalf = (c >> 3) & 1, tq = (c >> 1) & 3, h = c & 1;
    if constexpr (BITS == 2) {
        const int sh = __ffs(D) - 6;  // log2 of the k-steps in each half of the channels (D = 64 or 128)
        return mma_place<BITS>(4 * g + tq, 2 * (ks & ((1 << sh) - 1)) + khalf, h, 4 * (ks >> sh) + 2 * mt + rh, bit);
    } else {
        return mma_place<BITS>(4 * g + tq, 2 * ks + khalf, h, 2 * mt + rh, bit);
    }
}

template <int BITS>
__device__ __forceinline__ int mma_value_pos(int t, int c, int* bit) {
    const int ks = t >> 4, khalf = (t >> 3) & 1, tq = (t >> 1) & 3, h = t & 1;
    const int mt = c >> 4, rh = (c >> 3) & 1, g = c & 7;
    const int cc = 2 * mt + rh;
    constexpr int SLOTS = 16 / BITS;
    return mma_place<BITS>(4 * g + tq, 4 * (cc / SLOTS) + 2 * ks + khalf, h, cc % SLOTS, bit);
}

// Half index of channel c's key min (scale = false) or scale among its block's 2D f16 params:
// chunk 4ks + tq of the block holds (min c0 | c0 + 1, scale c0 | c0 + 1, min c0 + 8 | + 9,
// scale c0 + 8 | + 9), c0 = 16ks + 2tq.
__device__ __forceinline__ int mma_key_param(int c, bool scale) {
    const int ks = c >> 4, khalf = (c >> 3) & 1, tq = (c >> 1) & 3, h = c & 1;
    return 2 * (4 * (4 * ks + tq) + 2 * khalf + (scale ? 1 : 0)) + h;
}
