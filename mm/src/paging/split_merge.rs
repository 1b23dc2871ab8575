//! Breaking large pages into smaller ones and collapsing them back.
//!
//! Both keep every translation, right and memory type, and carry the
//! accessed/dirty state over: split copies the large page's A/D bits into
//! every child; merge ORs the children's. A/D bits a vCPU sets through a
//! stale TLB entry between the change and the flush land in the old entry
//! and are lost, so dirty logging must not split or merge while it relies on
//! D bits without re-harvesting after the flush (KVM likewise only recovers
//! large pages once logging stops).

use core::sync::atomic::Ordering;

use super::format::EntryFormat;
use super::invalidation::Invalidation;
use super::map::check_page;
use super::table::{ENTRIES, NestedPageTable, is_leaf, is_table, level_bytes, slots};
use super::types::{Leaf, PageSize};
use crate::addr::{GUEST_PHYS_LIMIT, GuestPhysAddr, HostPhysAddr};
use crate::error::{Error, MergeRefusal};
use crate::hal::{FrameAlloc, PhysMem};

impl<F: EntryFormat> NestedPageTable<F> {
    /// Replace the 1 GiB or 2 MiB page containing `gpa` by a table of 512
    /// pages of the next smaller size with the same rights, memory type and
    /// A/D state. Needs one frame; without it the table is unchanged.
    pub fn split<A: FrameAlloc>(&mut self, alloc: &mut A, gpa: GuestPhysAddr) -> Result<Invalidation<F>, Error> {
        if gpa.0 >= GUEST_PHYS_LIMIT {
            return Err(Error::GuestAddressOutOfRange(gpa));
        }
        let w = self.walk(&*alloc, gpa.0, 1);
        if !is_leaf::<F>(w.raw, w.level) {
            return Err(Error::NotMapped(gpa));
        }
        let size = PageSize::at_level(w.level).ok_or(Error::NotMapped(gpa))?;
        let Some(child_size) = size.smaller() else {
            return Err(Error::CannotSplit(gpa));
        };
        let level = w.level;
        let table = alloc.alloc_frame().ok_or(Error::OutOfTableMemory)?;
        // Walk again: the allocation needed `alloc` mutably. Only the
        // hardware can have touched the leaf meanwhile (its A/D bits).
        let w = self.walk(&*alloc, gpa.0, level);
        let children = slots(&*alloc, table);
        let mut raw = w.raw;
        loop {
            let leaf = F::decode_leaf(raw, size);
            for (i, child) in children.iter().enumerate() {
                let hpa = HostPhysAddr(leaf.hpa.0 + i as u64 * child_size.bytes());
                child.store(F::encode_leaf(&Leaf { hpa, size: child_size, ..leaf }), Ordering::Relaxed);
            }
            // Publish only if the hardware has not set A/D meanwhile;
            // otherwise refill with the new bits.
            match w.slot.compare_exchange(raw, F::encode_table(table), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => raw = now,
            }
        }
        self.add_table_frames(1);
        let base = gpa.align_down(size.bytes());
        Ok(Invalidation::range(base, size.bytes()))
    }

    /// Collapse the table that maps the `size` range at `gpa` back into one
    /// page of `size` (2 MiB or 1 GiB).
    ///
    /// Refused unless all 512 children are present leaves, their host pages
    /// are consecutive and start on a `size` boundary, and they share rights
    /// and memory type. The table frame is freed by the token's flush.
    pub fn merge<M: PhysMem>(&mut self, mem: &M, gpa: GuestPhysAddr, size: PageSize) -> Result<Invalidation<F>, Error> {
        check_page(gpa, size)?;
        let refuse = |reason| Error::CannotMerge { gpa, size, reason };
        let Some(child_size) = size.smaller() else {
            return Err(refuse(MergeRefusal::TooSmall));
        };
        if size > self.max_page_size() {
            return Err(Error::UnsupportedPageSize(size));
        }
        let w = self.walk(mem, gpa.0, size.level());
        if !F::is_present(w.raw) {
            return Err(Error::NotMapped(gpa));
        }
        if !is_table::<F>(w.raw, w.level) {
            return Err(refuse(MergeRefusal::AlreadyLarge));
        }
        let table = F::decode_table(w.raw);
        let children = slots(mem, table);
        let first = check_children::<F>(children, child_size).map_err(refuse)?;
        if !first.hpa.is_aligned(size.bytes()) {
            return Err(refuse(MergeRefusal::HostMisaligned));
        }
        let (accessed, dirty) = harvest_ad::<F>(children, child_size);
        let leaf = F::encode_leaf(&Leaf { size, accessed, dirty, ..first });
        // The table entry itself only changes by the hardware setting its
        // accessed bit, which does not matter once it is replaced.
        w.slot.swap(leaf, Ordering::AcqRel);
        // Fold in A/D bits set between the check and the swap.
        let (late_a, late_d) = harvest_ad::<F>(children, child_size);
        let late = if late_a { F::ACCESSED } else { 0 } | if late_d { F::DIRTY } else { 0 };
        if late != 0 {
            w.slot.fetch_or(late, Ordering::AcqRel);
        }
        self.remove_table_frames(1);
        debug_assert_eq!(level_bytes(w.level), size.bytes());
        Ok(Invalidation::range(gpa, size.bytes()).retire(table, w.level - 1))
    }
}

/// Check the merge conditions on a table's children; returns the first
/// child (with its A/D bits, to be replaced by the caller).
fn check_children<F: EntryFormat>(
    children: &[core::sync::atomic::AtomicU64; ENTRIES],
    child_size: PageSize,
) -> Result<Leaf, MergeRefusal> {
    let level = child_size.level();
    let mut first: Option<Leaf> = None;
    for (i, slot) in children.iter().enumerate() {
        let raw = slot.load(Ordering::Acquire);
        if !F::is_present(raw) {
            return Err(MergeRefusal::Hole);
        }
        if !is_leaf::<F>(raw, level) {
            return Err(MergeRefusal::ChildIsTable);
        }
        let leaf = F::decode_leaf(raw, child_size);
        match first {
            None => first = Some(leaf),
            Some(f) => {
                if leaf.hpa.0 != f.hpa.0 + i as u64 * child_size.bytes() {
                    return Err(MergeRefusal::NotContiguous);
                }
                if leaf.access != f.access || leaf.mem_type != f.mem_type {
                    return Err(MergeRefusal::NotUniform);
                }
            }
        }
    }
    first.ok_or(MergeRefusal::Hole)
}

/// OR of the children's accessed and dirty bits.
fn harvest_ad<F: EntryFormat>(
    children: &[core::sync::atomic::AtomicU64; ENTRIES],
    child_size: PageSize,
) -> (bool, bool) {
    children.iter().fold((false, false), |(a, d), slot| {
        let leaf = F::decode_leaf(slot.load(Ordering::Acquire), child_size);
        (a | leaf.accessed, d | leaf.dirty)
    })
}
