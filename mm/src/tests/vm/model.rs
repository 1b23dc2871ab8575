//! Random operations against a model of guest memory: whatever the manager
//! does underneath (splits, merges, sharing, swap, balloon, sampling, dirty
//! logging, lazy loading), every page reads what was last written to it, no
//! mapping is lost or duplicated, rights match the page state, and every
//! mapping that changed or lost a right was covered by a flush.

use alloc::vec;
use alloc::vec::Vec;

use super::{g, pattern, record_flush, take_flushes};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::error::Error;
use crate::paging::{Access, EntryFormat, PageSize};
use crate::sim::SimPhys;
use crate::swap_hook::MemStore;
use crate::tests::{Rng, for_both_formats};
use crate::vm_memory::{
    DirtyLogConfig, DirtyMechanism, Hooks, MemoryMap, PageSource, PageState, SharingIndex, VcpuSet, VmMemory,
    VmMemoryConfig,
};

const PAGES: u64 = 1536; // 6 MiB: three 2 MiB regions

/// Lazy-load source: the contents a checkpoint held when pages were marked.
struct Checkpoint {
    tags: Vec<u64>,
}

impl PageSource for Checkpoint {
    fn fill(&mut self, gpa: GuestPhysAddr, page: &mut [u8; 4096]) -> Result<(), Error> {
        *page = content(self.tags[(gpa.0 / PAGE_SIZE_4K) as usize]);
        Ok(())
    }

    fn block_pages(&self) -> u32 {
        16
    }
}

fn content(tag: u64) -> [u8; 4096] {
    if tag == 0 { [0; 4096] } else { pattern(tag) }
}

type Snapshot = Vec<[Option<(HostPhysAddr, Access)>; 2]>;

fn snapshot<F: EntryFormat>(v: &VmMemory<F>, sim: &SimPhys) -> Snapshot {
    let (primary, view) = v.tables();
    (0..PAGES)
        .map(|p| {
            let gpa = g(p * PAGE_SIZE_4K);
            let t = |t: Option<crate::paging::Translation>| t.map(|t| (t.hpa, t.leaf.access));
            [t(primary.translate(sim, gpa)), view.and_then(|v| t(v.translate(sim, gpa)))]
        })
        .collect()
}

fn random_ops<F: EntryFormat>(seed: u64) {
    let mut rng = Rng::new(seed);
    let mut sim = SimPhys::new(8192);
    let mut index = SharingIndex::with_hint_slots(&mut sim, 256).unwrap();
    let mut store = MemStore::new();
    let mut ckpt = Checkpoint { tags: vec![0; PAGES as usize] };
    let map = MemoryMap::ram_only(PAGES * PAGE_SIZE_4K).unwrap();
    let mut v: VmMemory<F> = VmMemory::new(&mut sim, map, VmMemoryConfig::new(3, 4)).unwrap();
    let mut model = vec![0u64; PAGES as usize];
    let mut next_tag = 1;
    let mut flush = |s| record_flush(s);
    take_flushes();
    for step in 0..400 {
        let before = snapshot(&v, &sim);
        let page = rng.below(PAGES);
        let gpa = g(page * PAGE_SIZE_4K);
        let vcpu = rng.below(4) as usize;
        let op = rng.below(100);
        let mut hooks = Hooks { sharing: Some(&mut index), store: Some(&mut store), source: Some(&mut ckpt) };
        match op {
            0..=29 => {
                // Tags repeat, so pages share.
                let tag = if rng.chance(20) { 0 } else { 1 + rng.below(6) };
                v.sim_write(&mut sim, &mut hooks, vcpu, gpa, &content(tag)).unwrap();
                model[page as usize] = tag;
            }
            30..=44 => {
                let mut got = [0u8; 4096];
                v.sim_read(&mut sim, &mut hooks, vcpu, gpa, &mut got).unwrap();
                assert!(got == content(model[page as usize]), "step {step}: page {page:#x} differs");
            }
            45..=52 => {
                let _ = v.swap_out(&mut sim, gpa, &mut store, Some(&mut index), &mut flush);
            }
            53..=60 => {
                let r = v.share_scan(&mut sim, &mut index, 1 + rng.below(800) as usize, &mut flush);
                assert!(r.scanned > 0);
            }
            61..=65 => {
                let list: Vec<GuestPhysAddr> =
                    (0..rng.below(20)).map(|_| g(rng.below(PAGES + 10) * PAGE_SIZE_4K)).collect();
                v.balloon_inflate(&mut sim, &mut hooks, &list, &mut flush);
                for a in list {
                    if a.0 < PAGES * PAGE_SIZE_4K {
                        model[(a.0 / PAGE_SIZE_4K) as usize] = 0; // comes back zero
                    }
                }
            }
            66..=68 => {
                let list: Vec<GuestPhysAddr> = (0..PAGES).map(|p| g(p * PAGE_SIZE_4K)).step_by(7).collect();
                v.balloon_deflate(&mut sim, &list, &mut flush).unwrap();
            }
            69..=73 => {
                if v.sampling_active() {
                    v.finish_access_sampling(&mut sim, rng.below(512) as u16, &mut flush).unwrap();
                } else {
                    let regions = [g(rng.below(3) * PAGE_SIZE_2M), g(rng.below(3) * PAGE_SIZE_2M)];
                    v.start_access_sampling(&mut sim, &regions, &mut flush).unwrap();
                }
            }
            74..=79 => match v.dirty_logging() {
                Some(_) if rng.chance(30) => v.stop_dirty_log(&mut sim, &mut flush).unwrap(),
                Some(_) => {
                    v.harvest_dirty_bitmap(&mut sim, &mut flush).unwrap();
                }
                None => {
                    let mechanism =
                        if rng.chance(50) { DirtyMechanism::WriteProtect } else { DirtyMechanism::DirtyBits };
                    let granule = if rng.chance(50) { PageSize::Size4K } else { PageSize::Size2M };
                    let vcpus = if rng.chance(50) { VcpuSet::ALL } else { VcpuSet::of(&[vcpu]).unwrap() };
                    v.start_dirty_log(&mut sim, DirtyLogConfig { granule, mechanism, vcpus }, &mut flush).unwrap();
                }
            },
            80..=83 => {
                v.update_heat(&mut sim, &mut flush);
                if let Some(r) = v.rank_for_large_mapping(&sim, 1).first() {
                    v.promote_large(&mut sim, r.gpa, &mut flush);
                }
            }
            84..=86 => {
                v.break_cold_large_pages(&mut sim, &mut index, 2, &mut flush);
            }
            87..=90 => {
                // A lazy restore of a few pages: the checkpoint holds the
                // model's contents.
                ckpt.tags.copy_from_slice(&model);
                let len = (1 + rng.below(40)) * PAGE_SIZE_4K;
                v.mark_not_loaded(&mut sim, gpa, len, &mut flush).unwrap();
            }
            _ => {
                let data = [rng.below(256) as u8; 5];
                let at = g(gpa.0 + rng.below(4096 - 5));
                v.write(&mut sim, &mut hooks, at, &data, &mut flush).unwrap();
                let mut c = content(model[page as usize]);
                let off = (at.0 % PAGE_SIZE_4K) as usize;
                c[off..off + 5].copy_from_slice(&data);
                // Give the page a fresh tag whose content is `c`: keep the
                // model exact by writing the tag's pattern back instead.
                let tag = next_tag + 100;
                next_tag += 1;
                let mut hooks = Hooks { sharing: Some(&mut index), store: Some(&mut store), source: Some(&mut ckpt) };
                v.write(&mut sim, &mut hooks, gpa, &content(tag), &mut flush).unwrap();
                model[page as usize] = tag;
            }
        }
        v.check_invariants(&sim);
        // Every mapping that moved or lost a right was flushed.
        let after = snapshot(&v, &sim);
        let flushes = take_flushes();
        for p in 0..PAGES as usize {
            for t in 0..2 {
                if let Some((hpa, access)) = before[p][t] {
                    let kept = after[p][t].is_some_and(|(h, a)| h == hpa && a.contains(access));
                    let gpa = g(p as u64 * PAGE_SIZE_4K);
                    assert!(
                        kept || flushes.iter().any(|s| s.covers(gpa)),
                        "step {step} op {op}: page {gpa:?} (table {t}) changed {:?} -> {:?} without a flush",
                        before[p][t],
                        after[p][t]
                    );
                }
            }
        }
    }
    // Every page still holds what was last written.
    let mut hooks = Hooks { sharing: Some(&mut index), store: Some(&mut store), source: Some(&mut ckpt) };
    for p in 0..PAGES {
        let mut got = [0u8; 4096];
        v.read(&mut sim, &mut hooks, g(p * PAGE_SIZE_4K), &mut got, &mut flush).unwrap();
        assert!(got == content(model[p as usize]), "page {p:#x} differs at the end");
        assert!(v.page_state(g(p * PAGE_SIZE_4K)).is_some_and(PageState::is_resident) || model[p as usize] == 0);
    }
    if v.dirty_logging().is_some() {
        v.stop_dirty_log(&mut sim, &mut flush).unwrap();
    }
    // SAFETY: nothing runs on the simulated tables.
    let report = unsafe { v.free(&mut sim, &mut hooks, &mut flush) };
    assert_eq!(report, Default::default());
    assert_eq!(store.live_slots(), 0);
    assert_eq!(index.stats().zero_refs, 0);
    // SAFETY: the VM is freed.
    unsafe { index.free(&mut sim) };
    assert_eq!(sim.frames_in_use(), 0, "frames leaked");
}

fn random_ops_many_seeds<F: EntryFormat>() {
    for seed in 0..6 {
        random_ops::<F>(seed);
    }
}

for_both_formats!(random_ops_many_seeds);
