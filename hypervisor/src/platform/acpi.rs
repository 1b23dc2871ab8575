//! ACPI through the `acpi` crate: CPUs and APIC IDs from the MADT, NUMA
//! nodes from the SRAT, and the soft-off path (PM1 control blocks from the
//! FADT, SLP_TYP from `\_S5`).

use acpi::platform::InterruptModel;
use acpi::sdt::fadt::Fadt;
use acpi::{AcpiTables, Handler, PciAddress, PhysicalMapping};
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU16, Ordering};
use x86_64::instructions::port::Port;

use super::memory::phys_to_virt;

/// Maps ACPI tables through the bootloader's direct map of physical memory.
#[derive(Clone, Copy)]
struct DirectMap;

impl Handler for DirectMap {
    unsafe fn map_physical_region<T>(&self, pa: usize, size: usize) -> PhysicalMapping<Self, T> {
        PhysicalMapping {
            physical_start: pa,
            virtual_start: NonNull::new(phys_to_virt(pa as u64) as *mut T).expect("direct map is non-null"),
            region_length: size,
            mapped_length: size,
            handler: *self,
        }
    }
    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}

    // Only the AML interpreter calls the accessors below, and the kernel
    // never runs it, so they are plain and minimal.
    fn read_u8(&self, a: usize) -> u8 {
        // SAFETY: only reachable from AML evaluation, which never runs.
        unsafe { phys_to_virt(a as u64).read_volatile() }
    }
    fn read_u16(&self, a: usize) -> u16 {
        // SAFETY: as above.
        unsafe { (phys_to_virt(a as u64) as *const u16).read_volatile() }
    }
    fn read_u32(&self, a: usize) -> u32 {
        // SAFETY: as above.
        unsafe { (phys_to_virt(a as u64) as *const u32).read_volatile() }
    }
    fn read_u64(&self, a: usize) -> u64 {
        // SAFETY: as above.
        unsafe { (phys_to_virt(a as u64) as *const u64).read_volatile() }
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
        super::time::micros() * 1000
    }
    fn stall(&self, _: u64) {}
    fn sleep(&self, _: u64) {}
    // The crate's AML interpreter is compiled in (its error type needs it)
    // but never run: the kernel evaluates no AML, so no mutex is ever used.
    fn create_mutex(&self) -> acpi::Handle {
        acpi::Handle(0)
    }
    fn acquire(&self, _: acpi::Handle, _: u16) -> Result<(), acpi::aml::AmlError> {
        Ok(())
    }
    fn release(&self, _: acpi::Handle) {}
}

/// What the hypervisor keeps from ACPI.
#[derive(Clone, Debug, Default)]
pub struct AcpiInfo {
    /// Local APIC IDs of the usable CPUs, boot CPU first.
    pub apic_ids: Vec<u32>,
    pub pm1a_cnt: Option<u16>,
    pub pm1b_cnt: Option<u16>,
    /// SLP_TYPa/b for S5.
    pub s5: Option<(u8, u8)>,
    /// The NUMA nodes (empty without an SRAT).
    pub numa: hypervisor::numa::Topology,
}

static INFO: spin::Once<AcpiInfo> = spin::Once::new();

pub fn init(rsdp: Option<u64>) -> &'static AcpiInfo {
    INFO.call_once(|| match rsdp {
        Some(rsdp) => parse(rsdp).unwrap_or_else(|e| {
            log::warn!("ACPI tables unusable: {e:?}");
            AcpiInfo::default()
        }),
        None => {
            log::warn!("no ACPI RSDP from the firmware");
            AcpiInfo::default()
        }
    })
}

pub fn info() -> Option<&'static AcpiInfo> {
    INFO.get()
}

fn parse(rsdp: u64) -> Result<AcpiInfo, acpi::AcpiError> {
    // SAFETY: the RSDP address comes from the firmware via the bootloader,
    // and all of physical memory is mapped by the direct map.
    let tables = unsafe { AcpiTables::from_rsdp(DirectMap, rsdp as usize)? };
    let mut info = AcpiInfo::default();
    if let Ok((InterruptModel::Apic(_), Some(cpus))) = InterruptModel::new(&tables) {
        info.apic_ids.push(cpus.boot_processor.local_apic_id);
        info.apic_ids.extend(
            cpus.application_processors
                .iter()
                .filter(|p| p.state != acpi::platform::ProcessorState::Disabled)
                .map(|p| p.local_apic_id),
        );
    }
    if let Some(fadt) = tables.find_table::<Fadt>() {
        let io = |g: acpi::address::GenericAddress| {
            (g.address_space == acpi::address::AddressSpace::SystemIo && g.address != 0).then_some(g.address as u16)
        };
        info.pm1a_cnt = fadt.pm1a_control_block().ok().and_then(io);
        info.pm1b_cnt = fadt.pm1b_control_block().ok().flatten().and_then(io);
        if let Ok(dsdt) = fadt.dsdt_address() {
            info.s5 = find_s5_at(dsdt as u64);
        }
    }
    if let Some(srat) = tables.find_table::<acpi::sdt::srat::Srat>() {
        let pa = srat.physical_start as u64;
        // SAFETY: the SRAT the firmware listed, mapped by the direct map;
        // its length is in its header (ACPI 6.5 5.2.6), bounded here.
        let bytes = unsafe {
            let len = (phys_to_virt(pa + 4) as *const u32).read_unaligned().min(1 << 20) as usize;
            core::slice::from_raw_parts(phys_to_virt(pa), len)
        };
        let (cpus, memory) = hypervisor::numa::parse_srat(bytes);
        info.numa = hypervisor::numa::Topology::from_srat(&cpus, &memory);
    }
    Ok(info)
}

/// Reads the DSDT's length from its header and searches its AML.
fn find_s5_at(dsdt: u64) -> Option<(u8, u8)> {
    // SAFETY: the DSDT address comes from the FADT; its header (36 bytes,
    // ACPI 6.5 5.2.6) holds the total length at offset 4.
    let len = unsafe { (phys_to_virt(dsdt + 4) as *const u32).read_unaligned() } as usize;
    if !(36..=16 << 20).contains(&len) {
        return None;
    }
    // SAFETY: the table spans `len` bytes of firmware memory, mapped by the
    // direct map and never written by the kernel.
    let aml = unsafe { core::slice::from_raw_parts(phys_to_virt(dsdt + 36), len - 36) };
    hypervisor::acpi::find_s5(aml)
}

static PM1A_FALLBACK: AtomicU16 = AtomicU16::new(0);

/// The PM1a control port to use when the firmware gave no ACPI tables (set
/// from the boot configuration; SLP_TYP 0, as on the PIIX4).
pub fn set_pm1a_fallback(port: u16) {
    PM1A_FALLBACK.store(port, Ordering::Relaxed);
}

/// Enters S5. Returns only if the platform ignored the request.
pub fn power_off() {
    let from_tables = INFO.get().and_then(|i| Some((i.pm1a_cnt?, i.s5?, i.pm1b_cnt)));
    let fallback = PM1A_FALLBACK.load(Ordering::Relaxed);
    let (a, (typ_a, typ_b), b) = match from_tables {
        Some(t) => t,
        None if fallback != 0 => (fallback, (0, 0), None),
        None => return,
    };
    const SLP_EN: u16 = 1 << 13;
    // SAFETY: PM1a/PM1b_CNT are the ACPI fixed-hardware power-management
    // control ports (named by the FADT, or by the operator's configuration
    // for firmware without ACPI); writing SLP_TYP|SLP_EN requests S5.
    unsafe {
        if let Some(b) = b {
            Port::<u16>::new(b).write(((typ_b as u16) << 10) | SLP_EN);
        }
        Port::<u16>::new(a).write(((typ_a as u16) << 10) | SLP_EN);
    }
}
