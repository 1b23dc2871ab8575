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
//! - `apic`: IA32_APIC_BASE with reserved bits must #GP, as must an x2APIC
//!   MSR in xAPIC mode; x2APIC mode (CPUID offers it) must be reachable,
//!   with its MSRs, and its illegal transitions (straight back to xAPIC,
//!   EN clear with EXTD set, disabled straight to x2APIC) must #GP, the way
//!   back going through disabled (SDM Vol. 3A 11.12.5); the APIC page
//!   moves and follows IA32_APIC_BASE; then an IMUL with its operand
//!   in the APIC page, which no MMIO emulator needs to carry out: the VM
//!   must be stopped with a report, and "hostile: UNREACHABLE" never
//!   printed. Before that, writes to the firmware ROM (0xE0000-0xFFFFF:
//!   plain, read-modify-write, exchange, at both ends) must change no ROM
//!   byte, as on a PC, and the RAM just below it stays writable.
//! - `virtio`: breaks the rings of its virtio console (found by probing the
//!   virtio-mmio slots): a descriptor chain that loops, then a buffer on the
//!   local APIC's page; each must put the device in DEVICE_NEEDS_RESET with
//!   guest memory untouched. After a reset the device must work again: a
//!   line sent through its transmit queue reaches the host's console as
//!   `[vm N hvc0] hostile: hvc0 works after a reset`. Exits 0 if every
//!   check passed.
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
    let x2_msr = trap::probe(2, || {
        rdmsr(0x802);
    });
    failed += check(
        "bad apic base values and x2apic msrs raise #gp",
        reserved == Some(13) && x2_msr == Some(13),
        format_args!("reserved bit {reserved:?}, msr 0x802 in xapic mode {x2_msr:?}"),
    );
    // x2APIC mode and back (SDM Vol. 3A 11.12.5, Figure 11-27).
    let offered = cpuid(1, 0).ecx & (1 << 21) != 0;
    let to_x2apic = trap::probe(2, || wrmsr(IA32_APIC_BASE, base | APIC_EXTD));
    let mut id = u64::MAX;
    let id_read = trap::probe(2, || id = rdmsr(0x802));
    let straight_back = trap::probe(2, || wrmsr(IA32_APIC_BASE, base));
    let extd_alone = trap::probe(2, || wrmsr(IA32_APIC_BASE, (base & !APIC_EN) | APIC_EXTD));
    let disable = trap::probe(2, || wrmsr(IA32_APIC_BASE, base & !(APIC_EN | APIC_EXTD)));
    let disabled_to_x2apic = trap::probe(2, || wrmsr(IA32_APIC_BASE, base | APIC_EXTD));
    let to_xapic = trap::probe(2, || wrmsr(IA32_APIC_BASE, base));
    failed += check(
        "x2apic mode has its msrs and is left only through disabled",
        offered
            && to_x2apic.is_none()
            && id_read.is_none()
            && id == 0
            && straight_back == Some(13)
            && extd_alone == Some(13)
            && disable.is_none()
            && disabled_to_x2apic == Some(13)
            && to_xapic.is_none()
            && rdmsr(IA32_APIC_BASE) == base,
        format_args!(
            "offered {offered}, enter {to_x2apic:?}, id {id:#x} ({id_read:?}), back {straight_back:?}, extd alone {extd_alone:?}, disable {disable:?}, disabled to x2apic {disabled_to_x2apic:?}, to xapic {to_xapic:?}"
        ),
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

/// virtio-mmio registers (virtio 1.2 4.2.2) and the slots the hypervisor
/// places devices in (one 4 KiB page each from 0xd000_0000).
mod vio {
    pub const SLOTS: u64 = 0xd000_0000;
    pub const MAGIC: u64 = 0x000;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const NEEDS_RESET: u32 = 0x40;
    /// The guest's rings: queue q at RING + 0x1000 q (descriptors, avail at
    /// +0x100, used at +0x200), buffers at +0x800.
    pub const RING: u64 = 0x38_0000;
}

fn w32(addr: u64, v: u32) {
    // SAFETY: identity-mapped; a device register or this guest's own RAM.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

fn w16(addr: u64, v: u16) {
    // SAFETY: as in `w32`, this guest's own RAM.
    unsafe { core::ptr::write_volatile(addr as *mut u16, v) }
}

fn w64(addr: u64, v: u64) {
    // SAFETY: as in `w32`, this guest's own RAM.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// The virtio console's register page, if there is one.
fn find_console() -> Option<u64> {
    (0..8)
        .map(|n| vio::SLOTS + n * 0x1000)
        .find(|&b| read32(b + vio::MAGIC) == 0x7472_6976 && read32(b + vio::DEVICE_ID) == 3)
}

/// Reset, the handshake with VERSION_1 only, both queues of 8 entries on
/// zeroed rings, DRIVER_OK.
fn console_up(base: u64) {
    for a in (vio::RING..vio::RING + 0x2000).step_by(8) {
        w64(a, 0);
    }
    w32(base + vio::STATUS, 0);
    w32(base + vio::STATUS, 1);
    w32(base + vio::STATUS, 3);
    w32(base + vio::DRIVER_FEATURES_SEL, 1);
    w32(base + vio::DRIVER_FEATURES, 1);
    w32(base + vio::DRIVER_FEATURES_SEL, 0);
    w32(base + vio::DRIVER_FEATURES, 0);
    w32(base + vio::STATUS, 3 | 8);
    for q in 0..2u32 {
        let ring = vio::RING + 0x1000 * u64::from(q);
        w32(base + vio::QUEUE_SEL, q);
        w32(base + vio::QUEUE_NUM, 8);
        w32(base + vio::QUEUE_DESC_LOW, ring as u32);
        w32(base + vio::QUEUE_DRIVER_LOW, (ring + 0x100) as u32);
        w32(base + vio::QUEUE_DEVICE_LOW, (ring + 0x200) as u32);
        w32(base + vio::QUEUE_READY, 1);
    }
    w32(base + vio::STATUS, 3 | 8 | 4);
}

/// One descriptor of the transmit queue's table, published as the first
/// chain, then a notification.
fn transmit(base: u64, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let ring = vio::RING + 0x1000;
    let d = ring + 16 * u64::from(index);
    w64(d, addr);
    w32(d + 8, len);
    w16(d + 12, flags);
    w16(d + 14, next);
    w16(ring + 0x100 + 4, index);
    w16(ring + 0x100 + 2, 1);
    w32(base + vio::QUEUE_NOTIFY, 1);
}

fn virtio() -> u32 {
    let Some(base) = find_console() else {
        println!("hostile: FAIL no virtio console in the virtio-mmio slots");
        return 1;
    };
    let mut failed = 0;
    let status = || read32(base + vio::STATUS);
    // A chain that loops: descriptor 0 is its own next.
    console_up(base);
    let used_before = read64(vio::RING + 0x1200);
    transmit(base, 0, vio::RING + 0x1800, 4, 1, 0);
    failed += check(
        "a looping descriptor chain needs a reset",
        status() & vio::NEEDS_RESET != 0 && read64(vio::RING + 0x1200) == used_before,
        format_args!("status {:#x}", status()),
    );
    // A buffer on the local APIC's page, not RAM.
    console_up(base);
    transmit(base, 0, 0xfee0_0000, 16, 0, 0);
    failed += check(
        "a buffer outside ram needs a reset",
        status() & vio::NEEDS_RESET != 0,
        format_args!("status {:#x}", status()),
    );
    // Reset and set up right: it works again.
    console_up(base);
    let text = b"hostile: hvc0 works after a reset\n";
    for (i, b) in text.iter().enumerate() {
        // SAFETY: this guest's own RAM (the buffer area of the rings).
        unsafe { core::ptr::write_volatile((vio::RING + 0x1800 + i as u64) as *mut u8, *b) };
    }
    transmit(base, 0, vio::RING + 0x1800, text.len() as u32, 0, 0);
    let used = read32(vio::RING + 0x1200) >> 16;
    failed += check(
        "after a reset the device serves a good chain",
        status() & vio::NEEDS_RESET == 0 && used == 1,
        format_args!("status {:#x}, used idx {used}", status()),
    );
    println!("hostile: {failed} virtio checks failed");
    u32::from(failed != 0)
}

fn main(boot: Boot) -> u32 {
    trap::install();
    let cmdline = boot.cmdline();
    let mut words = cmdline.split_whitespace();
    let count = cmdline.split_whitespace().find_map(|w| w.strip_prefix("n=")).and_then(|n| n.parse().ok());
    match words.next() {
        Some("ports") => ports(count.unwrap_or(20_000)),
        Some("apic") => apic(),
        Some("virtio") => virtio(),
        other => {
            println!("hostile: unknown mode {other:?} (ports, apic, virtio)");
            2
        }
    }
}

guests::entry!(main);
