//! 4-bit blockwise quantization (nf4, fp4): the public entry points, the parallel split into
//! tasks, the portable per-block code and the runtime dispatch to the AVX2/F16C kernel in
//! `avx2` (the one `unsafe` call here, made only after the CPU check). Knows nothing about
//! files or Python.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::floats::Floats;
use super::layout::{check_blocksize, num_blocks, packed_len, Nibble4Layout};
use super::tables::{QuantType, FP4_POSITIVE_ORDER};
use crate::error::{Error, Result};

/// Quantizes `input` blockwise to 4-bit codes, bitsandbytes' way.
///
/// Per block: `absmax = max |x|`; full blocks scale with `x * (1 / absmax)`, the last partial
/// block with `x / absmax` (both in f32, absmax clamped to 1e-38, results clamped to [-1, 1]);
/// each value takes the nearest code, ties to the lower code. For fp4, a value that rounds to
/// zero gets the sign bit when its scaled value is negative (bitsandbytes' CUDA rule: `x < 0`
/// unless `x / absmax` underflows to -0.0; its CPU path sets it for small positive values instead). The stored absmax of the last partial block is the clamped one.
///
/// `packed` must hold `packed_len(n)` bytes and `absmax` `num_blocks(n, blocksize)` floats.
/// Non-finite input is an error.
pub fn quantize_4bit(
    input: Floats<'_>,
    blocksize: usize,
    quant_type: QuantType,
    layout: Nibble4Layout,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    quantize_4bit_with(input, blocksize, quant_type, layout, packed, absmax, true)
}

/// [`quantize_4bit`] on the portable code path only (no vector kernels), so tests can check that
/// both paths give identical bytes.
#[doc(hidden)]
pub fn quantize_4bit_portable(
    input: Floats<'_>,
    blocksize: usize,
    quant_type: QuantType,
    layout: Nibble4Layout,
    packed: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    quantize_4bit_with(input, blocksize, quant_type, layout, packed, absmax, false)
}

fn quantize_4bit_with(
    input: Floats<'_>,
    blocksize: usize,
    quant_type: QuantType,
    layout: Nibble4Layout,
    packed: &mut [u8],
    absmax: &mut [f32],
    simd: bool,
) -> Result<()> {
    check_blocksize(blocksize)?;
    let Nibble4Layout::HighFirst = layout;
    let n = input.len();
    if packed.len() != packed_len(n) || absmax.len() != num_blocks(n, blocksize) {
        return Err(Error::invalid(format!(
            "output sizes: packed {} (need {}), absmax {} (need {})",
            packed.len(),
            packed_len(n),
            absmax.len(),
            num_blocks(n, blocksize)
        )));
    }
    let bounds = decision_bounds(quant_type);
    let mut zero = [0u32; 1];
    encode_block(&[0.0], quant_type, &bounds, &mut zero);
    let zero_code = zero[0] as u8;
    let blocks_per_task = (1 << 16) / blocksize + 1;
    let bytes_per_block = blocksize / 2;
    let bad = std::sync::atomic::AtomicBool::new(false);
    let job = QuantizeJob {
        input,
        blocksize,
        quant_type,
        bounds: &bounds,
        zero_code,
        n,
        blocks_per_task,
    };
    packed
        .par_chunks_mut(blocks_per_task * bytes_per_block)
        .zip(absmax.par_chunks_mut(blocks_per_task))
        .enumerate()
        .for_each(|(task, (out, amax))| {
            let ok = if simd {
                job.run_dispatch(task, out, amax)
            } else {
                job.run(task, out, amax)
            };
            if !ok {
                bad.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    if bad.into_inner() {
        return Err(Error::invalid("cannot quantize NaN or infinite values"));
    }
    Ok(())
}

/// One `quantize_4bit` call's parameters, shared by its parallel tasks.
pub(super) struct QuantizeJob<'a> {
    pub(super) input: Floats<'a>,
    pub(super) blocksize: usize,
    pub(super) quant_type: QuantType,
    pub(super) bounds: &'a [f32],
    zero_code: u8,
    pub(super) n: usize,
    pub(super) blocks_per_task: usize,
}

impl QuantizeJob<'_> {
    /// Runs one task with the widest vector instructions the CPU has.
    fn run_dispatch(&self, task: usize, out: &mut [u8], amax: &mut [f32]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU supports AVX2 and F16C, checked just above.
            return unsafe { avx2::quantize_task(self, task, out, amax) };
        }
        self.run(task, out, amax)
    }

    /// Quantizes the blocks of one task with portable code; false when a block holds NaN or
    /// infinity.
    fn run(&self, task: usize, out: &mut [u8], amax: &mut [f32]) -> bool {
        let mut buf = vec![0f32; self.blocksize];
        let mut codes = vec![0u32; self.blocksize];
        (0..amax.len()).all(|b| self.block(task, b, out, amax, &mut buf, &mut codes))
    }

    /// Quantizes block `b` of a task (portable code; any length, including the partial last
    /// block). `buf` and `codes` are scratch space of `blocksize` elements.
    #[inline(always)]
    pub(super) fn block(
        &self,
        task: usize,
        b: usize,
        out: &mut [u8],
        amax: &mut [f32],
        buf: &mut [f32],
        codes: &mut [u32],
    ) -> bool {
        let (blocksize, bytes_per_block) = (self.blocksize, self.blocksize / 2);
        let start = (task * self.blocks_per_task + b) * blocksize;
        let len = blocksize.min(self.n - start);
        let x = &mut buf[..len];
        self.input.load(start, x);
        let (m, non_finite) = block_absmax(x);
        if non_finite {
            return false;
        }
        let clamped = m.max(1e-38);
        if len == blocksize {
            amax[b] = m;
            let inv = 1.0 / clamped;
            for v in x.iter_mut() {
                *v = (*v * inv).clamp(-1.0, 1.0);
            }
        } else {
            amax[b] = clamped;
            for v in x.iter_mut() {
                *v = (*v / clamped).clamp(-1.0, 1.0);
            }
        }
        encode_block(x, self.quant_type, self.bounds, codes);
        let bytes = &mut out[b * bytes_per_block..b * bytes_per_block + len.div_ceil(2)];
        let mut pairs = codes[..len].chunks_exact(2);
        for (byte, pair) in bytes.iter_mut().zip(&mut pairs) {
            *byte = ((pair[0] << 4) | pair[1]) as u8;
        }
        if let [last] = pairs.remainder() {
            bytes[bytes.len() - 1] = ((last << 4) as u8) | self.zero_code;
        }
        true
    }
}

/// Sorted decision bounds (midpoints of neighbouring codes, computed in f32 like bitsandbytes).
fn midpoints(sorted: &[f32]) -> Vec<f32> {
    sorted.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
}

/// Decision bounds for a 4-bit type: nf4 over the whole sorted table, fp4 over the sorted
/// magnitudes (midpoints of neighbours, computed in f32 as bitsandbytes does).
fn decision_bounds(quant_type: QuantType) -> Vec<f32> {
    let code = quant_type.code();
    match quant_type {
        QuantType::Nf4 => midpoints(&code),
        QuantType::Fp4 => midpoints(&FP4_POSITIVE_ORDER.map(|c| code[c as usize])),
    }
}

/// Codes of scaled values in [-1, 1], written to `codes`. Counts the bounds below each value
/// (ties to the lower code); loops are laid out bound by bound so they vectorize.
#[inline(always)]
fn encode_block(scaled: &[f32], quant_type: QuantType, bounds: &[f32], codes: &mut [u32]) {
    let codes = &mut codes[..scaled.len()];
    codes.fill(0);
    match quant_type {
        QuantType::Nf4 => {
            for &b in bounds {
                for (c, &x) in codes.iter_mut().zip(scaled) {
                    *c += (x > b) as u32;
                }
            }
        }
        QuantType::Fp4 => {
            for &b in bounds {
                for (c, &x) in codes.iter_mut().zip(scaled) {
                    let mag = x.abs();
                    // Negative values take ties to the larger magnitude (mirror of "ties to lower").
                    *c += ((mag > b) | ((x < 0.0) & (mag == b))) as u32;
                }
            }
            for (c, &x) in codes.iter_mut().zip(scaled) {
                let k = *c;
                // FP4_POSITIVE_ORDER[k] without a lookup: 0, 1, 6, 7, 4, 5, 2, 3.
                let mag_code = if k < 2 { k } else { (8 - (k & 6)) | (k & 1) };
                *c = mag_code | (((x < 0.0) as u32) << 3);
            }
        }
    }
}

/// Largest |x| of a block and whether it holds NaN or infinity, on the bit patterns
/// (integer max vectorizes; the float max would be a serial chain).
#[inline(always)]
fn block_absmax(x: &[f32]) -> (f32, bool) {
    let mut m = 0u32;
    for v in x {
        m = m.max(v.to_bits() & 0x7fff_ffff);
    }
    (f32::from_bits(m), m >= 0x7f80_0000)
}
