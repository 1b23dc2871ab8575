//! Host swap: a thick swap reservation on a block device feeding thin
//! per-VM swap files.
//!
//! - [`BlockStore`]: the disk, in 512-byte blocks, synchronous (a virtio-blk
//!   or ATA PIO driver in the kernel; [`MemBlockStore`] in tests, with
//!   fault injection and I/O counters).
//! - [`SwapReservation`]: owns the device. Block 0 holds a checksummed,
//!   versioned superblock; [`SwapReservation::open`] refuses a device
//!   without one (so swap never writes over a disk that is not a swap
//!   device). The rest is an array of slots, each a header block and a
//!   4 KiB page (format in [`format`]).
//! - Resource pools ([`PoolId`]) reserve swap thickly: a pool's size is the
//!   most that can ever be reclaimed from its VMs, the sum of (configured -
//!   guaranteed) per VM, or less when the pool itself guarantees more.
//!   Creating or growing a pool that the device cannot hold fails with
//!   [`Error::SwapReservationTooLarge`](crate::Error::SwapReservationTooLarge),
//!   so a VM swapping within its limit never finds the device full.
//! - [`SwapFile`]: a VM's thin swap file. It takes a slot from its pool's
//!   reservation per page-out and returns it on release or when the VM is
//!   removed: the pool's size stays the same while slots move between the
//!   files of its VMs (after the technique in the seed abstract: blocks
//!   move from the reservation file to a VM file and back, net zero).
//!   It implements [`PageStore`](crate::swap_hook::PageStore).
//!
//! Ownership: every file's state lives in the reservation, and `SwapFile`
//! is a short-lived `&mut` handle made by [`SwapReservation::file`]. That
//! needs no shared ownership or locks in `no_std`; the kernel wraps the one
//! reservation in a `spin::Mutex` and makes a handle under the lock.
//!
//! Integrity: a page-in reads the slot into a scratch buffer and checks the
//! header's magic, version and checksum, then slot index, epoch, VM id,
//! guest-physical address and generation against what the caller's handle
//! and the reservation expect, then the page's CRC-32C. Any mismatch is
//! [`Error::SwapSlotCorrupt`](crate::Error::SwapSlotCorrupt) with a
//! [`SlotRefusal`] naming it, and the caller's page is left untouched.
//! Page-outs are not flushed: swap does not survive a restart (the epoch
//! changes on every open), so only read-after-write matters.

mod block;
pub mod format;
mod reservation;
#[cfg(test)]
mod tests;

pub use block::{BLOCK_SIZE, BlockStore, check_transfer};
#[cfg(any(test, feature = "sim"))]
pub use block::{IoStats, MemBlockStore};
pub use format::{SlotRefusal, SuperblockRefusal};
pub use reservation::{
    FileStats, PoolId, PoolStats, ReservationStats, SwapFile, SwapReservation, SwapSlot, VmSwapSpec,
};

/// The hypervisor's VM identifier, as swap headers and the reclaim policy
/// record it.
pub type VmId = u32;
