//! Physical memory: the frame allocator built from the boot memory map, the
//! direct map the bootloader set up (all physical memory at a fixed offset),
//! and the kernel heap carved out of it.

use bootloader_api::info::{MemoryRegionKind, MemoryRegions};
use core::sync::atomic::{AtomicU64, Ordering};
use hypervisor::memory::frames::{FRAME_SIZE, FrameBitmap};
use hypervisor::numa::Topology;
use linked_list_allocator::LockedHeap;
use spin::Mutex;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

static PHYS_OFFSET: AtomicU64 = AtomicU64::new(0);
static FRAMES: Mutex<Option<FrameBitmap<'static>>> = Mutex::new(None);

/// What the host has, for `host` and `mem` reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryInfo {
    pub usable_bytes: u64,
    pub heap_bytes: u64,
}

static INFO: Mutex<MemoryInfo> = Mutex::new(MemoryInfo { usable_bytes: 0, heap_bytes: 0 });

/// A free page of conventional memory below 640 KiB (0: none), kept for
/// the APs' real-mode start code: a SIPI names a page below 1 MiB (SDM
/// Vol. 3A 9.4.4.1).
static TRAMPOLINE_PAGE: AtomicU64 = AtomicU64::new(0);
const CONVENTIONAL_END: u64 = 0xa0000;

/// Below 1 MiB stays out of the pool: legacy BIOS data, and the place SMP
/// bring-up will need for its real-mode trampoline.
const LOW_MEMORY_END: u64 = 1 << 20;

/// The kernel heap is an eighth of RAM up to this size...
const HEAP_SMALL_MAX: u64 = 64 << 20;
/// ...and a 32nd of RAM beyond it. It holds the memory manager's per-VM
/// tables (about 0.23% of each VM's RAM) and the sharing index (which grows
/// with the pages guests make identical), so it must scale with the RAM
/// guests can have rather than stop at a fixed cap.
const HEAP_RAM_SHARE: u64 = 32;

pub fn phys_to_virt(pa: u64) -> *mut u8 {
    (PHYS_OFFSET.load(Ordering::Relaxed) + pa) as *mut u8
}

/// Where the direct map starts: physical address 0 is mapped here.
pub fn phys_offset() -> u64 {
    PHYS_OFFSET.load(Ordering::Relaxed)
}

/// Sets up the frame allocator and the heap.
pub fn init(regions: &MemoryRegions, phys_offset: u64) {
    PHYS_OFFSET.store(phys_offset, Ordering::Relaxed);
    let usable = || regions.iter().filter(|r| r.kind == MemoryRegionKind::Usable);
    let highest = usable().map(|r| r.end).max().unwrap_or(0);
    let total: u64 = usable().map(|r| r.end - r.start).sum();

    // The bitmap's own storage comes from the first usable region above 1 MiB
    // that can hold it.
    let words = FrameBitmap::words_for(highest);
    let bytes = (words * 8) as u64;
    let bytes_pages = bytes.div_ceil(FRAME_SIZE) * FRAME_SIZE;
    let home = usable()
        .map(|r| (r.start.max(LOW_MEMORY_END).next_multiple_of(FRAME_SIZE), r.end))
        .find(|(s, e)| s + bytes_pages <= *e)
        .map(|(s, _)| s)
        .expect("no usable region can hold the frame bitmap");
    // SAFETY: [home, home+bytes) is usable RAM reported by the firmware,
    // reachable through the bootloader's direct map, and reserved in the
    // bitmap below so nothing else is ever handed this memory.
    let storage: &'static mut [u64] = unsafe { core::slice::from_raw_parts_mut(phys_to_virt(home) as *mut u64, words) };
    let mut bitmap = FrameBitmap::new(storage);
    for r in usable() {
        bitmap.add_free(r.start, r.end);
    }
    bitmap.reserve(0, LOW_MEMORY_END);
    // Page 0 stays out: it holds the real-mode interrupt vectors.
    if let Some(r) = usable()
        .find(|r| r.start.max(FRAME_SIZE).next_multiple_of(FRAME_SIZE) + FRAME_SIZE <= r.end.min(CONVENTIONAL_END))
    {
        TRAMPOLINE_PAGE.store(r.start.max(FRAME_SIZE).next_multiple_of(FRAME_SIZE), Ordering::Relaxed);
    }
    bitmap.reserve(home, home + bytes_pages);

    let heap_size = (total / 8).clamp(4 << 20, HEAP_SMALL_MAX).max(total / HEAP_RAM_SHARE) & !(FRAME_SIZE - 1);
    let heap = bitmap.alloc_contiguous(heap_size, FRAME_SIZE).expect("no contiguous memory for the kernel heap");
    // SAFETY: the heap range was just taken from the frame allocator and is
    // used for nothing else; it is mapped by the direct map.
    unsafe { HEAP.lock().init(phys_to_virt(heap), heap_size as usize) };
    *FRAMES.lock() = Some(bitmap);
    *INFO.lock() = MemoryInfo { usable_bytes: total, heap_bytes: heap_size };
}

/// The page below 640 KiB kept for the APs' start code, if the firmware
/// left one free.
pub fn trampoline_page() -> Option<u64> {
    match TRAMPOLINE_PAGE.load(Ordering::Relaxed) {
        0 => None,
        pa => Some(pa),
    }
}

pub fn info() -> MemoryInfo {
    *INFO.lock()
}

pub fn free_bytes() -> u64 {
    FRAMES.lock().as_ref().map_or(0, |b| b.free_frames() * FRAME_SIZE)
}

pub fn heap_used() -> usize {
    HEAP.lock().used()
}

pub fn heap_free() -> u64 {
    HEAP.lock().free() as u64
}

/// The NUMA nodes, from the SRAT (none: one node).
static NUMA: spin::Once<Topology> = spin::Once::new();

pub fn set_numa(topology: Topology) {
    NUMA.call_once(|| topology);
}

pub fn numa() -> Option<&'static Topology> {
    NUMA.get().filter(|t| t.is_numa())
}

/// The memory ranges this CPU's allocations try first: its preferred
/// node's (`CpuLocal::alloc_node`), if it has one.
fn preferred_ranges() -> &'static [(u64, u64)] {
    let node = vcpu::cpu_local::get().alloc_node.load(Ordering::Relaxed);
    match (node, numa()) {
        (vcpu::cpu_local::NO_NODE, _) | (_, None) => &[],
        (n, Some(t)) => t.node(n).map_or(&[], |n| n.ranges.as_slice()),
    }
}

/// Free bytes on NUMA node `node`.
pub fn free_bytes_on(node: u32) -> u64 {
    let Some(n) = numa().and_then(|t| t.node(node)) else { return 0 };
    let frames = FRAMES.lock();
    let Some(b) = frames.as_ref() else { return 0 };
    n.ranges.iter().map(|&(s, e)| b.free_frames_in(s, e)).sum::<u64>() * FRAME_SIZE
}

/// A zeroed 4 KiB frame: from this CPU's preferred node if it has room,
/// else from anywhere.
pub fn alloc_frame() -> Option<u64> {
    let ranges = preferred_ranges();
    let pa = {
        let mut frames = FRAMES.lock();
        let b = frames.as_mut()?;
        ranges.iter().find_map(|&(s, e)| b.alloc_in(s, e)).or_else(|| b.alloc())?
    };
    zero(pa, FRAME_SIZE);
    Some(pa)
}

/// `size` bytes of zeroed contiguous memory aligned to `align`, on the
/// preferred node first as `alloc_frame`.
pub fn alloc_contiguous(size: u64, align: u64) -> Option<u64> {
    let ranges = preferred_ranges();
    let pa = {
        let mut frames = FRAMES.lock();
        let b = frames.as_mut()?;
        ranges
            .iter()
            .find_map(|&(s, e)| b.alloc_contiguous_in(size, align, s, e))
            .or_else(|| b.alloc_contiguous(size, align))?
    };
    zero(pa, size);
    Some(pa)
}

pub fn free_range(pa: u64, size: u64) {
    if let Some(b) = FRAMES.lock().as_mut()
        && let Err(e) = b.free_range(pa, size)
    {
        // A kernel bookkeeping bug, not a guest's doing: loud, not fatal.
        log::error!("frame allocator: {e}");
    }
}

fn zero(pa: u64, size: u64) {
    // SAFETY: the range was just allocated to the caller and is mapped by the
    // direct map; nothing else references it yet.
    unsafe { core::ptr::write_bytes(phys_to_virt(pa), 0, size as usize) };
}

/// Host memory as `mm` sees it: the frame allocator and the direct map.
#[derive(Clone, Copy)]
pub struct HostMem;

// SAFETY: `phys_to_virt` is the bootloader's direct map of all physical
// memory, valid for every frame the allocator hands out.
unsafe impl mm::hal::PhysMem for HostMem {
    fn phys_to_ptr(&self, pa: mm::HostPhysAddr) -> *mut u8 {
        phys_to_virt(pa.0)
    }

    /// Guest memory is read with the machine-check-safe copy: a frame with
    /// an uncorrectable error fails the read (and the page is poisoned)
    /// instead of taking the host down.
    fn copy_checked(&self, pa: mm::HostPhysAddr, dst: &mut [u8]) -> Result<(), mm::hal::MemoryError> {
        // SAFETY: the caller keeps the range inside one live allocation,
        // which the direct map covers.
        if unsafe { super::mce::copy_mc_safe(dst, phys_to_virt(pa.0)) } { Ok(()) } else { Err(mm::hal::MemoryError) }
    }
}

// SAFETY: frames come zeroed from the bitmap allocator, each handed out once.
unsafe impl mm::hal::FrameAlloc for HostMem {
    fn alloc_frame(&mut self) -> Option<mm::HostPhysAddr> {
        alloc_frame().map(mm::HostPhysAddr)
    }

    unsafe fn free_frame(&mut self, frame: mm::HostPhysAddr) {
        free_range(frame.0, FRAME_SIZE);
    }
}

// SAFETY: contiguous runs come zeroed and aligned from the same allocator.
unsafe impl mm::hal::ContiguousAlloc for HostMem {
    fn alloc_contiguous(&mut self, size: u64, align: u64) -> Option<mm::HostPhysAddr> {
        alloc_contiguous(size, align).map(mm::HostPhysAddr)
    }

    unsafe fn free_contiguous(&mut self, base: mm::HostPhysAddr, size: u64) {
        free_range(base.0, size);
    }
}
