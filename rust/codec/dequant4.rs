//! 4-bit blockwise dequantization (nf4, fp4) into f32, bf16 or f16, parallel over runs of
//! blocks. Knows nothing about files or Python.

use rayon::prelude::*;

use super::floats::{bf16_bits, FloatsMut};
use super::layout::{check_blocksize, num_blocks, packed_len, Nibble4Layout};
use super::tables::QuantType;
use crate::error::{Error, Result};

/// Dequantizes 4-bit codes: `code[c] * absmax[block]` in f32, then rounded (to nearest even)
/// to the output type.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    quant_type: QuantType,
    layout: Nibble4Layout,
    out: FloatsMut<'_>,
) -> Result<()> {
    check_blocksize(blocksize)?;
    let Nibble4Layout::HighFirst = layout;
    let n = match &out {
        FloatsMut::F32(o) => o.len(),
        FloatsMut::Bf16(o) | FloatsMut::F16(o) => o.len(),
    };
    if packed.len() != packed_len(n) || absmax.len() != num_blocks(n, blocksize) {
        return Err(Error::invalid(format!(
            "input sizes: packed {} (need {}), absmax {} (need {}) for {n} values",
            packed.len(),
            packed_len(n),
            absmax.len(),
            num_blocks(n, blocksize)
        )));
    }
    let code = quant_type.code();
    // Both values of every possible byte, so each byte costs one lookup.
    let mut pairs = [[0f32; 2]; 256];
    for (b, p) in pairs.iter_mut().enumerate() {
        *p = [code[b >> 4], code[b & 0xF]];
    }
    let blocks_per_task = (1 << 16) / blocksize + 1;
    let task = blocks_per_task * blocksize;
    // Values of one run of blocks, in f32.
    let fill = |t: usize, out: &mut [f32]| {
        for (b, vals) in out.chunks_mut(blocksize).enumerate() {
            let block = t * blocks_per_task + b;
            let scale = absmax[block];
            let bytes = &packed[block * blocksize / 2..];
            let half = vals.len() / 2;
            let mut it = vals.chunks_exact_mut(2);
            for (v, &byte) in (&mut it).zip(bytes) {
                let [a, c] = pairs[byte as usize];
                v[0] = a * scale;
                v[1] = c * scale;
            }
            if let [last] = it.into_remainder() {
                *last = pairs[bytes[half] as usize][0] * scale;
            }
        }
    };
    match out {
        FloatsMut::F32(o) => o
            .par_chunks_mut(task)
            .enumerate()
            .for_each(|(t, chunk)| fill(t, chunk)),
        FloatsMut::Bf16(o) => o.par_chunks_mut(task).enumerate().for_each(|(t, chunk)| {
            let mut tmp = vec![0f32; chunk.len()];
            fill(t, &mut tmp);
            for (d, v) in chunk.iter_mut().zip(&tmp) {
                *d = bf16_bits(*v);
            }
        }),
        FloatsMut::F16(o) => o.par_chunks_mut(task).enumerate().for_each(|(t, chunk)| {
            let mut tmp = vec![0f32; chunk.len()];
            fill(t, &mut tmp);
            for (d, v) in chunk.iter_mut().zip(&tmp) {
                *d = half::f16::from_f32(*v).to_bits();
            }
        }),
    }
    Ok(())
}
