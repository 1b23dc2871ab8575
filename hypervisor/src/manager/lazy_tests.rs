//! Lazy restore on the host, through the console commands and a simulated
//! data disk: every page of a restored VM reads right whether it came in by
//! fault, by read-ahead or by the background fill; a damaged checkpoint is
//! refused before the VM exists; damage after the start stops only that VM
//! with a report; the checkpoint cannot be deleted while a VM reads it.

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use mm::swap::{BLOCK_SIZE, BlockStore, MemBlockStore};
use mm::vm_memory::PageState;
use vcpu::{MemAccess, VmExit};

use super::*;
use crate::console::{HostStatus, execute, parse};
use crate::devices::virtio_slots::HostEntropy;
use crate::memory::Swap;
use crate::testing::{Lines, MockBackend, elf_guest};

const MIB: u64 = 1 << 20;

fn manager() -> (Manager<MockBackend>, Rc<RefCell<MemBlockStore>>) {
    let images = vec![GuestImage { name: "tiny".into(), bytes: elf_guest(&[0x90; 32]) }];
    let mut m = Manager::new(Ok(MockBackend::new(24576)), images);
    m.entropy = Some(HostEntropy(|b| {
        b.fill(0x5a);
        true
    }));
    // A 32 MiB disk: half swap, the rest for checkpoints.
    let disk = Rc::new(RefCell::new(MemBlockStore::new(65536)));
    let opts = crate::disk::space::FormatOptions::default();
    let (swap, space) = Swap::attach(Box::new(disk.clone()), "simdisk".into(), &opts, 0, || 0).unwrap();
    m.host_mem.swap = Some(swap);
    m.host_mem.space = Some(space);
    (m, disk)
}

fn run(m: &mut Manager<MockBackend>, line: &str) -> String {
    let mut con = Lines::default();
    execute(&parse(line).unwrap().unwrap(), m, &HostStatus::default(), &mut con);
    con.text()
}

fn json(m: &mut Manager<MockBackend>, line: &str) -> serde_json::Value {
    serde_json::from_str(&run(m, line)).unwrap()
}

/// Page contents no two pages share, some compressible, some not.
fn content(p: u64) -> Vec<u8> {
    let mut x = p.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..4096u64)
        .map(|i| {
            if p % 3 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            } else {
                (i / 64 + p) as u8
            }
        })
        .collect()
}

fn write(m: &mut Manager<MockBackend>, id: u32, gpa: u64, data: &[u8]) {
    let Manager { backend, vms, host_mem, .. } = m;
    let backend = backend.as_mut().unwrap();
    let res = vms.iter_mut().find(|v| v.id == id).unwrap().res.as_mut().unwrap();
    host_mem.with_hooks(id, |h| res.mem.write(&mut backend.mem, h, GuestPhysAddr(gpa), data, &mut |_| {})).unwrap();
}

fn page_of(m: &Manager<MockBackend>, id: u32, gpa: u64) -> Result<Vec<u8>, mm::Error> {
    let mut buf = vec![0; 4096];
    let vm = m.get(id).unwrap();
    vm.res.as_ref().unwrap().mem.peek(&m.backend.as_ref().unwrap().mem, GuestPhysAddr(gpa), &mut buf)?;
    Ok(buf)
}

fn state(m: &Manager<MockBackend>, id: u32, gpa: u64) -> PageState {
    m.get(id).unwrap().res.as_ref().unwrap().mem.page_state(GuestPhysAddr(gpa)).unwrap()
}

/// A guest read of `gpa`, as if VM `id`'s vCPU had exited on it.
fn touch(m: &mut Manager<MockBackend>, id: u32, gpa: u64, con: &mut Lines) -> crate::vm::exit::Flow {
    let Manager { backend, vms, host_mem, .. } = m;
    let backend = backend.as_mut().unwrap();
    let vm = vms.iter_mut().find(|v| v.id == id).unwrap();
    vm.handle_exit(VmExit::NestedPageFault { gpa, access: MemAccess::Read, gva: None }, backend, host_mem, con)
}

/// A 6 MiB VM with 600 pages of known data from 2 MiB on, saved as `cp`.
fn saved(m: &mut Manager<MockBackend>) -> u32 {
    let id = m.run_vm("tiny", 6, "").unwrap();
    for p in 0..600u64 {
        write(m, id, 2 * MIB + p * 4096, &content(p));
    }
    let out = run(m, &format!("vm save {id} cp"));
    assert!(out.contains("saved to checkpoint cp"), "{out}");
    id
}

fn progress(m: &Manager<MockBackend>, id: u32) -> crate::memory::lazy::LazyProgress {
    m.lazy_progress(id).unwrap()
}

#[test]
fn lazy_restore_reads_every_page_right_by_fault_readahead_and_background_fill() {
    let (mut m, _disk) = manager();
    let src = saved(&mut m);
    // No background fill yet: pages come only when touched.
    let out = run(&mut m, "vm restore cp lazy fill=0");
    assert!(out.contains("vm 2 restored from checkpoint cp: tiny (elf64, 6 MiB), running; lazy: "), "{out}");
    let id = 2;
    let p = progress(&m, id);
    assert!(p.on_disk >= 600 && p.on_disk == p.pages_at_start, "{p:?}");
    assert!(out.contains(&format!("lazy: {} of 1536 pages left on disk, filled at 0 pages/s", p.on_disk)), "{out}");
    let j = json(&mut m, "vm stats 2 --json");
    assert_eq!(j["lazy"]["pages_on_disk"], p.on_disk, "{j}");
    assert_eq!(j["pages"]["not_loaded"], p.on_disk, "{j}");
    // Zero pages were applied at once: never on disk.
    assert_eq!(state(&m, id, 5 * MIB), PageState::Present);
    assert_eq!(page_of(&m, id, 5 * MIB).unwrap(), vec![0; 4096]);
    assert_eq!(state(&m, id, 2 * MIB + 5 * 4096), PageState::NotLoaded);

    // A fault in the middle of a block: the page and its aligned block of
    // 16 come in.
    let mut con = Lines::default();
    assert_eq!(touch(&mut m, id, 2 * MIB + 5 * 4096, &mut con), crate::vm::exit::Flow::Continue);
    let p = progress(&m, id);
    assert_eq!((p.faults, p.by_fault, p.by_readahead), (1, 1, 15), "{p:?}");
    for q in 0..16 {
        assert_eq!(page_of(&m, id, 2 * MIB + q * 4096).unwrap(), content(q), "page {q}");
    }
    assert_eq!(state(&m, id, 2 * MIB + 16 * 4096), PageState::NotLoaded);
    // Sequential faults read further ahead: 32, then 64 pages.
    touch(&mut m, id, 2 * MIB + 16 * 4096, &mut con);
    touch(&mut m, id, 2 * MIB + 32 * 4096, &mut con);
    let p = progress(&m, id);
    assert_eq!((p.faults, p.by_fault, p.by_readahead), (3, 3, 15 + 15 + 31), "{p:?}");
    assert_eq!(state(&m, id, 2 * MIB + 63 * 4096), PageState::Present);
    assert_eq!(state(&m, id, 2 * MIB + 64 * 4096), PageState::NotLoaded);
    // A device's access (virtio DMA reads through mm) loads too.
    {
        let Manager { backend, vms, host_mem, .. } = &mut m;
        let backend = backend.as_mut().unwrap();
        let res = vms.iter_mut().find(|v| v.id == id).unwrap().res.as_mut().unwrap();
        let mut buf = vec![0u8; 8];
        let gpa = GuestPhysAddr(2 * MIB + 300 * 4096);
        host_mem.with_hooks(id, |h| res.mem.read(&mut backend.mem, h, gpa, &mut buf, &mut |_| {})).unwrap();
        assert_eq!(buf, content(300)[..8]);
    }
    // The checkpoint is in use: neither delete frees it.
    for line in ["vm checkpoint delete cp", "disk delete cp"] {
        let out = run(&mut m, line);
        assert!(
            out.starts_with("error: checkpoint cp is in use by vm 2: its lazy restore still reads")
                && !out.contains('\n'),
            "{line}: {out}"
        );
    }
    // The background fill, bounded per round, converges.
    m.host_mem.lazy.get_mut(&id).unwrap().progress.fill_rate = 1 << 20;
    let mut rounds = 0;
    while m.host_mem.lazy.contains_key(&id) {
        let before = progress(&m, id).on_disk;
        m.lazy_fill_round(&mut con);
        let after = m.lazy_progress(id).unwrap().on_disk;
        assert!(before - after <= super::lazy::FILL_PAGES_PER_ROUND + 64, "{before} -> {after} in one round");
        // The next round waits for the rate.
        let clock = &m.backend.as_ref().unwrap().clock;
        clock.set(clock.get() + 1_000_000);
        rounds += 1;
        assert!(rounds < 100, "the fill does not converge");
    }
    let p = progress(&m, id);
    assert!(p.complete && p.on_disk == 0 && p.by_background > 0, "{p:?}");
    assert_eq!(p.by_fault + p.by_readahead + p.by_background, p.pages_at_start, "{p:?}");
    assert!(con.text().contains("vm 2: lazy restore from checkpoint cp complete: "), "{}", con.text());
    // Every page of RAM is what the saved VM holds.
    for gpa in (0..6 * MIB).step_by(4096) {
        assert_eq!(page_of(&m, id, gpa).unwrap(), page_of(&m, src, gpa).unwrap(), "page {gpa:#x}");
    }
    // A 2 MiB region loaded whole maps large again.
    let vm = m.get(id).unwrap();
    let leaf = vm.res.as_ref().unwrap().mem.table().translate(&m.backend.as_ref().unwrap().mem, GuestPhysAddr(4 * MIB));
    assert_eq!(leaf.map(|t| t.leaf.size), Some(mm::paging::PageSize::Size2M));
    // Stats keep the fill's figures; the checkpoint is free again.
    let text = run(&mut m, "vm stats 2");
    assert!(text.contains("lazy restore: 0 of ") && text.contains("(fill complete)"), "{text}");
    assert!(text.contains("first guest entry:") || m.get(id).unwrap().stats.first_entry_tsc.is_none(), "{text}");
    let out = run(&mut m, "vm checkpoint delete cp");
    assert!(out.contains("checkpoint cp deleted"), "{out}");
}

#[test]
fn a_checkpoint_with_a_flipped_bit_is_refused_before_the_vm_exists() {
    let (mut m, disk) = manager();
    saved(&mut m);
    let start = m.host_mem.space.as_ref().unwrap().get("cp").unwrap().start;
    let bytes = m.host_mem.space.as_ref().unwrap().get("cp").unwrap().bytes;
    // A bit in the middle of the stream (in some memory record).
    let block = start + bytes / 2 / BLOCK_SIZE as u64;
    let mut buf = vec![0u8; BLOCK_SIZE];
    disk.borrow_mut().read(block, &mut buf).unwrap();
    buf[100] ^= 0x04;
    disk.borrow_mut().write(block, &buf).unwrap();
    let frames = m.backend.as_ref().unwrap().mem.frames_in_use();
    let out = run(&mut m, "vm restore cp lazy");
    assert!(out.starts_with("error: checkpoint cp: ") && out.contains("checksum") && !out.contains('\n'), "{out}");
    assert_eq!(m.vms.len(), 1);
    assert!(m.host_mem.lazy.is_empty());
    assert_eq!(m.backend.as_ref().unwrap().mem.frames_in_use(), frames, "frames leaked");
}

#[test]
fn damage_after_the_start_stops_that_vm_with_a_report_and_the_host_goes_on() {
    let (mut m, disk) = manager();
    let src = saved(&mut m);
    run(&mut m, "vm restore cp lazy fill=0");
    run(&mut m, "vm restore cp lazy fill=0");
    let info = m.host_mem.space.as_ref().unwrap().get("cp").unwrap();
    // The checkpoint is overwritten after both VMs started: every record
    // read from now on fails its checksums.
    let first_data = 2048 / BLOCK_SIZE as u64;
    let blocks = info.bytes.div_ceil(BLOCK_SIZE as u64);
    for b in first_data..blocks {
        disk.borrow_mut().write(info.start + b, &[0xa5; BLOCK_SIZE]).unwrap();
    }
    // VM 2: its guest touches a page on disk; it is stopped with the report.
    let mut con = Lines::default();
    let frames = m.backend.as_ref().unwrap().mem.frames_in_use();
    assert_eq!(touch(&mut m, 2, 2 * MIB + 100 * 4096, &mut con), crate::vm::exit::Flow::Stop);
    let vm = m.get(2).unwrap();
    let RunState::Stopped { reason } = &vm.state else { panic!("{:?}", vm.state) };
    assert!(
        reason.starts_with("lazy restore from checkpoint cp: guest page 0x264000 (record ")
            && reason.contains("could not be read")
            && !reason.contains('\n'),
        "{reason}"
    );
    assert!(con.text().contains("vm 2 (tiny) stopped: lazy restore from checkpoint cp"), "{}", con.text());
    // VM 3: the background fill finds the damage; stopped alike.
    m.host_mem.lazy.get_mut(&3).unwrap().progress.fill_rate = 1 << 20;
    // (VM 2 ended inside an exit; the scheduler frees it after the slice.)
    let Manager { backend, vms, host_mem, .. } = &mut m;
    release(backend.as_mut().unwrap(), host_mem, &mut vms[1]);
    m.lazy_fill_round(&mut con);
    let vm = m.get(3).unwrap();
    assert!(vm.res.is_none(), "vm 3 still runs");
    let RunState::Stopped { reason } = &vm.state else { panic!("{:?}", vm.state) };
    assert!(
        reason.contains("checkpoint cp") && reason.contains("record ") && reason.contains("guest page"),
        "{reason}"
    );
    assert!(m.host_mem.lazy.is_empty(), "sources dropped with their VMs");
    assert!(m.backend.as_ref().unwrap().mem.frames_in_use() < frames, "the stopped VMs' memory came back");
    // The host goes on: the original VM is untouched and answers; the
    // checkpoint may now go.
    assert_eq!(page_of(&m, src, 2 * MIB).unwrap(), content(0));
    assert!(run(&mut m, "vm stats 1").starts_with("vm 1 (tiny"));
    assert!(run(&mut m, "vm checkpoint delete cp").contains("deleted"));
}

#[test]
fn a_vm_of_several_vcpus_saves_and_restores_lazily_through_the_console() {
    let (mut m, _disk) = manager();
    let out = run(&mut m, "vm run tiny mem=6 vcpus=3");
    assert!(out.starts_with("vm 1 started"), "{out}");
    for p in 0..64u64 {
        write(&mut m, 1, 2 * MIB + p * 4096, &content(p));
    }
    let vm = m.vms.iter_mut().find(|v| v.id == 1).unwrap();
    let res = vm.res.as_mut().unwrap();
    res.vcpus[1].state = crate::vm::VcpuState::Halted;
    let out = run(&mut m, "vm save 1 cp live");
    assert!(out.contains("live save to checkpoint cp started"), "{out}");
    let mut con = Lines::default();
    for _ in 0..64 {
        if m.live_save().is_none() {
            break;
        }
        m.checkpoint_round(&mut con);
    }
    assert!(con.text().contains("vm 1 saved to checkpoint cp: "), "{}", con.text());
    let list = json(&mut m, "vm checkpoints --json");
    assert_eq!(list["checkpoints"][0]["complete"], true, "{list}");
    let out = run(&mut m, "vm restore cp lazy fill=0");
    assert!(out.contains("vm 2 restored from checkpoint cp: tiny (elf64, 6 MiB), running; lazy: "), "{out}");
    let states: Vec<_> = m.get(2).unwrap().res.as_ref().unwrap().vcpus.iter().map(|s| s.state).collect();
    use crate::vm::VcpuState::*;
    assert_eq!(states, [Runnable, Halted, WaitForSipi]);
    assert_eq!(state(&m, 2, 2 * MIB + 7 * 4096), PageState::NotLoaded);
    let mut con = Lines::default();
    assert_eq!(touch(&mut m, 2, 2 * MIB + 7 * 4096, &mut con), crate::vm::exit::Flow::Continue);
    assert_eq!(page_of(&m, 2, 2 * MIB + 7 * 4096).unwrap(), content(7));
    let stats = run(&mut m, "vm stats 2");
    assert!(stats.contains("vcpu 1: halted") && stats.contains("vcpu 2: wait-for-sipi"), "{stats}");
}
