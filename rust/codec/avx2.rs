//! The AVX2/F16C kernels, x86_64 only: the 4-bit quantizer and the LLM.int8() row quantizer.
//! Every kernel is an `unsafe fn` that its callers (`quant4`, `int8`) reach only after checking
//! the CPU features at run time; no other module may call them, and they depend on nothing
//! outside the codec.
//!
//! The 4-bit quantizer: one pass converts a block to f32 and finds its absmax, a second scales,
//! clamps and encodes eight values at a time with every decision bound held in registers, and
//! packs the codes straight into bytes. Same float operations as the portable code (one IEEE
//! multiply or divide, then the clamp), so the results are identical bit for bit.

use std::arch::x86_64::*;

use super::quant4::QuantizeJob;
use super::{Floats, QuantType};

/// Input element kinds, as const generic parameters.
const F32: u8 = 0;
const BF16: u8 = 1;
const F16: u8 = 2;

/// Quantizes the blocks of one task; false when a block holds NaN or infinity.
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn quantize_task(
    job: &QuantizeJob<'_>,
    task: usize,
    out: &mut [u8],
    amax: &mut [f32],
) -> bool {
    match (job.input, job.quant_type) {
        (Floats::F32(x), QuantType::Nf4) => {
            blocks::<F32, false>(job, x.as_ptr() as *const u8, task, out, amax)
        }
        (Floats::Bf16(x), QuantType::Nf4) => {
            blocks::<BF16, false>(job, x.as_ptr() as *const u8, task, out, amax)
        }
        (Floats::F16(x), QuantType::Nf4) => {
            blocks::<F16, false>(job, x.as_ptr() as *const u8, task, out, amax)
        }
        (Floats::F32(x), QuantType::Fp4) => {
            blocks::<F32, true>(job, x.as_ptr() as *const u8, task, out, amax)
        }
        (Floats::Bf16(x), QuantType::Fp4) => {
            blocks::<BF16, true>(job, x.as_ptr() as *const u8, task, out, amax)
        }
        (Floats::F16(x), QuantType::Fp4) => {
            blocks::<F16, true>(job, x.as_ptr() as *const u8, task, out, amax)
        }
    }
}

/// Eight input elements starting at element `i`, as f32.
#[inline(always)]
unsafe fn load8<const K: u8>(base: *const u8, i: usize) -> __m256 {
    match K {
        F32 => _mm256_loadu_ps((base as *const f32).add(i)),
        BF16 => {
            let h = _mm_loadu_si128((base as *const u16).add(i) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
        _ => _mm256_cvtph_ps(_mm_loadu_si128(
            (base as *const u16).add(i) as *const __m128i
        )),
    }
}

/// Largest of eight unsigned 32-bit lanes.
#[inline(always)]
unsafe fn hmax_u32(v: __m256i) -> u32 {
    let m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let m = _mm_max_epu32(m, _mm_shuffle_epi32::<0b01_00_11_10>(m));
    let m = _mm_max_epu32(m, _mm_shuffle_epi32::<0b10_11_00_01>(m));
    _mm_cvtsi128_si32(m) as u32
}

/// Packs eight codes (one per 32-bit lane, 0..=15) into four bytes, even element high.
#[inline(always)]
unsafe fn pack8(codes: __m256i) -> u32 {
    // Each 64-bit lane holds (c_even, c_odd); its low half becomes c_even << 4 | c_odd.
    let pairs = _mm256_or_si256(
        _mm256_slli_epi32::<4>(codes),
        _mm256_srli_epi64::<32>(codes),
    );
    let low = _mm256_permutevar8x32_epi32(pairs, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
    let w = _mm_packus_epi32(_mm256_castsi256_si128(low), _mm256_castsi256_si128(low));
    _mm_cvtsi128_si32(_mm_packus_epi16(w, w)) as u32
}

#[inline(always)]
unsafe fn blocks<const K: u8, const FP4: bool>(
    job: &QuantizeJob<'_>,
    base: *const u8,
    task: usize,
    out: &mut [u8],
    amax: &mut [f32],
) -> bool {
    let bs = job.blocksize;
    let mut buf = vec![0f32; bs];
    let mut codes = vec![0u32; bs];
    // nf4: 15 bounds on the value; fp4: 7 bounds on the magnitude, compared as integers.
    let mut bounds = [_mm256_setzero_ps(); 15];
    for (v, &b) in bounds.iter_mut().zip(job.bounds) {
        *v = _mm256_set1_ps(b);
    }
    let (lo, hi) = (_mm256_set1_ps(-1.0), _mm256_set1_ps(1.0));
    let abs_mask = _mm256_set1_epi32(0x7fff_ffff);
    let fp4_order = _mm256_setr_epi32(0, 1, 6, 7, 4, 5, 2, 3);
    let sign_bit = _mm256_set1_epi32(8);
    for b in 0..amax.len() {
        let start = (task * job.blocks_per_task + b) * bs;
        if start + bs > job.n {
            // The partial last block of the tensor.
            if !job.block(task, b, out, amax, &mut buf, &mut codes) {
                return false;
            }
            continue;
        }
        let mut mx = _mm256_setzero_si256();
        let p = buf.as_mut_ptr();
        for j in (0..bs).step_by(8) {
            let v = load8::<K>(base, start + j);
            _mm256_storeu_ps(p.add(j), v);
            mx = _mm256_max_epu32(mx, _mm256_and_si256(_mm256_castps_si256(v), abs_mask));
        }
        let m = hmax_u32(mx);
        if m >= 0x7f80_0000 {
            return false;
        }
        let m = f32::from_bits(m);
        amax[b] = m;
        let inv = _mm256_set1_ps(1.0 / m.max(1e-38));
        let dst = out.as_mut_ptr().add(b * (bs / 2));
        for j in (0..bs).step_by(8) {
            let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(j)), inv);
            let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
            let c = if FP4 {
                // Magnitude bits, plus one for negative values: `key > bound` is then
                // `|x| > b` for x >= 0 and `|x| >= b` for x < 0 (ties to the larger
                // magnitude, the mirror of "ties to the lower code").
                let neg = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(v, _mm256_setzero_ps()));
                let key = _mm256_sub_epi32(_mm256_and_si256(_mm256_castps_si256(v), abs_mask), neg);
                let mut a0 = _mm256_setzero_si256();
                let mut a1 = _mm256_setzero_si256();
                for k in (0..7).step_by(2) {
                    a0 = _mm256_sub_epi32(
                        a0,
                        _mm256_cmpgt_epi32(key, _mm256_castps_si256(bounds[k])),
                    );
                    if k + 1 < 7 {
                        a1 = _mm256_sub_epi32(
                            a1,
                            _mm256_cmpgt_epi32(key, _mm256_castps_si256(bounds[k + 1])),
                        );
                    }
                }
                let rank = _mm256_add_epi32(a0, a1);
                let mag = _mm256_permutevar8x32_epi32(fp4_order, rank);
                _mm256_or_si256(mag, _mm256_and_si256(neg, sign_bit))
            } else {
                let mut a0 = _mm256_setzero_si256();
                let mut a1 = _mm256_setzero_si256();
                let mut a2 = _mm256_setzero_si256();
                for k in (0..15).step_by(3) {
                    a0 = _mm256_sub_epi32(
                        a0,
                        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(v, bounds[k])),
                    );
                    a1 = _mm256_sub_epi32(
                        a1,
                        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(v, bounds[k + 1])),
                    );
                    a2 = _mm256_sub_epi32(
                        a2,
                        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(v, bounds[k + 2])),
                    );
                }
                _mm256_add_epi32(_mm256_add_epi32(a0, a1), a2)
            };
            std::ptr::write_unaligned(dst.add(j / 2) as *mut u32, pack8(c));
        }
    }
    true
}

/// LLM.int8() quantization of one float16 row (see `quantize_int8_rows`); false when the row
/// holds NaN or infinity.
///
/// # Safety
/// The CPU must support AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn int8_row(row: &[u16], out: &mut [i8], scb: &mut f32) -> bool {
    let n = row.len();
    let body = n - n % 8;
    let abs_mask = _mm256_set1_epi32(0x7fff_ffff);
    let mut mx = _mm256_setzero_si256();
    for j in (0..body).step_by(8) {
        let v = load8::<F16>(row.as_ptr() as *const u8, j);
        mx = _mm256_max_epu32(mx, _mm256_and_si256(_mm256_castps_si256(v), abs_mask));
    }
    let mut m = hmax_u32(mx);
    for &h in &row[body..] {
        m = m.max(half::f16::from_bits(h).to_f32().to_bits() & 0x7fff_ffff);
    }
    if m >= 0x7f80_0000 {
        return false;
    }
    let m = f32::from_bits(m);
    *scb = m;
    if m == 0.0 {
        // 0 * (1 / 0) is NaN, which the portable code stores as 0.
        out.fill(0);
        return true;
    }
    // As torch evaluates `127.0 / row_stats`: reciprocal first, then the scalar product.
    let s = (1.0 / m) * 127.0;
    let scale = _mm256_set1_ps(s);
    let dst = out.as_mut_ptr();
    for j in (0..body).step_by(8) {
        let v = _mm256_mul_ps(load8::<F16>(row.as_ptr() as *const u8, j), scale);
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
        let i = _mm256_cvtps_epi32(r);
        let w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256::<1>(i));
        let b = _mm_packs_epi16(w, w);
        _mm_storel_epi64(dst.add(j) as *mut __m128i, b);
    }
    for (o, &h) in out[body..].iter_mut().zip(&row[body..]) {
        *o = (half::f16::from_bits(h).to_f32() * s).round_ties_even() as i8;
    }
    true
}
