//! virtio-blk over PCI (QEMU), on the `virtio-drivers` crate: it does the
//! transport (virtio 1.2 4.1, capabilities and BARs), feature negotiation
//! and the split virtqueue; this file gives it DMA memory, BAR mappings and
//! configuration-space access, speaks the block request protocol (virtio
//! 1.2 5.2.6) over the queue, and turns the device into a [`BlockStore`].
//!
//! Why not the crate's `VirtIOBlk`: its `flush` spins on the used ring with
//! no bound and it has no non-blocking form, nor a way to submit a request
//! of another type, so a device that never completes a FLUSH would hang
//! boot. Here every request — read, write and flush — is submitted, then
//! polled with a deadline by `hypervisor::disk::request` (tested on the
//! host); one that times out disables the disk (`BlockIo` from then on)
//! with an error in the log. Data moves through a bounce buffer the driver
//! owns, so a request the device never completes cannot scribble over the
//! caller's memory later.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use bitflags::bitflags;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;
use hypervisor::disk::capacity_text;
use hypervisor::disk::request::{Deadline, Device, Request, RequestError, Requests};
use hypervisor::pci::{self, Function};
use mm::Error;
use mm::swap::{BLOCK_SIZE, BlockStore, check_transfer};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;
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
/// How long one request (read, write or flush) may take before the disk
/// is given up; also bounded by polls, should the TSC be unusable.
const DEADLINE: Deadline = Deadline { timeout_us: 5_000_000, max_polls: 200_000_000 };
/// The request queue: its index and size (one request is in flight at a
/// time; 16 is what the crate's own block driver uses).
const QUEUE: u16 = 0;
const QUEUE_SIZE: usize = 16;
/// Request types and status values (virtio 1.2 5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const S_OK: u8 = 0;
const S_UNSUPP: u8 = 2;

bitflags! {
    /// The feature bits this driver accepts (virtio 1.2 5.2.3, 6).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    struct Features: u64 {
        const RO = 1 << 5;
        const FLUSH = 1 << 9;
        const RING_INDIRECT_DESC = 1 << 28;
        const RING_EVENT_IDX = 1 << 29;
        const VERSION_1 = 1 << 32;
    }
}

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

/// The device as the deadline loop sees it: the transport, the request
/// queue and the buffers of the one request in flight.
struct BlkQueue {
    transport: PciTransport,
    queue: VirtQueue<KernelHal, QUEUE_SIZE>,
    /// The request header (type, reserved, sector), little-endian.
    header: Box<[u8; 16]>,
    /// The status byte the device writes last.
    status: Box<[u8; 1]>,
    /// Physical address of the bounce buffer (BOUNCE_BYTES, direct-mapped).
    bounce: u64,
}

/// The first `len` bytes (at most BOUNCE_BYTES) of the bounce buffer at
/// physical address `pa`.
///
/// # Safety
///
/// `pa` is a live bounce buffer of BOUNCE_BYTES direct-mapped bytes, and no
/// other slice of it is in use while the returned one is.
unsafe fn bounce(pa: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: as the caller promises.
    unsafe { core::slice::from_raw_parts_mut(phys_to_virt(pa), len.min(BOUNCE_BYTES)) }
}

impl BlkQueue {
    /// The data buffer of `req`, if it has one, and whether the device
    /// reads it (a write) rather than fills it.
    ///
    /// # Safety
    ///
    /// As for [`bounce`]: no other slice of the bounce buffer is in use.
    unsafe fn data(&self, req: Request) -> (Option<&'static mut [u8]>, bool) {
        let (bytes, out) = match req {
            Request::Read { bytes, .. } => (bytes, false),
            Request::Write { bytes, .. } => (bytes, true),
            Request::Flush => return (None, false),
        };
        // SAFETY: the queue's own bounce buffer, freed only with the queue;
        // exclusive use is the caller's promise.
        (Some(unsafe { bounce(self.bounce, bytes) }), out)
    }
}

impl Device for BlkQueue {
    type Token = u16;
    type Error = virtio_drivers::Error;

    fn submit(&mut self, req: Request) -> Result<u16, virtio_drivers::Error> {
        let kind = match req {
            Request::Read { .. } => T_IN,
            Request::Write { .. } => T_OUT,
            Request::Flush => T_FLUSH,
        };
        // 512-byte sectors are the protocol's unit, as our blocks are.
        self.header[0..4].copy_from_slice(&kind.to_le_bytes());
        self.header[4..8].fill(0);
        self.header[8..16].copy_from_slice(&req.block().to_le_bytes());
        self.status[0] = 0xff;
        // SAFETY: one request at a time, and the caller (`VirtioDisk`)
        // holds no slice of the bounce buffer across `run`.
        let (data, data_out) = unsafe { self.data(req) };
        let (header, status) = (&self.header[..], &mut self.status[..]);
        // SAFETY: the header, status and bounce buffer stay untouched until
        // `complete` pops this token with the same buffers, or forever if
        // it never completes (the disk is then disabled and leaks them).
        let token = unsafe {
            match data {
                Some(d) if data_out => self.queue.add(&[header, &*d], &mut [status]),
                Some(d) => self.queue.add(&[header], &mut [d, status]),
                None => self.queue.add(&[header], &mut [status]),
            }
        }?;
        if self.queue.should_notify() {
            self.transport.notify(QUEUE);
        }
        Ok(token)
    }

    fn poll(&mut self) -> Option<u16> {
        self.queue.peek_used()
    }

    fn complete(&mut self, token: u16, req: Request) -> Result<(), virtio_drivers::Error> {
        // SAFETY: as in `submit`; the device is done with the buffer.
        let (data, data_out) = unsafe { self.data(req) };
        let (header, status) = (&self.header[..], &mut self.status[..]);
        // SAFETY: the same buffers `submit` added for this token.
        unsafe {
            match data {
                Some(d) if data_out => self.queue.pop_used(token, &[header, &*d], &mut [status]),
                Some(d) => self.queue.pop_used(token, &[header], &mut [d, status]),
                None => self.queue.pop_used(token, &[header], &mut [status]),
            }
        }?;
        match self.status[0] {
            S_OK => Ok(()),
            S_UNSUPP => Err(virtio_drivers::Error::Unsupported),
            _ => Err(virtio_drivers::Error::IoError),
        }
    }

    fn now_us(&self) -> u64 {
        time::micros()
    }
}

impl Drop for BlkQueue {
    fn drop(&mut self) {
        // Detach the queue before its memory is freed (the fields drop
        // after this; the transport's drop then resets the device).
        self.transport.queue_unset(QUEUE);
        free_range(self.bounce, BOUNCE_BYTES as u64);
    }
}

/// A virtio-blk disk.
pub struct VirtioDisk {
    /// Never dropped once a request timed out: the device may still write
    /// the queue and the buffers.
    io: ManuallyDrop<Requests<BlkQueue>>,
    blocks: u64,
    /// The device has a volatile write cache that FLUSH empties.
    flush: bool,
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
        let mut transport = PciTransport::new::<KernelHal, _>(&mut root, df).map_err(|e| why(&e))?;
        // Device initialisation, virtio 1.2 3.1.1.
        let features = transport.begin_init(Features::all());
        if !features.contains(Features::VERSION_1) {
            return Err(why(&"not a virtio 1.0+ device"));
        }
        if features.contains(Features::RO) {
            return Err(why(&"read-only"));
        }
        // Capacity in 512-byte sectors: the first 8 bytes of the config.
        let blocks = transport
            .read_consistent(|| {
                let lo: u32 = transport.read_config_space(0)?;
                let hi: u32 = transport.read_config_space(4)?;
                Ok(u64::from(lo) | u64::from(hi) << 32)
            })
            .map_err(|e| why(&e))?;
        let mut queue = VirtQueue::new(
            &mut transport,
            QUEUE,
            features.contains(Features::RING_INDIRECT_DESC),
            features.contains(Features::RING_EVENT_IDX),
        )
        .map_err(|e| why(&e))?;
        transport.finish_init();
        // Interrupts are not used: the driver polls the used ring.
        queue.set_dev_notify(false);
        let bounce = alloc_contiguous(BOUNCE_BYTES as u64, PAGE as u64).ok_or_else(|| why(&"no memory"))?;
        let dev = BlkQueue { transport, queue, header: Box::new([0; 16]), status: Box::new([0]), bounce };
        let disk = VirtioDisk {
            io: ManuallyDrop::new(Requests::new(dev, DEADLINE)),
            blocks,
            flush: features.contains(Features::FLUSH),
        };
        Ok(Some((disk, format!("virtio-blk {}, {}", f.bdf, capacity_text(blocks)))))
    }

    /// Runs `req` with the deadline; a failure is logged once, here.
    fn run(&mut self, req: Request) -> Result<(), Error> {
        let io = Error::BlockIo { block: req.block(), write: req.is_write() };
        match self.io.run(req) {
            Ok(()) => Ok(()),
            // Said once, when it happened.
            Err(RequestError::Disabled) => Err(io),
            Err(e @ RequestError::TimedOut { .. }) => {
                log::error!("virtio-blk: {e}: no further requests (its memory is leaked, the device may still use it)");
                Err(io)
            }
            Err(e) => {
                log::warn!("virtio-blk: {req} failed: {e}");
                Err(io)
            }
        }
    }
}

impl BlockStore for VirtioDisk {
    fn block_count(&self) -> u64 {
        self.blocks
    }

    fn read(&mut self, block: u64, buf: &mut [u8]) -> Result<(), Error> {
        check_transfer(self.blocks, block, buf.len())?;
        for (i, chunk) in buf.chunks_mut(BOUNCE_BYTES).enumerate() {
            let at = block + (i * BOUNCE_BYTES / BLOCK_SIZE) as u64;
            self.run(Request::Read { block: at, bytes: chunk.len() })?;
            // SAFETY: the request completed; nothing else uses the buffer.
            chunk.copy_from_slice(unsafe { bounce(self.io.device().bounce, chunk.len()) });
        }
        Ok(())
    }

    fn write(&mut self, block: u64, buf: &[u8]) -> Result<(), Error> {
        check_transfer(self.blocks, block, buf.len())?;
        for (i, chunk) in buf.chunks(BOUNCE_BYTES).enumerate() {
            let at = block + (i * BOUNCE_BYTES / BLOCK_SIZE) as u64;
            // SAFETY: no request is in flight; nothing else uses the buffer.
            unsafe { bounce(self.io.device().bounce, chunk.len()) }.copy_from_slice(chunk);
            self.run(Request::Write { block: at, bytes: chunk.len() })?;
        }
        Ok(())
    }

    /// FLUSH with the same deadline as reads and writes; a device without
    /// a write cache (no FLUSH feature) has nothing to flush.
    fn flush(&mut self) -> Result<(), Error> {
        if self.io.disabled() {
            return Err(Error::BlockIo { block: 0, write: true });
        }
        if !self.flush {
            return Ok(());
        }
        self.run(Request::Flush)
    }
}

impl Drop for VirtioDisk {
    fn drop(&mut self) {
        if self.io.disabled() {
            return; // leak: the device may still write the queue and buffers
        }
        // SAFETY: dropped once, here, and no request is in flight (each
        // one completed before `run` returned, or the disk is disabled).
        unsafe { ManuallyDrop::drop(&mut self.io) };
    }
}
