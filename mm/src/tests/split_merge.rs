//! split and merge: nothing lost or changed, refusals, A/D carried over.

use alloc::vec::Vec;

use super::{Rng, all_mappings, destroy, flush, table_sim};
use crate::addr::{GuestPhysAddr as G, HostPhysAddr as H};
use crate::error::{Error, MergeRefusal};
use crate::paging::{Access, EntryFormat, Mapping, MemType, NestedPageTable, PageSize};
use crate::sim::SimPhys;

use PageSize::{Size1G, Size2M, Size4K};

const RIGHTS: [Access; 4] = [Access::R, Access::RW, Access::RX, Access::RWX];
const TYPES: [MemType; 3] = [MemType::WriteBack, MemType::WriteThrough, MemType::Uncacheable];

/// Mappings as maximal runs contiguous in both spaces with equal
/// attributes: what the guest can observe, independent of page sizes.
fn runs(maps: &[Mapping]) -> Vec<(u64, u64, u64, Access, MemType, bool, bool)> {
    let mut out: Vec<(u64, u64, u64, Access, MemType, bool, bool)> = Vec::new();
    for m in maps {
        let l = m.leaf;
        if let Some(r) = out.last_mut()
            && r.0 + r.2 == m.gpa.0
            && r.1 + r.2 == l.hpa.0
            && (r.3, r.4, r.5, r.6) == (l.access, l.mem_type, l.accessed, l.dirty)
        {
            r.2 += l.size.bytes();
        } else {
            out.push((m.gpa.0, l.hpa.0, l.size.bytes(), l.access, l.mem_type, l.accessed, l.dirty));
        }
    }
    out
}

fn map<F: EntryFormat>(
    t: &mut NestedPageTable<F>,
    sim: &mut SimPhys,
    gpa: u64,
    hpa: u64,
    size: PageSize,
    a: Access,
    mt: MemType,
) {
    let inv = t.map(sim, G(gpa), H(hpa), size, a, mt).unwrap();
    assert!(inv.is_none());
    flush(inv, sim);
}

/// A random layout of 1 GiB, 2 MiB and 4 KiB pages over 8 GiB, with random
/// rights, memory types and A/D bits.
fn random_layout<F: EntryFormat>(rng: &mut Rng, t: &mut NestedPageTable<F>, sim: &mut SimPhys) {
    for slot in 0..8u64 {
        let base = slot << 30;
        let a = RIGHTS[rng.below(4) as usize];
        let mt = TYPES[rng.below(3) as usize];
        match rng.below(3) {
            0 => continue,
            1 => map(t, sim, base, rng.below(1 << 10) << 30, Size1G, a, mt),
            _ => {
                for _ in 0..rng.below(6) + 1 {
                    let gpa = base + (rng.below(512) << 21);
                    if t.translate(sim, G(gpa)).is_some()
                        || t.mappings(sim, G(gpa)..G(gpa + (1 << 21))).next().is_some()
                    {
                        continue;
                    }
                    if rng.chance(50) {
                        map(t, sim, gpa, rng.below(1 << 19) << 21, Size2M, a, mt);
                    } else {
                        for _ in 0..rng.below(5) + 1 {
                            let g = gpa + (rng.below(512) << 12);
                            if t.translate(sim, G(g)).is_none() {
                                map(t, sim, g, rng.below(1 << 28) << 12, Size4K, a, mt);
                            }
                        }
                    }
                }
            }
        }
    }
    // Hardware activity on some pages.
    for m in all_mappings(t, sim) {
        if rng.chance(40) {
            assert!(t.simulate_access(sim, m.gpa, rng.chance(50)));
        }
    }
}

fn split_then_merge_restores<F: EntryFormat>() {
    for seed in 0..24 {
        let mut rng = Rng::new(seed);
        let mut sim = table_sim();
        let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
        random_layout(&mut rng, &mut t, &mut sim);
        let original = all_mappings(&t, &sim);
        let frames = t.table_frames();

        // Split every 1 GiB page, then a random half of the 2 MiB pages
        // (original ones and those the first round made).
        let mut undo: Vec<(u64, PageSize)> = Vec::new();
        for round in [Size1G, Size2M] {
            for m in all_mappings(&t, &sim) {
                if m.leaf.size == round && (round == Size1G || rng.chance(50)) {
                    let probe = m.gpa.0 + rng.below(round.bytes());
                    let inv = t.split(&mut sim, G(probe)).unwrap();
                    assert_eq!(flush(inv, &mut sim).map(|s| s.covers(m.gpa)), Some(true));
                    undo.push((m.gpa.0, round));
                }
            }
        }
        let split = all_mappings(&t, &sim);
        assert_eq!(runs(&split), runs(&original), "seed {seed}: split changed a translation");
        assert!(split.len() >= original.len());

        for &(gpa, size) in undo.iter().rev() {
            let inv = t.merge(&sim, G(gpa), size).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert_eq!(inv.retired_tables(), 1);
            flush(inv, &mut sim);
        }
        assert_eq!(all_mappings(&t, &sim), original, "seed {seed}: merge did not restore");
        assert_eq!(t.table_frames(), frames);
        assert_eq!(sim.frames_in_use(), frames);
        destroy(t, &mut sim, 0);
    }
}

fn split_keeps_attributes<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    map(&mut t, &mut sim, 1 << 30, 3 << 30, Size1G, Access::RX, MemType::Uncacheable);
    assert!(t.simulate_access(&sim, G(1 << 30), true));
    let inv = t.split(&mut sim, G((1 << 30) + 5)).unwrap();
    flush(inv, &mut sim);
    let maps = all_mappings(&t, &sim);
    assert_eq!(maps.len(), 512);
    for (i, m) in maps.iter().enumerate() {
        let off = i as u64 * (2 << 20);
        assert_eq!(m.gpa, G((1 << 30) + off));
        assert_eq!(m.leaf.hpa, H((3 << 30) + off));
        assert_eq!(m.leaf.size, Size2M);
        assert_eq!((m.leaf.access, m.leaf.mem_type), (Access::RX, MemType::Uncacheable));
        assert!(m.leaf.accessed && m.leaf.dirty);
    }
    // Split one 2 MiB child further.
    let inv = t.split(&mut sim, G((1 << 30) + (2 << 20))).unwrap();
    flush(inv, &mut sim);
    assert_eq!(t.translate(&sim, G((1 << 30) + (2 << 20) + 0x1234)).unwrap().leaf.size, Size4K);
    // Root, PDPT, the PD from the first split, the PT from the second.
    assert_eq!(t.table_frames(), 4);
    assert_eq!(t.split(&mut sim, G((1 << 30) + (2 << 20))).err(), Some(Error::CannotSplit(G((1 << 30) + (2 << 20)))));
    assert_eq!(t.split(&mut sim, G(0)).err(), Some(Error::NotMapped(G(0))));
    destroy(t, &mut sim, 0);
}

/// 512 small pages mapped one by one (not by split) merge when they qualify;
/// the merged page is accessed/dirty if any child was.
fn merge_of_mapped_pages<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    for i in 0..512 {
        map(
            &mut t,
            &mut sim,
            0x60_0000 + i * 0x1000,
            0x1_0020_0000 + i * 0x1000,
            Size4K,
            Access::RW,
            MemType::WriteBack,
        );
    }
    assert!(t.simulate_access(&sim, G(0x60_0000 + 77 * 0x1000), true));
    assert!(t.simulate_access(&sim, G(0x60_0000 + 99 * 0x1000), false));
    let inv = t.merge(&sim, G(0x60_0000), Size2M).unwrap();
    flush(inv, &mut sim);
    let leaf = t.translate(&sim, G(0x60_0000)).unwrap().leaf;
    assert_eq!((leaf.hpa, leaf.size, leaf.access), (H(0x1_0020_0000), Size2M, Access::RW));
    assert!(leaf.accessed && leaf.dirty);
    assert_eq!(t.table_frames(), 3);
    assert_eq!(sim.frames_in_use(), 3);
    destroy(t, &mut sim, 0);
}

fn merge_refusals<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    let wb = MemType::WriteBack;
    // Five 2 MiB ranges of 512 4 KiB pages, each spoiled one way.
    let region = |n: u64| n * 0x20_0000;
    for n in 0..5 {
        for i in 0..512u64 {
            let (mut hpa, mut a, mut mt) = (0x4000_0000 + region(n) + i * 0x1000, Access::RW, wb);
            match (n, i) {
                (0, 300) => continue,                // hole
                (1, 17) => hpa += 0x1000 * 600,      // not contiguous
                (2, 511) => a = Access::R,           // rights differ
                (3, 1) => mt = MemType::Uncacheable, // memory type differs
                (4, _) => hpa += 0x1000,             // contiguous but host-misaligned
                _ => {}
            }
            map(&mut t, &mut sim, region(n) + i * 0x1000, hpa, Size4K, a, mt);
        }
    }
    let before = all_mappings(&t, &sim);
    let frames = t.table_frames();
    let refused = |n: u64, reason| Some(Error::CannotMerge { gpa: G(region(n)), size: Size2M, reason });
    // Each of these must fail (an unexpected success would drop a token that
    // carries a table, which panics).
    let mut merge = |gpa: u64, size| t.merge(&sim, G(gpa), size).err();
    assert_eq!(merge(region(0), Size2M), refused(0, MergeRefusal::Hole));
    assert_eq!(merge(region(1), Size2M), refused(1, MergeRefusal::NotContiguous));
    assert_eq!(merge(region(2), Size2M), refused(2, MergeRefusal::NotUniform));
    assert_eq!(merge(region(3), Size2M), refused(3, MergeRefusal::NotUniform));
    assert_eq!(merge(region(4), Size2M), refused(4, MergeRefusal::HostMisaligned));
    // The 1 GiB range holds tables, not 2 MiB leaves.
    assert_eq!(
        merge(0, Size1G),
        Some(Error::CannotMerge { gpa: G(0), size: Size1G, reason: MergeRefusal::ChildIsTable })
    );
    assert_eq!(merge(0, Size4K), Some(Error::CannotMerge { gpa: G(0), size: Size4K, reason: MergeRefusal::TooSmall }));
    assert_eq!(merge(0x1000, Size2M), Some(Error::MisalignedGuestAddress { gpa: G(0x1000), size: Size2M }));
    assert_eq!(merge(1 << 30, Size1G), Some(Error::NotMapped(G(1 << 30))));
    assert_eq!(all_mappings(&t, &sim), before);
    assert_eq!(t.table_frames(), frames);

    // An existing large page: already merged.
    map(&mut t, &mut sim, 0x4000_0000, 0, Size1G, Access::RW, wb);
    assert_eq!(
        t.merge(&sim, G(0x4000_0000), Size1G).err(),
        Some(Error::CannotMerge { gpa: G(0x4000_0000), size: Size1G, reason: MergeRefusal::AlreadyLarge })
    );
    assert_eq!(
        t.merge(&sim, G(0x4020_0000), Size2M).err(),
        Some(Error::CannotMerge { gpa: G(0x4020_0000), size: Size2M, reason: MergeRefusal::AlreadyLarge })
    );
    destroy(t, &mut sim, 0);
}

/// The bulk operations (`for_each_mapping`, `update_access`, `remap`) agree
/// with the per-leaf ones on random layouts: nothing lost or duplicated,
/// addresses, memory types and A/D bits kept, and every changed leaf covered
/// by the returned flush.
fn bulk_ops_match_per_leaf_ops<F: EntryFormat>() {
    for seed in 0..16 {
        let mut rng = Rng::new(100 + seed);
        let mut sim = table_sim();
        let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
        random_layout(&mut rng, &mut t, &mut sim);
        let original = all_mappings(&t, &sim);
        // Any sub-range, including ones starting inside a large page.
        let (a, b) = (rng.below(9 << 30), rng.below(9 << 30));
        let range = G(a.min(b))..G(a.max(b));
        let mut visited = Vec::new();
        t.for_each_mapping(&sim, range.clone(), |m| visited.push(m));
        let expected: Vec<Mapping> = t.mappings(&sim, range.clone()).collect();
        assert_eq!(visited, expected, "seed {seed}");

        // Take write away from every leaf in the range that has it.
        let inv = t.update_access(&sim, range.clone(), |_, _, a| a - Access::WRITE);
        let scope = flush(inv, &mut sim);
        let after = all_mappings(&t, &sim);
        assert_eq!(after.len(), original.len(), "seed {seed}: a leaf appeared or vanished");
        for (old, new) in original.iter().zip(&after) {
            assert_eq!(
                (old.gpa, old.leaf.hpa, old.leaf.size, old.leaf.mem_type),
                (new.gpa, new.leaf.hpa, new.leaf.size, new.leaf.mem_type)
            );
            assert_eq!((old.leaf.accessed, old.leaf.dirty), (new.leaf.accessed, new.leaf.dirty), "A/D lost");
            let inside = expected.iter().any(|m| m.gpa == old.gpa);
            let want = if inside { old.leaf.access - Access::WRITE } else { old.leaf.access };
            assert_eq!(new.leaf.access, want, "seed {seed}: {:?}", old.gpa);
            if new.leaf.access != old.leaf.access {
                assert!(scope.is_some_and(|s| s.covers(old.gpa)), "seed {seed}: {:?} changed without a flush", old.gpa);
            }
        }
        // Idempotent: nothing left to change, nothing to flush.
        assert!(t.update_access(&sim, range, |_, _, a| a - Access::WRITE).is_none());

        // Remap one leaf of each size found; the old address comes back.
        for m in &after {
            if !rng.chance(20) {
                continue;
            }
            let new_hpa = H(rng.below(1 << 10) * m.leaf.size.bytes());
            let (old, inv) = t.remap(&sim, m.gpa, m.leaf.size, new_hpa, Access::R).unwrap();
            assert_eq!(old, m.leaf.hpa);
            assert_eq!(flush(inv, &mut sim).map(|s| s.covers(m.gpa)), Some(true));
            let tr = t.translate(&sim, m.gpa).unwrap();
            assert_eq!(
                (tr.hpa, tr.leaf.access, tr.leaf.size, tr.leaf.mem_type),
                (new_hpa, Access::R, m.leaf.size, m.leaf.mem_type)
            );
            if m.leaf.size != Size4K {
                let inner = G(m.gpa.0 + Size4K.bytes());
                assert!(matches!(t.remap(&sim, inner, Size4K, H(0), Access::R), Err(Error::InsideLargerPage { .. })));
            }
        }
        assert!(matches!(t.remap(&sim, G(9 << 30), Size4K, H(0), Access::R), Err(Error::NotMapped(_))));
        assert!(matches!(
            t.remap(&sim, G(0x1000), Size4K, H(0x1001), Access::R),
            Err(Error::MisalignedHostAddress { .. })
        ));
        assert_eq!(all_mappings(&t, &sim).len(), original.len());
        destroy(t, &mut sim, 0);
    }
}

super::for_both_formats!(
    split_then_merge_restores,
    split_keeps_attributes,
    merge_of_mapped_pages,
    merge_refusals,
    bulk_ops_match_per_leaf_ops,
);
