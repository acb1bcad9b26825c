//! Checkpoint file names, the one owner of them: the variant infix, shard and index names, and
//! the temporaries of atomic writes, with the predicates that recognize each. Pure string work:
//! knows nothing about file contents, the file system or Python.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Inserts `variant` before the last dot of `name` (`model.safetensors` + `fp16` ->
/// `model.fp16.safetensors`), as diffusers and transformers do.
pub fn add_variant(name: &str, variant: Option<&str>) -> String {
    match variant {
        None => name.to_string(),
        Some(v) => match name.rfind('.') {
            Some(dot) => format!("{}.{v}{}", &name[..dot], &name[dot..]),
            None => format!("{name}.{v}"),
        },
    }
}

/// `name` cut before its last dot: (`model`, `.safetensors`), or (`name`, "") without a dot.
fn split_ext(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(dot) => (&name[..dot], &name[dot..]),
        None => (name, ""),
    }
}

/// File names for `count` shards of `weights_name`: the name itself for one shard, else
/// `<stem>-00001-of-00003.<ext>` (variant, if any, before the suffix).
pub fn shard_file_names(weights_name: &str, variant: Option<&str>, count: usize) -> Vec<String> {
    let base = add_variant(weights_name, variant);
    if count <= 1 {
        return vec![base];
    }
    let (stem, ext) = split_ext(&base);
    (1..=count)
        .map(|i| format!("{stem}-{i:05}-of-{count:05}{ext}"))
        .collect()
}

/// Whether `file_name` is one of the names [`shard_file_names`] gives `weights_name` and
/// `variant` for some count of two or more (`model-00002-of-00003.safetensors`): numbers
/// written as it writes them (five digits at least, no other leading zeros), `1 <= i <= count`.
/// The single-file name (`model.safetensors`) is not a shard name.
pub fn is_shard_name(file_name: &str, weights_name: &str, variant: Option<&str>) -> bool {
    let base = add_variant(weights_name, variant);
    let (stem, ext) = split_ext(&base);
    let Some(numbers) = file_name
        .strip_prefix(stem)
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|rest| rest.strip_suffix(ext))
    else {
        return false;
    };
    let Some((i, count)) = numbers.split_once("-of-") else {
        return false;
    };
    match (parse_shard_number(i), parse_shard_number(count)) {
        (Some(i), Some(count)) => count >= 2 && (1..=count).contains(&i),
        _ => false,
    }
}

/// A number as `{:05}` writes it, or None for anything else (signs, spaces, extra zeros).
fn parse_shard_number(text: &str) -> Option<u64> {
    if text.len() > 20 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = text.parse().ok()?;
    (format!("{n:05}") == text).then_some(n)
}

/// The index file name for `weights_name` (`model.safetensors` -> `model.safetensors.index.json`,
/// with a variant `model.safetensors.index.fp16.json`).
pub fn index_file_name(weights_name: &str, variant: Option<&str>) -> String {
    add_variant(&format!("{weights_name}.index.json"), variant)
}

/// Ending of every temporary name (see [`temp_path_for`]).
const TEMP_SUFFIX: &str = ".quantsave.tmp";

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary sibling for `path`, the file an atomic write fills before its rename:
/// `.<name>.<pid>-<n>.quantsave.tmp`, `n` counting up within the process. It starts with a dot
/// and ends in `.tmp`, so checkpoint loaders never mistake it for a shard.
pub fn temp_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}-{n}{TEMP_SUFFIX}", std::process::id()))
}

/// Whether `file_name` (a name, not a path) has the form [`temp_path_for`] gives, whichever
/// process made it: `.<name>.<pid>-<n>.quantsave.tmp` with decimal `pid` and `n`.
pub fn is_temp_name(file_name: &str) -> bool {
    let Some(middle) = file_name
        .strip_prefix('.')
        .and_then(|rest| rest.strip_suffix(TEMP_SUFFIX))
    else {
        return false;
    };
    let Some((_, tag)) = middle.rsplit_once('.') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    matches!(tag.split_once('-'), Some((pid, n)) if digits(pid) && digits(n))
}
