//! LLM.int8() row-wise quantization of half-precision matrices and its inverse, with the
//! AVX2/F16C row kernel chosen at run time (the one `unsafe` call here, made only after the CPU
//! check). Knows nothing about files or Python.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::avx2;
use crate::error::{Error, Result};

/// LLM.int8() row-wise quantization of a `rows x cols` half-precision matrix, bitsandbytes'
/// way: `SCB[r] = max |x|` of the row, `q = round_half_even(x * ((1 / SCB[r]) * 127))` in f32.
pub fn quantize_int8_rows(
    input: &[u16],
    rows: usize,
    cols: usize,
    q: &mut [i8],
    scb: &mut [f32],
) -> Result<()> {
    if rows.checked_mul(cols) != Some(input.len()) || q.len() != input.len() || scb.len() != rows {
        return Err(Error::invalid(
            "int8 quantization: buffer sizes do not match rows x cols",
        ));
    }
    if cols == 0 {
        scb.fill(0.0);
        return Ok(());
    }
    let bad = std::sync::atomic::AtomicBool::new(false);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        q.par_chunks_mut(cols)
            .zip(input.par_chunks(cols))
            .zip(scb.par_iter_mut())
            .for_each(|((out, row), s)| {
                // SAFETY: the CPU supports AVX2 and F16C, checked just above.
                if !unsafe { avx2::int8_row(row, out, s) } {
                    bad.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            });
        if bad.into_inner() {
            return Err(Error::invalid("cannot quantize NaN or infinite values"));
        }
        return Ok(());
    }
    q.par_chunks_mut(cols)
        .zip(input.par_chunks(cols))
        .zip(scb.par_iter_mut())
        .for_each(|((out, row), s)| {
            let vals: Vec<f32> = row
                .iter()
                .map(|&b| half::f16::from_bits(b).to_f32())
                .collect();
            let m = vals.iter().fold(0f32, |acc, v| acc.max(v.abs()));
            if !m.is_finite() || vals.iter().any(|v| v.is_nan()) {
                bad.store(true, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            *s = m;
            // As torch evaluates `127.0 / row_stats`: reciprocal first, then the scalar product.
            let scale = (1.0 / m) * 127.0;
            for (o, v) in out.iter_mut().zip(&vals) {
                let r = (v * scale).round_ties_even();
                *o = if r.is_nan() { 0 } else { r as i8 };
            }
        });
    if bad.into_inner() {
        return Err(Error::invalid("cannot quantize NaN or infinite values"));
    }
    Ok(())
}

/// Undoes [`quantize_int8_rows`]: `q * SCB[r] / 127` in f32.
pub fn dequantize_int8_rows(q: &[i8], scb: &[f32], cols: usize, out: &mut [f32]) -> Result<()> {
    if cols == 0 || q.len() != out.len() || scb.len().checked_mul(cols) != Some(q.len()) {
        return Err(Error::invalid(
            "int8 dequantization: buffer sizes do not match",
        ));
    }
    out.par_chunks_mut(cols)
        .zip(q.par_chunks(cols))
        .zip(scb.par_iter())
        .for_each(|((o, row), &s)| {
            for (v, &c) in o.iter_mut().zip(row) {
                *v = c as f32 * s / 127.0;
            }
        });
    Ok(())
}
