//! Integration tests of `quantsave::plan`: shard planning and size parsing.

use std::collections::HashMap;

use proptest::prelude::*;
use quantsave::plan::{parse_size, plan_shards, Plan, PlanEntry};
use quantsave::Error;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn plain(sizes: &[u64]) -> Vec<PlanEntry> {
    sizes
        .iter()
        .map(|&size| PlanEntry { size, group: None })
        .collect()
}

fn grouped(entries: &[(u64, Option<u64>)]) -> Vec<PlanEntry> {
    entries
        .iter()
        .map(|&(size, group)| PlanEntry { size, group })
        .collect()
}

fn shards(sizes: &[u64], max: u64) -> Vec<Vec<usize>> {
    plan_shards(&plain(sizes), max).shards
}

/// A line-by-line transcription of the loop in
/// `huggingface_hub.serialization._base.split_state_dict_into_shards_factory` (no shared
/// storages): keys are indices, shards lists of keys.
fn reference_split(sizes: &[u64], max: u64) -> (Vec<Vec<usize>>, u64) {
    let mut shard_list: Vec<Vec<usize>> = Vec::new();
    let mut current_shard: Vec<usize> = Vec::new();
    let mut current_shard_size = 0u64;
    let mut total_size = 0u64;
    for (key, &tensor_size) in sizes.iter().enumerate() {
        // If this tensor is bigger than the maximal size, we put it in its own shard
        if tensor_size > max {
            total_size += tensor_size;
            shard_list.push(vec![key]);
            continue;
        }
        // If this tensor is going to tip up over the maximal size, we split.
        if current_shard_size + tensor_size > max {
            shard_list.push(std::mem::take(&mut current_shard));
            current_shard_size = 0;
        }
        current_shard.push(key);
        current_shard_size += tensor_size;
        total_size += tensor_size;
    }
    if !current_shard.is_empty() {
        shard_list.push(current_shard);
    }
    (shard_list, total_size)
}

// ---------------------------------------------------------------------------------------------
// plan_shards: the reference's greedy algorithm
// ---------------------------------------------------------------------------------------------

#[test]
fn greedy_in_order() {
    assert_eq!(shards(&[3, 3, 3, 3], 10), vec![vec![0, 1, 2], vec![3]]);
    assert_eq!(
        shards(&[6, 5, 4, 3, 2, 1], 10),
        vec![vec![0], vec![1, 2], vec![3, 4, 5]]
    );
    // Greedy, not bin packing: the 1 after the 9 does not go back to the first shard.
    assert_eq!(shards(&[5, 9, 1], 10), vec![vec![0], vec![1, 2]]);
    assert_eq!(shards(&[1, 2, 3], 100), vec![vec![0, 1, 2]]);
}

#[test]
fn exact_boundaries() {
    // A shard may hold exactly max bytes.
    assert_eq!(shards(&[5, 5], 10), vec![vec![0, 1]]);
    assert_eq!(shards(&[5, 5, 1], 10), vec![vec![0, 1], vec![2]]);
    assert_eq!(shards(&[10], 10), vec![vec![0]]);
    assert_eq!(shards(&[10, 10], 10), vec![vec![0], vec![1]]);
    assert_eq!(shards(&[10, 1], 10), vec![vec![0], vec![1]]);
    assert_eq!(shards(&[1, 10], 10), vec![vec![0], vec![1]]);
    // One byte over.
    assert_eq!(shards(&[6, 5], 10), vec![vec![0], vec![1]]);
    assert_eq!(shards(&[11], 10), vec![vec![0]]);
}

#[test]
fn oversize_unit_is_pushed_while_the_open_shard_stays_open() {
    // max 10, sizes [4, 20, 4, 4]: 4 opens shard A; 20 > 10 is pushed at once as its own shard;
    // the second 4 joins A (8); the third 4 would make 12, so A is closed and B opened.
    let plan = plan_shards(&plain(&[4, 20, 4, 4]), 10);
    assert_eq!(plan.shards, vec![vec![1], vec![0, 2], vec![3]]);
    assert_eq!(plan.total_size, 32);
    assert_eq!(reference_split(&[4, 20, 4, 4], 10), (plan.shards, 32));

    assert_eq!(shards(&[4, 20], 10), vec![vec![1], vec![0]]);
    assert_eq!(shards(&[20, 4], 10), vec![vec![0], vec![1]]);
    assert_eq!(shards(&[20, 30], 10), vec![vec![0], vec![1]]);
    assert_eq!(
        shards(&[3, 20, 3, 30, 3, 4], 10),
        vec![vec![1], vec![3], vec![0, 2, 4], vec![5]]
    );
    assert_eq!(shards(&[9, 11, 1], 10), vec![vec![1], vec![0, 2]]);
}

#[test]
fn empty_input_gives_one_empty_shard() {
    let plan = plan_shards(&[], 10);
    assert_eq!(
        plan,
        Plan {
            shards: vec![vec![]],
            total_size: 0
        }
    );
    assert_eq!(plan_shards(&[], 0).shards, vec![Vec::<usize>::new()]);
}

#[test]
fn zero_sizes_and_zero_max() {
    assert_eq!(shards(&[0, 0, 0], 10), vec![vec![0, 1, 2]]);
    assert_eq!(shards(&[0, 0, 0], 0), vec![vec![0, 1, 2]]);
    assert_eq!(shards(&[1, 0, 1], 0), vec![vec![0], vec![2], vec![1]]);
    assert_eq!(shards(&[10, 0], 10), vec![vec![0, 1]]);
    assert_eq!(reference_split(&[1, 0, 1], 0).0, shards(&[1, 0, 1], 0));
}

#[test]
fn total_size_counts_everything() {
    assert_eq!(plan_shards(&plain(&[1, 2, 3]), 4).total_size, 6);
    assert_eq!(plan_shards(&plain(&[100, 2, 300]), 4).total_size, 402);
    let big = 5_000_000_000u64;
    let plan = plan_shards(&plain(&[big, big, big, 1]), 5_000_000_000);
    assert_eq!(plan.total_size, 3 * big + 1);
    assert_eq!(plan.shards, vec![vec![0], vec![1], vec![2], vec![3]]);
}

#[test]
fn huggingface_defaults_5gb() {
    // 7 tensors of 2 GB with the default 5GB limit: two per shard.
    let max = parse_size("5GB").unwrap();
    let plan = plan_shards(&plain(&[2_000_000_000; 7]), max);
    assert_eq!(
        plan.shards,
        vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6]]
    );
    assert_eq!(plan.total_size, 14_000_000_000);
}

// ---------------------------------------------------------------------------------------------
// plan_shards: groups
// ---------------------------------------------------------------------------------------------

#[test]
fn group_members_move_up_to_the_first_member() {
    // Units: g1 = {0, 2} (6), {1} (4), {3} (5).
    let e = grouped(&[(3, Some(1)), (4, None), (3, Some(1)), (5, None)]);
    let plan = plan_shards(&e, 10);
    assert_eq!(plan.shards, vec![vec![0, 2, 1], vec![3]]);
    assert_eq!(plan.total_size, 15);
}

#[test]
fn group_is_never_split_across_shards() {
    // Ungrouped this would split after index 1; as a group {1, 2} moves to the next shard.
    let ungrouped = shards(&[6, 3, 3], 10);
    assert_eq!(ungrouped, vec![vec![0, 1], vec![2]]);
    let e = grouped(&[(6, None), (3, Some(7)), (3, Some(7))]);
    assert_eq!(plan_shards(&e, 10).shards, vec![vec![0], vec![1, 2]]);
}

#[test]
fn oversize_group_gets_its_own_shard_immediately() {
    // Group 9 totals 12 > 10: pushed as its own shard while the open shard ({0}) stays open.
    let e = grouped(&[
        (4, None),
        (6, Some(9)),
        (2, None),
        (6, Some(9)),
        (3, None),
        (4, None),
    ]);
    let plan = plan_shards(&e, 10);
    assert_eq!(plan.shards, vec![vec![1, 3], vec![0, 2, 4], vec![5]]);
    assert_eq!(plan.total_size, 25);
}

#[test]
fn group_exactly_max_fits() {
    let e = grouped(&[(5, Some(1)), (5, Some(1)), (1, None)]);
    assert_eq!(plan_shards(&e, 10).shards, vec![vec![0, 1], vec![2]]);
}

#[test]
fn many_groups_interleaved() {
    // weight/scale pairs whose members are far apart in state-dict order.
    let e = grouped(&[
        (4, Some(0)),
        (4, Some(1)),
        (4, Some(2)),
        (1, Some(0)),
        (1, Some(1)),
        (1, Some(2)),
    ]);
    // Units: g0 = {0, 3} 5, g1 = {1, 4} 5, g2 = {2, 5} 5.
    assert_eq!(
        plan_shards(&e, 10).shards,
        vec![vec![0, 3, 1, 4], vec![2, 5]]
    );
    assert_eq!(
        plan_shards(&e, 5).shards,
        vec![vec![0, 3], vec![1, 4], vec![2, 5]]
    );
    assert_eq!(
        plan_shards(&e, 4).shards,
        vec![vec![0, 3], vec![1, 4], vec![2, 5]]
    );
}

#[test]
fn group_ids_are_just_labels() {
    let e = grouped(&[(1, Some(u64::MAX)), (1, Some(0)), (1, Some(u64::MAX))]);
    assert_eq!(plan_shards(&e, 100).shards, vec![vec![0, 2, 1]]);
}

// ---------------------------------------------------------------------------------------------
// parse_size
// ---------------------------------------------------------------------------------------------

#[test]
fn parse_size_decimal_units() {
    assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
    assert_eq!(parse_size("10GB").unwrap(), 10_000_000_000);
    assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
    assert_eq!(parse_size("100KB").unwrap(), 100_000);
    assert_eq!(parse_size("5MB").unwrap(), 5_000_000);
    assert_eq!(parse_size("2TB").unwrap(), 2_000_000_000_000);
    assert_eq!(parse_size("0.5MB").unwrap(), 500_000);
    assert_eq!(parse_size("0GB").unwrap(), 0);
}

#[test]
fn parse_size_binary_units() {
    assert_eq!(parse_size("2GiB").unwrap(), 2 * (1 << 30));
    assert_eq!(parse_size("1KiB").unwrap(), 1024);
    assert_eq!(parse_size("3MiB").unwrap(), 3 << 20);
    assert_eq!(parse_size("1TiB").unwrap(), 1 << 40);
    assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
}

#[test]
fn parse_size_plain_bytes() {
    assert_eq!(parse_size("1000").unwrap(), 1000);
    assert_eq!(parse_size("0").unwrap(), 0);
    assert_eq!(parse_size("10B").unwrap(), 10);
    assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
}

#[test]
fn parse_size_case_and_whitespace() {
    for s in [
        "5gb", "5Gb", "5gB", " 5GB", "5GB ", "\t5GB\n", "5 GB", " 5 gb ",
    ] {
        assert_eq!(parse_size(s).unwrap(), 5_000_000_000, "{s:?}");
    }
    assert_eq!(parse_size("2gib").unwrap(), 2 << 30);
    assert_eq!(parse_size(" 1000 ").unwrap(), 1000);
}

#[test]
fn parse_size_errors() {
    for s in [
        "",
        "   ",
        "GB",
        "GiB",
        "B",
        "abc",
        "-5GB",
        "+5GB",
        "5XB",
        "5 G B",
        "5GBB",
        "1e9",
        "1.2.3GB",
        ".",
        ".GB",
        "inf",
        "NaN",
        "five GB",
        "18446744073709551616",
        "99999999999TB",
        "5 000",
    ] {
        match parse_size(s) {
            Err(Error::InvalidInput(msg)) => assert!(msg.contains("invalid size"), "{s:?}: {msg}"),
            other => panic!("{s:?}: expected InvalidInput, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

fn check_plan_invariants(
    entries: &[PlanEntry],
    max: u64,
    plan: &Plan,
) -> Result<(), TestCaseError> {
    // Every entry exactly once.
    let mut seen = vec![0u32; entries.len()];
    for s in &plan.shards {
        for &i in s {
            seen[i] += 1;
        }
    }
    prop_assert!(
        seen.iter().all(|&c| c == 1),
        "entries placed {:?} times",
        seen
    );
    prop_assert_eq!(plan.total_size, entries.iter().map(|e| e.size).sum::<u64>());
    prop_assert!(!plan.shards.is_empty());
    prop_assert!(entries.is_empty() || plan.shards.iter().all(|s| !s.is_empty()));
    // Groups together.
    let mut shard_of_group: HashMap<u64, usize> = HashMap::new();
    for (k, s) in plan.shards.iter().enumerate() {
        for &i in s {
            if let Some(g) = entries[i].group {
                let first = *shard_of_group.entry(g).or_insert(k);
                prop_assert_eq!(first, k, "group {} split across shards", g);
            }
        }
    }
    // Over max only when the shard is a single unit (one entry or one group).
    for s in &plan.shards {
        let size: u64 = s.iter().map(|&i| entries[i].size).sum();
        if size > max {
            let g = entries[s[0]].group;
            prop_assert!(s.len() == 1 || (g.is_some() && s.iter().all(|&i| entries[i].group == g)));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prop_ungrouped_matches_huggingface_reference(
        sizes in prop::collection::vec(prop_oneof![0u64..20, 0u64..200], 0..40),
        max in 0u64..60,
    ) {
        let plan = plan_shards(&plain(&sizes), max);
        let (ref_shards, ref_total) = reference_split(&sizes, max);
        prop_assert_eq!(plan.total_size, ref_total);
        if sizes.is_empty() {
            prop_assert_eq!(&plan.shards, &vec![Vec::<usize>::new()]);
        } else {
            prop_assert_eq!(&plan.shards, &ref_shards);
        }
        check_plan_invariants(&plain(&sizes), max, &plan)?;
    }

    #[test]
    fn prop_grouped_is_the_reference_over_units(
        raw in prop::collection::vec((0u64..30, prop::option::of(0u64..6)), 0..40),
        max in 1u64..80,
    ) {
        let entries = grouped(&raw);
        let plan = plan_shards(&entries, max);
        check_plan_invariants(&entries, max, &plan)?;
        // Build units by first appearance and run the reference over their sizes.
        let mut units: Vec<(u64, Vec<usize>)> = Vec::new();
        let mut by_group: HashMap<u64, usize> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            match e.group.and_then(|g| by_group.get(&g).copied()) {
                Some(u) => {
                    units[u].0 += e.size;
                    units[u].1.push(i);
                }
                None => {
                    if let Some(g) = e.group {
                        by_group.insert(g, units.len());
                    }
                    units.push((e.size, vec![i]));
                }
            }
        }
        let unit_sizes: Vec<u64> = units.iter().map(|u| u.0).collect();
        let (ref_units, _) = reference_split(&unit_sizes, max);
        let expected: Vec<Vec<usize>> = ref_units
            .iter()
            .map(|s| s.iter().flat_map(|&u| units[u].1.iter().copied()).collect())
            .collect();
        if entries.is_empty() {
            prop_assert_eq!(&plan.shards, &vec![Vec::<usize>::new()]);
        } else {
            prop_assert_eq!(&plan.shards, &expected);
        }
    }

    #[test]
    fn prop_parse_size_never_panics(s in "\\PC{0,12}") {
        let _ = parse_size(&s);
    }

    #[test]
    fn prop_parse_size_integers_in_every_unit(n in 0u64..1_000_000) {
        prop_assert_eq!(parse_size(&n.to_string()).unwrap(), n);
        prop_assert_eq!(parse_size(&format!("{n}B")).unwrap(), n);
        prop_assert_eq!(parse_size(&format!("{n}KB")).unwrap(), n * 1_000);
        prop_assert_eq!(parse_size(&format!("{n}MB")).unwrap(), n * 1_000_000);
        prop_assert_eq!(parse_size(&format!("{n}gb")).unwrap(), n * 1_000_000_000);
        prop_assert_eq!(parse_size(&format!("{n} MiB")).unwrap(), n << 20);
        prop_assert_eq!(parse_size(&format!("{n}GiB")).unwrap(), n << 30);
    }
}
