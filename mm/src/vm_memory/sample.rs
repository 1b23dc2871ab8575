//! Accessed-bit sampling:
//! - demote chosen large pages to 4 KiB mappings for an interval, count the
//!   small pages the guest touched, then restore the hot ones and leave the
//!   cold ones broken for reclamation (seed 002);
//! - rank 2 MiB regions mapped by small pages by a decayed count of their
//!   accessed bits, to choose which to map large (seed 001);
//! - estimate per-VM usage classes (zero, shared, active, idle, ...) from a
//!   random sample of pages, for the reclaim policy (seed 000).
//!
//! Accessed bits are set by the page walker (SDM Vol. 3C 29.3.5, APM Vol. 2
//! 15.25.5); a large leaf has one for all its small pages, which is why
//! sampling demotes it first.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Debug;

use crate::swap_hook::SlotWord;

use super::{PageState, VmMemory, combine, read_frame};
use crate::addr::{GuestPhysAddr, PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::error::Error;
use crate::hal::{FrameAlloc, PhysMem};
use crate::paging::{EntryFormat, FlushScope, Invalidation, PageSize};

/// The result of sampling one demoted large page.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct SampledRegion {
    /// The 2 MiB region.
    pub gpa: GuestPhysAddr,
    /// How many of its 512 small pages were accessed during the interval.
    pub accessed: u16,
    /// Whether it was mapped large again (hot); otherwise it stays broken
    /// into small pages (cold: a reclamation candidate).
    pub restored: bool,
}

/// A 2 MiB region mapped by small pages, with its access heat.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RankedRegion {
    /// The region.
    pub gpa: GuestPhysAddr,
    /// Decayed count of accessed small pages per [`VmMemory::update_heat`]
    /// period (0..=512).
    pub heat: u16,
}

/// Estimated usage classes of a VM's pages from a random sample (seed 000):
/// plain counts the reclaim policy consumes. Each sampled page is in
/// exactly one class, so the class counts add up to `sampled`; scale a
/// class to the VM with [`UsageEstimate::scale`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct UsageEstimate {
    /// Pages of RAM the VM has.
    pub total_pages: u64,
    /// Pages sampled.
    pub sampled: u64,
    /// Private pages whose contents are all zero (reclaimable by zero
    /// sharing without guest cooperation).
    pub zero: u64,
    /// Pages already backed by the zero frame or a shared frame.
    pub shared: u64,
    /// Private pages accessed during the sampling interval (active).
    pub accessed: u64,
    /// Private pages not accessed during the interval (idle: candidates for
    /// ballooning or swapping).
    pub idle: u64,
    /// Pages held by the balloon.
    pub ballooned: u64,
    /// Pages swapped out.
    pub swapped: u64,
    /// Pages not loaded yet.
    pub not_loaded: u64,
    /// Poisoned pages.
    pub poisoned: u64,
}

impl UsageEstimate {
    /// `count` sampled pages scaled to the whole VM.
    pub fn scale(&self, count: u64) -> u64 {
        if self.sampled == 0 { 0 } else { (count as u128 * self.total_pages as u128 / self.sampled as u128) as u64 }
    }
}

/// A running usage sample: the page indices drawn.
pub(super) struct UsageSample {
    pages: Vec<u32>,
}

impl UsageSample {
    pub(super) fn bookkeeping_bytes(&self) -> u64 {
        (self.pages.capacity() * 4) as u64
    }
}

/// xorshift64*: a small seeded generator (no entropy source in the kernel;
/// the caller seeds it, e.g. from the TSC).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

impl<F: EntryFormat, S: SlotWord> VmMemory<F, S> {
    /// Start an access-sampling interval: map each 2 MiB region of `regions`
    /// that is mapped large (by a 2 MiB or 1 GiB leaf) with 4 KiB pages and
    /// clear their accessed bits. Regions already small are left out.
    /// Returns how many regions were demoted.
    pub fn start_access_sampling<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        regions: &[GuestPhysAddr],
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<usize, Error> {
        if self.sampling.is_some() {
            return Err(Error::SamplingState { running: true });
        }
        let mut inv = Invalidation::none();
        let mut demoted = Vec::new();
        let mut result = Ok(());
        for &r in regions {
            let r = r.align_down(PAGE_SIZE_2M);
            let large = self.primary.translate(&*alloc, r).is_some_and(|t| t.leaf.size != PageSize::Size4K);
            if !large || demoted.contains(&r.0) {
                continue;
            }
            if let Err(e) = self.split_to_4k(alloc, r, &mut inv) {
                result = Err(e);
                break;
            }
            // Start the interval with clear bits.
            let range = r..GuestPhysAddr(r.0 + PAGE_SIZE_2M);
            combine(&mut inv, self.primary.test_and_clear_accessed(&*alloc, range.clone(), |_, _| {}));
            if let Some(view) = &mut self.view {
                combine(&mut inv, view.test_and_clear_accessed(&*alloc, range, |_, _| {}));
            }
            demoted.push(r.0);
        }
        inv.flush(alloc, &mut *flush);
        let n = demoted.len();
        self.sampling = Some(demoted);
        result.map(|()| n)
    }

    /// End the interval: count each demoted region's accessed small pages;
    /// map those with at least `hot_threshold` accessed pages large again
    /// and leave the others small.
    pub fn finish_access_sampling<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        hot_threshold: u16,
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<Vec<SampledRegion>, Error> {
        let regions = self.sampling.take().ok_or(Error::SamplingState { running: false })?;
        let mut inv = Invalidation::none();
        let mut out = Vec::with_capacity(regions.len());
        for r in regions {
            let mut seen = [0u64; 8];
            let range = GuestPhysAddr(r)..GuestPhysAddr(r + PAGE_SIZE_2M);
            let mut note = |g: GuestPhysAddr, size: PageSize| {
                if size == PageSize::Size4K && g.0 >= r {
                    let n = ((g.0 - r) / PAGE_SIZE_4K) as usize;
                    seen[n / 64] |= 1 << (n % 64);
                }
            };
            combine(&mut inv, self.primary.test_and_clear_accessed(&*alloc, range.clone(), &mut note));
            if let Some(view) = &mut self.view {
                combine(&mut inv, view.test_and_clear_accessed(&*alloc, range, &mut note));
            }
            let accessed = seen.iter().map(|w| w.count_ones()).sum::<u32>() as u16;
            let restored = accessed >= hot_threshold && self.try_merge_2m(&*alloc, GuestPhysAddr(r), &mut inv);
            out.push(SampledRegion { gpa: GuestPhysAddr(r), accessed, restored });
        }
        inv.flush(alloc, &mut *flush);
        Ok(out)
    }

    /// Whether an access-sampling interval is running.
    pub fn sampling_active(&self) -> bool {
        self.sampling.is_some()
    }

    /// One heat period: count (and clear) the accessed bits of the small
    /// pages of every 2 MiB region mapped by small pages, and fold the count
    /// into the region's heat (`heat = (heat + count) / 2`). Returns the
    /// number of regions with accessed pages.
    pub fn update_heat<A: FrameAlloc>(&mut self, alloc: &mut A, flush: &mut dyn FnMut(FlushScope)) -> usize {
        let mut counts = vec![0u16; self.heat.len()];
        let mut inv = Invalidation::none();
        let ranges: Vec<(GuestPhysAddr, u64)> = self.map.ram_ranges().collect();
        let mut note = |g: GuestPhysAddr, size: PageSize| {
            if size == PageSize::Size4K
                && let Some(c) = counts.get_mut((g.0 / PAGE_SIZE_2M) as usize)
            {
                *c = c.saturating_add(1);
            }
        };
        for &(gpa, size) in &ranges {
            let range = gpa..GuestPhysAddr(gpa.0 + size);
            combine(&mut inv, self.primary.test_and_clear_accessed(&*alloc, range.clone(), &mut note));
            if let Some(view) = &mut self.view {
                combine(&mut inv, view.test_and_clear_accessed(&*alloc, range, &mut note));
            }
        }
        inv.flush(alloc, &mut *flush);
        let mut active = 0;
        for (h, &c) in self.heat.iter_mut().zip(&counts) {
            // Both tables may report the same page: cap at the region size.
            let c = c.min(512);
            active += usize::from(c > 0);
            *h = (*h + c).div_ceil(2);
        }
        active
    }

    /// The hottest `max` 2 MiB regions that are mapped by small pages but
    /// could be mapped large (all 512 pages `Present` on their original
    /// contiguous frames), hottest first.
    pub fn rank_for_large_mapping<M: PhysMem>(&self, mem: &M, max: usize) -> Vec<RankedRegion> {
        let mut out: Vec<RankedRegion> = Vec::new();
        for (r, &heat) in self.heat.iter().enumerate() {
            let gpa = GuestPhysAddr(r as u64 * PAGE_SIZE_2M);
            if heat == 0 || !self.mergeable_2m(gpa) {
                continue;
            }
            if self.primary.translate(mem, gpa).is_none_or(|t| t.leaf.size != PageSize::Size4K) {
                continue;
            }
            out.push(RankedRegion { gpa, heat });
        }
        out.sort_by(|a, b| b.heat.cmp(&a.heat).then(a.gpa.cmp(&b.gpa)));
        out.truncate(max);
        out
    }

    /// Map the 2 MiB region at `gpa` with one large page again, if its pages
    /// allow it. Returns whether it did.
    pub fn promote_large<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        gpa: GuestPhysAddr,
        flush: &mut dyn FnMut(FlushScope),
    ) -> bool {
        let mut inv = Invalidation::none();
        let done = self.try_merge_2m(&*alloc, gpa.align_down(PAGE_SIZE_2M), &mut inv);
        inv.flush(alloc, &mut *flush);
        done
    }

    /// Whether all 512 pages of the 2 MiB region at `gpa` are RAM, `Present`
    /// and on their original frames.
    pub(super) fn mergeable_2m(&self, gpa: GuestPhysAddr) -> bool {
        let Some(first) = self.index_of(gpa.0) else { return false };
        self.index_of(gpa.0 + PAGE_SIZE_2M - 1) == Some(first + 511)
            && (first..first + 512).all(|i| self.states[i] == PageState::Present.code())
            && !self.any_read_only(gpa.0, gpa.0 + PAGE_SIZE_2M)
    }

    /// Start a usage sample: draw `samples` random pages (seeded) and clear
    /// the accessed bits of the leaves mapping them. Replaces a running
    /// sample.
    pub fn start_usage_sample<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        seed: u64,
        samples: usize,
        flush: &mut dyn FnMut(FlushScope),
    ) {
        let n = self.states.len() as u64;
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let pages: Vec<u32> = if n == 0 { Vec::new() } else { (0..samples).map(|_| (rng.next() % n) as u32).collect() };
        let mut inv = Invalidation::none();
        for &p in &pages {
            let gpa = self.gpa_of(p as usize);
            let range = gpa..GuestPhysAddr(gpa.0 + PAGE_SIZE_4K);
            combine(&mut inv, self.primary.test_and_clear_accessed(&*alloc, range.clone(), |_, _| {}));
            if let Some(view) = &mut self.view {
                combine(&mut inv, view.test_and_clear_accessed(&*alloc, range, |_, _| {}));
            }
        }
        inv.flush(alloc, &mut *flush);
        self.usage = Some(UsageSample { pages });
    }

    /// Classify the sampled pages. A private page counts as accessed if the
    /// leaf mapping it was (for a large leaf: any of its small pages, so
    /// large pages over-estimate activity).
    pub fn finish_usage_sample<M: PhysMem>(&mut self, mem: &M) -> Result<UsageEstimate, Error> {
        let sample = self.usage.take().ok_or(Error::SamplingState { running: false })?;
        let mut est = UsageEstimate { total_pages: self.states.len() as u64, ..UsageEstimate::default() };
        let mut buf = [0u8; 4096];
        for &p in &sample.pages {
            let i = p as usize;
            est.sampled += 1;
            let class = match self.state(i) {
                PageState::Zero | PageState::Shared => &mut est.shared,
                PageState::Ballooned => &mut est.ballooned,
                PageState::Swapped => &mut est.swapped,
                PageState::NotLoaded => &mut est.not_loaded,
                PageState::Poisoned => &mut est.poisoned,
                PageState::Present => {
                    let gpa = self.gpa_of(i);
                    let accessed = self.primary.translate(mem, gpa).is_some_and(|t| t.leaf.accessed)
                        || self.view.as_ref().is_some_and(|v| v.translate(mem, gpa).is_some_and(|t| t.leaf.accessed));
                    let frame = self.own_frame(i).ok_or(Error::NotGuestRam(gpa))?;
                    // SAFETY: the page's live private frame, 4 KiB-aligned.
                    unsafe { read_frame(mem.phys_to_ptr(frame), &mut buf) };
                    if buf.iter().all(|&b| b == 0) {
                        &mut est.zero
                    } else if accessed {
                        &mut est.accessed
                    } else {
                        &mut est.idle
                    }
                }
            };
            *class += 1;
        }
        Ok(est)
    }
}
