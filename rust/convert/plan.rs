//! Planning a conversion: every op checked against its source tensor and the sizes in its
//! output headers, resolved to (shard, tensor) slots, and cut into chunks that never straddle
//! a 4-bit or nested block. Reads headers only; must not depend on how chunks are executed.

use std::collections::HashSet;

use super::source::{check_float, Resolved};
use super::spec::{ConvertSpec, Op, Source, Target, NESTED_BLOCKSIZE};
use crate::codec;
use crate::error::{Error, Result};

/// One unit of parallel work: a chunk of an op.
#[derive(Debug, Clone, Copy)]
pub(super) struct Chunk {
    pub(super) op: usize,
    /// First element (4-bit, cast copy), row (int8) or byte (copy).
    pub(super) start: u64,
    pub(super) len: u64,
}

/// An op with everything resolved: source, targets as (shard, tensor index).
pub(super) struct Planned<'a> {
    pub(super) op: &'a Op,
    pub(super) src: Option<Resolved<'a>>,
    pub(super) outs: Vec<(usize, usize)>,
}

/// Plans every op of `spec` in order (the first that fails is the error), cuts each into
/// chunks, and checks that no output tensor is produced twice.
pub(super) fn plan_ops<'a>(
    spec: &'a ConvertSpec,
    resolve: &impl Fn(&Source) -> Result<Resolved<'a>>,
    target: &impl Fn(&Target) -> Result<(usize, usize)>,
    size_of: &impl Fn((usize, usize)) -> u64,
) -> Result<(Vec<Planned<'a>>, Vec<Chunk>)> {
    let mut planned = Vec::with_capacity(spec.ops.len());
    let mut chunks = Vec::new();
    for (k, op) in spec.ops.iter().enumerate() {
        let p = plan_op(op, resolve, target, size_of)?;
        push_chunks(k, &p, spec.chunk_elems, &mut chunks);
        planned.push(p);
    }
    let mut seen = HashSet::new();
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
    Ok((planned, chunks))
}

/// Elements per chunk of a 4-bit op: `chunk_elems` rounded up to whole nested blocks.
pub(super) fn chunk_len(chunk_elems: usize, blocksize: usize) -> usize {
    let unit = blocksize * NESTED_BLOCKSIZE;
    chunk_elems.max(1).div_ceil(unit) * unit
}

/// Checks one op against its source and the sizes its output headers declare.
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
            if src.transposed {
                return Err(Error::invalid(format!(
                    "tensor {:?}: only quantizing ops read a source transposed",
                    src.name
                )));
            }
            let r = resolve(src)?;
            let o = target(out)?;
            let size = match r.cast {
                None => r.info.end - r.info.start,
                Some(to) => r.numel() * to.byte_size(1).unwrap_or(1),
            };
            expect(o, out, size)?;
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

/// Appends the chunks of op `k` to `out` (one empty chunk for an op with nothing to cut).
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
            match r.cast {
                None => cut(r.info.end - r.info.start, (chunk_elems as u64) * 2),
                Some(_) => cut(r.numel(), chunk_elems as u64),
            }
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

/// Source bytes a chunk covers, for the progress counter.
pub(super) fn chunk_source_bytes(p: &Planned<'_>, c: &Chunk) -> u64 {
    match p.op {
        Op::Bytes { .. } => 0,
        Op::Copy { .. } => match p.src.as_ref() {
            Some(r) if r.cast.is_some() => c.len * r.elem_size(),
            _ => c.len,
        },
        Op::Quant4 { .. } => c.len * p.src.as_ref().map_or(0, Resolved::elem_size),
        Op::Int8 { cols, .. } => {
            c.len * *cols as u64 * p.src.as_ref().map_or(0, Resolved::elem_size)
        }
    }
}
