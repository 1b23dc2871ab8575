//! Port I/O, CPUID, TSC and the hypercall, as the guest sees them.

use core::arch::asm;

/// The debug-exit port: writing V ends the VM with status (V << 1) | 1, the
/// convention of QEMU's isa-debug-exit device.
pub const EXIT_PORT: u16 = 0xf4;

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects; in a VM it is intercepted.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as above.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) }
    v
}

pub fn outl(port: u16, v: u32) {
    // SAFETY: as above.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags)) }
}

pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as above.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags)) }
    v
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    Cpuid { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// 0 = not yet known, 1 = Intel (VMCALL), 2 = AMD (VMMCALL).
static HYPERCALL_KIND: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(0);

/// Whether this CPU is AMD's, whose hypercall instruction is VMMCALL (VMCALL
/// raises #UD there, APM Vol. 3): the same choice Linux guests make.
pub fn amd() -> bool {
    use core::sync::atomic::Ordering::Relaxed;
    let mut k = HYPERCALL_KIND.load(Relaxed);
    if k == 0 {
        // "AuthenticAMD": EBX "Auth", EDX "enti", ECX "cAMD".
        let v = cpuid(0, 0);
        k = if v.ebx == u32::from_le_bytes(*b"Auth") && v.ecx == u32::from_le_bytes(*b"cAMD") { 2 } else { 1 };
        HYPERCALL_KIND.store(k, Relaxed);
    }
    k == 2
}

/// The hypercall (VMCALL, or VMMCALL on AMD) with RAX = function, RDI/RSI =
/// arguments; returns RAX.
pub fn hypercall(func: u64, a: u64, b: u64) -> u64 {
    hypercall_args(func, a, b).0
}

/// A hypercall that may hand its arguments back changed (a range function
/// that did part of the range): `(RAX, RDI, RSI)` after the call.
pub fn hypercall_args(func: u64, a: u64, b: u64) -> (u64, u64, u64) {
    let (ret, rdi, rsi): (u64, u64, u64);
    // SAFETY: the instruction traps to the hypervisor, which changes only
    // RAX, RDI and RSI (declared as outputs).
    unsafe {
        if amd() {
            asm!("vmmcall", inout("rax") func => ret, inout("rdi") a => rdi, inout("rsi") b => rsi, options(nostack))
        } else {
            asm!("vmcall", inout("rax") func => ret, inout("rdi") a => rdi, inout("rsi") b => rsi, options(nostack))
        }
    }
    (ret, rdi, rsi)
}

/// Ends the VM through the exit port; halts if the write returns.
pub fn exit(code: u32) -> ! {
    outl(EXIT_PORT, code);
    loop {
        // SAFETY: with interrupts off this stops the CPU for good.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) }
    }
}

/// One HLT with interrupts enabled; the hypervisor resumes the guest.
pub fn halt_once() {
    // SAFETY: no interrupt handlers exist, but none are delivered to this
    // guest either; IF is cleared again right after.
    unsafe { asm!("sti; hlt; cli", options(nomem, nostack)) }
}

/// RDMSR (2 bytes: 0f 32).
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: in a VM every RDMSR the hypervisor does not pass through
    // exits; a refused one raises #GP, which tests catch with `trap::probe`.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack)) };
    ((hi as u64) << 32) | lo as u64
}

/// WRMSR (2 bytes: 0f 30).
pub fn wrmsr(msr: u32, v: u64) {
    // SAFETY: as for `rdmsr`.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack)) };
}

/// VMXON with a memory operand (4 bytes: f3 0f c7 30): must raise #UD in
/// a guest that CPUID tells has no VMX.
pub fn vmxon_attempt() {
    let region = 0u64;
    // SAFETY: the instruction faults in the guest; the operand is a local.
    unsafe { asm!("vmxon [rax]", in("rax") &region, options(nostack)) };
}

/// The SVM instructions a guest must not run, VMMCALL (the hypercall)
/// aside: all 3 bytes, `0f 01 d8`..`0f 01 df` (APM Vol. 3). Each must raise
/// #UD in a guest: undefined on Intel, intercepted and refused by the
/// hypervisor on AMD, where the guest runs with EFER.SVME set underneath.
pub const SVM_INSTRUCTIONS: [&str; 7] = ["vmrun", "vmload", "vmsave", "stgi", "clgi", "skinit", "invlpga"];

/// Executes the SVM instruction `name` (one of [`SVM_INSTRUCTIONS`]).
pub fn svm_attempt(name: &str) {
    // SAFETY: each instruction faults in the guest (see above). Should one
    // run anyway, its operands are harmless: RAX = 0 names no VMCB or save
    // area the guest owns, and INVLPGA of address 0 in ASID 0 only drops a
    // TLB entry. The test that follows reports it.
    unsafe {
        match name {
            "vmrun" => asm!("vmrun rax", in("rax") 0u64, options(nostack)),
            "vmload" => asm!("vmload rax", in("rax") 0u64, options(nostack)),
            "vmsave" => asm!("vmsave rax", in("rax") 0u64, options(nostack)),
            "stgi" => asm!("stgi", options(nostack)),
            "clgi" => asm!("clgi", options(nostack)),
            "skinit" => asm!("skinit eax", in("eax") 0u32, options(nostack)),
            "invlpga" => asm!("invlpga rax, ecx", in("rax") 0u64, in("ecx") 0u32, options(nostack)),
            _ => {}
        }
    }
}

/// CR2, the linear address of the last page fault (SDM Vol. 3A 2.5).
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 at CPL 0 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Reads the byte at `addr` with a 2-byte instruction (`8a 07`, MOV AL,
/// [RDI]), for `trap::probe` to resume after when it faults.
pub fn touch(addr: u64) {
    // SAFETY: the read has no effect but the page walk; an unmapped address
    // raises #PF, which the caller catches with `trap::probe`.
    unsafe { asm!("mov al, [rdi]", in("rdi") addr, out("al") _, options(nostack, readonly)) };
}
