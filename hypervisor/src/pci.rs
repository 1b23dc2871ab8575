//! PCI configuration space, the logic half: configuration mechanism #1
//! addresses, a scan of the buses that follows bridges, BAR decoding. The
//! port I/O is in the kernel's `platform::pci`. References are to the PCI
//! Local Bus Specification 3.0.

use alloc::vec::Vec;
use core::fmt;

/// A function's address: bus, device (0..32), function (0..8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for Bdf {
    /// The usual `segment:bus:device.function` form; segment 0 is the only
    /// one port I/O reaches.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0000:{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// The CONFIG_ADDRESS value (port 0xcf8) for the dword at `offset` of
/// `bdf`'s configuration space (3.2.2.3.2): enable bit, bus, device,
/// function, register number with bits 1:0 clear.
pub fn config_address(bdf: Bdf, offset: u8) -> u32 {
    1 << 31
        | u32::from(bdf.bus) << 16
        | u32::from(bdf.device & 0x1f) << 11
        | u32::from(bdf.function & 0x7) << 8
        | u32::from(offset & 0xfc)
}

/// Reads configuration space, one aligned dword at a time.
pub trait ConfigSpace {
    fn read32(&self, bdf: Bdf, offset: u8) -> u32;
}

/// Configuration header offsets used here (6.1).
pub mod reg {
    /// Vendor ID (15:0), device ID (31:16).
    pub const ID: u8 = 0x00;
    /// Revision (7:0), programming interface, subclass, class (31:24).
    pub const CLASS: u8 = 0x08;
    /// Header type in bits 23:16; bit 23 = multi-function device.
    pub const HEADER: u8 = 0x0c;
    /// The first of six BARs in a type-0 header.
    pub const BAR0: u8 = 0x10;
    /// Type-1 (bridge) header: primary, secondary, subordinate bus.
    pub const BUS_NUMBERS: u8 = 0x18;
}

/// One function found by [`scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    /// Header layout, without the multi-function bit (0 device, 1 bridge).
    pub header_type: u8,
}

fn function(cfg: &impl ConfigSpace, bdf: Bdf) -> Option<(Function, u8)> {
    let id = cfg.read32(bdf, reg::ID);
    let vendor = id as u16;
    // No function answers: the host bridge returns all ones (6.2.1).
    if vendor == 0xffff || vendor == 0 {
        return None;
    }
    let class = cfg.read32(bdf, reg::CLASS);
    let header = (cfg.read32(bdf, reg::HEADER) >> 16) as u8;
    let f = Function {
        bdf,
        vendor,
        device: (id >> 16) as u16,
        class: (class >> 24) as u8,
        subclass: (class >> 16) as u8,
        prog_if: (class >> 8) as u8,
        header_type: header & 0x7f,
    };
    Some((f, header))
}

/// Every function on bus 0 and on the buses behind its PCI-to-PCI bridges,
/// in bus, device, function order per bus. Each bus is scanned once, so a
/// bridge that names a bus already seen (a firmware bug) cannot loop.
pub fn scan(cfg: &impl ConfigSpace) -> Vec<Function> {
    let mut found = Vec::new();
    let mut seen = [false; 256];
    let mut pending = Vec::from([0u8]);
    seen[0] = true;
    while let Some(bus) = pending.pop() {
        for device in 0..32 {
            let Some((f0, header)) = function(cfg, Bdf { bus, device, function: 0 }) else { continue };
            let functions = if header & 0x80 != 0 { 8 } else { 1 };
            let mut here = Vec::from([f0]);
            here.extend((1..functions).filter_map(|function| function_at(cfg, Bdf { bus, device, function })));
            for f in here {
                if f.header_type == 1 {
                    let secondary = (cfg.read32(f.bdf, reg::BUS_NUMBERS) >> 8) as u8;
                    if !seen[secondary as usize] {
                        seen[secondary as usize] = true;
                        pending.push(secondary);
                    }
                }
                found.push(f);
            }
        }
    }
    found.sort_by_key(|f| f.bdf);
    found
}

fn function_at(cfg: &impl ConfigSpace, bdf: Bdf) -> Option<Function> {
    function(cfg, bdf).map(|(f, _)| f)
}

/// A decoded Base Address Register (6.2.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bar {
    /// I/O space at `port`.
    Io { port: u32 },
    /// Memory space at `addr`; a 64-bit BAR also uses the next slot.
    Mem { addr: u64, bits64: bool, prefetchable: bool },
}

/// Decodes a type-0 header's six BAR dwords (as read, not sized). A slot
/// that reads 0, the upper half of a 64-bit BAR, and a 64-bit BAR in the
/// last slot (no room for its upper half) are `None`.
pub fn decode_bars(raw: [u32; 6]) -> [Option<Bar>; 6] {
    let mut bars = [None; 6];
    let mut i = 0;
    while i < 6 {
        let v = raw[i];
        if v & 1 == 1 {
            bars[i] = (v & !0x3 != 0).then_some(Bar::Io { port: v & !0x3 });
            i += 1;
            continue;
        }
        let prefetchable = v & 0x8 != 0;
        match (v >> 1) & 0x3 {
            0b10 if i < 5 => {
                let addr = u64::from(v & !0xf) | u64::from(raw[i + 1]) << 32;
                bars[i] = (addr != 0).then_some(Bar::Mem { addr, bits64: true, prefetchable });
                i += 2;
            }
            0b00 => {
                let addr = u64::from(v & !0xf);
                bars[i] = (addr != 0).then_some(Bar::Mem { addr, bits64: false, prefetchable });
                i += 1;
            }
            _ => i += 1,
        }
    }
    bars
}

impl fmt::Display for Bar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Bar::Io { port } => write!(f, "io {port:#x}"),
            Bar::Mem { addr, bits64, prefetchable } => {
                write!(f, "mem{} {addr:#x}{}", if bits64 { "64" } else { "32" }, if prefetchable { " pf" } else { "" })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Configuration space as a map from (function, offset) to dword; all
    /// ones elsewhere, as an absent function reads.
    #[derive(Default)]
    struct FakeConfig(HashMap<(Bdf, u8), u32>);

    impl FakeConfig {
        fn add(&mut self, bdf: Bdf, vendor: u16, device: u16, class: u32, header: u8) {
            self.0.insert((bdf, reg::ID), u32::from(device) << 16 | u32::from(vendor));
            self.0.insert((bdf, reg::CLASS), class << 8);
            self.0.insert((bdf, reg::HEADER), u32::from(header) << 16);
        }
    }

    impl ConfigSpace for FakeConfig {
        fn read32(&self, bdf: Bdf, offset: u8) -> u32 {
            assert_eq!(offset % 4, 0);
            *self.0.get(&(bdf, offset)).unwrap_or(&!0)
        }
    }

    fn bdf(bus: u8, device: u8, function: u8) -> Bdf {
        Bdf { bus, device, function }
    }

    #[test]
    fn config_addresses_follow_mechanism_1() {
        assert_eq!(config_address(bdf(0, 3, 0), 0x10), 0x8000_1810);
        assert_eq!(config_address(bdf(0xff, 31, 7), 0xff), 0x80ff_fffc);
        assert_eq!(config_address(bdf(1, 0, 2), 0x3e), 0x8001_023c);
    }

    #[test]
    fn bdfs_print_with_segment_0() {
        assert_eq!(bdf(0, 3, 0).to_string(), "0000:00:03.0");
        assert_eq!(bdf(0x1a, 0x1f, 2).to_string(), "0000:1a:1f.2");
    }

    #[test]
    fn the_scan_finds_functions_and_follows_bridges_once() {
        let mut c = FakeConfig::default();
        c.add(bdf(0, 0, 0), 0x8086, 0x29c0, 0x06_00_00, 0); // host bridge
        c.add(bdf(0, 3, 0), 0x1af4, 0x1001, 0x01_00_00, 0); // virtio-blk
        // A multi-function device with functions 0 and 2.
        c.add(bdf(0, 0x1f, 0), 0x8086, 0x2918, 0x06_01_00, 0x80);
        c.add(bdf(0, 0x1f, 2), 0x8086, 0x2922, 0x01_06_01, 0);
        // Function 1 of a single-function device is not probed even if
        // something answers there.
        c.add(bdf(0, 3, 1), 0x1234, 0x5678, 0, 0);
        // A bridge to bus 1, which has a device and a bridge back to bus 0.
        c.add(bdf(0, 4, 0), 0x1b36, 0x000c, 0x06_04_00, 1);
        c.0.insert((bdf(0, 4, 0), reg::BUS_NUMBERS), 0x0001_0100);
        c.add(bdf(1, 0, 0), 0x1af4, 0x1042, 0x01_00_00, 0);
        c.add(bdf(1, 1, 0), 0x1b36, 0x000c, 0x06_04_00, 1);
        c.0.insert((bdf(1, 1, 0), reg::BUS_NUMBERS), 0x0000_0001);
        let found = scan(&c);
        let addrs: Vec<String> = found.iter().map(|f| f.bdf.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "0000:00:00.0",
                "0000:00:03.0",
                "0000:00:04.0",
                "0000:00:1f.0",
                "0000:00:1f.2",
                "0000:01:00.0",
                "0000:01:01.0"
            ]
        );
        let ahci = found.iter().find(|f| f.bdf == bdf(0, 0x1f, 2)).unwrap();
        assert_eq!((ahci.vendor, ahci.device, ahci.class, ahci.subclass, ahci.prog_if), (0x8086, 0x2922, 1, 6, 1));
        assert_eq!(found.iter().find(|f| f.bdf == bdf(0, 0x1f, 0)).unwrap().header_type, 0, "bit 7 stripped");
    }

    #[test]
    fn an_empty_bus_has_nothing() {
        assert!(scan(&FakeConfig::default()).is_empty());
    }

    #[test]
    fn bars_are_decoded() {
        let raw = [0xc041, 0xfebf_1000, 0, 0, 0x0000_000c, 0x0000_0008];
        let bars = decode_bars(raw);
        assert_eq!(bars[0], Some(Bar::Io { port: 0xc040 }));
        assert_eq!(bars[1], Some(Bar::Mem { addr: 0xfebf_1000, bits64: false, prefetchable: false }));
        assert_eq!(bars[2], None);
        assert_eq!(bars[3], None);
        assert_eq!(bars[4], Some(Bar::Mem { addr: 0x8_0000_0000, bits64: true, prefetchable: true }));
        assert_eq!(bars[5], None, "the upper half of BAR 4");
        assert_eq!(bars[4].unwrap().to_string(), "mem64 0x800000000 pf");
        assert_eq!(bars[0].unwrap().to_string(), "io 0xc040");
        // A 64-bit BAR cannot start in the last slot; type 01 is reserved.
        assert_eq!(decode_bars([0, 0, 0, 0, 0, 0xf000_0004]), [None; 6]);
        assert_eq!(decode_bars([0xf000_0002, 0, 0, 0, 0, 0]), [None; 6]);
    }
}
