//! VMRUN and the way back (APM Vol. 2 15.5-15.6).
//!
//! `svm_run` clears GIF, sets the host's IF (so that with V_INTR_MASKING a
//! physical interrupt ends the guest's run as an INTR intercept instead of
//! staying masked, APM 15.21.1), loads the guest's VMLOAD-switched state
//! (FS, GS, TR, LDTR, syscall MSRs), and runs the guest. After the #VMEXIT
//! the CPU has restored the host's RSP, RIP, RAX, control registers and
//! RFLAGS; everything else in the GPRs is the guest's. They are stored, the
//! guest's VMLOAD state saved, the host's reloaded, and GIF set again with
//! IF still on for one instruction, so a pending host interrupt (the
//! time-slice timer) is taken here, then IF is cleared.

use core::arch::naked_asm;
use vcpu::Gprs;

/// # Safety
/// EFER.SVME is set; `guest_vmcb` is a complete VMCB and `host_vmcb` holds
/// the host's VMSAVE state; `regs` is valid for reads and writes for the
/// whole call; the host IDT handles every interrupt that can be pending.
#[unsafe(naked)]
pub unsafe extern "C" fn svm_run(regs: *mut Gprs, guest_vmcb: u64, host_vmcb: u64) {
    naked_asm!(
        "push rbp",
        "push rbx",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "push rdi", // regs
        "push rdx", // host VMCB
        "push rsi", // guest VMCB
        "clgi",
        "sti",
        "mov rax, rsi",
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
        "vmload rax",
        "vmrun rax",
        // #VMEXIT: RAX and RSP are the host's again (the stack as pushed).
        "mov rax, [rsp + 16]",
        "mov [rax + 0x08], rcx",
        "mov [rax + 0x10], rdx",
        "mov [rax + 0x18], rbx",
        "mov [rax + 0x28], rbp",
        "mov [rax + 0x30], rsi",
        "mov [rax + 0x38], rdi",
        "mov [rax + 0x40], r8",
        "mov [rax + 0x48], r9",
        "mov [rax + 0x50], r10",
        "mov [rax + 0x58], r11",
        "mov [rax + 0x60], r12",
        "mov [rax + 0x68], r13",
        "mov [rax + 0x70], r14",
        "mov [rax + 0x78], r15",
        "pop rax",
        "vmsave rax",
        "pop rax",
        "vmload rax",
        "stgi",
        "nop",
        "cli",
        "add rsp, 8",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbx",
        "pop rbp",
        "ret",
    );
}

const _: () = {
    assert!(core::mem::offset_of!(Gprs, rcx) == 0x08);
    assert!(core::mem::offset_of!(Gprs, rdi) == 0x38);
    assert!(core::mem::offset_of!(Gprs, r15) == 0x78);
    assert!(core::mem::offset_of!(Gprs, rbp) == 0x28);
};
