//! Guest-image loader: turns untrusted bytes — a guest image from the
//! ramdisk, operator-given command lines — into a [`LoadPlan`] that the
//! hypervisor then runs into guest RAM.
//!
//! - [`archive`]: the ramdisk, a ustar archive of guest images by file name.
//! - [`elf`]: ELF64 x86-64 and ELF32 i386 executables, loaded at their
//!   physical addresses.
//! - [`multiboot`]: Multiboot v1 kernels (what QEMU's `-kernel` accepts),
//!   with modules and the Multiboot information structure.
//! - [`linux`]: Linux bzImages through the 64-bit boot protocol, with an
//!   initramfs, the command line and a zero page holding the e820 map.
//!
//! Images and archives are hostile: nothing here panics on them, all address
//! arithmetic is checked, and every refusal is an [`Error`] with a one-line
//! message. Only [`LoadPlan::apply`] writes guest memory, through the
//! [`GuestWrite`] trait, so plans can be checked on a plain buffer.

pub mod archive;
pub mod elf;
mod error;
pub mod linux;
pub mod multiboot;
mod plan;
#[cfg(any(test, feature = "testing"))]
#[cfg_attr(not(test), allow(dead_code, unused_imports))] // `testing::elf_guest` uses a part
pub(crate) mod testutil;

pub use error::{Error, Region, Result};
pub use plan::{Entry, EntryMode, GuestWrite, GuestWriteError, LoadPlan, Op, PAGE_SIZE, RamLayout};
