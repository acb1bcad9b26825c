//! Source tensors: a tensor resolved against its read-only map, its elements read as
//! [`Floats`], and the release of processed pages. Reads only; must not depend on the output
//! side (writers, plans).

use crate::codec::{FloatBuf, Floats};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::safetensors::{MappedFile, TensorInfo};

/// A source tensor resolved against its mapped file.
pub(super) struct Resolved<'a> {
    pub(super) map: &'a MappedFile,
    pub(super) info: &'a TensorInfo,
    /// The float dtype its elements are read as, when it differs from the stored one.
    pub(super) cast: Option<Dtype>,
    /// Read as its transpose: the stored `(rows, cols)`.
    pub(super) transposed: Option<(u64, u64)>,
}

impl Resolved<'_> {
    /// `map`'s tensor `info` read as `cast` (None when that is its own dtype), transposed when
    /// asked. Errors unless both are float dtypes, or when a transposed tensor is not 2-D.
    pub(super) fn new<'a>(
        map: &'a MappedFile,
        info: &'a TensorInfo,
        cast: Option<Dtype>,
        transposed: bool,
    ) -> Result<Resolved<'a>> {
        let cast = cast.filter(|&d| d != info.dtype);
        let transposed = match (transposed, info.shape.as_slice()) {
            (false, _) => None,
            (true, &[rows, cols]) => Some((rows, cols)),
            (true, shape) => {
                return Err(Error::invalid(format!(
                    "tensor {:?} has shape {shape:?}; only 2-D tensors are read transposed",
                    info.name
                )))
            }
        };
        let r = Resolved {
            map,
            info,
            cast,
            transposed,
        };
        if transposed.is_some() {
            check_float(&r)?;
        }
        if let Some(d) = cast {
            check_float(&r)?;
            if !matches!(d, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
                return Err(Error::invalid(format!(
                    "tensor {:?}: cannot be read as {d}; only F32, BF16 and F16 casts exist",
                    info.name
                )));
            }
        }
        Ok(r)
    }

    pub(super) fn bytes(&self, start: u64, len: u64) -> &[u8] {
        let s = (self.info.start + start) as usize;
        &self.map.map[s..s + len as usize]
    }

    pub(super) fn elem_size(&self) -> u64 {
        self.info.dtype.byte_size(1).unwrap_or(1)
    }

    pub(super) fn numel(&self) -> u64 {
        (self.info.end - self.info.start) / self.elem_size()
    }

    /// Drops the whole pages of a processed range from this process (they stay cached). A
    /// transposed source is read across its whole extent, so nothing is released early.
    pub(super) fn release(&self, start: u64, len: u64) {
        if self.transposed.is_some() {
            return;
        }
        let page = 4096u64;
        let lo = (self.info.start + start).div_ceil(page) * page;
        let hi = ((self.info.start + start + len) / page) * page;
        if hi > lo {
            // SAFETY: the mapping is private and never written, so dropping its pages only
            // makes later reads fault them in again from the file; no slice into the range is
            // used after this call by this chunk, and concurrent readers of neighbouring bytes
            // see the same file contents.
            unsafe { crate::sys::release_pages(&self.map.map, lo as usize, (hi - lo) as usize) }
        }
    }
}

/// An aligned copy of `bytes` when they are not aligned for `T`.
pub(super) fn aligned<T: bytemuck::Pod>(bytes: &[u8]) -> std::borrow::Cow<'_, [T]> {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => {
            let mut v = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
            bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
            std::borrow::Cow::Owned(v)
        }
    }
}

fn floats<'a>(dtype: Dtype, f32s: &'a [f32], u16s: &'a [u16]) -> Floats<'a> {
    match dtype {
        Dtype::F32 => Floats::F32(f32s),
        Dtype::BF16 => Floats::Bf16(u16s),
        _ => Floats::F16(u16s),
    }
}

/// Reads the elements `start..start + len` of a float source as [`Floats`] (cast first when
/// the source is read as another dtype) and calls `f`.
pub(super) fn with_floats<T>(
    src: &Resolved<'_>,
    start: u64,
    len: u64,
    f: impl FnOnce(Floats<'_>) -> T,
) -> T {
    match src.cast {
        None => with_stored_floats(src, start, len, f),
        Some(to) => {
            let buf = with_stored_floats(src, start, len, |x| FloatBuf::cast(x, to))
                .expect("Resolved::new admits float casts only");
            f(buf.view())
        }
    }
}

/// The elements `start..start + len` as stored (of the transpose, for a transposed source), as
/// [`Floats`], passed to `f`.
fn with_stored_floats<T>(
    src: &Resolved<'_>,
    start: u64,
    len: u64,
    f: impl FnOnce(Floats<'_>) -> T,
) -> T {
    let es = src.elem_size();
    if let Some((rows, cols)) = src.transposed {
        // Element i of the transpose ([cols, rows]) is stored at (i % rows) * cols + i / rows.
        let at = |i: u64| ((i % rows) * cols + i / rows) * es;
        let all = src.bytes(0, rows * cols * es);
        let pick = |i: u64| &all[at(i) as usize..(at(i) + es) as usize];
        return if src.info.dtype == Dtype::F32 {
            let v: Vec<f32> = (start..start + len)
                .map(|i| f32::from_le_bytes(pick(i).try_into().expect("4 bytes")))
                .collect();
            f(floats(Dtype::F32, &v, &[]))
        } else {
            let v: Vec<u16> = (start..start + len)
                .map(|i| u16::from_le_bytes(pick(i).try_into().expect("2 bytes")))
                .collect();
            f(floats(src.info.dtype, &[], &v))
        };
    }
    let bytes = src.bytes(start * es, len * es);
    if src.info.dtype == Dtype::F32 {
        let v = aligned::<f32>(bytes);
        f(floats(Dtype::F32, &v, &[]))
    } else {
        let v = aligned::<u16>(bytes);
        f(floats(src.info.dtype, &[], &v))
    }
}

/// Errors unless the source is F32, BF16 or F16.
pub(super) fn check_float(src: &Resolved<'_>) -> Result<()> {
    match src.info.dtype {
        Dtype::F32 | Dtype::BF16 | Dtype::F16 => Ok(()),
        other => Err(Error::invalid(format!(
            "tensor {:?} is {other}; only F32, BF16 and F16 weights can be quantized",
            src.info.name
        ))),
    }
}
