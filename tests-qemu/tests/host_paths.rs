//! The host's own paths, in QEMU: a machine without hardware
//! virtualization (`-cpu max,-svm`), where the hypervisor must say clearly
//! that it cannot run VMs and the console must still work; and a CPU
//! exception in the hypervisor itself.

use boot::emulator::Emulator;
use tests_qemu::Machine;

#[test]
fn without_virtualization_the_console_works_and_says_why() {
    let mut m = Machine::boot(Emulator::QemuNoVirt, "novirt");
    let t = m.transcript();
    assert!(t.contains("virtualization unavailable: this CPU has neither VT-x nor AMD-V"), "{t}");
    let host = m.cmd("host");
    assert!(host.contains("virtualization: unavailable: this CPU has neither VT-x nor AMD-V"), "{host}");
    let j = m.json("host --json");
    assert_eq!(j["virtualization"]["backend"], serde_json::Value::Null);
    let host_json = j.clone();
    let out = m.cmd("vm run selftest");
    assert!(out.starts_with("error: virtualization is unavailable"), "{out}");
    let j = m.json("vm list --json");
    assert_eq!(j["vms"].as_array().unwrap().len(), 0);
    assert!(m.cmd("help").contains("vm run <guest>"));
    // QEMU runs with -smp 2: both CPUs come from the MADT.
    assert_eq!(host_json["cpus"], 2, "{host_json}");
    assert_eq!(host_json["apic_ids"], serde_json::json!([0, 1]));
    let outcome = m.poweroff();
    // Exit code 0: the ACPI soft-off path (FADT PM1a + \_S5) ended QEMU,
    // not the debug-exit port (which would give 1).
    assert_eq!(outcome.exit_code, Some(0), "{}", outcome.failure_report());
}

#[test]
fn a_cpu_exception_in_the_hypervisor_is_reported_and_powers_off_with_failure() {
    let m = Machine::start(Emulator::QemuTcg, "qemu-hostfault", &["fault_inject = host-page-fault"]);
    let outcome = m.finish();
    let t = &outcome.transcript;
    for want in [
        "!!! hypervisor: CPU exception 14 #PF page fault",
        "error code 0x0",
        "cr2=0x00007fffdead0000",
        "rip=0x",
        "context: host",
        "code at rip:",
        "hypervisor: power off (failure)",
    ] {
        assert!(t.contains(want), "missing {want:?} in:\n{t}");
    }
    assert_eq!(outcome.ending, boot::session::Ending::PoweredOff { ok: false });
    assert_eq!(outcome.exit_code, Some(3), "isa-debug-exit status for failure: (1 << 1) | 1");
}
