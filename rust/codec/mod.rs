//! Blockwise quantization codecs, bit-compatible with bitsandbytes on the CPU: 4-bit nf4/fp4
//! (quantize, dequantize, nibble packing), the signed dynamic 8-bit map used to double-quantize
//! absmax, and LLM.int8() row-wise quantization. Pure functions over slices, parallel over
//! blocks with rayon; knows nothing about files or Python.
//!
//! The module map (every item is re-exported here, so paths stay `quantsave::codec::X`):
//! - `tables`: the nf4/fp4 code tables ([`QuantType`]), the dynamic map and its thresholds;
//! - `layout`: how codes share bytes ([`Nibble4Layout`]) and the block geometry;
//! - `floats`: the float element views in ([`Floats`]) and out ([`FloatsMut`]), and casts ([`FloatBuf`]);
//! - `quant4`: 4-bit quantization, the portable path and the dispatch to `avx2`;
//! - `avx2`: the AVX2/F16C kernels (x86_64 only, behind runtime detection);
//! - `dequant4`: 4-bit dequantization;
//! - `dynamic`: blockwise quantization with the dynamic map (double quant of absmax);
//! - `int8`: LLM.int8() row-wise quantization.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod dequant4;
mod dynamic;
mod floats;
mod int8;
mod layout;
mod quant4;
mod tables;

pub use dequant4::dequantize_4bit;
pub use dynamic::{dequantize_dynamic, quantize_dynamic};
pub use floats::{FloatBuf, Floats, FloatsMut};
pub use int8::{dequantize_int8_rows, quantize_int8_rows};
pub use layout::{num_blocks, packed_len, Nibble4Layout};
pub use quant4::{quantize_4bit, quantize_4bit_portable};
pub use tables::{dynamic_map, QuantType};
