//! Writer and reader throughput: `write_shards` of 256 MiB (64 tensors of 4 MiB) as one shard
//! or four, per strategy (the production writer against the losing ones kept in
//! `safetensors::bench_strategies`), fsync off and once on; and `map_file` plus a pass over
//! every tensor.
//!
//! `cargo bench --bench writer` (add `-- --quick` for a fast check).

use std::fs;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use quantsave::safetensors::bench_strategies::{write_shards_with, StrategyOptions, WriteStrategy};
use quantsave::safetensors::{map_file, write_shards, ShardSpec, TensorView, WriteOptions};
use quantsave::Dtype;

const TENSORS: usize = 64;
const TENSOR_BYTES: usize = 4 << 20;
const TOTAL_BYTES: u64 = (TENSORS * TENSOR_BYTES) as u64;

fn make_data() -> Vec<Vec<u8>> {
    (0..TENSORS)
        .map(|i| {
            let mut v = vec![0u8; TENSOR_BYTES];
            for (k, b) in v.iter_mut().enumerate() {
                *b = (k as u8) ^ (i as u8);
            }
            v
        })
        .collect()
}

/// The 64 tensors spread over `count` shard files in `dir`.
fn specs<'a>(dir: &Path, data: &'a [Vec<u8>], count: usize) -> Vec<ShardSpec<'a>> {
    let per = data.len().div_ceil(count);
    data.chunks(per)
        .enumerate()
        .map(|(s, chunk)| ShardSpec {
            path: dir.join(format!("model-{:05}-of-{count:05}.safetensors", s + 1)),
            tensors: chunk
                .iter()
                .enumerate()
                .map(|(k, d)| TensorView {
                    name: format!("model.layers.{}.mlp.weight", s * per + k),
                    dtype: Dtype::BF16,
                    shape: vec![1024, (TENSOR_BYTES / 2 / 1024) as u64],
                    data: d,
                })
                .collect(),
            metadata: Some([("format".to_string(), "pt".to_string())].into()),
        })
        .collect()
}

fn remove_all(shards: &[ShardSpec<'_>]) {
    for s in shards {
        let _ = fs::remove_file(&s.path);
    }
}

fn bench_write(c: &mut Criterion) {
    let data = make_data();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = c.benchmark_group("write_256MiB");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes(TOTAL_BYTES));
    let cases = [
        ("write", WriteStrategy::Write, false, 1),
        ("write", WriteStrategy::Write, false, 4),
        ("pwrite", WriteStrategy::Pwrite, false, 1),
        ("pwrite", WriteStrategy::Pwrite, false, 4),
        ("mmap", WriteStrategy::Mmap, false, 1),
        ("mmap", WriteStrategy::Mmap, false, 4),
        ("write_fsync", WriteStrategy::Write, true, 1),
    ];
    for (label, strategy, fsync, count) in cases {
        let opts = StrategyOptions {
            fsync,
            strategy,
            ..StrategyOptions::default()
        };
        let shards = specs(dir.path(), &data, count);
        group.bench_function(BenchmarkId::new(label, format!("{count}_shards")), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // Deleting last round's files (freeing their pages) is not part of a write.
                    remove_all(&shards);
                    let start = Instant::now();
                    black_box(write_shards_with(&shards, &opts).expect("write_shards"));
                    total += start.elapsed();
                }
                total
            })
        });
        remove_all(&shards);
    }
    group.finish();
}

fn bench_read(c: &mut Criterion) {
    let data = make_data();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = {
        let shards = specs(dir.path(), &data, 1);
        write_shards(&shards, &WriteOptions::default()).expect("write_shards");
        shards[0].path.clone()
    };
    drop(data);
    let mut group = c.benchmark_group("read_256MiB");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(TOTAL_BYTES));
    group.bench_function("map_file_and_sum_all_tensors", |b| {
        b.iter(|| {
            let m = map_file(&path).expect("map_file");
            let mut acc = 0u64;
            for t in &m.header.tensors {
                let bytes = m.tensor_bytes(t);
                for w in bytes.chunks_exact(8) {
                    acc = acc.wrapping_add(u64::from_le_bytes(w.try_into().unwrap_or([0; 8])));
                }
            }
            black_box(acc)
        })
    });
    group.finish();
}

criterion_group!(benches, bench_write, bench_read);
criterion_main!(benches);
