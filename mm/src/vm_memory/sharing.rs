//! Content-based page sharing across VMs (seed 000).
//!
//! A host-wide [`SharingIndex`] maps page-content hashes (xxh3-64, a fast
//! well-distributed non-cryptographic hash from the `xxhash-rust` crate) to
//! shared frames with reference counts. A scan ([`VmMemory::share_scan`])
//! walks a VM's pages under a page budget:
//! - a page of zeros is remapped read-only to the one zero frame;
//! - a page whose hash names a shared frame, and whose bytes equal it (always
//!   compared in full: a hash match is only a hint), is remapped read-only to
//!   it and its own frame goes back to the pool;
//! - a page whose hash matches a *hint* (another page seen earlier with that
//!   hash) is copied into a new shared frame and remapped to it; the hinted
//!   page joins when its VM is scanned next;
//! - otherwise the page leaves a hint.
//!
//! Hints live in a fixed-size direct-mapped table (one `u64` each: hash tag,
//! VM, page), so the index's memory is bounded whatever the guests hold; a
//! lost hint only delays sharing.
//!
//! Candidates are write-protected and the change flushed before they are
//! hashed and compared, so a guest cannot change a page between comparison
//! and remapping; a write after the remap faults and breaks the sharing
//! (copy-on-write, see `fault.rs`).
//!
//! Pages inside large mappings are only *analysed*: the scan counts how many
//! could be shared per 2 MiB region (an estimate of what breaking the large
//! page would free) without breaking it; [`VmMemory::break_cold_large_pages`]
//! breaks the regions that were not accessed since their scan when memory is
//! scarce, and shares their small pages.

use alloc::vec::Vec;
use core::fmt::Debug;

use crate::swap_hook::SlotWord;

use hashbrown::HashMap;

use super::state::Override;
use super::{Backing, PageState, VmMemory, combine, read_frame};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::error::Error;
use crate::hal::{ContiguousAlloc, FrameAlloc};
use crate::paging::{Access, EntryFormat, FlushScope, Invalidation, PageSize};

/// Default number of hint slots (8 bytes each: 512 KiB).
const DEFAULT_HINTS: usize = 1 << 16;

/// Candidates protected and flushed together.
const BATCH: usize = 512;

#[derive(Clone, Copy, Debug)]
struct SharedFrame {
    hash: u64,
    refs: u32,
    /// Hit by an uncorrectable error: never reused, never freed.
    poisoned: bool,
}

/// Counters of the index.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct SharingStats {
    /// Shared frames (not counting the zero frame).
    pub shared_frames: u64,
    /// Pages mapped to shared frames.
    pub shared_refs: u64,
    /// Pages mapped to the zero frame.
    pub zero_refs: u64,
    /// Frames saved: pages mapped to shared or zero frames minus the frames
    /// backing them.
    pub saved_frames: u64,
}

/// The host-wide sharing index. See the module documentation.
///
/// # Drop
///
/// Free it with [`Self::free`] after every VM using it; dropping it leaks
/// its frames (debug builds panic).
pub struct SharingIndex {
    zero: HostPhysAddr,
    zero_refs: u64,
    /// Content hash -> shared frame.
    by_hash: HashMap<u64, HostPhysAddr>,
    /// Shared frame -> its hash and references.
    frames: HashMap<HostPhysAddr, SharedFrame>,
    /// Direct-mapped hints: `tag:16 | vm:12 | page:36`, 0 = empty.
    hints: Vec<u64>,
}

impl SharingIndex {
    /// A new index with its zero frame and the default hint table.
    pub fn new<A: FrameAlloc>(alloc: &mut A) -> Result<Self, Error> {
        Self::with_hint_slots(alloc, DEFAULT_HINTS)
    }

    /// A new index with `slots` hint slots (rounded up to a power of two).
    pub fn with_hint_slots<A: FrameAlloc>(alloc: &mut A, slots: usize) -> Result<Self, Error> {
        let zero = alloc.alloc_frame().ok_or(Error::OutOfHostFrames)?;
        Ok(Self {
            zero,
            zero_refs: 0,
            by_hash: HashMap::new(),
            frames: HashMap::new(),
            hints: alloc::vec![0; slots.max(1).next_power_of_two()],
        })
    }

    /// The frame every zero page maps.
    pub fn zero_frame(&self) -> HostPhysAddr {
        self.zero
    }

    /// Counters.
    pub fn stats(&self) -> SharingStats {
        let shared_refs: u64 = self.frames.values().map(|f| u64::from(f.refs)).sum();
        let shared_frames = self.frames.len() as u64;
        SharingStats {
            shared_frames,
            shared_refs,
            zero_refs: self.zero_refs,
            saved_frames: (shared_refs + self.zero_refs).saturating_sub(shared_frames + 1),
        }
    }

    /// Heap bytes of the index.
    pub fn bookkeeping_bytes(&self) -> u64 {
        (self.by_hash.allocation_size() + self.frames.allocation_size() + self.hints.capacity() * 8) as u64
    }

    /// Room for one more shared frame in both maps, or `OutOfHeap`, so the
    /// inserts that follow cannot fail (a failed growth would panic).
    fn reserve_one(&mut self) -> Result<(), Error> {
        let bytes = || Error::OutOfHeap { bytes: 64 };
        self.by_hash.try_reserve(1).map_err(|_| bytes())?;
        self.frames.try_reserve(1).map_err(|_| bytes())
    }

    pub(super) fn refs(&self, frame: HostPhysAddr) -> u32 {
        self.frames.get(&frame).map_or(0, |f| f.refs)
    }

    /// Whether `frame` was hit by an uncorrectable error (see `quarantine`).
    pub(super) fn is_quarantined(&self, frame: HostPhysAddr) -> bool {
        self.frames.get(&frame).is_some_and(|f| f.poisoned)
    }

    /// Hand a frame with exactly one reference over to its user.
    pub(super) fn take_exclusive(&mut self, frame: HostPhysAddr) {
        if let Some(f) = self.frames.remove(&frame) {
            debug_assert_eq!(f.refs, 1);
            if self.by_hash.get(&f.hash) == Some(&frame) {
                self.by_hash.remove(&f.hash);
            }
        }
    }

    /// Drop one reference; the last one frees the frame. Callers make sure
    /// no vCPU can still reach the frame when this may be the last reference
    /// (the unmap was flushed).
    pub(super) fn release<A: FrameAlloc>(&mut self, alloc: &mut A, frame: HostPhysAddr) {
        let Some(f) = self.frames.get_mut(&frame) else {
            debug_assert!(false, "release of unknown shared frame {frame:?}");
            return;
        };
        f.refs -= 1;
        if f.refs == 0 {
            let (hash, poisoned) = (f.hash, f.poisoned);
            self.frames.remove(&frame);
            if self.by_hash.get(&hash) == Some(&frame) {
                self.by_hash.remove(&hash);
            }
            if poisoned {
                return; // quarantined for good
            }
            // SAFETY: shared frames come from `alloc_frame`; no page maps it
            // any more and the caller flushed the last unmap.
            unsafe { alloc.free_frame(frame) };
        }
    }

    /// A shared frame was hit by an uncorrectable error: no new page may
    /// share it, and it is never freed.
    pub(super) fn quarantine(&mut self, frame: HostPhysAddr) {
        if let Some(f) = self.frames.get_mut(&frame) {
            f.poisoned = true;
            let hash = f.hash;
            if self.by_hash.get(&hash) == Some(&frame) {
                self.by_hash.remove(&hash);
            }
        }
    }

    pub(super) fn release_zero(&mut self) {
        debug_assert!(self.zero_refs > 0);
        self.zero_refs = self.zero_refs.saturating_sub(1);
    }

    fn hint_slot(&self, hash: u64) -> usize {
        (hash as usize) & (self.hints.len() - 1)
    }

    /// The hint for `hash` as `(vm, page)`, if one with a matching tag is
    /// stored.
    fn hint(&self, hash: u64) -> Option<(u64, u64)> {
        let h = self.hints[self.hint_slot(hash)];
        (h != 0 && h >> 48 == hash >> 48).then_some(((h >> 36) & 0xFFF, h & ((1 << 36) - 1)))
    }

    fn set_hint(&mut self, hash: u64, vm: u32, page: u64) {
        let slot = self.hint_slot(hash);
        // 0 means "empty": a hash with a zero tag is not hinted (1 in 65536).
        let tag = hash >> 48;
        if tag == 0 {
            return;
        }
        self.hints[slot] = tag << 48 | (u64::from(vm) & 0xFFF) << 36 | (page & ((1 << 36) - 1));
    }

    /// Make `hash` name `frame` (tests: a forged hash collision).
    #[cfg(test)]
    pub(crate) fn forge_hash(&mut self, hash: u64, frame: HostPhysAddr) {
        self.by_hash.insert(hash, frame);
    }

    /// Give the zero frame and every shared frame back.
    ///
    /// # Safety
    ///
    /// Every VM that used the index has been freed (no table maps its frames).
    pub unsafe fn free<A: FrameAlloc>(mut self, alloc: &mut A) {
        debug_assert!(self.frames.is_empty() && self.zero_refs == 0, "sharing index freed while in use");
        for (frame, _) in self.frames.drain() {
            // SAFETY: from `alloc_frame`; the caller guarantees no mapping.
            unsafe { alloc.free_frame(frame) };
        }
        // SAFETY: as above.
        unsafe { alloc.free_frame(self.zero) };
        self.zero = HostPhysAddr(0);
    }
}

impl Drop for SharingIndex {
    fn drop(&mut self) {
        if self.zero != HostPhysAddr(0) {
            crate::leaked("a SharingIndex", 1 + self.frames.len());
        }
    }
}

impl Debug for SharingIndex {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SharingIndex").field("stats", &self.stats()).finish()
    }
}

/// What one scan did.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct ScanReport {
    /// Pages visited.
    pub scanned: u64,
    /// Small-mapped private pages hashed.
    pub hashed: u64,
    /// Pages remapped to the zero frame.
    pub zero_merged: u64,
    /// Pages remapped to a shared frame.
    pub shared_merged: u64,
    /// New shared frames created from a hint match.
    pub promoted: u64,
    /// Hints left.
    pub hints_added: u64,
    /// Pages already zero or shared.
    pub already_shared: u64,
    /// Pages not scanned (ballooned, swapped, poisoned, not loaded).
    pub skipped: u64,
    /// Pages inside large mappings that could be shared if it were broken.
    pub large_opportunities: u64,
    /// Large pages broken to share their small pages.
    pub large_broken: u64,
    /// Host frames given back to the pool.
    pub frames_freed: u64,
    /// Shares given up because the host had no frame for a new shared copy.
    pub out_of_memory: u64,
}

/// Totals over several scans (VMs, rounds).
impl core::ops::AddAssign for ScanReport {
    fn add_assign(&mut self, b: Self) {
        self.scanned += b.scanned;
        self.hashed += b.hashed;
        self.zero_merged += b.zero_merged;
        self.shared_merged += b.shared_merged;
        self.promoted += b.promoted;
        self.hints_added += b.hints_added;
        self.already_shared += b.already_shared;
        self.skipped += b.skipped;
        self.large_opportunities += b.large_opportunities;
        self.large_broken += b.large_broken;
        self.frames_freed += b.frames_freed;
        self.out_of_memory += b.out_of_memory;
    }
}

/// Sharing opportunities inside large pages, from the scans so far.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct LargePageSharing {
    /// 2 MiB regions mapped large with at least one shareable small page.
    pub regions: u64,
    /// Shareable small pages in them.
    pub pages: u64,
    /// Host memory breaking all of them and sharing would free.
    pub bytes: u64,
}

/// A VM's scan position and large-page findings.
pub(super) struct ScanState {
    cursor: usize,
    /// Per 2 MiB region of guest-physical space: shareable small pages the
    /// last pass found inside its large mapping (0: none, or not large).
    large: Vec<u16>,
}

impl ScanState {
    /// For a VM whose RAM ends below `regions` 2 MiB regions.
    pub(super) fn new(regions: usize) -> Result<Self, Error> {
        Ok(Self { cursor: 0, large: super::filled_vec(regions, 0)? })
    }

    pub(super) fn bookkeeping_bytes(&self) -> u64 {
        (self.large.capacity() * 2) as u64
    }

    fn forget(&mut self, region: u32) {
        if let Some(c) = self.large.get_mut(region as usize) {
            *c = 0;
        }
    }

    /// `(region, opportunities)` of the regions with any.
    fn regions(&self) -> impl Iterator<Item = (u32, u16)> + '_ {
        self.large.iter().enumerate().filter(|&(_, &c)| c != 0).map(|(r, &c)| (r as u32, c))
    }
}

/// Whether a page is all zeros (a fast OR-reduction the compiler vectorises,
/// after a quick look at the first line, which decides most non-zero pages).
fn is_zero(page: &[u8; 4096]) -> bool {
    page[..64].iter().all(|&b| b == 0) && page.iter().fold(0u8, |a, &b| a | b) == 0
}

/// What a candidate will be merged into.
#[derive(Clone, Copy)]
enum Target {
    Zero,
    Shared(HostPhysAddr),
}

impl<F: EntryFormat, S: SlotWord> VmMemory<F, S> {
    /// Scan up to `max_pages` pages (from where the last scan stopped,
    /// wrapping around) and share what can be shared. Frees frames only
    /// after flushing through `flush`.
    pub fn share_scan<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        index: &mut SharingIndex,
        max_pages: usize,
        flush: &mut dyn FnMut(FlushScope),
    ) -> ScanReport {
        let mut report = ScanReport::default();
        let n = self.states.len();
        if n == 0 {
            return report;
        }
        let mut batch = Vec::with_capacity(BATCH.min(max_pages));
        let mut buf = [0u8; 4096];
        for _ in 0..max_pages.min(n) {
            let i = self.share.cursor;
            self.share.cursor = (i + 1) % n;
            report.scanned += 1;
            match self.state(i) {
                PageState::Zero | PageState::Shared => report.already_shared += 1,
                PageState::Present => {
                    let gpa = self.gpa_of(i);
                    match self.primary.translate(&*alloc, gpa) {
                        Some(t) if t.leaf.size == PageSize::Size4K => batch.push(i),
                        Some(_) => self.analyse_in_large(alloc, index, i, &mut buf, &mut report),
                        None => report.skipped += 1,
                    }
                }
                _ => report.skipped += 1,
            }
            if batch.len() == BATCH {
                self.share_batch(alloc, index, &batch, &mut report, flush);
                batch.clear();
            }
        }
        if !batch.is_empty() {
            self.share_batch(alloc, index, &batch, &mut report, flush);
        }
        report
    }

    /// Count whether small page `i`, inside a large mapping, could be shared.
    fn analyse_in_large<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        index: &mut SharingIndex,
        i: usize,
        buf: &mut [u8; 4096],
        report: &mut ScanReport,
    ) {
        let gpa = self.gpa_of(i);
        let region = (gpa.0 / PAGE_SIZE_2M) as u32;
        if gpa.is_aligned(PAGE_SIZE_2M) {
            // A new pass over this region: forget the old count, and start
            // watching its accessed bit (cold = not accessed since the scan).
            self.share.forget(region);
            let range = gpa..GuestPhysAddr(gpa.0 + PAGE_SIZE_2M);
            let inv = self.primary.test_and_clear_accessed(&*alloc, range, |_, _| {});
            // Clearing accessed bits needs no immediate flush: a cached
            // translation only hides accesses, making the region look cold
            // until the next TLB flush; break_cold_large_pages flushes before
            // it trusts the bit.
            inv.flush(alloc, |_| {});
        }
        let Some(frame) = self.own_frame(i) else { return };
        // SAFETY: the page's live frame, 4 KiB-aligned; the guest may write
        // it concurrently, hence the volatile copy (it is only an estimate).
        unsafe { read_frame(alloc.phys_to_ptr(frame), buf) };
        let opportunity = if is_zero(buf) {
            true
        } else {
            let hash = xxhash_rust::xxh3::xxh3_64(buf);
            let page = gpa.0 / PAGE_SIZE_4K;
            let shared = index.by_hash.get(&hash).is_some_and(|&f| {
                // SAFETY: a live shared frame (read-only to all guests).
                let content = unsafe { &*alloc.phys_to_ptr(f).cast::<[u8; 4096]>() };
                content == buf
            });
            match index.hint(hash) {
                _ if shared => true,
                Some((vm, p)) if (vm, p) != (u64::from(self.config.id) & 0xFFF, page) => true,
                Some(_) => false,
                None => {
                    index.set_hint(hash, self.config.id, page);
                    report.hints_added += 1;
                    false
                }
            }
        };
        if opportunity && let Some(c) = self.share.large.get_mut(region as usize) {
            *c = c.saturating_add(1);
            report.large_opportunities += 1;
        }
    }

    /// Share what can be shared among the small-mapped `Present` pages
    /// `batch`.
    fn share_batch<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        index: &mut SharingIndex,
        batch: &[usize],
        report: &mut ScanReport,
        flush: &mut dyn FnMut(FlushScope),
    ) {
        // 1. Write-protect the candidates and flush, so their contents stay
        //    put while they are compared and remapped.
        let mut inv = Invalidation::none();
        for &i in batch {
            let gpa = self.gpa_of(i);
            let range = gpa..GuestPhysAddr(gpa.0 + PAGE_SIZE_4K);
            combine(&mut inv, self.primary.update_access(&*alloc, range.clone(), |_, _, a| a - Access::WRITE));
            if let Some(view) = &mut self.view {
                combine(&mut inv, view.update_access(&*alloc, range, |_, _, a| a - Access::WRITE));
            }
        }
        inv.flush(alloc, &mut *flush);

        // 2. Decide.
        let mut merges: Vec<(usize, Target)> = Vec::new();
        let mut promoted: Vec<HostPhysAddr> = Vec::new();
        for &i in batch {
            report.hashed += 1;
            let Some(frame) = self.own_frame(i) else { continue };
            // SAFETY: the page's live private frame, 4 KiB-aligned. No vCPU
            // can write it (read-only in every table, flushed above) and the
            // host does not while `self` is borrowed mutably, so nothing
            // changes it while the reference lives. (Device DMA into guest
            // RAM would have to be excluded the same way; this hypervisor's
            // emulated devices write through `VmMemory::write`.)
            let page = unsafe { &*alloc.phys_to_ptr(frame).cast::<[u8; 4096]>() };
            if is_zero(page) {
                merges.push((i, Target::Zero));
                continue;
            }
            let hash = xxhash_rust::xxh3::xxh3_64(page);
            if let Some(&shared) = index.by_hash.get(&hash) {
                // SAFETY: a live shared frame, read-only to every guest.
                let content = unsafe { &*alloc.phys_to_ptr(shared).cast::<[u8; 4096]>() };
                // Compare in full: equal hashes are not equal pages.
                if content == page {
                    merges.push((i, Target::Shared(shared)));
                }
                continue;
            }
            let gpa_page = self.gpa_of(i).0 / PAGE_SIZE_4K;
            match index.hint(hash) {
                Some((vm, p)) if (vm, p) != (u64::from(self.config.id) & 0xFFF, gpa_page) => {
                    // The index grows with the pages guests make identical:
                    // without heap room the page just stays private.
                    if index.reserve_one().is_err() {
                        report.out_of_memory += 1;
                        continue;
                    }
                    let Some(copy) = alloc.alloc_frame() else {
                        report.out_of_memory += 1;
                        continue;
                    };
                    // SAFETY: a fresh frame, not mapped anywhere; `page` is
                    // stable (see above); no overlap.
                    unsafe { core::ptr::copy_nonoverlapping(page.as_ptr(), alloc.phys_to_ptr(copy), 4096) };
                    index.by_hash.insert(hash, copy);
                    index.frames.insert(copy, SharedFrame { hash, refs: 0, poisoned: false });
                    report.promoted += 1;
                    promoted.push(copy);
                    merges.push((i, Target::Shared(copy)));
                }
                Some(_) => {}
                None => {
                    index.set_hint(hash, self.config.id, gpa_page);
                    report.hints_added += 1;
                }
            }
        }

        // 3. Remap the merged pages read-only to their targets; give the
        //    others their rights back.
        let mut inv = Invalidation::none();
        let mut freed: Vec<(GuestPhysAddr, Backing<S>)> = Vec::with_capacity(merges.len());
        let mut merged = alloc::vec![false; batch.len()];
        let mut m = 0;
        for (k, &i) in batch.iter().enumerate() {
            if m < merges.len() && merges[m].0 == i {
                let target = merges[m].1;
                m += 1;
                let backing = self.backing(i);
                let ok = match target {
                    Target::Zero => {
                        self.zero_frame = Some(index.zero);
                        self.transition(alloc, i, PageState::Zero, false, None, &mut inv).is_ok()
                    }
                    Target::Shared(f) => {
                        self.transition(alloc, i, PageState::Shared, false, Some(Override::Frame(f)), &mut inv).is_ok()
                    }
                };
                if ok {
                    match target {
                        Target::Zero => {
                            index.zero_refs += 1;
                            report.zero_merged += 1;
                        }
                        Target::Shared(f) => {
                            if let Some(sf) = index.frames.get_mut(&f) {
                                sf.refs += 1;
                            }
                            report.shared_merged += 1;
                        }
                    }
                    freed.push((self.gpa_of(i), backing));
                    merged[k] = true;
                    continue;
                }
            }
            let _ = self.sync_page(alloc, i, &mut inv);
        }
        debug_assert!(merged.iter().filter(|&&b| b).count() == freed.len());
        // A promoted copy whose merge failed has no reference: drop it (it
        // was never mapped).
        for h in promoted {
            if index.refs(h) == 0 {
                if let Some(f) = index.frames.remove(&h) {
                    index.by_hash.remove(&f.hash);
                }
                // SAFETY: allocated by this batch and never mapped.
                unsafe { alloc.free_frame(h) };
            }
        }

        // 4. Flush, then give the old frames back.
        inv.flush(alloc, &mut *flush);
        let mut hooks = super::Hooks::none();
        for (gpa, backing) in freed {
            if matches!(backing, Backing::Original | Backing::Frame(_)) {
                report.frames_freed += 1;
            }
            // SAFETY: the page maps its shared target now and the remap was
            // flushed: nothing reaches the old frame.
            unsafe { self.release_backing(alloc, &mut hooks, gpa, backing) };
        }
    }

    /// What breaking the large pages with sharing opportunities would free,
    /// per the scans so far.
    pub fn large_page_sharing(&self) -> LargePageSharing {
        let (regions, pages) = self.share.regions().fold((0, 0), |(r, p), (_, c)| (r + 1, p + u64::from(c)));
        LargePageSharing { regions, pages, bytes: pages * PAGE_SIZE_4K }
    }

    /// When memory is scarce: break up to `max_regions` large pages with
    /// sharing opportunities that were not accessed since the scan found
    /// them (most opportunities first), and share their small pages.
    /// Accessed ones are left mapped large.
    pub fn break_cold_large_pages<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        index: &mut SharingIndex,
        max_regions: usize,
        flush: &mut dyn FnMut(FlushScope),
    ) -> ScanReport {
        let mut report = ScanReport::default();
        let mut regions: Vec<(u32, u16)> = self.share.regions().collect();
        regions.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        // Make accessed bits trustworthy: a cached translation hides
        // accesses until flushed.
        flush(FlushScope::All);
        let mut broken = 0;
        for (r, _) in regions {
            if broken == max_regions {
                break;
            }
            let gpa = GuestPhysAddr(u64::from(r) * PAGE_SIZE_2M);
            let Some(t) = self.primary.translate(&*alloc, gpa) else {
                self.share.forget(r);
                continue;
            };
            if t.leaf.size == PageSize::Size4K {
                // Broken meanwhile (by sampling, swap-out, ...): a normal
                // scan shares it.
                self.share.forget(r);
                continue;
            }
            if t.leaf.accessed {
                continue; // hot: keep it large
            }
            let mut inv = Invalidation::none();
            // A 1 GiB leaf splits to 2 MiB first, then this region to 4 KiB.
            let res = self.split_to_4k(alloc, gpa, &mut inv);
            inv.flush(alloc, &mut *flush);
            if res.is_err() {
                break;
            }
            self.share.forget(r);
            broken += 1;
            report.large_broken += 1;
            let first = self.index_of(gpa.0);
            let batch: Vec<usize> = match first {
                Some(first) => (first..first + 512)
                    .filter(|&i| i < self.states.len() && self.state(i) == PageState::Present)
                    .collect(),
                None => Vec::new(),
            };
            report.scanned += batch.len() as u64;
            self.share_batch(alloc, index, &batch, &mut report, flush);
        }
        report
    }
}
