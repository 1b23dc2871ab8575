//! Accessed/dirty harvesting.

use alloc::vec::Vec;

use super::{destroy, flush, table_sim};
use crate::addr::{GuestPhysAddr as G, HostPhysAddr as H};
use crate::paging::{Access, EntryFormat, FlushScope, MemType, NestedPageTable, PageSize};

use PageSize::{Size2M, Size4K};

fn dirty_pages_reported_once<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    let mut map = |gpa: u64, size| {
        let inv = t.map(&mut sim, G(gpa), H(gpa), size, Access::RWX, MemType::WriteBack).unwrap();
        assert!(inv.is_none());
        inv.flush(&mut sim, |_| {});
    };
    map(0x20_0000, Size2M);
    for i in 0..16 {
        map(0x100_0000 + i * 0x1000, Size4K);
    }
    map(0x4000_0000, Size4K); // outside the harvested range
    // Writes to some pages (twice to one), reads from others.
    for (gpa, write) in [
        (0x20_1234, true),
        (0x3F_FFFF, true),
        (0x100_3000, true),
        (0x100_3008, true),
        (0x100_5000, false),
        (0x100_F000, true),
        (0x4000_0000, true),
    ] {
        assert!(t.simulate_access(&sim, G(gpa), write));
    }
    let range = G(0)..G(0x4000_0000);

    let mut dirty = Vec::new();
    let inv = t.test_and_clear_dirty(&sim, range.clone(), |gpa, size| dirty.push((gpa.0, size)));
    assert_eq!(dirty, [(0x20_0000, Size2M), (0x100_3000, Size4K), (0x100_F000, Size4K)]);
    // The flush covers everything cleared.
    let scope = flush(inv, &mut sim).unwrap();
    assert!(dirty.iter().all(|&(g, _)| scope.covers(G(g))));
    assert_eq!(scope, FlushScope::Range { start: G(0x20_0000), len: 0x101_0000 - 0x20_0000 });

    // Reported once: a second harvest finds nothing and needs no flush.
    let inv = t.test_and_clear_dirty(&sim, range.clone(), |gpa, _| panic!("{gpa:?} reported twice"));
    assert!(inv.is_none());
    flush(inv, &mut sim);
    // Accessed bits were left alone; the page outside the range kept D.
    assert!(t.translate(&sim, G(0x100_3000)).unwrap().leaf.accessed);
    assert!(!t.translate(&sim, G(0x100_3000)).unwrap().leaf.dirty);
    assert!(t.translate(&sim, G(0x4000_0000)).unwrap().leaf.dirty);

    // A new write is reported again.
    assert!(t.simulate_access(&sim, G(0x100_3000), true));
    let mut again = Vec::new();
    let inv = t.test_and_clear_dirty(&sim, range, |gpa, size| again.push((gpa.0, size)));
    flush(inv, &mut sim);
    assert_eq!(again, [(0x100_3000, Size4K)]);
    destroy(t, &mut sim, 0);
}

fn accessed_sampling<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    for i in 0..8 {
        let inv = t.map(&mut sim, G(i << 21), H(i << 21), Size2M, Access::RW, MemType::WriteBack).unwrap();
        inv.flush(&mut sim, |_| {});
    }
    for i in [1u64, 4, 6] {
        assert!(t.simulate_access(&sim, G((i << 21) + 0x40), false));
    }
    // A range starting inside page 4 still reports page 4, by its base.
    let mut hot = Vec::new();
    let inv = t.test_and_clear_accessed(&sim, G((4 << 21) + 0x1000)..G(8 << 21), |gpa, _| hot.push(gpa.0 >> 21));
    flush(inv, &mut sim);
    assert_eq!(hot, [4, 6]);
    let mut rest = Vec::new();
    let inv = t.test_and_clear_accessed(&sim, G(0)..G(u64::MAX), |gpa, _| rest.push(gpa.0 >> 21));
    flush(inv, &mut sim);
    assert_eq!(rest, [1]);
    assert!(all_clear::<F>(&t, &sim));
    destroy(t, &mut sim, 0);
}

fn all_clear<F: EntryFormat>(t: &NestedPageTable<F>, sim: &crate::sim::SimPhys) -> bool {
    super::all_mappings(t, sim).iter().all(|m| !m.leaf.accessed && !m.leaf.dirty)
}

super::for_both_formats!(dirty_pages_reported_once, accessed_sampling);
