//! Bulk operations over the leaves of a range, and in-place remapping.
//!
//! These visit each table once and scan its 512 entries in a tight loop
//! (instead of walking from the root once per leaf, as the `Mappings`
//! iterator does), which is what makes harvesting the dirty bits of 1 GiB
//! of 4 KiB mappings take well under a millisecond.

use core::ops::Range;
use core::sync::atomic::{AtomicU64, Ordering};

use super::format::EntryFormat;
use super::invalidation::Invalidation;
use super::map::check_page;
use super::table::{ENTRIES, NestedPageTable, is_leaf, is_table, level_bytes, slots};
use super::types::{Access, Leaf, Mapping, PageSize};
use crate::addr::{GUEST_PHYS_LIMIT, GuestPhysAddr, HOST_PHYS_LIMIT, HostPhysAddr};
use crate::error::Error;
use crate::hal::PhysMem;

/// The union of changed ranges, built without allocating per change.
#[derive(Clone, Copy, Default)]
pub(super) struct Span {
    lo: u64,
    hi: u64,
}

impl Span {
    pub(super) fn add(&mut self, gpa: u64, len: u64) {
        if self.hi == self.lo {
            (self.lo, self.hi) = (gpa, gpa + len);
        } else {
            self.lo = self.lo.min(gpa);
            self.hi = self.hi.max(gpa + len);
        }
    }

    pub(super) fn into_invalidation<F: EntryFormat>(self) -> Invalidation<F> {
        if self.hi == self.lo {
            Invalidation::none()
        } else {
            Invalidation::range(GuestPhysAddr(self.lo), self.hi - self.lo)
        }
    }
}

impl<F: EntryFormat> NestedPageTable<F> {
    /// Call `f(base, size, slot, raw)` for every present leaf overlapping
    /// `[start, end)`, in address order (a large leaf straddling `start` is
    /// reported with its own base).
    pub(super) fn for_each_leaf<M: PhysMem>(
        &self,
        mem: &M,
        range: Range<u64>,
        f: &mut impl FnMut(u64, PageSize, &AtomicU64, u64),
    ) {
        let end = range.end.min(GUEST_PHYS_LIMIT);
        if range.start < end {
            self.visit(mem, self.root(), 4, 0, range.start, end, f);
        }
    }

    /// Visit the table `table` at `level` covering guest-physical addresses
    /// from `base`; `[start, end)` overlaps its span.
    #[allow(clippy::too_many_arguments)]
    fn visit<M: PhysMem>(
        &self,
        mem: &M,
        table: HostPhysAddr,
        level: usize,
        base: u64,
        start: u64,
        end: u64,
        f: &mut impl FnMut(u64, PageSize, &AtomicU64, u64),
    ) {
        let span = level_bytes(level);
        let entries = slots(mem, table);
        let first = (start.saturating_sub(base) / span) as usize;
        let last = (((end - 1).saturating_sub(base) / span) as usize).min(ENTRIES - 1);
        for (i, slot) in entries.iter().enumerate().take(last + 1).skip(first) {
            let raw = slot.load(Ordering::Acquire);
            if !F::is_present(raw) {
                continue;
            }
            let gpa = base + i as u64 * span;
            if is_table::<F>(raw, level) {
                self.visit(mem, F::decode_table(raw), level - 1, gpa, start, end, f);
            } else if let Some(size) = PageSize::at_level(level) {
                f(gpa, size, slot, raw);
            }
        }
    }

    /// Call `f` for every leaf mapping overlapping `range`, in address order
    /// (like [`Self::mappings`], but visiting each table once: much faster
    /// over many small pages).
    pub fn for_each_mapping<M: PhysMem>(&self, mem: &M, range: Range<GuestPhysAddr>, mut f: impl FnMut(Mapping)) {
        self.for_each_leaf(mem, range.start.0..range.end.0, &mut |gpa, size, _, raw| {
            f(Mapping { gpa: GuestPhysAddr(gpa), leaf: F::decode_leaf(raw, size) })
        });
    }

    /// Change the rights of every leaf overlapping `range` to
    /// `rights(base, size, current)`, keeping address, memory type and
    /// accessed/dirty state (a CAS per leaf, so bits the hardware sets
    /// meanwhile survive). Rights the format cannot express are left as
    /// they are. The token covers every leaf that changed.
    pub fn update_access<M: PhysMem>(
        &mut self,
        mem: &M,
        range: Range<GuestPhysAddr>,
        mut rights: impl FnMut(GuestPhysAddr, PageSize, Access) -> Access,
    ) -> Invalidation<F> {
        let mut changed = Span::default();
        self.for_each_leaf(mem, range.start.0..range.end.0, &mut |gpa, size, slot, raw| {
            let old = F::decode_leaf(raw, size);
            let access = rights(GuestPhysAddr(gpa), size, old.access);
            if access == old.access || !F::supports(access) {
                debug_assert!(F::supports(access), "update_access: {} cannot express {access}", F::NAME);
                return;
            }
            let update = |raw: u64| Some(F::encode_leaf(&Leaf { access, ..F::decode_leaf(raw, size) }));
            // Only the hardware changes a leaf concurrently (A/D bits), so
            // the update always lands.
            let _ = slot.try_update(Ordering::AcqRel, Ordering::Acquire, update);
            changed.add(gpa, size.bytes());
        });
        changed.into_invalidation()
    }

    /// Point the page of `size` at `gpa` at another host page `hpa` with
    /// rights `access`, in one atomic store (no window in which the page is
    /// unmapped). The memory type is kept; accessed/dirty start clear.
    /// Returns the old host address; it may still be used by vCPUs until the
    /// token is flushed.
    pub fn remap<M: PhysMem>(
        &mut self,
        mem: &M,
        gpa: GuestPhysAddr,
        size: PageSize,
        hpa: HostPhysAddr,
        access: Access,
    ) -> Result<(HostPhysAddr, Invalidation<F>), Error> {
        if !F::supports(access) {
            return Err(Error::UnsupportedAccess { format: F::NAME, access });
        }
        check_page(gpa, size)?;
        if !hpa.is_aligned(size.bytes()) {
            return Err(Error::MisalignedHostAddress { hpa, size });
        }
        if hpa.0.checked_add(size.bytes()).is_none_or(|end| end > HOST_PHYS_LIMIT) {
            return Err(Error::HostAddressOutOfRange(hpa));
        }
        let w = self.walk(mem, gpa.0, size.level());
        if !F::is_present(w.raw) {
            return Err(Error::NotMapped(gpa));
        }
        if w.level > size.level() {
            let found = PageSize::at_level(w.level).ok_or(Error::NotMapped(gpa))?;
            return Err(Error::InsideLargerPage { gpa, size: found });
        }
        if !is_leaf::<F>(w.raw, w.level) {
            return Err(Error::MappedBySmallerPages { gpa, size });
        }
        let old = F::decode_leaf(w.raw, size);
        let leaf = Leaf { hpa, size, access, mem_type: old.mem_type, accessed: false, dirty: false };
        let old = F::decode_leaf(w.slot.swap(F::encode_leaf(&leaf), Ordering::AcqRel), size);
        Ok((old.hpa, Invalidation::range(gpa, size.bytes())))
    }
}

#[cfg(any(test, feature = "sim"))]
impl<F: EntryFormat> NestedPageTable<F> {
    /// Do what the hardware does on a guest access to `gpa` needing `access`
    /// (a subset of one right): if the leaf grants it, set the accessed bit
    /// (and dirty for a write) and return the host address; otherwise the
    /// access would cause an EPT violation / nested page fault: `None`.
    /// Public (with `sim`) so the fuzz targets' simulated guests use it too.
    pub fn hw_access<M: PhysMem>(&self, mem: &M, gpa: GuestPhysAddr, access: Access) -> Option<HostPhysAddr> {
        if gpa.0 >= GUEST_PHYS_LIMIT {
            return None;
        }
        let w = self.walk(mem, gpa.0, 1);
        if !is_leaf::<F>(w.raw, w.level) {
            return None;
        }
        let size = PageSize::at_level(w.level)?;
        let leaf = F::decode_leaf(w.raw, size);
        if !leaf.access.contains(access) {
            return None;
        }
        let bits = F::ACCESSED | if access.contains(Access::WRITE) { F::DIRTY } else { 0 };
        w.slot.fetch_or(bits, Ordering::AcqRel);
        Some(HostPhysAddr(leaf.hpa.0 + (gpa.0 & (size.bytes() - 1))))
    }
}
