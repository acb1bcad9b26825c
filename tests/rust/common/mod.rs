//! Helpers shared by the codec test files: 4-bit quantize/dequantize of f32 slices with
//! bitsandbytes' layout, unwrapping errors.

use quantsave::codec::{
    dequantize_4bit, num_blocks, packed_len, quantize_4bit, Floats, FloatsMut, Nibble4Layout,
    QuantType,
};

/// Packed bytes and absmax of `x` quantized with blocksize `bs`.
pub fn q4(x: &[f32], bs: usize, qt: QuantType) -> (Vec<u8>, Vec<f32>) {
    let mut p = vec![0u8; packed_len(x.len())];
    let mut a = vec![0f32; num_blocks(x.len(), bs)];
    quantize_4bit(
        Floats::F32(x),
        bs,
        qt,
        Nibble4Layout::HighFirst,
        &mut p,
        &mut a,
    )
    .unwrap();
    (p, a)
}

/// The `n` values `p` and `a` dequantize to, in f32.
pub fn dq4(p: &[u8], a: &[f32], n: usize, bs: usize, qt: QuantType) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize_4bit(
        p,
        a,
        bs,
        qt,
        Nibble4Layout::HighFirst,
        FloatsMut::F32(&mut out),
    )
    .unwrap();
    out
}
