//! The description of a conversion that the caller hands in: source files, output shards with
//! their tensors, and one [`Op`] per produced tensor group. Plain data; no file access, and
//! nothing here depends on how the conversion is planned or run.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::codec::QuantType;
use crate::dtype::Dtype;
use crate::safetensors::TensorSpec;

/// Nested blocksize of double quantization (bitsandbytes' fixed 256).
pub const NESTED_BLOCKSIZE: usize = 256;

/// A source tensor: index into [`ConvertSpec::sources`] and its name there.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: usize,
    pub name: String,
    /// Read as this float dtype (F32, BF16 or F16), rounded as torch's `.to(dtype)`, as the
    /// references cast a tensor on load; None (or the source's own dtype) reads it as stored.
    pub cast: Option<Dtype>,
    /// Read as the transpose of its 2-D shape (a GPT-2 style `Conv1D` weight, stored
    /// `[in, out]`, quantized as the `[out, in]` Linear weight it stands for). Quantizing ops only.
    pub transposed: bool,
}

/// An output tensor: index into [`ConvertSpec::shards`] and its name there.
#[derive(Debug, Clone)]
pub struct Target {
    pub shard: usize,
    pub name: String,
}

/// Double quantization of the 4-bit absmax: `absmax - offset` quantized with the dynamic map
/// in blocks of 256 (the `absmax` target then holds the uint8 codes).
#[derive(Debug, Clone)]
pub struct Nested {
    /// `mean(absmax)` of the whole tensor, computed by the caller (see [`absmax_4bit`]).
    ///
    /// [`absmax_4bit`]: super::absmax_4bit
    pub offset: f32,
    /// Float32 absmax of the nested blocks.
    pub nested_absmax: Target,
}

/// How one output tensor group is produced.
#[derive(Debug, Clone)]
pub enum Op {
    /// The source bytes unchanged, or its elements cast (see [`Source::cast`]).
    Copy { src: Source, out: Target },
    /// Fixed bytes (code tables, quant-state JSON).
    Bytes { data: Vec<u8>, out: Target },
    /// bitsandbytes 4-bit: packed codes (uint8, two per byte) and absmax.
    Quant4 {
        src: Source,
        quant_type: QuantType,
        blocksize: usize,
        packed: Target,
        absmax: Target,
        nested: Option<Nested>,
    },
    /// LLM.int8() rows: int8 weight and float32 row absmax (SCB); the source goes through
    /// float16 first, as bitsandbytes does.
    Int8 {
        src: Source,
        rows: usize,
        cols: usize,
        weight: Target,
        scb: Target,
    },
}

/// One output file.
#[derive(Debug, Clone)]
pub struct ShardOut {
    pub path: PathBuf,
    pub tensors: Vec<TensorSpec>,
    pub metadata: Option<BTreeMap<String, String>>,
    /// The temporary file another writer created for `path` (`StreamWriter::create_shared`):
    /// this conversion fills its share of it and leaves the commit to that writer. None: the
    /// conversion creates and commits the file itself.
    pub temp: Option<PathBuf>,
}

/// The whole conversion.
#[derive(Debug, Clone)]
pub struct ConvertSpec {
    pub sources: Vec<PathBuf>,
    pub shards: Vec<ShardOut>,
    pub ops: Vec<Op>,
    /// Elements per chunk (rounded up to whole nested blocks; int8 chunks are whole rows).
    pub chunk_elems: usize,
    pub fsync: bool,
}

impl Default for ConvertSpec {
    fn default() -> Self {
        ConvertSpec {
            sources: Vec::new(),
            shards: Vec::new(),
            ops: Vec::new(),
            chunk_elems: 1 << 22,
            fsync: false,
        }
    }
}
