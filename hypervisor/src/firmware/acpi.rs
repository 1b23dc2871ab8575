//! The ACPI tables a guest reads (ACPI 6.5 chapter 5): an RSDP where a
//! legacy BIOS puts it (findable by scanning 0xE0000-0xFFFFF, 5.2.5.1), an
//! XSDT and RSDT, a FADT naming the fixed-hardware PM blocks the device
//! model emulates ([`AcpiPm`](crate::devices::acpi_pm)), a FACS, a DSDT
//! holding `\_S5` (soft-off) and the PCI root bridge, and, when the VM has
//! local APICs, a MADT.
//!
//! Built as bytes for a fixed guest-physical area: the VM layer copies them
//! into RAM that the e820 map reports as reserved, so the guest never
//! reuses it.

use alloc::vec;
use alloc::vec::Vec;

/// Where the tables live: the BIOS read-only area the e820 map reserves.
pub const AREA_BASE: u64 = 0xe_0000;
/// Bytes of that area the tables may use.
pub const AREA_LEN: u64 = 0x2_0000;

/// The ACPI PM register blocks (port I/O), as on QEMU's q35.
pub const PM_BASE: u16 = 0x600;
/// PM1a event block: status (2 bytes) then enable (2 bytes).
pub const PM1A_EVT: u16 = PM_BASE;
/// PM1a control block (2 bytes).
pub const PM1A_CNT: u16 = PM_BASE + 4;
/// The PM timer (4 bytes, 32-bit counter).
pub const PM_TMR: u16 = PM_BASE + 8;
/// The system control interrupt's ISA IRQ.
pub const SCI_IRQ: u8 = 9;
/// The reset register (the PC's "reset control" port) and the value that
/// resets the machine (a hard reset, CPU included).
pub const RESET_PORT: u16 = 0xcf9;
pub const RESET_VALUE: u8 = 0x06;
/// `\_S5`'s SLP_TYP (what the PM1 control block must see for soft-off).
pub const S5_SLP_TYP: u8 = 0;

const OEM_ID: &[u8; 6] = b"RUSTHV";
const OEM_TABLE_ID: &[u8; 8] = b"RUSTHVT1";
const CREATOR_ID: &[u8; 4] = b"RHV ";

/// What the guest's tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Local APIC ids of the vCPUs (the boot vCPU first). Empty: no MADT,
    /// the guest runs on the PICs alone.
    pub apic_ids: Vec<u8>,
    /// The I/O APIC's id and address, when there is one.
    pub ioapic: Option<(u8, u32)>,
    /// The local APICs' address.
    pub lapic_address: u32,
    /// The memory-mapped PCI configuration space of bus 0 (its base), for
    /// the MCFG table; `None`: no MCFG.
    pub ecam: Option<u64>,
    /// virtio-mmio devices for the DSDT (`devices::virtio::mmio::slot`
    /// gives the slots); empty: none.
    pub virtio_mmio: Vec<VirtioMmioSlot>,
}

/// A virtio-mmio device as the DSDT describes it: its register window (a
/// page below 4 GiB) and the I/O APIC input (GSI) it drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    pub base: u32,
    pub gsi: u32,
}

/// The tables, ready to copy to [`AREA_BASE`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tables {
    /// The bytes of the area from [`AREA_BASE`].
    pub bytes: Vec<u8>,
    /// Guest-physical address of the RSDP (within the area, 16-aligned).
    pub rsdp: u64,
}

/// The 36-byte header every system description table starts with (5.2.6).
fn header(signature: &[u8; 4], revision: u8, body_len: usize) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body_len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body_len) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, set by `finish`
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t
}

/// Make `bytes` sum to zero by setting the byte at `at`.
fn checksum(bytes: &mut [u8], at: usize) {
    bytes[at] = 0;
    let sum = bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b));
    bytes[at] = sum.wrapping_neg();
}

/// Fix a table's length field and checksum.
fn finish(mut t: Vec<u8>) -> Vec<u8> {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    checksum(&mut t, 9);
    t
}

/// A Generic Address Structure (5.2.3.2) for a port-I/O register of
/// `bits` bits accessed `access` bytes at a time.
fn gas_io(port: u16, bits: u8, access: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = bits;
    g[3] = access;
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// The FADT (5.2.9), revision 6: fixed-hardware PM blocks at [`PM_BASE`],
/// no SMI command port (the platform is in ACPI mode from reset: SCI_EN
/// reads 1), the reset register, a 32-bit PM timer, and no 8042 or VGA.
fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut t = header(b"FACP", 6, 276 - 36);
    t.resize(276, 0);
    t[36..40].copy_from_slice(&(facs as u32).to_le_bytes());
    t[40..44].copy_from_slice(&(dsdt as u32).to_le_bytes());
    t[45] = 4; // preferred PM profile: enterprise server
    t[46..48].copy_from_slice(&u16::from(SCI_IRQ).to_le_bytes());
    // SMI_CMD = 0: no SMM, ACPI enabled from reset (4.8.2.1).
    t[56..60].copy_from_slice(&u32::from(PM1A_EVT).to_le_bytes());
    t[64..68].copy_from_slice(&u32::from(PM1A_CNT).to_le_bytes());
    t[76..80].copy_from_slice(&u32::from(PM_TMR).to_le_bytes());
    t[88] = 4; // PM1_EVT_LEN
    t[89] = 2; // PM1_CNT_LEN
    t[91] = 4; // PM_TMR_LEN
    // C2 and C3 latencies above their limits: not supported (5.2.9).
    t[96..98].copy_from_slice(&101u16.to_le_bytes());
    t[98..100].copy_from_slice(&1001u16.to_le_bytes());
    t[108] = 0x32; // the RTC's century byte
    // IAPC_BOOT_ARCH (5.2.9.3): legacy devices present, no 8042, no VGA.
    t[109..111].copy_from_slice(&(1u16 | 1 << 2).to_le_bytes());
    // Flags (5.2.9, table 5.10): WBINVD, C1 on all processors, power and
    // sleep buttons not fixed features, 32-bit PM timer, reset register.
    let flags: u32 = 1 | 1 << 2 | 1 << 4 | 1 << 5 | 1 << 8 | 1 << 10;
    t[112..116].copy_from_slice(&flags.to_le_bytes());
    t[116..128].copy_from_slice(&gas_io(RESET_PORT, 8, 1));
    t[128] = RESET_VALUE;
    t[131] = 5; // FADT minor version (6.5)
    t[132..140].copy_from_slice(&facs.to_le_bytes());
    t[140..148].copy_from_slice(&dsdt.to_le_bytes());
    t[148..160].copy_from_slice(&gas_io(PM1A_EVT, 32, 2));
    t[172..184].copy_from_slice(&gas_io(PM1A_CNT, 16, 2));
    t[208..220].copy_from_slice(&gas_io(PM_TMR, 32, 3));
    t[268..276].copy_from_slice(b"RustyHV1");
    finish(t)
}

/// The FACS (5.2.10): 64 bytes, no waking vector, no global lock users.
fn facs() -> Vec<u8> {
    let mut t = vec![0u8; 64];
    t[0..4].copy_from_slice(b"FACS");
    t[4..8].copy_from_slice(&64u32.to_le_bytes());
    t[32] = 2; // version
    t
}

/// AML encodings (ACPI 6.5 20.2).
mod aml {
    pub const ZERO_OP: u8 = 0x00;
    pub const NAME_OP: u8 = 0x08;
    pub const BYTE_PREFIX: u8 = 0x0a;
    pub const DWORD_PREFIX: u8 = 0x0c;
    pub const STRING_PREFIX: u8 = 0x0d;
    pub const SCOPE_OP: u8 = 0x10;
    pub const BUFFER_OP: u8 = 0x11;
    pub const PACKAGE_OP: u8 = 0x12;
    pub const DEVICE_OP: [u8; 2] = [0x5b, 0x82];
}

/// `op`, a PkgLength (20.2.4) and `body`. The length counts its own bytes:
/// one byte up to 63, else a lead byte holding the low nibble and the
/// number of bytes that follow with the rest.
fn package(op: &[u8], body: &[u8]) -> Vec<u8> {
    let mut t = op.to_vec();
    if body.len() < 0x3f {
        t.push(body.len() as u8 + 1);
    } else {
        let extra = (1..=3).find(|&n| body.len() + 1 + n < 1 << (4 + 8 * n)).unwrap_or(3);
        let len = body.len() + 1 + extra;
        t.push((extra as u8) << 6 | (len & 0xf) as u8);
        t.extend((0..extra).map(|k| (len >> (4 + 8 * k)) as u8));
    }
    t.extend_from_slice(body);
    t
}

/// `Name (name, value)` for a value already encoded.
fn name(name: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut t = vec![aml::NAME_OP];
    t.extend_from_slice(name);
    t.extend_from_slice(value);
    t
}

/// A Word Address Space Descriptor (6.4.3.5.3) the bridge produces, fixed
/// at `min..=max`: resource type 1 (I/O, with `type_flags` 3: ISA and
/// non-ISA ranges) or 2 (bus numbers).
fn word_window(resource_type: u8, type_flags: u8, min: u16, max: u16) -> Vec<u8> {
    // Producer, positive decode, minimum and maximum fixed.
    let mut d = vec![0x88, 13, 0, resource_type, 0b1100, type_flags];
    for field in [0, min, max, 0, max - min + 1] {
        d.extend_from_slice(&field.to_le_bytes());
    }
    d
}

/// The PCI root bridge, `\_SB.PCI0` (PNP0A03): an ACPI guest enumerates
/// PCI only below the host bridges its namespace names (Linux scans no bus
/// on its own once ACPI is in use). Its `_CRS` gives bus number 0 (the one
/// bus there is, which the MCFG's configuration space covers: a wider range
/// makes Linux note the MCFG only partly covers the bridge) and the port
/// ranges it forwards: everything but the configuration ports
/// 0xcf8-0xcff. No memory window yet: no function has a BAR to place.
fn pci_root() -> Vec<u8> {
    use crate::devices::pci::{CONFIG_ADDRESS, CONFIG_DATA};
    let mut crs = word_window(2, 0, 0, 0);
    crs.extend(word_window(1, 3, 0, CONFIG_ADDRESS - 1));
    crs.extend(word_window(1, 3, CONFIG_DATA + 4, 0xffff));
    crs.extend_from_slice(&[0x79, 0]); // end tag, no checksum
    let mut buffer = vec![aml::BYTE_PREFIX, crs.len() as u8];
    buffer.extend_from_slice(&crs);
    // EISA ID "PNP0A03", compressed (6.1.5): 'P' 'N' 'P' in 5 bits each,
    // then the product number, big-endian.
    let hid = [aml::DWORD_PREFIX, 0x41, 0xd0, 0x0a, 0x03];
    let mut device = b"PCI0".to_vec();
    device.extend(name(b"_HID", &hid));
    device.extend(name(b"_UID", &[aml::ZERO_OP]));
    device.extend(name(b"_CRS", &package(&[aml::BUFFER_OP], &buffer)));
    let mut scope = b"\\_SB_".to_vec();
    scope.extend(package(&aml::DEVICE_OP, &device));
    package(&[aml::SCOPE_OP], &scope)
}

/// The `_HID` Linux's virtio_mmio driver matches (`virtio_mmio_acpi_match`
/// in drivers/virtio/virtio_mmio.c; the ID Linaro registered for it).
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// Bytes of a virtio-mmio register window the `_CRS` declares (control
/// registers and 256 bytes of configuration space, virtio 1.2 4.2.2).
pub const VIRTIO_MMIO_WINDOW: u32 = 0x200;

/// An integer as AML encodes it (20.2.3): ZeroOp, OneOp, or the smallest
/// prefixed form.
fn integer(v: u32) -> Vec<u8> {
    match v {
        0 => vec![aml::ZERO_OP],
        1 => vec![0x01], // OneOp
        2..=0xff => vec![aml::BYTE_PREFIX, v as u8],
        0x100..=0xffff => {
            let [a, b] = (v as u16).to_le_bytes();
            vec![0x0b, a, b] // WordPrefix
        }
        _ => {
            let mut t = vec![aml::DWORD_PREFIX];
            t.extend_from_slice(&v.to_le_bytes());
            t
        }
    }
}

/// `_CRS` of a virtio-mmio device: its register window and its interrupt.
fn virtio_mmio_crs(slot: &VirtioMmioSlot) -> Vec<u8> {
    // Memory32Fixed (ReadWrite, base, 0x200) (ASL 19.6; encoding: the
    // 32-Bit Fixed Memory Range Descriptor, 6.4.3.4): large item 0x86,
    // length 9, information bit 0 = read/write, base, length.
    let mut crs = vec![0x86, 9, 0, 1];
    crs.extend_from_slice(&slot.base.to_le_bytes());
    crs.extend_from_slice(&VIRTIO_MMIO_WINDOW.to_le_bytes());
    // Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive) { gsi }
    // (ASL 19.6; the Extended Interrupt Descriptor, 6.4.3.6): large item
    // 0x89, length 6, flags (bit 0 consumer; bit 1 clear: level; bit 2
    // clear: active-high; bit 3 clear: exclusive), one interrupt number.
    crs.extend_from_slice(&[0x89, 6, 0, 0b0001, 1]);
    crs.extend_from_slice(&slot.gsi.to_le_bytes());
    crs.extend_from_slice(&[0x79, 0]); // End Tag (6.4.2.9), no checksum
    crs
}

/// `Device (VRnn)` for the `n`th virtio-mmio device (nn in hex).
fn virtio_mmio_device(n: usize, slot: &VirtioMmioSlot) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let crs = virtio_mmio_crs(slot);
    let mut buffer = vec![aml::BYTE_PREFIX, crs.len() as u8];
    buffer.extend_from_slice(&crs);
    let mut hid = vec![aml::STRING_PREFIX];
    hid.extend_from_slice(VIRTIO_MMIO_HID.as_bytes());
    hid.push(0);
    let mut device = vec![b'V', b'R', HEX[(n >> 4) & 0xf], HEX[n & 0xf]];
    device.extend(name(b"_HID", &hid));
    device.extend(name(b"_UID", &integer(n as u32)));
    device.extend(name(b"_CRS", &package(&[aml::BUFFER_OP], &buffer)));
    package(&aml::DEVICE_OP, &device)
}

/// `Scope (\_SB) { Device (VR00) { ... } ... }` for `slots`; nothing for
/// none.
fn virtio_mmio_devices(slots: &[VirtioMmioSlot]) -> Vec<u8> {
    if slots.is_empty() {
        return Vec::new();
    }
    let mut scope = b"\\_SB_".to_vec();
    for (n, slot) in slots.iter().enumerate() {
        scope.extend(virtio_mmio_device(n, slot));
    }
    package(&[aml::SCOPE_OP], &scope)
}

/// The DSDT (5.2.11.1): `Name (_S5, Package () { 0, 0, 0, 0 })`, the
/// SLP_TYP values for soft-off (7.4.2), the PCI root bridge and the
/// virtio-mmio devices. AML encoded by hand (ACPI 6.5 20.2).
fn dsdt(config: &Config) -> Vec<u8> {
    debug_assert_eq!(S5_SLP_TYP, 0, "the AML encodes SLP_TYP 0");
    debug_assert!(config.virtio_mmio.len() <= 0x100, "VRnn names 256 devices");
    let s5 = package(&[aml::PACKAGE_OP], &[0x04, aml::ZERO_OP, aml::ZERO_OP, aml::ZERO_OP, aml::ZERO_OP]);
    let mut aml = name(b"_S5_", &s5);
    aml.extend(pci_root());
    aml.extend(virtio_mmio_devices(&config.virtio_mmio));
    let mut t = header(b"DSDT", 2, aml.len());
    t.extend_from_slice(&aml);
    finish(t)
}

/// The MADT (5.2.12): local APIC address, PC-AT compatible (the 8259s are
/// there, masked by an APIC-aware guest), one local APIC per vCPU, the I/O
/// APIC, ISA IRQ 0 overridden to GSI 2 (the PIT's line on an I/O APIC, as
/// on every PC), the SCI as level-triggered active-high, and LINT1 as NMI.
fn madt(config: &Config) -> Vec<u8> {
    let mut t = header(b"APIC", 5, 8);
    t.extend_from_slice(&config.lapic_address.to_le_bytes());
    t.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT
    for (uid, &id) in config.apic_ids.iter().enumerate() {
        t.extend_from_slice(&[0, 8, uid as u8, id]);
        t.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    if let Some((id, address)) = config.ioapic {
        t.extend_from_slice(&[1, 12, id, 0]);
        t.extend_from_slice(&address.to_le_bytes());
        t.extend_from_slice(&0u32.to_le_bytes()); // GSI base
        // Interrupt source overrides: bus 0 (ISA), source, GSI, flags.
        let overrides: [(u8, u32, u16); 2] = [(0, 2, 0), (SCI_IRQ, u32::from(SCI_IRQ), 0b1101)];
        for (source, gsi, flags) in overrides {
            t.extend_from_slice(&[2, 10, 0, source]);
            t.extend_from_slice(&gsi.to_le_bytes());
            t.extend_from_slice(&flags.to_le_bytes());
        }
    }
    if !config.apic_ids.is_empty() {
        // Local APIC NMI: all processors (0xff), flags 0, LINT1.
        t.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    }
    finish(t)
}

/// The MCFG table (PCI Firmware Specification 3.2, 4.1.2): one allocation,
/// segment 0, buses 0 to 0, at `base`.
fn mcfg(base: u64) -> Vec<u8> {
    let mut t = header(b"MCFG", 1, 8 + 16);
    t.extend_from_slice(&[0; 8]);
    t.extend_from_slice(&base.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // PCI segment group
    t.extend_from_slice(&[0, 0]); // start and end bus
    t.extend_from_slice(&[0; 4]);
    finish(t)
}

/// Append `table` to `area` at the next `align`-aligned offset; its
/// guest-physical address.
fn place(area: &mut Vec<u8>, table: &[u8], align: usize) -> u64 {
    let at = area.len().next_multiple_of(align);
    area.resize(at, 0);
    area.extend_from_slice(table);
    AREA_BASE + at as u64
}

/// Every table for `config`, laid out from [`AREA_BASE`].
pub fn build(config: &Config) -> Tables {
    // The RSDP first, 16-aligned: a scan of the BIOS area finds it at once.
    let mut area = vec![0u8; 36];
    let facs = place(&mut area, &facs(), 64);
    let dsdt = place(&mut area, &dsdt(config), 16);
    let fadt = place(&mut area, &fadt(facs, dsdt), 16);
    let mut entries = vec![fadt];
    if !config.apic_ids.is_empty() {
        entries.push(place(&mut area, &madt(config), 16));
    }
    if let Some(base) = config.ecam {
        entries.push(place(&mut area, &mcfg(base), 16));
    }
    let mut xsdt = header(b"XSDT", 1, 8 * entries.len());
    let mut rsdt = header(b"RSDT", 1, 4 * entries.len());
    for &e in &entries {
        xsdt.extend_from_slice(&e.to_le_bytes());
        rsdt.extend_from_slice(&(e as u32).to_le_bytes());
    }
    // 4 bytes past an 8-byte boundary, so that the 64-bit entries after
    // the 36-byte header are naturally aligned for parsers that read them
    // as u64 (the `acpi` crate does).
    area.resize(area.len().next_multiple_of(8) + 4, 0);
    let xsdt = place(&mut area, &finish(xsdt), 4);
    let rsdt = place(&mut area, &finish(rsdt), 16);

    // The RSDP (5.2.5.3): revision 2, both pointers, both checksums.
    let mut rsdp = [0u8; 36];
    rsdp[0..8].copy_from_slice(b"RSD PTR ");
    rsdp[9..15].copy_from_slice(OEM_ID);
    rsdp[15] = 2;
    rsdp[16..20].copy_from_slice(&(rsdt as u32).to_le_bytes());
    rsdp[20..24].copy_from_slice(&36u32.to_le_bytes());
    rsdp[24..32].copy_from_slice(&xsdt.to_le_bytes());
    checksum(&mut rsdp[..20], 8);
    checksum(&mut rsdp, 32);
    area[..36].copy_from_slice(&rsdp);
    debug_assert!(area.len() as u64 <= AREA_LEN);
    Tables { bytes: area, rsdp: AREA_BASE }
}

#[cfg(test)]
mod tests;
