//! Memory map, fault outcomes, host access, lazy load, poison, overhead.

use alloc::vec;
use alloc::vec::Vec;

use super::{free, g, pattern, vm};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE_1G, PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::error::Error;
use crate::paging::{Access, EntryFormat, FlushScope, PageSize};
use crate::sim::SimPhys;
use crate::tests::for_both_formats;
use crate::vm_memory::{
    AccessKind, DirtyLogConfig, DirtyMechanism, FaultOutcome, Hooks, Lookup, MemoryMap, PageSource, PageState,
    VmMemory, VmMemoryConfig,
};

#[test]
fn memory_map_lookup_and_validation() {
    let mut map = MemoryMap::new();
    map.add_ram(g(0), 0xA0000).unwrap();
    let vga = map.add_mmio(g(0xA0000), 0x20000, "vga").unwrap();
    map.add_ram(g(0x10_0000), 0x70_0000).unwrap();
    let hpet = map.add_mmio(g(0xFED0_0000), 0x1000, "hpet").unwrap();
    assert_eq!(map.lookup(g(0x9_FFFF)), Lookup::Ram);
    assert_eq!(map.lookup(g(0xA_0010)), Lookup::Mmio { id: vga, name: "vga", offset: 0x10 });
    assert_eq!(map.lookup(g(0xC_0000)), Lookup::Nothing);
    assert_eq!(map.lookup(g(0x7F_FFFF)), Lookup::Ram);
    assert_eq!(map.lookup(g(0x80_0000)), Lookup::Nothing);
    assert_eq!(map.lookup(g(0xFED0_0FFF)), Lookup::Mmio { id: hpet, name: "hpet", offset: 0xFFF });
    assert_eq!(map.lookup(g(u64::MAX)), Lookup::Nothing);
    assert_eq!(map.ram_bytes(), 0xA0000 + 0x70_0000);
    assert_eq!(map.mmio(hpet).unwrap().gpa, g(0xFED0_0000));
    // Overlaps, misalignment, empty and out-of-range regions are refused and
    // change nothing.
    let before = map.clone();
    for (gpa, size) in [(0x9_F000, 0x2000), (0x1000, 0x1000), (0x10_0800, 0x1000), (0x100_0000, 0), (1 << 48, 0x1000)] {
        assert!(matches!(map.add_ram(g(gpa), size), Err(Error::InvalidMemoryMap { .. })), "{gpa:#x}+{size:#x}");
        assert!(map.add_mmio(g(gpa), size, "x").is_err());
    }
    assert_eq!(map, before);
    let pc = MemoryMap::pc(5 * PAGE_SIZE_1G).unwrap();
    assert_eq!(pc.ram_bytes(), 5 * PAGE_SIZE_1G);
    assert!(matches!(pc.lookup(g(0xFEE0_0300)), Lookup::Mmio { name: "lapic", offset: 0x300, .. }));
    assert_eq!(pc.lookup(g(4 * PAGE_SIZE_1G)), Lookup::Ram);
}

fn fault_outcomes<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut map = MemoryMap::new();
    map.add_ram(g(0), 4 << 20).unwrap();
    let dev = map.add_mmio(g(0x1000_0000), 0x1000, "dev").unwrap();
    let mut v: VmMemory<F> = VmMemory::new(&mut sim, map, VmMemoryConfig::new(1, 2)).unwrap();
    let mut hooks = Hooks::none();
    let mut fault =
        |v: &mut VmMemory<F>, sim: &mut SimPhys, gpa, kind| v.handle_fault(sim, &mut hooks, 0, g(gpa), kind);
    assert!(matches!(
        fault(&mut v, &mut sim, 0x1000_0010, AccessKind::Write),
        FaultOutcome::Mmio { id, offset: 0x10 } if id == dev
    ));
    for gpa in [4 << 20, 0x2000_0000, u64::MAX, (1 << 48) + 5] {
        assert!(matches!(fault(&mut v, &mut sim, gpa, AccessKind::Read), FaultOutcome::OutsideMemory), "{gpa:#x}");
    }
    // A spurious fault on mapped RAM: resolved with a flush of the page.
    match fault(&mut v, &mut sim, 0x1234, AccessKind::Execute) {
        FaultOutcome::Resolved(inv) => {
            assert_eq!(inv.scope(), Some(FlushScope::Range { start: g(0x1000), len: PAGE_SIZE_4K }));
            inv.flush(&mut sim, |_| {});
        }
        other => panic!("{other:?}"),
    }
    v.check_invariants(&sim);
    free(v, &mut sim, &mut Hooks::none());
    assert_eq!(sim.frames_in_use(), 0);
}

fn host_read_write_cross_pages<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut map = MemoryMap::new();
    map.add_ram(g(0), 1 << 20).unwrap();
    map.add_ram(g(1 << 20), 1 << 20).unwrap(); // adjacent range
    let mut v: VmMemory<F> = VmMemory::new(&mut sim, map, VmMemoryConfig::new(1, 1)).unwrap();
    let mut hooks = Hooks::none();
    let data: Vec<u8> = (0..10000u32).map(|i| (i * 7) as u8).collect();
    let at = g((1 << 20) - 5000);
    v.write(&mut sim, &mut hooks, at, &data, &mut |_| {}).unwrap();
    let mut back = vec![0u8; data.len()];
    v.read(&mut sim, &mut hooks, at, &mut back, &mut |_| {}).unwrap();
    assert_eq!(back, data);
    let mut via_cpu = vec![0u8; data.len()];
    v.sim_read(&mut sim, &mut hooks, 0, at, &mut via_cpu).unwrap();
    assert_eq!(via_cpu, data);
    // Refused whole when any byte is outside RAM.
    assert!(matches!(
        v.write(&mut sim, &mut hooks, g((2 << 20) - 2), &[1, 2, 3], &mut |_| {}),
        Err(Error::OutsideGuestRam { .. })
    ));
    let mut b = [0u8; 2];
    v.peek(&sim, g((2 << 20) - 2), &mut b).unwrap();
    assert_eq!(b, [0, 0], "refused write must change nothing");
    free(v, &mut sim, &mut hooks);
    assert_eq!(sim.frames_in_use(), 0);
}

/// A page source whose page at `gpa` is `pattern(gpa)`, failing at `bad`.
struct Source {
    fills: Vec<u64>,
    bad: Option<u64>,
    block: u32,
}

impl PageSource for Source {
    fn fill(&mut self, gpa: GuestPhysAddr, page: &mut [u8; 4096]) -> Result<(), Error> {
        if Some(gpa.0) == self.bad {
            return Err(Error::PageSourceFailed(gpa));
        }
        self.fills.push(gpa.0);
        *page = pattern(gpa.0);
        Ok(())
    }

    fn block_pages(&self) -> u32 {
        self.block
    }
}

fn lazy_load_fills_on_first_touch<F: EntryFormat>() {
    let mut sim = SimPhys::new(8192);
    let mut v = vm::<F>(&mut sim, 1, 8, PageSize::Size2M);
    let frames = sim.frames_in_use();
    let marked = v.mark_not_loaded(&mut sim, g(0), 8 << 20, &mut |_| {}).unwrap();
    assert_eq!(marked, 2048);
    assert_eq!(v.state_counts().not_loaded, 2048);
    assert_eq!(sim.frames_in_use(), frames, "not-loaded pages keep their frames");
    v.check_invariants(&sim);
    // Without a source: the fault fails and nothing changes.
    let mut none = Hooks::none();
    assert!(matches!(
        v.handle_fault(&mut sim, &mut none, 0, g(0x5000), AccessKind::Read),
        FaultOutcome::Failed(Error::MissingHook(_))
    ));
    assert!(matches!(v.peek(&sim, g(0x5000), &mut [0u8; 4]), Err(Error::WrongPageState { .. })));
    // One page at a time.
    let mut src = Source { fills: Vec::new(), bad: Some(0x7000), block: 1 };
    let mut hooks = Hooks { source: Some(&mut src), ..Hooks::none() };
    let mut buf = [0u8; 4096];
    v.sim_read(&mut sim, &mut hooks, 1, g(0x5000), &mut buf).unwrap();
    assert_eq!(buf, pattern(0x5000));
    assert!(matches!(
        v.sim_read(&mut sim, &mut hooks, 1, g(0x7000), &mut buf),
        Err(FaultOutcome::Failed(Error::PageSourceFailed(_)))
    ));
    assert_eq!(v.page_state(g(0x7000)), Some(PageState::NotLoaded));
    assert_eq!(src.fills, [0x5000]);
    // A whole 2 MiB block at once, mapped large again.
    let mut src = Source { fills: Vec::new(), bad: None, block: 512 };
    let mut hooks = Hooks { source: Some(&mut src), ..Hooks::none() };
    v.sim_write(&mut sim, &mut hooks, 2, g((2 << 20) + 0x10), &[0xEE]).unwrap();
    assert_eq!(src.fills.len(), 512);
    let t = v.table().translate(&sim, g(2 << 20)).unwrap();
    assert_eq!(t.leaf.size, PageSize::Size2M, "a fully loaded 2 MiB block is mapped large again");
    let mut p = [0u8; 4096];
    v.peek(&sim, g((2 << 20) + 0x1000), &mut p).unwrap();
    assert_eq!(p, pattern((2 << 20) + 0x1000));
    v.peek(&sim, g(2 << 20), &mut p).unwrap();
    let mut want = pattern(2 << 20);
    want[0x10] = 0xEE;
    assert_eq!(p, want);
    v.check_invariants(&sim);
    free(v, &mut sim, &mut Hooks::none());
    assert_eq!(sim.frames_in_use(), 0);
}

/// A source that records which pages were touched and sizes its blocks
/// by a script, as a lazy restore's read-ahead does.
struct Recorder {
    touched: Vec<u64>,
    fills: Vec<u64>,
    block: u32,
}

impl PageSource for Recorder {
    fn fill(&mut self, gpa: GuestPhysAddr, page: &mut [u8; 4096]) -> Result<(), Error> {
        self.fills.push(gpa.0);
        *page = pattern(gpa.0);
        Ok(())
    }

    fn block_pages(&self) -> u32 {
        self.block
    }

    fn touched(&mut self, gpa: GuestPhysAddr) {
        self.touched.push(gpa.0);
    }
}

fn background_fill_converges_and_maps_large_again<F: EntryFormat>() {
    let mut sim = SimPhys::new(8192);
    let mut v = vm::<F>(&mut sim, 1, 4, PageSize::Size2M);
    v.mark_not_loaded(&mut sim, g(0), 4 << 20, &mut |_| {}).unwrap();
    let mut src = Recorder { touched: Vec::new(), fills: Vec::new(), block: 16 };
    let mut hooks = Hooks { source: Some(&mut src), ..Hooks::none() };
    // A touch in the middle of a block: the source hears of that page
    // first, then fills the whole aligned block of 16.
    let mut buf = [0u8; 4096];
    v.sim_read(&mut sim, &mut hooks, 0, g(0x2_3000), &mut buf).unwrap();
    assert_eq!(buf, pattern(0x2_3000));
    assert_eq!(src.touched, [0x2_3000]);
    assert_eq!(src.fills, (0x2_0000..0x3_0000).step_by(4096).collect::<Vec<u64>>());
    let mut hooks = Hooks { source: Some(&mut src), ..Hooks::none() };
    // The background fill: page by page from a cursor, each a block.
    let mut from = g(0);
    let mut loads = 0;
    while let Some(at) = v.load_next_not_loaded(&mut sim, &mut hooks, from, &mut |_| {}).unwrap() {
        assert_eq!(v.page_state(at), Some(PageState::Present));
        from = at;
        loads += 1;
    }
    assert_eq!(loads, 1024 / 16 - 1, "one load per block of 16, the touched block aside");
    assert_eq!(v.state_counts().not_loaded, 0);
    assert_eq!(src.fills.len(), 1024, "every page filled once");
    // Blocks of 16 completing a 2 MiB region map it large again.
    for at in [0, PAGE_SIZE_2M] {
        assert_eq!(v.table().translate(&sim, g(at)).unwrap().leaf.size, PageSize::Size2M, "{at:#x}");
    }
    let mut p = [0u8; 4096];
    v.peek(&sim, g(0x3f_f000), &mut p).unwrap();
    assert_eq!(p, pattern(0x3f_f000));
    // Nothing left: none, from anywhere (outside RAM included).
    let mut hooks = Hooks { source: Some(&mut src), ..Hooks::none() };
    assert_eq!(v.load_next_not_loaded(&mut sim, &mut hooks, g(0), &mut |_| {}).unwrap(), None);
    assert_eq!(v.load_next_not_loaded(&mut sim, &mut hooks, g(1 << 40), &mut |_| {}).unwrap(), None);
    v.check_invariants(&sim);
    free(v, &mut sim, &mut Hooks::none());
    assert_eq!(sim.frames_in_use(), 0);
}

/// Post-copy: a source that has only the pages that "arrived".
struct Arrivals {
    have: Vec<u64>,
}

impl PageSource for Arrivals {
    fn fill(&mut self, gpa: GuestPhysAddr, page: &mut [u8; 4096]) -> Result<(), Error> {
        if !self.have.contains(&gpa.0) {
            return Err(Error::PageInTransit(gpa));
        }
        *page = pattern(gpa.0);
        Ok(())
    }
}

fn postcopy_pages_wait_in_transit_then_load_as_they_arrive<F: EntryFormat>() {
    let mut sim = SimPhys::new(8192);
    let mut v = vm::<F>(&mut sim, 1, 4, PageSize::Size2M);
    v.mark_not_loaded(&mut sim, g(0), 2 << 20, &mut |_| {}).unwrap();
    let mut src = Arrivals { have: Vec::new() };
    // A touch before the page arrived: in transit, nothing changed.
    let mut hooks = Hooks { source: Some(&mut src), ..Hooks::none() };
    assert!(matches!(
        v.handle_fault(&mut sim, &mut hooks, 0, g(0x3000), AccessKind::Write),
        FaultOutcome::Failed(Error::PageInTransit(a)) if a == g(0x3000)
    ));
    assert_eq!(v.page_state(g(0x3000)), Some(PageState::NotLoaded));
    // It arrives: loaded now, the others still wait.
    src.have.push(0x3000);
    let mut hooks = Hooks { source: Some(&mut src), ..Hooks::none() };
    assert!(v.load_page(&mut sim, &mut hooks, g(0x3000), &mut |_| {}).unwrap());
    assert_eq!(v.page_state(g(0x3000)), Some(PageState::Present));
    assert_eq!(v.state_counts().not_loaded, 511);
    // A second copy of it (or a page outside RAM) changes nothing.
    assert!(!v.load_page(&mut sim, &mut hooks, g(0x3000), &mut |_| {}).unwrap());
    assert!(!v.load_page(&mut sim, &mut hooks, g(1 << 40), &mut |_| {}).unwrap());
    let mut p = [0u8; 4096];
    v.peek(&sim, g(0x3000), &mut p).unwrap();
    assert_eq!(p, pattern(0x3000));
    // The rest arrive one by one: the region maps with a 2 MiB page again.
    src.have.extend((0..512u64).map(|i| i * 4096));
    let mut hooks = Hooks { source: Some(&mut src), ..Hooks::none() };
    for i in 0..512u64 {
        v.load_page(&mut sim, &mut hooks, g(i * 4096), &mut |_| {}).unwrap();
    }
    assert_eq!(v.state_counts().not_loaded, 0);
    assert_eq!(v.table().translate(&sim, g(0)).unwrap().leaf.size, PageSize::Size2M);
    v.check_invariants(&sim);
    free(v, &mut sim, &mut Hooks::none());
    assert_eq!(sim.frames_in_use(), 0);
}

fn poisoned_page<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut v = vm::<F>(&mut sim, 1, 4, PageSize::Size2M);
    let mut hooks = Hooks::none();
    v.write(&mut sim, &mut hooks, g(0x3000), b"important", &mut |_| {}).unwrap();
    // A host machine check names a frame: it leads back to the one page in it.
    let frame = v.ram().gpa_to_hpa(g(0x3000)).unwrap();
    assert_eq!(v.pages_in_frame(HostPhysAddr(frame.0 + 0x123)), [g(0x3000)]);
    assert!(v.pages_in_frame(HostPhysAddr(0xdead_0000)).is_empty());
    assert_eq!(v.page_frame(g(0x3fff)), Some(frame));
    v.mark_poisoned(&mut sim, &mut hooks, g(0x3123), &mut |_| {}).unwrap();
    assert_eq!(v.page_state(g(0x3000)), Some(PageState::Poisoned));
    assert!(matches!(v.handle_fault(&mut sim, &mut hooks, 0, g(0x3000), AccessKind::Read), FaultOutcome::Poisoned));
    assert!(matches!(v.peek(&sim, g(0x3000), &mut [0u8; 1]), Err(Error::PagePoisoned(_))));
    assert!(matches!(v.write(&mut sim, &mut hooks, g(0x3000), &[1], &mut |_| {}), Err(Error::PagePoisoned(_))));
    assert!(v.pages_in_frame(frame).is_empty(), "a poisoned page is nobody's contents any more");
    assert_eq!(v.page_frame(g(0x3000)), None);
    // A host read that hits a memory error in the frame (the kernel's
    // machine-check-safe copy fails): the page is poisoned, the read says so.
    let bad = v.page_frame(g(0x5000)).unwrap();
    sim.set_bad(bad);
    let mut b = [0u8; 16];
    assert!(matches!(v.peek(&sim, g(0x4ff8), &mut b), Err(Error::MemoryError(at)) if at == g(0x5000)));
    assert_eq!(v.read(&mut sim, &mut hooks, g(0x4ff8), &mut b, &mut |_| {}), Err(Error::PagePoisoned(g(0x5000))));
    assert_eq!(v.page_state(g(0x5000)), Some(PageState::Poisoned));
    assert_eq!(v.page_state(g(0x4000)), Some(PageState::Present));
    // The rest of the (split) large page still works.
    let mut b = [0u8; 9];
    v.sim_read(&mut sim, &mut hooks, 0, g(0x4000), &mut b).unwrap();
    v.check_invariants(&sim);
    // SAFETY: simulated tables; nothing runs on them.
    let report = unsafe { v.free(&mut sim, &mut hooks, &mut |_| {}) };
    assert_eq!(report.quarantined_frames, 2);
    assert_eq!(sim.frames_in_use(), 2, "the poisoned frames stay out of the pool");
}

/// The manager's own memory stays under a quarter percent of guest RAM, with
/// the state table, a 4 KiB dirty log, overrides and samples all in use. It
/// is nearly all the two dense per-page tables (a byte and a word per page,
/// 0.22%), allocated with the VM so that nothing grows while it runs.
fn bookkeeping_under_a_quarter_percent<F: EntryFormat>() {
    const GIB: u64 = PAGE_SIZE_1G;
    let mut sim = SimPhys::new((GIB / PAGE_SIZE_4K) as usize + 4096);
    let mut v = vm::<F>(&mut sim, 1, 1024, PageSize::Size1G);
    let base = v.bookkeeping_bytes();
    assert!(base * 1000 < GIB * 23 / 10, "state tables alone: {base} bytes per GiB");
    let cfg = DirtyLogConfig::new(PageSize::Size4K, DirtyMechanism::WriteProtect);
    v.start_dirty_log(&mut sim, cfg, &mut |_| {}).unwrap();
    let mut hooks = Hooks::none();
    // 1% of the pages get private replacement frames (ballooned and back).
    let gpas: Vec<GuestPhysAddr> = (0..2621).map(|i| g(i * 100 * PAGE_SIZE_4K)).collect();
    let r = v.balloon_inflate(&mut sim, &mut hooks, &gpas, &mut |_| {});
    assert_eq!(r.accepted, 2621);
    v.balloon_deflate(&mut sim, &gpas, &mut |_| {}).unwrap();
    v.start_usage_sample(&mut sim, 7, 4096, &mut |_| {});
    let bytes = v.bookkeeping_bytes();
    let report = v.memory_report();
    std::println!(
        "{}: bookkeeping {bytes} bytes per GiB ({:.3}%), page tables {} KiB",
        F::NAME,
        bytes as f64 * 100.0 / GIB as f64,
        report.page_table_bytes / 1024
    );
    assert!(bytes * 400 < GIB, "bookkeeping {bytes} bytes is not under 0.25% of 1 GiB");
    assert!(bytes - base < GIB / 4000, "dirty logging and sampling ({} bytes) are not under 0.025%", bytes - base);
    v.stop_dirty_log(&mut sim, &mut |_| {}).unwrap();
    free(v, &mut sim, &mut hooks);
    assert_eq!(sim.frames_in_use(), 0);
}

fn states_and_counts_track_changes<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut v = vm::<F>(&mut sim, 1, 2, PageSize::Size2M);
    assert_eq!(v.pages(), 512);
    assert_eq!(v.state_counts().present, 512);
    let mut hooks = Hooks::none();
    let r = v.balloon_inflate(&mut sim, &mut hooks, &[g(0), g(0x1000), g(0x1000), g(PAGE_SIZE_2M)], &mut |_| {});
    assert_eq!((r.accepted, r.rejected), (2, 2));
    let c = v.state_counts();
    assert_eq!((c.present, c.ballooned, c.total()), (510, 2, 512));
    let states: Vec<_> = v.page_states().take(3).collect();
    assert_eq!(
        states,
        [(g(0), PageState::Ballooned), (g(0x1000), PageState::Ballooned), (g(0x2000), PageState::Present)]
    );
    v.check_invariants(&sim);
    free(v, &mut sim, &mut hooks);
    assert_eq!(sim.frames_in_use(), 0);
}

/// ROM: readable and executable, never writable by the guest (its write
/// faults as `ReadOnly` and changes nothing), writable by the host; dirty
/// logging and large-page merging never open it.
fn read_only_ram_is_rom<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut v = vm::<F>(&mut sim, 1, 4, PageSize::Size2M);
    let mut hooks = Hooks::none();
    let rom = pattern(7);
    v.write(&mut sim, &mut hooks, g(0xE_0000), &rom, &mut |_| {}).unwrap();
    // Misaligned, empty and non-RAM ranges are refused and change nothing.
    for (gpa, len) in [(0xE_0800, 0x1000), (0xE_0000, 0x800), (0xE_0000, 0), (0x3F_F000, 0x2000)] {
        assert!(v.set_read_only(&mut sim, g(gpa), len, &mut |_| {}).is_err(), "{gpa:#x}+{len:#x}");
        assert!(!v.is_read_only(g(gpa)) || gpa == 0xE_0800);
    }
    assert!(!v.is_read_only(g(0xE_0000)));
    v.set_read_only(&mut sim, g(0xE_0000), 0x2_0000, &mut |_| {}).unwrap();
    let rights = |v: &VmMemory<F>, sim: &SimPhys, gpa| v.table().translate(sim, g(gpa)).unwrap().leaf.access;
    for gpa in [0xE_0000, 0xF_F000] {
        assert!(v.is_read_only(g(gpa)));
        assert_eq!(rights(&v, &sim, gpa), Access::RX, "{gpa:#x}");
    }
    // Its neighbours in the same 2 MiB stay writable RAM.
    for gpa in [0xD_F000, 0x10_0000, 0x1F_F000] {
        assert!(!v.is_read_only(g(gpa)));
        assert!(rights(&v, &sim, gpa).contains(Access::WRITE), "{gpa:#x}");
    }
    match v.handle_fault(&mut sim, &mut hooks, 0, g(0xE_0010), AccessKind::Write) {
        FaultOutcome::ReadOnly => {}
        other => panic!("{other:?}"),
    }
    assert!(matches!(v.sim_write(&mut sim, &mut hooks, 0, g(0xE_0010), &[1]), Err(FaultOutcome::ReadOnly)));
    let mut back = [0u8; 4096];
    v.sim_read(&mut sim, &mut hooks, 0, g(0xE_0000), &mut back).unwrap();
    assert_eq!(back, rom, "the guest write changed ROM");
    assert_eq!(v.page_state(g(0xE_0000)), Some(PageState::Present));
    // The host (a loader, a restore) still writes it.
    v.write(&mut sim, &mut hooks, g(0xE_0000), &[9], &mut |_| {}).unwrap();
    v.sim_read(&mut sim, &mut hooks, 0, g(0xE_0000), &mut back[..1]).unwrap();
    assert_eq!(back[0], 9);
    assert_eq!(rights(&v, &sim, 0xE_0000), Access::RX, "a host write opened ROM");
    // Dirty logging by write protection opens written granules, never ROM;
    // stopping it merges large pages again, never over ROM.
    let cfg = DirtyLogConfig::new(PageSize::Size2M, DirtyMechanism::WriteProtect);
    v.start_dirty_log(&mut sim, cfg, &mut |_| {}).unwrap();
    v.sim_write(&mut sim, &mut hooks, 0, g(0x1_0000), &[1]).unwrap();
    v.write(&mut sim, &mut hooks, g(0xE_1000), &[2], &mut |_| {}).unwrap();
    assert_eq!(rights(&v, &sim, 0xE_1000), Access::RX);
    assert!(rights(&v, &sim, 0x1_0000).contains(Access::WRITE));
    v.stop_dirty_log(&mut sim, &mut |_| {}).unwrap();
    assert_eq!(rights(&v, &sim, 0xE_0000), Access::RX);
    assert_eq!(v.table().translate(&sim, g(0xE_0000)).unwrap().leaf.size, PageSize::Size4K);
    assert_eq!(v.table().translate(&sim, g(PAGE_SIZE_2M)).unwrap().leaf.size, PageSize::Size2M);
    v.check_invariants(&sim);
    free(v, &mut sim, &mut hooks);
    assert_eq!(sim.frames_in_use(), 0);
}

for_both_formats!(
    fault_outcomes,
    read_only_ram_is_rom,
    host_read_write_cross_pages,
    lazy_load_fills_on_first_touch,
    background_fill_converges_and_maps_large_again,
    postcopy_pages_wait_in_transit_then_load_as_they_arrive,
    poisoned_page,
    bookkeeping_under_a_quarter_percent,
    states_and_counts_track_changes,
);
