//! Golden vectors and properties of the 4-bit and 8-bit codecs (bitsandbytes-compatible).

mod common;

use common::{dq4, q4};
use proptest::prelude::*;
use quantsave::codec::{
    dequantize_dynamic, dynamic_map, num_blocks, packed_len, quantize_4bit, quantize_4bit_portable,
    quantize_dynamic, quantize_int8_rows, Floats, Nibble4Layout, QuantType,
};

#[test]
fn nf4_golden_bytes() {
    // Codes: 1.0 -> 15, -1.0 -> 0, 0.0 -> 7, 0.5 -> 12 (0.5626 is nearest), pad nibble = 7.
    let (p, a) = q4(&[1.0, -1.0, 0.0, 0.5, -0.25], 64, QuantType::Nf4);
    assert_eq!(p, vec![0xF0, 0x7C, 0x47]);
    assert_eq!(a, vec![1.0]);
}

#[test]
fn fp4_golden_bytes_and_zero_sign() {
    // fp4 codes: 1.0 -> 0b0011, -1.0 -> 0b1011, 0.5 -> 0b0101, -0.25 -> 0b1111, tiny values round
    // to zero with the sign bit set only for x < 0.
    let (p, _) = q4(&[1.0, -1.0, 0.5, -0.25, 1e-4, -1e-4], 64, QuantType::Fp4);
    assert_eq!(p, vec![0x3B, 0x5F, 0x08]);
}

#[test]
fn nf4_ties_go_to_the_lower_code() {
    let code = QuantType::Nf4.code();
    let mid = (code[9] + code[10]) / 2.0;
    let (p, _) = q4(&[1.0, mid], 64, QuantType::Nf4);
    assert_eq!(p[0] & 0xF, 9);
}

#[test]
fn bf16_and_f16_inputs_match_f32() {
    let xs: Vec<f32> = (0..200)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
        .collect();
    let bf: Vec<u16> = xs
        .iter()
        .map(|&v| half::bf16::from_f32(v).to_bits())
        .collect();
    let back: Vec<f32> = bf
        .iter()
        .map(|&b| half::bf16::from_bits(b).to_f32())
        .collect();
    let (p1, a1) = q4(&back, 64, QuantType::Nf4);
    let mut p2 = vec![0u8; packed_len(200)];
    let mut a2 = vec![0f32; num_blocks(200, 64)];
    quantize_4bit(
        Floats::Bf16(&bf),
        64,
        QuantType::Nf4,
        Nibble4Layout::HighFirst,
        &mut p2,
        &mut a2,
    )
    .unwrap();
    assert_eq!((p1, a1), (p2, a2));
}

#[test]
fn zero_block_and_partial_block_absmax() {
    // A zero full block stores absmax 0; a zero partial block stores the clamp 1e-38 (as bitsandbytes).
    let x = vec![0f32; 64 + 3];
    let (p, a) = q4(&x, 64, QuantType::Nf4);
    assert_eq!(a, vec![0.0, 1e-38]);
    assert!(p.iter().all(|&b| b == 0x77));
}

#[test]
fn non_finite_and_bad_sizes_are_errors() {
    let mut p = vec![0u8; 32];
    let mut a = vec![0f32; 1];
    let mut x = vec![1f32; 64];
    x[3] = f32::NAN;
    assert!(quantize_4bit(
        Floats::F32(&x),
        64,
        QuantType::Nf4,
        Nibble4Layout::HighFirst,
        &mut p,
        &mut a
    )
    .is_err());
    x[3] = f32::INFINITY;
    assert!(quantize_4bit(
        Floats::F32(&x),
        64,
        QuantType::Nf4,
        Nibble4Layout::HighFirst,
        &mut p,
        &mut a
    )
    .is_err());
    x[3] = 1.0;
    assert!(quantize_4bit(
        Floats::F32(&x),
        48,
        QuantType::Nf4,
        Nibble4Layout::HighFirst,
        &mut p,
        &mut a
    )
    .is_err());
    let mut short = vec![0u8; 31];
    assert!(quantize_4bit(
        Floats::F32(&x),
        64,
        QuantType::Nf4,
        Nibble4Layout::HighFirst,
        &mut short,
        &mut a
    )
    .is_err());
    assert!("nf3".parse::<QuantType>().is_err());
}

#[test]
fn dynamic_map_is_sorted_and_spans_minus_one_to_one() {
    let m = dynamic_map();
    assert!(m.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(m[255], 1.0);
    assert!(m[0] > -1.0 && m[0] < -0.99);
}

#[test]
fn int8_golden() {
    let x: Vec<u16> = [1.0f32, -2.0, 0.5, 0.0, 4.0, -4.0]
        .iter()
        .map(|&v| half::f16::from_f32(v).to_bits())
        .collect();
    let mut q = vec![0i8; 6];
    let mut scb = vec![0f32; 2];
    quantize_int8_rows(&x, 2, 3, &mut q, &mut scb).unwrap();
    assert_eq!(scb, vec![2.0, 4.0]);
    assert_eq!(q, vec![64, -127, 32, 0, 127, -127]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Round trip error stays within half the widest gap of the code table times the block absmax.
    #[test]
    fn round_trip_error_is_bounded(xs in prop::collection::vec(-1e3f32..1e3, 1..700), nf4 in any::<bool>(), bs_pow in 5u32..9) {
        let bs = 1usize << bs_pow;
        let qt = if nf4 { QuantType::Nf4 } else { QuantType::Fp4 };
        let (p, a) = q4(&xs, bs, qt);
        let back = dq4(&p, &a, xs.len(), bs, qt);
        let mut sorted = qt.code().to_vec();
        sorted.sort_by(f32::total_cmp);
        let gap = sorted.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max);
        for (i, (x, y)) in xs.iter().zip(&back).enumerate() {
            let am = a[i / bs].max(1e-30);
            prop_assert!((x - y).abs() <= gap / 2.0 * am * 1.0001 + 1e-6, "{x} -> {y} (absmax {am})");
        }
    }

    #[test]
    fn dynamic_round_trip_is_close(xs in prop::collection::vec(0f32..10.0, 1..600)) {
        let offset = xs.iter().sum::<f32>() / xs.len() as f32;
        let (codes, am) = quantize_dynamic(&xs, offset, 256).unwrap();
        let back = dequantize_dynamic(&codes, &am, offset, 256).unwrap();
        for (i, (x, y)) in xs.iter().zip(&back).enumerate() {
            prop_assert!((x - y).abs() <= am[i / 256] * 0.02 + 1e-5, "{x} -> {y}");
        }
    }

    /// The vector kernels give the same bytes as the portable code: every input kind, both types,
    /// partial last blocks, zeros of both signs, subnormals, exact decision bounds and their
    /// negatives (the tie rules), and values far outside [-1, 1].
    #[test]
    fn vector_kernels_match_portable_code(
        picks in prop::collection::vec((0usize..6, -4f32..4.0, 0usize..15), 0..1200),
        kind in 0usize..3,
        nf4 in any::<bool>(),
        bs_pow in 5u32..13,
        unit_absmax in any::<bool>(),
    ) {
        let bs = 1usize << bs_pow;
        let qt = if nf4 { QuantType::Nf4 } else { QuantType::Fp4 };
        let code = qt.code();
        let mut sorted = code.to_vec();
        sorted.sort_by(f32::total_cmp);
        let xs: Vec<f32> = picks
            .iter()
            .map(|&(how, v, k)| match how {
                0 => v,
                1 => (sorted[k] + sorted[k + 1]) / 2.0,
                2 => -(sorted[k] + sorted[k + 1]) / 2.0,
                3 => if k % 2 == 0 { 0.0 } else { -0.0 },
                4 => v * 1e-41,
                _ => v * 1e30,
            })
            .collect::<Vec<f32>>();
        let mut xs = xs;
        if unit_absmax {
            // absmax 1 keeps the scaled values exact, so the ties really are ties (for float32).
            for (i, x) in xs.iter_mut().enumerate() {
                *x = if i % bs == 0 { 1.0 } else { x.clamp(-1.0, 1.0) };
            }
        }
        let n = xs.len();
        let run = |portable: bool| {
            let mut p = vec![0u8; packed_len(n)];
            let mut a = vec![0f32; num_blocks(n, bs)];
            let bf: Vec<u16> = xs.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
            let hf: Vec<u16> = xs.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
            let input = match kind {
                0 => Floats::F32(&xs),
                1 => Floats::Bf16(&bf),
                _ => Floats::F16(&hf),
            };
            let f = if portable { quantize_4bit_portable } else { quantize_4bit };
            let r = f(input, bs, qt, Nibble4Layout::HighFirst, &mut p, &mut a);
            (r.is_ok(), p, a.iter().map(|v| v.to_bits()).collect::<Vec<u32>>())
        };
        let (ok, p, a) = run(false);
        prop_assert!(ok || kind == 2, "only float16 can overflow to infinity here");
        prop_assert_eq!((ok, p, a), run(true));
    }
}
