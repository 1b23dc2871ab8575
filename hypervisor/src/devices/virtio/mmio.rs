//! The virtio-mmio transport, register layout version 2 (virtio 1.2 4.2.2):
//! 0x100 bytes of 32-bit control registers, then the device's configuration
//! space. The driver finds the device, negotiates features through the
//! status handshake (3.1.1), sets each queue up through QueueSel and its
//! registers (4.2.3.2), and notifies through QueueNotify; the device
//! interrupts on one line and says why in InterruptStatus (4.2.3.4).
//!
//! What the spec forbids the guest is refused without effect: features
//! after FEATURES_OK, queue setup outside the window between FEATURES_OK
//! and DRIVER_OK, clearing status bits (2.1.1), setting DRIVER_OK before
//! FEATURES_OK. A queue the guest sets up wrong or whose rings break the
//! protocol puts the device in DEVICE_NEEDS_RESET (2.1.2) with a
//! configuration-change interrupt, one log line, and nothing else: the
//! device takes no more notifications until the driver resets it.

use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use super::queue::{Queue, QueueError, QueueState};
use super::{GuestMemory, VirtioDevice, feature};
use crate::devices::persist::{Invalid, Persist};
use crate::firmware::acpi::VirtioMmioSlot;

/// "virt", little-endian (4.2.2).
pub const MAGIC: u32 = 0x7472_6976;
/// The non-legacy register layout (4.2.2; 1 is the legacy one, 4.2.4).
pub const VERSION: u32 = 2;
/// VendorID: "RHV" (any value is allowed; Linux ignores it).
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"RHV\0");
/// Bytes of a device's register window: control registers and up to 256
/// bytes of configuration space (what the DSDT's `_CRS` declares).
pub const WINDOW: u64 = 0x200;

/// Where virtio-mmio devices go: one 4 KiB page each from here, in the PC
/// hole below 4 GiB (RAM ends at `vm::boot::LOW_RAM_END`, 0xc000_0000),
/// below the PCI ECAM (0xe000_0000) and the I/O APIC (0xfec0_0000), inside
/// the region `mm::vm_memory::MemoryMap::pc` names "pci".
pub const BASE: u64 = 0xd000_0000;
/// One page per device, so each can be mapped or trapped on its own.
pub const STRIDE: u64 = 0x1000;
/// Slots: the I/O APIC pins past the ISA lines (16-23 of its 24).
pub const SLOTS: usize = 8;
/// The first slot's GSI: the I/O APIC's pins 0-15 are ISA IRQs (the MADT
/// maps ISA IRQs there), so the devices take 16 and up, one each, level
/// and active-high like PCI INTx lines on a PC's I/O APIC.
pub const GSI_BASE: u32 = 16;
const _: () = assert!(GSI_BASE as usize + SLOTS <= crate::devices::ioapic::PINS);
const _: () = assert!(BASE + SLOTS as u64 * STRIDE <= crate::devices::pci::ECAM_BASE);
const _: () = assert!(BASE >= crate::vm::boot::LOW_RAM_END);
const _: () = assert!(WINDOW <= STRIDE);

/// Slot `n`'s register window and pin, `None` past [`SLOTS`].
pub fn slot(n: usize) -> Option<VirtioMmioSlot> {
    (n < SLOTS).then(|| VirtioMmioSlot { base: (BASE + n as u64 * STRIDE) as u32, gsi: GSI_BASE + n as u32 })
}

/// Register offsets (4.2.2, table 4.1).
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
    /// The bits the driver sets.
    pub const DRIVER_BITS: u32 = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | FAILED;
    pub const ALL: u32 = DRIVER_BITS | DEVICE_NEEDS_RESET;
}

/// InterruptStatus bits (4.2.2).
pub mod interrupt {
    /// A used buffer notification.
    pub const USED_BUFFER: u32 = 1;
    /// A configuration change notification (and DEVICE_NEEDS_RESET).
    pub const CONFIG: u32 = 2;
}

/// The transport's guest-visible state and the device's, as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState<S> {
    /// Device status (2.1).
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// The features the driver accepted (both 32-bit banks).
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    /// One per queue the device has.
    pub queues: Vec<QueueState>,
    pub device: S,
}

/// A virtio device on the MMIO transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioMmio<D> {
    device: D,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<Queue>,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// `device` as it is before a driver finds it (status 0).
    pub fn new(device: D) -> Self {
        VirtioMmio {
            device,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            queues: (0..D::QUEUES).map(|_| Queue::new(D::QUEUE_MAX_SIZE)).collect(),
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// InterruptStatus.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// The level of the device's interrupt line: high while InterruptStatus
    /// has a bit set, until the driver acknowledges it (4.2.3.4). Drive the
    /// slot's I/O APIC pin with it after every access and restore.
    pub fn interrupt_asserted(&self) -> bool {
        self.interrupt_status != 0
    }

    /// Queue `i`, for reports and tests.
    pub fn queue(&self, i: usize) -> Option<&Queue> {
        self.queues.get(i)
    }

    /// All features offered: the transport's and the device's own.
    pub fn offered_features(&self) -> u64 {
        feature::TRANSPORT | (self.device.features() & feature::DEVICE_SPECIFIC)
    }

    /// The device changed its configuration space: a new generation and,
    /// once the driver is up, a configuration change notification (2.4.2).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt_status |= interrupt::CONFIG;
        }
    }

    /// Whether the device runs: DRIVER_OK, and neither failed nor waiting
    /// for a reset.
    fn running(&self) -> bool {
        self.status & (status::DRIVER_OK | status::FAILED | status::DEVICE_NEEDS_RESET) == status::DRIVER_OK
    }

    /// Whether queue registers take writes: after FEATURES_OK, before
    /// DRIVER_OK (3.1.1 step 7; Linux sets queues up in between), and not
    /// once the device failed.
    fn queue_setup_open(&self) -> bool {
        let closed = status::DRIVER_OK | status::FAILED | status::DEVICE_NEEDS_RESET;
        self.status & (status::FEATURES_OK | closed) == status::FEATURES_OK
    }

    /// The guest broke the protocol: DEVICE_NEEDS_RESET, and a
    /// configuration change notification if the driver is up (2.1.2).
    fn needs_reset(&mut self, why: QueueError) {
        if self.status & status::DEVICE_NEEDS_RESET == 0 {
            log::warn!("virtio-mmio (device {}): {why}; the device needs a reset", D::DEVICE_ID);
        }
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt_status |= interrupt::CONFIG;
        }
    }

    /// Status 0 (2.4): everything back to its power-on value but the
    /// configuration generation, which only moves forward.
    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A guest read of `size` bytes at `offset` in the window. Control
    /// registers answer 32-bit aligned reads only (4.2.2.2: the driver
    /// MUST use those); others, and offsets past the window, read 0.
    pub fn read(&mut self, offset: u64, size: u8) -> u64 {
        if offset >= reg::CONFIG {
            return self.read_config(offset - reg::CONFIG, size);
        }
        if size != 4 || !offset.is_multiple_of(4) {
            return 0;
        }
        let queue = self.queues.get(self.queue_sel as usize);
        let v = match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => D::DEVICE_ID,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            // 0: the selected queue is not available (4.2.2).
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => queue.map_or(0, |q| q.state.ready.into()),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            // No shared memory regions: a length of -1 (4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            // Write-only and reserved registers.
            _ => 0,
        };
        v.into()
    }

    /// Configuration space reads: 1, 2, 4 bytes (8 as two halves, which is
    /// what the driver does anyway, 4.2.2.2); bytes past it read 0.
    fn read_config(&self, offset: u64, size: u8) -> u64 {
        let mut b = [0u8; 8];
        let n = usize::from(size.min(8));
        if offset < WINDOW - reg::CONFIG {
            self.device.read_config(offset, &mut b[..n]);
        }
        u64::from_le_bytes(b)
    }

    /// A guest write of `size` bytes of `value` at `offset` in the window;
    /// `mem` is the guest's RAM, for the queue work a notification (or a
    /// queue becoming ready) asks for. Control registers take 32-bit
    /// aligned writes only; others are dropped.
    pub fn write(&mut self, offset: u64, size: u8, value: u64, mem: &mut dyn GuestMemory) {
        if offset >= reg::CONFIG {
            if offset < WINDOW {
                let n = usize::from(size.min(8));
                self.device.write_config(offset - reg::CONFIG, &value.to_le_bytes()[..n]);
            }
            return;
        }
        if size != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = value as u32;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => self.write_queue_num(v),
            reg::QUEUE_READY => self.write_queue_ready(v, mem),
            reg::QUEUE_DESC_LOW => self.write_queue_addr(|s| &mut s.desc, false, v),
            reg::QUEUE_DESC_HIGH => self.write_queue_addr(|s| &mut s.desc, true, v),
            reg::QUEUE_DRIVER_LOW => self.write_queue_addr(|s| &mut s.driver, false, v),
            reg::QUEUE_DRIVER_HIGH => self.write_queue_addr(|s| &mut s.driver, true, v),
            reg::QUEUE_DEVICE_LOW => self.write_queue_addr(|s| &mut s.device, false, v),
            reg::QUEUE_DEVICE_HIGH => self.write_queue_addr(|s| &mut s.device, true, v),
            reg::QUEUE_NOTIFY => self.notify(v, mem),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.write_status(v),
            // SHMSel selects among no regions; the rest is read-only or
            // reserved.
            _ => {}
        }
    }

    /// DriverFeatures: only before FEATURES_OK (3.1.1: the features are
    /// fixed from then on); other writes are ignored.
    fn write_driver_features(&mut self, v: u32) {
        if self.status & status::FEATURES_OK != 0 {
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            // Banks 2 and up offer nothing; accepting nothing there is all
            // a driver can do.
            _ => {}
        }
    }

    /// QueueNum: a power of two up to QueueNumMax (2.7), or the device
    /// needs a reset.
    fn write_queue_num(&mut self, v: u32) {
        if !self.queue_setup_open() {
            return;
        }
        let Some(q) = self.selected() else { return };
        if q.state.ready {
            return;
        }
        let max = q.max_size();
        match u16::try_from(v) {
            Ok(size) if Queue::size_ok(size, max) => q.state.size = size,
            _ => self.needs_reset(QueueError::Size { size: v.min(u16::MAX.into()) as u16, max }),
        }
    }

    /// Half of a queue address, while the queue is being set up.
    fn write_queue_addr(&mut self, field: fn(&mut QueueState) -> &mut u64, high: bool, v: u32) {
        if !self.queue_setup_open() {
            return;
        }
        let Some(q) = self.selected().filter(|q| !q.state.ready) else { return };
        let a = field(&mut q.state);
        *a = if high { (*a & 0xffff_ffff) | (u64::from(v) << 32) } else { (*a & !0xffff_ffff) | u64::from(v) };
    }

    /// QueueReady: 1 makes the queue usable once its layout checks out
    /// (else the device needs a reset); 0 takes it away again (Linux's
    /// `vm_del_vq` writes 0 and expects to read it back).
    fn write_queue_ready(&mut self, v: u32, mem: &mut dyn GuestMemory) {
        if v == 0 {
            if let Some(q) = self.selected() {
                q.state.ready = false;
            }
            return;
        }
        if !self.queue_setup_open() {
            return;
        }
        let Some(q) = self.selected() else { return };
        if q.state.ready {
            return;
        }
        match Queue::check_layout(&q.state, q.max_size(), Some(&*mem)) {
            Ok(()) => q.state.ready = true,
            Err(e) => self.needs_reset(e),
        }
    }

    /// Device status (3.1.1). 0 resets. The driver may only add bits
    /// (2.1.1): a write that clears one is ignored, as is DRIVER_OK without
    /// FEATURES_OK. FEATURES_OK stays clear unless the driver accepted only
    /// offered features, VIRTIO_F_VERSION_1 among them (the driver reads
    /// the status back to learn that, 3.1.1 step 6).
    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & !status::ALL != 0 || old & status::DRIVER_BITS & !v != 0 {
            return;
        }
        let mut new = (v & status::DRIVER_BITS) | (old & status::DEVICE_NEEDS_RESET);
        let added = new & !old;
        if added & status::FEATURES_OK != 0 {
            let acked = new & (status::ACKNOWLEDGE | status::DRIVER) == status::ACKNOWLEDGE | status::DRIVER;
            let subset = self.driver_features & !self.offered_features() == 0;
            let modern = self.driver_features & feature::VERSION_1 != 0;
            if !(acked && subset && modern) {
                new &= !(status::FEATURES_OK | status::DRIVER_OK);
            }
        }
        if added & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            return;
        }
        self.status = new;
        if added & status::DRIVER_OK != 0 {
            for q in &mut self.queues {
                q.set_features(self.driver_features);
            }
            self.device.activate(self.driver_features);
        }
    }

    /// Whether a driver write of `value` at `offset` can be served with the
    /// memory `mem` reaches now: a notification of a ready queue of a
    /// running device needs its rings and available buffers here
    /// ([`Queue::here`]; post-copy: they may still be on their way, and
    /// the write should wait for them). Other writes touch no memory but
    /// the rings' bounds.
    pub fn write_can_go(&self, offset: u64, size: u8, value: u64, mem: &mut dyn GuestMemory) -> bool {
        offset != reg::QUEUE_NOTIFY || size != 4 || self.queue_here(value as u32 as usize, mem)
    }

    /// Whether device work on queue `index` (a notification of it, or host
    /// input for it) would find what it needs here; true if there is no
    /// such work (the device does not run, or the queue is not ready).
    pub fn queue_here(&self, index: usize, mem: &mut dyn GuestMemory) -> bool {
        !self.running() || self.queues.get(index).filter(|q| q.state.ready).is_none_or(|q| q.here(mem))
    }

    /// Whether every ready queue's work would find what it needs here.
    pub fn queues_here(&self, mem: &mut dyn GuestMemory) -> bool {
        (0..self.queues.len()).all(|i| self.queue_here(i, mem))
    }

    /// QueueNotify: the device processes queue `v` if it runs and the queue
    /// is ready; a used buffer notification follows if the driver wants
    /// one (2.7.10).
    /// Device-initiated work on queue `index` (host input for a receive
    /// queue): as a notification of it, with the same checks and the same
    /// interrupt.
    pub fn device_work(&mut self, index: usize, mem: &mut dyn GuestMemory) {
        if let Ok(i) = u32::try_from(index) {
            self.notify(i, mem);
        }
    }

    fn notify(&mut self, v: u32, mem: &mut dyn GuestMemory) {
        if !self.running() {
            return;
        }
        let i = v as usize;
        let Some(q) = self.queues.get_mut(i).filter(|q| q.state.ready) else { return };
        let old_used = q.state.next_used;
        let result = self.device.notify(i, q, mem).and_then(|()| q.needs_interrupt(mem, old_used));
        match result {
            Ok(true) => self.interrupt_status |= interrupt::USED_BUFFER,
            Ok(false) => {}
            Err(e) => self.needs_reset(e),
        }
    }
}

impl<D: VirtioDevice + Persist> Persist for VirtioMmio<D> {
    type State = MmioState<D::State>;
    const STATE_VERSION: u16 = 1;

    fn save(&self) -> Self::State {
        MmioState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self.queues.iter().map(|q| q.state.clone()).collect(),
            device: self.device.save(),
        }
    }

    fn validate(s: &Self::State) -> Result<(), Invalid> {
        if s.status & !status::ALL != 0 {
            return Err(Invalid("the status has bits no device sets"));
        }
        if s.status & status::DRIVER_OK != 0 && s.status & status::FEATURES_OK == 0 {
            return Err(Invalid("DRIVER_OK without FEATURES_OK"));
        }
        if s.status & status::FEATURES_OK != 0
            && (s.driver_features & feature::VERSION_1 == 0
                || s.driver_features & !(feature::TRANSPORT | feature::DEVICE_SPECIFIC) != 0)
        {
            return Err(Invalid("the accepted features are not ones a device offers"));
        }
        if s.interrupt_status & !(interrupt::USED_BUFFER | interrupt::CONFIG) != 0 {
            return Err(Invalid("the interrupt status has undefined bits"));
        }
        if s.queues.len() != D::QUEUES {
            return Err(Invalid("the number of queues is not the device's"));
        }
        for q in &s.queues {
            if !Queue::size_ok(q.size, D::QUEUE_MAX_SIZE) {
                return Err(Invalid("a queue size is not a power of two up to the maximum"));
            }
            if q.ready && s.status & status::FEATURES_OK == 0 {
                return Err(Invalid("a queue is ready before FEATURES_OK"));
            }
            if q.ready && Queue::check_layout(q, D::QUEUE_MAX_SIZE, None).is_err() {
                return Err(Invalid("a ready queue's rings are misaligned"));
            }
            // The device cannot have used more than it took, nor hold more
            // in flight than the queue has entries.
            if q.next_avail.wrapping_sub(q.next_used) > q.size {
                return Err(Invalid("a queue has more in flight than it has entries"));
            }
        }
        D::validate(&s.device)
    }

    fn restore(&mut self, s: Self::State) {
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        // The queues read the rings as negotiated once the driver is up
        // (as `write_status` sets them at DRIVER_OK).
        let features = if s.status & status::DRIVER_OK != 0 { s.driver_features } else { 0 };
        for (q, state) in self.queues.iter_mut().zip(s.queues) {
            q.state = state;
            q.set_features(features);
        }
        self.device.restore(s.device);
    }
}
