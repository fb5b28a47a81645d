//! Bit packing: `bits`-bit codes stored back to back, least significant bit first,
//! with no padding between codes. `n` codes take exactly `ceil(n * bits / 8)` bytes,
//! whatever `n` is (lengths need not be a multiple of a byte or a word).

use crate::error::{KvqError, Result};

/// Checks that `bits` is a supported code width (1..=8) and returns it as `u8`.
pub fn check_bits(bits: u32) -> Result<u8> {
    if (1..=8).contains(&bits) {
        Ok(bits as u8)
    } else {
        Err(KvqError::InvalidBits(bits))
    }
}

// ANCHOR: packed_len
/// Bytes that `n` codes of `bits` bits occupy once packed.
pub const fn packed_len(n: usize, bits: u8) -> usize {
    (n * bits as usize).div_ceil(8)
}
// ANCHOR_END: packed_len

/// Appends `codes` packed at `bits` bits to `out`. Fails if a code needs more bits.
pub fn pack_into(codes: &[u8], bits: u8, out: &mut Vec<u8>) -> Result<()> {
    check_bits(bits as u32)?;
    let max = if bits == 8 { u8::MAX } else { (1u8 << bits) - 1 };
    if let Some(index) = codes.iter().position(|&c| c > max) {
        return Err(KvqError::CodeOutOfRange { code: codes[index], index, bits });
    }
    pack_unchecked(codes, bits, out);
    Ok(())
}

/// Packs codes known to fit in `bits` (the quantizers produce only such codes).
pub(crate) fn pack_unchecked(codes: &[u8], bits: u8, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + packed_len(codes.len(), bits), 0);
    let dst = &mut out[start..];
    match bits {
        8 => dst.copy_from_slice(codes),
        4 => {
            for (byte, pair) in dst.iter_mut().zip(codes.chunks(2)) {
                *byte = pair[0] | pair.get(1).map_or(0, |&c| c << 4);
            }
        }
        // ANCHOR: pack2
        2 => {
            for (byte, quad) in dst.iter_mut().zip(codes.chunks(4)) {
                let mut b = 0u8;
                for (i, &c) in quad.iter().enumerate() {
                    b |= c << (2 * i);
                }
                *byte = b;
            }
        }
        // ANCHOR_END: pack2
        _ => {
            // General path: a bit accumulator that spills whole bytes.
            let mut acc: u32 = 0;
            let mut nbits = 0u32;
            let mut o = 0;
            for &c in codes {
                acc |= (c as u32) << nbits;
                nbits += bits as u32;
                while nbits >= 8 {
                    dst[o] = acc as u8;
                    o += 1;
                    acc >>= 8;
                    nbits -= 8;
                }
            }
            if nbits > 0 {
                dst[o] = acc as u8;
            }
        }
    }
}

/// Packs `codes` into a new vector.
pub fn pack(codes: &[u8], bits: u8) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(packed_len(codes.len(), bits.min(8)));
    pack_into(codes, bits, &mut out)?;
    Ok(out)
}

/// Unpacks `out.len()` codes of `bits` bits from `packed`.
pub fn unpack(packed: &[u8], bits: u8, out: &mut [u8]) -> Result<()> {
    check_bits(bits as u32)?;
    let need = packed_len(out.len(), bits);
    if packed.len() < need {
        return Err(KvqError::Shape(format!(
            "{} codes of {bits} bits need {need} packed bytes, got {}",
            out.len(),
            packed.len()
        )));
    }
    unpack_unchecked(packed, bits, out);
    Ok(())
}

#[inline]
pub(crate) fn unpack_unchecked(packed: &[u8], bits: u8, out: &mut [u8]) {
    match bits {
        8 => out.copy_from_slice(&packed[..out.len()]),
        4 => {
            for (pair, &b) in out.chunks_mut(2).zip(packed) {
                pair[0] = b & 0x0f;
                if let Some(x) = pair.get_mut(1) {
                    *x = b >> 4;
                }
            }
        }
        2 => {
            for (quad, &b) in out.chunks_mut(4).zip(packed) {
                for (i, x) in quad.iter_mut().enumerate() {
                    *x = (b >> (2 * i)) & 3;
                }
            }
        }
        _ => {
            let mask = (1u32 << bits) - 1;
            let mut acc: u32 = 0;
            let mut nbits = 0u32;
            let mut i = 0;
            for x in out.iter_mut() {
                while nbits < bits as u32 {
                    acc |= (packed[i] as u32) << nbits;
                    i += 1;
                    nbits += 8;
                }
                *x = (acc & mask) as u8;
                acc >>= bits;
                nbits -= bits as u32;
            }
        }
    }
}
