//! Memory-manager benchmarks on simulated physical memory (`SimPhys`).
//!
//! `cargo bench -p mm --features sim --bench memory`
//!
//! Prints, per operation: total time, pages, ns per page (and GiB/s where
//! that is the figure of merit). Timings are host CPU time of the
//! manager's own work (table walks, hashing, bookkeeping) against ordinary
//! host memory; no TLB flush is issued (the flush callback is a no-op).

use std::hint::black_box;
use std::time::{Duration, Instant};

use mm::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE_1G, PAGE_SIZE_2M, PAGE_SIZE_4K};
use mm::hal::PhysMem;
use mm::paging::{Access, Ept, MemType, NestedPageTable, PageSize};
use mm::sim::SimPhys;
use mm::vm_memory::{DirtyBitmap, DirtyLogConfig, DirtyMechanism, Hooks, MemoryMap, SharingIndex, VmMemoryConfig};
use mm::{VmMemory, swap_hook::MemStore};

const GIB: u64 = PAGE_SIZE_1G;
const PAGES: u64 = GIB / PAGE_SIZE_4K;

fn report(name: &str, d: Duration, pages: u64) {
    let ns = d.as_nanos() as f64;
    println!("{name:<52} {:>10.3} ms {pages:>8} pages {:>8.1} ns/page", ns / 1e6, ns / pages.max(1) as f64);
}

fn report_rate(name: &str, d: Duration, pages: u64) {
    let secs = d.as_secs_f64();
    let gib = pages as f64 * PAGE_SIZE_4K as f64 / GIB as f64;
    println!(
        "{name:<52} {:>10.3} ms {pages:>8} pages {:>8.1} ns/page {:>6.2} GiB/s",
        secs * 1e3,
        secs * 1e9 / pages.max(1) as f64,
        gib / secs
    );
}

fn sim() -> SimPhys {
    SimPhys::new((PAGES + 16384) as usize)
}

fn vm(sim: &mut SimPhys, max: PageSize) -> VmMemory<Ept> {
    let config = VmMemoryConfig { id: 1, vcpus: 4, max_page_size: max };
    VmMemory::new(sim, MemoryMap::ram_only(GIB).unwrap(), config).unwrap()
}

fn free(v: VmMemory<Ept>, sim: &mut SimPhys, index: Option<&mut SharingIndex>) {
    let mut hooks = Hooks { sharing: index, store: None, source: None };
    // SAFETY: nothing runs on the simulated tables.
    unsafe { v.free(sim, &mut hooks, &mut |_| {}) };
}

/// Write `word(page)` into the first 8 bytes of every page and `fill` into
/// the rest, directly through the simulated direct map.
fn fill(v: &VmMemory<Ept>, sim: &SimPhys, fill: u8, word: impl Fn(u64) -> u64) {
    for p in 0..PAGES {
        let hpa = v.table().translate(sim, GuestPhysAddr(p * PAGE_SIZE_4K)).unwrap().hpa;
        let ptr = sim.phys_to_ptr(hpa);
        // SAFETY: a live guest frame of the simulated memory, 4 KiB long;
        // no vCPU runs.
        unsafe {
            ptr.write_bytes(fill, PAGE_SIZE_4K as usize);
            ptr.cast::<u64>().write(word(p));
        }
    }
}

fn map_all(t: &mut NestedPageTable<Ept>, s: &mut SimPhys) {
    for p in 0..PAGES {
        let a = p * PAGE_SIZE_4K;
        let inv = t.map(s, GuestPhysAddr(a), HostPhysAddr(a), PageSize::Size4K, Access::RWX, MemType::WriteBack);
        inv.unwrap().flush(s, |_| {});
    }
}

fn bench_map_unmap() {
    println!("-- nested page table (EPT), 1 GiB");
    let mut s = sim();
    let mut t = NestedPageTable::<Ept>::new(&mut s).unwrap();
    let t0 = Instant::now();
    map_all(&mut t, &mut s);
    report("map 4 KiB (fresh tables)", t0.elapsed(), PAGES);
    let t0 = Instant::now();
    for p in 0..PAGES {
        let (_, inv) = t.unmap(&s, GuestPhysAddr(p * PAGE_SIZE_4K), PageSize::Size4K).unwrap();
        inv.flush(&mut s, |_| {});
    }
    report("unmap 4 KiB", t0.elapsed(), PAGES);
    let t0 = Instant::now();
    map_all(&mut t, &mut s);
    report("map 4 KiB (tables present)", t0.elapsed(), PAGES);
    let t0 = Instant::now();
    let mut n = 0u64;
    t.for_each_mapping(&s, GuestPhysAddr(0)..GuestPhysAddr(GIB), |m| n += m.leaf.hpa.0 & 1);
    black_box(n);
    report("for_each_mapping", t0.elapsed(), PAGES);
    let t0 = Instant::now();
    let inv = t.update_access(&s, GuestPhysAddr(0)..GuestPhysAddr(GIB), |_, _, a| a - Access::WRITE);
    inv.flush(&mut s, |_| {});
    report("update_access (write-protect all)", t0.elapsed(), PAGES);
    let t0 = Instant::now();
    for p in 0..PAGES {
        let inv = t.protect(&s, GuestPhysAddr(p * PAGE_SIZE_4K), PageSize::Size4K, Access::RWX).unwrap();
        inv.flush(&mut s, |_| {});
    }
    report("protect one page at a time", t0.elapsed(), PAGES);
    let t0 = Instant::now();
    let mut inv = mm::paging::Invalidation::none();
    for r in 0..GIB / PAGE_SIZE_2M {
        inv = inv.combine(t.merge(&s, GuestPhysAddr(r * PAGE_SIZE_2M), PageSize::Size2M).unwrap());
    }
    inv.flush(&mut s, |_| {});
    report("merge 512 x 2 MiB (from 4 KiB)", t0.elapsed(), PAGES);
    let t0 = Instant::now();
    let mut inv = mm::paging::Invalidation::none();
    for r in 0..GIB / PAGE_SIZE_2M {
        inv = inv.combine(t.split(&mut s, GuestPhysAddr(r * PAGE_SIZE_2M)).unwrap());
    }
    inv.flush(&mut s, |_| {});
    report("split 512 x 2 MiB (to 4 KiB)", t0.elapsed(), PAGES);
    t.destroy().flush(&mut s, |_| {});

    let t0 = Instant::now();
    let v = vm(&mut s, PageSize::Size1G);
    report("VmMemory::new 1 GiB (1 GiB block, 1 GiB leaf)", t0.elapsed(), PAGES);
    println!("    bookkeeping {} bytes", v.bookkeeping_bytes());
    free(v, &mut s, None);
}

fn bench_dirty() {
    println!("-- dirty logging, 1 GiB of 4 KiB mappings");
    for mechanism in [DirtyMechanism::DirtyBits, DirtyMechanism::WriteProtect] {
        let mut s = sim();
        let mut v = vm(&mut s, PageSize::Size1G);
        let t0 = Instant::now();
        let cfg = DirtyLogConfig::new(PageSize::Size4K, mechanism);
        v.start_dirty_log(&mut s, cfg, &mut |_| {}).unwrap();
        report(&format!("start ({mechanism:?}: split 1 GiB to 4 KiB, arm)"), t0.elapsed(), PAGES);
        println!(
            "    bookkeeping {} bytes, page tables {} KiB",
            v.bookkeeping_bytes(),
            v.memory_report().page_table_bytes / 1024
        );
        let mut bm = DirtyBitmap::new();
        v.harvest_dirty(&mut s, &mut bm, &mut |_| {}).unwrap();
        for dirty_pct in [0u64, 1, 10, 100] {
            let mut hooks = Hooks::none();
            let step = 100u64.checked_div(dirty_pct).unwrap_or(u64::MAX);
            let mut written = 0;
            let mut p = 0;
            while dirty_pct > 0 && p < PAGES {
                v.sim_write(&mut s, &mut hooks, 0, GuestPhysAddr(p * PAGE_SIZE_4K), &[1]).unwrap();
                written += 1;
                p += step;
            }
            let t0 = Instant::now();
            v.harvest_dirty(&mut s, &mut bm, &mut |_| {}).unwrap();
            let d = t0.elapsed();
            assert_eq!(bm.count(), written);
            report(&format!("harvest {mechanism:?}, {dirty_pct}% dirty ({written} pages)"), d, PAGES);
        }
        // Cost of the write-protection fault path itself.
        if mechanism == DirtyMechanism::WriteProtect {
            let mut hooks = Hooks::none();
            let t0 = Instant::now();
            let n = 65536;
            for p in 0..n {
                v.sim_write(&mut s, &mut hooks, 0, GuestPhysAddr(p * PAGE_SIZE_4K), &[2]).unwrap();
            }
            report("write-protect fault + retry (simulated vCPU)", t0.elapsed(), n);
        }
        v.stop_dirty_log(&mut s, &mut |_| {}).unwrap();
        free(v, &mut s, None);
    }
}

fn bench_sharing() {
    println!("-- page sharing scan, 1 GiB of 4 KiB mappings");
    type Case = (&'static str, u8, fn(u64) -> u64);
    let cases: [Case; 3] = [
        ("all pages unique (hash + hint)", 0x5A, |p| p + 1),
        ("16 distinct contents (hash + compare + merge)", 0x5A, |p| p % 16 + 1),
        ("all zero (zero check + merge)", 0, |_| 0),
    ];
    for (name, byte, word) in cases {
        let mut s = sim();
        let mut index = SharingIndex::new(&mut s).unwrap();
        let mut v = vm(&mut s, PageSize::Size4K);
        fill(&v, &s, byte, word);
        let before = s.frames_in_use();
        let t0 = Instant::now();
        let r = v.share_scan(&mut s, &mut index, PAGES as usize, &mut |_| {});
        let d = t0.elapsed();
        report_rate(&format!("scan: {name}"), d, r.scanned);
        println!(
            "    zero {} shared {} promoted {} hints {} frames freed {} (pool +{})",
            r.zero_merged,
            r.shared_merged,
            r.promoted,
            r.hints_added,
            r.frames_freed,
            before.saturating_sub(s.frames_in_use())
        );
        // Second pass: everything already shared or hinted.
        let t0 = Instant::now();
        let r2 = v.share_scan(&mut s, &mut index, PAGES as usize, &mut |_| {});
        report_rate(&format!("rescan: {name}"), t0.elapsed(), r2.scanned);
        free(v, &mut s, Some(&mut index));
        // SAFETY: the VM using it is freed.
        unsafe { index.free(&mut s) };
    }
    // Large pages: analysis only (no breaking).
    let mut s = sim();
    let mut index = SharingIndex::new(&mut s).unwrap();
    let mut v = vm(&mut s, PageSize::Size2M);
    fill(&v, &s, 0x5A, |p| if p % 4 == 0 { 0 } else { p % 64 + 1 });
    let t0 = Instant::now();
    let r = v.share_scan(&mut s, &mut index, PAGES as usize, &mut |_| {});
    report_rate("scan inside 2 MiB pages (estimate only)", t0.elapsed(), r.scanned);
    let est = v.large_page_sharing();
    println!("    {} regions, {} shareable pages, {} MiB", est.regions, est.pages, est.bytes >> 20);
    let t0 = Instant::now();
    let r = v.break_cold_large_pages(&mut s, &mut index, 512, &mut |_| {});
    report("break 512 cold 2 MiB pages and share", t0.elapsed(), r.scanned);
    println!("    broken {} frames freed {}", r.large_broken, r.frames_freed);
    free(v, &mut s, Some(&mut index));
    // SAFETY: the VM using it is freed.
    unsafe { index.free(&mut s) };
}

fn bench_sampling() {
    println!("-- access sampling, 1 GiB");
    let mut s = sim();
    let mut v = vm(&mut s, PageSize::Size2M);
    let regions: Vec<GuestPhysAddr> = (0..512).map(|r| GuestPhysAddr(r * PAGE_SIZE_2M)).collect();
    let t0 = Instant::now();
    let n = v.start_access_sampling(&mut s, &regions, &mut |_| {}).unwrap();
    report("demote 512 x 2 MiB to 4 KiB, clear A", t0.elapsed(), PAGES);
    assert_eq!(n, 512);
    let mut hooks = Hooks::none();
    let mut b = [0u8; 1];
    // Half the regions hot (every page), half cold (one page).
    for r in 0..512u64 {
        let pages = if r % 2 == 0 { 512 } else { 1 };
        for p in 0..pages {
            v.sim_read(&mut s, &mut hooks, 0, GuestPhysAddr(r * PAGE_SIZE_2M + p * PAGE_SIZE_4K), &mut b).unwrap();
        }
    }
    let t0 = Instant::now();
    let got = v.finish_access_sampling(&mut s, 256, &mut |_| {}).unwrap();
    report("count A bits, restore 256 hot regions", t0.elapsed(), PAGES);
    assert_eq!(got.iter().filter(|r| r.restored).count(), 256);
    let t0 = Instant::now();
    let active = v.update_heat(&mut s, &mut |_| {});
    report("update_heat (256 small-mapped regions)", t0.elapsed(), PAGES / 2);
    black_box(active);
    let t0 = Instant::now();
    let ranked = v.rank_for_large_mapping(&s, 16);
    report("rank_for_large_mapping", t0.elapsed(), PAGES);
    black_box(ranked);
    let t0 = Instant::now();
    v.start_usage_sample(&mut s, 42, 10_000, &mut |_| {});
    let est = v.finish_usage_sample(&s).unwrap();
    report("usage sample of 10000 pages (start + finish)", t0.elapsed(), 10_000);
    println!("    {est:?}");
    free(v, &mut s, None);
}

fn bench_swap_balloon() {
    println!("-- swap and balloon, 64 MiB worth of pages");
    let n = 16384u64;
    let mut s = sim();
    let mut v = vm(&mut s, PageSize::Size2M);
    let mut store = MemStore::new();
    let t0 = Instant::now();
    for p in 0..n {
        v.swap_out(&mut s, GuestPhysAddr(p * PAGE_SIZE_4K), &mut store, None, &mut |_| {}).unwrap();
    }
    report("swap_out (to MemStore)", t0.elapsed(), n);
    let mut hooks = Hooks { store: Some(&mut store), ..Hooks::none() };
    let mut b = [0u8; 1];
    let t0 = Instant::now();
    for p in 0..n {
        v.sim_read(&mut s, &mut hooks, 0, GuestPhysAddr(p * PAGE_SIZE_4K), &mut b).unwrap();
    }
    report("page-in on fault (from MemStore)", t0.elapsed(), n);
    let list: Vec<GuestPhysAddr> = (0..n).map(|p| GuestPhysAddr((n + p) * PAGE_SIZE_4K)).collect();
    let t0 = Instant::now();
    let r = v.balloon_inflate(&mut s, &mut Hooks::none(), &list, &mut |_| {});
    report("balloon inflate", t0.elapsed(), r.accepted);
    let t0 = Instant::now();
    let r = v.balloon_deflate(&mut s, &list, &mut |_| {}).unwrap();
    report("balloon deflate", t0.elapsed(), r.accepted);
    free(v, &mut s, None);
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let run = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    println!("mm memory benchmarks (SimPhys, host CPU; flushes are no-ops)");
    if run("map") {
        bench_map_unmap();
    }
    if run("dirty") {
        bench_dirty();
    }
    if run("sharing") {
        bench_sharing();
    }
    if run("sampling") {
        bench_sampling();
    }
    if run("swap") {
        bench_swap_balloon();
    }
}
