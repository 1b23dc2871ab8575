//! Host swap and reclaim-planning costs on the in-memory block store.
//!
//! `cargo bench -p mm --features sim --bench swap`
//!
//! Swap-out and swap-in go through `SwapFile` (the `PageStore` the memory
//! manager uses) onto `MemBlockStore`, so the figures are the format's CPU
//! cost (header, two CRC-32Cs, copies, slot bookkeeping) without a disk:
//! a lower bound on per-page overhead, not a disk throughput.

use std::hint::black_box;
use std::time::{Duration, Instant};

use mm::GuestPhysAddr;
use mm::reclaim::{Balloon, HostMemory, ReclaimConfig, UsageEstimate, VmReclaimInput, plan};
use mm::swap::format::{FIRST_SLOT_BLOCK, SLOT_BLOCKS, crc32c};
use mm::swap::{MemBlockStore, SwapReservation, VmSwapSpec};
use mm::swap_hook::PageStore;

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

const PAGES: u64 = 16_384; // 64 MiB of guest pages
const ROUNDS: usize = 5;

fn mib(pages: u64) -> f64 {
    pages as f64 * 4096.0 / (1024.0 * 1024.0)
}

fn report(what: &str, pages: u64, times: &[Duration]) {
    let best = times.iter().min().copied().unwrap_or_default();
    let mut sorted = times.to_vec();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    println!(
        "{what:<10} {pages} pages ({:.0} MiB): best {:>8.2} ms, median {:>8.2} ms | {:>7.0} MiB/s, {:>6.0} ns/page, {:.2} ms/MiB (best)",
        mib(pages),
        best.as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e3,
        mib(pages) / best.as_secs_f64(),
        best.as_nanos() as f64 / pages as f64,
        best.as_secs_f64() * 1e3 / mib(pages),
    );
}

fn bench_swap() {
    let mut rng = Rng(1);
    let pages: Vec<[u8; 4096]> = (0..1024)
        .map(|_| {
            let mut p = [0u8; 4096];
            for c in p.chunks_mut(8) {
                c.copy_from_slice(&rng.next().to_le_bytes());
            }
            p
        })
        .collect();
    let dev = MemBlockStore::new(FIRST_SLOT_BLOCK + PAGES * SLOT_BLOCKS);
    let mut res = SwapReservation::format(dev).expect("format");
    res.create_pool_with(0, &[VmSwapSpec { vm: 1, configured_pages: PAGES, reserved_pages: 0 }]).expect("pool");

    let (mut outs, mut ins) = (Vec::new(), Vec::new());
    let mut slots = Vec::with_capacity(PAGES as usize);
    for _ in 0..ROUNDS {
        let mut file = res.file(1).expect("file");
        let t = Instant::now();
        for i in 0..PAGES {
            let slot = file.page_out(GuestPhysAddr(i << 12), &pages[i as usize % pages.len()]).expect("page out");
            slots.push(slot);
        }
        outs.push(t.elapsed());

        let mut buf = [0u8; 4096];
        let t = Instant::now();
        for (i, &slot) in slots.iter().enumerate() {
            file.page_in(slot, GuestPhysAddr((i as u64) << 12), &mut buf).expect("page in");
            black_box(&buf);
        }
        ins.push(t.elapsed());
        // Check one page, outside the timing.
        file.page_in(slots[7], GuestPhysAddr(7 << 12), &mut buf).expect("page in");
        assert_eq!(buf, pages[7]);
        for slot in slots.drain(..) {
            file.release(slot);
        }
    }
    report("swap-out", PAGES, &outs);
    report("swap-in", PAGES, &ins);
    let io = res.device().stats();
    println!(
        "device I/O: {} writes ({} blocks), {} reads ({} blocks), {} flushes; {} blocks per 4 KiB page",
        io.writes, io.blocks_written, io.reads, io.blocks_read, io.flushes, SLOT_BLOCKS
    );

    // The checksum alone, for scale.
    let t = Instant::now();
    let mut x = 0u32;
    for i in 0..PAGES {
        x ^= crc32c(black_box(&pages[i as usize % pages.len()]));
    }
    black_box(x);
    let e = t.elapsed();
    println!(
        "crc32c     {PAGES} pages: {:.2} ms, {:.0} MiB/s, {:.0} ns/page",
        e.as_secs_f64() * 1e3,
        mib(PAGES) / e.as_secs_f64(),
        e.as_nanos() as f64 / PAGES as f64
    );
}

fn vms(n: usize, rng: &mut Rng) -> Vec<VmReclaimInput> {
    (0..n)
        .map(|i| {
            let configured = 65_536 + rng.below(4 * 65_536);
            let resident = configured - rng.below(configured / 4);
            let (active, idle) = (rng.below(300), rng.below(300));
            VmReclaimInput {
                vm: i as u32,
                shares: 500 + rng.below(2000) as u32,
                configured_pages: configured,
                reserved_pages: rng.below(configured / 2),
                resident_pages: resident,
                swapped_pages: 0,
                balloon: (i % 3 != 0).then_some(Balloon {
                    current_pages: configured - resident,
                    pending_pages: 0,
                    max_pages: configured * 3 / 4,
                }),
                estimate: UsageEstimate {
                    sampled: 600,
                    zero: 600 - active - idle,
                    shared: 0,
                    active,
                    idle,
                    duplicate: rng.below(idle + 1),
                },
                guest: None,
            }
        })
        .collect()
}

fn bench_plan(n: usize) {
    let mut rng = Rng(n as u64);
    let inputs = vms(n, &mut rng);
    let resident: u64 = inputs.iter().map(|v| v.resident_pages).sum();
    // Ask for a fifth of resident memory: sharing, idle and some active.
    let host = HostMemory { free_pages: 0, target_free_pages: resident / 5, min_free_pages: 0 };
    let cfg = ReclaimConfig::default();
    let iters = 2000;
    let mut planned = 0;
    let t = Instant::now();
    for _ in 0..iters {
        let p = plan(black_box(&host), black_box(&inputs), &cfg);
        planned = p.planned;
        black_box(p);
    }
    let e = t.elapsed();
    println!(
        "plan       {n} VMs: {:.1} us per plan ({iters} plans); need {} pages, planned {planned}",
        e.as_secs_f64() * 1e6 / iters as f64,
        resident / 5
    );
}

fn main() {
    println!("mm swap benchmark (in-memory block store, release build)");
    bench_swap();
    bench_plan(64);
    bench_plan(1024);
}
