//! The tables checked byte by byte, then parsed by the `acpi` crate the way
//! a guest's ACPI code would find and read them.

use super::*;
use ::acpi::platform::{InterruptModel, PmTimer};
use ::acpi::sdt::fadt::Fadt;
use ::acpi::{AcpiTables, Handle, Handler, PciAddress, PhysicalMapping};
use core::ptr::NonNull;
use std::boxed::Box;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn sums_to_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
}

/// The table at guest-physical `gpa` in `t`.
fn table(t: &Tables, gpa: u64) -> &[u8] {
    let at = (gpa - AREA_BASE) as usize;
    let len = u32_at(&t.bytes, at + 4) as usize;
    &t.bytes[at..at + len]
}

fn two_cpus() -> Config {
    Config {
        apic_ids: vec![0, 1],
        ioapic: Some((2, 0xfec0_0000)),
        lapic_address: 0xfee0_0000,
        ecam: Some(0xe000_0000),
        virtio_mmio: vec![],
    }
}

#[test]
fn the_rsdp_is_where_a_bios_scan_finds_it_and_every_checksum_holds() {
    let t = build(&two_cpus());
    assert!(t.bytes.len() as u64 <= AREA_LEN);
    assert_eq!(t.rsdp % 16, 0);
    assert_eq!((u64_at(&t.bytes, 24) + 36) % 8, 0, "the XSDT's entries are 8-aligned");
    // The scan (5.2.5.1): 16-byte boundaries of 0xE0000..0xFFFFF.
    let found = (0..t.bytes.len()).step_by(16).find(|&o| t.bytes[o..].starts_with(b"RSD PTR "));
    assert_eq!(found.map(|o| AREA_BASE + o as u64), Some(t.rsdp));
    let rsdp = &t.bytes[..36];
    assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(rsdp));
    assert_eq!(rsdp[15], 2);
    let xsdt = table(&t, u64_at(rsdp, 24));
    let rsdt = table(&t, u64::from(u32_at(rsdp, 16)));
    assert_eq!((&xsdt[..4], &rsdt[..4]), (&b"XSDT"[..], &b"RSDT"[..]));
    let entries: Vec<u64> = (36..xsdt.len()).step_by(8).map(|o| u64_at(xsdt, o)).collect();
    let signatures: Vec<&[u8]> = entries.iter().map(|&e| &table(&t, e)[..4]).collect();
    assert_eq!(signatures, [&b"FACP"[..], b"APIC", b"MCFG"]);
    // MCFG: one allocation, base, segment 0, buses 0-0.
    let mcfg = table(&t, entries[2]);
    assert_eq!(mcfg.len(), 36 + 8 + 16);
    assert_eq!((u64_at(mcfg, 44), &mcfg[52..56]), (0xe000_0000, &[0, 0, 0, 0][..]));
    for (k, &e) in entries.iter().enumerate() {
        assert_eq!(u64::from(u32_at(rsdt, 36 + 4 * k)), e, "RSDT and XSDT agree");
    }
    for tab in [xsdt, rsdt].into_iter().chain(entries.iter().map(|&e| table(&t, e))) {
        assert!(sums_to_zero(tab), "{} checksum", String::from_utf8_lossy(&tab[..4]));
    }
    let fadt = table(&t, entries[0]);
    assert_eq!(fadt.len(), 276);
    let dsdt = table(&t, u64_at(fadt, 140));
    assert!(sums_to_zero(dsdt));
    assert_eq!(crate::acpi::find_s5(&dsdt[36..]), Some((S5_SLP_TYP, S5_SLP_TYP)), "soft-off is findable");
    let facs = u64_at(fadt, 132);
    assert_eq!(facs % 64, 0);
    assert_eq!(&t.bytes[(facs - AREA_BASE) as usize..][..4], b"FACS");
}

#[test]
fn without_local_apics_there_is_no_madt() {
    let t =
        build(&Config { apic_ids: vec![], ioapic: None, lapic_address: 0xfee0_0000, ecam: None, virtio_mmio: vec![] });
    let xsdt = table(&t, u64_at(&t.bytes, 24));
    assert_eq!(xsdt.len(), 36 + 8, "the FADT only");
}

/// Reads guest-physical memory from the tables' bytes (nothing else exists).
#[derive(Clone, Copy)]
struct Area(&'static [u8]);

impl Handler for Area {
    unsafe fn map_physical_region<T>(&self, pa: usize, size: usize) -> PhysicalMapping<Self, T> {
        let off = pa - AREA_BASE as usize;
        assert!(off + size <= self.0.len(), "the parser read outside the tables: {pa:#x}+{size:#x}");
        PhysicalMapping {
            physical_start: pa,
            virtual_start: NonNull::new(self.0[off..].as_ptr() as *mut T).unwrap(),
            region_length: size,
            mapped_length: size,
            handler: *self,
        }
    }
    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
    fn read_u8(&self, _: usize) -> u8 {
        unreachable!("no AML is run")
    }
    fn read_u16(&self, _: usize) -> u16 {
        unreachable!()
    }
    fn read_u32(&self, _: usize) -> u32 {
        unreachable!()
    }
    fn read_u64(&self, _: usize) -> u64 {
        unreachable!()
    }
    fn write_u8(&self, _: usize, _: u8) {}
    fn write_u16(&self, _: usize, _: u16) {}
    fn write_u32(&self, _: usize, _: u32) {}
    fn write_u64(&self, _: usize, _: u64) {}
    fn read_io_u8(&self, _: u16) -> u8 {
        0xff
    }
    fn read_io_u16(&self, _: u16) -> u16 {
        0xffff
    }
    fn read_io_u32(&self, _: u16) -> u32 {
        !0
    }
    fn write_io_u8(&self, _: u16, _: u8) {}
    fn write_io_u16(&self, _: u16, _: u16) {}
    fn write_io_u32(&self, _: u16, _: u32) {}
    fn read_pci_u8(&self, _: PciAddress, _: u16) -> u8 {
        0xff
    }
    fn read_pci_u16(&self, _: PciAddress, _: u16) -> u16 {
        0xffff
    }
    fn read_pci_u32(&self, _: PciAddress, _: u16) -> u32 {
        !0
    }
    fn write_pci_u8(&self, _: PciAddress, _: u16, _: u8) {}
    fn write_pci_u16(&self, _: PciAddress, _: u16, _: u16) {}
    fn write_pci_u32(&self, _: PciAddress, _: u16, _: u32) {}
    fn nanos_since_boot(&self) -> u64 {
        0
    }
    fn stall(&self, _: u64) {}
    fn sleep(&self, _: u64) {}
    fn create_mutex(&self) -> Handle {
        Handle(0)
    }
    fn acquire(&self, _: Handle, _: u16) -> Result<(), ::acpi::aml::AmlError> {
        Ok(())
    }
    fn release(&self, _: Handle) {}
}

/// The tables as a guest's parser finds them, from `t`'s RSDP.
fn parsed(t: &Tables) -> (AcpiTables<Area>, Area) {
    // An 8-aligned copy, as guest RAM is page-aligned.
    let words: &'static mut [u64] = Box::leak(vec![0u64; t.bytes.len().div_ceil(8)].into_boxed_slice());
    // SAFETY: the words are plain bytes to the parser; `bytes` is no longer
    // than they are.
    let bytes = unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), t.bytes.len()) };
    bytes.copy_from_slice(&t.bytes);
    let area = Area(bytes);
    // SAFETY: the handler maps only the leaked copy of the tables.
    (unsafe { AcpiTables::from_rsdp(area, t.rsdp as usize) }.expect("the tables parse"), area)
}

#[test]
fn a_guest_parser_reads_the_cpus_the_ioapic_and_the_pm_blocks() {
    let t = build(&two_cpus());
    let (tables, _) = parsed(&t);
    let fadt = tables.find_table::<Fadt>().expect("a FADT");
    let port = |g: ::acpi::address::GenericAddress| g.address as u16;
    assert_eq!(fadt.pm1a_event_block().map(port).unwrap(), PM1A_EVT);
    assert_eq!(fadt.pm1a_control_block().map(port).unwrap(), PM1A_CNT);
    let (model, cpus) = InterruptModel::new(&tables).expect("a MADT");
    let cpus = cpus.expect("processors");
    assert_eq!(cpus.boot_processor.local_apic_id, 0);
    assert_eq!(cpus.application_processors.iter().map(|p| p.local_apic_id).collect::<Vec<_>>(), [1]);
    let InterruptModel::Apic(apic) = model else { panic!("not the APIC model") };
    assert_eq!(apic.local_apic_address, 0xfee0_0000);
    assert!(apic.also_has_legacy_pics);
    assert_eq!(apic.io_apics.len(), 1);
    assert_eq!((apic.io_apics[0].id, apic.io_apics[0].address), (2, 0xfec0_0000));
    let timer_override = apic.interrupt_source_overrides.iter().find(|o| o.isa_source == 0).expect("IRQ 0");
    assert_eq!(timer_override.global_system_interrupt, 2);
    let timer = PmTimer::new(&fadt).expect("FADT").expect("a PM timer");
    assert_eq!(timer.base.address as u16, PM_TMR);
    assert!(timer.supports_32bit);
}

#[test]
fn the_dsdt_names_the_pci_root_bridge_and_what_it_forwards() {
    use ::acpi::aml::Interpreter;
    use ::acpi::aml::namespace::AmlName;
    use ::acpi::aml::object::Object;
    use ::acpi::aml::resource::{AddressSpaceResourceType, Resource, resource_descriptor_list};
    use ::acpi::platform::AcpiPlatform;
    use core::str::FromStr;
    let (tables, area) = parsed(&build(&two_cpus()));
    let platform = AcpiPlatform::new(tables, area).expect("a platform");
    // The DSDT run by an AML interpreter, as a guest's ACPI code runs it.
    let aml = Interpreter::new_from_platform(&platform).expect("the DSDT loads");
    let eval = |path: &str| aml.evaluate(AmlName::from_str(path).unwrap(), vec![]).expect(path);
    assert!(matches!(*eval("\\_SB.PCI0._HID"), Object::Integer(0x030a_d041)), "EisaId (\"PNP0A03\")");
    assert!(matches!(*eval("\\_SB.PCI0._UID"), Object::Integer(0)));
    let windows: Vec<(AddressSpaceResourceType, (u64, u64), u64)> = resource_descriptor_list(eval("\\_SB.PCI0._CRS"))
        .expect("_CRS parses")
        .into_iter()
        .map(|r| match r {
            Resource::AddressSpace(a) => {
                assert!(a.is_minimum_address_fixed && a.is_maximum_address_fixed);
                (a.resource_type, a.address_range, a.length)
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        windows,
        [
            (AddressSpaceResourceType::BusNumberRange, (0, 0), 1),
            (AddressSpaceResourceType::IORange, (0, 0xcf7), 0xcf8),
            (AddressSpaceResourceType::IORange, (0xd00, 0xffff), 0xf300),
        ]
    );
    // \_S5 is still where the hypervisor's own pattern search finds it.
    let t = build(&two_cpus());
    let fadt = table(&t, u64_at(table(&t, u64_at(&t.bytes, 24)), 36));
    let dsdt = table(&t, u64_at(fadt, 140));
    assert_eq!(crate::acpi::find_s5(&dsdt[36..]), Some((S5_SLP_TYP, S5_SLP_TYP)));
}

#[test]
fn pkg_lengths_count_their_own_bytes() {
    assert_eq!(package(&[0x10], &[0; 5])[..2], [0x10, 6]);
    assert_eq!(package(&[0x10], &[0; 62])[1], 63);
    // 63 bytes: two length bytes, 65 in all (0x41: 1 extra byte, nibble 1).
    assert_eq!(package(&[0x10], &[0; 63])[1..3], [0x41, 0x04]);
    assert_eq!(package(&[0x10], &[0; 300])[1..3], [0x4e, 0x12], "302 = 0x12e");
    assert_eq!(package(&[0x10], &[0; 5000])[1..4], [0x8b, 0x38, 0x01], "5003 = 0x138b");
}

fn with_virtio() -> Config {
    let slots = (0..2).map(|n| crate::devices::virtio::mmio::slot(n).unwrap()).collect();
    Config { virtio_mmio: slots, ..two_cpus() }
}

#[test]
fn a_virtio_mmio_device_is_encoded_as_hand_derived() {
    let slot = VirtioMmioSlot { base: 0xd000_1000, gsi: 17 };
    #[rustfmt::skip]
    let expected: Vec<u8> = [
        // DeviceOp (20.2.5.2), PkgLength 58 (the 57 bytes below and
        // itself), NameSeg "VR01".
        &[0x5b, 0x82, 58][..], b"VR01",
        // Name (_HID, "LNRO0005"): NameOp, NameSeg, StringPrefix, ASCIIZ
        // (20.2.3).
        &[0x08], b"_HID", &[0x0d], b"LNRO0005", &[0x00],
        // Name (_UID, 1): OneOp.
        &[0x08], b"_UID", &[0x01],
        // Name (_CRS, Buffer (23) { ... }): BufferOp, PkgLength 26,
        // BytePrefix 23.
        &[0x08], b"_CRS", &[0x11, 26, 0x0a, 23],
        // Memory32Fixed (ReadWrite, 0xd0001000, 0x200): the 32-Bit Fixed
        // Memory Range Descriptor (6.4.3.4): tag 0x86, length 9, _RW = 1,
        // _BAS, _LEN.
        &[0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd0, 0x00, 0x02, 0x00, 0x00],
        // Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive) { 17 }:
        // the Extended Interrupt Descriptor (6.4.3.6): tag 0x89, length 6,
        // flags 0b00001 (consumer; _HE, _LL, _SHR all 0), table length 1,
        // the GSI.
        &[0x89, 0x06, 0x00, 0x01, 0x01, 17, 0x00, 0x00, 0x00],
        // End Tag (6.4.2.9), checksum 0 ("treated as if it summed to zero").
        &[0x79, 0x00],
    ]
    .concat();
    assert_eq!(virtio_mmio_device(1, &slot), expected);
    assert_eq!(virtio_mmio_device(1, &slot).len(), 3 + 57);
    assert_eq!(&virtio_mmio_device(0x2a, &slot)[3..7], b"VR2A");
    assert!(virtio_mmio_devices(&[]).is_empty(), "no devices, no scope");
    assert_eq!(integer(0x1234), [0x0b, 0x34, 0x12]);
    assert_eq!(integer(0x12345), [0x0c, 0x45, 0x23, 0x01, 0x00]);
}

#[test]
fn a_guest_parser_finds_the_virtio_mmio_devices() {
    use ::acpi::aml::Interpreter;
    use ::acpi::aml::namespace::AmlName;
    use ::acpi::aml::object::Object;
    use ::acpi::aml::resource::{
        InterruptPolarity, InterruptTrigger, MemoryRangeDescriptor, Resource, resource_descriptor_list,
    };
    use ::acpi::platform::AcpiPlatform;
    use core::str::FromStr;
    let (tables, area) = parsed(&build(&with_virtio()));
    let platform = AcpiPlatform::new(tables, area).expect("a platform");
    let aml = Interpreter::new_from_platform(&platform).expect("the DSDT loads");
    let eval = |path: &str| aml.evaluate(AmlName::from_str(path).unwrap(), vec![]).expect(path);
    for n in 0..2u32 {
        let dev = format!("\\_SB.VR0{n}");
        assert!(matches!(&*eval(&format!("{dev}._HID")), Object::String(s) if s == "LNRO0005"));
        assert!(matches!(*eval(&format!("{dev}._UID")), Object::Integer(u) if u == u64::from(n)));
        let crs = resource_descriptor_list(eval(&format!("{dev}._CRS"))).expect("_CRS parses");
        let [
            Resource::MemoryRange(MemoryRangeDescriptor::FixedLocation { is_writable, base_address, range_length }),
            Resource::Irq(irq),
        ] = &crs[..]
        else {
            panic!("{crs:?}")
        };
        assert!(*is_writable);
        assert_eq!((*base_address, *range_length), (0xd000_0000 + 0x1000 * n, 0x200));
        assert!(irq.is_consumer && !irq.is_shared && !irq.is_wake_capable);
        assert_eq!(
            (irq.trigger, irq.polarity, irq.irq),
            (InterruptTrigger::Level, InterruptPolarity::ActiveHigh, 16 + n)
        );
    }
    // The PCI root bridge and \_S5 are still there.
    assert!(matches!(*eval("\\_SB.PCI0._UID"), Object::Integer(0)));
    let t = build(&with_virtio());
    let fadt = table(&t, u64_at(table(&t, u64_at(&t.bytes, 24)), 36));
    let dsdt = table(&t, u64_at(fadt, 140));
    assert!(sums_to_zero(dsdt));
    assert_eq!(crate::acpi::find_s5(&dsdt[36..]), Some((S5_SLP_TYP, S5_SLP_TYP)));
    // Two devices, and their scope: ScopeOp, a two-byte PkgLength, "\_SB_".
    assert_eq!(dsdt.len() - table_dsdt_len(&build(&two_cpus())), 2 * 60 + 8);
}

fn table_dsdt_len(t: &Tables) -> usize {
    let fadt = table(t, u64_at(table(t, u64_at(&t.bytes, 24)), 36));
    table(t, u64_at(fadt, 140)).len()
}
