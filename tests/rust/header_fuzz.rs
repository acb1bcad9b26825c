//! Fuzzing the safetensors reader (`parse_header`, `read_header`, `map_file`). Structured
//! generators build valid files from a model of the format, then mutate them at three levels:
//! fields of the model (duplicate names, bad dtypes, overflowing shapes, overlapping or
//! out-of-bounds offsets, non-string metadata, deep JSON, very long names), the JSON text (cut,
//! trailing garbage, bad escapes, NUL) and the file bytes (truncation, bit flips, declared
//! lengths, invalid UTF-8). Every input must end in `Ok` with a sound header or in
//! `Err(Error::Corrupt)`: never a panic, and never an allocation sized by a declared number. For
//! field-level mutations the model (`Model::expected`) says exactly what the reader must return.
//!
//! `cargo test --test header_fuzz` runs a few seconds of cases (`PROPTEST_CASES=N` for more);
//! `cargo test --release --test header_fuzz -- --ignored --nocapture` runs the 1M-input loop
//! (`FUZZ_INPUTS`, `FUZZ_SECONDS` change its size and time limit).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use quantsave::safetensors::{
    map_file, parse_header, read_header, Header, TensorInfo, MAX_HEADER_SIZE,
};
use quantsave::{Dtype, Error};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Allocation accounting: the largest single request and the peak of live bytes on this thread
// while a reader runs.
// ---------------------------------------------------------------------------------------------

struct CountingAlloc;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    // `try_with`: the slots may already be gone while the thread shuts down.
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            LIVE.with(|l| {
                l.set(l.get() + size);
                PEAK.with(|p| p.set(p.get().max(l.get())));
            });
            LARGEST.with(|m| m.set(m.get().max(size)));
        }
    });
}

fn note_dealloc(size: usize) {
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            LIVE.with(|l| l.set(l.get().saturating_sub(size)));
        }
    });
}

// SAFETY: every method forwards to `System` with the same layout and pointer; the bookkeeping
// touches only const-initialised thread-local `Cell`s, which never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_dealloc(layout.size());
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_dealloc(layout.size());
        note_alloc(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    peak: usize,
    largest: usize,
}

fn measure<T>(f: impl FnOnce() -> T) -> (T, Usage) {
    LIVE.with(|c| c.set(0));
    PEAK.with(|c| c.set(0));
    LARGEST.with(|c| c.set(0));
    ARMED.with(|a| a.set(true));
    let out = f();
    ARMED.with(|a| a.set(false));
    let usage = Usage {
        peak: PEAK.with(Cell::get),
        largest: LARGEST.with(Cell::get),
    };
    (out, usage)
}

/// What reading a file of `file_len` bytes may allocate: a small multiple of the file (the
/// parsed header is bigger than its JSON text: a `"shape":[0,0,...]` of 2 bytes per element
/// becomes 8 bytes per element, doubled by `Vec` growth) plus a constant. Nothing may be sized
/// from a declared length, count or offset.
fn alloc_bound(file_len: usize) -> usize {
    16 * file_len + (64 << 10)
}

// ---------------------------------------------------------------------------------------------
// The model of a file and its oracle
// ---------------------------------------------------------------------------------------------

const FIELDS: [&str; 3] = ["dtype", "shape", "data_offsets"];

#[derive(Debug, Clone)]
enum MetaValue {
    Str(String),
    /// JSON text that is not a string.
    Raw(String),
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    /// A dtype name; may be unknown.
    dtype: String,
    shape: Vec<u64>,
    /// Relative to the start of the data section, as in the file.
    offsets: (u64, u64),
    /// Rotates the order of the three fields.
    field_order: usize,
    /// Written as `[dtype, shape, data_offsets]` (serde's struct-as-sequence form, which the
    /// reader accepts like the safetensors crate does).
    as_array: bool,
    /// An extra `key: json` field (an extra element in array form).
    extra: Option<(String, String)>,
    /// JSON text written instead of the whole entry value.
    raw: Option<String>,
}

#[derive(Debug, Clone)]
struct Model {
    metadata: Option<Vec<(String, MetaValue)>>,
    metadata_twice: bool,
    /// Position of `__metadata__` among the entries.
    meta_at: usize,
    entries: Vec<Entry>,
    /// Bytes after the header (the tensors' data, or more or less).
    data_len: u64,
    data_fill: Option<u8>,
    /// Spaces after the JSON object: None pads to a multiple of 8.
    pad: Option<usize>,
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn shape_json(shape: &[u64]) -> String {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    format!("[{}]", dims.join(","))
}

impl Entry {
    fn render(&self) -> String {
        let value = if let Some(raw) = &self.raw {
            raw.clone()
        } else if self.as_array {
            let (s, e) = self.offsets;
            let extra = self
                .extra
                .as_ref()
                .map(|(_, v)| format!(",{v}"))
                .unwrap_or_default();
            format!(
                "[{},{},[{s},{e}]{extra}]",
                json_str(&self.dtype),
                shape_json(&self.shape)
            )
        } else {
            let (s, e) = self.offsets;
            let mut fields = vec![
                format!("\"dtype\":{}", json_str(&self.dtype)),
                format!("\"shape\":{}", shape_json(&self.shape)),
                format!("\"data_offsets\":[{s},{e}]"),
            ];
            fields.rotate_left(self.field_order % 3);
            if let Some((k, v)) = &self.extra {
                fields.insert(self.field_order % 4, format!("{}:{v}", json_str(k)));
            }
            format!("{{{}}}", fields.join(","))
        };
        format!("{}:{value}", json_str(&self.name))
    }

    fn byte_size(&self) -> Option<u64> {
        let dtype = parse_dtype(&self.dtype)?;
        let numel = self.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
        let bits = u128::from(numel) * u128::from(dtype.bits());
        (bits % 8 == 0).then(|| u64::try_from(bits / 8).ok())?
    }
}

fn parse_dtype(name: &str) -> Option<Dtype> {
    Dtype::all().iter().copied().find(|d| d.name() == name)
}

impl Model {
    fn json(&self) -> String {
        let mut parts: Vec<String> = self.entries.iter().map(Entry::render).collect();
        if let Some(md) = &self.metadata {
            let pairs: Vec<String> = md
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        MetaValue::Str(s) => json_str(s),
                        MetaValue::Raw(r) => r.clone(),
                    };
                    format!("{}:{v}", json_str(k))
                })
                .collect();
            let block = format!("\"__metadata__\":{{{}}}", pairs.join(","));
            let at = self.meta_at.min(parts.len());
            parts.insert(at, block.clone());
            if self.metadata_twice {
                parts.push(block);
            }
        }
        format!("{{{}}}", parts.join(","))
    }

    fn header_text(&self) -> Vec<u8> {
        pad(self.json().into_bytes(), self.pad)
    }

    fn data(&self) -> Vec<u8> {
        (0..self.data_len)
            .map(|i| self.data_fill.unwrap_or((i as u8).wrapping_mul(31) ^ 0x5a))
            .collect()
    }

    fn file(&self) -> Vec<u8> {
        file_of(&self.header_text(), &self.data())
    }

    /// What the reader must return for `self.file()`: the header, or None for a rejection.
    fn expected(&self) -> Option<Header> {
        let header_len = self.header_text().len() as u64;
        let mut keys: HashSet<&str> = HashSet::new();
        if self.metadata.is_some() {
            keys.insert("__metadata__");
            if self.metadata_twice {
                return None;
            }
        }
        if !self.entries.iter().all(|e| keys.insert(&e.name)) {
            return None;
        }
        let metadata = match &self.metadata {
            Some(pairs) => {
                let mut m = BTreeMap::new(); // a repeated key: the last one wins
                for (k, v) in pairs {
                    match v {
                        MetaValue::Str(s) => m.insert(k.clone(), s.clone()),
                        MetaValue::Raw(_) => return None,
                    };
                }
                Some(m)
            }
            // An entry named `__metadata__` is read as metadata: a tensor entry (its shape is
            // not a string) is rejected, a raw value only if it is not an object of strings.
            None => match self.entries.iter().find(|e| e.name == "__metadata__") {
                Some(e) => Some(serde_json::from_str(e.raw.as_deref()?).ok()?),
                None => None,
            },
        };
        let entries: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.name != "__metadata__")
            .collect();
        let mut sizes = Vec::new();
        for e in &entries {
            if e.raw.is_some() {
                return None;
            }
            if let Some((k, _)) = &e.extra {
                if e.as_array || FIELDS.contains(&k.as_str()) {
                    return None;
                }
            }
            let (s, end) = e.offsets;
            if end < s || Some(end - s) != e.byte_size() {
                return None;
            }
            sizes.push((s, end));
        }
        // The non-empty ranges tile [0, data_len) exactly; an empty one sits at a boundary.
        let mut full: Vec<(u64, u64)> = sizes.iter().copied().filter(|(s, e)| s < e).collect();
        full.sort_unstable();
        let mut cursor = 0;
        for &(s, e) in &full {
            if s != cursor {
                return None;
            }
            cursor = e;
        }
        if cursor != self.data_len {
            return None;
        }
        for &(s, e) in &sizes {
            if s == e && (s > self.data_len || full.iter().any(|&(a, b)| a < s && s < b)) {
                return None;
            }
        }
        let data_start = 8 + header_len;
        let tensors = entries
            .iter()
            .map(|e| TensorInfo {
                name: e.name.clone(),
                dtype: parse_dtype(&e.dtype).unwrap(),
                shape: e.shape.clone(),
                start: e.offsets.0 + data_start,
                end: e.offsets.1 + data_start,
            })
            .collect();
        Some(Header {
            metadata,
            tensors,
            data_start,
            file_size: data_start + self.data_len,
        })
    }

    fn fix_layout(&mut self, order_seed: u64) {
        // Contiguous offsets in a shuffled order, so the file order differs from the data order.
        let mut order: Vec<usize> = (0..self.entries.len()).collect();
        order.sort_by_key(|&i| splitmix(order_seed ^ i as u64));
        let mut cursor = 0;
        for i in order {
            let n = self.entries[i].byte_size().unwrap();
            self.entries[i].offsets = (cursor, cursor + n);
            cursor += n;
        }
        self.data_len = cursor;
    }
}

fn pad(mut text: Vec<u8>, pad: Option<usize>) -> Vec<u8> {
    let n = pad.unwrap_or((8 - text.len() % 8) % 8);
    text.resize(text.len() + n, b' ');
    text
}

fn file_of(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

fn gen_name() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => "[a-z][a-z0-9_]{0,6}(\\.[a-z0-9_]{1,8}){0,3}",
        3 => "[a-zA-Z0-9_.\"\\\\ /\u{e9}\u{1F600}\u{7f}\u{1}\u{0}\u{2028}\u{fffd}]{0,8}",
        1 => (1usize..70_000, prop::sample::select(vec!['a', '\u{e9}', '"', '\u{10FFFF}']))
            .prop_map(|(n, c)| c.to_string().repeat(n)),
    ]
}

fn gen_entry() -> impl Strategy<Value = Entry> {
    (
        gen_name(),
        prop::sample::select(Dtype::all()),
        prop::collection::vec(prop_oneof![4 => 1u64..6, 1 => Just(0u64)], 0..4),
        0usize..12,
    )
        .prop_map(|(name, dtype, mut shape, field_order)| {
            if quantsave::dtype::numel(&shape)
                .and_then(|n| dtype.byte_size(n))
                .is_none()
            {
                shape.push(8); // sub-byte dtypes need a whole number of bytes
            }
            Entry {
                name,
                dtype: dtype.name().to_string(),
                shape,
                offsets: (0, 0),
                field_order,
                as_array: false,
                extra: None,
                raw: None,
            }
        })
}

fn gen_meta_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("pt".to_string()),
        "[a-z0-9_ ]{0,12}",
        "[\"\\\\\u{0}\u{e9}\u{1F600}{}\\[\\]:,]{0,6}",
    ]
}

/// A valid file.
fn gen_model() -> impl Strategy<Value = Model> {
    (
        prop::collection::vec(gen_entry(), 0..8),
        prop::option::weighted(
            0.7,
            prop::collection::vec(
                ("[a-z_]{1,8}", gen_meta_string()).prop_map(|(k, v)| (k, MetaValue::Str(v))),
                0..4,
            ),
        ),
        0usize..9,
        any::<u64>(),
        prop_oneof![6 => Just(None), 1 => Just(Some(b' ')), 1 => Just(Some(0u8))],
        prop_oneof![4 => Just(None), 1 => (0usize..17).prop_map(Some)],
    )
        .prop_map(|(entries, metadata, meta_at, seed, data_fill, pad)| {
            let mut seen = HashSet::new();
            let entries = entries
                .into_iter()
                .filter(|e| e.name != "__metadata__" && seen.insert(e.name.clone()))
                .collect();
            let mut m = Model {
                metadata,
                metadata_twice: false,
                meta_at,
                entries,
                data_len: 0,
                data_fill,
                pad,
            };
            m.fix_layout(seed);
            m
        })
}

/// Deeply nested JSON: `[[[...]]]` or `{"a":{"a":...}}`.
fn deep_json(depth: usize, object: bool) -> String {
    if object {
        format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
    } else {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }
}

/// JSON values that are not strings (for metadata values, ignored fields, whole entries).
fn gen_json_value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec![
            "null", "true", "false", "0", "-1", "1.5", "18446744073709551616", "[]", "{}",
            "[1,\"a\",null]", "{\"a\":{\"b\":[]}}", "{\"dtype\":\"U8\"}",
        ])
        .prop_map(str::to_string),
        1 => (1usize..5_000, any::<bool>()).prop_map(|(d, o)| deep_json(d, o)),
    ]
}

/// Entry values that are not tensor entries.
fn gen_bad_entry_value() -> impl Strategy<Value = String> {
    prop_oneof![
        gen_json_value(),
        prop::sample::select(vec![
            r#"{"shape":[1],"data_offsets":[0,1]}"#,
            r#"{"dtype":"U8","data_offsets":[0,1]}"#,
            r#"{"dtype":"U8","shape":[1]}"#,
            r#"{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}"#,
            r#"{"dtype":"U8","shape":[1],"data_offsets":[1]}"#,
            r#"{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}"#,
            r#"{"dtype":"U8","shape":[1],"data_offsets":[0.0,1.0]}"#,
            r#"{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}"#,
            r#"{"dtype":"U8","shape":1,"data_offsets":[0,1]}"#,
            r#"{"dtype":8,"shape":[1],"data_offsets":[0,1]}"#,
            r#"{"dtype":"U8","shape":["1"],"data_offsets":[0,1]}"#,
            r#"{"dtype":"U8","shape":[0],"data_offsets":[0,0],"dtype":"U8"}"#,
            r#"{"dtype":"U8","shape":[0],"data_offsets":[0,18446744073709551616]}"#,
            r#"["U8",[0]]"#,
            r#"["U8",[0],[0,0],1]"#,
        ])
        .prop_map(str::to_string),
    ]
}

fn gen_interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..20,
        1 => prop::sample::select(vec![
            u64::from(u32::MAX),
            1 << 32,
            (1 << 32) + 1,
            1 << 61,
            1 << 62,
            1 << 63,
            u64::MAX - 1,
            u64::MAX,
            MAX_HEADER_SIZE,
        ]),
        1 => any::<u64>(),
    ]
}

/// A change to one field of the model; the oracle decides what the reader must say.
#[derive(Debug, Clone)]
enum FieldMut {
    DupName(usize, usize),
    NameIsMetadata(usize),
    MetadataTwice,
    DupMetaKey,
    MetaValue(usize, String),
    Dtype(usize, String),
    Dim(usize, usize, u64),
    Shape(usize, Vec<u64>),
    /// Appends two dimensions of 2^63 + 1: the element count overflows u64 but wraps to the
    /// old count ((2^63 + 1)^2 = 1 mod 2^64), so only an overflow check rejects it.
    WrappingShape(usize),
    Start(usize, u64),
    End(usize, u64),
    Shift(usize, i64),
    SwapOffsets(usize),
    OutOfBounds(usize, u64),
    DataLen(i64),
    RawEntry(usize, String),
    AsArray(usize),
    Extra(usize, String, String),
    LongName(usize, usize),
    MoveMetadata(usize),
    Pad(usize),
    Remove(usize),
}

fn gen_field_mut() -> impl Strategy<Value = FieldMut> {
    let i = any::<usize>();
    prop_oneof![
        (i, any::<usize>()).prop_map(|(a, b)| FieldMut::DupName(a, b)),
        i.prop_map(FieldMut::NameIsMetadata),
        Just(FieldMut::MetadataTwice),
        Just(FieldMut::DupMetaKey),
        (i, gen_json_value()).prop_map(|(a, v)| FieldMut::MetaValue(a, v)),
        (
            i,
            prop_oneof![
                prop::sample::select(Dtype::all()).prop_map(|d| d.name().to_string()),
                prop::sample::select(vec![
                    "F16X", "f32", "", "FLOAT", "F8", "Q4_0", "U8 ", "u8", "F4\u{0}", "I4", "BF8"
                ])
                .prop_map(str::to_string),
                "[A-Z0-9_]{0,6}",
            ]
        )
            .prop_map(|(a, d)| FieldMut::Dtype(a, d)),
        (i, 0usize..5, gen_interesting_u64()).prop_map(|(a, j, v)| FieldMut::Dim(a, j, v)),
        (
            i,
            prop::sample::select(vec![
                vec![1u64 << 32, 1 << 32],
                vec![u64::MAX, 2],
                vec![1 << 63, 2],
                vec![1 << 62, 8],
                vec![1 << 61],
                vec![u64::MAX, u64::MAX, 0],
                vec![0, u64::MAX, u64::MAX],
                vec![1 << 63, 0],
                vec![1; 64],
                vec![1; 5000],
                vec![0; 3],
                vec![],
            ])
        )
            .prop_map(|(a, s)| FieldMut::Shape(a, s)),
        i.prop_map(FieldMut::WrappingShape),
        (i, gen_interesting_u64()).prop_map(|(a, v)| FieldMut::Start(a, v)),
        (i, gen_interesting_u64()).prop_map(|(a, v)| FieldMut::End(a, v)),
        (i, prop_oneof![-16i64..16, Just(i64::MIN), Just(i64::MAX)])
            .prop_map(|(a, d)| FieldMut::Shift(a, d)),
        i.prop_map(FieldMut::SwapOffsets),
        (i, gen_interesting_u64()).prop_map(|(a, k)| FieldMut::OutOfBounds(a, k)),
        (-9i64..9).prop_map(FieldMut::DataLen),
        (i, gen_bad_entry_value()).prop_map(|(a, v)| FieldMut::RawEntry(a, v)),
        i.prop_map(FieldMut::AsArray),
        (
            i,
            prop_oneof![
                3 => "[a-z_]{1,6}",
                1 => prop::sample::select(FIELDS.to_vec()).prop_map(str::to_string),
            ],
            prop_oneof![gen_json_value(), Just("\"x\"".to_string())]
        )
            .prop_map(|(a, k, v)| FieldMut::Extra(a, k, v)),
        (i, 1usize..100_000).prop_map(|(a, n)| FieldMut::LongName(a, n)),
        (0usize..9).prop_map(FieldMut::MoveMetadata),
        (0usize..64).prop_map(FieldMut::Pad),
        i.prop_map(FieldMut::Remove),
    ]
}

impl FieldMut {
    fn apply(&self, m: &mut Model) {
        let n = m.entries.len();
        let pick = |i: usize| (n > 0).then(|| i % n);
        match self {
            FieldMut::DupName(a, b) => {
                if let (Some(a), Some(b)) = (pick(*a), pick(*b)) {
                    m.entries[b].name = m.entries[a].name.clone();
                }
            }
            FieldMut::NameIsMetadata(a) => {
                if let Some(a) = pick(*a) {
                    m.entries[a].name = "__metadata__".into();
                }
            }
            FieldMut::MetadataTwice => m.metadata_twice = m.metadata.is_some(),
            FieldMut::DupMetaKey => {
                let md = m.metadata.get_or_insert_with(Vec::new);
                let key = md.first().map_or("format".to_string(), |(k, _)| k.clone());
                md.push((key, MetaValue::Str("again".into())));
            }
            FieldMut::MetaValue(a, v) => {
                let md = m.metadata.get_or_insert_with(Vec::new);
                if md.is_empty() {
                    md.push(("format".into(), MetaValue::Raw(v.clone())));
                } else {
                    let k = a % md.len();
                    md[k].1 = MetaValue::Raw(v.clone());
                }
            }
            FieldMut::Dtype(a, d) => {
                if let Some(a) = pick(*a) {
                    m.entries[a].dtype = d.clone();
                }
            }
            FieldMut::Dim(a, j, v) => {
                if let Some(a) = pick(*a) {
                    let shape = &mut m.entries[a].shape;
                    if *j < shape.len() {
                        shape[*j] = *v;
                    } else {
                        shape.push(*v);
                    }
                }
            }
            FieldMut::Shape(a, s) => {
                if let Some(a) = pick(*a) {
                    m.entries[a].shape = s.clone();
                }
            }
            FieldMut::WrappingShape(a) => {
                if let Some(a) = pick(*a) {
                    m.entries[a].shape.extend([(1 << 63) + 1, (1 << 63) + 1]);
                }
            }
            FieldMut::Start(a, v) => {
                if let Some(a) = pick(*a) {
                    m.entries[a].offsets.0 = *v;
                }
            }
            FieldMut::End(a, v) => {
                if let Some(a) = pick(*a) {
                    m.entries[a].offsets.1 = *v;
                }
            }
            FieldMut::Shift(a, d) => {
                if let Some(a) = pick(*a) {
                    let (s, e) = m.entries[a].offsets;
                    let shift = |x: u64| x.saturating_add_signed(*d);
                    m.entries[a].offsets = (shift(s), shift(e));
                }
            }
            FieldMut::SwapOffsets(a) => {
                if let Some(a) = pick(*a) {
                    let (s, e) = m.entries[a].offsets;
                    m.entries[a].offsets = (e, s);
                }
            }
            FieldMut::OutOfBounds(a, k) => {
                if let Some(a) = pick(*a) {
                    let (s, e) = m.entries[a].offsets;
                    let start = m.data_len.saturating_add(*k);
                    m.entries[a].offsets = (start, start.saturating_add(e.abs_diff(s)));
                }
            }
            FieldMut::DataLen(d) => m.data_len = m.data_len.saturating_add_signed(*d),
            FieldMut::RawEntry(a, v) => {
                if let Some(a) = pick(*a) {
                    m.entries[a].raw = Some(v.clone());
                }
            }
            FieldMut::AsArray(a) => {
                if let Some(a) = pick(*a) {
                    m.entries[a].as_array = true;
                }
            }
            FieldMut::Extra(a, k, v) => {
                if let Some(a) = pick(*a) {
                    m.entries[a].extra = Some((k.clone(), v.clone()));
                }
            }
            FieldMut::LongName(a, len) => {
                if let Some(a) = pick(*a) {
                    m.entries[a].name = format!("{}{}", "x".repeat(*len), a);
                }
            }
            FieldMut::MoveMetadata(at) => m.meta_at = *at,
            FieldMut::Pad(p) => m.pad = Some(*p),
            FieldMut::Remove(a) => {
                if let Some(a) = pick(*a) {
                    m.entries.remove(a);
                }
            }
        }
    }
}

/// A change to the JSON text (the length prefix follows it).
#[derive(Debug, Clone)]
enum JsonBreak {
    /// Keeps a strict prefix of the object: must fail.
    Cut(usize),
    /// Text after the object: must fail.
    Trailing(String),
    /// `,}` at the end of the object: must fail.
    TrailingComma,
    /// Text before the object: must fail.
    Leading(String),
    /// Not an object at all: must fail.
    NotObject(String),
    /// A NUL byte inside the object: must fail.
    Nul(usize),
    /// An extra zero-size entry whose name is the given invalid JSON string body: must fail.
    BadName(String),
    /// Replaces a structural character: anything goes.
    Structural(usize, u8),
}

fn gen_json_break() -> impl Strategy<Value = JsonBreak> {
    prop_oneof![
        any::<usize>().prop_map(JsonBreak::Cut),
        prop::sample::select(vec!["x", "}", "{}", "\0", ",", "\u{feff}", "//", "]"])
            .prop_map(|s| JsonBreak::Trailing(s.into())),
        Just(JsonBreak::TrailingComma),
        prop::sample::select(vec![" ", "\n", "\u{feff}", "\0", "x", "[", "{\"a\":"])
            .prop_map(|s| JsonBreak::Leading(s.into())),
        prop::sample::select(vec![
            "", "[]", "null", "1", "\"x\"", "[{}]", "true", "{", "}", "{{}}", "{\"a\"}", "{:}",
            "{'a': 1}",
        ])
        .prop_map(|s| JsonBreak::NotObject(s.into())),
        any::<usize>().prop_map(JsonBreak::Nul),
        prop::sample::select(vec![
            "\\ud800",
            "\\udc00",
            "\\ud800\\u0041",
            "\\udbff\\udbff",
            "\\x41",
            "\\u12",
            "\\uZZZZ",
            "\\ ",
            "\\",
            "\u{1}",
            "\t",
            "\n",
            "\u{1f}",
        ])
        .prop_map(|s| JsonBreak::BadName(s.into())),
        (
            any::<usize>(),
            prop::sample::select(b"{}[]:,\" 0a".to_vec())
        )
            .prop_map(|(p, c)| JsonBreak::Structural(p, c)),
    ]
}

impl JsonBreak {
    /// The new JSON text and whether the reader must reject it.
    fn apply(&self, json: &str) -> (Vec<u8>, bool) {
        let b = json.as_bytes();
        match self {
            JsonBreak::Cut(p) => (b[..p % b.len()].to_vec(), true),
            JsonBreak::Trailing(s) => ([b, s.as_bytes()].concat(), true),
            JsonBreak::TrailingComma => {
                let mut out = b[..b.len() - 1].to_vec();
                out.extend_from_slice(b",}");
                (out, true)
            }
            JsonBreak::Leading(s) => ([s.as_bytes(), b].concat(), true),
            JsonBreak::NotObject(s) => (s.as_bytes().to_vec(), true),
            JsonBreak::Nul(p) => {
                let mut out = b.to_vec();
                out.insert(1 + p % (b.len() - 1), 0);
                (out, true)
            }
            JsonBreak::BadName(name) => {
                let entry =
                    format!("\"{name}\":{{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}}");
                let sep = if b.len() > 2 { "," } else { "" };
                (format!("{{{entry}{sep}{}", &json[1..]).into_bytes(), true)
            }
            JsonBreak::Structural(p, c) => {
                let mut out = b.to_vec();
                let spots: Vec<usize> = (0..b.len())
                    .filter(|&i| b"{}[]:,\"".contains(&b[i]))
                    .collect();
                out[spots[p % spots.len()]] = *c;
                (out, false)
            }
        }
    }
}

/// The 8-byte length prefix.
#[derive(Debug, Clone)]
enum LenKind {
    Fixed(u64),
    Delta(i64),
    FileMinus(u64),
}

/// A change to the file bytes.
#[derive(Debug, Clone)]
enum ByteMut {
    /// Cut to `p % len` bytes: must fail.
    Truncate(usize),
    /// Bytes after the data: must fail.
    Append(Vec<u8>),
    /// A declared header length other than the real one: must fail.
    Len(LenKind),
    /// An invalid UTF-8 sequence written over the header text: must fail.
    BadUtf8(usize, usize),
    FlipBit(usize, u8),
    SetByte(usize, u8),
    Insert(usize, u8),
    Remove(usize),
}

const BAD_UTF8: [&[u8]; 6] = [
    &[0xff],
    &[0xfe],
    &[0xc0, 0x80],
    &[0xed, 0xa0, 0x80],
    &[0xf8, 0x88, 0x80, 0x80, 0x80],
    &[0xc3, 0x28],
];

fn gen_must_fail_byte_mut() -> impl Strategy<Value = ByteMut> {
    prop_oneof![
        any::<usize>().prop_map(ByteMut::Truncate),
        prop::collection::vec(any::<u8>(), 1..16).prop_map(ByteMut::Append),
        prop_oneof![
            prop::sample::select(vec![
                0,
                1,
                7,
                u64::MAX,
                u64::MAX - 7,
                1 << 63,
                1 << 40,
                1 << 32,
                MAX_HEADER_SIZE,
                MAX_HEADER_SIZE + 1,
            ])
            .prop_map(LenKind::Fixed),
            prop_oneof![-64i64..0, 1i64..64].prop_map(LenKind::Delta),
            (0u64..9).prop_map(LenKind::FileMinus),
        ]
        .prop_map(ByteMut::Len),
        (any::<usize>(), 0..BAD_UTF8.len()).prop_map(|(p, k)| ByteMut::BadUtf8(p, k)),
    ]
}

fn gen_either_byte_mut() -> impl Strategy<Value = ByteMut> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| ByteMut::FlipBit(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| ByteMut::SetByte(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| ByteMut::Insert(p, b)),
        any::<usize>().prop_map(ByteMut::Remove),
    ]
}

impl ByteMut {
    /// Applies the change to a non-empty file (at least 8 bytes for `Len` and `BadUtf8`);
    /// returns whether the reader must now reject the file (None: the change did not apply).
    fn apply(&self, bytes: &mut Vec<u8>) -> Option<bool> {
        let len = bytes.len();
        let header_len = || u64::from_le_bytes(bytes[..8].try_into().unwrap());
        match self {
            ByteMut::Truncate(p) => bytes.truncate(p % len),
            ByteMut::Append(extra) => bytes.extend_from_slice(extra),
            ByteMut::Len(kind) => {
                let n = match kind {
                    LenKind::Fixed(n) => *n,
                    LenKind::Delta(d) => header_len().checked_add_signed(*d)?,
                    LenKind::FileMinus(k) => (len as u64).saturating_sub(*k),
                };
                if n == header_len() {
                    return None;
                }
                bytes[..8].copy_from_slice(&n.to_le_bytes());
            }
            ByteMut::BadUtf8(p, k) => {
                let header_len = header_len() as usize;
                if header_len == 0 {
                    return None;
                }
                let at = 8 + p % header_len;
                let seq = BAD_UTF8[*k];
                let end = (at + seq.len()).min(8 + header_len);
                bytes[at..end].copy_from_slice(&seq[..end - at]);
                // A cut-short sequence is still invalid, except a lone 0x80..=0xBF tail we never write.
            }
            ByteMut::FlipBit(p, b) => {
                bytes[p % len] ^= 1 << b;
                return Some(false);
            }
            ByteMut::SetByte(p, b) => {
                bytes[p % len] = *b;
                return Some(false);
            }
            ByteMut::Insert(p, b) => {
                bytes.insert(p % (len + 1), *b);
                return Some(false);
            }
            ByteMut::Remove(p) => {
                bytes.remove(p % len);
                return Some(false);
            }
        }
        Some(true)
    }
}

/// One fuzz input.
#[derive(Debug, Clone)]
enum Case {
    Fields(Model, Vec<FieldMut>),
    Json(Model, Vec<FieldMut>, JsonBreak),
    OneByteMut(Model, Vec<FieldMut>, ByteMut),
    ByteMuts(Model, Vec<ByteMut>),
}

/// What the reader must do with an input.
#[derive(Debug)]
enum Expect {
    Exactly(Option<Box<Header>>),
    Reject,
    Either,
}

fn gen_case() -> impl Strategy<Value = Case> {
    let fields = || prop::collection::vec(gen_field_mut(), 0..4);
    prop_oneof![
        4 => (gen_model(), fields()).prop_map(|(m, f)| Case::Fields(m, f)),
        2 => (gen_model(), prop::collection::vec(gen_field_mut(), 0..2), gen_json_break())
            .prop_map(|(m, f, j)| Case::Json(m, f, j)),
        2 => (gen_model(), prop::collection::vec(gen_field_mut(), 0..2), gen_must_fail_byte_mut())
            .prop_map(|(m, f, b)| Case::OneByteMut(m, f, b)),
        2 => (gen_model(), prop::collection::vec(gen_either_byte_mut(), 1..5))
            .prop_map(|(m, b)| Case::ByteMuts(m, b)),
    ]
}

impl Case {
    fn label(&self) -> &'static str {
        match self {
            Case::Fields(_, f) if f.is_empty() => "valid",
            Case::Fields(..) => "fields",
            Case::Json(..) => "json",
            Case::OneByteMut(..) => "bytes-must-fail",
            Case::ByteMuts(..) => "bytes-any",
        }
    }

    /// The file bytes and what the reader must do with them.
    fn build(&self) -> (Vec<u8>, Expect) {
        let mutated = |m: &Model, fields: &[FieldMut]| {
            let mut m = m.clone();
            for f in fields {
                f.apply(&mut m);
            }
            m
        };
        match self {
            Case::Fields(m, fields) => {
                let m = mutated(m, fields);
                (m.file(), Expect::Exactly(m.expected().map(Box::new)))
            }
            Case::Json(m, fields, brk) => {
                let m = mutated(m, fields);
                let valid = m.expected().is_some();
                let (json, must_fail) = brk.apply(&m.json());
                let bytes = file_of(&pad(json, m.pad), &m.data());
                (
                    bytes,
                    if must_fail && valid {
                        Expect::Reject
                    } else {
                        Expect::Either
                    },
                )
            }
            Case::OneByteMut(m, fields, bm) => {
                let m = mutated(m, fields);
                let valid = m.expected().is_some();
                let mut bytes = m.file();
                let expect = match bm.apply(&mut bytes) {
                    Some(true) if valid => Expect::Reject,
                    None => Expect::Exactly(m.expected().map(Box::new)),
                    _ => Expect::Either,
                };
                (bytes, expect)
            }
            Case::ByteMuts(m, muts) => {
                let mut bytes = m.file();
                for bm in muts {
                    if !bytes.is_empty() {
                        bm.apply(&mut bytes);
                    }
                }
                (bytes, Expect::Either)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

const MEM: &str = "mem.safetensors";

/// What `read_header` does, on bytes in memory: the length prefix checks, then `parse_header`.
fn read_mem(bytes: &[u8]) -> quantsave::Result<Header> {
    let corrupt = |reason: &str| Error::Corrupt {
        path: MEM.into(),
        reason: reason.into(),
    };
    if bytes.len() < 8 {
        return Err(corrupt("short"));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if n > MAX_HEADER_SIZE || n > bytes.len() as u64 - 8 {
        return Err(corrupt("length"));
    }
    parse_header(
        Path::new(MEM),
        &bytes[8..8 + n as usize],
        bytes.len() as u64,
    )
}

/// An accepted header must describe `bytes` soundly.
fn check_sound(h: &Header, bytes: &[u8]) -> Result<(), String> {
    let fail = |what: String| Err(format!("accepted an unsound header: {what}: {h:?}"));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if h.file_size != bytes.len() as u64 || h.data_start != 8 + n || h.data_start > h.file_size {
        return fail(format!("sizes (file {} bytes)", bytes.len()));
    }
    let mut names = HashSet::new();
    for t in &h.tensors {
        if !names.insert(&t.name) || t.name == "__metadata__" {
            return fail(format!("name {:?} twice", t.name));
        }
        let need = quantsave::dtype::numel(&t.shape).and_then(|n| t.dtype.byte_size(n));
        if !(h.data_start <= t.start && t.start <= t.end && t.end <= h.file_size)
            || need != Some(t.end - t.start)
        {
            return fail(format!("tensor {:?}", t.name));
        }
    }
    let mut ranges: Vec<(u64, u64)> = h.tensors.iter().map(|t| (t.start, t.end)).collect();
    ranges.sort_unstable();
    let mut cursor = h.data_start;
    for (s, e) in ranges {
        if s != cursor {
            return fail(format!("range [{s}, {e}) at {cursor}"));
        }
        cursor = e;
    }
    if cursor != h.file_size {
        return fail("data does not end the file".into());
    }
    // The header really is the file's: re-parse its text.
    let again = parse_header(
        Path::new(MEM),
        &bytes[8..h.data_start as usize],
        h.file_size,
    );
    match again {
        Ok(a) if &a == h => Ok(()),
        other => fail(format!("not reproducible: {other:?}")),
    }
}

/// Checks one read of `bytes` against `expect`.
fn judge(r: &quantsave::Result<Header>, bytes: &[u8], expect: &Expect) -> Result<bool, String> {
    match (r, expect) {
        (
            Err(Error::Corrupt { reason, .. }),
            Expect::Exactly(None) | Expect::Reject | Expect::Either,
        ) => {
            if reason.is_empty() {
                return Err("empty reason".into());
            }
            Ok(false)
        }
        (Err(e), _) => Err(format!("expected {expect:?}, got error {e:?}")),
        (Ok(h), Expect::Exactly(Some(want))) if h == want.as_ref() => {
            check_sound(h, bytes)?;
            Ok(true)
        }
        (Ok(h), Expect::Either) => {
            check_sound(h, bytes)?;
            Ok(true)
        }
        (Ok(h), _) => Err(format!("expected {expect:?}, got {h:?}")),
    }
}

/// Reads `bytes` in memory and (with `dir`) through a file with both readers; all must agree
/// with each other and with `expect`. Returns whether the input was accepted and the memory
/// the file readers used.
fn check_bytes(bytes: &[u8], expect: &Expect, dir: Option<&Path>) -> Result<(bool, Usage), String> {
    let mem = read_mem(bytes);
    let ok = judge(&mem, bytes, expect)?;
    let Some(dir) = dir else {
        return Ok((ok, Usage::default()));
    };
    let path = dir.join("f.safetensors");
    fs::write(&path, bytes).unwrap();
    let (a, ua) = measure(|| read_header(&path));
    let (b, ub) = measure(|| map_file(&path).map(|m| m.header));
    for (name, r, u) in [("read_header", &a, ua), ("map_file", &b, ub)] {
        let bound = alloc_bound(bytes.len());
        if u.peak > bound || u.largest > bound {
            return Err(format!(
                "{name} allocated {u:?} for a {}-byte file (bound {bound})",
                bytes.len()
            ));
        }
        match (r, &mem) {
            (Ok(h), Ok(m)) if h == m => {}
            (Err(Error::Corrupt { path: p, .. }), Err(_)) if *p == path => {}
            _ => return Err(format!("{name} gave {r:?}, in memory {mem:?}")),
        }
    }
    Ok((ok, ua))
}

fn proptest_config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn prop_valid_files_read_back_exactly(m in gen_model()) {
        let want = m.expected();
        prop_assert!(want.is_some(), "the generator made an invalid file");
        let dir = TempDir::new().unwrap();
        let expect = Expect::Exactly(want.map(Box::new));
        check_bytes(&m.file(), &expect, Some(dir.path())).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn prop_mutated_files_are_read_or_rejected(case in gen_case()) {
        let (bytes, expect) = case.build();
        let dir = TempDir::new().unwrap();
        check_bytes(&bytes, &expect, Some(dir.path())).map_err(TestCaseError::fail)?;
    }

    /// `parse_header` directly, with any file size: the size decides only the data checks.
    #[test]
    fn prop_parse_header_any_file_size(m in gen_model(), size in gen_interesting_u64()) {
        let json = m.header_text();
        let r = parse_header(Path::new(MEM), &json, size);
        let real = 8 + json.len() as u64 + m.data_len;
        match r {
            Ok(h) => prop_assert!(size == real && h.file_size == size),
            Err(Error::Corrupt { .. }) => prop_assert!(size != real),
            Err(e) => prop_assert!(false, "{e:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Exhaustive sweeps over one sample file
// ---------------------------------------------------------------------------------------------

fn sample_model() -> Model {
    let entry = |name: &str, dtype: Dtype, shape: &[u64]| Entry {
        name: name.into(),
        dtype: dtype.name().into(),
        shape: shape.to_vec(),
        offsets: (0, 0),
        field_order: 0,
        as_array: false,
        extra: None,
        raw: None,
    };
    let mut m = Model {
        metadata: Some(vec![("format".into(), MetaValue::Str("pt".into()))]),
        metadata_twice: false,
        meta_at: 0,
        entries: vec![
            entry("0.weight", Dtype::U8, &[24, 1]),
            entry("0.weight.absmax", Dtype::F32, &[3]),
            entry("0.weight.quant_map", Dtype::F32, &[16]),
            entry("0.bias", Dtype::BF16, &[6]),
            entry("empty", Dtype::F16, &[0, 4]),
            entry("f4", Dtype::F4, &[2, 3]),
            entry("\u{e9}\"\\", Dtype::I8, &[]),
        ],
        data_len: 0,
        data_fill: None,
        pad: None,
    };
    m.fix_layout(3);
    m
}

#[test]
fn truncation_at_every_length_is_rejected() {
    let m = sample_model();
    let full = m.file();
    let dir = TempDir::new().unwrap();
    check_bytes(
        &full,
        &Expect::Exactly(m.expected().map(Box::new)),
        Some(dir.path()),
    )
    .unwrap();
    for cut in 0..full.len() {
        check_bytes(&full[..cut], &Expect::Reject, Some(dir.path()))
            .unwrap_or_else(|e| panic!("cut to {cut}: {e}"));
    }
    // The JSON text alone, cut at every length, through parse_header.
    let json = m.json();
    for cut in 0..json.len() {
        let r = parse_header(Path::new(MEM), &json.as_bytes()[..cut], u64::MAX);
        assert!(
            matches!(r, Err(Error::Corrupt { .. })),
            "json cut to {cut}: {r:?}"
        );
    }
}

#[test]
fn every_bit_flip_in_the_header_is_read_or_rejected() {
    let m = sample_model();
    let full = m.file();
    let header_end = 8 + m.header_text().len();
    let want = m.expected().unwrap();
    let (mut ok, mut rejected) = (0, 0);
    for pos in 0..full.len() {
        for bit in 0..8 {
            let mut bytes = full.clone();
            bytes[pos] ^= 1 << bit;
            let expect = if pos >= header_end {
                // Data bytes are not interpreted: the header stays the same.
                Expect::Exactly(Some(Box::new(want.clone())))
            } else {
                Expect::Either
            };
            match check_bytes(&bytes, &expect, None) {
                Ok((true, _)) => ok += 1,
                Ok((false, _)) => rejected += 1,
                Err(e) => panic!("bit {bit} of byte {pos}: {e}"),
            }
        }
    }
    assert!(rejected > 0 && ok > 0, "{ok} ok, {rejected} rejected");
}

#[test]
fn declared_lengths_never_size_an_allocation() {
    let m = sample_model();
    let full = m.file();
    let dir = TempDir::new().unwrap();
    let real = u64::from_le_bytes(full[..8].try_into().unwrap());
    let mut lengths = vec![
        0,
        1,
        u64::MAX,
        u64::MAX - 7,
        1 << 63,
        MAX_HEADER_SIZE,
        MAX_HEADER_SIZE + 1,
    ];
    lengths.extend((0..=full.len() as u64 + 1).filter(|&n| n != real));
    for n in lengths {
        let mut bytes = full.clone();
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        let (_, usage) = check_bytes(&bytes, &Expect::Reject, Some(dir.path()))
            .unwrap_or_else(|e| panic!("length {n}: {e}"));
        assert!(usage.largest <= full.len() + 4096, "length {n}: {usage:?}");
    }
    // A tiny file declaring huge shapes and offsets.
    for json in [
        r#"{"a":{"dtype":"F64","shape":[2305843009213693951],"data_offsets":[0,18446744073709551608]}}"#,
        r#"{"a":{"dtype":"U8","shape":[4294967296,4294967295],"data_offsets":[0,18446744069414584320]}}"#,
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]}}"#,
    ] {
        let bytes = file_of(json.as_bytes(), &[]);
        let (_, usage) = check_bytes(&bytes, &Expect::Reject, Some(dir.path())).unwrap();
        assert!(usage.largest <= 4096, "{json}: {usage:?}");
    }
}

#[test]
fn deep_json_is_rejected_without_overflowing_the_stack() {
    // serde_json limits nesting to 128 levels where it builds values and skips ignored values
    // without recursion; a stack overflow would abort the whole test binary.
    let dir = TempDir::new().unwrap();
    for depth in [127, 128, 129, 10_000, 200_000] {
        for object in [false, true] {
            let deep = deep_json(depth, object);
            for json in [
                format!("{{\"__metadata__\":{{\"k\":{deep}}}}}"),
                format!("{{\"a\":{deep}}}"),
                format!("{{\"__metadata__\":{deep}}}"),
                format!("{{\"a\":{{\"dtype\":\"U8\",\"shape\":{deep},\"data_offsets\":[0,0]}}}}"),
            ] {
                let bytes = file_of(json.as_bytes(), &[]);
                check_bytes(&bytes, &Expect::Reject, Some(dir.path()))
                    .unwrap_or_else(|e| panic!("depth {depth}: {e}"));
            }
            // In an ignored field the value is skipped: accepted at any depth.
            let json = format!(
                "{{\"a\":{{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0],\"x\":{deep}}}}}"
            );
            let bytes = file_of(json.as_bytes(), &[]);
            check_bytes(&bytes, &Expect::Either, Some(dir.path()))
                .unwrap_or_else(|e| panic!("depth {depth}, ignored field: {e}"));
            assert!(read_mem(&bytes).is_ok(), "depth {depth}");
        }
    }
}

#[test]
fn very_long_names_and_many_tensors_read_back() {
    let dir = TempDir::new().unwrap();
    let mut m = sample_model();
    m.entries[0].name = "n".repeat(1 << 20);
    m.fix_layout(1);
    let want = m.expected().map(Box::new);
    assert!(want.is_some());
    check_bytes(&m.file(), &Expect::Exactly(want), Some(dir.path())).unwrap();
    // 20,000 empty tensors and one shape of 100,000 dimensions.
    let mut json = String::from("{");
    for i in 0..20_000 {
        json += &format!("\"t{i}\":{{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}},");
    }
    json += &format!(
        "\"wide\":{{\"dtype\":\"U8\",\"shape\":{},\"data_offsets\":[0,1]}}}}",
        shape_json(&vec![1; 100_000])
    );
    let bytes = file_of(json.as_bytes(), &[7]);
    let (accepted, usage) = check_bytes(&bytes, &Expect::Either, Some(dir.path())).unwrap();
    assert!(accepted);
    assert_eq!(read_mem(&bytes).unwrap().tensors.len(), 20_001);
    println!("{} bytes: {usage:?}", bytes.len());
}

/// The densest headers for the heap: a shape of 2 text bytes per element (8 bytes parsed) and
/// the shortest possible entries.
#[test]
fn worst_case_headers_stay_within_the_allocation_bound() {
    let dir = TempDir::new().unwrap();
    let zeros = format!("[{}0]", "0,".repeat(500_000));
    let wide = format!(r#"{{"a":{{"dtype":"U8","shape":{zeros},"data_offsets":[0,0]}}}}"#);
    let mut many = String::from("{");
    for i in 0..30_000 {
        many += &format!(r#""{i}":["U8",[],[{i},{}]],"#, i + 1);
    }
    many += r#""x":["U8",[0],[0,0]]}"#;
    for (what, json, data) in [("wide shape", wide, 0), ("many entries", many, 30_000)] {
        let bytes = file_of(json.as_bytes(), &vec![0; data]);
        let (accepted, usage) = check_bytes(&bytes, &Expect::Either, Some(dir.path())).unwrap();
        assert!(accepted, "{what}");
        println!(
            "{what}: {} bytes, peak heap {:.1}x, largest allocation {:.1}x",
            bytes.len(),
            usage.peak as f64 / bytes.len() as f64,
            usage.largest as f64 / bytes.len() as f64
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The 1M-input run (not part of `cargo test`'s default path)
// ---------------------------------------------------------------------------------------------

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// `cargo test --release --test header_fuzz -- --ignored --nocapture`: `FUZZ_INPUTS` (default
/// 1,000,000) generated and mutated files, from a fixed seed, through the in-memory reader; one
/// in 1,024 also through `read_header` and `map_file` on disk with the allocation bound. Stops
/// with a failure if `FUZZ_SECONDS` (default 900) pass first.
#[test]
#[ignore = "long run: cargo test --release --test header_fuzz -- --ignored --nocapture"]
fn fuzz_million() {
    let total = env_u64("FUZZ_INPUTS", 1_000_000);
    let limit = Duration::from_secs(env_u64("FUZZ_SECONDS", 900));
    let seed = env_u64("FUZZ_SEED", 0x5afe_7e45);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &key),
    );
    let strategy = gen_case();
    let dir = TempDir::new().unwrap();
    let start = Instant::now();
    let mut counts: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let (mut bytes_total, mut on_disk) = (0u64, 0u64);
    // Peak heap of the on-disk reads: bytes for files under 64 KiB, a ratio for bigger ones.
    let (mut worst_small, mut worst_ratio) = (0usize, 0f64);
    for i in 0..total {
        if start.elapsed() > limit {
            panic!("time limit of {limit:?} reached after {i} inputs");
        }
        let case = strategy.new_tree(&mut runner).unwrap().current();
        let (bytes, expect) = case.build();
        let disk = i % 1024 == 0;
        let r = catch_unwind(AssertUnwindSafe(|| {
            check_bytes(&bytes, &expect, disk.then(|| dir.path()))
        }));
        let accepted = match r {
            Ok(Ok((accepted, usage))) => {
                if disk {
                    on_disk += 1;
                    if bytes.len() < 64 << 10 {
                        worst_small = worst_small.max(usage.peak);
                    } else {
                        worst_ratio = worst_ratio.max(usage.peak as f64 / bytes.len() as f64);
                    }
                }
                accepted
            }
            Ok(Err(e)) => panic!("input {i} ({case:?}): {e}"),
            Err(_) => panic!("input {i} panicked: {case:?}"),
        };
        bytes_total += bytes.len() as u64;
        let c = counts.entry(case.label()).or_default();
        if accepted {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fuzz_million: {total} inputs ({:.1} MB) in {secs:.1} s ({:.0} inputs/s), seed {seed:#x}",
        bytes_total as f64 / 1e6,
        total as f64 / secs
    );
    for (label, (ok, bad)) in &counts {
        println!("  {label:>16}: {ok:>8} accepted, {bad:>8} rejected");
    }
    println!(
        "  {on_disk} through read_header + map_file on disk; peak heap: {worst_small} bytes for files under 64 KiB, {worst_ratio:.1}x the file above"
    );
}

/// A shrunk case the generator once panicked on: an inverted span moved out of bounds.
#[test]
fn inverted_span_moved_out_of_bounds_is_rejected() {
    let fields = [FieldMut::Start(5, u64::MAX), FieldMut::OutOfBounds(5, 0)];
    let case = Case::Fields(sample_model(), fields.to_vec());
    let (bytes, expect) = case.build();
    assert!(matches!(expect, Expect::Exactly(None)), "must be rejected");
    check_bytes(&bytes, &expect, None).unwrap();
}
