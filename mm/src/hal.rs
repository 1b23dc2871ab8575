//! The hardware this crate needs, behind three small traits.
//!
//! The kernel implements them with its bitmap frame allocator and the
//! bootloader's physical-memory offset mapping; host tests use
//! `sim::SimPhys`.
//!
//! Table and guest memory is also read and written by hardware (page walkers
//! setting accessed/dirty bits, vCPUs, DMA), so this crate only touches it
//! through raw pointers with atomic or volatile accesses, never through
//! `&`/`&mut` references to plain bytes.
//!
//! All calls on one [`NestedPageTable`](crate::paging::NestedPageTable) or
//! [`GuestRam`](crate::GuestRam) must be given the allocator its frames came
//! from. The hypervisor has exactly one, so this only matters in tests, where
//! `SimPhys` panics on a frame it did not hand out.

use crate::addr::HostPhysAddr;

/// A host read hit an uncorrectable memory error ([`PhysMem::copy_checked`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryError;

/// Access to host physical memory through a direct map.
///
/// # Safety
///
/// For every host-physical address inside a frame or chunk that an allocator
/// of this memory has handed out and not yet taken back, `phys_to_ptr` must
/// return a pointer that is valid for reads and writes for as long as `self`
/// lives, with the same mapping for every call, such that the pointers of
/// consecutive bytes of one allocation are consecutive
/// (`phys_to_ptr(pa + n) == phys_to_ptr(pa).add(n)`) and the pointer to a
/// 4 KiB-aligned address is 4 KiB-aligned. For any other address it may panic
/// but must not return a pointer to memory that Rust code holds references to.
pub unsafe trait PhysMem {
    /// Where the host can read and write the byte at physical address `pa`.
    fn phys_to_ptr(&self, pa: HostPhysAddr) -> *mut u8;

    /// Copy `dst.len()` bytes from `pa` (inside one allocation, as for
    /// `phys_to_ptr`) into `dst`, surviving an uncorrectable memory error
    /// in the source: `Err(MemoryError)` when the copy hit one (what `dst` holds is
    /// then unspecified). The kernel's copy is machine-check safe (a #MC
    /// during it fails the copy instead of the host); this default is a
    /// plain volatile copy that never fails.
    fn copy_checked(&self, pa: HostPhysAddr, dst: &mut [u8]) -> Result<(), MemoryError> {
        let src = self.phys_to_ptr(pa);
        for (i, b) in dst.iter_mut().enumerate() {
            // SAFETY: the caller keeps `[pa, pa + dst.len())` inside one
            // live allocation, which the trait's contract maps linearly.
            *b = unsafe { src.add(i).read_volatile() };
        }
        Ok(())
    }
}

/// An allocator of 4 KiB host frames (for page tables and small guest-RAM
/// pieces).
///
/// # Safety
///
/// `alloc_frame` must return 4 KiB-aligned, zero-filled frames that nothing
/// else uses until they are given back with `free_frame`, and that satisfy the
/// [`PhysMem`] contract.
pub unsafe trait FrameAlloc: PhysMem {
    /// A zeroed 4 KiB frame, or `None` when out of memory.
    fn alloc_frame(&mut self) -> Option<HostPhysAddr>;

    /// Give a frame back.
    ///
    /// # Safety
    ///
    /// `frame` came from `alloc_frame` of this allocator, has not been freed
    /// since, and nothing (software or hardware) references it any more.
    unsafe fn free_frame(&mut self, frame: HostPhysAddr);
}

/// An allocator of physically contiguous, aligned host memory, so guest RAM can
/// be backed by 2 MiB or 1 GiB chunks and mapped with large pages.
///
/// An allocator that cannot do this returns `None` and callers fall back to
/// 4 KiB frames.
///
/// # Safety
///
/// `alloc_contiguous` must return a zero-filled, `align`-aligned block of
/// `size` bytes that nothing else uses until it is given back with
/// `free_contiguous`, and that satisfies the [`PhysMem`] contract.
pub unsafe trait ContiguousAlloc: FrameAlloc {
    /// `size` bytes aligned to `align` (both powers of two, at least 4 KiB),
    /// zeroed, or `None` when no such block is free.
    fn alloc_contiguous(&mut self, size: u64, align: u64) -> Option<HostPhysAddr>;

    /// Give a block, or any 4 KiB-aligned piece of one, back.
    ///
    /// Freeing pieces lets the memory manager return single 4 KiB frames of
    /// a 2 MiB / 1 GiB block to the pool (a page that became shared,
    /// ballooned or swapped out) while the rest of the block stays in use.
    ///
    /// # Safety
    ///
    /// `[base, base + size)` is 4 KiB-aligned, non-empty, and lies inside one
    /// block an earlier `alloc_contiguous` of this allocator returned; none of
    /// its frames has been freed since, and nothing references them.
    unsafe fn free_contiguous(&mut self, base: HostPhysAddr, size: u64);
}
