//! Checkpoints on the host: a VM saved to a stream and restored into a new
//! VM holds the same memory, vCPU and device state; its clock goes on from
//! the save; damaged or foreign checkpoints are refused without leaking
//! anything.

use alloc::vec;
use alloc::vec::Vec;
use mm::vm_memory::PageState;
use vcpu::GuestState;

use super::*;
use crate::devices::virtio_slots::HostEntropy;
use crate::testing::{MockBackend, elf_guest};
use checkpoint::{MachineState, Refused};

fn manager(frames: usize) -> Manager<MockBackend> {
    let images = vec![GuestImage { name: "tiny".into(), bytes: elf_guest(&[0x90; 32]) }];
    let mut m = Manager::new(Ok(MockBackend::new(frames)), images);
    m.entropy = Some(HostEntropy(|b| {
        b.fill(0x5a);
        true
    }));
    m
}

fn pattern(seed: u64) -> Vec<u8> {
    (0..4096u64).map(|i| (i.wrapping_mul(131) ^ seed) as u8).collect()
}

fn write(m: &mut Manager<MockBackend>, id: u32, gpa: u64, data: &[u8]) {
    let Manager { backend, vms, host_mem, .. } = m;
    let backend = backend.as_mut().unwrap();
    let res = vms.iter_mut().find(|v| v.id == id).unwrap().res.as_mut().unwrap();
    host_mem.with_hooks(id, |h| res.mem.write(&mut backend.mem, h, GuestPhysAddr(gpa), data, &mut |_| {})).unwrap();
}

fn peek(m: &Manager<MockBackend>, id: u32, gpa: u64) -> Vec<u8> {
    let mut buf = vec![0; 4096];
    let vm = m.get(id).unwrap();
    vm.res.as_ref().unwrap().mem.peek(&m.backend.as_ref().unwrap().mem, GuestPhysAddr(gpa), &mut buf).unwrap();
    buf
}

/// A 4 MiB VM with some of everything: data pages, its COM1 scratch
/// register and IER set, an emulated MSR changed, the vCPU's registers.
fn busy_vm(m: &mut Manager<MockBackend>) -> u32 {
    let id = m.run_vm("tiny", 4, "a b").unwrap();
    for p in 0..40u64 {
        write(m, id, 0x20_0000 + p * 4096, &pattern(p));
    }
    write(m, id, 0x3f_f000, &pattern(99));
    let vm = m.vms.iter_mut().find(|v| v.id == id).unwrap();
    let now = || 0;
    vm.devices.pio_write(0x3ff, 1, 0xa7, now);
    vm.devices.pio_write(0x3f9, 1, 0x03, now);
    vm.msrs.misc_enable = 0x1801;
    let res = vm.res.as_mut().unwrap();
    let mut s = res.vcpu_ref().state();
    s.gprs.rbx = 0x1234_5678;
    s.cr2 = 0xdead_b000;
    res.vcpu().set_state(&s).unwrap();
    id
}

#[test]
fn a_restored_vm_has_the_saved_memory_vcpu_and_devices() {
    let mut m = manager(8192);
    let id = busy_vm(&mut m);
    let (stream, stats) = m.save_vm(id, Vec::new()).unwrap();
    // 1024 pages: the 41 written and the image as data (compressed: the
    // patterns repeat), the rest zero flags.
    let data = stats.pages(migrate::PageKind::Normal) + stats.pages(migrate::PageKind::Compressed);
    let zero = stats.pages(migrate::PageKind::Zero);
    assert!(data >= 41 && data + zero == 1024, "{stats:?}");
    assert!(stream.len() < 64 << 10, "{} bytes for 41 data pages", stream.len());
    let verified = migrate::verify(&stream).unwrap();
    assert_eq!(verified.header.source, migrate::Vendor::Unknown, "the mock backend is neither vendor");
    let restored = m.restore_vm(stream.as_slice()).unwrap();
    assert_eq!(restored, id + 1);
    for p in 0..40u64 {
        assert_eq!(peek(&m, restored, 0x20_0000 + p * 4096), pattern(p), "page {p}");
    }
    assert_eq!(peek(&m, restored, 0x3f_f000), pattern(99));
    // The image and the ACPI tables came back with the rest of RAM.
    assert_eq!(peek(&m, restored, 0x10_0000)[..32], [0x90; 32]);
    assert_eq!(peek(&m, restored, crate::firmware::acpi::AREA_BASE), peek(&m, id, crate::firmware::acpi::AREA_BASE));
    let (a, b) = (m.get(id).unwrap(), m.get(restored).unwrap());
    let (sa, sb) = (a.res.as_ref().unwrap().vcpu_ref().state(), b.res.as_ref().unwrap().vcpu_ref().state());
    assert_eq!(sb.gprs.rbx, 0x1234_5678);
    assert_eq!(sb.cr2, 0xdead_b000);
    assert_eq!(GuestState { tsc_offset: 0, ..sa.clone() }, GuestState { tsc_offset: 0, ..sb.clone() });
    // Every device as saved; the PIT's "latest time seen" is the VM
    // clock's reading when the restored VM's timers were first looked at.
    let without_pit =
        |d: &crate::devices::DeviceSet| d.save().into_iter().filter(|s| s.name != "pit").collect::<Vec<_>>();
    assert_eq!(without_pit(&a.devices), without_pit(&b.devices), "device state differs");
    assert_eq!(b.devices.save().len(), a.devices.save().len());
    assert!(b.devices.is_virtio(0xd000_0000), "the virtio-rng device came back");
    assert_eq!((b.guest.as_str(), b.cmdline.as_str(), b.mem_bytes), ("tiny", a.cmdline.as_str(), 4 << 20));
    assert_eq!(b.msrs.misc_enable, 0x1801);
    // The ROM is read-only in the restored VM too.
    let rom = b.res.as_ref().unwrap().mem.is_read_only(GuestPhysAddr(crate::firmware::acpi::AREA_BASE));
    assert!(rom);
    // Its TSC goes on from the saved value: behind the source's (which ran
    // on since the save) by the few ticks the restore took, no more.
    let be = m.backend.as_ref().unwrap();
    let guest_tsc = |st: &GuestState| be.clock.get().wrapping_add(st.tsc_offset);
    let lag = guest_tsc(&sa).wrapping_sub(guest_tsc(&sb));
    assert!(lag < 1000, "the restored TSC is {lag} ticks behind the source's");
}

#[test]
fn a_vm_restored_after_the_host_clock_moved_keeps_its_own_clock() {
    let mut m = manager(8192);
    let id = busy_vm(&mut m);
    let hz = m.backend.as_ref().unwrap().tsc_hz();
    let at_save = crate::vm::interrupts::vm_ns(m.backend.as_ref().unwrap().clock.get(), hz, 0);
    let (stream, _) = m.save_vm(id, Vec::new()).unwrap();
    // Another boot of the host: its clock starts again near 0.
    m.backend.as_mut().unwrap().clock.set(5);
    let restored = m.restore_vm(stream.as_slice()).unwrap();
    let vm = m.get(restored).unwrap();
    let clock = m.backend.as_ref().unwrap().clock.get();
    let now = crate::vm::interrupts::vm_ns(clock, hz, vm.clock_offset_ns);
    assert!(vm.clock_offset_ns > 0, "the VM clock must run ahead of the restarted host's");
    assert!(now >= at_save && now - at_save < 1_000_000, "VM clock {now} ns after a save at {at_save} ns");
    // And its TSC with it.
    let tsc = clock.wrapping_add(vm.res.as_ref().unwrap().vcpu_ref().state().tsc_offset);
    assert!(tsc >= at_save / 1000 && tsc < at_save / 1000 + 1000, "guest TSC {tsc}");
}

#[test]
fn damaged_or_foreign_checkpoints_are_refused_and_leave_nothing() {
    let mut m = manager(8192);
    let id = busy_vm(&mut m);
    let (stream, _) = m.save_vm(id, Vec::new()).unwrap();
    let state = m.get(id).unwrap().res.as_ref().unwrap().vcpu_ref().state();
    let frames = m.backend.as_ref().unwrap().mem.frames_in_use();
    let vms = m.vms.len();
    let mut check = |bytes: &[u8], want: &str| {
        let e = m.restore_vm(bytes).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} does not say {want:?}");
        assert!(!e.contains('\n'));
        assert_eq!(m.backend.as_ref().unwrap().mem.frames_in_use(), frames, "{want}: frames leaked");
        assert_eq!(m.vms.len(), vms);
    };
    let mut flipped = stream.clone();
    let at = stream.len() / 2;
    flipped[at] ^= 0x40;
    check(&flipped, "checksum");
    check(&stream[..stream.len() - 100], "");
    check(b"not a checkpoint at all", "");
    // A machine record of another layout version (here 1, before the disk
    // and switch names joined it) is named as such.
    let header = migrate::Reader::open(stream.as_slice()).unwrap().header().clone();
    let header =
        migrate::Header { devices: vec![migrate::DeviceInfo { name: "machine".into(), version: 1 }], ..header };
    let mut w = migrate::Writer::begin(Vec::new(), &header).unwrap();
    w.vcpu(0, &state).unwrap();
    w.device("machine", 1, &[0; 16]).unwrap();
    let (old, _) = w.finish().unwrap();
    check(&old, "machine record is version 1; this hypervisor reads version 4 (and 3, 2)");
    // A stream from a future format version, its prologue intact.
    let mut future = stream.clone();
    future[8..10].copy_from_slice(&(migrate::FORMAT_MAJOR + 1).to_le_bytes());
    let sum = mm::swap::format::crc32c(&future[..16]);
    future[16..20].copy_from_slice(&sum.to_le_bytes());
    check(&future, &alloc::format!("version {}.", migrate::FORMAT_MAJOR + 1));
    // A checkpoint that claims more memory than this host has (48 GiB, laid
    // out as a VM of that size is): refused before any page is applied.
    let (ranges, n) = crate::vm::boot::ram_ranges(48 << 30);
    let ram = ranges[..n].iter().map(|r| migrate::RamRange { base: r.start, size: r.end - r.start }).collect();
    let header = migrate::Reader::open(stream.as_slice()).unwrap().header().clone();
    // Its configuration is enough: the VM's memory is refused before any
    // record after it is read.
    let mut w = migrate::Writer::begin(Vec::new(), &migrate::Header { ram, ..header }).unwrap();
    let huge = w.sink_mut().clone();
    check(&huge, "49152 MiB");
    // A host without RDRAND cannot give the VM its virtio-rng back.
    m.entropy = None;
    let e = m.restore_vm(stream.as_slice()).unwrap_err();
    assert_eq!(e, Error::NoEntropy);
    assert_eq!(m.backend.as_ref().unwrap().mem.frames_in_use(), frames);
}

#[test]
fn swapped_and_poisoned_pages_are_saved_as_what_they_are() {
    let mut m = manager(8192);
    let id = busy_vm(&mut m);
    {
        let Manager { backend, vms, host_mem, .. } = &mut m;
        let backend = backend.as_mut().unwrap();
        let res = vms[0].res.as_mut().unwrap();
        host_mem
            .with_hooks(id, |h| res.mem.mark_poisoned(&mut backend.mem, h, GuestPhysAddr(0x20_1000), &mut |_| {}))
            .unwrap();
    }
    let (stream, stats) = m.save_vm(id, Vec::new()).unwrap();
    assert_eq!(stats.pages(migrate::PageKind::Poisoned), 1, "{stats:?}");
    let restored = m.restore_vm(stream.as_slice()).unwrap();
    let st = m.get(restored).unwrap().res.as_ref().unwrap().mem.page_state(GuestPhysAddr(0x20_1000));
    assert_eq!(st, Some(PageState::Poisoned));
    assert_eq!(peek(&m, restored, 0x20_2000), pattern(2));
}

/// A frame with an uncorrectable memory error that nobody knew of: the
/// save's read of it fails (the kernel's copy is machine-check safe), the
/// page is poisoned and saved as such, and the save completes.
#[test]
fn a_memory_error_met_while_saving_poisons_the_page_and_the_save_goes_on() {
    let mut m = manager(8192);
    let id = busy_vm(&mut m);
    let gpa = GuestPhysAddr(0x20_3000);
    let frame = m.vms[0].res.as_ref().unwrap().mem.page_frame(gpa).unwrap();
    m.backend.as_mut().unwrap().mem.set_bad(frame);
    let (stream, stats) = m.save_vm(id, Vec::new()).unwrap();
    assert_eq!(stats.pages(migrate::PageKind::Poisoned), 1, "{stats:?}");
    assert_eq!(m.vms[0].res.as_ref().unwrap().mem.page_state(gpa), Some(PageState::Poisoned));
    let restored = m.restore_vm(stream.as_slice()).unwrap();
    let st = m.get(restored).unwrap().res.as_ref().unwrap().mem.page_state(gpa);
    assert_eq!(st, Some(PageState::Poisoned));
    assert_eq!(peek(&m, restored, 0x20_2000), pattern(2));
}

/// The console commands over a simulated data disk: save, list, restore,
/// refusals that change nothing, delete.
#[test]
fn console_saves_lists_restores_and_deletes_checkpoints() {
    use crate::console::{HostStatus, execute, parse};
    use crate::memory::Swap;
    use crate::testing::Lines;
    use alloc::boxed::Box;
    use alloc::rc::Rc;
    use alloc::string::String;
    use core::cell::RefCell;
    use mm::swap::MemBlockStore;

    let mut m = manager(24576);
    // A 32 MiB disk: half swap, the rest for checkpoints.
    let disk = Rc::new(RefCell::new(MemBlockStore::new(65536)));
    let opts = crate::disk::space::FormatOptions::default();
    let (swap, space) = Swap::attach(Box::new(disk.clone()), "simdisk".into(), &opts, 0, || 0).unwrap();
    m.host_mem.swap = Some(swap);
    m.host_mem.space = Some(space);
    m.host_epoch = 1_700_000_000;
    let id = busy_vm(&mut m);
    let host = HostStatus { uptime_us: 3_000_000, ..Default::default() };
    let run = |line: &str, m: &mut Manager<MockBackend>| -> String {
        let mut con = Lines::default();
        execute(&parse(line).unwrap().unwrap(), m, &host, &mut con);
        con.0.join("\n")
    };
    let out = run(&alloc::format!("vm save {id} first"), &mut m);
    assert!(out.contains("vm 1 saved to checkpoint first:"), "{out}");
    let out = run("vm checkpoints --json", &mut m);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = &j["checkpoints"][0];
    assert_eq!(
        (c["name"].as_str(), c["complete"].as_bool(), c["ram_bytes"].as_u64()),
        (Some("first"), Some(true), Some(4 << 20))
    );
    assert!(c["bytes"].as_u64().unwrap() > 4096, "{c}");
    assert_eq!(c["format_version"], "1.1", "{c}");
    assert_eq!(c["vendor"], "unknown", "the mock backend is neither vendor: {c}");
    let text = run("vm checkpoints", &mut m);
    assert!(text.lines().nth(1).is_some_and(|l| l.starts_with("first ") && l.contains(" 1.1 ")), "{text}");
    // Refusals: one line each, nothing changes.
    let before = run("disk list --json", &mut m);
    for (line, want) in [
        ("vm save 1 first", "exists"),
        ("vm save 9 other", "no VM 9"),
        ("vm restore nothere", "nothere"),
        ("vm restore swap", "not a checkpoint"),
        ("vm checkpoint delete swap", "not a checkpoint"),
    ] {
        let out = run(line, &mut m);
        assert!(out.starts_with("error:") && out.contains(want) && !out.contains('\n'), "{line}: {out}");
    }
    assert_eq!(run("disk list --json", &mut m), before, "a refusal changed the disk");
    let out = run("vm restore first", &mut m);
    assert!(out.contains("vm 2 restored from checkpoint first: tiny (elf64, 4 MiB), running"), "{out}");
    assert_eq!(peek(&m, 2, 0x20_0000 + 7 * 4096), pattern(7));
    let out = run("vm checkpoint delete first", &mut m);
    assert!(out.contains("checkpoint first deleted"), "{out}");
    assert!(run("vm checkpoints --json", &mut m).contains("\"checkpoints\":[]"));
    // A checkpoint that cannot fit is refused and leaves no extent behind.
    // 24 MiB of data LZ4 cannot shrink, in a 40 MiB VM: more than the
    // 16 MiB left.
    let big = m.run_vm("tiny", 40, "").unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for p in 0..(24 << 8) {
        let page: Vec<u8> = (0..512)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        write(&mut m, big, 0x100_0000 + p * 4096, &page);
    }
    let out = run(&alloc::format!("vm save {big} huge"), &mut m);
    assert!(out.starts_with("error:") && out.contains("does not fit"), "{out}");
    let j: serde_json::Value = serde_json::from_str(&run("disk list --json", &mut m)).unwrap();
    assert_eq!(j["extents"].as_array().unwrap().len(), 1, "only swap is left: {j}");
    assert_eq!(j["free_blocks"], j["largest_free_blocks"], "{j}");
}

/// The same host with AMD's vendor string and family: every feature the
/// Intel mock host offers.
fn amd_lookalike_cpuid(leaf: u32, sub: u32) -> crate::cpuid::Regs {
    let mut r = crate::testing::intel_host_cpuid(leaf, sub);
    match leaf {
        0 => (r.ebx, r.edx, r.ecx) = (0x6874_7541, 0x6974_6e65, 0x444d_4163),
        1 => r.eax = 0x00a2_0f10,
        _ => {}
    }
    r
}

/// As `amd_lookalike_cpuid` without SSE3 and PCLMULQDQ (leaf 1 ECX 0, 1).
fn amd_without_sse3_cpuid(leaf: u32, sub: u32) -> crate::cpuid::Regs {
    let mut r = amd_lookalike_cpuid(leaf, sub);
    if leaf == 1 {
        r.ecx &= !3;
    }
    r
}

/// VM `id`'s answer to CPUID `leaf` through its exit handler.
fn cpuid_exit(m: &mut Manager<MockBackend>, id: u32, leaf: u32) -> crate::cpuid::Regs {
    let Manager { backend, vms, host_mem, .. } = m;
    let backend = backend.as_mut().unwrap();
    let vm = vms.iter_mut().find(|v| v.id == id).unwrap();
    let vcpu = &mut vm.res.as_mut().unwrap().vcpu();
    vcpu.load();
    (vcpu.gprs.rax, vcpu.gprs.rcx) = (u64::from(leaf), 0);
    let flow = vm.handle_exit(vcpu::VmExit::Cpuid, backend, host_mem, &mut crate::testing::Lines::default());
    assert_eq!(flow, crate::vm::exit::Flow::Continue);
    let g = vm.res.as_ref().unwrap().vcpu_ref().gprs;
    crate::cpuid::Regs { eax: g.rax as u32, ebx: g.rbx as u32, ecx: g.rcx as u32, edx: g.rdx as u32 }
}

#[test]
fn a_pinned_vm_keeps_its_cpuid_on_another_host_and_an_unpinned_one_does_not() {
    let mut m = manager(16384);
    let pinned = busy_vm(&mut m);
    m.pin_cpuid(pinned, false).unwrap();
    let host = busy_vm(&mut m);
    let intel = cpuid_exit(&mut m, host, 0);
    assert_eq!(cpuid_exit(&mut m, pinned, 0), intel);
    let leaf1 = cpuid_exit(&mut m, pinned, 1);
    let desc = m.get(pinned).unwrap().cpuid.describe();
    assert_eq!(desc, "pinned (GenuineIntel, 6/140)");
    let (pinned_cp, _) = m.save_vm(pinned, Vec::new()).unwrap();
    let (host_cp, _) = m.save_vm(host, Vec::new()).unwrap();
    // The other vendor's host.
    m.backend.as_mut().unwrap().cpuid = amd_lookalike_cpuid;
    assert_eq!(cpuid_exit(&mut m, pinned, 0), intel, "the table answers, not this host");
    assert_ne!(cpuid_exit(&mut m, host, 0), intel);
    let a = m.restore_vm(pinned_cp.as_slice()).unwrap();
    let b = m.restore_vm(host_cp.as_slice()).unwrap();
    assert_eq!((cpuid_exit(&mut m, a, 0), cpuid_exit(&mut m, a, 1)), (intel, leaf1));
    assert_eq!(m.get(a).unwrap().cpuid.describe(), desc);
    assert_eq!(m.get(b).unwrap().cpuid.describe(), "host");
    assert_eq!(cpuid_exit(&mut m, b, 0), amd_lookalike_cpuid(0, 0), "unpinned: this host's vendor");
    // The console shows the profile.
    let mut con = crate::testing::Lines::default();
    let host = crate::console::HostStatus::default();
    let p = crate::console::parse(&alloc::format!("vm stats {a} --json")).unwrap().unwrap();
    crate::console::execute(&p, &mut m, &host, &mut con);
    let j: serde_json::Value = serde_json::from_str(&con.0[0]).unwrap();
    assert_eq!(j["cpuid"], "pinned (GenuineIntel, 6/140)", "{j}");
    let p = crate::console::parse("vm run tiny cpuid=pinned").unwrap().unwrap();
    crate::console::execute(&p, &mut m, &host, &mut con);
    let p = crate::console::parse("vm list --json").unwrap().unwrap();
    crate::console::execute(&p, &mut m, &host, &mut con);
    let j: serde_json::Value = serde_json::from_str(con.0.last().unwrap()).unwrap();
    let profiles: Vec<&str> = j["vms"].as_array().unwrap().iter().map(|v| v["cpuid"].as_str().unwrap()).collect();
    assert_eq!(
        profiles,
        [
            "pinned (GenuineIntel, 6/140)",
            "host",
            "pinned (GenuineIntel, 6/140)",
            "host",
            "pinned (AuthenticAMD, 25/33)"
        ]
    );
    // OSXSAVE still follows the vCPU's CR4.
    let res = m.vms.iter_mut().find(|v| v.id == a).unwrap().res.as_mut().unwrap();
    let cr4 = res.vcpu_ref().reg(vcpu::Reg::Cr4);
    res.vcpu().set_reg(vcpu::Reg::Cr4, cr4 | vcpu::state::bits::CR4_OSXSAVE);
    assert_eq!(cpuid_exit(&mut m, a, 1).ecx, leaf1.ecx | (1 << 27));
}

#[test]
fn a_host_that_cannot_honour_a_pinned_cpuid_refuses_the_restore() {
    let mut m = manager(16384);
    let id = busy_vm(&mut m);
    m.pin_cpuid(id, false).unwrap();
    let (stream, _) = m.save_vm(id, Vec::new()).unwrap();
    m.backend.as_mut().unwrap().cpuid = amd_without_sse3_cpuid;
    let frames = m.backend.as_ref().unwrap().mem.frames_in_use();
    let (vms, next) = (m.vms.len(), m.next_id);
    let e = m.restore_vm(stream.as_slice()).unwrap_err().to_string();
    assert_eq!(
        e,
        "the checkpoint's pinned CPUID shows what this host cannot give its guests: leaf 0x1.0 ECX bits 0x00000003 (0, 1)"
    );
    assert_eq!((m.vms.len(), m.next_id), (vms, next), "nothing was created");
    assert_eq!(m.backend.as_ref().unwrap().mem.frames_in_use(), frames, "frames leaked");
    // The same checkpoint unpinned restores there.
    m.vms.iter_mut().find(|v| v.id == id).unwrap().cpuid = crate::cpuid::Profile::Host;
    let (stream, _) = m.save_vm(id, Vec::new()).unwrap();
    assert!(m.restore_vm(stream.as_slice()).is_ok());
}

#[test]
fn machine_records_of_version_2_decode_as_host_cpuid() {
    let mut m = manager(8192);
    let id = busy_vm(&mut m);
    m.pin_cpuid(id, false).unwrap();
    let vm = m.get(id).unwrap();
    let table = vm.cpuid.table().expect("pinned").clone();
    let state = MachineState {
        guest: "tiny".into(),
        image: "tiny".into(),
        cmdline: "a b".into(),
        modules: vec!["m".into()],
        protocol: "elf64".into(),
        mem_bytes: 4 << 20,
        reboots: 2,
        clock_ns: 5,
        guest_tsc: 6,
        tsc_hz: 7,
        mtrr_def_type: 8,
        misc_enable: 9,
        disk: Some("d".into()),
        net: None,
        cpuid: crate::cpuid::Profile::Host,
        vcpus: Vec::new(),
    };
    // Versions 2 and 3: the same fields without the vCPU list, and
    // without the profile; both read as one runnable vCPU.
    let v4_empty = postcard::to_allocvec(&state).unwrap();
    let v3 = &v4_empty[..v4_empty.len() - 1];
    let v2 = &v3[..v3.len() - 1];
    let one = MachineState { vcpus: checkpoint::SavedVcpu::legacy(), ..state.clone() };
    assert_eq!(MachineState::decode(2, v2), Ok(one.clone()));
    assert_eq!(MachineState::decode(3, v3), Ok(one.clone()));
    assert_eq!(MachineState::decode(3, v2), Err(Refused::Machine), "version 3 without its profile");
    assert_eq!(MachineState::decode(2, v3), Err(Refused::Machine), "a trailing byte");
    assert_eq!(MachineState::decode(4, v3), Err(Refused::Machine), "version 4 without its vCPUs");
    assert_eq!(MachineState::decode(4, &v4_empty), Err(Refused::Machine), "version 4 with no vCPU");
    assert_eq!(MachineState::decode(5, v3), Err(Refused::MachineVersion(5)));
    let v4 = postcard::to_allocvec(&one).unwrap();
    assert_eq!(MachineState::decode(4, &v4), Ok(one.clone()));
    assert_eq!(MachineState::decode(3, &v4), Err(Refused::Machine), "a version 4 record is not version 3");
    let nine = MachineState { vcpus: [one.vcpus[0]; 9].to_vec(), ..state.clone() };
    let bytes = postcard::to_allocvec(&nine).unwrap();
    assert_eq!(MachineState::decode(4, &bytes), Err(Refused::Machine), "more vCPUs than a VM can have");
    let pinned = MachineState { cpuid: crate::cpuid::Profile::Pinned(table.clone()), ..state.clone() };
    let bytes = postcard::to_allocvec(&pinned).unwrap();
    let pinned = MachineState { vcpus: one.vcpus.clone(), ..pinned };
    assert_eq!(MachineState::decode(3, &bytes[..bytes.len() - 1]), Ok(pinned));
    // Version 2 had no profile: a "version 2" record whose bytes, with the
    // 0 the reader appends, spell one (a pinned profile missing its last
    // byte, here an empty table) is refused, not read as pinned.
    let empty = MachineState { cpuid: crate::cpuid::Profile::Pinned(crate::cpuid::Table::default()), ..state.clone() };
    let smuggled = postcard::to_allocvec(&empty).unwrap();
    let smuggled = &smuggled[..smuggled.len() - 1];
    assert_eq!(smuggled.last(), Some(&0), "the empty table's length");
    let empty = MachineState { vcpus: one.vcpus.clone(), ..empty };
    assert_eq!(MachineState::decode(3, smuggled), Ok(empty));
    assert_eq!(MachineState::decode(2, &smuggled[..smuggled.len() - 1]), Err(Refused::Machine));
    // A table out of order does not decode.
    let mut entries = table.entries().to_vec();
    entries.swap(0, 1);
    #[derive(serde::Serialize)]
    struct RawTable {
        entries: Vec<crate::cpuid::Entry>,
    }
    #[derive(serde::Serialize)]
    enum RawProfile {
        _Host,
        Pinned(RawTable),
    }
    let mut bad = v2.to_vec();
    bad.extend(postcard::to_allocvec(&RawProfile::Pinned(RawTable { entries })).unwrap());
    assert_eq!(MachineState::decode(3, &bad), Err(Refused::Machine));
    bad.push(1);
    bad.extend(postcard::to_allocvec(&one.vcpus[0]).unwrap());
    assert_eq!(MachineState::decode(4, &bad), Err(Refused::Machine));
}

/// Copies a stream record by record into a writer, the machine record
/// rewritten in the layout of version 2 (no CPUID profile, no vCPU list)
/// or 3 (no vCPU list).
pub(super) struct AsVersion(pub migrate::Writer<Vec<u8>>, pub u16);

impl migrate::Apply for AsVersion {
    type Error = migrate::Error;
    fn vcpu(&mut self, index: u32, state: GuestState) -> Result<(), migrate::Error> {
        self.0.vcpu(index, &state)
    }
    fn device(&mut self, name: &str, version: u16, bytes: &[u8]) -> Result<(), migrate::Error> {
        if name == checkpoint::MACHINE {
            let m = MachineState::decode(version, bytes).unwrap();
            assert!(self.1 == 3 || m.cpuid == crate::cpuid::Profile::Host, "a version-2 record cannot hold a table");
            // Version 4 without its vCPUs ends in the empty list's 0;
            // version 3 is that without the 0, version 2 without the
            // profile's 0 as well.
            let v4 = postcard::to_allocvec(&MachineState { vcpus: Vec::new(), ..m }).unwrap();
            let cut = usize::from(4 - self.1);
            return self.0.device(name, self.1, &v4[..v4.len() - cut]);
        }
        self.0.device(name, version, bytes)
    }
    fn large_run(&mut self, gfn: u64, pages: u32) -> Result<(), migrate::Error> {
        self.0.large_run(gfn, pages)
    }
    fn pages(&mut self, gfn: u64, data: &[u8]) -> Result<(), migrate::Error> {
        for (i, page) in data.as_chunks::<4096>().0.iter().enumerate() {
            self.0.page(gfn + i as u64, page)?;
        }
        Ok(())
    }
    fn zero(&mut self, gfn: u64, pages: u32) -> Result<(), migrate::Error> {
        (0..u64::from(pages)).try_for_each(|p| self.0.page(gfn + p, &[0; 4096]))
    }
    fn shared(&mut self, _: u64, _: u32, _: &[u8; 4096]) -> Result<(), migrate::Error> {
        unreachable!("no sharing in these VMs")
    }
    fn shared_ref(&mut self, _: u64, _: u32) -> Result<(), migrate::Error> {
        unreachable!("no sharing in these VMs")
    }
    fn poisoned(&mut self, gfn: u64) -> Result<(), migrate::Error> {
        self.0.poisoned(gfn)
    }
    fn pending(&mut self, gfn: u64, pages: u32) -> Result<(), migrate::Error> {
        self.0.pending(&[(gfn, pages)])
    }
    fn resume(&mut self) -> Result<(), migrate::Error> {
        self.0.resume()
    }
}

#[test]
fn a_version_2_checkpoint_restores_as_a_host_cpuid_vm() {
    let mut m = manager(16384);
    let id = busy_vm(&mut m);
    let (stream, _) = m.save_vm(id, Vec::new()).unwrap();
    let old = as_version(&stream, 2);
    let restored = m.restore_vm(old.as_slice()).unwrap();
    let vm = m.get(restored).unwrap();
    assert_eq!((vm.cpuid.describe().as_str(), vm.guest.as_str(), vm.msrs.misc_enable), ("host", "tiny", 0x1801));
    assert_eq!(peek(&m, restored, 0x20_0000 + 5 * 4096), pattern(5));
}

/// `stream` with its machine record in the layout of `version` (2 or 3).
pub(super) fn as_version(stream: &[u8], version: u16) -> Vec<u8> {
    let mut reader = migrate::Reader::open(stream).unwrap();
    let mut header = reader.header().clone();
    header.devices.iter_mut().filter(|d| d.name == checkpoint::MACHINE).for_each(|d| d.version = version);
    let mut copy = AsVersion(migrate::Writer::begin(Vec::new(), &header).unwrap(), version);
    reader.apply(&mut copy).unwrap();
    copy.0.finish().unwrap().0
}

#[test]
fn a_version_3_checkpoint_of_one_vcpu_still_restores_its_vcpu_runnable() {
    let mut m = manager(16384);
    let id = busy_vm(&mut m);
    m.pin_cpuid(id, false).unwrap();
    // Halted: a version-4 record says so, a version-3 one cannot.
    let vm = m.vms.iter_mut().find(|v| v.id == id).unwrap();
    vm.res.as_mut().unwrap().vcpus[0].state = crate::vm::VcpuState::Halted;
    let (stream, _) = m.save_vm(id, Vec::new()).unwrap();
    let new = m.restore_vm(stream.as_slice()).unwrap();
    assert_eq!(m.get(new).unwrap().res.as_ref().unwrap().vcpus[0].state, crate::vm::VcpuState::Halted);
    let old = as_version(&stream, 3);
    assert_eq!(migrate::Reader::open(old.as_slice()).unwrap().header().devices[0].version, 3);
    let restored = m.restore_vm(old.as_slice()).unwrap();
    let vm = m.get(restored).unwrap();
    assert_eq!(vm.cpuid.describe(), m.get(id).unwrap().cpuid.describe(), "version 3 kept the pinned profile");
    assert_eq!(vm.msrs.misc_enable, 0x1801);
    let res = vm.res.as_ref().unwrap();
    assert_eq!((res.vcpus.len(), res.vcpus[0].state), (1, crate::vm::VcpuState::Runnable));
    assert_eq!(res.vcpu_ref().state().gprs.rbx, 0x1234_5678);
    assert_eq!(peek(&m, restored, 0x20_0000 + 5 * 4096), pattern(5));
}
