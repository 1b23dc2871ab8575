//! The Linux boot-protocol loader on an arbitrary bzImage, RAM size,
//! reserved range, initramfs and command line: never panics; an accepted
//! image has a setup header `parse_header` accepts; the plan stays in RAM,
//! out of reserved memory and the legacy hole, free of overlaps, applies
//! cleanly, and enters the 64-bit entry with RSI at the zero page, which
//! lies in the boot area.
//!
//! Input layout (so seeds are easy to write): 8 parameter bytes, then the
//! kernel image.
//! - `[0..2]` guest RAM in 64 KiB units (wrapped into 64 KiB..=MAX_RAM)
//! - `[2..4]` first page of a reserved range, `[4]` its length in pages
//! - `[5..7]` initramfs length in 64-byte units (0: none), taken from the
//!   image's first bytes
//! - `[7]` command-line length (mod 128), from the image's first bytes,
//!   lossily decoded, NULs dropped

use std::ops::Range;

use hypervisor::loader::RamLayout;
use hypervisor::loader::linux::{Config, parse_header, plan};

use crate::{MAX_RAM, check_plan};

/// Where the hypervisor puts the zero page and command line (`vm::boot`).
const BOOT_AREA: Range<u64> = 0x9000..0x1_0000;

pub fn linux(data: &[u8]) {
    let Some((params, image)) = data.split_first_chunk::<8>() else {
        return;
    };
    let ram_units = u64::from(u16::from_le_bytes([params[0], params[1]]));
    let ram_size = (ram_units << 16) % MAX_RAM as u64 + (1 << 16);
    let start = u64::from(u16::from_le_bytes([params[2], params[3]])) << 12;
    let reserved = [0..BOOT_AREA.start, start..start + (u64::from(params[4]) << 12)];
    let initrd_len = usize::from(u16::from_le_bytes([params[5], params[6]])) * 64;
    let initrd = (initrd_len > 0).then(|| &image[..image.len().min(initrd_len)]);
    let cmdline: String =
        String::from_utf8_lossy(&image[..image.len().min(usize::from(params[7] % 128))]).replace('\0', "");
    let ram = 0..ram_size;
    let config = Config {
        ram: core::slice::from_ref(&ram),
        reserved: &reserved,
        boot_area: BOOT_AREA,
        cmdline: &cmdline,
        initrd,
    };
    let Ok(plan) = plan(image, &config) else {
        return;
    };
    assert!(parse_header(image).is_ok(), "a plan for an image whose header is refused");
    // Nothing in reserved memory or the legacy VGA/BIOS hole, except the
    // boot area the caller lent for the zero page and command line.
    let mut kept = reserved.to_vec();
    kept.push(0xA_0000..0x10_0000);
    let checked = RamLayout { ram_size, reserved: &kept };
    check_plan(&plan, image, &checked, true);
    let entry = plan.entry();
    assert!(BOOT_AREA.contains(&entry.rsi), "zero page at {:#x}", entry.rsi);
}
