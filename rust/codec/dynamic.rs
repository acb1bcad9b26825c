//! Blockwise quantization with bitsandbytes' signed dynamic 8-bit map, used to double-quantize
//! the 4-bit absmax, and its inverse. Knows nothing about files or Python.

use rayon::prelude::*;

use super::layout::num_blocks;
use super::tables::{dynamic_map, DYNAMIC_THRESHOLDS};
use crate::error::{Error, Result};

/// Quantizes `values - offset` blockwise with the signed dynamic map (nested quantization of
/// absmax), as bitsandbytes' CPU kernel does: per block `absmax = max |v|`,
/// `z = v * (1 / absmax)` in f32, and the code its search picks for `z` (see
/// `DYNAMIC_THRESHOLDS`; NaN, from 0 * inf, takes code 0).
/// Returns the codes and the per-block absmax.
pub fn quantize_dynamic(
    values: &[f32],
    offset: f32,
    blocksize: usize,
) -> Result<(Vec<u8>, Vec<f32>)> {
    if blocksize == 0 {
        return Err(Error::invalid("blocksize must be positive"));
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid("cannot quantize NaN or infinite values"));
    }
    let thresholds = DYNAMIC_THRESHOLDS.map(f32::from_bits);
    let mut codes = vec![0u8; values.len()];
    let mut absmax = vec![0f32; num_blocks(values.len(), blocksize)];
    codes
        .par_chunks_mut(blocksize)
        .zip(values.par_chunks(blocksize))
        .zip(absmax.par_iter_mut())
        .for_each(|((out, vals), am)| {
            let m = vals
                .iter()
                .fold(f32::MIN, |acc, v| acc.max((v - offset).abs()));
            *am = m;
            // bitsandbytes' kernel computes `x / absmax` as `x * (1 / absmax)` (one rounding more;
            // 1 / absmax overflows to infinity below 2**-128, which saturates the codes).
            let inv = 1.0 / m;
            for (o, &v) in out.iter_mut().zip(vals) {
                let z = (v - offset) * inv;
                *o = if z.is_nan() {
                    0
                } else {
                    thresholds.partition_point(|&t| t <= z) as u8
                };
            }
        });
    Ok((codes, absmax))
}

/// Undoes [`quantize_dynamic`]: `map[c] * absmax[block] + offset`.
pub fn dequantize_dynamic(
    codes: &[u8],
    absmax: &[f32],
    offset: f32,
    blocksize: usize,
) -> Result<Vec<f32>> {
    if blocksize == 0 || absmax.len() != num_blocks(codes.len(), blocksize) {
        return Err(Error::invalid("absmax does not match codes and blocksize"));
    }
    let map = dynamic_map();
    Ok(codes
        .iter()
        .enumerate()
        .map(|(i, &c)| map[c as usize] * absmax[i / blocksize] + offset)
        .collect())
}
