//! The VM's virtio-mmio devices in the device set: which slot each has
//! (register page and I/O APIC pin, `virtio::mmio::slot`), how MMIO reaches
//! them, and how their interrupt lines are driven. The devices themselves
//! are in `virtio/`.

use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt;

use super::DeviceSet;
use super::persist::{self, RestoreError, SavedDevice};
use super::virtio::balloon::{Balloon, BalloonAction};
use super::virtio::block::{Block, BlockBackend, BlockCounters, IoFailed};
use super::virtio::console::Console;
use super::virtio::mmio::{self, VirtioMmio};
use super::virtio::net::{self, Net};
use super::virtio::rng::{EntropySource, NoEntropy, Rng};
use super::virtio::{GuestMemory, OutsideRam};

/// The host's entropy, as a function filling a buffer (RDRAND on the
/// target, a fixed generator in tests); `false` when it has none now.
/// A function pointer so the device set stays plain, cloneable data.
#[derive(Clone, Copy)]
pub struct HostEntropy(pub fn(&mut [u8]) -> bool);

impl EntropySource for HostEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), NoEntropy> {
        if (self.0)(buf) { Ok(()) } else { Err(NoEntropy) }
    }
}

impl fmt::Debug for HostEntropy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HostEntropy")
    }
}

/// Sources are the host's, not part of the device's state: any two are
/// alike for comparisons of device state.
impl PartialEq for HostEntropy {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for HostEntropy {}

/// A disk a VM's virtio-block device serves: the host's (an image on the
/// data disk), shared with the manager, which names it and refuses to
/// delete it while a VM holds it. Not part of the device's state.
#[derive(Clone)]
pub struct HostDisk {
    /// The image's name on the data disk.
    pub name: String,
    pub disk: Rc<RefCell<dyn BlockBackend>>,
}

impl HostDisk {
    /// A stand-in with no bytes, every access failing: what a restored
    /// VM's device serves until the checkpoint names its image
    /// ([`DeviceSet::attach_block_backend`]).
    pub fn detached() -> Self {
        HostDisk { name: String::new(), disk: Rc::new(RefCell::new(Detached)) }
    }
}

struct Detached;

impl BlockBackend for Detached {
    fn capacity(&self) -> u64 {
        0
    }
    fn read(&mut self, _: u64, _: &mut [u8]) -> Result<(), IoFailed> {
        Err(IoFailed)
    }
    fn write(&mut self, _: u64, _: &[u8]) -> Result<(), IoFailed> {
        Err(IoFailed)
    }
    fn flush(&mut self) -> Result<(), IoFailed> {
        Err(IoFailed)
    }
}

impl BlockBackend for HostDisk {
    fn capacity(&self) -> u64 {
        self.disk.borrow().capacity()
    }
    fn initialised(&self) -> u64 {
        self.disk.borrow().initialised()
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), IoFailed> {
        self.disk.borrow_mut().read(offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoFailed> {
        self.disk.borrow_mut().write(offset, data)
    }
    fn flush(&mut self) -> Result<(), IoFailed> {
        self.disk.borrow_mut().flush()
    }
}

impl fmt::Debug for HostDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostDisk({})", self.name)
    }
}

/// Two handles are alike when they are the one disk.
impl PartialEq for HostDisk {
    fn eq(&self, other: &Self) -> bool {
        Rc::ptr_eq(&self.disk, &other.disk)
    }
}

impl Eq for HostDisk {}

/// A virtio device of the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VirtioDevice {
    /// virtio-rng (device id 4).
    Rng(VirtioMmio<Rng<HostEntropy>>),
    /// virtio-blk (device id 2).
    Block(VirtioMmio<Block<HostDisk>>),
    /// virtio-console (device id 3): `hvc0`.
    Console(VirtioMmio<Console>),
    /// virtio-balloon (device id 5). Boxed: its held chains and statistics
    /// make it the largest.
    Balloon(alloc::boxed::Box<VirtioMmio<Balloon>>),
    /// virtio-net (device id 1): `eth0`, a port of a host switch.
    Net(VirtioMmio<Net>),
}

/// Runs `$body` with `$d` bound to the transport of whichever device `$v`
/// is (every arm has the same methods; the device types differ).
macro_rules! with_device {
    ($v:expr, $d:ident => $body:expr) => {
        match $v {
            VirtioDevice::Rng($d) => $body,
            VirtioDevice::Block($d) => $body,
            VirtioDevice::Console($d) => $body,
            VirtioDevice::Balloon($d) => $body,
            VirtioDevice::Net($d) => $body,
        }
    };
}

/// One device at its slot.
#[derive(Clone, Debug)]
pub struct VirtioSlot {
    /// The name its state is saved under.
    pub name: &'static str,
    pub slot: usize,
    pub base: u64,
    pub gsi: u32,
    pub device: VirtioDevice,
    /// The pin's level as last driven.
    level: bool,
}

/// Guest memory for a write that reaches no RAM (a device register write
/// made without the VM's memory at hand, as the device fuzzer does): every
/// DMA fails, so a notified queue finds its rings outside RAM.
struct NoRam;

impl GuestMemory for NoRam {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), OutsideRam> {
        Err(OutsideRam { gpa, len: buf.len() as u64 })
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), OutsideRam> {
        Err(OutsideRam { gpa, len: data.len() as u64 })
    }

    fn is_ram(&self, _: u64, _: u64) -> bool {
        false
    }
}

impl DeviceSet {
    /// Add a virtio-rng device at the next free slot (its register page and
    /// pin, which the DSDT must list: [`Self::virtio_slots`]). `false` if
    /// every slot is taken.
    pub fn add_virtio_rng(&mut self, entropy: HostEntropy) -> bool {
        let slot = self.virtio.len();
        let Some(s) = mmio::slot(slot) else { return false };
        self.virtio.push(VirtioSlot {
            name: "virtio-rng",
            slot,
            base: u64::from(s.base),
            gsi: s.gsi,
            device: VirtioDevice::Rng(VirtioMmio::new(Rng::new(entropy))),
            level: false,
        });
        true
    }

    /// Add a virtio-console device at the next free slot (every VM has
    /// one: `hvc0` in a Linux guest); `false` if every slot is taken.
    pub fn add_virtio_console(&mut self) -> bool {
        let slot = self.virtio.len();
        let Some(s) = mmio::slot(slot) else { return false };
        self.virtio.push(VirtioSlot {
            name: "virtio-console",
            slot,
            base: u64::from(s.base),
            gsi: s.gsi,
            device: VirtioDevice::Console(VirtioMmio::new(Console::new())),
            level: false,
        });
        true
    }

    /// Add a virtio-balloon device at the next free slot (every VM has
    /// one); `false` if every slot is taken.
    pub fn add_virtio_balloon(&mut self) -> bool {
        let slot = self.virtio.len();
        let Some(s) = mmio::slot(slot) else { return false };
        self.virtio.push(VirtioSlot {
            name: "virtio-balloon",
            slot,
            base: u64::from(s.base),
            gsi: s.gsi,
            device: VirtioDevice::Balloon(alloc::boxed::Box::new(VirtioMmio::new(Balloon::new()))),
            level: false,
        });
        true
    }

    fn balloon_slot(&self) -> Option<usize> {
        self.virtio.iter().position(|v| matches!(v.device, VirtioDevice::Balloon(_)))
    }

    /// The balloon device, if the VM has one.
    pub fn balloon(&self) -> Option<&Balloon> {
        self.virtio.iter().find_map(|v| match &v.device {
            VirtioDevice::Balloon(d) => Some(d.device()),
            _ => None,
        })
    }

    /// Set the balloon's target (4 KiB pages): the driver hears of it
    /// through a configuration change interrupt. `false` without a balloon.
    pub fn balloon_set_target(&mut self, pages: u32) -> bool {
        let Some(i) = self.balloon_slot() else { return false };
        if let VirtioDevice::Balloon(d) = &mut self.virtio[i].device {
            d.balloon_set_target(pages);
        }
        self.drive_virtio_line(i);
        true
    }

    /// The balloon's recorded actions, oldest first; each must be applied
    /// to `mm` before [`Self::balloon_run_queues`] (the device holds their
    /// chains until then).
    pub fn balloon_take_actions(&mut self) -> Vec<BalloonAction> {
        match self.balloon_slot().map(|i| &mut self.virtio[i].device) {
            Some(VirtioDevice::Balloon(d)) if d.device().needs_service() => d.device_mut().take_actions(),
            _ => Vec::new(),
        }
    }

    /// Whether the balloon has actions or chains waiting for the host.
    pub fn balloon_needs_service(&self) -> bool {
        self.balloon().is_some_and(|b| b.needs_service())
    }

    /// Returns applied chains and takes new ones (then the line follows).
    pub fn balloon_run_queues(&mut self, mem: &mut dyn GuestMemory) {
        let Some(i) = self.balloon_slot() else { return };
        // Post-copy: not while a ring or buffer is on its way (the next
        // notification or service tries again).
        if let VirtioDevice::Balloon(d) = &mut self.virtio[i].device
            && d.queues_here(mem)
        {
            d.balloon_run_queues(mem);
        }
        self.drive_virtio_line(i);
    }

    /// Ask the driver for fresh statistics (returns its held buffer).
    pub fn balloon_request_stats(&mut self, mem: &mut dyn GuestMemory) -> bool {
        let Some(i) = self.balloon_slot() else { return false };
        let asked = match &mut self.virtio[i].device {
            VirtioDevice::Balloon(d) if d.queues_here(mem) => d.balloon_request_stats(mem),
            _ => false,
        };
        self.drive_virtio_line(i);
        asked
    }

    /// The virtio console, if the VM has one.
    pub fn virtio_console(&mut self) -> Option<&mut Console> {
        self.virtio.iter_mut().find_map(|v| match &mut v.device {
            VirtioDevice::Console(d) => Some(d.device_mut()),
            _ => None,
        })
    }

    /// Input for the virtio console: queued (what fits, [`Console::input`])
    /// and moved into the guest's receive buffers now, with an interrupt
    /// if it wants one. How many bytes were taken; `None` without a
    /// virtio console.
    pub fn virtio_console_input(&mut self, bytes: &[u8], mem: &mut dyn GuestMemory) -> Option<usize> {
        let i = self.virtio.iter().position(|v| matches!(v.device, VirtioDevice::Console(_)))?;
        let VirtioDevice::Console(d) = &mut self.virtio[i].device else { return None };
        let n = d.device_mut().input(bytes);
        // Post-copy: with a receive buffer still on its way the input
        // waits in the device for the next input or notification.
        if d.queue_here(0, mem) {
            d.device_work(0, mem);
        }
        self.drive_virtio_line(i);
        Some(n)
    }

    /// Add a virtio-blk device over `disk` at the next free slot; `false`
    /// if every slot is taken. It is saved as `virtio-blk`, so a VM has one.
    pub fn add_virtio_blk(&mut self, disk: HostDisk) -> bool {
        let slot = self.virtio.len();
        let Some(s) = mmio::slot(slot) else { return false };
        let serial = disk.name.clone();
        self.virtio.push(VirtioSlot {
            name: "virtio-blk",
            slot,
            base: u64::from(s.base),
            gsi: s.gsi,
            device: VirtioDevice::Block(VirtioMmio::new(Block::new(disk, &serial, false))),
            level: false,
        });
        true
    }

    /// The disk image the VM's virtio-blk device serves, and what it did.
    pub fn block_disk(&self) -> Option<(&str, BlockCounters)> {
        self.virtio.iter().find_map(|v| match &v.device {
            VirtioDevice::Block(d) => Some((d.device().backend().name.as_str(), d.device().counters())),
            _ => None,
        })
    }

    /// The disk the virtio-blk device serves (a reset of the VM keeps it).
    pub fn block_backend(&self) -> Option<HostDisk> {
        self.virtio.iter().find_map(|v| match &v.device {
            VirtioDevice::Block(d) => Some(d.device().backend().clone()),
            _ => None,
        })
    }

    /// Puts `disk` under the virtio-blk device (a restore, once the
    /// checkpoint named the image); `false` if the VM has none.
    pub fn attach_block_backend(&mut self, disk: HostDisk) -> bool {
        self.virtio.iter_mut().any(|v| match &mut v.device {
            VirtioDevice::Block(d) => {
                d.device_mut().set_backend(disk.clone());
                true
            }
            _ => false,
        })
    }

    /// Add a virtio-net device with address `mac` at the next free slot;
    /// `false` if every slot is taken. It is saved as `virtio-net`, so a VM
    /// has one.
    pub fn add_virtio_net(&mut self, mac: [u8; 6]) -> bool {
        let slot = self.virtio.len();
        let Some(s) = mmio::slot(slot) else { return false };
        self.virtio.push(VirtioSlot {
            name: "virtio-net",
            slot,
            base: u64::from(s.base),
            gsi: s.gsi,
            device: VirtioDevice::Net(VirtioMmio::new(Net::new(mac))),
            level: false,
        });
        true
    }

    /// The VM's NIC, if it has one (its MAC and counters).
    pub fn virtio_net(&self) -> Option<&Net> {
        self.virtio.iter().find_map(|v| match &v.device {
            VirtioDevice::Net(d) => Some(d.device()),
            _ => None,
        })
    }

    /// Whether the NIC holds frames the guest sent that the host has not
    /// taken yet.
    pub fn net_frames_waiting(&self) -> bool {
        self.virtio_net().is_some_and(|n| n.pending_tx() > 0)
    }

    /// The frames the guest transmitted since the last call, oldest first
    /// (none without a NIC): what the host's switch forwards.
    pub fn take_net_frames(&mut self) -> Vec<Vec<u8>> {
        self.virtio
            .iter_mut()
            .find_map(|v| match &mut v.device {
                VirtioDevice::Net(d) => Some(d.device_mut().take_frames()),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Frames for the NIC (from the switch): queued (those the device
    /// takes, [`Net::deliver`]) and moved into the guest's receive buffers
    /// now, with an interrupt if it wants one. How many were taken; `None`
    /// without a NIC.
    pub fn virtio_net_deliver(&mut self, frames: &[Vec<u8>], mem: &mut dyn GuestMemory) -> Option<usize> {
        let i = self.virtio.iter().position(|v| matches!(v.device, VirtioDevice::Net(_)))?;
        let VirtioDevice::Net(d) = &mut self.virtio[i].device else { return None };
        let taken = frames.iter().filter(|f| d.device_mut().deliver(f)).count();
        // One pass over the receive ring for the whole batch, and at most
        // one interrupt (2.7.10 lets the device batch used buffers). With a
        // receive buffer still on its way (post-copy) the frames wait in
        // the device, as for a full ring.
        if d.queue_here(net::RX_QUEUE, mem) {
            d.device_work(net::RX_QUEUE, mem);
        }
        self.drive_virtio_line(i);
        Some(taken)
    }

    /// The slots in use, for the DSDT.
    pub fn virtio_slots(&self) -> Vec<crate::firmware::acpi::VirtioMmioSlot> {
        self.virtio.iter().filter_map(|v| mmio::slot(v.slot)).collect()
    }

    /// The virtio device whose register page holds `gpa`, and the offset.
    pub(super) fn virtio_target(&self, gpa: u64) -> Option<(usize, u64)> {
        self.virtio
            .iter()
            .position(|v| (v.base..v.base + mmio::STRIDE).contains(&gpa))
            .map(|i| (i, gpa - self.virtio[i].base))
    }

    /// Whether `gpa` is a virtio device's register page.
    pub fn is_virtio(&self, gpa: u64) -> bool {
        self.virtio_target(gpa).is_some()
    }

    pub(super) fn virtio_read(&mut self, i: usize, offset: u64, size: u8) -> u64 {
        with_device!(&mut self.virtio[i].device, d => d.read(offset, size))
    }

    /// A guest write to a virtio device's registers, with the VM's memory
    /// for what a notification or a queue becoming ready does; then its
    /// pin follows its interrupt status. `false` if `gpa` is no virtio
    /// device's.
    pub fn virtio_write(&mut self, gpa: u64, size: u8, value: u64, mem: &mut dyn GuestMemory) -> bool {
        let Some((i, offset)) = self.virtio_target(gpa) else { return false };
        with_device!(&mut self.virtio[i].device, d => d.write(offset, size, value, mem));
        self.drive_virtio_line(i);
        true
    }

    /// Whether a guest write to a virtio device's registers can be carried
    /// out with the memory `mem` reaches now (see
    /// [`VirtioMmio::write_can_go`]); true for an address no device holds.
    pub fn virtio_write_can_go(&self, gpa: u64, size: u8, value: u64, mem: &mut dyn GuestMemory) -> bool {
        let Some((i, offset)) = self.virtio_target(gpa) else { return true };
        with_device!(&self.virtio[i].device, d => d.write_can_go(offset, size, value, mem))
    }

    /// A register write without the VM's memory (see [`NoRam`]).
    pub(super) fn virtio_write_no_ram(&mut self, gpa: u64, size: u8, value: u64) -> bool {
        self.virtio_write(gpa, size, value, &mut NoRam)
    }

    fn drive_virtio_line(&mut self, i: usize) {
        let v = &mut self.virtio[i];
        let level = with_device!(&v.device, d => d.interrupt_asserted());
        if level == v.level {
            return;
        }
        v.level = level;
        let gsi = v.gsi as usize;
        if let Some(m) = self.ioapic.set_irq(gsi, level) {
            self.deliver(m);
        }
        self.refresh_intr();
    }

    /// The virtio devices' saved states.
    pub(super) fn save_virtio(&self) -> impl Iterator<Item = SavedDevice> + '_ {
        self.virtio.iter().map(|v| with_device!(&v.device, d => persist::save(v.name, d)))
    }

    /// Decode and check every virtio device's state in `saved`, without
    /// applying it.
    pub(super) fn decode_virtio(&self, saved: &[SavedDevice]) -> Result<Vec<VirtioState>, RestoreError> {
        self.virtio
            .iter()
            .map(|v| {
                let s = saved.iter().find(|s| s.name == v.name).ok_or(RestoreError::MissingDevice(v.name))?;
                Ok(match &v.device {
                    VirtioDevice::Rng(_) => {
                        VirtioState::Rng(persist::decode::<VirtioMmio<Rng<HostEntropy>>>(v.name, s)?)
                    }
                    VirtioDevice::Block(_) => {
                        VirtioState::Block(persist::decode::<VirtioMmio<Block<HostDisk>>>(v.name, s)?)
                    }
                    VirtioDevice::Console(_) => {
                        VirtioState::Console(persist::decode::<VirtioMmio<Console>>(v.name, s)?)
                    }
                    VirtioDevice::Balloon(_) => {
                        VirtioState::Balloon(alloc::boxed::Box::new(persist::decode::<VirtioMmio<Balloon>>(v.name, s)?))
                    }
                    VirtioDevice::Net(_) => VirtioState::Net(persist::decode::<VirtioMmio<Net>>(v.name, s)?),
                })
            })
            .collect()
    }

    /// Apply states [`Self::decode_virtio`] accepted.
    pub(super) fn restore_virtio(&mut self, states: Vec<VirtioState>) {
        use super::Persist;
        for (v, state) in self.virtio.iter_mut().zip(states) {
            match (&mut v.device, state) {
                (VirtioDevice::Rng(d), VirtioState::Rng(s)) => d.restore(s),
                (VirtioDevice::Block(d), VirtioState::Block(s)) => d.restore(s),
                (VirtioDevice::Console(d), VirtioState::Console(s)) => d.restore(s),
                (VirtioDevice::Balloon(d), VirtioState::Balloon(s)) => d.restore(*s),
                (VirtioDevice::Net(d), VirtioState::Net(s)) => d.restore(s),
                // decode_virtio decoded each state by its slot's device.
                _ => unreachable!("a virtio state decoded for another device"),
            }
            // The restored I/O APIC already has the line where the device
            // had it when both were saved.
            v.level = with_device!(&v.device, d => d.interrupt_asserted());
        }
    }

    /// Whether saved state names a virtio device of this set.
    pub(super) fn has_virtio(&self, name: &str) -> bool {
        self.virtio.iter().any(|v| v.name == name)
    }
}

/// A decoded virtio device state.
pub(super) enum VirtioState {
    Rng(<VirtioMmio<Rng<HostEntropy>> as super::Persist>::State),
    Block(<VirtioMmio<Block<HostDisk>> as super::Persist>::State),
    Console(<VirtioMmio<Console> as super::Persist>::State),
    Balloon(alloc::boxed::Box<<VirtioMmio<Balloon> as super::Persist>::State>),
    Net(<VirtioMmio<Net> as super::Persist>::State),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::ioapic::IOAPIC_BASE;
    use crate::devices::virtio::VecMemory;
    use crate::devices::virtio::feature::VERSION_1;
    use crate::devices::virtio::mmio::{reg, status};
    use crate::devices::virtio::queue::VIRTQ_DESC_F_WRITE;
    use crate::firmware::acpi::VirtioMmioSlot;

    fn fill_ab(b: &mut [u8]) -> bool {
        b.fill(0xab);
        true
    }

    const BASE: u64 = 0xd000_0000;

    /// A device set with virtio-rng, its I/O APIC pin routed to vector
    /// 0x41, and 64 KiB of RAM; Linux's handshake done, queue 0 of 8
    /// entries at 0x1000 (descriptors), 0x2000 (avail), 0x3000 (used).
    fn set_up() -> (DeviceSet, VecMemory) {
        let mut d = DeviceSet::pc(0, 64 << 20);
        assert!(d.add_virtio_rng(HostEntropy(fill_ab)));
        let mut mem = VecMemory::new(0, 0x10000);
        // I/O APIC redirection entry 16: vector 0x41, level, unmasked.
        for (sel, v) in [(0x10 + 2 * 16, 0x41 | (1 << 15)), (0x11 + 2 * 16, 0)] {
            d.mmio_write(IOAPIC_BASE, 4, sel, 0);
            d.mmio_write(IOAPIC_BASE + 0x10, 4, v, 0);
        }
        let mut w = |d: &mut DeviceSet, off: u64, v: u64| assert!(d.virtio_write(BASE + off, 4, v, &mut mem));
        w(&mut d, reg::STATUS, 0);
        w(&mut d, reg::STATUS, u64::from(status::ACKNOWLEDGE | status::DRIVER));
        w(&mut d, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut d, reg::DRIVER_FEATURES, VERSION_1 >> 32);
        w(&mut d, reg::STATUS, u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK));
        w(&mut d, reg::QUEUE_SEL, 0);
        w(&mut d, reg::QUEUE_NUM, 8);
        for (low, gpa) in
            [(reg::QUEUE_DESC_LOW, 0x1000), (reg::QUEUE_DRIVER_LOW, 0x2000), (reg::QUEUE_DEVICE_LOW, 0x3000)]
        {
            w(&mut d, low, gpa);
        }
        w(&mut d, reg::QUEUE_READY, 1);
        w(
            &mut d,
            reg::STATUS,
            u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK),
        );
        (d, mem)
    }

    #[test]
    fn virtio_rng_fills_a_buffer_and_interrupts_through_the_io_apic() {
        let (mut d, mut mem) = set_up();
        assert_eq!(d.virtio_slots(), [VirtioMmioSlot { base: BASE as u32, gsi: 16 }]);
        assert!(d.claims_mmio(BASE + 0x20) && !d.claims_mmio(BASE + 0x1000));
        assert_eq!(d.mmio_read(BASE, 4, 0), Some(u64::from(mmio::MAGIC)));
        assert_eq!(d.mmio_read(BASE + reg::DEVICE_ID, 4, 0), Some(4));
        // One 16-byte device-writable buffer at 0x8000, then a notify.
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&0x8000u64.to_le_bytes());
        desc[8..12].copy_from_slice(&16u32.to_le_bytes());
        desc[12..14].copy_from_slice(&VIRTQ_DESC_F_WRITE.to_le_bytes());
        mem.bytes[0x1000..0x1010].copy_from_slice(&desc);
        mem.bytes[0x2002..0x2004].copy_from_slice(&1u16.to_le_bytes());
        assert!(!d.interrupt_pending());
        assert!(d.virtio_write(BASE + reg::QUEUE_NOTIFY, 4, 0, &mut mem));
        assert_eq!(mem.bytes[0x8000..0x8010], [0xab; 16]);
        assert_eq!(&mem.bytes[0x3002..0x3004], &1u16.to_le_bytes(), "used idx");
        assert!(d.interrupt_pending(), "the used buffer did not interrupt");
        assert_eq!(d.acknowledge_interrupt(), 0x41);
        // The guest acknowledges the device: its line drops.
        assert!(d.virtio_write(BASE + reg::INTERRUPT_ACK, 4, 1, &mut mem));
        assert!(!d.virtio[0].level);
    }

    #[test]
    fn virtio_state_is_saved_and_needs_the_device_to_restore() {
        let (d, _) = set_up();
        let saved = d.save();
        let rng = saved.iter().find(|s| s.name == "virtio-rng").expect("virtio-rng is saved");
        assert!(!rng.bytes.is_empty());
        let mut same = DeviceSet::pc(0, 64 << 20);
        same.add_virtio_rng(HostEntropy(fill_ab));
        same.restore(&saved).unwrap();
        assert_eq!(same.save(), saved);
        assert_eq!(same.mmio_read(BASE + reg::STATUS, 4, 0), d.clone().mmio_read(BASE + reg::STATUS, 4, 0));
        let mut without = DeviceSet::pc(0, 64 << 20);
        assert_eq!(without.restore(&saved), Err(RestoreError::UnknownDevice("virtio-rng".into())));
        let mut missing = DeviceSet::pc(0, 64 << 20);
        missing.add_virtio_rng(HostEntropy(fill_ab));
        let no_rng: Vec<SavedDevice> = saved.iter().filter(|s| s.name != "virtio-rng").cloned().collect();
        assert_eq!(missing.restore(&no_rng), Err(RestoreError::MissingDevice("virtio-rng")));
    }
}
