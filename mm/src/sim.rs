//! Simulated physical memory for host tests (`cfg(test)` or feature `sim`).
//!
//! A heap block of 4 KiB frames posing as host physical memory at a fake base
//! address. It counts allocations and frees, can be told to fail after N
//! allocations, and panics on a double free or a free of something it did not
//! hand out, so tests see leaks and ownership bugs.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;
use std::alloc::{Layout, alloc_zeroed, dealloc};

use crate::addr::{HostPhysAddr, PAGE_SIZE_1G, PAGE_SIZE_4K};
use crate::hal::{ContiguousAlloc, FrameAlloc, PhysMem};

const FRAME: usize = PAGE_SIZE_4K as usize;

#[repr(C, align(4096))]
struct Frame([u8; FRAME]);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Slot {
    /// Free; `clean` while still zero (never used since the host zeroed it).
    Free { clean: bool },
    /// Handed out by `alloc_frame`.
    Frame,
    /// Part of the block handed out by `alloc_contiguous` that starts at
    /// this frame index (pieces of a block may be freed separately).
    Chunk(u32),
}

/// Simulated host physical memory. See the module documentation.
pub struct SimPhys {
    mem: NonNull<Frame>,
    base: HostPhysAddr,
    slots: Vec<Slot>,
    /// First frame index -> frames still allocated of each live contiguous
    /// block.
    chunks: BTreeMap<usize, usize>,
    next: usize,
    in_use: usize,
    allocations: u64,
    frees: u64,
    /// Allocations still allowed to succeed; `None` means unlimited.
    budget: Option<u64>,
    contiguous: bool,
    /// Frames whose reads fail `copy_checked` (an uncorrectable memory
    /// error, as the kernel's machine-check-safe copy reports it).
    bad: alloc::collections::BTreeSet<u64>,
    /// It owns the block (false: a [`SimPhys::view`] of another's).
    owner: bool,
}

// SAFETY: `SimPhys` exclusively owns its heap block; the raw pointer is only
// an address of memory nobody else references, so moving it between threads
// is as safe as moving a `Box`.
unsafe impl Send for SimPhys {}

impl SimPhys {
    /// Default fake base: 4 GiB, so 1 GiB-aligned blocks are possible.
    pub const DEFAULT_BASE: HostPhysAddr = HostPhysAddr(4 * PAGE_SIZE_1G);

    /// `frames` frames of memory at [`Self::DEFAULT_BASE`].
    pub fn new(frames: usize) -> Self {
        Self::with_base(Self::DEFAULT_BASE, frames)
    }

    /// `frames` frames of memory at `base` (4 KiB-aligned).
    ///
    /// The host zeroes the block lazily, so large simulated memories cost only
    /// what the test touches.
    pub fn with_base(base: HostPhysAddr, frames: usize) -> Self {
        assert!(frames > 0, "SimPhys needs at least one frame");
        assert!(base.is_aligned(PAGE_SIZE_4K), "SimPhys base must be 4 KiB-aligned");
        let layout = Layout::array::<Frame>(frames).expect("SimPhys size overflows");
        // SAFETY: the layout has a non-zero size (frames > 0).
        let raw = unsafe { alloc_zeroed(layout) };
        let mem = NonNull::new(raw.cast::<Frame>()).expect("host out of memory for SimPhys");
        Self {
            mem,
            base,
            slots: vec![Slot::Free { clean: true }; frames],
            chunks: BTreeMap::new(),
            next: 0,
            in_use: 0,
            allocations: 0,
            frees: 0,
            budget: None,
            contiguous: true,
            bad: Default::default(),
            owner: true,
        }
    }

    /// A second handle on the same frames, as another CPU sees the one
    /// physical memory: it reads and writes them, and allocates nothing
    /// (every allocation fails), so the owner's bookkeeping stays whole.
    ///
    /// # Safety
    /// `self` outlives the view.
    pub unsafe fn view(&self) -> SimPhys {
        SimPhys {
            mem: self.mem,
            base: self.base,
            slots: self.slots.clone(),
            chunks: BTreeMap::new(),
            next: 0,
            in_use: 0,
            allocations: 0,
            frees: 0,
            budget: Some(0),
            contiguous: self.contiguous,
            bad: self.bad.clone(),
            owner: false,
        }
    }

    /// The fake physical address of the first frame.
    pub fn base(&self) -> HostPhysAddr {
        self.base
    }

    /// Total number of frames.
    pub fn frame_count(&self) -> usize {
        self.slots.len()
    }

    /// Frames currently handed out (single frames and blocks).
    pub fn frames_in_use(&self) -> usize {
        self.in_use
    }

    /// Successful allocations so far (a contiguous block counts once).
    pub fn allocations(&self) -> u64 {
        self.allocations
    }

    /// Frees so far (a contiguous block counts once).
    pub fn frees(&self) -> u64 {
        self.frees
    }

    /// Let the next `n` allocations succeed and every later one fail.
    pub fn fail_after(&mut self, n: u64) {
        self.budget = Some(n);
    }

    /// Undo [`Self::fail_after`].
    pub fn stop_failing(&mut self) {
        self.budget = None;
    }

    /// Enable or disable `alloc_contiguous` (disabled: always `None`).
    pub fn set_contiguous(&mut self, enabled: bool) {
        self.contiguous = enabled;
    }

    /// Whether `pa` lies inside the simulated memory.
    /// From now on, reads of the frame holding `pa` fail `copy_checked`, as
    /// a frame hit by an uncorrectable memory error does.
    pub fn set_bad(&mut self, pa: HostPhysAddr) {
        self.bad.insert(pa.0 >> 12);
    }

    pub fn contains(&self, pa: HostPhysAddr) -> bool {
        pa.0 >= self.base.0 && pa.0 - self.base.0 < self.len_bytes()
    }

    fn len_bytes(&self) -> u64 {
        self.slots.len() as u64 * PAGE_SIZE_4K
    }

    fn index_of(&self, pa: HostPhysAddr) -> usize {
        assert!(self.contains(pa), "SimPhys: {pa:?} is outside simulated memory");
        ((pa.0 - self.base.0) / PAGE_SIZE_4K) as usize
    }

    fn addr_of(&self, index: usize) -> HostPhysAddr {
        HostPhysAddr(self.base.0 + index as u64 * PAGE_SIZE_4K)
    }

    fn take_budget(&mut self) -> bool {
        match &mut self.budget {
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
            None => true,
        }
    }

    /// Hand out frame `index`, zeroing it if it was used before.
    fn claim(&mut self, index: usize, as_slot: Slot) {
        if self.slots[index] == (Slot::Free { clean: false }) {
            // SAFETY: `index` is in bounds, so the frame lies inside our block,
            // and it is free, so nothing else references it.
            unsafe { self.mem.add(index).write_bytes(0, 1) };
        }
        self.slots[index] = as_slot;
        self.in_use += 1;
    }

    fn release(&mut self, index: usize) {
        self.slots[index] = Slot::Free { clean: false };
        self.in_use -= 1;
    }
}

impl Drop for SimPhys {
    fn drop(&mut self) {
        if !self.owner {
            return;
        }
        let layout = Layout::array::<Frame>(self.slots.len()).expect("checked in with_base");
        // SAFETY: `mem` came from `alloc_zeroed` with this same layout.
        unsafe { dealloc(self.mem.as_ptr().cast(), layout) };
    }
}

impl core::fmt::Debug for SimPhys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SimPhys")
            .field("base", &self.base)
            .field("frames", &self.slots.len())
            .field("in_use", &self.in_use)
            .field("allocations", &self.allocations)
            .field("frees", &self.frees)
            .finish()
    }
}

// SAFETY: the block is one heap allocation of 4 KiB-aligned frames that lives
// as long as `self`; addresses map linearly into it, and out-of-range
// addresses panic.
unsafe impl PhysMem for SimPhys {
    fn phys_to_ptr(&self, pa: HostPhysAddr) -> *mut u8 {
        assert!(self.contains(pa), "SimPhys: {pa:?} is outside simulated memory");
        let offset = (pa.0 - self.base.0) as usize;
        // SAFETY: `offset` is inside the block (checked above).
        unsafe { self.mem.as_ptr().cast::<u8>().add(offset) }
    }

    fn copy_checked(&self, pa: HostPhysAddr, dst: &mut [u8]) -> Result<(), crate::hal::MemoryError> {
        let (first, last) = (pa.0 >> 12, (pa.0 + dst.len().max(1) as u64 - 1) >> 12);
        if self.bad.range(first..=last).next().is_some() {
            return Err(crate::hal::MemoryError);
        }
        let src = self.phys_to_ptr(pa);
        for (i, b) in dst.iter_mut().enumerate() {
            // SAFETY: inside the block (the caller stays in one allocation).
            *b = unsafe { src.add(i).read_volatile() };
        }
        Ok(())
    }
}

// SAFETY: frames are zeroed in `claim`, tracked per slot so none is handed
// out twice, and lie inside the block `phys_to_ptr` maps.
unsafe impl FrameAlloc for SimPhys {
    fn alloc_frame(&mut self) -> Option<HostPhysAddr> {
        let n = self.slots.len();
        let index = (0..n).map(|i| (self.next + i) % n).find(|&i| matches!(self.slots[i], Slot::Free { .. }))?;
        if !self.take_budget() {
            return None;
        }
        self.claim(index, Slot::Frame);
        self.next = (index + 1) % n;
        self.allocations += 1;
        Some(self.addr_of(index))
    }

    unsafe fn free_frame(&mut self, frame: HostPhysAddr) {
        assert!(frame.is_aligned(PAGE_SIZE_4K), "SimPhys: free of unaligned {frame:?}");
        let index = self.index_of(frame);
        match self.slots[index] {
            Slot::Frame => {}
            Slot::Free { .. } => panic!("SimPhys: double free of frame {frame:?}"),
            Slot::Chunk(_) => panic!("SimPhys: free_frame of {frame:?}, part of a contiguous block"),
        }
        self.release(index);
        self.frees += 1;
    }
}

// SAFETY: blocks are zeroed in `claim`, tracked per slot so none overlaps
// another allocation, aligned in the fake physical space, and inside the
// block `phys_to_ptr` maps linearly.
unsafe impl ContiguousAlloc for SimPhys {
    fn alloc_contiguous(&mut self, size: u64, align: u64) -> Option<HostPhysAddr> {
        if !self.contiguous || size == 0 || !size.is_multiple_of(PAGE_SIZE_4K) {
            return None;
        }
        let align = align.max(PAGE_SIZE_4K);
        if !align.is_power_of_two() {
            return None;
        }
        let frames = (size / PAGE_SIZE_4K) as usize;
        let step = (align / PAGE_SIZE_4K) as usize;
        let first = self.base.align_up(align)?;
        let mut start = ((first.0 - self.base.0) / PAGE_SIZE_4K) as usize;
        while start + frames <= self.slots.len() {
            match self.slots[start..start + frames].iter().rposition(|s| !matches!(s, Slot::Free { .. })) {
                None => {
                    if !self.take_budget() {
                        return None;
                    }
                    let tag = u32::try_from(start).expect("SimPhys is limited to 2^32 frames");
                    for i in start..start + frames {
                        self.claim(i, Slot::Chunk(tag));
                    }
                    self.chunks.insert(start, frames);
                    self.allocations += 1;
                    return Some(self.addr_of(start));
                }
                // Skip to the first aligned start past the busy frame.
                Some(busy) => start += (busy / step + 1) * step,
            }
        }
        None
    }

    /// Frees the whole block or any 4 KiB-aligned piece of it; panics if
    /// any frame of the range is not an allocated frame of one same block.
    unsafe fn free_contiguous(&mut self, base: HostPhysAddr, size: u64) {
        assert!(
            base.is_aligned(PAGE_SIZE_4K) && size > 0 && size.is_multiple_of(PAGE_SIZE_4K),
            "SimPhys: free_contiguous({base:?}, {size:#x}) is not a 4 KiB-aligned range"
        );
        let index = self.index_of(base);
        let frames = (size / PAGE_SIZE_4K) as usize;
        assert!(index + frames <= self.slots.len(), "SimPhys: free_contiguous({base:?}, {size:#x}) runs past memory");
        let Slot::Chunk(tag) = self.slots[index] else {
            panic!("SimPhys: free_contiguous({base:?}) is not part of a live block (double free?)");
        };
        if let Some(i) = (index..index + frames).find(|&i| self.slots[i] != Slot::Chunk(tag)) {
            panic!(
                "SimPhys: free_contiguous({base:?}, {size:#x}): frame {:?} is not part of the same live block",
                self.addr_of(i)
            );
        }
        let left = self.chunks.get_mut(&(tag as usize)).expect("SimPhys: block bookkeeping");
        *left -= frames;
        if *left == 0 {
            self.chunks.remove(&(tag as usize));
        }
        for i in index..index + frames {
            self.release(i);
        }
        self.frees += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_SIZE_2M;

    #[test]
    fn frames_are_zeroed_counted_and_reused() {
        let mut sim = SimPhys::new(4);
        let a = sim.alloc_frame().unwrap();
        // SAFETY: `a` is a live frame of `sim`.
        unsafe { sim.phys_to_ptr(a).write_bytes(0xAB, FRAME) };
        // SAFETY: `a` came from `sim` and is not referenced.
        unsafe { sim.free_frame(a) };
        let mut got = Vec::new();
        while let Some(f) = sim.alloc_frame() {
            // SAFETY: `f` is a live frame of `sim`.
            let first = unsafe { sim.phys_to_ptr(f).read() };
            assert_eq!(first, 0, "frame {f:?} not zeroed");
            got.push(f);
        }
        assert_eq!(got.len(), 4);
        assert_eq!(sim.frames_in_use(), 4);
        assert_eq!(sim.allocations(), 5);
        assert_eq!(sim.frees(), 1);
        for f in got {
            // SAFETY: each came from `sim` and is unreferenced.
            unsafe { sim.free_frame(f) };
        }
        assert_eq!(sim.frames_in_use(), 0);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut sim = SimPhys::new(2);
        let a = sim.alloc_frame().unwrap();
        // SAFETY: deliberately wrong second free; SimPhys must catch it.
        unsafe {
            sim.free_frame(a);
            sim.free_frame(a);
        }
    }

    #[test]
    fn failure_injection() {
        let mut sim = SimPhys::new(8);
        sim.fail_after(2);
        assert!(sim.alloc_frame().is_some());
        assert!(sim.alloc_contiguous(PAGE_SIZE_4K * 2, PAGE_SIZE_4K).is_some());
        assert!(sim.alloc_frame().is_none());
        sim.stop_failing();
        assert!(sim.alloc_frame().is_some());
    }

    #[test]
    fn contiguous_blocks_are_aligned_and_disjoint() {
        let mut sim = SimPhys::new(1536); // 6 MiB at a 1 GiB-aligned base
        let f = sim.alloc_frame().unwrap();
        assert_eq!(f, sim.base());
        let a = sim.alloc_contiguous(PAGE_SIZE_2M, PAGE_SIZE_2M).unwrap();
        assert!(a.is_aligned(PAGE_SIZE_2M));
        assert_eq!(a.0, sim.base().0 + PAGE_SIZE_2M);
        let b = sim.alloc_contiguous(PAGE_SIZE_2M, PAGE_SIZE_2M).unwrap();
        assert_eq!(b.0, a.0 + PAGE_SIZE_2M);
        assert!(sim.alloc_contiguous(PAGE_SIZE_2M, PAGE_SIZE_2M).is_none());
        assert_eq!(sim.frames_in_use(), 1 + 2 * 512);
        // SAFETY: all came from `sim` and are unreferenced.
        unsafe {
            sim.free_contiguous(a, PAGE_SIZE_2M);
            sim.free_contiguous(b, PAGE_SIZE_2M);
            sim.free_frame(f);
        }
        assert_eq!(sim.frames_in_use(), 0);
        sim.set_contiguous(false);
        assert!(sim.alloc_contiguous(PAGE_SIZE_2M, PAGE_SIZE_2M).is_none());
    }

    #[test]
    fn pieces_of_a_block_are_freed_separately() {
        let mut sim = SimPhys::new(1024);
        let a = sim.alloc_contiguous(PAGE_SIZE_2M, PAGE_SIZE_2M).unwrap();
        let frame = |i: u64| HostPhysAddr(a.0 + i * PAGE_SIZE_4K);
        // SAFETY: pieces of the live block `a`, each freed once, unreferenced.
        unsafe {
            sim.free_contiguous(frame(3), PAGE_SIZE_4K);
            sim.free_contiguous(frame(100), 10 * PAGE_SIZE_4K);
        }
        assert_eq!(sim.frames_in_use(), 512 - 11);
        // A freed piece is reused by single-frame allocations, and a later
        // piece free of the same block still works.
        let mut got = Vec::new();
        while let Some(f) = sim.alloc_frame() {
            got.push(f);
        }
        assert!(got.contains(&frame(3)) && got.contains(&frame(105)));
        // SAFETY: as above; the rest of the block, in two pieces around the
        // freed (and reallocated) ones.
        unsafe {
            sim.free_contiguous(frame(0), 3 * PAGE_SIZE_4K);
            sim.free_contiguous(frame(4), 96 * PAGE_SIZE_4K);
            sim.free_contiguous(frame(110), (512 - 110) * PAGE_SIZE_4K);
            for f in got {
                sim.free_frame(f);
            }
        }
        assert_eq!(sim.frames_in_use(), 0);
        assert!(sim.chunks.is_empty());
    }

    #[test]
    #[should_panic(expected = "not part of a live block")]
    fn double_free_of_a_piece_panics() {
        let mut sim = SimPhys::new(1024);
        let a = sim.alloc_contiguous(PAGE_SIZE_2M, PAGE_SIZE_2M).unwrap();
        // SAFETY: deliberately wrong second free; SimPhys must catch it.
        unsafe {
            sim.free_contiguous(a, PAGE_SIZE_4K);
            sim.free_contiguous(a, PAGE_SIZE_4K);
        }
    }
}
