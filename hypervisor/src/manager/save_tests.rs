//! Saves in steps: a live save is the VM at the instant it began while the
//! VM goes on writing; the stream reaches its target through the staging
//! buffer in few large writes; a failed or abandoned live save leaves
//! nothing and the VM runs on.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use super::save_job::{STAGING_BYTES, SaveTarget, Saved};
use super::*;
use crate::devices::virtio_slots::HostEntropy;
use crate::memory::HostMemory;
use crate::testing::{MockBackend, elf_guest};

fn manager(frames: usize) -> Manager<MockBackend> {
    let images = vec![GuestImage { name: "tiny".into(), bytes: elf_guest(&[0x90; 32]) }];
    let mut m = Manager::new(Ok(MockBackend::new(frames)), images);
    m.entropy = Some(HostEntropy(|b| {
        b.fill(0x5a);
        true
    }));
    m
}

/// Incompressible (xorshift) contents, distinct per seed.
fn pattern(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A write as the guest's vCPU makes it: through the nested tables,
/// faulting on the snapshot's write protection.
fn guest_write(m: &mut Manager<MockBackend>, id: u32, gpa: u64, data: &[u8]) {
    let Manager { backend, vms, host_mem, .. } = m;
    let backend = backend.as_mut().unwrap();
    let res = vms.iter_mut().find(|v| v.id == id).unwrap().res.as_mut().unwrap();
    host_mem
        .with_hooks(id, |h| res.mem.sim_write(&mut backend.mem, h, 0, GuestPhysAddr(gpa), data))
        .unwrap_or_else(|e| panic!("guest write at {gpa:#x}: {e:?}"));
}

/// A write as a device's DMA makes it (through `mm`'s host path).
fn dma_write(m: &mut Manager<MockBackend>, id: u32, gpa: u64, data: &[u8]) {
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

/// A target in memory that counts its writes.
#[derive(Clone, Default)]
struct MemTarget {
    bytes: Rc<RefCell<Vec<u8>>>,
    writes: Rc<RefCell<Vec<usize>>>,
    committed: Rc<RefCell<Option<bool>>>,
    fail_after: Option<usize>,
}

impl migrate::Sink for MemTarget {
    fn write(&mut self, bytes: &[u8]) -> Result<(), migrate::IoError> {
        if self.fail_after.is_some_and(|n| self.writes.borrow().len() >= n) {
            return Err(migrate::IoError("the test's disk failed"));
        }
        self.bytes.borrow_mut().extend_from_slice(bytes);
        self.writes.borrow_mut().push(bytes.len());
        Ok(())
    }
}

impl SaveTarget for MemTarget {
    fn name(&self) -> &str {
        "mem"
    }
    fn commit(self: Box<Self>, _: &mut HostMemory, saved: &Saved) -> Result<String, String> {
        *self.committed.borrow_mut() = Some(true);
        Ok(alloc::format!("saved {} bytes", saved.stats.bytes))
    }
    fn abort(self: Box<Self>, _: &mut HostMemory) {
        *self.committed.borrow_mut() = Some(false);
    }
}

#[derive(Default)]
struct Lines(Vec<String>);

impl crate::vm::exit::Console for Lines {
    fn line(&mut self, text: &str) {
        self.0.push(String::from(text));
    }
}

#[test]
fn a_live_save_is_the_instant_it_began_while_the_vm_writes_on() {
    let mut m = manager(16384);
    let id = m.run_vm("tiny", 24, "").unwrap();
    for p in 0..1024u64 {
        dma_write(&mut m, id, 0x40_0000 + p * 4096, &pattern(p));
    }
    let large_at_start = m.nested_pages_now(id).unwrap()[1];
    assert!(large_at_start > 0, "a 24 MiB VM is mapped with 2 MiB pages");
    let target = MemTarget::default();
    let pause = m.start_live_save(id, Box::new(target.clone()), String::new(), None).unwrap();
    // The snapshot protects every page on its own: no large leaf while it runs.
    assert_eq!(m.nested_pages_now(id).unwrap()[1], 0);
    assert!(pause < m.backend.as_ref().unwrap().tsc_hz(), "paused {pause} ticks");
    assert!(matches!(
        m.start_live_save(id, Box::new(MemTarget::default()), String::new(), None),
        Err(Error::SaveRunning(i)) if i == id
    ));
    let mut con = Lines::default();
    // The guest and a device rewrite pages ahead of the save and behind it
    // between steps.
    let mut rounds = 0;
    while m.live_save.is_some() {
        for p in (rounds * 97..1024).step_by(61) {
            guest_write(&mut m, id, 0x40_0000 + p * 4096 + 8, &[0xee; 16]);
        }
        dma_write(&mut m, id, 0x40_0000 + (rounds % 1024) * 4096, &[0xdd; 64]);
        m.checkpoint_round(&mut con);
        rounds += 1;
        assert!(rounds < 400, "the save does not end");
    }
    assert!(rounds >= 8, "24 MiB in {rounds} steps of {} pages", super::save_job::PAGES_PER_STEP);
    assert_eq!(*target.committed.borrow(), Some(true));
    assert_eq!(con.0.len(), 1, "{:?}", con.0);
    let line = &con.0[0];
    assert!(line.contains("; live: pause ") && line.contains(" pages copied on write"), "{line}");
    let copies: u64 = line.split(" pages copied on write").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(copies > 0, "{line}");
    // The VM kept what it wrote; the checkpoint has what was there before.
    assert_eq!(&peek(&m, id, 0x40_0000 + 61 * 4096)[8..24], &[0xee; 16]);
    let stream = target.bytes.borrow().clone();
    // Through the staging buffer: full buffers only, but the last.
    let writes = target.writes.borrow().clone();
    assert!(writes.len() >= 2, "{writes:?}");
    assert!(writes[..writes.len() - 1].iter().all(|&n| n >= STAGING_BYTES), "{writes:?}");
    let restored = m.restore_vm(stream.as_slice()).unwrap();
    // Its table as built, counted as for a VM started here.
    let now = m.nested_pages_now(restored).unwrap();
    assert_eq!(m.get(restored).unwrap().nested_pages, now);
    assert!(m.get(restored).unwrap().nested_pages[1] > 0);
    for p in 0..1024u64 {
        assert_eq!(peek(&m, restored, 0x40_0000 + p * 4096), pattern(p), "page {p}");
    }
    // The snapshot is over: writes need no copy, large pages are back.
    let vm = m.get(id).unwrap();
    assert!(vm.res.as_ref().unwrap().mem.snapshot_stats().is_none());
    assert!(m.nested_pages_now(id).unwrap()[1] > 0, "large pages merged again");
    guest_write(&mut m, id, 0x40_0000, &[1; 8]);
}

#[test]
fn a_vm_that_ends_during_a_live_save_is_saved_first_and_a_failed_save_leaves_nothing() {
    let mut m = manager(8192);
    let id = m.run_vm("tiny", 16, "").unwrap();
    dma_write(&mut m, id, 0x30_0000, &pattern(5));
    let target = MemTarget::default();
    m.start_live_save(id, Box::new(target.clone()), String::new(), None).unwrap();
    guest_write(&mut m, id, 0x30_0000, &[0; 64]);
    let mut con = Lines::default();
    m.stop(id, &mut con).unwrap();
    assert!(m.live_save.is_none());
    assert_eq!(*target.committed.borrow(), Some(true), "{:?}", con.0);
    let stream = target.bytes.borrow().clone();
    let restored = m.restore_vm(stream.as_slice()).unwrap();
    assert_eq!(peek(&m, restored, 0x30_0000), pattern(5));

    // The target fails: aborted, said, the VM runs on unchanged
    // and without its snapshot.
    let target = MemTarget { fail_after: Some(0), ..MemTarget::default() };
    m.start_live_save(restored, Box::new(target.clone()), String::new(), None).unwrap();
    let mut con = Lines::default();
    for _ in 0..20 {
        m.checkpoint_round(&mut con);
    }
    assert!(m.live_save.is_none());
    assert_eq!(*target.committed.borrow(), Some(false));
    assert!(con.0.iter().any(|l| l.contains("live save failed, nothing kept")), "{:?}", con.0);
    let vm = m.get(restored).unwrap();
    assert!(vm.res.is_some() && vm.res.as_ref().unwrap().mem.snapshot_stats().is_none());
    assert_eq!(peek(&m, restored, 0x30_0000), pattern(5));
}

#[test]
fn the_boot_cpu_does_not_halt_idle_while_a_live_save_moves() {
    let mut m = manager(16384);
    let id = m.run_vm("tiny", 8, "").unwrap();
    assert!(m.idle_until().is_some());
    m.start_live_save(id, Box::new(MemTarget::default()), String::new(), None).unwrap();
    assert_eq!(m.idle_until(), None, "the save moves at every turn of the main loop");
    let mut con = crate::testing::Lines::default();
    while m.live_save.is_some() {
        m.checkpoint_round(&mut con);
    }
    assert!(m.idle_until().is_some());
}
