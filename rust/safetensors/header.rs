//! Building a safetensors header exactly as `safetensors.torch.save_file` does: tensors sorted
//! by dtype (descending) then name, contiguous offsets, `__metadata__` first, compact JSON
//! padded with spaces to a multiple of 8 bytes, behind a little-endian u64 length.

use std::collections::BTreeMap;

use crate::dtype::{numel, Dtype};
use crate::error::{Error, Result};

/// Largest header a reader accepts (the limit the safetensors crate enforces).
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// One tensor to write: a name, its type and shape, and its raw little-endian bytes.
#[derive(Debug, Clone)]
pub struct TensorView<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// Checks that the byte length matches dtype and shape.
    pub fn validate(&self) -> Result<()> {
        let expected = numel(&self.shape).and_then(|n| self.dtype.byte_size(n));
        match expected {
            Some(n) if n == self.data.len() as u64 => Ok(()),
            Some(n) => Err(Error::invalid(format!(
                "tensor {:?}: {} {:?} needs {n} bytes, got {}",
                self.name,
                self.dtype,
                self.shape,
                self.data.len()
            ))),
            None => Err(Error::invalid(format!(
                "tensor {:?}: shape {:?} of {} has no whole byte size",
                self.name, self.shape, self.dtype
            ))),
        }
    }
}

/// Where everything goes in one file: the serialized header (with its 8-byte length prefix)
/// and, for each tensor (by index into the input), its absolute byte offset in the file.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Length prefix + JSON header + padding.
    pub header: Vec<u8>,
    /// Input indices in file order.
    pub order: Vec<usize>,
    /// Absolute file offset of each input tensor's data (indexed like the input).
    pub offsets: Vec<u64>,
    /// Total file size in bytes.
    pub file_size: u64,
}

/// A tensor's place in a header: name, type, shape (its bytes follow from them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// Bytes of the tensor's data, or an error when the shape has no whole byte size.
    pub fn byte_size(&self) -> Result<u64> {
        numel(&self.shape)
            .and_then(|n| self.dtype.byte_size(n))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "tensor {:?}: shape {:?} of {} has no whole byte size",
                    self.name, self.shape, self.dtype
                ))
            })
    }
}

/// Computes the header bytes and data offsets for `tensors`.
///
/// Rejects empty or duplicate names and byte lengths that do not match shape and dtype.
pub fn layout(
    tensors: &[TensorView<'_>],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<Layout> {
    let entries: Vec<(&str, Dtype, &[u64], u64)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.dtype,
                t.shape.as_slice(),
                t.data.len() as u64,
            )
        })
        .collect();
    layout_entries(&entries, |i| tensors[i].validate(), metadata)
}

/// [`layout`] for tensors known by name, type and shape only (their bytes come later).
pub fn layout_specs(
    tensors: &[TensorSpec],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<Layout> {
    let entries: Vec<(&str, Dtype, &[u64], u64)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.dtype,
                t.shape.as_slice(),
                t.byte_size().unwrap_or(0),
            )
        })
        .collect();
    layout_entries(&entries, |i| tensors[i].byte_size().map(|_| ()), metadata)
}

/// The layout of tensors given as (name, dtype, shape, byte size), each checked by `check`
/// in file order.
fn layout_entries(
    tensors: &[(&str, Dtype, &[u64], u64)],
    check: impl Fn(usize) -> Result<()>,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<Layout> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (ta, tb) = (&tensors[a], &tensors[b]);
        tb.1.cmp(&ta.1).then_with(|| ta.0.cmp(tb.0))
    });
    let mut seen = std::collections::HashSet::with_capacity(tensors.len());
    for t in tensors {
        if !seen.insert(t.0) {
            return Err(Error::invalid(format!(
                "tensor name {:?} appears twice in one file",
                t.0
            )));
        }
    }
    let mut json = String::with_capacity(64 + tensors.len() * 96);
    json.push('{');
    let mut first = true;
    if let Some(meta) = metadata {
        json.push_str("\"__metadata__\":{");
        for (i, (k, v)) in meta.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            push_json_str(&mut json, k);
            json.push(':');
            push_json_str(&mut json, v);
        }
        json.push('}');
        first = false;
    }
    let mut rel_offsets = vec![0u64; tensors.len()];
    let mut cursor = 0u64;
    for &i in &order {
        let (name, dtype, shape, nbytes) = tensors[i];
        if name.is_empty() || name == "__metadata__" {
            return Err(Error::invalid(format!("invalid tensor name {name:?}")));
        }
        check(i)?;
        let end = cursor + nbytes;
        if !first {
            json.push(',');
        }
        first = false;
        push_json_str(&mut json, name);
        json.push_str(":{\"dtype\":\"");
        json.push_str(dtype.name());
        json.push_str("\",\"shape\":[");
        for (j, d) in shape.iter().enumerate() {
            if j > 0 {
                json.push(',');
            }
            json.push_str(&d.to_string());
        }
        json.push_str(&format!("],\"data_offsets\":[{cursor},{end}]}}"));
        rel_offsets[i] = cursor;
        cursor = end;
    }
    json.push('}');
    let pad = (8 - json.len() % 8) % 8;
    json.extend(std::iter::repeat_n(' ', pad));
    let hlen = json.len() as u64;
    let mut header = Vec::with_capacity(8 + json.len());
    header.extend_from_slice(&hlen.to_le_bytes());
    header.extend_from_slice(json.as_bytes());
    let data_start = header.len() as u64;
    Ok(Layout {
        offsets: rel_offsets.iter().map(|o| o + data_start).collect(),
        file_size: data_start + cursor,
        header,
        order,
    })
}

/// Appends `s` as a JSON string literal, escaped the way serde_json does.
fn push_json_str(out: &mut String, s: &str) {
    // serde_json::to_string on a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}
