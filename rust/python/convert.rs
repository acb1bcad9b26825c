//! Bindings of the streaming conversion (`crate::convert`): `ConvertOp`, one produced tensor
//! group built by a named constructor, `Conversion`, which runs a list of them without the GIL
//! while Python polls its progress, and `absmax_4bit`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::errors::run_detached;
use super::safetensors::{parse_dtype, tensor_specs};
use crate::convert::{self, ConvertSpec, Nested, Op, ShardOut, Source, Target};

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ConvertOp>()?;
    m.add_class::<Conversion>()?;
    m.add_function(wrap_pyfunction!(absmax_4bit, m)?)?;
    Ok(())
}

/// One tensor group a `Conversion` produces, built by one of the static constructors; every
/// target names a tensor of shard `shard` (an index into the conversion's shards), every
/// source a tensor `name` of source file `file` (an index into its sources).
#[pyclass(module = "quantsave._core", frozen)]
struct ConvertOp {
    op: Op,
}

#[pymethods]
impl ConvertOp {
    /// Source tensor `name` of file `file`, copied unchanged into tensor `target`.
    #[staticmethod]
    #[pyo3(signature = (*, file, name, shard, target, cast=None))]
    fn copy(
        file: usize,
        name: String,
        shard: usize,
        target: String,
        cast: Option<&str>,
    ) -> PyResult<Self> {
        Ok(ConvertOp {
            op: Op::Copy {
                src: source(file, name, cast, false)?,
                out: Target {
                    shard,
                    name: target,
                },
            },
        })
    }

    /// Fixed bytes (a code table, a quant-state JSON) as tensor `target`.
    #[staticmethod]
    #[pyo3(signature = (*, data, shard, target))]
    fn bytes(data: Vec<u8>, shard: usize, target: String) -> Self {
        ConvertOp {
            op: Op::Bytes {
                data,
                out: Target {
                    shard,
                    name: target,
                },
            },
        }
    }

    /// bitsandbytes 4-bit (`quant_type` "nf4" or "fp4") of source tensor `name` of file `file`:
    /// packed codes into tensor `packed`, absmax into tensor `absmax`. `nested` is None, or
    /// `(offset, nested_absmax)` for double quantization (`absmax` then holds uint8 codes and
    /// `nested_absmax` the float32 absmax of the nested blocks). All targets are in `shard`.
    #[staticmethod]
    #[pyo3(signature = (*, file, name, quant_type, blocksize, shard, packed, absmax, nested=None, cast=None, transposed=false))]
    #[allow(clippy::too_many_arguments)]
    fn quant4(
        file: usize,
        name: String,
        quant_type: &str,
        blocksize: usize,
        shard: usize,
        packed: String,
        absmax: String,
        nested: Option<(f32, String)>,
        cast: Option<&str>,
        transposed: bool,
    ) -> PyResult<Self> {
        let tgt = |name: String| Target { shard, name };
        Ok(ConvertOp {
            op: Op::Quant4 {
                src: source(file, name, cast, transposed)?,
                quant_type: quant_type.parse()?,
                blocksize,
                packed: tgt(packed),
                absmax: tgt(absmax),
                nested: nested.map(|(offset, n)| Nested {
                    offset,
                    nested_absmax: tgt(n),
                }),
            },
        })
    }

    /// LLM.int8() of source tensor `name` of file `file`, a `rows` x `cols` matrix: int8 into
    /// tensor `weight`, float32 row absmax into tensor `scb`, both in `shard`.
    #[staticmethod]
    #[pyo3(signature = (*, file, name, rows, cols, shard, weight, scb, cast=None, transposed=false))]
    #[allow(clippy::too_many_arguments)]
    fn int8(
        file: usize,
        name: String,
        rows: usize,
        cols: usize,
        shard: usize,
        weight: String,
        scb: String,
        cast: Option<&str>,
        transposed: bool,
    ) -> PyResult<Self> {
        let tgt = |name: String| Target { shard, name };
        Ok(ConvertOp {
            op: Op::Int8 {
                src: source(file, name, cast, transposed)?,
                rows,
                cols,
                weight: tgt(weight),
                scb: tgt(scb),
            },
        })
    }

    /// Which constructor made it: "copy", "bytes", "quant4" or "int8".
    #[getter]
    fn kind(&self) -> &'static str {
        match self.op {
            Op::Copy { .. } => "copy",
            Op::Bytes { .. } => "bytes",
            Op::Quant4 { .. } => "quant4",
            Op::Int8 { .. } => "int8",
        }
    }

    fn __repr__(&self) -> String {
        match &self.op {
            Op::Copy { src, out } => format!(
                "ConvertOp.copy(file={}, name={:?}, shard={}, target={:?}, cast={})",
                src.file,
                src.name,
                out.shard,
                out.name,
                cast_repr(src)
            ),
            Op::Bytes { data, out } => format!(
                "ConvertOp.bytes(data=<{} bytes>, shard={}, target={:?})",
                data.len(),
                out.shard,
                out.name
            ),
            Op::Quant4 {
                src,
                quant_type,
                blocksize,
                packed,
                absmax,
                nested,
            } => format!(
                "ConvertOp.quant4(file={}, name={:?}, quant_type={:?}, blocksize={blocksize}, \
                 shard={}, packed={:?}, absmax={:?}, nested={}, cast={})",
                src.file,
                src.name,
                quant_type.name(),
                packed.shard,
                packed.name,
                absmax.name,
                match nested {
                    None => "None".to_string(),
                    Some(n) => format!("({:?}, {:?})", n.offset, n.nested_absmax.name),
                },
                cast_repr(src)
            ),
            Op::Int8 {
                src,
                rows,
                cols,
                weight,
                scb,
            } => format!(
                "ConvertOp.int8(file={}, name={:?}, rows={rows}, cols={cols}, shard={}, \
                 weight={:?}, scb={:?}, cast={})",
                src.file,
                src.name,
                weight.shard,
                weight.name,
                scb.name,
                cast_repr(src)
            ),
        }
    }
}

/// A source tensor, read as the dtype named `cast` (a safetensors name) when given, and as its
/// transpose when `transposed`.
fn source(file: usize, name: String, cast: Option<&str>, transposed: bool) -> PyResult<Source> {
    let cast = cast.map(parse_dtype).transpose()?;
    Ok(Source {
        file,
        name,
        cast,
        transposed,
    })
}

fn cast_repr(src: &Source) -> String {
    let cast = src
        .cast
        .map_or("None".to_string(), |d| format!("{:?}", d.to_string()));
    if src.transposed {
        format!("{cast}, transposed=True")
    } else {
        cast
    }
}

/// A streaming conversion (see `quantsave::convert`): `Conversion(sources, shards, ops,
/// chunk_elems, fsync, temps=None)` with shards as `(path, [(name, dtype, shape)], metadata)`
/// and ops a list of `ConvertOp`; `temps`, one per shard: the temporary files other writers
/// created (`StreamWriter(..., shared=True)`), which the ops fill and the creators commit. `run()` works without the GIL; `progress()` (source bytes done) can be
/// polled meanwhile from another thread.
#[pyclass(module = "quantsave._core", frozen)]
struct Conversion {
    spec: ConvertSpec,
    done: AtomicU64,
    started: AtomicBool,
}

/// One output shard as handed over by Python: path, `(name, dtype, shape)` specs, metadata.
type PyShardOut = (
    PathBuf,
    Vec<(String, String, Vec<u64>)>,
    Option<BTreeMap<String, String>>,
);

#[pymethods]
impl Conversion {
    #[new]
    #[pyo3(signature = (sources, shards, ops, chunk_elems=1 << 22, fsync=false, temps=None))]
    fn new(
        sources: Vec<PathBuf>,
        shards: Vec<PyShardOut>,
        ops: Vec<Bound<'_, ConvertOp>>,
        chunk_elems: usize,
        fsync: bool,
        temps: Option<Vec<PathBuf>>,
    ) -> PyResult<Self> {
        if temps.as_ref().is_some_and(|t| t.len() != shards.len()) {
            return Err(PyValueError::new_err("temps must name one file per shard"));
        }
        let mut temps = temps.map(Vec::into_iter);
        let shards = shards
            .into_iter()
            .map(|(path, tensors, metadata)| {
                Ok(ShardOut {
                    path,
                    tensors: tensor_specs(tensors)?,
                    metadata,
                    temp: temps.as_mut().and_then(Iterator::next),
                })
            })
            .collect::<PyResult<_>>()?;
        let ops = ops.iter().map(|op| op.get().op.clone()).collect();
        Ok(Conversion {
            spec: ConvertSpec {
                sources,
                shards,
                ops,
                chunk_elems,
                fsync,
            },
            done: AtomicU64::new(0),
            started: AtomicBool::new(false),
        })
    }

    /// Writes and commits every shard; returns their sizes. Runs once.
    fn run(&self, py: Python<'_>) -> PyResult<Vec<u64>> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Err(PyValueError::new_err("this conversion already ran"));
        }
        run_detached(py, || convert::run(&self.spec, &self.done))
    }

    /// Source bytes processed so far.
    fn progress(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

/// The absmax of every 4-bit block of tensor `name` in `path` (float32 bytes), read as the
/// dtype `cast` names (see `ConvertOp.copy`).
#[pyfunction]
#[pyo3(signature = (path, name, blocksize=64, chunk_elems=1 << 22, cast=None, transposed=false))]
fn absmax_4bit(
    py: Python<'_>,
    path: PathBuf,
    name: String,
    blocksize: usize,
    chunk_elems: usize,
    cast: Option<&str>,
    transposed: bool,
) -> PyResult<Vec<u8>> {
    let cast = cast.map(parse_dtype).transpose()?;
    let v = run_detached(py, || {
        convert::absmax_4bit(&path, &name, blocksize, chunk_elems, cast, transposed)
    })?;
    Ok(bytemuck::cast_slice(&v).to_vec())
}
