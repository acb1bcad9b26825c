//! More golden vectors and robustness properties of the codec (bitsandbytes-compatible).
//!
//! Every golden vector below was derived by hand from the code tables in `rust/codec.rs` and then
//! checked against bitsandbytes 0.50.2 on the CPU (`bitsandbytes.functional.quantize_4bit`,
//! `quantize_blockwise`, `int8_vectorwise_quant`); the comments give the reasoning.
//!
//! nf4 codes (index: value) and the decision midpoints between neighbours:
//!   0: -1.0       1: -0.6961928  2: -0.5250731  3: -0.3949175  4: -0.2844414  5: -0.1847734
//!   6: -0.0910500 7: 0.0         8: 0.0795803   9: 0.1609302  10: 0.2461123  11: 0.3379152
//!  12: 0.4407098 13: 0.5626170  14: 0.7229568  15: 1.0
//!   midpoints: -0.848 -0.611 -0.460 -0.340 -0.235 -0.138 -0.0455 0.0398 0.1203 0.2035 0.2920
//!              0.3893 0.5017 0.6428 0.8615
//! fp4 magnitudes by code (bit 3 = sign): 0: 0, 1: 0.0052083, 2: 0.6666667, 3: 1.0, 4: 0.3333333,
//!   5: 0.5, 6: 0.1666667, 7: 0.25; ascending: codes 0, 1, 6, 7, 4, 5, 2, 3.

mod common;

use common::{dq4, q4};
use proptest::prelude::*;
use quantsave::codec::{
    dequantize_4bit, dequantize_dynamic, dequantize_int8_rows, dynamic_map, packed_len,
    quantize_4bit, quantize_dynamic, quantize_int8_rows, Floats, FloatsMut, Nibble4Layout,
    QuantType,
};

const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// The clamp bitsandbytes applies to a block's scale: `1e-38` as f32 (a subnormal).
const CLAMP_BITS: u32 = 0x006c_e3ee;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn f16s(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect()
}

// ------------------------------------------------------------------------------------------
// golden vectors

/// A full nf4 block (blocksize 32) of float32 subnormals: absmax 5e-39 is stored as is, but the
/// block is scaled by the 1e-38 clamp (`x * (1 / 1e-38)`), so 5e-39 becomes 0.5, not 1.0:
///   5e-39 -> 0.5 -> 12 (0.4407; 0.5 is below the 12/13 midpoint 0.5017)
///  -5e-39 -> -0.5 -> 2 (-0.5251; between midpoints -0.611 and -0.460)
///   2.5e-39 -> 0.25 -> 10 (0.2461), 1e-39 -> 0.1 -> 8 (0.0796), -1e-40 -> -0.01 -> 7 (0.0)
/// and the 27 zeros -> 7. Bytes: 0xC2 0xA8 then 0x77 x 14.
/// The same 5 values as a partial block store the clamped absmax 1e-38 (0x006ce3ee) and encode
/// `x / 1e-38` to the same codes; bytes 0xC2 0xA8 0x77 (the pad nibble is 7, nf4's 0.0).
/// Dequantization is `code * absmax` in f32 with no flush to zero (bits from bitsandbytes).
#[test]
fn nf4_golden_subnormal_block() {
    let vals = [
        f32::from_bits(0x0036_71f7), // 5e-39
        f32::from_bits(0x8036_71f7), // -5e-39
        f32::from_bits(0x001b_38fc), // 2.5e-39
        f32::from_bits(0x000a_e398), // 1e-39
        f32::from_bits(0x8001_16c2), // -1e-40
    ];
    assert!(vals.iter().all(|v| v.is_subnormal()));
    let mut x = vec![0f32; 32];
    x[..5].copy_from_slice(&vals);
    let (p, a) = q4(&x, 32, QuantType::Nf4);
    let mut want = vec![0xC2, 0xA8];
    want.extend([0x77; 14]);
    assert_eq!(p, want);
    assert_eq!(bits(&a), vec![0x0036_71f7]);
    let back = dq4(&p, &a, 32, 32, QuantType::Nf4);
    assert_eq!(
        bits(&back[..5]),
        vec![
            0x0017_fe99,
            0x801c_9673,
            0x000d_664e,
            0x0004_5530,
            0x0000_0000
        ]
    );

    let (p, a) = q4(&vals, 32, QuantType::Nf4);
    assert_eq!(p, vec![0xC2, 0xA8, 0x77]);
    assert_eq!(bits(&a), vec![CLAMP_BITS]);
    let back = dq4(&p, &a, 5, 32, QuantType::Nf4);
    assert_eq!(
        bits(&back),
        vec![
            0x002f_fd32,
            0x8039_2ce6,
            0x001a_cc9c,
            0x0008_aa60,
            0x0000_0000
        ]
    );
}

/// A constant block `c`: absmax |c|, every value scales to exactly +-1.0 (0.3 * (1 / 0.3) rounds
/// to 1.0 in f32), i.e. nf4 code 15 (c > 0) or 0 (c < 0), fp4 0b0011 or 0b1011; both tables hold
/// +-1.0, so c dequantizes exactly. Blocksize 32: 16 bytes of 0xFF / 0x00 / 0x33 / 0xBB.
#[test]
fn golden_constant_blocks() {
    for (qt, c, byte) in [
        (QuantType::Nf4, 0.3f32, 0xFFu8),
        (QuantType::Nf4, -2.5, 0x00),
        (QuantType::Fp4, 0.3, 0x33),
        (QuantType::Fp4, -2.5, 0xBB),
    ] {
        let x = vec![c; 32];
        let (p, a) = q4(&x, 32, qt);
        assert_eq!(p, vec![byte; 16], "{qt:?} {c}");
        assert_eq!(a, vec![c.abs()]);
        let back = dq4(&p, &a, 32, 32, qt);
        assert!(
            back.iter().all(|&v| v.to_bits() == c.to_bits()),
            "{qt:?} {c}"
        );
        // A full block and a partial one of 6 (c / |c| = +-1 exactly): the same codes.
        let x = vec![c; 38];
        let (p, a) = q4(&x, 32, qt);
        assert_eq!(p, vec![byte; 19], "{qt:?} {c}");
        assert_eq!(a, vec![c.abs(); 2]);
        let back = dq4(&p, &a, 38, 32, qt);
        assert!(
            back.iter().all(|&v| v.to_bits() == c.to_bits()),
            "{qt:?} {c}"
        );
    }
}

/// A full zero block (+0.0 or -0.0): absmax 0.0 exactly (no clamp for full blocks), every code is
/// the code of 0.0 (nf4 7, fp4 0: -0.0 is not < 0, so no sign bit), and it dequantizes to +0.0.
/// A zero partial block stores the clamp 1e-38 instead (bitsandbytes does the same).
#[test]
fn golden_zero_blocks() {
    for (qt, byte) in [(QuantType::Nf4, 0x77u8), (QuantType::Fp4, 0x00)] {
        for z in [0.0f32, -0.0] {
            let x = vec![z; 64];
            let (p, a) = q4(&x, 64, qt);
            assert_eq!(p, vec![byte; 32], "{qt:?} {z}");
            assert_eq!(bits(&a), vec![0]);
            let back = dq4(&p, &a, 64, 64, qt);
            assert!(back.iter().all(|&v| v.to_bits() == 0));
            let x = vec![z; 64 + 9];
            let (p, a) = q4(&x, 64, qt);
            assert_eq!(p, vec![byte; 37], "{qt:?} {z}");
            assert_eq!(bits(&a), vec![0, CLAMP_BITS]);
            let back = dq4(&p, &a, 73, 64, qt);
            assert!(back.iter().all(|&v| v.to_bits() == 0));
        }
    }
}

/// 37 values, blocksize 32: a full block of alternating +-1.0 (codes 15, 0: bytes 0xF0 x 16,
/// absmax 1.0) and a partial block of 5 with absmax 2.0, divided by it:
///   2.0 -> 1.0 -> 15, -1.0 -> -0.5 -> 2, 0.5 -> 0.25 -> 10, 0.25 -> 0.125 -> 9 (above the 8/9
///   midpoint 0.1203), -2.0 -> -1.0 -> 0
/// The partial block starts on byte 16; its last byte holds code 0 and the pad nibble 7 (nf4's
/// 0.0): 0xF2 0xA9 0x07. 19 bytes = ceil(37 / 2).
#[test]
fn nf4_golden_odd_partial_last_block() {
    let mut x: Vec<f32> = (0..32)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    x.extend([2.0, -1.0, 0.5, 0.25, -2.0]);
    let (p, a) = q4(&x, 32, QuantType::Nf4);
    let mut want = vec![0xF0; 16];
    want.extend([0xF2, 0xA9, 0x07]);
    assert_eq!(p, want);
    assert_eq!(a, vec![1.0, 2.0]);
    let code = QuantType::Nf4.code();
    let back = dq4(&p, &a, 37, 32, QuantType::Nf4);
    assert_eq!(
        bits(&back[32..]),
        bits(&[2.0, code[2] * 2.0, code[10] * 2.0, code[9] * 2.0, -2.0])
    );
}

/// fp4 ties. Midpoints of neighbouring magnitudes, computed in f32 like the codec and
/// bitsandbytes: m0 = (0 + 0.0052083) / 2 = 0x3b2aaaab, m1 = 0.0859375 = 0x3db00000,
/// m2 = 0x3e555556, m3 = 0x3e955556, m4 = 0x3ed55556, m5 = 0x3f155556, m6 = 0x3f555556.
/// With absmax 1.0 they scale exactly. A negative tie takes the larger magnitude (the lower code
/// by value, as bitsandbytes' bucketize): -m0..-m6 -> 1, 6, 7, 4, 5, 2, 3 with the sign bit:
/// 9, 14, 15, 12, 13, 10, 11. A positive tie takes the smaller magnitude: m0..m6 -> 0, 1, 6, 7,
/// 4, 5, 2. With 1.0 (code 3) first and the pad nibble 0: 0x39 0xEF 0xCD 0xAB 0x01 0x67 0x45 0x20.
/// (bitsandbytes' CPU path gives 0x81 for the fifth byte: it sets the sign bit on +m0, which
/// rounds to zero; the sign-of-zero rule is the one documented difference.)
#[test]
fn fp4_golden_ties() {
    let mids: Vec<f32> = [
        0x3b2a_aaab,
        0x3db0_0000,
        0x3e55_5556,
        0x3e95_5556,
        0x3ed5_5556,
        0x3f15_5556,
        0x3f55_5556,
    ]
    .map(f32::from_bits)
    .to_vec();
    // They really are the f32 midpoints of the table.
    let code = QuantType::Fp4.code();
    let order = [0usize, 1, 6, 7, 4, 5, 2, 3];
    for (k, m) in mids.iter().enumerate() {
        assert_eq!(*m, (code[order[k]] + code[order[k + 1]]) / 2.0);
    }
    let mut x = vec![1.0f32];
    x.extend(mids.iter().map(|m| -m));
    x.extend(&mids);
    let want = [0x39, 0xEF, 0xCD, 0xAB, 0x01, 0x67, 0x45, 0x20];
    // 15 values: a partial block (divided by absmax).
    let (p, a) = q4(&x, 32, QuantType::Fp4);
    assert_eq!(p, want);
    assert_eq!(a, vec![1.0]);
    // The same padded with zeros to a full block of 32 (multiplied by 1 / absmax; the vector
    // path on CPUs that have one): the zeros (code 0) add 8 bytes of 0x00.
    x.resize(32, 0.0);
    let (p, a) = q4(&x, 32, QuantType::Fp4);
    assert_eq!(p[..8], want);
    assert_eq!(p[8..], [0u8; 8]);
    assert_eq!(a, vec![1.0]);
}

/// Dynamic-map (nested) quantization of [3.0, 1.0, 2.0, 2.5 | 0.0, 4.0, 2.1], offset 2.0,
/// blocksize 4. Block 0: v - offset = [1, -1, 0, 0.5], absmax 1.0, so z is exact:
///   1.0 -> 255 (map 1.0); -1.0 -> 0 (map[0] = -0.99296874 is the lowest entry);
///   0.0 -> 131 (map 2.125e-5, 0x37b24206): bitsandbytes' bucketed search does not land on the
///   exact 0.0 at index 127; the measured thresholds 123..130 all sit at -2.98e-8;
///   0.5 -> 219 (map 0.50078124, 0x3f003333, the nearest entry).
/// Block 1 (partial, 3 values): [-2, 2, 0.0999999], absmax 2.0: -1.0 -> 0, 1.0 -> 255,
///   0.04999995 -> 173 (map 0.05078125 is nearer than 172's 0.048).
#[test]
fn dynamic_golden() {
    let vals = [3.0f32, 1.0, 2.0, 2.5, 0.0, 4.0, 2.1];
    let (codes, absmax) = quantize_dynamic(&vals, 2.0, 4).unwrap();
    assert_eq!(codes, vec![255, 0, 131, 219, 0, 255, 173]);
    assert_eq!(absmax, vec![1.0, 2.0]);
    let map = dynamic_map();
    assert_eq!(
        bits(&[map[255], map[0], map[131], map[219], map[173]]),
        vec![
            0x3f80_0000,
            0xbf7e_3333,
            0x37b2_4206,
            0x3f00_3333,
            0x3d50_0000
        ]
    );
    let back = dequantize_dynamic(&codes, &absmax, 2.0, 4).unwrap();
    assert_eq!(back[0], 3.0);
    assert_eq!(back[5], 4.0);
    assert_eq!(back[2], map[131] + 2.0);
}

/// bitsandbytes' CPU kernel evaluates `v / absmax` as `v * (1 / absmax)` (checked against
/// bitsandbytes: it follows the reciprocal in every case where the two differ across a decision
/// threshold). absmax [0.25, a1 = 1.2307982 (0x3f9d8acc), 2.0] with offset = their float32 mean
/// 1.1602660 (0x3f948399, as torch's mean computes it): v - offset = [-0.9102660, 0.0705322,
/// 0.8397340] (0xbf690732, 0x3d907330, 0x3f56f8ce), block absmax m = 0.9102660.
/// 0.0705322 / m = 0x3d9eb098, exactly the threshold of code 183, but 0.0705322 * (1 / m) =
/// 0x3d9eb097, one ulp below it: code 182 (map 0.07609375; 183 is 0.07890625). -m -> -1 -> 0,
/// 0.8397340 -> 0.9225 -> 249.
#[test]
fn dynamic_golden_reciprocal_rounding() {
    let a1 = f32::from_bits(0x3f9d_8acc);
    let offset = f32::from_bits(0x3f94_8399);
    assert_eq!((0.25f32 + a1 + 2.0) / 3.0, offset);
    let (codes, absmax) = quantize_dynamic(&[0.25, a1, 2.0], offset, 256).unwrap();
    assert_eq!(bits(&absmax), vec![0x3f69_0732]);
    assert_eq!(codes, vec![0, 182, 249]);
    // With absmax 1.0, z = v exactly: the threshold itself takes code 183 (`t <= z`), the float
    // just below it 182.
    let at = [
        1.0,
        f32::from_bits(0x3d9e_b098),
        f32::from_bits(0x3d9e_b097),
    ];
    assert_eq!(
        quantize_dynamic(&at, 0.0, 256).unwrap().0,
        vec![255, 183, 182]
    );
}

/// 1 / absmax overflows to +inf for absmax <= 2**-128 (f32's largest finite value is just under
/// 2**128). Block [2**-127, -2**-128, 0]: 1 / 2**-127 = 2**127 is finite, z = [1, -0.5, 0] ->
/// 255, 35 (map -0.50078125, 0xbf003333), 131 (zero's code, as in `dynamic_golden`).
/// Block [2**-128, -2**-129, 0]: z = [inf, -inf, 0 * inf = NaN] -> 255, 0, 0 (saturated; NaN
/// takes code 0), as bitsandbytes gives.
#[test]
fn dynamic_golden_reciprocal_overflow() {
    let x = [0x0040_0000, 0x8020_0000, 0].map(f32::from_bits); // 2**-127, -2**-128, 0
    let (codes, absmax) = quantize_dynamic(&x, 0.0, 256).unwrap();
    assert_eq!(codes, vec![255, 35, 131]);
    assert_eq!(bits(&absmax), vec![0x0040_0000]);
    assert_eq!(dynamic_map()[35].to_bits(), 0xbf00_3333);
    let x = [0x0020_0000, 0x8010_0000, 0].map(f32::from_bits); // 2**-128, -2**-129, 0
    let (codes, absmax) = quantize_dynamic(&x, 0.0, 256).unwrap();
    assert_eq!(codes, vec![255, 0, 0]);
    assert_eq!(bits(&absmax), vec![0x0020_0000]);
}

/// LLM.int8 rows of a 2x4 float16 matrix, `q = round_half_even(x * ((1 / SCB) * 127))`:
/// row 0 [127, 0.5, -1.5, 2.5]: SCB 127, scale (1 / 127) * 127 = 1.0 exactly in f32, so 0.5,
///   -1.5 and 2.5 are ties: 0, -2, 2 (half to even; half away from zero would give 1, -2, 3);
/// row 1 [1, -0.5, 0.25, 0]: SCB 1, scale 127: 63.5 and -63.5 are ties -> 64, -64; 31.75 -> 32.
#[test]
fn int8_golden_ties_round_half_even() {
    let x = f16s(&[127.0, 0.5, -1.5, 2.5, 1.0, -0.5, 0.25, 0.0]);
    assert_eq!(
        x,
        vec![0x57f0, 0x3800, 0xbe00, 0x4100, 0x3c00, 0xb800, 0x3400, 0x0000]
    );
    let mut q = vec![0i8; 8];
    let mut scb = vec![0f32; 2];
    quantize_int8_rows(&x, 2, 4, &mut q, &mut scb).unwrap();
    assert_eq!(scb, vec![127.0, 1.0]);
    assert_eq!(q, vec![127, 0, -2, 2, 127, -64, 32, 0]);
    let mut back = vec![0f32; 8];
    dequantize_int8_rows(&q, &scb, 4, &mut back).unwrap();
    assert_eq!(back[..4], [127.0, 0.0, -2.0, 2.0]);
    assert_eq!(back[5], -64.0 / 127.0);

    // The same rows three times over (2x12): whole groups of 8 take the vector path where
    // there is one, the rest the scalar tail; both round half to even.
    let wide: Vec<u16> = [&x[..4], &x[..4], &x[..4], &x[4..], &x[4..], &x[4..]].concat();
    let mut q = vec![0i8; 24];
    quantize_int8_rows(&wide, 2, 12, &mut q, &mut scb).unwrap();
    assert_eq!(scb, vec![127.0, 1.0]);
    assert_eq!(
        q,
        [[127, 0, -2, 2]; 3]
            .concat()
            .into_iter()
            .chain([[127, -64, 32, 0]; 3].concat())
            .collect::<Vec<i8>>()
    );
}

/// Empty input is fine for every function (nothing to do), with a valid blocksize.
#[test]
fn empty_inputs() {
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        assert!(quantize_4bit(
            Floats::F32(&[]),
            64,
            qt,
            Nibble4Layout::HighFirst,
            &mut [],
            &mut []
        )
        .is_ok());
        assert!(dequantize_4bit(
            &[],
            &[],
            64,
            qt,
            Nibble4Layout::HighFirst,
            FloatsMut::Bf16(&mut [])
        )
        .is_ok());
        assert!(quantize_4bit(
            Floats::F32(&[]),
            0,
            qt,
            Nibble4Layout::HighFirst,
            &mut [],
            &mut []
        )
        .is_err());
    }
    assert_eq!(quantize_dynamic(&[], 0.0, 256).unwrap(), (vec![], vec![]));
    assert!(dequantize_dynamic(&[], &[], 0.0, 256).unwrap().is_empty());
    assert!(quantize_int8_rows(&[], 0, 0, &mut [], &mut []).is_ok());
    let mut scb = [f32::NAN; 3];
    quantize_int8_rows(&[], 3, 0, &mut [], &mut scb).unwrap();
    assert_eq!(scb, [0.0; 3]);
}

/// `rows * cols` overflows `usize` here; the sizes cannot match, so this must be an `Err`.
#[test]
fn int8_huge_dimensions_are_an_error_not_a_panic() {
    assert!(quantize_int8_rows(&[], usize::MAX, 2, &mut [], &mut []).is_err());
    assert!(dequantize_int8_rows(&[], &[0.0; 2], usize::MAX, &mut []).is_err());
}

// ------------------------------------------------------------------------------------------
// robustness properties: any input gives Ok or Err as specified, never a panic

/// Valid blocksizes, invalid ones (0, 1, 3, 16, 8192, non powers of two, huge), and any usize.
fn blocksize() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => prop::sample::select(BLOCKSIZES.to_vec()),
        3 => prop::sample::select(vec![0usize, 1, 2, 3, 16, 31, 33, 48, 96, 100, 3000, 8192, 1 << 20, usize::MAX]),
        1 => any::<usize>(),
    ]
}

fn is_valid_blocksize(bs: usize) -> bool {
    BLOCKSIZES.contains(&bs)
}

/// Finite floats of every class (normal, subnormal, +-0) and ordinary magnitudes.
fn finite_f32() -> impl Strategy<Value = f32> {
    use prop::num::f32 as f;
    prop_oneof![
        4 => -1e3f32..1e3,
        1 => f::POSITIVE | f::NEGATIVE | f::NORMAL | f::SUBNORMAL | f::ZERO,
    ]
}

fn non_finite_f32() -> impl Strategy<Value = f32> {
    prop::sample::select(vec![
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::from_bits(0x7f80_0001), // signalling NaN
        f32::from_bits(0xffc0_1234),
    ])
}

/// Float values, sometimes with a NaN or infinity planted somewhere.
fn values(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    (
        prop::collection::vec(finite_f32(), 0..max_len),
        prop::option::weighted(0.3, (any::<prop::sample::Index>(), non_finite_f32())),
    )
        .prop_map(|(mut v, bad)| {
            if let (Some((i, b)), false) = (bad, v.is_empty()) {
                let k = i.index(v.len());
                v[k] = b;
            }
            v
        })
}

/// Length `exact` moved by `delta` (never below zero).
fn adjust(exact: usize, delta: i64) -> usize {
    (exact as i64 + delta).max(0) as usize
}

/// How a test input is held: f32, bf16 or f16 (converted from the drawn f32 values).
#[derive(Debug, Clone, Copy)]
enum Kind {
    F32,
    Bf16,
    F16,
}

fn want_is_nan(kind: Kind, bits: u32) -> bool {
    match kind {
        Kind::F32 => f32::from_bits(bits).is_nan(),
        Kind::Bf16 => half::bf16::from_bits(bits as u16).is_nan(),
        Kind::F16 => half::f16::from_bits(bits as u16).is_nan(),
    }
}

fn kind() -> impl Strategy<Value = Kind> {
    prop::sample::select(vec![Kind::F32, Kind::Bf16, Kind::F16])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    /// quantize_4bit: Ok exactly when the blocksize is valid, both output buffers have the
    /// required sizes and every input is finite; then absmax holds each block's max |x| (the
    /// partial last block clamped at 1e-38). Otherwise an Err naming the problem.
    #[test]
    fn quantize_4bit_ok_or_err_never_panics(
        xs in values(700),
        bs in blocksize(),
        kind in kind(),
        dp in prop_oneof![3 => Just(0i64), 1 => -2i64..=2],
        da in prop_oneof![3 => Just(0i64), 1 => -2i64..=2],
        nf4 in any::<bool>(),
    ) {
        let qt = if nf4 { QuantType::Nf4 } else { QuantType::Fp4 };
        let bf: Vec<u16> = xs.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        let hf: Vec<u16> = xs.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
        // The values the codec sees, in f32.
        let seen: Vec<f32> = match kind {
            Kind::F32 => xs.clone(),
            Kind::Bf16 => bf.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect(),
            Kind::F16 => hf.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect(),
        };
        let input = match kind {
            Kind::F32 => Floats::F32(&xs),
            Kind::Bf16 => Floats::Bf16(&bf),
            Kind::F16 => Floats::F16(&hf),
        };
        let n = xs.len();
        let valid_bs = is_valid_blocksize(bs);
        let nb = if bs == 0 { 0 } else { n.div_ceil(bs) };
        let mut packed = vec![0xAAu8; adjust(packed_len(n), dp)];
        let mut absmax = vec![f32::NAN; adjust(nb, da)];
        let sizes_ok = packed.len() == packed_len(n) && absmax.len() == nb;
        let finite = seen.iter().all(|v| v.is_finite());
        let result = quantize_4bit(input, bs, qt, Nibble4Layout::HighFirst, &mut packed, &mut absmax);
        match result {
            Ok(()) => {
                prop_assert!(valid_bs && sizes_ok && finite, "Ok for bs {bs}, sizes_ok {sizes_ok}, finite {finite}");
                for (b, &am) in absmax.iter().enumerate() {
                    let block = &seen[b * bs..n.min((b + 1) * bs)];
                    let m = block.iter().fold(0f32, |acc, v| acc.max(v.abs()));
                    let want = if block.len() < bs { m.max(f32::from_bits(CLAMP_BITS)) } else { m };
                    prop_assert_eq!(am.to_bits(), want.to_bits(), "block {}", b);
                }
            }
            Err(e) => {
                prop_assert!(!(valid_bs && sizes_ok && finite), "Err for valid input: {e}");
                let msg = e.to_string();
                match (valid_bs, sizes_ok, finite) {
                    (false, true, true) => prop_assert!(msg.contains("blocksize"), "{msg}"),
                    (true, false, true) => prop_assert!(msg.contains("sizes"), "{msg}"),
                    (true, true, false) => prop_assert!(msg.contains("NaN or infinite"), "{msg}"),
                    _ => {}
                }
            }
        }
    }

    /// dequantize_4bit: Ok exactly when the blocksize is valid and packed / absmax have the sizes
    /// `out` needs (any bytes and any absmax, NaN included, are accepted); then every output is
    /// `code[nibble] * absmax[block]` in f32, rounded to nearest even for bf16 / f16.
    #[test]
    fn dequantize_4bit_ok_or_err_never_panics(
        n in 0usize..900,
        bs in blocksize(),
        kind in kind(),
        dp in prop_oneof![3 => Just(0i64), 1 => -2i64..=2],
        da in prop_oneof![3 => Just(0i64), 1 => -2i64..=2],
        seed_bytes in prop::collection::vec(any::<u8>(), 1..64),
        scale in prop_oneof![4 => finite_f32(), 1 => non_finite_f32()],
        nf4 in any::<bool>(),
    ) {
        let qt = if nf4 { QuantType::Nf4 } else { QuantType::Fp4 };
        let nb = if bs == 0 { 0 } else { n.div_ceil(bs) };
        let packed: Vec<u8> = (0..adjust(packed_len(n), dp)).map(|i| seed_bytes[i % seed_bytes.len()]).collect();
        let absmax: Vec<f32> = (0..adjust(nb, da)).map(|i| scale * (1 + i % 3) as f32).collect();
        let expected = is_valid_blocksize(bs) && packed.len() == packed_len(n) && absmax.len() == nb;
        let mut out32 = vec![0f32; n];
        let mut out16 = vec![0u16; n];
        let out = match kind {
            Kind::F32 => FloatsMut::F32(&mut out32),
            Kind::Bf16 => FloatsMut::Bf16(&mut out16),
            Kind::F16 => FloatsMut::F16(&mut out16),
        };
        let result = dequantize_4bit(&packed, &absmax, bs, qt, Nibble4Layout::HighFirst, out);
        prop_assert_eq!(result.is_ok(), expected, "{:?}", result.err().map(|e| e.to_string()));
        if expected {
            let code = qt.code();
            for i in 0..n {
                let byte = packed[i / 2];
                let c = if i % 2 == 0 { byte >> 4 } else { byte & 0xF };
                let want = code[c as usize] * absmax[i / bs];
                // f32 as is; bf16 and f16 rounded to nearest even (NaN: any NaN).
                let (got, want, nan) = match kind {
                    Kind::F32 => (out32[i].to_bits(), want.to_bits(), out32[i].is_nan()),
                    Kind::Bf16 => (out16[i] as u32, half::bf16::from_f32(want).to_bits() as u32, half::bf16::from_bits(out16[i]).is_nan()),
                    Kind::F16 => (out16[i] as u32, half::f16::from_f32(want).to_bits() as u32, half::f16::from_bits(out16[i]).is_nan()),
                };
                prop_assert!(got == want || (nan && want_is_nan(kind, want)), "{i}: {got:#x} vs {want:#x}");
            }
        }
    }

    /// quantize_dynamic: Ok exactly when the blocksize is nonzero and every value is finite (any
    /// offset, even NaN, is accepted); then one code per value and one absmax per block, and the
    /// result dequantizes.
    #[test]
    fn quantize_dynamic_ok_or_err_never_panics(
        xs in values(700),
        offset in prop_oneof![6 => finite_f32(), 1 => non_finite_f32()],
        bs in prop_oneof![3 => prop::sample::select(vec![1usize, 2, 7, 64, 256, 4096]), 1 => blocksize()],
    ) {
        let expected = bs != 0 && xs.iter().all(|v| v.is_finite());
        match quantize_dynamic(&xs, offset, bs) {
            Ok((codes, absmax)) => {
                prop_assert!(expected);
                prop_assert_eq!(codes.len(), xs.len());
                prop_assert_eq!(absmax.len(), xs.len().div_ceil(bs));
                let back = dequantize_dynamic(&codes, &absmax, offset, bs);
                prop_assert!(back.is_ok());
                prop_assert_eq!(back.unwrap().len(), xs.len());
            }
            Err(e) => prop_assert!(!expected, "Err for valid input: {}", e),
        }
    }

    /// dequantize_dynamic: Ok exactly when the blocksize is nonzero and absmax has one entry per
    /// block of codes.
    #[test]
    fn dequantize_dynamic_ok_or_err_never_panics(
        codes in prop::collection::vec(any::<u8>(), 0..600),
        bs in blocksize(),
        da in prop_oneof![3 => Just(0i64), 1 => -2i64..=2],
        scale in finite_f32(),
        offset in finite_f32(),
    ) {
        let nb = if bs == 0 { 0 } else { codes.len().div_ceil(bs) };
        let absmax = vec![scale; adjust(nb, da)];
        let expected = bs != 0 && absmax.len() == nb;
        let result = dequantize_dynamic(&codes, &absmax, offset, bs);
        prop_assert_eq!(result.is_ok(), expected);
        if let Ok(v) = result {
            prop_assert_eq!(v.len(), codes.len());
        }
    }

    /// quantize_int8_rows: Ok exactly when input and q hold rows x cols values, scb holds rows,
    /// and every value is finite (or there are no columns); then SCB is each row's max |x| and
    /// every code is in [-127, 127] with the sign of x.
    #[test]
    fn quantize_int8_rows_ok_or_err_never_panics(
        rows in 0usize..12,
        cols in 0usize..40,
        di in prop_oneof![3 => Just(0i64), 1 => -2i64..=2],
        dq in prop_oneof![3 => Just(0i64), 1 => -2i64..=2],
        ds in prop_oneof![3 => Just(0i64), 1 => -1i64..=1],
        xs in values(600),
    ) {
        let input: Vec<u16> = (0..adjust(rows * cols, di))
            .map(|i| half::f16::from_f32(if xs.is_empty() { 1.0 } else { xs[i % xs.len()] }).to_bits())
            .collect();
        let mut q = vec![0i8; adjust(rows * cols, dq)];
        let mut scb = vec![f32::NAN; adjust(rows, ds)];
        let sizes_ok = input.len() == rows * cols && q.len() == rows * cols && scb.len() == rows;
        let finite = input.iter().all(|&b| half::f16::from_bits(b).is_finite());
        let expected = sizes_ok && (cols == 0 || finite);
        match quantize_int8_rows(&input, rows, cols, &mut q, &mut scb) {
            Ok(()) => {
                prop_assert!(expected);
                for r in 0..rows {
                    let row: Vec<f32> = input[r * cols..(r + 1) * cols].iter().map(|&b| half::f16::from_bits(b).to_f32()).collect();
                    let m = row.iter().fold(0f32, |acc, v| acc.max(v.abs()));
                    prop_assert_eq!(scb[r], m);
                    for (c, v) in row.iter().enumerate() {
                        let k = q[r * cols + c];
                        prop_assert!((-127..=127).contains(&k));
                        prop_assert!(k == 0 || (k > 0) == (*v > 0.0), "{v} -> {k}");
                    }
                }
            }
            Err(e) => prop_assert!(!expected, "Err for valid input: {}", e),
        }
    }

    /// dequantize_int8_rows: Ok exactly when cols > 0 and q / out / scb agree on the shape.
    #[test]
    fn dequantize_int8_rows_ok_or_err_never_panics(
        rows in 0usize..12,
        cols in 0usize..40,
        dq in prop_oneof![3 => Just(0i64), 1 => -2i64..=2],
        ds in prop_oneof![3 => Just(0i64), 1 => -1i64..=1],
        d_out in prop_oneof![3 => Just(0i64), 1 => -2i64..=2],
        k in any::<i8>(),
        s in finite_f32(),
    ) {
        let q = vec![k; adjust(rows * cols, dq)];
        let scb = vec![s; adjust(rows, ds)];
        let mut out = vec![0f32; adjust(rows * cols, d_out)];
        let expected = cols != 0 && q.len() == out.len() && q.len() == scb.len() * cols;
        let result = dequantize_int8_rows(&q, &scb, cols, &mut out);
        prop_assert_eq!(result.is_ok(), expected);
        if expected {
            prop_assert!(out.iter().all(|&v| v.to_bits() == (k as f32 * s / 127.0).to_bits()));
        }
    }
}
