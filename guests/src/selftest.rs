//! The self-test: each check runs in the guest and is judged by the guest;
//! it prints one line per check and a final PASS/FAIL line, and exits with
//! 0 (pass) or 1 (fail) through the debug-exit port.

use crate::hypercall as hc;
use crate::io::{cpuid, hypercall, inb, outb, rdmsr, wrmsr};
use crate::{Boot, println};

struct Checks {
    run: u32,
    failed: u32,
}

impl Checks {
    fn check(&mut self, name: impl core::fmt::Display, ok: bool, detail: core::fmt::Arguments) {
        self.run += 1;
        if ok {
            println!("selftest: ok   {name}");
        } else {
            self.failed += 1;
            println!("selftest: FAIL {name}: {detail}");
        }
    }
}

pub fn run(boot: Boot) -> u32 {
    let mut c = Checks { run: 0, failed: 0 };
    println!("selftest: starting ({boot:?}, cmdline {:?})", boot.cmdline());

    if let Boot::Multiboot { magic, info } = boot {
        c.check("multiboot magic", magic == 0x2BAD_B002, format_args!("eax={magic:#x}"));
        // SAFETY: as in `ram_bytes`; offset 0 is `flags`.
        let flags = unsafe { core::ptr::read_volatile(info as u64 as *const u32) };
        let want = (1 << 0) | (1 << 6);
        c.check("multiboot info flags", flags & want == want, format_args!("flags={flags:#x}"));
        // `modules=N` on the command line: N modules, each an ELF file from
        // the ramdisk, named by its module string.
        if let Some(n) = boot.cmdline().split_whitespace().find_map(|w| w.strip_prefix("modules=")) {
            let want: u32 = n.parse().unwrap_or(u32::MAX);
            // SAFETY: offsets 20/24 are mods_count/mods_addr; each module
            // entry is start, end, string (Multiboot 0.6.96, 3.3).
            let (count, first_magic) = unsafe {
                let count = core::ptr::read_volatile((info as u64 + 20) as *const u32);
                let mods = core::ptr::read_volatile((info as u64 + 24) as *const u32) as u64;
                let start = core::ptr::read_volatile(mods as *const u32) as u64;
                let magic = if count > 0 { core::ptr::read_volatile(start as *const [u8; 4]) } else { [0; 4] };
                (count, magic)
            };
            c.check(
                "multiboot modules",
                count == want && (count == 0 || &first_magic == b"\x7fELF"),
                format_args!("{count} module(s), first starts {first_magic:02x?}"),
            );
        }
    }

    let leaf1 = cpuid(1, 0);
    c.check("cpuid hypervisor bit", leaf1.ecx & (1 << 31) != 0, format_args!("ecx={:#x}", leaf1.ecx));
    c.check("cpuid hides vmx", leaf1.ecx & (1 << 5) == 0, format_args!("ecx={:#x}", leaf1.ecx));
    let ext = cpuid(0x8000_0001, 0);
    c.check("cpuid hides svm", ext.ecx & (1 << 2) == 0, format_args!("ecx={:#x}", ext.ecx));
    let hv = cpuid(0x4000_0000, 0);
    let mut sig = [0u8; 12];
    sig[0..4].copy_from_slice(&hv.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&hv.ecx.to_le_bytes());
    sig[8..12].copy_from_slice(&hv.edx.to_le_bytes());
    c.check(
        "cpuid vendor leaf",
        &sig == hc::SIGNATURE && hv.eax >= 0x4000_0001,
        format_args!("eax={:#x} sig={:?}", hv.eax, core::str::from_utf8(&sig)),
    );

    let ping = hypercall(hc::PING, 0, 0);
    c.check("vmcall ping", ping == hc::PING_REPLY, format_args!("rax={ping:#x}"));
    let id = hypercall(hc::VM_ID, 0, 0);
    let id_ok = match boot {
        Boot::Elf64 { vm_id, .. } => id == vm_id && id != 0,
        Boot::Multiboot { .. } => id != 0 && id != hc::UNKNOWN,
    };
    c.check("vmcall vm id", id_ok, format_args!("rax={id:#x}"));
    let unknown = hypercall(0xdead, 0, 0);
    c.check("vmcall unknown function", unknown == hc::UNKNOWN, format_args!("rax={unknown:#x}"));

    // The 16550's scratch register (offset 7) holds what was written.
    outb(0x3ff, 0x5a);
    let a = inb(0x3ff);
    outb(0x3ff, 0xa5);
    let b = inb(0x3ff);
    c.check("port i/o uart scratch", a == 0x5a && b == 0xa5, format_args!("read {a:#x} {b:#x}"));
    let none = inb(0x2e8);
    c.check("port i/o unbacked port", none == 0xff, format_args!("read {none:#x}"));
    let (scratch, signature) = string_port_io();
    c.check(
        "string port i/o",
        scratch == 3 && &signature == b"QEMU",
        format_args!("rep outsb left scratch {scratch:#x}; rep insb read {signature:02x?} from fw_cfg"),
    );

    let (start, len) = test_region(boot.ram_bytes());
    let bad = memory_pattern(start, len);
    c.check(
        "memory write/read",
        len >= 1 << 20 && bad.is_none(),
        format_args!("{len:#x} bytes at {start:#x}, first bad at {bad:?}"),
    );

    crate::trap::install();
    // SYSENTER_CS is passed through: written and read back directly.
    let fault = crate::trap::probe(2, || wrmsr(0x174, 0x1234));
    let back = rdmsr(0x174);
    c.check("msr pass-through", fault.is_none() && back == 0x1234, format_args!("fault {fault:?}, read {back:#x}"));
    // IA32_FEATURE_CONTROL is emulated: locked, VMX off.
    let fc = rdmsr(0x3a);
    c.check("msr emulated", fc == 1, format_args!("IA32_FEATURE_CONTROL = {fc:#x}"));
    let r = crate::trap::probe(2, || {
        rdmsr(0x4b56_4d00);
    });
    let w = crate::trap::probe(2, || wrmsr(0x3a, 5));
    c.check("msr refused with #GP", r == Some(13) && w == Some(13), format_args!("rdmsr {r:?}, wrmsr {w:?}"));
    let efer = rdmsr(0xc000_0080);
    let long = matches!(boot, Boot::Elf64 { .. }) || efer & (1 << 10) != 0;
    c.check("efer readable", long && efer & (1 << 8) != 0, format_args!("EFER = {efer:#x}"));
    c.check("efer hides svme", efer & (1 << 12) == 0, format_args!("EFER = {efer:#x}"));
    // PAT: a valid value reads back; a reserved memory type (2) is #GP.
    let pat = rdmsr(0x277);
    let mine = (pat & !0xff00) | (1 << 8); // PA1 = write-combining
    wrmsr(0x277, mine);
    let back = rdmsr(0x277);
    let bad = crate::trap::probe(2, || wrmsr(0x277, 0x0202_0202_0202_0202));
    wrmsr(0x277, pat);
    c.check(
        "pat writable",
        back == mine && bad == Some(13),
        format_args!("wrote {mine:#x}, read {back:#x}, bad {bad:?}"),
    );
    let ud = crate::trap::probe(4, crate::io::vmxon_attempt);
    c.check("vmxon raises #UD", ud == Some(6), format_args!("fault {ud:?}"));
    for name in crate::io::SVM_INSTRUCTIONS {
        let ud = crate::trap::probe(3, || crate::io::svm_attempt(name));
        c.check(format_args!("{name} raises #UD"), ud == Some(6), format_args!("fault {ud:?}"));
    }

    match remapped_code_page(start, len) {
        Some((first, second)) => c.check(
            "cpuid on a remapped code page",
            first && second,
            format_args!("page A returned right: {first}; page B ran the CMC after CPUID: {second}"),
        ),
        None => c.check("cpuid on a remapped code page", false, format_args!("no room at {start:#x} or 8 GiB mapped")),
    }

    let halts = hypercall(hc::STAT, hc::STAT_HLT, 0);
    crate::io::halt_once();
    let after = hypercall(hc::STAT, hc::STAT_HLT, 0);
    c.check("hlt resumes", after == halts + 1, format_args!("hlt exits {halts} -> {after}"));

    let exits = hypercall(hc::STAT, hc::STAT_EXITS, 0);
    c.check("exit counter", exits > c.run as u64, format_args!("{exits} exits"));

    if c.failed == 0 {
        println!("selftest: PASS ({}/{} checks)", c.run, c.run);
        0
    } else {
        println!("selftest: FAIL ({} of {} checks failed)", c.failed, c.run);
        1
    }
}

/// Linear 8 GiB: PML4 entry 0, PDPT entry 8, beyond the 4 GiB either boot
/// protocol's page tables map.
const REMAP_LINEAR: u64 = 8 << 30;

/// A CPUID on a code page the guest remaps with CR3 unchanged: it rewrites
/// the page-table entry and runs INVLPG, neither of which exits. A
/// hypervisor that finds instruction lengths by reading the code (AMD-V
/// without next-RIP saving) must read the page the entry maps now.
///
/// Page A holds `66 0f a2 c3` (CPUID with an operand-size prefix, RET),
/// page B `0f a2 f5 c3` (CPUID, CMC, RET), both at offset 0x100; the linear
/// page maps A, runs, then maps B and runs again with CF clear. Measured
/// through B, CPUID is 2 bytes and CMC sets CF; measured through a stale A
/// it would be 3, skipping CMC straight to RET. Returns whether CPUID came
/// back to the right place both times (A: RET reached; B: CF set), or None
/// when the region is too small or 8 GiB is already mapped.
fn remapped_code_page(start: u64, len: u64) -> Option<(bool, bool)> {
    const P_W: u64 = 3;
    if len < 4 * 4096 {
        return None;
    }
    let (pd, pt, a, b) = (start, start + 0x1000, start + 0x2000, start + 0x3000);
    let cr3: u64;
    // SAFETY: reading CR3.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags)) };
    let pml4 = cr3 & 0x000f_ffff_ffff_f000;
    let w = |at: u64, v: u64| {
        // SAFETY: page tables and the test region are identity-mapped guest
        // RAM this program owns (the test region is unused by now).
        unsafe { core::ptr::write_volatile(at as *mut u64, v) }
    };
    // SAFETY: as above; PML4 entry 0 exists in both boot protocols' tables.
    let pdpt = unsafe { core::ptr::read_volatile(pml4 as *const u64) } & 0x000f_ffff_ffff_f000;
    let slot = pdpt + 8 * (REMAP_LINEAR >> 30);
    // SAFETY: as above.
    if unsafe { core::ptr::read_volatile(slot as *const u64) } != 0 {
        return None;
    }
    for off in (0..0x4000).step_by(8) {
        w(start + off, 0);
    }
    let code = |page: u64, bytes: &[u8]| {
        for (i, &x) in bytes.iter().enumerate() {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile((page + 0x100 + i as u64) as *mut u8, x) };
        }
    };
    code(a, &[0x66, 0x0f, 0xa2, 0xc3]);
    code(b, &[0x0f, 0xa2, 0xf5, 0xc3]);
    w(pt, a | P_W);
    w(pd, pt | P_W);
    w(slot, pd | P_W);
    let entry = REMAP_LINEAR + 0x100;
    let run = || -> bool {
        let cf: u8;
        // SAFETY: calls the 4-byte routine just written at `entry`, mapped
        // and executable; CPUID clobbers EAX, EBX (saved here), ECX, EDX.
        unsafe {
            core::arch::asm!(
                "push rbx",
                "clc",
                "call {f}",
                "setc {cf}",
                "pop rbx",
                f = in(reg) entry,
                cf = out(reg_byte) cf,
                inout("eax") 0u32 => _,
                inout("ecx") 0u32 => _,
                out("edx") _,
            )
        };
        cf != 0
    };
    let invlpg = || {
        // SAFETY: drops this guest's TLB entry for the test page.
        unsafe { core::arch::asm!("invlpg [{}]", in(reg) REMAP_LINEAR, options(nostack, preserves_flags)) }
    };
    let first = !run(); // RET reached, no CMC on page A
    w(pt, b | P_W);
    invlpg();
    let second = run();
    w(slot, 0);
    invlpg();
    Some((first, second))
}

/// Up to 8 MiB of RAM from 2 MiB, above the image, its stack and page
/// tables and the Multiboot structures, which all end below 2 MiB.
fn test_region(ram: u64) -> (u64, u64) {
    let start = 2 << 20;
    let end = ram.min(start + (8 << 20));
    (start, end.saturating_sub(start))
}

/// Writes a pseudo-random pattern, reads it back; the first mismatch.
fn memory_pattern(start: u64, len: u64) -> Option<u64> {
    let words = len / 8;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // SAFETY: [start, start+len) is guest RAM, identity-mapped, and not
        // used by this program's image, stack or page tables.
        unsafe { core::ptr::write_volatile((start + i * 8) as *mut u64, x) };
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // SAFETY: as above.
        let v = unsafe { core::ptr::read_volatile((start + i * 8) as *const u64) };
        if v != x {
            return Some(start + i * 8);
        }
    }
    None
}

/// REP OUTSB of 1, 2, 3 to the UART's scratch register (the last stays),
/// then REP INSB of fw_cfg's signature (item 0 through the data port).
fn string_port_io() -> (u8, [u8; 4]) {
    let src = [1u8, 2, 3];
    let mut sig = [0u8; 4];
    // SAFETY: port I/O, intercepted in a VM; OUTSB reads `src`, INSB writes
    // `sig`, both live locals of the lengths in RCX; DF is clear (the ABI).
    unsafe {
        core::arch::asm!("rep outsb", in("dx") 0x3ffu16, inout("rsi") src.as_ptr() => _, inout("rcx") 3usize => _,
            options(nostack, readonly, preserves_flags));
        core::arch::asm!("out dx, ax", in("dx") 0x510u16, in("ax") 0u16, options(nomem, nostack, preserves_flags));
        core::arch::asm!("rep insb", in("dx") 0x511u16, inout("rdi") sig.as_mut_ptr() => _, inout("rcx") 4usize => _,
            options(nostack, preserves_flags));
    }
    (inb(0x3ff), sig)
}
