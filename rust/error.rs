//! The core's one error type. Owns error kinds and their messages; depends on nothing else
//! in the crate. Every variant carries enough context (file, tensor, numbers) to act on.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the core.
#[derive(Debug)]
pub enum Error {
    /// An operating-system error on a path (open, write, rename, fsync, ...).
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    /// A file that is not a valid safetensors checkpoint.
    Corrupt { path: PathBuf, reason: String },
    /// Caller input that cannot be saved (bad names, sizes that do not match, ...).
    InvalidInput(String),
}

/// The core's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            op,
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }

    /// The `io::ErrorKind` behind an I/O error, if this is one.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Error::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// The raw OS error number behind an I/O error, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, op, source } => {
                write!(f, "{op} failed for {}: {source}", path.display())
            }
            Error::Corrupt { path, reason } => {
                write!(f, "invalid checkpoint file {}: {reason}", path.display())
            }
            Error::InvalidInput(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
