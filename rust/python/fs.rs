//! Bindings of the folder operations an atomic commit needs: exchanging two paths and making
//! the renames in a folder durable. The platform calls themselves live in `crate::sys`.

use std::path::{Path, PathBuf};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::errors::run_detached;
use crate::error::Error;

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(exchange_paths, m)?)?;
    m.add_function(wrap_pyfunction!(fsync_dir, m)?)?;
    Ok(())
}

fn has_nul(p: &Path) -> bool {
    p.as_os_str().as_encoded_bytes().contains(&0)
}

/// Swaps two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`, macOS
/// `renamex_np(RENAME_SWAP)`): afterwards each name points to what the other did. Returns False
/// where the platform or filesystem cannot exchange (the caller falls back to two renames);
/// raises OSError for other failures.
#[pyfunction]
fn exchange_paths(py: Python<'_>, a: PathBuf, b: PathBuf) -> PyResult<bool> {
    if has_nul(&a) || has_nul(&b) {
        return Err(PyValueError::new_err("path contains a NUL byte"));
    }
    run_detached(py, || {
        crate::sys::exchange_paths(&a, &b).map_err(|e| Error::io(&b, "exchange", e))
    })
}

/// fsyncs the folder `path` so the renames inside it are durable; does nothing where the
/// platform cannot (Windows, whose NTFS journals renames).
#[pyfunction]
fn fsync_dir(py: Python<'_>, path: PathBuf) -> PyResult<()> {
    run_detached(py, || crate::safetensors::sync_dir(&path))
}
