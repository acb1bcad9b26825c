//! Reading safetensors files: parse and validate the header (length bounds, JSON, known dtypes,
//! byte sizes against shapes, contiguous in-bounds offsets, exact file length) and map the file.
//! Every problem is an `Error::Corrupt` naming the file; no input makes it panic. Nothing is
//! sized from a declared length, count or offset: the heap it uses stays within a small multiple
//! of the file's size (the parsed header outgrows its JSON text; see tests/rust/header_fuzz.rs).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::header::MAX_HEADER_SIZE;
use crate::dtype::{numel, Dtype};
use crate::error::{Error, Result};

/// One tensor's entry in a header. Offsets are absolute positions in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub start: u64,
    pub end: u64,
}

/// A validated header, tensors in the order the file lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub metadata: Option<BTreeMap<String, String>>,
    pub tensors: Vec<TensorInfo>,
    /// First byte after the header (8 + header length).
    pub data_start: u64,
    pub file_size: u64,
}

#[derive(serde::Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

enum RawEntry {
    Meta(BTreeMap<String, String>),
    Tensor(String, RawInfo),
}

struct RawHeader(Vec<RawEntry>);

impl<'de> serde::Deserialize<'de> for RawHeader {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<RawHeader, A::Error> {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!("duplicate entry {key:?}")));
                    }
                    if key == "__metadata__" {
                        let m: BTreeMap<String, String> = map.next_value().map_err(|e| {
                            de::Error::custom(format!(
                                "__metadata__ must map strings to strings: {e}"
                            ))
                        })?;
                        out.push(RawEntry::Meta(m));
                    } else {
                        let info: RawInfo = map
                            .next_value()
                            .map_err(|e| de::Error::custom(format!("tensor {key:?}: {e}")))?;
                        out.push(RawEntry::Tensor(key, info));
                    }
                }
                Ok(RawHeader(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses and validates the JSON header `json` of a file of `file_size` bytes.
pub fn parse_header(path: &Path, json: &[u8], file_size: u64) -> Result<Header> {
    let bad = |r: String| Error::corrupt(path, r);
    let data_start = 8 + json.len() as u64;
    let text = std::str::from_utf8(json).map_err(|e| bad(format!("header is not UTF-8: {e}")))?;
    if !text.starts_with('{') {
        return Err(bad("header does not start with '{'".into()));
    }
    let raw: RawHeader =
        serde_json::from_str(text).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(raw.0.len());
    for entry in raw.0 {
        match entry {
            RawEntry::Meta(m) => metadata = Some(m),
            RawEntry::Tensor(name, info) => {
                let dtype: Dtype = info
                    .dtype
                    .parse()
                    .map_err(|e| bad(format!("tensor {name:?}: {e}")))?;
                let (s, e) = info.data_offsets;
                if e < s {
                    return Err(bad(format!(
                        "tensor {name:?}: data_offsets [{s}, {e}] end before start"
                    )));
                }
                let need = numel(&info.shape)
                    .and_then(|n| dtype.byte_size(n))
                    .ok_or_else(|| {
                        bad(format!("tensor {name:?}: shape {:?} overflows", info.shape))
                    })?;
                if need != e - s {
                    return Err(bad(format!(
                        "tensor {name:?}: {dtype} {:?} needs {need} bytes but data_offsets [{s}, {e}] hold {}",
                        info.shape,
                        e - s
                    )));
                }
                tensors.push(TensorInfo {
                    name,
                    dtype,
                    shape: info.shape,
                    start: s,
                    end: e,
                });
            }
        }
    }
    let mut by_start: Vec<&TensorInfo> = tensors.iter().collect();
    by_start.sort_by_key(|t| (t.start, t.end));
    let mut cursor = 0u64;
    for t in by_start {
        if t.start != cursor {
            let what = if t.start < cursor {
                "overlaps the previous tensor"
            } else {
                "leaves a gap"
            };
            return Err(bad(format!(
                "tensor {:?}: data_offsets [{}, {}] {what} (expected start {cursor})",
                t.name, t.start, t.end
            )));
        }
        cursor = t.end;
    }
    let data_len = file_size.checked_sub(data_start).ok_or_else(|| {
        bad(format!(
            "file of {file_size} bytes is shorter than its {data_start}-byte header"
        ))
    })?;
    if cursor != data_len {
        return Err(bad(format!(
            "tensor data ends at byte {cursor} but the file holds {data_len} data bytes (truncated or trailing garbage)"
        )));
    }
    for t in &mut tensors {
        t.start += data_start;
        t.end += data_start;
    }
    Ok(Header {
        metadata,
        tensors,
        data_start,
        file_size,
    })
}

/// Validates the 8-byte length prefix against the file size and returns the header length.
fn header_len(path: &Path, prefix: [u8; 8], file_size: u64) -> Result<u64> {
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_SIZE {
        return Err(Error::corrupt(
            path,
            format!("declared header length {n} exceeds the limit of {MAX_HEADER_SIZE} bytes"),
        ));
    }
    if n > file_size - 8 {
        return Err(Error::corrupt(
            path,
            format!("declared header length {n} is larger than the file ({file_size} bytes)"),
        ));
    }
    Ok(n)
}

fn open_sized(path: &Path) -> Result<(File, u64)> {
    let f = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let meta = f.metadata().map_err(|e| Error::io(path, "stat", e))?;
    if !meta.is_file() {
        return Err(Error::corrupt(path, "not a regular file"));
    }
    let size = meta.len();
    if size < 8 {
        return Err(Error::corrupt(
            path,
            format!("file is {size} bytes, too small for a header"),
        ));
    }
    Ok((f, size))
}

/// Reads and validates only the header of `path`.
pub fn read_header(path: &Path) -> Result<Header> {
    let (mut f, size) = open_sized(path)?;
    let mut prefix = [0u8; 8];
    f.read_exact(&mut prefix)
        .map_err(|e| Error::io(path, "read", e))?;
    let n = header_len(path, prefix, size)?;
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json)
        .map_err(|e| Error::io(path, "read", e))?;
    parse_header(path, &json, size)
}

/// A validated file mapped into memory (private copy-on-write mapping: writes through it never
/// reach the file).
pub struct MappedFile {
    pub path: PathBuf,
    pub header: Header,
    pub map: memmap2::MmapMut,
}

impl MappedFile {
    /// The bytes of one tensor.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.start as usize..t.end as usize]
    }
}

/// Maps `path` and validates its header against the mapped bytes.
pub fn map_file(path: &Path) -> Result<MappedFile> {
    let (f, size) = open_sized(path)?;
    // SAFETY: the mapping is private (MAP_PRIVATE), so our writes never reach the file. The
    // header is validated against the size observed at map time; a concurrent truncation of
    // the file by another process is outside the contract (as for every mmap-based reader).
    let map = unsafe { memmap2::MmapOptions::new().map_copy(&f) }
        .map_err(|e| Error::io(path, "mmap", e))?;
    if map.len() as u64 != size {
        return Err(Error::corrupt(path, "file changed size while being mapped"));
    }
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&map[..8]);
    let n = header_len(path, prefix, size)?;
    let header = parse_header(path, &map[8..8 + n as usize], size)?;
    Ok(MappedFile {
        path: path.to_path_buf(),
        header,
        map,
    })
}
