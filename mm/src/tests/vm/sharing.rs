//! Page sharing: zero pages, cross-VM sharing with copy-on-write isolation,
//! hash collisions never merge different pages, large-page opportunities.

use super::{free, g, pattern, vm};
use crate::addr::{PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::paging::{Access, EntryFormat, PageSize};
use crate::sim::SimPhys;
use crate::swap_hook::MemStore;
use crate::tests::for_both_formats;
use crate::vm_memory::{AccessKind, FaultOutcome, Hooks, PageState, SharingIndex};

fn zero_pages_share_one_frame<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut index = SharingIndex::with_hint_slots(&mut sim, 1024).unwrap();
    let mut v = vm::<F>(&mut sim, 1, 2, PageSize::Size4K);
    let mut hooks = Hooks::sharing(&mut index);
    for p in [3u64, 100, 511] {
        v.write(&mut sim, &mut hooks, g(p * PAGE_SIZE_4K + 7), &[p as u8], &mut |_| {}).unwrap();
    }
    let before = sim.frames_in_use();
    // A budget: only 100 pages per call.
    let r = v.share_scan(&mut sim, hooks.sharing.as_deref_mut().unwrap(), 100, &mut |_| {});
    assert_eq!((r.scanned, r.zero_merged), (100, 99));
    let r2 = v.share_scan(&mut sim, hooks.sharing.as_deref_mut().unwrap(), 1000, &mut |_| {});
    assert_eq!(r2.scanned, 512, "a scan visits each page at most once per call");
    assert_eq!(r.zero_merged + r2.zero_merged, 509);
    assert_eq!(r2.already_shared, 99);
    assert_eq!(sim.frames_in_use(), before - 509, "509 zero pages gave their frames back");
    assert_eq!(v.state_counts().zero, 509);
    let zero = hooks.sharing.as_deref().unwrap().zero_frame();
    let t = v.table().translate(&sim, g(0)).unwrap();
    assert_eq!(t.hpa, zero);
    assert_eq!(v.pages_in_frame(zero).len(), 509, "the zero frame holds every zero page");
    assert_eq!(t.leaf.access, Access::RX);
    v.check_invariants(&sim);
    // A write to a zero page gives it a private frame; the others stay.
    v.sim_write(&mut sim, &mut hooks, 2, g(0x10), &[0xAB]).unwrap();
    assert_eq!(v.page_state(g(0)), Some(PageState::Present));
    assert_eq!(v.page_state(g(0x1000)), Some(PageState::Zero));
    let mut b = [0u8; 2];
    v.sim_read(&mut sim, &mut hooks, 1, g(0x10), &mut b).unwrap();
    assert_eq!(b, [0xAB, 0]);
    v.sim_read(&mut sim, &mut hooks, 1, g(0x1010), &mut b).unwrap();
    assert_eq!(b, [0, 0]);
    // SAFETY: the zero frame is live and only read here.
    let zero_byte = unsafe { crate::hal::PhysMem::phys_to_ptr(&sim, zero).add(0x10).read() };
    assert_eq!(zero_byte, 0, "the write must not reach the zero frame");
    assert_eq!(hooks.sharing.as_deref().unwrap().stats().zero_refs, 508);
    v.check_invariants(&sim);
    free(v, &mut sim, &mut hooks);
    assert_eq!(index.stats().zero_refs, 0);
    // SAFETY: no VM uses the index any more.
    unsafe { index.free(&mut sim) };
    assert_eq!(sim.frames_in_use(), 0);
}

/// Two VMs hold the same page; after sharing, one writes: the other still
/// reads the old contents, and the writer reads its own.
fn cow_isolates_vms<F: EntryFormat>() {
    let mut sim = SimPhys::new(8192);
    let mut index = SharingIndex::with_hint_slots(&mut sim, 1024).unwrap();
    let mut a = vm::<F>(&mut sim, 1, 2, PageSize::Size2M);
    let mut b = vm::<F>(&mut sim, 2, 2, PageSize::Size2M);
    let mut hooks = Hooks::sharing(&mut index);
    let page = pattern(42);
    let other = pattern(43);
    a.write(&mut sim, &mut hooks, g(0x5000), &page, &mut |_| {}).unwrap();
    b.write(&mut sim, &mut hooks, g(0x9000), &page, &mut |_| {}).unwrap();
    b.write(&mut sim, &mut hooks, g(0xA000), &page, &mut |_| {}).unwrap();
    a.write(&mut sim, &mut hooks, g(0x6000), &other, &mut |_| {}).unwrap();
    // Small mappings, so the scan shares instead of only counting.
    for v in [&mut a, &mut b] {
        let mut inv = crate::paging::Invalidation::none();
        for p in 0..512 {
            v.split_to_4k(&mut sim, g(p * PAGE_SIZE_4K), &mut inv).unwrap();
        }
        inv.flush(&mut sim, |_| {});
    }
    let before = sim.frames_in_use();
    for _ in 0..2 {
        for v in [&mut a, &mut b] {
            v.share_scan(&mut sim, hooks.sharing.as_deref_mut().unwrap(), 512, &mut |_| {});
            v.check_invariants(&sim);
        }
    }
    let stats = hooks.sharing.as_deref().unwrap().stats();
    assert_eq!(stats.shared_frames, 1);
    assert_eq!(stats.shared_refs, 3, "{stats:?}");
    assert_eq!(a.page_state(g(0x6000)), Some(PageState::Present), "a unique page is not shared");
    let ta = a.table().translate(&sim, g(0x5000)).unwrap();
    let tb = b.table().translate(&sim, g(0x9000)).unwrap();
    assert_eq!(ta.hpa, tb.hpa, "both VMs map the one shared frame");
    assert_eq!(ta.leaf.access, Access::RX);
    // 1 shared frame replaced 3 private ones; 510 + 510 zero pages went to
    // the zero frame.
    assert_eq!(sim.frames_in_use(), before + 1 - 3 - 510 - 510);

    a.sim_write(&mut sim, &mut hooks, 0, g(0x5008), &[0xFF; 4]).unwrap();
    let mut got = [0u8; 4096];
    b.sim_read(&mut sim, &mut hooks, 0, g(0x9000), &mut got).unwrap();
    assert_eq!(got, page, "VM b must not see VM a's write");
    b.sim_read(&mut sim, &mut hooks, 3, g(0xA000), &mut got).unwrap();
    assert_eq!(got, page);
    a.sim_read(&mut sim, &mut hooks, 1, g(0x5000), &mut got).unwrap();
    let mut want = page;
    want[8..12].copy_from_slice(&[0xFF; 4]);
    assert_eq!(got, want, "VM a reads its own write");
    assert_eq!(hooks.sharing.as_deref().unwrap().stats().shared_refs, 2);
    // b's two pages break too; the last one takes the frame over.
    b.sim_write(&mut sim, &mut hooks, 0, g(0x9000), &[1]).unwrap();
    b.sim_write(&mut sim, &mut hooks, 0, g(0xA000), &[2]).unwrap();
    let stats = hooks.sharing.as_deref().unwrap().stats();
    assert_eq!((stats.shared_frames, stats.shared_refs), (0, 0));
    b.sim_read(&mut sim, &mut hooks, 0, g(0xA000), &mut got).unwrap();
    assert_eq!(got[0], 2);
    assert_eq!(got[1..], page[1..]);
    a.check_invariants(&sim);
    b.check_invariants(&sim);
    free(a, &mut sim, &mut hooks);
    free(b, &mut sim, &mut hooks);
    // SAFETY: no VM uses the index any more.
    unsafe { index.free(&mut sim) };
    assert_eq!(sim.frames_in_use(), 0);
}

/// Pages with equal hashes but different bytes are never merged: forge a
/// collision by putting a different page under an existing hash.
fn hash_match_is_verified<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut index = SharingIndex::with_hint_slots(&mut sim, 1024).unwrap();
    let mut v = vm::<F>(&mut sim, 1, 2, PageSize::Size4K);
    let mut hooks = Hooks::sharing(&mut index);
    let p = pattern(1);
    v.write(&mut sim, &mut hooks, g(0x1000), &p, &mut |_| {}).unwrap();
    v.write(&mut sim, &mut hooks, g(0x2000), &p, &mut |_| {}).unwrap();
    let idx = hooks.sharing.as_deref_mut().unwrap();
    v.share_scan(&mut sim, idx, 512, &mut |_| {});
    assert_eq!(v.page_state(g(0x2000)), Some(PageState::Shared));
    // Point the hash of pattern(2) at the shared frame of pattern(1).
    let h2 = xxhash_rust::xxh3::xxh3_64(&pattern(2));
    let shared = v.table().translate(&sim, g(0x2000)).unwrap().hpa;
    idx.forge_hash(h2, shared);
    v.write(&mut sim, &mut Hooks::sharing(idx), g(0x3000), &pattern(2), &mut |_| {}).unwrap();
    v.share_scan(&mut sim, idx, 512, &mut |_| {});
    assert_eq!(v.page_state(g(0x3000)), Some(PageState::Present), "different bytes must not merge");
    let mut got = [0u8; 4096];
    v.peek(&sim, g(0x3000), &mut got).unwrap();
    assert_eq!(got, pattern(2));
    v.check_invariants(&sim);
    free(v, &mut sim, &mut hooks);
    // SAFETY: no VM uses the index any more.
    unsafe { index.free(&mut sim) };
    assert_eq!(sim.frames_in_use(), 0);
}

/// Sharing opportunities inside large pages are counted, not taken, until
/// memory is scarce; then cold large pages are broken and shared, hot ones
/// stay large.
fn large_page_opportunities<F: EntryFormat>() {
    let mut sim = SimPhys::new(8192);
    let mut index = SharingIndex::with_hint_slots(&mut sim, 1024).unwrap();
    let mut v = vm::<F>(&mut sim, 1, 8, PageSize::Size2M);
    let mut hooks = Hooks::sharing(&mut index);
    // Regions 0 and 1: 10 non-zero pages each (the rest zero); region 1's
    // pages duplicate region 0's. Regions 2 and 3: all pages unique.
    for p in 0..10u64 {
        v.write(&mut sim, &mut hooks, g(p * PAGE_SIZE_4K), &pattern(p), &mut |_| {}).unwrap();
        v.write(&mut sim, &mut hooks, g(PAGE_SIZE_2M + p * PAGE_SIZE_4K), &pattern(p), &mut |_| {}).unwrap();
    }
    for p in 0..1024u64 {
        v.write(&mut sim, &mut hooks, g(2 * PAGE_SIZE_2M + p * PAGE_SIZE_4K), &pattern(1000 + p), &mut |_| {}).unwrap();
    }
    let frames = sim.frames_in_use();
    let r = v.share_scan(&mut sim, hooks.sharing.as_deref_mut().unwrap(), 2048, &mut |_| {});
    assert_eq!(r.zero_merged + r.shared_merged, 0, "large pages are not broken by a scan");
    assert_eq!(sim.frames_in_use(), frames);
    // Region 0: 502 zero pages; region 1: 502 zero + 10 duplicates.
    let est = v.large_page_sharing();
    assert_eq!(est.regions, 2, "{est:?}");
    assert_eq!(est.pages, 502 + 512);
    assert_eq!(est.bytes, (502 + 512) * PAGE_SIZE_4K);
    assert_eq!(r.large_opportunities, 502 + 512);
    // Region 0 is touched after the scan (hot); region 1 is not (cold).
    let mut b = [0u8; 1];
    v.sim_read(&mut sim, &mut hooks, 0, g(0x100), &mut b).unwrap();
    let r = v.break_cold_large_pages(&mut sim, hooks.sharing.as_deref_mut().unwrap(), 8, &mut |_| {});
    assert_eq!(r.large_broken, 1);
    assert_eq!(r.zero_merged, 502);
    assert_eq!(r.frames_freed, 502 + r.shared_merged);
    assert!(r.shared_merged + r.promoted > 0, "{r:?}");
    assert_eq!(v.table().translate(&sim, g(0)).unwrap().leaf.size, PageSize::Size2M, "hot stays large");
    assert_eq!(v.table().translate(&sim, g(PAGE_SIZE_2M)).unwrap().leaf.size, PageSize::Size4K);
    assert_eq!(v.large_page_sharing().regions, 1);
    // Contents unchanged.
    let mut got = [0u8; 4096];
    for p in 0..10u64 {
        v.sim_read(&mut sim, &mut hooks, 1, g(PAGE_SIZE_2M + p * PAGE_SIZE_4K), &mut got).unwrap();
        assert_eq!(got, pattern(p));
    }
    v.check_invariants(&sim);
    free(v, &mut sim, &mut hooks);
    // SAFETY: no VM uses the index any more.
    unsafe { index.free(&mut sim) };
    assert_eq!(sim.frames_in_use(), 0);
}

/// A guest that writes every page after its zero pages were merged gives
/// each page a private replacement frame; a guest that then has every page
/// swapped out gives each a slot. Neither may grow the manager's heap: a
/// side map of such pages once grew by 16.5 MiB per GiB, and its growth
/// failing on a full heap was a host panic.
fn bookkeeping_does_not_grow_with_guest_writes<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut index = SharingIndex::with_hint_slots(&mut sim, 1024).unwrap();
    let mut v = vm::<F>(&mut sim, 1, 4, PageSize::Size4K);
    let at_start = v.bookkeeping_bytes();
    let pages = v.pages();
    let mut hooks = Hooks::sharing(&mut index);
    let r = v.share_scan(&mut sim, hooks.sharing.as_deref_mut().unwrap(), pages as usize, &mut |_| {});
    assert_eq!(r.zero_merged, pages);
    for p in 0..pages {
        v.sim_write(&mut sim, &mut hooks, 0, g(p * PAGE_SIZE_4K), &p.to_le_bytes()).unwrap();
    }
    assert_eq!(v.state_counts().present, pages, "every page has its own frame again");
    assert_eq!(v.bookkeeping_bytes(), at_start, "copy-on-write breaks grew the bookkeeping");
    let mut store = MemStore::new();
    for p in 0..pages {
        v.swap_out(&mut sim, g(p * PAGE_SIZE_4K), &mut store, hooks.sharing.as_deref_mut(), &mut |_| {}).unwrap();
    }
    assert_eq!(v.state_counts().swapped, pages);
    assert_eq!(v.bookkeeping_bytes(), at_start, "swap-out grew the bookkeeping");
    // Every page comes back with its own contents from its own slot.
    let mut hooks = Hooks { sharing: Some(&mut index), store: Some(&mut store), source: None };
    for p in (0..pages).rev() {
        let mut b = [0u8; 8];
        v.sim_read(&mut sim, &mut hooks, 0, g(p * PAGE_SIZE_4K), &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), p);
    }
    v.check_invariants(&sim);
    free(v, &mut sim, &mut hooks);
    assert_eq!(store.live_slots(), 0);
    // SAFETY: no VM uses the index any more.
    unsafe { index.free(&mut sim) };
    assert_eq!(sim.frames_in_use(), 0);
}

/// A shared frame poisoned through one of its pages stays quarantined: the
/// last other sharer's write must neither take it over as its private frame
/// (it would be freed and reused) nor copy it. Found by the mm_fault fuzz
/// target's frame accounting.
fn a_poisoned_shared_frame_is_never_taken_over<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut index = SharingIndex::with_hint_slots(&mut sim, 1024).unwrap();
    let mut v = vm::<F>(&mut sim, 1, 2, PageSize::Size4K);
    let mut hooks = Hooks::sharing(&mut index);
    for p in [10u64, 11] {
        v.write(&mut sim, &mut hooks, g(p * PAGE_SIZE_4K), &pattern(5), &mut |_| {}).unwrap();
    }
    for _ in 0..2 {
        v.share_scan(&mut sim, hooks.sharing.as_deref_mut().unwrap(), 512, &mut |_| {});
    }
    assert_eq!(v.page_state(g(11 * PAGE_SIZE_4K)), Some(PageState::Shared));
    let frame = v.table().translate(&sim, g(11 * PAGE_SIZE_4K)).unwrap().hpa;
    // A machine check on the shared frame names both pages in it.
    assert_eq!(v.pages_in_frame(frame), [g(10 * PAGE_SIZE_4K), g(11 * PAGE_SIZE_4K)]);
    v.mark_poisoned(&mut sim, &mut hooks, g(10 * PAGE_SIZE_4K), &mut |_| {}).unwrap();
    let out = v.handle_fault(&mut sim, &mut hooks, 0, g(11 * PAGE_SIZE_4K), AccessKind::Write);
    assert!(matches!(out, FaultOutcome::Poisoned), "{out:?}");
    assert_eq!(v.page_state(g(11 * PAGE_SIZE_4K)), Some(PageState::Shared));
    v.check_invariants(&sim);
    free(v, &mut sim, &mut hooks);
    // SAFETY: no VM uses the index any more.
    unsafe { index.free(&mut sim) };
    // Page 10's frame went to the sharing index when it was merged, so
    // only the poisoned shared frame stays out of the pool.
    assert_eq!(sim.frames_in_use(), 1);
    assert!(sim.contains(frame));
}

for_both_formats!(
    zero_pages_share_one_frame,
    cow_isolates_vms,
    hash_match_is_verified,
    large_page_opportunities,
    bookkeeping_does_not_grow_with_guest_writes,
    a_poisoned_shared_frame_is_never_taken_over,
);
