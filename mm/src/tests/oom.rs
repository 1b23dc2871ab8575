//! Running out of frames mid-operation leaves the table consistent.

use alloc::collections::BTreeMap;

use super::{Rng, all_mappings, destroy, flush, table_sim};
use crate::addr::{GuestPhysAddr as G, HostPhysAddr as H};
use crate::error::Error;
use crate::paging::{Access, EntryFormat, MemType, NestedPageTable, PageSize};

/// A map that needs three new tables fails at each possible allocation and
/// leaves nothing behind; with frames again it succeeds.
fn oom_mid_map<F: EntryFormat>() {
    for budget in 0..3 {
        let mut sim = table_sim();
        let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
        sim.fail_after(budget);
        let r = t.map(&mut sim, G(0x1234_5000), H(0x1000), PageSize::Size4K, Access::RW, MemType::WriteBack);
        assert_eq!(r.err(), Some(Error::OutOfTableMemory));
        assert_eq!(sim.frames_in_use(), 1, "frames of the failed map were not given back");
        assert_eq!(sim.frees(), budget, "each frame freed exactly once");
        assert_eq!(t.table_frames(), 1);
        assert!(all_mappings(&t, &sim).is_empty());
        assert!(t.translate(&sim, G(0x1234_5000)).is_none());
        sim.stop_failing();
        let inv = t.map(&mut sim, G(0x1234_5000), H(0x1000), PageSize::Size4K, Access::RW, MemType::WriteBack).unwrap();
        flush(inv, &mut sim);
        assert_eq!(t.translate(&sim, G(0x1234_5678)).unwrap().hpa, H(0x1678));
        destroy(t, &mut sim, 0);
    }
}

fn oom_in_split<F: EntryFormat>() {
    let mut sim = table_sim();
    let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
    let inv = t.map(&mut sim, G(0), H(0x4000_0000), PageSize::Size1G, Access::RX, MemType::WriteBack).unwrap();
    flush(inv, &mut sim);
    let before = all_mappings(&t, &sim);
    sim.fail_after(0);
    assert_eq!(t.split(&mut sim, G(0x1000)).err(), Some(Error::OutOfTableMemory));
    assert_eq!(all_mappings(&t, &sim), before);
    assert_eq!(t.table_frames(), sim.frames_in_use());
    sim.stop_failing();
    destroy(t, &mut sim, 0);
}

/// Random maps and splits under random allocation failures: after every
/// failure the table still holds exactly the successful mappings, and its
/// frame count matches the allocator's.
fn random_failures<F: EntryFormat>() {
    for seed in 0..16 {
        let mut rng = Rng::new(seed + 1000);
        let mut sim = table_sim();
        let mut t = NestedPageTable::<F>::new(&mut sim).unwrap();
        let mut model: BTreeMap<u64, (u64, PageSize)> = BTreeMap::new();
        for _ in 0..200 {
            if rng.chance(30) {
                sim.fail_after(rng.below(3));
            } else {
                sim.stop_failing();
            }
            if rng.chance(20) && !model.is_empty() {
                let (&g, &(h, s)) = model.iter().nth(rng.below(model.len() as u64) as usize).unwrap();
                let Some(small) = s.smaller() else { continue };
                match t.split(&mut sim, G(g)) {
                    Ok(inv) => {
                        flush(inv, &mut sim);
                        model.remove(&g);
                        for i in 0..512 {
                            model.insert(g + i * small.bytes(), (h + i * small.bytes(), small));
                        }
                    }
                    Err(e) => assert_eq!(e, Error::OutOfTableMemory),
                }
            } else {
                let size = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G][rng.below(3) as usize];
                let gpa = rng.below(1 << 42) & !(size.bytes() - 1);
                if model.range(..gpa + size.bytes()).next_back().is_some_and(|(&g, &(_, s))| g + s.bytes() > gpa) {
                    continue;
                }
                match t.map(&mut sim, G(gpa), H(gpa), size, Access::RWX, MemType::WriteBack) {
                    Ok(inv) => {
                        flush(inv, &mut sim);
                        model.insert(gpa, (gpa, size));
                    }
                    Err(e) => assert_eq!(e, Error::OutOfTableMemory),
                }
            }
            assert_eq!(t.table_frames(), sim.frames_in_use(), "seed {seed}");
        }
        sim.stop_failing();
        let got: alloc::vec::Vec<(u64, u64, PageSize)> =
            all_mappings(&t, &sim).iter().map(|m| (m.gpa.0, m.leaf.hpa.0, m.leaf.size)).collect();
        let want: alloc::vec::Vec<(u64, u64, PageSize)> = model.iter().map(|(&g, &(h, s))| (g, h, s)).collect();
        assert_eq!(got, want, "seed {seed}");
        destroy(t, &mut sim, 0);
    }
}

super::for_both_formats!(oom_mid_map, oom_in_split, random_failures);
