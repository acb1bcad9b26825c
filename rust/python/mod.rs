//! The PyO3 binding `quantsave._core`, a thin layer over the core, one file per area. Each call
//! validates its arguments while holding the GIL (tensor bytes are taken as `PyBuffer<u8>`
//! views, never copied, in `buffer`), releases the GIL for the work and maps core errors to
//! Python exceptions (both through `errors::run_detached`), then converts the result.

mod buffer;
mod codec;
mod convert;
mod errors;
mod fs;
mod names;
mod plan;
mod safetensors;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::init_threads();
    m.add(
        "CheckpointError",
        m.py().get_type::<errors::CheckpointError>(),
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    safetensors::register(m)?;
    plan::register(m)?;
    names::register(m)?;
    fs::register(m)?;
    codec::register(m)?;
    convert::register(m)?;
    Ok(())
}
