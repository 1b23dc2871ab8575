//! The vCPU model on both backends (Bochs with VT-x, QEMU TCG with AMD-V):
//! the conformance check of `hypervisor::vm::conformance` (`set_state`
//! then `state` gives back every field) run by the kernel at boot, and
//! event delivery seen from a guest (`irqtest`): queued interrupts wait for
//! RFLAGS.IF = 1 and the end of the STI shadow, NMIs for the NMI handler's
//! IRET.

use boot::emulator::Emulator;
use std::time::Duration;
use tests_qemu::{Machine, label, on_both_backends};

const TIMEOUT: Duration = Duration::from_secs(240);

on_both_backends!(set_state_then_state_gives_back_every_field,);

fn set_state_then_state_gives_back_every_field(emu: Emulator) {
    let m = Machine::boot_with(emu, &label(emu, "vcpu-state"), &["vcpu_conformance = true"]);
    let t = m.transcript();
    let backend = emu.backend();
    assert!(t.contains(&format!("vcpu-state: checking the {backend} backend")), "{t}");
    for field in ["rax", "rip", "cr0", "cr2", "cr8", "dr0", "dr3", "dr6", "dr7", "xcr0", "tsc_offset", "tsc_aux"] {
        assert!(t.contains(&format!("vcpu-state: ok   {field} 0x")), "{field}: {t}");
    }
    for field in
        ["cs", "tr", "gdtr", "fpu.mxcsr", "fpu.st7", "fpu.xmm15", "nmi_blocked", "injected_event", "pending_events"]
    {
        assert!(t.contains(&format!("vcpu-state: ok   {field} ")), "{field}: {t}");
    }
    assert!(t.contains("vcpu-state: ok   activity Halted (the whole state)"), "{t}");
    assert!(t.contains("vcpu-state: ok   activity WaitForSipi (the whole state)"), "{t}");
    assert!(!t.contains("vcpu-state: FAIL"), "{t}");
    assert!(t.contains("vcpu-state: PASS ("), "{t}");
    // The x87 pointers are the only fields a CPU may clear (documented in
    // `hypervisor::vm::conformance`); say which this emulator cleared.
    for l in t.lines().filter(|l| l.starts_with("vcpu-state: note ") || l.starts_with("vcpu-state: PASS")) {
        assert!(!l.starts_with("vcpu-state: note ") || l.contains("fpu.f"), "{l}");
        eprintln!("{}/{}: {l}", emu.name(), backend);
    }
    m.poweroff();
}
