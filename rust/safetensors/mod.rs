//! The safetensors container: header layout (`header`), writing shards (`write`) and
//! reading/validating them (`read`); `bench_strategies` keeps the losing write strategies for
//! the benches. Knows nothing about models, quantization or Python.

pub mod bench_strategies;
pub mod header;
pub mod read;
pub mod write;

pub use header::{layout_specs, Layout, TensorSpec, TensorView, MAX_HEADER_SIZE};
pub use read::{map_file, parse_header, read_header, Header, MappedFile, TensorInfo};
pub use write::{
    sha256_file, sync_dir, write_bytes_atomic, write_shards, write_shards_hashed, ShardSpec,
    StreamWriter, WriteOptions,
};
