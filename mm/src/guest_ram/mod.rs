//! A VM's RAM: host memory backing guest-physical ranges.
//!
//! RAM is allocated in the largest aligned host chunks the allocator can give
//! (1 GiB, then 2 MiB, else 4 KiB frames), so [`GuestRam::map_into`] can map
//! it with large pages: fewer TLB misses, fewer table frames.

mod access;

use alloc::vec::Vec;

pub use access::LeInt;

use crate::addr::{GUEST_PHYS_LIMIT, GuestPhysAddr, HostPhysAddr, PAGE_SIZE_1G, PAGE_SIZE_2M, PAGE_SIZE_4K};
use crate::error::Error;
use crate::hal::{ContiguousAlloc, FrameAlloc};
use crate::paging::{Access, EntryFormat, Invalidation, MemType, NestedPageTable, PageSize};

/// How a chunk was allocated, which decides how it is freed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backing {
    /// One `alloc_contiguous` block.
    Block,
    /// Consecutive `alloc_frame` frames (merged when physically adjacent).
    Frames,
}

#[derive(Clone, Copy, Debug)]
struct Chunk {
    gpa: GuestPhysAddr,
    hpa: HostPhysAddr,
    len: u64,
    backing: Backing,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.gpa.0 + self.len
    }
}

/// One physically contiguous piece of guest RAM.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RamChunk {
    /// Guest-physical start.
    pub gpa: GuestPhysAddr,
    /// Host-physical start.
    pub hpa: HostPhysAddr,
    /// Length in bytes (a multiple of 4 KiB).
    pub len: u64,
}

/// Host memory a VM costs beyond its RAM, and the RAM itself.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct MemoryReport {
    /// Guest RAM (host memory backing it).
    pub ram_bytes: u64,
    /// Nested page-table frames.
    pub page_table_bytes: u64,
    /// This crate's heap bookkeeping for the RAM layout.
    pub bookkeeping_bytes: u64,
}

impl MemoryReport {
    /// Everything that is not guest RAM.
    pub fn overhead_bytes(&self) -> u64 {
        self.page_table_bytes + self.bookkeeping_bytes
    }
}

/// A VM's RAM. See the module documentation.
///
/// Reads and writes are bounds-checked against the RAM layout and never hand
/// out references into guest memory (the guest may change it at any time).
///
/// # Drop
///
/// Dropping it without [`free`](Self::free) leaks the host memory (debug
/// builds panic): only the caller knows when no table maps it any more.
pub struct GuestRam {
    /// Sorted by `gpa`, non-overlapping.
    chunks: Vec<Chunk>,
    size: u64,
}

impl GuestRam {
    /// `size` bytes of RAM at guest-physical 0.
    pub fn new<A: ContiguousAlloc>(alloc: &mut A, size: u64) -> Result<Self, Error> {
        Self::with_regions(alloc, &[(GuestPhysAddr(0), size)])
    }

    /// RAM in several regions `(start, size)`, e.g. around a PCI hole. The
    /// regions must be 4 KiB-aligned, non-empty, sorted and non-overlapping.
    /// On error nothing stays allocated.
    pub fn with_regions<A: ContiguousAlloc>(alloc: &mut A, regions: &[(GuestPhysAddr, u64)]) -> Result<Self, Error> {
        let mut prev_end = 0;
        for &(gpa, size) in regions {
            let end = gpa.0.checked_add(size);
            let bad = size == 0
                || !gpa.is_aligned(PAGE_SIZE_4K)
                || !size.is_multiple_of(PAGE_SIZE_4K)
                || gpa.0 < prev_end
                || end.is_none_or(|e| e > GUEST_PHYS_LIMIT);
            if bad {
                return Err(Error::InvalidRamLayout { gpa, size });
            }
            prev_end = gpa.0 + size;
        }
        let mut ram = GuestRam { chunks: Vec::new(), size: 0 };
        for &(gpa, size) in regions {
            if ram.allocate_region(alloc, gpa, size).is_none() {
                let total = regions.iter().map(|r| r.1).sum();
                // SAFETY: the chunks were allocated just now and nothing maps
                // or references them yet.
                unsafe { ram.free(alloc) };
                return Err(Error::OutOfGuestMemory { size: total });
            }
        }
        Ok(ram)
    }

    /// Back `[gpa, gpa + size)` with host memory; `None` when out of memory
    /// (what was allocated stays recorded in `self.chunks`).
    fn allocate_region<A: ContiguousAlloc>(&mut self, alloc: &mut A, gpa: GuestPhysAddr, size: u64) -> Option<()> {
        let end = gpa.0 + size;
        let mut cur = gpa.0;
        'next: while cur < end {
            for block in [PAGE_SIZE_1G, PAGE_SIZE_2M] {
                if cur.is_multiple_of(block)
                    && end - cur >= block
                    && let Some(hpa) = alloc.alloc_contiguous(block, block)
                {
                    self.push(Chunk { gpa: GuestPhysAddr(cur), hpa, len: block, backing: Backing::Block });
                    cur += block;
                    continue 'next;
                }
            }
            let hpa = alloc.alloc_frame()?;
            self.push(Chunk { gpa: GuestPhysAddr(cur), hpa, len: PAGE_SIZE_4K, backing: Backing::Frames });
            cur += PAGE_SIZE_4K;
        }
        Some(())
    }

    fn push(&mut self, chunk: Chunk) {
        self.size += chunk.len;
        if let Some(last) = self.chunks.last_mut()
            && chunk.backing == Backing::Frames
            && last.backing == Backing::Frames
            && last.end() == chunk.gpa.0
            && last.hpa.0 + last.len == chunk.hpa.0
        {
            last.len += chunk.len;
            return;
        }
        self.chunks.push(chunk);
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The physically contiguous pieces, in guest-physical order.
    pub fn chunks(&self) -> impl Iterator<Item = RamChunk> + '_ {
        self.chunks.iter().map(|c| RamChunk { gpa: c.gpa, hpa: c.hpa, len: c.len })
    }

    /// Index of the chunk containing `gpa`.
    fn chunk_index(&self, gpa: u64) -> Option<usize> {
        let i = self.chunks.partition_point(|c| c.gpa.0 <= gpa).checked_sub(1)?;
        (gpa < self.chunks[i].end()).then_some(i)
    }

    /// The host address backing `gpa`, or `None` outside RAM.
    pub fn gpa_to_hpa(&self, gpa: GuestPhysAddr) -> Option<HostPhysAddr> {
        let c = &self.chunks[self.chunk_index(gpa.0)?];
        Some(HostPhysAddr(c.hpa.0 + (gpa.0 - c.gpa.0)))
    }

    /// Map all of RAM into `table` (rights RWX, write-back) with the largest
    /// pages (up to the table's `max_page_size`) that the alignment of both
    /// addresses allows; nothing else is mapped, so any access outside RAM
    /// faults.
    ///
    /// The token is valid whether or not mapping succeeded and must be
    /// flushed either way. On error the pages mapped so far stay mapped.
    pub fn map_into<F: EntryFormat, A: FrameAlloc>(
        &self,
        table: &mut NestedPageTable<F>,
        alloc: &mut A,
    ) -> (Invalidation<F>, Result<(), Error>) {
        let mut inv = Invalidation::none();
        for run in self.runs() {
            let end = run.gpa.0 + run.len;
            let mut gpa = run.gpa;
            while gpa.0 < end {
                let hpa = HostPhysAddr(run.hpa.0 + (gpa.0 - run.gpa.0));
                let size = PageSize::LARGEST_FIRST
                    .into_iter()
                    .filter(|&s| s <= table.max_page_size())
                    .find(|s| gpa.is_aligned(s.bytes()) && hpa.is_aligned(s.bytes()) && end - gpa.0 >= s.bytes())
                    .unwrap_or(PageSize::Size4K);
                match table.map(alloc, gpa, hpa, size, Access::RWX, MemType::WriteBack) {
                    Ok(i) => inv = inv.combine(i),
                    Err(e) => return (inv, Err(e)),
                }
                gpa.0 += size.bytes();
            }
        }
        (inv, Ok(()))
    }

    /// Maximal runs that are contiguous in both address spaces (adjacent
    /// chunks may be).
    fn runs(&self) -> Vec<RamChunk> {
        let mut runs: Vec<RamChunk> = Vec::new();
        for c in self.chunks() {
            if let Some(last) = runs.last_mut()
                && last.gpa.0 + last.len == c.gpa.0
                && last.hpa.0 + last.len == c.hpa.0
            {
                last.len += c.len;
            } else {
                runs.push(c);
            }
        }
        runs
    }

    /// What this VM's memory costs the host, given its nested page table.
    pub fn memory_report<F: EntryFormat>(&self, table: &NestedPageTable<F>) -> MemoryReport {
        MemoryReport {
            ram_bytes: self.size,
            page_table_bytes: table.table_frames() as u64 * PAGE_SIZE_4K,
            bookkeeping_bytes: (self.chunks.capacity() * core::mem::size_of::<Chunk>()) as u64,
        }
    }

    /// Give all host memory back.
    ///
    /// # Safety
    ///
    /// `alloc` is the allocator the RAM came from, and nothing references the
    /// RAM any more: no nested page table maps it (or the unmap has been
    /// flushed) and no device or DMA uses it. Otherwise the freed memory,
    /// soon someone else's, stays reachable by this guest.
    pub unsafe fn free<A: ContiguousAlloc>(mut self, alloc: &mut A) {
        for c in core::mem::take(&mut self.chunks) {
            match c.backing {
                // SAFETY: one block from `alloc_contiguous` of this size; the
                // caller guarantees nothing references it.
                Backing::Block => unsafe { alloc.free_contiguous(c.hpa, c.len) },
                Backing::Frames => {
                    for off in (0..c.len).step_by(PAGE_SIZE_4K as usize) {
                        // SAFETY: each frame of a `Frames` chunk came from
                        // `alloc_frame`; the caller guarantees nothing
                        // references it.
                        unsafe { alloc.free_frame(HostPhysAddr(c.hpa.0 + off)) };
                    }
                }
            }
        }
        self.size = 0;
    }
}

/// Per-page ownership, for the memory manager that frees single frames of
/// a chunk (a page that became shared, ballooned or swapped out).
impl GuestRam {
    /// Give back the host frame originally backing the 4 KiB page at `gpa`.
    /// Returns false (freeing nothing) if `gpa` is not RAM.
    ///
    /// # Safety
    ///
    /// `alloc` is the allocator the RAM came from, the page's frame has not
    /// been freed before, and nothing references it any more (no table maps
    /// it, or the unmap has been flushed). The caller must then never access
    /// the page through `read`/`write`/`gpa_to_hpa` again, nor free it: use
    /// [`Self::free_owned`] instead of [`Self::free`].
    pub(crate) unsafe fn free_page<A: ContiguousAlloc>(&self, alloc: &mut A, gpa: GuestPhysAddr) -> bool {
        let Some(i) = self.chunk_index(gpa.0) else { return false };
        let c = &self.chunks[i];
        let hpa = HostPhysAddr(c.hpa.0 + (gpa.align_down(PAGE_SIZE_4K).0 - c.gpa.0));
        match c.backing {
            // SAFETY: a 4 KiB piece of one `alloc_contiguous` block, which
            // the relaxed contract allows; the caller guarantees it was not
            // freed before and is unreferenced.
            Backing::Block => unsafe { alloc.free_contiguous(hpa, PAGE_SIZE_4K) },
            // SAFETY: each frame of a `Frames` chunk came from `alloc_frame`;
            // as above.
            Backing::Frames => unsafe { alloc.free_frame(hpa) },
        }
        true
    }

    /// Give back the frames of every 4 KiB page for which `owned(gpa)` is
    /// true (in maximal runs), and forget all chunks.
    ///
    /// # Safety
    ///
    /// As [`Self::free`], for the pages `owned` selects; exactly the pages
    /// not already given back with [`Self::free_page`] must be selected.
    pub(crate) unsafe fn free_owned<A: ContiguousAlloc>(
        mut self,
        alloc: &mut A,
        mut owned: impl FnMut(GuestPhysAddr) -> bool,
    ) {
        for c in core::mem::take(&mut self.chunks) {
            let pages = c.len / PAGE_SIZE_4K;
            let mut p = 0;
            while p < pages {
                if !owned(GuestPhysAddr(c.gpa.0 + p * PAGE_SIZE_4K)) {
                    p += 1;
                    continue;
                }
                let start = p;
                while p < pages && owned(GuestPhysAddr(c.gpa.0 + p * PAGE_SIZE_4K)) {
                    p += 1;
                }
                let hpa = HostPhysAddr(c.hpa.0 + start * PAGE_SIZE_4K);
                match c.backing {
                    // SAFETY: a 4 KiB-aligned piece of one block whose frames
                    // the caller guarantees are still allocated and unreferenced.
                    Backing::Block => unsafe { alloc.free_contiguous(hpa, (p - start) * PAGE_SIZE_4K) },
                    Backing::Frames => {
                        for f in start..p {
                            // SAFETY: frames of a `Frames` chunk came from
                            // `alloc_frame`; as above.
                            unsafe { alloc.free_frame(HostPhysAddr(c.hpa.0 + f * PAGE_SIZE_4K)) };
                        }
                    }
                }
            }
        }
        self.size = 0;
    }

    /// Heap bytes of the chunk list.
    pub(crate) fn bookkeeping_bytes(&self) -> u64 {
        (self.chunks.capacity() * core::mem::size_of::<Chunk>()) as u64
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        if !self.chunks.is_empty() {
            crate::leaked("a GuestRam", (self.size / PAGE_SIZE_4K) as usize);
        }
    }
}

impl core::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GuestRam").field("size", &self.size).field("chunks", &self.chunks.len()).finish()
    }
}
