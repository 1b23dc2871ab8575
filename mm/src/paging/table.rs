//! The nested page table: a 4-level tree of 4 KiB tables in host frames.
//!
//! The operations live in sibling files (`map.rs`, `split_merge.rs`,
//! `scan.rs`); this file holds the tree itself and the rules every operation
//! follows:
//!
//! - Entries are `AtomicU64`s, because the hardware walker sets accessed and
//!   dirty bits concurrently (SDM Vol. 3C 29.3.5,
//!   APM Vol. 2 5.4.1).
//!   Read-modify-writes of present leaves use atomic RMW so no A/D bit set
//!   by a vCPU is lost.
//! - A new subtree is filled completely before one Release store links it, so
//!   a walker never sees a half-built table, and an allocation failure never
//!   leaves anything linked.
//! - Table frames are only freed through an [`Invalidation`], after the TLB
//!   flush.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, Ordering};

use super::format::EntryFormat;
use super::invalidation::Invalidation;
use super::types::PageSize;
use crate::addr::{GUEST_PHYS_LIMIT, GuestPhysAddr, HostPhysAddr};
use crate::error::Error;
use crate::hal::{FrameAlloc, PhysMem};

/// Entries per table (4 KiB / 8 bytes).
pub(super) const ENTRIES: usize = 512;

/// Number of bits of guest-physical address below the index of `level`.
pub(super) const fn level_shift(level: usize) -> u32 {
    12 + 9 * (level as u32 - 1)
}

/// Bytes covered by one entry at `level`.
pub(super) const fn level_bytes(level: usize) -> u64 {
    1 << level_shift(level)
}

/// Index of `gpa` in a table at `level`.
pub(super) const fn index(gpa: u64, level: usize) -> usize {
    ((gpa >> level_shift(level)) as usize) & (ENTRIES - 1)
}

const _: () = {
    assert!(level_bytes(4) * ENTRIES as u64 == GUEST_PHYS_LIMIT);
    assert!(level_bytes(3) == crate::addr::PAGE_SIZE_1G);
    assert!(level_bytes(2) == crate::addr::PAGE_SIZE_2M);
    assert!(core::mem::size_of::<[AtomicU64; ENTRIES]>() == 4096);
};

/// Whether `raw`, an entry at `level`, points to a next-level table.
pub(super) fn is_table<F: EntryFormat>(raw: u64, level: usize) -> bool {
    level > 1 && F::is_present(raw) && !F::is_large(raw)
}

/// Whether `raw`, an entry at `level`, is a leaf.
pub(super) fn is_leaf<F: EntryFormat>(raw: u64, level: usize) -> bool {
    F::is_present(raw) && (level == 1 || F::is_large(raw))
}

/// The entries of the table in frame `table`.
///
/// Only ever called with this crate's own table frames: a table's root, an
/// address decoded from one of its table entries, or a retired subtree not
/// yet freed. All of them came from `FrameAlloc::alloc_frame` of the memory
/// `mem` maps and are still allocated.
pub(super) fn slots<M: PhysMem + ?Sized>(mem: &M, table: HostPhysAddr) -> &[AtomicU64; ENTRIES] {
    let ptr = mem.phys_to_ptr(table);
    debug_assert!(ptr.addr() % 4096 == 0);
    // SAFETY: by the `PhysMem` contract `ptr` is valid for reads and writes
    // of the whole 4 KiB frame for as long as `mem` is borrowed, and
    // 4 KiB-aligned; `AtomicU64` has the size and alignment of `u64`, and
    // every access to table memory in this crate (and by the hardware) is
    // atomic, so shared references to it are sound.
    unsafe { &*ptr.cast::<[AtomicU64; ENTRIES]>() }
}

/// A nested page table (EPT or NPT, chosen by `F`).
///
/// It does not own an allocator: each operation is handed one, and it must be
/// the one the table was created with (see [`crate::hal`]).
///
/// # Drop
///
/// Dropping a table without [`destroy`](Self::destroy) leaks its frames:
/// freeing them needs an allocator and a TLB flush, which `Drop` has neither
/// of. Debug builds panic on that leak so tests catch it.
pub struct NestedPageTable<F: EntryFormat> {
    root: HostPhysAddr,
    table_frames: usize,
    max_page_size: PageSize,
    _format: PhantomData<fn() -> F>,
}

impl<F: EntryFormat> NestedPageTable<F> {
    /// An empty table (one zeroed root frame: every address faults).
    pub fn new<A: FrameAlloc>(alloc: &mut A) -> Result<Self, Error> {
        let root = alloc.alloc_frame().ok_or(Error::OutOfTableMemory)?;
        Ok(Self { root, table_frames: 1, max_page_size: PageSize::Size1G, _format: PhantomData })
    }

    /// Limit the leaves this table may hold (default: 1 GiB). 1 GiB leaves
    /// need CPU support (EPT: IA32_VMX_EPT_VPID_CAP bit 17, SDM Vol. 3C
    /// A.10; NPT: CPUID Fn8000_0001 EDX bit 26 "Page1GB", APM Vol. 2 15.25.1),
    /// so the backend sets this from the capabilities before mapping.
    /// `map` and `merge` then refuse larger pages, and
    /// [`GuestRam::map_into`](crate::GuestRam::map_into) never uses them.
    pub fn set_max_page_size(&mut self, size: PageSize) {
        self.max_page_size = size;
    }

    /// The largest leaf this table may hold.
    pub fn max_page_size(&self) -> PageSize {
        self.max_page_size
    }

    /// Host-physical address of the root (PML4) table, for the EPTP or nCR3.
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }

    /// Number of 4 KiB frames the tree currently uses (root included): the
    /// page-table part of a VM's memory overhead.
    pub fn table_frames(&self) -> usize {
        self.table_frames
    }

    /// Tear the table down. The returned token (scope: everything) frees
    /// every table frame when flushed; nothing may use the root afterwards.
    pub fn destroy(self) -> Invalidation<F> {
        let inv = Invalidation::all().retire(self.root, 4);
        core::mem::forget(self);
        inv
    }

    pub(super) fn add_table_frames(&mut self, n: usize) {
        self.table_frames += n;
    }

    pub(super) fn remove_table_frames(&mut self, n: usize) {
        self.table_frames -= n;
    }

    /// Walk from the root towards `gpa`, stopping at a non-present entry, at a
    /// leaf, or at the entry of level `stop`, whichever comes first.
    pub(super) fn walk<'m, M: PhysMem + ?Sized>(&self, mem: &'m M, gpa: u64, stop: usize) -> Walk<'m> {
        let mut table = self.root;
        let mut level = 4;
        loop {
            let slot = &slots(mem, table)[index(gpa, level)];
            let raw = slot.load(Ordering::Acquire);
            if level == stop || !is_table::<F>(raw, level) {
                return Walk { slot, raw, level };
            }
            table = F::decode_table(raw);
            level -= 1;
        }
    }
}

/// Where a [`NestedPageTable::walk`] stopped.
pub(super) struct Walk<'m> {
    pub(super) slot: &'m AtomicU64,
    /// The entry's value when the walk read it.
    pub(super) raw: u64,
    pub(super) level: usize,
}

impl<F: EntryFormat> Drop for NestedPageTable<F> {
    fn drop(&mut self) {
        crate::leaked("a NestedPageTable", self.table_frames);
    }
}

impl<F: EntryFormat> core::fmt::Debug for NestedPageTable<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NestedPageTable")
            .field("format", &F::NAME)
            .field("root", &self.root)
            .field("table_frames", &self.table_frames)
            .finish()
    }
}

/// Check that `[gpa, gpa + len)` is inside the 48-bit guest-physical space.
pub(super) fn check_gpa_range(gpa: GuestPhysAddr, len: u64) -> Result<(), Error> {
    match gpa.0.checked_add(len) {
        Some(end) if end <= GUEST_PHYS_LIMIT => Ok(()),
        _ => Err(Error::GuestAddressOutOfRange(gpa)),
    }
}

#[cfg(test)]
impl<F: EntryFormat> NestedPageTable<F> {
    /// Do what the hardware walker does on a guest access to `gpa`: set the
    /// leaf's accessed bit, and its dirty bit for a write. Returns false if
    /// `gpa` is not mapped.
    pub(crate) fn simulate_access<M: PhysMem>(&self, mem: &M, gpa: GuestPhysAddr, write: bool) -> bool {
        let w = self.walk(mem, gpa.0, 1);
        if !is_leaf::<F>(w.raw, w.level) {
            return false;
        }
        let bits = F::ACCESSED | if write { F::DIRTY } else { 0 };
        w.slot.fetch_or(bits, Ordering::AcqRel);
        true
    }
}
