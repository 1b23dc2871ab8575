//! The fuzz targets' bodies. Each `fuzz_targets/<name>.rs` is a one-line
//! call into a function here, so the same code also runs under `cargo test`
//! (`tests/replay.rs` replays `seeds/<name>/` and `regressions/<name>/`
//! through [`TARGETS`] on every `scripts/test`).

mod archive;
mod ata_identify;
mod console;
mod devices;
mod disk_format;
mod elf;
mod emulator;
mod guest_walk;
mod handle_exit;
mod hostnet;
pub mod input;
mod linux;
mod machine_record;
mod migrate_incoming;
mod migrate_stream;
mod mm_fault;
mod multiboot;
mod plan;
mod svm_exit;
mod svm_fetch;
mod swap_format;
mod uplink;
mod virtio;
mod vmx_exit;

pub use archive::archive;
pub use ata_identify::ata_identify;
pub use console::console;
pub use devices::devices;
pub use disk_format::disk_format;
pub use elf::elf;
pub use emulator::emulator;
pub use guest_walk::guest_walk;
pub use handle_exit::handle_exit;
pub use hostnet::hostnet;
pub use linux::linux;
pub use machine_record::{machine_record, machine_seeds};
pub use migrate_incoming::{migrate_incoming, migrate_incoming_seeds};
pub use migrate_stream::{migrate_seeds, migrate_stream};
pub use mm_fault::mm_fault;
pub use multiboot::multiboot;
pub use plan::{MAX_RAM, check_plan};
pub use svm_exit::svm_exit;
pub use svm_fetch::svm_fetch;
pub use swap_format::swap_format;
pub use uplink::uplink;
pub use virtio::virtio;
pub use vmx_exit::vmx_exit;

/// A target's body: takes the fuzzer's bytes, panics on a broken promise.
pub type Target = fn(&[u8]);

/// Every target by name (the `[[bin]]` names in Cargo.toml).
pub const TARGETS: &[(&str, Target)] = &[
    ("console", console),
    ("hostnet", hostnet),
    ("emulator", emulator),
    ("archive", archive),
    ("elf", elf),
    ("multiboot", multiboot),
    ("linux", linux),
    ("vmx_exit", vmx_exit),
    ("svm_exit", svm_exit),
    ("svm_fetch", svm_fetch),
    ("guest_walk", guest_walk),
    ("handle_exit", handle_exit),
    ("mm_fault", mm_fault),
    ("swap_format", swap_format),
    ("disk_format", disk_format),
    ("ata_identify", ata_identify),
    ("devices", devices),
    ("migrate_stream", migrate_stream),
    ("migrate_incoming", migrate_incoming),
    ("machine_record", machine_record),
    ("virtio", virtio),
    ("uplink", uplink),
];
