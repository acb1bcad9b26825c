//! quantsave's Rust core: the 4-bit/8-bit codecs, the safetensors container (write, read,
//! validate), shard planning and checkpoint file names. A plain library with no Python in it;
//! the PyO3 binding lives in `python` behind the `python` cargo feature.

pub mod codec;
pub mod convert;
pub mod dtype;
pub mod error;
pub mod names;
pub mod plan;
pub mod safetensors;
mod sys;

#[cfg(feature = "python")]
mod python;

pub use dtype::Dtype;
pub use error::{Error, Result};
