//! `mm`: the hypervisor's guest memory manager.
//!
//! - [`addr`]: typed guest- and host-physical addresses.
//! - [`hal`]: the hardware behind small traits (frames, contiguous blocks,
//!   the direct map), so everything here also runs in host tests on
//!   `sim::SimPhys` (feature `sim`).
//! - [`paging`]: one nested-page-table engine for EPT and NPT.
//! - [`GuestRam`]: a VM's RAM, its bounds-checked access, and its mapping
//!   into a nested page table.
//! - [`vm_memory`]: [`VmMemory`], the per-VM memory object (memory map,
//!   per-page state, fault handling, dirty logging, access sampling, page
//!   sharing, ballooning, swap-out); [`swap_hook`]: the swap store interface.
//! - [`reclaim`]: the reclaim policy: usage classes per VM and a plan of
//!   sharing, ballooning and swapping to meet a host free-memory target.
//! - [`swap`]: host swap on a block device: a thick swap reservation per
//!   resource pool feeding thin per-VM swap files, checksummed slots.
//!
//! `no_std` with `alloc`; std only for tests and the `sim` feature.
#![no_std]

extern crate alloc;
#[cfg(any(test, feature = "sim"))]
extern crate std;

pub mod addr;
mod error;
mod guest_ram;
pub mod hal;
pub mod le;
pub mod paging;
pub mod reclaim;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod swap;
pub mod swap_hook;
#[cfg(test)]
mod tests;
pub mod vm_memory;

pub use addr::{GuestPhysAddr, HostPhysAddr};
pub use error::{Error, MergeRefusal};
pub use guest_ram::{GuestRam, LeInt, MemoryReport, RamChunk};
pub use vm_memory::{VmMemory, VmMemoryConfig};

/// Called from `Drop` of an object that still owns host frames. Freeing them
/// needs an allocator (and maybe a TLB flush) that `Drop` does not have, so
/// leaking is the only safe choice; debug builds panic so tests notice.
pub(crate) fn leaked(what: &str, frames: usize) {
    #[cfg(any(test, feature = "sim"))]
    if std::thread::panicking() {
        return;
    }
    if cfg!(debug_assertions) {
        panic!("{what} was dropped without being freed: leaking {frames} host frame(s)");
    }
}
