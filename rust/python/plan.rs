//! Bindings of shard planning and sizes: `plan_shards`, `parse_size` and `dtype_nbytes` (the
//! byte size of a tensor, from the core's one dtype table).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::safetensors::parse_dtype;
use crate::plan::{self, PlanEntry};

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(plan_shards, m)?)?;
    m.add_function(wrap_pyfunction!(parse_size, m)?)?;
    m.add_function(wrap_pyfunction!(dtype_nbytes, m)?)?;
    Ok(())
}

/// Plans shards: `sizes[i]` and `groups[i]` (None or a group id) per tensor in state-dict order.
/// Returns `(shards as lists of indices, total_size)`.
#[pyfunction]
fn plan_shards(
    sizes: Vec<u64>,
    groups: Vec<Option<u64>>,
    max_shard_size: u64,
) -> PyResult<(Vec<Vec<usize>>, u64)> {
    if sizes.len() != groups.len() {
        return Err(PyValueError::new_err(
            "sizes and groups must have the same length",
        ));
    }
    let entries: Vec<PlanEntry> = sizes
        .into_iter()
        .zip(groups)
        .map(|(size, group)| PlanEntry { size, group })
        .collect();
    let p = plan::plan_shards(&entries, max_shard_size);
    Ok((p.shards, p.total_size))
}

/// Bytes of a size text: `"5GB"`, `"1.5GiB"`, `"1000"`.
#[pyfunction]
fn parse_size(text: &str) -> PyResult<u64> {
    Ok(plan::parse_size(text)?)
}

/// Bytes of the data of a tensor of `dtype` (a safetensors name such as `"BF16"`) and `shape`.
/// ValueError for an unknown dtype, a size past 2**64 - 1, or a partial byte (an odd count of
/// `F4`).
#[pyfunction]
fn dtype_nbytes(dtype: &str, shape: Vec<u64>) -> PyResult<u64> {
    let d = parse_dtype(dtype)?;
    d.shape_bytes(&shape).ok_or_else(|| {
        PyValueError::new_err(format!(
            "shape {shape:?} of {d} has no byte size (overflow or a partial byte)"
        ))
    })
}
