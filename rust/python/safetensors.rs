//! Bindings of the safetensors container: parallel shard writes (`write_shards`), the streaming
//! `StreamWriter`, atomic small files (`write_bytes_atomic`), file checksums, validated headers
//! (`read_header`) and mapped files (`MappedFile`).

use std::collections::BTreeMap;
use std::os::raw::c_int;
use std::path::PathBuf;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::buffer::{export_bytes, view_tensor_bytes};
use super::errors::run_detached;
use crate::dtype::Dtype;
use crate::safetensors::{self as st, ShardSpec, TensorView, WriteOptions};

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(write_shards, m)?)?;
    m.add_function(wrap_pyfunction!(write_bytes_atomic, m)?)?;
    m.add_function(wrap_pyfunction!(sha256_files, m)?)?;
    m.add_function(wrap_pyfunction!(read_header, m)?)?;
    m.add_class::<MappedFile>()?;
    m.add_class::<StreamWriter>()?;
    Ok(())
}

/// A dtype from its safetensors name, or a ValueError.
pub(super) fn parse_dtype(s: &str) -> PyResult<Dtype> {
    s.parse().map_err(|e: String| PyValueError::new_err(e))
}

/// Header specs from Python's `(name, dtype name, shape)` triples.
pub(super) fn tensor_specs(
    tensors: Vec<(String, String, Vec<u64>)>,
) -> PyResult<Vec<st::TensorSpec>> {
    tensors
        .into_iter()
        .map(|(name, dtype, shape)| {
            Ok(st::TensorSpec {
                name,
                dtype: parse_dtype(&dtype)?,
                shape,
            })
        })
        .collect()
}

/// One tensor as handed over by Python: name, dtype name, shape, a uint8 buffer of its bytes.
type PyTensor = (String, String, Vec<u64>, PyBuffer<u8>);

/// One shard as handed over by Python: target path, tensors, header metadata.
type PyShard = (PathBuf, Vec<PyTensor>, Option<BTreeMap<String, String>>);

/// Writes shards in parallel. `shards` is a list of `(path, tensors, metadata)`; returns the
/// size of every file written, or with `checksums=True` `(size, sha256 hex)` pairs (hashed
/// while writing).
#[pyfunction]
#[pyo3(signature = (shards, *, fsync=false, checksums=false))]
fn write_shards<'py>(
    py: Python<'py>,
    shards: Vec<PyShard>,
    fsync: bool,
    checksums: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let mut specs = Vec::with_capacity(shards.len());
    for (path, tensors, metadata) in &shards {
        let mut views = Vec::with_capacity(tensors.len());
        for (name, dtype, shape, buf) in tensors {
            // The slice borrows `shards`, which owns the PyBuffer, so it outlives every use.
            let data = view_tensor_bytes(buf, name)?;
            views.push(TensorView {
                name: name.clone(),
                dtype: parse_dtype(dtype)?,
                shape: shape.clone(),
                data,
            });
        }
        specs.push(ShardSpec {
            path: path.clone(),
            tensors: views,
            metadata: metadata.clone(),
        });
    }
    let opts = WriteOptions { fsync };
    if checksums {
        let out = run_detached(py, || st::write_shards_hashed(&specs, &opts))?;
        return Ok(out.into_pyobject(py)?.into_any());
    }
    let out = run_detached(py, || st::write_shards(&specs, &opts))?;
    Ok(out.into_pyobject(py)?.into_any())
}

/// The sha256 (lowercase hex) of each file, files hashed in parallel without the GIL.
#[pyfunction]
fn sha256_files(py: Python<'_>, paths: Vec<PathBuf>) -> PyResult<Vec<String>> {
    use rayon::prelude::*;
    run_detached(py, || {
        paths.par_iter().map(|p| st::sha256_file(p)).collect()
    })
}

/// Writes `data` atomically (temporary sibling + rename).
#[pyfunction]
#[pyo3(signature = (path, data, *, fsync=false))]
fn write_bytes_atomic(py: Python<'_>, path: PathBuf, data: Vec<u8>, fsync: bool) -> PyResult<()> {
    run_detached(py, || st::write_bytes_atomic(&path, &data, fsync))
}

fn header_to_py<'py>(py: Python<'py>, h: &st::Header) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("metadata", h.metadata.clone())?;
    let list = PyList::empty(py);
    for t in &h.tensors {
        list.append((
            t.name.as_str(),
            t.dtype.name(),
            t.shape.clone(),
            t.start,
            t.end,
        ))?;
    }
    d.set_item("tensors", list)?;
    d.set_item("data_start", h.data_start)?;
    d.set_item("file_size", h.file_size)?;
    Ok(d)
}

/// Reads and validates the header of a safetensors file.
#[pyfunction]
fn read_header<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let h = run_detached(py, || st::read_header(&path))?;
    header_to_py(py, &h)
}

/// A safetensors file written tensor by tensor (see `quantsave::safetensors::StreamWriter`):
/// `StreamWriter(path, [(name, dtype, shape)], metadata)`, then `write(name, buffer)` per
/// tensor in any order (without the GIL), then `finish(fsync=False)`; `abort()` or dropping it
/// unfinished removes the temporary file.
#[pyclass(module = "quantsave._core")]
struct StreamWriter {
    inner: Option<st::StreamWriter>,
}

impl StreamWriter {
    fn open(&mut self) -> PyResult<&mut st::StreamWriter> {
        self.inner.as_mut().ok_or_else(|| {
            PyValueError::new_err("this StreamWriter is already finished or aborted")
        })
    }
}

#[pymethods]
impl StreamWriter {
    /// `shared=True`: other processes fill some tensors (`attach`), so `finish` commits without
    /// counting bytes.
    #[new]
    #[pyo3(signature = (path, tensors, metadata=None, *, shared=false))]
    fn new(
        path: PathBuf,
        tensors: Vec<(String, String, Vec<u64>)>,
        metadata: Option<BTreeMap<String, String>>,
        shared: bool,
    ) -> PyResult<Self> {
        let specs = tensor_specs(tensors)?;
        let inner = if shared {
            st::StreamWriter::create_shared(&path, &specs, metadata.as_ref())?
        } else {
            st::StreamWriter::create(&path, &specs, metadata.as_ref())?
        };
        Ok(StreamWriter { inner: Some(inner) })
    }

    /// Opens the temporary file `temp` that a `shared=True` writer of `path` created (in this
    /// process or another), with the same tensors and metadata, to write some of its tensors;
    /// `finish` then only syncs.
    #[staticmethod]
    #[pyo3(signature = (path, temp, tensors, metadata=None))]
    fn attach(
        path: PathBuf,
        temp: PathBuf,
        tensors: Vec<(String, String, Vec<u64>)>,
        metadata: Option<BTreeMap<String, String>>,
    ) -> PyResult<Self> {
        let specs = tensor_specs(tensors)?;
        let inner = st::StreamWriter::attach(&path, &temp, &specs, metadata.as_ref())?;
        Ok(StreamWriter { inner: Some(inner) })
    }

    /// The temporary file being written (None once finished, and for an attached writer).
    #[getter]
    fn temp_path(&self) -> Option<PathBuf> {
        self.inner
            .as_ref()
            .and_then(|w| w.temp_path().map(|p| p.to_path_buf()))
    }

    /// Writes one tensor's bytes (a contiguous buffer) at its place in the file.
    fn write(&mut self, py: Python<'_>, name: &str, data: PyBuffer<u8>) -> PyResult<()> {
        let bytes = view_tensor_bytes(&data, name)?;
        let writer = self.open()?;
        run_detached(py, || writer.write(name, bytes))
    }

    /// Names of the tensors not written yet.
    fn missing(&mut self) -> PyResult<Vec<String>> {
        Ok(self.open()?.missing())
    }

    /// Renames the complete file into place (after an fsync if asked); returns its size.
    #[pyo3(signature = (*, fsync=false))]
    fn finish(&mut self, py: Python<'_>, fsync: bool) -> PyResult<u64> {
        let writer = self.inner.take().ok_or_else(|| {
            PyValueError::new_err("this StreamWriter is already finished or aborted")
        })?;
        run_detached(py, || writer.finish(fsync))
    }

    /// Drops the temporary file; the target is left as it was.
    fn abort(&mut self) {
        self.inner = None;
    }
}

/// A validated safetensors file mapped into memory (private, copy-on-write). Exposes the whole
/// file through the buffer protocol so tensors can view it without copies.
#[pyclass(module = "quantsave._core", frozen)]
struct MappedFile {
    header: st::Header,
    path: PathBuf,
    ptr: usize,
    len: usize,
    // Owns the mapping that `ptr`/`len` describe; only `release` uses it after construction.
    map: memmap2::MmapMut,
}

#[pymethods]
impl MappedFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let mut mf = run_detached(py, || st::map_file(&path))?;
        let ptr = mf.map.as_mut_ptr() as usize;
        let len = mf.map.len();
        Ok(MappedFile {
            header: mf.header,
            path: mf.path,
            ptr,
            len,
            map: mf.map,
        })
    }

    #[getter]
    fn header<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        header_to_py(py, &self.header)
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    fn __len__(&self) -> usize {
        self.len
    }

    /// Drops this process's copy of the whole pages inside bytes `start..end` (a hint: the
    /// file's page cache keeps them, and a later read faults them in again from the file), so
    /// a pass over a large mapping stays bounded in memory. Bytes written into the range through
    /// the buffer are lost (the mapping is private): release only ranges that were only read.
    fn release(&self, start: usize, end: usize) -> PyResult<()> {
        if start > end || end > self.len {
            return Err(PyValueError::new_err(format!(
                "release range {start}..{end} is outside the mapping (0..{})",
                self.len
            )));
        }
        let page = 4096usize;
        let lo = start.div_ceil(page) * page;
        let hi = (end / page) * page;
        if hi > lo {
            // SAFETY: `lo..hi` lies inside the private mapping `map` owns; Rust never holds a
            // slice into it, and the caller's contract (documented) is that the range was only
            // read, so dropping the pages makes later reads see the file's unchanged contents.
            unsafe { crate::sys::release_pages(&self.map, lo, hi - lo) }
        }
        Ok(())
    }

    /// # Safety
    /// `view` is a valid `Py_buffer` provided by the interpreter.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let (ptr, len) = {
            let me = slf.get();
            (me.ptr, me.len)
        };
        // SAFETY: `view` is the interpreter's request (this method's contract). `ptr`/`len`
        // describe the private writable mapping `slf` owns for its whole life, obtained through
        // `as_mut_ptr` once at construction; Rust never reads or writes it afterwards.
        unsafe { export_bytes(slf.as_any(), view, ptr, len, flags) }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {}
}
