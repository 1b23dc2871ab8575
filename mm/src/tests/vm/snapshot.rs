//! Copy-on-write snapshots: whatever the guest and the host do while a
//! snapshot is read out, every page read is the page as it was when the
//! snapshot began.

use alloc::vec::Vec;

use super::{free, g, pattern, vm};
use crate::addr::{PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::error::Error;
use crate::paging::{EntryFormat, PageSize};
use crate::sim::SimPhys;
use crate::swap_hook::MemStore;
use crate::tests::{Rng, for_both_formats};
use crate::vm_memory::{
    AccessKind, DirtyLogConfig, DirtyMechanism, FaultOutcome, Hooks, PageState, SharingIndex, Taken,
};

const MIB: u64 = 8;

/// Random guest writes, host writes, swap-outs, sharing scans and balloon
/// inflations interleaved with the reader walking the pages in order; the
/// pages read must be exactly the contents at the start.
fn snapshot_is_the_instant<F: EntryFormat>(seed: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let mut sim = SimPhys::new(8192);
    let mut index = SharingIndex::with_hint_slots(&mut sim, 1024).unwrap();
    let mut store = MemStore::new();
    let mut v = vm::<F>(&mut sim, 1, MIB, PageSize::Size2M);
    let pages = MIB << 8;
    let mut hooks = Hooks { sharing: Some(&mut index), store: Some(&mut store), source: None };
    // Contents before: distinct pages, duplicates (to share), zeros; some
    // pages swapped out and shared; the last 2 MiB untouched (large).
    for p in 0..pages - 512 {
        match rng.below(4) {
            0 => v.write(&mut sim, &mut hooks, g(p * PAGE_SIZE_4K), &pattern(p), &mut |_| {}).unwrap(),
            1 => v.write(&mut sim, &mut hooks, g(p * PAGE_SIZE_4K), &[7; 64], &mut |_| {}).unwrap(),
            _ => {}
        }
    }
    let _ = v.share_scan(&mut sim, hooks.sharing.as_deref_mut().unwrap(), 4096, &mut |_| {});
    for _ in 0..64 {
        let p = rng.below(pages - 512);
        let _ = v.swap_out(&mut sim, g(p * PAGE_SIZE_4K), &mut **hooks.store.as_mut().unwrap(), None, &mut |_| {});
    }
    let last_large = g((MIB << 20) - PAGE_SIZE_2M);
    assert_eq!(v.table().translate(&sim, last_large).unwrap().leaf.size, PageSize::Size2M);
    let mut before = Vec::with_capacity(pages as usize);
    for p in 0..pages {
        let mut b = [0u8; 4096];
        v.read(&mut sim, &mut hooks, g(p * PAGE_SIZE_4K), &mut b, &mut |_| {}).unwrap();
        before.push(b);
    }

    v.start_snapshot(&mut sim, &mut |_| {}).unwrap();
    assert!(matches!(v.start_snapshot(&mut sim, &mut |_| {}), Err(Error::SnapshotState { running: true })));
    let cfg = DirtyLogConfig::new(PageSize::Size4K, DirtyMechanism::WriteProtect);
    assert!(matches!(v.start_dirty_log(&mut sim, cfg, &mut |_| {}), Err(Error::SnapshotState { running: true })));
    assert!(v.snapshot_was_large(last_large));
    assert!(!v.snapshot_was_large(g(0)) || v.page_state(g(0)) == Some(PageState::Present));
    assert_eq!(v.snapshot_stats().unwrap().pending, pages);
    v.check_invariants(&sim);

    let mut cursor = 0u64;
    let mut buf = [0u8; 4096];
    while cursor < pages {
        for _ in 0..rng.below(24) {
            let p = rng.below(pages);
            let gpa = g(p * PAGE_SIZE_4K + rng.below(PAGE_SIZE_4K - 8));
            match rng.below(10) {
                0 => v.write(&mut sim, &mut hooks, gpa, &[rng.below(256) as u8; 8], &mut |_| {}).unwrap(),
                1 => {
                    let _ = v.swap_out(
                        &mut sim,
                        g(p * PAGE_SIZE_4K),
                        &mut **hooks.store.as_mut().unwrap(),
                        None,
                        &mut |_| {},
                    );
                }
                2 => {
                    let _ = v.share_scan(&mut sim, hooks.sharing.as_deref_mut().unwrap(), 64, &mut |_| {});
                }
                3 => {
                    let at = [g(p * PAGE_SIZE_4K)];
                    let _ = v.balloon_inflate(&mut sim, &mut hooks, &at, &mut |_| {});
                }
                _ => {
                    let vcpu = rng.below(4) as usize;
                    v.sim_write(&mut sim, &mut hooks, vcpu, gpa, &[rng.below(256) as u8; 8]).unwrap();
                }
            }
        }
        for _ in 0..rng.below(48).min(pages - cursor) {
            let taken = v.snapshot_take(&mut sim, &mut hooks, g(cursor * PAGE_SIZE_4K), &mut buf, &mut |_| {});
            assert_eq!(taken, Ok(Taken::Data), "page {cursor}");
            assert!(buf == before[cursor as usize], "page {cursor} is not the snapshot's");
            cursor += 1;
        }
        v.check_invariants(&sim);
    }
    let stats = v.snapshot_stats().unwrap();
    assert_eq!((stats.pending, stats.preserved, stats.preserved_frames, stats.taken), (0, 0, 0, pages));
    assert!(matches!(v.snapshot_take(&mut sim, &mut hooks, g(0), &mut buf, &mut |_| {}), Err(Error::SnapshotTaken(_))));
    let stats = v.stop_snapshot(&mut sim, &mut |_| {}).unwrap();
    assert!(v.snapshot_stats().is_none());
    v.check_invariants(&sim);
    // Guest writes need no fault after the stop.
    let wrote = v.sim_write(&mut sim, &mut hooks, 0, g(0x3000), &[1; 8]);
    assert!(wrote.is_ok());
    v.start_dirty_log(&mut sim, cfg, &mut |_| {}).unwrap();
    v.stop_dirty_log(&mut sim, &mut |_| {}).unwrap();
    free(v, &mut sim, &mut hooks);
    // SAFETY: the only VM using it is freed.
    unsafe { index.free(&mut sim) };
    assert_eq!(store.live_slots(), 0);
    assert_eq!(sim.frames_in_use(), 0, "a preserved copy leaked");
    stats.copies
}

#[test]
fn a_snapshot_reads_the_instant_it_began() {
    for seed in 0..6 {
        let copies = snapshot_is_the_instant::<crate::paging::Ept>(seed)
            + snapshot_is_the_instant::<crate::paging::Npt>(seed + 100);
        assert!(copies > 0, "seed {seed}: nothing was copied on write");
    }
}

/// Large pages survive: split while the snapshot runs (each page must be
/// protected on its own), merged again when it stops; stopping early frees
/// the copies.
fn large_pages_and_early_stop<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut v = vm::<F>(&mut sim, 1, 4, PageSize::Size2M);
    let mut hooks = Hooks::none();
    v.write(&mut sim, &mut hooks, g(0x20_1000), &pattern(1), &mut |_| {}).unwrap();
    v.start_snapshot(&mut sim, &mut |_| {}).unwrap();
    assert!(v.snapshot_was_large(g(PAGE_SIZE_2M)));
    assert_eq!(v.table().translate(&sim, g(PAGE_SIZE_2M)).unwrap().leaf.size, PageSize::Size4K);
    let in_use = sim.frames_in_use();
    v.sim_write(&mut sim, &mut hooks, 1, g(0x20_1008), &[9; 8]).unwrap();
    v.sim_write(&mut sim, &mut hooks, 1, g(0x20_1010), &[9; 8]).unwrap(); // no second copy
    assert_eq!(sim.frames_in_use(), in_use + 1);
    let s = v.snapshot_stats().unwrap();
    assert_eq!((s.copies, s.preserved_frames), (1, 1));
    // The page the guest wrote reads back as before; the guest sees its write.
    let mut b = [0u8; 4096];
    assert_eq!(v.snapshot_take(&mut sim, &mut hooks, g(0x20_1000), &mut b, &mut |_| {}), Ok(Taken::Data));
    assert!(b == pattern(1));
    assert_eq!(sim.frames_in_use(), in_use, "the copy went back once read");
    let mut now = [0u8; 8];
    v.sim_read(&mut sim, &mut hooks, 0, g(0x20_1008), &mut now).unwrap();
    assert_eq!(now, [9; 8]);
    // Another copy, then stop before it is read: freed.
    v.sim_write(&mut sim, &mut hooks, 0, g(0x30_0000), &[1; 8]).unwrap();
    assert_eq!(sim.frames_in_use(), in_use + 1);
    v.stop_snapshot(&mut sim, &mut |_| {}).unwrap();
    assert_eq!(v.table().translate(&sim, g(PAGE_SIZE_2M)).unwrap().leaf.size, PageSize::Size2M);
    assert!(matches!(v.stop_snapshot(&mut sim, &mut |_| {}), Err(Error::SnapshotState { running: false })));
    v.check_invariants(&sim);
    // A snapshot still running when the VM is freed gives its copies back.
    v.start_snapshot(&mut sim, &mut |_| {}).unwrap();
    v.sim_write(&mut sim, &mut hooks, 0, g(0x5000), &[1; 8]).unwrap();
    free(v, &mut sim, &mut hooks);
    assert_eq!(sim.frames_in_use(), 0);
}

/// With no frame for the copy the write waits (the fault fails and changes
/// nothing); once the reader took the page, the write goes through without
/// a copy.
fn no_frame_for_the_copy<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut v = vm::<F>(&mut sim, 1, 4, PageSize::Size4K);
    let mut hooks = Hooks::none();
    v.write(&mut sim, &mut hooks, g(0x7000), &pattern(7), &mut |_| {}).unwrap();
    v.start_snapshot(&mut sim, &mut |_| {}).unwrap();
    sim.fail_after(0);
    let out = v.handle_fault(&mut sim, &mut hooks, 0, g(0x7010), AccessKind::Write);
    assert!(matches!(out, FaultOutcome::Failed(Error::OutOfHostFrames)), "{out:?}");
    assert_eq!(v.snapshot_stats().unwrap().pending, 1024);
    let mut b = [0u8; 4096];
    assert_eq!(v.snapshot_take(&mut sim, &mut hooks, g(0x7000), &mut b, &mut |_| {}), Ok(Taken::Data));
    assert!(b == pattern(7));
    v.sim_write(&mut sim, &mut hooks, 0, g(0x7010), &[1; 8]).unwrap();
    sim.stop_failing();
    assert_eq!(v.snapshot_stats().unwrap().copies, 0);
    v.stop_snapshot(&mut sim, &mut |_| {}).unwrap();
    free(v, &mut sim, &mut hooks);
    assert_eq!(sim.frames_in_use(), 0);
}

for_both_formats!(large_pages_and_early_stop, no_frame_for_the_copy);
