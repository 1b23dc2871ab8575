//! Multiboot v1 kernels (Multiboot Specification 0.6.96), the format QEMU's
//! `-kernel` accepts besides Linux.
//!
//! The kernel is loaded either through the header's address fields (flag 16,
//! the "a.out kludge") or, without them, as an ELF32 i386 executable. Modules
//! follow the kernel, page-aligned; the Multiboot information structure
//! follows the modules at a page-aligned address, with every string and array
//! it points to inside the same blob. Everything stays below 4 GiB, outside
//! the caller's reserved ranges and outside the legacy VGA/BIOS hole
//! 640 KiB..1 MiB (the memory map reports that hole as reserved).

use alloc::vec::Vec;
use core::ops::Range;

use super::elf::{self, Machine};
use super::error::{Error, Region, Result};
use super::plan::{Entry, EntryMode, FOUR_GIB, LoadPlan, Op, PlanBuilder, RamLayout};

/// Magic at the start of the header in the kernel image (§3.1.2).
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Magic the kernel finds in EAX at entry (§3.2).
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header lies within this many bytes from the image start (§3.1.1).
pub const SEARCH_LEN: usize = 8192;
/// Most modules one kernel may be given.
pub const MAX_MODULES: usize = 32;
/// Longest kernel or module command line accepted, in bytes (without NUL).
pub const MAX_CMDLINE_LEN: usize = 4096;
/// What `boot_loader_name` points to.
pub const BOOT_LOADER_NAME: &str = concat!("hypervisor ", env!("CARGO_PKG_VERSION"));

/// Header flag bits (§3.1.2). Bits 0-15 are requirements: a loader that
/// does not implement one must refuse the kernel. Bits 16-31 are optional.
pub mod flags {
    /// Align modules on 4 KiB pages (we always do).
    pub const PAGE_ALIGN: u32 = 1 << 0;
    /// Provide `mem_*` and the memory map (we always do).
    pub const MEMORY_INFO: u32 = 1 << 1;
    /// Provide a video mode table. We have no framebuffer: accepted and
    /// ignored, as QEMU does.
    pub const VIDEO_MODE: u32 = 1 << 2;
    /// The address fields are valid: load through them, not as ELF.
    pub const ADDRESS: u32 = 1 << 16;
    /// The requirement bits this loader honours.
    pub const SUPPORTED_REQUIRED: u32 = PAGE_ALIGN | MEMORY_INFO | VIDEO_MODE;
    /// All requirement bits.
    pub const REQUIRED_MASK: u32 = 0xFFFF;
}

/// Information structure flag bits we set (§3.3).
mod info_flags {
    pub const MEM: u32 = 1 << 0;
    pub const CMDLINE: u32 = 1 << 2;
    pub const MODS: u32 = 1 << 3;
    pub const MMAP: u32 = 1 << 6;
    pub const BOOT_LOADER_NAME: u32 = 1 << 9;
}

/// Field offsets in the information structure (§3.3).
mod info_off {
    pub const FLAGS: usize = 0;
    pub const MEM_LOWER: usize = 4;
    pub const MEM_UPPER: usize = 8;
    pub const CMDLINE: usize = 16;
    pub const MODS_COUNT: usize = 20;
    pub const MODS_ADDR: usize = 24;
    pub const MMAP_LENGTH: usize = 44;
    pub const MMAP_ADDR: usize = 48;
    pub const BOOT_LOADER_NAME: usize = 64;
    /// Size of the structure up to and including the VBE fields.
    pub const SIZE: usize = 88;
}

/// Size of one module-list entry: mod_start, mod_end, string, reserved.
const MODULE_ENTRY_SIZE: usize = 16;
/// Value of a memory-map entry's `size` field: the bytes after it
/// (base_addr u64, length u64, type u32).
const MMAP_ENTRY_SIZE: u32 = 20;
const MMAP_AVAILABLE: u32 = 1;
const MMAP_RESERVED: u32 = 2;

/// Conventional memory ends here; the VGA window and BIOS ROMs follow.
const LOWER_MEMORY_END: u64 = 640 * 1024;
const ONE_MIB: u64 = 1024 * 1024;
/// The legacy hole between conventional memory and 1 MiB.
const LEGACY_HOLE: Range<u64> = LOWER_MEMORY_END..ONE_MIB;

/// Header length without, with the address fields, and with the video fields.
const HEADER_BASE_LEN: usize = 12;
const HEADER_ADDRESS_LEN: usize = 32;
const HEADER_VIDEO_LEN: usize = 48;

/// A Multiboot header found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Byte offset of the magic in the image.
    pub offset: usize,
    /// The header's flags.
    pub flags: u32,
    /// The address fields, when flag 16 is set.
    pub addresses: Option<AddressFields>,
}

/// The header's address fields (§3.1.3), all guest-physical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressFields {
    /// Where the header's magic is loaded.
    pub header_addr: u32,
    /// Start of the text segment.
    pub load_addr: u32,
    /// End of the data segment; 0: the image runs to the end of the file.
    pub load_end_addr: u32,
    /// End of the bss; 0: no bss.
    pub bss_end_addr: u32,
    /// Where to jump.
    pub entry_addr: u32,
}

/// A boot module: its bytes and its command line.
#[derive(Debug, Clone, Copy)]
pub struct Module<'a> {
    /// The module's contents.
    pub data: &'a [u8],
    /// The module's command line (no NUL bytes).
    pub cmdline: &'a str,
}

/// Everything besides the kernel image that a Multiboot load needs.
#[derive(Debug, Clone, Copy)]
pub struct Config<'a> {
    /// Guest RAM and the ranges the hypervisor keeps.
    pub layout: RamLayout<'a>,
    /// The kernel command line (no NUL bytes).
    pub cmdline: &'a str,
    /// Modules, in the order the kernel sees them.
    pub modules: &'a [Module<'a>],
}

fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    let end = offset.checked_add(4)?;
    let raw = bytes.get(offset..end)?;
    raw.try_into().ok().map(u32::from_le_bytes)
}

/// Finds and checks the Multiboot header: 4-byte aligned, wholly within the
/// first 8 KiB, `magic + flags + checksum == 0`, no requirement bit this
/// loader does not implement. A magic whose checksum fails is skipped, as
/// QEMU does, and reported only if no good header follows.
pub fn find_header(image: &[u8]) -> Result<Header> {
    let window = image.get(..SEARCH_LEN).unwrap_or(image);
    let mut bad_checksum = None;
    for offset in (0..window.len()).step_by(4) {
        if read_u32(window, offset) != Some(HEADER_MAGIC) {
            continue;
        }
        let (Some(flags), Some(checksum)) = (read_u32(window, offset + 4), read_u32(window, offset + 8)) else {
            return Err(Error::MultibootHeaderTruncated { offset });
        };
        if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
            bad_checksum.get_or_insert(offset);
            continue;
        }
        return parse_header(window, offset, flags);
    }
    if let Some(offset) = bad_checksum {
        return Err(Error::MultibootChecksum { offset });
    }
    // Only for a better message: is there a header, just too far in?
    let late = (SEARCH_LEN..image.len()).step_by(4).find(|&offset| read_u32(image, offset) == Some(HEADER_MAGIC));
    Err(match late {
        Some(offset) => Error::MultibootHeaderTooLate { offset },
        None => Error::MultibootNoHeader,
    })
}

fn parse_header(window: &[u8], offset: usize, flags: u32) -> Result<Header> {
    let unsupported = flags & flags::REQUIRED_MASK & !flags::SUPPORTED_REQUIRED;
    if unsupported != 0 {
        return Err(Error::MultibootFlags { flags });
    }
    let len = if flags & flags::VIDEO_MODE != 0 {
        HEADER_VIDEO_LEN
    } else if flags & flags::ADDRESS != 0 {
        HEADER_ADDRESS_LEN
    } else {
        HEADER_BASE_LEN
    };
    let truncated = Error::MultibootHeaderTruncated { offset };
    if offset.checked_add(len).is_none_or(|end| end > window.len()) {
        return Err(truncated);
    }
    let field = |index: usize| read_u32(window, offset + 12 + 4 * index).ok_or(truncated.clone());
    let addresses = if flags & flags::ADDRESS != 0 {
        Some(AddressFields {
            header_addr: field(0)?,
            load_addr: field(1)?,
            load_end_addr: field(2)?,
            bss_end_addr: field(3)?,
            entry_addr: field(4)?,
        })
    } else {
        None
    };
    Ok(Header { offset, flags, addresses })
}

/// Plans booting the Multiboot kernel `image` with `config`'s command line
/// and modules. The plan's entry is 32-bit protected mode at the kernel's
/// entry point with EAX = [`BOOTLOADER_MAGIC`] and EBX = the information
/// structure's address.
pub fn plan<'a>(image: &[u8], config: &Config<'a>) -> Result<LoadPlan<'a>> {
    check_cmdline(config.cmdline, None)?;
    if config.modules.len() > MAX_MODULES {
        return Err(Error::TooManyModules { count: config.modules.len(), max: MAX_MODULES });
    }
    for (i, module) in config.modules.iter().enumerate() {
        check_cmdline(module.cmdline, Some(i))?;
    }

    let header = find_header(image)?;
    let mut builder = PlanBuilder::new(&config.layout, true, &[LEGACY_HOLE]);
    let rip = match &header.addresses {
        Some(addresses) => load_with_addresses(image, &header, addresses, &mut builder)?,
        None => load_elf(image, &mut builder)?,
    };

    let mut cursor = builder.end();
    let mut modules = Vec::with_capacity(config.modules.len());
    for (i, module) in config.modules.iter().enumerate() {
        let len = module.data.len() as u64;
        let gpa = builder.place(Region::Module(i), cursor, len)?;
        if len > 0 {
            builder.push(Op::Module { gpa, data: module.data });
        }
        // `place` checked that `gpa + len` stays below 4 GiB.
        cursor = gpa + len;
        modules.push(gpa..cursor);
    }

    let mut info = InfoBlob::new(config, &memory_map(&config.layout));
    let info_len = info.bytes.len() as u64;
    let info_gpa = builder.place(Region::BootInfo, cursor, info_len)?;
    info.relocate(info_gpa, &modules)?;
    builder.push(Op::Write { gpa: info_gpa, data: info.bytes });
    builder.finish(Entry { mode: EntryMode::Protected32, rip, rax: u64::from(BOOTLOADER_MAGIC), rbx: info_gpa, rsi: 0 })
}

fn check_cmdline(cmdline: &str, module: Option<usize>) -> Result<()> {
    if cmdline.len() > MAX_CMDLINE_LEN {
        return Err(Error::CmdlineTooLong { module, len: cmdline.len(), max: MAX_CMDLINE_LEN });
    }
    if cmdline.bytes().any(|b| b == 0) {
        return Err(Error::CmdlineNul { module });
    }
    Ok(())
}

/// Without flag 16 the kernel must be ELF32 i386 (QEMU refuses ELF64 too).
fn load_elf(image: &[u8], builder: &mut PlanBuilder<'_>) -> Result<u64> {
    if !image.starts_with(b"\x7fELF") {
        return Err(Error::MultibootNotElf);
    }
    elf::load_segments(image, Machine::I386, builder).map_err(|e| match e {
        Error::ElfClass { found: 64, .. } => Error::MultibootElf64,
        e => e,
    })
}

/// Loads through the address fields (§3.1.3): the bytes from file offset
/// `header.offset - (header_addr - load_addr)` go to `load_addr`, up to
/// `load_end_addr` (0: end of file); `load_end_addr..bss_end_addr` is zeroed.
fn load_with_addresses(image: &[u8], header: &Header, a: &AddressFields, builder: &mut PlanBuilder<'_>) -> Result<u64> {
    let bad = |reason| Error::MultibootAddresses { reason };
    let header_addr = u64::from(a.header_addr);
    let load_addr = u64::from(a.load_addr);
    let entry = u64::from(a.entry_addr);

    let delta = header_addr.checked_sub(load_addr).ok_or(bad("header_addr is below load_addr"))?;
    let load_offset =
        (header.offset as u64).checked_sub(delta).ok_or(bad("load_addr lies before the start of the image"))?;
    // `load_offset <= header.offset < image.len()`.
    let available = (image.len() as u64).saturating_sub(load_offset);
    let load_end = if a.load_end_addr == 0 {
        load_addr.checked_add(available).ok_or(Error::AddressOverflow { region: Region::KernelText })?
    } else {
        u64::from(a.load_end_addr)
    };
    let load_len = load_end.checked_sub(load_addr).ok_or(bad("load_end_addr is below load_addr"))?;
    if load_len > available {
        return Err(bad("load_end_addr lies past the end of the image"));
    }
    // `header_addr` is where the header itself is loaded, so it must be.
    if header_addr + HEADER_BASE_LEN as u64 > load_end {
        return Err(bad("the header lies outside the loaded range"));
    }
    let bss_end = match a.bss_end_addr {
        0 => load_end,
        end if u64::from(end) < load_end => {
            return Err(bad("bss_end_addr is below load_end_addr"));
        }
        end => u64::from(end),
    };
    if !(load_addr..load_end).contains(&entry) {
        return Err(Error::EntryNotLoaded { entry });
    }

    builder.claim(Region::KernelText, load_addr, load_len)?;
    builder.claim(Region::KernelBss, load_end, bss_end - load_end)?;
    let src = usize::try_from(load_offset)
        .ok()
        .zip(usize::try_from(load_offset + load_len).ok())
        .map(|(start, end)| start..end)
        .ok_or(bad("load_end_addr lies past the end of the image"))?;
    builder.push(Op::Copy { gpa: load_addr, src });
    if bss_end > load_end {
        builder.push(Op::Zero { gpa: load_end, len: bss_end - load_end });
    }
    Ok(entry)
}

/// One memory-map entry: base, length, type.
type MapEntry = (u64, u64, u32);

/// The guest's memory map: RAM `0..ram_size` is available except the legacy
/// hole and the caller's reserved ranges, which are reported reserved.
fn memory_map(layout: &RamLayout<'_>) -> Vec<MapEntry> {
    let ram = layout.ram_size;
    let reserved: Vec<Range<u64>> =
        layout.reserved.iter().cloned().chain(core::iter::once(LEGACY_HOLE)).filter(|r| r.start < r.end).collect();
    let mut points: Vec<u64> = Vec::with_capacity(2 * reserved.len() + 2);
    points.push(0);
    points.push(ram);
    for r in &reserved {
        points.push(r.start.min(ram));
        points.push(r.end.min(ram));
    }
    points.sort_unstable();
    points.dedup();

    let mut map: Vec<MapEntry> = Vec::new();
    for pair in points.windows(2) {
        let &[start, end] = pair else { continue };
        let kind = if reserved.iter().any(|r| r.start < end && start < r.end) { MMAP_RESERVED } else { MMAP_AVAILABLE };
        match map.last_mut() {
            Some((base, len, last)) if *last == kind && *base + *len == start => *len += end - start,
            _ => map.push((start, end - start, kind)),
        }
    }
    map
}

/// `mem_lower` and `mem_upper` in KiB: conventional memory, and memory from
/// 1 MiB up to the first hole (end of RAM, 4 GiB, or a reserved range).
fn mem_lower_upper(layout: &RamLayout<'_>) -> (u32, u32) {
    let lower = layout.ram_size.min(LOWER_MEMORY_END) / 1024;
    let first_hole = layout
        .reserved
        .iter()
        .filter(|r| r.start < r.end && r.end > ONE_MIB)
        .map(|r| r.start.max(ONE_MIB))
        .fold(layout.ram_size.min(FOUR_GIB), u64::min);
    let upper = first_hole.saturating_sub(ONE_MIB) / 1024;
    // Both are at most 4 GiB / 1 KiB, so they fit.
    (lower as u32, upper as u32)
}

/// The information structure with everything it points to, built with
/// offsets relative to its start and then relocated to its guest address.
struct InfoBlob {
    bytes: Vec<u8>,
    cmdline: usize,
    name: usize,
    mods: usize,
    mod_strings: Vec<usize>,
    mmap: usize,
}

impl InfoBlob {
    fn new(config: &Config<'_>, map: &[MapEntry]) -> Self {
        let mut bytes = alloc::vec![0u8; info_off::SIZE];
        let cmdline = push_cstr(&mut bytes, config.cmdline);
        let name = push_cstr(&mut bytes, BOOT_LOADER_NAME);
        align4(&mut bytes);
        let mods = bytes.len();
        bytes.resize(mods + MODULE_ENTRY_SIZE * config.modules.len(), 0);
        let mod_strings = config.modules.iter().map(|m| push_cstr(&mut bytes, m.cmdline)).collect();
        align4(&mut bytes);
        let mmap = bytes.len();
        for &(base, len, kind) in map {
            bytes.extend_from_slice(&MMAP_ENTRY_SIZE.to_le_bytes());
            bytes.extend_from_slice(&base.to_le_bytes());
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(&kind.to_le_bytes());
        }
        let mmap_len = bytes.len() - mmap;

        let (mem_lower, mem_upper) = mem_lower_upper(&config.layout);
        let flags =
            info_flags::MEM | info_flags::CMDLINE | info_flags::MODS | info_flags::MMAP | info_flags::BOOT_LOADER_NAME;
        put32(&mut bytes, info_off::FLAGS, flags);
        put32(&mut bytes, info_off::MEM_LOWER, mem_lower);
        put32(&mut bytes, info_off::MEM_UPPER, mem_upper);
        put32(&mut bytes, info_off::MODS_COUNT, config.modules.len() as u32);
        put32(&mut bytes, info_off::MMAP_LENGTH, mmap_len as u32);
        Self { bytes, cmdline, name, mods, mod_strings, mmap }
    }

    /// Fills in the absolute guest-physical pointers, the blob being at
    /// `base` and module `i` at `modules[i]`.
    fn relocate(&mut self, base: u64, modules: &[Range<u64>]) -> Result<()> {
        let len = self.bytes.len() as u64;
        let addr = |offset: usize| {
            base.checked_add(offset as u64)
                .and_then(|a| u32::try_from(a).ok())
                .ok_or(Error::NoRoom { region: Region::BootInfo, len })
        };
        put32(&mut self.bytes, info_off::CMDLINE, addr(self.cmdline)?);
        put32(&mut self.bytes, info_off::MODS_ADDR, addr(self.mods)?);
        put32(&mut self.bytes, info_off::MMAP_ADDR, addr(self.mmap)?);
        put32(&mut self.bytes, info_off::BOOT_LOADER_NAME, addr(self.name)?);
        for (i, (range, &string)) in modules.iter().zip(&self.mod_strings).enumerate() {
            let entry = self.mods + i * MODULE_ENTRY_SIZE;
            let module_addr = |a: u64| {
                u32::try_from(a).map_err(|_| Error::NoRoom { region: Region::Module(i), len: range.end - range.start })
            };
            put32(&mut self.bytes, entry, module_addr(range.start)?);
            put32(&mut self.bytes, entry + 4, module_addr(range.end)?);
            put32(&mut self.bytes, entry + 8, addr(string)?);
        }
        Ok(())
    }
}

/// Appends `s` and a NUL; returns where it starts.
fn push_cstr(bytes: &mut Vec<u8>, s: &str) -> usize {
    let at = bytes.len();
    bytes.extend_from_slice(s.as_bytes());
    bytes.push(0);
    at
}

fn align4(bytes: &mut Vec<u8>) {
    let padded = bytes.len().next_multiple_of(4);
    bytes.resize(padded, 0);
}

/// Stores `value` at `offset`; offsets come from the layout built in
/// [`InfoBlob::new`] and are always inside the blob.
fn put32(bytes: &mut [u8], offset: usize, value: u32) {
    let dst = offset.checked_add(4).and_then(|end| bytes.get_mut(offset..end));
    if let Some(dst) = dst {
        dst.copy_from_slice(&value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::testutil::*;
    use alloc::string::String;

    const MIB: u64 = 1 << 20;
    const LOW: [Range<u64>; 1] = [Range { start: 0, end: 0x1000 }];

    /// The error of a refused plan, without printing a big plan on success.
    fn err<T>(result: Result<T>) -> Error {
        match result {
            Ok(_) => panic!("plan unexpectedly accepted"),
            Err(e) => e,
        }
    }

    fn config<'a>(ram_size: u64, cmdline: &'a str, modules: &'a [Module<'a>]) -> Config<'a> {
        Config { layout: RamLayout { ram_size, reserved: &LOW }, cmdline, modules }
    }

    /// A kernel loaded through the address fields: 0x200 bytes with the
    /// header at offset 0x10, loaded at 1 MiB, bss to 1 MiB + 4 KiB.
    fn kludge_kernel() -> Vec<u8> {
        let header = mb_header(
            flags::PAGE_ALIGN | flags::MEMORY_INFO | flags::ADDRESS,
            &[0x10_0010, 0x10_0000, 0, 0x10_1000, 0x10_0040],
        );
        image_with_header(0x200, 0x10, &header)
    }

    // --- Finding the header ---

    #[test]
    fn finds_an_aligned_header_and_its_fields() {
        let header = find_header(&kludge_kernel()).unwrap();
        assert_eq!(
            header,
            Header {
                offset: 0x10,
                flags: 0x1_0003,
                addresses: Some(AddressFields {
                    header_addr: 0x10_0010,
                    load_addr: 0x10_0000,
                    load_end_addr: 0,
                    bss_end_addr: 0x10_1000,
                    entry_addr: 0x10_0040,
                }),
            }
        );
    }

    #[test]
    fn ignores_misaligned_magic_and_skips_bad_checksums() {
        let good = mb_header(0, &[]);
        // Only a misaligned copy.
        let image = image_with_header(0x100, 0x22, &good);
        assert_eq!(find_header(&image).unwrap_err(), Error::MultibootNoHeader);
        // A bad one, then a good one: the good one wins.
        let mut bad = good.clone();
        bad[8] ^= 1;
        let mut image = image_with_header(0x100, 0x40, &good);
        image[0x20..0x2C].copy_from_slice(&bad);
        assert_eq!(find_header(&image).unwrap().offset, 0x40);
        // Only a bad one.
        let image = image_with_header(0x100, 0x20, &bad);
        assert_eq!(find_header(&image).unwrap_err(), Error::MultibootChecksum { offset: 0x20 });
    }

    #[test]
    fn refuses_headers_past_or_across_the_8_kib_limit() {
        let header = mb_header(0, &[]);
        let image = image_with_header(0x3000, 0x2000, &header);
        assert_eq!(find_header(&image).unwrap_err(), Error::MultibootHeaderTooLate { offset: 0x2000 });
        // Magic in, flags and checksum out.
        let image = image_with_header(0x3000, 0x1FFC, &header);
        assert_eq!(find_header(&image).unwrap_err(), Error::MultibootHeaderTruncated { offset: 0x1FFC });
        // Address fields cut by the limit.
        let header = mb_header(flags::ADDRESS, &[0; 5]);
        let image = image_with_header(0x3000, 0x1FF0, &header);
        assert_eq!(find_header(&image).unwrap_err(), Error::MultibootHeaderTruncated { offset: 0x1FF0 });
        // Address fields cut by the end of the image.
        let image = image_with_header(0x20, 0x8, &header[..0x18]);
        assert_eq!(find_header(&image).unwrap_err(), Error::MultibootHeaderTruncated { offset: 0x8 });
    }

    #[test]
    fn checks_requirement_flags() {
        let find = |flags: u32, fields: &[u32]| find_header(&image_with_header(0x100, 0, &mb_header(flags, fields)));
        // Video mode: accepted, ignored.
        assert!(find(flags::VIDEO_MODE, &[0; 9]).is_ok());
        // Optional bits above 16 are ignored.
        assert!(find(1 << 20, &[]).is_ok());
        for bit in 3..16 {
            assert_eq!(find(1 << bit, &[]).unwrap_err(), Error::MultibootFlags { flags: 1 << bit });
        }
    }

    // --- Address-field kernels ---

    #[test]
    fn plans_an_address_field_kernel_with_modules_and_exact_info() {
        let kernel = kludge_kernel();
        let big = vec![0x33u8; 0x1001];
        let modules = [Module { data: b"first", cmdline: "mod0 a" }, Module { data: &big, cmdline: "m1" }];
        let cfg = config(16 * MIB, "console=ttyS0", &modules);
        let plan = plan(&kernel, &cfg).unwrap();

        let info_gpa = 0x10_4000;
        assert_eq!(
            *plan.entry(),
            Entry { mode: EntryMode::Protected32, rip: 0x10_0040, rax: 0x2BAD_B002, rbx: info_gpa, rsi: 0 }
        );
        let ops = plan.ops();
        assert_eq!(ops.len(), 5);
        assert_eq!(ops[0], Op::Copy { gpa: 0x10_0000, src: 0..0x200 });
        assert_eq!(ops[1], Op::Zero { gpa: 0x10_0200, len: 0xE00 });
        assert_eq!(ops[2], Op::Module { gpa: 0x10_1000, data: b"first" });
        assert_eq!(ops[3], Op::Module { gpa: 0x10_2000, data: &big });
        let Op::Write { gpa, data: info } = &ops[4] else {
            panic!("last op is the info structure: {:?}", ops[4]);
        };
        assert_eq!(*gpa, info_gpa);

        // Fixed part (Multiboot 0.6.96 §3.3).
        let base = info_gpa as u32;
        assert_eq!(u32_at(info, 0), 0x24D, "MEM|CMDLINE|MODS|MMAP|BOOT_LOADER_NAME");
        assert_eq!(u32_at(info, 4), 640);
        assert_eq!(u32_at(info, 8), 15 * 1024);
        assert_eq!(u32_at(info, 12), 0, "no boot device");
        assert_eq!(u32_at(info, 16), base + 88);
        assert_eq!(u32_at(info, 20), 2);
        let name_at = 88 + "console=ttyS0\0".len();
        let mods_at = (name_at + BOOT_LOADER_NAME.len() + 1).next_multiple_of(4);
        assert_eq!(u32_at(info, 24), base + mods_at as u32);
        assert!(info[28..44].iter().all(|&b| b == 0), "no symbol table");
        let str0_at = mods_at + 32;
        let str1_at = str0_at + "mod0 a\0".len();
        let mmap_at = (str1_at + "m1\0".len()).next_multiple_of(4);
        assert_eq!(u32_at(info, 44), 4 * 24);
        assert_eq!(u32_at(info, 48), base + mmap_at as u32);
        assert_eq!(u32_at(info, 64), base + name_at as u32);
        assert!(info[52..64].iter().all(|&b| b == 0));
        assert!(info[68..88].iter().all(|&b| b == 0), "no APM or VBE");

        // Strings, NUL-terminated, inside the blob.
        assert_eq!(&info[88..name_at], b"console=ttyS0\0");
        assert_eq!(&info[name_at..name_at + BOOT_LOADER_NAME.len()], BOOT_LOADER_NAME.as_bytes());
        assert_eq!(&info[str0_at..str1_at], b"mod0 a\0");
        assert_eq!(&info[str1_at..str1_at + 3], b"m1\0");

        // Module list: start, end (exclusive), string, reserved.
        let words: Vec<u32> = (0..8).map(|i| u32_at(info, mods_at + 4 * i)).collect();
        assert_eq!(
            words,
            vec![0x10_1000, 0x10_1005, base + str0_at as u32, 0, 0x10_2000, 0x10_3001, base + str1_at as u32, 0]
        );

        // Memory map: size (20) precedes each base/length/type entry.
        let entries: Vec<(u32, u64, u64, u32)> = (0..4)
            .map(|i| {
                let at = mmap_at + 24 * i;
                (u32_at(info, at), u64_at(info, at + 4), u64_at(info, at + 12), u32_at(info, at + 20))
            })
            .collect();
        assert_eq!(
            entries,
            vec![
                (20, 0, 0x1000, 2),
                (20, 0x1000, 0xA0000 - 0x1000, 1),
                (20, 0xA0000, 0x60000, 2),
                (20, MIB, 15 * MIB, 1),
            ]
        );
        assert_eq!(info.len(), mmap_at + 4 * 24);

        // Applied: kernel, zeroed bss, modules, info.
        let mut ram = vec![0xAAu8; 16 * MIB as usize];
        plan.apply(&kernel, &mut ram[..]).unwrap();
        assert_eq!(&ram[0x10_0000..0x10_0200], &kernel[..]);
        assert!(ram[0x10_0200..0x10_1000].iter().all(|&b| b == 0));
        assert_eq!(&ram[0x10_1000..0x10_1005], b"first");
        assert_eq!(ram[0x10_1005], 0xAA);
        assert_eq!(&ram[0x10_2000..0x10_3001], &big[..]);
        assert_eq!(&ram[0x10_4000..0x10_4000 + info.len()], &info[..]);
    }

    #[test]
    fn computes_the_load_offset_from_header_and_load_addresses() {
        // Header at file offset 0x100 belongs at 0x200100; text starts at
        // 0x200080, so loading starts at file offset 0x80.
        let header = mb_header(flags::ADDRESS, &[0x20_0100, 0x20_0080, 0x20_0180, 0, 0x20_0080]);
        let image = image_with_header(0x400, 0x100, &header);
        let plan = plan(&image, &config(16 * MIB, "", &[])).unwrap();
        assert_eq!(plan.ops()[0], Op::Copy { gpa: 0x20_0080, src: 0x80..0x180 });
        assert!(matches!(plan.ops()[1], Op::Write { gpa: 0x20_1000, .. }));
        assert_eq!(plan.ops().len(), 2, "no bss");
    }

    /// Plans a kernel whose header at offset 0x100 has these address fields.
    fn plan_fields(fields: [u32; 5], ram_size: u64) -> Result<LoadPlan<'static>> {
        let image = image_with_header(0x400, 0x100, &mb_header(flags::ADDRESS, &fields));
        plan(&image, &config(ram_size, "", &[]))
    }

    #[test]
    fn refuses_inconsistent_address_fields() {
        let bad = |reason| Err(Error::MultibootAddresses { reason });
        let m = 0x10_0000;
        assert_eq!(plan_fields([m, m + 4, 0, 0, m + 4], 16 * MIB), bad("header_addr is below load_addr"));
        assert_eq!(plan_fields([m + 0x200, m, 0, 0, m], 16 * MIB), bad("load_addr lies before the start of the image"));
        assert_eq!(plan_fields([m + 0x100, m, m - 1, 0, m], 16 * MIB), bad("load_end_addr is below load_addr"));
        assert_eq!(
            plan_fields([m + 0x100, m, m + 0x401, 0, m], 16 * MIB),
            bad("load_end_addr lies past the end of the image")
        );
        assert_eq!(
            plan_fields([m + 0x100, m, m + 0x104, 0, m], 16 * MIB),
            bad("the header lies outside the loaded range")
        );
        assert_eq!(
            plan_fields([m + 0x100, m, m + 0x200, m + 0x1FF, m], 16 * MIB),
            bad("bss_end_addr is below load_end_addr")
        );
        assert_eq!(
            plan_fields([m + 0x100, m, m + 0x200, 0, m + 0x200], 16 * MIB),
            Err(Error::EntryNotLoaded { entry: m as u64 + 0x200 })
        );
    }

    #[test]
    fn refuses_address_field_kernels_outside_usable_ram() {
        // In the hypervisor's reserved low page.
        assert!(matches!(
            plan_fields([0x100, 0, 0, 0, 0], 16 * MIB),
            Err(Error::Reserved { region: Region::KernelText, .. })
        ));
        // In the legacy VGA/BIOS hole.
        assert_eq!(
            plan_fields([0xA0100, 0xA0000, 0, 0, 0xA0000], 16 * MIB),
            Err(Error::Reserved { region: Region::KernelText, start: 0xA0000, end: 0xA0400, reserved: LEGACY_HOLE })
        );
        // Past the end of RAM (bss).
        assert!(matches!(
            plan_fields([0x10_0100, 0x10_0000, 0, 0x200_0000, 0x10_0000], 16 * MIB),
            Err(Error::OutsideRam { region: Region::KernelBss, .. })
        ));
        // Across 4 GiB, with RAM above it.
        assert_eq!(
            plan_fields([0xFFFF_FF00, 0xFFFF_FE00, 0, 0, 0xFFFF_FE00], 8 << 30),
            Err(Error::Above4GiB { region: Region::KernelText, start: 0xFFFF_FE00, end: 0x1_0000_0200 })
        );
    }

    // --- ELF kernels ---

    #[test]
    fn plans_an_elf32_kernel_with_the_header_inside() {
        let mut text = mb_header(flags::PAGE_ALIGN, &[]);
        text.extend_from_slice(&[0xF4; 20]);
        let mut seg = Seg::text(0x10_0000, &text);
        seg.vaddr = 0xC010_0000;
        let image = elf32(0xC010_000C, &[seg, Seg::data(0x10_1000, &[1; 8], 0x2000)]);
        let plan = plan(&image, &config(16 * MIB, "", &[])).unwrap();
        assert_eq!(plan.entry().rip, 0x10_000C);
        assert_eq!(plan.entry().rbx, 0x10_3000, "after the bss, page-aligned");
        assert_eq!(plan.ops().len(), 4);
    }

    #[test]
    fn refuses_elf64_and_non_elf_kernels_without_address_fields() {
        let mut text = mb_header(0, &[]);
        text.extend_from_slice(&[0xF4; 4]);
        let image = elf64(0x10_0000, &[Seg::text(0x10_0000, &text)]);
        assert_eq!(plan(&image, &config(16 * MIB, "", &[])).unwrap_err(), Error::MultibootElf64);
        let image = image_with_header(0x100, 0, &mb_header(0, &[]));
        assert_eq!(plan(&image, &config(16 * MIB, "", &[])).unwrap_err(), Error::MultibootNotElf);
    }

    #[test]
    fn address_fields_take_precedence_over_elf() {
        // An ELF whose header also has flag 16: loaded through the fields.
        let mut elf = elf32(0x10_0000, &[Seg::text(0x40_0000, &[0xF4; 0x40])]);
        let offset = elf.len();
        elf.extend_from_slice(&mb_header(flags::ADDRESS, &[0x10_0000 + offset as u32, 0x10_0000, 0, 0, 0x10_0000]));
        let plan = plan(&elf, &config(16 * MIB, "", &[])).unwrap();
        assert_eq!(plan.ops()[0], Op::Copy { gpa: 0x10_0000, src: 0..elf.len() });
    }

    // --- Arguments and placement ---

    #[test]
    fn refuses_bad_command_lines_and_too_many_modules() {
        let kernel = kludge_kernel();
        assert_eq!(plan(&kernel, &config(16 * MIB, "a\0b", &[])).unwrap_err(), Error::CmdlineNul { module: None });
        let long = "x".repeat(MAX_CMDLINE_LEN + 1);
        assert_eq!(
            plan(&kernel, &config(16 * MIB, &long, &[])).unwrap_err(),
            Error::CmdlineTooLong { module: None, len: MAX_CMDLINE_LEN + 1, max: MAX_CMDLINE_LEN }
        );
        let nul = [Module { data: b"", cmdline: "ok" }, Module { data: b"", cmdline: "\0" }];
        assert_eq!(plan(&kernel, &config(16 * MIB, "", &nul)).unwrap_err(), Error::CmdlineNul { module: Some(1) });
        let many = vec![Module { data: b"m", cmdline: "" }; MAX_MODULES + 1];
        assert_eq!(
            plan(&kernel, &config(16 * MIB, "", &many)).unwrap_err(),
            Error::TooManyModules { count: MAX_MODULES + 1, max: MAX_MODULES }
        );
    }

    #[test]
    fn places_modules_around_reserved_ranges() {
        let kernel = kludge_kernel();
        let module = vec![9u8; 0x10_0000];
        let modules = [Module { data: &module, cmdline: "" }];
        let reserved = [Range { start: 0x20_0000, end: 0x30_0000 }];
        let cfg =
            Config { layout: RamLayout { ram_size: 16 * MIB, reserved: &reserved }, cmdline: "", modules: &modules };
        let plan = plan(&kernel, &cfg).unwrap();
        assert!(matches!(plan.ops()[2], Op::Module { gpa: 0x30_0000, .. }));
        assert_eq!(plan.entry().rbx, 0x40_0000);
        // The reserved range is reported, and is the first hole above 1 MiB.
        let Op::Write { data: info, .. } = &plan.ops()[3] else {
            panic!("info structure expected");
        };
        assert_eq!(u32_at(info, 8), 1024);
        assert_eq!(u32_at(info, 44), 5 * 24);
    }

    #[test]
    fn refuses_modules_that_do_not_fit() {
        let kernel = kludge_kernel();
        let module = vec![0u8; 2 * MIB as usize];
        let modules = [Module { data: &module, cmdline: "" }];
        assert_eq!(
            err(plan(&kernel, &config(2 * MIB, "", &modules))),
            Error::NoRoom { region: Region::Module(0), len: 2 * MIB }
        );
        // The module fits exactly; the info structure does not.
        let module = vec![0u8; 0xF_F000];
        let modules = [Module { data: &module, cmdline: "" }];
        assert!(matches!(
            err(plan(&kernel, &config(2 * MIB, "", &modules))),
            Error::NoRoom { region: Region::BootInfo, .. }
        ));
    }

    #[test]
    fn reports_memory_up_to_4_gib_in_mem_upper_and_all_of_it_in_the_map() {
        let plan = plan(&kludge_kernel(), &config(8 << 30, "", &[])).unwrap();
        let Op::Write { data: info, .. } = &plan.ops()[2] else {
            panic!("info structure expected");
        };
        assert_eq!(u32_at(info, 8), (4 << 20) - 1024);
        let mmap = (u32_at(info, 48) - plan.entry().rbx as u32) as usize;
        let last = mmap + 3 * 24;
        assert_eq!((u64_at(info, last + 4), u64_at(info, last + 12)), (MIB, (8 << 30) - MIB));
    }

    /// Fuzzing regression: an empty (or reversed) reserved range reserves
    /// nothing, neither for placement nor in the memory map.
    #[test]
    fn empty_reserved_ranges_reserve_nothing() {
        let header = mb_header(flags::ADDRESS, &[0x1_0010, 0x1_0000, 0, 0x2_0000, 0x1_0010]);
        let image = image_with_header(0x100, 0x10, &header);
        #[allow(clippy::reversed_empty_ranges)]
        let reserved = [0x1_1000..0x1_1000, 0x1_8000..0x1_2000];
        let cfg = Config { layout: RamLayout { ram_size: 2 * MIB, reserved: &reserved }, cmdline: "", modules: &[] };
        let plan = plan(&image, &cfg).unwrap();
        let Op::Write { data: info, .. } = &plan.ops()[2] else {
            panic!("info structure expected");
        };
        assert_eq!(u32_at(info, 44), 3 * 24, "available, hole, available");
    }

    #[test]
    fn messages_are_one_sentence_case_line() {
        let samples = [
            Error::ArchiveChecksum { block: 3 },
            Error::ArchiveDuplicate { name: String::from("a") },
            Error::ElfMachine { machine: 40, expected: Machine::I386 },
            Error::Reserved { region: Region::Segment(1), start: 0, end: 1, reserved: 0..1 },
            Error::Overlap { first: Region::Module(0), second: Region::BootInfo, gpa: 5 },
            Error::CmdlineNul { module: Some(2) },
            Error::MultibootElf64,
            Error::GuestWrite { gpa: 1, len: 2 },
        ];
        for e in samples {
            let msg = alloc::format!("{e}");
            assert!(msg.starts_with(|c: char| c.is_ascii_uppercase()), "{msg}");
            assert!(!msg.ends_with('.') && !msg.contains('\n'), "{msg}");
        }
        assert_eq!(
            alloc::format!("{}", Error::CmdlineNul { module: Some(2) }),
            "Command line of module 2 contains a NUL byte"
        );
    }
}
