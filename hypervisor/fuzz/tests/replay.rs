//! Replays every target's hand-made seeds and saved findings (minimized
//! crashes and inputs worth keeping, in `regressions/<target>/`), so a
//! regression fails `scripts/test` and not only a later fuzzing run.

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use hypervisor_fuzz::TARGETS;

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

#[test]
fn seeds_and_regressions_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failed = Vec::new();
    let mut replayed = 0;
    for &(name, target) in TARGETS {
        let seeds = files(&root.join("seeds").join(name));
        assert!(!seeds.is_empty(), "target {name} has no seeds in seeds/{name}/");
        for path in seeds.iter().chain(&files(&root.join("regressions").join(name))) {
            let data = fs::read(path).unwrap();
            replayed += 1;
            if catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
                failed.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "{} of {replayed} inputs failed: {failed:?}", failed.len());
    eprintln!("{replayed} inputs replayed");
}

/// A target file without an entry in `TARGETS` would never be replayed.
#[test]
fn every_fuzz_target_is_replayed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut on_disk: Vec<String> = files(&root.join("fuzz_targets"))
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
    let manifest = fs::read_to_string(root.join("Cargo.toml")).unwrap();
    for name in listed {
        assert!(manifest.contains(&format!("path = \"fuzz_targets/{name}.rs\"")), "no [[bin]] for {name}");
    }
}
