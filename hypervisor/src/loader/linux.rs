//! Linux kernels (bzImage) through the 64-bit boot protocol, as described in
//! the kernel's `Documentation/arch/x86/boot.rst` (sections cited below by
//! their titles) and `zero-page.rst`.
//!
//! A bzImage is a real-mode setup part (`setup_sects + 1` sectors of 512
//! bytes, holding the setup header at 0x1F1) followed by the protected-mode
//! kernel. We never run the real-mode part: the protected-mode kernel is
//! copied to its load address and entered at its 64-bit entry point
//! (load address + 0x200) with RSI pointing to a zero page (`struct
//! boot_params`, 4 KiB) that carries a copy of the setup header, the command
//! line and initrd locations, and an e820 memory map.
//!
//! Where things go:
//! - The zero page and the command line go at the start of a boot area the
//!   caller sets aside (the hypervisor lends part of its reserved low
//!   64 KiB); the e820 map reports that area reserved.
//! - The kernel goes at `pref_address` if it is relocatable and fits there,
//!   else at the next `kernel_alignment` boundary above it where it fits; a
//!   kernel that is not relocatable goes at `pref_address` or nowhere. It
//!   claims `max(file size, init_size)` bytes: the decompressor works in
//!   that much memory from its load address. It never runs below
//!   `pref_address` (= `LOAD_PHYSICAL_ADDR`; the compressed kernel's
//!   `startup_64` raises a lower address to it), so loading lower would not
//!   save memory and is not tried.
//! - The initramfs goes page-aligned into the highest RAM below the
//!   kernel's `initrd_addr_max` that is free ("Details of header fields",
//!   `initrd_addr_max`), like QEMU and GRUB do.
//! - Everything stays below 4 GiB, the range the hypervisor identity-maps
//!   for the 64-bit entry. A kernel with `XLF_CAN_BE_LOADED_ABOVE_4G` would
//!   take its initrd anywhere; for it, as QEMU does, the limit is just
//!   raised to 4 GiB. The `ext_*` fields are filled all the same.
//!
//! As everywhere in the loader, the image is hostile: every field is
//! checked, all arithmetic is checked, and each refusal has its own
//! [`Error`].

use alloc::vec::Vec;
use core::ops::Range;

use super::error::{Error, Region, Result};
use super::plan::{Entry, EntryMode, FOUR_GIB, LoadPlan, Op, PAGE_SIZE, PlanBuilder, normalize};

/// The oldest boot protocol accepted: 2.12 introduced `xloadflags` and with
/// it `XLF_KERNEL_64`, the only way a kernel says it has a 64-bit entry
/// ("The 64-bit boot protocol"). It dates from Linux 3.8 (2013).
pub const MIN_VERSION: u16 = 0x020c;
/// Size of the zero page (`struct boot_params`).
pub const BOOT_PARAMS_SIZE: u64 = 0x1000;
/// Entries the zero page's e820 table holds (`E820_MAX_ENTRIES_ZEROPAGE`).
pub const E820_MAX: usize = 128;
/// `type_of_loader` for a boot loader without an assigned ID
/// ("Details of header fields", `type_of_loader`).
pub const TYPE_OF_LOADER: u8 = 0xff;
/// The 64-bit entry point, from the start of the protected-mode kernel
/// ("64-bit Boot Protocol").
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// e820 entry types (zero-page.rst, ACPI "Address Range Types").
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Conventional memory ends here; the VGA window and BIOS ROMs follow. Real
/// firmware reports the hole reserved, and nothing is placed there.
const LEGACY_HOLE: Range<u64> = 0xA_0000..ONE_MIB;
const ONE_MIB: u64 = 0x10_0000;

/// Field offsets in the image and in the zero page (the setup header sits
/// at the same offset in both: "The Real-Mode Kernel Header").
pub(crate) mod off {
    pub const SETUP_HEADER: usize = 0x1f1;
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const SYSSIZE: usize = 0x1f4;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const CODE32_START: usize = 0x214;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    pub const XLOADFLAGS: usize = 0x236;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const PAYLOAD_OFFSET: usize = 0x248;
    pub const PAYLOAD_LENGTH: usize = 0x24c;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
    /// The end of `init_size`, the last field this loader reads.
    pub const FIELDS_END: usize = 0x264;
    /// zero-page.rst: where the setup header copy must stop (the
    /// `edd_mbr_sig_buffer` follows).
    pub const HEADER_COPY_END: usize = 0x290;
    // Zero-page fields outside the setup header (zero-page.rst).
    pub const EXT_RAMDISK_IMAGE: usize = 0x0c0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0c4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0c8;
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const E820_TABLE: usize = 0x2d0;
}

/// `loadflags` bits ("Details of header fields", `loadflags`).
pub mod loadflags {
    /// The protected-mode code is loaded at 0x100000 (a bzImage).
    pub const LOADED_HIGH: u8 = 1 << 0;
    /// `heap_end_ptr` is valid; only the real-mode setup code uses it.
    pub const CAN_USE_HEAP: u8 = 1 << 7;
}

/// `xloadflags` bits ("Details of header fields", `xloadflags`).
pub mod xloadflags {
    /// The kernel has the legacy 64-bit entry point at 0x200.
    pub const KERNEL_64: u16 = 1 << 0;
    /// Kernel, boot_params, command line and ramdisk may be above 4 GiB.
    pub const CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
}

/// The setup header fields the loader uses, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupHeader {
    /// Boot protocol version, major in the high byte.
    pub version: u16,
    /// Size of the real-mode part in bytes, `(setup_sects + 1) * 512`
    /// (`setup_sects` 0 meaning 4).
    pub setup_len: usize,
    /// End of the setup header in the image (0x202 + the byte at 0x201).
    pub header_end: usize,
    pub loadflags: u8,
    pub xloadflags: u16,
    /// Size of the protected-mode code in 16-byte paragraphs.
    pub syssize: u32,
    /// Highest address the initrd may occupy.
    pub initrd_addr_max: u32,
    pub kernel_alignment: u32,
    pub relocatable: bool,
    /// Longest command line, without its NUL.
    pub cmdline_size: u32,
    pub pref_address: u64,
    /// Memory the kernel needs from its run address while it decompresses.
    pub init_size: u32,
}

/// Everything besides the image that a Linux load needs.
#[derive(Debug, Clone)]
pub struct Config<'a> {
    /// Guest RAM, as ranges of guest-physical addresses (any order; the gaps
    /// between them are holes). Reported as e820 type 1 (RAM).
    pub ram: &'a [Range<u64>],
    /// Ranges the hypervisor keeps: nothing is written there, and the e820
    /// map reports them as type 2 (reserved), inside RAM or not.
    pub reserved: &'a [Range<u64>],
    /// RAM the caller sets aside for the zero page (at its start, which
    /// must be page-aligned) and the command line (right after it). Not in
    /// `reserved`; reported reserved in the e820 map.
    pub boot_area: Range<u64>,
    /// The kernel command line (no NUL bytes).
    pub cmdline: &'a str,
    /// The initramfs, if any (an empty one counts as none).
    pub initrd: Option<&'a [u8]>,
}

fn read_u8(image: &[u8], at: usize) -> Option<u8> {
    image.get(at).copied()
}

fn read_u16(image: &[u8], at: usize) -> Option<u16> {
    image.get(at..at.checked_add(2)?)?.try_into().ok().map(u16::from_le_bytes)
}

fn read_u32(image: &[u8], at: usize) -> Option<u32> {
    image.get(at..at.checked_add(4)?)?.try_into().ok().map(u32::from_le_bytes)
}

fn read_u64(image: &[u8], at: usize) -> Option<u64> {
    image.get(at..at.checked_add(8)?)?.try_into().ok().map(u64::from_le_bytes)
}

/// Whether `image` looks like a Linux kernel: the 0xAA55 boot flag at 0x1FE
/// and "HdrS" at 0x202 ("The Real-Mode Kernel Header").
pub fn is_linux(image: &[u8]) -> bool {
    read_u16(image, off::BOOT_FLAG) == Some(0xAA55) && image.get(off::HEADER..off::HEADER + 4) == Some(b"HdrS")
}

/// Reads and checks the setup header of the bzImage `image`: signature
/// and boot flag, protocol at least [`MIN_VERSION`], a 64-bit entry, a
/// kernel loaded high, a header long enough for the fields used, and a
/// protected-mode part as long as `syssize`, the payload and the 64-bit
/// entry need.
pub fn parse_header(image: &[u8]) -> Result<SetupHeader> {
    let truncated = Error::LinuxTruncated { len: image.len() };
    if image.len() < off::FIELDS_END {
        return Err(truncated);
    }
    let u8_at = |at| read_u8(image, at).ok_or(truncated.clone());
    let u16_at = |at| read_u16(image, at).ok_or(truncated.clone());
    let u32_at = |at| read_u32(image, at).ok_or(truncated.clone());
    if image.get(off::HEADER..off::HEADER + 4) != Some(b"HdrS") {
        return Err(Error::LinuxNoHdrS);
    }
    let boot_flag = u16_at(off::BOOT_FLAG)?;
    if boot_flag != 0xAA55 {
        return Err(Error::LinuxBootFlag { found: boot_flag });
    }
    let version = u16_at(off::VERSION)?;
    if version < MIN_VERSION {
        return Err(Error::LinuxVersion { version, min: MIN_VERSION });
    }
    // "The end of setup header can be calculated as follows: 0x0202 + byte
    // value at offset 0x0201" (64-bit Boot Protocol).
    let header_end = off::HEADER + usize::from(u8_at(off::JUMP + 1)?);
    if header_end < off::FIELDS_END {
        return Err(Error::LinuxHeaderEnd { end: header_end, need: off::FIELDS_END });
    }
    let xloadflags = u16_at(off::XLOADFLAGS)?;
    if xloadflags & xloadflags::KERNEL_64 == 0 {
        return Err(Error::LinuxNot64Bit { xloadflags });
    }
    let loadflags = u8_at(off::LOADFLAGS)?;
    if loadflags & loadflags::LOADED_HIGH == 0 {
        return Err(Error::LinuxNotLoadedHigh { loadflags });
    }
    // "setup_sects: ... If this field is 0, the real value is 4."
    let setup_sects = match u8_at(off::SETUP_SECTS)? {
        0 => 4,
        n => usize::from(n),
    };
    let setup_len = (setup_sects + 1) * 512;
    let kernel_len = image.len().checked_sub(setup_len).ok_or(truncated.clone())? as u64;
    let syssize = u32_at(off::SYSSIZE)?;
    let payload_offset = u32_at(off::PAYLOAD_OFFSET)?;
    let payload_length = u32_at(off::PAYLOAD_LENGTH)?;
    // `syssize` counts 16-byte paragraphs, the last one possibly partial.
    // The payload (the compressed vmlinux) lies inside the protected-mode
    // part, and the 64-bit entry must be code of the image.
    let need = [
        (u64::from(syssize) * 16).saturating_sub(15).max(1),
        u64::from(payload_offset) + u64::from(payload_length),
        ENTRY_64_OFFSET + 1,
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    if kernel_len < need {
        return Err(Error::LinuxKernelTruncated { need, len: kernel_len });
    }
    let kernel_alignment = u32_at(off::KERNEL_ALIGNMENT)?;
    let relocatable = u8_at(off::RELOCATABLE_KERNEL)? != 0;
    if relocatable && !kernel_alignment.is_power_of_two() {
        return Err(Error::LinuxKernelAlignment { align: kernel_alignment });
    }
    Ok(SetupHeader {
        version,
        setup_len,
        header_end,
        loadflags,
        xloadflags,
        syssize,
        initrd_addr_max: u32_at(off::INITRD_ADDR_MAX)?,
        kernel_alignment,
        relocatable,
        cmdline_size: u32_at(off::CMDLINE_SIZE)?,
        pref_address: read_u64(image, off::PREF_ADDRESS).ok_or(truncated.clone())?,
        init_size: u32_at(off::INIT_SIZE)?,
    })
}

/// Plans booting the bzImage `image` with `config`. The plan copies the
/// protected-mode kernel, the initramfs, the zero page and the command line;
/// its entry is [`EntryMode::Linux64`] at the kernel's 64-bit entry point
/// with RSI = the zero page.
pub fn plan<'a>(image: &[u8], config: &Config<'a>) -> Result<LoadPlan<'a>> {
    let header = parse_header(image)?;
    let cmdline = config.cmdline.as_bytes();
    if cmdline.contains(&0) {
        return Err(Error::CmdlineNul { module: None });
    }
    // "cmdline_size: The maximum size of the command line without the
    // terminating zero."
    let max = header.cmdline_size as usize;
    if cmdline.len() > max {
        return Err(Error::CmdlineTooLong { module: None, len: cmdline.len(), max });
    }

    let mut builder = PlanBuilder::with_ram(config.ram, config.reserved, true, &[LEGACY_HOLE]);

    // The zero page and the command line, in the caller's boot area.
    let area = &config.boot_area;
    let cmdline_len = cmdline.len() as u64 + 1;
    let need = BOOT_PARAMS_SIZE + cmdline_len;
    let area_len = area.end.saturating_sub(area.start);
    if area_len < need || !area.start.is_multiple_of(PAGE_SIZE) {
        return Err(Error::LinuxBootArea { len: area_len, need });
    }
    let boot_params = area.start;
    builder.claim(Region::BootParams, boot_params, BOOT_PARAMS_SIZE)?;
    // Both fit: `area.start + need <= area.end`.
    let cmdline_gpa = boot_params + BOOT_PARAMS_SIZE;
    builder.claim(Region::LinuxCmdline, cmdline_gpa, cmdline_len)?;

    // The kernel, with room for its decompression ("Details of header
    // fields": relocatable_kernel, kernel_alignment, pref_address, init_size).
    let kernel_len = (image.len() - header.setup_len) as u64;
    let claim_len = kernel_len.max(u64::from(header.init_size));
    let load = if header.relocatable {
        let align = u64::from(header.kernel_alignment).max(PAGE_SIZE);
        builder.place_aligned(Region::LinuxKernel, header.pref_address.max(ONE_MIB), claim_len, align)?
    } else {
        if header.pref_address < ONE_MIB {
            return Err(Error::LinuxLoadAddress { pref_address: header.pref_address });
        }
        builder.claim(Region::LinuxKernel, header.pref_address, claim_len)?;
        header.pref_address
    };
    builder.push(Op::Copy { gpa: load, src: header.setup_len..image.len() });

    // The initramfs, as high as it may go.
    let initrd = match config.initrd {
        Some(data) if !data.is_empty() => {
            let limit = if header.xloadflags & xloadflags::CAN_BE_LOADED_ABOVE_4G != 0 {
                FOUR_GIB
            } else {
                // The highest address it may *occupy*: its end is one past.
                u64::from(header.initrd_addr_max) + 1
            };
            let len = data.len() as u64;
            let gpa = builder.place_high(Region::Initrd, limit, len, PAGE_SIZE)?;
            builder.push(Op::Module { gpa, data });
            Some((gpa, len))
        }
        _ => None,
    };

    let e820 = e820_map(config)?;
    let zero_page = zero_page(image, &header, load, cmdline_gpa, initrd, &e820);
    builder.push(Op::Write { gpa: boot_params, data: zero_page });
    let mut line = Vec::with_capacity(cmdline.len() + 1);
    line.extend_from_slice(cmdline);
    line.push(0);
    builder.push(Op::Write { gpa: cmdline_gpa, data: line });

    // `claim_len > ENTRY_64_OFFSET`, checked by `parse_header`.
    let rip = load + ENTRY_64_OFFSET;
    builder.finish(Entry { mode: EntryMode::Linux64, rip, rax: 0, rbx: 0, rsi: boot_params })
}

/// One e820 entry: base, length, type.
pub type E820Entry = (u64, u64, u32);

/// The guest's memory map as the zero page reports it, sorted by address:
/// RAM is type 1 except where a reserved range, the boot area or the legacy
/// hole covers it; those are type 2 wherever they are. Neighbours of one
/// type are merged.
pub fn e820_map(config: &Config<'_>) -> Result<Vec<E820Entry>> {
    let ram = normalize(config.ram);
    let mut reserved: Vec<Range<u64>> = config.reserved.to_vec();
    reserved.push(config.boot_area.clone());
    reserved.push(LEGACY_HOLE);
    let reserved = normalize(&reserved);
    let mut points: Vec<u64> = ram.iter().chain(&reserved).flat_map(|r| [r.start, r.end]).collect();
    points.sort_unstable();
    points.dedup();

    let covers = |ranges: &[Range<u64>], start: u64| ranges.iter().any(|r| r.start <= start && start < r.end);
    let mut map: Vec<E820Entry> = Vec::new();
    for pair in points.windows(2) {
        let &[start, end] = pair else { continue };
        // Every range starts and ends at a point, so one is either wholly
        // inside `start..end` or misses it: testing `start` is enough.
        let kind = if covers(&reserved, start) {
            E820_RESERVED
        } else if covers(&ram, start) {
            E820_RAM
        } else {
            continue;
        };
        match map.last_mut() {
            Some((base, len, last)) if *last == kind && *base + *len == start => *len += end - start,
            _ => map.push((start, end - start, kind)),
        }
    }
    if map.len() > E820_MAX {
        return Err(Error::LinuxE820Full { entries: map.len(), max: E820_MAX });
    }
    Ok(map)
}

/// Builds the zero page: zeroes, the image's setup header copied in
/// (64-bit Boot Protocol: "the setup header at offset 0x01f1 of kernel
/// image on should be loaded into struct boot_params"), and the fields a
/// boot loader fills ("Details of header fields", zero-page.rst).
fn zero_page(
    image: &[u8],
    header: &SetupHeader,
    load: u64,
    cmdline: u64,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
) -> Vec<u8> {
    let mut page = alloc::vec![0u8; BOOT_PARAMS_SIZE as usize];
    let end = header.header_end.min(off::HEADER_COPY_END);
    if let (Some(dst), Some(src)) = (page.get_mut(off::SETUP_HEADER..end), image.get(off::SETUP_HEADER..end)) {
        dst.copy_from_slice(src);
    }
    let lo = |v: u64| v as u32;
    let hi = |v: u64| (v >> 32) as u32;
    put(&mut page, off::TYPE_OF_LOADER, &[TYPE_OF_LOADER]);
    // No real-mode setup code runs, so there is no heap to offer.
    put(&mut page, off::LOADFLAGS, &[header.loadflags & !loadflags::CAN_USE_HEAP]);
    put(&mut page, off::CODE32_START, &lo(load).to_le_bytes());
    let (initrd_gpa, initrd_len) = initrd.unwrap_or((0, 0));
    put(&mut page, off::RAMDISK_IMAGE, &lo(initrd_gpa).to_le_bytes());
    put(&mut page, off::RAMDISK_SIZE, &lo(initrd_len).to_le_bytes());
    put(&mut page, off::EXT_RAMDISK_IMAGE, &hi(initrd_gpa).to_le_bytes());
    put(&mut page, off::EXT_RAMDISK_SIZE, &hi(initrd_len).to_le_bytes());
    put(&mut page, off::CMD_LINE_PTR, &lo(cmdline).to_le_bytes());
    put(&mut page, off::EXT_CMD_LINE_PTR, &hi(cmdline).to_le_bytes());
    // `e820_map` returned at most E820_MAX (128) entries.
    put(&mut page, off::E820_ENTRIES, &[e820.len() as u8]);
    for (i, &(base, len, kind)) in e820.iter().enumerate() {
        let at = off::E820_TABLE + 20 * i;
        put(&mut page, at, &base.to_le_bytes());
        put(&mut page, at + 8, &len.to_le_bytes());
        put(&mut page, at + 16, &kind.to_le_bytes());
    }
    page
}

/// Stores `bytes` at `at`; every offset used is a zero-page field, inside
/// the page.
fn put(page: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = at.checked_add(bytes.len()).and_then(|end| page.get_mut(at..end)) {
        dst.copy_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests;
