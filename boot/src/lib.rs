//! Host side of the hypervisor: builds the bootable UEFI disk image (kernel,
//! test guests, ramdisk) and runs it in an emulator with its serial console
//! connected to the terminal or to a script. `tests-qemu/` drives whole-system
//! tests through this library.

pub mod emulator;
pub mod image;
pub mod initramfs;
pub mod link;
pub mod script;
pub mod session;

use std::path::PathBuf;

/// The workspace root (this crate lives in `<root>/boot`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("boot/ has a parent").to_path_buf()
}

/// Where builds and run logs go.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}
