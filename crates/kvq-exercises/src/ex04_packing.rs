//! # Exercise 4: packing 2-bit codes
//!
//! Four 2-bit codes fit in a byte. kvq packs codes least significant bits first:
//! code `i` goes to byte `i / 4`, bits `2·(i % 4)` and `2·(i % 4) + 1`. A length that
//! is not a multiple of 4 leaves the last byte partly empty (zeros).
//!
//! Hint: `byte |= code << (2 * (i % 4))`, and back: `(byte >> (2 * (i % 4))) & 3`.

/// Packs 2-bit codes (each 0..=3), four per byte.
pub fn pack2(codes: &[u8]) -> Vec<u8> {
    let _ = codes;
    todo!("ceil(n / 4) bytes, least significant bits first")
}

/// Unpacks `n` 2-bit codes.
pub fn unpack2(bytes: &[u8], n: usize) -> Vec<u8> {
    let _ = (bytes, n);
    todo!()
}
