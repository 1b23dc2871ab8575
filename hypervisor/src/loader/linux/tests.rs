//! Tests of the Linux loader on synthetic bzImages (a setup header built
//! byte by byte), a mutation test over that header, and a parse of the real
//! Debian kernel when the setup script has fetched it.

// One-range RAM lists are what most tests mean, not a mistyped `0..n` array.
#![allow(clippy::single_range_in_vec_init)]

use super::plan as load;
use super::*;
use crate::loader::testutil::{Hdr, bzimage, u32_at, u64_at};
use alloc::string::String;
use alloc::vec;

const MIB: u64 = 1 << 20;
/// The hypervisor's layout: page tables and GDT below 0x9000, the boot
/// area above.
const LOW: [Range<u64>; 1] = [0..0x9000];
const BOOT_AREA: Range<u64> = 0x9000..0x1_0000;

fn config<'a>(ram: &'a [Range<u64>], cmdline: &'a str, initrd: Option<&'a [u8]>) -> Config<'a> {
    Config { ram, reserved: &LOW, boot_area: BOOT_AREA, cmdline, initrd }
}

/// Plans `h`'s image in `0..ram_size` (the RAM list is leaked so that the
/// plan, which borrows the configuration, can be returned).
fn plan_with(h: &Hdr, ram_size: u64) -> Result<LoadPlan<'static>> {
    let ram: &'static [Range<u64>] = Vec::leak(vec![0..ram_size]);
    load(&bzimage(h), &config(ram, "console=ttyS0", None))
}

/// The plan's kernel copy.
fn kernel_gpa(plan: &LoadPlan<'_>) -> u64 {
    plan.ops().iter().find_map(|op| if let Op::Copy { gpa, .. } = op { Some(*gpa) } else { None }).unwrap()
}

/// The plan's initramfs, as a guest-physical range.
fn initrd_range(plan: &LoadPlan<'_>) -> Option<Range<u64>> {
    plan.ops().iter().find(|op| matches!(op, Op::Module { .. })).map(Op::gpa_range)
}

/// The zero page the plan writes.
fn zero_page_of<'p>(plan: &'p LoadPlan<'_>) -> &'p [u8] {
    plan.ops()
        .iter()
        .find_map(|op| match op {
            Op::Write { gpa, data } if *gpa == plan.entry().rsi => Some(&data[..]),
            _ => None,
        })
        .unwrap()
}

fn e820_of(page: &[u8]) -> Vec<E820Entry> {
    (0..usize::from(page[off::E820_ENTRIES]))
        .map(|i| {
            let at = off::E820_TABLE + 20 * i;
            (u64_at(page, at), u64_at(page, at + 8), u32_at(page, at + 16))
        })
        .collect()
}

fn intersects(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Re-checks every promise an accepted Linux plan makes, without trusting
/// how the loader computed it: steps inside one RAM range, below 4 GiB,
/// outside the reserved ranges and the legacy hole, not overlapping one
/// another nor the kernel's `init_size` room; the kernel where the rules
/// put it and entered at +0x200; the zero page in the boot area with the
/// header copied and the pointers naming the steps that hold the command
/// line and the initramfs; an e820 map that is sorted, reports every step
/// outside the boot area as RAM and no reserved byte as RAM. Written
/// against the public API only, so a fuzz target can call it.
pub(crate) fn check_plan(plan: &LoadPlan<'_>, image: &[u8], config: &Config<'_>) {
    let ram = normalize(config.ram);
    let in_ram = |r: &Range<u64>| ram.iter().any(|m| m.start <= r.start && r.end <= m.end);
    let header = parse_header(image).expect("an accepted image has a good header");
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for op in plan.ops() {
        let r = op.gpa_range();
        assert!(!r.is_empty(), "empty step {op:?}");
        assert!(in_ram(&r), "{r:x?} outside RAM");
        assert!(r.end <= FOUR_GIB, "{r:x?} above 4 GiB");
        for res in config.reserved.iter().filter(|r| r.start < r.end).chain([&LEGACY_HOLE]) {
            assert!(!intersects(&r, res), "{r:x?} in reserved {res:x?}");
        }
        if let Op::Copy { src, .. } = op {
            assert!(src.end <= image.len(), "copy past the image");
        }
        ranges.push(r);
    }
    ranges.sort_by_key(|r| r.start);
    for pair in ranges.windows(2) {
        assert!(pair[0].end <= pair[1].start, "overlapping steps {pair:x?}");
    }

    // The kernel and its decompression room.
    let entry = plan.entry();
    assert_eq!(entry.mode, EntryMode::Linux64);
    let copies: Vec<&Op<'_>> = plan.ops().iter().filter(|op| matches!(op, Op::Copy { .. })).collect();
    assert_eq!(copies.len(), 1, "one kernel copy");
    let Op::Copy { gpa: load, src } = copies[0] else { unreachable!() };
    assert_eq!(*src, header.setup_len..image.len());
    assert_eq!(entry.rip, load + ENTRY_64_OFFSET);
    assert!(copies[0].gpa_range().contains(&entry.rip), "entry outside the kernel");
    let room = *load..load + (src.len() as u64).max(u64::from(header.init_size));
    assert!(in_ram(&room), "kernel room {room:x?} outside RAM");
    for op in plan.ops().iter().filter(|op| !matches!(op, Op::Copy { .. })) {
        assert!(!intersects(&op.gpa_range(), &room), "{:x?} in the kernel's room", op.gpa_range());
    }
    if header.relocatable {
        assert!(*load >= header.pref_address && load % u64::from(header.kernel_alignment) == 0);
    } else {
        assert_eq!(*load, header.pref_address);
    }

    // The zero page and what it points to.
    let find_write = |gpa: u64| {
        plan.ops().iter().find_map(|op| match op {
            Op::Write { gpa: g, data } if *g == gpa => Some(data),
            _ => None,
        })
    };
    assert!(config.boot_area.start <= entry.rsi && entry.rsi + BOOT_PARAMS_SIZE <= config.boot_area.end);
    let page = find_write(entry.rsi).expect("a zero page at RSI");
    assert_eq!(page.len() as u64, BOOT_PARAMS_SIZE);
    assert_eq!(&page[off::HEADER..off::HEADER + 4], b"HdrS");
    assert_eq!(page[off::TYPE_OF_LOADER], TYPE_OF_LOADER);
    assert_eq!(page[off::SETUP_SECTS], image[off::SETUP_SECTS]);
    assert_eq!(u64_at(page, off::PREF_ADDRESS), header.pref_address);
    let wide = |lo: usize, hi: usize| u64::from(u32_at(page, lo)) | u64::from(u32_at(page, hi)) << 32;
    let cmd = find_write(wide(off::CMD_LINE_PTR, off::EXT_CMD_LINE_PTR)).expect("a command line at cmd_line_ptr");
    assert_eq!(&cmd[..cmd.len() - 1], config.cmdline.as_bytes());
    assert_eq!(cmd.last(), Some(&0));
    let (rd_gpa, rd_len) =
        (wide(off::RAMDISK_IMAGE, off::EXT_RAMDISK_IMAGE), wide(off::RAMDISK_SIZE, off::EXT_RAMDISK_SIZE));
    match config.initrd.filter(|d| !d.is_empty()) {
        Some(data) => {
            let op = plan.ops().iter().find(|op| op.gpa_range().start == rd_gpa).expect("an initrd at ramdisk_image");
            assert!(matches!(op, Op::Module { data: d, .. } if d.as_ptr() == data.as_ptr() && d.len() == data.len()));
            assert_eq!(rd_len, data.len() as u64);
            assert_eq!(rd_gpa % PAGE_SIZE, 0);
            let limit = if header.xloadflags & xloadflags::CAN_BE_LOADED_ABOVE_4G != 0 {
                FOUR_GIB
            } else {
                u64::from(header.initrd_addr_max) + 1
            };
            assert!(rd_gpa + rd_len <= limit, "initrd above initrd_addr_max");
        }
        None => assert_eq!((rd_gpa, rd_len), (0, 0)),
    }

    let map = e820_of(page);
    assert!(!map.is_empty() && map.len() <= E820_MAX);
    for pair in map.windows(2) {
        assert!(pair[0].0 + pair[0].1 <= pair[1].0, "e820 unsorted or overlapping {pair:x?}");
    }
    let kind_at = |gpa: u64| map.iter().find(|e| e.0 <= gpa && gpa < e.0 + e.1).map(|e| e.2);
    for op in plan.ops() {
        let r = op.gpa_range();
        let expected = if intersects(&r, &config.boot_area) { E820_RESERVED } else { E820_RAM };
        assert_eq!(kind_at(r.start), Some(expected), "{r:x?} in the e820 map");
        assert_eq!(kind_at(r.end - 1), Some(expected), "{r:x?} in the e820 map");
    }
    for res in config.reserved.iter().filter(|r| r.start < r.end) {
        assert_eq!(kind_at(res.start), Some(E820_RESERVED), "reserved {res:x?} in the e820 map");
    }
}

// --- Layout ---

#[test]
fn plans_kernel_initrd_zero_page_and_command_line() {
    let h = Hdr::default();
    let image = bzimage(&h);
    let initrd = vec![0x5Au8; 0x1800];
    let ram = [0..32 * MIB];
    let cfg = config(&ram, "console=ttyS0 quiet", Some(&initrd));
    let plan = load(&image, &cfg).unwrap();
    check_plan(&plan, &image, &cfg);

    let setup_len = 5 * 512;
    assert_eq!(*plan.entry(), Entry { mode: EntryMode::Linux64, rip: 0x20_0200, rax: 0, rbx: 0, rsi: BOOT_AREA.start });
    assert_eq!(plan.ops()[0], Op::Copy { gpa: 0x20_0000, src: setup_len..image.len() });
    // Highest page-aligned spot below the end of RAM.
    assert_eq!(initrd_range(&plan), Some(32 * MIB - 0x2000..32 * MIB - 0x800));

    let page = zero_page_of(&plan);
    assert_eq!(page[off::TYPE_OF_LOADER], 0xff);
    assert_eq!(page[off::LOADFLAGS], loadflags::LOADED_HIGH);
    assert_eq!(u32_at(page, off::CODE32_START), 0x20_0000);
    assert_eq!(u32_at(page, off::CMD_LINE_PTR), 0xA000);
    assert_eq!(u32_at(page, off::RAMDISK_IMAGE) as u64, 32 * MIB - 0x2000);
    assert_eq!(u32_at(page, off::RAMDISK_SIZE), 0x1800);
    assert_eq!(u32_at(page, off::EXT_RAMDISK_IMAGE), 0);
    // The header is copied up to its end (0x202 + 0x6a), nothing past it;
    // only the fields a boot loader fills differ.
    let filled = [off::TYPE_OF_LOADER..off::LOADFLAGS + 1, off::CODE32_START..0x220, off::CMD_LINE_PTR..0x22c];
    for at in (0x1f1..0x26c).filter(|a| !filled.iter().any(|r| r.contains(a))) {
        assert_eq!(page[at], image[at], "zero page byte {at:#x}");
    }
    let stray: Vec<usize> = (0..0x1f1).filter(|&at| page[at] != 0 && at != off::E820_ENTRIES).collect();
    assert!(stray.is_empty(), "zero page bytes {stray:x?} set");
    assert!(page[0x26c..0x290].iter().all(|&b| b == 0));
    assert_eq!(
        e820_of(page),
        vec![
            (0, 0x1_0000, E820_RESERVED),
            (0x1_0000, 0x9_0000, E820_RAM),
            (0xA_0000, 0x6_0000, E820_RESERVED),
            (MIB, 31 * MIB, E820_RAM)
        ]
    );

    let mut mem = vec![0u8; 32 * MIB as usize];
    plan.apply(&image, &mut mem[..]).unwrap();
    assert_eq!(&mem[0x20_0000..0x20_0000 + h.kernel_len], &image[setup_len..]);
    assert_eq!(&mem[0xA000..0xA014], b"console=ttyS0 quiet\0");
    assert_eq!(&mem[0x9000 + 0x202..0x9000 + 0x206], b"HdrS");
}

#[test]
fn setup_sects_zero_means_four() {
    let image = bzimage(&Hdr { setup_sects: 0, ..Hdr::default() });
    assert_eq!(parse_header(&image).unwrap().setup_len, 5 * 512);
    let image = bzimage(&Hdr { setup_sects: 30, ..Hdr::default() });
    let plan = plan_with(&Hdr { setup_sects: 30, ..Hdr::default() }, 16 * MIB).unwrap();
    assert_eq!(plan.ops()[0], Op::Copy { gpa: 0x20_0000, src: 31 * 512..image.len() });
}

#[test]
fn relocatable_kernel_moves_up_to_the_next_aligned_free_spot() {
    // A reserved range at the preferred address pushes the kernel to the
    // next 2 MiB boundary past it.
    let image = bzimage(&Hdr::default());
    let ram = [0..32 * MIB];
    let reserved = [0..0x9000, 0x20_0000..0x20_1000];
    let cfg = Config { reserved: &reserved, ..config(&ram, "", None) };
    let plan = load(&image, &cfg).unwrap();
    assert_eq!(kernel_gpa(&plan), 0x40_0000);
    check_plan(&plan, &image, &cfg);
    // So does a hole in RAM.
    let ram = [0..0x28_0000, 0x50_0000..32 * MIB];
    let cfg = config(&ram, "", None);
    let plan = load(&image, &cfg).unwrap();
    assert_eq!(kernel_gpa(&plan), 0x60_0000);
    check_plan(&plan, &image, &cfg);
    // A preferred address below 1 MiB is raised to 1 MiB, then aligned.
    let plan = plan_with(&Hdr { pref_address: 0x1000, kernel_alignment: 0x1000, ..Hdr::default() }, 16 * MIB);
    assert_eq!(kernel_gpa(&plan.unwrap()), MIB);
}

#[test]
fn init_size_room_is_kept_free() {
    // init_size of 8 MiB from 2 MiB: the initrd goes above 10 MiB even
    // though the copied kernel is 12 KiB.
    let h = Hdr { init_size: 8 << 20, ..Hdr::default() };
    let image = bzimage(&h);
    let initrd = vec![1u8; 0x3000];
    let ram = [0..16 * MIB, 0x200_0000..0x200_0000];
    let cfg = Config { initrd: Some(&initrd), ..config(&ram, "", None) };
    let plan = load(&image, &cfg).unwrap();
    assert_eq!(initrd_range(&plan), Some(16 * MIB - 0x3000..16 * MIB));
    check_plan(&plan, &image, &cfg);
    // With RAM ending inside that room, the kernel does not fit at all.
    assert_eq!(plan_with(&h, 9 * MIB), Err(Error::NoRoom { region: Region::LinuxKernel, len: 8 << 20 }));
}

#[test]
fn initrd_goes_highest_below_initrd_addr_max_and_clear_of_the_kernel() {
    let h = Hdr { initrd_addr_max: 0x7f_ffff, ..Hdr::default() };
    let image = bzimage(&h);
    let initrd = vec![1u8; 0x1000];
    let ram = [0..32 * MIB];
    let cfg = Config { initrd: Some(&initrd), ..config(&ram, "", None) };
    let plan = load(&image, &cfg).unwrap();
    assert_eq!(initrd_range(&plan), Some(0x7F_F000..0x80_0000));
    check_plan(&plan, &image, &cfg);

    // The top of RAM is reserved: just below it.
    let reserved = [0..0x9000, 31 * MIB..32 * MIB];
    let cfg = Config { reserved: &reserved, initrd: Some(&initrd), ..config(&ram, "", None) };
    let plan = load(&bzimage(&Hdr::default()), &cfg).unwrap();
    assert_eq!(initrd_range(&plan), Some(31 * MIB - 0x1000..31 * MIB));
    check_plan(&plan, &bzimage(&Hdr::default()), &cfg);

    // initrd_addr_max inside the kernel's room: below the kernel.
    let h = Hdr { initrd_addr_max: 0x20_0fff, ..Hdr::default() };
    let image = bzimage(&h);
    let cfg = Config { initrd: Some(&initrd), ..config(&ram, "", None) };
    let plan = load(&image, &cfg).unwrap();
    assert_eq!(initrd_range(&plan), Some(0x1F_F000..0x20_0000));
    check_plan(&plan, &image, &cfg);
}

#[test]
fn initrd_of_a_kernel_loadable_above_4g_stays_below_4g() {
    let h = Hdr {
        xloadflags: xloadflags::KERNEL_64 | xloadflags::CAN_BE_LOADED_ABOVE_4G,
        initrd_addr_max: 0x7fff_ffff,
        ..Hdr::default()
    };
    let image = bzimage(&h);
    let initrd = vec![1u8; 0x1000];
    // RAM with the PCI hole: 0..3 GiB and 4..8 GiB.
    let ram = [0..3 << 30, 4 << 30..8 << 30];
    let cfg = Config { initrd: Some(&initrd), ..config(&ram, "", None) };
    let plan = load(&image, &cfg).unwrap();
    check_plan(&plan, &image, &cfg);
    assert_eq!(initrd_range(&plan), Some((3 << 30) - 0x1000..3 << 30));
    let map = e820_of(zero_page_of(&plan));
    assert_eq!(map.last(), Some(&(4 << 30, 4 << 30, E820_RAM)));
    assert_eq!(map[map.len() - 2], (MIB, (3 << 30) - MIB, E820_RAM));
}

#[test]
fn empty_initrd_is_no_initrd() {
    let image = bzimage(&Hdr::default());
    let ram = [0..16 * MIB];
    let cfg = Config { initrd: Some(&[]), ..config(&ram, "", None) };
    let plan = load(&image, &cfg).unwrap();
    assert_eq!(initrd_range(&plan), None);
    check_plan(&plan, &image, &cfg);
}

#[test]
fn e820_reports_holes_reserved_ranges_and_the_boot_area() {
    let reserved = [0..0x9000, 0x80_0000..0x90_0000, 0xFEC0_0000..0xFEC0_1000];
    let ram = [4 * MIB..16 * MIB, 0..2 * MIB];
    let cfg = Config { reserved: &reserved, ..config(&ram, "", None) };
    assert_eq!(
        e820_map(&cfg).unwrap(),
        vec![
            (0, 0x1_0000, E820_RESERVED),
            (0x1_0000, 0x9_0000, E820_RAM),
            (0xA_0000, 0x6_0000, E820_RESERVED),
            (MIB, MIB, E820_RAM),
            (4 * MIB, 4 * MIB, E820_RAM),
            (8 * MIB, MIB, E820_RESERVED),
            (9 * MIB, 7 * MIB, E820_RAM),
            (0xFEC0_0000, 0x1000, E820_RESERVED),
        ]
    );
}

#[test]
fn command_line_up_to_cmdline_size_is_accepted() {
    let h = Hdr { cmdline_size: 16, ..Hdr::default() };
    let image = bzimage(&h);
    let ram = [0..16 * MIB];
    let line = "x".repeat(16);
    let cfg = config(&ram, &line, None);
    check_plan(&load(&image, &cfg).unwrap(), &image, &cfg);
}

// --- Refusals, one per error ---

#[test]
fn refuses_images_that_are_not_bzimages() {
    let good = bzimage(&Hdr::default());
    let ram = [0..16 * MIB];
    let cfg = config(&ram, "", None);
    assert_eq!(load(&good[..0x200], &cfg).unwrap_err(), Error::LinuxTruncated { len: 0x200 });
    assert_eq!(plan(b"", &cfg).unwrap_err(), Error::LinuxTruncated { len: 0 });
    let bad = Hdr { signature: *b"HdrT", ..Hdr::default() };
    assert_eq!(plan_with(&bad, 16 * MIB), Err(Error::LinuxNoHdrS));
    let bad = Hdr { boot_flag: 0x55AA, ..Hdr::default() };
    assert_eq!(plan_with(&bad, 16 * MIB), Err(Error::LinuxBootFlag { found: 0x55AA }));
    assert!(!is_linux(&bzimage(&bad)));
    assert!(is_linux(&good));
    assert!(!is_linux(b"\x7fELF"));
}

#[test]
fn refuses_old_protocols_and_kernels_without_a_64_bit_entry() {
    let old = Hdr { version: 0x020b, ..Hdr::default() };
    assert_eq!(plan_with(&old, 16 * MIB), Err(Error::LinuxVersion { version: 0x020b, min: 0x020c }));
    let no64 = Hdr { xloadflags: xloadflags::CAN_BE_LOADED_ABOVE_4G, ..Hdr::default() };
    assert_eq!(plan_with(&no64, 16 * MIB), Err(Error::LinuxNot64Bit { xloadflags: 2 }));
    let zimage = Hdr { loadflags: 0x80, ..Hdr::default() };
    assert_eq!(plan_with(&zimage, 16 * MIB), Err(Error::LinuxNotLoadedHigh { loadflags: 0x80 }));
    let short = Hdr { jump: 0x61, ..Hdr::default() };
    assert_eq!(plan_with(&short, 16 * MIB), Err(Error::LinuxHeaderEnd { end: 0x263, need: 0x264 }));
    assert_eq!(
        alloc::format!("{}", Error::LinuxVersion { version: 0x020b, min: 0x020c }),
        "Linux boot protocol 2.11 is older than 2.12, the first with a 64-bit entry"
    );
}

#[test]
fn refuses_kernels_shorter_than_their_header_says() {
    // syssize one paragraph more than the file has.
    let h = Hdr { syssize: Some(0x301), ..Hdr::default() };
    assert_eq!(plan_with(&h, 16 * MIB), Err(Error::LinuxKernelTruncated { need: 0x3001, len: 0x3000 }));
    // A last paragraph cut short is fine.
    let h = Hdr { kernel_len: 0x2FF1, syssize: Some(0x300), ..Hdr::default() };
    assert!(plan_with(&h, 16 * MIB).is_ok());
    // The payload runs past the end.
    let h = Hdr { payload: (0x2000, 0x1001), ..Hdr::default() };
    assert_eq!(plan_with(&h, 16 * MIB), Err(Error::LinuxKernelTruncated { need: 0x3001, len: 0x3000 }));
    // No room for the 64-bit entry.
    let h = Hdr { kernel_len: 0x200, payload: (0, 0x10), ..Hdr::default() };
    assert_eq!(plan_with(&h, 16 * MIB), Err(Error::LinuxKernelTruncated { need: 0x201, len: 0x200 }));
    // setup_sects past the end of the file.
    let h = Hdr { kernel_len: 0, setup_sects: 4, ..Hdr::default() };
    let mut image = bzimage(&h);
    image[off::SETUP_SECTS] = 200;
    let ram = [0..16 * MIB];
    assert_eq!(load(&image, &config(&ram, "", None)).unwrap_err(), Error::LinuxTruncated { len: image.len() });
}

#[test]
fn refuses_bad_alignment_and_unplaceable_kernels() {
    let h = Hdr { kernel_alignment: 0x30_0000, ..Hdr::default() };
    assert_eq!(plan_with(&h, 16 * MIB), Err(Error::LinuxKernelAlignment { align: 0x30_0000 }));
    let h = Hdr { kernel_alignment: 0, ..Hdr::default() };
    assert_eq!(plan_with(&h, 16 * MIB), Err(Error::LinuxKernelAlignment { align: 0 }));
    // Not relocatable: the alignment does not matter, the address does.
    let fixed = Hdr { relocatable: 0, kernel_alignment: 0, ..Hdr::default() };
    assert_eq!(kernel_gpa(&plan_with(&fixed, 16 * MIB).unwrap()), 0x20_0000);
    let low = Hdr { pref_address: 0x1_0000, ..fixed.clone() };
    assert_eq!(plan_with(&low, 16 * MIB), Err(Error::LinuxLoadAddress { pref_address: 0x1_0000 }));
    assert!(matches!(plan_with(&fixed, 0x28_0000), Err(Error::OutsideRam { region: Region::LinuxKernel, .. })));
    let image = bzimage(&fixed);
    let holey = [0..MIB, 0x30_0000..16 * MIB];
    assert_eq!(
        load(&image, &config(&holey, "", None)).unwrap_err(),
        Error::RamHole { region: Region::LinuxKernel, start: 0x20_0000, end: 0x30_0000, hole: MIB..0x30_0000 }
    );
    let reserved = [0x20_0000..0x20_0001];
    let ram = [0..16 * MIB];
    let cfg = Config { reserved: &reserved, ..config(&ram, "", None) };
    assert!(matches!(load(&image, &cfg), Err(Error::Reserved { region: Region::LinuxKernel, .. })));
    // Relocatable, but RAM ends before the room it needs.
    assert_eq!(plan_with(&Hdr::default(), 2 * MIB), Err(Error::NoRoom { region: Region::LinuxKernel, len: MIB }));
    let far = Hdr { pref_address: u64::MAX - 0x1000, ..Hdr::default() };
    assert_eq!(plan_with(&far, 16 * MIB), Err(Error::NoRoom { region: Region::LinuxKernel, len: MIB }));
}

#[test]
fn refuses_initrds_that_do_not_fit() {
    let image = bzimage(&Hdr::default());
    let ram = [0..4 * MIB];
    let big = vec![0u8; 2 * MIB as usize];
    let cfg = Config { initrd: Some(&big), ..config(&ram, "", None) };
    // RAM above the kernel's room is 1 MiB, below it 0x100000 - 0x10000 is
    // in the legacy hole or low memory.
    assert_eq!(load(&image, &cfg).unwrap_err(), Error::NoRoom { region: Region::Initrd, len: 2 * MIB });
    let h = Hdr { initrd_addr_max: 0xFFF, ..Hdr::default() };
    let small = [7u8; 16];
    let cfg = Config { initrd: Some(&small), ..config(&ram, "", None) };
    assert_eq!(load(&bzimage(&h), &cfg).unwrap_err(), Error::NoRoom { region: Region::Initrd, len: 16 });
}

#[test]
fn refuses_bad_command_lines_and_boot_areas() {
    let h = Hdr { cmdline_size: 16, ..Hdr::default() };
    let image = bzimage(&h);
    let ram = [0..16 * MIB];
    let line = "x".repeat(17);
    assert_eq!(
        load(&image, &config(&ram, &line, None)).unwrap_err(),
        Error::CmdlineTooLong { module: None, len: 17, max: 16 }
    );
    assert_eq!(load(&image, &config(&ram, "a\0b", None)).unwrap_err(), Error::CmdlineNul { module: None });

    let image = bzimage(&Hdr::default());
    let small = Config { boot_area: 0x9000..0xA000, ..config(&ram, "root=x", None) };
    assert_eq!(load(&image, &small).unwrap_err(), Error::LinuxBootArea { len: 0x1000, need: 0x1007 });
    let unaligned = Config { boot_area: 0x9001..0x10000, ..config(&ram, "", None) };
    assert!(matches!(load(&image, &unaligned), Err(Error::LinuxBootArea { .. })));
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = Config { boot_area: 0x10000..0x9000, ..config(&ram, "", None) };
    assert_eq!(load(&image, &reversed).unwrap_err(), Error::LinuxBootArea { len: 0, need: 0x1001 });
    let in_reserved = Config { boot_area: 0x8000..0xA000, ..config(&ram, "", None) };
    assert!(matches!(load(&image, &in_reserved), Err(Error::Reserved { region: Region::BootParams, .. })));
    let in_hole = Config { boot_area: 0xA_0000..0xA_2000, ..config(&ram, "", None) };
    assert!(matches!(load(&image, &in_hole), Err(Error::Reserved { region: Region::BootParams, .. })));
    let outside = Config { boot_area: 16 * MIB..16 * MIB + 0x2000, ..config(&ram, "", None) };
    assert!(matches!(load(&image, &outside), Err(Error::OutsideRam { region: Region::BootParams, .. })));
    let wraps = Config { boot_area: u64::MAX - 0xFFF..u64::MAX, ..config(&ram, "", None) };
    assert!(load(&image, &wraps).is_err());
}

#[test]
fn refuses_memory_maps_past_the_e820_table() {
    let image = bzimage(&Hdr::default());
    let ram = [0..16 * MIB];
    // 130 one-page reserved ranges with RAM between them above the kernel.
    let reserved: Vec<Range<u64>> = (0..130u64).map(|i| 8 * MIB + i * 0x2000..8 * MIB + i * 0x2000 + 0x1000).collect();
    let cfg = Config { reserved: &reserved, ..config(&ram, "", None) };
    assert!(matches!(load(&image, &cfg), Err(Error::LinuxE820Full { max: 128, .. })));
}

#[test]
fn messages_are_one_sentence_case_line() {
    let samples = [
        Error::LinuxTruncated { len: 3 },
        Error::LinuxBootFlag { found: 0 },
        Error::LinuxNoHdrS,
        Error::LinuxNot64Bit { xloadflags: 0 },
        Error::LinuxNotLoadedHigh { loadflags: 0 },
        Error::LinuxHeaderEnd { end: 0x250, need: 0x264 },
        Error::LinuxKernelTruncated { need: 2, len: 1 },
        Error::LinuxKernelAlignment { align: 3 },
        Error::LinuxLoadAddress { pref_address: 0 },
        Error::LinuxBootArea { len: 0, need: 1 },
        Error::LinuxE820Full { entries: 130, max: 128 },
        Error::RamHole { region: Region::Initrd, start: 0, end: 1, hole: 0..1 },
        Error::NoRoom { region: Region::BootParams, len: 1 },
    ];
    for e in samples {
        let msg = alloc::format!("{e}");
        assert!(msg.starts_with(|c: char| c.is_ascii_uppercase()), "{msg}");
        assert!(!msg.ends_with('.') && !msg.contains('\n'), "{msg}");
    }
}

// --- Mutations ---

/// xorshift64*: a fixed-seed generator, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Random mutations of a valid header and of the memory layout: the loader
/// never panics, and every plan it accepts passes [`check_plan`] and
/// applies to guest RAM.
#[test]
fn mutated_headers_and_layouts_never_break_the_rules() {
    let fields = [
        off::SETUP_SECTS,
        off::SYSSIZE,
        off::JUMP + 1,
        off::VERSION,
        off::LOADFLAGS,
        off::INITRD_ADDR_MAX,
        off::KERNEL_ALIGNMENT,
        off::RELOCATABLE_KERNEL,
        off::XLOADFLAGS,
        off::CMDLINE_SIZE,
        off::PAYLOAD_OFFSET,
        off::PAYLOAD_LENGTH,
        off::PREF_ADDRESS,
        off::INIT_SIZE,
    ];
    let base = Hdr { pref_address: 0x40_0000, init_size: 0x20_0000, ..Hdr::default() };
    let initrd = vec![0xC3u8; 0x2345];
    let mut mem = vec![0u8; 16 * MIB as usize];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..10_000 {
        let mut image = bzimage(&base);
        for _ in 0..=rng.below(2) {
            let at = if rng.below(4) == 0 {
                0x1e0 + rng.below(0x90) as usize
            } else {
                fields[rng.below(fields.len() as u64) as usize]
            };
            // Small numbers, powers of two and addresses near the layout's
            // edges find more corners than uniform noise.
            let value: u64 = match rng.below(4) {
                0 => rng.next(),
                1 => rng.below(0x100),
                2 => 1 << rng.below(40),
                _ => (rng.below(17) * MIB).wrapping_sub(rng.below(3) * 0x800),
            };
            let width = 1 + rng.below(8) as usize;
            let end = (at + width).min(image.len());
            image[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
        }
        if rng.below(10) == 0 {
            image.truncate(rng.below(image.len() as u64) as usize);
        }
        let ram_end = MIB * (1 + rng.below(16));
        let split = rng.below(ram_end / PAGE_SIZE) * PAGE_SIZE;
        let gap = rng.below(4) * MIB;
        let ram = [0..split, split.saturating_add(gap).min(ram_end)..ram_end];
        let reserved = [0..0x9000, rng.below(ram_end)..rng.below(ram_end + MIB)];
        let line = "c".repeat(rng.below(40) as usize);
        let cfg = Config {
            ram: &ram,
            reserved: &reserved,
            boot_area: BOOT_AREA,
            cmdline: &line,
            initrd: if rng.below(2) == 0 { Some(&initrd) } else { None },
        };
        match load(&image, &cfg) {
            Ok(plan) => {
                accepted += 1;
                check_plan(&plan, &image, &cfg);
                plan.apply(&image, &mut mem[..]).expect("an accepted plan applies");
            }
            Err(e) => {
                refused += 1;
                assert!(!alloc::format!("{e}").is_empty());
            }
        }
    }
    // Both outcomes are exercised.
    std::println!("mutations: {accepted} plans accepted and checked, {refused} refused");
    assert!(accepted > 1000 && refused > 1000, "accepted {accepted}, refused {refused}");
}

// --- The real kernel ---

/// Where `scripts/setup` puts Debian's cloud kernel; `LINUX_GUEST_KERNEL`
/// overrides it.
fn debian_kernel() -> Option<(String, Vec<u8>)> {
    let path = std::env::var("LINUX_GUEST_KERNEL")
        .unwrap_or_else(|_| String::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/guests/linux/vmlinuz")));
    std::fs::read(&path).ok().map(|bytes| (path, bytes))
}

#[test]
fn parses_and_plans_the_debian_kernel_if_present() {
    let Some((path, image)) = debian_kernel() else {
        std::println!("skipped: no Debian kernel at target/guests/linux/vmlinuz (run scripts/setup)");
        return;
    };
    assert!(is_linux(&image), "{path}");
    let h = parse_header(&image).unwrap();
    assert!(h.version >= 0x020f, "{path}: protocol {:#x}", h.version);
    assert!(h.relocatable && h.xloadflags & xloadflags::KERNEL_64 != 0);
    assert_eq!(h.pref_address, 16 * MIB);
    assert!(h.init_size as usize > image.len());

    let initrd = vec![0u8; 3 * MIB as usize];
    let ram = [0..256 * MIB];
    let cfg = Config { initrd: Some(&initrd), ..config(&ram, "console=ttyS0", None) };
    let plan = load(&image, &cfg).unwrap();
    check_plan(&plan, &image, &cfg);
    assert_eq!(kernel_gpa(&plan), 16 * MIB);
    assert_eq!(initrd_range(&plan), Some(253 * MIB..256 * MIB));
}
