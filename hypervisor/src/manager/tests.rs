//! The VM lifecycle and exit handling end to end on the host: scripted
//! vCPUs, simulated physical memory.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use vcpu::state::bits::RFLAGS_IF;
use vcpu::{Event, ExitKind, IoAccess, MemAccess, VmExit};

use super::*;
use crate::testing::{Lines, MockBackend, Step, elf_guest};

fn io(port: u16, size: u8, write: bool) -> VmExit {
    VmExit::Io(IoAccess { port, size, write, string: false, rep: false })
}

/// A step that sets RAX (and more, through `f`) then exits with `exit`.
fn step(f: impl Fn(&mut vcpu::Gprs) + 'static, exit: VmExit) -> Step {
    Box::new(move |v| {
        f(&mut v.gprs);
        exit.clone()
    })
}

fn out_str(s: &str) -> Vec<Step> {
    s.bytes().map(|b| step(move |g| g.rax = b as u64, io(0x3f8, 1, true))).collect()
}

fn exit_with(v: u64) -> Step {
    step(move |g| g.rax = v, io(0xf4, 4, true))
}

fn manager(frames: usize) -> Manager<MockBackend> {
    let images = vec![
        GuestImage { name: "tiny".into(), bytes: elf_guest(&[0x90; 32]) },
        GuestImage { name: "other".into(), bytes: elf_guest(&[0xf4; 16]) },
    ];
    Manager::new(Ok(MockBackend::new(frames)), images)
}

fn be(m: &mut Manager<MockBackend>) -> &mut MockBackend {
    m.backend.as_mut().unwrap()
}

fn run_all(m: &mut Manager<MockBackend>, con: &mut Lines) -> usize {
    let mut slices = 0;
    while m.run_slice(con) {
        slices += 1;
        assert!(slices < 10_000, "the scheduler does not terminate");
    }
    slices
}

#[test]
fn a_guest_prints_and_exits_and_its_memory_comes_back() {
    let mut m = manager(4096);
    let baseline = be(&mut m).mem.frames_in_use();
    let mut script = out_str("hi\n");
    script.push(exit_with(0));
    be(&mut m).scripts.push_back(script);
    let id = m.run_vm("tiny", 4, "").unwrap();
    assert_eq!(id, 1);
    let vm = m.get(1).unwrap();
    assert!(vm.overhead_bytes > 4096 && vm.overhead_bytes < 64 * 1024, "{}", vm.overhead_bytes);
    let mut con = Lines::default();
    run_all(&mut m, &mut con);
    let t = con.text();
    assert!(t.contains("[vm 1] hi"), "{t}");
    assert!(t.contains("vm 1 (tiny) exited with status 1"), "{t}");
    let vm = m.get(1).unwrap();
    assert_eq!(vm.state, RunState::Exited { status: 1 });
    assert!(vm.res.is_none(), "resources released");
    assert_eq!(vm.stats.exits[ExitKind::Io as usize], 4);
    assert_eq!(be(&mut m).destroyed, 1);
    assert_eq!(be(&mut m).mem.frames_in_use(), baseline, "every frame returned");
}

#[test]
fn the_image_and_boot_state_land_in_guest_ram() {
    let mut m = manager(4096);
    m.run_vm("tiny", 4, "a b").unwrap();
    let vm = m.get(1).unwrap();
    let res = vm.res.as_ref().unwrap();
    let s = res.vcpu_ref().state();
    assert_eq!(s.rip, 0x10_0000);
    assert_eq!((s.gprs.rdi, s.gprs.rsi), (4 << 20, 1));
    let mut code = [0u8; 32];
    let mem = &m.backend.as_ref().unwrap().mem;
    res.mem.peek(mem, mm::GuestPhysAddr(0x10_0000), &mut code).unwrap();
    assert_eq!(code, [0x90; 32]);
    let mut cmd = [0u8; 4];
    res.mem.peek(mem, mm::GuestPhysAddr(s.gprs.rdx), &mut cmd).unwrap();
    assert_eq!(&cmd, b"a b\0");
    // The BIOS ROM (0xe0000-0xfffff) splits the first 2 MiB into 4 KiB
    // pages; the second is one 2 MiB page.
    assert_eq!(vm.nested_pages, [512, 1, 0]);
    let rights = |gpa| res.mem.table().translate(mem, mm::GuestPhysAddr(gpa)).unwrap().leaf.access;
    assert!(!rights(firmware::acpi::AREA_BASE).contains(mm::paging::Access::WRITE), "the ROM is writable");
    assert!(rights(firmware::acpi::AREA_BASE - 4096).contains(mm::paging::Access::WRITE));
    assert!(rights(0x10_0000).contains(mm::paging::Access::WRITE));
    // Nothing outside RAM is mapped in the nested table.
    assert!(res.mem.table().translate(mem, mm::GuestPhysAddr(4 << 20)).is_none());
    assert!(res.mem.table().translate(mem, mm::GuestPhysAddr((4 << 20) - 1)).is_some());
}

#[test]
fn ram_that_is_not_a_multiple_of_2_mib_ends_in_4k_pages() {
    let mut m = manager(4096);
    m.run_vm("tiny", 3, "").unwrap();
    // The first 2 MiB in 4 KiB pages too: it holds the BIOS ROM.
    assert_eq!(m.get(1).unwrap().nested_pages, [768, 0, 0]);
}

#[test]
fn refusals_name_the_problem_and_leak_nothing() {
    let mut m = manager(600);
    let baseline = be(&mut m).mem.frames_in_use();
    let e = m.run_vm("nope", 4, "").unwrap_err().to_string();
    assert!(e.contains("no guest named \"nope\"") && e.contains("tiny, other"), "{e}");
    assert!(m.run_vm("tiny", 1, "").unwrap_err().to_string().contains("mem must be"));
    let e = m.run_vm("tiny", 64, "").unwrap_err().to_string();
    assert!(e.contains("cannot allocate 64 MiB"), "{e}");
    let e = m.run_vm("tiny", 2, &"x".repeat(5000)).unwrap_err().to_string();
    assert!(e.contains("command line"), "{e}");
    assert_eq!(be(&mut m).mem.frames_in_use(), baseline, "failed starts free what they took");
    assert!(m.vms.is_empty());
    let mut none: Manager<MockBackend> = Manager::new(Err(Unavailable::NoVirtualization), vec![]);
    assert_eq!(
        none.run_vm("tiny", 4, "").unwrap_err().to_string(),
        "virtualization is unavailable: this CPU has neither VT-x nor AMD-V"
    );
    assert!(!none.run_slice(&mut Lines::default()));
}

#[test]
fn cpuid_hypercall_and_msr_exits_complete_or_fault() {
    let mut m = manager(4096);
    be(&mut m).scripts.push_back(vec![
        step(|g| g.rax = 0x4000_0000, VmExit::Cpuid),
        step(
            |g| {
                g.rax = crate::hypercall::VM_ID;
            },
            VmExit::Hypercall,
        ),
        step(
            |g| {
                (g.rax, g.rdi, g.rsi) = (crate::hypercall::SHARED_IN_RANGE, 0x1000, 1 << 40);
            },
            VmExit::Hypercall,
        ),
        step(|g| g.rcx = 0x1234, VmExit::Rdmsr { msr: 0x1234 }),
        step(|_| {}, VmExit::Rdmsr { msr: crate::msr::IA32_FEATURE_CONTROL }),
        step(|_| {}, VmExit::Wrmsr { msr: 0x3a, value: 5 }),
        exit_with(3),
    ]);
    m.run_vm("tiny", 4, "").unwrap();
    // Run the slice by hand to look at the vCPU before it is released.
    let mut con = Lines::default();
    let vm = &mut m.vms[0];
    let backend = m.backend.as_mut().unwrap();
    let host = &mut m.host_mem;
    let res = vm.res.as_mut().unwrap();
    res.vcpu().load();
    let mut step_once = |vm: &mut Vm<MockBackend>| {
        let exit = vm.res.as_mut().unwrap().vcpus[0].vcpu.run();
        assert_eq!(vm.handle_exit(exit, backend, host, &mut con), Flow::Continue);
        let v = &vm.res.as_ref().unwrap().vcpus[0].vcpu;
        (v.gprs, v.injected.clone(), v.skipped)
    };
    // CPUID 0x40000000: the vendor signature in EBX:ECX:EDX.
    let (g, _, skipped) = step_once(vm);
    let sig = [(g.rbx as u32).to_le_bytes(), (g.rcx as u32).to_le_bytes(), (g.rdx as u32).to_le_bytes()].concat();
    assert_eq!(&sig[..], crate::cpuid::SIGNATURE);
    assert_eq!(skipped, 1);
    let (g, _, _) = step_once(vm);
    assert_eq!(g.rax, 1, "VM_ID");
    // A range hypercall hands back the rest of its range in RDI/RSI: here
    // none, as the 4 MiB of RAM fit one call and the rest is not RAM.
    let (g, _, skipped) = step_once(vm);
    assert_eq!((g.rax, g.rdi, g.rsi, skipped), (0, (1 << 40) + 0x1000, 0, 3), "SHARED_IN_RANGE");
    let (_, injected, skipped) = step_once(vm);
    assert_eq!((injected, skipped), (vec![Event::GP0], 3), "an unknown MSR read faults, RIP stays");
    let (g, _, skipped) = step_once(vm);
    assert_eq!((g.rax, g.rdx, skipped), (1, 0, 4), "IA32_FEATURE_CONTROL reads locked, VMX off");
    let (_, injected, skipped) = step_once(vm);
    assert_eq!((injected.len(), skipped), (2, 4), "enabling VMX by WRMSR faults");
}

#[test]
fn hypercalls_from_user_mode_raise_ud() {
    let mut m = manager(4096);
    be(&mut m).scripts.push_back(vec![step(|g| g.rax = 0, VmExit::Hypercall)]);
    m.run_vm("tiny", 4, "").unwrap();
    let vm = &mut m.vms[0];
    let backend = m.backend.as_mut().unwrap();
    let v = &mut vm.res.as_mut().unwrap().vcpu();
    v.cpl = 3;
    v.load();
    let exit = v.run();
    vm.handle_exit(exit, backend, &mut m.host_mem, &mut Lines::default());
    let v = &vm.res.as_ref().unwrap().vcpus[0].vcpu;
    assert_eq!(v.injected, vec![Event::UD]);
    assert_eq!(v.gprs.rax, 0, "no result delivered");
    assert_eq!(v.skipped, 0);
}

/// A #UD on the other vendor's hypercall instruction (a guest saved under
/// AMD-V runs VMMCALL here, or one saved under VT-x VMCALL) is the
/// hypercall; any other #UD goes back to the guest.
#[test]
fn the_other_vendors_hypercall_instruction_is_the_hypercall() {
    let mut m = manager(4096);
    be(&mut m).scripts.push_back(vec![
        step(|g| g.rax = crate::hypercall::PING, VmExit::InvalidOpcode),
        step(|g| g.rax = crate::hypercall::PING, VmExit::InvalidOpcode),
        step(|g| g.rax = crate::hypercall::PING, VmExit::InvalidOpcode),
    ]);
    m.run_vm("tiny", 4, "").unwrap();
    let code = |m: &mut Manager<MockBackend>, bytes: &[u8]| {
        let Manager { backend, vms, host_mem, .. } = m;
        let backend = backend.as_mut().unwrap();
        let res = vms[0].res.as_mut().unwrap();
        let rip = res.vcpu_ref().rip();
        host_mem
            .with_hooks(1, |h| res.mem.write(&mut backend.mem, h, mm::GuestPhysAddr(rip), bytes, &mut |_| {}))
            .unwrap();
    };
    let step_once = |m: &mut Manager<MockBackend>| {
        let vm = &mut m.vms[0];
        let backend = m.backend.as_mut().unwrap();
        let v = &mut vm.res.as_mut().unwrap().vcpu();
        v.load();
        let exit = v.run();
        vm.handle_exit(exit, backend, &mut m.host_mem, &mut Lines::default());
        let v = &mut vm.res.as_mut().unwrap().vcpu();
        (v.rip(), v.gprs.rax, core::mem::take(&mut v.injected))
    };
    for bytes in [[0x0f, 0x01, 0xd9], [0x0f, 0x01, 0xc1]] {
        code(&mut m, &bytes);
        let rip = m.vms[0].res.as_ref().unwrap().vcpu_ref().rip();
        let (after, rax, injected) = step_once(&mut m);
        assert_eq!((after, rax, injected), (rip + 3, crate::hypercall::PING_REPLY, vec![]), "{bytes:02x?}");
    }
    // UD2 is no hypercall: the guest gets its #UD, RIP stays.
    code(&mut m, &[0x0f, 0x0b, 0x90]);
    let rip = m.vms[0].res.as_ref().unwrap().vcpu_ref().rip();
    let (after, _, injected) = step_once(&mut m);
    assert_eq!((after, injected), (rip, vec![Event::UD]));
}

#[test]
fn port_io_reads_merge() {
    let mut m = manager(4096);
    be(&mut m).scripts.push_back(vec![
        step(|g| g.rax = 0xdead_beef_1234_5678, io(0x2e8, 1, false)),
        step(|g| g.rax = 0xdead_beef_1234_5678, io(0x2e8, 4, false)),
        step(|g| g.rax = 0x77, io(0x3ff, 1, true)),
        step(|g| g.rax = 0, io(0x3ff, 1, false)),
    ]);
    m.run_vm("tiny", 4, "").unwrap();
    let vm = &mut m.vms[0];
    let backend = m.backend.as_mut().unwrap();
    vm.res.as_mut().unwrap().vcpus[0].vcpu.load();
    let mut rax = Vec::new();
    for _ in 0..4 {
        let exit = vm.res.as_mut().unwrap().vcpus[0].vcpu.run();
        assert_eq!(vm.handle_exit(exit, backend, &mut m.host_mem, &mut Lines::default()), Flow::Continue);
        rax.push(vm.res.as_ref().unwrap().vcpu_ref().gprs.rax);
    }
    assert_eq!(rax[0], 0xdead_beef_1234_56ff, "8-bit IN merges into AL");
    assert_eq!(rax[1], 0xffff_ffff, "32-bit IN zero-extends");
    assert_eq!(rax[3], 0x77, "the UART scratch register holds the value");
    assert_eq!(vm.stats.unbacked_io, 2);
}

#[test]
fn string_port_io_is_carried_out_over_guest_memory() {
    let mut m = manager(4096);
    let outs = |rep| VmExit::Io(IoAccess { port: 0x3f8, size: 1, write: true, string: true, rep });
    be(&mut m).scripts.push_back(vec![
        step(
            |g| {
                g.rsi = 0x20_0000;
                g.rdx = 0x3f8;
                g.rcx = 3;
            },
            outs(true),
        ),
        // RIP is now past the REP OUTSB, on a NOP: not what the exit says.
        Box::new(move |_| outs(false)),
    ]);
    m.run_vm("tiny", 4, "").unwrap();
    {
        let Manager { backend, vms, host_mem, .. } = &mut m;
        let backend = backend.as_mut().unwrap();
        let res = vms[0].res.as_mut().unwrap();
        for (gpa, data) in [(0x10_0000u64, &[0xf3u8, 0x6e][..]), (0x20_0000, b"hi\n")] {
            host_mem
                .with_hooks(1, |h| res.mem.write(&mut backend.mem, h, mm::GuestPhysAddr(gpa), data, &mut |_| {}))
                .unwrap();
        }
    }
    let mut con = Lines::default();
    run_all(&mut m, &mut con);
    let t = con.text();
    assert!(t.contains("[vm 1] hi"), "{t}");
    let v = &m.vms[0];
    let g = v.res.as_ref().map(|r| r.vcpus[0].vcpu.gprs);
    assert!(g.is_none() || g.is_some_and(|g| g.rsi == 0x20_0003 && g.rcx == 0), "{g:?}");
    assert!(
        t.contains("stopped: OUTS of port 0x3f8 (1 bytes) could not be carried out: Instruction is not the INS/OUTS the port exit reported at rip 0x100002"),
        "{t}"
    );
}

#[test]
fn nested_page_faults_and_triple_faults_stop_only_that_vm() {
    let mut m = manager(8192);
    be(&mut m).scripts.push_back(vec![Box::new(|_| VmExit::NestedPageFault {
        gpa: 0x4000_0000,
        access: MemAccess::Write,
        gva: Some(0x4000_0000),
    })]);
    be(&mut m)
        .scripts
        .push_back(vec![Box::new(|_| VmExit::Shutdown { report: "triple fault at rip 0x100000".into() })]);
    let mut ok = out_str("fine\n");
    ok.push(exit_with(0));
    be(&mut m).scripts.push_back(ok);
    for _ in 0..3 {
        m.run_vm("tiny", 4, "").unwrap();
    }
    let mut con = Lines::default();
    run_all(&mut m, &mut con);
    let t = con.text();
    assert!(
        t.contains("vm 1 (tiny) stopped: write of guest-physical 0x40000000 outside its memory at rip 0x100000"),
        "{t}"
    );
    assert!(t.contains("code at rip: 90 90 90"), "the report shows the instruction bytes: {t}");
    assert!(t.contains("vm 2 (tiny) stopped: triple fault at rip 0x100000"), "{t}");
    assert!(t.contains("vm 3 (tiny) exited with status 1"), "{t}");
    assert_eq!(be(&mut m).destroyed, 3);
}

#[test]
fn hlt_waits_with_interrupts_on_and_halts_for_good_with_them_off() {
    let mut m = manager(8192);
    be(&mut m).scripts.push_back(vec![
        Box::new(|v| {
            v.rflags = RFLAGS_IF | 2;
            VmExit::Hlt
        }),
        exit_with(0),
    ]);
    be(&mut m).scripts.push_back(vec![Box::new(|v| {
        v.rflags = 2;
        VmExit::Hlt
    })]);
    m.run_vm("tiny", 4, "").unwrap();
    m.run_vm("tiny", 4, "").unwrap();
    let mut con = Lines::default();
    assert!(m.run_slice(&mut con));
    assert_eq!(m.get(1).unwrap().state, RunState::Waiting);
    run_all(&mut m, &mut con);
    assert_eq!(m.get(1).unwrap().state, RunState::Exited { status: 1 }, "the waiting VM resumed");
    assert!(matches!(m.get(2).unwrap().state, RunState::Halted { .. }));
    assert!(m.get(2).unwrap().res.is_some(), "a halted VM keeps its memory until stopped");
    assert!(con.text().contains("vm 2 (tiny) halted with interrupts disabled"), "{}", con.text());
    m.stop(2, &mut con).unwrap();
    assert!(m.get(2).unwrap().res.is_none());
}

#[test]
fn vms_take_turns_and_busy_exiters_yield_after_a_wall_clock_slice() {
    let mut m = manager(8192);
    m.slice_ticks = 1000;
    // VM 1 exits forever on CPUID; VM 2 prints then ends.
    let forever: Vec<Step> = (0..10_000).map(|_| step(|g| g.rax = 0, VmExit::Cpuid)).collect();
    be(&mut m).scripts.push_back(forever);
    let mut second = out_str("two\n");
    second.push(exit_with(0));
    be(&mut m).scripts.push_back(second);
    m.run_vm("tiny", 4, "").unwrap();
    m.run_vm("other", 4, "").unwrap();
    let mut con = Lines::default();
    m.run_slice(&mut con);
    let first_slice = m.get(1).unwrap().stats.exits[ExitKind::Cpuid as usize];
    assert!(first_slice > 10 && first_slice < 200, "vm 1 ran {first_slice} exits in one slice");
    assert_eq!(m.get(1).unwrap().stats.slices_expired, 1, "the wall-clock check ended the slice");
    m.run_slice(&mut con);
    assert_eq!(m.get(2).unwrap().state, RunState::Exited { status: 1 }, "vm 2 got its turn");
    assert_eq!(m.get(2).unwrap().stats.slices_expired, 0, "vm 2 ended before its slice did");
    assert_eq!(m.get(1).unwrap().state, RunState::Running);
}

#[test]
fn a_timer_exit_ends_the_slice_and_counts_it() {
    let mut m = manager(8192);
    // Out of script, the mock vCPU reports `Preempted` like a spinning guest.
    be(&mut m).scripts.push_back(Vec::new());
    m.run_vm("tiny", 4, "").unwrap();
    let mut con = Lines::default();
    m.run_slice(&mut con);
    m.run_slice(&mut con);
    let vm = m.get(1).unwrap();
    assert_eq!(vm.stats.slices_expired, 2);
    assert_eq!(vm.stats.exits[ExitKind::Preempted as usize], 2);
}

#[test]
fn stop_frees_and_refuses_twice() {
    let mut m = manager(8192);
    let baseline = be(&mut m).mem.frames_in_use();
    m.run_vm("tiny", 8, "").unwrap();
    let mut con = Lines::default();
    m.stop(1, &mut con).unwrap();
    assert!(con.text().contains("vm 1 (tiny) stopped: by the operator"));
    assert_eq!(be(&mut m).mem.frames_in_use(), baseline);
    assert_eq!(m.stop(1, &mut con).unwrap_err().to_string(), "vm 1 has already stopped");
    assert_eq!(m.stop(7, &mut con).unwrap_err().to_string(), "no VM 7");
    assert!(!m.run_slice(&mut con), "nothing left to run");
}

#[test]
fn old_ended_records_are_forgotten() {
    let mut m = manager(8192);
    let mut con = Lines::default();
    for _ in 0..MAX_ENDED_RECORDS + 5 {
        m.run_vm("tiny", 2, "").unwrap();
        let id = m.vms.last().unwrap().id;
        m.stop(id, &mut con).unwrap();
    }
    m.run_vm("tiny", 2, "").unwrap();
    assert_eq!(m.vms.len(), MAX_ENDED_RECORDS + 1);
    assert_eq!(m.vms.last().unwrap().id, MAX_ENDED_RECORDS as u32 + 6, "ids are never reused");
}

#[test]
fn console_commands_end_to_end() {
    use crate::console::{HostStatus, execute, parse};
    let mut m = manager(8192);
    let host = HostStatus { cpu_vendor: "GenuineIntel".into(), apic_ids: vec![0], ..Default::default() };
    let mut con = Lines::default();
    let run = |line: &str, m: &mut Manager<MockBackend>, con: &mut Lines| {
        con.0.clear();
        match parse(line) {
            Ok(Some(p)) => {
                execute(&p, m, &host, con);
            }
            Ok(None) => {}
            Err(e) => crate::console::commands::report_parse_error(&e, con),
        }
        con.text()
    };
    let out = run("vm run tiny mem=4 --json", &mut m, &mut con);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["ok"], true);
    assert_eq!(j["id"], 1);
    let out = run("vm list --json", &mut m, &mut con);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["vms"][0]["state"], "running");
    let out = run("vm stats 1", &mut m, &mut con);
    assert!(out.contains("host memory overhead"), "{out}");
    let out = run("host --json", &mut m, &mut con);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["virtualization"]["backend"], "mock");
    assert_eq!(j["cpus"], 1);
    let out = run("vm stop 9 --json", &mut m, &mut con);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((j["ok"].clone(), j["error"].clone()), (false.into(), "no VM 9".into()));
    let out = run("vm stop 1", &mut m, &mut con);
    assert!(out.ends_with("vm 1 stopped"), "{out}");
    let out = run("poweroff --json", &mut m, &mut con);
    assert!(out.lines().last().unwrap().starts_with("{\"command\":\"poweroff\",\"ok\":true"), "{out}");
}

#[test]
fn a_vm_whose_tables_do_not_fit_the_heap_is_refused_before_taking_anything() {
    let mut m = manager(8192);
    let frames = be(&mut m).mem.frames_in_use();
    // 16 MiB of RAM needs 4096 state bytes and words: 36 KiB and a bit.
    be(&mut m).heap_free = HEAP_RESERVE + 30 * 1024;
    let err = m.run_vm("tiny", 16, "").unwrap_err().to_string();
    assert_eq!(
        err,
        "not enough host heap for 16 MiB of guest RAM: its per-page tables need 36 KiB, 2078 KiB are free and \
         2048 KiB stay reserved for the host"
    );
    assert!(m.vms.is_empty());
    assert_eq!(be(&mut m).mem.frames_in_use(), frames, "a refused VM took frames");
    // With room for them it starts.
    be(&mut m).heap_free = HEAP_RESERVE + 40 * 1024;
    assert!(m.run_vm("tiny", 16, "").is_ok());
}

#[test]
fn typed_input_reaches_com1_and_a_full_buffer_refuses_without_queuing() {
    let mut m = manager(4096);
    m.run_vm("tiny", 4, "").unwrap();
    assert_eq!(m.send_input(1, b"ls\r"), Ok(3));
    let uart = m.vms[0].devices.com1();
    assert_eq!((uart.read(0), uart.read(0), uart.read(0)), (b'l', b's', b'\r'));
    assert_eq!(m.send_input(9, b"x"), Err(Error::NoVm(9)));
    let big = vec![b'y'; crate::devices::uart::RX_BUFFER];
    assert_eq!(m.send_input(1, &big), Ok(big.len()));
    let err = m.send_input(1, b"z").unwrap_err().to_string();
    assert!(err.contains("serial input is full"), "{err}");
    assert_eq!(m.vms[0].devices.com1().rx_room(), 0, "nothing of the refused input was queued");
}

#[test]
fn a_paused_vm_is_not_run_until_resumed() {
    let mut m = manager(4096);
    let mut script = out_str("abc");
    script.push(exit_with(0));
    be(&mut m).scripts.push_back(script);
    m.run_vm("tiny", 4, "").unwrap();
    m.set_paused(1, true).unwrap();
    assert_eq!(m.set_paused(1, true).unwrap_err().to_string(), "vm 1 is already paused");
    let mut con = Lines::default();
    assert!(!m.run_slice(&mut con), "nothing to run while paused");
    assert_eq!(m.vms[0].stats.total_exits(), 0);
    m.set_paused(1, false).unwrap();
    assert_eq!(m.set_paused(1, false).unwrap_err().to_string(), "vm 1 is not paused");
    run_all(&mut m, &mut con);
    assert_eq!(m.vms[0].state, RunState::Exited { status: 1 }, "it ran to the end, nothing lost");
    assert_eq!(m.set_paused(1, true).unwrap_err().to_string(), "vm 1 has exited");
    assert_eq!(m.set_paused(7, true).unwrap_err().to_string(), "no VM 7");
}

#[test]
fn a_guest_reset_starts_the_vm_again_under_the_same_id() {
    let mut m = manager(8192);
    let baseline = be(&mut m).mem.frames_in_use();
    // Reset through the reset control register (0xcf9, value 6), then the
    // restarted guest exits.
    be(&mut m).scripts.push_back(vec![step(|g| g.rax = 0x06, io(0xcf9, 1, true))]);
    be(&mut m).scripts.push_back(vec![exit_with(0)]);
    m.run_vm("tiny", 4, "").unwrap();
    let mut con = Lines::default();
    run_all(&mut m, &mut con);
    assert_eq!(be(&mut m).created, 2, "a second vCPU for the restarted VM");
    assert_eq!(be(&mut m).destroyed, 2);
    assert_eq!(m.vms.len(), 1);
    let vm = &m.vms[0];
    assert_eq!((vm.id, vm.reboots, &vm.state), (1, 1, &RunState::Exited { status: 1 }));
    assert!(con.0.iter().any(|l| l == "vm 1 (tiny) restarted (reset 1)"), "{:?}", con.0);
    assert_eq!(be(&mut m).mem.frames_in_use(), baseline, "the first run's memory came back");
}

#[test]
fn a_guest_timer_programmed_mid_slice_shortens_the_slice() {
    let mut m = manager(8192);
    // PIT counter 0, mode 2, count 1193 (1 ms; the mock clock runs at
    // 1 MHz, so 1000 ticks), then exits that are not timer-related.
    let mut script = vec![
        step(|g| g.rax = 0x34, io(0x43, 1, true)),
        step(|g| g.rax = 0xa9, io(0x40, 1, true)),
        step(|g| g.rax = 0x04, io(0x40, 1, true)),
    ];
    script.extend((0..3).map(|_| step(|g| g.rax = 0, VmExit::Cpuid)));
    be(&mut m).scripts.push_back(script);
    m.run_vm("tiny", 4, "").unwrap();
    let mut con = Lines::default();
    m.run_slice(&mut con);
    let vm = m.get(1).unwrap();
    let slice = vm.res.as_ref().unwrap().vcpus[0].vcpu.slice;
    assert!(m.slice_ticks >= 10_000, "{}", m.slice_ticks);
    assert!(
        (900..1100).contains(&slice),
        "the slice was armed for {slice} ticks, not to the timer about 1000 ticks on"
    );
}

#[test]
fn vm_run_fills_in_what_a_linux_guest_needs() {
    let kernel = Box::leak(crate::loader::testutil::bzimage(&Default::default()).into_boxed_slice());
    let images = vec![
        GuestImage { name: "tiny".into(), bytes: elf_guest(&[0x90; 32]) },
        GuestImage { name: "linux".into(), bytes: kernel },
        GuestImage { name: "linux-initrd".into(), bytes: &[7; 4096] },
        GuestImage { name: "bare".into(), bytes: kernel },
    ];
    let mut m = Manager::new(Ok(MockBackend::new(16384)), images);
    let d = |m: &Manager<MockBackend>, name, mem, mods: &[&str], cmd| {
        let mods: Vec<String> = mods.iter().map(|s| s.to_string()).collect();
        m.run_defaults(name, mem, &mods, cmd).unwrap()
    };
    let linux = (LINUX_MEM_MIB, vec![String::from("linux-initrd")], String::from("console=ttyS0"));
    assert_eq!(d(&m, "linux", None, &[], None), linux);
    assert_eq!(
        d(&m, "linux", Some(64), &["x"], Some("quiet")),
        (64, vec![String::from("x")], String::from("quiet")),
        "what the operator gave is kept"
    );
    assert_eq!(d(&m, "linux", None, &[], Some("")).2, "", "an empty `--` is an empty command line");
    assert_eq!(d(&m, "bare", None, &[], None).1, Vec::<String>::new(), "no <name>-initrd file, no initramfs");
    assert_eq!(d(&m, "tiny", None, &[], None), (DEFAULT_MEM_MIB, Vec::new(), String::new()));
    assert_eq!(
        m.run_defaults("nope", None, &[], None).unwrap_err().to_string(),
        "no guest named \"nope\" (available: tiny, linux, linux-initrd, bare)"
    );
    // The kernel is told the TSC's rate (the mock clock's 1 MHz), once,
    // and not when the operator set it.
    let id = m.run_vm_with("linux", 8, &[String::from("linux-initrd")], "console=ttyS0").unwrap();
    assert_eq!(m.get(id).unwrap().cmdline, "console=ttyS0 tsc_early_khz=1000 tsc=reliable");
    let id = m.run_vm_with("linux", 8, &[], "tsc_early_khz=5").unwrap();
    assert_eq!(m.get(id).unwrap().cmdline, "tsc_early_khz=5 tsc=reliable");
    let id = m.run_vm_with("linux", 8, &[], "notsc_early_khz=1").unwrap();
    assert_eq!(m.get(id).unwrap().cmdline, "notsc_early_khz=1 tsc_early_khz=1000 tsc=reliable", "whole words only");
    let id = m.run_vm_with("linux", 8, &[], "tsc=unstable").unwrap();
    assert_eq!(m.get(id).unwrap().cmdline, "tsc=unstable tsc_early_khz=1000");
    let id = m.run_vm("tiny", 4, "x").unwrap();
    assert_eq!(m.get(id).unwrap().cmdline, "x", "only Linux kernels get the hint");
}

#[test]
fn a_created_vm_waits_for_start() {
    let mut m = manager(8192);
    be(&mut m).scripts.push_back(out_str("hi\n").into_iter().chain([exit_with(0)]).collect());
    let id = m.create_vm_stopped("web", "tiny", 4, &[], "", None, None, 1).unwrap();
    let mut con = Lines::default();
    assert!(!m.run_slice(&mut con), "nothing runs before vm start");
    assert_eq!(m.get(id).unwrap().guest, "web");
    assert_eq!(m.get(id).unwrap().image, "tiny");
    assert_eq!(m.set_paused(id, true).unwrap_err().to_string(), "vm 1 has not started (vm start 1)");
    assert_eq!(m.start(&[id, 9]).unwrap_err().to_string(), "no VM 9");
    assert_eq!(m.start(&[id, id]).unwrap_err().to_string(), "vm 1 has already started");
    assert!(m.get(id).unwrap().created, "a refused line starts none of its VMs");
    m.start(&[id]).unwrap();
    assert_eq!(m.start(&[id]).unwrap_err().to_string(), "vm 1 has already started");
    run_all(&mut m, &mut con);
    assert_eq!(m.get(id).unwrap().state, RunState::Exited { status: 1 });
    assert!(con.text().contains("[vm 1] hi"), "{}", con.text());
    assert!(con.text().contains("vm 1 (web) exited"), "{}", con.text());
}

#[test]
fn refusals_are_typed_and_say_why_in_one_line() {
    let mut m = manager(8192);
    let mut con = Lines::default();
    assert_eq!(m.stop(7, &mut con), Err(Error::NoVm(7)));
    assert_eq!(m.run_vm("tiny", 0, ""), Err(Error::MemSize));
    assert!(matches!(m.run_vm("nope", 4, ""), Err(Error::NoGuest { name, .. }) if name == "nope"));
    let id = m.run_vm("tiny", 4, "").unwrap();
    assert_eq!(m.set_paused(id, false), Err(Error::NotPaused(id)));
    m.stop(id, &mut con).unwrap();
    let e = m.stop(id, &mut con).unwrap_err();
    assert_eq!(e, Error::AlreadyEnded { id, state: "stopped" });
    let line = String::from(e);
    assert_eq!(line, "vm 1 has already stopped");
    assert!(!line.contains('\n'));
}

#[test]
fn a_vm_is_placed_on_the_numa_node_with_most_room_and_its_pages_come_from_there() {
    use crate::numa::{CpuAffinity, MemoryAffinity, Topology};
    let mut m = manager(8192);
    // Two nodes; the simulated frames all sit in node 0's range, so the
    // page count by node says "node 0" whatever the preference was.
    m.numa = Topology::from_srat(
        &[CpuAffinity { apic_id: 0, node: 0, enabled: true }, CpuAffinity { apic_id: 1, node: 1, enabled: true }],
        &[
            MemoryAffinity { base: 0, length: 1 << 40, node: 0, enabled: true, non_volatile: false },
            MemoryAffinity { base: 1 << 40, length: 1 << 40, node: 1, enabled: true, non_volatile: false },
        ],
    );
    be(&mut m).node_free = vec![(0, 8 << 20), (1, 12 << 20)];
    let mut script = out_str("x");
    script.push(exit_with(0));
    be(&mut m).scripts.push_back(script);
    let id = m.run_vm("tiny", 4, "").unwrap();
    assert_eq!(m.get(id).unwrap().node, Some(1), "node 1 has the most room");
    // RAM was allocated with node 1 preferred, then the preference dropped.
    assert_eq!(be(&mut m).preferred.borrow()[..2], [Some(1), None]);
    let by_node = m.pages_by_node(id);
    assert_eq!(by_node.iter().map(|(_, p)| p).sum::<u64>(), 4 << 8, "{by_node:?}");
    let mut con = Lines::default();
    run_all(&mut m, &mut con);
    // Every slice ran with the VM's node preferred, and dropped it after.
    let prefs = be(&mut m).preferred.borrow().clone();
    assert!(prefs.len() >= 4, "{prefs:?}");
    for pair in prefs[2..].chunks(2) {
        assert_eq!(pair, [Some(1), None], "{prefs:?}");
    }
    // A VM no node holds is spread; so is every VM on a one-node host.
    be(&mut m).scripts.push_back(vec![exit_with(0)]);
    let big = m.run_vm("tiny", 16, "").unwrap();
    assert_eq!(m.get(big).unwrap().node, None);
    m.numa = Topology::default();
    be(&mut m).scripts.push_back(vec![exit_with(0)]);
    let one = m.run_vm("tiny", 4, "").unwrap();
    assert_eq!(m.get(one).unwrap().node, None);
}

#[test]
fn a_throttled_vm_runs_only_its_share_of_the_time_in_short_slices() {
    // Two guests spinning without exits: each slice runs to its end.
    let mut m = manager(4096);
    m.run_vm("tiny", 4, "").unwrap();
    m.run_vm("tiny", 4, "").unwrap();
    // Each clock read is 1 ms of the mock's 1 MHz TSC. A slice of the mock
    // is a couple of reads, a round about ten, so at 99 % the throttled
    // VM's time out (99 times what it ran) spans many of the other's
    // slices.
    be(&mut m).tick = 1000;
    m.vms[1].throttle.set(99);
    let mut con = Lines::default();
    let hz = be(&mut m).tsc_hz();
    let start = be(&mut m).clock.get();
    for _ in 0..2000 {
        m.run_slice(&mut con);
    }
    let wall = be(&mut m).clock.get() - start;
    // The throttled VM ran 1 % of the time or less; the other ran whenever
    // it could: many more slices.
    let per_mille = |i: usize| m.vms[i].stats.run_ticks * 1000 / wall;
    let slices_of = |i: usize| m.vms[i].res.as_ref().unwrap().vcpus[0].stats.slices;
    assert!((1..=10).contains(&per_mille(1)), "ran {} per mille of the time", per_mille(1));
    assert!(slices_of(0) > 10 * slices_of(1), "{} vs {} slices", slices_of(0), slices_of(1));
    // Its slices are 2 ms at most; the other's are the usual.
    let slice = |i: usize| m.vms[i].res.as_ref().unwrap().vcpus[0].vcpu.slice;
    assert_eq!(slice(1), hz * crate::vm::throttle::SLICE_US / 1_000_000);
    assert!(slice(0) > slice(1), "{} vs {}", slice(0), slice(1));
    // Lifted: both get the CPU alike again.
    m.vms[1].throttle.set(0);
    let (a, b) = (m.vms[0].stats.run_ticks, m.vms[1].stats.run_ticks);
    for _ in 0..400 {
        m.run_slice(&mut con);
    }
    let (a, b) = (m.vms[0].stats.run_ticks - a, m.vms[1].stats.run_ticks - b);
    let sl = |i: usize| m.vms[i].res.as_ref().unwrap().vcpus[0].stats.slices;
    assert!(a.abs_diff(b) * 10 <= a.max(b), "{a} vs {b}; slices {} {}", sl(0), sl(1));
}
