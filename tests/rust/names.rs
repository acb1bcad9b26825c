//! Integration tests of `quantsave::names`: shard, index and variant names as diffusers and
//! transformers write them, the temporaries of atomic writes, and the predicates that
//! recognize both.

use std::path::Path;

use proptest::prelude::*;
use quantsave::names::{
    add_variant, index_file_name, is_shard_name, is_temp_name, shard_file_names, temp_path_for,
};

// ---------------------------------------------------------------------------------------------
// File names
// ---------------------------------------------------------------------------------------------

#[test]
fn shard_file_names_single_and_many() {
    assert_eq!(
        shard_file_names("model.safetensors", None, 1),
        vec!["model.safetensors"]
    );
    assert_eq!(
        shard_file_names("model.safetensors", None, 0),
        vec!["model.safetensors"]
    );
    assert_eq!(
        shard_file_names("model.safetensors", None, 3),
        vec![
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
        ]
    );
    let many = shard_file_names("model.safetensors", None, 12);
    assert_eq!(many.len(), 12);
    assert_eq!(many[11], "model-00012-of-00012.safetensors");
    let huge = shard_file_names("model.safetensors", None, 100_000);
    assert_eq!(huge[0], "model-00001-of-100000.safetensors");
    assert_eq!(huge[99_999], "model-100000-of-100000.safetensors");
}

#[test]
fn shard_file_names_with_variant() {
    assert_eq!(
        shard_file_names("diffusion_pytorch_model.safetensors", Some("fp16"), 2),
        vec![
            "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        ]
    );
    assert_eq!(
        shard_file_names("diffusion_pytorch_model.safetensors", Some("fp16"), 1),
        vec!["diffusion_pytorch_model.fp16.safetensors"]
    );
    assert_eq!(
        shard_file_names("model.safetensors", Some("int4"), 2)[1],
        "model.int4-00002-of-00002.safetensors"
    );
}

#[test]
fn index_file_names() {
    assert_eq!(
        index_file_name("model.safetensors", None),
        "model.safetensors.index.json"
    );
    assert_eq!(
        index_file_name("model.safetensors", Some("fp16")),
        "model.safetensors.index.fp16.json"
    );
    assert_eq!(
        index_file_name("diffusion_pytorch_model.safetensors", Some("fp16")),
        "diffusion_pytorch_model.safetensors.index.fp16.json"
    );
}

#[test]
fn add_variant_before_the_last_dot() {
    assert_eq!(add_variant("model.safetensors", None), "model.safetensors");
    assert_eq!(
        add_variant("model.safetensors", Some("fp16")),
        "model.fp16.safetensors"
    );
    assert_eq!(
        add_variant("pytorch_model.bin", Some("bf16")),
        "pytorch_model.bf16.bin"
    );
    assert_eq!(add_variant("a.b.c", Some("v")), "a.b.v.c");
}

// ---------------------------------------------------------------------------------------------
// is_shard_name
// ---------------------------------------------------------------------------------------------

#[test]
fn is_shard_name_accepts_every_written_shard_name() {
    for (weights, variant) in [
        ("model.safetensors", None),
        ("model.safetensors", Some("fp16")),
        ("diffusion_pytorch_model.safetensors", Some("int4")),
        ("pytorch_model.bin", None),
        ("noext", Some("v")),
        ("noext", None),
    ] {
        for count in [2, 3, 12, 100_000] {
            let names = shard_file_names(weights, variant, count);
            for name in [&names[0], &names[count / 2], &names[count - 1]] {
                assert!(is_shard_name(name, weights, variant), "{name}");
            }
        }
    }
}

#[test]
fn is_shard_name_rejects_other_names() {
    let w = "model.safetensors";
    for name in [
        // The single-file name, the index, other weights, other variants.
        "model.safetensors",
        "model.safetensors.index.json",
        "model_ema-00001-of-00002.safetensors",
        "xmodel-00001-of-00002.safetensors",
        "model.fp16-00001-of-00002.safetensors",
        "model-00001-of-00002.bin",
        // Numbers not as `shard_file_names` writes them.
        "model-00001-of-00001.safetensors",
        "model-00000-of-00002.safetensors",
        "model-00003-of-00002.safetensors",
        "model-1-of-2.safetensors",
        "model-000001-of-00002.safetensors",
        "model-00001-of-000002.safetensors",
        "model-0000a-of-00002.safetensors",
        "model-+0001-of-00002.safetensors",
        "model- 0001-of-00002.safetensors",
        "model-00001-of-00002-of-00003.safetensors",
        "model-00001_of_00002.safetensors",
        "model-00001-of-99999999999999999999999.safetensors",
        // Temporaries of a shard.
        ".model-00001-of-00002.safetensors.12-0.quantsave.tmp",
        "",
    ] {
        assert!(!is_shard_name(name, w, None), "{name:?}");
    }
    assert!(!is_shard_name(
        "model-00001-of-00002.safetensors",
        w,
        Some("fp16")
    ));
    assert!(is_shard_name(
        "model.fp16-00001-of-00002.safetensors",
        w,
        Some("fp16")
    ));
}

// ---------------------------------------------------------------------------------------------
// Temporaries
// ---------------------------------------------------------------------------------------------

#[test]
fn temp_path_is_a_fresh_hidden_sibling() {
    let target = Path::new("/some/dir/model-00001-of-00002.safetensors");
    let a = temp_path_for(target);
    let b = temp_path_for(target);
    assert_ne!(a, b);
    for t in [&a, &b] {
        assert_eq!(t.parent(), target.parent());
        let name = t.file_name().unwrap().to_str().unwrap();
        let prefix = format!(".model-00001-of-00002.safetensors.{}-", std::process::id());
        assert!(name.starts_with(&prefix), "{name}");
        assert!(name.ends_with(".quantsave.tmp"), "{name}");
        assert!(is_temp_name(name), "{name}");
        assert!(!is_shard_name(name, "model.safetensors", None));
    }
    let bare = temp_path_for(Path::new("config.json"));
    assert_eq!(bare.parent(), Some(Path::new("")));
    assert!(is_temp_name(bare.to_str().unwrap()));
}

#[test]
fn is_temp_name_rejects_other_names() {
    for name in [
        "model.safetensors",
        "model.safetensors.12-3.quantsave.tmp",
        ".model.safetensors.quantsave.tmp",
        ".model.safetensors.12.quantsave.tmp",
        ".model.safetensors.12-.quantsave.tmp",
        ".model.safetensors.-3.quantsave.tmp",
        ".model.safetensors.1a-3.quantsave.tmp",
        ".model.safetensors.12-3.quantsave.tmp.json",
        ".model.safetensors.12-3.tmp",
        "12-3.quantsave.tmp",
        ".12-3.quantsave.tmp",
        "",
        ".",
    ] {
        assert!(!is_temp_name(name), "{name:?}");
    }
    assert!(is_temp_name(".model.safetensors.4242-0.quantsave.tmp"));
    assert!(is_temp_name(
        ".config.json.1-18446744073709551615.quantsave.tmp"
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prop_shard_names_are_numbered_and_sorted(count in 2usize..300) {
        let names = shard_file_names("model.safetensors", None, count);
        prop_assert_eq!(names.len(), count);
        for (i, n) in names.iter().enumerate() {
            prop_assert_eq!(n, &format!("model-{:05}-of-{:05}.safetensors", i + 1, count));
        }
        let mut sorted = names.clone();
        sorted.sort();
        prop_assert_eq!(sorted, names);
    }

    #[test]
    fn prop_is_shard_name_is_exactly_the_written_names(
        stem in "[a-z_.]{1,12}",
        variant in proptest::option::of("[a-z0-9]{1,5}"),
        count in 2usize..200,
        i in 1usize..200,
        n in 0usize..200,
    ) {
        let weights = format!("{stem}.safetensors");
        let v = variant.as_deref();
        let names = shard_file_names(&weights, v, count);
        for name in &names {
            prop_assert!(is_shard_name(name, &weights, v));
        }
        // A name built with any numbers is a shard name exactly when some count produces it.
        let base = add_variant(&weights, v);
        let dot = base.rfind('.').unwrap();
        let candidate = format!("{}-{i:05}-of-{n:05}{}", &base[..dot], &base[dot..]);
        prop_assert_eq!(is_shard_name(&candidate, &weights, v), n >= 2 && i <= n);
    }

    #[test]
    fn prop_predicates_never_panic(name in "\\PC{0,40}", weights in "\\PC{0,20}") {
        let _ = is_shard_name(&name, &weights, None);
        let _ = is_shard_name(&name, &weights, Some("v"));
        let _ = is_temp_name(&name);
    }
}
