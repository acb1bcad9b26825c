//! Integration tests of `quantsave::convert`: chunked streaming conversion gives exactly the
//! bytes of whole-tensor quantization (4-bit with and without double quant, int8, copies) at
//! any chunk size, and every bad spec or bad input fails before committing anything, leaving
//! no temporaries.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use quantsave::codec::{self, num_blocks, packed_len, Floats, Nibble4Layout, QuantType};
use quantsave::convert::{run, ConvertSpec, Nested, Op, ShardOut, Source, Target};
use quantsave::safetensors::{
    map_file, write_shards, ShardSpec, TensorSpec, TensorView, WriteOptions,
};
use quantsave::{Dtype, Error};
use tempfile::TempDir;

/// Deterministic pseudo-random values with a spread of magnitudes.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            u * (1.0 + (i % 7) as f32)
        })
        .collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
        .collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes())
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

struct Src {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<u64>,
    bytes: Vec<u8>,
}

/// A source file holding `tensors`, written by the crate's writer.
fn source(dir: &Path, file: &str, tensors: &[Src]) -> PathBuf {
    let path = dir.join(file);
    let views = tensors
        .iter()
        .map(|t| TensorView {
            name: t.name.to_string(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data: &t.bytes,
        })
        .collect();
    write_shards(
        &[ShardSpec {
            path: path.clone(),
            tensors: views,
            metadata: None,
        }],
        &WriteOptions::default(),
    )
    .unwrap();
    path
}

fn spec(name: &str, dtype: Dtype, shape: &[u64]) -> TensorSpec {
    TensorSpec {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
    }
}

fn t(name: &str) -> Target {
    Target {
        shard: 0,
        name: name.to_string(),
    }
}

fn s(name: &str) -> Source {
    Source {
        file: 0,
        name: name.to_string(),
        cast: None,
        transposed: false,
    }
}

/// Every tensor of a written file by name.
fn read_all(path: &Path) -> HashMap<String, Vec<u8>> {
    let m = map_file(path).unwrap();
    m.header
        .tensors
        .iter()
        .map(|t| (t.name.clone(), m.tensor_bytes(t).to_vec()))
        .collect()
}

fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

/// Whole-tensor 4-bit reference: packed, absmax (f32 or nested codes) and nested absmax.
fn reference_q4(x: Floats<'_>, qt: QuantType, nested: Option<f32>) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let n = x.len();
    let mut p = vec![0u8; packed_len(n)];
    let mut a = vec![0f32; num_blocks(n, 64)];
    codec::quantize_4bit(x, 64, qt, Nibble4Layout::HighFirst, &mut p, &mut a).unwrap();
    match nested {
        None => (p, f32_bytes(&a), Vec::new()),
        Some(offset) => {
            let (codes, nabs) = codec::quantize_dynamic(&a, offset, 256).unwrap();
            (p, codes, f32_bytes(&nabs))
        }
    }
}

/// The scene: a bf16 weight spanning several chunks with a partial last block, an odd-sized
/// f16 weight, an f32 weight for int8, a bias to copy and fixed bytes.
struct Scene {
    _dir: TempDir,
    dir: PathBuf,
    src: PathBuf,
    w1: Vec<f32>,
    w2: Vec<f32>,
    w3: Vec<f32>,
    bias: Vec<u8>,
}

const W1: (u64, u64) = (96, 700); // 67 200 elements: several 16 384-element chunks, partial block
const W2: (u64, u64) = (7, 9); // 63 elements: odd, one partial block
const W3: (u64, u64) = (33, 40);

fn scene() -> Scene {
    let dir = TempDir::new().unwrap();
    let path = dir.path().to_path_buf();
    let w1 = values((W1.0 * W1.1) as usize, 1);
    let w2 = values((W2.0 * W2.1) as usize, 2);
    let w3 = values((W3.0 * W3.1) as usize, 3);
    let bias = bf16_bytes(&values(96, 4));
    let src = source(
        &path,
        "src.safetensors",
        &[
            Src {
                name: "a.weight",
                dtype: Dtype::BF16,
                shape: vec![W1.0, W1.1],
                bytes: bf16_bytes(&w1),
            },
            Src {
                name: "a.bias",
                dtype: Dtype::BF16,
                shape: vec![96],
                bytes: bias.clone(),
            },
            Src {
                name: "b.weight",
                dtype: Dtype::F16,
                shape: vec![W2.0, W2.1],
                bytes: f16_bytes(&w2),
            },
            Src {
                name: "c.weight",
                dtype: Dtype::F32,
                shape: vec![W3.0, W3.1],
                bytes: f32_bytes(&w3),
            },
        ],
    );
    Scene {
        _dir: dir,
        dir: path,
        src,
        w1,
        w2,
        w3,
        bias,
    }
}

fn four_bit_ops(qt: QuantType, nested: Option<(f32, f32)>) -> (Vec<TensorSpec>, Vec<Op>) {
    let n1 = (W1.0 * W1.1) as usize;
    let n2 = (W2.0 * W2.1) as usize;
    let (b1, b2) = (num_blocks(n1, 64) as u64, num_blocks(n2, 64) as u64);
    let absmax_dtype = if nested.is_some() {
        Dtype::U8
    } else {
        Dtype::F32
    };
    let mut tensors = vec![
        spec("a.weight", Dtype::U8, &[packed_len(n1) as u64, 1]),
        spec("a.weight.absmax", absmax_dtype, &[b1]),
        spec("a.bias", Dtype::BF16, &[96]),
        spec("b.weight", Dtype::U8, &[packed_len(n2) as u64, 1]),
        spec("b.weight.absmax", absmax_dtype, &[b2]),
        spec("code", Dtype::F32, &[16]),
    ];
    if nested.is_some() {
        tensors.push(spec(
            "a.weight.nested_absmax",
            Dtype::F32,
            &[b1.div_ceil(256)],
        ));
        tensors.push(spec(
            "b.weight.nested_absmax",
            Dtype::F32,
            &[b2.div_ceil(256)],
        ));
    }
    let quant = |name: &str, offset: Option<f32>| Op::Quant4 {
        src: s(&format!("{name}.weight")),
        quant_type: qt,
        blocksize: 64,
        packed: t(&format!("{name}.weight")),
        absmax: t(&format!("{name}.weight.absmax")),
        nested: offset.map(|offset| Nested {
            offset,
            nested_absmax: t(&format!("{name}.weight.nested_absmax")),
        }),
    };
    let ops = vec![
        quant("a", nested.map(|n| n.0)),
        quant("b", nested.map(|n| n.1)),
        Op::Copy {
            src: s("a.bias"),
            out: t("a.bias"),
        },
        Op::Bytes {
            data: f32_bytes(&qt.code()),
            out: t("code"),
        },
    ];
    (tensors, ops)
}

fn convert(
    dir: &Path,
    src: &Path,
    tensors: Vec<TensorSpec>,
    ops: Vec<Op>,
    chunk_elems: usize,
) -> Result<PathBuf, Error> {
    let out = dir.join("out.safetensors");
    let spec = ConvertSpec {
        sources: vec![src.to_path_buf()],
        shards: vec![ShardOut {
            path: out.clone(),
            tensors,
            metadata: None,
            temp: None,
        }],
        ops,
        chunk_elems,
        fsync: false,
    };
    let progress = AtomicU64::new(0);
    run(&spec, &progress)?;
    Ok(out)
}

#[test]
fn four_bit_streaming_equals_whole_tensor_quantization() {
    let sc = scene();
    let w1b: Vec<u16> = sc
        .w1
        .iter()
        .map(|x| half::bf16::from_f32(*x).to_bits())
        .collect();
    let w2h: Vec<u16> = sc
        .w2
        .iter()
        .map(|x| half::f16::from_f32(*x).to_bits())
        .collect();
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        for nested in [None, Some((0.4f32, 0.25f32))] {
            let r1 = reference_q4(Floats::Bf16(&w1b), qt, nested.map(|n| n.0));
            let r2 = reference_q4(Floats::F16(&w2h), qt, nested.map(|n| n.1));
            // Chunks of one nested block (16 384 elements), of a few, and one for everything.
            for chunk in [1, 16_384, 40_000, 1 << 22] {
                let (tensors, ops) = four_bit_ops(qt, nested);
                let out = convert(&sc.dir, &sc.src, tensors, ops, chunk).unwrap();
                let got = read_all(&out);
                assert_eq!(got["a.weight"], r1.0, "{qt:?} {nested:?} chunk {chunk}");
                assert_eq!(
                    got["a.weight.absmax"], r1.1,
                    "{qt:?} {nested:?} chunk {chunk}"
                );
                assert_eq!(got["b.weight"], r2.0);
                assert_eq!(got["b.weight.absmax"], r2.1);
                if nested.is_some() {
                    assert_eq!(got["a.weight.nested_absmax"], r1.2);
                    assert_eq!(got["b.weight.nested_absmax"], r2.2);
                }
                assert_eq!(got["a.bias"], sc.bias);
                assert_eq!(got["code"], f32_bytes(&qt.code()));
                fs::remove_file(out).unwrap();
            }
        }
    }
    assert!(leftovers(&sc.dir).is_empty());
}

#[test]
fn absmax_pass_matches_the_quantizer() {
    let sc = scene();
    let w1b: Vec<u16> = sc
        .w1
        .iter()
        .map(|x| half::bf16::from_f32(*x).to_bits())
        .collect();
    let mut p = vec![0u8; packed_len(w1b.len())];
    let mut a = vec![0f32; num_blocks(w1b.len(), 64)];
    codec::quantize_4bit(
        Floats::Bf16(&w1b),
        64,
        QuantType::Nf4,
        Nibble4Layout::HighFirst,
        &mut p,
        &mut a,
    )
    .unwrap();
    for chunk in [1, 20_000, 1 << 22] {
        assert_eq!(
            quantsave::convert::absmax_4bit(&sc.src, "a.weight", 64, chunk, None, false).unwrap(),
            a
        );
    }
    assert!(quantsave::convert::absmax_4bit(&sc.src, "nope", 64, 1, None, false).is_err());
}

#[test]
fn int8_streaming_equals_whole_tensor_quantization() {
    let sc = scene();
    // Through float16 first, as bitsandbytes does.
    let half_rows: Vec<u16> = sc
        .w3
        .iter()
        .map(|x| half::f16::from_f32(*x).to_bits())
        .collect();
    let (rows, cols) = (W3.0 as usize, W3.1 as usize);
    let mut q = vec![0i8; rows * cols];
    let mut scb = vec![0f32; rows];
    codec::quantize_int8_rows(&half_rows, rows, cols, &mut q, &mut scb).unwrap();
    let w1h: Vec<u16> = sc
        .w1
        .iter()
        .map(|x| half::f16::from_f32(half::bf16::from_f32(*x).to_f32()).to_bits())
        .collect();
    let mut q1 = vec![0i8; w1h.len()];
    let mut scb1 = vec![0f32; W1.0 as usize];
    codec::quantize_int8_rows(&w1h, W1.0 as usize, W1.1 as usize, &mut q1, &mut scb1).unwrap();
    for chunk in [1, 100, 1 << 22] {
        let tensors = vec![
            spec("c.weight", Dtype::I8, &[W3.0, W3.1]),
            spec("c.SCB", Dtype::F32, &[W3.0]),
            spec("a.weight", Dtype::I8, &[W1.0, W1.1]),
            spec("a.SCB", Dtype::F32, &[W1.0]),
        ];
        let ops = vec![
            Op::Int8 {
                src: s("c.weight"),
                rows,
                cols,
                weight: t("c.weight"),
                scb: t("c.SCB"),
            },
            Op::Int8 {
                src: s("a.weight"),
                rows: W1.0 as usize,
                cols: W1.1 as usize,
                weight: t("a.weight"),
                scb: t("a.SCB"),
            },
        ];
        let out = convert(&sc.dir, &sc.src, tensors, ops, chunk).unwrap();
        let got = read_all(&out);
        assert_eq!(got["c.weight"], bytemuck::cast_slice::<i8, u8>(&q));
        assert_eq!(got["c.SCB"], f32_bytes(&scb));
        assert_eq!(got["a.weight"], bytemuck::cast_slice::<i8, u8>(&q1));
        assert_eq!(got["a.SCB"], f32_bytes(&scb1));
        fs::remove_file(out).unwrap();
    }
}

#[test]
fn progress_counts_every_source_byte() {
    let sc = scene();
    let (tensors, ops) = four_bit_ops(QuantType::Nf4, None);
    let spec = ConvertSpec {
        sources: vec![sc.src.clone()],
        shards: vec![ShardOut {
            path: sc.dir.join("o.safetensors"),
            tensors,
            metadata: None,
            temp: None,
        }],
        ops,
        chunk_elems: 16_384,
        fsync: false,
    };
    let progress = AtomicU64::new(0);
    let sizes = run(&spec, &progress).unwrap();
    assert_eq!(
        sizes,
        vec![fs::metadata(sc.dir.join("o.safetensors")).unwrap().len()]
    );
    let expected = W1.0 * W1.1 * 2 + 96 * 2 + W2.0 * W2.1 * 2;
    assert_eq!(progress.load(Ordering::Relaxed), expected);
}

/// Runs a broken conversion and checks that it fails cleanly: an error naming `needle`, no
/// output file and no temporaries.
fn fails(sc: &Scene, tensors: Vec<TensorSpec>, ops: Vec<Op>, needle: &str) {
    let err = convert(&sc.dir, &sc.src, tensors, ops, 16_384).unwrap_err();
    assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
    assert!(!sc.dir.join("out.safetensors").exists());
    assert!(leftovers(&sc.dir).is_empty(), "{:?}", leftovers(&sc.dir));
}

#[test]
fn bad_specs_fail_without_committing() {
    let sc = scene();
    let (tensors, mut ops) = four_bit_ops(QuantType::Nf4, None);
    ops.pop(); // the code table is never produced
    fails(&sc, tensors, ops, "never written");

    let (tensors, mut ops) = four_bit_ops(QuantType::Nf4, None);
    ops.push(Op::Copy {
        src: s("a.bias"),
        out: t("a.bias"),
    });
    fails(&sc, tensors, ops, "produced twice");

    let (tensors, mut ops) = four_bit_ops(QuantType::Nf4, None);
    ops[2] = Op::Copy {
        src: s("missing"),
        out: t("a.bias"),
    };
    fails(&sc, tensors, ops, "no tensor \"missing\"");

    let (mut tensors, ops) = four_bit_ops(QuantType::Nf4, None);
    tensors[1].shape = vec![3];
    fails(&sc, tensors, ops, "a.weight.absmax");

    let (tensors, mut ops) = four_bit_ops(QuantType::Nf4, None);
    ops[3] = Op::Bytes {
        data: vec![0; 4],
        out: t("nowhere"),
    };
    fails(&sc, tensors, ops, "nowhere");

    let (tensors, mut ops) = four_bit_ops(QuantType::Nf4, Some((0.1, 0.1)));
    if let Op::Quant4 {
        nested: Some(n), ..
    } = &mut ops[0]
    {
        n.offset = f32::NAN;
    }
    fails(&sc, tensors, ops, "offset");

    let tensors = vec![
        spec("c.weight", Dtype::I8, &[W3.0, W3.1]),
        spec("c.SCB", Dtype::F32, &[W3.0]),
    ];
    let ops = vec![Op::Int8 {
        src: s("c.weight"),
        rows: 5,
        cols: 5,
        weight: t("c.weight"),
        scb: t("c.SCB"),
    }];
    fails(&sc, tensors, ops, "5 x 5");
}

#[test]
fn bad_inputs_fail_without_committing() {
    let sc = scene();
    // Non-finite values abort the whole conversion.
    let mut w = values(64 * 3, 9);
    w[100] = f32::NAN;
    let src = source(
        &sc.dir,
        "nan.safetensors",
        &[
            Src {
                name: "x.weight",
                dtype: Dtype::F32,
                shape: vec![3, 64],
                bytes: f32_bytes(&w),
            },
            Src {
                name: "i.weight",
                dtype: Dtype::I32,
                shape: vec![2],
                bytes: vec![0; 8],
            },
        ],
    );
    let tensors = vec![
        spec("x.weight", Dtype::U8, &[96, 1]),
        spec("x.weight.absmax", Dtype::F32, &[3]),
    ];
    let ops = vec![Op::Quant4 {
        src: s("x.weight"),
        quant_type: QuantType::Nf4,
        blocksize: 64,
        packed: t("x.weight"),
        absmax: t("x.weight.absmax"),
        nested: None,
    }];
    let err = convert(&sc.dir, &src, tensors, ops, 64).unwrap_err();
    assert!(
        err.to_string().contains("x.weight") && err.to_string().contains("NaN"),
        "{err}"
    );
    assert!(!sc.dir.join("out.safetensors").exists());
    assert!(leftovers(&sc.dir).is_empty());

    // Integer sources cannot be quantized.
    let tensors = vec![
        spec("i.weight", Dtype::U8, &[4, 1]),
        spec("i.weight.absmax", Dtype::F32, &[1]),
    ];
    let ops = vec![Op::Quant4 {
        src: s("i.weight"),
        quant_type: QuantType::Nf4,
        blocksize: 64,
        packed: t("i.weight"),
        absmax: t("i.weight.absmax"),
        nested: None,
    }];
    let err = convert(&sc.dir, &src, tensors, ops, 64).unwrap_err();
    assert!(err.to_string().contains("I32"), "{err}");

    // A corrupt source is reported as such.
    let bad = sc.dir.join("bad.safetensors");
    let mut bytes = fs::read(&sc.src).unwrap();
    bytes.truncate(bytes.len() - 3);
    fs::write(&bad, bytes).unwrap();
    let (tensors, ops) = four_bit_ops(QuantType::Nf4, None);
    let err = convert(&sc.dir, &bad, tensors, ops, 64).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(leftovers(&sc.dir).is_empty());
}

fn cast(name: &str, to: Dtype) -> Source {
    Source {
        cast: Some(to),
        ..s(name)
    }
}

#[test]
fn casts_round_as_torch_and_feed_the_quantizers() {
    let sc = scene();
    // c.weight is f32: to bf16 and f16 as torch rounds (nearest even); a.weight (bf16) to f32.
    let n3 = (W3.0 * W3.1) as usize;
    let w3b: Vec<u16> = sc
        .w3
        .iter()
        .map(|x| half::bf16::from_f32(*x).to_bits())
        .collect();
    let w3h: Vec<u16> = sc
        .w3
        .iter()
        .map(|x| half::f16::from_f32(*x).to_bits())
        .collect();
    let w1f: Vec<f32> = sc
        .w1
        .iter()
        .map(|x| half::bf16::from_f32(*x).to_f32())
        .collect();
    let r4 = reference_q4(Floats::Bf16(&w3b), QuantType::Nf4, None);
    let mut q8 = vec![0i8; n3];
    let mut scb = vec![0f32; W3.0 as usize];
    // int8 through bf16 first, then f16 (as bitsandbytes does with a bf16 weight).
    let w3bh: Vec<u16> = w3b
        .iter()
        .map(|b| half::f16::from_f32(half::bf16::from_bits(*b).to_f32()).to_bits())
        .collect();
    codec::quantize_int8_rows(&w3bh, W3.0 as usize, W3.1 as usize, &mut q8, &mut scb).unwrap();
    for chunk in [1, 100, 1 << 22] {
        let tensors = vec![
            spec("c.bf16", Dtype::BF16, &[W3.0, W3.1]),
            spec("c.f16", Dtype::F16, &[W3.0, W3.1]),
            spec("a.f32", Dtype::F32, &[W1.0, W1.1]),
            spec("c.weight", Dtype::U8, &[packed_len(n3) as u64, 1]),
            spec("c.weight.absmax", Dtype::F32, &[num_blocks(n3, 64) as u64]),
            spec("c8.weight", Dtype::I8, &[W3.0, W3.1]),
            spec("c8.SCB", Dtype::F32, &[W3.0]),
        ];
        let ops = vec![
            Op::Copy {
                src: cast("c.weight", Dtype::BF16),
                out: t("c.bf16"),
            },
            Op::Copy {
                src: cast("c.weight", Dtype::F16),
                out: t("c.f16"),
            },
            Op::Copy {
                src: cast("a.weight", Dtype::F32),
                out: t("a.f32"),
            },
            Op::Quant4 {
                src: cast("c.weight", Dtype::BF16),
                quant_type: QuantType::Nf4,
                blocksize: 64,
                packed: t("c.weight"),
                absmax: t("c.weight.absmax"),
                nested: None,
            },
            Op::Int8 {
                src: cast("c.weight", Dtype::BF16),
                rows: W3.0 as usize,
                cols: W3.1 as usize,
                weight: t("c8.weight"),
                scb: t("c8.SCB"),
            },
        ];
        let out = convert(&sc.dir, &sc.src, tensors, ops, chunk).unwrap();
        let got = read_all(&out);
        assert_eq!(
            got["c.bf16"],
            bytemuck::cast_slice::<u16, u8>(&w3b),
            "chunk {chunk}"
        );
        assert_eq!(
            got["c.f16"],
            bytemuck::cast_slice::<u16, u8>(&w3h),
            "chunk {chunk}"
        );
        assert_eq!(got["a.f32"], f32_bytes(&w1f), "chunk {chunk}");
        assert_eq!(got["c.weight"], r4.0, "chunk {chunk}");
        assert_eq!(got["c.weight.absmax"], r4.1, "chunk {chunk}");
        assert_eq!(
            got["c8.weight"],
            bytemuck::cast_slice::<i8, u8>(&q8),
            "chunk {chunk}"
        );
        assert_eq!(got["c8.SCB"], f32_bytes(&scb), "chunk {chunk}");
        fs::remove_file(out).unwrap();
    }
    // The absmax pass reads the cast too.
    let a = quantsave::convert::absmax_4bit(&sc.src, "c.weight", 64, 100, Some(Dtype::BF16), false)
        .unwrap();
    assert_eq!(f32_bytes(&a), r4.1);
    // Only float casts of float tensors.
    let tensors = vec![spec("x", Dtype::I8, &[W3.0, W3.1])];
    let ops = vec![Op::Copy {
        src: cast("c.weight", Dtype::I8),
        out: t("x"),
    }];
    let err = convert(&sc.dir, &sc.src, tensors, ops, 100).unwrap_err();
    assert!(
        err.to_string().contains("only F32, BF16 and F16 casts"),
        "{err}"
    );
    assert!(leftovers(&sc.dir).is_empty());
}

#[test]
fn float_casts_keep_nan_and_infinities() {
    let x = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        1.0 + f32::EPSILON,
    ];
    let b = codec::FloatBuf::cast(Floats::F32(&x), Dtype::BF16).unwrap();
    let codec::FloatBuf::Bf16(v) = b else {
        panic!("bf16")
    };
    assert_eq!(v, vec![0x7fc0, 0x7f80, 0xff80, 0x8000, 0x3f80]);
    let h = codec::FloatBuf::cast(Floats::Bf16(&v), Dtype::F16).unwrap();
    let codec::FloatBuf::F16(w) = h else {
        panic!("f16")
    };
    assert!(half::f16::from_bits(w[0]).is_nan());
    assert_eq!(&w[1..], &[0x7c00, 0xfc00, 0x8000, 0x3c00]);
    assert!(codec::FloatBuf::cast(Floats::F32(&x), Dtype::I8).is_none());
}

#[test]
fn transposed_sources_quantize_the_transpose() {
    let sc = scene();
    // c.weight is f32 [33, 40]; its transpose [40, 33], cast to bf16 as well.
    let (rows, cols) = (W3.0 as usize, W3.1 as usize);
    let mut tr = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            tr[c * rows + r] = sc.w3[r * cols + c];
        }
    }
    let trb: Vec<u16> = tr
        .iter()
        .map(|x| half::bf16::from_f32(*x).to_bits())
        .collect();
    let n = rows * cols;
    let r4 = reference_q4(Floats::Bf16(&trb), QuantType::Fp4, None);
    let trh: Vec<u16> = tr
        .iter()
        .map(|x| half::f16::from_f32(*x).to_bits())
        .collect();
    let mut q8 = vec![0i8; n];
    let mut scb = vec![0f32; cols];
    codec::quantize_int8_rows(&trh, cols, rows, &mut q8, &mut scb).unwrap();
    let read = |cast: Option<Dtype>| Source {
        cast,
        transposed: true,
        ..s("c.weight")
    };
    for chunk in [1, 100, 1 << 22] {
        let tensors = vec![
            spec("t.weight", Dtype::U8, &[packed_len(n) as u64, 1]),
            spec("t.weight.absmax", Dtype::F32, &[num_blocks(n, 64) as u64]),
            spec("t8.weight", Dtype::I8, &[W3.1, W3.0]),
            spec("t8.SCB", Dtype::F32, &[W3.1]),
        ];
        let ops = vec![
            Op::Quant4 {
                src: read(Some(Dtype::BF16)),
                quant_type: QuantType::Fp4,
                blocksize: 64,
                packed: t("t.weight"),
                absmax: t("t.weight.absmax"),
                nested: None,
            },
            Op::Int8 {
                src: read(None),
                rows: cols,
                cols: rows,
                weight: t("t8.weight"),
                scb: t("t8.SCB"),
            },
        ];
        let out = convert(&sc.dir, &sc.src, tensors, ops, chunk).unwrap();
        let got = read_all(&out);
        assert_eq!(got["t.weight"], r4.0, "chunk {chunk}");
        assert_eq!(got["t.weight.absmax"], r4.1, "chunk {chunk}");
        assert_eq!(
            got["t8.weight"],
            bytemuck::cast_slice::<i8, u8>(&q8),
            "chunk {chunk}"
        );
        assert_eq!(got["t8.SCB"], f32_bytes(&scb), "chunk {chunk}");
        fs::remove_file(out).unwrap();
    }
    let a = quantsave::convert::absmax_4bit(&sc.src, "c.weight", 64, 100, Some(Dtype::BF16), true)
        .unwrap();
    assert_eq!(f32_bytes(&a), r4.1);
    // A copy does not transpose; a 1-D tensor cannot be.
    let tensors = vec![spec("x", Dtype::F32, &[W3.1, W3.0])];
    let ops = vec![Op::Copy {
        src: read(None),
        out: t("x"),
    }];
    let err = convert(&sc.dir, &sc.src, tensors, ops, 100).unwrap_err();
    assert!(err.to_string().contains("only quantizing ops"), "{err}");
    let tensors = vec![spec("y", Dtype::U8, &[48, 1]), spec("ya", Dtype::F32, &[2])];
    let ops = vec![Op::Quant4 {
        src: Source {
            transposed: true,
            ..s("a.bias")
        },
        quant_type: QuantType::Nf4,
        blocksize: 64,
        packed: t("y"),
        absmax: t("ya"),
        nested: None,
    }];
    let err = convert(&sc.dir, &sc.src, tensors, ops, 100).unwrap_err();
    assert!(err.to_string().contains("only 2-D tensors"), "{err}");
    assert!(leftovers(&sc.dir).is_empty());
}
