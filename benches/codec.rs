//! Codec throughput: nf4/fp4 quantize and dequantize of bf16 4096x4096 and 8192x8192 weights,
//! int8 row quantization.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quantsave::codec::{
    dequantize_4bit, num_blocks, packed_len, quantize_4bit, quantize_int8_rows, Floats, FloatsMut,
    Nibble4Layout, QuantType,
};

fn weights(n: usize) -> Vec<u16> {
    // A deterministic spread of bf16 values in about [-4, 4].
    (0..n)
        .map(|i| {
            let v = ((i as u64).wrapping_mul(2654435761) % 65536) as f32 / 8192.0 - 4.0;
            half::bf16::from_f32(v).to_bits()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    for side in [4096, 8192] {
        bench_side(c, side);
    }
}

fn bench_side(c: &mut Criterion, side: usize) {
    let n = side * side;
    let w = weights(n);
    let mut g = c.benchmark_group(format!("codec_{side}x{side}_bf16"));
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    let mut packed = vec![0u8; packed_len(n)];
    let mut absmax = vec![0f32; num_blocks(n, 64)];
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        g.bench_function(format!("quantize_{}", qt.name()), |b| {
            b.iter(|| {
                quantize_4bit(
                    Floats::Bf16(&w),
                    64,
                    qt,
                    Nibble4Layout::HighFirst,
                    &mut packed,
                    &mut absmax,
                )
                .unwrap()
            })
        });
        let mut out = vec![0u16; n];
        g.bench_function(format!("dequantize_{}", qt.name()), |b| {
            b.iter(|| {
                dequantize_4bit(
                    &packed,
                    &absmax,
                    64,
                    qt,
                    Nibble4Layout::HighFirst,
                    FloatsMut::Bf16(&mut out),
                )
                .unwrap()
            })
        });
    }
    let f16: Vec<u16> = w
        .iter()
        .map(|&b| half::f16::from_f32(half::bf16::from_bits(b).to_f32()).to_bits())
        .collect();
    let mut q = vec![0i8; n];
    let mut scb = vec![0f32; side];
    g.bench_function("int8_rows", |b| {
        b.iter(|| quantize_int8_rows(&f16, side, side, &mut q, &mut scb).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
