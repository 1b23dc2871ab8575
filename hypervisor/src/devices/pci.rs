//! PCI configuration mechanism #1 (PCI Local Bus Specification 3.0,
//! 3.2.2.3.2) and bus 0 behind it, with the host bridge every PC has at
//! 00:00.0: an Intel 440FX (82441FX PMC), as on QEMU's `pc` machine, so
//! guests written for QEMU see what they expect.
//!
//! The guest writes an address to CONFIG_ADDRESS (0xcf8): enable bit 31,
//! bus (23:16), device (15:11), function (10:8) and a dword register
//! number (7:2). CONFIG_DATA (0xcfc-0xcff) then reaches that dword; each
//! byte of the port is a byte of the dword, so 8- and 16-bit accesses at
//! any offset inside it reach those bytes alone (Linux's
//! `pci_conf1_read/write` use `0xcfc + (reg & 3)`).
//!
//! The host bridge claims 0xcf8 only for a full dword: "any other types of
//! accesses to this address (non-DWORD) have no effect on CONFIG_ADDRESS
//! and are executed as normal I/O transactions" (3.2.2.3.2). So 0xcf8 is
//! not on the port bus at all: [`DeviceSet`](super::DeviceSet) hands a
//! dword at 0xcf8 to [`PciHost::read_address`]/[`PciHost::write_address`],
//! and byte or word accesses to 0xcf8-0xcfb go wherever their lanes decode:
//! nowhere, except 0xcf9, the reset control register (`acpi_pm`). Linux's
//! type-2 probe (a byte write to 0xcfb, byte reads of 0xcf8/0xcfa) thus
//! finds no type-2 mechanism, and its type-1 probe (a dword 0x80000000
//! written to 0xcf8 and read back) finds this one.
//!
//! Bus 0 holds [`PciFunction`]s by device and function number; only the
//! host bridge for now. A read of a function that does not exist, or of
//! any other bus (there are no PCI-to-PCI bridges), ends in a master abort
//! and returns all ones: vendor 0xffff, "no device" (6.2.1); writes to
//! them vanish. With the enable bit clear, CONFIG_DATA is an ordinary port
//! nothing decodes.

use alloc::vec;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use super::persist::{Invalid, Persist};

/// The CONFIG_ADDRESS port (a dword register).
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// The CONFIG_DATA ports: the four bytes of the selected dword.
pub const CONFIG_DATA: u16 = 0xcfc;
/// The memory-mapped configuration space (ECAM) of bus 0, for what Linux
/// calls MMCONFIG: in the PCI hole below 4 GiB (never RAM: see
/// `vm::boot::LOW_RAM_END`), 1 MiB for the one bus. The MCFG table names it
/// and the e820 map reserves it.
pub const ECAM_BASE: u64 = 0xe000_0000;
pub const ECAM_SIZE: u64 = 1 << 20;

/// CONFIG_ADDRESS's enable bit: CONFIG_DATA accesses become configuration
/// cycles.
const ENABLE: u32 = 1 << 31;
/// The bits CONFIG_ADDRESS keeps: enable, bus, device, function, register.
/// Bits 30:24 are reserved and 1:0 are read-only, both read 0
/// (3.2.2.3.2).
const ADDRESS_BITS: u32 = ENABLE | 0x00ff_fffc;

/// Configuration header offsets (6.1).
mod reg {
    pub const ID: u8 = 0x00;
    pub const COMMAND_STATUS: u8 = 0x04;
    pub const CLASS_REVISION: u8 = 0x08;
}

/// Command register bits (6.2.2).
pub mod command {
    pub const IO: u16 = 1 << 0;
    pub const MEMORY: u16 = 1 << 1;
    pub const BUS_MASTER: u16 = 1 << 2;
    pub const PARITY_ERROR_RESPONSE: u16 = 1 << 6;
    pub const SERR: u16 = 1 << 8;
}

/// A Base Address Register as a function with BARs keeps it (6.2.5.1):
/// the bits of a power-of-two sized, naturally aligned window, and the
/// read-only type bits below them.
///
/// Sizing: software writes all ones and reads back; the address bits below
/// the window's size are hardwired to 0, so the value read, with the type
/// bits masked off, is the two's complement of the size (`!(size - 1)`).
/// Then it writes the address it chose (or the original value back). A
/// function with no BAR in a slot hardwires the whole register to 0, which
/// reads back 0 after the all-ones write: "not implemented". The host
/// bridge has no BARs; `Bar` is here for the functions that will.
///
/// Memory BARs are 32-bit here (a 64-bit BAR is two registers, the upper
/// one fully writable when the window is below 4 GiB in size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// The window's size in bytes: a power of two, at least 16 for memory
    /// and 4 for I/O (the type bits must lie below it).
    size: u32,
    /// The read-only low bits: bit 0 (I/O space), or for memory bits 2:1
    /// (type 00: 32-bit) and bit 3 (prefetchable).
    kind: u32,
    /// What the guest wrote, masked to the window's address bits.
    address: u32,
}

impl Bar {
    /// An I/O BAR of `size` bytes (a power of two, 4 to 256: 6.2.5.1).
    pub fn io(size: u32) -> Self {
        debug_assert!(size.is_power_of_two() && (4..=256).contains(&size));
        Bar { size, kind: 1, address: 0 }
    }

    /// A 32-bit memory BAR of `size` bytes (a power of two, at least 16).
    pub fn memory32(size: u32, prefetchable: bool) -> Self {
        debug_assert!(size.is_power_of_two() && size >= 16);
        Bar { size, kind: if prefetchable { 1 << 3 } else { 0 }, address: 0 }
    }

    /// The register as the guest reads it.
    pub fn read(&self) -> u32 {
        self.address | self.kind
    }

    /// A configuration write of the bytes `byte_enables` selects.
    pub fn write(&mut self, value: u32, byte_enables: u8) {
        let merged = merge(self.read(), value, byte_enables);
        self.address = merged & !(self.size - 1);
    }

    /// Where the guest placed the window (0 until it has).
    pub fn address(&self) -> u32 {
        self.address
    }
}

/// `old` with the bytes `byte_enables` selects (bit n: byte n) taken from
/// `value`, as a configuration write cycle's byte enables select them.
fn merge(old: u32, value: u32, byte_enables: u8) -> u32 {
    let mask = (0..4).filter(|b| byte_enables & (1 << b) != 0).fold(0u32, |m, b| m | 0xff << (8 * b));
    (old & !mask) | (value & mask)
}

/// The 440FX host bridge's identity: Intel's 82441FX PMC, revision 2 (what
/// QEMU's `pc` machine reports).
pub const HOST_BRIDGE_VENDOR: u16 = 0x8086;
/// See [`HOST_BRIDGE_VENDOR`].
pub const HOST_BRIDGE_DEVICE: u16 = 0x1237;
const HOST_BRIDGE_REVISION: u8 = 0x02;
/// Class 06 (bridge), subclass 00 (host bridge), interface 00 (D.7).
const HOST_BRIDGE_CLASS: u32 = 0x06_00_00;
/// Command bits the host bridge hardwires to 1: it always forwards the
/// CPU's memory cycles to PCI and masters them there (the 82441FX's PCICMD
/// resets to 0006h with both read-only). It has no I/O space of its own.
const HOST_BRIDGE_COMMAND_FIXED: u16 = command::MEMORY | command::BUS_MASTER;
/// Command bits the guest may set: parity error response and SERR#
/// enable, the two a host bridge implements (6.2.2). Both reset to 0.
const HOST_BRIDGE_COMMAND_WRITABLE: u16 = command::PARITY_ERROR_RESPONSE | command::SERR;
/// Status (6.2.3): fast back-to-back capable, medium DEVSEL timing. The
/// error bits (write one to clear) are never set: no cycle here fails with
/// a parity or system error. No capabilities list (bit 4 clear).
const HOST_BRIDGE_STATUS: u16 = 1 << 7 | 1 << 9;

/// The host bridge's writable registers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostBridgeState {
    /// The command register's writable bits (the fixed ones are not
    /// kept).
    pub command: u16,
}

/// The host bridge at 00:00.0: a type-0 header with no BARs, no interrupt
/// and no capabilities. Everything but two command bits is read-only; the
/// 82441FX's own registers past the header (DRAM control, PAM, SMRAM) are
/// not modelled and read 0.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostBridge {
    state: HostBridgeState,
}

impl HostBridge {
    fn read_config(&self, reg: u8) -> u32 {
        match reg {
            reg::ID => u32::from(HOST_BRIDGE_DEVICE) << 16 | u32::from(HOST_BRIDGE_VENDOR),
            reg::COMMAND_STATUS => {
                u32::from(HOST_BRIDGE_STATUS) << 16 | u32::from(HOST_BRIDGE_COMMAND_FIXED | self.state.command)
            }
            reg::CLASS_REVISION => HOST_BRIDGE_CLASS << 8 | u32::from(HOST_BRIDGE_REVISION),
            // Header type 0, single function; cache line size, latency
            // timer and BIST not implemented. BARs, subsystem IDs, the ROM
            // BAR, the capabilities pointer and the interrupt registers
            // are hardwired to 0.
            _ => 0,
        }
    }

    fn write_config(&mut self, reg: u8, value: u32, byte_enables: u8) {
        if reg == reg::COMMAND_STATUS {
            let command = merge(self.read_config(reg), value, byte_enables) as u16;
            self.state.command = command & HOST_BRIDGE_COMMAND_WRITABLE;
        }
    }
}

/// A function on bus 0: one variant per kind, dispatched by `match` as
/// [`Device`](super::Device) is. Each answers configuration reads and
/// writes of aligned dwords of its 256-byte space (the bus does the byte
/// lanes); a function with BARs keeps them as [`Bar`]s and decodes the
/// windows they place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PciFunction {
    /// The 440FX host bridge (00:00.0).
    HostBridge(HostBridge),
}

impl PciFunction {
    /// The dword at `reg` (a multiple of 4).
    pub fn read_config(&self, reg: u8) -> u32 {
        match self {
            PciFunction::HostBridge(h) => h.read_config(reg),
        }
    }

    /// A write to the dword at `reg` of the bytes of `value` that
    /// `byte_enables` selects (bit n: byte n). Read-only bits keep their
    /// value.
    pub fn write_config(&mut self, reg: u8, value: u32, byte_enables: u8) {
        match self {
            PciFunction::HostBridge(h) => h.write_config(reg, value, byte_enables),
        }
    }
}

/// The guest-visible state: the latched address and the host bridge's
/// writable registers. The functions themselves are configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciState {
    pub config_address: u32,
    pub host_bridge: HostBridgeState,
}

/// The configuration mechanism and bus 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciHost {
    config_address: u32,
    /// Bus 0's functions by device/function number (`device << 3 |
    /// function`); the host bridge first.
    functions: Vec<(u8, PciFunction)>,
}

impl Default for PciHost {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHost {
    /// The bus with the host bridge at 00:00.0 and CONFIG_ADDRESS clear.
    pub fn new() -> Self {
        PciHost { config_address: 0, functions: vec![(0, PciFunction::HostBridge(HostBridge::default()))] }
    }

    /// A dword read of CONFIG_ADDRESS.
    pub fn read_address(&self) -> u32 {
        self.config_address
    }

    /// A dword write of CONFIG_ADDRESS.
    pub fn write_address(&mut self, value: u32) {
        self.config_address = value & ADDRESS_BITS;
    }

    /// The function CONFIG_ADDRESS selects and the dword register, or
    /// `None` when nothing answers (another bus, an empty slot).
    fn selected(&mut self) -> Option<(&mut PciFunction, u8)> {
        let a = self.config_address;
        if (a >> 16) & 0xff != 0 {
            return None;
        }
        let devfn = (a >> 8) as u8;
        let function = self.functions.iter_mut().find(|(d, _)| *d == devfn).map(|(_, f)| f)?;
        Some((function, a as u8 & 0xfc))
    }

    /// A byte read of CONFIG_DATA + `lane` (0-3); `None` when the enable
    /// bit is clear (the port is then unbacked).
    pub fn read_data(&mut self, lane: u64) -> Option<u8> {
        if self.config_address & ENABLE == 0 {
            return None;
        }
        let shift = 8 * (lane & 3);
        // A master abort reads all ones.
        Some(self.selected().map_or(0xff, |(f, reg)| (f.read_config(reg) >> shift) as u8))
    }

    /// A byte write of CONFIG_DATA + `lane`; whether it was a
    /// configuration cycle (the enable bit was set).
    pub fn write_data(&mut self, lane: u64, value: u8) -> bool {
        if self.config_address & ENABLE == 0 {
            return false;
        }
        let lane = lane & 3;
        if let Some((f, reg)) = self.selected() {
            f.write_config(reg, u32::from(value) << (8 * lane), 1 << lane);
        }
        true
    }

    /// A read of `size` bytes (1, 2, 4; 8 as two dwords) at `offset` in the
    /// memory-mapped configuration space (PCI Express Base 4.0, 7.2.2:
    /// bus in bits 27:20, device 19:15, function 14:12, register 11:0).
    /// Nothing answers past bus 0 or in an empty slot: all ones. Bytes
    /// 0x100-0xfff of a conventional PCI function read 0 (no extended
    /// capabilities).
    pub fn ecam_read(&mut self, offset: u64, size: u8) -> u64 {
        let mut v = 0u64;
        for i in 0..u64::from(size.min(8)) {
            v |= u64::from(self.ecam_byte(offset + i)) << (8 * i);
        }
        v
    }

    fn ecam_byte(&mut self, offset: u64) -> u8 {
        let Some((function, reg)) = self.ecam_target(offset) else {
            return 0xff;
        };
        if reg >= 0x100 {
            return 0;
        }
        (function.read_config(reg as u8 & 0xfc) >> (8 * (reg & 3))) as u8
    }

    /// A write of the low `size` bytes of `value` at `offset` (as for
    /// [`Self::ecam_read`]); writes nothing answers vanish.
    pub fn ecam_write(&mut self, offset: u64, size: u8, value: u64) {
        for i in 0..u64::from(size.min(8)) {
            let Some((function, reg)) = self.ecam_target(offset + i) else { continue };
            if reg < 0x100 {
                let lane = reg & 3;
                let byte = (value >> (8 * i)) as u8;
                function.write_config(reg as u8 & 0xfc, u32::from(byte) << (8 * lane), 1 << lane);
            }
        }
    }

    fn ecam_target(&mut self, offset: u64) -> Option<(&mut PciFunction, u16)> {
        if offset >> 20 != 0 {
            return None;
        }
        let devfn = (offset >> 12) as u8;
        let function = self.functions.iter_mut().find(|(d, _)| *d == devfn).map(|(_, f)| f)?;
        Some((function, (offset & 0xfff) as u16))
    }

    fn host_bridge(&self) -> &HostBridge {
        // `new()` puts it first; nothing removes it. (With one kind of
        // function these patterns are irrefutable; a second kind makes the
        // compiler send whoever adds it here, and to the saved state.)
        let PciFunction::HostBridge(h) = &self.functions[0].1;
        h
    }

    fn host_bridge_mut(&mut self) -> &mut HostBridge {
        let PciFunction::HostBridge(h) = &mut self.functions[0].1;
        h
    }
}

impl Persist for PciHost {
    type State = PciState;
    const STATE_VERSION: u16 = 1;

    fn save(&self) -> PciState {
        PciState { config_address: self.config_address, host_bridge: self.host_bridge().state.clone() }
    }

    fn validate(s: &PciState) -> Result<(), Invalid> {
        if s.config_address & !ADDRESS_BITS != 0 {
            return Err(Invalid("CONFIG_ADDRESS has reserved or read-only bits set"));
        }
        if s.host_bridge.command & !HOST_BRIDGE_COMMAND_WRITABLE != 0 {
            return Err(Invalid("the host bridge's command register has bits it does not implement"));
        }
        Ok(())
    }

    fn restore(&mut self, state: PciState) {
        self.config_address = state.config_address;
        self.host_bridge_mut().state = state.host_bridge;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{Bdf, config_address};

    fn at(device: u8, function: u8) -> Bdf {
        Bdf { bus: 0, device, function }
    }

    /// A dword configuration read as Linux does it: CONFIG_ADDRESS, then
    /// four lanes of CONFIG_DATA.
    fn read32(p: &mut PciHost, bdf: Bdf, reg: u8) -> u32 {
        p.write_address(config_address(bdf, reg));
        (0..4).fold(0, |v, lane| v | u32::from(p.read_data(lane).unwrap()) << (8 * lane))
    }

    /// An access of `size` bytes at `reg` (any offset inside its dword).
    fn read(p: &mut PciHost, bdf: Bdf, reg: u8, size: u8) -> u32 {
        p.write_address(config_address(bdf, reg));
        let first = u64::from(reg & 3);
        (0..u64::from(size)).fold(0, |v, k| v | u32::from(p.read_data(first + k).unwrap()) << (8 * k))
    }

    fn write(p: &mut PciHost, bdf: Bdf, reg: u8, size: u8, value: u32) {
        p.write_address(config_address(bdf, reg));
        let first = u64::from(reg & 3);
        for k in 0..u64::from(size) {
            assert!(p.write_data(first + k, (value >> (8 * k)) as u8));
        }
    }

    #[test]
    fn config_address_keeps_enable_bus_device_function_register() {
        let mut p = PciHost::new();
        assert_eq!(p.read_address(), 0, "clear from reset");
        // Linux's pci_check_type1: 0x80000000 reads back as written.
        p.write_address(0x8000_0000);
        assert_eq!(p.read_address(), 0x8000_0000);
        p.write_address(0xffff_ffff);
        assert_eq!(p.read_address(), 0x80ff_fffc, "reserved bits 30:24 and bits 1:0 read 0");
        p.write_address(config_address(Bdf { bus: 3, device: 31, function: 7 }, 0xfc));
        assert_eq!(p.read_address(), 0x8003_fffc);
    }

    #[test]
    fn the_host_bridge_is_a_440fx() {
        let mut p = PciHost::new();
        let hb = at(0, 0);
        assert_eq!(read32(&mut p, hb, 0x00), 0x1237_8086);
        assert_eq!(read32(&mut p, hb, 0x04), 0x0280_0006, "status, command");
        assert_eq!(read32(&mut p, hb, 0x08), 0x0600_0002, "host bridge class, revision 2");
        assert_eq!(read32(&mut p, hb, 0x0c), 0, "header type 0, single function");
        for bar in (0x10..=0x24).step_by(4) {
            assert_eq!(read32(&mut p, hb, bar), 0, "BAR at {bar:#x}");
        }
        assert_eq!(read32(&mut p, hb, 0x34), 0, "no capabilities");
        assert_eq!(read32(&mut p, hb, 0x3c), 0, "no interrupt");
        // The scan the hypervisor runs on its own host finds it too.
        struct Cfg<'a>(core::cell::RefCell<&'a mut PciHost>);
        impl crate::pci::ConfigSpace for Cfg<'_> {
            fn read32(&self, bdf: Bdf, offset: u8) -> u32 {
                read32(&mut self.0.borrow_mut(), bdf, offset)
            }
        }
        let found = crate::pci::scan(&Cfg(core::cell::RefCell::new(&mut p)));
        assert_eq!(found.len(), 1);
        let f = found[0];
        assert_eq!((f.bdf, f.vendor, f.device, f.class, f.subclass, f.header_type), (hb, 0x8086, 0x1237, 6, 0, 0));
    }

    #[test]
    fn sub_dword_accesses_reach_their_bytes() {
        let mut p = PciHost::new();
        let hb = at(0, 0);
        // Linux's pci_sanity_check reads the class as a word at 0x0a.
        assert_eq!(read(&mut p, hb, 0x0a, 2), 0x0600);
        assert_eq!(read(&mut p, hb, 0x02, 2), 0x1237);
        assert_eq!(read(&mut p, hb, 0x00, 1), 0x86);
        assert_eq!(read(&mut p, hb, 0x01, 1), 0x80);
        assert_eq!(read(&mut p, hb, 0x0b, 1), 0x06);
        assert_eq!(read(&mut p, hb, 0x06, 2), 0x0280);
        assert_eq!(read(&mut p, hb, 0x07, 1), 0x02);
        // A byte write to the command register's high byte sets SERR#
        // enable and leaves the low byte alone.
        write(&mut p, hb, 0x05, 1, 0x01);
        assert_eq!(read(&mut p, hb, 0x04, 2), 0x0106);
        write(&mut p, hb, 0x04, 1, 0x40);
        assert_eq!(read(&mut p, hb, 0x04, 2), 0x0146);
    }

    #[test]
    fn the_host_bridge_is_read_only_but_for_two_command_bits() {
        let mut p = PciHost::new();
        let hb = at(0, 0);
        let before: Vec<u32> = (0..64).map(|r| read32(&mut p, hb, r * 4)).collect();
        for r in 0..64 {
            write(&mut p, hb, r * 4, 4, 0xffff_ffff);
        }
        for r in 0..64u8 {
            let want = if r == 1 { before[1] | 0x0140 } else { before[usize::from(r)] };
            assert_eq!(read32(&mut p, hb, r * 4), want, "register {:#x}", r * 4);
        }
        // Clearing: memory and bus master stay on, I/O stays off.
        write(&mut p, hb, 0x04, 2, 0);
        assert_eq!(read(&mut p, hb, 0x04, 2), 0x0006);
        // BAR sizing on the bridge: nothing implemented, reads back 0.
        write(&mut p, hb, 0x10, 4, 0xffff_ffff);
        assert_eq!(read32(&mut p, hb, 0x10), 0);
    }

    #[test]
    fn absent_functions_and_other_buses_read_all_ones_and_ignore_writes() {
        let mut p = PciHost::new();
        for bdf in [at(0, 1), at(1, 0), at(31, 7), Bdf { bus: 1, device: 0, function: 0 }] {
            assert_eq!(read32(&mut p, bdf, 0), 0xffff_ffff, "{bdf}");
            assert_eq!(read(&mut p, bdf, 0x0a, 2), 0xffff, "{bdf}");
            write(&mut p, bdf, 0x04, 4, 0x0000_0147);
        }
        assert_eq!(read32(&mut p, at(0, 0), 0x04), 0x0280_0006, "writes elsewhere did not reach the bridge");
    }

    #[test]
    fn with_the_enable_bit_clear_config_data_is_not_decoded() {
        let mut p = PciHost::new();
        p.write_address(config_address(at(0, 0), 0) & !ENABLE);
        assert_eq!(p.read_data(0), None);
        assert_eq!(p.read_data(3), None);
        assert!(!p.write_data(0, 0x40));
        p.write_address(config_address(at(0, 0), 4) & !ENABLE);
        assert!(!p.write_data(1, 0x01));
        assert_eq!(read(&mut p, at(0, 0), 0x04, 2), 0x0006, "the disabled write reached nothing");
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask() {
        let mut io = Bar::io(32);
        assert_eq!(io.read(), 0x1, "I/O space indicator");
        io.write(0xffff_ffff, 0xf);
        assert_eq!(io.read(), 0xffff_ffe1, "size 32: !(32 - 1), bit 0 read-only");
        io.write(0xc040, 0xf);
        assert_eq!((io.read(), io.address()), (0xc041, 0xc040));
        // Byte lanes: a byte write changes one byte of the address.
        io.write(0x0000_d000, 0b0010);
        assert_eq!(io.address(), 0xd040);
        let mut mem = Bar::memory32(0x4000, true);
        mem.write(0xffff_ffff, 0xf);
        assert_eq!(mem.read(), 0xffff_c008, "16 KiB, prefetchable, 32-bit");
        mem.write(0xfebf_c000, 0xf);
        assert_eq!(mem.address(), 0xfebf_c000);
        mem.write(0x1234_5678, 0);
        assert_eq!(mem.address(), 0xfebf_c000, "no byte enabled: no change");
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        use crate::devices::persist::{RestoreError, decode, save};
        let mut p = PciHost::new();
        write(&mut p, at(0, 0), 0x04, 2, 0x0140);
        p.write_address(config_address(at(0, 0), 0x08));
        let mut back = PciHost::new();
        back.restore(decode::<PciHost>("pci", &save("pci", &p)).unwrap());
        assert_eq!(back, p);
        assert_eq!(back.read_data(3), Some(0x06), "the latched address survives");
        for (state, why) in [
            (
                PciState { config_address: 0x8000_0001, ..PciState::default() },
                "CONFIG_ADDRESS has reserved or read-only bits set",
            ),
            (
                PciState { config_address: 0x4000_0000, ..PciState::default() },
                "CONFIG_ADDRESS has reserved or read-only bits set",
            ),
            (
                PciState { config_address: 0, host_bridge: HostBridgeState { command: command::IO } },
                "the host bridge's command register has bits it does not implement",
            ),
            (
                PciState { config_address: 0, host_bridge: HostBridgeState { command: command::MEMORY } },
                "the host bridge's command register has bits it does not implement",
            ),
        ] {
            let mut bad = save("pci", &p);
            bad.bytes = postcard::to_allocvec(&state).unwrap();
            assert_eq!(decode::<PciHost>("pci", &bad), Err(RestoreError::Invalid { device: "pci", why }));
        }
    }
}
