//! The nested-page-fault entry point (EPT violation, SDM Vol. 3C 29.3.3.2;
//! #NPF, APM Vol. 2 15.25.6) and what it resolves: copy-on-write breaks,
//! dirty-logging write protection, lazy loading, balloon re-backing and
//! page-in from swap.

use core::fmt::Debug;

use crate::swap_hook::SlotWord;

use super::state::{KIND_MASK, Override, REPLACED};
use super::{Hooks, Lookup, MmioId, PageState, VmMemory, combine, write_frame};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::error::Error;
use crate::hal::{ContiguousAlloc, FrameAlloc, PhysMem};
use crate::paging::{Access, EntryFormat, FlushScope, Invalidation};

/// What the faulting access tried to do (from the exit qualification /
/// EXITINFO1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum AccessKind {
    /// A data read (or a guest page-table walk).
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Execute,
}

impl AccessKind {
    /// The right the access needs.
    pub fn access(self) -> Access {
        match self {
            AccessKind::Read => Access::READ,
            AccessKind::Write => Access::WRITE,
            AccessKind::Execute => Access::EXECUTE,
        }
    }
}

/// What the exit handler does after [`VmMemory::handle_fault`].
#[must_use = "a resolved fault carries a TLB flush"]
pub enum FaultOutcome<F: EntryFormat> {
    /// Fixed: flush the token (all of the VM's roots), then re-enter the
    /// guest to retry the access.
    Resolved(Invalidation<F>),
    /// The address is in an MMIO region: emulate the device access.
    Mmio {
        /// Which region (see [`MemoryMap::mmio`](super::MemoryMap::mmio)).
        id: MmioId,
        /// Offset of the faulting address in the region.
        offset: u64,
    },
    /// Neither RAM nor MMIO: the VM must be stopped.
    OutsideMemory,
    /// The page is poisoned: inject a machine check or stop the VM.
    Poisoned,
    /// A guest write to read-only RAM (ROM, see
    /// [`VmMemory::set_read_only`]): nothing changed; hardware drops such
    /// a write, so the exit handler emulates the instruction without it.
    ReadOnly,
    /// The fault could not be resolved (store or source error, host out of
    /// memory, missing hook): the page is unchanged; stop the VM or retry
    /// later.
    Failed(Error),
}

impl<F: EntryFormat> Debug for FaultOutcome<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FaultOutcome::Resolved(inv) => f.debug_tuple("Resolved").field(inv).finish(),
            FaultOutcome::Mmio { id, offset } => {
                f.debug_struct("Mmio").field("id", id).field("offset", offset).finish()
            }
            FaultOutcome::OutsideMemory => f.write_str("OutsideMemory"),
            FaultOutcome::Poisoned => f.write_str("Poisoned"),
            FaultOutcome::ReadOnly => f.write_str("ReadOnly"),
            FaultOutcome::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
        }
    }
}

/// Where `NotLoaded` pages get their contents on first touch (a lazy
/// restore's checkpoint reader, post-copy migration's page requests).
pub trait PageSource {
    /// Fill `page` with the contents of the guest page at `gpa`.
    fn fill(&mut self, gpa: GuestPhysAddr, page: &mut [u8; 4096]) -> Result<(), Error>;

    /// How many 4 KiB pages to load together: a fault loads every
    /// not-loaded page of the aligned block of this many pages around it
    /// (block-wise lazy restore). Rounded up to a power of two, at most 512;
    /// a whole 2 MiB block is then mapped with one large page again.
    fn block_pages(&self) -> u32 {
        1
    }

    /// A load starts at the page `gpa`, the one a vCPU or the host
    /// touched; [`Self::block_pages`] and then [`Self::fill`] for each
    /// not-loaded page of its block follow. A source learns the access
    /// pattern here (to size its read-ahead) and which fill is the touched
    /// page and which are read-ahead.
    fn touched(&mut self, gpa: GuestPhysAddr) {
        let _ = gpa;
    }
}

impl<F: EntryFormat, S: SlotWord> VmMemory<F, S> {
    /// Handle a nested page fault of vCPU `vcpu` at `gpa`.
    ///
    /// Never panics on guest-controlled input: any address and access kind
    /// gives an outcome. On `Failed` nothing about the page changed.
    pub fn handle_fault<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        vcpu: usize,
        gpa: GuestPhysAddr,
        kind: AccessKind,
    ) -> FaultOutcome<F> {
        match self.map.lookup(gpa) {
            Lookup::Mmio { id, offset, .. } => return FaultOutcome::Mmio { id, offset },
            Lookup::Nothing => return FaultOutcome::OutsideMemory,
            Lookup::Ram => {}
        }
        if self.index_of(gpa.0).is_none() {
            return FaultOutcome::OutsideMemory;
        }
        if kind == AccessKind::Write && self.is_read_only(gpa) {
            // Before any copy-on-write break: a ROM page never gets a
            // private writable frame for the guest.
            return FaultOutcome::ReadOnly;
        }
        match self.resolve_for(alloc, hooks, Some(vcpu), gpa, kind) {
            Ok(inv) => FaultOutcome::Resolved(inv),
            Err(Error::PagePoisoned(_)) => FaultOutcome::Poisoned,
            Err(e) => FaultOutcome::Failed(e),
        }
    }

    /// Resolve an access by the host (no vCPU): as a fault, but host writes
    /// are always dirty-logged.
    pub(super) fn resolve<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        gpa: GuestPhysAddr,
        kind: AccessKind,
    ) -> Result<Invalidation<F>, Error> {
        self.resolve_for(alloc, hooks, None, gpa, kind)
    }

    fn resolve_for<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        vcpu: Option<usize>,
        gpa: GuestPhysAddr,
        kind: AccessKind,
    ) -> Result<Invalidation<F>, Error> {
        let i = self.index_of(gpa.0).ok_or(Error::NotGuestRam(gpa))?;
        let page = gpa.align_down(PAGE_SIZE_4K);
        let mut inv = Invalidation::none();
        // A write the running snapshot must see the old contents of: copy
        // them aside before anything changes (a swapped or not-loaded
        // page's contents are in a frame only once it is in, below).
        let snapshot = kind == AccessKind::Write && self.snapshot_pending(i);
        if snapshot && !matches!(self.state(i), PageState::Swapped | PageState::NotLoaded) {
            self.snapshot_preserve(alloc, i)?;
        }
        match self.state(i) {
            PageState::Poisoned => return Err(Error::PagePoisoned(page)),
            PageState::Ballooned => {
                self.back_fresh(alloc, i, &mut inv)?;
            }
            PageState::Swapped => self.page_in(alloc, hooks, i, &mut inv)?,
            PageState::NotLoaded => self.load(alloc, hooks, i, &mut inv)?,
            PageState::Zero | PageState::Shared if kind == AccessKind::Write => {
                self.break_cow(alloc, hooks, i, &mut inv)?;
            }
            PageState::Present | PageState::Zero | PageState::Shared => {
                // Already mapped as it should be unless the fault is the
                // dirty log's (handled below): repair the mapping, and flush
                // what the faulting CPU may have cached.
                self.sync_page(alloc, i, &mut inv)?;
                combine(&mut inv, Invalidation::of_range(page, PAGE_SIZE_4K));
            }
        }
        if snapshot && self.snapshot_pending(i) && self.state(i) == PageState::Present {
            // Brought in above with the write still refused.
            self.snapshot_preserve(alloc, i)?;
            self.sync_page(alloc, i, &mut inv)?;
        }
        if kind == AccessKind::Write && self.state(i) == PageState::Present {
            self.log_write(&*alloc, vcpu, i, &mut inv);
        }
        Ok(inv)
    }

    /// Back page `i` with a fresh zeroed frame (a ballooned page touched).
    pub(super) fn back_fresh<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        i: usize,
        inv: &mut Invalidation<F>,
    ) -> Result<HostPhysAddr, Error> {
        let frame = alloc.alloc_frame().ok_or(Error::OutOfHostFrames)?;
        if let Err(e) = self.transition(alloc, i, PageState::Present, true, Some(Override::Frame(frame)), inv) {
            // SAFETY: allocated above and never mapped.
            unsafe { alloc.free_frame(frame) };
            return Err(e);
        }
        // The guest sees new (zero) contents: migration must send them.
        self.log_write(&*alloc, None, i, inv);
        Ok(frame)
    }

    /// Give a `Zero` or `Shared` page a private writable frame.
    fn break_cow<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        i: usize,
        inv: &mut Invalidation<F>,
    ) -> Result<(), Error> {
        let index = hooks.sharing.as_deref_mut().ok_or(Error::MissingHook("sharing index"))?;
        match self.state(i) {
            PageState::Zero => {
                let frame = alloc.alloc_frame().ok_or(Error::OutOfHostFrames)?;
                if let Err(e) = self.transition(alloc, i, PageState::Present, true, Some(Override::Frame(frame)), inv) {
                    // SAFETY: allocated above and never mapped.
                    unsafe { alloc.free_frame(frame) };
                    return Err(e);
                }
                index.release_zero();
            }
            _ => {
                let shared = self
                    .override_frame(i)
                    .ok_or(Error::WrongPageState { gpa: self.gpa_of(i), state: PageState::Shared })?;
                if index.is_quarantined(shared) {
                    // Another sharer's page was poisoned: the frame is bad
                    // memory. Neither take it over (it would be freed and
                    // reused) nor copy it (reading it is a machine check).
                    return Err(Error::PagePoisoned(self.gpa_of(i)));
                }
                if index.refs(shared) == 1 {
                    // The last user: take the frame over instead of copying.
                    self.transition(alloc, i, PageState::Present, true, Some(Override::Frame(shared)), inv)?;
                    index.take_exclusive(shared);
                    return Ok(());
                }
                let frame = alloc.alloc_frame().ok_or(Error::OutOfHostFrames)?;
                let src = alloc.phys_to_ptr(shared);
                let dst = alloc.phys_to_ptr(frame);
                // SAFETY: both are live 4 KiB frames (the shared frame is
                // referenced by this page, the new one was just allocated);
                // the shared frame is read-only to every guest and never
                // written by the host, and the new one is not yet mapped, so
                // nothing writes either concurrently. They do not overlap.
                unsafe { core::ptr::copy_nonoverlapping(src, dst, PAGE_SIZE_4K as usize) };
                if let Err(e) = self.transition(alloc, i, PageState::Present, true, Some(Override::Frame(frame)), inv) {
                    // SAFETY: allocated above and never mapped.
                    unsafe { alloc.free_frame(frame) };
                    return Err(e);
                }
                // More than one reference was held, so this never frees the
                // shared frame (which a stale TLB entry may still read).
                index.release(alloc, shared);
            }
        }
        Ok(())
    }

    /// Bring a swapped page back from the store.
    fn page_in<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        i: usize,
        inv: &mut Invalidation<F>,
    ) -> Result<(), Error> {
        let gpa = self.gpa_of(i);
        let store = hooks.store.as_deref_mut().ok_or(Error::MissingHook("page store"))?;
        let slot = self.override_slot(i).ok_or(Error::WrongPageState { gpa, state: PageState::Swapped })?;
        let mut buf = [0u8; 4096];
        // Read before allocating: a corrupt slot costs nothing.
        store.page_in(slot, gpa, &mut buf)?;
        let frame = alloc.alloc_frame().ok_or(Error::OutOfHostFrames)?;
        // SAFETY: a fresh 4 KiB frame, 4 KiB-aligned, not mapped yet.
        unsafe { write_frame(alloc.phys_to_ptr(frame), &buf) };
        if let Err(e) = self.transition(alloc, i, PageState::Present, true, Some(Override::Frame(frame)), inv) {
            // SAFETY: allocated above and never mapped.
            unsafe { alloc.free_frame(frame) };
            return Err(e);
        }
        store.release(slot);
        Ok(())
    }

    /// Load a not-loaded page (and the not-loaded pages of its block) from
    /// the page source.
    fn load<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        i: usize,
        inv: &mut Invalidation<F>,
    ) -> Result<(), Error> {
        let source = hooks.source.as_deref_mut().ok_or(Error::MissingHook("page source"))?;
        let gpa = self.gpa_of(i);
        source.touched(gpa);
        let block = source.block_pages().clamp(1, 512).next_power_of_two() as u64;
        let start = gpa.align_down(block * PAGE_SIZE_4K);
        let mut buf = [0u8; 4096];
        for p in 0..block {
            let g = GuestPhysAddr(start.0 + p * PAGE_SIZE_4K);
            let Some(j) = self.index_of(g.0) else { continue };
            if self.state(j) != PageState::NotLoaded {
                continue;
            }
            if let Err(e) = source.fill(g, &mut buf) {
                if j == i {
                    return Err(e);
                }
                continue; // prefetch is best effort
            }
            let frame = self.own_frame(j).ok_or(Error::NotGuestRam(g))?;
            // SAFETY: the page's own frame, not mapped while not loaded, so
            // no guest accesses it; 4 KiB-aligned.
            unsafe { write_frame(alloc.phys_to_ptr(frame), &buf) };
            let replaced = self.states[j] & REPLACED != 0;
            let over = self.override_of(j);
            if let Err(e) = self.transition(alloc, j, PageState::Present, replaced, over, inv)
                && j == i
            {
                return Err(e);
            }
        }
        // The 2 MiB region this load completed (by one 512-page block, or
        // by the last of several smaller ones) maps large again, as it was
        // before its pages were marked not loaded; best effort.
        self.try_merge_2m(&*alloc, gpa.align_down(PAGE_SIZE_2M), inv);
        Ok(())
    }

    /// Load page `gpa` now if it is `NotLoaded` (post-copy: its content
    /// just arrived, and the source hands it out in `fill`), then flush
    /// through `flush`. `Ok(false)`: the page is in another state (loaded
    /// already, or not RAM), and nothing changed.
    pub fn load_page<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        gpa: GuestPhysAddr,
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<bool, Error> {
        let Some(i) = self.index_of(gpa.0) else { return Ok(false) };
        if self.state(i) != PageState::NotLoaded {
            return Ok(false);
        }
        let mut inv = Invalidation::none();
        let loaded = self.load(alloc, hooks, i, &mut inv);
        inv.flush(alloc, &mut *flush);
        loaded.map(|()| true)
    }

    /// Load the first `NotLoaded` page at or after `from` (and the
    /// not-loaded pages of its block, as a fault would) from
    /// `hooks.source`, then flush through `flush`: a background fill that
    /// converges a lazily restored VM to fully loaded. Returns the page
    /// loaded, or `None` when no page from `from` on is still not loaded.
    /// On error that page stays not loaded.
    pub fn load_next_not_loaded<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        from: GuestPhysAddr,
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<Option<GuestPhysAddr>, Error> {
        if self.counts.not_loaded == 0 {
            return Ok(None);
        }
        let first = match self.range_of(from.0) {
            Some(_) => self.index_of(from.0).unwrap_or(0),
            // Before, between or after the RAM ranges: the next range's
            // first page, if any.
            None => match self.ranges.iter().find(|r| r.gpa > from.0) {
                Some(r) => r.first,
                None => return Ok(None),
            },
        };
        let code = PageState::NotLoaded.code();
        let Some(i) = self.states[first..].iter().position(|&s| s & KIND_MASK == code).map(|p| first + p) else {
            return Ok(None);
        };
        let gpa = self.gpa_of(i);
        let mut inv = Invalidation::none();
        let loaded = self.load(alloc, hooks, i, &mut inv);
        inv.flush(alloc, &mut *flush);
        loaded.map(|()| Some(gpa))
    }

    /// A write by `vcpu` (or the host) to `Present` page `i`: log it and,
    /// under write protection, open its granule for writing.
    pub(super) fn log_write<M: PhysMem>(&mut self, mem: &M, vcpu: Option<usize>, i: usize, inv: &mut Invalidation<F>) {
        let gpa = self.gpa_of(i).0;
        let view_exists = self.view.is_some();
        let Some(log) = &mut self.dirty else { return };
        if let Some(n) = vcpu
            && view_exists
            && !log.config.vcpus.contains(n)
        {
            // An untraced vCPU on the primary table: not logged.
            return;
        }
        if log.config.mechanism == super::DirtyMechanism::DirtyBits {
            if vcpu.is_none() {
                log.mark(gpa);
            }
            return;
        }
        log.mark(gpa);
        let granule = log.granule_bytes();
        let start = gpa & !(granule - 1);
        self.open_for_writes(mem, start, granule, inv);
    }
}
