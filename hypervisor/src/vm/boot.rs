//! Starting a guest: load its image (Linux bzImage, Multiboot v1 or ELF64,
//! chosen the way QEMU's `-kernel` chooses: a Linux setup header wins, then
//! a Multiboot header), write the boot structures the protocol promises, and
//! build the first vCPU state.
//!
//! Boot contracts:
//! - Linux (boot.rst, "64-bit Boot Protocol"): an image with the 0xAA55 boot
//!   flag at 0x1FE and "HdrS" at 0x202. 64-bit mode at the kernel's 64-bit
//!   entry (load address + 0x200), the low 4 GiB identity-mapped as for
//!   ELF64, a GDT with `__BOOT_CS` = 0x10 (64-bit code) and `__BOOT_DS` =
//!   0x18 (data), CS = 0x10, DS/ES/SS/FS/GS = 0x18, interrupts off; RSI =
//!   the zero page at 0x9000, the command line at 0xA000 (both in the
//!   reserved low 64 KiB, which the e820 map reports reserved); every other
//!   general register 0. The one module, if given, is the initramfs.
//! - ELF64: 64-bit mode at the entry point; the low 4 GiB of guest-physical
//!   space identity-mapped with 2 MiB pages (page tables at 0x1000); RDI =
//!   RAM size in bytes, RSI = VM id, RDX = command line (NUL-terminated, at
//!   0x8000) or 0; RSP = 0 (the guest sets its own stack).
//! - Multiboot v1 (spec 0.6.96, 3.2 "Machine state"): 32-bit protected mode,
//!   paging off, flat segments, EAX = 0x2BADB002, EBX = the information
//!   structure.

use alloc::string::String;
use core::ops::Range;
use vcpu::state::bits::*;
use vcpu::{DescriptorTable, Gprs, GuestState, SegAttrs, Segment};

use crate::loader::{self, EntryMode, GuestWrite, LoadPlan, RamLayout};

/// Low guest-physical memory the hypervisor keeps for boot structures.
pub const RESERVED: Range<u64> = 0..0x1_0000;
const PML4: u64 = 0x1000;
const GDT: u64 = 0x7000;
const CMDLINE: u64 = 0x8000;
pub const MAX_CMDLINE: usize = 4095;
/// Where a Linux guest's zero page and command line go: the part of the
/// reserved low 64 KiB that the page tables, the GDT and the ELF command
/// line leave free. The zero page is at its start.
pub const LINUX_BOOT_AREA: Range<u64> = 0x9000..RESERVED.end;
/// `__BOOT_CS` and `__BOOT_DS` (boot.rst, "64-bit Boot Protocol").
const LINUX_BOOT_CS: u16 = 0x10;
const LINUX_BOOT_DS: u16 = 0x18;

/// A file passed to a Multiboot guest as a module.
#[derive(Clone, Copy, Debug)]
pub struct Module<'a> {
    pub name: &'a str,
    pub data: &'a [u8],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Elf64,
    Multiboot,
    Linux,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Elf64 => "elf64",
            Protocol::Multiboot => "multiboot",
            Protocol::Linux => "linux",
        }
    }
}

/// Why a guest could not be started.
#[derive(Debug, PartialEq, Eq)]
pub enum BootError {
    Load(loader::Error),
    CommandLine,
    /// Modules were given for a guest that is not booted through Multiboot.
    ModulesNeedMultiboot,
    /// A Linux guest was given more than one module (its initramfs).
    LinuxOneInitrd {
        given: usize,
    },
    /// Writing guest RAM failed: a hypervisor bug, the plan was checked.
    Memory,
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootError::Load(e) => write!(f, "{e}"),
            BootError::CommandLine => write!(f, "the command line is longer than {MAX_CMDLINE} bytes or holds a NUL"),
            BootError::ModulesNeedMultiboot => {
                write!(f, "modules can only be passed to Multiboot guests (and one, the initramfs, to Linux)")
            }
            BootError::LinuxOneInitrd { given } => {
                write!(f, "a Linux guest takes one module, its initramfs; {given} were given")
            }
            BootError::Memory => write!(f, "guest RAM refused a write of the checked load plan"),
        }
    }
}

fn has_multiboot_header(image: &[u8]) -> bool {
    // A header with a bad checksum is not a header (spec 3.1.2); an
    // unsupported but valid header is reported by the Multiboot loader.
    !matches!(loader::multiboot::find_header(image), Err(loader::Error::MultibootNoHeader))
}

/// Where a PC's PCI hole starts: RAM past 3 GiB goes above 4 GiB, as
/// `mm::vm_memory::MemoryMap::pc` lays it out, leaving the device pages
/// (the I/O APIC at 0xfec00000, the local APIC at 0xfee00000) unbacked so
/// accesses to them reach the devices.
pub const LOW_RAM_END: u64 = 3 << 30;

/// The guest-physical RAM ranges of a VM with `ram_size` bytes of RAM.
pub fn ram_ranges(ram_size: u64) -> ([Range<u64>; 2], usize) {
    let low = ram_size.min(LOW_RAM_END);
    let high = ram_size - low;
    ([0..low, (1 << 32)..(1 << 32) + high], if high > 0 { 2 } else { 1 })
}

/// Loads `image` into guest RAM (`mem`, `ram_size` bytes laid out by
/// [`ram_ranges`]) and
/// returns the initial state.
pub fn prepare(
    image: &[u8],
    ram_size: u64,
    cmdline: &str,
    modules: &[Module<'_>],
    vm_id: u32,
    mem: &mut (impl GuestWrite + ?Sized),
) -> Result<(GuestState, Protocol), BootError> {
    if cmdline.len() > MAX_CMDLINE || cmdline.contains('\0') {
        return Err(BootError::CommandLine);
    }
    let reserved = [RESERVED];
    let (ranges, n) = ram_ranges(ram_size);
    // The test guests' loaders know one range: the RAM below the hole.
    let low = ranges[0].end;
    let layout = RamLayout { ram_size: low, reserved: &reserved };
    if loader::linux::is_linux(image) {
        let initrd = match modules {
            [] => None,
            [m] => Some(m.data),
            _ => return Err(BootError::LinuxOneInitrd { given: modules.len() }),
        };
        // The hypervisor keeps the low 64 KiB but lends the loader its boot
        // area for the zero page and the command line.
        let ram = &ranges[..n];
        // The memory-mapped PCI configuration space is reserved too: Linux
        // uses it only where the e820 map says so (arch/x86/pci/mmconfig-
        // shared.c, `pci_mmcfg_reserved`).
        let ecam = crate::devices::pci::ECAM_BASE;
        let kept = [
            Range { start: RESERVED.start, end: LINUX_BOOT_AREA.start },
            Range { start: ecam, end: ecam + crate::devices::pci::ECAM_SIZE },
        ];
        let config = loader::linux::Config { ram, reserved: &kept, boot_area: LINUX_BOOT_AREA, cmdline, initrd };
        let plan = loader::linux::plan(image, &config).map_err(BootError::Load)?;
        plan.apply(image, mem).map_err(BootError::Load)?;
        write_identity_map(mem)?;
        write_gdt(mem, &GDT_LINUX)?;
        Ok((linux_state(&plan), Protocol::Linux))
    } else if has_multiboot_header(image) {
        let mods: alloc::vec::Vec<loader::multiboot::Module<'_>> =
            modules.iter().map(|m| loader::multiboot::Module { data: m.data, cmdline: m.name }).collect();
        let config = loader::multiboot::Config { layout, cmdline, modules: &mods };
        let plan = loader::multiboot::plan(image, &config).map_err(BootError::Load)?;
        plan.apply(image, mem).map_err(BootError::Load)?;
        write_gdt(mem, &GDT_32)?;
        Ok((protected_mode_state(&plan), Protocol::Multiboot))
    } else {
        if !modules.is_empty() {
            return Err(BootError::ModulesNeedMultiboot);
        }
        let plan = loader::elf::plan(image, loader::elf::Machine::X86_64, &layout).map_err(BootError::Load)?;
        plan.apply(image, mem).map_err(BootError::Load)?;
        write_identity_map(mem)?;
        write_gdt(mem, &GDT_64)?;
        let cmd_gpa = if cmdline.is_empty() {
            0
        } else {
            let mut bytes = String::from(cmdline).into_bytes();
            bytes.push(0);
            mem.write(CMDLINE, &bytes).map_err(|_| BootError::Memory)?;
            CMDLINE
        };
        let gprs = Gprs { rdi: low, rsi: vm_id as u64, rdx: cmd_gpa, ..Default::default() };
        Ok((long_mode_state(&plan, gprs), Protocol::Elf64))
    }
}

/// Null, code, data descriptors (SDM Vol. 3A 3.4.5).
const GDT_64: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
const GDT_32: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
/// Linux wants its code and data at 0x10 and 0x18: null, unused, code, data.
const GDT_LINUX: [u64; 4] = [0, 0, GDT_64[1], GDT_64[2]];

fn write_gdt(mem: &mut (impl GuestWrite + ?Sized), gdt: &[u64]) -> Result<(), BootError> {
    let bytes: alloc::vec::Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write(GDT, &bytes).map_err(|_| BootError::Memory)
}

/// PML4 at 0x1000 -> PDPT at 0x2000 -> four page directories at 0x3000..
/// mapping 0..4 GiB with 2 MiB pages (present, writable, PS).
fn write_identity_map(mem: &mut (impl GuestWrite + ?Sized)) -> Result<(), BootError> {
    let w = |mem: &mut dyn FnMut(u64, u64) -> Result<(), BootError>, at: u64, v: u64| mem(at, v);
    let mut put = |at: u64, v: u64| mem.write(at, &v.to_le_bytes()).map_err(|_| BootError::Memory);
    w(&mut put, PML4, (PML4 + 0x1000) | 3)?;
    for i in 0..4u64 {
        w(&mut put, PML4 + 0x1000 + i * 8, (PML4 + 0x2000 + i * 0x1000) | 3)?;
    }
    let mut pd = [0u8; 4 * 4096];
    for i in 0..2048u64 {
        let e = (i << 21) | 0x83;
        pd[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e.to_le_bytes());
    }
    mem.write(PML4 + 0x2000, &pd).map_err(|_| BootError::Memory)
}

fn flat(selector: u16, attrs: SegAttrs) -> Segment {
    Segment { selector, base: 0, limit: 0xffff_ffff, attrs }
}

fn common(rip: u64) -> GuestState {
    GuestState {
        rip,
        rflags: RFLAGS_FIXED,
        pat: PAT_DEFAULT,
        dr7: 0x400,
        ds: flat(0x10, SegAttrs::DATA),
        es: flat(0x10, SegAttrs::DATA),
        ss: flat(0x10, SegAttrs::DATA),
        fs: flat(0x10, SegAttrs::DATA),
        gs: flat(0x10, SegAttrs::DATA),
        // A busy TSS and no LDT: required to enter any protected mode.
        tr: Segment { selector: 0, base: 0, limit: 0x67, attrs: SegAttrs::TSS_BUSY },
        ldtr: Segment { selector: 0, base: 0, limit: 0xffff, attrs: SegAttrs::UNUSABLE },
        gdtr: DescriptorTable { base: GDT, limit: 23 },
        ..Default::default()
    }
}

fn long_mode_state(plan: &LoadPlan<'_>, gprs: Gprs) -> GuestState {
    debug_assert_ne!(plan.entry().mode, EntryMode::Protected32);
    GuestState {
        gprs,
        cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
        cr3: PML4,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        cs: flat(0x08, SegAttrs::CODE64),
        ..common(plan.entry().rip)
    }
}

fn linux_state(plan: &LoadPlan<'_>) -> GuestState {
    debug_assert_eq!(plan.entry().mode, EntryMode::Linux64);
    let data = flat(LINUX_BOOT_DS, SegAttrs::DATA);
    GuestState {
        gprs: Gprs { rsi: plan.entry().rsi, ..Default::default() },
        cs: flat(LINUX_BOOT_CS, SegAttrs::CODE64),
        ds: data,
        es: data,
        ss: data,
        fs: data,
        gs: data,
        gdtr: DescriptorTable { base: GDT, limit: (GDT_LINUX.len() * 8 - 1) as u16 },
        ..long_mode_state(plan, Gprs::default())
    }
}

fn protected_mode_state(plan: &LoadPlan<'_>) -> GuestState {
    let e = plan.entry();
    GuestState {
        gprs: Gprs { rax: e.rax, rbx: e.rbx, ..Default::default() },
        cr0: CR0_PE | CR0_ET,
        cs: flat(0x08, SegAttrs::CODE32),
        ..common(e.rip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::testutil::{self, Seg};

    fn elf(paddr: u64, code: &[u8]) -> alloc::vec::Vec<u8> {
        testutil::elf64(paddr, &[Seg::text(paddr, code)])
    }

    /// A Multiboot image loaded through its address fields at 1 MiB.
    fn multiboot_kludge() -> alloc::vec::Vec<u8> {
        let base = 0x10_0000;
        let header = testutil::mb_header(0x1_0002, &[base, base, 0, 0, base + 0x40]);
        testutil::image_with_header(0x200, 0, &header)
    }

    #[test]
    fn ram_past_3_gib_goes_above_4_gib_around_the_device_pages() {
        assert_eq!(ram_ranges(256 << 20), ([0..256 << 20, (1 << 32)..(1 << 32)], 1));
        assert_eq!(ram_ranges(LOW_RAM_END), ([0..LOW_RAM_END, (1 << 32)..(1 << 32)], 1));
        let (r, n) = ram_ranges(6 << 30);
        assert_eq!((&r[..n], n), (&[0..3 << 30, (4 << 30)..(7 << 30)][..], 2));
        // Linux's e820 map says the same, and neither APIC page is RAM.
        let config = loader::linux::Config {
            ram: &r[..n],
            reserved: &[],
            boot_area: LINUX_BOOT_AREA,
            cmdline: "",
            initrd: None,
        };
        let map = loader::linux::e820_map(&config).unwrap();
        let ram: alloc::vec::Vec<(u64, u64)> = map.iter().filter(|e| e.2 == 1).map(|e| (e.0, e.0 + e.1)).collect();
        for apic in [0xfec0_0000u64, 0xfee0_0000] {
            assert!(!ram.iter().any(|&(a, b)| (a..b).contains(&apic)), "{apic:#x} in RAM: {map:x?}");
        }
        assert!(ram.iter().any(|&(a, b)| a == 4 << 30 && b == 7 << 30), "{map:x?}");
    }

    #[test]
    fn elf64_guest_gets_identity_map_gdt_and_registers() {
        let image = elf(0x10_0000, &[0x90; 64]);
        let mut ram = alloc::vec![0u8; 16 << 20];
        let (s, p) = prepare(&image, 16 << 20, "hello", &[], 3, &mut ram[..]).unwrap();
        assert_eq!(p, Protocol::Elf64);
        assert_eq!(s.rip, 0x10_0000);
        assert_eq!((s.gprs.rdi, s.gprs.rsi, s.gprs.rdx), (16 << 20, 3, CMDLINE));
        assert!(s.long_mode() && s.cs.attrs.long());
        assert_eq!(&ram[0x10_0000..0x10_0040], &[0x90; 64]);
        assert_eq!(&ram[CMDLINE as usize..CMDLINE as usize + 6], b"hello\0");
        let rd = |a: u64| u64::from_le_bytes(ram[a as usize..a as usize + 8].try_into().unwrap());
        assert_eq!(rd(PML4) & !0xfff, 0x2000);
        // The PD entry for 0xc000_0000 (3 GiB) maps it 1:1 as a 2 MiB page.
        assert_eq!(rd(0x3000 + 3 * 4096), 0xc000_0000 | 0x83);
        assert_eq!(rd(GDT + 8), GDT_64[1]);
    }

    #[test]
    fn multiboot_header_selects_protected_mode() {
        let image = multiboot_kludge();
        let mut ram = alloc::vec![0u8; 8 << 20];
        let (s, p) =
            prepare(&image, 8 << 20, "", &[Module { name: "m0", data: b"module-bytes" }], 1, &mut ram[..]).unwrap();
        assert_eq!(p, Protocol::Multiboot);
        assert_eq!(s.gprs.rax, 0x2bad_b002);
        assert_ne!(s.gprs.rbx, 0);
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert!(!s.long_mode() && s.cs.attrs.db());
        // The module is listed in the info structure and its bytes are in RAM.
        let rd = |a: u64| u32::from_le_bytes(ram[a as usize..a as usize + 4].try_into().unwrap()) as u64;
        let info = s.gprs.rbx;
        assert_eq!(rd(info + 20), 1, "mods_count");
        let m = rd(info + 24);
        let (start, end) = (rd(m), rd(m + 4));
        assert_eq!(&ram[start as usize..end as usize], b"module-bytes");
    }

    #[test]
    fn linux_guest_enters_64_bit_with_boot_selectors_and_zero_page() {
        let image = testutil::bzimage(&testutil::Hdr::default());
        let mut ram = alloc::vec![0u8; 16 << 20];
        let initrd = Module { name: "initrd", data: b"initramfs-bytes" };
        let (s, p) = prepare(&image, 16 << 20, "console=ttyS0", &[initrd], 2, &mut ram[..]).unwrap();
        assert_eq!(p, Protocol::Linux);
        // Loaded at its preferred 2 MiB, entered at +0x200.
        assert_eq!(s.rip, 0x20_0200);
        assert_eq!(&ram[0x20_0000..0x20_0010], &image[5 * 512..5 * 512 + 16]);
        assert_eq!(s.gprs, Gprs { rsi: LINUX_BOOT_AREA.start, ..Default::default() });
        assert!(s.long_mode() && s.cs.attrs.long());
        assert_eq!((s.cs.selector, s.ds.selector, s.es.selector, s.ss.selector), (0x10, 0x18, 0x18, 0x18));
        assert_eq!(s.rflags & RFLAGS_IF, 0);
        let rd = |a: u64| u64::from_le_bytes(ram[a as usize..a as usize + 8].try_into().unwrap());
        assert_eq!((rd(GDT + 0x10), rd(GDT + 0x18)), (GDT_64[1], GDT_64[2]));
        assert_eq!(s.gdtr.limit, 31);
        assert_eq!(rd(PML4) & !0xfff, 0x2000, "identity map as for ELF64");
        // The zero page names the command line and the initramfs.
        let zp = LINUX_BOOT_AREA.start as usize;
        assert_eq!(&ram[zp + 0x202..zp + 0x206], b"HdrS");
        let cmd = rd(zp as u64 + 0x228) as u32 as usize;
        assert_eq!(&ram[cmd..cmd + 14], b"console=ttyS0\0");
        let (rd_at, rd_len) = (rd(zp as u64 + 0x218) as u32 as usize, rd(zp as u64 + 0x21c) as u32 as usize);
        assert_eq!(&ram[rd_at..rd_at + rd_len], b"initramfs-bytes");
    }

    #[test]
    fn linux_guest_takes_one_module() {
        let image = testutil::bzimage(&testutil::Hdr::default());
        let mut ram = alloc::vec![0u8; 16 << 20];
        let m = [Module { name: "a", data: b"x" }, Module { name: "b", data: b"y" }];
        assert_eq!(prepare(&image, 16 << 20, "", &m, 1, &mut ram[..]), Err(BootError::LinuxOneInitrd { given: 2 }));
        // A malformed Linux image is refused by the Linux loader.
        let old = testutil::bzimage(&testutil::Hdr { version: 0x0206, ..Default::default() });
        assert!(matches!(
            prepare(&old, 16 << 20, "", &[], 1, &mut ram[..]),
            Err(BootError::Load(loader::Error::LinuxVersion { .. }))
        ));
    }

    #[test]
    fn bad_command_lines_and_images_are_refused() {
        let image = elf(0x10_0000, &[0x90; 16]);
        let mut ram = alloc::vec![0u8; 4 << 20];
        let long = "x".repeat(MAX_CMDLINE + 1);
        assert_eq!(prepare(&image, 4 << 20, &long, &[], 1, &mut ram[..]), Err(BootError::CommandLine));
        let m = [Module { name: "m", data: b"x" }];
        assert_eq!(prepare(&image, 4 << 20, "", &m, 1, &mut ram[..]), Err(BootError::ModulesNeedMultiboot));
        assert!(matches!(prepare(b"not an image", 4 << 20, "", &[], 1, &mut ram[..]), Err(BootError::Load(_))));
        // An image placed in the hypervisor's reserved low pages is refused.
        let low = elf(0x2000, &[0x90; 16]);
        assert!(matches!(prepare(&low, 4 << 20, "", &[], 1, &mut ram[..]), Err(BootError::Load(_))));
    }
}
