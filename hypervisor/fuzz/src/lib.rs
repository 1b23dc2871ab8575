//! The fuzz targets' bodies. Each `fuzz_targets/<name>.rs` is a one-line
//! call into a function here, so the same code also runs under `cargo test`
//! (`tests/replay.rs` replays `seeds/<name>/` and `regressions/<name>/`
//! through [`TARGETS`] on every `scripts/test`).

mod archive;
mod console;
mod elf;
pub mod input;
mod multiboot;
mod plan;

pub use archive::archive;
pub use console::console;
pub use elf::elf;
pub use multiboot::multiboot;
pub use plan::{MAX_RAM, check_plan};

/// Every target by name (the `[[bin]]` names in Cargo.toml).
pub const TARGETS: &[(&str, fn(&[u8]))] =
    &[("console", console), ("archive", archive), ("elf", elf), ("multiboot", multiboot)];
