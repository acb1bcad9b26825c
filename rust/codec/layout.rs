//! How 4-bit codes are laid out: the byte layouts ([`Nibble4Layout`]), the packed size and the
//! block geometry shared by every blockwise codec. Plain arithmetic; depends on nothing but the
//! crate's error type.

use crate::error::{Error, Result};

/// How two 4-bit codes share a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nibble4Layout {
    /// bitsandbytes: element `2k` in the high nibble, `2k + 1` in the low nibble; an odd count
    /// pads the last low nibble with the code of 0.0. Codes `[0x1, 0x2, 0x3]` (nf4) pack to
    /// `[0x12, 0x37]` (0x7 is nf4's code for 0.0).
    HighFirst,
}

/// Errors unless `blocksize` is a power of two in 32..=4096 (the range bitsandbytes supports).
pub(super) fn check_blocksize(blocksize: usize) -> Result<()> {
    if !(32..=4096).contains(&blocksize) || !blocksize.is_power_of_two() {
        return Err(Error::invalid(format!(
            "blocksize must be a power of two in 32..=4096, got {blocksize}"
        )));
    }
    Ok(())
}

/// Number of packed bytes for `n` 4-bit codes.
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// Number of blocks for `n` elements.
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}
