//! A VM of several scripted vCPUs through the manager's scheduler: APs
//! wait for INIT and SIPI and start at the vector, halted vCPUs are passed
//! over until an IPI for them is pending, pause parks every vCPU, and a VM
//! none of whose vCPUs can run again ends. (Checkpoints of such VMs:
//! `checkpoint_smp_tests`.)

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use vcpu::state::bits::{RFLAGS_FIXED, RFLAGS_IF};
use vcpu::{Event, MemAccess, VmExit};

use super::*;
use crate::testing::{Lines, MockBackend, Step, elf_guest};
use crate::vm::VcpuState;

const ICR_LOW: u64 = 0xfee0_0300;
const ICR_HIGH: u64 = 0xfee0_0310;

fn manager() -> Manager<MockBackend> {
    // `mov [rax], ecx` over and over: every scripted APIC write decodes as
    // one wherever RIP is (HLT and the writes move it by 2).
    let code: Vec<u8> = [0x89u8, 0x08].repeat(64);
    let images = vec![GuestImage { name: "tiny".into(), bytes: elf_guest(&code) }];
    Manager::new(Ok(MockBackend::new(16384)), images)
}

/// A guest write of `value` to the local APIC register at `gpa`.
fn apic_write(gpa: u64, value: u32) -> Step {
    Box::new(move |v| {
        v.gprs.rax = gpa;
        v.gprs.rcx = u64::from(value);
        VmExit::NestedPageFault { gpa, access: MemAccess::Write, gva: Some(gpa) }
    })
}

fn hlt(rflags: u64) -> Step {
    Box::new(move |v| {
        v.rflags = rflags;
        VmExit::Hlt
    })
}

fn exit(e: VmExit) -> Step {
    Box::new(move |_| e.clone())
}

fn states(m: &Manager<MockBackend>, id: u32) -> Vec<VcpuState> {
    m.get(id).and_then(|v| v.res.as_ref()).map_or(Vec::new(), |r| r.vcpus.iter().map(|s| s.state).collect())
}

fn runs(m: &Manager<MockBackend>, id: u32, i: usize) -> u32 {
    m.get(id).unwrap().res.as_ref().unwrap().vcpus[i].vcpu.runs
}

#[test]
fn aps_start_at_sipi_halted_vcpus_cost_nothing_and_ipis_wake_them() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    // The BSP: INIT, then SIPI vector 0x12, to APIC 1; halts until the AP
    // has halted too; then a fixed IPI 0x41 to it.
    b.scripts.push_back(vec![
        apic_write(ICR_HIGH, 1 << 24),
        apic_write(ICR_LOW, 0x4500),
        apic_write(ICR_LOW, 0x0612),
        hlt(RFLAGS_FIXED | RFLAGS_IF),
        hlt(RFLAGS_FIXED | RFLAGS_IF),
        apic_write(ICR_LOW, 0x41),
    ]);
    // The AP (in real mode, where the scripted APIC writes would not
    // decode): a CPUID exit, then HLT with interrupts on.
    b.scripts.push_back(vec![exit(VmExit::Cpuid), hlt(RFLAGS_FIXED | RFLAGS_IF), exit(VmExit::Cpuid)]);
    let id = m.run_vm_smp("tiny", 4, &[], "", None, None, 2).unwrap();
    assert_eq!(states(&m, id), [VcpuState::Runnable, VcpuState::WaitForSipi]);
    let mut con = Lines::default();
    // The BSP's INIT ends its slice (an IPI for another vCPU); the AP
    // still waits for its SIPI and does not run.
    assert!(m.run_slice(&mut con));
    assert_eq!(states(&m, id), [VcpuState::Runnable, VcpuState::WaitForSipi]);
    assert!(m.run_slice(&mut con));
    assert_eq!(runs(&m, id, 1), 0, "an AP waiting for SIPI never runs");
    assert_eq!(states(&m, id)[1], VcpuState::Runnable, "the SIPI started it");
    let s = m.get(id).unwrap().res.as_ref().unwrap().vcpus[1].vcpu.state.clone();
    assert_eq!((s.cs.selector, s.cs.base, s.rip), (0x1200, 0x12000, 0), "real mode at the vector");
    assert_eq!(s.cr0 & 1, 0);
    // What the AP's start-up code does first: software-enable its APIC
    // (INIT left it disabled, and a disabled APIC drops fixed IPIs).
    let vm = m.vms.iter_mut().find(|v| v.id == id).unwrap();
    vm.devices.set_current(1);
    assert!(vm.devices.mmio_write(0xfee0_00f0, 4, 0x1ff, 0));
    // Round-robin: the AP runs (CPUID, HLT) and halts.
    for _ in 0..4 {
        m.run_slice(&mut con);
        if states(&m, id)[1] == VcpuState::Halted {
            break;
        }
    }
    assert_eq!(states(&m, id)[1], VcpuState::Halted, "{}", con.0.join("\n"));
    let ap_runs = runs(&m, id, 1);
    // Halted with nothing pending: passed over while the BSP (halted, no
    // timer: woken every round, as one-vCPU VMs are) goes through its
    // script to the IPI, which wakes the AP.
    let mut passed_over = 0;
    while states(&m, id)[1] == VcpuState::Halted {
        assert!(passed_over < 10, "the IPI never woke the AP");
        assert_eq!(runs(&m, id, 1), ap_runs, "a halted vCPU is not entered");
        m.run_slice(&mut con);
        passed_over += 1;
    }
    assert!(passed_over >= 3, "the BSP ran its two HLTs and the IPI meanwhile");
    assert!(runs(&m, id, 1) > ap_runs);
    let ap = &m.get(id).unwrap().res.as_ref().unwrap().vcpus[1];
    assert_eq!(ap.stats.wakeups, 1, "the IPI woke it");
    assert!(ap.vcpu.delivered.contains(&Event::Interrupt { vector: 0x41 }), "{:?}", ap.vcpu.delivered);
    let report = m.get(id).unwrap().vcpu_lines(0);
    assert_eq!(report.len(), 2);
    assert!(report[1].starts_with("vcpu 1: ") && report[1].contains("1 wake-ups from hlt"), "{report:?}");
}

#[test]
fn pause_parks_every_vcpu_and_resume_puts_each_back() {
    let mut m = manager();
    let id = m.run_vm_smp("tiny", 4, &[], "", None, None, 3).unwrap();
    m.set_paused(id, true).unwrap();
    assert!(states(&m, id).iter().all(|s| matches!(s, VcpuState::Paused(_))), "{:?}", states(&m, id));
    let mut con = Lines::default();
    assert!(!m.run_slice(&mut con), "nothing runs while paused");
    m.set_paused(id, false).unwrap();
    assert_eq!(states(&m, id), [VcpuState::Runnable, VcpuState::WaitForSipi, VcpuState::WaitForSipi]);
    // `vm create`: every vCPU created until `vm start`.
    let c = m.create_vm_stopped("web", "tiny", 4, &[], "", None, None, 2).unwrap();
    assert_eq!(states(&m, c), [VcpuState::Created, VcpuState::Created]);
    m.start(&[c]).unwrap();
    assert_eq!(states(&m, c), [VcpuState::Runnable, VcpuState::WaitForSipi]);
}

#[test]
fn a_vm_whose_vcpus_can_never_run_again_ends() {
    let mut m = manager();
    // The BSP halts with interrupts off; the AP was never started.
    m.backend.as_mut().unwrap().scripts.push_back(vec![hlt(RFLAGS_FIXED)]);
    let id = m.run_vm_smp("tiny", 4, &[], "", None, None, 2).unwrap();
    let mut con = Lines::default();
    m.run_slice(&mut con);
    let vm = m.get(id).unwrap();
    assert!(vm.state.ended() && vm.res.is_none(), "{:?}", vm.state);
    assert!(
        matches!(&vm.state, RunState::Stopped { reason } if reason.contains("nothing can wake them")),
        "{:?}",
        vm.state
    );
    assert_eq!(vm.vcpu_lines(0).len(), 2, "the vCPUs' counts outlive them");
    assert!(vm.vcpu_lines(0)[0].starts_with("vcpu 0: stopped"));
    assert_eq!(m.backend.as_ref().unwrap().destroyed, 2, "both vCPUs freed");
}

#[test]
fn bad_vcpu_counts_are_refused() {
    let mut m = manager();
    for n in [0, 9, u32::MAX] {
        assert_eq!(m.run_vm_smp("tiny", 4, &[], "", None, None, n), Err(Error::VcpuCount(n)));
    }
    assert!(m.vms.is_empty() && m.backend.as_ref().unwrap().created == 0, "nothing was built");
}

/// One console line, as the operator types it; what it printed.
fn console(line: &str, m: &mut Manager<MockBackend>) -> String {
    use crate::console::commands::report_parse_error;
    use crate::console::{HostStatus, execute};
    let mut con = Lines::default();
    match crate::console::parse::parse(line) {
        Ok(Some(p)) => {
            execute(&p, m, &HostStatus::default(), &mut con);
        }
        Ok(None) => {}
        Err(e) => report_parse_error(&e, &mut con),
    }
    con.0.join("\n")
}

#[test]
fn the_console_takes_vcpus_shows_each_and_refuses_what_it_cannot_do() {
    let mut m = manager();
    let out = console("vm run tiny vcpus=0", &mut m);
    assert_eq!(out, "error: vm run: vcpus must be a number in 1..=8, not \"0\"");
    assert!(m.vms.is_empty(), "nothing started");
    let out = console("vm run tiny vcpus=3", &mut m);
    assert!(out.starts_with("vm 1 started"), "{out}");
    let stats = console("vm stats 1", &mut m);
    for (i, state) in [(0, "runnable"), (1, "wait-for-sipi"), (2, "wait-for-sipi")] {
        assert!(stats.contains(&format!("\n  vcpu {i}: {state}, 0 exits")), "{stats}");
    }
    assert!(stats.contains("last on host cpu 0"), "{stats}");
}

#[test]
fn init_to_itself_parks_the_sender_and_a_vm_left_with_no_runner_ends() {
    let mut m = manager();
    // A one-vCPU VM INITs itself by its own APIC ID: nothing is left to
    // send it a SIPI.
    m.backend.as_mut().unwrap().scripts.push_back(vec![apic_write(ICR_HIGH, 0), apic_write(ICR_LOW, 0x4500)]);
    let id = m.run_vm("tiny", 4, "").unwrap();
    let mut con = Lines::default();
    assert!(m.run_slice(&mut con));
    let vm = m.get(id).unwrap();
    assert!(
        matches!(&vm.state, RunState::Stopped { reason } if reason.contains("waits for a startup IPI")),
        "{:?}",
        vm.state
    );
    assert!(!m.run_slice(&mut con), "nothing left to run");
}

#[test]
fn any_sipi_vector_starts_the_ap_there() {
    for vector in [0x00u8, 0x9f, 0xff] {
        let mut m = manager();
        let b = m.backend.as_mut().unwrap();
        b.scripts.push_back(vec![
            apic_write(ICR_HIGH, 1 << 24),
            apic_write(ICR_LOW, 0x4500),
            apic_write(ICR_LOW, 0x0600 | u32::from(vector)),
        ]);
        // An INIT and SIPI to an APIC ID no vCPU has change nothing.
        b.scripts.push_back(vec![]);
        let id = m.run_vm_smp("tiny", 4, &[], "", None, None, 2).unwrap();
        let mut con = Lines::default();
        for _ in 0..3 {
            m.run_slice(&mut con);
        }
        let ap = &m.get(id).unwrap().res.as_ref().unwrap().vcpus[1];
        assert_ne!(ap.state, VcpuState::WaitForSipi, "vector {vector:#x}");
        let s = &ap.vcpu.state;
        assert_eq!((s.cs.selector, s.cs.base, s.rip), (u16::from(vector) << 8, u64::from(vector) << 12, 0));
        assert_eq!(s.activity, vcpu::Activity::Active);
    }
}

#[test]
fn an_ap_halting_while_the_bsp_is_mid_line_does_not_cut_the_line() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    // The BSP is preempted mid-line, then halts (idle: the line shows).
    b.scripts.push_back(vec![exit(VmExit::Preempted), hlt(RFLAGS_FIXED | RFLAGS_IF)]);
    b.scripts.push_back(vec![hlt(RFLAGS_FIXED | RFLAGS_IF)]);
    let id = m.run_vm_smp("tiny", 4, &[], "", None, None, 2).unwrap();
    let vm = m.vms.iter_mut().find(|v| v.id == id).unwrap();
    for b in b"smptest: PASS (11 chec" {
        vm.devices.pio_write(0x3f8, 1, u32::from(*b), || 0);
    }
    vm.res.as_mut().unwrap().vcpus[1].state = VcpuState::Runnable;
    vm.next_vcpu = 1;
    let mut con = Lines::default();
    m.run_slice(&mut con);
    assert_eq!(states(&m, id), [VcpuState::Runnable, VcpuState::Halted], "the AP halted first");
    assert!(con.0.iter().all(|l| !l.contains("chec")), "the BSP's line was cut: {:?}", con.0);
    for _ in 0..4 {
        m.run_slice(&mut con);
    }
    assert!(con.0.iter().any(|l| l == &format!("[vm {id}] smptest: PASS (11 chec")), "{:?}", con.0);
}

#[test]
fn another_vcpu_wants_a_cpu_only_when_it_could_run() {
    let mut m = manager();
    m.backend.as_mut().unwrap().scripts.extend([Vec::new(), Vec::new(), Vec::new()]);
    let id = m.run_vm_smp("tiny", 4, &[], "", None, None, 3).unwrap();
    let now = m.backend.as_ref().unwrap().clock.get();
    let vm = m.vms.iter_mut().find(|vm| vm.id == id).unwrap();
    // vCPU 0 runs; 1 and 2 wait for a SIPI: nothing wants a CPU.
    vm.timer_tick = now + 1_000_000;
    assert!(!vm.others_want_cpu(0, now));
    // Halted with interrupts off: still nothing (an NMI would be a signal).
    let res = vm.res.as_mut().unwrap();
    res.vcpus[1].state = VcpuState::Halted;
    res.vcpus[1].halted_irq_off = true;
    assert!(!vm.others_want_cpu(0, now));
    // An IPI waits for vCPU 2, or vCPU 1 waits for a restored page.
    vm.ipi_waiting = 0b100;
    assert!(vm.others_want_cpu(0, now));
    vm.ipi_waiting = 0b1;
    assert!(!vm.others_want_cpu(0, now), "an IPI for the one that runs is its own");
    vm.ipi_waiting = 0;
    vm.res.as_mut().unwrap().vcpus[1].awaiting_page = Some(0x1000);
    assert!(vm.others_want_cpu(0, now));
    let res = vm.res.as_mut().unwrap();
    res.vcpus[1].awaiting_page = None;
    // Runnable.
    res.vcpus[2].state = VcpuState::Runnable;
    assert!(vm.others_want_cpu(0, now));
    vm.res.as_mut().unwrap().vcpus[2].state = VcpuState::WaitForSipi;
    // vCPU 0 halted with interrupts on, seen from vCPU 1: it wakes when the
    // VM's timer is due or none is armed (as `pick_vcpu` wakes it).
    let res = vm.res.as_mut().unwrap();
    res.vcpus[0].state = VcpuState::Halted;
    res.vcpus[0].halted_irq_off = false;
    assert!(!vm.others_want_cpu(1, now));
    assert!(vm.others_want_cpu(1, now + 1_000_000));
    vm.timer_tick = u64::MAX;
    assert!(vm.others_want_cpu(1, now));
}
