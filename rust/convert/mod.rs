//! Streaming conversion of float safetensors checkpoints into bitsandbytes checkpoints.
//!
//! The caller (the Python layer, which knows models and configs) describes the output: the
//! shards with their tensor specs, and one [`Op`] per produced tensor group, each naming its
//! source tensor by file and name. [`run()`] maps the sources (read-only, never copied), cuts
//! every op into chunks of a bounded number of elements, and processes the chunks in parallel:
//! each chunk is read from the map, quantized into a small buffer and written at its place in
//! the output file (`pwrite` through [`StreamWriter`]), after which its source pages are
//! dropped from the process (`MADV_DONTNEED`; they stay in the page cache). Memory therefore
//! stays at a few chunks per thread whatever the checkpoint size, and checkpoints larger than
//! RAM stream from disk. Every output file is committed (renamed into place) only when all of
//! its tensors are complete; on error none is, and the temporaries are removed.
//!
//! Results are the codec's, bit for bit, as if each tensor were quantized whole: chunks start
//! on multiples of `blocksize * 256` elements, so 4-bit blocks, packed bytes and the nested
//! (double-quant) blocks of absmax never straddle chunks.
//!
//! The module map (every public item is re-exported here, so paths stay
//! `quantsave::convert::X`):
//! - `spec`: what the caller describes ([`ConvertSpec`], [`Op`], [`ShardOut`], ...);
//! - `source`: source tensors resolved against their maps and read as floats;
//! - `plan`: ops checked against their sources and output headers, and cut into chunks;
//! - `run`: the parallel execution of the chunks, the writing, and [`absmax_4bit`].
//!
//! [`StreamWriter`]: crate::safetensors::StreamWriter

mod plan;
mod run;
mod source;
mod spec;

pub use run::{absmax_4bit, run};
pub use spec::{ConvertSpec, Nested, Op, ShardOut, Source, Target, NESTED_BLOCKSIZE};
