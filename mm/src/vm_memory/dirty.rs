//! Dirty logging: which guest pages were written between two harvests.
//!
//! Two mechanisms, chosen per VM when logging starts:
//! - **Write protection**: every page of the logged table loses its write
//!   right; the first write to a granule faults, the fault handler marks the
//!   granule and opens it for writes; a harvest reports the marks and
//!   protects the marked granules again.
//! - **Dirty bits**: the hardware sets the leaf's dirty flag (EPT with
//!   EPTP bit 6, SDM Vol. 3C 29.3.5; NPT always, APM Vol. 2 15.25.5); a
//!   harvest tests and clears them.
//!
//! Either way a harvest flushes before it returns, so a write after the
//! harvest faults (or sets the bit) again, and a write racing with the
//! harvest went to a page the harvest reports (its translation was writable,
//! so it was marked) and that the caller copies after the harvest:
//! every write is reported exactly once.
//!
//! Granularity is 4 KiB or 2 MiB. Leaves larger than the granule are split
//! when logging starts (and merged back, where possible, when it stops), so
//! write protection and dirty bits both work per granule.
//!
//! Write traces on a subset of vCPUs (seed 001): with write protection, the
//! traced vCPUs run on a *view*, a copy of the table whose leaves are
//! write-protected, while the others keep the primary table and never fault
//! for logging. Their writes are not logged: the caller uses a subset only
//! when it knows the others do not write guest memory that matters (e.g.
//! they are parked). [`VmMemory::root_for_vcpu`] says which root each vCPU
//! must use.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Debug;

use crate::swap_hook::SlotWord;

use super::{PageState, VmMemory, combine, split_down};
use crate::addr::{GuestPhysAddr, PAGE_SIZE_1G, PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::error::Error;
use crate::hal::{FrameAlloc, PhysMem};
use crate::paging::{Access, EntryFormat, FlushScope, Invalidation, Mapping, NestedPageTable, PageSize};

/// How writes are detected.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum DirtyMechanism {
    /// Write-protection faults.
    WriteProtect,
    /// Hardware dirty bits (needs EPT A/D enabled on Intel).
    DirtyBits,
}

/// A set of vCPU indices (0..64).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct VcpuSet(pub u64);

impl VcpuSet {
    /// Every vCPU.
    pub const ALL: VcpuSet = VcpuSet(u64::MAX);

    /// The vCPUs listed.
    pub fn of(vcpus: &[usize]) -> Result<Self, Error> {
        let mut bits = 0u64;
        for &v in vcpus {
            if v >= 64 {
                return Err(Error::InvalidVcpu(v));
            }
            bits |= 1 << v;
        }
        Ok(VcpuSet(bits))
    }

    /// Whether vCPU `n` is in the set.
    pub fn contains(self, n: usize) -> bool {
        n < 64 && self.0 & (1 << n) != 0
    }

    /// Whether the set holds all of vCPUs `0..count`.
    pub fn covers(self, count: usize) -> bool {
        let all = if count >= 64 { u64::MAX } else { (1u64 << count) - 1 };
        self.0 & all == all
    }
}

/// How dirty logging runs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct DirtyLogConfig {
    /// 4 KiB or 2 MiB.
    pub granule: PageSize,
    /// Write protection or dirty bits.
    pub mechanism: DirtyMechanism,
    /// The traced vCPUs (write protection only; dirty bits see every vCPU).
    pub vcpus: VcpuSet,
}

impl DirtyLogConfig {
    /// Logging of every vCPU.
    pub fn new(granule: PageSize, mechanism: DirtyMechanism) -> Self {
        Self { granule, mechanism, vcpus: VcpuSet::ALL }
    }
}

/// The running log.
pub(super) struct DirtyLog {
    pub(super) config: DirtyLogConfig,
    /// One bit per granule of `[0, ram_end)`: written since the last
    /// harvest (and, under write protection, open for writes).
    marked: Vec<u64>,
    shift: u32,
    /// Large leaves split when logging started: `(gpa, size)`.
    split: Vec<(u64, PageSize)>,
}

impl DirtyLog {
    pub(super) fn mark(&mut self, gpa: u64) {
        let g = (gpa >> self.shift) as usize;
        if let Some(w) = self.marked.get_mut(g / 64) {
            *w |= 1 << (g % 64);
        }
    }

    pub(super) fn is_marked(&self, gpa: u64) -> bool {
        let g = (gpa >> self.shift) as usize;
        self.marked.get(g / 64).is_some_and(|w| w & (1 << (g % 64)) != 0)
    }

    pub(super) fn granule_bytes(&self) -> u64 {
        1 << self.shift
    }

    pub(super) fn bookkeeping_bytes(&self) -> u64 {
        (self.marked.capacity() * 8 + self.split.capacity() * core::mem::size_of::<(u64, PageSize)>()) as u64
    }
}

/// A harvested dirty bitmap: one bit per granule of guest-physical space
/// from 0 to the end of RAM.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct DirtyBitmap {
    granule: PageSize,
    bits: Vec<u64>,
}

impl Default for DirtyBitmap {
    fn default() -> Self {
        Self::new()
    }
}

impl DirtyBitmap {
    /// An empty bitmap (filled by `harvest_dirty_into`; reuse it to avoid
    /// allocating per harvest).
    pub fn new() -> Self {
        Self { granule: PageSize::Size4K, bits: Vec::new() }
    }

    /// The granule one bit stands for.
    pub fn granule(&self) -> PageSize {
        self.granule
    }

    /// Whether the granule containing `gpa` was written.
    pub fn is_dirty(&self, gpa: GuestPhysAddr) -> bool {
        let g = (gpa.0 / self.granule.bytes()) as usize;
        self.bits.get(g / 64).is_some_and(|w| w & (1 << (g % 64)) != 0)
    }

    /// Number of dirty granules.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Base addresses of the dirty granules, in order.
    pub fn iter(&self) -> impl Iterator<Item = GuestPhysAddr> + '_ {
        let g = self.granule.bytes();
        self.bits.iter().enumerate().flat_map(move |(w, &bits)| {
            let mut bits = bits;
            core::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                Some(GuestPhysAddr((w as u64 * 64 + b) * g))
            })
        })
    }

    /// The raw words (bit `n` of word `w`: granule `64 w + n`).
    pub fn words(&self) -> &[u64] {
        &self.bits
    }
}

/// Index of the first bit at or after `from` that is `set` (1) or clear
/// (0); `words.len() * 64` if none.
fn next_bit(words: &[u64], from: u64, set: bool) -> u64 {
    let end = words.len() as u64 * 64;
    let mut w = (from / 64) as usize;
    if w >= words.len() {
        return end;
    }
    let word = |w: usize| if set { words[w] } else { !words[w] };
    let mut cur = word(w) & (u64::MAX << (from % 64));
    loop {
        if cur != 0 {
            return w as u64 * 64 + u64::from(cur.trailing_zeros());
        }
        w += 1;
        if w >= words.len() {
            return end;
        }
        cur = word(w);
    }
}

/// Maximal runs of set bits, as `(first, count)` bit indices.
fn runs(words: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let end = words.len() as u64 * 64;
    let mut pos = 0;
    core::iter::from_fn(move || {
        let start = next_bit(words, pos, true);
        if start >= end {
            return None;
        }
        pos = next_bit(words, start, false);
        Some((start, pos - start))
    })
}

impl<F: EntryFormat, S: SlotWord> VmMemory<F, S> {
    /// The running dirty log's configuration.
    pub fn dirty_logging(&self) -> Option<DirtyLogConfig> {
        self.dirty.as_ref().map(|l| l.config)
    }

    /// Start dirty logging. Writes after this returns are reported by
    /// harvests. `flush` must invalidate the given scope on every CPU
    /// running the VM, on all its roots.
    pub fn start_dirty_log<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        config: DirtyLogConfig,
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<(), Error> {
        if self.dirty.is_some() {
            return Err(Error::DirtyLogState { running: true });
        }
        if self.snapshot.is_some() {
            // Both own the write right of every page.
            return Err(Error::SnapshotState { running: true });
        }
        if !matches!(config.granule, PageSize::Size4K | PageSize::Size2M) {
            return Err(Error::UnsupportedGranularity(config.granule));
        }
        if config.vcpus.0 & mask(self.config.vcpus) == 0 {
            // At least one of the VM's vCPUs must be traced.
            return Err(Error::InvalidVcpu(config.vcpus.0.trailing_zeros() as usize));
        }
        let mut inv = Invalidation::none();
        let split = self.split_above(alloc, config.granule, &mut inv);
        let split = match split {
            Ok(s) => s,
            Err(e) => {
                inv.flush(alloc, &mut *flush);
                return Err(e);
            }
        };
        let subset = config.mechanism == DirtyMechanism::WriteProtect && !config.vcpus.covers(self.config.vcpus);
        let ranges: Vec<(GuestPhysAddr, u64)> = self.map.ram_ranges().collect();
        if subset {
            match self.build_view(alloc) {
                Ok(view) => {
                    self.view = Some(view);
                    self.roots_generation += 1;
                }
                Err(e) => {
                    inv.flush(alloc, &mut *flush);
                    return Err(e);
                }
            }
        } else {
            for &(gpa, size) in &ranges {
                let range = gpa..GuestPhysAddr(gpa.0 + size);
                match config.mechanism {
                    DirtyMechanism::WriteProtect => {
                        combine(&mut inv, self.primary.update_access(&*alloc, range, |_, _, a| a - Access::WRITE));
                    }
                    DirtyMechanism::DirtyBits => {
                        combine(&mut inv, self.primary.test_and_clear_dirty(&*alloc, range, |_, _| {}));
                    }
                }
            }
        }
        inv.flush(alloc, &mut *flush);
        let shift = config.granule.bytes().trailing_zeros();
        let granules = self.ram_end.div_ceil(config.granule.bytes()) as usize;
        self.dirty = Some(DirtyLog { config, marked: vec![0; granules.div_ceil(64)], shift, split });
        Ok(())
    }

    /// Split every leaf larger than `granule` in the primary table; returns
    /// the split leaves.
    pub(super) fn split_above<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        granule: PageSize,
        inv: &mut Invalidation<F>,
    ) -> Result<Vec<(u64, PageSize)>, Error> {
        let mut large = Vec::new();
        for (gpa, size) in self.map.ram_ranges() {
            self.primary.for_each_mapping(&*alloc, gpa..GuestPhysAddr(gpa.0 + size), |m: Mapping| {
                if m.leaf.size > granule {
                    large.push((m.gpa.0, m.leaf.size));
                }
            });
        }
        for &(gpa, size) in &large {
            let mut at = gpa;
            while at < gpa + size.bytes() {
                split_down(&mut self.primary, alloc, GuestPhysAddr(at), granule, inv)?;
                at += granule.bytes();
            }
        }
        Ok(large)
    }

    /// A copy of the primary table with write rights removed.
    fn build_view<A: FrameAlloc>(&mut self, alloc: &mut A) -> Result<NestedPageTable<F>, Error> {
        let mut view = NestedPageTable::<F>::new(alloc)?;
        view.set_max_page_size(self.primary.max_page_size());
        let mut leaves = Vec::new();
        for (gpa, size) in self.map.ram_ranges() {
            self.primary.for_each_mapping(&*alloc, gpa..GuestPhysAddr(gpa.0 + size), |m| leaves.push(m));
        }
        for m in leaves {
            let l = m.leaf;
            match view.map(alloc, m.gpa, l.hpa, l.size, l.access - Access::WRITE, l.mem_type) {
                // A fresh table: nothing to invalidate or retire.
                Ok(inv) => inv.flush(alloc, |_| {}),
                Err(e) => {
                    // Never loaded by a CPU: no flush needed.
                    view.destroy().flush(alloc, |_| {});
                    return Err(e);
                }
            }
        }
        Ok(view)
    }

    /// Report (into `out`) every granule written since the previous harvest
    /// (or the start), and re-arm logging for them. Flushes through `flush`
    /// before returning.
    pub fn harvest_dirty<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        out: &mut DirtyBitmap,
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<(), Error> {
        let Some(log) = &mut self.dirty else {
            return Err(Error::DirtyLogState { running: false });
        };
        let mut inv = Invalidation::none();
        if log.config.mechanism == DirtyMechanism::DirtyBits {
            let shift = log.shift;
            for (gpa, size) in self.map.ram_ranges() {
                let range = gpa..GuestPhysAddr(gpa.0 + size);
                let marked = &mut log.marked;
                let i = self.primary.test_and_clear_dirty(&*alloc, range, |g, size| {
                    let first = g.0 >> shift;
                    let last = (g.0 + size.bytes() - 1) >> shift;
                    for n in first..=last {
                        if let Some(w) = marked.get_mut((n / 64) as usize) {
                            *w |= 1 << (n % 64);
                        }
                    }
                });
                combine(&mut inv, i);
            }
        }
        let granules = log.marked.len();
        out.granule = log.config.granule;
        out.bits.clear();
        out.bits.resize(granules, 0);
        core::mem::swap(&mut out.bits, &mut log.marked);
        if log.config.mechanism == DirtyMechanism::WriteProtect {
            let g = log.granule_bytes();
            let table = self.view.as_mut().unwrap_or(&mut self.primary);
            for (first, count) in runs(&out.bits) {
                let range = GuestPhysAddr(first * g)..GuestPhysAddr((first + count) * g);
                combine(&mut inv, table.update_access(&*alloc, range, |_, _, a| a - Access::WRITE));
            }
        }
        inv.flush(alloc, &mut *flush);
        Ok(())
    }

    /// [`Self::harvest_dirty`] into a new bitmap.
    pub fn harvest_dirty_bitmap<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<DirtyBitmap, Error> {
        let mut out = DirtyBitmap::new();
        self.harvest_dirty(alloc, &mut out, flush)?;
        Ok(out)
    }

    /// Stop dirty logging: give write rights back (or drop the view), and
    /// map with large pages again what logging split, where possible.
    pub fn stop_dirty_log<A: FrameAlloc>(
        &mut self,
        alloc: &mut A,
        flush: &mut dyn FnMut(FlushScope),
    ) -> Result<(), Error> {
        let Some(log) = self.dirty.take() else {
            return Err(Error::DirtyLogState { running: false });
        };
        let mut inv = Invalidation::none();
        if let Some(view) = self.view.take() {
            combine(&mut inv, view.destroy());
            self.roots_generation += 1;
        } else if log.config.mechanism == DirtyMechanism::WriteProtect {
            let ranges: Vec<(GuestPhysAddr, u64)> = self.map.ram_ranges().collect();
            for (gpa, size) in ranges {
                self.open_range(&*alloc, gpa.0, size, &mut inv);
            }
        }
        // Pages may have changed state while logging; merging re-checks.
        self.remerge(&*alloc, &log.split, &mut inv);
        inv.flush(alloc, &mut *flush);
        Ok(())
    }

    /// Map with large leaves again, where possible, what
    /// [`Self::split_above`] split (`split`): when dirty logging or a
    /// snapshot stops.
    pub(super) fn remerge<M: PhysMem>(&mut self, mem: &M, split: &[(u64, PageSize)], inv: &mut Invalidation<F>) {
        for &(gpa, size) in split {
            let mut at = gpa;
            while at < gpa + size.bytes() {
                self.try_merge_2m(mem, GuestPhysAddr(at), inv);
                at += PAGE_SIZE_2M;
            }
            if size == PageSize::Size1G
                && let Ok(i) = self.primary.merge(mem, GuestPhysAddr(gpa), PageSize::Size1G)
            {
                combine(inv, i);
            }
        }
        debug_assert!(split.iter().all(|&(g, s)| g % PAGE_SIZE_2M == 0 && s.bytes() <= PAGE_SIZE_1G));
    }

    /// Give write rights back to the `Present` pages of `[start, start+len)`
    /// in the logged table (the view, else the primary).
    pub(super) fn open_for_writes<M: PhysMem>(&mut self, mem: &M, start: u64, len: u64, inv: &mut Invalidation<F>) {
        self.open_range(mem, start, len, inv);
    }

    fn open_range<M: PhysMem>(&mut self, mem: &M, start: u64, len: u64, inv: &mut Invalidation<F>) {
        let Self { primary, view, states, ranges, read_only, .. } = self;
        let table = view.as_mut().unwrap_or(primary);
        let present = |gpa: u64| {
            if read_only.iter().any(|&(s, e)| (s..e).contains(&gpa)) {
                return false; // ROM never opens
            }
            let r = ranges.partition_point(|r| r.gpa <= gpa).checked_sub(1).map(|i| &ranges[i]);
            r.is_some_and(|r| {
                gpa < r.gpa + r.pages * PAGE_SIZE_4K
                    && PageState::from_code(states[r.first + ((gpa - r.gpa) / PAGE_SIZE_4K) as usize])
                        == PageState::Present
            })
        };
        let i = table.update_access(mem, GuestPhysAddr(start)..GuestPhysAddr(start + len), |gpa, size, a| {
            // Large leaves only ever cover `Present` pages.
            if size != PageSize::Size4K || present(gpa.0) { a | Access::WRITE } else { a }
        });
        combine(inv, i);
    }
}

/// Bits of vCPUs `0..count`.
fn mask(count: usize) -> u64 {
    if count >= 64 { u64::MAX } else { (1u64 << count) - 1 }
}

#[cfg(test)]
mod tests {
    use super::runs;
    use alloc::vec::Vec;

    #[test]
    fn runs_of_bits() {
        let words = [0b0111_0001u64, u64::MAX << 60, 0b11, 0, 1 << 63];
        let got: Vec<_> = runs(&words).collect();
        assert_eq!(got, [(0, 1), (4, 3), (124, 6), (319, 1)]);
        assert_eq!(runs(&[]).count(), 0);
        assert_eq!(runs(&[u64::MAX, u64::MAX]).collect::<Vec<_>>(), [(0, 128)]);
    }
}
