//! Integration tests of `quantsave::safetensors`: exact bytes against what Python
//! `safetensors.torch.save_file` writes, every write strategy producing identical files,
//! atomic commits with no temporaries left behind, input errors, and a reader that turns every
//! corruption into `Error::Corrupt` instead of panicking.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use quantsave::safetensors::bench_strategies::{
    write_shards_hashed_with, write_shards_with, StrategyOptions, WriteStrategy,
};
use quantsave::safetensors::{
    map_file, parse_header, read_header, write_bytes_atomic, write_shards, Header, ShardSpec,
    StreamWriter, TensorInfo, TensorSpec, TensorView, WriteOptions, MAX_HEADER_SIZE,
};
use quantsave::{Dtype, Error};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn tv<'a>(name: &str, dtype: Dtype, shape: &[u64], data: &'a [u8]) -> TensorView<'a> {
    TensorView {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn shard<'a>(
    path: PathBuf,
    tensors: Vec<TensorView<'a>>,
    metadata: Option<BTreeMap<String, String>>,
) -> ShardSpec<'a> {
    ShardSpec {
        path,
        tensors,
        metadata,
    }
}

fn opts(strategy: WriteStrategy, fsync: bool, chunk_size: usize) -> StrategyOptions {
    StrategyOptions {
        fsync,
        strategy,
        chunk_size,
    }
}

/// Every combination of strategy, fsync and chunk size worth distinguishing.
fn all_options() -> Vec<StrategyOptions> {
    let mut out = Vec::new();
    for strategy in [
        WriteStrategy::Write,
        WriteStrategy::Pwrite,
        WriteStrategy::Mmap,
    ] {
        for fsync in [false, true] {
            for chunk in [1, 4096, 16 << 20] {
                out.push(opts(strategy, fsync, chunk));
            }
        }
    }
    out
}

/// A safetensors file: little-endian length prefix, then `json`, then `data`.
fn file_bytes(json: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Names of everything in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn assert_no_temporaries(dir: &Path) {
    let temps: Vec<String> = entries(dir)
        .into_iter()
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        temps.is_empty(),
        "temporary files left in {}: {temps:?}",
        dir.display()
    );
}

/// Writes one shard named `name` into `dir` and returns its bytes.
fn write_one(
    dir: &Path,
    name: &str,
    tensors: Vec<TensorView<'_>>,
    metadata: Option<BTreeMap<String, String>>,
    o: &StrategyOptions,
) -> Vec<u8> {
    let path = dir.join(name);
    let sizes = write_shards_with(&[shard(path.clone(), tensors, metadata)], o).unwrap();
    let bytes = fs::read(&path).unwrap();
    assert_eq!(sizes, vec![bytes.len() as u64]);
    assert_no_temporaries(dir);
    bytes
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Golden bytes (expected values produced by Python `safetensors.torch.save` 0.8.0)
// ---------------------------------------------------------------------------------------------

// w = torch.tensor([[1., 2.], [3., 4.]], dtype=float32)
const W_F32: [u8; 16] = [
    0, 0, 0x80, 0x3f, 0, 0, 0, 0x40, 0, 0, 0x40, 0x40, 0, 0, 0x80, 0x40,
];
// b = torch.tensor([1.0, -2.0, 0.5], dtype=bfloat16)
const B_BF16: [u8; 6] = [0x80, 0x3f, 0x00, 0xc0, 0x00, 0x3f];
// q = torch.tensor([0, 1, 2, 254, 255], dtype=uint8)
const Q_U8: [u8; 5] = [0, 1, 2, 254, 255];
// i = torch.tensor([-2], dtype=int64)
const I_I64: [u8; 8] = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];

/// The four golden tensors, deliberately not in file order.
fn golden_tensors() -> Vec<TensorView<'static>> {
    vec![
        tv("w", Dtype::F32, &[2, 2], &W_F32),
        tv("b", Dtype::BF16, &[3], &B_BF16),
        tv("q", Dtype::U8, &[5], &Q_U8),
        tv("i", Dtype::I64, &[1], &I_I64),
    ]
}

/// Data section of the golden file: I64, F32, BF16, U8.
fn golden_data() -> Vec<u8> {
    [&I_I64[..], &W_F32[..], &B_BF16[..], &Q_U8[..]].concat()
}

const GOLDEN_JSON_NO_META: &str = concat!(
    r#"{"i":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},"#,
    r#""w":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]},"#,
    r#""b":{"dtype":"BF16","shape":[3],"data_offsets":[24,30]},"#,
    r#""q":{"dtype":"U8","shape":[5],"data_offsets":[30,35]}}    "#,
);

const GOLDEN_JSON_META: &str = concat!(
    r#"{"__metadata__":{"format":"pt"},"#,
    r#""i":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},"#,
    r#""w":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]},"#,
    r#""b":{"dtype":"BF16","shape":[3],"data_offsets":[24,30]},"#,
    r#""q":{"dtype":"U8","shape":[5],"data_offsets":[30,35]}}     "#,
);

fn golden_file(meta_pt: bool) -> Vec<u8> {
    let json = if meta_pt {
        GOLDEN_JSON_META
    } else {
        GOLDEN_JSON_NO_META
    };
    let mut expected = Vec::new();
    // Header lengths as Python printed them (224 and 256), spelled out as bytes.
    if meta_pt {
        expected.extend_from_slice(&[0x00, 0x01, 0, 0, 0, 0, 0, 0]);
    } else {
        expected.extend_from_slice(&[0xe0, 0x00, 0, 0, 0, 0, 0, 0]);
    }
    expected.extend_from_slice(json.as_bytes());
    expected.extend_from_slice(&golden_data());
    expected
}

#[test]
fn golden_header_lengths_are_multiples_of_eight() {
    assert_eq!(GOLDEN_JSON_NO_META.len(), 224);
    assert_eq!(GOLDEN_JSON_META.len(), 256);
    assert_eq!(golden_file(false).len(), 8 + 224 + 35);
    assert_eq!(golden_file(true).len(), 8 + 256 + 35);
}

#[test]
fn golden_without_metadata() {
    for o in all_options() {
        let dir = TempDir::new().unwrap();
        let got = write_one(dir.path(), "model.safetensors", golden_tensors(), None, &o);
        assert_eq!(got, golden_file(false), "options {o:?}");
    }
}

#[test]
fn golden_with_format_pt_metadata() {
    for o in all_options() {
        let dir = TempDir::new().unwrap();
        let got = write_one(
            dir.path(),
            "model.safetensors",
            golden_tensors(),
            Some(meta(&[("format", "pt")])),
            &o,
        );
        assert_eq!(got, golden_file(true), "options {o:?}");
    }
}

#[test]
fn golden_every_dtype_in_format_order() {
    // One zero element of every dtype torch can save, named a..q so that name order is the
    // reverse of file order: the sort must be by dtype first.
    let order = [
        ("a", Dtype::BOOL),
        ("b", Dtype::U8),
        ("c", Dtype::I8),
        ("d", Dtype::F8_E5M2),
        ("e", Dtype::F8_E4M3),
        ("f", Dtype::F8_E8M0),
        ("g", Dtype::I16),
        ("h", Dtype::U16),
        ("i", Dtype::F16),
        ("j", Dtype::BF16),
        ("k", Dtype::I32),
        ("l", Dtype::U32),
        ("m", Dtype::F32),
        ("n", Dtype::C64),
        ("o", Dtype::F64),
        ("p", Dtype::I64),
        ("q", Dtype::U64),
    ];
    let zeros = [0u8; 8];
    let tensors: Vec<TensorView<'_>> = order
        .iter()
        .map(|&(n, d)| tv(n, d, &[1], &zeros[..(d.bits() / 8) as usize]))
        .collect();
    let json = concat!(
        r#"{"q":{"dtype":"U64","shape":[1],"data_offsets":[0,8]},"#,
        r#""p":{"dtype":"I64","shape":[1],"data_offsets":[8,16]},"#,
        r#""o":{"dtype":"F64","shape":[1],"data_offsets":[16,24]},"#,
        r#""n":{"dtype":"C64","shape":[1],"data_offsets":[24,32]},"#,
        r#""m":{"dtype":"F32","shape":[1],"data_offsets":[32,36]},"#,
        r#""l":{"dtype":"U32","shape":[1],"data_offsets":[36,40]},"#,
        r#""k":{"dtype":"I32","shape":[1],"data_offsets":[40,44]},"#,
        r#""j":{"dtype":"BF16","shape":[1],"data_offsets":[44,46]},"#,
        r#""i":{"dtype":"F16","shape":[1],"data_offsets":[46,48]},"#,
        r#""h":{"dtype":"U16","shape":[1],"data_offsets":[48,50]},"#,
        r#""g":{"dtype":"I16","shape":[1],"data_offsets":[50,52]},"#,
        r#""f":{"dtype":"F8_E8M0","shape":[1],"data_offsets":[52,53]},"#,
        r#""e":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[53,54]},"#,
        r#""d":{"dtype":"F8_E5M2","shape":[1],"data_offsets":[54,55]},"#,
        r#""c":{"dtype":"I8","shape":[1],"data_offsets":[55,56]},"#,
        r#""b":{"dtype":"U8","shape":[1],"data_offsets":[56,57]},"#,
        r#""a":{"dtype":"BOOL","shape":[1],"data_offsets":[57,58]}}       "#,
    );
    let dir = TempDir::new().unwrap();
    let got = write_one(
        dir.path(),
        "all.safetensors",
        tensors,
        None,
        &StrategyOptions::default(),
    );
    assert_eq!(got, file_bytes(json, &[0u8; 58]));
    assert_eq!(json.len() % 8, 0);
}

#[test]
fn golden_f4_sits_between_u8_and_bool() {
    // Python: save({'a': zeros(2, bool), 'f': zeros(2, float4_e2m1fn_x2), 'u': zeros(1, uint8)})
    let z = [0u8; 2];
    let tensors = vec![
        tv("a", Dtype::BOOL, &[2], &z),
        tv("f", Dtype::F4, &[4], &z),
        tv("u", Dtype::U8, &[1], &z[..1]),
    ];
    let json = concat!(
        r#"{"u":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"#,
        r#""f":{"dtype":"F4","shape":[4],"data_offsets":[1,3]},"#,
        r#""a":{"dtype":"BOOL","shape":[2],"data_offsets":[3,5]}} "#,
    );
    let dir = TempDir::new().unwrap();
    let got = write_one(
        dir.path(),
        "f4.safetensors",
        tensors,
        None,
        &StrategyOptions::default(),
    );
    assert_eq!(got, file_bytes(json, &[0u8; 5]));
}

#[test]
fn golden_names_sorted_bytewise_within_a_dtype() {
    let (one, two, three, four) = (
        f32_bytes(&[1.0]),
        f32_bytes(&[2.0]),
        f32_bytes(&[3.0]),
        f32_bytes(&[4.0]),
    );
    let five = 5i32.to_le_bytes();
    let tensors = vec![
        tv("b", Dtype::F32, &[1], &one),
        tv("a", Dtype::F32, &[1], &two),
        tv("B", Dtype::F32, &[1], &three),
        tv("a.b", Dtype::F32, &[1], &four),
        tv("c", Dtype::I32, &[1], &five),
    ];
    let json = concat!(
        r#"{"B":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"#,
        r#""a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"#,
        r#""a.b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},"#,
        r#""b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]},"#,
        r#""c":{"dtype":"I32","shape":[1],"data_offsets":[16,20]}}       "#,
    );
    let data = [
        0x00, 0x00, 0x40, 0x40, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x80, 0x40, 0x00, 0x00, 0x80,
        0x3f, 0x05, 0x00, 0x00, 0x00,
    ];
    let dir = TempDir::new().unwrap();
    let got = write_one(
        dir.path(),
        "m.safetensors",
        tensors,
        None,
        &StrategyOptions::default(),
    );
    assert_eq!(got, file_bytes(json, &data));
}

#[test]
fn golden_escaped_strings_and_empty_tensor() {
    // Python: save({'x': zeros(0), 'y': tensor([7], int8)}, metadata={'k': 'say "hi" \\ é'})
    let seven = [7u8];
    let tensors = vec![
        tv("y", Dtype::I8, &[1], &seven),
        tv("x", Dtype::F32, &[0], &[]),
    ];
    let json = concat!(
        r#"{"__metadata__":{"k":"say \"hi\" \\ é"},"#,
        r#""x":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"#,
        r#""y":{"dtype":"I8","shape":[1],"data_offsets":[0,1]}}      "#,
    );
    let dir = TempDir::new().unwrap();
    let got = write_one(
        dir.path(),
        "e.safetensors",
        tensors,
        Some(meta(&[("k", "say \"hi\" \\ é")])),
        &StrategyOptions::default(),
    );
    assert_eq!(got, file_bytes(json, &[7]));
    assert_eq!(json.len(), 152);

    // Python: save({'café "q"': tensor([1], uint8)}) -- non-ASCII stays raw UTF-8.
    let one = [1u8];
    let json = "{\"caf\u{e9} \\\"q\\\"\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}} ";
    let got = write_one(
        dir.path(),
        "n.safetensors",
        vec![tv("caf\u{e9} \"q\"", Dtype::U8, &[1], &one)],
        None,
        &StrategyOptions::default(),
    );
    assert_eq!(got, file_bytes(json, &[1]));
    assert_eq!(json.len(), 64);
}

#[test]
fn golden_empty_file() {
    // Python: save({}) == b'\x08\x00\x00\x00\x00\x00\x00\x00{}      '
    let dir = TempDir::new().unwrap();
    for o in all_options() {
        let got = write_one(dir.path(), "empty.safetensors", vec![], None, &o);
        assert_eq!(got, b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ".to_vec());
        let got = write_one(
            dir.path(),
            "empty_meta.safetensors",
            vec![],
            Some(meta(&[("format", "pt")])),
            &o,
        );
        assert_eq!(got, file_bytes(r#"{"__metadata__":{"format":"pt"}}"#, &[]));
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies, chunking, several shards, atomic commit
// ---------------------------------------------------------------------------------------------

#[test]
fn every_strategy_writes_identical_multi_shard_output() {
    // A tensor far bigger than the 4096-byte chunk (and not a multiple of it), plus small ones.
    let big = noise(4 * 10_007, 1);
    let mid = noise(2 * 4096, 2);
    let small = noise(6, 3);
    let odd = noise(3 * 4097, 4);
    let make = |dir: &Path| {
        vec![
            shard(
                dir.join("model-00001-of-00003.safetensors"),
                vec![
                    tv("layers.0.weight", Dtype::F32, &[10_007], &big),
                    tv("layers.0.bias", Dtype::F16, &[3], &small),
                ],
                Some(meta(&[("format", "pt")])),
            ),
            shard(
                dir.join("model-00002-of-00003.safetensors"),
                vec![tv("layers.1.weight", Dtype::BF16, &[64, 64], &mid)],
                Some(meta(&[("format", "pt")])),
            ),
            shard(
                dir.join("model-00003-of-00003.safetensors"),
                vec![
                    tv("layers.2.qweight", Dtype::U8, &[3, 4097], &odd),
                    tv("layers.2.scale", Dtype::BF16, &[3], &small),
                ],
                None,
            ),
        ]
    };
    let names = [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ];
    let mut reference: Option<Vec<Vec<u8>>> = None;
    for o in all_options() {
        let dir = TempDir::new().unwrap();
        let sizes = write_shards_with(&make(dir.path()), &o).unwrap();
        assert_eq!(entries(dir.path()), names.to_vec(), "options {o:?}");
        let files: Vec<Vec<u8>> = names
            .iter()
            .map(|n| fs::read(dir.path().join(n)).unwrap())
            .collect();
        assert_eq!(
            sizes,
            files.iter().map(|f| f.len() as u64).collect::<Vec<_>>()
        );
        match &reference {
            None => reference = Some(files),
            Some(r) => assert!(*r == files, "options {o:?} wrote different bytes"),
        }
    }
    // And the reference itself holds the data in the right places.
    let files = reference.unwrap();
    let dir = TempDir::new().unwrap();
    for (n, bytes) in names.iter().zip(&files) {
        fs::write(dir.path().join(n), bytes).unwrap();
    }
    let m = map_file(&dir.path().join(names[0])).unwrap();
    let t: BTreeMap<&str, &[u8]> = m
        .header
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), m.tensor_bytes(t)))
        .collect();
    assert_eq!(t["layers.0.weight"], &big[..]);
    assert_eq!(t["layers.0.bias"], &small[..]);
    let m = map_file(&dir.path().join(names[2])).unwrap();
    assert_eq!(m.header.tensors[0].name, "layers.2.scale");
    assert_eq!(m.tensor_bytes(&m.header.tensors[0]), &small[..]);
    assert_eq!(m.header.tensors[1].name, "layers.2.qweight");
    assert_eq!(m.tensor_bytes(&m.header.tensors[1]), &odd[..]);
}

#[test]
fn many_shards_many_tensors_round_trip_with_tiny_chunks() {
    let payloads: Vec<Vec<u8>> = (0..40)
        .map(|i| noise(4096 * (i % 5) + 3 * i, i as u64))
        .collect();
    for strategy in [
        WriteStrategy::Write,
        WriteStrategy::Pwrite,
        WriteStrategy::Mmap,
    ] {
        let dir = TempDir::new().unwrap();
        let shards: Vec<ShardSpec<'_>> = (0..8)
            .map(|s| {
                let tensors = (0..5)
                    .map(|k| {
                        let i = s * 5 + k;
                        let p = &payloads[i];
                        tv(&format!("t{i:02}"), Dtype::U8, &[p.len() as u64], p)
                    })
                    .collect();
                shard(dir.path().join(format!("s{s}.safetensors")), tensors, None)
            })
            .collect();
        write_shards_with(&shards, &opts(strategy, false, 4096)).unwrap();
        assert_no_temporaries(dir.path());
        for (s, spec) in shards.iter().enumerate() {
            let m = map_file(&spec.path).unwrap();
            assert_eq!(m.header.tensors.len(), 5);
            for t in &m.header.tensors {
                let i: usize = t.name[1..].parse().unwrap();
                assert_eq!(i / 5, s);
                assert_eq!(
                    m.tensor_bytes(t),
                    &payloads[i][..],
                    "{strategy:?} {}",
                    t.name
                );
            }
        }
    }
}

#[test]
fn write_replaces_an_existing_file_atomically() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("model.safetensors");
    fs::write(
        &path,
        b"old contents that are longer than the new file will be ........",
    )
    .unwrap();
    for o in all_options() {
        write_shards_with(&[shard(path.clone(), golden_tensors(), None)], &o).unwrap();
        assert_eq!(fs::read(&path).unwrap(), golden_file(false));
        assert_eq!(entries(dir.path()), vec!["model.safetensors".to_string()]);
    }
}

#[test]
fn same_tensor_name_in_different_shards_is_allowed() {
    let dir = TempDir::new().unwrap();
    let a = [1u8];
    let shards = vec![
        shard(
            dir.path().join("a.safetensors"),
            vec![tv("x", Dtype::U8, &[1], &a)],
            None,
        ),
        shard(
            dir.path().join("b.safetensors"),
            vec![tv("x", Dtype::U8, &[1], &a)],
            None,
        ),
    ];
    write_shards(&shards, &WriteOptions::default()).unwrap();
    assert_eq!(entries(dir.path()), vec!["a.safetensors", "b.safetensors"]);
}

#[test]
fn write_shards_with_no_shards_does_nothing() {
    let dir = TempDir::new().unwrap();
    assert_eq!(
        write_shards(&[], &WriteOptions::default()).unwrap(),
        Vec::<u64>::new()
    );
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn write_options_default() {
    assert!(!WriteOptions::default().fsync);
    let o = StrategyOptions::default();
    assert!(!o.fsync);
    assert_eq!(o.strategy, WriteStrategy::Write);
    assert!(o.chunk_size >= 4096);
}

#[test]
fn write_bytes_atomic_writes_and_replaces() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("model.safetensors.index.json");
    for fsync in [false, true] {
        write_bytes_atomic(&path, b"{\"first\": 1}\n", fsync).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"{\"first\": 1}\n");
        write_bytes_atomic(&path, b"second", fsync).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        write_bytes_atomic(&path, b"", fsync).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"");
        let big = noise(3 << 20, 9);
        write_bytes_atomic(&path, &big, fsync).unwrap();
        assert_eq!(fs::read(&path).unwrap(), big);
        assert_eq!(
            entries(dir.path()),
            vec!["model.safetensors.index.json".to_string()]
        );
    }
}

#[test]
fn write_bytes_atomic_into_missing_folder_fails_cleanly() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("missing").join("x.json");
    let err = write_bytes_atomic(&path, b"data", true).unwrap_err();
    assert_eq!(err.io_kind(), Some(std::io::ErrorKind::NotFound), "{err}");
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn write_bytes_atomic_onto_a_directory_fails_and_cleans_up() {
    let dir = TempDir::new().unwrap();
    let target = dir.path().join("taken");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("inside"), b"x").unwrap();
    let err = write_bytes_atomic(&target, b"data", false).unwrap_err();
    assert!(matches!(err, Error::Io { op: "rename", .. }), "{err:?}");
    assert_eq!(entries(dir.path()), vec!["taken".to_string()]);
}

// ---------------------------------------------------------------------------------------------
// Input errors: nothing may be left behind
// ---------------------------------------------------------------------------------------------

fn assert_invalid_and_clean(dir: &Path, shards: &[ShardSpec<'_>]) -> Error {
    for o in all_options() {
        let err = write_shards_with(shards, &o).unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput(_)),
            "{o:?}: expected InvalidInput, got {err:?}"
        );
        assert!(!err.to_string().is_empty());
        assert!(
            entries(dir).is_empty(),
            "files left behind: {:?}",
            entries(dir)
        );
    }
    write_shards(shards, &WriteOptions::default()).unwrap_err()
}

#[test]
fn byte_length_must_match_dtype_and_shape() {
    let dir = TempDir::new().unwrap();
    let data = [0u8; 16];
    let path = dir.path().join("m.safetensors");
    for (dtype, shape, len) in [
        (Dtype::F32, vec![2, 2], 15),
        (Dtype::F32, vec![2, 2], 12),
        (Dtype::F32, vec![4], 0),
        (Dtype::BF16, vec![3], 7),
        (Dtype::U8, vec![5], 16),
        (Dtype::I64, vec![], 4),
        (Dtype::F16, vec![0], 2),
        (Dtype::F4, vec![3], 2),           // 12 bits: no whole byte size
        (Dtype::F6_E2M3, vec![2], 2),      // 12 bits
        (Dtype::U8, vec![u64::MAX, 2], 0), // overflow
    ] {
        let t = tv("x", dtype, &shape, &data[..len]);
        let err = assert_invalid_and_clean(dir.path(), &[shard(path.clone(), vec![t], None)]);
        assert!(err.to_string().contains("\"x\""), "{err}");
    }
}

#[test]
fn duplicate_names_in_one_shard_are_rejected() {
    let dir = TempDir::new().unwrap();
    let a = [0u8; 4];
    let tensors = vec![
        tv("dup", Dtype::U8, &[1], &a[..1]),
        tv("mid", Dtype::I16, &[1], &a[..2]),
        tv("dup", Dtype::U8, &[1], &a[..1]),
    ];
    let err = assert_invalid_and_clean(
        dir.path(),
        &[shard(dir.path().join("m.safetensors"), tensors, None)],
    );
    assert!(err.to_string().contains("dup"), "{err}");
}

/// `layout` (header.rs) looks for duplicate names only between neighbours in file order, which
/// is sorted by dtype first: two tensors of one name but different dtypes are not neighbours,
/// so the duplicate is written, and the resulting file is one the reader rejects.
#[test]
fn duplicate_names_with_different_dtypes_are_rejected() {
    let dir = TempDir::new().unwrap();
    let a = [0u8; 4];
    let tensors = vec![
        tv("dup", Dtype::U8, &[1], &a[..1]),
        tv("mid", Dtype::I16, &[1], &a[..2]),
        tv("dup", Dtype::F32, &[1], &a),
    ];
    let err = assert_invalid_and_clean(
        dir.path(),
        &[shard(dir.path().join("m.safetensors"), tensors, None)],
    );
    assert!(err.to_string().contains("dup"), "{err}");
}

#[test]
fn empty_and_reserved_names_are_rejected() {
    let dir = TempDir::new().unwrap();
    let a = [0u8; 1];
    for name in ["", "__metadata__"] {
        let tensors = vec![tv(name, Dtype::U8, &[1], &a)];
        assert_invalid_and_clean(
            dir.path(),
            &[shard(dir.path().join("m.safetensors"), tensors, None)],
        );
    }
}

#[test]
fn one_bad_shard_means_no_shard_is_written() {
    let dir = TempDir::new().unwrap();
    let good = [0u8; 8];
    let shards = vec![
        shard(
            dir.path().join("a.safetensors"),
            vec![tv("ok", Dtype::F32, &[2], &good)],
            None,
        ),
        shard(
            dir.path().join("b.safetensors"),
            vec![tv("bad", Dtype::F32, &[3], &good)],
            None,
        ),
        shard(
            dir.path().join("c.safetensors"),
            vec![tv("ok", Dtype::F32, &[2], &good)],
            None,
        ),
    ];
    let err = assert_invalid_and_clean(dir.path(), &shards);
    assert!(err.to_string().contains("b.safetensors"), "{err}");
}

#[test]
fn missing_target_folder_is_an_io_error() {
    let dir = TempDir::new().unwrap();
    let data = [0u8; 4];
    for o in all_options() {
        let shards = vec![
            shard(
                dir.path().join("ok.safetensors"),
                vec![tv("x", Dtype::F32, &[1], &data)],
                None,
            ),
            shard(
                dir.path().join("missing").join("m.safetensors"),
                vec![tv("x", Dtype::F32, &[1], &data)],
                None,
            ),
        ];
        let err = write_shards_with(&shards, &o).unwrap_err();
        assert_eq!(err.io_kind(), Some(std::io::ErrorKind::NotFound), "{err:?}");
        assert!(err.to_string().contains("missing"), "{err}");
        assert!(
            entries(dir.path()).is_empty(),
            "left behind: {:?}",
            entries(dir.path())
        );
    }
}

/// `write_shards` promises that on any error no target file is touched and the temporaries are
/// removed. When a rename fails part-way (here: the second target is a non-empty folder), the
/// first shard has already been renamed into place and the third shard's temporary is leaked:
/// `temps.0.drain(..)` in write.rs empties the guard's list before the remaining temporaries
/// are renamed, so the early `?` return drops them from the list without deleting them.
#[test]
fn failed_rename_leaves_no_temporaries() {
    let dir = TempDir::new().unwrap();
    fs::create_dir(dir.path().join("b.safetensors")).unwrap();
    fs::write(dir.path().join("b.safetensors").join("keep"), b"x").unwrap();
    let data = [0u8; 4];
    let shards = vec![
        shard(
            dir.path().join("a.safetensors"),
            vec![tv("x", Dtype::F32, &[1], &data)],
            None,
        ),
        shard(
            dir.path().join("b.safetensors"),
            vec![tv("x", Dtype::F32, &[1], &data)],
            None,
        ),
        shard(
            dir.path().join("c.safetensors"),
            vec![tv("x", Dtype::F32, &[1], &data)],
            None,
        ),
    ];
    let err = write_shards(&shards, &WriteOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Io { op: "rename", .. }), "{err:?}");
    assert_no_temporaries(dir.path());
}

// ---------------------------------------------------------------------------------------------
// Reader: round trip
// ---------------------------------------------------------------------------------------------

#[test]
fn read_header_and_map_file_round_trip_the_golden_file() {
    let dir = TempDir::new().unwrap();
    for with_meta in [false, true] {
        let path = dir.path().join("g.safetensors");
        let md = with_meta.then(|| meta(&[("format", "pt")]));
        write_shards(
            &[shard(path.clone(), golden_tensors(), md.clone())],
            &WriteOptions::default(),
        )
        .unwrap();
        let ds: u64 = if with_meta { 8 + 256 } else { 8 + 224 };
        let info = |name: &str, dtype, shape: &[u64], s: u64, e: u64| TensorInfo {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
            start: ds + s,
            end: ds + e,
        };
        let expected = Header {
            metadata: md,
            tensors: vec![
                info("i", Dtype::I64, &[1], 0, 8),
                info("w", Dtype::F32, &[2, 2], 8, 24),
                info("b", Dtype::BF16, &[3], 24, 30),
                info("q", Dtype::U8, &[5], 30, 35),
            ],
            data_start: ds,
            file_size: ds + 35,
        };
        assert_eq!(read_header(&path).unwrap(), expected);
        let m = map_file(&path).unwrap();
        assert_eq!(m.header, expected);
        assert_eq!(m.path, path);
        assert_eq!(m.map.len() as u64, ds + 35);
        let bytes: Vec<&[u8]> = m.header.tensors.iter().map(|t| m.tensor_bytes(t)).collect();
        assert_eq!(bytes, vec![&I_I64[..], &W_F32[..], &B_BF16[..], &Q_U8[..]]);
    }
}

#[test]
fn reader_keeps_file_order_and_accepts_unpadded_headers() {
    // Hand-written by another writer: no padding, entries not in canonical order, spaces.
    let json = r#"{ "b" : {"dtype":"U8","shape":[2],"data_offsets":[3,5]}, "a":{"shape":[3],"dtype":"I8","data_offsets":[0,3]} }"#;
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("x.safetensors");
    fs::write(&path, file_bytes(json, &[1, 2, 3, 4, 5])).unwrap();
    let m = map_file(&path).unwrap();
    let names: Vec<&str> = m.header.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["b", "a"]);
    assert_eq!(m.header.metadata, None);
    assert_eq!(m.tensor_bytes(&m.header.tensors[0]), &[4, 5]);
    assert_eq!(m.tensor_bytes(&m.header.tensors[1]), &[1, 2, 3]);
    assert_eq!(read_header(&path).unwrap(), m.header);
}

#[test]
fn reader_accepts_empty_header_and_metadata_only() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("x.safetensors");
    fs::write(&path, file_bytes("{}", &[])).unwrap();
    let h = read_header(&path).unwrap();
    assert!(h.tensors.is_empty());
    assert_eq!((h.data_start, h.file_size), (10, 10));
    fs::write(
        &path,
        file_bytes(r#"{"__metadata__":{"a":"b","c":""}}"#, &[]),
    )
    .unwrap();
    let h = map_file(&path).unwrap().header;
    assert_eq!(h.metadata, Some(meta(&[("a", "b"), ("c", "")])));
}

#[test]
fn reader_errors_on_missing_file_are_io_not_corrupt() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("nope.safetensors");
    assert_eq!(
        read_header(&path).unwrap_err().io_kind(),
        Some(std::io::ErrorKind::NotFound)
    );
    assert_eq!(
        map_file(&path).err().unwrap().io_kind(),
        Some(std::io::ErrorKind::NotFound)
    );
}

// ---------------------------------------------------------------------------------------------
// Reader: corruptions
// ---------------------------------------------------------------------------------------------

/// Both readers must reject `bytes` with `Error::Corrupt` naming the file.
#[track_caller]
fn assert_corrupt(bytes: &[u8], what: &str) {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("bad.safetensors");
    fs::write(&path, bytes).unwrap();
    match read_header(&path) {
        Err(Error::Corrupt { path: p, reason }) => {
            assert_eq!(p, path);
            assert!(!reason.is_empty());
        }
        other => panic!("{what}: read_header gave {other:?}"),
    }
    match map_file(&path) {
        Err(Error::Corrupt { path: p, .. }) => assert_eq!(p, path),
        Err(other) => panic!("{what}: map_file gave {other:?}"),
        Ok(m) => panic!("{what}: map_file accepted {:?}", m.header),
    }
}

#[track_caller]
fn assert_corrupt_json(json: &str, data: &[u8], what: &str) {
    assert_corrupt(&file_bytes(json, data), what);
}

#[test]
fn corrupt_file_shorter_than_eight_bytes() {
    for n in 0..8 {
        assert_corrupt(&vec![0u8; n], &format!("{n}-byte file"));
    }
}

#[test]
fn corrupt_declared_header_length_out_of_bounds() {
    for n in [
        u64::MAX,
        1 << 40,
        MAX_HEADER_SIZE + 1,
        u64::MAX - 7,
        1 << 63,
    ] {
        let mut bytes = n.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}      ");
        assert_corrupt(&bytes, &format!("header length {n}"));
    }
}

#[test]
fn corrupt_header_length_larger_than_file() {
    for (n, body) in [(100u64, &b"{}"[..]), (3, b"{}"), (1, b""), (9, b"{}      ")] {
        let mut bytes = n.to_le_bytes().to_vec();
        bytes.extend_from_slice(body);
        assert_corrupt(
            &bytes,
            &format!("header length {n} with {} bytes", body.len()),
        );
    }
}

#[test]
fn corrupt_zero_length_header() {
    assert_corrupt(&0u64.to_le_bytes(), "empty header");
    assert_corrupt(&file_bytes("", &[1, 2, 3]), "empty header with data");
}

#[test]
fn corrupt_invalid_utf8() {
    let mut bytes = file_bytes(
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
        &[0],
    );
    bytes[10] = 0xff; // inside the name "a"
    assert_corrupt(&bytes, "invalid UTF-8 in a name");
    let mut json = b"{\"__metadata__\":{\"k\":\"".to_vec();
    json.extend_from_slice(&[0xc3, 0x28]); // broken two-byte sequence
    json.extend_from_slice(b"\"}}");
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    assert_corrupt(&bytes, "invalid UTF-8 in metadata");
}

#[test]
fn corrupt_invalid_json() {
    for json in [
        "{",
        "{\"a\":",
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}"#,
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}}"#,
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},}"#,
        "{} x",
        "{}\0\0\0\0\0\0",
        "{'a': 1}",
        "{\"a\" 1}",
    ] {
        assert_corrupt_json(json, &[0], json);
    }
}

#[test]
fn corrupt_header_is_not_an_object() {
    for json in [
        "[]",
        "[{\"a\":1}]",
        "\"x\"",
        "null",
        "123",
        "true",
        " {}",
        "\n{}",
    ] {
        assert_corrupt_json(json, &[], json);
    }
}

#[test]
fn corrupt_tensor_entry_shapes() {
    for json in [
        r#"{"a":1}"#,
        r#"{"a":null}"#,
        r#"{"a":[]}"#,
        r#"{"a":{}}"#,
        r#"{"a":{"shape":[1],"data_offsets":[0,1]}}"#,
        r#"{"a":{"dtype":"U8","data_offsets":[0,1]}}"#,
        r#"{"a":{"dtype":"U8","shape":[1]}}"#,
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1]}}"#,
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}}"#,
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0.0,1.0]}}"#,
        r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
        r#"{"a":{"dtype":"U8","shape":1,"data_offsets":[0,1]}}"#,
        r#"{"a":{"dtype":8,"shape":[1],"data_offsets":[0,1]}}"#,
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,18446744073709551616]}}"#,
    ] {
        assert_corrupt_json(json, &[0], json);
    }
}

#[test]
fn corrupt_unknown_dtype() {
    for dtype in ["F16X", "f32", "", "FLOAT", "F8", "Q4_0"] {
        let json = format!(r#"{{"a":{{"dtype":"{dtype}","shape":[1],"data_offsets":[0,1]}}}}"#);
        assert_corrupt_json(&json, &[0], dtype);
    }
}

#[test]
fn corrupt_size_does_not_match_shape() {
    for json in [
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}}"#,
        r#"{"a":{"dtype":"F32","shape":[],"data_offsets":[0,0]}}"#,
        r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,8]}}"#,
        r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
        r#"{"a":{"dtype":"U8","shape":[18446744073709551615,2],"data_offsets":[0,8]}}"#,
        r#"{"a":{"dtype":"U64","shape":[2305843009213693952],"data_offsets":[0,8]}}"#,
    ] {
        assert_corrupt_json(json, &[0; 8], json);
    }
}

#[test]
fn corrupt_offsets_overlap_gap_or_reverse() {
    let cases = [
        (
            "overlap",
            r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}}"#,
            12,
        ),
        (
            "same range twice",
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
            4,
        ),
        (
            "gap",
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#,
            12,
        ),
        (
            "gap at start",
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#,
            8,
        ),
        (
            "end before start",
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[4,0]}}"#,
            4,
        ),
        (
            "end before start, empty",
            r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[1,0]}}"#,
            0,
        ),
        (
            "huge offsets",
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]}}"#,
            1,
        ),
    ];
    for (what, json, data) in cases {
        assert_corrupt_json(json, &vec![0; data], what);
    }
}

#[test]
fn corrupt_truncated_data_or_trailing_garbage() {
    let json = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    for n in [0, 1, 15] {
        assert_corrupt_json(json, &vec![0; n], &format!("{n} of 16 data bytes"));
    }
    for n in [17, 24, 4096] {
        assert_corrupt_json(json, &vec![0; n], &format!("{n} data bytes for 16"));
    }
    assert_corrupt_json("{}", &[0], "garbage after an empty header");
    // A real file, cut or extended.
    let good = golden_file(true);
    for cut in [good.len() - 1, good.len() - 10, 8 + 256, 8 + 100, 9] {
        assert_corrupt(&good[..cut], &format!("golden file cut to {cut}"));
    }
    let mut longer = good.clone();
    longer.push(0);
    assert_corrupt(&longer, "golden file plus one byte");
}

#[test]
fn corrupt_duplicate_names() {
    assert_corrupt_json(
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
        &[0, 0],
        "duplicate tensor",
    );
    assert_corrupt_json(
        r#"{"__metadata__":{},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"__metadata__":{}}"#,
        &[0],
        "duplicate __metadata__",
    );
}

#[test]
fn corrupt_metadata_values() {
    for md in [
        r#"{"a":1}"#,
        r#"{"a":null}"#,
        r#"{"a":true}"#,
        r#"{"a":["x"]}"#,
        r#"{"a":{"b":"c"}}"#,
        r#"{"ok":"x","a":1.5}"#,
        r#""format""#,
        r#"["format","pt"]"#,
        "1",
    ] {
        let json = format!(
            r#"{{"__metadata__":{md},"a":{{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}}}"#
        );
        assert_corrupt_json(&json, &[0], md);
    }
}

#[test]
fn corrupt_path_is_a_directory() {
    let dir = TempDir::new().unwrap();
    assert!(matches!(
        read_header(dir.path()),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(map_file(dir.path()), Err(Error::Corrupt { .. })));
}

#[test]
fn parse_header_matches_readers() {
    let path = Path::new("mem.safetensors");
    let json = GOLDEN_JSON_META.as_bytes();
    let h = parse_header(path, json, 8 + 256 + 35).unwrap();
    assert_eq!(h.data_start, 264);
    assert_eq!(h.tensors[0].start, 264);
    assert!(matches!(
        parse_header(path, json, 8 + 256 + 34),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        parse_header(path, json, 8 + 256 + 36),
        Err(Error::Corrupt { .. })
    ));
}

/// `parse_header` is public and documented never to panic, but with a `file_size` smaller than
/// `8 + json.len()` it computes `file_size - data_start` (read.rs, `let data_len = ...`) and
/// overflows: a panic in debug builds, a wrapped value in release.
#[test]
fn parse_header_with_file_size_smaller_than_header_does_not_panic() {
    let r = std::panic::catch_unwind(|| parse_header(Path::new("x"), b"{}", 0).is_err());
    assert!(
        matches!(r, Ok(true)),
        "parse_header panicked or accepted the input"
    );
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct GenTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    seed: u64,
}

fn gen_tensor() -> impl Strategy<Value = GenTensor> {
    (
        "[a-zA-Z0-9_.]{1,12}|[a-z\"\\\\ /\u{e9}\u{1F600}\u{7f}\u{1}]{1,6}",
        0..Dtype::all().len(),
        prop::collection::vec(0u64..6, 0..4),
        any::<u64>(),
    )
        .prop_map(|(name, d, mut shape, seed)| {
            let dtype = Dtype::all()[d];
            // Sub-byte dtypes need a whole number of bytes.
            if quantsave::dtype::numel(&shape)
                .and_then(|n| dtype.byte_size(n))
                .is_none()
            {
                shape.push(8);
            }
            GenTensor {
                name,
                dtype,
                shape,
                seed,
            }
        })
}

fn gen_tensors() -> impl Strategy<Value = Vec<GenTensor>> {
    prop::collection::vec(gen_tensor(), 0..12).prop_map(|v| {
        let mut seen = HashSet::new();
        v.into_iter()
            .filter(|t| t.name != "__metadata__" && seen.insert(t.name.clone()))
            .collect()
    })
}

fn tensor_data(t: &GenTensor) -> Vec<u8> {
    let n = quantsave::dtype::numel(&t.shape).unwrap();
    noise(t.dtype.byte_size(n).unwrap() as usize, t.seed)
}

/// A valid file to mutate.
fn sample_file() -> Vec<u8> {
    let dir = TempDir::new().unwrap();
    let big = noise(300, 5);
    let tensors = vec![
        tv("model.layers.0.weight", Dtype::BF16, &[10, 15], &big),
        tv("model.layers.0.scale", Dtype::F32, &[3], &big[..12]),
        tv("empty", Dtype::F16, &[0, 4], &[]),
        tv("q", Dtype::I8, &[2, 2], &big[..4]),
    ];
    write_one(
        dir.path(),
        "s.safetensors",
        tensors,
        Some(meta(&[("format", "pt")])),
        &StrategyOptions::default(),
    )
}

/// Reads `bytes` both ways; both readers must agree, and an accepted file must be sound.
fn check_reader_total(bytes: &[u8]) -> Result<(), TestCaseError> {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("f.safetensors");
    fs::write(&path, bytes).unwrap();
    let a = read_header(&path);
    let b = map_file(&path);
    match (&a, &b) {
        (Ok(h), Ok(m)) => {
            prop_assert_eq!(h, &m.header);
            prop_assert_eq!(h.file_size, bytes.len() as u64);
            let mut total = 0;
            for t in &h.tensors {
                prop_assert!(t.start >= h.data_start && t.start <= t.end && t.end <= h.file_size);
                total += m.tensor_bytes(t).len() as u64;
            }
            prop_assert_eq!(total, h.file_size - h.data_start);
        }
        (Err(Error::Corrupt { .. }), Err(Error::Corrupt { .. })) => {}
        _ => prop_assert!(
            false,
            "readers disagree or gave a non-Corrupt error: {:?} / {:?}",
            a.as_ref().err(),
            b.as_ref().err()
        ),
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    /// Replaces a digit of the header with another digit (reaches offset/shape validation).
    Digit(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
    Remove(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::SetByte(p, b)),
        (any::<usize>(), 0u8..10).prop_map(|(p, d)| Mutation::Digit(p, d)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Insert(p, b)),
        any::<usize>().prop_map(Mutation::Remove),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let len = bytes.len();
    match *m {
        Mutation::FlipBit(p, b) => bytes[p % len] ^= 1 << b,
        Mutation::SetByte(p, b) => bytes[p % len] = b,
        Mutation::Digit(p, d) => {
            let digits: Vec<usize> = (0..len).filter(|&i| bytes[i].is_ascii_digit()).collect();
            if !digits.is_empty() {
                bytes[digits[p % digits.len()]] = b'0' + d;
            }
        }
        Mutation::Truncate(p) => bytes.truncate(p % len),
        Mutation::Insert(p, b) => bytes.insert(p % (len + 1), b),
        Mutation::Remove(p) => {
            bytes.remove(p % len);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prop_written_tensors_read_back(
        gen in gen_tensors(),
        mmap in any::<bool>(),
        chunk in prop_oneof![Just(1usize), Just(4096), Just(1 << 20)],
        with_meta in any::<bool>(),
    ) {
        let datas: Vec<Vec<u8>> = gen.iter().map(tensor_data).collect();
        let tensors: Vec<TensorView<'_>> =
            gen.iter().zip(&datas).map(|(g, d)| tv(&g.name, g.dtype, &g.shape, d)).collect();
        let md = with_meta.then(|| meta(&[("format", "pt"), ("note", "\"quoted\" \u{e9}")]));
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("p.safetensors");
        let strategy = if mmap { WriteStrategy::Mmap } else { WriteStrategy::Pwrite };
        let sizes = write_shards_with(&[shard(path.clone(), tensors, md.clone())], &opts(strategy, false, chunk)).unwrap();
        let m = map_file(&path).unwrap();
        prop_assert_eq!(&read_header(&path).unwrap(), &m.header);
        prop_assert_eq!(sizes, vec![m.header.file_size]);
        prop_assert_eq!(&m.header.metadata, &md);
        prop_assert_eq!(m.header.data_start % 8, 0);
        prop_assert_eq!(m.header.tensors.len(), gen.len());
        // File order: dtype descending, then name; data contiguous.
        let mut cursor = m.header.data_start;
        for pair in m.header.tensors.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            prop_assert!(a.dtype > b.dtype || (a.dtype == b.dtype && a.name < b.name));
        }
        for t in &m.header.tensors {
            prop_assert_eq!(t.start, cursor);
            cursor = t.end;
            let i = gen.iter().position(|g| g.name == t.name).unwrap();
            prop_assert_eq!(t.dtype, gen[i].dtype);
            prop_assert_eq!(&t.shape, &gen[i].shape);
            prop_assert_eq!(m.tensor_bytes(t), &datas[i][..]);
        }
        prop_assert_eq!(cursor, m.header.file_size);
        let names: Vec<String> = entries(dir.path());
        prop_assert_eq!(names, vec!["p.safetensors".to_string()]);
    }

    #[test]
    fn prop_random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_reader_total(&bytes)?;
    }

    #[test]
    fn prop_random_header_text_never_panics(
        json in "\\{[\"a-z0-9_:,\\[\\]{} ]{0,80}\\}",
        data in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        check_reader_total(&file_bytes(&json, &data))?;
    }

    #[test]
    fn prop_mutated_files_never_panic(muts in prop::collection::vec(mutation(), 1..4)) {
        let mut bytes = sample_file();
        for m in &muts {
            apply(&mut bytes, m);
        }
        check_reader_total(&bytes)?;
    }
}

fn spec(t: &TensorView<'_>) -> TensorSpec {
    TensorSpec {
        name: t.name.clone(),
        dtype: t.dtype,
        shape: t.shape.clone(),
    }
}

#[test]
fn stream_writer_gives_the_bytes_of_write_shards_in_any_order() {
    let dir = TempDir::new().unwrap();
    let tensors = golden_tensors();
    let md = meta(&[("format", "pt"), ("b", "two")]);
    let expected = write_one(
        dir.path(),
        "ref.safetensors",
        tensors.clone(),
        Some(md.clone()),
        &StrategyOptions::default(),
    );
    let path = dir.path().join("stream.safetensors");
    let specs: Vec<TensorSpec> = tensors.iter().map(spec).collect();
    let mut w = StreamWriter::create(&path, &specs, Some(&md)).unwrap();
    assert!(!path.exists(), "nothing at the target before finish");
    for t in tensors.iter().rev() {
        w.write(&t.name, t.data).unwrap();
    }
    assert!(w.missing().is_empty());
    assert_eq!(w.finish(false).unwrap(), expected.len() as u64);
    assert_eq!(fs::read(&path).unwrap(), expected);
    assert_no_temporaries(dir.path());
}

#[test]
fn stream_writer_rejects_bad_writes_and_never_commits_a_partial_file() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("model.safetensors");
    fs::write(&path, b"old checkpoint").unwrap();
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let specs = vec![
        TensorSpec {
            name: "a".into(),
            dtype: Dtype::F32,
            shape: vec![2, 2],
        },
        TensorSpec {
            name: "b".into(),
            dtype: Dtype::F32,
            shape: vec![4],
        },
    ];
    let mut w = StreamWriter::create(&path, &specs, None).unwrap();
    assert!(matches!(w.write("c", &data), Err(Error::InvalidInput(_))));
    assert!(matches!(
        w.write("a", &data[..8]),
        Err(Error::InvalidInput(_))
    ));
    w.write("a", &data).unwrap();
    assert!(matches!(w.write("a", &data), Err(Error::InvalidInput(_))));
    assert_eq!(w.missing(), vec!["b".to_string()]);
    // Finishing with a tensor missing fails and leaves the old file and no temporary.
    assert!(matches!(w.finish(false), Err(Error::InvalidInput(_))));
    assert_eq!(fs::read(&path).unwrap(), b"old checkpoint");
    assert_no_temporaries(dir.path());
    // So does dropping an unfinished writer.
    let mut w = StreamWriter::create(&path, &specs, None).unwrap();
    w.write("b", &data).unwrap();
    drop(w);
    assert_eq!(fs::read(&path).unwrap(), b"old checkpoint");
    assert_no_temporaries(dir.path());
    // Bad specs are refused before any file exists.
    let dup = vec![specs[0].clone(), specs[0].clone()];
    assert!(StreamWriter::create(&path, &dup, None).is_err());
    let odd = vec![TensorSpec {
        name: "x".into(),
        dtype: Dtype::F4,
        shape: vec![3],
    }];
    assert!(StreamWriter::create(&path, &odd, None).is_err());
    assert_no_temporaries(dir.path());
}

// ---------------------------------------------------------------------------------------------
// Checksums
// ---------------------------------------------------------------------------------------------

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn sha256_file_matches_known_vectors() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("abc");
    fs::write(&p, b"abc").unwrap();
    assert_eq!(
        quantsave::safetensors::sha256_file(&p).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    fs::write(&p, b"").unwrap();
    assert_eq!(
        quantsave::safetensors::sha256_file(&p).unwrap(),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    // Larger than the 8 MiB read buffer, not a multiple of it.
    let big: Vec<u8> = (0..(9u32 << 20) + 7).map(|i| (i % 251) as u8).collect();
    fs::write(&p, &big).unwrap();
    assert_eq!(
        quantsave::safetensors::sha256_file(&p).unwrap(),
        sha256_hex(&big)
    );
    assert!(quantsave::safetensors::sha256_file(&dir.path().join("missing")).is_err());
}

#[test]
fn hashed_writes_report_each_files_sha256() {
    let small = vec![7u8; 100];
    let large: Vec<u8> = (0..(5u32 << 20)).map(|i| (i % 13) as u8).collect();
    for o in all_options() {
        let dir = TempDir::new().unwrap();
        let shards = vec![
            shard(
                dir.path().join("a.safetensors"),
                vec![
                    tv("x", Dtype::U8, &[100], &small),
                    tv("big", Dtype::U8, &[large.len() as u64], &large),
                ],
                Some(meta(&[("format", "pt")])),
            ),
            shard(
                dir.path().join("b.safetensors"),
                vec![tv("y", Dtype::F32, &[25], &small)],
                None,
            ),
        ];
        let out = write_shards_hashed_with(&shards, &o).unwrap();
        for ((size, hash), s) in out.iter().zip(&shards) {
            let bytes = fs::read(&s.path).unwrap();
            assert_eq!(*size, bytes.len() as u64);
            assert_eq!(*hash, sha256_hex(&bytes), "{o:?}");
        }
    }
}

#[test]
fn hashed_writes_of_one_and_of_more_files_than_cores() {
    // The hashing threads take files from a shared queue: every file gets its own digest, in
    // file order, whether there is one file or more than there are threads.
    let data: Vec<Vec<u8>> = (0..9u8)
        .map(|k| {
            (0..(1u32 << 20) + k as u32 * 4099)
                .map(|i| (i as u8) ^ k)
                .collect()
        })
        .collect();
    for count in [1usize, 9] {
        let dir = TempDir::new().unwrap();
        let shards: Vec<_> = (0..count)
            .map(|k| {
                shard(
                    dir.path().join(format!("s{k}.safetensors")),
                    vec![tv("w", Dtype::U8, &[data[k].len() as u64], &data[k])],
                    None,
                )
            })
            .collect();
        let out =
            quantsave::safetensors::write_shards_hashed(&shards, &WriteOptions::default()).unwrap();
        assert_eq!(out.len(), count);
        for ((_, hash), s) in out.iter().zip(&shards) {
            assert_eq!(*hash, sha256_hex(&fs::read(&s.path).unwrap()));
        }
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), count, "no temporaries left: {names:?}");
    }
}
