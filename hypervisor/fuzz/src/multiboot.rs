//! The Multiboot loader on an arbitrary image, RAM size, reserved range,
//! command line and modules: never panics; an accepted plan stays in RAM
//! below 4 GiB, out of reserved memory, free of overlaps, applies cleanly,
//! and hands the kernel the boot loader magic and the information structure.
//!
//! Input layout (so seeds are easy to write): 8 parameter bytes, then the
//! kernel image.
//! - `[0..2]` guest RAM in 64 KiB units (wrapped into 64 KiB..=MAX_RAM)
//! - `[2..4]` first page of a reserved range, `[4]` its length in pages
//! - `[5]` number of modules (mod 4); module `i` is the first
//!   `[6] * 64 * (i + 1)` bytes of the image
//! - `[7]` command-line length (mod 128), taken from the image's first
//!   bytes, lossily decoded (it may hold NULs)

use std::ops::Range;

use hypervisor::loader::multiboot::{BOOTLOADER_MAGIC, Config, Module, plan};
use hypervisor::loader::{Op, RamLayout};

use crate::{MAX_RAM, check_plan};

pub fn multiboot(data: &[u8]) {
    let Some((params, image)) = data.split_first_chunk::<8>() else {
        return;
    };
    let ram_units = u64::from(u16::from_le_bytes([params[0], params[1]]));
    let ram_size = (ram_units << 16) % MAX_RAM as u64 + (1 << 16);
    let start = u64::from(u16::from_le_bytes([params[2], params[3]])) << 12;
    let reserved = [Range { start, end: start + (u64::from(params[4]) << 12) }];
    let modules: Vec<Module<'_>> = (0..usize::from(params[5] % 4))
        .map(|i| Module { data: &image[..image.len().min(usize::from(params[6]) * 64 * (i + 1))], cmdline: "module" })
        .collect();
    let cmdline = String::from_utf8_lossy(&image[..image.len().min(usize::from(params[7] % 128))]);
    let config = Config { layout: RamLayout { ram_size, reserved: &reserved }, cmdline: &cmdline, modules: &modules };
    let Ok(plan) = plan(image, &config) else {
        return;
    };
    // The loader also keeps the legacy VGA/BIOS hole free.
    let mut layout_reserved = reserved.to_vec();
    layout_reserved.push(0xA_0000..0x10_0000);
    let checked = RamLayout { ram_size, reserved: &layout_reserved };
    check_plan(&plan, image, &checked, true);
    let entry = plan.entry();
    assert_eq!(entry.rax, u64::from(BOOTLOADER_MAGIC));
    let Some(Op::Write { gpa, data: info }) = plan.ops().last() else {
        panic!("no information structure");
    };
    assert_eq!(entry.rbx, *gpa);
    assert_eq!(gpa % 4096, 0);
    let mods_count = u32::from_le_bytes(info[20..24].try_into().unwrap());
    assert_eq!(mods_count as usize, modules.len());
}
