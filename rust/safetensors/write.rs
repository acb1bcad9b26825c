//! Writing safetensors shards: several files at once, straight from the callers' tensor
//! memory (no staging copy of a shard), each committed by writing a temporary sibling file and
//! renaming it into place. Optional fsync of files and folder. Owns file creation and the
//! commit protocol; the names of the temporaries come from `names`; knows no Python.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use rayon::prelude::*;

use super::header::{layout, layout_specs, Layout, TensorSpec, TensorView};
use crate::error::{Error, Result};
use crate::names::temp_path_for;

/// Options for [`write_shards`].
///
/// Bytes reach each file by sequential `write`s (small tensors coalesced in a 1 MiB buffer,
/// large ones written straight from their memory), one thread per file, files in parallel:
/// measured on the 2-core development machine (see README), buffered writes into one file are
/// serialized by the filesystem's inode lock, so this beat chunked parallel `pwrite` and
/// mapped writes, which `bench_strategies` keeps for the benches.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// fsync every file before its rename and the folder after.
    pub fsync: bool,
}

/// One file to write.
#[derive(Debug, Clone)]
pub struct ShardSpec<'a> {
    pub path: PathBuf,
    pub tensors: Vec<TensorView<'a>>,
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Removes temporaries on drop unless they were committed.
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// Writes every shard and returns the size in bytes of each file.
///
/// All files are written to temporaries first; only when every one is complete (and fsynced,
/// if asked) are they renamed into place, one by one. An error while writing touches no target
/// file; whatever fails, no temporary is left behind.
pub fn write_shards(shards: &[ShardSpec<'_>], opts: &WriteOptions) -> Result<Vec<u64>> {
    Ok(write_shards_impl(shards, opts, false)?
        .into_iter()
        .map(|(size, _)| size)
        .collect())
}

/// [`write_shards`], also returning the sha256 (lowercase hex) of every file written. The bytes
/// are hashed from memory by their own threads while the writers copy and fsync them, so the
/// hash hides behind the writes wherever a core is free; files are hashed before they are
/// committed.
pub fn write_shards_hashed(
    shards: &[ShardSpec<'_>],
    opts: &WriteOptions,
) -> Result<Vec<(u64, String)>> {
    Ok(write_shards_impl(shards, opts, true)?
        .into_iter()
        .map(|(size, hash)| (size, hash.unwrap_or_default()))
        .collect())
}

fn write_shards_impl(
    shards: &[ShardSpec<'_>],
    opts: &WriteOptions,
    hash: bool,
) -> Result<Vec<(u64, Option<String>)>> {
    write_and_commit(shards, opts.fsync, hash, |layouts, files| {
        write_sequential(shards, layouts, files, opts.fsync)
    })
}

/// The commit protocol around one way of filling files: lays out every shard, creates each
/// temporary sibling, lets `fill` write the bytes into them (and, when `fsync` is asked, make
/// them durable), hashes them from memory meanwhile when `hash` is asked, then renames every
/// temporary into place (and fsyncs the folders). Whatever fails, no target file is touched
/// before every file is complete and no temporary is left behind. Returns each file's size and
/// digest.
pub(crate) fn write_and_commit(
    shards: &[ShardSpec<'_>],
    fsync: bool,
    hash: bool,
    fill: impl FnOnce(&[Layout], &[File]) -> Result<()>,
) -> Result<Vec<(u64, Option<String>)>> {
    let layouts: Vec<Layout> = shards
        .iter()
        .map(|s| {
            layout(&s.tensors, s.metadata.as_ref())
                .map_err(|e| Error::invalid(format!("{}: {e}", s.path.display())))
        })
        .collect::<Result<_>>()?;
    let mut temps = TempFiles(Vec::with_capacity(shards.len()));
    let mut files = Vec::with_capacity(shards.len());
    for shard in shards {
        let tmp = temp_path_for(&shard.path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(&shard.path, "create", e))?;
        temps.0.push(tmp);
        files.push(file);
    }
    // Hashing threads read the callers' memory while the writers run: neither waits for the
    // other, so the hash overlaps the copies into the page cache and, above all, the fsyncs.
    let cancel = AtomicBool::new(false);
    let next = AtomicUsize::new(0);
    let hashes: Vec<Option<String>> = std::thread::scope(|scope| -> Result<_> {
        let hashers = hash.then(|| spawn_hashers(scope, shards, &layouts, &next, &cancel));
        let written = fill(&layouts, &files);
        if written.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        let hashes = match hashers {
            Some(h) => h.join(shards.len())?,
            None => vec![None; shards.len()],
        };
        written.map(|()| hashes)
    })?;
    drop(files);
    // Commit: rename each temporary into place. A temporary leaves the cleanup list only once
    // its rename succeeded, so a failure removes every one not yet committed.
    for shard in shards {
        let tmp = temps.0[0].clone();
        fs::rename(&tmp, &shard.path).map_err(|e| Error::io(&shard.path, "rename", e))?;
        temps.0.remove(0);
    }
    if fsync {
        let mut dirs: Vec<&Path> = shards.iter().filter_map(|s| s.path.parent()).collect();
        dirs.sort();
        dirs.dedup();
        for d in dirs {
            sync_dir(d)?;
        }
    }
    Ok(layouts.iter().map(|l| l.file_size).zip(hashes).collect())
}

/// Lowercase hex of a digest.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Threads hashing each file's bytes from memory (header, then tensors in file order), as many
/// as there are cores or files, whichever is fewer; each takes the next file not yet taken.
struct Hashers<'scope> {
    threads: Vec<std::thread::ScopedJoinHandle<'scope, Vec<(usize, String)>>>,
}

fn spawn_hashers<'scope, 'env>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    shards: &'env [ShardSpec<'env>],
    layouts: &'env [Layout],
    next: &'env AtomicUsize,
    cancel: &'env AtomicBool,
) -> Hashers<'scope> {
    use sha2::Digest;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (0..cores.min(shards.len()).max(1))
        .map(|_| {
            scope.spawn(move || {
                // The writers keep the disk busy; the hash mostly fills the time they wait on it,
                // without being starved when other programs load every core.
                crate::sys::lower_thread_priority();
                let mut done = Vec::new();
                loop {
                    let f = next.fetch_add(1, Ordering::Relaxed);
                    if f >= shards.len() {
                        return done;
                    }
                    let (shard, lay) = (&shards[f], &layouts[f]);
                    let mut h = sha2::Sha256::new();
                    h.update(&lay.header);
                    'file: for &i in &lay.order {
                        for c in shard.tensors[i].data.chunks(4 << 20) {
                            if cancel.load(Ordering::Relaxed) {
                                break 'file;
                            }
                            h.update(c);
                        }
                    }
                    done.push((f, hex(&h.finalize())));
                }
            })
        })
        .collect();
    Hashers { threads }
}

impl Hashers<'_> {
    /// Every file's digest, in file order.
    fn join(self, files: usize) -> Result<Vec<Option<String>>> {
        let mut out = vec![None; files];
        for t in self.threads {
            let done = t
                .join()
                .map_err(|_| Error::invalid("a hashing thread panicked"))?;
            for (f, d) in done {
                out[f] = Some(d);
            }
        }
        Ok(out)
    }
}

/// The sha256 (lowercase hex) of a file's contents, read in 8 MiB pieces, each hashed while
/// the next is read.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let mut h = sha2::Sha256::new();
    let mut cur = vec![0u8; 8 << 20];
    let mut next = vec![0u8; 8 << 20];
    let fill = |f: &mut File, buf: &mut [u8]| -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    };
    let mut len = fill(&mut f, &mut cur).map_err(|e| Error::io(path, "read", e))?;
    while len > 0 {
        let (read, ()) = rayon::join(|| fill(&mut f, &mut next), || h.update(&cur[..len]));
        len = read.map_err(|e| Error::io(path, "read", e))?;
        std::mem::swap(&mut cur, &mut next);
    }
    Ok(hex(&h.finalize()))
}

fn write_sequential(
    shards: &[ShardSpec<'_>],
    layouts: &[Layout],
    files: &[File],
    fsync: bool,
) -> Result<()> {
    let write_one = |file: &File, shard: &ShardSpec<'_>, lay: &Layout| -> Result<()> {
        let io = |e| Error::io(&shard.path, "write", e);
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut kick = Writeback::new(fsync);
        let pieces = std::iter::once(lay.header.as_slice())
            .chain(lay.order.iter().map(|&i| shard.tensors[i].data));
        for piece in pieces {
            for c in piece.chunks(4 << 20) {
                w.write_all(c).map_err(io)?;
                kick.wrote(&w, c.len());
            }
        }
        let f = w.into_inner().map_err(|e| io(e.into_error()))?;
        if fsync {
            f.sync_all()
                .map_err(|e| Error::io(&shard.path, "fsync", e))?;
        }
        Ok(())
    };
    if files.len() == 1 {
        // One file gains nothing from the pool: write it on the calling thread.
        return write_one(&files[0], &shards[0], &layouts[0]);
    }
    files
        .par_iter()
        .zip(shards.par_iter().zip(layouts.par_iter()))
        .try_for_each(|(file, (shard, lay))| write_one(file, shard, lay))
}

/// When the file will be fsynced, starts the writeback of what has been written so far every
/// 32 MiB (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait for it), so the disk
/// works while the rest is still being copied instead of only once the fsync begins.
struct Writeback {
    on: bool,
    started: u64,
    /// Bytes handed to the buffered writer.
    total: u64,
}

impl Writeback {
    fn new(fsync: bool) -> Self {
        Writeback {
            on: fsync,
            started: 0,
            total: 0,
        }
    }

    /// Notes `n` more bytes handed to `w` and, once 32 MiB have reached the file since the last
    /// start, starts their writeback. A failure here is left to the fsync to report.
    fn wrote(&mut self, w: &std::io::BufWriter<&File>, n: usize) {
        self.total += n as u64;
        if !self.on {
            return;
        }
        let in_file = self.total - w.buffer().len() as u64;
        if in_file - self.started >= 32 << 20 {
            crate::sys::start_writeback(w.get_ref(), self.started, in_file - self.started);
            self.started = in_file;
        }
    }
}

/// fsyncs a folder so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    crate::sys::sync_dir(d).map_err(|e| Error::io(d, "fsync", e))
}

/// Writes `data` to `path` through a temporary sibling and a rename.
pub fn write_bytes_atomic(path: &Path, data: &[u8], fsync: bool) -> Result<()> {
    let tmp = temp_path_for(path);
    let mut guard = TempFiles(vec![tmp.clone()]);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::io(path, "create", e))?;
    f.write_all(data).map_err(|e| Error::io(path, "write", e))?;
    if fsync {
        f.sync_all().map_err(|e| Error::io(path, "fsync", e))?;
    }
    drop(f);
    fs::rename(&tmp, path).map_err(|e| Error::io(path, "rename", e))?;
    guard.0.clear();
    if fsync {
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    }
    Ok(())
}

/// A safetensors file whose header is fixed up front and whose tensors arrive one at a time,
/// in any order, each written at its offset (`pwrite`), so a producer (a streaming converter)
/// holds one tensor at a time. The file is a temporary sibling until [`StreamWriter::finish`]
/// renames it into place; a writer dropped unfinished removes it, leaving the target untouched.
#[derive(Debug)]
pub struct StreamWriter {
    path: PathBuf,
    tmp: Option<PathBuf>,
    file: File,
    index: std::collections::HashMap<String, usize>,
    offsets: Vec<u64>,
    sizes: Vec<u64>,
    /// Bytes written so far per tensor (ranges are written at most once each by callers).
    filled: Vec<AtomicU64>,
    file_size: u64,
    /// Other writers (other processes, through [`StreamWriter::attach`]) fill some tensors:
    /// `finish` cannot count their bytes and commits without the completeness check.
    shared: bool,
    /// Opened by [`StreamWriter::attach`]: `finish` only syncs, the creator commits.
    attached: bool,
}

impl StreamWriter {
    /// Creates the temporary file with its final header and size.
    pub fn create(
        path: &Path,
        tensors: &[TensorSpec],
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<Self> {
        Self::create_with(path, tensors, metadata, false)
    }

    /// As [`StreamWriter::create`], for a file other processes fill too (each opens the
    /// temporary file, [`StreamWriter::temp_path`], with [`StreamWriter::attach`]); the caller
    /// knows every tensor was written (each writer reports success) before calling `finish`.
    pub fn create_shared(
        path: &Path,
        tensors: &[TensorSpec],
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<Self> {
        Self::create_with(path, tensors, metadata, true)
    }

    fn create_with(
        path: &Path,
        tensors: &[TensorSpec],
        metadata: Option<&BTreeMap<String, String>>,
        shared: bool,
    ) -> Result<Self> {
        let mut lay = layout_specs(tensors, metadata)
            .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        let tmp = temp_path_for(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(path, "create", e))?;
        // The header is written once the writer exists (so a failure removes the file).
        let (header, file_size) = (std::mem::take(&mut lay.header), lay.file_size);
        let writer = Self::with_layout(path, Some(tmp), file, tensors, lay, shared, false)?;
        writer
            .file
            .set_len(file_size)
            .map_err(|e| Error::io(path, "allocate", e))?;
        crate::sys::write_all_at(&writer.file, &header, 0)
            .map_err(|e| Error::io(path, "write", e))?;
        Ok(writer)
    }

    /// Opens `temp`, the temporary file another writer made with [`StreamWriter::create_shared`]
    /// for `path`, to fill some of its tensors. The specs and metadata must be the creator's:
    /// a file whose size or header differs (another plan) is refused. `finish` on this writer
    /// only syncs; the file is never removed or renamed from here.
    pub fn attach(
        path: &Path,
        temp: &Path,
        tensors: &[TensorSpec],
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<Self> {
        let lay = layout_specs(tensors, metadata)
            .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(temp)
            .map_err(|e| Error::io(temp, "open", e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(temp, "stat", e))?
            .len();
        let mut head = vec![0u8; lay.header.len()];
        if len == lay.file_size {
            crate::sys::read_exact_at(&file, &mut head, 0)
                .map_err(|e| Error::io(temp, "read", e))?;
        }
        if len != lay.file_size || head != lay.header {
            return Err(Error::invalid(format!(
                "{}: the file being written has another layout than this writer's tensors \
                 (the writers planned different files)",
                path.display()
            )));
        }
        Self::with_layout(path, None, file, tensors, lay, true, true)
    }

    /// The writer of an opened file laid out as `lay` for `tensors`.
    fn with_layout(
        path: &Path,
        tmp: Option<PathBuf>,
        file: File,
        tensors: &[TensorSpec],
        lay: Layout,
        shared: bool,
        attached: bool,
    ) -> Result<Self> {
        Ok(StreamWriter {
            path: path.to_path_buf(),
            tmp,
            file,
            index: tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            offsets: lay.offsets,
            sizes: tensors
                .iter()
                .map(TensorSpec::byte_size)
                .collect::<Result<_>>()?,
            filled: tensors.iter().map(|_| AtomicU64::new(0)).collect(),
            file_size: lay.file_size,
            shared,
            attached,
        })
    }

    /// The temporary file being written (None for an attached writer).
    pub fn temp_path(&self) -> Option<&Path> {
        self.tmp.as_deref()
    }

    /// Writes tensor `name` (its bytes must match its dtype and shape; each tensor once).
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let i = self.tensor_index(name)?;
        if self.filled[i].load(Ordering::Relaxed) != 0 {
            return Err(Error::invalid(format!(
                "{}: tensor {name:?} was already written",
                self.path.display()
            )));
        }
        if data.len() as u64 != self.sizes[i] {
            return Err(Error::invalid(format!(
                "{}: tensor {name:?} needs {} bytes, got {}",
                self.path.display(),
                self.sizes[i],
                data.len()
            )));
        }
        self.write_range(i, 0, data)
    }

    /// The position of tensor `name` in the specs this writer was created with.
    pub fn tensor_index(&self, name: &str) -> Result<usize> {
        self.index.get(name).copied().ok_or_else(|| {
            Error::invalid(format!(
                "{}: no tensor {name:?} in this file",
                self.path.display()
            ))
        })
    }

    /// Byte size of tensor `i`.
    pub fn tensor_size(&self, i: usize) -> u64 {
        self.sizes[i]
    }

    /// Writes `data` at byte `at` of tensor `i` (by [`StreamWriter::tensor_index`]). Takes
    /// `&self`, so threads can fill disjoint parts of one file at once; the caller writes each
    /// byte of a tensor once (the writer counts bytes, it does not track ranges).
    pub fn write_range(&self, i: usize, at: u64, data: &[u8]) -> Result<()> {
        let size = *self
            .sizes
            .get(i)
            .ok_or_else(|| Error::invalid(format!("{}: no tensor #{i}", self.path.display())))?;
        let end = at.checked_add(data.len() as u64);
        if end.is_none_or(|e| e > size) {
            return Err(Error::invalid(format!(
                "{}: bytes {at}..{} fall outside tensor #{i} ({size} bytes)",
                self.path.display(),
                at.saturating_add(data.len() as u64)
            )));
        }
        crate::sys::write_all_at(&self.file, data, self.offsets[i] + at)
            .map_err(|e| Error::io(&self.path, "write", e))?;
        self.filled[i].fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Names of the tensors not completely written yet.
    pub fn missing(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .index
            .iter()
            .filter(|(_, &i)| self.filled[i].load(Ordering::Relaxed) != self.sizes[i])
            .map(|(n, _)| n.clone())
            .collect();
        out.sort();
        out
    }

    /// Commits the file (fsync first if asked) once every tensor is written; returns its size.
    pub fn finish(mut self, fsync: bool) -> Result<u64> {
        if self.attached {
            if fsync {
                self.file
                    .sync_all()
                    .map_err(|e| Error::io(&self.path, "fsync", e))?;
            }
            return Ok(self.file_size);
        }
        let missing = if self.shared {
            Vec::new()
        } else {
            self.missing()
        };
        if !missing.is_empty() {
            return Err(Error::invalid(format!(
                "{}: {} tensor(s) never written, e.g. {:?}",
                self.path.display(),
                missing.len(),
                missing[0]
            )));
        }
        if fsync {
            self.file
                .sync_all()
                .map_err(|e| Error::io(&self.path, "fsync", e))?;
        }
        let tmp = self.tmp.clone().unwrap_or_default();
        fs::rename(&tmp, &self.path).map_err(|e| Error::io(&self.path, "rename", e))?;
        self.tmp = None;
        if fsync {
            if let Some(dir) = self.path.parent() {
                sync_dir(dir)?;
            }
        }
        Ok(self.file_size)
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}
