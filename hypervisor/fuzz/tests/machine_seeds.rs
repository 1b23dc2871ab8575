//! Regenerates `seeds/machine_record/` (run it after a change to the
//! machine record):
//!
//! `cargo test --manifest-path hypervisor/fuzz/Cargo.toml --no-default-features -- --ignored write_machine_seeds`

use std::fs;
use std::path::Path;

#[test]
#[ignore = "writes files; run by hand after a format change"]
fn write_machine_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/machine_record");
    fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in hypervisor_fuzz::machine_seeds() {
        fs::write(dir.join(name), bytes).unwrap();
    }
}

/// The committed seeds are what the record encodes to today, and the
/// target accepts the good ones.
#[test]
fn machine_seeds_are_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/machine_record");
    for (name, bytes) in hypervisor_fuzz::machine_seeds() {
        hypervisor_fuzz::machine_record(&bytes);
        let on_disk = fs::read(dir.join(name)).unwrap_or_default();
        assert!(on_disk == bytes, "seeds/machine_record/{name} is stale: regenerate it (see this file's header)");
    }
}
