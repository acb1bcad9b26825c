//! The PyO3 binding `quantsave._core`: a thin layer over the core. Each call validates its
//! arguments while holding the GIL (tensor bytes are taken as `PyBuffer<u8>` views, never
//! copied), releases the GIL for the work, and maps core errors to Python exceptions.

use std::collections::BTreeMap;
use std::os::raw::c_int;
use std::path::PathBuf;

use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyPermissionError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::codec::{self, Floats, FloatsMut, Nibble4Layout, QuantType};
use crate::dtype::Dtype;
use crate::error::Error;
use crate::index::render_index;
use crate::plan::{self, PlanEntry};
use crate::safetensors::{self as st, ShardSpec, TensorView, WriteOptions, WriteStrategy};

create_exception!(
    quantsave._core,
    CheckpointError,
    PyValueError,
    "A checkpoint file or folder is corrupt, truncated or inconsistent."
);

/// Maps a core error to the matching Python exception.
fn to_py(err: Error) -> PyErr {
    match &err {
        Error::Io { path, source, .. } => {
            let msg = err.to_string();
            let errno = source.raw_os_error();
            let args = (errno.unwrap_or(0), msg, path.to_string_lossy().into_owned());
            match source.kind() {
                std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(args),
                std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(args),
                _ => PyOSError::new_err(args),
            }
        }
        Error::Corrupt { .. } => CheckpointError::new_err(err.to_string()),
        Error::InvalidInput(_) => PyValueError::new_err(err.to_string()),
    }
}

/// Set in a child process created by `fork()` (torch DataLoader workers, multiprocessing):
/// the parent's rayon threads do not exist there, so work runs on a pool of the child's own.
static FORKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static CHILD_POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();

#[cfg(unix)]
extern "C" fn mark_forked() {
    FORKED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Threads for the global pool: `QUANTSAVE_NUM_THREADS`, else rayon's default (one per core).
fn configured_threads() -> Option<usize> {
    std::env::var("QUANTSAVE_NUM_THREADS")
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&n| n > 0)
}

/// Runs `f` on the right pool: the global one, or in a forked child a pool of its own.
fn on_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if FORKED.load(std::sync::atomic::Ordering::SeqCst) {
        let pool = CHILD_POOL.get_or_init(|| {
            let mut b = rayon::ThreadPoolBuilder::new();
            if let Some(n) = configured_threads() {
                b = b.num_threads(n);
            }
            b.build().unwrap_or_else(|_| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .expect("a one-thread pool")
            })
        });
        pool.install(f)
    } else {
        f()
    }
}

/// Runs `f` without the GIL and maps its error; every long call goes through here.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> crate::Result<T> + Send) -> PyResult<T> {
    let out = py.detach(|| on_pool(f)).map_err(to_py);
    py.check_signals()?;
    out
}

fn parse_dtype(s: &str) -> PyResult<Dtype> {
    s.parse().map_err(|e: String| PyValueError::new_err(e))
}

/// Header specs from Python's `(name, dtype name, shape)` triples.
fn tensor_specs(tensors: Vec<(String, String, Vec<u64>)>) -> PyResult<Vec<st::TensorSpec>> {
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
#[pyo3(signature = (shards, *, fsync=false, strategy="write", chunk_size=16777216, checksums=false))]
fn write_shards<'py>(
    py: Python<'py>,
    shards: Vec<PyShard>,
    fsync: bool,
    strategy: &str,
    chunk_size: usize,
    checksums: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let strategy = match strategy {
        "write" => WriteStrategy::Write,
        "pwrite" => WriteStrategy::Pwrite,
        "mmap" => WriteStrategy::Mmap,
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown write strategy {other:?}; use 'write', 'pwrite' or 'mmap'"
            )))
        }
    };
    let mut specs = Vec::with_capacity(shards.len());
    for (path, tensors, metadata) in &shards {
        let mut views = Vec::with_capacity(tensors.len());
        for (name, dtype, shape, buf) in tensors {
            if !buf.is_c_contiguous() {
                return Err(PyValueError::new_err(format!(
                    "tensor {name:?}: buffer is not contiguous"
                )));
            }
            // SAFETY: `buf` is a contiguous buffer of `len_bytes()` bytes that its exporter keeps
            // alive and in place until the PyBuffer is released, and the PyBuffer (owned by
            // `shards`) outlives every use of this slice. The contract, as for any buffer
            // consumer, is that no other thread mutates the tensor while it is being saved.
            let data =
                unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) };
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
    let opts = WriteOptions {
        fsync,
        strategy,
        chunk_size,
    };
    if checksums {
        let out = detached(py, || st::write_shards_hashed(&specs, &opts))?;
        return Ok(out.into_pyobject(py)?.into_any());
    }
    let out = detached(py, || st::write_shards(&specs, &opts))?;
    Ok(out.into_pyobject(py)?.into_any())
}

/// The sha256 (lowercase hex) of each file, files hashed in parallel without the GIL.
#[pyfunction]
fn sha256_files(py: Python<'_>, paths: Vec<PathBuf>) -> PyResult<Vec<String>> {
    use rayon::prelude::*;
    detached(py, || {
        paths.par_iter().map(|p| st::sha256_file(p)).collect()
    })
}

/// Writes `data` atomically (temporary sibling + rename).
#[pyfunction]
#[pyo3(signature = (path, data, *, fsync=false))]
fn write_bytes_atomic(py: Python<'_>, path: PathBuf, data: Vec<u8>, fsync: bool) -> PyResult<()> {
    detached(py, || st::write_bytes_atomic(&path, &data, fsync))
}

/// Swaps two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`, macOS
/// `renamex_np(RENAME_SWAP)`): afterwards each name points to what the other did. Returns False where the platform or filesystem cannot
/// exchange (the caller falls back to two renames); raises OSError for other failures.
#[pyfunction]
fn exchange_paths(a: PathBuf, b: PathBuf) -> PyResult<bool> {
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let ca = CString::new(a.as_os_str().as_bytes())
            .map_err(|_| PyValueError::new_err("path contains a NUL byte"))?;
        let cb = CString::new(b.as_os_str().as_bytes())
            .map_err(|_| PyValueError::new_err("path contains a NUL byte"))?;
        // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
        #[cfg(target_os = "linux")]
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        // SAFETY: as above.
        #[cfg(target_os = "macos")]
        let rc = unsafe { libc::renamex_np(ca.as_ptr(), cb.as_ptr(), libc::RENAME_SWAP) };
        if rc == 0 {
            return Ok(true);
        }
        let err = std::io::Error::last_os_error();
        // (ENOTSUP is EOPNOTSUPP on Linux, a separate value on macOS.)
        let cannot = [libc::EINVAL, libc::ENOSYS, libc::EOPNOTSUPP, libc::ENOTSUP];
        match err.raw_os_error() {
            Some(code) if cannot.contains(&code) => Ok(false),
            _ => Err(to_py(Error::io(&b, "exchange", err))),
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        let _ = (a, b);
        Ok(false)
    }
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

#[pyfunction]
#[pyo3(signature = (weights_name, variant, count))]
fn shard_file_names(weights_name: &str, variant: Option<&str>, count: usize) -> Vec<String> {
    plan::shard_file_names(weights_name, variant, count)
}

#[pyfunction]
#[pyo3(signature = (weights_name, variant))]
fn index_file_name(weights_name: &str, variant: Option<&str>) -> String {
    plan::index_file_name(weights_name, variant)
}

#[pyfunction]
fn parse_size(text: &str) -> PyResult<u64> {
    plan::parse_size(text).map_err(to_py)
}

#[pyfunction]
#[pyo3(signature = (add_variant_name, variant))]
fn add_variant(add_variant_name: &str, variant: Option<&str>) -> String {
    plan::add_variant(add_variant_name, variant)
}

/// Renders an index file from `metadata` (a JSON object string) and a weight map.
#[pyfunction]
fn render_index_json(
    metadata_json: &str,
    weight_map: BTreeMap<String, String>,
) -> PyResult<String> {
    let meta: BTreeMap<String, serde_json::Value> = serde_json::from_str(metadata_json)
        .map_err(|e| PyValueError::new_err(format!("metadata: {e}")))?;
    Ok(render_index(&meta, &weight_map))
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
    let h = detached(py, || st::read_header(&path))?;
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
    #[new]
    #[pyo3(signature = (path, tensors, metadata=None))]
    fn new(
        path: PathBuf,
        tensors: Vec<(String, String, Vec<u64>)>,
        metadata: Option<BTreeMap<String, String>>,
    ) -> PyResult<Self> {
        let specs = tensor_specs(tensors)?;
        let inner = st::StreamWriter::create(&path, &specs, metadata.as_ref()).map_err(to_py)?;
        Ok(StreamWriter { inner: Some(inner) })
    }

    /// Writes one tensor's bytes (a contiguous buffer) at its place in the file.
    fn write(&mut self, py: Python<'_>, name: &str, data: PyBuffer<u8>) -> PyResult<()> {
        if !data.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "tensor {name:?}: buffer is not contiguous"
            )));
        }
        // SAFETY: as in `write_shards`: a contiguous buffer its exporter keeps alive and in
        // place while the PyBuffer (held for this call) exists.
        let bytes =
            unsafe { std::slice::from_raw_parts(data.buf_ptr() as *const u8, data.len_bytes()) };
        let writer = self.open()?;
        detached(py, || writer.write(name, bytes))
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
        detached(py, || writer.finish(fsync))
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
    // Owns the mapping that `ptr`/`len` describe; never touched again after construction.
    _map: memmap2::MmapMut,
}

#[pymethods]
impl MappedFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let mut mf = detached(py, || st::map_file(&path))?;
        let ptr = mf.map.as_mut_ptr() as usize;
        let len = mf.map.len();
        Ok(MappedFile {
            header: mf.header,
            path: mf.path,
            ptr,
            len,
            _map: mf.map,
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
        // SAFETY: `ptr`/`len` describe a private writable mapping owned by this object, obtained
        // through `as_mut_ptr` once at construction; Rust never reads or writes it afterwards, so
        // the only accesses are through exported buffers. `PyBuffer_FillInfo` stores a new
        // reference to `slf` in the view, keeping the mapping alive as long as any view exists.
        let rc = unsafe {
            pyo3::ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                ptr as *mut std::os::raw::c_void,
                len as pyo3::ffi::Py_ssize_t,
                0,
                flags,
            )
        };
        if rc == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {}
}

/// A read-only byte view of a contiguous buffer.
fn buf_ref(buf: &PyBuffer<u8>) -> PyResult<&[u8]> {
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err("buffer is not contiguous"));
    }
    // SAFETY: a contiguous buffer of `len_bytes()` bytes that its exporter keeps alive and in
    // place until `buf` is released; the slice borrows `buf`, so it cannot outlive it.
    Ok(unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) })
}

/// A writable byte view of a contiguous buffer.
#[allow(clippy::mut_from_ref)]
fn buf_mut(buf: &PyBuffer<u8>) -> PyResult<&mut [u8]> {
    if buf.readonly() || !buf.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "output buffer must be writable and contiguous",
        ));
    }
    // SAFETY: as in `buf_ref`, and the exporter granted write access. Each output buffer is
    // viewed once per call; the caller must not pass the same memory as input and output.
    Ok(unsafe { std::slice::from_raw_parts_mut(buf.buf_ptr() as *mut u8, buf.len_bytes()) })
}

fn cast<'a, T: bytemuck::Pod>(bytes: &'a [u8], what: &str) -> PyResult<&'a [T]> {
    bytemuck::try_cast_slice(bytes)
        .map_err(|e| PyValueError::new_err(format!("{what}: {e:?} (size or alignment)")))
}

fn cast_mut<'a, T: bytemuck::Pod>(bytes: &'a mut [u8], what: &str) -> PyResult<&'a mut [T]> {
    bytemuck::try_cast_slice_mut(bytes)
        .map_err(|e| PyValueError::new_err(format!("{what}: {e:?} (size or alignment)")))
}

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
    let qt: QuantType = quant_type.parse().map_err(to_py)?;
    let x = floats(buf_ref(&input)?, dtype)?;
    let p = buf_mut(&packed)?;
    let a: &mut [f32] = cast_mut(buf_mut(&absmax)?, "absmax")?;
    detached(py, || {
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
    let qt: QuantType = quant_type.parse().map_err(to_py)?;
    let p = buf_ref(&packed)?;
    let a: &[f32] = cast(buf_ref(&absmax)?, "absmax")?;
    let o = buf_mut(&out)?;
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
    detached(py, || {
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
    let v: &[f32] = cast(buf_ref(&values)?, "values")?;
    let (codes, absmax) = detached(py, || codec::quantize_dynamic(v, offset, blocksize))?;
    Ok((codes, bytemuck::cast_slice(&absmax).to_vec()))
}

/// Undoes `quantize_dynamic`: float32 bytes.
#[pyfunction]
fn dequantize_dynamic(
    codes: PyBuffer<u8>,
    absmax: PyBuffer<u8>,
    offset: f32,
    blocksize: usize,
) -> PyResult<Vec<u8>> {
    let a: &[f32] = cast(buf_ref(&absmax)?, "absmax")?;
    let out = codec::dequantize_dynamic(buf_ref(&codes)?, a, offset, blocksize).map_err(to_py)?;
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
    let qt: QuantType = quant_type.parse().map_err(to_py)?;
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
    let x: &[u16] = cast(buf_ref(&input)?, "input")?;
    let qo: &mut [i8] = cast_mut(buf_mut(&q)?, "q")?;
    let so: &mut [f32] = cast_mut(buf_mut(&scb)?, "scb")?;
    detached(py, || codec::quantize_int8_rows(x, rows, cols, qo, so))
}

/// A streaming conversion (see `quantsave::convert`): `Conversion(sources, shards, ops,
/// chunk_elems, fsync)` with shards as `(path, [(name, dtype, shape)], metadata)` and ops as
/// tuples: `("copy", file, name, shard, out)`, `("bytes", data, shard, out)`,
/// `("quant4", file, name, quant_type, blocksize, shard, packed, absmax, nested)` with `nested`
/// None or `(offset, nested_absmax)`, `("int8", file, name, rows, cols, shard, weight, scb)`.
/// `run()` works without the GIL; `progress()` (source bytes done) can be polled meanwhile
/// from another thread.
#[pyclass(module = "quantsave._core", frozen)]
struct Conversion {
    spec: crate::convert::ConvertSpec,
    done: std::sync::atomic::AtomicU64,
    started: std::sync::atomic::AtomicBool,
}

fn parse_op(op: &Bound<'_, PyAny>) -> PyResult<crate::convert::Op> {
    use crate::convert::{Nested, Op, Source, Target};
    let kind: String = op.get_item(0)?.extract()?;
    let tgt = |shard: usize, name: String| Target { shard, name };
    Ok(match kind.as_str() {
        "copy" => {
            let (_, file, name, shard, out): (String, usize, String, usize, String) =
                op.extract()?;
            Op::Copy {
                src: Source { file, name },
                out: tgt(shard, out),
            }
        }
        "bytes" => {
            let (_, data, shard, out): (String, Vec<u8>, usize, String) = op.extract()?;
            Op::Bytes {
                data,
                out: tgt(shard, out),
            }
        }
        "quant4" => {
            #[allow(clippy::type_complexity)]
            let (_, file, name, qt, blocksize, shard, packed, absmax, nested): (
                String,
                usize,
                String,
                String,
                usize,
                usize,
                String,
                String,
                Option<(f32, String)>,
            ) = op.extract()?;
            Op::Quant4 {
                src: Source { file, name },
                quant_type: qt.parse().map_err(to_py)?,
                blocksize,
                packed: tgt(shard, packed),
                absmax: tgt(shard, absmax),
                nested: nested.map(|(offset, n)| Nested {
                    offset,
                    nested_absmax: tgt(shard, n),
                }),
            }
        }
        "int8" => {
            #[allow(clippy::type_complexity)]
            let (_, file, name, rows, cols, shard, weight, scb): (
                String,
                usize,
                String,
                usize,
                usize,
                usize,
                String,
                String,
            ) = op.extract()?;
            Op::Int8 {
                src: Source { file, name },
                rows,
                cols,
                weight: tgt(shard, weight),
                scb: tgt(shard, scb),
            }
        }
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown conversion op {other:?}"
            )))
        }
    })
}

#[pymethods]
impl Conversion {
    #[new]
    #[pyo3(signature = (sources, shards, ops, chunk_elems=1 << 22, fsync=false))]
    #[allow(clippy::type_complexity)]
    fn new(
        sources: Vec<PathBuf>,
        shards: Vec<(
            PathBuf,
            Vec<(String, String, Vec<u64>)>,
            Option<BTreeMap<String, String>>,
        )>,
        ops: Vec<Bound<'_, PyAny>>,
        chunk_elems: usize,
        fsync: bool,
    ) -> PyResult<Self> {
        let shards = shards
            .into_iter()
            .map(|(path, tensors, metadata)| {
                let tensors = tensor_specs(tensors)?;
                Ok(crate::convert::ShardOut {
                    path,
                    tensors,
                    metadata,
                })
            })
            .collect::<PyResult<_>>()?;
        let ops = ops.iter().map(parse_op).collect::<PyResult<_>>()?;
        Ok(Conversion {
            spec: crate::convert::ConvertSpec {
                sources,
                shards,
                ops,
                chunk_elems,
                fsync,
            },
            done: std::sync::atomic::AtomicU64::new(0),
            started: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Writes and commits every shard; returns their sizes. Runs once.
    fn run(&self, py: Python<'_>) -> PyResult<Vec<u64>> {
        if self.started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(PyValueError::new_err("this conversion already ran"));
        }
        detached(py, || crate::convert::run(&self.spec, &self.done))
    }

    /// Source bytes processed so far.
    fn progress(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The absmax of every 4-bit block of tensor `name` in `path` (float32 bytes).
#[pyfunction]
#[pyo3(signature = (path, name, blocksize=64, chunk_elems=1 << 22))]
fn absmax_4bit(
    py: Python<'_>,
    path: PathBuf,
    name: String,
    blocksize: usize,
    chunk_elems: usize,
) -> PyResult<Vec<u8>> {
    let v = detached(py, || {
        crate::convert::absmax_4bit(&path, &name, blocksize, chunk_elems)
    })?;
    Ok(bytemuck::cast_slice(&v).to_vec())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    if let Some(n) = configured_threads() {
        // Fails only when the global pool already exists (module loaded twice): keep that one.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    // SAFETY: `mark_forked` only stores to an atomic, which is async-signal-safe as a fork
    // child handler must be. (Windows has no fork.)
    #[cfg(unix)]
    unsafe {
        libc::pthread_atfork(None, None, Some(mark_forked));
    }
    m.add("CheckpointError", m.py().get_type::<CheckpointError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(write_shards, m)?)?;
    m.add_function(wrap_pyfunction!(write_bytes_atomic, m)?)?;
    m.add_function(wrap_pyfunction!(plan_shards, m)?)?;
    m.add_function(wrap_pyfunction!(shard_file_names, m)?)?;
    m.add_function(wrap_pyfunction!(index_file_name, m)?)?;
    m.add_function(wrap_pyfunction!(add_variant, m)?)?;
    m.add_function(wrap_pyfunction!(parse_size, m)?)?;
    m.add_function(wrap_pyfunction!(render_index_json, m)?)?;
    m.add_function(wrap_pyfunction!(read_header, m)?)?;
    m.add_class::<MappedFile>()?;
    m.add_class::<StreamWriter>()?;
    m.add_class::<Conversion>()?;
    m.add_function(wrap_pyfunction!(absmax_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(sha256_files, m)?)?;
    m.add_function(wrap_pyfunction!(exchange_paths, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_dynamic, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_dynamic, m)?)?;
    m.add_function(wrap_pyfunction!(dynamic_map, m)?)?;
    m.add_function(wrap_pyfunction!(code_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_int8_rows, m)?)?;
    Ok(())
}
