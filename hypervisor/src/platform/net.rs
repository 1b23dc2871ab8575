//! The host's NIC: an Intel 82540EM (QEMU's `e1000`, Bochs' `e1000`),
//! found on the PCI bus. This file only hands the library's driver
//! (`hypervisor::hostnet::e1000`) its registers (BAR0, mapped uncached) and
//! DMA memory (host frames through the direct map); rings, frames and
//! TCP/IP are the library's.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{Ordering, compiler_fence};
use hypervisor::hostnet::HostNet;
use hypervisor::hostnet::e1000::{E1000, Hw};
use hypervisor::pci::{self, Bar};

use super::memory::{alloc_contiguous, phys_to_virt};
use super::{mmio, pci::PortConfig, random, time};

/// Intel's vendor ID and the 82540EM's device ID (8254x SDM 5.2, table 5-2).
const INTEL: u16 = 0x8086;
const I82540EM: u16 = 0x100e;
/// BAR0, the memory-mapped registers: 128 KiB (8254x SDM 4.1, table 4-2).
const BAR_BYTES: usize = 128 * 1024;
/// PCI command register bits: memory space, bus master (PCI 3.0 6.2.2).
const CMD_MEMORY: u32 = 1 << 1;
const CMD_BUS_MASTER: u32 = 1 << 2;
const COMMAND: u8 = 0x04;

/// The host's network as the kernel holds it.
pub type HostNic = HostNet<E1000<Regs>>;

/// BAR0 and the DMA memory handed to the device.
pub struct Regs {
    base: NonNull<u8>,
    /// Every DMA allocation (physical address, bytes): accesses outside
    /// them are refused, so a driver bug cannot reach other memory.
    dma: Vec<(u64, usize)>,
}

impl Regs {
    fn in_dma(&self, addr: u64, len: usize) -> bool {
        self.dma.iter().any(|&(a, n)| addr >= a && addr.saturating_add(len as u64) <= a + n as u64)
    }
}

impl Hw for Regs {
    fn read(&mut self, reg: u32) -> u32 {
        let off = reg as usize;
        if off % 4 != 0 || off + 4 > BAR_BYTES {
            return 0;
        }
        // SAFETY: `base` maps the device's BAR_BYTES of registers uncached
        // (mmio::map); the offset is aligned and inside it. Register reads
        // have only the side effects the driver asks for (ICR, MPC).
        unsafe { core::ptr::read_volatile(self.base.as_ptr().add(off) as *const u32) }
    }

    fn write(&mut self, reg: u32, value: u32) {
        let off = reg as usize;
        if off % 4 != 0 || off + 4 > BAR_BYTES {
            return;
        }
        // The device must see descriptor and buffer stores before the
        // register store that hands them over: x86 orders stores (to
        // write-back RAM, then to UC MMIO), the fence orders the compiler.
        compiler_fence(Ordering::Release);
        // SAFETY: as in `read`; what a register write does to the device
        // is the driver's business, and it only points DMA at memory from
        // `dma_alloc`.
        unsafe { core::ptr::write_volatile(self.base.as_ptr().add(off) as *mut u32, value) }
    }

    fn dma_alloc(&mut self, bytes: usize) -> Option<u64> {
        let size = bytes.next_multiple_of(4096);
        let pa = alloc_contiguous(size as u64, 4096)?;
        self.dma.push((pa, size));
        Some(pa)
    }

    fn dma_read(&mut self, addr: u64, buf: &mut [u8]) {
        if !self.in_dma(addr, buf.len()) {
            buf.fill(0);
            return;
        }
        compiler_fence(Ordering::Acquire);
        let src = phys_to_virt(addr);
        if buf.len() == 16 {
            // A descriptor: two volatile loads, so the status byte is
            // really read from memory on every poll.
            // SAFETY: inside a DMA allocation (checked above), direct-mapped,
            // 16-byte aligned (descriptors sit at multiples of 16 in a
            // page-aligned ring).
            let (lo, hi) = unsafe {
                (core::ptr::read_volatile(src as *const u64), core::ptr::read_volatile(src.add(8) as *const u64))
            };
            buf[..8].copy_from_slice(&lo.to_le_bytes());
            buf[8..].copy_from_slice(&hi.to_le_bytes());
        } else {
            // SAFETY: inside a DMA allocation (checked above), which the
            // kernel never hands to anything else; the device may be
            // writing it, but only a buffer the driver gave back, not this
            // one, which it owns until it gives it back.
            unsafe { core::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        }
    }

    fn dma_write(&mut self, addr: u64, data: &[u8]) {
        if !self.in_dma(addr, data.len()) {
            return;
        }
        // SAFETY: inside a DMA allocation (checked above), direct-mapped,
        // used for nothing else; the driver writes only descriptors and
        // buffers it owns at this moment.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), phys_to_virt(addr), data.len()) };
        compiler_fence(Ordering::Release);
    }

    fn delay_us(&mut self, us: u64) {
        let end = time::micros() + us;
        while time::micros() < end {
            core::hint::spin_loop();
        }
    }
}

/// Finds and starts the first 82540EM: the host's network, or why there
/// is none.
pub fn start() -> Result<HostNic, String> {
    let functions = super::pci::scan();
    let f = functions
        .iter()
        .find(|f| f.vendor == INTEL && f.device == I82540EM)
        .ok_or_else(|| String::from("no 82540EM on the PCI bus"))?;
    let Some(Bar::Mem { addr, .. }) = pci::decode_bars(super::pci::raw_bars(f.bdf))[0] else {
        return Err(format!("82540EM {}: BAR0 is not a memory BAR", f.bdf));
    };
    // The firmware assigned the BAR; bus mastering may be off again after
    // it let go of the device.
    let cmd = PortConfig.read(f.bdf, COMMAND) & 0xffff;
    // SAFETY: the command register of the NIC this driver takes over;
    // turning on memory decoding and bus mastering is what it needs, and
    // the status half is written as 0, which changes none of its bits.
    unsafe { PortConfig.write(f.bdf, COMMAND, cmd | CMD_MEMORY | CMD_BUS_MASTER) };
    let base = mmio::map(addr, BAR_BYTES).ok_or_else(|| format!("82540EM {}: cannot map BAR0 at {addr:#x}", f.bdf))?;
    let nic = E1000::new(Regs { base, dma: Vec::new() }).map_err(|e| format!("82540EM {}: {e}", f.bdf))?;
    let mut seed = [0u8; 8];
    if !(random::available() && random::fill(&mut seed)) {
        seed = time::rdtsc().to_le_bytes();
    }
    Ok(HostNet::new(nic, format!("82540EM {}", f.bdf), time::micros(), u64::from_le_bytes(seed)))
}
