//! The device side of virtio 1.2 (OASIS virtio spec 1.2, cs01): split
//! virtqueues ([`queue`], 2.7), the virtio-mmio transport ([`mmio`], 4.2,
//! register layout version 2) and the devices behind it (entropy: [`rng`],
//! 5.4; console: [`console`], 5.3; block: [`block`], 5.2; network:
//! [`net`], 5.1; memory balloon: [`balloon`], 5.5).
//!
//! Why MMIO and not PCI: no BARs, capabilities or MSI-X to emulate, one I/O
//! APIC pin per device (level-triggered), and a transport state of a few
//! registers that saves as plain data — what Firecracker does. Linux finds
//! the devices through ACPI: each is a `Device` with `_HID "LNRO0005"` in
//! the DSDT (`drivers/virtio/virtio_mmio.c`, `virtio_mmio_acpi_match`),
//! whose `_CRS` gives its register window and interrupt
//! ([`crate::firmware::acpi::Config::virtio_mmio`]).
//!
//! Everything here is plain logic over a [`GuestMemory`]: the guest owns the
//! rings and buffers and may change them at any time, from any vCPU, so
//! every index, address and length is checked at every use and any
//! misbehaviour puts the device in DEVICE_NEEDS_RESET (2.1.2) rather than
//! touching anything else.
//!
//! # Wiring a device into a VM (not done here)
//!
//! A device is a [`mmio::VirtioMmio<D>`] for some [`VirtioDevice`] `D`
//! (e.g. `VirtioMmio::new(Rng::new(source))`), placed at slot `n`:
//! [`mmio::slot`]`(n)` gives its register window and I/O APIC pin.
//!
//! - MMIO: claim the slot's page (`base..base + mmio::STRIDE`; the DSDT
//!   declares the first [`mmio::WINDOW`] bytes) and pass each access as
//!   `(gpa - base, size)` to [`mmio::VirtioMmio::read`] /
//!   [`mmio::VirtioMmio::write`]; offsets past the window read 0 and drop
//!   writes. The page lies inside `mm`'s "pci" MMIO region of
//!   `MemoryMap::pc` (0xc000_0000 up to the I/O APIC), so it is never RAM
//!   and accesses exit to the device set.
//! - Guest memory: implement [`GuestMemory`] over the VM's RAM (`mm`) and
//!   pass it to every `write` (a QueueNotify or QueueReady write reaches
//!   the rings). Accesses outside RAM (MMIO, holes) must fail, never reach
//!   a device.
//! - Interrupt: after every write (and after a restore), drive the slot's
//!   I/O APIC pin to [`mmio::VirtioMmio::interrupt_asserted`]; it is a
//!   level (the DSDT says Level, ActiveHigh), dropped when the guest
//!   acknowledges through InterruptACK.
//! - ACPI: add the slot to `firmware::acpi::Config::virtio_mmio`.
//! - Entropy: implement [`rng::EntropySource`] over RDSEED/RDRAND (a few
//!   retries, then `Err(NoEntropy)`: the request waits for the next
//!   notification). Record/replay logs what it returns, as for RDRAND.
//! - Saved state: [`crate::devices::Persist`] is implemented for
//!   `VirtioMmio<D>`; add a `Device` variant so `DeviceSet::save/restore`
//!   carry it.

pub mod balloon;
pub mod block;
pub mod console;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;

#[cfg(test)]
mod tests;

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

pub use mmio::VirtioMmio;
pub use queue::{Chain, Queue, QueueError};

/// Guest-physical memory as a device reaches it (DMA). Fails for any byte
/// outside guest RAM; then nothing was read or written.
///
/// Both methods take `&mut self`: the hypervisor's implementation may have
/// to bring a page in (swapped out, lazily restored) to reach it.
pub trait GuestMemory {
    /// Fill `buf` from guest-physical `gpa`.
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), OutsideRam>;
    /// Copy `data` to guest-physical `gpa`.
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutsideRam>;
    /// Whether `len` bytes from `gpa` are all guest RAM (a check before
    /// anything is touched, so a bad chain is refused whole).
    fn is_ram(&self, gpa: u64, len: u64) -> bool;
    /// Whether every page of `len` bytes from `gpa` can be reached now:
    /// false when one is still on its way to this host (a post-copy
    /// migration's), which the implementation then asks for. Work that
    /// would need it must wait ([`Queue::here`]). RAM that is not there at
    /// all is the ring walk's to refuse: true.
    fn here(&mut self, _gpa: u64, _len: u64) -> bool {
        true
    }
}

/// An access that reached beyond guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutsideRam {
    pub gpa: u64,
    pub len: u64,
}

impl fmt::Display for OutsideRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes at {:#x} are not guest RAM", self.len, self.gpa)
    }
}

/// Guest RAM as one byte vector from `base` (tests and the fuzz target).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VecMemory {
    pub base: u64,
    pub bytes: Vec<u8>,
}

impl VecMemory {
    /// `len` zero bytes of RAM from `base`.
    pub fn new(base: u64, len: usize) -> Self {
        VecMemory { base, bytes: vec![0; len] }
    }

    /// The index range of `len` bytes at `gpa`, if all of it is RAM.
    fn range(&self, gpa: u64, len: u64) -> Option<core::ops::Range<usize>> {
        let start = usize::try_from(gpa.checked_sub(self.base)?).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        (end <= self.bytes.len()).then_some(start..end)
    }
}

impl GuestMemory for VecMemory {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), OutsideRam> {
        let len = buf.len() as u64;
        let r = self.range(gpa, len).ok_or(OutsideRam { gpa, len })?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutsideRam> {
        let len = data.len() as u64;
        let r = self.range(gpa, len).ok_or(OutsideRam { gpa, len })?;
        self.bytes[r].copy_from_slice(data);
        Ok(())
    }

    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.range(gpa, len).is_some()
    }
}

/// Feature bits the transport and ring layout define (6, "Reserved Feature
/// Bits"); device-specific bits are 0-23.
pub mod feature {
    /// Descriptors may point to a table of descriptors (2.7.5.3).
    pub const INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event notification suppression (2.7.7, 2.7.10).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// A virtio 1.x device: the only kind this transport offers (4.2.4: a
    /// version 2 MMIO device is not legacy).
    pub const VERSION_1: u64 = 1 << 32;
    /// What the transport and queues implement, offered with every device.
    pub const TRANSPORT: u64 = INDIRECT_DESC | RING_EVENT_IDX | VERSION_1;
    /// Bits a device may define itself (0-23; 50-127 too, unused here).
    pub const DEVICE_SPECIFIC: u64 = (1 << 24) - 1;
}

/// A virtio device behind a transport: its type, queues, configuration
/// space and the work a notification asks for. The transport owns the
/// handshake, the feature negotiation and the queues' configuration, and
/// calls the device only once the driver is up (DRIVER_OK).
///
/// Queue count and sizes are associated constants so saved state can be
/// checked without a device at hand ([`crate::devices::Persist::validate`]
/// takes none).
pub trait VirtioDevice {
    /// The device ID (5, "Device Types"): 4 for entropy.
    const DEVICE_ID: u32;
    /// Number of virtqueues.
    const QUEUES: usize;
    /// Largest size of each queue: a power of two, at most 32768 (2.7).
    const QUEUE_MAX_SIZE: u16;

    /// Device-specific feature bits offered (within
    /// [`feature::DEVICE_SPECIFIC`]; the transport adds its own).
    fn features(&self) -> u64;

    /// Read `data.len()` bytes of the configuration space at `offset`;
    /// bytes past its end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// A driver write to the configuration space (most fields are
    /// read-only: ignore those).
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver finished initialisation (DRIVER_OK) having accepted
    /// `features`.
    fn activate(&mut self, features: u64);

    /// The driver reset the device (status 0): back to the state after
    /// construction (configuration kept).
    fn reset(&mut self);

    /// The driver notified queue `index` (ready, of a running device): take
    /// what it made available and put it in the used ring. An error means
    /// the guest broke the ring protocol; the transport then sets
    /// DEVICE_NEEDS_RESET and calls the device no more until a reset.
    fn notify(&mut self, index: usize, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<(), QueueError>;
}
