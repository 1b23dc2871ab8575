//! map / translate / unmap / protect, refusals, invalidation scopes, destroy.

use super::{Rng, all_mappings, destroy, flush, table_sim};
use crate::addr::{GUEST_PHYS_LIMIT, GuestPhysAddr as G, HOST_PHYS_LIMIT, HostPhysAddr as H};
use crate::error::Error;
use crate::paging::{Access, EntryFormat, FlushScope, Invalidation, MemType, NestedPageTable, PageSize};
use crate::sim::SimPhys;

use PageSize::{Size1G, Size2M, Size4K};

const WB: MemType = MemType::WriteBack;

fn range(start: u64, len: u64) -> Option<FlushScope> {
    Some(FlushScope::Range { start: G(start), len })
}

/// Map and expect an empty token (a fresh mapping needs no flush).
fn map_fresh<F: EntryFormat>(
    t: &mut NestedPageTable<F>,
    sim: &mut SimPhys,
    gpa: u64,
    hpa: u64,
    size: PageSize,
    access: Access,
) {
    let inv = t.map(sim, G(gpa), H(hpa), size, access, WB).expect("map");
    assert!(inv.is_none(), "fresh map asked for a flush: {inv:?}");
    inv.flush(sim, |_| unreachable!());
}

fn round_trip_each_size<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    assert_eq!(t.table_frames(), 1);
    for (i, size) in PageSize::LARGEST_FIRST.into_iter().enumerate() {
        let b = size.bytes();
        let (gpa, hpa) = (b * (3 + 8 * i as u64) + (i as u64) * (1 << 40), b * 5);
        map_fresh(&mut t, &mut sim, gpa, hpa, size, Access::RX);
        for off in [0, 8, b / 2, b - 1] {
            let tr = t.translate(&sim, G(gpa + off)).expect("mapped");
            assert_eq!(tr.hpa, H(hpa + off));
            assert_eq!(tr.leaf.hpa, H(hpa));
            assert_eq!(tr.leaf.size, size);
            assert_eq!(tr.leaf.access, Access::RX);
            assert_eq!(tr.leaf.mem_type, WB);
            assert!(!tr.leaf.accessed && !tr.leaf.dirty);
        }
        assert!(t.translate(&sim, G(gpa - 1)).is_none());
        assert!(t.translate(&sim, G(gpa + b)).is_none());
    }
    assert_eq!(all_mappings(&t, &sim).len(), 3);
    assert_eq!(t.table_frames(), sim.frames_in_use());
    destroy(t, &mut sim, 0);
}

fn table_frames_counted<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    // One 4 KiB page needs PDPT, PD and PT below the root.
    map_fresh(&mut t, &mut sim, 0x1000, 0x1000, Size4K, Access::RW);
    assert_eq!(t.table_frames(), 4);
    // A neighbour shares all of them; a 2 MiB page elsewhere in the same
    // 1 GiB needs none; another 512 GiB region needs PDPT + PD.
    map_fresh(&mut t, &mut sim, 0x2000, 0x2000, Size4K, Access::RW);
    map_fresh(&mut t, &mut sim, 0x20_0000, 0x20_0000, Size2M, Access::RW);
    assert_eq!(t.table_frames(), 4);
    map_fresh(&mut t, &mut sim, 1 << 39, 0, Size2M, Access::RW);
    assert_eq!(t.table_frames(), 6);
    assert_eq!(sim.frames_in_use(), 6);
    destroy(t, &mut sim, 0);
}

fn refusals_change_nothing<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    map_fresh(&mut t, &mut sim, 0, 0x4000_0000, Size2M, Access::RWX);
    map_fresh(&mut t, &mut sim, 0x4000_0000, 0x1000, Size4K, Access::RWX);
    let before = all_mappings(&t, &sim);
    let frames = t.table_frames();

    let mut try_map =
        |gpa: u64, hpa: u64, size, access| t.map(&mut sim, G(gpa), H(hpa), size, access, WB).map(|inv| inv.is_none());
    // Misaligned guest and host addresses.
    assert_eq!(
        try_map(0x80_1000, 0, Size2M, Access::RW),
        Err(Error::MisalignedGuestAddress { gpa: G(0x80_1000), size: Size2M })
    );
    assert_eq!(
        try_map(0x80_0000, 0x1000, Size2M, Access::RW),
        Err(Error::MisalignedHostAddress { hpa: H(0x1000), size: Size2M })
    );
    assert!(matches!(try_map(0x123, 0, Size4K, Access::RW), Err(Error::MisalignedGuestAddress { .. })));
    // Beyond 48-bit guest-physical and 52-bit host-physical space.
    assert_eq!(
        try_map(GUEST_PHYS_LIMIT, 0, Size4K, Access::RW),
        Err(Error::GuestAddressOutOfRange(G(GUEST_PHYS_LIMIT)))
    );
    assert!(matches!(try_map(!0xfff, 0, Size4K, Access::RW), Err(Error::GuestAddressOutOfRange(_))));
    assert_eq!(
        try_map(0x9000_0000, HOST_PHYS_LIMIT, Size4K, Access::RW),
        Err(Error::HostAddressOutOfRange(H(HOST_PHYS_LIMIT)))
    );
    // Rights the formats cannot express.
    for bad in [Access::WRITE, Access::EXECUTE, Access::WRITE | Access::EXECUTE, Access::empty()] {
        assert_eq!(
            try_map(0x9000_0000, 0, Size4K, bad),
            Err(Error::UnsupportedAccess { format: F::NAME, access: bad })
        );
    }
    // Overlaps at every level: inside the 2 MiB page, the same page, a 1 GiB
    // page over it, and a 2 MiB page over the 4 KiB one.
    assert_eq!(try_map(0x1000, 0, Size4K, Access::RW), Err(Error::AlreadyMapped { gpa: G(0x1000), size: Size4K }));
    assert_eq!(try_map(0, 0, Size2M, Access::RW), Err(Error::AlreadyMapped { gpa: G(0), size: Size2M }));
    assert_eq!(try_map(0, 0, Size1G, Access::RW), Err(Error::AlreadyMapped { gpa: G(0), size: Size1G }));
    assert_eq!(
        try_map(0x4000_0000, 0, Size2M, Access::RW),
        Err(Error::AlreadyMapped { gpa: G(0x4000_0000), size: Size2M })
    );
    assert_eq!(
        try_map(0x4000_0000, 0, Size1G, Access::RW),
        Err(Error::AlreadyMapped { gpa: G(0x4000_0000), size: Size1G })
    );

    assert_eq!(all_mappings(&t, &sim), before);
    assert_eq!(t.table_frames(), frames);
    assert_eq!(sim.frames_in_use(), frames);
    destroy(t, &mut sim, 0);
}

fn invalidation_scopes<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    map_fresh(&mut t, &mut sim, 0x20_0000, 0x40_0000, Size2M, Access::RWX);
    map_fresh(&mut t, &mut sim, 0x5000, 0x9000, Size4K, Access::RWX);

    // protect: the page's range; unchanged rights: nothing.
    let inv = t.protect(&sim, G(0x20_0000), Size2M, Access::R).unwrap();
    assert_eq!(flush(inv, &mut sim), range(0x20_0000, 0x20_0000));
    assert_eq!(t.translate(&sim, G(0x20_0000)).unwrap().leaf.access, Access::R);
    let inv = t.protect(&sim, G(0x20_0000), Size2M, Access::R).unwrap();
    assert_eq!(flush(inv, &mut sim), None);

    // split: the large page's range, from any address inside it.
    let inv = t.split(&mut sim, G(0x23_4567)).unwrap();
    assert_eq!(flush(inv, &mut sim), range(0x20_0000, 0x20_0000));
    // merge: the merged range, and the freed table goes with the flush.
    let frames = sim.frames_in_use();
    let inv = t.merge(&sim, G(0x20_0000), Size2M).unwrap();
    assert_eq!(inv.retired_tables(), 1);
    assert_eq!(flush(inv, &mut sim), range(0x20_0000, 0x20_0000));
    assert_eq!(sim.frames_in_use(), frames - 1);

    // unmap: the page's range, and the old host address.
    let (hpa, inv) = t.unmap(&sim, G(0x5000), Size4K).unwrap();
    assert_eq!(hpa, H(0x9000));
    assert_eq!(flush(inv, &mut sim), range(0x5000, 0x1000));
    assert!(t.translate(&sim, G(0x5000)).is_none());

    // Combining: hull of ranges; anything with All is All; none is neutral.
    let a = Invalidation::<F>::none().combine(t.protect(&sim, G(0x20_0000), Size2M, Access::RW).unwrap());
    assert_eq!(a.scope(), range(0x20_0000, 0x20_0000));
    map_fresh(&mut t, &mut sim, 0x1000, 0x1000, Size4K, Access::RW);
    let b = a.combine(t.protect(&sim, G(0x1000), Size4K, Access::R).unwrap());
    assert_eq!(flush(b, &mut sim), range(0x1000, 0x40_0000 - 0x1000));
    assert_eq!(FlushScope::Range { start: G(0), len: 1 }.union(FlushScope::All), FlushScope::All);
    destroy(t, &mut sim, 0);
}

fn unmap_and_protect_errors<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    map_fresh(&mut t, &mut sim, 0x20_0000, 0x40_0000, Size2M, Access::RWX);
    map_fresh(&mut t, &mut sim, 0x4000_0000, 0x9000, Size4K, Access::RWX);

    assert_eq!(t.unmap(&sim, G(0x60_0000), Size2M).err(), Some(Error::NotMapped(G(0x60_0000))));
    assert_eq!(t.unmap(&sim, G(0x8000_0000), Size1G).err(), Some(Error::NotMapped(G(0x8000_0000))));
    assert_eq!(
        t.unmap(&sim, G(0x20_1000), Size4K).err(),
        Some(Error::InsideLargerPage { gpa: G(0x20_1000), size: Size2M })
    );
    assert_eq!(
        t.unmap(&sim, G(0x4000_0000), Size2M).err(),
        Some(Error::MappedBySmallerPages { gpa: G(0x4000_0000), size: Size2M })
    );
    assert_eq!(
        t.unmap(&sim, G(0x20_1000), Size2M).err(),
        Some(Error::MisalignedGuestAddress { gpa: G(0x20_1000), size: Size2M })
    );
    assert_eq!(
        t.unmap(&sim, G(GUEST_PHYS_LIMIT), Size4K).err(),
        Some(Error::GuestAddressOutOfRange(G(GUEST_PHYS_LIMIT)))
    );
    assert_eq!(
        t.protect(&sim, G(0x20_0000), Size2M, Access::WRITE).err(),
        Some(Error::UnsupportedAccess { format: F::NAME, access: Access::WRITE })
    );
    assert_eq!(
        t.protect(&sim, G(0x20_1000), Size4K, Access::R).err(),
        Some(Error::InsideLargerPage { gpa: G(0x20_1000), size: Size2M })
    );
    assert_eq!(all_mappings(&t, &sim).len(), 2);
    // Nothing beyond the guest-physical space translates.
    assert!(t.translate(&sim, G(GUEST_PHYS_LIMIT)).is_none());
    assert!(t.translate(&sim, G(u64::MAX)).is_none());
    destroy(t, &mut sim, 0);
}

fn protect_keeps_the_rest<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    let inv = t.map(&mut sim, G(0x4000_0000), H(0x8000_0000), Size1G, Access::RW, MemType::Uncacheable).unwrap();
    assert!(inv.is_none());
    inv.flush(&mut sim, |_| {});
    assert!(t.simulate_access(&sim, G(0x4000_1234), true));
    let inv = t.protect(&sim, G(0x4000_0000), Size1G, Access::RX).unwrap();
    assert_eq!(flush(inv, &mut sim), range(0x4000_0000, 0x4000_0000));
    let leaf = t.translate(&sim, G(0x4000_0000)).unwrap().leaf;
    assert_eq!(
        (leaf.hpa, leaf.size, leaf.access, leaf.mem_type),
        (H(0x8000_0000), Size1G, Access::RX, MemType::Uncacheable)
    );
    assert!(leaf.accessed && leaf.dirty);
    destroy(t, &mut sim, 0);
}

/// After unmapping every small page under a 2 MiB slot, a 2 MiB page may go
/// there; the emptied table is retired with the flush.
fn large_page_over_emptied_table<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    map_fresh(&mut t, &mut sim, 0x20_0000, 0x1000, Size4K, Access::RW);
    map_fresh(&mut t, &mut sim, 0x20_1000, 0x2000, Size4K, Access::RW);
    assert_eq!(t.table_frames(), 4);
    // Still one page left: refused.
    let (_, inv) = t.unmap(&sim, G(0x20_0000), Size4K).unwrap();
    flush(inv, &mut sim);
    assert!(matches!(t.map(&mut sim, G(0x20_0000), H(0), Size2M, Access::RW, WB), Err(Error::AlreadyMapped { .. })));
    let (_, inv) = t.unmap(&sim, G(0x20_1000), Size4K).unwrap();
    flush(inv, &mut sim);
    // Now empty: the 2 MiB page replaces the page table, retired by the flush.
    let inv = t.map(&mut sim, G(0x20_0000), H(0x60_0000), Size2M, Access::RW, WB).unwrap();
    assert_eq!(inv.retired_tables(), 1);
    assert_eq!(flush(inv, &mut sim), range(0x20_0000, 0x20_0000));
    assert_eq!(t.table_frames(), 3);
    assert_eq!(sim.frames_in_use(), 3);
    assert_eq!(t.translate(&sim, G(0x20_0040)).unwrap().hpa, H(0x60_0040));

    // Same at 1 GiB, where the emptied subtree is a PD with a PT below it.
    map_fresh(&mut t, &mut sim, 0x4000_0000 + 0x1000, 0x1000, Size4K, Access::RW);
    let (_, inv) = t.unmap(&sim, G(0x4000_1000), Size4K).unwrap();
    flush(inv, &mut sim);
    assert_eq!(t.table_frames(), 5);
    let inv = t.map(&mut sim, G(0x4000_0000), H(0x4000_0000), Size1G, Access::RW, WB).unwrap();
    assert_eq!(flush(inv, &mut sim), range(0x4000_0000, 0x4000_0000));
    assert_eq!(t.table_frames(), 3);
    assert_eq!(sim.frames_in_use(), 3);
    destroy(t, &mut sim, 0);
}

/// Random maps and unmaps against a model; destroy returns every frame.
fn random_against_model<F: EntryFormat>() {
    use alloc::collections::BTreeMap;
    for seed in 0..8 {
        let mut rng = Rng::new(seed);
        let mut sim = table_sim();
        let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
        let mut model: BTreeMap<u64, (u64, PageSize)> = BTreeMap::new();
        for _ in 0..300 {
            let size = [Size4K, Size4K, Size2M, Size1G][rng.below(4) as usize];
            let gpa = rng.below(16 << 30) & !(size.bytes() - 1);
            let hpa = rng.below(1 << 40) & !(size.bytes() - 1);
            let overlaps = model.iter().any(|(&g, &(_, s))| g < gpa + size.bytes() && gpa < g + s.bytes());
            if rng.chance(30) && !model.is_empty() {
                let (&g, &(h, s)) = model.iter().nth(rng.below(model.len() as u64) as usize).unwrap();
                let (old, inv) = t.unmap(&sim, G(g), s).unwrap();
                assert_eq!(old, H(h));
                assert_eq!(flush(inv, &mut sim), range(g, s.bytes()));
                model.remove(&g);
                continue;
            }
            match t.map(&mut sim, G(gpa), H(hpa), size, Access::RWX, WB) {
                Ok(inv) => {
                    assert!(!overlaps, "overlapping map of {size} at {gpa:#x} accepted");
                    flush(inv, &mut sim);
                    model.insert(gpa, (hpa, size));
                }
                Err(e) => {
                    assert!(overlaps, "map of {size} at {gpa:#x} refused: {e}");
                    assert_eq!(e, Error::AlreadyMapped { gpa: G(gpa), size });
                }
            }
        }
        let got: alloc::vec::Vec<(u64, u64, PageSize)> =
            all_mappings(&t, &sim).iter().map(|m| (m.gpa.0, m.leaf.hpa.0, m.leaf.size)).collect();
        let want: alloc::vec::Vec<(u64, u64, PageSize)> = model.iter().map(|(&g, &(h, s))| (g, h, s)).collect();
        assert_eq!(got, want, "seed {seed}");
        assert_eq!(t.table_frames(), sim.frames_in_use());
        destroy(t, &mut sim, 0);
    }
}

fn max_page_size_enforced<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    assert_eq!(t.max_page_size(), Size1G);
    t.set_max_page_size(Size2M);
    assert_eq!(t.map(&mut sim, G(0), H(0), Size1G, Access::RW, WB).err(), Some(Error::UnsupportedPageSize(Size1G)));
    for i in 0..512 {
        map_fresh(&mut t, &mut sim, i << 21, i << 21, Size2M, Access::RW);
    }
    assert_eq!(t.merge(&sim, G(0), Size1G).err(), Some(Error::UnsupportedPageSize(Size1G)));
    assert_eq!(all_mappings(&t, &sim).len(), 512);
    destroy(t, &mut sim, 0);
}

fn mappings_range_clips<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    map_fresh(&mut t, &mut sim, 0x20_0000, 0, Size2M, Access::RW);
    map_fresh(&mut t, &mut sim, 0x40_0000, 0x1000, Size4K, Access::RW);
    map_fresh(&mut t, &mut sim, 0x40_2000, 0x2000, Size4K, Access::RW);
    let in_range = |a: u64, b: u64| -> alloc::vec::Vec<u64> { t.mappings(&sim, G(a)..G(b)).map(|m| m.gpa.0).collect() };
    // A large page straddling the start is reported with its own base.
    assert_eq!(in_range(0x30_0000, 0x40_1000), [0x20_0000, 0x40_0000]);
    assert_eq!(in_range(0x40_1000, 0x40_2000), [] as [u64; 0]);
    assert_eq!(in_range(0x40_1000, u64::MAX), [0x40_2000]);
    assert_eq!(in_range(0, 0), [] as [u64; 0]);
    destroy(t, &mut sim, 0);
}

#[test]
fn error_messages_are_sentences() {
    let e = Error::AlreadyMapped { gpa: G(0x20_0000), size: Size2M };
    assert_eq!(alloc::format!("{e}"), "2 MiB page at 0x200000 overlaps an existing mapping");
    let e = Error::UnsupportedAccess { format: "EPT", access: Access::WRITE };
    assert_eq!(alloc::format!("{e}"), "EPT entries cannot grant access -w-");
    let e = Error::CannotMerge { gpa: G(0), size: Size2M, reason: crate::MergeRefusal::Hole };
    assert_eq!(alloc::format!("{e}"), "Cannot merge the 2 MiB range at 0x0: part of it is not mapped");
}

// The leak check is a debug-build panic.
#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "NestedPageTable was dropped without being freed")]
fn dropping_a_table_is_a_loud_leak() {
    let mut sim = table_sim();
    let _t = NestedPageTable::<crate::paging::Ept>::new(&mut sim).unwrap();
}

super::for_both_formats!(
    round_trip_each_size,
    table_frames_counted,
    refusals_change_nothing,
    invalidation_scopes,
    unmap_and_protect_errors,
    protect_keeps_the_rest,
    large_page_over_emptied_table,
    random_against_model,
    mappings_range_clips,
    max_page_size_enforced,
);
