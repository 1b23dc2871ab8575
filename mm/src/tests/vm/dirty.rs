//! Dirty logging: every write between two harvests is reported exactly once.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use super::{free, g, vm};
use crate::addr::{PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::error::Error;
use crate::paging::{Access, EntryFormat, PageSize};
use crate::sim::SimPhys;
use crate::swap_hook::MemStore;
use crate::tests::{Rng, for_both_formats};
use crate::vm_memory::{DirtyBitmap, DirtyLogConfig, DirtyMechanism, Hooks, SharingIndex, VcpuSet};

const MIB: u64 = 8;

/// Random writes by random vCPUs (and by the host), interleaved with
/// swap-outs, sharing scans and harvests; each harvest must report exactly
/// the granules written (by traced vCPUs) since the previous one.
fn exactly_once(mechanism: DirtyMechanism, granule: PageSize, traced: VcpuSet, seed: u64, rounds: usize) -> u64 {
    exactly_once_fmt::<crate::paging::Ept>(mechanism, granule, traced, seed, rounds)
        + exactly_once_fmt::<crate::paging::Npt>(mechanism, granule, traced, seed, rounds)
}

fn exactly_once_fmt<F: EntryFormat>(
    mechanism: DirtyMechanism,
    granule: PageSize,
    traced: VcpuSet,
    seed: u64,
    rounds: usize,
) -> u64 {
    let mut rng = Rng::new(seed);
    let mut sim = SimPhys::new(8192);
    let mut index = SharingIndex::with_hint_slots(&mut sim, 1024).unwrap();
    let mut store = MemStore::new();
    let mut v = vm::<F>(&mut sim, 1, MIB, PageSize::Size2M);
    let pages = MIB << 8;
    let mut hooks = Hooks { sharing: Some(&mut index), store: Some(&mut store), source: None };
    // Some content before logging starts, with duplicates to share.
    for p in 0..pages {
        if rng.chance(30) {
            let tag = rng.below(8) as u8;
            v.write(&mut sim, &mut hooks, g(p * PAGE_SIZE_4K), &[tag; 16], &mut |_| {}).unwrap();
        }
    }
    let config = DirtyLogConfig { granule, mechanism, vcpus: traced };
    v.start_dirty_log(&mut sim, config, &mut |_| {}).unwrap();
    assert!(matches!(v.start_dirty_log(&mut sim, config, &mut |_| {}), Err(Error::DirtyLogState { running: true })));
    let subset = mechanism == DirtyMechanism::WriteProtect && !traced.covers(4);
    for vcpu in 0..4 {
        let on_view = v.root_for_vcpu(vcpu) != v.table().root();
        assert_eq!(on_view, subset && traced.contains(vcpu), "vCPU {vcpu} root");
    }
    let gran = granule.bytes();
    let mut expected: BTreeSet<u64> = BTreeSet::new();
    let mut bitmap = DirtyBitmap::new();
    let mut reported_total = 0;
    for _ in 0..rounds {
        for _ in 0..rng.below(40) {
            let gpa = rng.below(pages * PAGE_SIZE_4K - 8);
            match rng.below(20) {
                0 => {
                    // The host writes (device emulation): always logged.
                    v.write(&mut sim, &mut hooks, g(gpa), &[rng.below(256) as u8], &mut |_| {}).unwrap();
                    expected.insert(gpa / gran);
                }
                1 => {
                    let _ = v.swap_out(
                        &mut sim,
                        g(gpa),
                        &mut **hooks.store.as_mut().unwrap(),
                        hooks.sharing.as_deref_mut(),
                        &mut |_| {},
                    );
                }
                2 => {
                    let _ = v.share_scan(&mut sim, hooks.sharing.as_deref_mut().unwrap(), 64, &mut |_| {});
                }
                3..=11 => {
                    let vcpu = rng.below(4) as usize;
                    let tag = rng.below(8) as u8;
                    v.sim_write(&mut sim, &mut hooks, vcpu, g(gpa), &[tag; 8]).unwrap();
                    if mechanism == DirtyMechanism::DirtyBits || traced.contains(vcpu) {
                        expected.insert(gpa / gran);
                    }
                }
                _ => {
                    let mut b = [0u8; 8];
                    v.sim_read(&mut sim, &mut hooks, rng.below(4) as usize, g(gpa), &mut b).unwrap();
                }
            }
        }
        v.check_invariants(&sim);
        v.harvest_dirty(&mut sim, &mut bitmap, &mut |_| {}).unwrap();
        assert_eq!(bitmap.granule(), granule);
        let got: BTreeSet<u64> = bitmap.iter().map(|a| a.0 / gran).collect();
        if subset {
            // Untraced vCPUs may also have written traced-granule pages:
            // only the traced writes must be there, each exactly once, and
            // nothing else may appear.
            assert!(expected.is_subset(&got), "missing: {:?}", expected.difference(&got).collect::<Vec<_>>());
        } else {
            assert_eq!(got, expected, "harvest differs from the writes ({mechanism:?}, {granule})");
        }
        assert_eq!(bitmap.count(), got.len() as u64);
        reported_total += got.len() as u64;
        expected.clear();
        v.check_invariants(&sim);
    }
    v.stop_dirty_log(&mut sim, &mut |_| {}).unwrap();
    assert!(v.harvest_dirty(&mut sim, &mut bitmap, &mut |_| {}).is_err());
    v.check_invariants(&sim);
    for vcpu in 0..4 {
        assert_eq!(v.root_for_vcpu(vcpu), v.table().root());
    }
    free(v, &mut sim, &mut hooks);
    assert_eq!(store.live_slots(), 0);
    // SAFETY: the only VM using it is freed.
    unsafe { index.free(&mut sim) };
    assert_eq!(sim.frames_in_use(), 0);
    reported_total
}

#[test]
fn exactly_once_write_protect_4k() {
    for seed in 0..4 {
        assert!(exactly_once(DirtyMechanism::WriteProtect, PageSize::Size4K, VcpuSet::ALL, seed, 12) > 0);
    }
}

#[test]
fn exactly_once_write_protect_2m() {
    for seed in 10..14 {
        assert!(exactly_once(DirtyMechanism::WriteProtect, PageSize::Size2M, VcpuSet::ALL, seed, 12) > 0);
    }
}

#[test]
fn exactly_once_dirty_bits_4k() {
    for seed in 20..24 {
        assert!(exactly_once(DirtyMechanism::DirtyBits, PageSize::Size4K, VcpuSet::ALL, seed, 12) > 0);
    }
}

#[test]
fn exactly_once_dirty_bits_2m() {
    for seed in 30..34 {
        assert!(exactly_once(DirtyMechanism::DirtyBits, PageSize::Size2M, VcpuSet::ALL, seed, 12) > 0);
    }
}

#[test]
fn exactly_once_traced_subset() {
    let traced = VcpuSet::of(&[1, 3]).unwrap();
    for seed in 40..44 {
        assert!(exactly_once(DirtyMechanism::WriteProtect, PageSize::Size4K, traced, seed, 10) > 0);
        assert!(exactly_once(DirtyMechanism::WriteProtect, PageSize::Size2M, traced, seed, 10) > 0);
    }
}

/// Untraced vCPUs run on the primary table and never fault for logging;
/// traced ones run on the write-protected view.
fn subset_view_isolation<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut v = vm::<F>(&mut sim, 1, 4, PageSize::Size2M);
    let mut hooks = Hooks::none();
    let gen0 = v.roots_generation();
    let cfg = DirtyLogConfig {
        granule: PageSize::Size4K,
        mechanism: DirtyMechanism::WriteProtect,
        vcpus: VcpuSet::of(&[0]).unwrap(),
    };
    v.start_dirty_log(&mut sim, cfg, &mut |_| {}).unwrap();
    assert_ne!(v.roots_generation(), gen0);
    let (primary, view) = v.tables();
    let view = view.expect("a subset gets a view");
    assert!(primary.translate(&sim, g(0x5000)).unwrap().leaf.access.contains(Access::WRITE));
    assert!(!view.translate(&sim, g(0x5000)).unwrap().leaf.access.contains(Access::WRITE));
    v.sim_write(&mut sim, &mut hooks, 2, g(0x5000), &[1]).unwrap(); // untraced
    v.sim_write(&mut sim, &mut hooks, 0, g(0x9000), &[1]).unwrap(); // traced
    let bm = v.harvest_dirty_bitmap(&mut sim, &mut |_| {}).unwrap();
    assert_eq!(bm.iter().collect::<Vec<_>>(), [g(0x9000)]);
    // Both vCPUs see each other's writes (same frames).
    let mut b = [0u8; 1];
    v.sim_read(&mut sim, &mut hooks, 0, g(0x5000), &mut b).unwrap();
    assert_eq!(b, [1]);
    v.stop_dirty_log(&mut sim, &mut |_| {}).unwrap();
    assert!(v.tables().1.is_none());
    // Logging split the 2 MiB pages; stopping maps them large again.
    assert_eq!(v.table().translate(&sim, g(0x5000)).unwrap().leaf.size, PageSize::Size2M);
    assert_eq!(v.table().translate(&sim, g(PAGE_SIZE_2M)).unwrap().leaf.size, PageSize::Size2M);
    v.check_invariants(&sim);
    free(v, &mut sim, &mut hooks);
    assert_eq!(sim.frames_in_use(), 0);
}

fn bad_configs_refused<F: EntryFormat>() {
    let mut sim = SimPhys::new(4096);
    let mut v = vm::<F>(&mut sim, 1, 4, PageSize::Size2M);
    let mut cfg = DirtyLogConfig::new(PageSize::Size1G, DirtyMechanism::DirtyBits);
    assert!(matches!(v.start_dirty_log(&mut sim, cfg, &mut |_| {}), Err(Error::UnsupportedGranularity(_))));
    cfg.granule = PageSize::Size4K;
    cfg.vcpus = VcpuSet::of(&[9]).unwrap(); // the VM has 4 vCPUs
    assert!(v.start_dirty_log(&mut sim, cfg, &mut |_| {}).is_err());
    assert!(VcpuSet::of(&[64]).is_err());
    assert!(v.dirty_logging().is_none());
    assert!(matches!(v.stop_dirty_log(&mut sim, &mut |_| {}), Err(Error::DirtyLogState { running: false })));
    v.check_invariants(&sim);
    free(v, &mut sim, &mut Hooks::none());
}

for_both_formats!(subset_view_isolation, bad_configs_refused);
