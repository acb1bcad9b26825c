//! How the binding runs core work and reports its failures: core errors as Python exceptions,
//! the thread pool (its size, and a pool of its own in a forked child), and [`run_detached`],
//! the one helper every long call goes through.

use pyo3::create_exception;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyPermissionError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

create_exception!(
    quantsave._core,
    CheckpointError,
    PyValueError,
    "A checkpoint file or folder is corrupt, truncated or inconsistent."
);

/// A core error as the matching Python exception: I/O errors keep their errno and name the
/// path (`FileNotFoundError`, `PermissionError`, else `OSError`), corrupt files are
/// `CheckpointError`, bad input `ValueError`.
impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        match &err {
            Error::Io { path, source, .. } => {
                let msg = err.to_string();
                let errno = source.raw_os_error();
                let args = (errno.unwrap_or(0), msg, path.to_string_lossy().into_owned());
                match source.kind() {
                    std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(args),
                    std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(args),
                    _ => PyOSError::new_err(args),
                }
            }
            Error::Corrupt { .. } => CheckpointError::new_err(err.to_string()),
            Error::InvalidInput(_) => PyValueError::new_err(err.to_string()),
        }
    }
}

static CHILD_POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();

/// Threads for the global pool: `QUANTSAVE_NUM_THREADS`, else rayon's default (one per core).
fn configured_threads() -> Option<usize> {
    std::env::var("QUANTSAVE_NUM_THREADS")
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&n| n > 0)
}

/// Sizes the global pool from `QUANTSAVE_NUM_THREADS` and starts watching for `fork()`; called
/// once when the module is imported.
pub(super) fn init_threads() {
    if let Some(n) = configured_threads() {
        // Fails only when the global pool already exists (module loaded twice): keep that one.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
    crate::sys::watch_fork();
}

/// Runs `f` on the right pool: the global one, or in a forked child (torch DataLoader workers,
/// multiprocessing), where the parent's rayon threads do not exist, a pool of the child's own.
fn run_on_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if crate::sys::forked() {
        let pool = CHILD_POOL.get_or_init(|| {
            let mut b = rayon::ThreadPoolBuilder::new();
            if let Some(n) = configured_threads() {
                b = b.num_threads(n);
            }
            b.build().unwrap_or_else(|_| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .expect("a one-thread pool")
            })
        });
        pool.install(f)
    } else {
        f()
    }
}

/// Runs `f` without the GIL on the right pool and maps its error; a Ctrl-C that arrived
/// meanwhile is raised as `KeyboardInterrupt`. Every long call goes through here.
pub(super) fn run_detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    let out = py.detach(|| run_on_pool(f)).map_err(PyErr::from);
    py.check_signals()?;
    out
}
