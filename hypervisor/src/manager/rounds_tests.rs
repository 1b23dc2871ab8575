//! Rounds of slices on several CPUs, with a stand-in for the kernel's APs
//! that runs each job at the join with a backend instance of its own: the
//! VM away handles the exits that touch only it, leaves the rest for the
//! boot CPU, and its console lines come out after the join.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use vcpu::{ExitKind, IoAccess, MemAccess, VmExit};

use super::rounds::{AwaySlice, NoOtherCpus, SliceCpus};
use super::*;
use crate::devices::lapic::Mode;
use crate::testing::{Lines, MockBackend, Step, elf_guest};

/// One other CPU, with its own backend instance (its clock shows what it
/// handled).
struct OneOtherCpu {
    backend: MockBackend,
    job: Option<*mut AwaySlice<MockBackend>>,
    ran: Vec<usize>,
}

// SAFETY: each started job runs once, in `join`, before it returns.
unsafe impl SliceCpus<MockBackend> for OneOtherCpu {
    fn free(&self) -> usize {
        usize::from(self.job.is_none())
    }
    fn start(&mut self, job: *mut AwaySlice<MockBackend>) -> bool {
        if self.job.is_some() {
            return false;
        }
        self.job = Some(job);
        true
    }
    fn join(&mut self, _: &mut dyn FnMut()) {
        if let Some(job) = self.job.take() {
            // SAFETY: the manager keeps the job in place until this returns
            // and touches its VM only afterwards.
            let job = unsafe { &mut *job };
            self.ran.push(job.vm_index());
            // SAFETY: as above.
            unsafe { job.run(&mut self.backend) };
        }
    }
}

/// A stand-in for another CPU of `m`'s host (the same memory, a clock of
/// its own).
fn other_cpu(m: &Manager<MockBackend>) -> OneOtherCpu {
    // SAFETY: every test declares its manager before its stand-in, which
    // is therefore dropped first.
    let backend = unsafe { m.backend.as_ref().unwrap().beside() };
    OneOtherCpu { backend, job: None, ran: Vec::new() }
}

fn manager() -> Manager<MockBackend> {
    manager_with_frames(16384)
}

fn manager_with_frames(frames: usize) -> Manager<MockBackend> {
    // `mov [rax], ecx` over and over: a scripted MMIO write decodes as one
    // wherever RIP is.
    let code: Vec<u8> = [0x89u8, 0x08].repeat(64);
    let images = vec![GuestImage { name: "tiny".into(), bytes: elf_guest(&code) }];
    Manager::new(Ok(MockBackend::new(frames)), images)
}

fn exit(e: VmExit) -> Step {
    Box::new(move |_| e.clone())
}

/// `out 0x3f8, al` with `byte` in AL.
fn com1(byte: u8) -> Step {
    Box::new(move |v| {
        v.gprs.rax = u64::from(byte);
        VmExit::Io(IoAccess { port: 0x3f8, size: 1, write: true, string: false, rep: false })
    })
}

/// A guest write of `value` to the local APIC's task-priority register.
fn tpr_write(value: u32) -> Step {
    apic_write(0x80, value)
}

/// A guest write of `value` to the xAPIC register at `offset` (`mov [rax],
/// ecx`, the image's code).
fn apic_write(offset: u64, value: u32) -> Step {
    Box::new(move |v| {
        let gpa = 0xfee0_0000 + offset;
        v.gprs.rax = gpa;
        v.gprs.rcx = u64::from(value);
        VmExit::NestedPageFault { gpa, access: MemAccess::Write, gva: Some(gpa) }
    })
}

fn wrmsr(msr: u32, value: u64) -> Step {
    exit(VmExit::Wrmsr { msr, value })
}

/// IA32_APIC_BASE with the APIC enabled in x2APIC mode at the usual page.
const X2APIC_BASE: u64 = 0xfee0_0000 | (1 << 11) | (1 << 10);

fn vcpu_of(m: &Manager<MockBackend>, id: u32) -> &crate::testing::MockVcpu {
    &m.get(id).unwrap().res.as_ref().unwrap().vcpus[0].vcpu
}

/// A VM of two vCPUs that run `scripts` (vCPU 1 started where vCPU 0
/// starts, the image's code, as if the guest had started its AP), and a
/// stand-in for one other CPU.
fn two_vcpu_vm(m: &mut Manager<MockBackend>, scripts: [Vec<Step>; 2]) -> (u32, OneOtherCpu) {
    smp_vm(m, scripts.into())
}

/// A VM of a vCPU per script, every AP started where vCPU 0 starts, and a
/// stand-in for one other CPU.
fn smp_vm(m: &mut Manager<MockBackend>, scripts: Vec<Vec<Step>>) -> (u32, OneOtherCpu) {
    let n = scripts.len();
    m.backend.as_mut().unwrap().scripts.extend(scripts);
    let id = m.run_vm_smp("tiny", 4, &[], "", None, None, n as u32).unwrap();
    let res = m.vms[0].res.as_mut().unwrap();
    let start = res.vcpus[0].vcpu.state();
    for slot in &mut res.vcpus[1..] {
        slot.vcpu.set_state(&start).unwrap();
        slot.state = crate::vm::VcpuState::Runnable;
    }
    (id, other_cpu(m))
}

#[test]
fn a_second_vm_runs_on_the_other_cpu_and_leaves_it_what_needs_the_host() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    // VM 1 stays here: CPUIDs until its slice is over.
    b.scripts.push_back((0..64).map(|_| exit(VmExit::Cpuid)).collect());
    // VM 2 goes away: a CPUID, a line on COM1 and a write to its local
    // APIC's page (its own devices), then a first write to a page of its
    // RAM (a nested page fault that needs a host frame: the boot CPU's),
    // then more it must not get to in this slice.
    let mut away: Vec<Step> = vec![exit(VmExit::Cpuid)];
    away.extend(b"hi\n".iter().map(|&c| com1(c)));
    away.push(tpr_write(0x20));
    away.push(exit(VmExit::NestedPageFault { gpa: 0x30_0000, access: MemAccess::Write, gva: None }));
    away.push(exit(VmExit::Cpuid));
    b.scripts.push_back(away);
    let one = m.run_vm("tiny", 4, "").unwrap();
    let two = m.run_vm("tiny", 4, "").unwrap();
    // Slices short enough that VM 1's CPUIDs outlast one.
    m.slice_ticks = 200;
    let mut other = other_cpu(&m);
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!(other.ran, [1], "VM 2 (index 1) went to the other CPU");
    assert!(other.backend.clock.get() > 0, "the other CPU's own backend handled its exits");

    let v2 = vcpu_of(&m, two);
    assert_eq!(v2.releases, 2, "released before it left and when its slice ended");
    assert!(!v2.loaded);
    let vm2 = m.get(two).unwrap();
    assert_eq!(vm2.stats.exits[ExitKind::Cpuid as usize], 1);
    assert_eq!(vm2.stats.exits[ExitKind::NestedPageFault as usize], 2);
    assert_eq!(vm2.devices.lapic(0).unwrap().tpr(), 0x20);
    assert_eq!((vm2.stats.mmio, vm2.stats.mmio_away), (1, 1), "the APIC write was carried out on the other CPU");
    assert_eq!(v2.skipped, 4, "CPUID and three OUTs completed (the MMIO write by the emulator)");
    assert_eq!(v2.script.len(), 1, "the slice ended at the exit left for the boot CPU");
    assert!(con.0.iter().any(|l| l == "[vm 2] hi"), "{:?}", con.0);

    let vm1 = m.get(one).unwrap();
    let cpuids = vm1.stats.exits[ExitKind::Cpuid as usize];
    assert!(cpuids > 0 && cpuids < 64, "VM 1 ran here for one slice: {cpuids}");
    assert_eq!(vcpu_of(&m, one).releases, 0, "VM 1 never moved");

    // Next round: VM 1 stays here again (it last ran here), VM 2 goes on
    // on the other CPU to its end of script.
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!(other.ran, [1, 1]);
    assert_eq!(m.get(two).unwrap().stats.exits[ExitKind::Cpuid as usize], 2);

    // What the two rounds cost: every tick of a round is the boot CPU's
    // slice, the join, or scheduling.
    let s = m.sched;
    assert_eq!((s.rounds, s.slices, s.slices_away), (2, 4, 2));
    assert!(s.slice_ticks > 0 && s.round_ticks > s.slice_ticks + s.join_ticks, "{s:?}");
    assert!(s.overhead_per_round() > 0, "{s:?}");
    // Of the scheduling: the one exit VM 2 left (the APIC write) and the
    // lines it printed, each timed apart; the longest round is at least
    // the mean.
    assert_eq!(s.deferred_exits, 1, "{s:?}");
    assert!(s.deferred_ticks > 0 && s.lines_ticks > 0, "{s:?}");
    let outside = s.round_ticks - s.slice_ticks - s.join_ticks;
    assert!(s.start_ticks + s.lines_ticks + s.deferred_ticks < outside, "{s:?}");
    assert!(s.longest_round_ticks * 2 >= s.round_ticks && s.longest_round_ticks < s.round_ticks, "{s:?}");
    assert!(!m.run_round(&mut con, &mut NoOtherCpus) || m.sched.rounds == 3);
}

#[test]
fn one_runnable_vm_stays_on_the_boot_cpu() {
    let mut m = manager();
    m.backend.as_mut().unwrap().scripts.push_back(vec![exit(VmExit::Cpuid), exit(VmExit::Cpuid)]);
    let id = m.run_vm("tiny", 4, "").unwrap();
    let mut other = other_cpu(&m);
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    assert!(other.ran.is_empty(), "nothing to move for");
    assert_eq!(vcpu_of(&m, id).releases, 0);
    assert!(m.get(id).unwrap().stats.exits[ExitKind::Cpuid as usize] >= 1);
}

#[test]
fn the_boot_cpu_keeps_the_pick_of_its_own_numa_node() {
    use super::rounds::{HomeFit, choose_home};
    let fit = |node, last_here| HomeFit { node, last_here };
    // Without NUMA: the one that last ran here, else the first.
    assert_eq!(choose_home(&[fit(None, false), fit(None, true)], None), 1);
    assert_eq!(choose_home(&[fit(None, false), fit(None, false)], None), 0);
    // This CPU is on node 0: a node-0 VM beats one that last ran here.
    assert_eq!(choose_home(&[fit(Some(1), true), fit(Some(0), false)], Some(0)), 1);
    // No node-0 VM: one without a node before one of another node.
    assert_eq!(choose_home(&[fit(Some(1), true), fit(None, false)], Some(0)), 1);
    // Among equals, last ran here.
    assert_eq!(choose_home(&[fit(Some(0), false), fit(Some(0), true)], Some(0)), 1);
    // Only other nodes' VMs: the boot CPU still runs one (the first).
    assert_eq!(choose_home(&[fit(Some(1), false), fit(Some(2), false)], Some(0)), 0);
}

#[test]
fn a_vm_of_the_other_cpus_numa_node_moves_there_when_that_cpu_is_free() {
    use crate::numa::{CpuAffinity, MemoryAffinity, Topology};
    let mut m = manager();
    // This CPU (APIC ID 0) is node 0, the other node 1.
    m.numa = Topology::from_srat(
        &[CpuAffinity { apic_id: 0, node: 0, enabled: true }, CpuAffinity { apic_id: 1, node: 1, enabled: true }],
        &[
            MemoryAffinity { base: 0, length: 1 << 40, node: 0, enabled: true, non_volatile: false },
            MemoryAffinity { base: 1 << 40, length: 1 << 40, node: 1, enabled: true, non_volatile: false },
        ],
    );
    let b = m.backend.as_mut().unwrap();
    b.node_free = vec![(0, 8 << 20), (1, 12 << 20)];
    b.scripts.push_back((0..64).map(|_| exit(VmExit::Cpuid)).collect());
    b.scripts.push_back((0..64).map(|_| exit(VmExit::Cpuid)).collect());
    // VM 1 lands on node 1 (most room) and runs here alone first.
    let one = m.run_vm("tiny", 4, "").unwrap();
    assert_eq!(m.get(one).unwrap().node, Some(1));
    m.slice_ticks = 200;
    let mut other = other_cpu(&m);
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    assert!(other.ran.is_empty(), "alone, it runs here");
    // VM 2 lands on node 0 (now with more room): from then on VM 1 runs
    // on node 1's CPU and VM 2 here, though VM 1 last ran here.
    m.backend.as_mut().unwrap().node_free = vec![(0, 8 << 20), (1, 4 << 20)];
    let two = m.run_vm("tiny", 4, "").unwrap();
    assert_eq!(m.get(two).unwrap().node, Some(0));
    for _ in 0..3 {
        assert!(m.run_round(&mut con, &mut other));
    }
    assert_eq!(other.ran, [0, 0, 0], "VM 1 (index 0) on the other CPU every round");
    assert_eq!(vcpu_of(&m, one).releases, 6, "released before each slice away and at its end");
    assert_eq!(vcpu_of(&m, two).releases, 0, "VM 2 never left this CPU");
}

#[test]
fn computing_vcpus_of_one_vm_run_at_once_and_leave_the_rest_to_the_boot_cpu() {
    let mut m = manager();
    // vCPU 0 spins without exits (out of script: every run is preempted).
    // vCPU 1 runs out one slice alone, then, beside vCPU 0, two CPUIDs
    // (its own) and a switch of its APIC to x2APIC mode (IA32_APIC_BASE
    // changes how IPIs reach it: the boot CPU's, with the whole VM).
    let v1 = vec![
        exit(VmExit::Preempted),
        exit(VmExit::Cpuid),
        exit(VmExit::Cpuid),
        wrmsr(0x1b, X2APIC_BASE),
        exit(VmExit::Cpuid),
    ];
    let (id, mut other) = two_vcpu_vm(&mut m, [Vec::new(), v1]);
    let mut con = Lines::default();
    // Rounds 1 and 2: neither vCPU has run out a slice yet, so each runs
    // alone, here.
    assert!(m.run_round(&mut con, &mut other));
    assert!(m.run_round(&mut con, &mut other));
    assert!(other.ran.is_empty(), "a vCPU not known to compute went away: {:?}", other.ran);
    let slots = |m: &Manager<MockBackend>| {
        let r = m.get(id).unwrap().res.as_ref().unwrap();
        (r.vcpus[0].computing, r.vcpus[1].computing)
    };
    assert_eq!(slots(&m), (true, true), "both ran out their slices");

    // Round 3: both at once, vCPU 1 on the other CPU with its own backend.
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!(other.ran, [0], "vCPU 1 of VM index 0 went to the other CPU");
    assert!(other.backend.clock.get() > 0, "the other CPU's backend ran it");
    let vm = m.get(id).unwrap();
    assert_eq!(vm.stats.parallel_slices, 2);
    assert_eq!(vm.stats.exits[ExitKind::Cpuid as usize], 2, "its CPUIDs, handled where it ran");
    assert_eq!(vm.stats.exits[ExitKind::Wrmsr as usize], 1);
    assert_eq!(vm.stats.sibling_apic_accesses, 0);
    assert_eq!(vm.devices.lapic(1).unwrap().mode(), Mode::X2Apic, "the WRMSR, carried out here after the join");
    assert_eq!(vm.devices.lapic(0).unwrap().mode(), Mode::XApic, "on vCPU 1's APIC, not vCPU 0's");
    let v1 = &vm.res.as_ref().unwrap().vcpus[1];
    assert_eq!(v1.vcpu.skipped, 3, "two CPUIDs completed away, the WRMSR here");
    assert_eq!(v1.vcpu.script.len(), 1, "its slice ended at the exit left for the boot CPU");
    assert!(!v1.vcpu.loaded);
    assert_eq!(v1.stats.slices, 2);
    assert_eq!(slots(&m), (true, false), "vCPU 1 ended its slice at an exit");
    let s = m.sched;
    assert_eq!((s.rounds, s.slices, s.slices_away, s.sibling_slices), (3, 4, 1, 2), "{s:?}");

    // Round 4: vCPU 1 no longer computes, so vCPU 0 runs alone again.
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!(other.ran, [0]);
    assert_eq!(m.sched.sibling_slices, 2);
}

#[test]
fn a_sibling_that_leaves_an_exit_for_the_boot_cpu_ends_the_round_for_the_others() {
    let mut m = manager();
    // vCPU 0 runs out a slice, then (beside vCPU 1) switches its APIC to
    // x2APIC mode. vCPU 1 runs out a slice, then would run CPUIDs.
    let v0 = vec![exit(VmExit::Preempted), wrmsr(0x1b, X2APIC_BASE)];
    let v1 = vec![exit(VmExit::Preempted), exit(VmExit::Cpuid), exit(VmExit::Cpuid)];
    let (id, mut other) = two_vcpu_vm(&mut m, [v0, v1]);
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    assert!(m.run_round(&mut con, &mut other));
    // Round 3: vCPU 0 here leaves its WRMSR for after the join, which ends
    // the round for vCPU 1 (the stand-in CPU starts it only then).
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!(other.ran, [0], "vCPU 1's job was handed to the other CPU");
    let vm = m.get(id).unwrap();
    assert_eq!(vm.devices.lapic(0).unwrap().mode(), Mode::X2Apic);
    let v1 = &vm.res.as_ref().unwrap().vcpus[1];
    assert_eq!(v1.vcpu.script.len(), 2, "vCPU 1 did not enter the guest once the round was over");
    assert_eq!(v1.stats.slices, 1, "its slice of round 3 did not count");
    assert!(v1.computing, "cut short, it still computes");
    assert_eq!(vm.stats.parallel_slices, 1, "only vCPU 0 ran beside a sibling");
    let s = m.sched;
    assert_eq!((s.sibling_slices, s.kicked_slices), (1, 1), "{s:?}");
}

#[test]
fn siblings_in_x2apic_mode_run_their_own_apics_and_post_ipis_to_each_other() {
    let mut m = manager();
    // Beside vCPU 1, vCPU 0 (here) sends it a fixed IPI (x2APIC ICR,
    // destination in bits 63:32), sends itself one, starts a one-shot timer
    // of 1 ns (LVT timer vector 0x42, divide by 1, initial count 1) and
    // ends the interrupt it took.
    let v0 = vec![
        exit(VmExit::Preempted),
        wrmsr(0x830, (1 << 32) | 0x40),
        wrmsr(0x83f, 0x41),
        wrmsr(0x832, 0x42),
        wrmsr(0x83e, 0b1011),
        wrmsr(0x838, 1),
        exit(VmExit::Cpuid),
        wrmsr(0x80b, 0),
        exit(VmExit::Cpuid),
    ];
    // vCPU 1 (on the other CPU) ends the interrupt it was posted, then
    // sends vCPU 0 an NMI: that changes another vCPU's state, the boot
    // CPU's to do.
    let v1 = vec![exit(VmExit::Preempted), wrmsr(0x80b, 0), exit(VmExit::Cpuid), wrmsr(0x830, 0x400)];
    let (id, mut other) = two_vcpu_vm(&mut m, [v0, v1]);
    // What the guest does first: x2APIC mode, the APIC software-enabled,
    // interrupts on.
    x2apic_on(&mut m);
    let mut con = Lines::default();
    for _ in 0..3 {
        assert!(m.run_round(&mut con, &mut other));
    }
    assert_eq!(m.sched.sibling_slices, 2, "round 3 ran both at once");
    let vm = m.get(id).unwrap();
    let vcpus = &vm.res.as_ref().unwrap().vcpus;
    let took = |v: usize| interrupts_taken(&vcpus[v].vcpu);
    // 0x42 waits for the EOI of 0x41: the same priority class.
    assert_eq!(took(0), [0x41, 0x42], "its self-IPI, then its timer's interrupt after the EOI");
    assert_eq!(took(1), [0x40], "the IPI vCPU 0 posted, taken at its first entry");
    assert_eq!(vm.devices.lapic(1).unwrap().ppr(), 0, "its EOI, carried out where it ran");
    assert_eq!(vm.devices.lapic(0).unwrap().ppr(), 0x40, "0x42 still in service");
    assert!(vcpus[0].vcpu.script.is_empty() && vcpus[1].vcpu.script.is_empty());
    assert!(vcpus[0].computing && !vcpus[1].computing, "vCPU 1's slice ended at the NMI");
    assert_eq!(vm.stats.posted_ipis, 1);
    assert_eq!(vm.stats.exits[ExitKind::Wrmsr as usize], 8);
    assert_eq!(vm.stats.sibling_apic_accesses, 7, "every WRMSR but the NMI's, handled where it ran");
    assert_eq!(vcpus[0].vcpu.injected.last(), Some(&vcpu::Event::Nmi), "sent by the boot CPU after the join");
}

/// Both vCPUs of a `two_vcpu_vm` in x2APIC mode, software-enabled, with
/// interrupts on: what the guest does first.
fn x2apic_on(m: &mut Manager<MockBackend>) {
    let vm = &mut m.vms[0];
    for v in 0..vm.vcpu_count() {
        vm.devices.set_current(v);
        let base = vm.devices.lapic_read_msr(0x1b, 0).unwrap().unwrap();
        assert_eq!(vm.devices.lapic_write_msr(0x1b, base | (1 << 10), 0), Some(Ok(())));
        assert_eq!(vm.devices.lapic_write_msr(0x80f, 0x1ff, 0), Some(Ok(())));
        vm.res.as_mut().unwrap().vcpus[v].vcpu.rflags |= 0x200;
    }
}

/// The vectors a mock vCPU was injected, in order.
fn interrupts_taken(vcpu: &crate::testing::MockVcpu) -> Vec<u8> {
    vcpu.delivered
        .iter()
        .filter_map(|e| match e {
            vcpu::Event::Interrupt { vector } => Some(*vector),
            _ => None,
        })
        .collect()
}

#[test]
fn a_halted_sibling_waits_where_it_runs_and_a_posted_ipi_wakes_it_there() {
    let mut m = manager();
    // vCPU 0 (here, first) posts vCPU 1 a fixed IPI; vCPU 1 (the other
    // CPU, after it), with interrupts off, cannot take it at its entry; it
    // does `sti; hlt`: the vector is waiting, so it wakes at once, takes
    // it and ends it, all without leaving its CPU.
    let v0 = vec![exit(VmExit::Preempted), wrmsr(0x830, (1 << 32) | 0x40), exit(VmExit::Cpuid)];
    let sti_hlt: Step = Box::new(|v| {
        v.rflags |= 0x200;
        VmExit::Hlt
    });
    let v1 = vec![exit(VmExit::Preempted), sti_hlt, wrmsr(0x80b, 0), exit(VmExit::Cpuid)];
    let (id, mut other) = two_vcpu_vm(&mut m, [v0, v1]);
    x2apic_on(&mut m);
    m.vms[0].res.as_mut().unwrap().vcpus[1].vcpu.rflags &= !0x200;
    let mut con = Lines::default();
    for _ in 0..3 {
        assert!(m.run_round(&mut con, &mut other));
    }
    assert_eq!(m.sched.sibling_slices, 2, "round 3 ran both at once");
    let vm = m.get(id).unwrap();
    let vcpus = &vm.res.as_ref().unwrap().vcpus;
    assert_eq!(interrupts_taken(&vcpus[1].vcpu), [0x40], "woken by the posted IPI, and given it");
    assert!(vcpus[1].vcpu.script.is_empty(), "it ran on past the HLT in the same slice");
    assert_eq!(vcpus[1].vcpu.skipped, 3, "HLT, WRMSR, CPUID completed");
    assert_eq!(vcpus[1].state, crate::vm::VcpuState::Runnable);
    assert!(vcpus[1].computing, "a wait it woke from does not end its slice");
    assert_eq!((vm.stats.sibling_halts, vm.stats.sibling_wakes), (1, 1));
    assert_eq!(other.backend.halts.get(), 0, "nothing to wait for: the vector was there");
    assert_eq!(vm.devices.lapic(1).unwrap().ppr(), 0, "its EOI, carried out where it ran");
}

#[test]
fn a_halted_sibling_waits_out_its_slice_and_an_ipi_for_it_then_ends_the_senders() {
    let mut m = manager();
    // vCPU 0 (here, first) halts: vCPU 1 has not run yet, so it waits on
    // this CPU until the slice's end and stays halted. vCPU 1 (after it)
    // sends it an IPI: vCPU 0 is no longer in the guest and takes it only
    // after the join, so vCPU 1's slice ends there (a second IPI of the
    // vector would meet the first in vCPU 0's IRR), and vCPU 0, woken by
    // it, goes first in the next round.
    let v0 = vec![exit(VmExit::Preempted), exit(VmExit::Hlt), exit(VmExit::Cpuid)];
    let v1 = vec![exit(VmExit::Preempted), wrmsr(0x830, 0x41), exit(VmExit::Hlt), exit(VmExit::Cpuid)];
    let (id, mut other) = two_vcpu_vm(&mut m, [v0, v1]);
    x2apic_on(&mut m);
    let mut con = Lines::default();
    for _ in 0..3 {
        assert!(m.run_round(&mut con, &mut other));
    }
    assert_eq!(m.sched.sibling_slices, 2, "round 3 ran both at once");
    {
        let vm = m.get(id).unwrap();
        let vcpus = &vm.res.as_ref().unwrap().vcpus;
        assert_eq!(vcpus[0].state, crate::vm::VcpuState::Halted, "the round ended before anything woke it");
        assert_eq!(vcpus[1].state, crate::vm::VcpuState::Runnable);
        assert!(vcpus[0].computing && vcpus[1].computing, "halted, or stopped at its IPI: siblings again");
        assert_eq!(vcpus[1].vcpu.script.len(), 2, "vCPU 1 stopped right after its IPI");
        assert_eq!((vm.stats.sibling_halts, vm.stats.sibling_wakes, vm.stats.posted_ipis), (1, 0, 1));
        assert!(interrupts_taken(&vcpus[0].vcpu).is_empty());
        assert_eq!(vm.ipi_waiting, 0b01, "vCPU 0 goes first");
    }
    assert_eq!(m.backend.as_ref().unwrap().halts.get(), 1, "vCPU 0 waited on this CPU");
    assert_eq!(other.backend.halts.get(), 0);
    // The posted vector woke vCPU 0: it runs first and takes it.
    assert!(m.run_round(&mut con, &mut other));
    let vm = m.get(id).unwrap();
    let vcpus = &vm.res.as_ref().unwrap().vcpus;
    assert_eq!(interrupts_taken(&vcpus[0].vcpu), [0x41]);
    assert!(vcpus[0].vcpu.script.is_empty());
    assert_eq!(vm.ipi_waiting, 0);
}

#[test]
fn a_sibling_in_xapic_mode_decodes_its_own_apic_accesses_where_it_runs() {
    let mut m = manager();
    // Beside vCPU 1, vCPU 0 (here, where the VM's memory is the mock's)
    // writes its xAPIC page: a fixed IPI to vCPU 1 (ICR high, then low),
    // its TPR, then its LDR, which changes how IPIs reach it: the boot
    // CPU's, which ends the round for vCPU 1 before it starts.
    let v0 = vec![
        exit(VmExit::Preempted),
        apic_write(0x310, 1 << 24),
        apic_write(0x300, 0x41),
        tpr_write(0x20),
        apic_write(0xd0, 1 << 24),
    ];
    let (id, mut other) = two_vcpu_vm(&mut m, [v0, vec![exit(VmExit::Preempted)]]);
    let vm = &mut m.vms[0];
    for v in 0..2 {
        // Software-enabled, as the guest does first.
        vm.devices.set_current(v);
        assert!(vm.devices.mmio_write(0xfee0_00f0, 4, 0x1ff, 0));
    }
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    assert!(m.run_round(&mut con, &mut other));
    let rip = m.get(id).unwrap().res.as_ref().unwrap().vcpus[0].vcpu.state.rip;
    assert!(m.run_round(&mut con, &mut other));
    let vm = m.get(id).unwrap();
    let v0 = &vm.res.as_ref().unwrap().vcpus[0];
    assert_eq!(v0.vcpu.state.rip, rip + 8, "four `mov [rax], ecx` carried out");
    assert_eq!(vm.stats.exits[ExitKind::NestedPageFault as usize], 4);
    assert_eq!(vm.stats.sibling_apic_accesses, 3, "the ICR halves and the TPR, where it ran");
    assert_eq!(vm.stats.mmio, 1, "the LDR write, emulated by the boot CPU after the join");
    assert_eq!(vm.devices.lapic(0).unwrap().tpr(), 0x20);
    assert_eq!(vm.stats.posted_ipis, 1);
    // vCPU 1 never ran in round 3: the boot CPU took the posted IPI into
    // its APIC after the join.
    assert_eq!(vm.res.as_ref().unwrap().vcpus[1].stats.slices, 1);
    assert_eq!(vm.devices.lapic(1).unwrap().pending_vector(), Some(0x41));
    assert_eq!(m.sched.kicked_slices, 1);
    let ldr = m.vms[0].devices.mmio_read(0xfee0_00d0, 4, 0);
    assert_eq!(ldr, Some(1 << 24), "vCPU 0's LDR");
}

#[test]
fn a_vcpu_whose_slice_ended_at_an_ipi_it_sent_or_halted_runs_beside_its_sibling_next() {
    let mut m = manager();
    // Alone on the boot CPU, vCPU 0 halts with interrupts on, then vCPU 1
    // sends it an IPI (its slice ends so the target can run): beside each
    // other both would have handled that where they run, so both count as
    // computing, and with vCPU 0 woken they run side by side.
    let v0 = vec![exit(VmExit::Hlt), wrmsr(0x80b, 0)];
    let v1 = vec![wrmsr(0x830, 0x40)];
    let (id, mut other) = two_vcpu_vm(&mut m, [v0, v1]);
    x2apic_on(&mut m);
    let computing = |m: &Manager<MockBackend>, v: usize| m.get(id).unwrap().res.as_ref().unwrap().vcpus[v].computing;
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut NoOtherCpus));
    assert!(computing(&m, 0), "its slice ended halted, interrupts on");
    assert!(m.run_round(&mut con, &mut NoOtherCpus));
    assert!(computing(&m, 1), "its slice ended at the IPI it sent");
    assert_eq!(m.sched.sibling_slices, 0);
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!(m.sched.sibling_slices, 2, "woken by the IPI, vCPU 0 runs beside vCPU 1");
    let vcpus = &m.get(id).unwrap().res.as_ref().unwrap().vcpus;
    assert_eq!(interrupts_taken(&vcpus[0].vcpu), [0x40]);
}

#[test]
fn the_target_of_an_ipi_runs_before_the_sender_can_send_it_another() {
    let mut m = manager();
    // Three vCPUs on one CPU: vCPU 0 sends vCPU 2 an IPI, and its slice
    // ends there. vCPU 2 runs next, ahead of vCPU 1 (the round-robin's
    // next): a second IPI of the vector before vCPU 2 took the first
    // would have met it in one IRR bit.
    let ipi_to_2 = || wrmsr(0x830, (2 << 32) | 0x41);
    let v0 = vec![ipi_to_2(), exit(VmExit::Cpuid)];
    let (id, _) = smp_vm(&mut m, vec![v0, vec![], vec![]]);
    x2apic_on(&mut m);
    let mut con = Lines::default();
    let slices = |m: &Manager<MockBackend>| -> Vec<u64> {
        m.get(id).unwrap().res.as_ref().unwrap().vcpus.iter().map(|s| s.stats.slices).collect()
    };
    assert!(m.run_round(&mut con, &mut NoOtherCpus));
    assert_eq!(slices(&m), [1, 0, 0]);
    assert_eq!(m.get(id).unwrap().ipi_waiting, 0b100);
    assert!(m.run_round(&mut con, &mut NoOtherCpus));
    assert_eq!(slices(&m), [1, 0, 1], "the target first");
    let vcpus = &m.get(id).unwrap().res.as_ref().unwrap().vcpus;
    assert_eq!(interrupts_taken(&vcpus[2].vcpu), [0x41]);
    assert!(m.run_round(&mut con, &mut NoOtherCpus));
    assert_eq!(slices(&m), [1, 1, 1], "then round-robin");
}

#[test]
fn a_sibling_that_ipis_a_vcpu_not_in_the_round_ends_its_slice_and_the_target_runs_next() {
    let mut m = manager();
    // vCPUs 0 and 1 compute side by side (vCPU 2 too, but there are only
    // two CPUs). vCPU 1 sends vCPU 2 an IPI twice: the first ends its
    // slice, so the second waits until vCPU 2, first in the next round,
    // took the first.
    let ipi_to_2 = || wrmsr(0x830, (2 << 32) | 0x41);
    let v0 = vec![exit(VmExit::Preempted), exit(VmExit::Preempted)];
    let v1 = vec![exit(VmExit::Preempted), ipi_to_2(), ipi_to_2()];
    let v2 = vec![exit(VmExit::Preempted), exit(VmExit::Preempted)];
    let (id, mut other) = smp_vm(&mut m, vec![v0, v1, v2]);
    x2apic_on(&mut m);
    let mut con = Lines::default();
    for _ in 0..3 {
        assert!(m.run_round(&mut con, &mut NoOtherCpus));
    }
    // Every vCPU ran out a slice: all compute.
    assert!(m.get(id).unwrap().res.as_ref().unwrap().vcpus.iter().all(|s| s.computing));
    m.vms[0].next_vcpu = 0;
    assert!(m.run_round(&mut con, &mut other));
    {
        let vm = m.get(id).unwrap();
        let vcpus = &vm.res.as_ref().unwrap().vcpus;
        assert_eq!(vcpus[1].vcpu.script.len(), 1, "its slice ended at the first IPI");
        assert!(vcpus[1].computing);
        assert_eq!((vm.stats.posted_ipis, vm.stats.sibling_ipi_ends), (1, 1));
        assert_eq!(vm.ipi_waiting, 0b100);
    }
    assert!(m.run_round(&mut con, &mut other));
    let vcpus = &m.get(id).unwrap().res.as_ref().unwrap().vcpus;
    assert_eq!(interrupts_taken(&vcpus[2].vcpu), [0x41], "vCPU 2 ran first and took it");
    assert_eq!(vcpus[1].vcpu.script.len(), 1, "not yet vCPU 1's second IPI");
}

/// `sti; hlt`: a vCPU that waits for an interrupt.
fn sti_hlt() -> Step {
    Box::new(|v| {
        v.rflags |= 0x200;
        VmExit::Hlt
    })
}

fn cpuids(n: usize) -> Vec<Step> {
    (0..n).map(|_| exit(VmExit::Cpuid)).collect()
}

fn cpuid_exits(m: &Manager<MockBackend>, id: u32) -> u64 {
    m.get(id).unwrap().stats.exits[ExitKind::Cpuid as usize]
}

#[test]
fn the_boot_cpu_takes_a_spare_slice_when_its_own_vcpu_halts() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    // VM 1 (here) halts at once; VM 2 (the other CPU) computes; VM 3 is
    // the round's spare.
    b.scripts.push_back(vec![sti_hlt()]);
    b.scripts.push_back(cpuids(400));
    b.scripts.push_back(cpuids(400));
    let (one, two, three) =
        (m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap());
    m.slice_ticks = 2000;
    let mut other = other_cpu(&m);
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!(other.ran, [1], "VM 2 went to the other CPU");
    assert_eq!(m.get(one).unwrap().res.as_ref().unwrap().vcpus[0].state, crate::vm::VcpuState::Halted);
    let (c2, c3) = (cpuid_exits(&m, two), cpuid_exits(&m, three));
    assert!(c2 > 0, "VM 2 ran its slice away");
    assert!(c3 > 20, "VM 3 ran on this CPU for the rest of the round: {c3} CPUIDs");
    assert!(c3 < 400, "but not past the round's end: {c3}");
    let s = m.sched;
    assert_eq!((s.rounds, s.slices, s.slices_away, s.spare_slices), (1, 3, 1, 1), "{s:?}");
    assert_eq!(vcpu_of(&m, three).releases, 2, "released before the round and after its spare slice");
}

#[test]
fn another_cpu_whose_vcpu_halts_takes_the_spare_slice() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    // VM 1 (here) computes through the round; VM 2 (the other CPU) halts
    // at once, and that CPU then runs VM 3.
    b.scripts.push_back(cpuids(400));
    b.scripts.push_back(vec![sti_hlt()]);
    b.scripts.push_back(cpuids(400));
    let (_, two, three) =
        (m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap());
    m.slice_ticks = 2000;
    let mut other = other_cpu(&m);
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!(other.ran, [1]);
    assert_eq!(m.get(two).unwrap().res.as_ref().unwrap().vcpus[0].state, crate::vm::VcpuState::Halted);
    assert!(cpuid_exits(&m, three) > 20, "VM 3 ran on the other CPU after VM 2 halted");
    let s = m.sched;
    assert_eq!((s.slices, s.slices_away, s.spare_slices), (3, 2, 1), "{s:?}");
    let stats = &m.get(three).unwrap().res.as_ref().unwrap().vcpus[0].stats;
    assert_eq!(stats.slices, 1);
}

#[test]
fn a_spare_no_cpu_took_goes_first_in_the_next_round() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    // Three VMs that compute: every round has two CPUs busy to its end, so
    // its spare waits, and goes first next.
    for _ in 0..3 {
        b.scripts.push_back(cpuids(400));
    }
    let ids: Vec<u32> = (0..3).map(|_| m.run_vm("tiny", 4, "").unwrap()).collect();
    m.slice_ticks = 2000;
    let mut other = other_cpu(&m);
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!(cpuid_exits(&m, ids[2]), 0, "VM 3 was the spare, and nobody had time for it");
    assert_eq!(m.sched.spare_slices, 0);
    assert!(m.run_round(&mut con, &mut other));
    assert!(cpuid_exits(&m, ids[2]) > 0, "VM 3 ran in the next round");
    // Over three rounds every VM ran in two: the rotation is kept.
    assert!(m.run_round(&mut con, &mut other));
    let slices: Vec<u64> =
        ids.iter().map(|&id| m.get(id).unwrap().res.as_ref().unwrap().vcpus[0].stats.slices).collect();
    assert_eq!(slices, [2, 2, 2]);
}

#[test]
fn a_vm_away_stopped_for_its_own_timer_goes_on_until_the_boot_cpus_slice_ends() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    // VM 1 (here) computes through the round. VM 2 (away) stops for its
    // timer (a preemption long before the round's end), then computes.
    b.scripts.push_back(cpuids(400));
    let mut two_script = vec![exit(VmExit::Preempted)];
    two_script.extend(cpuids(400));
    b.scripts.push_back(two_script);
    let (_, two) = (m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap());
    m.slice_ticks = 2000;
    let mut other = other_cpu(&m);
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!(other.ran, [1]);
    let vm2 = m.get(two).unwrap();
    assert_eq!(vm2.stats.exits[ExitKind::Preempted as usize], 1);
    assert!(cpuid_exits(&m, two) > 20, "it went on past its timer in the same slice");
    assert_eq!(vm2.stats.slices_expired, 1, "and ran to the round's end");
    assert_eq!(vm2.res.as_ref().unwrap().vcpus[0].stats.slices, 1);
}

#[test]
fn with_nothing_to_run_the_boot_cpu_may_halt_until_the_first_vm_timer_unless_work_moves() {
    let mut m = manager();
    assert_eq!(m.idle_until(), Some(u64::MAX), "no VM: only the console and the NIC to poll");
    m.backend.as_mut().unwrap().scripts.push_back(vec![sti_hlt()]);
    m.backend.as_mut().unwrap().scripts.push_back(vec![sti_hlt()]);
    let (one, two) = (m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap());
    m.vms[0].timer_tick = 5_000;
    m.vms[1].timer_tick = 3_000;
    assert_eq!(m.idle_until(), Some(3_000), "the earliest timer");
    // A paused VM's timer waits for its resume.
    m.vms[1].paused = true;
    assert_eq!(m.idle_until(), Some(5_000));
    m.vms[1].paused = false;
    assert!(m.stop(two, &mut Lines::default()).is_ok());
    assert_eq!(m.idle_until(), Some(5_000), "an ended VM has no timer");
    let _ = one;
}

/// One other CPU that runs its job on a thread of its own from `start`,
/// while the calling thread goes on with its own slice and then waits in
/// `join`, serving host calls, as the kernel's APs and boot CPU do.
struct ThreadCpu {
    backend: MockBackend,
    running: Option<std::thread::JoinHandle<()>>,
}

/// A job and the stand-in CPU's backend, handed to its thread.
struct ThreadJob(*mut AwaySlice<MockBackend>, *mut MockBackend);
// SAFETY: the round keeps the job in place until `join` returns, and the
// backend is the stand-in's, used by nobody else while the thread runs.
unsafe impl Send for ThreadJob {}

// SAFETY: each started job runs once, on the thread, and `join` returns
// only after that thread ended (its writes visible through the join).
unsafe impl SliceCpus<MockBackend> for ThreadCpu {
    fn free(&self) -> usize {
        usize::from(self.running.is_none())
    }
    fn start(&mut self, job: *mut AwaySlice<MockBackend>) -> bool {
        if self.running.is_some() {
            return false;
        }
        let j = ThreadJob(job, &raw mut self.backend);
        self.running = Some(std::thread::spawn(move || {
            let j = j;
            // SAFETY: see `ThreadJob`.
            unsafe { (*j.0).run(&mut *j.1) };
        }));
        true
    }
    fn join(&mut self, serve: &mut dyn FnMut()) {
        let Some(t) = self.running.take() else { return };
        while !t.is_finished() {
            serve();
            std::thread::yield_now();
        }
        t.join().unwrap();
    }
    fn takes_calls(&self) -> bool {
        true
    }
}

/// One round of `m` with a [`ThreadCpu`] for the second VM; the console's
/// lines.
fn round_beside_a_thread(m: &mut Manager<MockBackend>) -> Lines {
    // Long: the stand-in's clock jumps a millisecond at each look while
    // its job waits for the answer (the mock's `halt_until`).
    m.slice_ticks = 1 << 40;
    // SAFETY: the stand-in is dropped before `m`, at the end of this call.
    let backend = unsafe { m.backend.as_ref().unwrap().beside() };
    let mut other = ThreadCpu { backend, running: None };
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    con
}

#[test]
fn an_exit_a_vm_away_leaves_to_the_boot_cpu_is_handled_while_its_slice_waits_and_it_goes_on() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    // VM 1 stays here: CPUIDs, its slice long enough to serve a call in it.
    b.scripts.push_back((0..2000).map(|_| exit(VmExit::Cpuid)).collect());
    // VM 2 goes away: a line on COM1, a first write to a page of its RAM
    // (a nested page fault that needs a host frame: the boot CPU's), then
    // more in the same slice.
    let mut away: Vec<Step> = b"hi\n".iter().map(|&c| com1(c)).collect();
    away.push(exit(VmExit::NestedPageFault { gpa: 0x30_0000, access: MemAccess::Write, gva: None }));
    away.extend(b"ok\n".iter().map(|&c| com1(c)));
    away.push(exit(VmExit::Cpuid));
    // And it waits for an interrupt: the slice ends there.
    away.push(sti_hlt());
    b.scripts.push_back(away);
    let one = m.run_vm("tiny", 4, "").unwrap();
    let two = m.run_vm("tiny", 4, "").unwrap();
    let con = round_beside_a_thread(&mut m);

    let vm2 = m.get(two).unwrap();
    assert_eq!(vm2.stats.host_calls, 1, "the fault was a host call");
    assert_eq!(m.sched.host_calls, 1);
    assert_eq!(m.sched.deferred_exits, 0, "nothing was left for after the join");
    assert_eq!(vm2.stats.exits[ExitKind::Cpuid as usize], 1, "it went on after the call, in the same slice");
    let v2 = vcpu_of(&m, two);
    assert!(v2.script.is_empty(), "the whole script ran in one slice");
    assert!(!v2.loaded, "released where it ended");
    assert_eq!(vm2.stats.exits[ExitKind::NestedPageFault as usize], 1);
    // The lines come out in the guest's order, around the call.
    let hi = con.0.iter().position(|l| l == "[vm 2] hi");
    let ok = con.0.iter().position(|l| l == "[vm 2] ok");
    assert!(hi.is_some() && ok > hi, "{:?}", con.0);
    // VM 1 ran here throughout, loaded again after any call it stepped
    // aside for (the mock refuses a run without a load).
    assert!(m.get(one).unwrap().stats.exits[ExitKind::Cpuid as usize] > 0);
}

#[test]
fn a_host_call_that_stops_the_vm_ends_its_slice_and_the_vm_as_after_the_join() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    b.scripts.push_back(cpuids(2000));
    // VM 2 reads guest-physical memory it does not have: the boot CPU
    // stops it; nothing after runs.
    b.scripts.push_back(vec![
        exit(VmExit::Cpuid),
        exit(VmExit::NestedPageFault { gpa: 0xc000_0000, access: MemAccess::Read, gva: None }),
        exit(VmExit::Cpuid),
    ]);
    m.run_vm("tiny", 4, "").unwrap();
    let two = m.run_vm("tiny", 4, "").unwrap();
    let con = round_beside_a_thread(&mut m);
    let vm2 = m.get(two).unwrap();
    assert_eq!(vm2.stats.host_calls, 1);
    assert!(matches!(vm2.state, RunState::Stopped { .. }), "{:?}", vm2.state);
    assert!(vm2.res.is_none(), "released after the join, as any VM that ends");
    assert_eq!(cpuid_exits(&m, two), 1, "nothing ran after the fault");
    assert!(con.0.iter().any(|l| l.contains("vm 2 (tiny) stopped: read of guest-physical 0xc0000000")), "{:?}", con.0);
}

#[test]
fn siblings_faults_on_ram_are_fixed_while_the_round_runs_and_a_changed_mapping_is_shot_down() {
    let mut m = manager();
    // Each vCPU runs out a slice alone first (so both compute), then,
    // side by side, writes the same page of RAM and a page of its own
    // (faults that need host frames: the boot CPU's), and goes on.
    let write = |gpa: u64| exit(VmExit::NestedPageFault { gpa, access: MemAccess::Write, gva: None });
    let script = |own: u64| {
        vec![exit(VmExit::Preempted), write(0x30_0000), exit(VmExit::Cpuid), write(own), exit(VmExit::Cpuid)]
    };
    let (id, mut other) = two_vcpu_vm(&mut m, [script(0x31_0000), script(0x32_0000)]);
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    assert!(m.run_round(&mut con, &mut other));
    let flushes = |m: &Manager<MockBackend>| {
        let r = m.get(id).unwrap().res.as_ref().unwrap();
        [r.vcpus[0].vcpu.nested_flushes, r.vcpus[1].vcpu.nested_flushes]
    };
    let before = flushes(&m);
    // Round 3: side by side, one of them on a thread of its own.
    let _ = round_beside_a_thread(&mut m);

    let vm = m.get(id).unwrap();
    assert_eq!(vm.stats.parallel_slices, 2, "both ran as siblings");
    assert_eq!(m.sched.deferred_exits, 0, "no fault waited for the join");
    assert_eq!(vm.stats.sibling_faults, 4, "every fault fixed while the round ran");
    assert_eq!(vm.stats.host_calls, 2, "the sibling away asked for its two; the boot CPU's fixed its own in place");
    for slot in vm.res.as_ref().unwrap().vcpus.iter() {
        assert!(slot.vcpu.script.is_empty(), "each went on after its faults, in the same slice");
    }
    assert_eq!(vm.stats.exits[ExitKind::Cpuid as usize], 4);
    // Each write replaced a mapping the other vCPU may hold (the zero
    // page's; for the second writer of the shared page, a translation the
    // first writer's fix made stale): shot down on every CPU that may
    // hold it, and every vCPU flushes again after the round.
    assert!(vm.stats.shootdowns >= 1, "{:?}", vm.stats);
    assert_eq!(vm.stats.shootdowns, m.sched.shootdowns);
    let after = flushes(&m);
    assert!(after[0] > before[0] && after[1] > before[1], "{before:?} -> {after:?}");
    assert!(
        m.get(id).unwrap().res.as_ref().unwrap().mem.page_state(mm::addr::GuestPhysAddr(0x32_0000))
            == Some(mm::vm_memory::PageState::Present)
    );
}

#[test]
fn a_vcpu_that_does_not_compute_between_two_that_do_still_gets_its_turn() {
    let mut m = manager();
    // Three vCPUs that spin (out of script: every run is preempted).
    let (id, mut other) = smp_vm(&mut m, vec![Vec::new(), Vec::new(), Vec::new()]);
    let mut con = Lines::default();
    {
        let res = m.vms[0].res.as_mut().unwrap();
        res.vcpus[0].computing = true;
        res.vcpus[1].computing = false;
        res.vcpus[2].computing = true;
    }
    // Round 1: vCPUs 0 and 2 side by side (vCPU 1 does not compute).
    assert!(m.run_round(&mut con, &mut other));
    let slices = |m: &Manager<MockBackend>| {
        let r = m.get(id).unwrap().res.as_ref().unwrap();
        [r.vcpus[0].stats.slices, r.vcpus[1].stats.slices, r.vcpus[2].stats.slices]
    };
    assert_eq!(slices(&m), [1, 0, 1]);
    // Round 2: vCPU 1's turn, not vCPU 0's again (it waited for good).
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!(slices(&m)[1], 1, "{:?}", slices(&m));
}

/// `in al, dx` from `port`.
fn port_in(port: u16) -> Step {
    exit(VmExit::Io(IoAccess { port, size: 1, write: false, string: false, rep: false }))
}

/// `out dx, al` of `byte` to `port`.
fn port_out(port: u16, byte: u8) -> Step {
    Box::new(move |v| {
        v.gprs.rax = u64::from(byte);
        VmExit::Io(IoAccess { port, size: 1, write: true, string: false, rep: false })
    })
}

#[test]
fn siblings_poll_and_write_com1_where_they_run_and_their_lines_keep_the_guests_order() {
    let mut m = manager();
    // Each runs out a slice alone (so both compute); then, side by side,
    // vCPU 0 polls COM1's line status and prints a line, vCPU 1 (on a
    // thread of its own) reads the PM timer and the CMOS clock and prints
    // one, each between CPUIDs.
    let lsr = crate::devices::COM1_BASE + 5;
    let pm_tmr = crate::firmware::acpi::PM_TMR;
    let mut v0 = vec![exit(VmExit::Preempted)];
    v0.extend((0..20).map(|_| port_in(lsr)));
    v0.extend(b"zero\n".iter().map(|&c| com1(c)));
    v0.push(exit(VmExit::Cpuid));
    let mut v1 = vec![exit(VmExit::Preempted), port_in(pm_tmr), port_out(0x70, 0x0a), port_in(0x71)];
    v1.extend(b"one\n".iter().map(|&c| com1(c)));
    v1.push(exit(VmExit::Cpuid));
    let (id, mut other) = two_vcpu_vm(&mut m, [v0, v1]);
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    assert!(m.run_round(&mut con, &mut other));
    let con = round_beside_a_thread(&mut m);

    let vm = m.get(id).unwrap();
    assert_eq!(vm.stats.parallel_slices, 2, "both ran as siblings");
    assert_eq!(m.sched.deferred_exits, 0, "no port access waited for the join");
    assert_eq!(m.sched.kicked_slices, 0, "nobody's slice was cut short");
    assert_eq!(vm.stats.sibling_pio, 20 + 5 + 3 + 4, "{:?}", vm.stats);
    assert_eq!(vm.stats.sibling_line_ends, 0);
    for slot in vm.res.as_ref().unwrap().vcpus.iter() {
        assert!(slot.vcpu.script.is_empty(), "each ran its whole script in one slice");
        assert!(slot.computing, "and still computes");
    }
    // Each vCPU's bytes come out in its order. The two write one UART at
    // once, so their lines may interleave, as on hardware (seen once in
    // a loaded run).
    let text: String = con.0.iter().filter_map(|l| l.strip_prefix("[vm 1] ")).collect::<Vec<_>>().join("\n");
    let in_order = |word: &str| {
        let mut rest = text.chars();
        word.chars().all(|c| rest.any(|t| t == c))
    };
    assert!(in_order("zero") && in_order("one"), "{:?}", con.0);
    let mut got: Vec<char> = text.chars().filter(|&c| c != '\n').collect();
    got.sort_unstable();
    assert_eq!(got, ['e', 'e', 'n', 'o', 'o', 'r', 'z'], "every byte, once: {:?}", con.0);
    assert_eq!(vm.devices.com1_bytes_out(), 9);
}

#[test]
fn a_siblings_port_access_that_moves_com1s_line_ends_the_round_and_the_line_reaches_the_pic() {
    let mut m = manager();
    // vCPU 0, beside vCPU 1, enables COM1's transmitter-empty interrupt
    // (OUT2, then IER): IRQ 4 rises, which only the boot CPU can carry to
    // the interrupt controllers.
    let v0 = vec![
        exit(VmExit::Preempted),
        port_out(crate::devices::COM1_BASE + 4, 0x08),
        port_out(crate::devices::COM1_BASE + 1, 0x02),
        exit(VmExit::Cpuid),
    ];
    let v1 = vec![exit(VmExit::Preempted)];
    let (id, mut other) = two_vcpu_vm(&mut m, [v0, v1]);
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    assert!(m.run_round(&mut con, &mut other));
    // The PIC as Linux sets it up: vectors 0x30.., all unmasked.
    {
        let vm = m.vms[0].as_mut();
        crate::devices::init_pic_as_linux(&mut vm.devices, 0x00);
        vm.devices.update_lines(0);
        assert!(!vm.devices.interrupt_pending());
    }
    assert!(m.run_round(&mut con, &mut other));
    let vm = m.get(id).unwrap();
    // The stand-in CPU starts vCPU 1 only in the join, when the round is
    // already over for it.
    assert_eq!(vm.stats.parallel_slices, 1);
    assert_eq!(m.sched.kicked_slices, 1, "vCPU 1's slice ended with the round");
    assert_eq!((vm.stats.sibling_pio, vm.stats.sibling_line_ends), (2, 1), "{:?}", vm.stats);
    assert_eq!(m.sched.deferred_exits, 0, "the access was carried out where it ran");
    let v0 = &vm.res.as_ref().unwrap().vcpus[0];
    assert_eq!(v0.vcpu.script.len(), 1, "its slice ended at the write that moved the line");
    assert!(!v0.computing, "it runs with its whole VM next");
    assert!(vm.devices.interrupt_pending_for(0), "IRQ 4 reached the PIC (vCPU 0's INTR) after the join");
}

#[test]
fn a_siblings_com1_interrupt_through_the_io_apic_is_posted_where_it_runs_and_the_round_goes_on() {
    let mut m = manager();
    // As Linux with the I/O APIC: the PIC masked, pin 4 edge-triggered,
    // fixed, vector 0x24, to APIC ID 1. vCPU 0 (here) enables COM1's
    // transmitter-empty interrupt beside vCPU 1 (on the other CPU), which
    // ends it.
    let com = crate::devices::COM1_BASE;
    let v0 = vec![exit(VmExit::Preempted), port_out(com + 4, 0x08), port_out(com + 1, 0x02), exit(VmExit::Cpuid)];
    let v1 = vec![exit(VmExit::Preempted), wrmsr(0x80b, 0), exit(VmExit::Cpuid)];
    let (id, mut other) = two_vcpu_vm(&mut m, [v0, v1]);
    x2apic_on(&mut m);
    {
        let d = &mut m.vms[0].devices;
        crate::devices::init_pic_as_linux(d, 0xff);
        for (reg, value) in [(0x18, 0x24), (0x19, 1 << 24)] {
            assert!(d.mmio_write(0xfec0_0000, 4, reg, 0));
            assert!(d.mmio_write(0xfec0_0010, 4, value, 0));
        }
        d.update_lines(0);
    }
    let mut con = Lines::default();
    for _ in 0..3 {
        assert!(m.run_round(&mut con, &mut other));
    }
    assert_eq!(m.sched.sibling_slices, 2, "round 3 ran both at once");
    let vm = m.get(id).unwrap();
    assert_eq!((vm.stats.sibling_pio, vm.stats.sibling_lines, vm.stats.sibling_line_ends), (2, 1, 0), "{:?}", vm.stats);
    assert_eq!(m.sched.deferred_exits, 0);
    let vcpus = &vm.res.as_ref().unwrap().vcpus;
    assert!(vcpus[0].vcpu.script.is_empty(), "vCPU 0 went on after the write that raised the line");
    assert!(vcpus[0].computing);
    assert_eq!(interrupts_taken(&vcpus[1].vcpu), [0x24], "IRQ 4, posted to vCPU 1 and taken at its entry");
    assert_eq!(vm.devices.lapic(1).unwrap().ppr(), 0, "and ended there");
    assert!(!vm.devices.interrupt_pending_for(0) && !vm.devices.interrupt_pending_for(1), "nothing left over");
}

#[test]
fn a_spare_the_boot_cpu_takes_has_its_faults_fixed_in_place_and_goes_on() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    // VM 1 (here) halts at once; VM 2 (the other CPU) computes; VM 3, the
    // round's spare, first writes a page of its RAM (a nested page fault
    // that needs a host frame), then computes.
    b.scripts.push_back(vec![sti_hlt()]);
    b.scripts.push_back(cpuids(400));
    let mut three = vec![exit(VmExit::NestedPageFault { gpa: 0x30_0000, access: MemAccess::Write, gva: None })];
    three.extend(cpuids(400));
    b.scripts.push_back(three);
    let (_, _, three) =
        (m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap());
    m.slice_ticks = 2000;
    let mut other = other_cpu(&m);
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!(m.sched.spare_slices, 1, "{:?}", m.sched);
    assert_eq!(m.sched.deferred_exits, 0, "the fault did not wait for the join");
    let vm3 = m.get(three).unwrap();
    assert_eq!(
        vm3.res.as_ref().unwrap().mem.page_state(mm::addr::GuestPhysAddr(0x30_0000)),
        Some(mm::vm_memory::PageState::Present)
    );
    assert!(cpuid_exits(&m, three) > 20, "VM 3 went on after its fault, in the same spare slice");
    assert_eq!(vcpu_of(&m, three).releases, 2, "released before the round and after its spare slice");
}

#[test]
fn a_halted_vcpu_a_siblings_ipi_wakes_runs_at_once_on_the_senders_cpu() {
    let mut m = manager();
    // vCPUs 0 and 1 compute side by side; vCPU 2 waits halted (interrupts
    // on) outside the round. vCPU 0 sends it an IPI: its slice ends there,
    // and its CPU runs vCPU 2 at once, which takes the vector, ends it and
    // goes on, all in the same round.
    let v0 = vec![exit(VmExit::Preempted), wrmsr(0x830, (2 << 32) | 0x41), exit(VmExit::Cpuid)];
    let v1 = vec![exit(VmExit::Preempted)];
    let v2 = vec![exit(VmExit::Preempted), wrmsr(0x80b, 0), exit(VmExit::Cpuid)];
    let (id, mut other) = smp_vm(&mut m, vec![v0, v1, v2]);
    x2apic_on(&mut m);
    let mut con = Lines::default();
    for _ in 0..3 {
        assert!(m.run_round(&mut con, &mut NoOtherCpus));
    }
    {
        let vm = &mut m.vms[0];
        vm.next_vcpu = 0;
        let slot = &mut vm.res.as_mut().unwrap().vcpus[2];
        slot.state = crate::vm::VcpuState::Halted;
        slot.halted_irq_off = false;
    }
    assert!(m.run_round(&mut con, &mut other));
    let vm = m.get(id).unwrap();
    let vcpus = &vm.res.as_ref().unwrap().vcpus;
    assert_eq!(interrupts_taken(&vcpus[2].vcpu), [0x41], "woken and given the IPI in the same round");
    assert!(vcpus[2].vcpu.script.is_empty(), "it ran on past the EOI");
    assert_eq!(vm.devices.lapic(2).unwrap().ppr(), 0, "its EOI, carried out where it ran");
    assert_eq!(vcpus[2].state, crate::vm::VcpuState::Runnable);
    assert_eq!(vcpus[2].stats.wakeups, 1);
    assert_eq!(vcpus[0].vcpu.script.len(), 1, "the sender's slice ended at the IPI");
    assert_eq!((vm.stats.sibling_ipi_ends, vm.stats.standby_wakes), (1, 1), "{:?}", vm.stats);
    assert_eq!(vm.ipi_waiting, 0, "nothing left for the next round");
    assert_eq!(m.sched.standby_slices, 1);
    assert_eq!(other.ran, [0], "vCPU 1 ran on the other CPU meanwhile");
}

/// One other CPU whose job may go on past the boot CPU's slice
/// (`SliceCpus::goes_on`). It runs the job in `join`, as [`OneOtherCpu`],
/// but from the boot CPU's time at `start` (its clock set back to then),
/// as if it had run beside the boot CPU; the job counts as running until
/// the join. The console wants the boot CPU from the `wanted_at`-th look.
struct GoingOnCpu {
    backend: MockBackend,
    /// The boot CPU's backend, for its clock at `start`.
    boot: *const MockBackend,
    started_at: u64,
    job: Option<*mut AwaySlice<MockBackend>>,
    looks: u32,
    wanted_at: u32,
    kicks: core::cell::Cell<u32>,
    /// Runs each job at once in `start` (as if it ran before the boot
    /// CPU's own slice), not in `join`.
    eager: bool,
    /// What the boot CPU's own sibling finds before each further slice.
    poll: fn() -> bool,
}

// SAFETY: each started job runs once, in `join`, before it returns.
unsafe impl SliceCpus<MockBackend> for GoingOnCpu {
    fn free(&self) -> usize {
        usize::from(self.job.is_none())
    }
    fn start(&mut self, job: *mut AwaySlice<MockBackend>) -> bool {
        if self.job.is_some() {
            return false;
        }
        // SAFETY: the manager (declared before the stand-in) outlives it,
        // and the test runs on one thread.
        self.started_at = unsafe { (*self.boot).clock.get() };
        if self.eager {
            self.backend.clock.set(self.started_at);
            // SAFETY: as in `join`: the manager keeps the job in place and
            // touches its VM only after the join.
            unsafe { (*job).run(&mut self.backend) };
            return true;
        }
        self.job = Some(job);
        true
    }
    fn join(&mut self, _: &mut dyn FnMut()) {
        if let Some(job) = self.job.take() {
            self.backend.clock.set(self.started_at);
            // SAFETY: the manager keeps the job in place until this returns
            // and touches its VM only afterwards.
            unsafe { (*job).run(&mut self.backend) };
        }
    }
    fn goes_on(&self) -> bool {
        true
    }
    fn all_running(&self) -> bool {
        self.job.is_some()
    }
    fn wanted(&mut self) -> bool {
        self.looks += 1;
        self.looks >= self.wanted_at
    }
    fn doze(&mut self, until: u64, serve: &mut dyn FnMut()) {
        // SAFETY: as in `start`; the boot CPU's clock is what it waits on.
        unsafe { (*self.boot).halt_until(until) };
        serve();
    }
    fn kick_running(&self) {
        self.kicks.set(self.kicks.get() + 1);
    }
    fn poll(&self) -> fn() -> bool {
        self.poll
    }
}

fn going_on_cpu(m: &Manager<MockBackend>, wanted_at: u32) -> GoingOnCpu {
    let boot = m.backend.as_ref().unwrap();
    // SAFETY: every test declares its manager before its stand-in.
    let backend = unsafe { boot.beside() };
    GoingOnCpu {
        backend,
        boot,
        started_at: 0,
        job: None,
        looks: 0,
        wanted_at,
        kicks: Default::default(),
        eager: false,
        poll: || false,
    }
}

fn slices_of(m: &Manager<MockBackend>, id: u32) -> u64 {
    m.get(id).unwrap().res.as_ref().unwrap().vcpus[0].stats.slices
}

/// `n` CPUIDs, then "hi" on COM1, then CPUIDs for longer than any round.
fn prints_hi_after(n: usize) -> Vec<Step> {
    let mut script = cpuids(n);
    script.extend(b"hi\n".iter().map(|&c| com1(c)));
    script.extend(cpuids(20_000));
    script
}

/// VMs that compute, each exit a CPUID, for longer than any round.
fn computing_vms(m: &mut Manager<MockBackend>, n: usize) -> Vec<u32> {
    for _ in 0..n {
        m.backend.as_mut().unwrap().scripts.push_back(cpuids(20_000));
    }
    (0..n).map(|_| m.run_vm("tiny", 4, "").unwrap()).collect()
}

#[test]
fn with_a_cpu_for_every_runnable_vcpu_the_round_goes_on_until_the_console_wants_the_boot_cpu() {
    let mut m = manager();
    // Two VMs that compute: one for each of the two CPUs, and nothing waits.
    let ids = computing_vms(&mut m, 2);
    m.slice_ticks = 2000;
    // Looks: before the round, then one before each further slice here;
    // the fourth finds console input.
    let mut other = going_on_cpu(&m, 4);
    let mut con = Lines::default();
    assert!(m.run_round(&mut con, &mut other));
    let s = m.sched;
    assert_eq!((s.rounds, s.rounds_on, s.slices_on_here), (1, 1, 2), "{s:?}");
    assert_eq!(slices_of(&m, ids[0]), 3, "VM 1 ran three slices here in the one round");
    assert!(s.slices_on_away >= 1, "VM 2 went on past its first slice on the other CPU: {s:?}");
    assert_eq!(slices_of(&m, ids[1]), 1 + s.slices_on_away);
    assert_eq!(s.slices, 3 + 1 + s.slices_on_away);
    assert_eq!(other.kicks.get(), 1, "the round's end was made heard on the other CPU");
    let vm2 = m.get(ids[1]).unwrap();
    assert_eq!(vm2.res.as_ref().unwrap().vcpus[0].state, crate::vm::VcpuState::Runnable);
    // Both computed about as long: the round's end cut VM 2's last slice.
    let (a, b) = (m.vms[0].stats.run_ticks, m.vms[1].stats.run_ticks);
    assert!(a.abs_diff(b) * 4 <= a.max(b), "{a} vs {b} ticks in the guest");
    // With the console quiet from the start, the round lasts its most.
    let mut quiet = going_on_cpu(&m, u32::MAX);
    let before = m.sched;
    assert!(m.run_round(&mut con, &mut quiet));
    let here = m.sched.slices_on_here - before.slices_on_here;
    assert_eq!(here, super::round_on::MAX_ROUND_SLICES - 1, "{:?}", m.sched);
    assert_eq!(m.sched.rounds, 2);
}

#[test]
fn more_computing_vms_than_cpus_share_a_run_queue_and_each_gets_its_part() {
    // (12 and 20: more than four per CPU, which rotated round by round
    // before 2026-12-05.)
    for n in [3, 5, 8, 12, 20] {
        share_a_run_queue(n);
    }
}

fn share_a_run_queue(n: usize) {
    // (Room for 20 VMs of 4 MiB.)
    let mut m = manager_with_frames(32768);
    let ids = computing_vms(&mut m, n);
    m.slice_ticks = 2000;
    let mut con = Lines::default();
    for _ in 0..3 {
        let mut other = going_on_cpu(&m, u32::MAX);
        assert!(m.run_round(&mut con, &mut other));
        assert_eq!(other.kicks.get(), 1, "the round's end was made heard on the other CPU");
    }
    let s = m.sched;
    assert_eq!((s.rounds, s.queue_rounds), (3, 3), "{s:?}");
    let max = super::round_on::MAX_ROUND_SLICES;
    assert_eq!(s.queue_slices_here, 3 * max, "the boot CPU took slices for the whole round: {s:?}");
    assert!(s.queue_slices + 3 >= 2 * s.queue_slices_here, "and the other CPU as many: {s:?}");
    let slices: Vec<u64> = ids.iter().map(|&id| slices_of(&m, id)).collect();
    let (lo, hi) = (*slices.iter().min().unwrap(), *slices.iter().max().unwrap());
    // (Each round starts where the last left off: were it always with the
    // same VM, that one would get a slice more per round.)
    assert!(hi - lo <= 1, "{n} VMs on two CPUs share them evenly: {slices:?}");
    assert_eq!(slices.iter().sum::<u64>(), s.slices, "{s:?}");
    for &id in &ids {
        assert_eq!(m.get(id).unwrap().res.as_ref().unwrap().vcpus[0].state, crate::vm::VcpuState::Runnable);
    }
}

#[test]
fn a_line_a_vm_prints_ends_the_round_of_the_run_queue_so_it_comes_out_then() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    b.scripts.push_back(cpuids(20_000));
    b.scripts.push_back(prints_hi_after(100));
    b.scripts.push_back(cpuids(20_000));
    let (_, two, _) =
        (m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap());
    m.slice_ticks = 2000;
    let mut con = Lines::default();
    let mut other = going_on_cpu(&m, u32::MAX);
    assert!(m.run_round(&mut con, &mut other));
    // The boot CPU took VM 1, then VM 2, which printed: the round ended
    // there rather than after 8 slices.
    assert_eq!((m.sched.queue_rounds, m.sched.queue_slices_here), (1, 2), "{:?}", m.sched);
    assert!(con.0.iter().any(|l| l == &format!("[vm {two}] hi")), "{:?}", con.0);
}

#[test]
fn the_console_ends_a_round_of_the_run_queue_and_a_vm_that_halts_leaves_it() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    b.scripts.push_back(cpuids(20_000));
    b.scripts.push_back(cpuids(20_000));
    let mut three_script = cpuids(100);
    three_script.push(sti_hlt());
    three_script.extend(cpuids(20_000));
    b.scripts.push_back(three_script);
    let (_, _, three) =
        (m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap());
    m.slice_ticks = 2000;
    let mut con = Lines::default();
    // The console wants the boot CPU at its fourth look (the first is the
    // round's start): two slices here.
    let mut other = going_on_cpu(&m, 4);
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!((m.sched.queue_rounds, m.sched.queue_slices_here), (1, 2), "{:?}", m.sched);
    assert_eq!(other.kicks.get(), 1);
    // VM 3 halted in its slice and left the queue: it ran once.
    let vm3 = m.get(three).unwrap();
    assert_eq!(vm3.res.as_ref().unwrap().vcpus[0].state, crate::vm::VcpuState::Halted, "{:?}", m.sched);
    assert_eq!(slices_of(&m, three), 1);
    assert_eq!(cpuid_exits(&m, three), 100);
}

#[test]
fn a_vm_here_that_wakes_while_the_round_goes_on_runs_and_then_the_round_ends_for_the_rotation() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    // VM 1 computes here, VM 2 away; VM 3 is halted, its timer due during
    // the boot CPU's second slice.
    b.scripts.push_back(cpuids(20_000));
    b.scripts.push_back(cpuids(20_000));
    let mut three_script = vec![sti_hlt()];
    three_script.extend(cpuids(20_000));
    b.scripts.push_back(three_script);
    let (one, _, three) =
        (m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap());
    m.slice_ticks = 2000;
    m.cursor = 2;
    let mut con = Lines::default();
    // VM 3 halts first, in a slice of its own.
    assert!(m.run_slice(&mut con));
    assert_eq!(m.get(three).unwrap().res.as_ref().unwrap().vcpus[0].state, crate::vm::VcpuState::Halted);
    let now = m.backend.as_ref().unwrap().clock.get();
    m.vms[2].timer_tick = now + 3000;
    let before = (slices_of(&m, one), slices_of(&m, three));
    let mut other = going_on_cpu(&m, u32::MAX);
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!(slices_of(&m, three), before.1 + 1, "VM 3 ran here once its timer was due");
    // Then two VMs here wanted the CPU: the round ended rather than run
    // them by turns beside a VM away that kept its CPU.
    assert!(slices_of(&m, one) - before.0 <= 2, "{:?}", m.sched);
    assert_eq!((m.sched.rounds_on, other.kicks.get()), (1, 1));
}

#[test]
fn a_vm_asleep_in_the_run_queue_wakes_at_its_timer_where_a_cpu_is_free_and_then_takes_its_turns() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    // VMs 1 to 3 compute (more than the two CPUs: a run queue); VM 4
    // halts for its timer, due during the round, then computes.
    for _ in 0..3 {
        b.scripts.push_back(cpuids(20_000));
    }
    let mut four_script = vec![sti_hlt()];
    four_script.extend(cpuids(20_000));
    b.scripts.push_back(four_script);
    let ids: Vec<u32> = (0..4).map(|_| m.run_vm("tiny", 4, "").unwrap()).collect();
    m.slice_ticks = 2000;
    m.cursor = 3;
    let mut con = Lines::default();
    // VM 4 halts first, in a slice of its own.
    assert!(m.run_slice(&mut con));
    assert_eq!(m.get(ids[3]).unwrap().res.as_ref().unwrap().vcpus[0].state, crate::vm::VcpuState::Halted);
    let now = m.backend.as_ref().unwrap().clock.get();
    m.vms[3].timer_tick = now + 3000;
    let before: Vec<u64> = ids.iter().map(|&id| slices_of(&m, id)).collect();
    let mut other = going_on_cpu(&m, u32::MAX);
    assert!(m.run_round(&mut con, &mut other));
    // One round of the run queue, VM 4 in it asleep: woken at its timer,
    // it then took its turns with the others, the round going on.
    let s = m.sched;
    assert_eq!((s.queue_rounds, s.queue_wakes), (1, 1), "{s:?}");
    let ran: Vec<u64> = ids.iter().zip(&before).map(|(&id, b)| slices_of(&m, id) - b).collect();
    assert!(ran.iter().all(|&n| n >= 2), "every VM took turns: {ran:?}");
    assert_eq!(m.get(ids[3]).unwrap().stats.exits[ExitKind::Hlt as usize], 1, "it halted once, and woke in the round");
    assert_eq!(other.kicks.get(), 1);
}

#[test]
fn a_vm_away_stops_going_on_at_a_halt() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    // VM 2 (away) computes for a few slices, then halts.
    b.scripts.push_back(cpuids(20_000));
    let mut two_script = cpuids(300);
    two_script.push(sti_hlt());
    two_script.extend(cpuids(20_000));
    b.scripts.push_back(two_script);
    let (_, two) = (m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap());
    m.slice_ticks = 2000;
    let mut con = Lines::default();
    let mut other = going_on_cpu(&m, u32::MAX);
    assert!(m.run_round(&mut con, &mut other));
    let vm2 = m.get(two).unwrap();
    assert_eq!(vm2.res.as_ref().unwrap().vcpus[0].state, crate::vm::VcpuState::Halted, "{:?}", m.sched);
    assert_eq!(cpuid_exits(&m, two), 300, "it stopped at the halt");
    assert!(slices_of(&m, two) > 1, "after going on past its first slice");
}

#[test]
fn a_vm_away_stops_going_on_after_the_slice_that_printed_a_line_so_the_line_comes_out_then() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    // VM 2 (away) computes for a few slices, prints a line, and computes
    // on for longer than any round.
    b.scripts.push_back(cpuids(20_000));
    b.scripts.push_back(prints_hi_after(300));
    let (_, two) = (m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap());
    m.slice_ticks = 2000;
    let mut con = Lines::default();
    let mut other = going_on_cpu(&m, u32::MAX);
    other.eager = true;
    assert!(m.run_round(&mut con, &mut other));
    assert!(con.0.iter().any(|l| l == "[vm 2] hi"), "{:?}", con.0);
    let slices = slices_of(&m, two);
    assert!(slices > 1, "it went on before the line: {:?}", m.sched);
    // Held on for the whole round, the line would have come out 8 slices
    // late, after whatever the boot CPU's VMs printed meanwhile.
    assert!(slices < super::round_on::MAX_ROUND_SLICES, "it went on past its line: {slices} slices");
}

#[test]
fn a_round_whose_boot_cpu_slice_ends_its_vm_does_not_go_on() {
    let mut m = manager();
    let b = m.backend.as_mut().unwrap();
    // VM 1 (here) computes a little, then ends (the debug-exit port): its
    // end reaches the host's memory, so the round ends with it.
    let mut one_script = cpuids(50);
    one_script.push(Box::new(|v: &mut crate::testing::MockVcpu| {
        v.gprs.rax = 0;
        VmExit::Io(IoAccess { port: 0xf4, size: 4, write: true, string: false, rep: false })
    }));
    b.scripts.push_back(one_script);
    b.scripts.push_back(cpuids(20_000));
    let (one, two) = (m.run_vm("tiny", 4, "").unwrap(), m.run_vm("tiny", 4, "").unwrap());
    m.slice_ticks = 2000;
    let mut con = Lines::default();
    let mut other = going_on_cpu(&m, u32::MAX);
    assert!(m.run_round(&mut con, &mut other));
    assert!(m.get(one).unwrap().state.ended());
    assert_eq!(slices_of(&m, two), 1, "VM 2 ran its one slice: {:?}", m.sched);
    assert_eq!((m.sched.rounds_on, m.sched.slices_on_away), (0, 0));
}

/// A VM of two vCPUs that compute, each run alone first (so each is known
/// to compute), and a going-on stand-in for the other CPU.
fn two_computing_vcpus(m: &mut Manager<MockBackend>) -> (u32, GoingOnCpu) {
    let (id, _) = smp_vm(m, vec![cpuids(20_000), cpuids(20_000)]);
    m.slice_ticks = 2000;
    let mut con = Lines::default();
    let mut other = going_on_cpu(m, u32::MAX);
    assert!(m.run_round(&mut con, &mut other));
    assert!(m.run_round(&mut con, &mut other));
    assert_eq!(m.sched.sibling_slices, 0, "each ran alone first");
    (id, other)
}

#[test]
fn siblings_whose_vcpus_all_compute_go_on_slice_after_slice_on_every_cpu() {
    let mut m = manager();
    let (id, mut other) = two_computing_vcpus(&mut m);
    // vCPU 1's sibling runs first (as if beside the boot CPU's), then
    // vCPU 0's here; nothing wants the boot CPU.
    other.eager = true;
    let before = m.sched;
    assert!(m.run_round(&mut Lines::default(), &mut other));
    let s = m.sched;
    assert_eq!(s.sibling_slices - before.sibling_slices, 2, "{s:?}");
    assert_eq!(s.rounds_on - before.rounds_on, 1);
    let max_on = super::round_on::MAX_ROUND_SLICES - 1;
    assert_eq!(s.slices_on_here - before.slices_on_here, max_on, "the boot CPU's sibling ran the whole round");
    let away = s.slices_on_away - before.slices_on_away;
    assert!(away + 1 >= max_on && away <= max_on, "and the other CPU's about as long: {away} more slices");
    let r = m.get(id).unwrap().res.as_ref().unwrap();
    assert_eq!(r.vcpus[0].stats.slices, 1 + 1 + max_on, "a slice alone, then the round's");
    assert_eq!(r.vcpus[1].stats.slices, 1 + 1 + away);
    assert!(m.get(id).unwrap().stats.exits[ExitKind::Cpuid as usize] > 0, "they computed");
}

#[test]
fn siblings_stop_going_on_once_one_printed_a_line_so_the_line_comes_out_then() {
    let mut m = manager();
    // vCPU 1 computes, prints a line (COM1, carried out where it runs),
    // and computes on.
    let (id, _) = smp_vm(&mut m, vec![cpuids(20_000), prints_hi_after(900)]);
    m.slice_ticks = 2000;
    let mut con = Lines::default();
    let mut other = going_on_cpu(&m, u32::MAX);
    // Each runs alone first (so each is known to compute).
    assert!(m.run_round(&mut con, &mut other));
    assert!(m.run_round(&mut con, &mut other));
    assert!(!con.0.iter().any(|l| l.contains("hi")), "not yet: {:?}", con.0);
    other.eager = true;
    let before = m.sched;
    assert!(m.run_round(&mut con, &mut other));
    let s = m.sched;
    assert_eq!(s.sibling_slices - before.sibling_slices, 2, "{s:?}");
    assert!(con.0.iter().any(|l| l == &format!("[vm {id}] hi")), "{:?}", con.0);
    let away = s.slices_on_away - before.slices_on_away;
    assert!(away >= 1, "vCPU 1 went on before its line: {s:?}");
    // Held for the whole round, the line would come out 8 slices late.
    assert!(away < super::round_on::MAX_ROUND_SLICES - 2, "vCPU 1 went on past its line: {away} more slices");
    assert!(m.get(id).unwrap().stats.sibling_pio >= 3, "the line was written where vCPU 1 ran");
}

#[test]
fn the_boot_cpus_sibling_ends_a_round_that_goes_on_when_the_console_wants_the_cpu() {
    let mut m = manager();
    let (_, mut other) = two_computing_vcpus(&mut m);
    // Console input waits: the boot CPU's sibling stops at its slice's
    // end and ends the round for vCPU 1's too, which runs (in the join)
    // after the round's end was set.
    other.poll = || true;
    let before = m.sched;
    assert!(m.run_round(&mut Lines::default(), &mut other));
    let s = m.sched;
    assert_eq!(s.sibling_slices - before.sibling_slices, 2, "{s:?}");
    assert_eq!((s.rounds_on, s.slices_on_here, s.slices_on_away), (0, 0, 0), "{s:?}");
    assert_eq!(s.kicked_slices, before.kicked_slices, "not as if a sibling had cut it short");
}

#[test]
fn a_vm_with_more_computing_vcpus_than_cpus_does_not_go_on_so_the_one_left_out_gets_its_turn() {
    let mut m = manager();
    let (id, _) = smp_vm(&mut m, vec![cpuids(20_000), cpuids(20_000), cpuids(20_000)]);
    m.slice_ticks = 2000;
    let mut con = Lines::default();
    let mut other = going_on_cpu(&m, u32::MAX);
    other.eager = true;
    for _ in 0..6 {
        assert!(m.run_round(&mut con, &mut other));
    }
    let s = m.sched;
    assert!(s.sibling_slices > 0, "two of the three ran side by side: {s:?}");
    assert_eq!((s.rounds_on, s.slices_on_here, s.slices_on_away), (0, 0, 0), "{s:?}");
    let slices: Vec<u64> = m.get(id).unwrap().res.as_ref().unwrap().vcpus.iter().map(|v| v.stats.slices).collect();
    let (lo, hi) = (slices.iter().min().unwrap(), slices.iter().max().unwrap());
    assert!(hi - lo <= 1, "each vCPU got its turn: {slices:?}");
}

/// A VM of two vCPUs (`scripts`), vCPU 1 halted with interrupts on and
/// both in x2APIC mode, made first; then `busy` VMs that compute.
fn halted_ap_vm_and_busy_vms(m: &mut Manager<MockBackend>, scripts: [Vec<Step>; 2], busy: usize) -> (u32, Vec<u32>) {
    m.backend.as_mut().unwrap().scripts.extend(scripts);
    let id = m.run_vm_smp("tiny", 4, &[], "", None, None, 2).unwrap();
    let res = m.vms[0].res.as_mut().unwrap();
    let start = res.vcpus[0].vcpu.state();
    res.vcpus[1].vcpu.set_state(&start).unwrap();
    res.vcpus[1].state = crate::vm::VcpuState::Halted;
    x2apic_on(m);
    (id, computing_vms(m, busy))
}

#[test]
fn a_vm_of_several_vcpus_with_one_running_takes_its_turns_in_the_run_queue() {
    let mut m = manager();
    // VM 1 has two vCPUs: vCPU 0 computes, vCPU 1 waits for an interrupt
    // that does not come. VMs 2 and 3 compute: three VMs on two CPUs.
    let (smp, ids) = halted_ap_vm_and_busy_vms(&mut m, [cpuids(20_000), cpuids(10)], 2);
    m.slice_ticks = 2000;
    let mut con = Lines::default();
    for _ in 0..3 {
        let mut other = going_on_cpu(&m, u32::MAX);
        assert!(m.run_round(&mut con, &mut other));
    }
    let s = m.sched;
    assert_eq!((s.rounds, s.queue_rounds, s.queue_vms), (3, 3, 9), "the VM of two vCPUs was a job of each: {s:?}");
    let slices: Vec<u64> = [smp].iter().chain(&ids).map(|&id| slices_of(&m, id)).collect();
    let (lo, hi) = (*slices.iter().min().unwrap(), *slices.iter().max().unwrap());
    assert!(hi - lo <= 1, "the three VMs share the two CPUs evenly: {slices:?}");
    let vcpus = &m.get(smp).unwrap().res.as_ref().unwrap().vcpus;
    assert_eq!((vcpus[1].state, vcpus[1].stats.slices), (crate::vm::VcpuState::Halted, 0));
}

#[test]
fn a_job_of_a_vm_of_several_vcpus_ends_the_run_queues_round_when_another_of_its_vcpus_wants_a_cpu() {
    let mut m = manager();
    // vCPU 0 computes, then sends vCPU 1 (halted) an IPI a little way
    // into its first slice.
    let mut v0 = cpuids(50);
    v0.push(wrmsr(0x830, (1 << 32) | 0x41));
    v0.extend(cpuids(20_000));
    let (smp, _) = halted_ap_vm_and_busy_vms(&mut m, [v0, cpuids(20_000)], 2);
    m.slice_ticks = 2000;
    let mut con = Lines::default();
    let mut other = going_on_cpu(&m, u32::MAX);
    assert!(m.run_round(&mut con, &mut other));
    let s = m.sched;
    assert_eq!(s.queue_rounds, 1, "{s:?}");
    // The boot CPU took VM 1 first: its slice ended at the IPI, and the
    // round at the boot CPU's next look rather than after 8 slices.
    assert!(s.queue_slices_here <= 2, "{s:?}");
    assert_eq!(m.get(smp).unwrap().ipi_waiting, 0b10);
    // VMs 2 and 3, which waited, go first; then VM 1 with both its vCPUs.
    for _ in 0..2 {
        let mut other = going_on_cpu(&m, u32::MAX);
        assert!(m.run_round(&mut con, &mut other));
    }
    let vcpus = &m.get(smp).unwrap().res.as_ref().unwrap().vcpus;
    assert_eq!(interrupts_taken(&vcpus[1].vcpu), [0x41], "vCPU 1 ran and took it: {:?}", m.sched);
}

#[test]
fn a_vm_of_several_vcpus_away_goes_on_until_the_timer_of_another_of_its_vcpus_is_due() {
    let mut m = manager();
    // VM 1: vCPU 0 computes, vCPU 1 is halted with a one-shot timer (vector
    // 0x42) due in 5 ms, two and a half slices; VM 2 computes.
    let (smp, _) = halted_ap_vm_and_busy_vms(&mut m, [cpuids(20_000), cpuids(20_000)], 1);
    m.slice_ticks = 2000;
    let hz = m.backend.as_ref().unwrap().tsc_hz();
    let now_ns = crate::vm::interrupts::vm_ns(m.backend.as_ref().unwrap().clock.get(), hz, m.vms[0].clock_offset_ns);
    let vm = &mut m.vms[0];
    vm.devices.set_current(1);
    for (msr, value) in [(0x832, 0x42), (0x83e, 0b1011), (0x838, 5_000_000)] {
        assert_eq!(vm.devices.lapic_write_msr(msr, value, now_ns), Some(Ok(())));
    }
    vm.timers_changed(hz);
    // VM 2 first: it stays here, and VM 1 goes away.
    m.cursor = 1;
    let mut con = Lines::default();
    let mut other = going_on_cpu(&m, u32::MAX);
    assert!(m.run_round(&mut con, &mut other));
    let s = m.sched;
    let vcpus = &m.get(smp).unwrap().res.as_ref().unwrap().vcpus;
    assert_eq!(s.rounds_on, 1, "{s:?}");
    // It went on past its first slice, and stopped at vCPU 1's timer
    // rather than after 8 slices.
    assert!((2..=4).contains(&vcpus[0].stats.slices), "{:?} {s:?}", vcpus[0].stats.slices);
    assert_eq!(vcpus[1].stats.slices, 0);
    for _ in 0..2 {
        let mut other = going_on_cpu(&m, u32::MAX);
        assert!(m.run_round(&mut con, &mut other));
    }
    let vcpus = &m.get(smp).unwrap().res.as_ref().unwrap().vcpus;
    assert_eq!(interrupts_taken(&vcpus[1].vcpu), [0x42], "vCPU 1 then ran and took its timer's interrupt");
}
