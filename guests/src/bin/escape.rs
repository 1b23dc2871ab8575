//! Tries to reach guest-physical memory outside its own RAM. The hypervisor
//! must stop it at the first such access; if this program gets to print
//! "ESCAPED", isolation is broken.
//!
//! Command line: `write` writes instead of reading; `addr=<hex>` picks the
//! address (default: the first byte past the end of RAM).
#![no_std]
#![no_main]

use guests::{Boot, println};

fn main(boot: Boot) -> u32 {
    let ram = match boot {
        Boot::Elf64 { ram_bytes, .. } => ram_bytes,
        Boot::Multiboot { .. } => 0,
    };
    let cmdline = boot.cmdline();
    let write = cmdline.split_whitespace().any(|w| w == "write");
    let addr = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
        .unwrap_or(ram);
    println!(
        "escape: guest RAM is {ram:#x} bytes; {} guest-physical {addr:#x}",
        if write { "writing" } else { "reading" }
    );
    // SAFETY: deliberately not sound: the point is to touch memory this VM
    // does not own. The low 4 GiB are identity-mapped by the guest page
    // tables, so only the hypervisor's nested paging can stop it.
    unsafe {
        if write {
            core::ptr::write_volatile(addr as *mut u64, 0x6573_6361_7065);
            println!("escape: ESCAPED: wrote {addr:#x}");
        } else {
            let v = core::ptr::read_volatile(addr as *const u64);
            println!("escape: ESCAPED: read {v:#x} from {addr:#x}");
        }
    }
    1
}

guests::entry!(main);
