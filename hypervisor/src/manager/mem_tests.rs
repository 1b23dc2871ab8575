//! The memory manager wired into the VM manager, on the host: sharing
//! between VMs, copy-on-write on a guest write fault, targets enforced by
//! swapping to a (simulated) disk, page-in on a guest read fault, and the
//! `mem` console commands.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use mm::swap::MemBlockStore;
use mm::vm_memory::PageState;
use vcpu::{MemAccess, VmExit};

use super::*;
use crate::console::{HostStatus, execute, parse};
use crate::memory::Swap;
use crate::testing::{Lines, MockBackend, elf_guest};

fn manager(frames: usize) -> Manager<MockBackend> {
    let images = vec![GuestImage { name: "tiny".into(), bytes: elf_guest(&[0x90; 32]) }];
    Manager::new(Ok(MockBackend::new(frames)), images)
}

fn with_swap(m: &mut Manager<MockBackend>, blocks: u64) -> Rc<RefCell<MemBlockStore>> {
    let disk = Rc::new(RefCell::new(MemBlockStore::new(blocks)));
    let opts = crate::disk::space::FormatOptions::default();
    let (swap, space) = Swap::attach(Box::new(disk.clone()), "simdisk".into(), &opts, 0, || 0).unwrap();
    m.host_mem.swap = Some(swap);
    m.host_mem.space = Some(space);
    disk
}

/// Write `data` into VM `id`'s memory as the guest would (through faults).
fn guest_write(m: &mut Manager<MockBackend>, id: u32, gpa: u64, data: &[u8]) {
    let Manager { backend, vms, host_mem, .. } = m;
    let backend = backend.as_mut().unwrap();
    let vm = vms.iter_mut().find(|v| v.id == id).unwrap();
    let res = vm.res.as_mut().unwrap();
    host_mem.with_hooks(id, |h| res.mem.write(&mut backend.mem, h, GuestPhysAddr(gpa), data, &mut |_| {})).unwrap();
}

fn peek(m: &Manager<MockBackend>, id: u32, gpa: u64, len: usize) -> Result<Vec<u8>, mm::Error> {
    let vm = m.get(id).unwrap();
    let mut buf = vec![0; len];
    vm.res.as_ref().unwrap().mem.peek(&m.backend.as_ref().unwrap().mem, GuestPhysAddr(gpa), &mut buf)?;
    Ok(buf)
}

fn state(m: &Manager<MockBackend>, id: u32, gpa: u64) -> PageState {
    m.get(id).unwrap().res.as_ref().unwrap().mem.page_state(GuestPhysAddr(gpa)).unwrap()
}

/// Deliver one nested page fault to VM `id` as if its vCPU had exited.
fn fault(m: &mut Manager<MockBackend>, id: u32, gpa: u64, access: MemAccess) -> Flow {
    let Manager { backend, vms, host_mem, .. } = m;
    let backend = backend.as_mut().unwrap();
    let vm = vms.iter_mut().find(|v| v.id == id).unwrap();
    let exit = VmExit::NestedPageFault { gpa, access, gva: None };
    vm.handle_exit(exit, backend, host_mem, &mut Lines::default())
}

fn pattern(seed: u64) -> Vec<u8> {
    (0..4096u64).map(|i| (i.wrapping_mul(31) ^ seed) as u8).collect()
}

#[test]
fn identical_vms_share_and_a_write_breaks_only_the_writers_copy() {
    let mut m = manager(16384);
    m.run_vm("tiny", 4, "").unwrap();
    m.run_vm("tiny", 4, "").unwrap();
    // The same non-zero data at the same place in both.
    for id in [1, 2] {
        for p in 0..64u64 {
            guest_write(&mut m, id, (2 << 20) + p * 4096, &pattern(p));
        }
    }
    let used_before = be(&mut m).mem.frames_in_use();
    let r = m.share_now(None).unwrap();
    assert_eq!(r.large_broken, 0, "{r:?}");
    // (The first 2 MiB of each is in 4 KiB pages already: it holds the
    // BIOS ROM.)
    assert!(r.large_opportunities > 900, "the first pass finds sharing inside the 2 MiB pages: {r:?}");
    // The guests did not touch those pages since: the next pass breaks them up.
    let r = m.share_now(None).unwrap();
    assert_eq!(r.large_broken, 2, "{r:?}");
    assert!(r.shared_merged >= 64, "{r:?}");
    assert!(r.zero_merged > 800, "fresh RAM is zero pages: {r:?}");
    let freed = used_before - be(&mut m).mem.frames_in_use();
    assert!(freed > 1500, "sharing gave {freed} frames back");
    // VM 1's pages left hints that VM 2's matched; VM 1 joins on its next pass.
    assert_eq!(state(&m, 2, 2 << 20), PageState::Shared);
    m.share_now(Some(1)).unwrap();
    assert_eq!(state(&m, 1, 2 << 20), PageState::Shared);
    assert_eq!(state(&m, 2, 2 << 20), PageState::Shared);
    // VM 2 writes to a shared page: the fault gives it a private copy.
    assert_eq!(fault(&mut m, 2, 2 << 20, MemAccess::Write), Flow::Continue);
    assert_eq!(state(&m, 2, 2 << 20), PageState::Present);
    assert_eq!(state(&m, 1, 2 << 20), PageState::Shared);
    guest_write(&mut m, 2, 2 << 20, b"vm two was here");
    assert_eq!(peek(&m, 1, 2 << 20, 4096).unwrap(), pattern(0), "VM 1 never sees VM 2's write");
    assert_eq!(&peek(&m, 2, 2 << 20, 15).unwrap()[..], b"vm two was here");
    assert_eq!(m.get(2).unwrap().reclaim.cow_breaks, 1);
    assert_eq!(m.host_mem.stats.cow_breaks, 1);
    // Stopping both gives everything back, shared frames included.
    let mut con = Lines::default();
    m.stop(1, &mut con).unwrap();
    m.stop(2, &mut con).unwrap();
    let s = m.host_mem.sharing.as_ref().unwrap().stats();
    assert_eq!((s.shared_frames, s.shared_refs, s.zero_refs), (0, 0, 0));
}

#[test]
fn a_target_is_met_by_swapping_and_pages_come_back_intact() {
    let mut m = manager(16384);
    with_swap(&mut m, 32768);
    m.run_vm("tiny", 8, "").unwrap();
    // Unique data everywhere above 1 MiB: sharing cannot help.
    let pages: Vec<u64> = (256..2048).collect();
    for &p in &pages {
        guest_write(&mut m, 1, p * 4096, &pattern(p * 7 + 1));
    }
    m.set_target(1, Some(512)).unwrap();
    let mut rounds = 0;
    while m.get(1).unwrap().res.as_ref().unwrap().mem.state_counts().present > 512 {
        m.reclaim_round();
        rounds += 1;
        assert!(rounds < 10, "the target is not met");
    }
    let vm = m.get(1).unwrap();
    let counts = vm.res.as_ref().unwrap().mem.state_counts();
    assert!(counts.swapped >= 2048 - 512 - 300, "{counts:?}");
    assert_eq!(vm.reclaim.swapped_out, counts.swapped);
    assert!(vm.reclaim.stuck.is_none());
    // The guest reads every page: each swapped one faults in, unchanged.
    let mut faulted = 0;
    for &p in &pages {
        let gpa = p * 4096;
        if state(&m, 1, gpa) == PageState::Swapped {
            assert!(peek(&m, 1, gpa, 8).is_err(), "a swapped page cannot be peeked");
            assert_eq!(fault(&mut m, 1, gpa, MemAccess::Read), Flow::Continue);
            faulted += 1;
        }
        assert_eq!(peek(&m, 1, gpa, 4096).unwrap(), pattern(p * 7 + 1), "page {p}");
    }
    assert!(faulted > 1000);
    assert_eq!(m.get(1).unwrap().reclaim.swapped_in, faulted);
    // The next round squeezes it back under the target.
    m.reclaim_round();
    m.reclaim_round();
    m.reclaim_round();
    assert!(m.get(1).unwrap().res.as_ref().unwrap().mem.state_counts().present <= 512);
    // Stopping the VM empties its swap file.
    m.stop(1, &mut Lines::default()).unwrap();
    assert_eq!(m.host_mem.swap.as_ref().unwrap().stats().in_files, 0);
}

#[test]
fn pages_the_guest_touched_get_a_second_chance() {
    let mut m = manager(16384);
    with_swap(&mut m, 32768);
    m.run_vm("tiny", 4, "").unwrap();
    for p in 0..1024u64 {
        guest_write(&mut m, 1, p * 4096, &pattern(p));
    }
    // The guest reads pages 600..700 through its nested table (sets their
    // accessed bits); the hand starts at page 0.
    {
        let Manager { backend, vms, host_mem, .. } = &mut m;
        let mem = &mut vms[0].res.as_mut().unwrap().mem;
        let mut b = [0u8; 1];
        for p in 600..700u64 {
            host_mem
                .with_hooks(1, |h| {
                    mem.sim_read(&mut backend.as_mut().unwrap().mem, h, 0, GuestPhysAddr(p * 4096), &mut b)
                })
                .unwrap();
        }
    }
    // Pages 512..1024 are one 2 MiB leaf: the touched leaf gets its second
    // chance as a whole; the hand takes from the first 2 MiB (4 KiB leaves,
    // as it holds the BIOS ROM).
    m.set_target(1, Some(1024 - 300)).unwrap();
    m.reclaim_round();
    for p in 512..1024u64 {
        assert_eq!(state(&m, 1, p * 4096), PageState::Present, "page {p} shares a touched leaf");
    }
    for p in 0..300u64 {
        assert_eq!(state(&m, 1, p * 4096), PageState::Swapped, "page {p}");
    }
    // The bit is clear now: the next squeeze takes from the touched leaf too.
    m.set_target(1, Some(256)).unwrap();
    m.reclaim_round();
    assert_eq!(state(&m, 1, 650 * 4096), PageState::Swapped);
}

#[test]
fn a_corrupt_swap_slot_stops_only_that_vm() {
    let mut m = manager(16384);
    let disk = with_swap(&mut m, 32768);
    m.run_vm("tiny", 4, "").unwrap();
    for p in 256..1024u64 {
        guest_write(&mut m, 1, p * 4096, &pattern(p));
    }
    m.set_target(1, Some(256)).unwrap();
    for _ in 0..3 {
        m.reclaim_round();
    }
    let gpa = (256..1024u64).map(|p| p * 4096).find(|&g| state(&m, 1, g) == PageState::Swapped).unwrap();
    // Damage every slot's page bytes on the simulated disk: any page-in fails its checksum.
    for b in disk.borrow_mut().raw_mut().iter_mut().skip(4096).step_by(512) {
        *b ^= 0x5a;
    }
    let mut con = Lines::default();
    let Manager { backend, vms, host_mem, .. } = &mut m;
    let exit = VmExit::NestedPageFault { gpa, access: MemAccess::Read, gva: None };
    let flow = vms[0].handle_exit(exit, backend.as_mut().unwrap(), host_mem, &mut con);
    assert_eq!(flow, Flow::Stop);
    let t = con.text();
    assert!(t.contains(&format!("read of guest-physical {gpa:#x} could not be resolved")), "{t}");
    assert!(t.contains("Refusing the swapped-out copy"), "{t}");
}

#[test]
fn mem_commands_report_and_refuse_bad_input_changing_nothing() {
    let mut m = manager(16384);
    let host = HostStatus { mem_usable_bytes: 64 << 20, mem_free_bytes: 32 << 20, ..Default::default() };
    let mut con = Lines::default();
    let mut run = |line: &str, m: &mut Manager<MockBackend>| -> String {
        con.0.clear();
        match parse(line) {
            Ok(Some(p)) => {
                execute(&p, m, &host, &mut con);
            }
            Ok(None) => {}
            Err(e) => crate::console::commands::report_parse_error(&e, &mut con),
        }
        con.text()
    };
    m.run_vm("tiny", 4, "").unwrap();
    let j: serde_json::Value = serde_json::from_str(&run("mem --json", &mut m)).unwrap();
    assert_eq!(j["ok"], true);
    assert_eq!(j["sharing"]["enabled"], false);
    assert_eq!(j["swap"], serde_json::Value::Null);
    assert_eq!(j["vms"][0]["pages"]["present"], 1024);
    assert_eq!(j["vms"][0]["swap_file"], serde_json::Value::Null);
    // One state byte per page and a few maps: well under 0.5 % of RAM per VM.
    let vm_books = j["host"]["vm_bookkeeping_bytes"].as_u64().unwrap();
    assert!(vm_books > 1024 && vm_books < (4 << 20) / 200, "{j}");
    assert!(j["host"]["bookkeeping_bytes"].as_u64().unwrap() > vm_books, "the sharing index counts too: {j}");
    // Bad input: one line, nothing changes.
    for (line, msg) in [
        ("mem target 9 4", "no VM 9"),
        ("mem target 1 2", "it has no swap file"),
        ("mem target 1 0", "is not 1..="),
        ("mem target x 4", "\"x\" is not a VM id"),
        ("mem sharing on 0", "pages per round must be"),
        ("mem sharing maybe", "mem sharing: use"),
        ("mem scan 5", "no VM 5"),
        ("mem frobnicate", "unknown subcommand \"frobnicate\""),
    ] {
        let out = run(line, &mut m);
        assert_eq!(out.lines().count(), 1, "{line}: {out}");
        assert!(out.starts_with("error: ") && out.contains(msg), "{line}: {out}");
    }
    assert!(m.get(1).unwrap().reclaim.target.is_none());
    assert!(!m.host_mem.sharing_enabled);
    // Sharing on with a budget; scans run between rounds.
    let out = run("mem sharing on 4096", &mut m);
    assert!(out.contains("sharing on: scanning 4096 pages per scheduling round"), "{out}");
    // Round 1 finds the opportunities inside the large pages; round 2
    // breaks the untouched ones up and shares their pages.
    m.reclaim_round();
    m.reclaim_round();
    let j: serde_json::Value = serde_json::from_str(&run("mem --json", &mut m)).unwrap();
    assert!(j["sharing"]["zero_pages"].as_u64().unwrap() > 900, "{j}");
    assert!(j["vms"][0]["pages"]["zero"].as_u64().unwrap() > 900, "{j}");
    let text = run("mem", &mut m);
    assert!(text.contains("sharing: on (4096 pages/round)"), "{text}");
    assert!(text.contains("swap: none (no swap disk attached)"), "{text}");
    // A scan reply; a target with swap.
    let j: serde_json::Value = serde_json::from_str(&run("mem scan 1 --json", &mut m)).unwrap();
    assert!(j["scanned"].as_u64().unwrap() >= 1024, "{j}");
    with_swap(&mut m, 32768);
    m.run_vm("tiny", 4, "").unwrap();
    let out = run("mem target 2 1", &mut m);
    assert!(out.contains("vm 2: target 1 MiB (256 pages)"), "{out}");
    let j: serde_json::Value = serde_json::from_str(&run("mem --json", &mut m)).unwrap();
    assert_eq!(j["vms"][1]["target_pages"], 256);
    assert_eq!(j["vms"][1]["swap_file"]["limit_pages"], 1024 - 256);
    assert!(j["swap"]["slots"].as_u64().unwrap() > 800);
    let j: serde_json::Value = serde_json::from_str(&run("vm stats 1 --json", &mut m)).unwrap();
    assert!(j["pages"]["zero"].as_u64().unwrap() > 900, "{j}");
    assert!(run("vm stats 1", &mut m).contains(" zero, 0 shared, 0 swapped, 0 ballooned, 0 poisoned; 0 swapped in"));
    let out = run("mem target 2 none --json", &mut m);
    assert!(out.contains("\"target_pages\":null"), "{out}");
}

fn be(m: &mut Manager<MockBackend>) -> &mut MockBackend {
    m.backend.as_mut().unwrap()
}

/// Three VMs with their zero pages shared and the host's frames taken down
/// to `spare` free ones; VM 1 then writes distinct data into pages until the
/// host has none left (it grabbed them all). Returns the frames the test
/// holds, to give back at the end.
fn overcommitted(m: &mut Manager<MockBackend>, spare: usize) -> Vec<mm::HostPhysAddr> {
    use mm::hal::FrameAlloc;
    for _ in 0..3 {
        m.run_vm("tiny", 4, "").unwrap();
    }
    // Share all there is to share: the first pass only finds the chances
    // inside large pages, later ones break them up and share (the guests'
    // identical images too) until nothing is left.
    m.share_now(None).unwrap();
    while m.share_now(None).unwrap().frames_freed > 0 {}
    let mut eaten = Vec::new();
    while let Some(f) = be(m).mem.alloc_frame() {
        eaten.push(f);
    }
    for _ in 0..spare {
        // SAFETY: just allocated above and not used.
        unsafe { be(m).mem.free_frame(eaten.pop().unwrap()) };
    }
    let mut page = 1u64 << 20;
    loop {
        match fault(m, 1, page, MemAccess::Write) {
            Flow::Continue => guest_write(m, 1, page, &unique(page)),
            Flow::OutOfMemory => break,
            other => panic!("VM 1's write at {page:#x}: {other:?}"),
        }
        page += 4096;
    }
    eaten
}

/// A page no other page equals (nothing to share).
fn unique(page: u64) -> Vec<u8> {
    let mut p = pattern(page);
    p[..8].copy_from_slice(&page.to_le_bytes());
    p
}

fn give_back(m: &mut Manager<MockBackend>, eaten: Vec<mm::HostPhysAddr>) {
    use mm::hal::FrameAlloc;
    for f in eaten {
        // SAFETY: allocated by `overcommitted`, never used.
        unsafe { be(m).mem.free_frame(f) };
    }
}

/// The host is out of frames because VM 1 took them; VM 2 faults next. VM 2
/// must not pay: with nothing to reclaim (no swap, no twins), VM 1 (furthest
/// over its share) is stopped and VM 2's access goes through on retry.
#[test]
fn out_of_frames_stops_the_vm_over_its_share_not_the_one_that_faulted() {
    let mut m = manager(8192);
    let eaten = overcommitted(&mut m, 100);
    assert_eq!(fault(&mut m, 2, 3 << 20, MemAccess::Write), Flow::OutOfMemory, "the host has no frame left");
    assert!(m.get(2).unwrap().state.runnable(), "a VM that found no frame is not stopped by the fault");
    let mut con = Lines::default();
    m.relieve_memory_pressure(2, &mut con);
    let stopped = &m.get(1).unwrap().state;
    match stopped {
        RunState::Stopped { reason } => {
            assert!(reason.contains("ran out of memory") && reason.contains("beyond its share"), "{reason}")
        }
        other => panic!("VM 1 is {other:?}"),
    }
    assert!(m.get(1).unwrap().res.is_none(), "the stopped VM's memory was given back");
    assert!(m.get(2).unwrap().state.runnable() && m.get(3).unwrap().state.runnable());
    assert_eq!(fault(&mut m, 2, 3 << 20, MemAccess::Write), Flow::Continue, "VM 2's retried access goes through");
    assert_eq!((m.host_mem.stats.out_of_memory, m.host_mem.stats.oom_stopped), (1, 1));
    give_back(&mut m, eaten);
}

/// With swap, the VM over its share gives pages back instead of being
/// stopped, and every VM goes on.
#[test]
fn out_of_frames_pages_out_the_vm_over_its_share_when_it_can() {
    let mut m = manager(8192);
    with_swap(&mut m, 16384);
    let eaten = overcommitted(&mut m, 100);
    let grabbed = m.get(1).unwrap().res.as_ref().unwrap().mem.state_counts().present;
    assert_eq!(fault(&mut m, 3, 3 << 20, MemAccess::Write), Flow::OutOfMemory);
    m.relieve_memory_pressure(3, &mut Lines::default());
    assert!(m.vms.iter().all(|v| v.state.runnable()), "nobody is stopped when reclaim works");
    let now = m.get(1).unwrap().res.as_ref().unwrap().mem.state_counts().present;
    assert!(now < grabbed, "VM 1 gave pages back ({grabbed} -> {now})");
    assert_eq!(m.get(3).unwrap().reclaim.swapped_out, 0, "the innocent VM kept its pages");
    assert_eq!(fault(&mut m, 3, 3 << 20, MemAccess::Write), Flow::Continue);
    // What VM 1 wrote is still there, paged back in on demand.
    assert_eq!(fault(&mut m, 1, 1 << 20, MemAccess::Read), Flow::Continue);
    assert_eq!(peek(&m, 1, 1 << 20, 4096).unwrap(), unique(1 << 20));
    assert_eq!(m.host_mem.stats.oom_stopped, 0);
    give_back(&mut m, eaten);
}

#[test]
fn disk_commands_create_list_delete_and_refuse_bad_input_changing_nothing() {
    let mut m = manager(16384);
    let host = HostStatus { uptime_us: 3_000_000, ..Default::default() };
    m.host_epoch = 1_700_000_000;
    let mut con = Lines::default();
    let mut run = |line: &str, m: &mut Manager<MockBackend>| -> String {
        con.0.clear();
        match parse(line) {
            Ok(Some(p)) => {
                execute(&p, m, &host, &mut con);
            }
            Ok(None) => {}
            Err(e) => crate::console::commands::report_parse_error(&e, &mut con),
        }
        con.text()
    };
    // No disk: said in one line.
    let out = run("disk list", &mut m);
    assert_eq!(out.trim_end(), "error: no data disk (no swap disk attached)");
    // A 64 MiB disk: 32 MiB swap, the rest free.
    let disk = with_swap(&mut m, 131_072);
    let out = run("disk create web 8", &mut m);
    assert!(out.starts_with("disk web created: 8.0 MiB image at block "), "{out}");
    assert!(out.contains("zero-filled lazily"), "{out}");
    let j: serde_json::Value = serde_json::from_str(&run("disk list --json", &mut m)).unwrap();
    assert_eq!(j["ok"], true, "{j}");
    let ext = j["extents"].as_array().unwrap();
    assert_eq!(ext.len(), 2, "{j}");
    assert_eq!((&ext[0]["name"], &ext[0]["kind"]), (&"swap".into(), &"swap".into()));
    assert_eq!(ext[1]["name"], "web");
    // The image and its 4 KiB header.
    assert_eq!(ext[1]["size_bytes"], (8 << 20) + 4096);
    assert_eq!(ext[1]["created"], 1_700_000_003u64);
    assert_eq!(ext[1]["complete"], true);
    let text = run("disk", &mut m);
    assert!(text.contains("web") && text.contains("2023-11-14 22:13:23") && text.contains("8.0"), "{text}");
    let host_text = run("host", &mut m);
    assert!(
        host_text.contains("data disk: 64.0 MiB, table generation 3 (copy B): swap 32.0 MiB, 1 images"),
        "{host_text}"
    );
    // Bad input: one line each, the table does not change.
    let writes = disk.borrow().stats().writes;
    for (line, msg) in [
        ("disk create web 8", "error: \"web\" already exists"),
        ("disk create big 100", "error: no room: "),
        ("disk create a\u{7f} 1", "is not a disk name"),
        ("disk create x 0", "the size must be"),
        ("disk delete swap", "error: \"swap\" is the host's swap and cannot be deleted"),
        ("disk delete nope", "error: no extent named \"nope\""),
        ("disk delete", "disk delete: use"),
    ] {
        let out = run(line, &mut m);
        assert!(out.contains(msg), "{line}: {out}");
        assert_eq!(out.lines().count(), 1, "{line}: {out}");
    }
    let j: serde_json::Value = serde_json::from_str(&run("disk delete nope --json", &mut m)).unwrap();
    assert_eq!((&j["ok"], &j["command"]), (&false.into(), &"disk delete".into()));
    assert_eq!(disk.borrow().stats().writes, writes, "a refused command wrote");
    assert!(run("disk delete web", &mut m).starts_with("disk web deleted (image, 8.0 MiB freed)"));
    let j: serde_json::Value = serde_json::from_str(&run("disk list --json", &mut m)).unwrap();
    assert_eq!(j["extents"].as_array().unwrap().len(), 1);
}
