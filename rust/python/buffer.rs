//! Byte views of Python buffers, in both directions: slices over the memory of objects Python
//! hands in (`PyBuffer<u8>`, a uint8 view of a tensor, never copied) and the export of a mapped
//! file's memory to Python. The binding's only unsafe code lives here.

use std::os::raw::c_int;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// A read-only byte view of a contiguous buffer.
pub(super) fn view_bytes(buf: &PyBuffer<u8>) -> PyResult<&[u8]> {
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err("buffer is not contiguous"));
    }
    // SAFETY: a contiguous buffer of `len_bytes()` bytes that its exporter keeps alive and in
    // place until `buf` is released; the slice borrows `buf`, so it cannot outlive it. The
    // contract, as for any buffer consumer, is that no other thread mutates the memory while
    // the slice is in use (a tensor is not modified while it is being saved or quantized).
    Ok(unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) })
}

/// A read-only byte view of the contiguous buffer of tensor `name`.
pub(super) fn view_tensor_bytes<'a>(buf: &'a PyBuffer<u8>, name: &str) -> PyResult<&'a [u8]> {
    view_bytes(buf)
        .map_err(|_| PyValueError::new_err(format!("tensor {name:?}: buffer is not contiguous")))
}

/// A writable byte view of a contiguous buffer.
#[allow(clippy::mut_from_ref)]
pub(super) fn view_bytes_mut(buf: &PyBuffer<u8>) -> PyResult<&mut [u8]> {
    if buf.readonly() || !buf.is_c_contiguous() {
        return Err(PyValueError::new_err(
            "output buffer must be writable and contiguous",
        ));
    }
    // SAFETY: as in `view_bytes`, and the exporter granted write access. Each output buffer is
    // viewed once per call; the caller must not pass the same memory as input and output.
    Ok(unsafe { std::slice::from_raw_parts_mut(buf.buf_ptr() as *mut u8, buf.len_bytes()) })
}

/// `bytes` as a slice of `T`, or a ValueError naming `what` when size or alignment do not fit.
pub(super) fn cast<'a, T: bytemuck::Pod>(bytes: &'a [u8], what: &str) -> PyResult<&'a [T]> {
    bytemuck::try_cast_slice(bytes)
        .map_err(|e| PyValueError::new_err(format!("{what}: {e:?} (size or alignment)")))
}

/// `bytes` as a mutable slice of `T`, or a ValueError naming `what`.
pub(super) fn cast_mut<'a, T: bytemuck::Pod>(
    bytes: &'a mut [u8],
    what: &str,
) -> PyResult<&'a mut [T]> {
    bytemuck::try_cast_slice_mut(bytes)
        .map_err(|e| PyValueError::new_err(format!("{what}: {e:?} (size or alignment)")))
}

/// Fills `view` (a `__getbuffer__` request) with the `len` writable bytes at `ptr`, owned by
/// `owner`.
///
/// # Safety
/// `view` is the valid `Py_buffer` the interpreter passed to `owner`'s `__getbuffer__`;
/// `ptr..ptr + len` is memory that `owner` keeps alive and in place for its whole life and that
/// Rust never reads or writes, so exported views are its only users. (`PyBuffer_FillInfo`
/// stores a new reference to `owner` in the view, so the memory outlives every view.)
pub(super) unsafe fn export_bytes(
    owner: &Bound<'_, PyAny>,
    view: *mut pyo3::ffi::Py_buffer,
    ptr: usize,
    len: usize,
    flags: c_int,
) -> PyResult<()> {
    // SAFETY: forwarded from this function's contract.
    let rc = unsafe {
        pyo3::ffi::PyBuffer_FillInfo(
            view,
            owner.as_ptr(),
            ptr as *mut std::os::raw::c_void,
            len as pyo3::ffi::Py_ssize_t,
            0,
            flags,
        )
    };
    if rc == -1 {
        return Err(PyErr::fetch(owner.py()));
    }
    Ok(())
}
