//! The vCPU model on both backends (Bochs with VT-x, QEMU TCG with AMD-V):
//! the conformance check of `hypervisor::vm::conformance` (`set_state`
//! then `state` gives back every field) and the move of a vCPU between host
//! CPUs, both run by the kernel at boot, and
//! event delivery seen from a guest (`irqtest`): queued interrupts wait for
//! RFLAGS.IF = 1 and the end of the STI shadow, NMIs for the NMI handler's
//! IRET.

use boot::emulator::Emulator;
use std::time::Duration;
use tests_qemu::{Machine, label, on_both_backends};

const TIMEOUT: Duration = Duration::from_secs(240);

on_both_backends!(set_state_then_state_gives_back_every_field, a_guest_sees_events_and_exits_as_hardware_gives_them);

fn set_state_then_state_gives_back_every_field(emu: Emulator) {
    let m = Machine::boot_smp(emu, &label(emu, "vcpu-state"), &["vcpu_conformance = true"]);
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
    // Two CPUs (Bochs asked for them): a vCPU made on the boot CPU entered its
    // guest on CPU 0, 1, 0, 1 (released between), each time exiting to that
    // CPU's own host state with the same nested page fault, state intact.
    let moves: Vec<&str> = t.lines().filter(|l| l.starts_with("vcpu-move: entered on cpu ")).collect();
    assert_eq!(moves.len(), 4, "{t}");
    for (line, cpu) in moves.iter().zip([0, 1, 0, 1]) {
        assert!(line.starts_with(&format!("vcpu-move: entered on cpu {cpu}: nested page fault at 0x")), "{line}");
        assert!(!line.contains("WRONG"), "{line}");
    }
    assert!(t.contains("vcpu-move: PASS"), "{t}");
    // The x87 pointers are the only fields a CPU may clear (documented in
    // `hypervisor::vm::conformance`); say which this emulator cleared.
    for l in t.lines().filter(|l| l.starts_with("vcpu-state: note ") || l.starts_with("vcpu-state: PASS")) {
        assert!(!l.starts_with("vcpu-state: note ") || l.contains("fpu.f"), "{l}");
        eprintln!("{}/{}: {l}", emu.name(), backend);
    }
    m.poweroff();
}

fn a_guest_sees_events_and_exits_as_hardware_gives_them(emu: Emulator) {
    let mut m = Machine::boot(emu, &label(emu, "vcputest"));
    // Under QEMU, long enough for its round-robin kicks to land in the
    // handlers (`slow_ticks` in the guest).
    m.cmd(if emu.is_qemu() { "vm run vcputest mem=4 -- slow=1500" } else { "vm run vcputest mem=4" });
    m.wait_for("vm 1 (vcputest) exited", TIMEOUT);
    let t = m.transcript();
    for check in [
        "no interrupt while IF = 0, across exits",
        "interrupt delivered after the STI shadow",
        "two queued interrupts, in order, one per window",
        "an exception after a queued interrupt does not replace it",
        "an NMI queued in the NMI handler waits for its IRET",
        "wrmsr tsc moves rdtsc (the tsc offset)",
        "mov dr reads back what it wrote",
        "dr7.gd: mov dr raises #db, sets dr6.bd, clears gd",
        "xsetbv takes x87|sse, refuses xcr1 and no x87",
        "wbinvd and invd complete",
        "monitor and mwait raise #ud, cpuid hides them",
        "pit ticks reach a guest spinning without exits",
        "no interrupt arrives while a long handler runs with IF = 0",
    ] {
        assert!(t.contains(&format!("[vm 1] vcputest: ok   {check}")), "{check}: {t}");
    }
    assert!(t.contains("[vm 1] vcputest: ok   rdtscp"), "{t}");
    assert!(t.contains("[vm 1] vcputest: PASS"), "{t}");
    assert!(t.contains("vm 1 (vcputest) exited with status 1"), "{t}");
    let s = m.json("vm stats 1 --json");
    let e = &s["exits_by_reason"];
    eprintln!("{}/{}: vcputest exits {e}", emu.name(), emu.backend());
    assert!(e["interrupt_window"].as_u64().unwrap() >= 3, "{s}");
    assert!(e["debug_register"].as_u64().unwrap() >= 6, "{s}");
    if emu.backend() == "vmx" {
        // XSETBV always exits on VT-x; QEMU's TCG lacks AMD-V's intercept.
        assert!(e["xsetbv"].as_u64().unwrap() >= 4, "{s}");
        assert!(t.contains("[vm 1] vcputest: ok   xsetbv refuses avx"), "{t}");
    }
    assert_eq!(e["wbinvd"], 2, "{s}");
    assert_eq!(e["monitor_mwait"], 2, "{s}");
    m.poweroff();
}
