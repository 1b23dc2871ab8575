//! Copy-on-write snapshots of guest memory (live checkpoints, seed 003):
//! the VM keeps running while its memory is read out, and every page it
//! changes before the reader got to it is copied first, so what is read is
//! the memory exactly as it was when the snapshot began.
//!
//! [`VmMemory::start_snapshot`] write-protects every page (splitting large
//! leaves to 4 KiB, as write-protection dirty logging does, and recording
//! them so the reader can keep runs of 2 MiB pages together) and marks each
//! page *pending*. Anything that would change a pending page's contents
//! first *preserves* them:
//! - a guest write faults on the protection ([`VmMemory::handle_fault`]);
//! - a host write ([`VmMemory::write`]: device DMA, loaders);
//! - a balloon inflation (the guest gives the page up).
//!
//! Preserving copies the page into a spare host frame (a zero page or a
//! ballooned one needs no frame, only a mark) and opens the page for
//! writes. [`VmMemory::snapshot_take`] hands each page's contents at the
//! snapshot's instant to the reader once: from the preserved copy if there
//! is one (and frees it), else from the page itself, which has not changed.
//!
//! The two per-page tables (a pending bit, a preserved word) are allocated
//! when the snapshot starts, so a guest writing everywhere makes the host
//! allocate frames (which it may refuse: the write then waits, see
//! [`Error::OutOfHostFrames`]) but never heap.
//!
//! Not at the same time as dirty logging: both own the write right.

use alloc::vec::Vec;

use super::{PageState, VmMemory, combine, filled_vec, read_frame, write_frame};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::error::Error;
use crate::hal::{ContiguousAlloc, FrameAlloc};
use crate::paging::{Access, EntryFormat, FlushScope, Invalidation, PageSize};
use crate::swap_hook::SlotWord;

/// `preserved[i]` of a page whose contents at the snapshot were all zeros.
const PRESERVED_ZERO: u64 = 1;

/// Counters of a running snapshot.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Debug)]
pub struct SnapshotStats {
    /// Pages not yet taken whose contents are still the page itself.
    pub pending: u64,
    /// Pages not yet taken whose contents wait in a preserved copy.
    pub preserved: u64,
    /// Of those, copies holding a host frame now.
    pub preserved_frames: u64,
    /// Copies made since the start (copy-on-write breaks).
    pub copies: u64,
    /// Pages taken by the reader.
    pub taken: u64,
}

/// What [`VmMemory::snapshot_take`] found.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Taken {
    /// The buffer holds the page's contents at the snapshot.
    Data,
    /// The page is poisoned: its contents are lost (a checkpoint records it
    /// as such, never as data).
    Poisoned,
}

pub(super) struct Snapshot {
    /// One bit per page index: not taken, and unchanged since the start.
    pending: Vec<u64>,
    /// One word per page index: 0, [`PRESERVED_ZERO`], or the frame holding
    /// the contents at the start.
    preserved: Vec<u64>,
    /// Leaves larger than 4 KiB when the snapshot started: `(gpa, size)`.
    split: Vec<(u64, PageSize)>,
    stats: SnapshotStats,
}

impl Snapshot {
    pub(super) fn is_pending(&self, i: usize) -> bool {
        self.pending.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn clear_pending(&mut self, i: usize) {
        if let Some(w) = self.pending.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
    }

    pub(super) fn bookkeeping_bytes(&self) -> u64 {
        (self.pending.capacity() * 8
            + self.preserved.capacity() * 8
            + self.split.capacity() * core::mem::size_of::<(u64, PageSize)>()) as u64
    }

    /// Frees every preserved copy.
    fn release<A: FrameAlloc>(&mut self, alloc: &mut A) {
        for w in &mut self.preserved {
            if *w > PRESERVED_ZERO {
                // SAFETY: a preserved copy is a frame this module allocated
                // and never mapped into any table; nothing else holds it.
                unsafe { alloc.free_frame(HostPhysAddr(*w)) };
            }
            *w = 0;
        }
        self.stats.preserved = 0;
        self.stats.preserved_frames = 0;
    }
}

impl<F: EntryFormat, S: SlotWord> VmMemory<F, S> {
    /// Begin a snapshot: every page's contents as of now are what
    /// [`Self::snapshot_take`] returns, whatever the guest or the host
    /// writes meanwhile. `flush` as for dirty logging. Refused while dirty
    /// logging or another snapshot runs.
    pub fn start_snapshot<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<(), Error> {
        if self.snapshot.is_some() {
            return Err(Error::SnapshotState { running: true });
        }
        if self.dirty.is_some() {
            return Err(Error::DirtyLogState { running: true });
        }
        let pages = self.states.len();
        let mut pending = filled_vec(pages.div_ceil(64), u64::MAX)?;
        if !pages.is_multiple_of(64)
            && let Some(last) = pending.last_mut()
        {
            *last = (1u64 << (pages % 64)) - 1;
        }
        let preserved = filled_vec(pages, 0u64)?;
        let mut inv = Invalidation::none();
        let split = match self.split_above(alloc, PageSize::Size4K, &mut inv) {
            Ok(s) => s,
            Err(e) => {
                inv.flush(alloc, &mut *flush);
                return Err(e);
            }
        };
        let stats = SnapshotStats { pending: pages as u64, ..SnapshotStats::default() };
        self.snapshot = Some(Snapshot { pending, preserved, split, stats });
        let ranges: Vec<(GuestPhysAddr, u64)> = self.map.ram_ranges().collect();
        for (gpa, size) in ranges {
            let range = gpa..GuestPhysAddr(gpa.0 + size);
            combine(&mut inv, self.primary.update_access(&*alloc, range, |_, _, a| a - Access::WRITE));
        }
        inv.flush(alloc, &mut *flush);
        Ok(())
    }

    /// The running snapshot's counters.
    pub fn snapshot_stats(&self) -> Option<SnapshotStats> {
        self.snapshot.as_ref().map(|s| s.stats)
    }

    /// Whether the 2 MiB region at `gpa` (aligned) was mapped by one large
    /// leaf (2 MiB, or part of a 1 GiB one) when the snapshot began.
    pub fn snapshot_was_large(&self, gpa: GuestPhysAddr) -> bool {
        let Some(s) = &self.snapshot else { return false };
        gpa.0.is_multiple_of(PAGE_SIZE_2M)
            && s.split.iter().any(|&(g, size)| size >= PageSize::Size2M && (g..g + size.bytes()).contains(&gpa.0))
    }

    /// Fill `buf` with the page at `gpa` as it was when the snapshot began;
    /// each page once. Swapped pages are brought in to be read (`hooks`,
    /// `flush` as for [`Self::read`]). The page is open for guest writes
    /// afterwards.
    pub fn snapshot_take<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut super::Hooks<'_, S>,
        gpa: GuestPhysAddr,
        buf: &mut [u8; 4096],
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<Taken, Error> {
        let i = self.index_of(gpa.0).ok_or(Error::NotGuestRam(gpa))?;
        let s = self.snapshot.as_mut().ok_or(Error::SnapshotState { running: false })?;
        match s.preserved[i] {
            0 => {}
            PRESERVED_ZERO => {
                s.preserved[i] = 0;
                s.stats.preserved -= 1;
                s.stats.taken += 1;
                buf.fill(0);
                return Ok(Taken::Data);
            }
            frame => {
                // SAFETY: a frame this module allocated for the copy; never
                // mapped, so nothing writes it; 4 KiB-aligned.
                unsafe { read_frame(alloc.phys_to_ptr(HostPhysAddr(frame)), buf) };
                // SAFETY: as above; the copy is dropped from the table here.
                unsafe { alloc.free_frame(HostPhysAddr(frame)) };
                s.preserved[i] = 0;
                s.stats.preserved -= 1;
                s.stats.preserved_frames -= 1;
                s.stats.taken += 1;
                return Ok(Taken::Data);
            }
        }
        if !s.is_pending(i) {
            return Err(Error::SnapshotTaken(gpa.align_down(PAGE_SIZE_4K)));
        }
        let taken = if self.state(i) == PageState::Poisoned {
            Taken::Poisoned
        } else {
            // Unchanged since the start: every change preserves first.
            self.read(alloc, hooks, gpa.align_down(PAGE_SIZE_4K), buf, flush)?;
            Taken::Data
        };
        let s = self.snapshot.as_mut().ok_or(Error::SnapshotState { running: false })?;
        s.clear_pending(i);
        s.stats.pending -= 1;
        s.stats.taken += 1;
        // Open it: the guest's next write to it need not fault.
        let mut inv = Invalidation::none();
        let synced = self.sync_page(alloc, i, &mut inv);
        inv.flush(alloc, &mut *flush);
        synced.map(|()| taken)
    }

    /// End the snapshot (taken or not): free the preserved copies, give
    /// write rights back and map large pages again where the start split
    /// them.
    pub fn stop_snapshot<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<SnapshotStats, Error> {
        let mut s = self.snapshot.take().ok_or(Error::SnapshotState { running: false })?;
        let stats = s.stats;
        s.release(alloc);
        let mut inv = Invalidation::none();
        let ranges: Vec<(GuestPhysAddr, u64)> = self.map.ram_ranges().collect();
        for (gpa, size) in ranges {
            self.open_for_writes(&*alloc, gpa.0, size, &mut inv);
        }
        self.remerge(&*alloc, &s.split, &mut inv);
        inv.flush(alloc, &mut *flush);
        Ok(stats)
    }

    /// Whether page `i` is pending in a running snapshot.
    pub(super) fn snapshot_pending(&self, i: usize) -> bool {
        self.snapshot.as_ref().is_some_and(|s| s.is_pending(i))
    }

    /// Page `i` is about to change: if the snapshot still needs its
    /// contents, copy them aside first. Fails, changing nothing, when the
    /// host has no frame for the copy or the contents are not in a frame
    /// (swapped, not loaded: bring the page in first).
    pub(super) fn snapshot_preserve<A: FrameAlloc>(&mut self, alloc: &mut A, i: usize) -> Result<(), Error> {
        if !self.snapshot_pending(i) {
            return Ok(());
        }
        let gpa = self.gpa_of(i);
        let word = match self.state(i) {
            PageState::Zero | PageState::Ballooned => PRESERVED_ZERO,
            // Lost either way; the reader records it as poisoned.
            PageState::Poisoned => return Ok(()),
            PageState::Present | PageState::Shared => {
                let from = self.mapped_hpa(i).ok_or(Error::NotGuestRam(gpa))?;
                let frame = alloc.alloc_frame().ok_or(Error::OutOfHostFrames)?;
                let mut page = [0u8; 4096];
                // SAFETY: `from` is the live frame the page's state names,
                // 4 KiB-aligned; read with volatile loads as guest memory is.
                unsafe { read_frame(alloc.phys_to_ptr(from), &mut page) };
                // SAFETY: a fresh frame, not mapped anywhere.
                unsafe { write_frame(alloc.phys_to_ptr(frame), &page) };
                frame.0
            }
            state @ (PageState::Swapped | PageState::NotLoaded) => {
                return Err(Error::WrongPageState { gpa, state });
            }
        };
        let Some(s) = self.snapshot.as_mut() else { return Ok(()) };
        s.preserved[i] = word;
        s.clear_pending(i);
        s.stats.pending -= 1;
        s.stats.preserved += 1;
        s.stats.copies += 1;
        if word > PRESERVED_ZERO {
            s.stats.preserved_frames += 1;
        }
        Ok(())
    }

    /// Frees a running snapshot's copies (the VM is being freed).
    pub(super) fn drop_snapshot<A: FrameAlloc>(&mut self, alloc: &mut A) {
        if let Some(mut s) = self.snapshot.take() {
            s.release(alloc);
        }
    }
}
