//! The balloon wired to the memory manager, on the host: a driver (played
//! here through the VM's own RAM) inflates pages, and `mm` takes their
//! frames; it deflates them, and they are backed again; pages it reports
//! free lose their frames and come back zeroed when touched; `vm balloon`
//! sets the target the driver reads.

use alloc::vec;
use alloc::vec::Vec;
use mm::vm_memory::PageState;

use super::*;
use crate::devices::DeviceSet;
use crate::devices::virtio::GuestMemory as Dma;
use crate::devices::virtio::balloon::feature as bf;
use crate::devices::virtio::feature::VERSION_1;
use crate::devices::virtio::mmio::{reg, status};
use crate::devices::virtio::queue::VIRTQ_DESC_F_NEXT;
use crate::testing::{MockBackend, elf_guest};

/// Rings of queue `q`: descriptors, avail and used, 4 KiB apart from
/// 0x10000 + 0x4000 q; page lists at 0x30000.
fn ring(q: u64) -> u64 {
    0x10000 + 0x4000 * q
}
const LIST: u64 = 0x30000;

fn manager() -> (Manager<MockBackend>, u32) {
    let images = vec![GuestImage { name: "tiny".into(), bytes: elf_guest(&[0x90; 32]) }];
    let mut m = Manager::new(Ok(MockBackend::new(16384)), images);
    let id = m.run_vm("tiny", 4, "").unwrap();
    (m, id)
}

/// Runs `f` with the VM's devices and its RAM as the device sees it.
fn dma<R>(m: &mut Manager<MockBackend>, id: u32, f: impl FnOnce(&mut DeviceSet, &mut dyn Dma) -> R) -> R {
    let Manager { backend, vms, host_mem, .. } = m;
    let vm = vms.iter_mut().find(|v| v.id == id).unwrap();
    vm.with_dma(backend.as_mut().unwrap(), host_mem, f).unwrap()
}

fn service(m: &mut Manager<MockBackend>, id: u32) {
    let Manager { backend, vms, host_mem, .. } = m;
    let vm = vms.iter_mut().find(|v| v.id == id).unwrap();
    vm.service_balloon(backend.as_mut().unwrap(), host_mem);
}

fn state(m: &Manager<MockBackend>, id: u32, gpa: u64) -> PageState {
    m.get(id).unwrap().res.as_ref().unwrap().mem.page_state(GuestPhysAddr(gpa)).unwrap()
}

/// The balloon's register page.
fn base(d: &mut DeviceSet) -> u64 {
    d.virtio_slots()
        .iter()
        .map(|s| u64::from(s.base))
        .find(|&b| d.mmio_read(b + reg::DEVICE_ID, 4, 0) == Some(5))
        .expect("every VM has a balloon")
}

/// The driver's handshake with PAGE_REPORTING (no stats): inflateq 0,
/// deflateq 1, reporting 2, 8 entries each.
fn driver_up(m: &mut Manager<MockBackend>, id: u32) -> u64 {
    dma(m, id, |d, mem| {
        let b = base(d);
        let mut w = |d: &mut DeviceSet, r: u64, v: u64| assert!(d.virtio_write(b + r, 4, v, mem));
        w(d, reg::STATUS, u64::from(status::ACKNOWLEDGE | status::DRIVER));
        w(d, reg::DRIVER_FEATURES_SEL, 0);
        w(d, reg::DRIVER_FEATURES, bf::PAGE_REPORTING);
        w(d, reg::DRIVER_FEATURES_SEL, 1);
        w(d, reg::DRIVER_FEATURES, VERSION_1 >> 32);
        let fok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w(d, reg::STATUS, u64::from(fok));
        for q in 0..3 {
            w(d, reg::QUEUE_SEL, q);
            w(d, reg::QUEUE_NUM, 8);
            w(d, reg::QUEUE_DESC_LOW, ring(q));
            w(d, reg::QUEUE_DRIVER_LOW, ring(q) + 0x1000);
            w(d, reg::QUEUE_DEVICE_LOW, ring(q) + 0x2000);
            w(d, reg::QUEUE_READY, 1);
        }
        w(d, reg::STATUS, u64::from(fok | status::DRIVER_OK));
        b
    })
}

/// Publishes one chain on queue `q` (descriptors `descs` from index 0,
/// as (addr, len, flags)), as the guest's `n`-th on that queue, and
/// notifies.
fn submit(m: &mut Manager<MockBackend>, id: u32, b: u64, q: u64, n: u16, descs: &[(u64, u32, u16)], list: &[u8]) {
    dma(m, id, |d, mem| {
        mem.write(LIST, list).unwrap();
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let mut e = [0u8; 16];
            e[..8].copy_from_slice(&addr.to_le_bytes());
            e[8..12].copy_from_slice(&len.to_le_bytes());
            let more = if i + 1 < descs.len() { VIRTQ_DESC_F_NEXT } else { 0 };
            e[12..14].copy_from_slice(&(flags | more).to_le_bytes());
            e[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            mem.write(ring(q) + 16 * i as u64, &e).unwrap();
        }
        mem.write(ring(q) + 0x1000 + 4 + 2 * u64::from(n % 8), &0u16.to_le_bytes()).unwrap();
        mem.write(ring(q) + 0x1000 + 2, &(n + 1).to_le_bytes()).unwrap();
        assert!(d.virtio_write(b + reg::QUEUE_NOTIFY, 4, q, mem));
    });
}

fn used_idx(m: &mut Manager<MockBackend>, id: u32, q: u64) -> u16 {
    dma(m, id, |_, mem| {
        let mut b = [0u8; 2];
        mem.read(ring(q) + 0x2002, &mut b).unwrap();
        u16::from_le_bytes(b)
    })
}

fn pfns(pages: &[u64]) -> Vec<u8> {
    pages.iter().flat_map(|p| (*p as u32).to_le_bytes()).collect()
}

#[test]
fn inflate_takes_frames_deflate_gives_them_back_and_reports_discard() {
    let (mut m, id) = manager();
    let b = driver_up(&mut m, id);
    // The operator asks for 1 MiB.
    let (before, _) = m.set_balloon(id, 1).unwrap();
    assert_eq!(before, 0);
    assert_eq!(m.get(id).unwrap().devices.balloon().unwrap().target(), 256);
    assert_eq!(m.set_balloon(id, 5), Err(Error::BalloonTooLarge { id, mib: 5, mem_mib: 4 }));
    let in_use = m.backend.as_ref().unwrap().mem.frames_in_use();
    // Inflate pages 0x200..0x203 (2 MiB up): held until serviced.
    let list = pfns(&[0x200, 0x201, 0x202]);
    submit(&mut m, id, b, 0, 0, &[(LIST, 12, 0)], &list);
    assert_eq!(used_idx(&mut m, id, 0), 0, "a chain went back before its pages were taken");
    assert!(m.get(id).unwrap().devices.balloon_needs_service());
    service(&mut m, id);
    assert_eq!(used_idx(&mut m, id, 0), 1);
    for p in 0x200..0x203u64 {
        assert_eq!(state(&m, id, p << 12), PageState::Ballooned);
    }
    assert_eq!(state(&m, id, 0x203 << 12), PageState::Present);
    assert_eq!(m.get(id).unwrap().stats.balloon.inflated, 3);
    // The VM's RAM is in 2 MiB chunks: the chunk stays allocated, but its
    // mapping is split and the three pages have no frame (mm's counts).
    let _ = in_use;
    // Deflate one of them: backed again.
    submit(&mut m, id, b, 1, 0, &[(LIST, 4, 0)], &pfns(&[0x201]));
    service(&mut m, id);
    assert_eq!(used_idx(&mut m, id, 1), 1);
    assert_eq!(state(&m, id, 0x201 << 12), PageState::Present);
    assert_eq!(m.get(id).unwrap().stats.balloon.deflated, 1);
    // Reported free ranges (device-writable buffers: 2 pages at 0x280000
    // and the last page of RAM): discarded, not counted as inflated, read
    // back as zeros.
    dma(&mut m, id, |_, mem| mem.write(0x28_0000, &[0xab; 8192]).unwrap());
    let w = crate::devices::virtio::queue::VIRTQ_DESC_F_WRITE;
    submit(&mut m, id, b, 2, 0, &[(0x28_0000, 8192, w), (0x3f_f000, 0x1000, w)], &[]);
    service(&mut m, id);
    assert_eq!(used_idx(&mut m, id, 2), 1);
    assert_eq!(state(&m, id, 0x28_0000), PageState::Ballooned);
    assert_eq!(state(&m, id, 0x28_1000), PageState::Ballooned);
    let s = m.get(id).unwrap().stats.balloon;
    assert_eq!((s.inflated, s.reported), (3, 3), "two pages and the last page of RAM");
    let back = dma(&mut m, id, |_, mem| {
        let mut buf = vec![0xffu8; 8192];
        mem.read(0x28_0000, &mut buf).unwrap();
        buf
    });
    assert!(back.iter().all(|&b| b == 0), "a reported page came back with old contents");
    // A write backs it again.
    dma(&mut m, id, |_, mem| mem.write(0x28_0000, &[1; 8]).unwrap());
    assert_eq!(state(&m, id, 0x28_0000), PageState::Present);
}

#[test]
fn a_host_target_balloons_the_guest_with_a_driver_and_swaps_the_one_without() {
    use crate::console::{HostStatus, execute, parse};
    use crate::memory::Swap;
    use crate::testing::Lines;
    use alloc::boxed::Box;
    use alloc::rc::Rc;
    use core::cell::RefCell;
    use mm::swap::MemBlockStore;

    let images = vec![GuestImage { name: "tiny".into(), bytes: elf_guest(&[0x90; 32]) }];
    let mut m = Manager::new(Ok(MockBackend::new(8192)), images);
    let disk = Rc::new(RefCell::new(MemBlockStore::new(65536)));
    let opts = crate::disk::space::FormatOptions::default();
    let (swap, space) = Swap::attach(Box::new(disk), "simdisk".into(), &opts, 0, || 0).unwrap();
    m.host_mem.swap = Some(swap);
    m.host_mem.space = Some(space);
    let with_driver = m.run_vm("tiny", 8, "").unwrap();
    let without = m.run_vm("tiny", 8, "").unwrap();
    driver_up(&mut m, with_driver);
    // Both VMs' RAM is present (the mock backs it all at start).
    let free = m.backend.as_ref().unwrap().free_frames();
    let run = |line: &str, m: &mut Manager<MockBackend>| {
        let mut con = Lines::default();
        execute(&parse(line).unwrap().unwrap(), m, &HostStatus::default(), &mut con);
        con.text()
    };
    // About 4 MiB more free than now (the MiB rounds down).
    let want_mib = (free >> 8) + 4;
    let out = run(&format!("mem target host {want_mib}"), &mut m);
    assert!(out.starts_with(&format!("host target: {want_mib} MiB free")), "{out}");
    let plan = m.host_reclaim_round().expect("a planning round");
    assert!(plan.need > 768 && plan.planned == plan.need, "{plan:?}");
    let a = m.get(with_driver).unwrap();
    let note = a.reclaim.planned.expect("a plan note");
    assert!(note.action.balloon_pages > 0 && note.action.swap_pages == 0, "{note:?}");
    assert!(note.why.starts_with("balloon"), "{note:?}");
    assert_eq!(u64::from(a.devices.balloon().unwrap().target()), note.action.balloon_pages);
    let b = m.get(without).unwrap();
    let note = b.reclaim.planned.expect("a plan note");
    assert!(note.action.swap_pages > 0 && note.action.balloon_pages == 0, "{note:?}");
    assert_eq!(note.why, "swap: its guest has no balloon driver");
    assert!(b.reclaim.target.is_some());
    // The next scheduling rounds swap the second VM out.
    m.reclaim_round();
    assert!(state_counts(&m, without).swapped > 0, "the VM without a balloon was not swapped");
    assert_eq!(state_counts(&m, with_driver).swapped, 0, "the VM with a balloon was swapped");
    // `mem` says what was planned and why, in text and JSON.
    let text = run("mem", &mut m);
    assert!(text.contains("host target: ") && text.contains("swap: its guest has no balloon driver"), "{text}");
    let j: serde_json::Value = serde_json::from_str(&run("mem --json", &mut m)).unwrap();
    assert_eq!(j["vms"][0]["balloon_driver"], true, "{j}");
    assert_eq!(j["vms"][1]["host_plan"]["why"], "swap: its guest has no balloon driver", "{j}");
    // Within a second of the last round nothing is planned again.
    assert!(m.host_reclaim_round().is_none());
    run("mem target host none", &mut m);
    assert_eq!(m.host_mem.host_target, None);
}

fn state_counts(m: &Manager<MockBackend>, id: u32) -> mm::vm_memory::StateCounts {
    m.get(id).unwrap().res.as_ref().unwrap().mem.state_counts()
}
