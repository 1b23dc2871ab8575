//! A tiny runtime for the hypervisor's test guests: entry code for the two
//! boot protocols the hypervisor offers, port I/O, COM1 output, the exit port
//! and the hypercall. The guests run with no interrupts and one CPU.
//!
//! Boot contracts (see the hypervisor's README, "Guests"):
//! - ELF64: entered in 64-bit mode at the ELF entry with the low 4 GiB
//!   identity-mapped; RDI = guest RAM size in bytes, RSI = VM id, RDX = GPA of
//!   a NUL-terminated command line (0 if none).
//! - Multiboot v1: entered in 32-bit protected mode, paging off, EAX =
//!   0x2BADB002, EBX = GPA of the Multiboot information structure. The stub in
//!   `multiboot_entry!` builds page tables and switches to 64-bit mode.
#![no_std]

pub mod hypercall;
pub mod io;
pub mod memtest;
pub mod multiboot;
pub mod selftest;
pub mod serial;
pub mod trap;

use core::arch::global_asm;

/// How the guest was started.
#[derive(Clone, Copy, Debug)]
pub enum Boot {
    Elf64 { ram_bytes: u64, vm_id: u64, cmdline: u64 },
    Multiboot { magic: u32, info: u32 },
}

impl Boot {
    /// Guest RAM size in bytes, as the boot protocol describes it.
    pub fn ram_bytes(&self) -> u64 {
        match *self {
            Boot::Elf64 { ram_bytes, .. } => ram_bytes,
            Boot::Multiboot { info, .. } => {
                // SAFETY: the info structure is in identity-mapped guest RAM;
                // mem_upper (KiB above 1 MiB) is at offset 8.
                let upper = unsafe { core::ptr::read_volatile((info as u64 + 8) as *const u32) };
                (1 << 20) + upper as u64 * 1024
            }
        }
    }

    /// The command line, if the boot protocol passed one.
    pub fn cmdline(&self) -> &'static str {
        let gpa = match *self {
            Boot::Elf64 { cmdline, .. } => cmdline,
            Boot::Multiboot { info, .. } => {
                // SAFETY: the Multiboot info structure lies in guest RAM,
                // identity-mapped; flag bit 2 says whether cmdline is valid.
                let flags = unsafe { core::ptr::read_volatile(info as u64 as *const u32) };
                if flags & (1 << 2) == 0 {
                    0
                } else {
                    // SAFETY: as above; offset 16 is `cmdline`.
                    unsafe { core::ptr::read_volatile((info as u64 + 16) as *const u32) as u64 }
                }
            }
        };
        if gpa == 0 {
            return "";
        }
        // SAFETY: the hypervisor placed a NUL-terminated string at `gpa`
        // inside guest RAM; scan at most 4 KiB.
        unsafe {
            let p = gpa as *const u8;
            let mut n = 0;
            while n < 4096 && *p.add(n) != 0 {
                n += 1;
            }
            core::str::from_utf8(core::slice::from_raw_parts(p, n)).unwrap_or("")
        }
    }
}

/// The first guest-physical byte above this program: its image, page
/// tables and stack (`guest.ld`'s `__bss_end`). Below it, the image starts at
/// 1 MiB and the hypervisor's boot structures fill the first 64 KiB.
pub fn image_end() -> u64 {
    unsafe extern "C" {
        static __bss_end: u8;
    }
    // Only the symbol's address is taken; nothing is read through it.
    core::ptr::addr_of!(__bss_end) as u64
}

// 64-bit entry (ELF64 boot). RDI/RSI/RDX come from the hypervisor and pass
// straight through to `rt_start` as its first three arguments.
global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "    lea rsp, [rip + __stack_top]",
    "    xor ecx, ecx",
    "    call {start}",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    start = sym __rt_start,
);

/// protocol 0 = ELF64 (a, b, c = ram, id, cmdline); 1 = Multiboot (a = EAX,
/// b = EBX).
#[doc(hidden)]
pub extern "C" fn __rt_start(a: u64, b: u64, c: u64, protocol: u64) -> ! {
    let boot = if protocol == 0 {
        Boot::Elf64 { ram_bytes: a, vm_id: b, cmdline: c }
    } else {
        Boot::Multiboot { magic: a as u32, info: b as u32 }
    };
    unsafe extern "Rust" {
        fn guest_main(boot: Boot) -> u32;
    }
    // SAFETY: every guest binary defines `guest_main` through `entry!`.
    let code = unsafe { guest_main(boot) };
    io::exit(code)
}

/// Declares the guest's `main(boot: Boot) -> u32`; the value is the exit
/// code written to the debug-exit port.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(no_mangle)]
        fn guest_main(boot: $crate::Boot) -> u32 {
            $main(boot)
        }
    };
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("guest panic: {info}");
    io::exit(0x7f)
}
