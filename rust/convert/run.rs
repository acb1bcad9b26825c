//! Running a planned conversion: the source maps and output writers opened, the chunks
//! processed in parallel (read, quantize, `pwrite` at their place, release the source pages),
//! and the files committed; also [`absmax_4bit`], the same chunked pass for the double-quant
//! offset. Knows nothing about Python or model configs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;

use super::plan::{chunk_len, chunk_source_bytes, plan_ops, Chunk, Planned};
use super::source::{aligned, check_float, with_floats, Resolved};
use super::spec::{ConvertSpec, Op, Source, Target, NESTED_BLOCKSIZE};
use crate::codec::{self, FloatBuf, Nibble4Layout, QuantType};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::safetensors::{map_file, MappedFile, StreamWriter, TensorInfo};

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
    let infos: Vec<HashMap<&str, &TensorInfo>> = maps
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
        Resolved::new(map, info, s.cast, s.transposed)
    };

    let writers: Vec<StreamWriter> = spec
        .shards
        .iter()
        .map(|s| match &s.temp {
            Some(temp) => StreamWriter::attach(&s.path, temp, &s.tensors, s.metadata.as_ref()),
            None => StreamWriter::create(&s.path, &s.tensors, s.metadata.as_ref()),
        })
        .collect::<Result<_>>()?;
    let target = |t: &Target| -> Result<(usize, usize)> {
        let w = writers
            .get(t.shard)
            .ok_or_else(|| Error::invalid(format!("output shard #{} does not exist", t.shard)))?;
        Ok((t.shard, w.tensor_index(&t.name)?))
    };
    let size_of = |(s, i): (usize, usize)| writers[s].tensor_size(i);

    let (planned, chunks) = plan_ops(spec, &resolve, &target, &size_of)?;

    chunks.par_iter().try_for_each(|c| {
        run_chunk(&planned[c.op], c, &writers)?;
        progress.fetch_add(chunk_source_bytes(&planned[c.op], c), Ordering::Relaxed);
        Ok::<(), Error>(())
    })?;

    writers.into_iter().map(|w| w.finish(spec.fsync)).collect()
}

/// Reads, converts and writes one chunk, then releases its source pages.
fn run_chunk(p: &Planned<'_>, c: &Chunk, writers: &[StreamWriter]) -> Result<()> {
    let write = |o: (usize, usize), at: u64, data: &[u8]| writers[o.0].write_range(o.1, at, data);
    match p.op {
        Op::Bytes { data, .. } => write(p.outs[0], 0, data),
        Op::Copy { .. } => {
            let r = p.src.as_ref().expect("copy has a source");
            match r.cast {
                // Bytes as stored: the chunk is a byte range.
                None => {
                    write(p.outs[0], c.start, r.bytes(c.start, c.len))?;
                    r.release(c.start, c.len);
                }
                // Cast: the chunk is an element range.
                Some(to) => {
                    let at = c.start * to.byte_size(1).unwrap_or(1);
                    with_floats(r, c.start, c.len, |x| write(p.outs[0], at, x.as_bytes()))?;
                    r.release(c.start * r.elem_size(), c.len * r.elem_size());
                }
            }
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
            let half: Vec<u16> =
                if r.info.dtype == Dtype::F16 && r.cast.is_none() && r.transposed.is_none() {
                    aligned::<u16>(r.bytes(first * 2, count * 2)).into_owned()
                } else {
                    match with_floats(r, first, count, |x| FloatBuf::cast(x, Dtype::F16)) {
                        Some(FloatBuf::F16(v)) => v,
                        _ => unreachable!("a cast to F16 gives F16"),
                    }
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

/// The absmax of every 4-bit block of a source tensor (read as `cast` and maybe `transposed`,
/// see [`Source`]), as the codec computes it (the caller takes their mean as the double-quant
/// offset, exactly as bitsandbytes does with torch).
pub fn absmax_4bit(
    path: &std::path::Path,
    name: &str,
    blocksize: usize,
    chunk_elems: usize,
    cast: Option<Dtype>,
    transposed: bool,
) -> Result<Vec<f32>> {
    let map = map_file(path)?;
    let info = map
        .header
        .tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| Error::invalid(format!("{}: no tensor {name:?}", path.display())))?;
    let src = Resolved::new(&map, info, cast, transposed)?;
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
