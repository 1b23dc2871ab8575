//! Walking all leaves of a range: the iterator and accessed/dirty harvesting.

use core::ops::Range;
use core::sync::atomic::Ordering;

use super::bulk::Span;
use super::format::EntryFormat;
use super::invalidation::Invalidation;
use super::table::{NestedPageTable, index, is_table, level_bytes, slots};
use super::types::{Mapping, PageSize};
use crate::addr::{GUEST_PHYS_LIMIT, GuestPhysAddr};
use crate::hal::PhysMem;

/// A leaf found by [`NestedPageTable::next_leaf`].
struct Found {
    gpa: u64,
    size: PageSize,
    raw: u64,
}

impl<F: EntryFormat> NestedPageTable<F> {
    /// The first leaf that overlaps `[cur, end)`, in address order. A large
    /// leaf that starts before `cur` is reported with its own base.
    fn next_leaf<M: PhysMem>(&self, mem: &M, mut cur: u64, end: u64) -> Option<Found> {
        'restart: while cur < end {
            let mut table = self.root();
            for level in (1..=4).rev() {
                let slot = &slots(mem, table)[index(cur, level)];
                let raw = slot.load(Ordering::Acquire);
                let span = level_bytes(level);
                if !F::is_present(raw) {
                    // Skip the rest of this entry's span.
                    cur = (cur & !(span - 1)) + span;
                    continue 'restart;
                }
                if !is_table::<F>(raw, level) {
                    let size = PageSize::at_level(level)?;
                    return Some(Found { gpa: cur & !(span - 1), size, raw });
                }
                table = F::decode_table(raw);
            }
            // Level 1 entries are never tables, so the loop always returns or
            // restarts.
            unreachable!("level-1 entry treated as a table");
        }
        None
    }

    /// Every leaf mapping overlapping `range`, in address order (large pages
    /// that straddle the range start are included, with their own base). The
    /// range is clamped to the 48-bit guest-physical space.
    pub fn mappings<'a, M: PhysMem>(&'a self, mem: &'a M, range: Range<GuestPhysAddr>) -> Mappings<'a, F, M> {
        Mappings { table: self, mem, cur: range.start.0, end: range.end.0.min(GUEST_PHYS_LIMIT) }
    }

    /// Clear the dirty bit of every leaf overlapping `range` that has it,
    /// calling `report(base, size)` once per such leaf. Large pages are
    /// reported and cleared whole. The token covers the cleared leaves: until
    /// it is flushed a vCPU may write through a cached dirty translation
    /// without setting the bit again (SDM Vol. 3C 29.3.5).
    pub fn test_and_clear_dirty<M: PhysMem>(
        &mut self,
        mem: &M,
        range: Range<GuestPhysAddr>,
        report: impl FnMut(GuestPhysAddr, PageSize),
    ) -> Invalidation<F> {
        self.test_and_clear(mem, range, F::DIRTY, report)
    }

    /// Like [`Self::test_and_clear_dirty`], for the accessed bit (access
    /// sampling).
    pub fn test_and_clear_accessed<M: PhysMem>(
        &mut self,
        mem: &M,
        range: Range<GuestPhysAddr>,
        report: impl FnMut(GuestPhysAddr, PageSize),
    ) -> Invalidation<F> {
        self.test_and_clear(mem, range, F::ACCESSED, report)
    }

    fn test_and_clear<M: PhysMem>(
        &mut self,
        mem: &M,
        range: Range<GuestPhysAddr>,
        bit: u64,
        mut report: impl FnMut(GuestPhysAddr, PageSize),
    ) -> Invalidation<F> {
        let mut cleared = Span::default();
        self.for_each_leaf(mem, range.start.0..range.end.0, &mut |gpa, size, slot, raw| {
            // Atomic RMW: a bit the hardware sets right now is either seen
            // here or stays set for the next harvest.
            if raw & bit != 0 && slot.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                report(GuestPhysAddr(gpa), size);
                cleared.add(gpa, size.bytes());
            }
        });
        cleared.into_invalidation()
    }
}

/// Iterator over leaf mappings, from [`NestedPageTable::mappings`].
pub struct Mappings<'a, F: EntryFormat, M: PhysMem> {
    table: &'a NestedPageTable<F>,
    mem: &'a M,
    cur: u64,
    end: u64,
}

impl<F: EntryFormat, M: PhysMem> Iterator for Mappings<'_, F, M> {
    type Item = Mapping;

    fn next(&mut self) -> Option<Mapping> {
        let found = self.table.next_leaf(self.mem, self.cur, self.end)?;
        self.cur = found.gpa + found.size.bytes();
        Some(Mapping { gpa: GuestPhysAddr(found.gpa), leaf: F::decode_leaf(found.raw, found.size) })
    }
}

impl<F: EntryFormat, M: PhysMem> core::fmt::Debug for Mappings<'_, F, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Mappings").field("cur", &self.cur).field("end", &self.end).finish()
    }
}
