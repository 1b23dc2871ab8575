//! Regenerates `seeds/migrate_stream/` from the writer (run it after a
//! change to the stream format):
//!
//! `cargo test --manifest-path hypervisor/fuzz/Cargo.toml --no-default-features -- --ignored write_migrate_seeds`

use std::fs;
use std::path::Path;

#[test]
#[ignore = "writes files; run by hand after a format change"]
fn write_migrate_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/migrate_stream");
    fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in hypervisor_fuzz::migrate_seeds() {
        fs::write(dir.join(name), bytes).unwrap();
    }
}

/// The committed seeds are what the writer makes today: a format change
/// without regenerated seeds fails here.
#[test]
fn migrate_seeds_are_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/migrate_stream");
    for (name, bytes) in hypervisor_fuzz::migrate_seeds() {
        migrate::verify(&bytes).unwrap();
        let on_disk = fs::read(dir.join(name)).unwrap_or_default();
        assert!(on_disk == bytes, "seeds/migrate_stream/{name} is stale: regenerate it (see this file's header)");
    }
}
