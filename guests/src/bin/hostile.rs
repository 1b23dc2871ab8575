//! A guest that treats the virtual platform the way a hostile or broken
//! kernel would. The hypervisor must answer each attack as hardware would
//! (a fault the guest sees, all-ones, nothing) or stop this VM, and nothing
//! else may notice.
//!
//! Command line, one mode:
//! - `ports [n=<count>]`: `count` (default 20000) port accesses of random
//!   width, direction, port and value, except the few ports whose purpose
//!   is to end the VM (debug exit, ACPI soft-off, reset) and COM1; then
//!   prints a checksum of what it read and exits 0.
//! - `apic`: IA32_APIC_BASE with reserved bits and with x2APIC (not offered
//!   by CPUID) must #GP, as must an x2APIC MSR in xAPIC mode; the APIC
//!   page moves and follows IA32_APIC_BASE; then an IMUL with its operand
//!   in the APIC page, which no MMIO emulator needs to carry out: the VM
//!   must be stopped with a report, and "hostile: UNREACHABLE" never
//!   printed. Before that, writes to the firmware ROM (0xE0000-0xFFFFF:
//!   plain, read-modify-write, exchange, at both ends) must change no ROM
//!   byte, as on a PC, and the RAM just below it stays writable.
#![no_std]
#![no_main]

use core::arch::asm;
use guests::io::{cpuid, inb, inl, outb, outl, rdmsr, wrmsr};
use guests::{Boot, println, trap};

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_EN: u64 = 1 << 11;
const APIC_EXTD: u64 = 1 << 10;
const APIC_BSP: u64 = 1 << 8;
const VERSION_REG: u64 = 0x30;

/// Ports that end or reset the VM by design, and COM1 (its output is the
/// test's transcript).
fn spared(port: u16) -> bool {
    matches!(port, 0xf4..=0xf7 | 0x3f8..=0x3ff | 0x604..=0x605 | 0xcf9)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64: any fixed sequence does.
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: port I/O; in a VM it is intercepted.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags)) };
    v
}

fn outw(port: u16, v: u16) {
    // SAFETY: as in `inw`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags)) };
}

fn ports(count: u64) -> u32 {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut sum, mut done) = (0u64, 0u64);
    while done < count {
        let r = rng.next();
        let port = r as u16;
        let width = 1u16 << ((r >> 16) % 3);
        if (port..port.saturating_add(width)).any(spared) {
            continue;
        }
        let value = (r >> 32) as u32;
        if r & (1 << 20) != 0 {
            match width {
                1 => outb(port, value as u8),
                2 => outw(port, value as u16),
                _ => outl(port, value),
            }
        } else {
            sum = sum.wrapping_mul(31).wrapping_add(match width {
                1 => u64::from(inb(port)),
                2 => u64::from(inw(port)),
                _ => u64::from(inl(port)),
            });
        }
        done += 1;
    }
    println!("hostile: ports done: {done} accesses, checksum {sum:#x}");
    0
}

fn read32(addr: u64) -> u32 {
    // SAFETY: the low 4 GiB are identity-mapped; the address is the APIC's
    // page, a device register read.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn check(name: &str, ok: bool, detail: core::fmt::Arguments) -> u32 {
    if ok {
        println!("hostile: ok   {name}");
        0
    } else {
        println!("hostile: FAIL {name}: {detail}");
        1
    }
}

/// The firmware ROM: the BIOS area holding the ACPI tables.
const ROM: u64 = 0xe_0000;

fn read64(addr: u64) -> u64 {
    // SAFETY: the low 4 GiB are identity-mapped; `addr` is RAM or ROM.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

/// Writes to ROM are dropped; the RAM below it takes writes. (A write
/// straddling RAM and ROM stops the VM with a report: the emulator
/// carries out no access that crosses from RAM into ROM or device pages.)
fn rom() -> u32 {
    let probe = [ROM, ROM + 0x10, ROM + 0x1_fff8];
    let before = probe.map(read64);
    let below = read64(ROM - 8);
    // SAFETY: identity-mapped RAM (below ROM) and ROM; ROM writes are
    // dropped by the platform, the RAM write below it is this guest's own
    // memory, unused by it.
    unsafe {
        core::ptr::write_volatile(ROM as *mut u8, 0x5a);
        core::ptr::write_volatile((ROM + 0x1_fff8) as *mut u64, 0x1122_3344_5566_7788);
        asm!("add dword ptr [{a}], 0x01010101", a = in(reg) ROM + 0x10, options(nostack));
        asm!("xchg qword ptr [{a}], {v}", a = in(reg) ROM + 0x10, v = inout(reg) 0u64 => _, options(nostack));
        core::ptr::write_volatile((ROM - 8) as *mut u64, !below);
    }
    let after = probe.map(read64);
    let now_below = read64(ROM - 8);
    check(
        "writes to rom are dropped and the ram beside it written",
        after == before && now_below == !below,
        format_args!("rom {before:x?} -> {after:x?}; below {below:#x} -> {now_below:#x}"),
    )
}

fn apic() -> u32 {
    let mut failed = rom();
    let base = rdmsr(IA32_APIC_BASE);
    failed +=
        check("apic base as firmware left it", base == 0xfee0_0000 | APIC_EN | APIC_BSP, format_args!("{base:#x}"));
    let reserved = trap::probe(2, || wrmsr(IA32_APIC_BASE, base | (1 << 63)));
    let x2apic_offered = cpuid(1, 0).ecx & (1 << 21) != 0;
    let x2apic = trap::probe(2, || wrmsr(IA32_APIC_BASE, base | APIC_EXTD));
    let x2_msr = trap::probe(2, || {
        rdmsr(0x802);
    });
    failed += check(
        "bad apic base values and x2apic msrs raise #gp",
        reserved == Some(13) && !x2apic_offered && x2apic == Some(13) && x2_msr == Some(13),
        format_args!("reserved bit {reserved:?}, x2apic {x2apic:?} (offered {x2apic_offered}), msr 0x802 {x2_msr:?}"),
    );
    let version = read32(0xfee0_0000 + VERSION_REG);
    wrmsr(IA32_APIC_BASE, 0xfed0_0000 | APIC_EN | APIC_BSP);
    let moved = read32(0xfed0_0000 + VERSION_REG);
    wrmsr(IA32_APIC_BASE, base);
    let back = read32(0xfee0_0000 + VERSION_REG);
    failed += check(
        "the apic page follows ia32_apic_base",
        version & 0xff == 0x14 && moved == version && back == version,
        format_args!("version {version:#x}, at 0xfed00000 {moved:#x}, back {back:#x}"),
    );
    println!("hostile: {} apic checks failed; now an IMUL of an APIC register", failed);
    // SAFETY: deliberately something no MMIO emulator implements: the
    // hypervisor must stop this VM here.
    unsafe {
        asm!("imul {v:e}, dword ptr [{a}], 3", a = in(reg) 0xfee0_0030u64, v = out(reg) _, options(nostack, readonly));
    }
    println!("hostile: UNREACHABLE");
    1
}

fn main(boot: Boot) -> u32 {
    trap::install();
    let cmdline = boot.cmdline();
    let mut words = cmdline.split_whitespace();
    let count = cmdline.split_whitespace().find_map(|w| w.strip_prefix("n=")).and_then(|n| n.parse().ok());
    match words.next() {
        Some("ports") => ports(count.unwrap_or(20_000)),
        Some("apic") => apic(),
        other => {
            println!("hostile: unknown mode {other:?} (ports, apic)");
            2
        }
    }
}

guests::entry!(main);
