//! Host machine checks through the manager and the exit handler, on the
//! mock: an uncorrected memory error on a guest page's frame poisons the
//! page; the guest that touches it gets #MC with its bank filled, or is
//! stopped with a report when it cannot take one; errors elsewhere are
//! reported and change nothing.

use alloc::vec;
use alloc::vec::Vec;
use mm::addr::GuestPhysAddr;
use mm::vm_memory::PageState;
use vcpu::state::bits::CR4_MCE;
use vcpu::{Event, MemAccess, Vcpu, VmExit};

use super::*;
use crate::mca::host::{Action, BankError};
use crate::mca::{bank_msr, mcg};
use crate::testing::{Lines, MockBackend, Step, step, tiny_manager as manager};

const PAGE: u64 = 0x5000;

/// What QEMU's `mce` puts in a bank for an action-optional memory error
/// at host-physical `hpa`, as the #MC handler hands it over.
fn memory_error(hpa: u64) -> BankError {
    BankError {
        cpu: 1,
        bank: 4,
        mcg_status: mcg::RIPV | mcg::MCIP,
        status: 0xbd00_0000_0000_00c0,
        addr: hpa,
        misc: 0x86,
        action: Action::Poison(hpa & !0x3f),
    }
}

/// A VM running `script`, its page `PAGE` hit by a host memory error
/// before it runs; then the script, exit by exit. Returns the manager,
/// the console lines and the flows.
fn poisoned_then(script: Vec<Step>) -> (Manager<MockBackend>, Lines, Vec<Flow>) {
    let mut m = manager();
    let n = script.len();
    m.backend.as_mut().unwrap().scripts.push_back(script);
    m.run_vm("tiny", 4, "").unwrap();
    let mut con = Lines::default();
    let frame = m.vms[0].res.as_ref().unwrap().mem.page_frame(GuestPhysAddr(PAGE)).unwrap();
    m.host_machine_check(memory_error(frame.0 + 0x48), &mut con);
    let vm = &mut m.vms[0];
    let backend = m.backend.as_mut().unwrap();
    vm.res.as_mut().unwrap().vcpus[0].vcpu.load();
    let mut flows = Vec::new();
    for _ in 0..n {
        let exit = vm.res.as_mut().unwrap().vcpus[0].vcpu.run();
        let flow = vm.handle_exit(exit, backend, &mut m.host_mem, &mut con);
        flows.push(flow);
        if flow == Flow::Stop {
            break;
        }
    }
    (m, con, flows)
}

fn touch(access: MemAccess) -> VmExit {
    VmExit::NestedPageFault { gpa: PAGE + 0x10, access, gva: None }
}

#[test]
fn a_host_memory_error_poisons_the_page_and_the_guest_that_touches_it_gets_a_machine_check() {
    let (m, con, flows) = poisoned_then(vec![
        step(|_| {}, VmExit::Wrmsr { msr: bank_msr(0, 0), value: u64::MAX }),
        step(|v| v.state.cr4 |= CR4_MCE, touch(MemAccess::Read)),
        step(|_| {}, VmExit::Rdmsr { msr: bank_msr(0, 2) }),
        // Its handler did not clear MCIP: a second touch shuts it down.
        step(|_| {}, touch(MemAccess::Write)),
    ]);
    assert!(
        con.0[0].contains("uncorrected memory error at host-physical")
            && con.0[0].contains("poisoned vm 1 page 0x5000"),
        "{:?}",
        con.0
    );
    assert_eq!(m.machine_checks.pages_poisoned, 1);
    let vm = &m.vms[0];
    assert_eq!(flows[..3], [Flow::Continue; 3]);
    assert_eq!(flows[3], Flow::Stop);
    assert_eq!(vm.stats.machine_checks, 1);
    assert!(
        con.0.iter().any(|l| l.contains("machine check delivered: guest-physical 0x5010 is poisoned (read")),
        "{:?}",
        con.0
    );
    match &vm.state {
        RunState::Stopped { reason } => assert!(reason.contains("still in progress"), "{reason}"),
        s => panic!("{s:?}"),
    }
}

#[test]
fn the_guest_reads_what_it_lost_in_its_bank() {
    let (m, _con, flows) = poisoned_then(vec![
        step(|_| {}, VmExit::Wrmsr { msr: bank_msr(0, 0), value: u64::MAX }),
        step(|v| v.state.cr4 |= CR4_MCE, touch(MemAccess::Execute)),
        step(|_| {}, VmExit::Rdmsr { msr: bank_msr(0, 2) }),
    ]);
    assert_eq!(flows, [Flow::Continue; 3]);
    let res = m.vms[0].res.as_ref().unwrap();
    let v = &res.vcpus[0].vcpu;
    assert_eq!(v.injected, [Event::MC]);
    assert_eq!(v.gprs.rax, PAGE + 0x10, "MC0_ADDR: the guest-physical address");
    assert_eq!(res.mem.page_state(GuestPhysAddr(PAGE)), Some(PageState::Poisoned));
    let mut vm_mca = m.vms[0].devices.save();
    vm_mca.retain(|d| d.name == "mca");
    assert_eq!(vm_mca.len(), 1, "the banks travel with the VM's devices");
}

#[test]
fn a_guest_that_cannot_take_a_machine_check_is_stopped_with_a_report() {
    // CR4.MCE clear.
    let (m, _, flows) = poisoned_then(vec![
        step(|_| {}, VmExit::Wrmsr { msr: bank_msr(0, 0), value: u64::MAX }),
        step(|_| {}, touch(MemAccess::Read)),
    ]);
    assert_eq!(flows, [Flow::Continue, Flow::Stop]);
    match &m.vms[0].state {
        RunState::Stopped { reason } => {
            assert!(reason.contains("0x5010 is poisoned") && reason.contains("CR4.MCE clear"), "{reason}")
        }
        s => panic!("{s:?}"),
    }
    // Reporting not enabled in the bank.
    let (m, _, flows) = poisoned_then(vec![step(|v| v.state.cr4 |= CR4_MCE, touch(MemAccess::Read))]);
    assert_eq!(flows, [Flow::Stop]);
    match &m.vms[0].state {
        RunState::Stopped { reason } => assert!(reason.contains("MC0_CTL"), "{reason}"),
        s => panic!("{s:?}"),
    }
}

#[test]
fn errors_outside_guest_memory_are_reported_and_change_nothing() {
    let mut m = manager();
    m.backend.as_mut().unwrap().scripts.push_back(vec![]);
    m.run_vm("tiny", 4, "").unwrap();
    let mut con = Lines::default();
    let before = m.vms[0].res.as_ref().unwrap().mem.state_counts();
    m.host_machine_check(memory_error(0x7fff_f000_0000), &mut con);
    m.host_machine_check(BankError { status: 0x9000_0000_0000_017a, action: Action::Log, ..memory_error(0) }, &mut con);
    assert!(con.0[0].contains("not guest memory"), "{:?}", con.0);
    assert!(con.0[1].contains("corrected; logged"), "{:?}", con.0);
    assert_eq!(m.vms[0].res.as_ref().unwrap().mem.state_counts(), before);
    assert_eq!((m.machine_checks.errors, m.machine_checks.memory_errors, m.machine_checks.pages_poisoned), (2, 1, 0));
}
