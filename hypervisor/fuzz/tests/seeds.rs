//! The seeds made by code rather than by hand: `seeds/<dir>/` for each
//! target below. Regenerate them after a change to a format or a target's
//! input:
//!
//! `cargo test --manifest-path hypervisor/fuzz/Cargo.toml --no-default-features -- --ignored write_seeds`

use std::fs;
use std::path::{Path, PathBuf};

type Seeds = Vec<(&'static str, Vec<u8>)>;

/// A generated seed directory: its generator, and (for the formats) a check
/// that the target's reader accepts every seed; `None` where the inputs are
/// the target's own structure (some are meant to be refused).
struct Generated {
    dir: &'static str,
    make: fn() -> Seeds,
    accepted: Option<fn(&[u8])>,
}

const GENERATED: &[Generated] = &[
    Generated {
        dir: "machine_record",
        make: hypervisor_fuzz::machine_seeds,
        accepted: Some(hypervisor_fuzz::machine_record),
    },
    Generated {
        dir: "migrate_stream",
        make: hypervisor_fuzz::migrate_seeds,
        accepted: Some(|b| {
            migrate::verify(b).unwrap();
        }),
    },
    // Compared only when written: its inputs embed a real source's stream.
    Generated { dir: "migrate_incoming", make: hypervisor_fuzz::migrate_incoming_seeds, accepted: None },
];

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(name)
}

#[test]
#[ignore = "writes files; run by hand after a format change"]
fn write_seeds() {
    for g in GENERATED {
        fs::create_dir_all(dir(g.dir)).unwrap();
        for (name, bytes) in (g.make)() {
            fs::write(dir(g.dir).join(name), bytes).unwrap();
        }
    }
}

/// The committed seeds of the formats are what their writers make today
/// (a format change without regenerated seeds fails here), and their
/// readers accept them.
#[test]
fn generated_seeds_are_current() {
    for g in GENERATED {
        let Some(accepted) = g.accepted else { continue };
        for (name, bytes) in (g.make)() {
            accepted(&bytes);
            let on_disk = fs::read(dir(g.dir).join(name)).unwrap_or_default();
            assert!(on_disk == bytes, "seeds/{}/{name} is stale: regenerate it (see this file's header)", g.dir);
        }
    }
}
