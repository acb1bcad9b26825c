//! Bindings of the checkpoint file names (`crate::names`): variant, shard and index names,
//! temporaries of atomic writes, and the predicates that recognize shards and temporaries.

use std::ffi::OsString;
use std::path::PathBuf;

use pyo3::prelude::*;

use crate::names;

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(add_variant, m)?)?;
    m.add_function(wrap_pyfunction!(shard_file_names, m)?)?;
    m.add_function(wrap_pyfunction!(index_file_name, m)?)?;
    m.add_function(wrap_pyfunction!(is_shard_name, m)?)?;
    m.add_function(wrap_pyfunction!(is_temp_name, m)?)?;
    m.add_function(wrap_pyfunction!(temp_path, m)?)?;
    Ok(())
}

/// `add_variant_name` with `variant` before its last dot.
#[pyfunction]
#[pyo3(signature = (add_variant_name, variant))]
fn add_variant(add_variant_name: &str, variant: Option<&str>) -> String {
    names::add_variant(add_variant_name, variant)
}

/// The file names of `count` shards.
#[pyfunction]
#[pyo3(signature = (weights_name, variant, count))]
fn shard_file_names(weights_name: &str, variant: Option<&str>, count: usize) -> Vec<String> {
    names::shard_file_names(weights_name, variant, count)
}

/// The index file name.
#[pyfunction]
#[pyo3(signature = (weights_name, variant))]
fn index_file_name(weights_name: &str, variant: Option<&str>) -> String {
    names::index_file_name(weights_name, variant)
}

/// Whether `file_name` is a shard name of `weights_name`/`variant` for any count of two or more.
#[pyfunction]
#[pyo3(signature = (file_name, weights_name, variant))]
fn is_shard_name(file_name: &str, weights_name: &str, variant: Option<&str>) -> bool {
    names::is_shard_name(file_name, weights_name, variant)
}

/// Whether `file_name` is one of quantsave's per-file temporaries (any process's).
#[pyfunction]
fn is_temp_name(file_name: &str) -> bool {
    names::is_temp_name(file_name)
}

/// A fresh temporary sibling path for `path` (`.<name>.<pid>-<n>.quantsave.tmp`).
#[pyfunction]
fn temp_path(path: PathBuf) -> OsString {
    names::temp_path_for(&path).into_os_string()
}
