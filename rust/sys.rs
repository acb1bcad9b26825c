//! The few operating-system calls that differ between platforms, each with a portable meaning:
//! positional writes, page-cache hints, folder fsync, atomic path exchange and fork detection.
//! Hints are no-ops where the platform has none; nothing else in the crate names a platform.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Writes all of `buf` at byte `offset` of `file`, leaving other threads' writes at other
/// offsets undisturbed.
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::FileExt;
        let (mut buf, mut offset) = (buf, offset);
        while !buf.is_empty() {
            match file.seek_write(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Fills `buf` from byte `offset` of `file`.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::FileExt;
        let (mut buf, mut offset) = (buf, offset);
        while !buf.is_empty() {
            match file.seek_read(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Tells the kernel a mapping will be read from start to end (read-ahead). A hint.
pub fn advise_sequential(map: &memmap2::MmapMut) {
    #[cfg(unix)]
    {
        let _ = map.advise(memmap2::Advice::Sequential);
    }
    #[cfg(not(unix))]
    let _ = map;
}

/// Drops the pages of `len` bytes at `offset` of a private mapping never written to from this process,
/// so a later read faults them in again from the file (which keeps them cached). A hint.
///
/// # Safety
/// No slice into the range may be used after the call by the caller, and the mapping must be
/// private and never written (so dropping pages cannot lose data).
pub unsafe fn release_pages(map: &memmap2::MmapMut, offset: usize, len: usize) {
    #[cfg(unix)]
    {
        // SAFETY: forwarded from this function's contract.
        let _ =
            unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    }
    #[cfg(not(unix))]
    let _ = (map, offset, len);
}

/// Starts writing `len` bytes at `offset` of `file` back to the disk without waiting (Linux
/// `sync_file_range`), so a later fsync has less left to wait for. A hint.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor and a byte range; no memory is passed.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Lowers the calling thread's CPU share (nice 5, a quarter of a nice-0 thread's weight). Linux
/// nice values are per thread; elsewhere a no-op.
pub fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers; failure only leaves the priority as is.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 5);
    }
}

/// fsyncs a folder so the renames inside it are durable. Windows has no folder fsync (its
/// renames are journaled by NTFS), so there it does nothing.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir).and_then(|f| f.sync_all())
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Swaps two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`, macOS
/// `renamex_np(RENAME_SWAP)`): afterwards each name points to what the other did. `Ok(false)`
/// where the platform or the filesystem cannot exchange (the caller falls back to two renames);
/// a path with a NUL byte is an `InvalidInput` error.
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub fn exchange_paths(a: &Path, b: &Path) -> io::Result<bool> {
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c_path = |p: &Path| {
            CString::new(p.as_os_str().as_bytes()).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte")
            })
        };
        let (ca, cb) = (c_path(a)?, c_path(b)?);
        // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
        #[cfg(target_os = "linux")]
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        // SAFETY: as above.
        #[cfg(target_os = "macos")]
        let rc = unsafe { libc::renamex_np(ca.as_ptr(), cb.as_ptr(), libc::RENAME_SWAP) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        // (ENOTSUP is EOPNOTSUPP on Linux, a separate value on macOS.)
        let cannot = [libc::EINVAL, libc::ENOSYS, libc::EOPNOTSUPP, libc::ENOTSUP];
        match err.raw_os_error() {
            Some(code) if cannot.contains(&code) => Ok(false),
            _ => Err(err),
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        let _ = (a, b);
        Ok(false)
    }
}

/// Set in a child process created by `fork()` once [`watch_fork`] ran in its parent.
static FORKED: AtomicBool = AtomicBool::new(false);

#[cfg(unix)]
extern "C" fn mark_forked() {
    FORKED.store(true, Ordering::SeqCst);
}

/// Makes [`forked`] report true in every child this process forks from now on (torch
/// DataLoader workers, multiprocessing), whose copies of the parent's threads do not exist.
/// Windows has no fork: there it does nothing.
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub fn watch_fork() {
    // SAFETY: `mark_forked` only stores to an atomic, which is async-signal-safe as a fork
    // child handler must be; the other two handlers are absent.
    #[cfg(unix)]
    unsafe {
        libc::pthread_atfork(None, None, Some(mark_forked));
    }
}

/// Whether this process is a child forked after [`watch_fork`].
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub fn forked() -> bool {
    FORKED.load(Ordering::SeqCst)
}
