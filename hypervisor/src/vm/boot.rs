//! Starting a guest: load its image (ELF64 or Multiboot v1, chosen the way
//! QEMU's `-kernel` chooses: a Multiboot header wins), write the boot
//! structures the protocol promises, and build the first vCPU state.
//!
//! Boot contracts:
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
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Elf64 => "elf64",
            Protocol::Multiboot => "multiboot",
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
    /// Writing guest RAM failed: a hypervisor bug, the plan was checked.
    Memory,
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootError::Load(e) => write!(f, "{e}"),
            BootError::CommandLine => write!(f, "the command line is longer than {MAX_CMDLINE} bytes or holds a NUL"),
            BootError::ModulesNeedMultiboot => write!(f, "modules can only be passed to Multiboot guests"),
            BootError::Memory => write!(f, "guest RAM refused a write of the checked load plan"),
        }
    }
}

fn has_multiboot_header(image: &[u8]) -> bool {
    // A header with a bad checksum is not a header (spec 3.1.2); an
    // unsupported but valid header is reported by the Multiboot loader.
    !matches!(loader::multiboot::find_header(image), Err(loader::Error::MultibootNoHeader))
}

/// Loads `image` into guest RAM (`mem`, `ram_size` bytes from 0) and
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
    let layout = RamLayout { ram_size, reserved: &reserved };
    if has_multiboot_header(image) {
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
        let gprs = Gprs { rdi: ram_size, rsi: vm_id as u64, rdx: cmd_gpa, ..Default::default() };
        Ok((long_mode_state(&plan, gprs), Protocol::Elf64))
    }
}

/// Null, code, data descriptors (SDM Vol. 3A 3.4.5).
const GDT_64: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
const GDT_32: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

fn write_gdt(mem: &mut (impl GuestWrite + ?Sized), gdt: &[u64; 3]) -> Result<(), BootError> {
    let mut bytes = [0u8; 24];
    for (i, d) in gdt.iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&d.to_le_bytes());
    }
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
    debug_assert_eq!(plan.entry().mode, EntryMode::Long64);
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
