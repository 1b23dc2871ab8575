//! Writes `seeds/migrate_incoming/` (the inputs are structured: see the
//! target's header):
//!
//! `cargo test --manifest-path hypervisor/fuzz/Cargo.toml --no-default-features -- --ignored write_migrate_incoming_seeds`

use std::fs;
use std::path::Path;

#[test]
#[ignore = "writes files; run by hand after a change to the target's input"]
fn write_migrate_incoming_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/migrate_incoming");
    fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in hypervisor_fuzz::migrate_incoming_seeds() {
        fs::write(dir.join(name), bytes).unwrap();
    }
}
