//! VM entry and exit. `vmx_run` saves the host's callee-saved registers,
//! records the stack pointer in HOST_RSP, loads the guest's general-purpose
//! registers and executes VMLAUNCH or VMRESUME. A VM exit lands in
//! `vmx_exit` (HOST_RIP) on that same stack; it stores the guest registers
//! and returns from `vmx_run` as if the call had completed. RSP and RIP of the
//! guest live in the VMCS, not here.

use core::arch::naked_asm;
use vcpu::Gprs;

/// VMCS encoding of HOST_RSP (SDM Vol. 3D B.4.4).
const HOST_RSP: u64 = 0x6C14;

/// Enters the guest. Returns 0 after a VM exit, 1 for VMfailInvalid and
/// 2 for VMfailValid (entry refused before the guest ran).
///
/// # Safety
/// The VMCS is current and complete, HOST_RIP is `vmx_exit`, and `regs` is
/// valid for reads and writes for the whole call.
#[unsafe(naked)]
pub unsafe extern "C" fn vmx_run(regs: *mut Gprs, launched: u64) -> u64 {
    naked_asm!(
        "push rbp",
        "push rbx",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "push rdi",
        "mov rax, {host_rsp}",
        "vmwrite rax, rsp",
        // From here until the VM instruction, only MOVs: they keep RFLAGS,
        // whose ZF still says whether the VMCS was launched.
        "test rsi, rsi",
        "mov rax, [rdi + 0x00]",
        "mov rcx, [rdi + 0x08]",
        "mov rdx, [rdi + 0x10]",
        "mov rbx, [rdi + 0x18]",
        "mov rbp, [rdi + 0x28]",
        "mov rsi, [rdi + 0x30]",
        "mov r8,  [rdi + 0x40]",
        "mov r9,  [rdi + 0x48]",
        "mov r10, [rdi + 0x50]",
        "mov r11, [rdi + 0x58]",
        "mov r12, [rdi + 0x60]",
        "mov r13, [rdi + 0x68]",
        "mov r14, [rdi + 0x70]",
        "mov r15, [rdi + 0x78]",
        "mov rdi, [rdi + 0x38]",
        "jnz 2f",
        "vmlaunch",
        "jmp 3f",
        "2:",
        "vmresume",
        "3:",
        // The entry failed: CF = VMfailInvalid, ZF = VMfailValid.
        "mov eax, 2",
        "mov ecx, 1",
        "cmovc eax, ecx",
        "add rsp, 8",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbx",
        "pop rbp",
        "ret",
        host_rsp = const HOST_RSP,
    );
}

/// HOST_RIP: the first instruction after every VM exit.
///
/// # Safety
/// Never called: the CPU jumps here on VM exit with RSP = HOST_RSP.
#[unsafe(naked)]
pub unsafe extern "C" fn vmx_exit() {
    naked_asm!(
        // [rsp] holds `regs`; swap it with the guest's RDI.
        "xchg rdi, [rsp]",
        "mov [rdi + 0x00], rax",
        "mov [rdi + 0x08], rcx",
        "mov [rdi + 0x10], rdx",
        "mov [rdi + 0x18], rbx",
        "mov [rdi + 0x28], rbp",
        "mov [rdi + 0x30], rsi",
        "mov [rdi + 0x40], r8",
        "mov [rdi + 0x48], r9",
        "mov [rdi + 0x50], r10",
        "mov [rdi + 0x58], r11",
        "mov [rdi + 0x60], r12",
        "mov [rdi + 0x68], r13",
        "mov [rdi + 0x70], r14",
        "mov [rdi + 0x78], r15",
        "pop rax",
        "mov [rdi + 0x38], rax",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbx",
        "pop rbp",
        "xor eax, eax",
        "ret",
    );
}

const _: () = {
    assert!(core::mem::offset_of!(Gprs, rdi) == 0x38);
    assert!(core::mem::offset_of!(Gprs, r15) == 0x78);
    assert!(core::mem::offset_of!(Gprs, rbp) == 0x28);
};
