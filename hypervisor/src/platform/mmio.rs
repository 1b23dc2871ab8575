//! Uncached mappings of device registers (PCI BARs), and virtual-to-physical
//! translation through the active page tables.
//!
//! The bootloader's direct map covers RAM and the first 4 GiB, write-back.
//! That is not enough for device memory: firmware may place 64-bit BARs
//! above 4 GiB and above all RAM (OVMF puts them in its 64-bit PCI window),
//! where the direct map does not reach, and registers want the uncacheable
//! type whatever the MTRRs say. So BARs get their own 4 KiB mappings with
//! PCD and PWT set (PAT entry 3: UC in the power-on PAT, which the kernel
//! keeps), in a window of virtual address space the bootloader left unused:
//! one free top-level (PML4) slot.

use alloc::vec::Vec;
use core::ptr::NonNull;
use spin::Mutex;
use x86_64::registers::control::Cr3;
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

use super::memory::{self, phys_offset, phys_to_virt};

const PAGE: u64 = 4096;
/// Bytes one PML4 slot maps.
const SLOT_BYTES: u64 = 1 << 39;

struct Window {
    /// The next free virtual address in the window, and its end.
    next: u64,
    end: u64,
    /// Existing mappings: physical page, page count, virtual address.
    maps: Vec<(u64, u64, u64)>,
}

static WINDOW: Mutex<Option<Window>> = Mutex::new(None);

/// Page-table frames from the kernel's frame allocator (zeroed, as new
/// tables must be).
struct TableFrames;

// SAFETY: `alloc_frame` hands out each frame once, zeroed, and never frees
// it behind the mapper's back.
unsafe impl FrameAllocator<Size4KiB> for TableFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        memory::alloc_frame().map(|pa| PhysFrame::containing_address(PhysAddr::new(pa)))
    }
}

fn level4() -> *mut PageTable {
    let (frame, _) = Cr3::read();
    phys_to_virt(frame.start_address().as_u64()) as *mut PageTable
}

/// A PML4 slot in the upper half that nothing uses, as its canonical
/// virtual address range.
fn free_slot() -> Option<(u64, u64)> {
    // SAFETY: CR3 holds the active top-level table, which the direct map
    // covers; reading its entries has no side effect.
    let table = unsafe { &*level4() };
    (256..511).rev().find(|&i| table[i].is_unused()).map(|i| {
        let start = 0xffff_0000_0000_0000 | (i as u64) << 39;
        (start, start + SLOT_BYTES)
    })
}

/// Maps `len` bytes of device memory at `pa` uncached and returns where.
/// Mappings are made once and kept: a range inside an existing mapping
/// reuses it. `None` if `len` is 0, the window is full, or page tables could
/// not be allocated.
pub fn map(pa: u64, len: usize) -> Option<NonNull<u8>> {
    let first = pa & !(PAGE - 1);
    let pages = (pa + len as u64).div_ceil(PAGE).checked_sub(first / PAGE).filter(|&n| n > 0 && len > 0)?;
    let mut guard = WINDOW.lock();
    if guard.is_none() {
        let (next, end) = free_slot()?;
        *guard = Some(Window { next, end, maps: Vec::new() });
    }
    let w = guard.as_mut()?;
    if let Some(&(p, _, va)) = w.maps.iter().find(|&&(p, n, _)| p <= first && first + pages * PAGE <= p + n * PAGE) {
        return NonNull::new((va + (pa - p)) as *mut u8);
    }
    let va = w.next;
    if va + pages * PAGE > w.end {
        return None;
    }
    // SAFETY: the active top-level table, reached through the direct map at
    // `phys_offset`; the window lock serialises changes, and the pages
    // mapped below lie in a slot nothing else uses.
    let mut mapper = unsafe { OffsetPageTable::new(&mut *level4(), VirtAddr::new(phys_offset())) };
    let flags = PageTableFlags::PRESENT
        | PageTableFlags::WRITABLE
        | PageTableFlags::NO_CACHE
        | PageTableFlags::WRITE_THROUGH
        | PageTableFlags::NO_EXECUTE;
    for i in 0..pages {
        let page = Page::<Size4KiB>::containing_address(VirtAddr::new(va + i * PAGE));
        let frame = PhysFrame::containing_address(PhysAddr::new(first + i * PAGE));
        // SAFETY: `page` is fresh in the unused window, so no existing
        // reference is invalidated; `frame` is device memory the caller
        // named, not RAM the kernel owns.
        match unsafe { mapper.map_to(page, frame, flags, &mut TableFrames) } {
            Ok(flush) => flush.flush(),
            Err(e) => {
                log::error!("mmio: mapping {:#x} failed: {e:?}", first + i * PAGE);
                return None;
            }
        }
    }
    w.next += pages * PAGE;
    w.maps.push((first, pages, va));
    NonNull::new((va + (pa - first)) as *mut u8)
}

/// The physical address behind kernel virtual address `va`, by walking the
/// active page tables (4 KiB, 2 MiB and 1 GiB pages).
pub fn translate(va: u64) -> Option<u64> {
    let mut table = level4();
    for level in (1..=4).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = ((va >> shift) & 0x1ff) as usize;
        // SAFETY: `table` is a page table of the active hierarchy (CR3 or
        // an entry of one), reached through the direct map; only read.
        let entry = unsafe { &(&*table)[index] };
        if !entry.flags().contains(PageTableFlags::PRESENT) {
            return None;
        }
        let leaf = level == 1 || (level <= 3 && entry.flags().contains(PageTableFlags::HUGE_PAGE));
        if leaf {
            // Large-page entries keep their PAT bit (bit 12) in what the
            // crate calls the address: mask to the page size.
            let size = 1u64 << shift;
            return Some((entry.addr().as_u64() & !(size - 1)) + (va & (size - 1)));
        }
        table = phys_to_virt(entry.addr().as_u64()) as *mut PageTable;
    }
    None
}
