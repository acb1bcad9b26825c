//! Write strategies kept only for the benches (`benches/writer.rs`) and the tests that check
//! every strategy writes the same bytes: chunked parallel `pwrite` and mapped copies, next to
//! the production writer they lost to. No save path uses this module; it reuses the production
//! commit protocol (temporaries, hashing, renames) and only fills the files differently.

use std::fs::File;

use rayon::prelude::*;

use super::header::Layout;
use super::write::{write_and_commit, write_shards, write_shards_hashed, ShardSpec, WriteOptions};
use crate::error::{Error, Result};

/// How bytes reach the file.
///
/// Measured on the 2-core development machine (see README): buffered writes into one file are
/// serialized by the filesystem's inode lock, so `Write` (the production writer: one thread per
/// file, files in parallel) is the fastest; chunked parallel `Pwrite` and `Mmap` (page faults
/// per 4 KiB page) are kept for comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStrategy {
    /// [`write_shards`] itself: sequential `write` of header and tensors (small ones coalesced
    /// in a 1 MiB buffer, large ones written straight from their memory).
    Write,
    /// `pwrite` of each tensor (split into chunks) at its offset; chunks run in parallel.
    Pwrite,
    /// Size the file, map it and copy tensors into the map in parallel.
    Mmap,
}

/// Options for [`write_shards_with`].
#[derive(Debug, Clone)]
pub struct StrategyOptions {
    /// fsync every file before its rename and the folder after.
    pub fsync: bool,
    pub strategy: WriteStrategy,
    /// Largest piece handed to one `pwrite`/copy; big tensors are split so threads share them.
    /// `Write` ignores it.
    pub chunk_size: usize,
}

impl Default for StrategyOptions {
    fn default() -> Self {
        StrategyOptions {
            fsync: false,
            strategy: WriteStrategy::Write,
            chunk_size: 16 << 20,
        }
    }
}

/// [`write_shards`] with the bytes written the way `opts.strategy` says; same files, same
/// commit, same result.
pub fn write_shards_with(shards: &[ShardSpec<'_>], opts: &StrategyOptions) -> Result<Vec<u64>> {
    if opts.strategy == WriteStrategy::Write {
        return write_shards(shards, &WriteOptions { fsync: opts.fsync });
    }
    Ok(write_presized(shards, opts, false)?
        .into_iter()
        .map(|(size, _)| size)
        .collect())
}

/// [`write_shards_hashed`] with the bytes written the way `opts.strategy` says.
pub fn write_shards_hashed_with(
    shards: &[ShardSpec<'_>],
    opts: &StrategyOptions,
) -> Result<Vec<(u64, String)>> {
    if opts.strategy == WriteStrategy::Write {
        return write_shards_hashed(shards, &WriteOptions { fsync: opts.fsync });
    }
    Ok(write_presized(shards, opts, true)?
        .into_iter()
        .map(|(size, hash)| (size, hash.unwrap_or_default()))
        .collect())
}

/// `Pwrite` or `Mmap`: size every file, fill it, then fsync all files in parallel if asked.
fn write_presized(
    shards: &[ShardSpec<'_>],
    opts: &StrategyOptions,
    hash: bool,
) -> Result<Vec<(u64, Option<String>)>> {
    write_and_commit(shards, opts.fsync, hash, |layouts, files| {
        for ((f, s), lay) in files.iter().zip(shards).zip(layouts) {
            f.set_len(lay.file_size)
                .map_err(|e| Error::io(&s.path, "allocate", e))?;
        }
        match opts.strategy {
            WriteStrategy::Mmap => write_mmap(shards, layouts, files, opts)?,
            _ => write_pwrite(shards, layouts, files, opts.chunk_size)?,
        }
        if opts.fsync {
            files
                .par_iter()
                .zip(shards)
                .try_for_each(|(f, s)| f.sync_all().map_err(|e| Error::io(&s.path, "fsync", e)))?;
        }
        Ok(())
    })
}

/// One contiguous piece of a file: where it goes and the bytes.
struct Piece<'a> {
    file: usize,
    offset: u64,
    data: &'a [u8],
}

fn pieces<'a>(shards: &'a [ShardSpec<'a>], layouts: &'a [Layout], chunk: usize) -> Vec<Piece<'a>> {
    let chunk = chunk.max(4096);
    let mut out = Vec::new();
    for (f, (shard, lay)) in shards.iter().zip(layouts).enumerate() {
        out.push(Piece {
            file: f,
            offset: 0,
            data: &lay.header,
        });
        for &i in &lay.order {
            let t = &shard.tensors[i];
            for (k, c) in t.data.chunks(chunk).enumerate() {
                out.push(Piece {
                    file: f,
                    offset: lay.offsets[i] + (k * chunk) as u64,
                    data: c,
                });
            }
        }
    }
    out
}

fn write_pwrite(
    shards: &[ShardSpec<'_>],
    layouts: &[Layout],
    files: &[File],
    chunk: usize,
) -> Result<()> {
    pieces(shards, layouts, chunk).par_iter().try_for_each(|p| {
        crate::sys::write_all_at(&files[p.file], p.data, p.offset)
            .map_err(|e| Error::io(&shards[p.file].path, "write", e))
    })
}

fn write_mmap(
    shards: &[ShardSpec<'_>],
    layouts: &[Layout],
    files: &[File],
    opts: &StrategyOptions,
) -> Result<()> {
    let mut maps = Vec::with_capacity(files.len());
    for (f, s) in files.iter().zip(shards) {
        // SAFETY: the file was just created by this process with `create_new` under a unique
        // temporary name and is not visible to loaders; nothing else maps or truncates it while
        // the map lives (the map is dropped before the file is renamed).
        let map =
            unsafe { memmap2::MmapMut::map_mut(f) }.map_err(|e| Error::io(&s.path, "mmap", e))?;
        maps.push(map);
    }
    // Cut every map into disjoint destination slices, one per piece.
    let all = pieces(shards, layouts, opts.chunk_size);
    let mut jobs: Vec<(&mut [u8], &[u8])> = Vec::with_capacity(all.len());
    let mut by_file: Vec<Vec<&Piece<'_>>> = (0..files.len()).map(|_| Vec::new()).collect();
    for p in &all {
        by_file[p.file].push(p);
    }
    for (f, map) in maps.iter_mut().enumerate() {
        let mut list = by_file[f].clone();
        list.sort_by_key(|p| p.offset);
        let mut rest: &mut [u8] = &mut map[..];
        let mut pos = 0u64;
        for p in list {
            let skip = (p.offset - pos) as usize;
            let (_, tail) = rest.split_at_mut(skip);
            let (dst, tail) = tail.split_at_mut(p.data.len());
            jobs.push((dst, p.data));
            rest = tail;
            pos = p.offset + p.data.len() as u64;
        }
    }
    jobs.par_iter_mut()
        .for_each(|(dst, src)| dst.copy_from_slice(src));
    if opts.fsync {
        for (m, s) in maps.iter().zip(shards) {
            m.flush().map_err(|e| Error::io(&s.path, "msync", e))?;
        }
    }
    Ok(())
}
