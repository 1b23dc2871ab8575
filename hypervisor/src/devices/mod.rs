//! Guest-facing device models. Each model is plain logic over its
//! registers, so it is tested on the host, and implements [`Persist`] so
//! its state can be saved, moved and restored.
//!
//! A VM's devices are a [`DeviceSet`]: the models, and a port-I/O [`Bus`]
//! mapping port ranges to them (an MMIO bus joins it with the interrupt
//! controllers). Dispatch is a `match` over [`Device`], not a vtable: the
//! exit path stays statically dispatched, and adding a device means adding
//! a variant, which the compiler then makes every `match` handle (save and
//! restore included).

pub mod acpi_pm;
pub mod bus;
pub mod fw_cfg;
mod interrupts;
pub use interrupts::{delivered_to, ipi_targets};
pub mod ioapic;
pub mod lapic;
pub mod pci;
pub mod persist;
pub mod pic;
pub mod pit;
pub mod rtc;
#[cfg(test)]
mod smp_tests;
pub mod uart;
pub mod virtio;
pub mod virtio_slots;

use alloc::vec::Vec;

use crate::mca::vmce::{VirtualMca, VmceState};
use acpi_pm::AcpiPm;
pub use bus::Bus;
use fw_cfg::FwCfg;
pub use interrupts::ioapic_pin;
use ioapic::IoApic;
use lapic::{Lapic, LapicConfig};
use pci::PciHost;
pub use persist::{Persist, RestoreError, SavedDevice};
use pic::Pic;
use pit::Pit;
use rtc::Rtc;
use uart::Uart;

/// `f`, called at most once: its first answer is kept.
fn once(f: impl Fn() -> u64) -> impl Fn() -> u64 {
    let kept = core::cell::Cell::new(None);
    move || {
        kept.get().unwrap_or_else(|| {
            let v = f();
            kept.set(Some(v));
            v
        })
    }
}

/// The interrupt controllers' names in saved state (they sit on no port):
/// local APIC `i` (vCPU `i`'s) is `LAPIC_NAMES[i]`. A one-vCPU VM saves
/// `lapic0` alone, as before VMs had several.
pub const LAPIC_NAMES: [&str; MAX_VCPUS] =
    ["lapic0", "lapic1", "lapic2", "lapic3", "lapic4", "lapic5", "lapic6", "lapic7"];
const IOAPIC_NAME: &str = "ioapic";
/// The machine-check banks' name in saved state.
const MCA_NAME: &str = "mca";

/// The debug-exit port: a write of V ends the VM with status (V << 1) | 1,
/// like QEMU's `isa-debug-exit` device, so test kernels written for QEMU
/// report their verdict the same way here.
pub const EXIT_PORT: u16 = 0xf4;

/// COM1's ports.
pub const COM1_BASE: u16 = 0x3f8;

/// COM1's, the PIC's, the PIT's and the PCI host's places in
/// `DeviceSet::devices`.
const COM1_INDEX: usize = 0;
const PIC_INDEX: usize = 2;
const PIT_INDEX: usize = 3;
const PCI_INDEX: usize = 6;

/// The most vCPUs a VM can have (`vm run ... vcpus=<n>`): the per-vCPU
/// interrupt masks below are `u32`s, and 8 keeps flat logical destinations
/// (one bit per APIC, SDM Vol. 3A 11.6.2.2) able to name every vCPU.
pub const MAX_VCPUS: usize = 8;

/// The CMOS clock's index and data ports.
pub const RTC_BASE: u16 = 0x70;

/// What a port access did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortEffect {
    /// Done; for reads, the value read.
    Done(u32),
    /// The guest asked to end with this exit status.
    Exit(u32),
    /// No device decodes the port: reads see all-ones, writes vanish.
    Unbacked,
    /// The guest asked for soft-off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (the reset control port).
    Reset,
}

/// The master 8259 as Linux initialises it (ICW1-ICW4: vectors 0x30..,
/// the slave on IR2, 8086 mode), then `imr` as its mask: for tests.
#[cfg(test)]
pub(crate) fn init_pic_as_linux(set: &mut DeviceSet, imr: u8) {
    for (port, v) in [(0x20, 0x11), (0x21, 0x30), (0x21, 0x04), (0x21, 0x01), (0x21, u32::from(imr))] {
        set.pio_write(port, 1, v, || 0);
    }
}

/// A port access [`DeviceSet::pio_alone`] carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alone {
    /// What an `in` read (0 for an `out`).
    pub value: u32,
    /// COM1's interrupt line is no longer where the controllers last saw
    /// it: [`DeviceSet::update_lines`] must run before the guest can see
    /// the interrupt (or stop seeing it).
    pub line_moved: bool,
}

/// Every device model a VM can have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    /// A 16550A UART (COM1).
    Uart(Uart),
    /// QEMU's `isa-debug-exit`: a write ends the VM (no state).
    DebugExit,
    /// The CMOS clock and RAM.
    Rtc(Rtc),
    /// The two cascaded 8259A interrupt controllers and their ELCR.
    Pic(Pic),
    /// The 8254 timer and port 0x61 (speaker gate, counter 2's output).
    Pit(Pit),
    /// The ACPI PM1 blocks and PM timer, and the reset control port.
    AcpiPm(AcpiPm),
    /// PCI configuration mechanism #1 and bus 0 (CONFIG_DATA on the bus;
    /// CONFIG_ADDRESS is claimed by width, see [`pci`]).
    Pci(PciHost),
    /// QEMU's fw_cfg, the legacy I/O interface.
    FwCfg(FwCfg),
}

impl Device {
    /// One byte lane of a port read: `port` is the lane's port, `offset`
    /// its offset in the device's range. `None`: the device does not
    /// decode reads there.
    fn read_byte(&mut self, port: u16, offset: u64, now_ns: &impl Fn() -> u64) -> Option<u8> {
        match self {
            Device::Uart(u) => Some(u.read(offset as u16)),
            Device::Rtc(r) => Some(r.read(offset, now_ns())),
            Device::Pic(p) => Some(p.read(port)),
            Device::Pit(t) if port == pit::PORT61 => Some(t.read_port61(now_ns())),
            Device::Pit(t) => Some(t.read(port, now_ns())),
            Device::AcpiPm(pm) => Some(pm.read(port, now_ns())),
            Device::Pci(p) => p.read_data(offset),
            Device::FwCfg(f) => f.read(offset, 1).map(|v| v as u8),
            Device::DebugExit => None,
        }
    }

    /// A read of `size` bytes at `offset` that lies wholly in the device's
    /// range: byte lane by byte lane (lanes it does not decode read as
    /// all-ones), except for fw_cfg, whose ports are defined by access
    /// width (a word read of the data port is not two byte reads).
    fn read(&mut self, port: u16, offset: u64, size: u8, now_ns: &impl Fn() -> u64) -> u32 {
        if let Device::FwCfg(f) = self {
            return f.read(offset, size).unwrap_or(unbacked_read(size));
        }
        let mut value = 0u32;
        for lane in 0..size.min(4) {
            let byte = self.read_byte(port.wrapping_add(lane.into()), offset + u64::from(lane), now_ns);
            value |= u32::from(byte.unwrap_or(0xff)) << (8 * lane);
        }
        value
    }

    /// A write of `size` bytes at `offset` that lies wholly in the device's
    /// range (lanes as for [`Self::read`]); what it asks of the platform.
    fn write(&mut self, port: u16, offset: u64, size: u8, value: u32, now_ns: &impl Fn() -> u64) -> PortEffect {
        if let Device::FwCfg(f) = self {
            f.write(offset, size, value);
            return PortEffect::Done(0);
        }
        let mut effect = PortEffect::Done(0);
        for lane in 0..size.min(4) {
            let byte = (value >> (8 * lane)) as u8;
            let (_, asked) = self.write_byte(port.wrapping_add(lane.into()), offset + u64::from(lane), byte, now_ns);
            if !matches!(effect, PortEffect::PowerOff | PortEffect::Reset) {
                effect = asked;
            }
        }
        effect
    }

    /// One byte lane of a port write: whether the device decoded it, and
    /// what it asks of the platform.
    fn write_byte(&mut self, port: u16, offset: u64, value: u8, now_ns: &impl Fn() -> u64) -> (bool, PortEffect) {
        let mut effect = PortEffect::Done(0);
        match self {
            Device::Uart(u) => u.write(offset as u16, value),
            Device::Rtc(r) => r.write(offset, value, now_ns()),
            Device::Pic(p) => p.write(port, value),
            Device::Pit(t) if port == pit::PORT61 => t.write_port61(value, now_ns()),
            Device::Pit(t) => t.write(port, value, now_ns()),
            Device::AcpiPm(pm) => match pm.write(port, value) {
                Some(acpi_pm::Request::PowerOff) => effect = PortEffect::PowerOff,
                Some(acpi_pm::Request::Reset) => effect = PortEffect::Reset,
                None => {}
            },
            Device::Pci(p) => return (p.write_data(offset, value), effect),
            // Byte writes are not the interface's: decoded, ignored.
            Device::FwCfg(f) => f.write(offset, 1, value.into()),
            Device::DebugExit => return (false, PortEffect::Unbacked),
        }
        (true, effect)
    }
}

/// A device's state decoded and checked, waiting to be applied.
enum Decoded {
    Uart(<Uart as Persist>::State),
    Rtc(<Rtc as Persist>::State),
    Pic(<Pic as Persist>::State),
    Pit(<Pit as Persist>::State),
    AcpiPm(<AcpiPm as Persist>::State),
    Pci(<PciHost as Persist>::State),
    FwCfg(<FwCfg as Persist>::State),
}

/// A VM's devices and where the guest reaches them.
#[derive(Clone, Debug)]
pub struct DeviceSet {
    /// Each device with its stable name (the key in saved state).
    devices: Vec<(&'static str, Device)>,
    pio: Bus<usize>,
    /// When the PIT's next IRQ 0 edge is due (VM clock, ns), if armed: a
    /// cache so that most exits check one number instead of the timer.
    next_timer_ns: Option<u64>,
    /// Which vCPUs an interrupt waits for (bit i: vCPU i), from the PIC
    /// (vCPU 0 only) or their local APIC (kept up to date by every change
    /// of their inputs or state, so the exit path reads one word).
    intr: u32,
    /// The local APICs, one per vCPU: index = APIC ID = vCPU index. They
    /// sit with the I/O APIC and the PIC because an IPI from one reaches
    /// the others, all within one exit on this one host CPU; vCPUs on
    /// several host CPUs will need each APIC with its vCPU and a mailbox
    /// between them.
    lapics: Vec<Lapic>,
    /// The vCPU whose exit is being handled: its APIC page, APIC MSRs, CR8
    /// and interrupt acknowledge are the ones the accessors below reach;
    /// `cur_bit` is its bit in the masks (kept to spare the exit path a
    /// checked shift).
    cur: usize,
    cur_bit: u32,
    /// NMIs, INITs and startup IPIs sent to each vCPU and not yet acted
    /// on by the VM ([`Self::take_signals`]); `signalled` has bit i set
    /// when `signals[i]` holds any.
    signals: Vec<Signals>,
    signalled: u32,
    /// The vCPUs (bit i: vCPU i) an IPI reached other than the sender, and
    /// the sender if that was an INIT: the scheduler should act on it
    /// before the slice ends.
    kicked: u32,
    ioapic: IoApic,
    /// The guest's TSC minus the host's, and the TSC's rate: a TSC-deadline
    /// timer counts in guest TSC.
    tsc_offset: u64,
    tsc_hz: u64,
    /// A port access reached a timer (the PIT, port 0x61): `update_lines`
    /// looks at the timers again. Other accesses leave them alone, so the
    /// exit path of a UART byte does not recompute deadlines.
    timers_touched: bool,
    /// The last port access reached COM1 alone, whose only effect on the
    /// interrupt controllers is its IRQ 4 level: [`Self::lines_may_have_changed`]
    /// can then answer from that level instead of a recomputation.
    com1_only: bool,
    /// COM1's IRQ 4 level as last driven.
    com1_level: bool,
    /// virtio-mmio devices, in slot order.
    virtio: Vec<virtio_slots::VirtioSlot>,
    /// The machine-check banks (`crate::mca::vmce`).
    mca: VirtualMca,
}

/// The guest's TSC at a VM time: [`DeviceSet::guest_tsc_clock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestTsc {
    hz: u64,
    offset: u64,
}

impl GuestTsc {
    /// The guest's TSC at VM time `now_ns`.
    pub fn at(&self, now_ns: u64) -> u64 {
        let host = (u128::from(now_ns) * u128::from(self.hz) / 1_000_000_000) as u64;
        host.wrapping_add(self.offset)
    }
}

/// vCPU `index`'s bit in the per-vCPU masks (none past 31: `MAX_VCPUS`
/// is far below).
pub(crate) fn bit(index: usize) -> u32 {
    u32::try_from(index).ok().and_then(|i| 1u32.checked_shl(i)).unwrap_or(0)
}

/// What IPIs asked of one vCPU beyond its local APIC's IRR, for the VM to
/// carry out on the vCPU itself (SDM Vol. 3A 11.6.1, delivery modes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Signals {
    pub nmi: bool,
    pub init: bool,
    /// The vector of the last startup IPI.
    pub sipi: Option<u8>,
}

/// The local APIC as firmware leaves the boot processor (SeaBIOS does the
/// same, and KVM's reset of the BSP): software-enabled with spurious vector
/// 0xff, LINT0 ExtINT (the PIC's INTR passes: "virtual wire mode", MP spec
/// 3.6.2.2), LINT1 NMI.
const FIRMWARE_LAPIC: [(u64, u32); 3] = [(0xf0, 0x1ff), (0x350, 0x700), (0x360, 0x400)];

/// The I/O APIC's ID (the MADT says the same).
pub const IOAPIC_ID: u8 = 1;

impl DeviceSet {
    /// The legacy PC pieces every VM has: COM1 at 0x3f8, the CMOS clock at
    /// 0x70 (set from `host_epoch`, the host's Unix time at its boot, and
    /// telling `ram_bytes` of RAM), the PICs at 0x20/0xa0 (ELCR at 0x4d0),
    /// the PIT at 0x40 with port 0x61, the ACPI PM blocks, the debug-exit
    /// port at 0xf4, PCI configuration mechanism #1 at 0xcf8/0xcfc with the
    /// 440FX host bridge on bus 0, and fw_cfg at 0x510 (telling
    /// `ram_bytes` and the vCPUs).
    pub fn pc(host_epoch: u64, ram_bytes: u64) -> Self {
        Self::pc_smp(host_epoch, ram_bytes, 1)
    }

    /// As [`Self::pc`], for `vcpus` vCPUs (1 to [`MAX_VCPUS`]; clamped):
    /// a local APIC each, and fw_cfg tells their number.
    pub fn pc_smp(host_epoch: u64, ram_bytes: u64, vcpus: usize) -> Self {
        let vcpus = vcpus.clamp(1, MAX_VCPUS);
        let mut set = DeviceSet {
            devices: Vec::new(),
            pio: Bus::default(),
            next_timer_ns: None,
            intr: 0,
            lapics: Vec::new(),
            cur: 0,
            cur_bit: 1,
            signals: alloc::vec![Signals::default(); vcpus],
            signalled: 0,
            kicked: 0,
            ioapic: IoApic::new(IOAPIC_ID),
            tsc_offset: 0,
            tsc_hz: lapic::DEFAULT_BUS_HZ,
            timers_touched: false,
            com1_only: false,
            com1_level: false,
            virtio: Vec::new(),
            mca: VirtualMca::default(),
        };
        set.build_lapics(vcpus, 36);
        // Fixed, non-overlapping ranges: these inserts cannot fail. COM1
        // first: `com1()` finds it at COM1_INDEX.
        let _ = set.add_pio("com1", &[(COM1_BASE, 8)], Device::Uart(Uart::default()));
        let _ = set.add_pio("rtc", &[(RTC_BASE, 2)], Device::Rtc(Rtc::new(host_epoch, ram_bytes)));
        let pic_ports = [(pic::MASTER_CMD, 2), (pic::SLAVE_CMD, 2), (pic::ELCR_MASTER, 2)];
        let _ = set.add_pio("pic", &pic_ports, Device::Pic(Pic::new()));
        let _ = set.add_pio("pit", &[(pit::COUNTER0, 4), (pit::PORT61, 1)], Device::Pit(Pit::new()));
        let _ = set.add_pio("acpi-pm", &AcpiPm::PORTS, Device::AcpiPm(AcpiPm::new()));
        // QEMU's `isa-debug-exit,iosize=4`.
        let _ = set.add_pio("debug-exit", &[(EXIT_PORT, 4)], Device::DebugExit);
        // New devices go after the ones above: the indices stay valid.
        // CONFIG_ADDRESS is not on the bus: see `pio_read`.
        let _ = set.add_pio("pci", &[(pci::CONFIG_DATA, 4)], Device::Pci(PciHost::new()));
        let _ =
            set.add_pio("fw-cfg", &[(fw_cfg::SELECTOR_PORT, 2)], Device::FwCfg(FwCfg::new(ram_bytes, vcpus as u16)));
        debug_assert!(matches!(set.devices[PIC_INDEX].1, Device::Pic(_)));
        debug_assert!(matches!(set.devices[PIT_INDEX].1, Device::Pit(_)));
        debug_assert!(matches!(set.devices[PCI_INDEX].1, Device::Pci(_)));
        debug_assert!(set.pio.find(pci::CONFIG_ADDRESS.into()).is_none());
        set
    }

    /// The vCPU's view of the TSC: its rate, the offset the backend adds,
    /// and MAXPHYADDR as CPUID tells it (IA32_APIC_BASE's reserved bits).
    /// A new VM's local APIC is built again for them; call before it runs.
    pub fn set_cpu(&mut self, tsc_offset: u64, tsc_hz: u64, phys_addr_bits: u8) {
        self.tsc_offset = tsc_offset;
        self.tsc_hz = tsc_hz.max(1);
        self.build_lapics(self.lapics.len().max(1), phys_addr_bits);
    }

    /// `n` local APICs in their power-on state, APIC ID = index, the
    /// first the BSP; the BSP's as firmware leaves it. APs' stay as reset
    /// leaves them (software-disabled, LVTs masked: SDM Vol. 3A 11.4.7.1)
    /// for the guest's own start-up code to set up.
    fn build_lapics(&mut self, n: usize, phys_addr_bits: u8) {
        self.lapics = (0..n)
            .map(|i| {
                Lapic::new(LapicConfig {
                    id: i as u32,
                    bsp: i == 0,
                    bus_hz: lapic::DEFAULT_BUS_HZ,
                    tsc_hz: self.tsc_hz,
                    phys_addr_bits,
                })
            })
            .collect();
        for (offset, value) in FIRMWARE_LAPIC {
            let _ = self.lapics[0].write(offset, value, 0);
        }
        self.set_current(0);
    }

    /// How many vCPUs (local APICs) the VM has.
    pub fn vcpu_count(&self) -> usize {
        self.lapics.len()
    }

    /// Route the accessors that act for "the vCPU" (APIC page and MSRs,
    /// CR8, interrupt acknowledge, [`Self::interrupt_pending`]) to vCPU
    /// `index` (out of range: left as it was).
    pub fn set_current(&mut self, index: usize) {
        if index < self.lapics.len() {
            self.cur = index;
            self.cur_bit = bit(index);
        }
    }

    /// The vCPU the accessors act for.
    pub fn current(&self) -> usize {
        self.cur
    }

    /// Local APIC `index`, if the VM has that many vCPUs.
    pub fn lapic(&self, index: usize) -> Option<&Lapic> {
        self.lapics.get(index)
    }

    fn cur_lapic(&mut self) -> &mut Lapic {
        // `cur` is only ever set below `lapics.len()`, which never shrinks
        // below 1 (`build_lapics`).
        &mut self.lapics[self.cur]
    }

    /// Local APIC `index`, to change (`None` past the VM's vCPUs).
    pub fn lapic_mut(&mut self, index: usize) -> Option<&mut Lapic> {
        self.lapics.get_mut(index)
    }

    /// The local APICs, by vCPU index, for a round's siblings: each reaches
    /// its own alone while it runs (`manager::rounds`). The pointer holds
    /// while no vCPU is added or removed.
    pub fn lapics_ptr(&mut self) -> *mut Lapic {
        self.lapics.as_mut_ptr()
    }

    /// After siblings changed their local APICs where they ran: timers and
    /// the cached "an interrupt waits" flags are looked up again.
    pub fn lapics_changed(&mut self, now_ns: u64) {
        self.interrupts_changed(now_ns);
    }

    /// vCPU `index`'s local APIC at a glance, at VM time `now_ns`.
    pub fn apic_summary(&self, index: usize, now_ns: u64) -> Option<lapic::Summary> {
        self.lapics.get(index).map(|l| l.summary(now_ns, self.guest_tsc(now_ns)))
    }

    /// The guest's TSC as the devices compute it, copied for a sibling that
    /// runs its own APIC's timer.
    pub fn guest_tsc_clock(&self) -> GuestTsc {
        GuestTsc { hz: self.tsc_hz, offset: self.tsc_offset }
    }

    /// The next timer interrupt (VM clock, ns) of the PIT and of the local
    /// APICs not in `mask` (bit i: vCPU i), whose vCPUs keep their own
    /// timers while they run as siblings.
    pub fn next_timer_outside(&mut self, now_ns: u64, mask: u32) -> Option<u64> {
        let tsc = self.guest_tsc(now_ns);
        let lapics = self.lapics.iter().enumerate().filter(|&(i, l)| mask & bit(i) == 0 && l.timer_armed());
        let lapic = lapics.filter_map(|(_, l)| l.next_timer_deadline(now_ns, tsc)).min();
        let pit = self.pit().next_irq0(now_ns).filter(|&t| t > now_ns);
        match (pit, lapic) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The guest wrote its TSC: the backend's offset changed.
    pub fn set_tsc_offset(&mut self, tsc_offset: u64) {
        self.tsc_offset = tsc_offset;
        self.next_timer_ns = None;
    }

    /// The guest's TSC at VM time `now_ns` (the host's TSC in ns).
    fn guest_tsc(&self, now_ns: u64) -> u64 {
        self.guest_tsc_clock().at(now_ns)
    }

    fn pic(&mut self) -> &mut Pic {
        match &mut self.devices[PIC_INDEX].1 {
            Device::Pic(p) => p,
            // `pc()` puts it there; nothing moves it.
            _ => unreachable!("the PIC is device {PIC_INDEX}"),
        }
    }

    fn pit(&mut self) -> &mut Pit {
        match &mut self.devices[PIT_INDEX].1 {
            Device::Pit(t) => t,
            _ => unreachable!("the PIT is device {PIT_INDEX}"),
        }
    }

    fn pci(&mut self) -> &mut PciHost {
        match &mut self.devices[PCI_INDEX].1 {
            Device::Pci(p) => p,
            _ => unreachable!("the PCI host is device {PCI_INDEX}"),
        }
    }

    /// Whether the last port accesses reached a timer: then
    /// [`Self::update_lines`] reads the clock, else it ignores `now_ns` (the
    /// exit path skips reading it).
    pub fn timers_touched(&self) -> bool {
        self.timers_touched
    }

    /// Whether the last port access may have changed an interrupt line or
    /// a timer, so that [`Self::update_lines`] must run: always, unless it
    /// reached COM1 alone and COM1's line is where it was (the exit path of
    /// a UART byte then skips recomputing the controllers' outputs).
    #[inline]
    pub fn lines_may_have_changed(&mut self) -> bool {
        !self.com1_only || self.timers_touched || self.com1().irq() != self.com1_level
    }

    /// After a port access (or input for COM1): bring the interrupt lines
    /// up to date. COM1 drives IRQ 4 as a level, and the PIT's next IRQ 0
    /// is looked up again (the guest may have reprogrammed it).
    pub fn update_lines(&mut self, now_ns: u64) {
        let com1 = self.com1().irq();
        if com1 != self.com1_level {
            self.com1_level = com1;
            self.set_isa_irq(4, com1);
        }
        if core::mem::take(&mut self.timers_touched) {
            self.next_timer_ns = None;
            self.poll_timers(now_ns);
        }
        self.refresh_intr();
    }

    /// Fire what is due by `now_ns`: the PIT's IRQ 0 edges. The PIC
    /// latches one edge until the guest takes it; the edges beyond are owed
    /// to the guest and raised one per acknowledge (`acknowledge_interrupt`),
    /// so a guest that counts ticks keeps time even when it was not run for
    /// several periods. Cheap when nothing is due.
    pub fn poll_timers(&mut self, now_ns: u64) {
        if self.next_timer_ns.is_some_and(|t| now_ns < t) {
            return;
        }
        let edges = self.pit().irq0_edges(now_ns);
        if edges > 0 {
            let latched = self.pic().master_requested(0);
            self.pulse_isa_irq(0);
            self.pit().owe_ticks(edges - u64::from(!latched));
        }
        let mut lapic: Option<u64> = None;
        for i in 0..self.lapics.len() {
            if !self.lapics[i].timer_armed() {
                continue;
            }
            let tsc = self.guest_tsc(now_ns);
            let l = &mut self.lapics[i];
            l.tick(now_ns, tsc);
            // A deadline at or before now was delivered by `tick`; a
            // rounding of TSC to ns could name now again: look again in 1 ns.
            if let Some(t) = l.next_timer_deadline(now_ns, tsc).map(|t| t.max(now_ns + 1)) {
                lapic = Some(lapic.map_or(t, |d| d.min(t)));
            }
        }
        self.refresh_intr();
        let pit = self.pit().next_irq0(now_ns).filter(|&t| t > now_ns);
        self.next_timer_ns = match (pit, lapic) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// When the next timer interrupt is due, if one is armed.
    pub fn next_timer(&self) -> Option<u64> {
        self.next_timer_ns
    }

    /// Whether the interrupt controllers assert INTR to the current vCPU.
    pub fn interrupt_pending(&self) -> bool {
        self.intr & self.cur_bit != 0
    }

    /// Whether an interrupt waits for vCPU `index` (what wakes it from
    /// HLT), NMIs, INITs and SIPIs included.
    pub fn interrupt_pending_for(&self, index: usize) -> bool {
        (self.intr | self.signalled) & bit(index) != 0
    }

    /// Whether IPIs left NMIs, INITs or SIPIs for some vCPU.
    pub fn has_signals(&self) -> bool {
        self.signalled != 0
    }

    /// The vCPUs IPIs since the last call reached that want the scheduler
    /// (see `kicked`; none: 0); clears them.
    pub fn take_kicked(&mut self) -> u32 {
        core::mem::take(&mut self.kicked)
    }

    /// What IPIs left for vCPU `index` and it has not acted on yet (a
    /// checkpoint carries it), without taking it.
    pub fn signals(&self, index: usize) -> Signals {
        self.signals.get(index).copied().unwrap_or_default()
    }

    /// Puts back what [`Self::signals`] read (a restore, after
    /// [`Self::restore`]); out of range: nothing.
    pub fn set_signals(&mut self, index: usize, signals: Signals) {
        let Some(s) = self.signals.get_mut(index) else { return };
        *s = signals;
        if signals == Signals::default() {
            self.signalled &= !bit(index);
        } else {
            self.signalled |= bit(index);
        }
    }

    /// Takes what IPIs left for vCPU `index`.
    pub fn take_signals(&mut self, index: usize) -> Signals {
        let Some(s) = self.signals.get_mut(index) else { return Signals::default() };
        self.signalled &= !bit(index);
        core::mem::take(s)
    }

    /// The PIC's interrupt acknowledge cycle: its vector.
    fn acknowledge_pic(&mut self) -> u8 {
        let vector = self.pic().acknowledge();
        if vector == self.pic().master_vector(0) && self.pit().take_owed_tick() {
            // The next owed tick: latched now, delivered once the guest's
            // EOI ends this one's service.
            let pic = self.pic();
            pic.set_irq(0, true);
            pic.set_irq(0, false);
        }
        vector
    }

    /// Add `device` as `name`, decoding the port ranges `(base, len)`.
    fn add_pio(&mut self, name: &'static str, ranges: &[(u16, u64)], device: Device) -> Result<(), bus::Conflict> {
        for &(base, len) in ranges {
            self.pio.insert(base.into(), len, self.devices.len())?;
        }
        self.devices.push((name, device));
        Ok(())
    }

    /// Whether some device decodes `port` (reads of the others see 0xff).
    /// A device that claims accesses by their width may answer for ports
    /// it does not decode byte by byte: see [`Self::claims_access`].
    pub fn decodes_port(&self, port: u16) -> bool {
        self.pio.find(port.into()).is_some_and(|(i, _)| self.devices[i].1 != Device::DebugExit)
    }

    /// Whether an access of `size` bytes at `port` is claimed whole by its
    /// width, whatever its byte lanes decode: a dword at CONFIG_ADDRESS
    /// (the host bridge's; 0xcf9 in its second lane is the reset register,
    /// for byte accesses).
    pub fn claims_access(&self, port: u16, size: u8) -> bool {
        port == pci::CONFIG_ADDRESS && size == 4
    }

    /// COM1, whose output the console shows.
    pub fn com1(&mut self) -> &mut Uart {
        match &mut self.devices[COM1_INDEX].1 {
            Device::Uart(u) => u,
            // `pc()` puts COM1 first; nothing moves it.
            _ => unreachable!("COM1 is the first device"),
        }
    }

    /// Whether COM1 holds complete lines for the console (cheap: checked
    /// after every port write).
    pub fn com1_has_output(&self) -> bool {
        matches!(&self.devices[COM1_INDEX].1, Device::Uart(u) if u.has_output())
    }

    /// COM1's counters, for reports.
    pub fn com1_bytes_out(&self) -> u64 {
        self.devices
            .iter()
            .find_map(|(_, d)| match d {
                Device::Uart(u) => Some(u.bytes_out),
                _ => None,
            })
            .unwrap_or(0)
    }

    /// A guest `in` of `size` bytes (1, 2 or 4) from `port`. Devices with
    /// byte registers (the UART, the RTC) answer per byte lane, as an 8-bit
    /// ISA device does on a wider cycle: each byte of the access decodes on
    /// its own, and lanes no device decodes read as all-ones. Registers
    /// defined by access width see the whole access: fw_cfg's ports, and
    /// CONFIG_ADDRESS, which a dword at 0xcf8 reaches and narrower ones do
    /// not ([`Self::claims_access`]). `now_ns` is the VM's clock, asked
    /// only by devices that keep time.
    pub fn pio_read(&mut self, port: u16, size: u8, now_ns: impl Fn() -> u64) -> PortEffect {
        // One clock reading for the whole access: the byte lanes of a wide
        // read of a counter (the PM timer) must come from one instant.
        let now = once(now_ns);
        let now_ns = || now();
        // The usual case first, on the exit path: one device decodes the
        // whole access (one lookup, then its lanes).
        if let Some((i, offset, rest)) = self.pio.find_with_rest(port.into())
            && u64::from(size) <= rest
            && !matches!(self.devices[i].1, Device::DebugExit)
        {
            // Reading a counter can latch or end a count: the PIT's
            // deadlines are looked at again after it.
            self.timers_touched |= i == PIT_INDEX;
            self.com1_only = i == COM1_INDEX;
            return PortEffect::Done(self.devices[i].1.read(port, offset, size, &now_ns));
        }
        self.com1_only = false;
        // Nothing is on the bus at CONFIG_ADDRESS, so a dword there comes
        // here, off the usual path.
        if self.claims_access(port, size) {
            return PortEffect::Done(self.pci().read_address());
        }
        // A rare access across devices: look at the timers again after it.
        self.timers_touched = true;
        let mut value = 0u32;
        let mut backed = false;
        for lane in 0..size.min(4) {
            let lane_port = port.wrapping_add(lane.into());
            let byte = match self.pio.find(lane_port.into()) {
                Some((i, offset)) => self.devices[i].1.read_byte(lane_port, offset, &now_ns),
                None => None,
            };
            backed |= byte.is_some();
            value |= u32::from(byte.unwrap_or(0xff)) << (8 * lane);
        }
        if backed { PortEffect::Done(value) } else { PortEffect::Unbacked }
    }

    /// A guest `out` of `size` bytes of `value` to `port` (byte lanes as for
    /// [`Self::pio_read`]; the debug-exit port takes the whole value).
    pub fn pio_write(&mut self, port: u16, size: u8, value: u32, now_ns: impl Fn() -> u64) -> PortEffect {
        let now = once(now_ns);
        let now_ns = || now();
        let first = self.pio.find_with_rest(port.into());
        if let Some((i, offset, rest)) = first {
            if matches!(self.devices[i].1, Device::DebugExit) {
                return PortEffect::Exit(exit_status(value));
            }
            // One device decodes the whole access: one lookup.
            if u64::from(size) <= rest {
                self.timers_touched |= i == PIT_INDEX;
                self.com1_only = i == COM1_INDEX;
                return self.devices[i].1.write(port, offset, size, value, &now_ns);
            }
        }
        self.com1_only = false;
        if self.claims_access(port, size) {
            self.pci().write_address(value);
            return PortEffect::Done(0);
        }
        self.timers_touched = true;
        let mut effect = PortEffect::Unbacked;
        for lane in 0..size.min(4) {
            let lane_port = port.wrapping_add(lane.into());
            if let Some((i, offset)) = self.pio.find(lane_port.into()) {
                let (decoded, asked) =
                    self.devices[i].1.write_byte(lane_port, offset, (value >> (8 * lane)) as u8, &now_ns);
                if decoded && !matches!(effect, PortEffect::PowerOff | PortEffect::Reset) {
                    effect = asked;
                }
            }
        }
        effect
    }

    /// A port access carried out by one device whose registers reach no
    /// other device, vCPU or host state: COM1, the CMOS clock, and reads of
    /// the ACPI PM block (the PM timer; its writes can power off or reset).
    /// What a vCPU running beside its siblings may do under the VM's
    /// device lock while the interrupt controllers are the siblings'
    /// (`manager::rounds`). `write`: the value an `out` writes; `None` for
    /// an `in`. Returns `None`, having touched nothing, for any other
    /// access (another device, one across devices, no device), which the
    /// caller leaves to [`Self::pio_read`] / [`Self::pio_write`] with the
    /// whole VM. Touches `devices` only, never `lapics`: the caller may
    /// hold the APICs elsewhere.
    pub fn pio_alone(&mut self, port: u16, size: u8, write: Option<u32>, now_ns: impl Fn() -> u64) -> Option<Alone> {
        let (i, offset, rest) = self.pio.find_with_rest(port.into())?;
        let alone = match self.devices[i].1 {
            Device::Uart(_) | Device::Rtc(_) => true,
            Device::AcpiPm(_) => write.is_none(),
            _ => false,
        };
        if !alone || u64::from(size) > rest || !matches!(size, 1 | 2 | 4) {
            return None;
        }
        let now = once(now_ns);
        let now_ns = || now();
        let value = match write {
            Some(v) => {
                // Neither device asks anything of the platform on a write.
                let _ = self.devices[i].1.write(port, offset, size, v, &now_ns);
                0
            }
            None => self.devices[i].1.read(port, offset, size, &now_ns),
        };
        // COM1 drives IRQ 4; the others no line (the PM block's SCI is
        // not wired, and its writes are not taken here).
        let line_moved = i == COM1_INDEX && self.com1().irq() != self.com1_level;
        Some(Alone { value, line_moved })
    }

    /// The VM's machine-check banks.
    pub fn mca(&mut self) -> &mut VirtualMca {
        &mut self.mca
    }

    /// Every device's state.
    pub fn save(&self) -> Vec<SavedDevice> {
        self.devices
            .iter()
            .filter_map(|(name, d)| match d {
                Device::Uart(u) => Some(persist::save(name, u)),
                Device::Rtc(r) => Some(persist::save(name, r)),
                Device::Pic(p) => Some(persist::save(name, p)),
                Device::Pit(t) => Some(persist::save(name, t)),
                Device::AcpiPm(pm) => Some(persist::save(name, pm)),
                Device::Pci(p) => Some(persist::save(name, p)),
                Device::FwCfg(f) => Some(persist::save(name, f)),
                // Stateless: nothing to carry.
                Device::DebugExit => None,
            })
            .chain(self.lapics.iter().zip(LAPIC_NAMES).map(|(l, name)| persist::save(name, l)))
            .chain([persist::save(IOAPIC_NAME, &self.ioapic), persist::save(MCA_NAME, &self.mca)])
            .chain(self.save_virtio())
            .collect()
    }

    /// Restore every device from `saved`: all of it is decoded and checked
    /// first, then applied, so on error nothing changed. Call
    /// [`Self::update_lines`] with the VM's clock afterwards: it finds the
    /// restored timers' next deadline.
    pub fn restore(&mut self, saved: &[SavedDevice]) -> Result<(), RestoreError> {
        for (k, s) in saved.iter().enumerate() {
            if saved[..k].iter().any(|o| o.name == s.name) {
                return Err(RestoreError::Duplicate(s.name.clone()));
            }
            let lapic = LAPIC_NAMES[..self.lapics.len()].contains(&s.name.as_str());
            let controller = lapic || s.name == IOAPIC_NAME || s.name == MCA_NAME || self.has_virtio(&s.name);
            if !controller && !self.devices.iter().any(|(name, d)| *name == s.name && !matches!(d, Device::DebugExit)) {
                return Err(RestoreError::UnknownDevice(s.name.clone()));
            }
        }
        let mut states = Vec::with_capacity(self.devices.len());
        for (name, d) in &self.devices {
            let find = || saved.iter().find(|s| s.name == *name).ok_or(RestoreError::MissingDevice(name));
            states.push(match d {
                Device::Uart(_) => Some(Decoded::Uart(persist::decode::<Uart>(name, find()?)?)),
                Device::Rtc(_) => Some(Decoded::Rtc(persist::decode::<Rtc>(name, find()?)?)),
                Device::Pic(_) => Some(Decoded::Pic(persist::decode::<Pic>(name, find()?)?)),
                Device::Pit(_) => Some(Decoded::Pit(persist::decode::<Pit>(name, find()?)?)),
                Device::AcpiPm(_) => Some(Decoded::AcpiPm(persist::decode::<AcpiPm>(name, find()?)?)),
                Device::Pci(_) => Some(Decoded::Pci(persist::decode::<PciHost>(name, find()?)?)),
                Device::FwCfg(_) => Some(Decoded::FwCfg(persist::decode::<FwCfg>(name, find()?)?)),
                Device::DebugExit => None,
            });
        }
        let find = |name: &'static str| saved.iter().find(|s| s.name == name).ok_or(RestoreError::MissingDevice(name));
        // One local APIC per vCPU, each with its own ID: the destinations
        // of IPIs and interrupts are matched against it, and vCPU `i`'s
        // APIC is the one with ID `i`.
        let mut lapics = Vec::with_capacity(self.lapics.len());
        for (i, name) in LAPIC_NAMES.into_iter().enumerate().take(self.lapics.len()) {
            let state = persist::decode::<Lapic>(name, find(name)?)?;
            if state.id != i as u32 {
                return Err(RestoreError::Invalid { device: name, why: "the APIC ID is not its vCPU's index" });
            }
            lapics.push(state);
        }
        let ioapic = persist::decode::<IoApic>(IOAPIC_NAME, find(IOAPIC_NAME)?)?;
        // Streams from before the banks were modelled have none: fresh
        // banks, as at power-on.
        let mca = match saved.iter().find(|s| s.name == MCA_NAME) {
            Some(s) => persist::decode::<VirtualMca>(MCA_NAME, s)?,
            None => VmceState::default(),
        };
        let virtio = self.decode_virtio(saved)?;
        for ((_, d), state) in self.devices.iter_mut().zip(states) {
            match (d, state) {
                (Device::Uart(u), Some(Decoded::Uart(s))) => u.restore(s),
                (Device::Rtc(r), Some(Decoded::Rtc(s))) => r.restore(s),
                (Device::Pic(p), Some(Decoded::Pic(s))) => p.restore(s),
                (Device::Pit(t), Some(Decoded::Pit(s))) => t.restore(s),
                (Device::AcpiPm(pm), Some(Decoded::AcpiPm(s))) => pm.restore(s),
                (Device::Pci(p), Some(Decoded::Pci(s))) => p.restore(s),
                (Device::FwCfg(f), Some(Decoded::FwCfg(s))) => f.restore(s),
                // Decoded above from this very list, so kinds match.
                _ => {}
            }
        }
        for (l, state) in self.lapics.iter_mut().zip(lapics) {
            l.restore(state);
        }
        // IPIs not yet acted on travel with the vCPUs' scheduling state
        // (`set_signals`); none is left from before.
        self.signals.iter_mut().for_each(|s| *s = Signals::default());
        self.signalled = 0;
        self.kicked = 0;
        self.set_current(0);
        self.ioapic.restore(ioapic);
        self.mca.restore(mca);
        self.restore_virtio(virtio);
        // The timers and controllers were replaced wholesale: the next
        // `update_lines` (the caller's, with the clock) looks at the timers
        // again, and COM1's line is where the restored PIC has it.
        self.next_timer_ns = None;
        self.timers_touched = true;
        self.com1_level = self.com1().irq();
        self.refresh_intr();
        Ok(())
    }
}

/// All-ones for reads of ports no device decodes, as on a PC bus.
pub fn unbacked_read(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    }
}

/// The exit status for a value written to [`EXIT_PORT`].
pub fn exit_status(value: u32) -> u32 {
    (value << 1) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_reach_their_devices() {
        let mut set = DeviceSet::pc(0, 16 << 20);
        set.pio_write(COM1_BASE + 7, 1, 0x5a, || 0);
        assert_eq!(set.pio_read(COM1_BASE + 7, 1, || 0), PortEffect::Done(0x5a));
        assert_eq!(set.pio_read(COM1_BASE + 7, 2, || 0), PortEffect::Done(0xff5a), "the lane past COM1 is unbacked");
        // A 16-bit access reads two byte registers: LCR (3) and MCR (4).
        set.pio_write(COM1_BASE + 3, 2, 0x0b03, || 0);
        assert_eq!(set.pio_read(COM1_BASE + 3, 2, || 0), PortEffect::Done(0x0b03));
        assert_eq!(set.pio_read(COM1_BASE - 1, 1, || 0), PortEffect::Unbacked);
        assert_eq!(set.pio_write(EXIT_PORT, 1, 3, || 0), PortEffect::Exit(7));
        assert_eq!(set.pio_read(EXIT_PORT, 1, || 0), PortEffect::Unbacked);
        assert_eq!(set.pio_read(0x80, 1, || 0), PortEffect::Unbacked);
        for b in b"hi\n" {
            set.pio_write(COM1_BASE, 1, u32::from(*b), || 0);
        }
        assert_eq!(set.com1().take_lines(), ["hi"]);
        assert_eq!(set.com1_bytes_out(), 3);
        // The RTC's seconds through 0x70/0x71, on the VM's clock.
        set.pio_write(RTC_BASE, 1, 0x00, || 0);
        assert_eq!(set.pio_read(RTC_BASE + 1, 1, || 42_000_000_000), PortEffect::Done(0x42));
        // Linux's 8259A probe: the IMRs keep what is written.
        set.pio_write(0x21, 1, 0xfb, || 0);
        set.pio_write(0xa1, 1, 0xff, || 0);
        assert_eq!(set.pio_read(0x21, 1, || 0), PortEffect::Done(0xfb));
        assert_eq!(set.pio_read(0xa1, 1, || 0), PortEffect::Done(0xff));
        // PIT counter 2, gated through port 0x61, counts down in mode 0 and
        // raises its output (port 0x61 bit 5) when done, as Linux's TSC
        // calibration polls it.
        set.pio_write(0x61, 1, 0x01, || 0);
        set.pio_write(0x43, 1, 0xb0, || 0);
        set.pio_write(0x42, 1, 0x9b, || 0);
        set.pio_write(0x42, 1, 0x2e, || 0); // 11931 ticks: 10 ms
        let out2 = |set: &mut DeviceSet, t: u64| match set.pio_read(0x61, 1, || t) {
            PortEffect::Done(v) => v & 0x20 != 0,
            other => panic!("{other:?}"),
        };
        assert!(!out2(&mut set, 9_000_000));
        assert!(out2(&mut set, 10_100_000));
        // ACPI: the PM timer as one 32-bit read, soft-off as one 16-bit
        // write of SLP_TYP | SLP_EN, a reset through 0xcf9.
        use crate::firmware::acpi::{PM_TMR, PM1A_CNT, RESET_PORT};
        assert_eq!(set.pio_read(PM_TMR, 4, || 2_000_000_000), PortEffect::Done(7_159_090));
        assert_eq!(set.pio_write(PM1A_CNT, 2, 1 << 13, || 0), PortEffect::PowerOff);
        assert_eq!(set.pio_write(RESET_PORT, 1, 0x06, || 0), PortEffect::Reset);
    }

    #[test]
    fn pci_configuration_mechanism_1_through_the_ports() {
        use crate::firmware::acpi::RESET_PORT;
        use pci::{CONFIG_ADDRESS, CONFIG_DATA};
        let mut set = DeviceSet::pc(0, 16 << 20);
        // Linux's pci_check_type1: a byte write to 0xcfb, then a dword
        // 0x80000000 to 0xcf8 that reads back.
        assert_eq!(set.pio_write(CONFIG_ADDRESS + 3, 1, 0x01, || 0), PortEffect::Unbacked);
        assert_eq!(set.pio_read(CONFIG_ADDRESS, 4, || 0), PortEffect::Done(0));
        assert_eq!(set.pio_write(CONFIG_ADDRESS, 4, 0x8000_0000, || 0), PortEffect::Done(0));
        assert_eq!(set.pio_read(CONFIG_ADDRESS, 4, || 0), PortEffect::Done(0x8000_0000));
        assert!(set.claims_access(CONFIG_ADDRESS, 4) && !set.decodes_port(CONFIG_ADDRESS));
        assert_eq!(set.pio_read(CONFIG_DATA, 4, || 0), PortEffect::Done(0x1237_8086), "the 440FX at 00:00.0");
        // Linux's pci_check_type2: byte accesses to 0xcf8-0xcfb are not
        // CONFIG_ADDRESS; they reach no device (and the latch is kept).
        assert_eq!(set.pio_write(CONFIG_ADDRESS, 1, 0x00, || 0), PortEffect::Unbacked);
        assert_eq!(set.pio_write(CONFIG_ADDRESS + 2, 1, 0x00, || 0), PortEffect::Unbacked);
        assert_eq!(set.pio_read(CONFIG_ADDRESS, 1, || 0), PortEffect::Unbacked);
        assert_eq!(set.pio_read(CONFIG_ADDRESS + 2, 2, || 0), PortEffect::Unbacked);
        assert_eq!(set.pio_read(CONFIG_ADDRESS, 4, || 0), PortEffect::Done(0x8000_0000));
        // A word at 0xcf8 is two byte lanes: the second is the reset
        // control register, which keeps what is written.
        assert_eq!(set.pio_write(CONFIG_ADDRESS, 2, 0x0200, || 0), PortEffect::Done(0));
        assert_eq!(set.pio_read(RESET_PORT, 1, || 0), PortEffect::Done(0x02));
        assert_eq!(set.pio_read(CONFIG_ADDRESS, 2, || 0), PortEffect::Done(0x02ff));
        // A dword at 0xcf8 never reaches the reset register, whatever its
        // second byte (function 4 of device 0 puts bit 2 there).
        assert_eq!(set.pio_write(CONFIG_ADDRESS, 4, 0x8000_0400, || 0), PortEffect::Done(0));
        assert_eq!(set.pio_read(RESET_PORT, 1, || 0), PortEffect::Done(0x02));
        assert_eq!(set.pio_read(CONFIG_DATA, 4, || 0), PortEffect::Done(0xffff_ffff), "00:00.4: no device");
        // Sub-dword CONFIG_DATA accesses: the class word at 0x0a, the
        // command byte at 0x04.
        set.pio_write(CONFIG_ADDRESS, 4, 0x8000_0008, || 0);
        assert_eq!(set.pio_read(CONFIG_DATA + 2, 2, || 0), PortEffect::Done(0x0600));
        assert_eq!(set.pio_read(CONFIG_DATA + 3, 1, || 0), PortEffect::Done(0x06));
        set.pio_write(CONFIG_ADDRESS, 4, 0x8000_0004, || 0);
        set.pio_write(CONFIG_DATA + 1, 1, 0x01, || 0);
        assert_eq!(set.pio_read(CONFIG_DATA, 2, || 0), PortEffect::Done(0x0106));
        // Enable clear: CONFIG_DATA is nothing's.
        set.pio_write(CONFIG_ADDRESS, 4, 0x0000_0004, || 0);
        set.pio_write(CONFIG_DATA, 2, 0, || 0);
        assert_eq!(set.pio_read(CONFIG_DATA, 4, || 0), PortEffect::Done(0xffff_ffff));
        set.pio_write(CONFIG_ADDRESS, 4, 0x8000_0004, || 0);
        assert_eq!(set.pio_read(CONFIG_DATA, 2, || 0), PortEffect::Done(0x0106), "the disabled write went nowhere");
    }

    #[test]
    fn fw_cfg_through_the_ports() {
        use fw_cfg::{DATA_PORT, SELECTOR_PORT, key};
        let mut set = DeviceSet::pc(0, 256 << 20);
        let item = |set: &mut DeviceSet, k: u16, n: usize| -> Vec<u8> {
            assert_eq!(set.pio_write(SELECTOR_PORT, 2, k.into(), || 0), PortEffect::Done(0));
            (0..n)
                .map(|_| match set.pio_read(DATA_PORT, 1, || 0) {
                    PortEffect::Done(v) => v as u8,
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(item(&mut set, key::SIGNATURE, 4), b"QEMU");
        assert_eq!(item(&mut set, key::RAM_SIZE, 8), (256u64 << 20).to_le_bytes());
        assert_eq!(item(&mut set, key::NB_CPUS, 2), [1, 0]);
        assert_eq!(item(&mut set, key::FILE_DIR, 4), [0; 4]);
        // A byte write to the selector is not a selection; a word read of
        // the data port is not two byte reads.
        item(&mut set, key::SIGNATURE, 1);
        set.pio_write(SELECTOR_PORT, 1, 0x03, || 0);
        assert_eq!(set.pio_read(SELECTOR_PORT, 2, || 0), PortEffect::Done(0xffff));
        assert_eq!(set.pio_read(DATA_PORT, 1, || 0), PortEffect::Done(u32::from(b'E')));
    }

    #[test]
    fn a_restore_is_all_or_nothing() {
        let mut a = DeviceSet::pc(0, 16 << 20);
        a.pio_write(COM1_BASE + 7, 1, 0x11, || 0);
        // The local APIC's TPR and an I/O APIC redirection entry.
        assert!(a.mmio_write(0xfee0_0080, 4, 0x20, 0));
        assert!(a.mmio_write(0xfec0_0000, 4, 0x12, 0));
        assert!(a.mmio_write(0xfec0_0010, 4, 0x31, 0));
        // The PCI host: SERR# enable in the bridge's command register and a
        // latched address; fw_cfg: two bytes into the signature.
        a.pio_write(pci::CONFIG_ADDRESS, 4, 0x8000_0004, || 0);
        a.pio_write(pci::CONFIG_DATA + 1, 1, 0x01, || 0);
        a.pio_write(pci::CONFIG_ADDRESS, 4, 0x8000_0008, || 0);
        a.pio_write(fw_cfg::SELECTOR_PORT, 2, fw_cfg::key::SIGNATURE.into(), || 0);
        a.pio_read(fw_cfg::DATA_PORT, 1, || 0);
        a.pio_read(fw_cfg::DATA_PORT, 1, || 0);
        let saved = a.save();
        let names: Vec<&str> = saved.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["com1", "rtc", "pic", "pit", "acpi-pm", "pci", "fw-cfg", "lapic0", "ioapic", "mca"],
            "all but the debug-exit port, which has no state"
        );
        let mut b = DeviceSet::pc(0, 16 << 20);
        // A stream from before the machine-check banks: fresh banks.
        b.mca().write_msr(crate::mca::bank_msr(0, 2), 0x1234).unwrap();
        b.restore(&saved[..9]).unwrap();
        assert_eq!(b.mca().read_msr(crate::mca::bank_msr(0, 2)), 0);
        b.restore(&saved).unwrap();
        assert_eq!(b.save(), saved, "a restored set saves what it was given");
        assert_eq!(b.pio_read(COM1_BASE + 7, 1, || 0), PortEffect::Done(0x11));
        assert_eq!(b.mmio_read(0xfee0_0080, 4, 0), Some(0x20));
        assert_eq!(b.mmio_read(0xfec0_0010, 4, 0), Some(0x31), "IOREGSEL and the entry came along");
        assert_eq!(b.pio_read(pci::CONFIG_ADDRESS, 4, || 0), PortEffect::Done(0x8000_0008));
        b.pio_write(pci::CONFIG_ADDRESS, 4, 0x8000_0004, || 0);
        assert_eq!(b.pio_read(pci::CONFIG_DATA, 2, || 0), PortEffect::Done(0x0106));
        assert_eq!(b.pio_read(fw_cfg::DATA_PORT, 1, || 0), PortEffect::Done(u32::from(b'M')));

        let before = b.save();
        let mut extra = saved.clone();
        extra.push(SavedDevice { name: "hpet".into(), version: 1, bytes: alloc::vec![] });
        assert_eq!(b.restore(&extra), Err(RestoreError::UnknownDevice("hpet".into())));
        let twice = [saved[0].clone(), saved[0].clone()];
        assert_eq!(b.restore(&twice), Err(RestoreError::Duplicate("com1".into())));
        assert_eq!(b.restore(&[]), Err(RestoreError::MissingDevice("com1")));
        let mut corrupt = saved.clone();
        corrupt[0].bytes[0] ^= 0xff;
        assert!(b.restore(&corrupt).is_err());
        // The new devices' refusals stop the whole restore too, though
        // every device before them decoded.
        let mut bad_pci = saved.clone();
        bad_pci[5].bytes = postcard::to_allocvec(&pci::PciState { config_address: 3, ..Default::default() }).unwrap();
        assert!(matches!(b.restore(&bad_pci), Err(RestoreError::Invalid { device: "pci", .. })));
        let mut bad_fw_cfg = saved.clone();
        bad_fw_cfg[6].bytes = postcard::to_allocvec(&fw_cfg::FwCfgState { selector: 0, offset: 5 }).unwrap();
        assert!(matches!(b.restore(&bad_fw_cfg), Err(RestoreError::Invalid { device: "fw-cfg", .. })));
        assert_eq!(b.restore(&saved[..6]), Err(RestoreError::MissingDevice("fw-cfg")));
        assert_eq!(b.save(), before, "a refused restore changed nothing");
    }

    #[test]
    fn the_pit_and_com1_raise_their_irqs_through_the_pic() {
        let mut set = DeviceSet::pc(0, 16 << 20);
        // Linux's 8259 init: vectors 0x30/0x38, cascade on IR2, all unmasked.
        crate::devices::init_pic_as_linux(&mut set, 0x00);
        for (port, v) in [(0xa0, 0x11), (0xa1, 0x38), (0xa1, 0x02), (0xa1, 0x01), (0xa1, 0x00)] {
            set.pio_write(port, 1, v, || 0);
        }
        // PIT counter 0, mode 2, 11932 ticks: a 10 ms tick.
        for (port, v) in [(0x43, 0x34), (0x40, 0x9c), (0x40, 0x2e)] {
            set.pio_write(port, 1, v, || 0);
        }
        set.update_lines(0);
        assert!(!set.interrupt_pending());
        let due = set.next_timer().expect("the PIT is armed");
        assert!((9_900_000..10_100_000).contains(&due), "{due}");
        set.poll_timers(due - 1);
        assert!(!set.interrupt_pending(), "not before it is due");
        set.poll_timers(due);
        assert!(set.interrupt_pending());
        assert_eq!(set.acknowledge_interrupt(), 0x30, "IRQ 0");
        set.pio_write(0x20, 1, 0x20, || due); // EOI
        assert!(set.next_timer().is_some_and(|t| t > due), "the next tick is armed");
        // COM1 with OUT2 and THRE enabled: IRQ 4 as a level.
        set.pio_write(COM1_BASE + 4, 1, 0x08, || due);
        set.pio_write(COM1_BASE + 1, 1, 0x02, || due);
        set.update_lines(due);
        assert!(set.interrupt_pending());
        assert_eq!(set.acknowledge_interrupt(), 0x34, "IRQ 4");
        // Reading IIR acknowledges THRE: the line drops.
        assert_eq!(set.pio_read(COM1_BASE + 2, 1, || due), PortEffect::Done(0x02));
        set.update_lines(due);
        set.pio_write(0x20, 1, 0x20, || due);
        assert!(!set.interrupt_pending());
    }

    #[test]
    fn a_port_access_alone_reaches_com1_the_clock_and_pm_timer_reads_and_says_when_a_line_moved() {
        use crate::firmware::acpi::{PM_TMR, PM1A_CNT};
        let mut set = DeviceSet::pc(0, 16 << 20);
        crate::devices::init_pic_as_linux(&mut set, 0x00);
        set.update_lines(0);
        // COM1's line status: transmitter empty, nothing moved.
        let lsr = set.pio_alone(COM1_BASE + 5, 1, None, || 0);
        assert_eq!(lsr, Some(Alone { value: 0x60, line_moved: false }));
        // Its scratch register, written then read back.
        assert_eq!(set.pio_alone(COM1_BASE + 7, 1, Some(0x5a), || 0), Some(Alone { value: 0, line_moved: false }));
        assert_eq!(set.pio_alone(COM1_BASE + 7, 1, None, || 0).map(|a| a.value), Some(0x5a));
        // Bytes out reach the console's lines as from `pio_write`.
        for &b in b"hi\n" {
            assert!(set.pio_alone(COM1_BASE, 1, Some(b.into()), || 0).is_some());
        }
        assert!(set.com1_has_output());
        assert_eq!(set.com1().take_lines(), ["hi"]);
        // The CMOS clock's index and data; the PM timer, read at 1 s.
        assert!(set.pio_alone(RTC_BASE, 1, Some(0x0a), || 0).is_some());
        assert!(set.pio_alone(RTC_BASE + 1, 1, None, || 0).is_some());
        let tmr = set.pio_alone(PM_TMR, 4, None, || 1_000_000_000).unwrap().value;
        assert_eq!(u64::from(tmr), acpi_pm::PM_TIMER_HZ & 0xff_ffff);
        // Not alone: a write to the PM block (it can power off), the PIC,
        // the PIT, PCI, fw_cfg, the debug-exit port, no device; nothing
        // of them moved.
        let before = set.save();
        for (port, write) in [
            (PM1A_CNT, Some(0x2000)),
            (0x21, None),
            (0x21, Some(0xff)),
            (0x40, None),
            (0x43, Some(0x34)),
            (pci::CONFIG_DATA, None),
            (fw_cfg::DATA_PORT, None),
            (EXIT_PORT, Some(1)),
            (0x3e8, None),
        ] {
            assert_eq!(set.pio_alone(port, 1, write, || 0), None, "port {port:#x}");
        }
        assert_eq!(set.pio_alone(COM1_BASE + 7, 3, None, || 0), None, "not a width the CPU reports");
        assert_eq!(set.save(), before, "refused accesses touched nothing");
        // OUT2 and THRE enabled: COM1's IRQ 4 rises, which the caller must
        // hand to the controllers.
        assert_eq!(set.pio_alone(COM1_BASE + 4, 1, Some(0x08), || 0).map(|a| a.line_moved), Some(false));
        assert_eq!(set.pio_alone(COM1_BASE + 1, 1, Some(0x02), || 0).map(|a| a.line_moved), Some(true));
        assert!(!set.interrupt_pending(), "not before the lines are updated");
        set.update_lines(0);
        assert!(set.interrupt_pending());
        assert_eq!(set.acknowledge_interrupt(), 0x34, "IRQ 4");
    }

    #[test]
    fn com1s_line_is_carried_alone_only_to_fixed_edge_interrupts_and_a_refusal_changes_nothing() {
        let mut set = DeviceSet::pc_smp(0, 16 << 20, 2);
        let routes: Vec<lapic::Route> = set.routes().collect();
        // The PIC initialised and masked; OUT2 on.
        crate::devices::init_pic_as_linux(&mut set, 0xff);
        set.pio_write(COM1_BASE + 4, 1, 0x08, || 0);
        set.update_lines(0);
        let pin4 = |set: &mut DeviceSet, low: u64, high: u64| {
            for (reg, value) in [(0x18, low), (0x19, high)] {
                assert!(set.mmio_write(0xfec0_0000, 4, reg, 0));
                assert!(set.mmio_write(0xfec0_0010, 4, value, 0));
            }
        };
        let mut posted = Vec::new();
        // Level-triggered (bit 15): refused, nothing changed.
        pin4(&mut set, 0x8024, 1 << 24);
        assert!(set.pio_alone(COM1_BASE + 1, 1, Some(0x02), || 0).unwrap().line_moved);
        let before = set.save();
        assert!(!set.com1_line_alone(&routes, |v, vector| posted.push((v, vector))));
        assert!(posted.is_empty());
        assert_eq!(set.save(), before);
        // Edge-triggered, fixed, to APIC ID 1: posted to vCPU 1.
        pin4(&mut set, 0x24, 1 << 24);
        assert!(set.com1_line_alone(&routes, |v, vector| posted.push((v, vector))));
        assert_eq!(posted, [(1, 0x24)]);
        set.update_lines(0);
        assert!(!set.interrupt_pending_for(1), "posted, not put in its APIC here, nor sent again");
        // The line falls: nothing to send.
        assert!(set.pio_alone(COM1_BASE + 1, 1, Some(0x00), || 0).unwrap().line_moved);
        assert!(set.com1_line_alone(&routes, |v, vector| posted.push((v, vector))));
        assert_eq!(posted.len(), 1);
        // With the PIC's IRQ 4 unmasked, a rise would raise its INTR
        // (vCPU 0's ExtINT): refused, nothing changed.
        let mut set = DeviceSet::pc_smp(0, 16 << 20, 2);
        crate::devices::init_pic_as_linux(&mut set, 0xef);
        set.pio_write(COM1_BASE + 4, 1, 0x08, || 0);
        set.update_lines(0);
        assert!(set.pio_alone(COM1_BASE + 1, 1, Some(0x02), || 0).unwrap().line_moved);
        let before = set.save();
        assert!(!set.com1_line_alone(&routes, |v, vector| posted.push((v, vector))));
        assert_eq!(set.save(), before);
        assert_eq!(posted.len(), 1);
        set.update_lines(0);
        assert!(set.interrupt_pending_for(0), "the boot CPU's update raises it");
    }

    #[test]
    fn only_a_port_access_that_can_move_a_line_asks_for_the_lines_to_be_recomputed() {
        let mut set = DeviceSet::pc(0, 16 << 20);
        crate::devices::init_pic_as_linux(&mut set, 0x00);
        assert!(set.lines_may_have_changed(), "the PIC");
        set.update_lines(0);
        // COM1's scratch register, written and read: no line moves.
        set.pio_write(COM1_BASE + 7, 1, 0x5a, || 0);
        assert!(!set.lines_may_have_changed());
        assert_eq!(set.pio_read(COM1_BASE + 7, 1, || 0), PortEffect::Done(0x5a));
        assert!(!set.lines_may_have_changed());
        // A mask write, a PIT access: always.
        set.pio_write(0x21, 1, 0x00, || 0);
        assert!(set.lines_may_have_changed(), "the PIC's mask");
        set.update_lines(0);
        set.pio_write(0x43, 1, 0x34, || 0);
        assert!(set.lines_may_have_changed(), "the PIT");
        set.update_lines(0);
        // COM1 raising IRQ 4 (OUT2, then THRE enabled): its level moved.
        set.pio_write(COM1_BASE + 4, 1, 0x08, || 0);
        set.update_lines(0);
        set.pio_write(COM1_BASE + 1, 1, 0x02, || 0);
        assert!(set.lines_may_have_changed(), "IRQ 4 went up");
        set.update_lines(0);
        assert!(set.interrupt_pending());
        assert_eq!(set.acknowledge_interrupt(), 0x34, "IRQ 4");
        // Its line stays up while the scratch register is used again.
        set.pio_write(COM1_BASE + 7, 1, 0x33, || 0);
        assert!(!set.lines_may_have_changed());
    }

    /// A 10 ms PIT tick into a PIC at vectors 0x30/0x38; returns when the
    /// first tick is due.
    fn ticking_pc() -> (DeviceSet, u64) {
        let mut set = DeviceSet::pc(0, 16 << 20);
        crate::devices::init_pic_as_linux(&mut set, 0x00);
        for (port, v) in [(0x43, 0x34), (0x40, 0x9c), (0x40, 0x2e)] {
            set.pio_write(port, 1, v, || 0);
        }
        set.update_lines(0);
        let due = set.next_timer().expect("the PIT is armed");
        (set, due)
    }

    /// Takes every IRQ 0 the set offers at `now`, EOI after each.
    fn take_ticks(set: &mut DeviceSet, now: u64) -> u32 {
        let mut n = 0;
        while set.interrupt_pending() {
            assert_eq!(set.acknowledge_interrupt(), 0x30);
            set.pio_write(0x20, 1, 0x20, || now);
            set.update_lines(now);
            n += 1;
        }
        n
    }

    #[test]
    fn ticks_a_guest_was_not_run_for_are_delivered_late_not_lost() {
        let (mut set, due) = ticking_pc();
        // Five periods pass before the VM runs again: five ticks, one per
        // acknowledge and EOI, as the guest's handler would take them.
        set.poll_timers(due * 5);
        assert_eq!(take_ticks(&mut set, due * 5), 5);
        assert_eq!(take_ticks(&mut set, due * 5), 0);
        // Three more while the last was still latched (not yet taken).
        set.poll_timers(due * 6);
        set.poll_timers(due * 8);
        assert_eq!(take_ticks(&mut set, due * 8), 3);
        // A VM that stood still for an hour is owed at most MAX_OWED_TICKS
        // (and the latched one).
        let hour = 3_600_000_000_000;
        set.poll_timers(hour);
        assert_eq!(take_ticks(&mut set, hour), pit::MAX_OWED_TICKS + 1);
        // Reprogramming counter 0 forgives what is owed.
        set.poll_timers(hour + due * 4);
        assert_eq!(set.acknowledge_interrupt(), 0x30);
        for (port, v) in [(0x43, 0x34), (0x40, 0x9c), (0x40, 0x2e)] {
            set.pio_write(port, 1, v, || hour + due * 4);
        }
        set.pio_write(0x20, 1, 0x20, || hour + due * 4);
        set.update_lines(hour + due * 4);
        assert_eq!(set.pit().owed_ticks(), 0);
        assert_eq!(take_ticks(&mut set, hour + due * 4), 1, "only the edge the PIC had latched");
    }

    #[test]
    fn the_pit_reaches_the_local_apic_through_the_io_apic() {
        let (mut set, due) = ticking_pc();
        // Linux with an I/O APIC: the PICs masked, LINT0 masked, IRQ 0 on
        // pin 2 as vector 0x30, fixed, physical destination APIC 0.
        set.pio_write(0x21, 1, 0xff, || 0);
        assert!(set.mmio_write(0xfee0_0350, 4, 1 << 16, 0));
        assert!(set.mmio_write(0xfec0_0000, 4, 0x10 + 2 * 2, 0));
        assert!(set.mmio_write(0xfec0_0010, 4, 0x30, 0));
        set.poll_timers(due);
        assert!(set.interrupt_pending());
        assert_eq!(set.acknowledge_interrupt(), 0x30);
        assert!(!set.interrupt_pending(), "in service, not requested again");
        // ISR bits 63:32 (vectors 0x20-0x3f) are at offset 0x110.
        assert_eq!(set.mmio_read(0xfee0_0110, 4, due), Some(1 << (0x30 - 0x20)), "ISR");
        // EOI through the local APIC.
        assert!(set.mmio_write(0xfee0_00b0, 4, 0, due));
        assert_eq!(set.mmio_read(0xfee0_0110, 4, due), Some(0));
        set.poll_timers(2 * due);
        assert_eq!(set.acknowledge_interrupt(), 0x30, "the next tick");
        // Narrow and unbacked accesses: bytes of a register, nothing claimed
        // outside the two pages.
        assert_eq!(set.mmio_read(0xfee0_0033, 1, 0), Some(0x00), "version register, top byte");
        assert_eq!(set.mmio_read(0xfee0_0030, 2, 0), Some(0x0014));
        assert!(!set.claims_mmio(0xfed0_0000));
        // The PCI host bridge through memory-mapped configuration space:
        // IDs at 00:00.0, nothing at 00:01.0 or on bus 1, no extended space.
        assert_eq!(set.mmio_read(pci::ECAM_BASE, 4, 0), Some(0x1237_8086));
        assert_eq!(set.mmio_read(pci::ECAM_BASE + 2, 2, 0), Some(0x1237));
        assert_eq!(set.mmio_read(pci::ECAM_BASE + (1 << 15), 4, 0), Some(0xffff_ffff));
        assert_eq!(set.mmio_read(pci::ECAM_BASE + 0x100, 4, 0), Some(0));
        assert!(!set.claims_mmio(pci::ECAM_BASE + pci::ECAM_SIZE), "bus 1 has no window");
        assert!(set.mmio_write(pci::ECAM_BASE + 4, 2, 0x0106 | 0x40, 0));
        assert_eq!(set.mmio_read(pci::ECAM_BASE + 4, 2, 0), Some(0x0146), "parity error response, as through 0xcfc");
        assert_eq!(set.mmio_read(0xfed0_0000, 4, 0), None);
    }

    #[test]
    fn local_apic_timers_fire_in_one_shot_and_tsc_deadline_modes() {
        let mut set = DeviceSet::pc(0, 16 << 20);
        // TSC at 2 GHz, guest TSC = host TSC + 1000.
        set.set_cpu(1000, 2_000_000_000, 39);
        set.pio_write(0x21, 1, 0xff, || 0);
        // One-shot, vector 0x40, divide by 1, 5000 counts of the 1 GHz bus.
        assert!(set.mmio_write(0xfee0_03e0, 4, 0b1011, 0));
        assert!(set.mmio_write(0xfee0_0320, 4, 0x40, 0));
        assert!(set.mmio_write(0xfee0_0380, 4, 5000, 0));
        assert_eq!(set.next_timer(), Some(5000));
        set.poll_timers(4999);
        assert!(!set.interrupt_pending());
        set.poll_timers(5000);
        assert_eq!(set.acknowledge_interrupt(), 0x40);
        assert!(set.mmio_write(0xfee0_00b0, 4, 0, 5000));
        assert_eq!(set.next_timer(), None, "one-shot: nothing more");
        // TSC-deadline mode, vector 0x41, deadline at guest TSC 1000 +
        // 20000 (10 us of host TSC after 0).
        assert!(set.mmio_write(0xfee0_0320, 4, 0x41 | (2 << 17), 5000));
        assert_eq!(set.lapic_write_msr(lapic::IA32_TSC_DEADLINE, 21_000, 5000), Some(Ok(())));
        assert_eq!(set.next_timer(), Some(10_000));
        set.poll_timers(10_000);
        assert_eq!(set.acknowledge_interrupt(), 0x41);
        assert_eq!(set.lapic_read_msr(lapic::IA32_TSC_DEADLINE, 10_000), Some(Ok(0)), "disarmed");
        assert_eq!(set.lapic_read_msr(0x10, 0), None, "not the APIC's");
        // IA32_APIC_BASE: relocating the page moves what MMIO reaches.
        assert_eq!(set.lapic_write_msr(lapic::IA32_APIC_BASE, 0xfed0_0000 | (1 << 11) | (1 << 8), 0), Some(Ok(())));
        assert!(set.claims_mmio(0xfed0_0030) && !set.claims_mmio(0xfee0_0030));
        assert_eq!(set.lapic_write_msr(lapic::IA32_APIC_BASE, 1 << 45, 0), Some(Err(lapic::Gp)), "past MAXPHYADDR");
        // x2APIC mode (CPUID offers it): the page is no longer decoded, the
        // registers are MSRs, and there is no way back to xAPIC mode.
        let x2apic = 0xfed0_0000 | (1 << 11) | (1 << 10) | (1 << 8);
        assert_eq!(set.lapic_write_msr(lapic::IA32_APIC_BASE, x2apic, 0), Some(Ok(())));
        assert!(!set.claims_mmio(0xfed0_0030));
        assert_eq!(set.lapic_read_msr(0x803, 0), Some(Ok(u64::from(lapic::VERSION))));
        assert_eq!(set.lapic_write_msr(lapic::IA32_APIC_BASE, x2apic & !(1 << 10), 0), Some(Err(lapic::Gp)));
    }

    #[test]
    fn a_wide_read_takes_one_clock_reading() {
        let mut set = DeviceSet::pc(0, 16 << 20);
        let reads = core::cell::Cell::new(0u64);
        // A clock that moves 1 ms per reading: byte lanes read at different
        // instants would mix counter values.
        let clock = || {
            reads.set(reads.get() + 1);
            reads.get() * 1_000_000
        };
        let PortEffect::Done(v) = set.pio_read(crate::firmware::acpi::PM_TMR, 4, clock) else { panic!() };
        assert_eq!(reads.get(), 1);
        assert_eq!(v, acpi_pm::AcpiPm::timer(1_000_000));
    }

    #[test]
    fn exit_status_follows_isa_debug_exit() {
        assert_eq!(exit_status(0), 1);
        assert_eq!(exit_status(1), 3);
        assert_eq!(exit_status(0x7f), 0xff);
        assert_eq!(unbacked_read(1), 0xff);
        assert_eq!(unbacked_read(4), 0xffff_ffff);
    }
}

/// The port-I/O dispatch alone, for instruction counts of the exit path's
/// device half: `valgrind --tool=callgrind` on this test (release build)
/// divided by its iterations.
#[cfg(test)]
mod hot_path {
    use super::*;

    #[test]
    #[ignore = "a measurement: run under callgrind"]
    fn pio_hot_loop() {
        let mut set = DeviceSet::pc(0, 16 << 20);
        let n: u32 = std::env::var("PIO_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
        let mut acc = 0u32;
        for i in 0..n {
            let _ = core::hint::black_box(&mut set).pio_write(COM1_BASE + 7, 1, i, || 0);
            if let PortEffect::Done(v) = core::hint::black_box(&mut set).pio_read(COM1_BASE + 7, 1, || 0) {
                acc = acc.wrapping_add(v);
            }
        }
        core::hint::black_box(acc);
    }
}
