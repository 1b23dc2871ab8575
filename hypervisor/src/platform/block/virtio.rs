//! virtio-blk over PCI (QEMU), through the `virtio-drivers` crate: it does
//! the transport (virtio 1.2 4.1, capabilities and BARs), feature
//! negotiation and the split virtqueue; this file gives it DMA memory, BAR
//! mappings and configuration-space access, and turns its device into a
//! [`BlockStore`].
//!
//! Reads and writes use the crate's non-blocking calls and poll with a
//! deadline, so a device that stops answering fails the request with
//! `BlockIo` (and the disk is then given up) instead of hanging the kernel.
//! Data moves through a bounce buffer the driver owns, so a request the
//! device never completes cannot scribble over the caller's memory later.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;
use hypervisor::disk::capacity_text;
use hypervisor::pci::{self, Function};
use mm::Error;
use mm::swap::{BLOCK_SIZE, BlockStore, check_transfer};
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{Command, DeviceFunction, PciRoot};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

use crate::platform::memory::{alloc_contiguous, free_range, phys_to_virt};
use crate::platform::{mmio, pci::PortConfig, time};

const PAGE: usize = 4096;
/// Virtio's PCI vendor ID, and the block device's transitional and modern
/// device IDs (virtio 1.2 4.1.2.1).
const VENDOR: u16 = 0x1af4;
const BLOCK_IDS: [u16; 2] = [0x1001, 0x1042];
/// Bounce buffer: 32 KiB, so a swap slot (9 blocks) is one request and a
/// long transfer is a few.
const BOUNCE_BYTES: usize = 64 * BLOCK_SIZE;
/// How long one request may take before the device is given up.
const TIMEOUT_US: u64 = 5_000_000;

/// DMA memory and address translation for `virtio-drivers`, from the
/// kernel's frame allocator and page tables.
pub struct KernelHal;

// SAFETY: dma_alloc returns zeroed, page-aligned, physically contiguous
// frames that the allocator hands out once, with their direct-map address;
// mmio_phys_to_virt returns a fresh uncached mapping that aliases no RAM;
// share returns the physical address of exactly the buffer's bytes (or of a
// bounce copy) for as long as the buffer is shared.
unsafe impl Hal for KernelHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        match alloc_contiguous((pages * PAGE) as u64, PAGE as u64) {
            Some(pa) => (pa, NonNull::new(phys_to_virt(pa)).expect("the direct map is not at 0")),
            // virtio-drivers reads physical address 0 as failure.
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        free_range(paddr, (pages * PAGE) as u64);
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // Only a BAR the firmware assigned reaches here; failing to map it
        // means no memory for page tables at boot.
        mmio::map(paddr, size).unwrap_or_else(|| panic!("virtio: cannot map BAR memory at {paddr:#x}"))
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        let va = buffer.as_ptr() as *mut u8 as u64;
        if let Some(pa) = contiguous(va, buffer.len()) {
            return pa;
        }
        // Physically scattered (a buffer on the kernel stack across a page
        // boundary): lend the device a contiguous copy instead.
        let pages = buffer.len().div_ceil(PAGE);
        let pa = alloc_contiguous((pages * PAGE) as u64, PAGE as u64).expect("virtio: no memory for a bounce buffer");
        // SAFETY: the caller guarantees `buffer` is valid and unshared for
        // the call; the bounce frames were just allocated and are as long.
        unsafe { core::ptr::copy_nonoverlapping(va as *const u8, phys_to_virt(pa), buffer.len()) };
        pa
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, _direction: BufferDirection) {
        let va = buffer.as_ptr() as *mut u8 as u64;
        if mmio::translate(va) == Some(paddr) {
            return; // shared in place
        }
        // `share` bounced it: copy back what the device wrote, then free.
        // SAFETY: `paddr` is the bounce copy `share` made for this buffer
        // (its frames cannot be the buffer's own), as long as the buffer.
        unsafe { core::ptr::copy_nonoverlapping(phys_to_virt(paddr), va as *mut u8, buffer.len()) };
        free_range(paddr, (buffer.len().div_ceil(PAGE) * PAGE) as u64);
    }
}

/// The physical address of `len` bytes at `va` if they are physically
/// contiguous.
fn contiguous(va: u64, len: usize) -> Option<u64> {
    let pa = mmio::translate(va)?;
    let end = va + len as u64;
    let mut page = (va & !(PAGE as u64 - 1)) + PAGE as u64;
    while page < end {
        if mmio::translate(page)? != pa + (page - va) {
            return None;
        }
        page += PAGE as u64;
    }
    Some(pa)
}

/// A virtio-blk disk.
pub struct VirtioDisk {
    blk: ManuallyDrop<VirtIOBlk<KernelHal, PciTransport>>,
    blocks: u64,
    req: Box<BlkReq>,
    resp: Box<BlkResp>,
    /// Physical address of the bounce buffer (BOUNCE_BYTES, direct-mapped).
    bounce: u64,
    /// A request timed out: the device may still own the buffers, so the
    /// disk is not used again and its memory never freed.
    dead: bool,
}

// SAFETY: the raw pointers inside (virtqueue, BAR mappings, bounce buffer)
// point at memory this disk owns alone; moving it to another CPU moves that
// ownership with it.
unsafe impl Send for VirtioDisk {}

impl VirtioDisk {
    /// Starts the first virtio-blk function in `functions`: `Ok(None)` if
    /// there is none, `Err` if there is one that cannot be used.
    pub fn probe(functions: &[Function]) -> Result<Option<(VirtioDisk, String)>, String> {
        let Some(f) = functions.iter().find(|f| f.vendor == VENDOR && BLOCK_IDS.contains(&f.device)) else {
            return Ok(None);
        };
        let bars = pci::decode_bars(super::super::pci::raw_bars(f.bdf));
        for (i, b) in bars.iter().enumerate().filter_map(|(i, b)| Some((i, (*b)?))) {
            log::debug!("virtio-blk {}: bar {i}: {b}", f.bdf);
        }
        let mut root = PciRoot::new(PortConfig);
        let df = DeviceFunction { bus: f.bdf.bus, device: f.bdf.device, function: f.bdf.function };
        // The firmware assigned the BARs; it may have turned bus mastering
        // off again when it let go of the device (ExitBootServices).
        let (_, cmd) = root.get_status_command(df);
        root.set_command(df, cmd | Command::MEMORY_SPACE | Command::BUS_MASTER);
        let why = |e: &dyn core::fmt::Display| format!("virtio-blk {}: {e}", f.bdf);
        let transport = PciTransport::new::<KernelHal, _>(&mut root, df).map_err(|e| why(&e))?;
        let mut blk = VirtIOBlk::<KernelHal, _>::new(transport).map_err(|e| why(&e))?;
        // Interrupts are not used: the driver polls the used ring.
        blk.disable_interrupts();
        if blk.readonly() {
            return Err(why(&"read-only"));
        }
        let blocks = blk.capacity();
        let bounce = alloc_contiguous(BOUNCE_BYTES as u64, PAGE as u64).ok_or_else(|| why(&"no memory"))?;
        let disk = VirtioDisk {
            blk: ManuallyDrop::new(blk),
            blocks,
            req: Box::default(),
            resp: Box::default(),
            bounce,
            dead: false,
        };
        Ok(Some((disk, format!("virtio-blk {}, {}", f.bdf, capacity_text(blocks)))))
    }

    fn bounce(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: BOUNCE_BYTES of direct-mapped frames owned by this disk
        // alone; `len` never exceeds that (callers chunk by BOUNCE_BYTES).
        unsafe { core::slice::from_raw_parts_mut(phys_to_virt(self.bounce), len.min(BOUNCE_BYTES)) }
    }

    /// Polls for request `token`; gives the disk up after [`TIMEOUT_US`].
    fn wait(&mut self, token: u16, block: u64, write: bool) -> Result<(), Error> {
        let start = time::micros();
        loop {
            if self.blk.peek_used() == Some(token) {
                return Ok(());
            }
            if time::micros().wrapping_sub(start) > TIMEOUT_US {
                log::error!(
                    "virtio-blk: request at block {block} not completed in {} ms; disk given up",
                    TIMEOUT_US / 1000
                );
                self.dead = true;
                return Err(Error::BlockIo { block, write });
            }
            core::hint::spin_loop();
        }
    }

    fn transfer(&mut self, block: u64, len: usize, write: bool) -> Result<(), Error> {
        let io = Error::BlockIo { block, write };
        let failed = |e: virtio_drivers::Error| {
            log::warn!("virtio-blk: {} at block {block} failed: {e}", if write { "write" } else { "read" });
            io
        };
        // Split borrows: the request header, status and bounce buffer are
        // separate allocations the device sees for the whole request.
        let buf = {
            // SAFETY: as in `bounce`.
            unsafe { core::slice::from_raw_parts_mut(phys_to_virt(self.bounce), len) }
        };
        let (req, resp) = (&mut *self.req, &mut *self.resp);
        let token = if write {
            // SAFETY: `req`, `buf` and `resp` stay untouched until the
            // matching `complete_write_blocks` below, or forever if the
            // request times out (the disk is then dead and leaks them).
            unsafe { self.blk.write_blocks_nb(block as usize, req, buf, resp) }
        } else {
            // SAFETY: as for the write.
            unsafe { self.blk.read_blocks_nb(block as usize, req, buf, resp) }
        }
        .map_err(failed)?;
        self.wait(token, block, write)?;
        let (req, resp) = (&mut *self.req, &mut *self.resp);
        if write {
            // SAFETY: the same buffers as the `write_blocks_nb` that returned `token`.
            unsafe { self.blk.complete_write_blocks(token, req, buf, resp) }
        } else {
            // SAFETY: the same buffers as the `read_blocks_nb` that returned `token`.
            unsafe { self.blk.complete_read_blocks(token, req, buf, resp) }
        }
        .map_err(failed)
    }
}

impl BlockStore for VirtioDisk {
    fn block_count(&self) -> u64 {
        self.blocks
    }

    fn read(&mut self, block: u64, buf: &mut [u8]) -> Result<(), Error> {
        check_transfer(self.blocks, block, buf.len())?;
        if self.dead {
            return Err(Error::BlockIo { block, write: false });
        }
        for (i, chunk) in buf.chunks_mut(BOUNCE_BYTES).enumerate() {
            let at = block + (i * BOUNCE_BYTES / BLOCK_SIZE) as u64;
            self.transfer(at, chunk.len(), false)?;
            chunk.copy_from_slice(self.bounce(chunk.len()));
        }
        Ok(())
    }

    fn write(&mut self, block: u64, buf: &[u8]) -> Result<(), Error> {
        check_transfer(self.blocks, block, buf.len())?;
        if self.dead {
            return Err(Error::BlockIo { block, write: true });
        }
        for (i, chunk) in buf.chunks(BOUNCE_BYTES).enumerate() {
            let at = block + (i * BOUNCE_BYTES / BLOCK_SIZE) as u64;
            self.bounce(chunk.len()).copy_from_slice(chunk);
            self.transfer(at, chunk.len(), true)?;
        }
        Ok(())
    }

    /// The crate's flush request blocks until the device answers (it has no
    /// non-blocking form); QEMU always answers.
    fn flush(&mut self) -> Result<(), Error> {
        if self.dead {
            return Err(Error::BlockIo { block: 0, write: true });
        }
        self.blk.flush().map_err(|e| {
            log::warn!("virtio-blk: flush failed: {e}");
            Error::BlockIo { block: 0, write: true }
        })
    }
}

impl Drop for VirtioDisk {
    fn drop(&mut self) {
        if self.dead {
            return; // leak: the device may still write the queue and buffers
        }
        // SAFETY: dropped once, here; the driver resets the device and
        // detaches the queue before the queue memory is freed.
        unsafe { ManuallyDrop::drop(&mut self.blk) };
        free_range(self.bounce, BOUNCE_BYTES as u64);
    }
}
