//! Streaming conversion of float safetensors checkpoints into bitsandbytes checkpoints.
//!
//! The caller (the Python layer, which knows models and configs) describes the output: the
//! shards with their tensor specs, and one [`Op`] per produced tensor group, each naming its
//! source tensor by file and name. [`run`] maps the sources (read-only, never copied), cuts
//! every op into chunks of a bounded number of elements, and processes the chunks in parallel:
//! each chunk is read from the map, quantized into a small buffer and written at its place in
//! the output file (`pwrite` through [`StreamWriter`]), after which its source pages are
//! dropped from the process (`MADV_DONTNEED`; they stay in the page cache). Memory therefore
//! stays at a few chunks per thread whatever the checkpoint size, and checkpoints larger than
//! RAM stream from disk. Every output file is committed (renamed into place) only when all of
//! its tensors are complete; on error none is, and the temporaries are removed.
//!
//! Results are the codec's, bit for bit, as if each tensor were quantized whole: chunks start
//! on multiples of `blocksize * 256` elements, so 4-bit blocks, packed bytes and the nested
//! (double-quant) blocks of absmax never straddle chunks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use crate::codec::{self, Floats, Nibble4Layout, QuantType};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::safetensors::{map_file, MappedFile, StreamWriter, TensorInfo, TensorSpec};

/// Nested blocksize of double quantization (bitsandbytes' fixed 256).
pub const NESTED_BLOCKSIZE: usize = 256;

/// A source tensor: index into [`ConvertSpec::sources`] and its name there.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: usize,
    pub name: String,
}

/// An output tensor: index into [`ConvertSpec::shards`] and its name there.
#[derive(Debug, Clone)]
pub struct Target {
    pub shard: usize,
    pub name: String,
}

/// Double quantization of the 4-bit absmax: `absmax - offset` quantized with the dynamic map
/// in blocks of 256 (the `absmax` target then holds the uint8 codes).
#[derive(Debug, Clone)]
pub struct Nested {
    /// `mean(absmax)` of the whole tensor, computed by the caller (see [`absmax_4bit`]).
    pub offset: f32,
    /// Float32 absmax of the nested blocks.
    pub nested_absmax: Target,
}

/// How one output tensor group is produced.
#[derive(Debug, Clone)]
pub enum Op {
    /// The source bytes unchanged.
    Copy { src: Source, out: Target },
    /// Fixed bytes (code tables, quant-state JSON).
    Bytes { data: Vec<u8>, out: Target },
    /// bitsandbytes 4-bit: packed codes (uint8, two per byte) and absmax.
    Quant4 {
        src: Source,
        quant_type: QuantType,
        blocksize: usize,
        packed: Target,
        absmax: Target,
        nested: Option<Nested>,
    },
    /// LLM.int8() rows: int8 weight and float32 row absmax (SCB); the source goes through
    /// float16 first, as bitsandbytes does.
    Int8 {
        src: Source,
        rows: usize,
        cols: usize,
        weight: Target,
        scb: Target,
    },
}

/// One output file.
#[derive(Debug, Clone)]
pub struct ShardOut {
    pub path: PathBuf,
    pub tensors: Vec<TensorSpec>,
    pub metadata: Option<BTreeMap<String, String>>,
}

/// The whole conversion.
#[derive(Debug, Clone)]
pub struct ConvertSpec {
    pub sources: Vec<PathBuf>,
    pub shards: Vec<ShardOut>,
    pub ops: Vec<Op>,
    /// Elements per chunk (rounded up to whole nested blocks; int8 chunks are whole rows).
    pub chunk_elems: usize,
    pub fsync: bool,
}

impl Default for ConvertSpec {
    fn default() -> Self {
        ConvertSpec {
            sources: Vec::new(),
            shards: Vec::new(),
            ops: Vec::new(),
            chunk_elems: 1 << 22,
            fsync: false,
        }
    }
}

/// A source tensor resolved against its mapped file.
struct Resolved<'a> {
    map: &'a MappedFile,
    info: &'a TensorInfo,
}

impl Resolved<'_> {
    fn bytes(&self, start: u64, len: u64) -> &[u8] {
        let s = (self.info.start + start) as usize;
        &self.map.map[s..s + len as usize]
    }

    fn elem_size(&self) -> u64 {
        self.info.dtype.byte_size(1).unwrap_or(1)
    }

    fn numel(&self) -> u64 {
        (self.info.end - self.info.start) / self.elem_size()
    }

    /// Drops the whole pages of a processed range from this process (they stay cached).
    fn release(&self, start: u64, len: u64) {
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
fn aligned<T: bytemuck::Pod>(bytes: &[u8]) -> std::borrow::Cow<'_, [T]> {
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

/// Reads the elements `start..start + len` of a float source as [`Floats`] and calls `f`.
fn with_floats<T>(src: &Resolved<'_>, start: u64, len: u64, f: impl FnOnce(Floats<'_>) -> T) -> T {
    let es = src.elem_size();
    let bytes = src.bytes(start * es, len * es);
    if src.info.dtype == Dtype::F32 {
        let v = aligned::<f32>(bytes);
        f(floats(Dtype::F32, &v, &[]))
    } else {
        let v = aligned::<u16>(bytes);
        f(floats(src.info.dtype, &[], &v))
    }
}

/// The absmax of every 4-bit block of a source tensor, as the codec computes it (the caller
/// takes their mean as the double-quant offset, exactly as bitsandbytes does with torch).
pub fn absmax_4bit(
    path: &std::path::Path,
    name: &str,
    blocksize: usize,
    chunk_elems: usize,
) -> Result<Vec<f32>> {
    let map = map_file(path)?;
    let info = map
        .header
        .tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| Error::invalid(format!("{}: no tensor {name:?}", path.display())))?;
    let src = Resolved { map: &map, info };
    check_float(&src)?;
    let n = src.numel() as usize;
    let chunk = chunk_len(chunk_elems, blocksize);
    let mut absmax = vec![0f32; codec::num_blocks(n, blocksize)];
    absmax
        .par_chunks_mut(chunk / blocksize)
        .enumerate()
        .try_for_each(|(c, out)| {
            let start = c * chunk;
            let len = chunk.min(n - start);
            let mut packed = vec![0u8; codec::packed_len(len)];
            with_floats(&src, start as u64, len as u64, |x| {
                codec::quantize_4bit(
                    x,
                    blocksize,
                    QuantType::Nf4,
                    Nibble4Layout::HighFirst,
                    &mut packed,
                    out,
                )
            })?;
            src.release(start as u64 * src.elem_size(), len as u64 * src.elem_size());
            Ok(())
        })?;
    Ok(absmax)
}

fn chunk_len(chunk_elems: usize, blocksize: usize) -> usize {
    let unit = blocksize * NESTED_BLOCKSIZE;
    chunk_elems.max(1).div_ceil(unit) * unit
}

fn check_float(src: &Resolved<'_>) -> Result<()> {
    match src.info.dtype {
        Dtype::F32 | Dtype::BF16 | Dtype::F16 => Ok(()),
        other => Err(Error::invalid(format!(
            "tensor {:?} is {other}; only F32, BF16 and F16 weights can be quantized",
            src.info.name
        ))),
    }
}

/// One unit of parallel work: a chunk of an op.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    op: usize,
    /// First element (4-bit), row (int8) or byte (copy).
    start: u64,
    len: u64,
}

/// An op with everything resolved: source, targets as (shard, tensor index).
struct Planned<'a> {
    op: &'a Op,
    src: Option<Resolved<'a>>,
    outs: Vec<(usize, usize)>,
}

/// Runs the conversion; returns the size of each output file. `progress` counts source bytes
/// processed (for progress bars polled from another thread).
pub fn run(spec: &ConvertSpec, progress: &AtomicU64) -> Result<Vec<u64>> {
    let maps: Vec<MappedFile> = spec
        .sources
        .iter()
        .map(|p| map_file(p))
        .collect::<Result<_>>()?;
    for m in &maps {
        crate::sys::advise_sequential(&m.map);
    }
    let infos: Vec<std::collections::HashMap<&str, &TensorInfo>> = maps
        .iter()
        .map(|m| {
            m.header
                .tensors
                .iter()
                .map(|t| (t.name.as_str(), t))
                .collect()
        })
        .collect();
    let resolve = |s: &Source| -> Result<Resolved<'_>> {
        let map = maps
            .get(s.file)
            .ok_or_else(|| Error::invalid(format!("source file #{} does not exist", s.file)))?;
        let info = infos[s.file].get(s.name.as_str()).ok_or_else(|| {
            Error::invalid(format!("{}: no tensor {:?}", map.path.display(), s.name))
        })?;
        Ok(Resolved { map, info })
    };

    let writers: Vec<StreamWriter> = spec
        .shards
        .iter()
        .map(|s| StreamWriter::create(&s.path, &s.tensors, s.metadata.as_ref()))
        .collect::<Result<_>>()?;
    let target = |t: &Target| -> Result<(usize, usize)> {
        let w = writers
            .get(t.shard)
            .ok_or_else(|| Error::invalid(format!("output shard #{} does not exist", t.shard)))?;
        Ok((t.shard, w.tensor_index(&t.name)?))
    };
    let size_of = |(s, i): (usize, usize)| writers[s].tensor_size(i);

    let mut planned = Vec::with_capacity(spec.ops.len());
    let mut chunks = Vec::new();
    for (k, op) in spec.ops.iter().enumerate() {
        let p = plan_op(op, &resolve, &target, &size_of)?;
        push_chunks(k, &p, spec.chunk_elems, &mut chunks);
        planned.push(p);
    }
    let mut seen = std::collections::HashSet::new();
    for p in &planned {
        for &o in &p.outs {
            if !seen.insert(o) {
                let (s, i) = o;
                return Err(Error::invalid(format!(
                    "{}: output tensor #{i} is produced twice",
                    spec.shards[s].path.display()
                )));
            }
        }
    }

    chunks.par_iter().try_for_each(|c| {
        run_chunk(&planned[c.op], c, &writers)?;
        progress.fetch_add(chunk_source_bytes(&planned[c.op], c), Ordering::Relaxed);
        Ok::<(), Error>(())
    })?;

    writers.into_iter().map(|w| w.finish(spec.fsync)).collect()
}

fn plan_op<'a>(
    op: &'a Op,
    resolve: &impl Fn(&Source) -> Result<Resolved<'a>>,
    target: &impl Fn(&Target) -> Result<(usize, usize)>,
    size_of: &impl Fn((usize, usize)) -> u64,
) -> Result<Planned<'a>> {
    let expect = |o: (usize, usize), t: &Target, want: u64| -> Result<()> {
        let have = size_of(o);
        if have != want {
            return Err(Error::invalid(format!(
                "output tensor {:?} has {have} bytes in its header, the conversion produces {want}",
                t.name
            )));
        }
        Ok(())
    };
    match op {
        Op::Copy { src, out } => {
            let r = resolve(src)?;
            let o = target(out)?;
            expect(o, out, r.info.end - r.info.start)?;
            Ok(Planned {
                op,
                src: Some(r),
                outs: vec![o],
            })
        }
        Op::Bytes { data, out } => {
            let o = target(out)?;
            expect(o, out, data.len() as u64)?;
            Ok(Planned {
                op,
                src: None,
                outs: vec![o],
            })
        }
        Op::Quant4 {
            src,
            blocksize,
            packed,
            absmax,
            nested,
            ..
        } => {
            let r = resolve(src)?;
            check_float(&r)?;
            if !(32..=4096).contains(blocksize) || !blocksize.is_power_of_two() {
                return Err(Error::invalid(format!(
                    "blocksize must be a power of two in 32..=4096, got {blocksize}"
                )));
            }
            let n = r.numel() as usize;
            let blocks = codec::num_blocks(n, *blocksize) as u64;
            let (po, ao) = (target(packed)?, target(absmax)?);
            expect(po, packed, codec::packed_len(n) as u64)?;
            let mut outs = vec![po, ao];
            match nested {
                None => expect(ao, absmax, blocks * 4)?,
                Some(nq) => {
                    expect(ao, absmax, blocks)?;
                    let no = target(&nq.nested_absmax)?;
                    expect(
                        no,
                        &nq.nested_absmax,
                        codec::num_blocks(blocks as usize, NESTED_BLOCKSIZE) as u64 * 4,
                    )?;
                    if !nq.offset.is_finite() {
                        return Err(Error::invalid("double-quant offset must be finite"));
                    }
                    outs.push(no);
                }
            }
            Ok(Planned {
                op,
                src: Some(r),
                outs,
            })
        }
        Op::Int8 {
            src,
            rows,
            cols,
            weight,
            scb,
        } => {
            let r = resolve(src)?;
            check_float(&r)?;
            if rows.checked_mul(*cols) != Some(r.numel() as usize) {
                return Err(Error::invalid(format!(
                    "tensor {:?}: {rows} x {cols} does not match its {} elements",
                    r.info.name,
                    r.numel()
                )));
            }
            let (wo, so) = (target(weight)?, target(scb)?);
            expect(wo, weight, (*rows * *cols) as u64)?;
            expect(so, scb, *rows as u64 * 4)?;
            Ok(Planned {
                op,
                src: Some(r),
                outs: vec![wo, so],
            })
        }
    }
}

fn push_chunks(k: usize, p: &Planned<'_>, chunk_elems: usize, out: &mut Vec<Chunk>) {
    let mut cut = |total: u64, step: u64| {
        let step = step.max(1);
        let mut start = 0;
        loop {
            let len = step.min(total - start);
            out.push(Chunk { op: k, start, len });
            start += len;
            if start >= total {
                break;
            }
        }
    };
    match p.op {
        Op::Bytes { .. } => cut(0, 1),
        Op::Copy { .. } => {
            let r = p.src.as_ref().expect("copy has a source");
            cut(r.info.end - r.info.start, (chunk_elems as u64) * 2)
        }
        Op::Quant4 { blocksize, .. } => {
            let r = p.src.as_ref().expect("quant has a source");
            cut(r.numel(), chunk_len(chunk_elems, *blocksize) as u64)
        }
        Op::Int8 { rows, cols, .. } => {
            cut(*rows as u64, (chunk_elems / (*cols).max(1)).max(1) as u64)
        }
    }
}

fn chunk_source_bytes(p: &Planned<'_>, c: &Chunk) -> u64 {
    match p.op {
        Op::Bytes { .. } => 0,
        Op::Copy { .. } => c.len,
        Op::Quant4 { .. } => c.len * p.src.as_ref().map_or(0, Resolved::elem_size),
        Op::Int8 { cols, .. } => {
            c.len * *cols as u64 * p.src.as_ref().map_or(0, Resolved::elem_size)
        }
    }
}

fn run_chunk(p: &Planned<'_>, c: &Chunk, writers: &[StreamWriter]) -> Result<()> {
    let write = |o: (usize, usize), at: u64, data: &[u8]| writers[o.0].write_range(o.1, at, data);
    match p.op {
        Op::Bytes { data, .. } => write(p.outs[0], 0, data),
        Op::Copy { .. } => {
            let r = p.src.as_ref().expect("copy has a source");
            write(p.outs[0], c.start, r.bytes(c.start, c.len))?;
            r.release(c.start, c.len);
            Ok(())
        }
        Op::Quant4 {
            quant_type,
            blocksize,
            nested,
            ..
        } => {
            let r = p.src.as_ref().expect("quant has a source");
            let (start, len) = (c.start as usize, c.len as usize);
            if len == 0 {
                return Ok(());
            }
            let mut packed = vec![0u8; codec::packed_len(len)];
            let mut absmax = vec![0f32; codec::num_blocks(len, *blocksize)];
            with_floats(r, c.start, c.len, |x| {
                codec::quantize_4bit(
                    x,
                    *blocksize,
                    *quant_type,
                    Nibble4Layout::HighFirst,
                    &mut packed,
                    &mut absmax,
                )
            })
            .map_err(|e| Error::invalid(format!("tensor {:?}: {e}", r.info.name)))?;
            r.release(c.start * r.elem_size(), c.len * r.elem_size());
            write(p.outs[0], (start / 2) as u64, &packed)?;
            let block0 = (start / *blocksize) as u64;
            match nested {
                None => write(p.outs[1], block0 * 4, bytemuck::cast_slice(&absmax)),
                Some(nq) => {
                    let (codes, nabs) =
                        codec::quantize_dynamic(&absmax, nq.offset, NESTED_BLOCKSIZE)?;
                    write(p.outs[1], block0, &codes)?;
                    let nblock0 = block0 / NESTED_BLOCKSIZE as u64;
                    write(p.outs[2], nblock0 * 4, bytemuck::cast_slice(&nabs))
                }
            }
        }
        Op::Int8 { cols, .. } => {
            let r = p.src.as_ref().expect("int8 has a source");
            let cols = *cols;
            let (row0, rows) = (c.start as usize, c.len as usize);
            if rows == 0 {
                return Ok(());
            }
            let first = (row0 * cols) as u64;
            let count = (rows * cols) as u64;
            let half: Vec<u16> = if r.info.dtype == Dtype::F16 {
                aligned::<u16>(r.bytes(first * 2, count * 2)).into_owned()
            } else {
                let mut buf = vec![0f32; rows * cols];
                with_floats(r, first, count, |x| load_f32(x, &mut buf));
                buf.iter()
                    .map(|&v| half::f16::from_f32(v).to_bits())
                    .collect()
            };
            r.release(first * r.elem_size(), count * r.elem_size());
            let mut q = vec![0i8; rows * cols];
            let mut scb = vec![0f32; rows];
            codec::quantize_int8_rows(&half, rows, cols, &mut q, &mut scb)
                .map_err(|e| Error::invalid(format!("tensor {:?}: {e}", r.info.name)))?;
            write(p.outs[0], first, bytemuck::cast_slice(&q))?;
            write(p.outs[1], row0 as u64 * 4, bytemuck::cast_slice(&scb))
        }
    }
}

fn load_f32(x: Floats<'_>, out: &mut [f32]) {
    match x {
        Floats::F32(v) => out.copy_from_slice(v),
        Floats::Bf16(v) => {
            for (o, &b) in out.iter_mut().zip(v) {
                *o = f32::from_bits((b as u32) << 16);
            }
        }
        Floats::F16(v) => {
            for (o, &b) in out.iter_mut().zip(v) {
                *o = half::f16::from_bits(b).to_f32();
            }
        }
    }
}
