//! QEMU TCG emulates AMD-V but not VT-x: the hypervisor must say clearly
//! that it cannot run VMs, and the console must still work.

use boot::emulator::Emulator;
use tests_qemu::Machine;

#[test]
fn without_vtx_the_console_works_and_says_why() {
    let mut m = Machine::boot(Emulator::QemuTcg, "qemu-novmx");
    let t = m.transcript();
    assert!(
        t.contains("virtualization unavailable: this CPU has no VT-x"),
        "{t}"
    );
    let host = m.cmd("host");
    assert!(
        host.contains("virtualization: unavailable: this CPU has no VT-x"),
        "{host}"
    );
    let j = m.json("host --json");
    assert_eq!(j["virtualization"]["backend"], serde_json::Value::Null);
    let out = m.cmd("vm run selftest");
    assert!(
        out.starts_with("error: virtualization is unavailable"),
        "{out}"
    );
    let j = m.json("vm list --json");
    assert_eq!(j["vms"].as_array().unwrap().len(), 0);
    assert!(m.cmd("help").contains("vm run <guest>"));
    m.poweroff();
}
