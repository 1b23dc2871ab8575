//! The memory manager's fault handling and the operations around it
//! (`mm::VmMemory`): nested page faults at any address, guest and host
//! accesses, swap-out to a `MemStore`, sharing scans with a `SharingIndex`,
//! balloon inflate/deflate, poisoning, lazy loading, dirty logging, with
//! host allocation failures, a full store, a corrupt store slot and a
//! failing page source injected between them. Addresses and page lists are
//! the guest's, so any value must be handled.
//!
//! Checks, after every operation, through the public interface only:
//! - a fault's outcome matches the memory map (MMIO id and offset, outside,
//!   poisoned) and a failed one changes nothing; a resolved fault lets the
//!   access through (guest accesses retry as a vCPU would);
//! - every page reads what was last written to it (ballooned pages read
//!   zero), through any number of swaps, shares, splits and loads, or the
//!   read fails because the store was corrupted (never wrong data);
//! - each page is mapped exactly when its state says (zero pages to the
//!   index's zero frame, read-only; shared pages read-only; large leaves
//!   only over present pages), present pages on distinct frames that no
//!   shared or zero page uses;
//! - state counts, sharing references and live swap slots agree, balloon
//!   reports count what changed, every written page is in the next dirty
//!   bitmap;
//! - every host frame is accounted for (present and not-loaded pages,
//!   quarantined frames, table frames, zero and shared frames), and at
//!   free all come back except the quarantined ones.
//!
//! Input: a setup part (format, RAM layout, page size limit, vCPUs, host
//! frames, store capacity), then operations of one byte and their
//! parameters; see `World::new` and `World::step`.

use std::collections::{HashMap, HashSet};

use mm::paging::{Access, EntryFormat, Ept, Npt, PageSize};
use mm::sim::SimPhys;
use mm::swap_hook::MemStore;
use mm::vm_memory::{
    AccessKind, DirtyLogConfig, DirtyMechanism, FaultOutcome, Hooks, Lookup, MemoryMap, MmioId, PageSource, PageState,
    SharingIndex, VcpuSet, VmMemory, VmMemoryConfig,
};
use mm::{Error, GuestPhysAddr, HostPhysAddr};

use crate::input::Input;

const PAGE: u64 = 4096;
const MAX_STEPS: usize = 64;

type Page = Box<[u8; 4096]>;

/// A page with contents identifying `tag` (0: zeros).
fn content(tag: u8) -> Page {
    let mut p = Box::new([0u8; 4096]);
    if tag != 0 {
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) ^ tag;
        }
        p[0] = tag;
    }
    p
}

/// Lazy-load source: what the pages held when they were marked.
struct Checkpoint {
    pages: HashMap<u64, Page>,
    fail: bool,
    block: u32,
}

impl PageSource for Checkpoint {
    fn fill(&mut self, gpa: GuestPhysAddr, page: &mut [u8; 4096]) -> Result<(), Error> {
        if self.fail {
            return Err(Error::PageSourceFailed(gpa));
        }
        match self.pages.get(&gpa.0) {
            Some(p) => page.copy_from_slice(&p[..]),
            None => page.fill(0),
        }
        Ok(())
    }
    fn block_pages(&self) -> u32 {
        self.block
    }
}

pub fn mm_fault(data: &[u8]) {
    let mut input = Input::new(data);
    if input.bool() { run::<Ept>(&mut input) } else { run::<Npt>(&mut input) }
}

fn run<F: EntryFormat>(input: &mut Input<'_>) {
    let Some(mut w) = World::<F>::new(input) else { return };
    let mut steps = 0;
    while !input.is_empty() && steps < MAX_STEPS {
        w.step(input, steps);
        steps += 1;
        // The page-by-page walk is most of the cost: every few steps.
        w.check(steps % 8 == 0);
    }
    w.finish();
}

struct World<F: EntryFormat> {
    sim: SimPhys,
    index: SharingIndex,
    store: MemStore,
    ckpt: Checkpoint,
    vm: Option<VmMemory<F>>,
    /// Page address -> contents, for pages that are not all zeros.
    model: HashMap<u64, Page>,
    pages: Vec<u64>,
    mmio: (u64, u64, MmioId),
    vcpus: usize,
    poisoned: HashSet<u64>,
    /// Frames kept by poisoned pages that owned one.
    quarantined_own: u64,
    /// Shared frames poisoned while in use (never freed).
    poisoned_shared: HashSet<HostPhysAddr>,
    /// A store slot was damaged: page-ins may fail (but never lie).
    tampered: bool,
    /// Allocations fail during this operation.
    failing: bool,
    /// While dirty logging: the traced vCPUs and the pages written since
    /// the last harvest.
    dirty: Option<(VcpuSet, HashSet<u64>)>,
}

impl<F: EntryFormat> World<F> {
    fn new(input: &mut Input<'_>) -> Option<Self> {
        let r0 = (1 + input.below(1024)) * PAGE;
        let mmio_at = r0 + input.below(4) * PAGE;
        let mmio_len = (1 + input.below(16)) * PAGE;
        let r1 = input.bool().then(|| {
            let at = (mmio_at + mmio_len).next_multiple_of(2 << 20) + input.below(2) * (2 << 20);
            (at, (1 + input.below(1024)) * PAGE)
        });
        let max = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G][input.below(3) as usize];
        let vcpus = 1 + input.below(4) as usize;
        let contiguous = input.u8() % 4 != 0;
        let spare = input.below(1024) as usize;
        let capacity = input.u8();
        let block = 1 << input.below(10);

        let mut map = MemoryMap::ram_only(r0).unwrap();
        let id = map.add_mmio(GuestPhysAddr(mmio_at), mmio_len, "dev").unwrap();
        if let Some((at, len)) = r1 {
            map.add_ram(GuestPhysAddr(at), len).unwrap();
        }
        let pages: Vec<u64> = map.ram_ranges().flat_map(|(g, len)| (g.0..g.0 + len).step_by(PAGE as usize)).collect();
        let mut sim = SimPhys::new(pages.len() + 256 + spare);
        sim.set_contiguous(contiguous);
        let index = SharingIndex::with_hint_slots(&mut sim, 64).unwrap();
        let config = VmMemoryConfig { id: 1, vcpus, max_page_size: max };
        let vm = match VmMemory::<F>::new(&mut sim, map, config) {
            Ok(vm) => vm,
            Err(e) => {
                assert!(matches!(e, Error::OutOfGuestMemory { .. } | Error::OutOfHostFrames | Error::OutOfTableMemory));
                // SAFETY: no VM used the index.
                unsafe { index.free(&mut sim) };
                assert_eq!(sim.frames_in_use(), 0, "a failed VmMemory::new leaked");
                return None;
            }
        };
        let store = if capacity < 128 { MemStore::with_capacity(usize::from(capacity)) } else { MemStore::new() };
        Some(World {
            sim,
            index,
            store,
            ckpt: Checkpoint { pages: HashMap::new(), fail: false, block },
            vm: Some(vm),
            model: HashMap::new(),
            pages,
            mmio: (mmio_at, mmio_len, id),
            vcpus,
            poisoned: HashSet::new(),
            quarantined_own: 0,
            poisoned_shared: HashSet::new(),
            tampered: false,
            failing: false,
            dirty: None,
        })
    }

    fn vm(&self) -> &VmMemory<F> {
        self.vm.as_ref().unwrap()
    }

    fn page(&self, input: &mut Input<'_>) -> u64 {
        self.pages[input.below(self.pages.len() as u64) as usize]
    }

    /// Any address: mostly RAM, some MMIO, some anything.
    fn address(&self, input: &mut Input<'_>) -> u64 {
        match input.u8() % 8 {
            0..=5 => self.page(input) + input.below(PAGE),
            6 => self.mmio.0 + input.below(self.mmio.1),
            _ => input.u64(),
        }
    }

    fn expected(&self, page: u64) -> Page {
        self.model.get(&page).cloned().unwrap_or_else(|| content(0))
    }

    fn set_model(&mut self, page: u64, data: Page) {
        if data.iter().all(|&b| b == 0) {
            self.model.remove(&page);
        } else {
            self.model.insert(page, data);
        }
    }

    /// An error the injected faults explain.
    fn allowed(&self, e: &Error) -> bool {
        match e {
            Error::OutOfHostFrames | Error::OutOfTableMemory => self.failing,
            Error::PageStoreCorrupt { .. } => self.tampered,
            Error::PageSourceFailed(_) => self.ckpt.fail,
            _ => false,
        }
    }

    /// Whether the page is poisoned, or shares a frame another page's
    /// poisoning quarantined (readable as it is, but no copy-on-write).
    fn bad_memory(&self, page: u64) -> bool {
        let (state, map) = self.snapshot(page);
        self.poisoned.contains(&page)
            || state == Some(PageState::Shared) && map[0].is_some_and(|(f, _)| self.poisoned_shared.contains(&f))
    }

    fn outcome_ok(&self, page: u64, o: &FaultOutcome<F>) {
        match o {
            FaultOutcome::Poisoned => assert!(self.bad_memory(page), "{page:#x} reported poisoned"),
            FaultOutcome::Failed(e) => assert!(self.allowed(e), "fault at {page:#x} failed: {e}"),
            other => panic!("RAM page {page:#x}: {other:?}"),
        }
    }

    /// The page's state and how each table maps it.
    fn snapshot(&self, page: u64) -> (Option<PageState>, [Option<(HostPhysAddr, Access)>; 2]) {
        let vm = self.vm();
        let (primary, view) = vm.tables();
        let t = |t: Option<mm::paging::Translation>| t.map(|t| (t.hpa, t.leaf.access));
        let g = GuestPhysAddr(page);
        (vm.page_state(g), [t(primary.translate(&self.sim, g)), view.and_then(|v| t(v.translate(&self.sim, g)))])
    }

    fn step(&mut self, input: &mut Input<'_>, n: usize) {
        let op = input.u8();
        if op % 16 == 15 {
            return self.control(input);
        }
        self.op(op % 16, input, n);
        if self.failing {
            self.failing = false;
            self.sim.stop_failing();
        }
    }

    fn control(&mut self, input: &mut Input<'_>) {
        match input.u8() % 4 {
            0 => {
                self.sim.fail_after(u64::from(input.u8() % 8));
                self.failing = true;
            }
            1 => {
                if self.store.corrupt(u64::from(input.u8())) {
                    self.tampered = true;
                }
            }
            2 => self.ckpt.fail = !self.ckpt.fail,
            _ => {
                let page = self.page(input);
                let (_, inv) = self.vm.as_mut().unwrap().test_and_clear_accessed(&self.sim, GuestPhysAddr(page));
                inv.flush(&mut self.sim, |_| {});
            }
        }
    }

    fn op(&mut self, op: u8, input: &mut Input<'_>, n: usize) {
        let flush = &mut |_| {};
        macro_rules! parts {
            () => {{
                let World { sim, index, store, ckpt, vm, .. } = &mut *self;
                (sim, Hooks { sharing: Some(index), store: Some(store), source: Some(ckpt) }, vm.as_mut().unwrap())
            }};
        }
        match op {
            0 | 1 => {
                // The guest writes a whole page (faults handled as a vCPU would).
                let page = self.page(input);
                let vcpu = input.below(self.vcpus as u64) as usize;
                let data = content(input.u8());
                let (sim, mut hooks, vm) = parts!();
                match vm.sim_write(sim, &mut hooks, vcpu, GuestPhysAddr(page), &data[..]) {
                    Ok(()) => {
                        self.set_model(page, data);
                        self.note_write(page, Some(vcpu));
                    }
                    Err(o) => self.outcome_ok(page, &o),
                }
            }
            2 | 3 => {
                let page = self.page(input);
                let vcpu = input.below(self.vcpus as u64) as usize;
                let mut got = content(0);
                let (sim, mut hooks, vm) = parts!();
                match vm.sim_read(sim, &mut hooks, vcpu, GuestPhysAddr(page), &mut got[..]) {
                    Ok(()) => assert!(got == self.expected(page), "guest read of {page:#x} differs"),
                    Err(o) => self.outcome_ok(page, &o),
                }
            }
            4 => self.fault(input),
            5 => {
                // The host writes a few bytes inside one page.
                let page = self.page(input);
                let len = 1 + input.below(16);
                let off = input.below(PAGE - len + 1);
                let bytes = input.array::<16>();
                let bytes = &bytes[..len as usize];
                let (sim, mut hooks, vm) = parts!();
                match vm.write(sim, &mut hooks, GuestPhysAddr(page + off), bytes, flush) {
                    Ok(()) => {
                        let mut data = self.expected(page);
                        data[off as usize..(off + len) as usize].copy_from_slice(bytes);
                        self.set_model(page, data);
                        self.note_write(page, None);
                    }
                    Err(Error::PagePoisoned(_)) => assert!(self.bad_memory(page)),
                    Err(e) => assert!(self.allowed(&e), "host write to {page:#x}: {e}"),
                }
            }
            6 => {
                let page = self.page(input);
                let mut got = content(0);
                let (sim, mut hooks, vm) = parts!();
                match vm.read(sim, &mut hooks, GuestPhysAddr(page), &mut got[..], flush) {
                    Ok(()) => assert!(got == self.expected(page), "host read of {page:#x} differs"),
                    Err(Error::PagePoisoned(_)) => assert!(self.poisoned.contains(&page)),
                    Err(e) => assert!(self.allowed(&e), "host read of {page:#x}: {e}"),
                }
            }
            7 => {
                let gpa = self.address(input);
                let with_index = input.u8() % 4 != 0;
                let page = gpa & !(PAGE - 1);
                let before = self.snapshot(page);
                let World { sim, index, store, vm, .. } = &mut *self;
                let vm = vm.as_mut().unwrap();
                match vm.swap_out(sim, GuestPhysAddr(gpa), store, with_index.then_some(index), flush) {
                    Ok(()) => {
                        assert!(matches!(before.0, Some(PageState::Present | PageState::Shared)), "{before:?}");
                        assert_eq!(vm.page_state(GuestPhysAddr(page)), Some(PageState::Swapped));
                    }
                    Err(_) => assert_eq!(self.snapshot(page), before, "a refused swap-out changed {gpa:#x}"),
                }
            }
            8 => {
                let budget = 1 + input.below(self.pages.len() as u64) as usize;
                let World { sim, index, vm, .. } = &mut *self;
                let r = vm.as_mut().unwrap().share_scan(sim, index, budget, flush);
                assert!(r.scanned as usize <= budget && r.scanned > 0, "{r:?}");
            }
            9 => {
                let regions = input.below(4) as usize;
                let World { sim, index, vm, .. } = &mut *self;
                let r = vm.as_mut().unwrap().break_cold_large_pages(sim, index, regions, flush);
                assert!(r.large_broken as usize <= regions, "{r:?}");
            }
            10 => self.balloon(input, true),
            11 => self.balloon(input, false),
            12 => self.poison(input),
            13 => {
                let page = self.page(input);
                let len = (1 + input.below(64)) * PAGE;
                let vm = self.vm();
                let marked: Vec<u64> = (self.pages.iter().copied())
                    .filter(|&p| p >= page && p < page + len)
                    .filter(|&p| vm.page_state(GuestPhysAddr(p)) == Some(PageState::Present))
                    .collect();
                for &p in &marked {
                    let data = self.expected(p);
                    self.ckpt.pages.insert(p, data);
                }
                let World { sim, vm, .. } = &mut *self;
                match vm.as_mut().unwrap().mark_not_loaded(sim, GuestPhysAddr(page), len, flush) {
                    Ok(count) => assert_eq!(count, marked.len() as u64),
                    Err(e) => assert!(self.allowed(&e), "mark_not_loaded: {e}"),
                }
            }
            _ => self.dirty_log(input, n),
        }
    }

    fn poison(&mut self, input: &mut Input<'_>) {
        let page = self.page(input);
        let with_index = input.u8() % 4 != 0;
        let before = self.snapshot(page);
        let state = before.0.unwrap();
        let World { sim, index, store, ckpt, vm, .. } = &mut *self;
        let mut hooks = Hooks { sharing: with_index.then_some(index), store: Some(store), source: Some(ckpt) };
        match vm.as_mut().unwrap().mark_poisoned(sim, &mut hooks, GuestPhysAddr(page), &mut |_| {}) {
            Ok(()) => {
                match state {
                    PageState::Present | PageState::NotLoaded => self.quarantined_own += 1,
                    PageState::Shared => {
                        self.poisoned_shared.insert(before.1[0].unwrap().0);
                    }
                    _ => {}
                }
                self.poisoned.insert(page);
                self.model.remove(&page);
                if let Some((_, written)) = &mut self.dirty {
                    written.remove(&page);
                }
            }
            Err(e) => {
                let explained = self.allowed(&e)
                    || matches!(e, Error::WrongPageState { .. })
                        && matches!(state, PageState::Ballooned | PageState::Swapped)
                    || matches!(e, Error::MissingHook(_))
                        && !with_index
                        && matches!(state, PageState::Zero | PageState::Shared);
                assert!(explained, "poisoning {page:#x} ({state:?}): {e}");
                assert_eq!(self.snapshot(page), before);
            }
        }
    }

    fn note_write(&mut self, page: u64, vcpu: Option<usize>) {
        if let Some((set, written)) = &mut self.dirty
            && vcpu.is_none_or(|v| set.contains(v))
        {
            written.insert(page);
        }
    }

    /// A nested page fault at any address, as the exit handler delivers it.
    fn fault(&mut self, input: &mut Input<'_>) {
        let gpa = self.address(input);
        let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Execute][input.below(3) as usize];
        let vcpu = input.below(self.vcpus as u64) as usize;
        let page = gpa & !(PAGE - 1);
        let lookup = match self.vm().map().lookup(GuestPhysAddr(gpa)) {
            Lookup::Ram => None,
            Lookup::Mmio { id, offset, .. } => Some(Some((id, offset))),
            Lookup::Nothing => Some(None),
        };
        let before = self.snapshot(page);
        let World { sim, index, store, ckpt, vm, .. } = self;
        let mut hooks = Hooks { sharing: Some(index), store: Some(store), source: Some(ckpt) };
        let outcome = vm.as_mut().unwrap().handle_fault(sim, &mut hooks, vcpu, GuestPhysAddr(gpa), kind);
        match (lookup, outcome) {
            (Some(Some((id, offset))), FaultOutcome::Mmio { id: i, offset: o }) => {
                assert_eq!((i, o), (id, offset));
                assert_eq!((id, gpa - offset), (self.mmio.2, self.mmio.0));
            }
            (Some(None), FaultOutcome::OutsideMemory) => {}
            (None, FaultOutcome::Resolved(inv)) => {
                inv.flush(&mut self.sim, |_| {});
                self.retry(gpa, kind, vcpu);
            }
            (None, o @ (FaultOutcome::Poisoned | FaultOutcome::Failed(_))) => {
                self.outcome_ok(page, &o);
                assert_eq!(self.snapshot(page), before, "a failed fault changed {gpa:#x}");
            }
            (l, o) => panic!("fault at {gpa:#x} (map says {l:?}): {o:?}"),
        }
    }

    /// After a resolved fault the access goes through, perhaps after a few
    /// more faults (a vCPU retrying), unless an injected failure stops it.
    fn retry(&mut self, gpa: u64, kind: AccessKind, vcpu: usize) {
        for _ in 0..3 {
            let vm = self.vm();
            let (primary, view) = vm.tables();
            let table = match view {
                Some(v) if vm.root_for_vcpu(vcpu) == v.root() => v,
                _ => primary,
            };
            if table.hw_access(&self.sim, GuestPhysAddr(gpa), kind.access()).is_some() {
                if kind == AccessKind::Write {
                    self.note_write(gpa & !(PAGE - 1), Some(vcpu));
                }
                return;
            }
            let World { sim, index, store, ckpt, vm, .. } = self;
            let mut hooks = Hooks { sharing: Some(index), store: Some(store), source: Some(ckpt) };
            match vm.as_mut().unwrap().handle_fault(sim, &mut hooks, vcpu, GuestPhysAddr(gpa), kind) {
                FaultOutcome::Resolved(inv) => inv.flush(&mut self.sim, |_| {}),
                o => return self.outcome_ok(gpa & !(PAGE - 1), &o),
            }
        }
        panic!("{kind:?} at {gpa:#x} by vCPU {vcpu} still faults after resolved faults");
    }

    fn balloon(&mut self, input: &mut Input<'_>, inflate: bool) {
        let with_index = input.u8() % 4 != 0;
        let list: Vec<GuestPhysAddr> =
            (0..input.below(16)).map(|_| GuestPhysAddr(self.address(input) & !(PAGE - 1))).collect();
        let before: HashMap<u64, Option<PageState>> = list.iter().map(|g| (g.0, self.vm().page_state(*g))).collect();
        let flush = &mut |_| {};
        let World { sim, index, store, ckpt, vm, .. } = self;
        let vm = vm.as_mut().unwrap();
        let report = if inflate {
            let mut hooks = Hooks { sharing: with_index.then_some(index), store: Some(store), source: Some(ckpt) };
            vm.balloon_inflate(sim, &mut hooks, &list, flush)
        } else {
            match vm.balloon_deflate(sim, &list, flush) {
                Ok(r) => r,
                Err(e) => return assert!(self.allowed(&e), "deflate: {e}"),
            }
        };
        assert_eq!(report.accepted + report.rejected, list.len() as u64, "{report:?}");
        let mut changed = 0;
        let mut frames = 0;
        for (&page, &old) in &before {
            let now = self.vm().page_state(GuestPhysAddr(page));
            if inflate && now == Some(PageState::Ballooned) && old != now {
                changed += 1;
                frames += u64::from(matches!(old, Some(PageState::Present | PageState::NotLoaded)));
                self.model.remove(&page);
                if let Some((_, written)) = &mut self.dirty {
                    written.remove(&page);
                }
            }
            if !inflate && old == Some(PageState::Ballooned) && now == Some(PageState::Present) {
                changed += 1;
                frames += 1;
            }
        }
        assert_eq!(report.accepted, changed, "{report:?} for {list:x?}");
        assert_eq!(report.frames, frames, "{report:?}");
    }

    fn dirty_log(&mut self, input: &mut Input<'_>, n: usize) {
        let choice = input.u8();
        let flush = &mut |_| {};
        let World { sim, vm, .. } = self;
        let vm = vm.as_mut().unwrap();
        match self.dirty.take() {
            None => {
                let granule = if choice & 1 != 0 { PageSize::Size2M } else { PageSize::Size4K };
                let mechanism = if choice & 2 != 0 { DirtyMechanism::WriteProtect } else { DirtyMechanism::DirtyBits };
                let vcpus = if choice & 4 != 0 { VcpuSet::of(&[n % self.vcpus]).unwrap() } else { VcpuSet::ALL };
                match vm.start_dirty_log(sim, DirtyLogConfig { granule, mechanism, vcpus }, flush) {
                    Ok(()) => self.dirty = Some((vcpus, HashSet::new())),
                    Err(e) => assert!(self.allowed(&e), "start_dirty_log: {e}"),
                }
            }
            Some((set, written)) if choice & 8 != 0 => {
                match vm.harvest_dirty_bitmap(sim, flush) {
                    Ok(bitmap) => {
                        for page in written {
                            assert!(bitmap.is_dirty(GuestPhysAddr(page)), "write to {page:#x} not in the bitmap");
                        }
                    }
                    // A failed harvest may lose what it had collected.
                    Err(e) => assert!(self.allowed(&e), "harvest: {e}"),
                }
                self.dirty = Some((set, HashSet::new()));
            }
            Some(d) => match vm.stop_dirty_log(sim, flush) {
                Ok(()) => {}
                Err(e) => {
                    assert!(self.allowed(&e), "stop_dirty_log: {e}");
                    self.dirty = Some(d);
                }
            },
        }
    }

    /// The invariants; `full` adds the page-by-page table walk.
    fn check(&self, full: bool) {
        let vm = self.vm();
        let (primary, view) = vm.tables();
        let counts = vm.state_counts();
        let mut counted = mm::vm_memory::StateCounts::default();
        let mut present: HashSet<HostPhysAddr> = HashSet::new();
        let mut shared: HashSet<HostPhysAddr> = HashSet::new();
        let zero = self.index.zero_frame();
        let mut states = 0;
        let walk = full || !self.poisoned_shared.is_empty();
        for (gpa, state) in vm.page_states().filter(|_| walk) {
            states += 1;
            *match state {
                PageState::Present => &mut counted.present,
                PageState::Zero => &mut counted.zero,
                PageState::Shared => &mut counted.shared,
                PageState::Ballooned => &mut counted.ballooned,
                PageState::Swapped => &mut counted.swapped,
                PageState::Poisoned => &mut counted.poisoned,
                PageState::NotLoaded => &mut counted.not_loaded,
            } += 1;
            for table in [Some(primary), view].into_iter().flatten() {
                let t = table.translate(&self.sim, gpa);
                match (state, t) {
                    (PageState::Present, Some(t)) => {
                        if table.root() == primary.root() {
                            assert!(present.insert(t.hpa), "{gpa:?} shares frame {:?} with another page", t.hpa);
                        }
                    }
                    (PageState::Zero | PageState::Shared, Some(t)) => {
                        assert!(!t.leaf.access.contains(Access::WRITE), "{gpa:?} ({state:?}) is writable");
                        assert_eq!(t.leaf.size, PageSize::Size4K, "{gpa:?} ({state:?}) under a large leaf");
                        if state == PageState::Zero {
                            assert_eq!(t.hpa, zero, "{gpa:?} is zero but maps {:?}", t.hpa);
                        } else {
                            assert_ne!(t.hpa, zero);
                            shared.insert(t.hpa);
                        }
                    }
                    (_, None) if !state.is_resident() => {}
                    (s, t) => panic!("{gpa:?} is {s:?} but the table has {t:?}"),
                }
            }
        }
        if walk {
            assert_eq!(states, self.pages.len());
            assert_eq!(counted, counts, "state counts out of date");
        }
        assert!(present.is_disjoint(&shared) && !present.contains(&zero), "a private frame is shared");
        let s = self.index.stats();
        assert_eq!((s.zero_refs, s.shared_refs), (counts.zero, counts.shared), "sharing references");
        assert_eq!(self.store.live_slots() as u64, counts.swapped, "live swap slots");
        // Every frame: pages that own one, quarantine, tables, the index's.
        let gone: u64 = self.poisoned_shared.iter().filter(|f| !shared.contains(f)).count() as u64;
        let tables = vm.memory_report().page_table_bytes / PAGE;
        let want = counts.present + counts.not_loaded + self.quarantined_own + tables + 1 + s.shared_frames + gone;
        assert_eq!(self.sim.frames_in_use() as u64, want, "frames in use vs accounted for ({counts:?}, {s:?})");
        // Two pages' contents, without changing them (copying guest memory
        // byte by byte is slow under coverage instrumentation).
        let written = self.model.keys().next().copied();
        let rotating = self.pages[self.model.len().wrapping_mul(7919) % self.pages.len()];
        for page in written.into_iter().chain([rotating]) {
            let mut got = content(0);
            if vm.peek(&self.sim, GuestPhysAddr(page), &mut got[..]).is_ok() {
                assert!(got == self.expected(page), "{page:#x} holds other data");
            }
        }
    }

    fn finish(mut self) {
        self.ckpt.fail = false;
        let flush = &mut |_| {};
        {
            let World { sim, vm, .. } = &mut self;
            let vm = vm.as_mut().unwrap();
            if vm.dirty_logging().is_some() {
                vm.stop_dirty_log(sim, flush).unwrap();
            }
        }
        // Every page written, shared or not resident, and a sample of the
        // rest (zero pages all map the one zero frame, checked by `check`).
        let vm = self.vm();
        let last: Vec<u64> = (self.pages.iter().enumerate())
            .filter(|&(i, p)| {
                let state = vm.page_state(GuestPhysAddr(*p)).unwrap();
                i % 32 == 0 || self.model.contains_key(p) || !matches!(state, PageState::Present | PageState::Zero)
            })
            .map(|(_, &p)| p)
            .collect();
        for page in last {
            let mut got = content(0);
            let World { sim, index, store, ckpt, vm, .. } = &mut self;
            let mut hooks = Hooks { sharing: Some(index), store: Some(store), source: Some(ckpt) };
            match vm.as_mut().unwrap().read(sim, &mut hooks, GuestPhysAddr(page), &mut got[..], flush) {
                Ok(()) => assert!(got == self.expected(page), "{page:#x} differs at the end"),
                Err(Error::PagePoisoned(_)) => assert!(self.poisoned.contains(&page)),
                Err(e) => assert!(self.allowed(&e), "final read of {page:#x}: {e}"),
            }
        }
        self.check(true);
        let poisoned = self.vm().state_counts().poisoned;
        let kept = self.quarantined_own + self.poisoned_shared.len() as u64;
        let World { mut sim, mut index, mut store, mut ckpt, vm, .. } = self;
        let mut hooks = Hooks { sharing: Some(&mut index), store: Some(&mut store), source: Some(&mut ckpt) };
        // SAFETY: nothing runs on the simulated tables.
        let report = unsafe { vm.unwrap().free(&mut sim, &mut hooks, flush) };
        assert_eq!(report.leaked_references, 0);
        assert_eq!(report.quarantined_frames, poisoned);
        assert_eq!(store.live_slots(), 0, "swap slots left after free");
        let s = index.stats();
        assert_eq!((s.zero_refs, s.shared_refs, s.shared_frames), (0, 0, 0), "sharing left after free");
        // SAFETY: the VM is freed.
        unsafe { index.free(&mut sim) };
        assert_eq!(sim.frames_in_use() as u64, kept, "frames not returned at free (quarantined: {kept})");
    }
}
