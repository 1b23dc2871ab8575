//! The per-VM memory object: a VM's RAM, its nested page table(s), and the
//! state of every guest page.
//!
//! ```text
//! VmMemory<F, S>
//!   map          MemoryMap: RAM ranges and named MMIO holes
//!   ram          GuestRam: the chunks allocated with the VM (1 GiB/2 MiB/4 KiB)
//!   primary      NestedPageTable<F>: what every vCPU uses
//!   view         NestedPageTable<F>: write-protected copy for the traced
//!                vCPUs while dirty logging runs on a subset of them
//!   states       one byte per 4 KiB page (PageState + "frame replaced" bit)
//!   words        one word per 4 KiB page: the frame or swap slot backing it
//!                when that is not its original chunk frame
//! ```
//!
//! Every per-page and per-region table is allocated, fallibly, when the VM
//! is created and never grows: nothing a guest does makes the manager
//! allocate from the host heap (a full heap would otherwise be a host
//! panic).
//!
//! Submodules add the subsystems: `fault` (the nested-page-fault entry point,
//! copy-on-write, page-in, lazy load), `dirty` (dirty logging), `sample`
//! (access sampling, large-page ranking, usage classes), `sharing` (the
//! host-wide content index), `balloon`, `swapout` (swap-out, poison, lazy
//! marking).
//!
//! Invariants every operation keeps:
//! - A page is mapped exactly when its state is `Present`, `Zero` or
//!   `Shared`, to the frame the state names; `Zero`/`Shared` read-only.
//! - A large (2 MiB/1 GiB) leaf only covers `Present` pages with their
//!   original, contiguous frames and uniform rights; any page changing state
//!   first splits the large leaf around it.
//! - A frame is freed only after the unmap that hid it from the guest has
//!   been flushed (the caller's `flush` callback), so no vCPU can reach a
//!   frame after it went back to the pool.

mod balloon;
mod dirty;
mod fault;
mod map;
mod sample;
mod sharing;
mod snapshot;
mod state;
mod swapout;

use alloc::vec::Vec;
use core::fmt::Debug;
use core::marker::PhantomData;

pub use balloon::BalloonReport;
pub use dirty::{DirtyBitmap, DirtyLogConfig, DirtyMechanism, VcpuSet};
pub use fault::{AccessKind, FaultOutcome, PageSource};
pub use map::{Lookup, MemoryMap, MmioId, Region, RegionKind};
pub use sample::{RankedRegion, SampledRegion, UsageEstimate};
pub use sharing::{LargePageSharing, ScanReport, SharingIndex, SharingStats};
pub use snapshot::{SnapshotStats, Taken};
pub use state::{PageState, StateCounts};

use self::state::{Override, REPLACED};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::error::Error;
use crate::guest_ram::{GuestRam, MemoryReport};
use crate::hal::{ContiguousAlloc, FrameAlloc, PhysMem};
use crate::paging::{Access, EntryFormat, FlushScope, Invalidation, MemType, NestedPageTable, PageSize};
use crate::swap_hook::{PageStore, SlotWord};

/// How a VM's memory is set up.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct VmMemoryConfig {
    /// The VM's id in the host-wide sharing index (unique among live VMs).
    pub id: u32,
    /// Number of vCPUs (at most 64), so a dirty-log vCPU set can tell
    /// "all" from "some".
    pub vcpus: usize,
    /// Largest leaf the CPU supports (see `NestedPageTable::set_max_page_size`).
    pub max_page_size: PageSize,
}

impl VmMemoryConfig {
    /// VM `id` with `vcpus` vCPUs and up to 1 GiB pages.
    pub fn new(id: u32, vcpus: usize) -> Self {
        Self { id, vcpus, max_page_size: PageSize::Size1G }
    }
}

/// The host-side services some operations need, supplied per call because
/// they are shared between VMs (sharing index, swap store) or belong to a
/// transient activity (the page source of a lazy restore). `S` is the swap
/// store's slot type.
pub struct Hooks<'a, S> {
    /// The host-wide sharing index (needed by anything that touches a
    /// `Zero` or `Shared` page).
    pub sharing: Option<&'a mut SharingIndex>,
    /// The swap store (page-in; releasing slots of pages that go away).
    pub store: Option<&'a mut dyn PageStore<Slot = S>>,
    /// Where `NotLoaded` pages come from.
    pub source: Option<&'a mut dyn PageSource>,
}

impl<S> Default for Hooks<'_, S> {
    fn default() -> Self {
        Self { sharing: None, store: None, source: None }
    }
}

impl<'a, S> Hooks<'a, S> {
    /// No hooks.
    pub fn none() -> Self {
        Self::default()
    }

    /// Only the sharing index.
    pub fn sharing(index: &'a mut SharingIndex) -> Self {
        Self { sharing: Some(index), ..Self::default() }
    }
}

impl<S> Debug for Hooks<'_, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Hooks")
            .field("sharing", &self.sharing.is_some())
            .field("store", &self.store.is_some())
            .field("source", &self.source.is_some())
            .finish()
    }
}

/// A RAM range of the map and where its pages start in the state table.
#[derive(Clone, Copy, Debug)]
struct RamRange {
    gpa: u64,
    pages: u64,
    first: usize,
}

/// What freeing a VM left behind.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct FreeReport {
    /// Frames of poisoned pages, deliberately never returned to the pool.
    pub quarantined_frames: u64,
    /// Shared references and swap slots that could not be released because
    /// the hook was missing (a caller bug: they leak).
    pub leaked_references: u64,
}

/// A VM's memory. See the module documentation.
///
/// `S` is the slot type of the swap store the VM pages out to (defaults to
/// `u64`, the slot of [`MemStore`](crate::swap_hook::MemStore)).
///
/// # Drop
///
/// Free it with [`Self::free`]; dropping it leaks its frames (and its
/// `GuestRam` and tables panic in debug builds).
pub struct VmMemory<F: EntryFormat, S: SlotWord = u64> {
    config: VmMemoryConfig,
    map: MemoryMap,
    ram: GuestRam,
    primary: NestedPageTable<F>,
    view: Option<NestedPageTable<F>>,
    ranges: Vec<RamRange>,
    /// One byte per page: `PageState` code | `REPLACED`.
    states: Vec<u8>,
    /// One word per page: the `Override` its state byte says it has (a
    /// frame address or a packed slot), else 0.
    words: Vec<u64>,
    /// The slot type `words` packs (see [`SlotWord`]).
    slot: PhantomData<S>,
    counts: StateCounts,
    /// The sharing index's zero frame, once a page maps it.
    zero_frame: Option<HostPhysAddr>,
    /// One past the highest RAM address.
    ram_end: u64,
    dirty: Option<dirty::DirtyLog>,
    /// A copy-on-write snapshot being read out (live checkpoint).
    snapshot: Option<snapshot::Snapshot>,
    sampling: Option<Vec<u64>>,
    usage: Option<sample::UsageSample>,
    /// Per 2 MiB region of `[0, ram_end)`: decayed accessed-bit count of
    /// its 4 KiB pages (large-page ranking).
    heat: Vec<u16>,
    share: sharing::ScanState,
    balloon_target: u64,
    roots_generation: u64,
    /// Guest-physical ranges `[start, end)` of RAM the guest may read and
    /// execute but not write: the firmware's ROM (see
    /// [`Self::set_read_only`]). A handful at most, so a list.
    read_only: Vec<(u64, u64)>,
}

impl<F: EntryFormat, S: SlotWord> VmMemory<F, S> {
    /// Allocate the RAM of `map` (largest host chunks first), build the
    /// nested page table mapping it with the largest pages alignment allows,
    /// and mark every page `Present`. On error nothing stays allocated.
    pub fn new<A: ContiguousAlloc>(alloc: &mut A, map: MemoryMap, config: VmMemoryConfig) -> Result<Self, Error> {
        if config.vcpus == 0 || config.vcpus > 64 {
            return Err(Error::InvalidVcpu(config.vcpus));
        }
        let regions: Vec<(GuestPhysAddr, u64)> = map.ram_ranges().collect();
        let mut ranges = Vec::with_capacity(regions.len());
        let mut pages = 0usize;
        for &(gpa, size) in &regions {
            ranges.push(RamRange { gpa: gpa.0, pages: size / PAGE_SIZE_4K, first: pages });
            pages += (size / PAGE_SIZE_4K) as usize;
        }
        if u32::try_from(pages).is_err() {
            return Err(Error::InvalidMemoryMap { gpa: GuestPhysAddr(0), size: map.ram_bytes() });
        }
        let ram_end = regions.last().map_or(0, |&(g, s)| g.0 + s);
        // The tables first: without room for them the VM is refused before
        // any frame is taken.
        let regions_2m = ram_end.div_ceil(PAGE_SIZE_2M) as usize;
        let states = filled_vec(pages, PageState::Present.code())?;
        let words = filled_vec(pages, 0u64)?;
        let heat = filled_vec(regions_2m, 0u16)?;
        let share = sharing::ScanState::new(regions_2m)?;
        let ram = GuestRam::with_regions(alloc, &regions)?;
        let mut primary = match NestedPageTable::<F>::new(alloc) {
            Ok(t) => t,
            Err(e) => {
                // SAFETY: nothing maps the RAM yet.
                unsafe { ram.free(alloc) };
                return Err(e);
            }
        };
        primary.set_max_page_size(config.max_page_size);
        let (inv, result) = ram.map_into(&mut primary, alloc);
        // The table is not in use by any CPU yet: nothing to invalidate.
        inv.flush(alloc, |_| {});
        if let Err(e) = result {
            primary.destroy().flush(alloc, |_| {});
            // SAFETY: the table mapping it was just destroyed and never used.
            unsafe { ram.free(alloc) };
            return Err(e);
        }
        let counts = StateCounts { present: pages as u64, ..StateCounts::default() };
        Ok(Self {
            config,
            map,
            ram,
            primary,
            view: None,
            ranges,
            states,
            words,
            slot: PhantomData,
            counts,
            zero_frame: None,
            ram_end,
            dirty: None,
            snapshot: None,
            sampling: None,
            usage: None,
            heat,
            share,
            balloon_target: 0,
            roots_generation: 0,
            read_only: Vec::new(),
        })
    }

    /// Make `[gpa, gpa + len)` of RAM read-only to the guest, as a ROM is: it
    /// keeps its contents (written by the host beforehand) and its state
    /// machinery (sharing, swap), but no nested mapping ever grants it write
    /// rights, and a guest write faults with
    /// [`FaultOutcome::ReadOnly`](fault::FaultOutcome::ReadOnly). Host
    /// writes ([`Self::write`]) still reach it. Fails, changing nothing, if
    /// the range is not 4 KiB-aligned RAM.
    pub fn set_read_only<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        gpa: GuestPhysAddr,
        len: u64,
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<(), Error> {
        let bad = Error::InvalidMemoryMap { gpa, size: len };
        if len == 0 || !gpa.is_aligned(PAGE_SIZE_4K) || !len.is_multiple_of(PAGE_SIZE_4K) {
            return Err(bad);
        }
        self.check_ram(gpa, len)?;
        self.read_only.try_reserve(1).map_err(|_| Error::OutOfHeap { bytes: 16 })?;
        self.read_only.push((gpa.0, gpa.0 + len));
        let mut inv = Invalidation::none();
        let mut result = Ok(());
        for page in (gpa.0..gpa.0 + len).step_by(PAGE_SIZE_4K as usize) {
            if let Some(i) = self.index_of(page)
                && let Err(e) = self.sync_page(alloc, i, &mut inv)
            {
                result = Err(e);
                break;
            }
        }
        if result.is_err() {
            // Out of table frames while splitting: back to writable RAM.
            self.read_only.pop();
            for page in (gpa.0..gpa.0 + len).step_by(PAGE_SIZE_4K as usize) {
                if let Some(i) = self.index_of(page) {
                    let _ = self.sync_page(alloc, i, &mut inv);
                }
            }
        }
        inv.flush(alloc, flush);
        result
    }

    /// Whether the guest may not write the page holding `gpa` (ROM).
    pub fn is_read_only(&self, gpa: GuestPhysAddr) -> bool {
        self.read_only.iter().any(|&(s, e)| (s..e).contains(&gpa.0))
    }

    /// Whether any page of `[start, end)` is read-only.
    pub fn any_read_only(&self, start: u64, end: u64) -> bool {
        self.read_only.iter().any(|&(s, e)| s < end && start < e)
    }

    /// Heap bytes [`Self::new`] takes for the per-page and per-region
    /// tables of a VM with `map` (all of them are allocated then, none
    /// later), so a caller can check for room before creating the VM.
    pub fn table_bytes(map: &MemoryMap) -> u64 {
        let pages = map.ram_bytes() / PAGE_SIZE_4K;
        let end = map.ram_ranges().last().map_or(0, |(g, s)| g.0 + s);
        // A state byte and a word per page; heat and sharing counters per
        // 2 MiB region.
        pages * 9 + end.div_ceil(PAGE_SIZE_2M) * 4
    }

    /// The VM's id (sharing index).
    pub fn id(&self) -> u32 {
        self.config.id
    }

    /// The memory map.
    pub fn map(&self) -> &MemoryMap {
        &self.map
    }

    /// The RAM chunks allocated with the VM (some of their frames may have
    /// been given back since: see [`Self::page_state`]).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The nested page table every vCPU uses unless dirty logging gives it
    /// a view (see [`Self::root_for_vcpu`]).
    pub fn table(&self) -> &NestedPageTable<F> {
        &self.primary
    }

    /// Number of 4 KiB pages of RAM.
    pub fn pages(&self) -> u64 {
        self.states.len() as u64
    }

    /// The root (EPTP / nCR3 address) vCPU `vcpu` must run on. Changes when
    /// dirty logging on a subset of vCPUs starts or stops; compare
    /// [`Self::roots_generation`] to know when to reload.
    pub fn root_for_vcpu(&self, vcpu: usize) -> HostPhysAddr {
        match (&self.view, &self.dirty) {
            (Some(view), Some(log)) if log.config.vcpus.contains(vcpu) => view.root(),
            _ => self.primary.root(),
        }
    }

    /// Whether the guest accessed the page at `gpa` since the last call,
    /// from the accessed bit of the nested leaf mapping it (in every table;
    /// cleared by this call): the size of that leaf if so. A large leaf
    /// answers, and is cleared, for all of its pages. `None` for unmapped
    /// pages. For second-chance reclaim: flush the token before relying on
    /// the next answer, since a cached translation lets the guest access
    /// the page without setting the bit.
    pub fn test_and_clear_accessed<M: PhysMem>(
        &mut self,
        mem: &M,
        gpa: GuestPhysAddr,
    ) -> (Option<PageSize>, Invalidation<F>) {
        let page = gpa.align_down(PAGE_SIZE_4K);
        let range = page..GuestPhysAddr(page.0 + PAGE_SIZE_4K);
        let mut accessed = None;
        let mut inv = self.primary.test_and_clear_accessed(mem, range.clone(), |_, size| accessed = Some(size));
        if let Some(view) = self.view.as_mut() {
            combine(&mut inv, view.test_and_clear_accessed(mem, range, |_, size| accessed = Some(size)));
        }
        (accessed, inv)
    }

    /// Bumped whenever some vCPU's root changes.
    pub fn roots_generation(&self) -> u64 {
        self.roots_generation
    }

    /// The state of the page containing `gpa`, or `None` outside RAM.
    pub fn page_state(&self, gpa: GuestPhysAddr) -> Option<PageState> {
        self.index_of(gpa.0).map(|i| self.state(i))
    }

    /// The guest pages whose contents live in the 4 KiB host frame holding
    /// `hpa`: the page that owns it (or is waiting to be loaded into it), or
    /// every page of this VM sharing it, the zero frame included. For a host
    /// machine check, which names a physical address: a scan of the state
    /// table, as such errors are rare.
    pub fn pages_in_frame(&self, hpa: HostPhysAddr) -> Vec<GuestPhysAddr> {
        let frame = Some(HostPhysAddr(hpa.0 & !(PAGE_SIZE_4K - 1)));
        (0..self.states.len()).filter(|&i| self.contents_frame(i) == frame).map(|i| self.gpa_of(i)).collect()
    }

    /// The host frame holding the contents of the page at `gpa`: its own,
    /// a shared one or the zero frame; `None` for a page that has none
    /// (swapped, ballooned, poisoned) or outside RAM.
    pub fn page_frame(&self, gpa: GuestPhysAddr) -> Option<HostPhysAddr> {
        self.index_of(gpa.0).and_then(|i| self.contents_frame(i))
    }

    fn contents_frame(&self, i: usize) -> Option<HostPhysAddr> {
        match self.state(i) {
            PageState::Present | PageState::NotLoaded => self.own_frame(i),
            PageState::Zero => self.zero_frame,
            PageState::Shared => self.override_frame(i),
            _ => None,
        }
    }

    /// How many pages are in each state (kept up to date, O(1)).
    pub fn state_counts(&self) -> StateCounts {
        self.counts
    }

    /// `(gpa, state)` of every page, in address order (for migration,
    /// checkpoint and FT).
    pub fn page_states(&self) -> impl Iterator<Item = (GuestPhysAddr, PageState)> + '_ {
        self.ranges.iter().flat_map(move |r| {
            (0..r.pages).map(move |p| {
                (GuestPhysAddr(r.gpa + p * PAGE_SIZE_4K), PageState::from_code(self.states[r.first + p as usize]))
            })
        })
    }

    /// Heap bytes the manager itself uses for this VM: state table,
    /// overrides, dirty bitmaps, sampling and sharing bookkeeping, the maps.
    /// Page-table frames are separate (see [`Self::memory_report`]).
    pub fn bookkeeping_bytes(&self) -> u64 {
        let mut bytes = self.states.capacity() as u64
            + (self.words.capacity() * 8) as u64
            + (self.ranges.capacity() * core::mem::size_of::<RamRange>()) as u64
            + (self.heat.capacity() * 2) as u64
            + self.map.bookkeeping_bytes()
            + self.ram.bookkeeping_bytes()
            + self.share.bookkeeping_bytes();
        if let Some(log) = &self.dirty {
            bytes += log.bookkeeping_bytes();
        }
        if let Some(s) = &self.snapshot {
            bytes += s.bookkeeping_bytes();
        }
        if let Some(s) = &self.sampling {
            bytes += (s.capacity() * 8) as u64;
        }
        if let Some(u) = &self.usage {
            bytes += u.bookkeeping_bytes();
        }
        bytes
    }

    /// Host memory this VM costs: resident guest frames it owns, page-table
    /// frames (both tables), and bookkeeping.
    pub fn memory_report(&self) -> MemoryReport {
        let tables = self.primary.table_frames() + self.view.as_ref().map_or(0, NestedPageTable::table_frames);
        MemoryReport {
            ram_bytes: self.counts.present * PAGE_SIZE_4K,
            page_table_bytes: tables as u64 * PAGE_SIZE_4K,
            bookkeeping_bytes: self.bookkeeping_bytes(),
        }
    }

    /// Copy guest memory at `gpa` into `buf` without changing any page:
    /// fails with `WrongPageState` on a swapped or not-loaded page (use
    /// [`Self::read`] to bring it in) and `PagePoisoned` on a poisoned one;
    /// ballooned pages read as zeros. For migration and checkpoint, which
    /// must not fault pages in.
    pub fn peek<M: PhysMem>(&self, mem: &M, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), Error> {
        self.check_ram(gpa, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let cur = gpa.0 + done as u64;
            let i = self.index_of(cur).ok_or(Error::NotGuestRam(GuestPhysAddr(cur)))?;
            let off = (cur % PAGE_SIZE_4K) as usize;
            let n = (PAGE_SIZE_4K as usize - off).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.state(i) {
                PageState::Ballooned => out.fill(0),
                PageState::Poisoned => return Err(Error::PagePoisoned(GuestPhysAddr(cur))),
                s @ (PageState::Swapped | PageState::NotLoaded) => {
                    return Err(Error::WrongPageState { gpa: GuestPhysAddr(cur), state: s });
                }
                PageState::Present | PageState::Zero | PageState::Shared => {
                    let hpa = self.mapped_hpa(i).ok_or(Error::NotGuestRam(GuestPhysAddr(cur)))?;
                    // `hpa` is a live frame backing this page (its state
                    // says so) and `off + n <= 4096`: inside one frame. A
                    // memory error in it fails the copy, not the host.
                    mem.copy_checked(HostPhysAddr(hpa.0 + off as u64), out)
                        .map_err(|_| Error::MemoryError(GuestPhysAddr(cur)))?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Copy guest memory at `gpa` into `buf` as a guest read would see it,
    /// bringing swapped and not-loaded pages in (through `hooks`). `flush`
    /// invalidates the given scope on every CPU running the VM (all roots).
    pub fn read<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        gpa: GuestPhysAddr,
        buf: &mut [u8],
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<(), Error> {
        self.check_ram(gpa, buf.len() as u64)?;
        let mut page = gpa.0 & !(PAGE_SIZE_4K - 1);
        while page < gpa.0 + buf.len() as u64 {
            let i = self.index_of(page).ok_or(Error::NotGuestRam(GuestPhysAddr(page)))?;
            if matches!(self.state(i), PageState::Swapped | PageState::NotLoaded) {
                self.resolve_host(alloc, hooks, GuestPhysAddr(page), AccessKind::Read, flush)?;
            }
            page += PAGE_SIZE_4K;
        }
        match self.peek(&*alloc, gpa, buf) {
            // Its frame is bad: the page's contents are lost. Poisoned, it
            // is never read or mapped again (a guest touch gets a machine
            // check), and the caller learns it as such.
            Err(Error::MemoryError(at)) => {
                self.mark_poisoned(alloc, hooks, at, flush)?;
                Err(Error::PagePoisoned(at.align_down(PAGE_SIZE_4K)))
            }
            other => other,
        }
    }

    /// Copy `data` into guest memory at `gpa` as a guest write would:
    /// copy-on-write breaks, page-ins, balloon re-backing, and dirty
    /// logging all apply (device emulation, loaders). Fails, writing
    /// nothing, if any byte is outside RAM; a later page failing to resolve
    /// (poisoned, store error) leaves earlier pages written. `flush` as for
    /// [`Self::read`].
    pub fn write<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        gpa: GuestPhysAddr,
        data: &[u8],
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<(), Error> {
        self.check_ram(gpa, data.len() as u64)?;
        let mut done = 0usize;
        while done < data.len() {
            let cur = gpa.0 + done as u64;
            let i = self.index_of(cur).ok_or(Error::NotGuestRam(GuestPhysAddr(cur)))?;
            let off = (cur % PAGE_SIZE_4K) as usize;
            let n = (PAGE_SIZE_4K as usize - off).min(data.len() - done);
            if self.state(i) != PageState::Present {
                self.resolve_host(alloc, hooks, GuestPhysAddr(cur), AccessKind::Write, flush)?;
            }
            if self.snapshot_pending(i) {
                // A running snapshot keeps the contents this write
                // replaces; then the page is open to the guest again (only
                // a right added: no shootdown needed).
                self.snapshot_preserve(alloc, i)?;
                let mut inv = Invalidation::none();
                let synced = self.sync_page(alloc, i, &mut inv);
                inv.flush(alloc, |_| {});
                synced?;
            }
            let hpa = self.own_frame(i).ok_or(Error::NotGuestRam(GuestPhysAddr(cur)))?;
            let dst = alloc.phys_to_ptr(HostPhysAddr(hpa.0 + off as u64));
            // SAFETY: the page is `Present`, so `hpa` is its private live
            // frame, valid for 4 KiB; `off + n <= 4096`; guest memory is never
            // referenced by Rust references.
            unsafe { copy_to_guest(dst, &data[done..done + n]) };
            let mut inv = Invalidation::none();
            self.log_write(&*alloc, None, i, &mut inv);
            // Only write rights were added: a stale read-only translation at
            // worst faults once more, so no shootdown is needed.
            inv.flush(alloc, |_| {});
            done += n;
        }
        Ok(())
    }

    /// Resolve a host access to a page as the fault handler would, and
    /// flush what changed (a copy-on-write break moves the page off a frame
    /// that vCPUs may still have cached).
    fn resolve_host<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        gpa: GuestPhysAddr,
        kind: AccessKind,
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<(), Error> {
        let inv = self.resolve(alloc, hooks, gpa, kind)?;
        inv.flush(alloc, &mut *flush);
        Ok(())
    }

    fn check_ram(&self, gpa: GuestPhysAddr, len: u64) -> Result<(), Error> {
        let end = gpa.0.checked_add(len).ok_or(Error::OutsideGuestRam { gpa, len })?;
        let mut cur = gpa.0 & !(PAGE_SIZE_4K - 1);
        while cur < end {
            let i = self.range_of(cur).ok_or(Error::OutsideGuestRam { gpa, len })?;
            cur = self.ranges[i].gpa + self.ranges[i].pages * PAGE_SIZE_4K;
        }
        Ok(())
    }

    // ---- page index and state helpers ----

    fn range_of(&self, gpa: u64) -> Option<usize> {
        let i = self.ranges.partition_point(|r| r.gpa <= gpa).checked_sub(1)?;
        let r = &self.ranges[i];
        (gpa < r.gpa + r.pages * PAGE_SIZE_4K).then_some(i)
    }

    /// State-table index of the page containing `gpa`.
    fn index_of(&self, gpa: u64) -> Option<usize> {
        let r = &self.ranges[self.range_of(gpa)?];
        Some(r.first + ((gpa - r.gpa) / PAGE_SIZE_4K) as usize)
    }

    /// Guest-physical address of page `i`.
    fn gpa_of(&self, i: usize) -> GuestPhysAddr {
        let r = &self.ranges[self.ranges.partition_point(|r| r.first <= i) - 1];
        GuestPhysAddr(r.gpa + (i - r.first) as u64 * PAGE_SIZE_4K)
    }

    fn state(&self, i: usize) -> PageState {
        PageState::from_code(self.states[i])
    }

    fn replaced(&self, i: usize) -> bool {
        self.states[i] & REPLACED != 0
    }

    /// Set page `i`'s state and override (`None`: it has none).
    fn set_state(&mut self, i: usize, state: PageState, replaced: bool, over: Option<Override<S>>) {
        let old = self.state(i);
        *self.counts.slot(old) -= 1;
        *self.counts.slot(state) += 1;
        self.states[i] = state.code() | if replaced { REPLACED } else { 0 };
        self.words[i] = over.map_or(0, Override::to_word);
    }

    /// Set page `i`'s override without changing its state.
    fn set_override(&mut self, i: usize, over: Override<S>) {
        self.words[i] = over.to_word();
    }

    /// Page `i`'s override, as its state byte says it has one.
    fn override_of(&self, i: usize) -> Option<Override<S>> {
        Override::decode(self.states[i], self.words[i])
    }

    fn override_frame(&self, i: usize) -> Option<HostPhysAddr> {
        match self.override_of(i) {
            Some(Override::Frame(hpa)) => Some(hpa),
            _ => None,
        }
    }

    fn override_slot(&self, i: usize) -> Option<S> {
        match self.override_of(i) {
            Some(Override::Slot(slot)) => Some(slot),
            _ => None,
        }
    }

    /// The frame page `i` owns (`Present`, `Poisoned`, `NotLoaded`).
    fn own_frame(&self, i: usize) -> Option<HostPhysAddr> {
        match self.state(i) {
            PageState::Present | PageState::Poisoned | PageState::NotLoaded => {
                if self.replaced(i) {
                    self.override_frame(i)
                } else {
                    self.ram.gpa_to_hpa(self.gpa_of(i))
                }
            }
            _ => None,
        }
    }

    /// The frame page `i` is mapped to, if its state maps it.
    fn mapped_hpa(&self, i: usize) -> Option<HostPhysAddr> {
        match self.state(i) {
            PageState::Present => self.own_frame(i),
            PageState::Zero => self.zero_frame,
            PageState::Shared => self.override_frame(i),
            _ => None,
        }
    }

    /// Rights a `Present`/`Zero`/`Shared` page gets without dirty logging.
    fn base_rights(&self, i: usize) -> Access {
        match self.state(i) {
            PageState::Present if !self.is_read_only(self.gpa_of(i)) => Access::RWX,
            _ => Access::RX,
        }
    }

    /// Whether write-protection dirty logging applies to the table `view`
    /// selects (the view when it exists, else the primary).
    fn wp_applies(&self, view: bool) -> bool {
        match &self.dirty {
            Some(log) if log.config.mechanism == DirtyMechanism::WriteProtect => view == self.view.is_some(),
            _ => false,
        }
    }

    /// What page `i` should map to in the primary (`view = false`) or the
    /// view, if anything.
    fn desired(&self, i: usize, view: bool) -> Option<(HostPhysAddr, Access)> {
        let hpa = self.mapped_hpa(i)?;
        let mut rights = self.base_rights(i);
        if self.wp_applies(view)
            && let Some(log) = &self.dirty
            && !log.is_marked(self.gpa_of(i).0)
        {
            rights -= Access::WRITE;
        }
        if self.snapshot_pending(i) {
            // A snapshot still needs its contents: the first write faults.
            rights -= Access::WRITE;
        }
        Some((hpa, rights))
    }

    /// Make both tables map page `i` as its state says, splitting large
    /// leaves around it if they disagree. Changes are added to `inv`.
    /// Needs frames only to split or to map into a missing table; on error
    /// the tables are consistent but may still show the page's old backing.
    fn sync_page<A: FrameAlloc>(&mut self, alloc: &mut A, i: usize, inv: &mut Invalidation<F>) -> Result<(), Error> {
        let gpa = self.gpa_of(i);
        let want_primary = self.desired(i, false);
        let want_view = self.desired(i, true);
        let dbits = self.dirty.as_ref().is_some_and(|l| l.config.mechanism == DirtyMechanism::DirtyBits);
        let was_dirty = sync_table(&mut self.primary, alloc, gpa, want_primary, inv)?;
        if dbits
            && was_dirty
            && let Some(log) = &mut self.dirty
        {
            // The D bit dies with the old leaf: keep the write logged.
            log.mark(gpa.0);
        }
        if let Some(view) = &mut self.view {
            sync_table(view, alloc, gpa, want_view, inv)?;
        }
        Ok(())
    }

    /// Split both tables down to 4 KiB at `gpa`.
    pub(crate) fn split_to_4k<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        gpa: GuestPhysAddr,
        inv: &mut Invalidation<F>,
    ) -> Result<(), Error> {
        split_down(&mut self.primary, alloc, gpa, PageSize::Size4K, inv)?;
        if let Some(view) = &mut self.view {
            split_down(view, alloc, gpa, PageSize::Size4K, inv)?;
        }
        Ok(())
    }

    /// Try to map the 2 MiB region at `gpa` with one large leaf again in
    /// both tables (best effort: refused unless its 512 pages are `Present`
    /// on their original contiguous frames with equal rights).
    fn try_merge_2m<M: PhysMem>(&mut self, mem: &M, gpa: GuestPhysAddr, inv: &mut Invalidation<F>) -> bool {
        // Not while dirty logging runs: merging ORs 512 dirty bits into one
        // and would need the granule's uniform write protection (KVM, too,
        // only recovers large pages once logging stops).
        if PageSize::Size2M > self.primary.max_page_size()
            || self.dirty.is_some()
            || self.snapshot.is_some()
            || !self.mergeable_2m(gpa)
        {
            return false;
        }
        let mut merged = false;
        if let Ok(i) = self.primary.merge(mem, gpa, PageSize::Size2M) {
            combine(inv, i);
            merged = true;
        }
        if let Some(view) = &mut self.view
            && let Ok(i) = view.merge(mem, gpa, PageSize::Size2M)
        {
            combine(inv, i);
        }
        merged
    }

    /// Apply a new state to page `i` and sync the tables; on error restore
    /// the old state (and mapping) and return the error. `inv` collects the
    /// changes either way.
    fn transition<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        i: usize,
        state: PageState,
        replaced: bool,
        over: Option<Override<S>>,
        inv: &mut Invalidation<F>,
    ) -> Result<(), Error> {
        let old_code = self.states[i];
        let old_over = self.override_of(i);
        self.set_state(i, state, replaced, over);
        if let Err(e) = self.sync_page(alloc, i, inv) {
            self.set_state(i, PageState::from_code(old_code), old_code & REPLACED != 0, old_over);
            // Going back only re-maps into tables that held the page a
            // moment ago or unmaps, neither of which allocates.
            let undo = self.sync_page(alloc, i, inv);
            debug_assert!(undo.is_ok(), "restoring page {i} failed: {undo:?}");
            return Err(e);
        }
        Ok(())
    }

    /// Give page `i`'s old backing back after its unmap was flushed.
    ///
    /// # Safety
    ///
    /// The frame is no longer mapped (flushed) and nothing else uses it.
    unsafe fn release_backing<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        gpa: GuestPhysAddr,
        backing: Backing<S>,
    ) {
        // SAFETY: per this function's contract.
        unsafe { release(&self.ram, alloc, hooks, gpa, backing) }
    }

    /// What page `i` holds that must be given back if it stops holding it.
    fn backing(&self, i: usize) -> Backing<S> {
        Backing::of(self.states[i], self.words[i])
    }

    /// Whether `backing` needs a hook `hooks` lacks.
    fn missing_hook(backing: &Backing<S>, hooks: &Hooks<'_, S>) -> Option<&'static str> {
        match backing {
            Backing::Shared(_) | Backing::Zero if hooks.sharing.is_none() => Some("sharing index"),
            Backing::Slot(_) if hooks.store.is_none() => Some("page store"),
            _ => None,
        }
    }

    /// Give everything back: tables (flushed through `flush`), owned frames,
    /// shared references and swap slots (through `hooks`). Poisoned frames
    /// stay allocated forever (quarantine).
    ///
    /// # Safety
    ///
    /// `alloc` is the allocator the VM's memory came from, no vCPU runs on
    /// its tables any more, and no device or DMA uses its memory.
    pub unsafe fn free<A: ContiguousAlloc>(
        self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        flush: &mut dyn FnMut(FlushScope),
    ) -> FreeReport {
        let mut report = FreeReport::default();
        let mut this = self;
        this.drop_snapshot(alloc);
        let Self { primary, view, ram, states, words, ranges, .. } = this;
        let mut inv = primary.destroy();
        if let Some(view) = view {
            inv = inv.combine(view.destroy());
        }
        inv.flush(alloc, &mut *flush);
        // Straight from the tables, allocating nothing: a VM is often
        // stopped because the host is short of memory.
        for r in &ranges {
            for p in 0..r.pages {
                let i = r.first + p as usize;
                let backing = Backing::<S>::of(states[i], words[i]);
                if PageState::from_code(states[i]) == PageState::Poisoned {
                    report.quarantined_frames += 1;
                } else if matches!(backing, Backing::Original | Backing::None) {
                    // Originals go back with the chunks below.
                } else if Self::missing_hook(&backing, hooks).is_some() {
                    report.leaked_references += 1;
                } else {
                    let gpa = GuestPhysAddr(r.gpa + p * PAGE_SIZE_4K);
                    // SAFETY: the tables are destroyed and flushed; the
                    // caller guarantees nothing else uses the memory.
                    unsafe { release(&ram, alloc, hooks, gpa, backing) };
                }
            }
        }
        let owned = |gpa: GuestPhysAddr| {
            let r = &ranges[ranges.partition_point(|r| r.gpa <= gpa.0) - 1];
            let code = states[r.first + ((gpa.0 - r.gpa) / PAGE_SIZE_4K) as usize];
            let s = PageState::from_code(code);
            code & REPLACED == 0 && matches!(s, PageState::Present | PageState::NotLoaded)
        };
        // SAFETY: the tables are gone (flushed) and exactly the pages still
        // owning their original frames are selected; the others were given
        // back by `free_page` (or are quarantined).
        unsafe { ram.free_owned(alloc, owned) };
        report
    }
}

/// Give `backing` (of the page at `gpa`) back.
///
/// # Safety
///
/// The frame is no longer mapped (the unmap was flushed) and nothing else
/// uses it; `alloc` is the allocator it came from.
unsafe fn release<A: ContiguousAlloc, S: SlotWord>(
    ram: &GuestRam,
    alloc: &mut A,
    hooks: &mut Hooks<'_, S>,
    gpa: GuestPhysAddr,
    backing: Backing<S>,
) {
    match backing {
        Backing::None => {}
        // SAFETY: per this function's contract.
        Backing::Original => unsafe {
            ram.free_page(alloc, gpa);
        },
        // SAFETY: replaced frames come from `alloc_frame`; per contract.
        Backing::Frame(hpa) => unsafe { alloc.free_frame(hpa) },
        Backing::Shared(hpa) => match hooks.sharing.as_deref_mut() {
            Some(index) => index.release(alloc, hpa),
            None => debug_assert!(false, "shared page released without the sharing index"),
        },
        Backing::Zero => match hooks.sharing.as_deref_mut() {
            Some(index) => index.release_zero(),
            None => debug_assert!(false, "zero page released without the sharing index"),
        },
        Backing::Slot(slot) => match hooks.store.as_deref_mut() {
            Some(store) => store.release(slot),
            None => debug_assert!(false, "swap slot released without the store"),
        },
    }
}

/// The backing a page is about to give up.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backing<S> {
    None,
    /// Its original chunk frame.
    Original,
    /// A private frame from `alloc_frame`.
    Frame(HostPhysAddr),
    /// A reference on a shared frame.
    Shared(HostPhysAddr),
    /// A reference on the zero frame.
    Zero,
    /// A swap slot.
    Slot(S),
}

impl<S: SlotWord> Backing<S> {
    /// The backing of a page with state byte `code` and word `word`.
    fn of(code: u8, word: u64) -> Self {
        let over = Override::decode(code, word);
        match PageState::from_code(code) {
            PageState::Present | PageState::NotLoaded => match over {
                Some(Override::Frame(hpa)) => Backing::Frame(hpa),
                _ => Backing::Original,
            },
            PageState::Zero => Backing::Zero,
            PageState::Shared => match over {
                Some(Override::Frame(hpa)) => Backing::Shared(hpa),
                _ => Backing::None,
            },
            PageState::Swapped => match over {
                Some(Override::Slot(slot)) => Backing::Slot(slot),
                _ => Backing::None,
            },
            PageState::Ballooned | PageState::Poisoned => Backing::None,
        }
    }
}

/// A zero-initialised table of `n` entries, or `OutOfHeap` (never a panic).
pub(crate) fn filled_vec<T: Clone>(n: usize, value: T) -> Result<Vec<T>, Error> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::OutOfHeap { bytes: (n * core::mem::size_of::<T>()) as u64 })?;
    v.resize(n, value);
    Ok(v)
}

impl<F: EntryFormat, S: SlotWord> Debug for VmMemory<F, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VmMemory")
            .field("id", &self.config.id)
            .field("pages", &self.states.len())
            .field("counts", &self.counts)
            .field("dirty_logging", &self.dirty.is_some())
            .finish()
    }
}

/// `*inv = inv + other`.
fn combine<F: EntryFormat>(inv: &mut Invalidation<F>, other: Invalidation<F>) {
    *inv = core::mem::take(inv).combine(other);
}

/// Split `table` at `gpa` until the leaf there is at most `size`.
fn split_down<F: EntryFormat, A: FrameAlloc>(
    table: &mut NestedPageTable<F>,
    alloc: &mut A,
    gpa: GuestPhysAddr,
    size: PageSize,
    inv: &mut Invalidation<F>,
) -> Result<(), Error> {
    while let Some(t) = table.translate(&*alloc, gpa)
        && t.leaf.size > size
    {
        combine(inv, table.split(alloc, gpa)?);
    }
    Ok(())
}

/// Make `table` map the 4 KiB page at `gpa` as `want` says. Returns whether
/// the leaf that went away (remapped or unmapped) had its dirty bit set.
fn sync_table<F: EntryFormat, A: FrameAlloc>(
    table: &mut NestedPageTable<F>,
    alloc: &mut A,
    gpa: GuestPhysAddr,
    want: Option<(HostPhysAddr, Access)>,
    inv: &mut Invalidation<F>,
) -> Result<bool, Error> {
    let cur = table.translate(&*alloc, gpa);
    if let Some(t) = cur
        && t.leaf.size != PageSize::Size4K
    {
        let base = HostPhysAddr(t.hpa.0 & !(PAGE_SIZE_4K - 1));
        if want == Some((base, t.leaf.access)) {
            return Ok(false);
        }
        split_down(table, alloc, gpa, PageSize::Size4K, inv)?;
        return sync_table(table, alloc, gpa, want, inv);
    }
    match (cur, want) {
        (None, None) => Ok(false),
        (Some(t), None) => {
            let (_, i) = table.unmap(&*alloc, gpa, PageSize::Size4K)?;
            combine(inv, i);
            Ok(t.leaf.dirty)
        }
        (Some(t), Some((hpa, access))) if t.leaf.hpa == hpa => {
            if t.leaf.access != access {
                combine(inv, table.protect(&*alloc, gpa, PageSize::Size4K, access)?);
            }
            Ok(false)
        }
        (Some(t), Some((hpa, access))) => {
            let (_, i) = table.remap(&*alloc, gpa, PageSize::Size4K, hpa, access)?;
            combine(inv, i);
            Ok(t.leaf.dirty)
        }
        (None, Some((hpa, access))) => {
            combine(inv, table.map(alloc, gpa, hpa, PageSize::Size4K, access, MemType::WriteBack)?);
            Ok(false)
        }
    }
}

/// Volatile copy out of guest memory (the guest may change it concurrently),
/// for the simulated vCPU accesses (hosts read through
/// [`PhysMem::copy_checked`]).
///
/// # Safety
///
/// `src` is valid for reads of `dst.len()` bytes.
#[cfg(any(test, feature = "sim"))]
pub(crate) unsafe fn copy_from_guest(src: *const u8, dst: &mut [u8]) {
    for (i, b) in dst.iter_mut().enumerate() {
        // SAFETY: `i < dst.len()`, inside the valid range.
        *b = unsafe { src.add(i).read_volatile() };
    }
}

/// Volatile copy into guest memory.
///
/// # Safety
///
/// `dst` is valid for writes of `src.len()` bytes and not referenced by any
/// Rust reference.
pub(crate) unsafe fn copy_to_guest(dst: *mut u8, src: &[u8]) {
    for (i, b) in src.iter().enumerate() {
        // SAFETY: `i < src.len()`, inside the valid range.
        unsafe { dst.add(i).write_volatile(*b) };
    }
}

/// Copy one whole 4 KiB guest frame out, 8 bytes at a time (volatile).
///
/// # Safety
///
/// `src` is 8-byte aligned and valid for reads of 4096 bytes.
pub(crate) unsafe fn read_frame(src: *const u8, dst: &mut [u8; 4096]) {
    let src = src.cast::<u64>();
    for (i, chunk) in dst.as_chunks_mut::<8>().0.iter_mut().enumerate() {
        // SAFETY: `i < 512`, so the word is inside the frame; aligned.
        let w = unsafe { src.add(i).read_volatile() };
        *chunk = w.to_ne_bytes();
    }
}

/// Copy one whole 4 KiB page into a guest frame (volatile).
///
/// # Safety
///
/// `dst` is 8-byte aligned, valid for writes of 4096 bytes, and not
/// referenced by any Rust reference.
pub(crate) unsafe fn write_frame(dst: *mut u8, src: &[u8; 4096]) {
    let dst = dst.cast::<u64>();
    for (i, chunk) in src.as_chunks::<8>().0.iter().enumerate() {
        // SAFETY: `i < 512`, inside the frame; aligned.
        unsafe { dst.add(i).write_volatile(u64::from_ne_bytes(*chunk)) };
    }
}

/// Simulated guest accesses, for tests and benchmarks: what a vCPU does.
#[cfg(any(test, feature = "sim"))]
impl<F: EntryFormat, S: SlotWord> VmMemory<F, S> {
    #[allow(clippy::too_many_arguments)]
    /// Access guest memory as vCPU `vcpu` would: translate through its
    /// root, setting accessed/dirty bits like the page walker; on a
    /// violation call [`Self::handle_fault`], flush, and retry. Returns the
    /// fault outcome that stopped the access, if any.
    fn sim_access<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        vcpu: usize,
        gpa: GuestPhysAddr,
        len: usize,
        kind: AccessKind,
        mut copy: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), FaultOutcome<F>> {
        let mut done = 0usize;
        while done < len {
            let cur = GuestPhysAddr(gpa.0 + done as u64);
            let n = (PAGE_SIZE_4K as usize - (cur.0 % PAGE_SIZE_4K) as usize).min(len - done);
            let mut tries = 0;
            let hpa = loop {
                let table = match &self.view {
                    Some(view) if self.root_for_vcpu(vcpu) == view.root() => view,
                    _ => &self.primary,
                };
                if let Some(hpa) = table.hw_access(&*alloc, cur, kind.access()) {
                    break hpa;
                }
                tries += 1;
                assert!(tries < 4, "fault at {cur:?} ({kind:?}) not resolved after {tries} tries");
                match self.handle_fault(alloc, hooks, vcpu, cur, kind) {
                    FaultOutcome::Resolved(inv) => inv.flush(alloc, |_scope| {
                        #[cfg(test)]
                        crate::tests::vm::record_flush(_scope);
                    }),
                    other => return Err(other),
                }
            };
            copy(alloc.phys_to_ptr(hpa), done, n);
            done += n;
        }
        Ok(())
    }

    /// vCPU `vcpu` writes `data` at `gpa` (see `sim_access`).
    pub fn sim_write<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        vcpu: usize,
        gpa: GuestPhysAddr,
        data: &[u8],
    ) -> Result<(), FaultOutcome<F>> {
        self.sim_access(alloc, hooks, vcpu, gpa, data.len(), AccessKind::Write, |dst, off, n| {
            // SAFETY: `dst` is the translation of a mapped, writable guest
            // page, valid for `n` bytes (the piece stays inside the page).
            unsafe { copy_to_guest(dst, &data[off..off + n]) }
        })
    }

    /// vCPU `vcpu` reads `buf.len()` bytes at `gpa`.
    pub fn sim_read<A: ContiguousAlloc>(
        &mut self,
        alloc: &mut A,
        hooks: &mut Hooks<'_, S>,
        vcpu: usize,
        gpa: GuestPhysAddr,
        buf: &mut [u8],
    ) -> Result<(), FaultOutcome<F>> {
        let len = buf.len();
        self.sim_access(alloc, hooks, vcpu, gpa, len, AccessKind::Read, |src, off, n| {
            // SAFETY: as in `sim_write`, for reads.
            unsafe { copy_from_guest(src, &mut buf[off..off + n]) }
        })
    }

    /// The primary and view tables, for tests that inspect mappings.
    pub fn tables(&self) -> (&NestedPageTable<F>, Option<&NestedPageTable<F>>) {
        (&self.primary, self.view.as_ref())
    }
}

#[cfg(test)]
impl<F: EntryFormat, S: SlotWord> VmMemory<F, S> {
    /// Panic unless the tables, state table, overrides and counts agree.
    pub(crate) fn check_invariants<M: PhysMem>(&self, mem: &M) {
        let mut counts = StateCounts::default();
        for i in 0..self.states.len() {
            let state = self.state(i);
            *counts.slot(state) += 1;
            let gpa = self.gpa_of(i);
            let (code, word) = (self.states[i], self.words[i]);
            match Override::<S>::decode(code, word) {
                Some(Override::Frame(hpa)) => {
                    assert!(hpa.0 != 0 && hpa.0 % PAGE_SIZE_4K == 0, "{gpa:?} ({state:?}) has no frame: {word:#x}")
                }
                Some(Override::Slot(_)) => {}
                None => assert_eq!(word, 0, "{gpa:?} ({state:?}) has a stray word"),
            }
            let tables = [(false, Some(&self.primary)), (true, self.view.as_ref())];
            for (is_view, table) in tables {
                let Some(table) = table else { continue };
                let want = self.desired(i, is_view);
                let got = table.translate(mem, gpa);
                match (want, got) {
                    (None, None) => {}
                    (Some((hpa, access)), Some(t)) => {
                        assert_eq!(t.hpa, hpa, "{gpa:?} ({state:?}, view {is_view}) maps the wrong frame");
                        assert_eq!(t.leaf.access, access, "{gpa:?} ({state:?}, view {is_view}) has wrong rights");
                        if t.leaf.size != PageSize::Size4K {
                            assert_eq!(self.states[i], PageState::Present.code(), "{gpa:?} large over {state:?}");
                        }
                    }
                    (w, g) => panic!("{gpa:?} ({state:?}, view {is_view}): want {w:?}, table has {g:?}"),
                }
            }
        }
        assert_eq!(counts, self.counts, "state counts out of date");
    }
}

#[cfg(test)]
mod table_tests {
    use super::*;

    #[test]
    fn a_table_too_large_for_the_heap_is_an_error_not_a_panic() {
        let n = usize::MAX / 16;
        assert_eq!(filled_vec(n, 0u64).unwrap_err(), Error::OutOfHeap { bytes: (n * 8) as u64 });
        assert_eq!(filled_vec(3, 7u16).unwrap(), [7, 7, 7]);
    }
}
