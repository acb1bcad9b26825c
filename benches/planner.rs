//! Planning and header speed: `plan_shards` over 100k entries (plain and grouped), and building
//! (`layout`) and parsing (`parse_header`) the header of a 10k-tensor file.
//!
//! `cargo bench --bench planner` (add `-- --quick` for a fast check).

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quantsave::plan::{plan_shards, PlanEntry};
use quantsave::safetensors::header::layout;
use quantsave::safetensors::{parse_header, TensorView};
use quantsave::Dtype;

const ENTRIES: usize = 100_000;
const HEADER_TENSORS: usize = 10_000;

/// Deterministic sizes between 1 KB and about 64 MB.
fn sizes(n: usize) -> Vec<u64> {
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            1_000 + s % (64 << 20)
        })
        .collect()
}

fn bench_plan(c: &mut Criterion) {
    let sizes = sizes(ENTRIES);
    let plain: Vec<PlanEntry> = sizes
        .iter()
        .map(|&size| PlanEntry { size, group: None })
        .collect();
    // Quantized weights: (qweight, scales, zeros) triples share a group; every tenth tensor is a
    // plain one (norms, biases).
    let grouped: Vec<PlanEntry> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| PlanEntry {
            size,
            group: (i % 10 != 9).then_some((i / 3) as u64),
        })
        .collect();
    let max = 5_000_000_000;
    let mut group = c.benchmark_group("plan_shards_100k");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(ENTRIES as u64));
    group.bench_function("ungrouped", |b| {
        b.iter(|| black_box(plan_shards(black_box(&plain), max)))
    });
    group.bench_function("grouped", |b| {
        b.iter(|| black_box(plan_shards(black_box(&grouped), max)))
    });
    group.finish();
}

fn bench_header(c: &mut Criterion) {
    let buf = vec![0u8; 4096 * 2];
    let tensors: Vec<TensorView<'_>> = (0..HEADER_TENSORS)
        .map(|i| {
            let (dtype, shape): (Dtype, Vec<u64>) = match i % 4 {
                0 => (Dtype::I32, vec![64, 16]),
                1 => (Dtype::BF16, vec![64, 2]),
                2 => (Dtype::BF16, vec![64, 2]),
                _ => (Dtype::F16, vec![4096]),
            };
            let len = (dtype.bits() / 8 * shape.iter().product::<u64>()) as usize;
            TensorView {
                name: format!(
                    "model.layers.{}.self_attn.q_proj.{}",
                    i / 4,
                    ["qweight", "scales", "qzeros", "bias"][i % 4]
                ),
                dtype,
                shape,
                data: &buf[..len],
            }
        })
        .collect();
    let metadata = Some([("format".to_string(), "pt".to_string())].into());
    let lay = layout(&tensors, metadata.as_ref()).expect("layout");
    let json = lay.header[8..].to_vec();
    let file_size = lay.file_size;
    let path = Path::new("bench.safetensors");

    let mut group = c.benchmark_group("header_10k_tensors");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(HEADER_TENSORS as u64));
    group.bench_function("layout", |b| {
        b.iter(|| black_box(layout(black_box(&tensors), metadata.as_ref()).expect("layout")))
    });
    group.bench_function("parse_header", |b| {
        b.iter(|| black_box(parse_header(path, black_box(&json), file_size).expect("parse_header")))
    });
    group.finish();
}

criterion_group!(benches, bench_plan, bench_header);
criterion_main!(benches);
