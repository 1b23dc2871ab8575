//! The loader's one error type: every way an image, an archive or a load
//! request can be refused.

use alloc::string::String;
use core::fmt;
use core::ops::Range;

use super::elf::Machine;

/// Result of a loader operation.
pub type Result<T> = core::result::Result<T, Error>;

/// The part of a load plan an address-range error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// An ELF `PT_LOAD` segment, by its index in the program header table.
    Segment(usize),
    /// The text and data of a Multiboot kernel loaded through its address fields.
    KernelText,
    /// The bss of a Multiboot kernel loaded through its address fields.
    KernelBss,
    /// A Multiboot module, by its index in the caller's list.
    Module(usize),
    /// The Multiboot information structure.
    BootInfo,
    /// A Linux kernel's protected-mode part, with the room it needs while
    /// it decompresses itself (`init_size`).
    LinuxKernel,
    /// The initial ramdisk given to a Linux kernel.
    Initrd,
    /// The Linux zero page (`struct boot_params`).
    BootParams,
    /// The Linux kernel command line.
    LinuxCmdline,
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Segment(i) => write!(f, "segment {i}"),
            Self::KernelText => f.write_str("kernel text"),
            Self::KernelBss => f.write_str("kernel bss"),
            Self::Module(i) => write!(f, "module {i}"),
            Self::BootInfo => f.write_str("Multiboot information structure"),
            Self::LinuxKernel => f.write_str("Linux kernel"),
            Self::Initrd => f.write_str("initramfs"),
            Self::BootParams => f.write_str("zero page (boot_params)"),
            Self::LinuxCmdline => f.write_str("kernel command line"),
        }
    }
}

/// Why the loader refused an archive, an image or a load request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    // --- Ramdisk archive ---
    /// The archive has no bytes at all.
    ArchiveEmpty,
    /// The archive length is not a whole number of 512-byte blocks.
    ArchiveMisaligned { len: usize },
    /// The archive is too short for a header and the end-of-archive marker.
    ArchiveTooShort { len: usize },
    /// A header's checksum does not match its bytes.
    ArchiveChecksum { block: usize },
    /// An entry type this reader does not handle (GNU long names, sparse files...).
    ArchiveEntryType { block: usize },
    /// A header's size field is not a valid octal number.
    ArchiveSize { block: usize },
    /// An entry's data runs past the end of the archive.
    ArchivePayloadPastEnd { block: usize },
    /// The archive does not end with two zero blocks.
    ArchiveMissingEnd,
    /// A file name is empty or not UTF-8 (files counted from 0).
    ArchiveName { index: usize },
    /// Two files have the same name.
    ArchiveDuplicate { name: String },

    // --- ELF ---
    /// The image does not start with the ELF magic.
    NotElf,
    /// Headers or tables run past the end of the image.
    ElfTruncated,
    /// Header fields are out of range or inconsistent.
    ElfMalformed,
    /// The ELF class (32/64-bit) is not the one needed.
    ElfClass { found: u8, expected: u8 },
    /// The image is not little-endian.
    ElfEndianness,
    /// The machine type is not the one needed.
    ElfMachine { machine: u16, expected: Machine },
    /// The file type is not `ET_EXEC`.
    ElfType { e_type: u16 },
    /// No `PT_LOAD` segment with a non-zero size.
    ElfNoSegments,
    /// More `PT_LOAD` segments than the loader accepts.
    ElfTooManySegments { max: usize },
    /// A segment's file bytes lie (partly) outside the image.
    SegmentFileRange { index: usize },
    /// A segment has `p_filesz > p_memsz`.
    SegmentFileSize { index: usize },
    /// The entry point is not inside loaded executable bytes.
    EntryNotLoaded { entry: u64 },

    // --- Placement in guest memory ---
    /// `start + len` overflows.
    AddressOverflow { region: Region },
    /// A region ends past the end of guest RAM.
    OutsideRam { region: Region, start: u64, end: u64, ram_size: u64 },
    /// A region ends past 4 GiB, where a 32-bit kernel cannot reach it.
    Above4GiB { region: Region, start: u64, end: u64 },
    /// A region intersects a hole in guest RAM (addresses between RAM ranges).
    RamHole { region: Region, start: u64, end: u64, hole: Range<u64> },
    /// A region intersects a range the hypervisor reserved.
    Reserved { region: Region, start: u64, end: u64, reserved: Range<u64> },
    /// Two regions of the plan intersect.
    Overlap { first: Region, second: Region, gpa: u64 },
    /// No free, page-aligned room is left for a region the loader places itself.
    NoRoom { region: Region, len: u64 },

    // --- Multiboot ---
    /// No Multiboot magic anywhere in the image.
    MultibootNoHeader,
    /// The only Multiboot magic lies past the first 8 KiB.
    MultibootHeaderTooLate { offset: usize },
    /// Magic found, but `magic + flags + checksum != 0`.
    MultibootChecksum { offset: usize },
    /// The header's fields are cut off by the 8 KiB limit or the image end.
    MultibootHeaderTruncated { offset: usize },
    /// Required-feature flags this loader does not implement.
    MultibootFlags { flags: u32 },
    /// The address fields (flag 16) contradict each other or the image.
    MultibootAddresses { reason: &'static str },
    /// Without flag 16 the kernel is a 64-bit ELF.
    MultibootElf64,
    /// Without flag 16 the kernel is not ELF at all.
    MultibootNotElf,
    /// A command line holds a NUL byte (`module` is `None` for the kernel's).
    CmdlineNul { module: Option<usize> },
    /// A command line is longer than the loader accepts.
    CmdlineTooLong { module: Option<usize>, len: usize, max: usize },
    /// More modules than the loader accepts.
    TooManyModules { count: usize, max: usize },

    // --- Linux (boot.rst) ---
    /// The image is too short for the setup header it must have.
    LinuxTruncated { len: usize },
    /// No 0xAA55 `boot_flag` at 0x1FE.
    LinuxBootFlag { found: u16 },
    /// No "HdrS" signature at 0x202: a pre-2.00 kernel or not Linux at all.
    LinuxNoHdrS,
    /// The boot protocol is older than the loader accepts.
    LinuxVersion { version: u16, min: u16 },
    /// `xloadflags` lacks `XLF_KERNEL_64`: no 64-bit entry point.
    LinuxNot64Bit { xloadflags: u16 },
    /// `loadflags` lacks `LOADED_HIGH`: a zImage, loaded at 0x10000.
    LinuxNotLoadedHigh { loadflags: u8 },
    /// The setup header ends (0x202 + the byte at 0x201) before the fields
    /// the loader reads.
    LinuxHeaderEnd { end: usize, need: usize },
    /// The protected-mode kernel is shorter than the header says
    /// (`syssize`, `payload_offset + payload_length`, the 64-bit entry).
    LinuxKernelTruncated { need: u64, len: u64 },
    /// A relocatable kernel whose `kernel_alignment` is not a power of two.
    LinuxKernelAlignment { align: u32 },
    /// A kernel that is not relocatable wants to run below 1 MiB.
    LinuxLoadAddress { pref_address: u64 },
    /// The caller's boot area cannot hold the zero page and the command line.
    LinuxBootArea { len: u64, need: u64 },
    /// The guest memory map does not fit the zero page's e820 table.
    LinuxE820Full { entries: usize, max: usize },

    // --- Applying a plan ---
    /// The plan copies image bytes the given image does not have.
    PlanImageMismatch { start: usize, end: usize, len: usize },
    /// The guest-memory backend refused a write.
    GuestWrite { gpa: u64, len: u64 },
}

/// Names the command line an error is about.
struct Cmdline(Option<usize>);

impl fmt::Display for Cmdline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("Kernel command line"),
            Some(i) => write!(f, "Command line of module {i}"),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ArchiveEmpty => f.write_str("Ramdisk archive is empty"),
            Self::ArchiveMisaligned { len } => {
                write!(f, "Ramdisk archive length {len} is not a multiple of 512 bytes")
            }
            Self::ArchiveTooShort { len } => {
                write!(f, "Ramdisk archive of {len} bytes is too short for a header and the end marker")
            }
            Self::ArchiveChecksum { block } => {
                write!(f, "Ramdisk archive header at block {block} has a bad checksum")
            }
            Self::ArchiveEntryType { block } => write!(
                f,
                "Ramdisk archive entry at block {block} has an unsupported type \
                 (GNU long names and sparse files are not supported)"
            ),
            Self::ArchiveSize { block } => {
                write!(f, "Ramdisk archive entry at block {block} has an unreadable size")
            }
            Self::ArchivePayloadPastEnd { block } => {
                write!(f, "Ramdisk archive entry at block {block} runs past the end of the archive")
            }
            Self::ArchiveMissingEnd => f.write_str("Ramdisk archive does not end with two zero blocks"),
            Self::ArchiveName { index } => {
                write!(f, "Ramdisk archive file {index} has an empty or non-UTF-8 name")
            }
            Self::ArchiveDuplicate { name } => {
                write!(f, "Ramdisk archive holds '{name}' more than once")
            }
            Self::NotElf => f.write_str("Image is not an ELF file"),
            Self::ElfTruncated => f.write_str("ELF headers run past the end of the image"),
            Self::ElfMalformed => f.write_str("ELF header fields are out of range"),
            Self::ElfClass { found, expected } => {
                write!(f, "Image is a {found}-bit ELF; a {expected}-bit one is needed")
            }
            Self::ElfEndianness => f.write_str("ELF image is not little-endian"),
            Self::ElfMachine { machine, expected } => {
                write!(f, "ELF machine type {machine} is not {expected}")
            }
            Self::ElfType { e_type } => {
                write!(f, "ELF type {e_type} is not an executable (ET_EXEC)")
            }
            Self::ElfNoSegments => f.write_str("ELF image has no loadable segments"),
            Self::ElfTooManySegments { max } => {
                write!(f, "ELF image has more than {max} loadable segments")
            }
            Self::SegmentFileRange { index } => {
                write!(f, "Segment {index} file data lies outside the image")
            }
            Self::SegmentFileSize { index } => {
                write!(f, "Segment {index} is larger in the file than in memory (p_filesz > p_memsz)")
            }
            Self::EntryNotLoaded { entry } => write!(f, "Entry point {entry:#x} is not inside loaded executable bytes"),
            Self::AddressOverflow { region } => {
                write!(f, "Load region {region} wraps around the address space")
            }
            Self::OutsideRam { region, start, end, ram_size } => write!(
                f,
                "Load region {region} ({start:#x}..{end:#x}) lies outside guest RAM \
                 ({ram_size:#x} bytes)"
            ),
            Self::Above4GiB { region, start, end } => write!(
                f,
                "Load region {region} ({start:#x}..{end:#x}) lies above 4 GiB, \
                 out of reach of a 32-bit kernel"
            ),
            Self::RamHole { region, start, end, hole } => write!(
                f,
                "Load region {region} ({start:#x}..{end:#x}) overlaps {:#x}..{:#x}, which is not guest RAM",
                hole.start, hole.end
            ),
            Self::Reserved { region, start, end, reserved } => write!(
                f,
                "Load region {region} ({start:#x}..{end:#x}) overlaps reserved guest memory \
                 {:#x}..{:#x}",
                reserved.start, reserved.end
            ),
            Self::Overlap { first, second, gpa } => {
                write!(f, "Load regions {first} and {second} overlap at {gpa:#x}")
            }
            Self::NoRoom { region, len } => write!(f, "No room in guest RAM below 4 GiB for {region} ({len} bytes)"),
            Self::MultibootNoHeader => f.write_str("Image has no Multiboot header in its first 8 KiB"),
            Self::MultibootHeaderTooLate { offset } => {
                write!(f, "Multiboot header at offset {offset:#x} is past the first 8 KiB")
            }
            Self::MultibootChecksum { offset } => {
                write!(f, "Multiboot header at offset {offset:#x} has a bad checksum")
            }
            Self::MultibootHeaderTruncated { offset } => write!(
                f,
                "Multiboot header at offset {offset:#x} is cut off by the 8 KiB limit \
                 or the end of the image"
            ),
            Self::MultibootFlags { flags } => {
                write!(f, "Multiboot header requires unsupported features (flags {flags:#x})")
            }
            Self::MultibootAddresses { reason } => {
                write!(f, "Multiboot address fields are inconsistent: {reason}")
            }
            Self::MultibootElf64 => f.write_str("Cannot load a 64-bit ELF as a Multiboot kernel; give a 32-bit image"),
            Self::MultibootNotElf => {
                f.write_str("Multiboot image is not ELF and its header has no address fields (flag 16)")
            }
            Self::CmdlineNul { module } => {
                write!(f, "{} contains a NUL byte", Cmdline(*module))
            }
            Self::CmdlineTooLong { module, len, max } => {
                write!(f, "{} is {len} bytes long; at most {max} are accepted", Cmdline(*module))
            }
            Self::TooManyModules { count, max } => {
                write!(f, "{count} Multiboot modules given; at most {max} are accepted")
            }
            Self::LinuxTruncated { len } => {
                write!(f, "Image of {len} bytes is too short for a Linux setup header and kernel")
            }
            Self::LinuxBootFlag { found } => {
                write!(f, "Linux setup header has boot_flag {found:#06x} at 0x1fe, not 0xaa55")
            }
            Self::LinuxNoHdrS => f.write_str("Image has no Linux setup header (no \"HdrS\" at 0x202)"),
            Self::LinuxVersion { version, min } => write!(
                f,
                "Linux boot protocol {}.{:02} is older than {}.{:02}, the first with a 64-bit entry",
                version >> 8,
                version & 0xff,
                min >> 8,
                min & 0xff
            ),
            Self::LinuxNot64Bit { xloadflags } => {
                write!(f, "Linux kernel has no 64-bit entry point (xloadflags {xloadflags:#x} lack XLF_KERNEL_64)")
            }
            Self::LinuxNotLoadedHigh { loadflags } => {
                write!(f, "Linux kernel is a zImage (loadflags {loadflags:#x} lack LOADED_HIGH); give a bzImage")
            }
            Self::LinuxHeaderEnd { end, need } => {
                write!(f, "Linux setup header ends at {end:#x}, before the fields up to {need:#x} it must have")
            }
            Self::LinuxKernelTruncated { need, len } => {
                write!(f, "Linux protected-mode kernel is {len:#x} bytes; its header needs {need:#x}")
            }
            Self::LinuxKernelAlignment { align } => {
                write!(f, "Linux kernel_alignment {align:#x} is not a power of two")
            }
            Self::LinuxLoadAddress { pref_address } => {
                write!(f, "Linux kernel is not relocatable and wants to run at {pref_address:#x}, below 1 MiB")
            }
            Self::LinuxBootArea { len, need } => {
                write!(
                    f,
                    "Boot area of {len:#x} bytes cannot hold the zero page and the command line ({need:#x} bytes)"
                )
            }
            Self::LinuxE820Full { entries, max } => {
                write!(f, "Guest memory map needs {entries} e820 entries; the zero page holds {max}")
            }
            Self::PlanImageMismatch { start, end, len } => {
                write!(f, "Load plan copies image bytes {start:#x}..{end:#x} but the image has {len:#x}")
            }
            Self::GuestWrite { gpa, len } => {
                write!(f, "Guest memory write of {len:#x} bytes at {gpa:#x} failed")
            }
        }
    }
}

impl core::error::Error for Error {}
