//! Bindings of the codecs: blockwise 4-bit (bitsandbytes nf4/fp4) quantization into caller
//! buffers and back, the nested (dynamic-map) quantization of absmax, the code tables, and
//! LLM.int8() rows. Inputs and outputs are byte views of Python buffers, never copied.

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::buffer::{cast, cast_mut, view_bytes, view_bytes_mut};
use super::errors::run_detached;
use crate::codec::{self, Floats, FloatsMut, Nibble4Layout, QuantType};

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_dynamic, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_dynamic, m)?)?;
    m.add_function(wrap_pyfunction!(dynamic_map, m)?)?;
    m.add_function(wrap_pyfunction!(code_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_int8_rows, m)?)?;
    Ok(())
}

/// Float input of a safetensors dtype name (`F32`, `BF16`, `F16`).
fn floats<'a>(bytes: &'a [u8], dtype: &str) -> PyResult<Floats<'a>> {
    Ok(match dtype {
        "F32" => Floats::F32(cast(bytes, "input")?),
        "BF16" => Floats::Bf16(cast(bytes, "input")?),
        "F16" => Floats::F16(cast(bytes, "input")?),
        other => {
            return Err(PyValueError::new_err(format!(
                "dtype must be F32, BF16 or F16, got {other:?}"
            )))
        }
    })
}

/// Blockwise 4-bit quantization into preallocated `packed` (uint8) and `absmax` (float32).
#[pyfunction]
fn quantize_4bit(
    py: Python<'_>,
    input: PyBuffer<u8>,
    dtype: &str,
    packed: PyBuffer<u8>,
    absmax: PyBuffer<u8>,
    blocksize: usize,
    quant_type: &str,
) -> PyResult<()> {
    let qt: QuantType = quant_type.parse()?;
    let x = floats(view_bytes(&input)?, dtype)?;
    let p = view_bytes_mut(&packed)?;
    let a: &mut [f32] = cast_mut(view_bytes_mut(&absmax)?, "absmax")?;
    run_detached(py, || {
        codec::quantize_4bit(x, blocksize, qt, Nibble4Layout::HighFirst, p, a)
    })
}

/// Dequantizes packed 4-bit codes into a preallocated `out` of `out_dtype`.
#[pyfunction]
fn dequantize_4bit(
    py: Python<'_>,
    packed: PyBuffer<u8>,
    absmax: PyBuffer<u8>,
    out: PyBuffer<u8>,
    out_dtype: &str,
    blocksize: usize,
    quant_type: &str,
) -> PyResult<()> {
    let qt: QuantType = quant_type.parse()?;
    let p = view_bytes(&packed)?;
    let a: &[f32] = cast(view_bytes(&absmax)?, "absmax")?;
    let o = view_bytes_mut(&out)?;
    let target = match out_dtype {
        "F32" => FloatsMut::F32(cast_mut(o, "out")?),
        "BF16" => FloatsMut::Bf16(cast_mut(o, "out")?),
        "F16" => FloatsMut::F16(cast_mut(o, "out")?),
        other => {
            return Err(PyValueError::new_err(format!(
                "out_dtype must be F32, BF16 or F16, got {other:?}"
            )))
        }
    };
    run_detached(py, || {
        codec::dequantize_4bit(p, a, blocksize, qt, Nibble4Layout::HighFirst, target)
    })
}

/// Nested quantization of float32 `values - offset` with the dynamic map: `(codes, absmax)` bytes.
#[pyfunction]
fn quantize_dynamic(
    py: Python<'_>,
    values: PyBuffer<u8>,
    offset: f32,
    blocksize: usize,
) -> PyResult<(Vec<u8>, Vec<u8>)> {
    let v: &[f32] = cast(view_bytes(&values)?, "values")?;
    let (codes, absmax) = run_detached(py, || codec::quantize_dynamic(v, offset, blocksize))?;
    Ok((codes, bytemuck::cast_slice(&absmax).to_vec()))
}

/// Undoes `quantize_dynamic`: float32 bytes.
#[pyfunction]
fn dequantize_dynamic(
    py: Python<'_>,
    codes: PyBuffer<u8>,
    absmax: PyBuffer<u8>,
    offset: f32,
    blocksize: usize,
) -> PyResult<Vec<u8>> {
    let a: &[f32] = cast(view_bytes(&absmax)?, "absmax")?;
    let c = view_bytes(&codes)?;
    let out = run_detached(py, || codec::dequantize_dynamic(c, a, offset, blocksize))?;
    Ok(bytemuck::cast_slice(&out).to_vec())
}

/// The dynamic map as float32 bytes.
#[pyfunction]
fn dynamic_map() -> Vec<u8> {
    bytemuck::cast_slice(&codec::dynamic_map()).to_vec()
}

/// The 4-bit code table as float32 bytes.
#[pyfunction]
fn code_4bit(quant_type: &str) -> PyResult<Vec<u8>> {
    let qt: QuantType = quant_type.parse()?;
    Ok(bytemuck::cast_slice(&qt.code()).to_vec())
}

/// LLM.int8() row-wise quantization of a float16 matrix into preallocated int8 `q` and float32 `scb`.
#[pyfunction]
fn quantize_int8_rows(
    py: Python<'_>,
    input: PyBuffer<u8>,
    rows: usize,
    cols: usize,
    q: PyBuffer<u8>,
    scb: PyBuffer<u8>,
) -> PyResult<()> {
    let x: &[u16] = cast(view_bytes(&input)?, "input")?;
    let qo: &mut [i8] = cast_mut(view_bytes_mut(&q)?, "q")?;
    let so: &mut [f32] = cast_mut(view_bytes_mut(&scb)?, "scb")?;
    run_detached(py, || codec::quantize_int8_rows(x, rows, cols, qo, so))
}
