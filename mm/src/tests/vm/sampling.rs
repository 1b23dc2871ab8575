//! Access sampling of large pages, large-page ranking, usage estimates.

use super::{free, g, pattern, vm};
use crate::addr::{PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::error::Error;
use crate::paging::{EntryFormat, PageSize};
use crate::sim::SimPhys;
use crate::tests::for_both_formats;
use crate::vm_memory::{Hooks, SampledRegion, SharingIndex};

fn demote_count_restore<F: EntryFormat>() {
    let mut sim = SimPhys::new(8192);
    let mut v = vm::<F>(&mut sim, 1, 8, PageSize::Size2M);
    let mut hooks = Hooks::none();
    let regions = [g(0), g(PAGE_SIZE_2M), g(2 * PAGE_SIZE_2M), g(2 * PAGE_SIZE_2M + 0x1000)];
    let n = v.start_access_sampling(&mut sim, &regions, &mut |_| {}).unwrap();
    assert_eq!(n, 3, "duplicates count once");
    assert!(matches!(v.start_access_sampling(&mut sim, &regions, &mut |_| {}), Err(Error::SamplingState { .. })));
    assert_eq!(v.table().translate(&sim, g(0)).unwrap().leaf.size, PageSize::Size4K);
    v.check_invariants(&sim);
    // Region 0: 300 pages touched (hot); region 1: 3 (cold); region 2: none.
    let mut b = [0u8; 1];
    for p in 0..300 {
        v.sim_read(&mut sim, &mut hooks, (p % 4) as usize, g(p * PAGE_SIZE_4K), &mut b).unwrap();
    }
    for p in [0u64, 10, 10, 20] {
        v.sim_write(&mut sim, &mut hooks, 0, g(PAGE_SIZE_2M + p * PAGE_SIZE_4K), &[1]).unwrap();
    }
    let got = v.finish_access_sampling(&mut sim, 64, &mut |_| {}).unwrap();
    assert_eq!(
        got,
        [
            SampledRegion { gpa: g(0), accessed: 300, restored: true },
            SampledRegion { gpa: g(PAGE_SIZE_2M), accessed: 3, restored: false },
            SampledRegion { gpa: g(2 * PAGE_SIZE_2M), accessed: 0, restored: false },
        ]
    );
    assert_eq!(v.table().translate(&sim, g(0)).unwrap().leaf.size, PageSize::Size2M);
    assert_eq!(v.table().translate(&sim, g(PAGE_SIZE_2M)).unwrap().leaf.size, PageSize::Size4K);
    assert!(!v.sampling_active());
    v.check_invariants(&sim);

    // Heat ranking over small-mapped regions: region 2 hotter than 1.
    for round in 0..3 {
        for p in 0..100u64 {
            v.sim_read(&mut sim, &mut hooks, 0, g(2 * PAGE_SIZE_2M + p * PAGE_SIZE_4K), &mut b).unwrap();
        }
        v.sim_read(&mut sim, &mut hooks, 0, g(PAGE_SIZE_2M + round * PAGE_SIZE_4K), &mut b).unwrap();
        assert_eq!(v.update_heat(&mut sim, &mut |_| {}), 2);
    }
    let ranked = v.rank_for_large_mapping(&sim, 8);
    assert_eq!(ranked.len(), 2, "{ranked:?}");
    assert_eq!(ranked[0].gpa, g(2 * PAGE_SIZE_2M));
    assert!(ranked[0].heat > 80 && ranked[1].heat <= 1, "{ranked:?}");
    assert!(v.promote_large(&mut sim, ranked[0].gpa, &mut |_| {}));
    assert_eq!(v.table().translate(&sim, g(2 * PAGE_SIZE_2M)).unwrap().leaf.size, PageSize::Size2M);
    assert_eq!(v.rank_for_large_mapping(&sim, 8).len(), 1);
    v.check_invariants(&sim);
    free(v, &mut sim, &mut hooks);
    assert_eq!(sim.frames_in_use(), 0);
}

fn usage_classes<F: EntryFormat>() {
    let mut sim = SimPhys::new(8192);
    let mut index = SharingIndex::with_hint_slots(&mut sim, 64).unwrap();
    let mut v = vm::<F>(&mut sim, 1, 4, PageSize::Size4K);
    let mut hooks = Hooks::sharing(&mut index);
    // Pages 0..256: zero-shared. 256..512: private zero. 512..768: data,
    // touched during the interval. 768..896: data, idle. 896..1024: ballooned.
    for p in 512..896u64 {
        v.write(&mut sim, &mut hooks, g(p * PAGE_SIZE_4K), &pattern(p), &mut |_| {}).unwrap();
    }
    v.share_scan(&mut sim, hooks.sharing.as_deref_mut().unwrap(), 256, &mut |_| {});
    let balloon: alloc::vec::Vec<_> = (896..1024u64).map(|p| g(p * PAGE_SIZE_4K)).collect();
    v.balloon_inflate(&mut sim, &mut hooks, &balloon, &mut |_| {});
    v.start_usage_sample(&mut sim, 99, 4000, &mut |_| {});
    let mut b = [0u8; 1];
    for p in 512..768u64 {
        v.sim_read(&mut sim, &mut hooks, 1, g(p * PAGE_SIZE_4K), &mut b).unwrap();
    }
    let est = v.finish_usage_sample(&sim).unwrap();
    assert_eq!(est.total_pages, 1024);
    assert_eq!(est.sampled, 4000);
    assert_eq!(
        est.zero + est.shared + est.accessed + est.idle + est.ballooned + est.swapped + est.not_loaded + est.poisoned,
        4000
    );
    // Each class is a quarter or an eighth of the VM; a 4000-page sample
    // lands within 15% of it.
    for (got, want) in [(est.shared, 256), (est.zero, 256), (est.accessed, 256), (est.idle, 128), (est.ballooned, 128)]
    {
        let scaled = est.scale(got);
        assert!(scaled.abs_diff(want) * 100 <= want * 15, "{est:?}: {scaled} vs {want}");
    }
    assert!(v.finish_usage_sample(&sim).is_err(), "a finished sample is gone");
    free(v, &mut sim, &mut hooks);
    // SAFETY: no VM uses the index any more.
    unsafe { index.free(&mut sim) };
    assert_eq!(sim.frames_in_use(), 0);
}

for_both_formats!(demote_count_restore, usage_classes, second_chance_accessed_bit);

fn second_chance_accessed_bit<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut v = vm::<F>(&mut sim, 1, 4, PageSize::Size4K);
    let mut hooks = Hooks::none();
    let page = g(3 * PAGE_SIZE_4K);
    // Fresh mappings start with A clear.
    assert_eq!(v.test_and_clear_accessed(&sim, page).0, None);
    let mut b = [0u8; 1];
    v.sim_read(&mut sim, &mut hooks, 0, g(page.0 + 100), &mut b).unwrap();
    let (accessed, inv) = v.test_and_clear_accessed(&sim, page);
    assert_eq!(accessed, Some(PageSize::Size4K), "a read sets the accessed bit");
    assert!(inv.scope().is_some(), "clearing a live bit asks for a flush");
    inv.flush(&mut sim, |_| {});
    assert_eq!(v.test_and_clear_accessed(&sim, page).0, None, "reported once");
    // Neighbours are their own pages; an address outside RAM is never accessed.
    v.sim_write(&mut sim, &mut hooks, 0, g(4 * PAGE_SIZE_4K), &[1]).unwrap();
    assert_eq!(v.test_and_clear_accessed(&sim, page).0, None);
    assert_eq!(v.test_and_clear_accessed(&sim, g(4 * PAGE_SIZE_4K)).0, Some(PageSize::Size4K));
    assert_eq!(v.test_and_clear_accessed(&sim, g(64 << 20)).0, None);
    free(v, &mut sim, &mut hooks);
    // A large leaf answers for all of its pages, once.
    let mut v = vm::<F>(&mut sim, 2, 4, PageSize::Size2M);
    v.sim_read(&mut sim, &mut hooks, 0, g(PAGE_SIZE_2M + 0x5000), &mut b).unwrap();
    assert_eq!(v.test_and_clear_accessed(&sim, g(0)).0, None);
    let (accessed, inv) = v.test_and_clear_accessed(&sim, g(PAGE_SIZE_2M + 0x9000));
    assert_eq!(accessed, Some(PageSize::Size2M));
    inv.flush(&mut sim, |_| {});
    assert_eq!(v.test_and_clear_accessed(&sim, g(PAGE_SIZE_2M + 0x5000)).0, None);
    free(v, &mut sim, &mut hooks);
}
