//! Events and the exits of the vCPU model through the VM layer, on the
//! mock: queued interrupts wait for their window and keep their order, a
//! later exception does not replace them, window exits come when asked for,
//! and the register, cache, MONITOR/MWAIT, PAUSE, INIT and TSC exits are
//! completed or refused as hardware would.

use alloc::vec;
use alloc::vec::Vec;
use vcpu::state::bits::*;
use vcpu::{CrAccess, Event, Reg, Vcpu, VmExit};

use super::*;
use crate::hypercall as hc;
use crate::testing::{Lines, MockBackend, MockVcpu, Step, step, tiny_manager as manager};

fn queue_interrupt(vector: u64, rflags: u64) -> Step {
    step(
        move |v| {
            v.rflags = rflags;
            (v.gprs.rax, v.gprs.rdi) = (hc::QUEUE_INTERRUPT, vector);
        },
        VmExit::Hypercall,
    )
}

/// Starts one VM with `script` and runs it exit by exit: `each` sees the
/// vCPU after every handled exit, with the flow.
fn drive(script: Vec<Step>, mut each: impl FnMut(usize, &MockVcpu, Flow)) -> Manager<MockBackend> {
    let mut m = manager();
    let n = script.len();
    m.backend.as_mut().unwrap().scripts.push_back(script);
    m.run_vm("tiny", 4, "").unwrap();
    let vm = &mut m.vms[0];
    let backend = m.backend.as_mut().unwrap();
    let mut con = Lines::default();
    vm.res.as_mut().unwrap().vcpus[0].vcpu.load();
    for i in 0..n {
        let exit = vm.res.as_mut().unwrap().vcpus[0].vcpu.run();
        let flow = vm.handle_exit(exit, backend, &mut m.host_mem, &mut con);
        let Some(res) = vm.res.as_ref() else { break };
        each(i, &res.vcpus[0].vcpu, flow);
        if flow == Flow::Stop {
            break;
        }
    }
    m
}

#[test]
fn queued_interrupts_wait_for_if_and_arrive_in_order() {
    let mut delivered_while_masked = 0;
    let mut last = Vec::new();
    drive(
        vec![
            queue_interrupt(0x40, RFLAGS_FIXED),
            queue_interrupt(0x41, RFLAGS_FIXED),
            step(|_| {}, VmExit::Cpuid),
            step(|v| v.rflags = RFLAGS_FIXED | RFLAGS_IF, VmExit::Cpuid),
            step(|_| {}, VmExit::Cpuid),
            step(|_| {}, VmExit::Cpuid),
        ],
        |i, v, flow| {
            assert_eq!(flow, Flow::Continue);
            if i < 4 {
                delivered_while_masked += v.delivered.len();
            }
            last = v.delivered.clone();
        },
    );
    assert_eq!(delivered_while_masked, 0, "nothing goes in while IF = 0");
    assert_eq!(last, vec![Event::Interrupt { vector: 0x40 }, Event::Interrupt { vector: 0x41 }]);
}

#[test]
fn an_exception_after_a_queued_interrupt_does_not_replace_it() {
    let mut seen = Vec::new();
    drive(
        vec![
            queue_interrupt(0x40, RFLAGS_FIXED),
            step(|v| v.gprs.rcx = 0x1234, VmExit::Rdmsr { msr: 0x1234 }),
            step(|_| {}, VmExit::Cpuid),
            step(|v| v.rflags = RFLAGS_FIXED | RFLAGS_IF, VmExit::Cpuid),
            step(|_| {}, VmExit::Cpuid),
        ],
        |_, v, _| seen = v.delivered.clone(),
    );
    assert_eq!(seen, vec![Event::GP0, Event::Interrupt { vector: 0x40 }], "the #GP first, the interrupt kept");
}

#[test]
fn window_exits_come_when_the_guest_can_take_the_event() {
    let mut m = manager();
    m.backend.as_mut().unwrap().scripts.push_back(vec![
        step(|_| {}, VmExit::Cpuid),
        step(|v| v.rflags = RFLAGS_FIXED | RFLAGS_IF, VmExit::Cpuid),
        step(|_| {}, VmExit::Cpuid),
        step(|v| v.state.nmi_blocked = false, VmExit::Cpuid),
    ]);
    m.run_vm("tiny", 4, "").unwrap();
    let vm = &mut m.vms[0];
    let backend = m.backend.as_mut().unwrap();
    let v = &mut vm.res.as_mut().unwrap().vcpu();
    v.load();
    v.rflags = RFLAGS_FIXED;
    v.state.nmi_blocked = true;
    assert!(!v.interrupt_window_open() && !v.nmi_window_open());
    v.request_interrupt_window();
    v.request_nmi_window();
    let mut exits = Vec::new();
    for _ in 0..6 {
        let e = vm.res.as_mut().unwrap().vcpus[0].vcpu.run();
        exits.push(e.clone());
        assert_eq!(vm.handle_exit(e, backend, &mut m.host_mem, &mut Lines::default()), Flow::Continue);
    }
    assert_eq!(
        exits,
        vec![VmExit::Cpuid, VmExit::Cpuid, VmExit::InterruptWindow, VmExit::Cpuid, VmExit::Cpuid, VmExit::NmiWindow],
        "each window once, when it opened"
    );
    let v = &mut vm.res.as_mut().unwrap().vcpu();
    assert!(v.interrupt_window_open() && v.nmi_window_open());
    v.inject(Event::Interrupt { vector: 0x30 });
    assert!(!v.interrupt_window_open(), "an interrupt waits for delivery");
}

#[test]
fn register_exits_complete_or_fault() {
    drive(
        vec![
            // MOV CR0, RAX with PG and no PE: #GP, RIP stays.
            step(|v| v.gprs.rax = CR0_PG, VmExit::CrAccess { cr: 0, access: CrAccess::MovTo { gpr: 0 } }),
            // MOV DR0, RBX.
            step(|v| v.gprs.rbx = 0x5000, VmExit::DrAccess { dr: 0, gpr: 3, write: true }),
            // XSETBV 3 with CR4.OSXSAVE.
            step(
                |v| {
                    v.state.cr4 |= CR4_OSXSAVE;
                    (v.gprs.rcx, v.gprs.rax, v.gprs.rdx) = (0, 3, 0);
                },
                VmExit::Xsetbv,
            ),
            // XSETBV 7: AVX is more than the state holds.
            step(|v| v.gprs.rax = 7, VmExit::Xsetbv),
            step(|_| {}, VmExit::CacheFlush { invd: true }),
            step(|_| {}, VmExit::MonitorMwait),
        ],
        |i, v, flow| {
            assert_eq!(flow, Flow::Continue);
            match i {
                0 => assert_eq!((v.injected.clone(), v.skipped), (vec![Event::GP0], 0)),
                1 => assert_eq!((v.reg(Reg::Dr0), v.skipped), (0x5000, 1)),
                2 => assert_eq!((v.reg(Reg::Xcr0), v.skipped), (3, 2)),
                3 => assert_eq!((v.reg(Reg::Xcr0), v.injected.len(), v.skipped), (3, 2, 2)),
                4 => assert_eq!(v.skipped, 3, "INVD completes as WBINVD"),
                _ => assert_eq!((v.injected.last(), v.skipped), (Some(&Event::UD), 3), "MONITOR/MWAIT: #UD"),
            }
        },
    );
}

#[test]
fn pause_yields_init_ends_the_vm_and_the_tsc_starts_at_zero() {
    let mut flows = Vec::new();
    let mut offsets = Vec::new();
    let m = drive(
        vec![
            step(|_| {}, VmExit::Pause),
            step(|v| (v.gprs.rcx, v.gprs.rax, v.gprs.rdx) = (0x10, 0, 1), VmExit::Wrmsr { msr: 0x10, value: 1 << 32 }),
            step(|_| {}, VmExit::Init),
        ],
        |_, v, flow| {
            flows.push(flow);
            offsets.push(v.reg(Reg::TscOffset));
        },
    );
    assert_eq!(flows, vec![Flow::Yield, Flow::Continue, Flow::Stop]);
    // The mock clock reads 10, 20, ...: the guest's TSC started at 0.
    assert!(offsets[0] > u64::MAX - 1000, "offset {:#x}", offsets[0]);
    assert!((1u64 << 32).wrapping_sub(offsets[1]) < 1000, "WRMSR TSC: guest TSC = host TSC + offset");
    match &m.vms[0].state {
        RunState::Stopped { reason } => assert!(reason.contains("INIT"), "{reason}"),
        s => panic!("{s:?}"),
    }
}
