//! Ballooning and swap: frames go back to and come from the host pool, and
//! contents survive (or a corrupt store is refused).

use alloc::vec::Vec;

use super::{free, g, pattern, vm};
use crate::addr::{GuestPhysAddr, PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::error::Error;
use crate::paging::{EntryFormat, PageSize};
use crate::sim::SimPhys;
use crate::swap_hook::{MemStore, PageStore};
use crate::tests::for_both_formats;
use crate::vm_memory::{AccessKind, FaultOutcome, Hooks, PageState, SharingIndex};

fn balloon_returns_and_takes_frames<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut v = vm::<F>(&mut sim, 1, 4, PageSize::Size2M);
    let mut hooks = Hooks::none();
    v.set_balloon_target(300);
    assert_eq!(v.balloon_delta(), 300);
    v.set_balloon_target(1 << 40);
    assert_eq!(v.balloon_target(), 1024, "clamped to the VM's pages");
    v.set_balloon_target(300);
    let used = sim.frames_in_use();
    // The guest's list: 300 good pages, plus garbage, duplicates, MMIO.
    let mut list: Vec<GuestPhysAddr> = (0..300).map(|i| g(i * 3 * PAGE_SIZE_4K + 0x10)).collect();
    list.extend([g(0x10), g(4 << 20), g(u64::MAX), g(1 << 50), g(3 * PAGE_SIZE_4K)]);
    let r = v.balloon_inflate(&mut sim, &mut hooks, &list, &mut |_| {});
    assert_eq!((r.accepted, r.rejected, r.frames), (300, 5, 300));
    // The two 2 MiB pages holding them were split: two table frames.
    let used = used + 2;
    assert_eq!(v.memory_report().page_table_bytes / PAGE_SIZE_4K, 3 + 2);
    assert_eq!(sim.frames_in_use(), used - 300, "frames went back to the pool");
    assert_eq!(v.balloon_pages(), 300);
    assert_eq!(v.balloon_delta(), 0);
    assert_eq!(v.page_state(g(3 * PAGE_SIZE_4K)), Some(PageState::Ballooned));
    assert!(v.table().translate(&sim, g(0)).is_none());
    v.check_invariants(&sim);
    // Deflate half: frames come back from the pool, pages read zero.
    let back: Vec<GuestPhysAddr> = list[..150].to_vec();
    v.write(&mut sim, &mut hooks, g(PAGE_SIZE_4K), &[9], &mut |_| {}).unwrap(); // not ballooned: refused below
    let r = v.balloon_deflate(&mut sim, &[&back[..], &[g(PAGE_SIZE_4K)]].concat(), &mut |_| {}).unwrap();
    assert_eq!((r.accepted, r.rejected, r.frames), (150, 1, 150));
    assert_eq!(sim.frames_in_use(), used - 150);
    let mut b = [0xFFu8; 16];
    v.sim_read(&mut sim, &mut hooks, 0, g(0), &mut b).unwrap();
    assert_eq!(b, [0; 16]);
    // The guest touches a page still in the balloon: backed again (zeros).
    v.sim_write(&mut sim, &mut hooks, 1, g(299 * 3 * PAGE_SIZE_4K), &[7]).unwrap();
    assert_eq!(v.balloon_pages(), 149);
    assert_eq!(sim.frames_in_use(), used - 149);
    // Out of host memory while deflating: stops, the rest stays ballooned.
    sim.fail_after(10);
    let err = v.balloon_deflate(&mut sim, &list[150..299], &mut |_| {});
    sim.stop_failing();
    assert!(matches!(err, Err(Error::OutOfHostFrames)));
    assert_eq!(v.balloon_pages(), 139);
    v.check_invariants(&sim);
    free(v, &mut sim, &mut hooks);
    assert_eq!(sim.frames_in_use(), 0);
}

fn balloon_releases_shared_and_swapped<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut index = SharingIndex::with_hint_slots(&mut sim, 64).unwrap();
    let mut store = MemStore::new();
    let mut v = vm::<F>(&mut sim, 1, 2, PageSize::Size4K);
    v.write(&mut sim, &mut Hooks::none(), g(0x2000), &pattern(5), &mut |_| {}).unwrap();
    v.share_scan(&mut sim, &mut index, 4, &mut |_| {}); // pages 0, 1, 3 -> zero
    v.swap_out(&mut sim, g(0x2000), &mut store, None, &mut |_| {}).unwrap();
    assert_eq!(store.live_slots(), 1);
    // Without the hooks those pages are refused, not leaked.
    let r = v.balloon_inflate(&mut sim, &mut Hooks::none(), &[g(0), g(0x2000)], &mut |_| {});
    assert_eq!((r.accepted, r.rejected), (0, 2));
    let mut hooks = Hooks { sharing: Some(&mut index), store: Some(&mut store), source: None };
    let r = v.balloon_inflate(&mut sim, &mut hooks, &[g(0), g(0x2000)], &mut |_| {});
    assert_eq!((r.accepted, r.rejected, r.frames), (2, 0, 0));
    assert_eq!(store.live_slots(), 0);
    assert_eq!(index.stats().zero_refs, 2);
    v.check_invariants(&sim);
    free(v, &mut sim, &mut Hooks::sharing(&mut index));
    // SAFETY: no VM uses the index any more.
    unsafe { index.free(&mut sim) };
    assert_eq!(sim.frames_in_use(), 0);
}

fn swap_round_trip<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut store = MemStore::new();
    let mut v = vm::<F>(&mut sim, 1, 4, PageSize::Size2M);
    let mut hooks = Hooks::none();
    for p in 0..8u64 {
        v.write(&mut sim, &mut hooks, g(PAGE_SIZE_2M + p * PAGE_SIZE_4K), &pattern(p), &mut |_| {}).unwrap();
    }
    let used = sim.frames_in_use();
    for p in 0..8u64 {
        v.swap_out(&mut sim, g(PAGE_SIZE_2M + p * PAGE_SIZE_4K), &mut store, None, &mut |_| {}).unwrap();
    }
    // One table frame for the split 2 MiB page, eight guest frames freed.
    assert_eq!(sim.frames_in_use(), used + 1 - 8);
    assert_eq!(v.state_counts().swapped, 8);
    assert_eq!(store.live_slots(), 8);
    assert!(matches!(
        v.swap_out(&mut sim, g(PAGE_SIZE_2M), &mut store, None, &mut |_| {}),
        Err(Error::WrongPageState { state: PageState::Swapped, .. })
    ));
    v.check_invariants(&sim);
    // A swapped page faults without a store: fails, stays swapped.
    assert!(matches!(
        v.handle_fault(&mut sim, &mut hooks, 0, g(PAGE_SIZE_2M), AccessKind::Read),
        FaultOutcome::Failed(Error::MissingHook(_))
    ));
    let mut hooks = Hooks { store: Some(&mut store), ..Hooks::none() };
    let mut got = [0u8; 4096];
    for p in (0..8u64).rev() {
        v.sim_read(&mut sim, &mut hooks, (p % 4) as usize, g(PAGE_SIZE_2M + p * PAGE_SIZE_4K), &mut got).unwrap();
        assert_eq!(got, pattern(p), "page {p} came back different");
    }
    assert_eq!(store.live_slots(), 0, "slots released after page-in");
    assert_eq!(sim.frames_in_use(), used + 1);
    v.check_invariants(&sim);
    free(v, &mut sim, &mut Hooks::none());
    assert_eq!(sim.frames_in_use(), 0);
}

fn corrupt_store_is_an_error<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut store = MemStore::new();
    let mut v = vm::<F>(&mut sim, 1, 4, PageSize::Size2M);
    let mut hooks = Hooks::none();
    v.write(&mut sim, &mut hooks, g(0x7000), &pattern(7), &mut |_| {}).unwrap();
    v.write(&mut sim, &mut hooks, g(0x8000), &pattern(8), &mut |_| {}).unwrap();
    v.swap_out(&mut sim, g(0x7000), &mut store, None, &mut |_| {}).unwrap();
    assert!(store.corrupt(0));
    let used = sim.frames_in_use();
    let mut hooks = Hooks { store: Some(&mut store), ..Hooks::none() };
    let mut got = [0u8; 4096];
    for vcpu in 0..2 {
        match v.sim_read(&mut sim, &mut hooks, vcpu, g(0x7000), &mut got) {
            Err(FaultOutcome::Failed(Error::PageStoreCorrupt { gpa })) => assert_eq!(gpa, g(0x7000)),
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(v.write(&mut sim, &mut hooks, g(0x7000), &[1], &mut |_| {}), Err(Error::PageStoreCorrupt { .. })));
    assert_eq!(v.page_state(g(0x7000)), Some(PageState::Swapped), "the page stays swapped");
    assert_eq!(sim.frames_in_use(), used, "a failed page-in keeps no frame");
    // The rest of the VM is intact.
    v.sim_read(&mut sim, &mut hooks, 0, g(0x8000), &mut got).unwrap();
    assert_eq!(got, pattern(8));
    assert_eq!(store.live_slots(), 1);
    v.check_invariants(&sim);
    free(v, &mut sim, &mut Hooks { store: Some(&mut store), ..Hooks::none() });
    assert_eq!(store.live_slots(), 0);
    assert_eq!(sim.frames_in_use(), 0);
}

fn full_store_leaves_page_mapped<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut store = MemStore::with_capacity(1);
    let mut index = SharingIndex::with_hint_slots(&mut sim, 64).unwrap();
    let mut v = vm::<F>(&mut sim, 1, 2, PageSize::Size4K);
    let mut hooks = Hooks::none();
    v.write(&mut sim, &mut hooks, g(0x1000), &pattern(1), &mut |_| {}).unwrap();
    v.write(&mut sim, &mut hooks, g(0x2000), &pattern(2), &mut |_| {}).unwrap();
    v.swap_out(&mut sim, g(0x1000), &mut store, None, &mut |_| {}).unwrap();
    let used = sim.frames_in_use();
    let e = v.swap_out(&mut sim, g(0x2000), &mut store, None, &mut |_| {});
    assert!(matches!(e, Err(Error::PageStoreFull)));
    assert_eq!(v.page_state(g(0x2000)), Some(PageState::Present));
    assert_eq!(sim.frames_in_use(), used);
    let mut got = [0u8; 4096];
    v.sim_read(&mut sim, &mut hooks, 0, g(0x2000), &mut got).unwrap();
    assert_eq!(got, pattern(2));
    // Zero pages are not worth swapping; shared pages need the index.
    v.share_scan(&mut sim, &mut index, 8, &mut |_| {});
    assert!(matches!(
        v.swap_out(&mut sim, g(0x3000), &mut store, None, &mut |_| {}),
        Err(Error::WrongPageState { .. })
    ));
    assert!(v.swap_out(&mut sim, g(1 << 30), &mut store, None, &mut |_| {}).is_err());
    v.check_invariants(&sim);
    free(v, &mut sim, &mut Hooks { sharing: Some(&mut index), store: Some(&mut store), source: None });
    // SAFETY: no VM uses the index any more.
    unsafe { index.free(&mut sim) };
    assert_eq!(sim.frames_in_use(), 0);
}

#[test]
fn mem_store_checks_owner_and_checksum() {
    let mut s = MemStore::new();
    let a = s.page_out(g(0x1000), &pattern(1)).unwrap();
    let b = s.page_out(g(0x2000), &pattern(2)).unwrap();
    let mut page = [0u8; 4096];
    assert!(matches!(s.page_in(a, g(0x2000), &mut page), Err(Error::PageStoreCorrupt { .. })), "wrong owner");
    s.page_in(b, g(0x2000), &mut page).unwrap();
    assert_eq!(page, pattern(2));
    s.release(a);
    assert!(s.page_in(a, g(0x1000), &mut page).is_err(), "released slot");
    assert_eq!(s.live_slots(), 1);
}

for_both_formats!(
    balloon_returns_and_takes_frames,
    balloon_releases_shared_and_swapped,
    swap_round_trip,
    corrupt_store_is_an_error,
    full_store_leaves_page_mapped,
);
