//! NUMA placement (issue 11) on QEMU TCG (AMD-V) with two nodes: CPU 0 and
//! the first 256 MiB on node 0, CPU 1 and the next 256 MiB on node 1, as the
//! firmware's SRAT says. The hypervisor reads the nodes, and each new VM
//! goes to the node with the most free memory that holds it, all its RAM
//! from that node (`hypervisor::numa`), and its vCPU runs on that node's CPU
//! when two VMs share the CPUs (`manager::rounds::choose_home`, the APs'
//! node order in `kernel/cpus.rs`).

use boot::emulator::Emulator;
use std::time::Duration;
use tests_qemu::{Machine, label};

const TIMEOUT: Duration = Duration::from_secs(240);

#[test]
fn each_vm_gets_all_its_memory_from_the_node_with_most_room() {
    let emu = Emulator::QemuNuma;
    let mut m = Machine::boot(emu, &label(emu, "numa"));
    let boot_log = m.transcript();
    assert!(boot_log.contains("numa: node 0: cpus (apic) [0]"), "{boot_log}");
    assert!(boot_log.contains("numa: node 1: cpus (apic) [1]"), "{boot_log}");
    let host = m.cmd("host");
    assert!(host.contains("  numa node 0: cpus (apic) [0], 255 MiB, "), "{host}");
    assert!(host.contains("  numa node 1: cpus (apic) [1], 256 MiB, "), "{host}");

    // The kernel's own memory sits low, so node 1 has more room: the first
    // VM goes there and fills it by 64 MiB; the second then finds node 0
    // with more room.
    m.cmd("vm run memtest mem=64 -- mib=48 hold=1");
    m.wait_for("[vm 1] memtest: filled 12288 pages", TIMEOUT);
    m.cmd("vm run memtest mem=64 -- mib=48 hold=1");
    m.wait_for("[vm 2] memtest: filled 12288 pages", TIMEOUT);
    for (id, node) in [(1, 1), (2, 0)] {
        let j = m.json(&format!("vm stats {id} --json"));
        assert_eq!(j["numa_node"], node, "{j}");
        let present = j["pages"]["present"].as_u64().unwrap();
        assert_eq!(present, 16384, "{j}");
        let by_node = j["pages_by_node"].as_object().unwrap();
        assert_eq!(by_node.len(), 1, "every page on one node: {j}");
        assert_eq!(by_node[&node.to_string()], present, "{j}");
        let text = m.cmd(&format!("vm stats {id}"));
        assert!(text.contains(&format!("numa node: {node}; pages (4 KiB): 16384 on node {node}")), "{text}");
    }
    let j = m.json("host --json");
    assert_eq!(j["cpus"], 2, "{j}");

    // vCPUs follow their VM's node: with two VMs running (memtest's dirty
    // mode spins), the boot CPU (node 0) keeps the node-0 VM and the AP
    // (node 1) runs the node-1 VM, though the first ran on the boot CPU
    // while it was alone. The 64 MiB VM takes node 1 (most room), which
    // leaves node 0 the most for the next.
    m.cmd("vm stop 1");
    m.cmd("vm stop 2");
    m.cmd("vm run memtest mem=64 -- mode=dirty mib=4 rate=1");
    m.wait_for("[vm 3] memtest: dirty: ", TIMEOUT);
    m.cmd("vm run memtest mem=16 -- mode=dirty mib=4 rate=1");
    m.wait_for("[vm 4] memtest: dirty: ", TIMEOUT);
    std::thread::sleep(Duration::from_secs(3));
    let (three, four) = (m.json("vm stats 3 --json"), m.json("vm stats 4 --json"));
    assert_eq!((three["numa_node"].as_u64(), four["numa_node"].as_u64()), (Some(1), Some(0)), "{three}\n{four}");
    let (v3, v4) = (&three["vcpus"][0], &four["vcpus"][0]);
    eprintln!("numa: vm 3 (node 1) vcpu: {v3}\nnuma: vm 4 (node 0) vcpu: {v4}");
    assert_eq!(v3["last_host_cpu"], 1, "the node-1 VM runs on node 1's CPU: {v3}");
    assert!(v3["host_cpus"].as_str().unwrap().split(',').any(|c| c == "1"), "{v3}");
    // It began on the boot CPU: a running guest's vCPU moved.
    assert!(v3["moves"].as_u64().unwrap() >= 1, "{v3}");
    assert_eq!(v4["host_cpus"], "0", "the node-0 VM never left node 0's CPU: {v4}");
    m.poweroff();
}
