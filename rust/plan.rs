//! Shard planning: which tensors go to which file, and shard sizes. Reproduces
//! `huggingface_hub.split_torch_state_dict_into_shards` (greedy in order, an oversize unit gets
//! a shard of its own, decimal size units) with one deliberate difference: the tensors of one
//! quantized weight form a single unit that is never split across files.
//! File names belong to `names`; knows nothing about files or Python.

use crate::error::{Error, Result};

/// One tensor to place: its planned size (the size of its storage) and the weight group it
/// belongs to, if any. Tensors that share a group id always land in the same shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanEntry {
    pub size: u64,
    pub group: Option<u64>,
}

/// The planned shards: each is a list of entry indices, in state-dict order of their units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub shards: Vec<Vec<usize>>,
    pub total_size: u64,
}

/// Plans shards for `entries` (in state-dict order) so that no shard exceeds `max_shard_size`
/// unless one unit alone does.
///
/// A group's unit sits where its first tensor appears; its later members move up to it.
pub fn plan_shards(entries: &[PlanEntry], max_shard_size: u64) -> Plan {
    // Build units in order of first appearance.
    let mut units: Vec<(u64, Vec<usize>)> = Vec::new();
    let mut group_unit: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        match e.group {
            Some(g) => match group_unit.get(&g) {
                Some(&u) => {
                    units[u].0 += e.size;
                    units[u].1.push(i);
                }
                None => {
                    group_unit.insert(g, units.len());
                    units.push((e.size, vec![i]));
                }
            },
            None => units.push((e.size, vec![i])),
        }
    }
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    let mut total = 0u64;
    for (size, members) in units {
        total += size;
        if size > max_shard_size {
            // As the reference does: the oversize unit is pushed as its own shard while the
            // shard being filled stays open.
            shards.push(members);
            continue;
        }
        if current_size + size > max_shard_size {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.extend(members);
        current_size += size;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    Plan {
        shards,
        total_size: total,
    }
}

/// Parses a shard size: plain bytes (`"1000"`), decimal units (`"5GB"` = 5 * 10^9, `KB`, `MB`,
/// `TB`) or binary units (`"5GiB"`), case-insensitive, fractions allowed (`"1.5GB"`).
pub fn parse_size(text: &str) -> Result<u64> {
    let s = text.trim();
    let bad = || {
        Error::invalid(format!(
            "invalid size {text:?}: use bytes or a number with KB, MB, GB, TB (decimal) or KiB, MiB, GiB, TiB (binary)"
        ))
    };
    let upper = s.to_ascii_uppercase();
    let units: [(&str, f64); 9] = [
        ("KIB", 1024.0),
        ("MIB", 1048576.0),
        ("GIB", 1073741824.0),
        ("TIB", 1099511627776.0),
        ("KB", 1e3),
        ("MB", 1e6),
        ("GB", 1e9),
        ("TB", 1e12),
        ("B", 1.0),
    ];
    let (num, mult) = units
        .iter()
        .find(|(u, _)| upper.ends_with(u))
        .map(|(u, m)| (&s[..s.len() - u.len()], *m))
        .unwrap_or((s, 1.0));
    let num = num.trim();
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    if mult == 1.0 && !num.contains('.') {
        return num.parse::<u64>().map_err(|_| bad());
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bytes = v * mult;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}
