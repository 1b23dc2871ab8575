//! Mapping, unmapping, changing rights and translating single pages.

use core::sync::atomic::Ordering;

use super::format::EntryFormat;
use super::invalidation::Invalidation;
use super::table::{ENTRIES, NestedPageTable, check_gpa_range, index, is_leaf, is_table, slots};
use super::types::{Access, Leaf, MemType, PageSize, Translation};
use crate::addr::{GUEST_PHYS_LIMIT, GuestPhysAddr, HOST_PHYS_LIMIT, HostPhysAddr};
use crate::error::Error;
use crate::hal::{FrameAlloc, PhysMem};

impl<F: EntryFormat> NestedPageTable<F> {
    /// Map one page of `size` at `gpa` to `hpa`.
    ///
    /// Refuses misaligned or out-of-range addresses, rights the format
    /// cannot express, pages above [`Self::max_page_size`], and any overlap with an existing mapping of any size.
    /// On error (including running out of frames) the table is unchanged.
    ///
    /// The token is empty for a fresh mapping (the hardware does not cache
    /// non-present entries, SDM Vol. 3C 29.4.1). It is non-empty only when a
    /// large page replaces a table left empty by earlier unmaps: that table
    /// is retired and freed by the flush.
    pub fn map<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        gpa: GuestPhysAddr,
        hpa: HostPhysAddr,
        size: PageSize,
        access: Access,
        mem_type: MemType,
    ) -> Result<Invalidation<F>, Error> {
        if !F::supports(access) {
            return Err(Error::UnsupportedAccess { format: F::NAME, access });
        }
        if size > self.max_page_size() {
            return Err(Error::UnsupportedPageSize(size));
        }
        check_page(gpa, size)?;
        if !hpa.is_aligned(size.bytes()) {
            return Err(Error::MisalignedHostAddress { hpa, size });
        }
        if hpa.0.checked_add(size.bytes()).is_none_or(|end| end > HOST_PHYS_LIMIT) {
            return Err(Error::HostAddressOutOfRange(hpa));
        }
        let leaf = F::encode_leaf(&Leaf { hpa, size, access, mem_type, accessed: false, dirty: false });
        let target = size.level();
        let w = self.walk(&*alloc, gpa.0, target);
        if F::is_present(w.raw) {
            if w.level == target && is_table::<F>(w.raw, w.level) {
                return self.replace_empty_table(&*alloc, w.slot, w.raw, gpa, size, leaf);
            }
            return Err(Error::AlreadyMapped { gpa, size });
        }
        if w.level == target {
            w.slot.store(leaf, Ordering::Release);
            return Ok(Invalidation::none());
        }
        let top = w.level;

        // Tables are missing for levels top - 1 down to `target`. Get
        // them all before touching the tree, so running out changes nothing.
        let missing = top - target;
        let mut frames = [HostPhysAddr(0); 3];
        for i in 0..missing {
            match alloc.alloc_frame() {
                Some(f) => frames[i] = f,
                None => {
                    for &f in &frames[..i] {
                        // SAFETY: allocated just above from `alloc` and never
                        // linked, so nothing references it.
                        unsafe { alloc.free_frame(f) };
                    }
                    return Err(Error::OutOfTableMemory);
                }
            }
        }
        // frames[i] becomes the table at level top - 1 - i. Fill bottom-up
        // (all unlinked), then link the top with one Release store.
        slots(&*alloc, frames[missing - 1])[index(gpa.0, target)].store(leaf, Ordering::Relaxed);
        for i in (0..missing - 1).rev() {
            let level = top - 1 - i;
            let entry = F::encode_table(frames[i + 1]);
            slots(&*alloc, frames[i])[index(gpa.0, level)].store(entry, Ordering::Relaxed);
        }
        // Walk again: the allocation needed `alloc` mutably. Nothing but the
        // hardware can have touched the tree meanwhile, and it does not fill
        // non-present entries.
        let w = self.walk(&*alloc, gpa.0, target);
        debug_assert!(w.level == top && !F::is_present(w.raw));
        w.slot.store(F::encode_table(frames[0]), Ordering::Release);
        self.add_table_frames(missing);
        Ok(Invalidation::none())
    }

    /// `map` found a table where the large leaf should go: allowed only if
    /// nothing below it is mapped any more.
    fn replace_empty_table<M: PhysMem>(
        &mut self,
        mem: &M,
        slot: &core::sync::atomic::AtomicU64,
        raw: u64,
        gpa: GuestPhysAddr,
        size: PageSize,
        leaf: u64,
    ) -> Result<Invalidation<F>, Error> {
        let level = size.level();
        let table = F::decode_table(raw);
        if has_leaf::<F, M>(mem, table, level - 1) {
            return Err(Error::AlreadyMapped { gpa, size });
        }
        // Only hardware touches the entry concurrently (setting its accessed
        // bit), so swap unconditionally.
        slot.swap(leaf, Ordering::AcqRel);
        self.remove_table_frames(count_tables::<F, M>(mem, table, level - 1));
        Ok(Invalidation::range(gpa, size.bytes()).retire(table, level - 1))
    }

    /// Remove the page of `size` at `gpa`; returns its host address.
    ///
    /// Fails if nothing is mapped there, or if the address is mapped by a page
    /// of another size (split or unmap the smaller pages instead). Tables
    /// left empty stay in place until a large page is mapped over them or the
    /// table is destroyed. The host page may be used by vCPUs until the token
    /// is flushed.
    pub fn unmap<M: PhysMem>(
        &mut self,
        mem: &M,
        gpa: GuestPhysAddr,
        size: PageSize,
    ) -> Result<(HostPhysAddr, Invalidation<F>), Error> {
        check_page(gpa, size)?;
        let w = self.find_exact(mem, gpa, size)?;
        let old = w.slot.swap(0, Ordering::AcqRel);
        let hpa = F::decode_leaf(old, size).hpa;
        Ok((hpa, Invalidation::range(gpa, size.bytes())))
    }

    /// Change the rights of the page of `size` at `gpa`, keeping its host
    /// address, memory type and accessed/dirty state.
    pub fn protect<M: PhysMem>(
        &mut self,
        mem: &M,
        gpa: GuestPhysAddr,
        size: PageSize,
        access: Access,
    ) -> Result<Invalidation<F>, Error> {
        if !F::supports(access) {
            return Err(Error::UnsupportedAccess { format: F::NAME, access });
        }
        check_page(gpa, size)?;
        let w = self.find_exact(mem, gpa, size)?;
        // A CAS loop, so A/D bits the hardware sets meanwhile survive.
        let update = |raw: u64| {
            let leaf = F::decode_leaf(raw, size);
            let new = F::encode_leaf(&Leaf { access, ..leaf });
            (new != raw).then_some(new)
        };
        match w.slot.try_update(Ordering::AcqRel, Ordering::Acquire, update) {
            Ok(_) => Ok(Invalidation::range(gpa, size.bytes())),
            Err(_) => Ok(Invalidation::none()), // already had exactly these rights
        }
    }

    /// Translate one guest-physical address, or `None` if it is not mapped
    /// (or beyond the guest-physical space).
    pub fn translate<M: PhysMem>(&self, mem: &M, gpa: GuestPhysAddr) -> Option<Translation> {
        if gpa.0 >= GUEST_PHYS_LIMIT {
            return None;
        }
        let w = self.walk(mem, gpa.0, 1);
        if !is_leaf::<F>(w.raw, w.level) {
            return None;
        }
        let size = PageSize::at_level(w.level)?;
        let leaf = F::decode_leaf(w.raw, size);
        let offset = gpa.0 & (size.bytes() - 1);
        Some(Translation { hpa: HostPhysAddr(leaf.hpa.0 + offset), leaf })
    }

    /// The walk to the leaf of exactly `size` at `gpa`, or why there is none.
    fn find_exact<'m, M: PhysMem>(
        &self,
        mem: &'m M,
        gpa: GuestPhysAddr,
        size: PageSize,
    ) -> Result<super::table::Walk<'m>, Error> {
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
        Ok(w)
    }
}

/// Check that a page of `size` at `gpa` is aligned and inside the space.
pub(super) fn check_page(gpa: GuestPhysAddr, size: PageSize) -> Result<(), Error> {
    if !gpa.is_aligned(size.bytes()) {
        return Err(Error::MisalignedGuestAddress { gpa, size });
    }
    check_gpa_range(gpa, size.bytes())
}

/// Whether any leaf is mapped in the subtree of `table` (at `level`).
fn has_leaf<F: EntryFormat, M: PhysMem>(mem: &M, table: HostPhysAddr, level: usize) -> bool {
    slots(mem, table).iter().any(|slot| {
        let raw = slot.load(Ordering::Acquire);
        if is_table::<F>(raw, level) {
            has_leaf::<F, M>(mem, F::decode_table(raw), level - 1)
        } else {
            F::is_present(raw)
        }
    })
}

/// Number of table frames in the subtree of `table` (at `level`), itself
/// included.
pub(super) fn count_tables<F: EntryFormat, M: PhysMem>(mem: &M, table: HostPhysAddr, level: usize) -> usize {
    let entries = slots(mem, table);
    1 + (0..ENTRIES)
        .map(|i| entries[i].load(Ordering::Acquire))
        .filter(|&raw| is_table::<F>(raw, level))
        .map(|raw| count_tables::<F, M>(mem, F::decode_table(raw), level - 1))
        .sum::<usize>()
}
