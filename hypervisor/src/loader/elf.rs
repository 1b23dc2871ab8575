//! ELF executables: ELF64 x86-64 (guests entered in long mode) and ELF32
//! i386 (Multiboot kernels).
//!
//! Headers are parsed by the `elf` crate (cole14): no_std, zero-alloc,
//! bounds-checked, fuzzed upstream; `goblin` needs `alloc` for ELF and
//! brings Mach-O/PE we do not want. This module adds the loader's rules:
//! `PT_LOAD` segments are placed at their *physical* address (`p_paddr`,
//! as QEMU's Multiboot loader does), must lie in guest RAM outside reserved
//! ranges and must not overlap; the entry point must be inside a loaded
//! executable segment and is translated from virtual to physical.

use core::fmt;

use elf::ElfBytes;
use elf::abi::{EM_386, EM_X86_64, ET_EXEC, PF_X, PT_LOAD};
use elf::endian::LittleEndian;
use elf::file::Class;
use elf::parse::ParseError;

use super::error::{Error, Region, Result};
use super::plan::{Entry, EntryMode, LoadPlan, Op, PlanBuilder, RamLayout};

/// Most `PT_LOAD` segments an image may have. Real kernels have a handful;
/// the cap bounds the work done on a hostile program header table.
pub const MAX_SEGMENTS: usize = 64;

/// The architecture (and so the ELF class) an image must be built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// ELF64, `EM_X86_64`: entered in 64-bit long mode.
    X86_64,
    /// ELF32, `EM_386`: entered in 32-bit protected mode.
    I386,
}

impl Machine {
    fn class_bits(self) -> u8 {
        match self {
            Self::X86_64 => 64,
            Self::I386 => 32,
        }
    }

    fn e_machine(self) -> u16 {
        match self {
            Self::X86_64 => EM_X86_64,
            Self::I386 => EM_386,
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::X86_64 => "x86-64",
            Self::I386 => "i386",
        })
    }
}

/// Plans loading the ELF executable `image` built for `machine` into the
/// guest described by `layout`. The plan's entry has `rip` = the physical
/// entry point and zero `rax`/`rbx`.
pub fn plan(image: &[u8], machine: Machine, layout: &RamLayout<'_>) -> Result<LoadPlan<'static>> {
    let mut builder = PlanBuilder::new(layout, machine == Machine::I386, &[]);
    let rip = load_segments(image, machine, &mut builder)?;
    let mode = match machine {
        Machine::X86_64 => EntryMode::Long64,
        Machine::I386 => EntryMode::Protected32,
    };
    builder.finish(Entry { mode, rip, rax: 0, rbx: 0, rsi: 0 })
}

/// Checks the headers, claims every `PT_LOAD` segment in `builder`, pushes
/// its copy and zero-fill steps, and returns the physical entry point.
pub(crate) fn load_segments(image: &[u8], machine: Machine, builder: &mut PlanBuilder<'_>) -> Result<u64> {
    let file = ElfBytes::<LittleEndian>::minimal_parse(image).map_err(map_parse)?;
    let ehdr = &file.ehdr;
    let found = match ehdr.class {
        Class::ELF32 => 32,
        Class::ELF64 => 64,
    };
    if found != machine.class_bits() {
        return Err(Error::ElfClass { found, expected: machine.class_bits() });
    }
    if ehdr.e_machine != machine.e_machine() {
        return Err(Error::ElfMachine { machine: ehdr.e_machine, expected: machine });
    }
    if ehdr.e_type != ET_EXEC {
        return Err(Error::ElfType { e_type: ehdr.e_type });
    }
    let segments = file.segments().ok_or(Error::ElfNoSegments)?;

    let mut loaded = 0usize;
    let mut entry = None;
    for (index, ph) in segments.iter().enumerate() {
        if ph.p_type != PT_LOAD {
            continue;
        }
        if ph.p_filesz > ph.p_memsz {
            return Err(Error::SegmentFileSize { index });
        }
        if ph.p_memsz == 0 {
            continue;
        }
        loaded += 1;
        if loaded > MAX_SEGMENTS {
            return Err(Error::ElfTooManySegments { max: MAX_SEGMENTS });
        }
        let src = file_range(ph.p_offset, ph.p_filesz, image.len()).ok_or(Error::SegmentFileRange { index })?;
        let gpa = ph.p_paddr;
        builder.claim(Region::Segment(index), gpa, ph.p_memsz)?;
        // Both fit: the claim checked `gpa + p_memsz` and `p_filesz <= p_memsz`.
        let bss = ph.p_memsz - ph.p_filesz;
        if !src.is_empty() {
            builder.push(Op::Copy { gpa, src });
        }
        if bss > 0 {
            builder.push(Op::Zero { gpa: gpa + ph.p_filesz, len: bss });
        }
        // `e_entry` is virtual; QEMU translates it through the executable
        // segment that holds it, and so do we. Only file-backed bytes count:
        // an entry point in bss would execute zeroes.
        if entry.is_none()
            && ph.p_flags & PF_X != 0
            && let Some(offset) = ehdr.e_entry.checked_sub(ph.p_vaddr)
            && offset < ph.p_filesz
        {
            entry = Some(gpa + offset);
        }
    }
    if loaded == 0 {
        return Err(Error::ElfNoSegments);
    }
    entry.ok_or(Error::EntryNotLoaded { entry: ehdr.e_entry })
}

/// `offset..offset + len` as a range of an image of `image_len` bytes.
fn file_range(offset: u64, len: u64, image_len: usize) -> Option<core::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= image_len).then_some(start..end)
}

fn map_parse(e: ParseError) -> Error {
    match e {
        ParseError::BadMagic(_) => Error::NotElf,
        ParseError::UnsupportedElfEndianness(_) => Error::ElfEndianness,
        ParseError::SliceReadError(_) | ParseError::TryFromSliceError(_) => Error::ElfTruncated,
        _ => Error::ElfMalformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::testutil::*;
    use crate::loader::{Op, Region};
    use core::ops::Range;

    const MIB: u64 = 1 << 20;
    const LOW: [Range<u64>; 1] = [Range { start: 0, end: 0x8000 }];

    fn layout(ram_size: u64) -> RamLayout<'static> {
        RamLayout { ram_size, reserved: &LOW }
    }

    fn plan64(image: &[u8]) -> Result<LoadPlan<'static>> {
        plan(image, Machine::X86_64, &layout(16 * MIB))
    }

    /// Writes `value` at `at` in `image`.
    fn patch(image: &mut [u8], at: usize, value: &[u8]) {
        image[at..at + value.len()].copy_from_slice(value);
    }

    #[test]
    fn elf64_plan_copies_zeroes_and_enters_at_physical_address() {
        let text = [0x90u8; 0x30];
        let data = [7u8; 0x10];
        let image = elf64(0x20_0010, &[Seg::text(0x20_0000, &text), Seg::data(0x20_1000, &data, 0x100)]);
        let plan = plan64(&image).unwrap();
        let text_off = EHDR64 + 2 * PHDR64;
        assert_eq!(
            plan.ops(),
            &[
                Op::Copy { gpa: 0x20_0000, src: text_off..text_off + 0x30 },
                Op::Copy { gpa: 0x20_1000, src: text_off + 0x30..text_off + 0x40 },
                Op::Zero { gpa: 0x20_1010, len: 0xF0 },
            ]
        );
        assert_eq!(*plan.entry(), Entry { mode: EntryMode::Long64, rip: 0x20_0010, rax: 0, rbx: 0, rsi: 0 });
        assert_eq!(plan.extent(), Some(0x20_0000..0x20_1100));

        let mut ram = vec![0xAAu8; 4 * MIB as usize];
        plan.apply(&image, &mut ram[..]).unwrap();
        assert_eq!(&ram[0x20_0000..0x20_0030], &text);
        assert_eq!(&ram[0x20_1000..0x20_1010], &data);
        assert!(ram[0x20_1010..0x20_1100].iter().all(|&b| b == 0));
        assert_eq!(ram[0x20_1100], 0xAA);
    }

    #[test]
    fn entry_is_translated_from_virtual_to_physical() {
        let mut seg = Seg::text(0x10_0000, &[0xF4; 0x20]);
        seg.vaddr = 0xFFFF_FFFF_8000_0000;
        let image = elf64(0xFFFF_FFFF_8000_0008, &[seg]);
        assert_eq!(plan64(&image).unwrap().entry().rip, 0x10_0008);
    }

    #[test]
    fn elf32_plan_enters_protected_mode() {
        let image = elf32(0x10_0000, &[Seg::text(0x10_0000, &[0xF4; 4])]);
        let plan = plan(&image, Machine::I386, &layout(16 * MIB)).unwrap();
        assert_eq!(plan.entry().mode, EntryMode::Protected32);
        assert_eq!(plan.entry().rip, 0x10_0000);
    }

    #[test]
    fn segments_of_other_types_and_empty_loads_are_skipped() {
        let mut note = Seg::text(0, &[1, 2, 3, 4]);
        note.p_type = PT_NOTE;
        let empty = Seg::data(0xFFFF_FFFF_FFFF_0000, &[], 0);
        let image = elf64(0x10_0000, &[note, empty, Seg::text(0x10_0000, &[0xF4])]);
        let plan = plan64(&image).unwrap();
        assert_eq!(plan.ops().len(), 1);
    }

    #[test]
    fn refuses_images_that_are_not_elf_or_cut_short() {
        assert_eq!(plan64(b"MZ\x90\x00 not an elf at all").unwrap_err(), Error::NotElf);
        assert_eq!(plan64(b"").unwrap_err(), Error::ElfTruncated);
        let image = elf64(0x10_0000, &[Seg::text(0x10_0000, &[0xF4; 16])]);
        assert_eq!(plan64(&image[..40]).unwrap_err(), Error::ElfTruncated);
        // Header intact, program header table cut.
        assert_eq!(plan64(&image[..EHDR64 + 10]).unwrap_err(), Error::ElfTruncated);
    }

    #[test]
    fn refuses_wrong_class_endianness_machine_and_type() {
        let image64 = elf64(0x10_0000, &[Seg::text(0x10_0000, &[0xF4])]);
        let image32 = elf32(0x10_0000, &[Seg::text(0x10_0000, &[0xF4])]);
        assert_eq!(plan64(&image32).unwrap_err(), Error::ElfClass { found: 32, expected: 64 });
        assert_eq!(
            plan(&image64, Machine::I386, &layout(16 * MIB)).unwrap_err(),
            Error::ElfClass { found: 64, expected: 32 }
        );
        let mut big = image64.clone();
        big[E_IDENT_DATA] = 2;
        assert_eq!(plan64(&big).unwrap_err(), Error::ElfEndianness);
        let mut bad_class = image64.clone();
        bad_class[E_IDENT_CLASS] = 9;
        assert_eq!(plan64(&bad_class).unwrap_err(), Error::ElfMalformed);
        let mut arm = image64.clone();
        patch(&mut arm, E_MACHINE, &183u16.to_le_bytes());
        assert_eq!(plan64(&arm).unwrap_err(), Error::ElfMachine { machine: 183, expected: Machine::X86_64 });
        let mut dyn_ = image64;
        patch(&mut dyn_, E_TYPE, &3u16.to_le_bytes());
        assert_eq!(plan64(&dyn_).unwrap_err(), Error::ElfType { e_type: 3 });
    }

    #[test]
    fn refuses_images_without_loadable_segments() {
        let mut note = Seg::text(0x10_0000, &[1, 2, 3, 4]);
        note.p_type = PT_NOTE;
        assert_eq!(plan64(&elf64(0x10_0000, &[note])).unwrap_err(), Error::ElfNoSegments);
        assert_eq!(plan64(&elf64(0x10_0000, &[])).unwrap_err(), Error::ElfNoSegments);
    }

    #[test]
    fn refuses_too_many_segments() {
        let segs: Vec<Seg> = (0..=MAX_SEGMENTS as u64).map(|i| Seg::text(0x10_0000 + i * 0x1000, &[0xF4])).collect();
        assert_eq!(plan64(&elf64(0x10_0000, &segs)).unwrap_err(), Error::ElfTooManySegments { max: MAX_SEGMENTS });
    }

    #[test]
    fn refuses_bad_file_ranges_and_sizes() {
        let image = elf64(0x10_0000, &[Seg::text(0x10_0000, &[0xF4; 16])]);
        let ph = EHDR64;
        // p_offset past the end of the file.
        let mut past = image.clone();
        patch(&mut past, ph + 8, &(image.len() as u64).to_le_bytes());
        assert_eq!(plan64(&past).unwrap_err(), Error::SegmentFileRange { index: 0 });
        // p_offset + p_filesz overflows.
        let mut wrap = image.clone();
        patch(&mut wrap, ph + 8, &u64::MAX.to_le_bytes());
        assert_eq!(plan64(&wrap).unwrap_err(), Error::SegmentFileRange { index: 0 });
        // p_filesz > p_memsz.
        let mut fat = image;
        patch(&mut fat, ph + 40, &8u64.to_le_bytes());
        assert_eq!(plan64(&fat).unwrap_err(), Error::SegmentFileSize { index: 0 });
    }

    #[test]
    fn refuses_segments_outside_ram_or_in_reserved_memory() {
        let outside = elf64(0x10_0000, &[Seg::text(16 * MIB - 8, &[0xF4; 16])]);
        assert_eq!(
            plan64(&outside).unwrap_err(),
            Error::OutsideRam {
                region: Region::Segment(0),
                start: 16 * MIB - 8,
                end: 16 * MIB + 8,
                ram_size: 16 * MIB
            }
        );
        let reserved = elf64(0x7000, &[Seg::text(0x7000, &[0xF4; 0x2000])]);
        assert_eq!(
            plan64(&reserved).unwrap_err(),
            Error::Reserved { region: Region::Segment(0), start: 0x7000, end: 0x9000, reserved: 0..0x8000 }
        );
        let wrap = elf64(0x10_0000, &[Seg::data(u64::MAX - 4, &[], 0x100)]);
        assert_eq!(plan64(&wrap).unwrap_err(), Error::AddressOverflow { region: Region::Segment(0) });
    }

    #[test]
    fn refuses_32_bit_segments_above_4_gib() {
        // The addresses fit 32 bits, the end does not.
        let image = elf32(0xFFFF_F000, &[Seg::data(0xFFFF_F000, &[], 0x2000)]);
        let ram = RamLayout { ram_size: 8 << 30, reserved: &[] };
        assert_eq!(
            plan(&image, Machine::I386, &ram).unwrap_err(),
            Error::Above4GiB { region: Region::Segment(0), start: 0xFFFF_F000, end: 0x1_0000_1000 }
        );
    }

    #[test]
    fn refuses_overlapping_segments() {
        let image = elf64(
            0x10_0000,
            &[Seg::text(0x10_0000, &[0xF4; 0x10]), Seg::data(0x10_0800, &[], 0x1000), Seg::data(0x10_0008, &[1; 4], 4)],
        );
        assert_eq!(
            plan64(&image).unwrap_err(),
            Error::Overlap { first: Region::Segment(0), second: Region::Segment(2), gpa: 0x10_0008 }
        );
    }

    #[test]
    fn refuses_entry_outside_loaded_executable_bytes() {
        // In a data segment.
        let image = elf64(0x20_0000, &[Seg::text(0x10_0000, &[0xF4]), Seg::data(0x20_0000, &[0; 4], 4)]);
        assert_eq!(plan64(&image).unwrap_err(), Error::EntryNotLoaded { entry: 0x20_0000 });
        // In the bss of an executable segment.
        let mut seg = Seg::data(0x10_0000, &[0xF4; 4], 0x100);
        seg.flags |= PF_X;
        let image = elf64(0x10_0010, &[seg]);
        assert_eq!(plan64(&image).unwrap_err(), Error::EntryNotLoaded { entry: 0x10_0010 });
        // Below every segment.
        let image = elf64(0x1000, &[Seg::text(0x10_0000, &[0xF4])]);
        assert_eq!(plan64(&image).unwrap_err(), Error::EntryNotLoaded { entry: 0x1000 });
    }

    #[test]
    fn apply_refuses_a_different_image_and_failing_memory() {
        let image = elf64(0x10_0000, &[Seg::text(0x10_0000, &[0xF4; 64])]);
        let plan = plan64(&image).unwrap();
        let mut ram = vec![0u8; 2 * MIB as usize];
        let short = &image[..image.len() - 1];
        assert!(matches!(plan.apply(short, &mut ram[..]), Err(Error::PlanImageMismatch { .. })));
        assert!(ram.iter().all(|&b| b == 0), "nothing written on refusal");
        let mut small = vec![0u8; MIB as usize];
        assert_eq!(plan.apply(&image, &mut small[..]).unwrap_err(), Error::GuestWrite { gpa: 0x10_0000, len: 64 });
    }
}
