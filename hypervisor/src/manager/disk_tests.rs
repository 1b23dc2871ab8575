//! VM disks on the host: an image of the data disk attached to a VM's
//! virtio-blk device (`vm run ... disk=`), held by it (no second VM, no
//! `disk delete`), kept across a checkpoint, and what was written through
//! it on the disk.

use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use core::cell::RefCell;
use mm::swap::MemBlockStore;

use super::*;
use crate::console::{HostStatus, execute, parse};
use crate::devices::virtio::block::BlockBackend;
use crate::memory::Swap;
use crate::testing::{Lines, MockBackend, elf_guest};

fn manager() -> (Manager<MockBackend>, Rc<RefCell<MemBlockStore>>) {
    let images = vec![GuestImage { name: "tiny".into(), bytes: elf_guest(&[0x90; 32]) }];
    let mut m = Manager::new(Ok(MockBackend::new(16384)), images);
    // A 32 MiB data disk: half swap.
    let disk = Rc::new(RefCell::new(MemBlockStore::new(65536)));
    let opts = crate::disk::space::FormatOptions::default();
    let (swap, space) = Swap::attach(Box::new(disk.clone()), "simdisk".into(), &opts, 0, || 0).unwrap();
    m.host_mem.swap = Some(swap);
    m.host_mem.space = Some(space);
    (m, disk)
}

fn run(line: &str, m: &mut Manager<MockBackend>) -> String {
    let host = HostStatus::default();
    let mut con = Lines::default();
    match parse(line) {
        Ok(Some(p)) => {
            execute(&p, m, &host, &mut con);
        }
        Ok(None) => {}
        Err(e) => crate::console::commands::report_parse_error(&e, &mut con),
    }
    con.text()
}

#[test]
fn an_image_is_one_vms_disk_until_that_vm_ends() {
    let (mut m, _) = manager();
    assert!(run("disk create d1 2", &mut m).starts_with("disk d1 created: 2.0 MiB image"));
    let out = run("vm run tiny mem=4 disk=d1", &mut m);
    assert!(out.starts_with("vm 1 started"), "{out}");
    let (name, _) = m.get(1).unwrap().devices.block_disk().expect("vm 1 has a virtio-blk disk");
    assert_eq!(name, "d1");
    // The DSDT lists its slot: a device at the second virtio-mmio page
    // (the first is virtio-rng's, when the host has entropy).
    assert_eq!(m.disk_user("d1"), Some(1));
    // Held: not deleted, not given to another VM. Bad names refused.
    for (line, want) in [
        ("disk delete d1", "error: "),
        ("vm run tiny mem=4 disk=d1", "error: disk d1: vm 1 uses it"),
        ("vm run tiny mem=4 disk=swap", "error: disk swap: it is a swap, not a disk image"),
        ("vm run tiny mem=4 disk=nope", "error: disk nope: no such image"),
    ] {
        let out = run(line, &mut m);
        assert!(out.starts_with(want) && out.lines().count() == 1, "{line}: {out}");
    }
    assert!(run("disk delete d1", &mut m).contains("vm 1"), "the refusal names the user");
    assert_eq!(m.vms.len(), 1, "a refused vm run left a VM behind");
    // What the device writes is on the data disk: a new handle reads it.
    let mut dev = m.get(1).unwrap().devices.block_backend().unwrap();
    dev.write(4096, &[0xa5; 512]).unwrap();
    run("vm stop 1", &mut m);
    assert_eq!(m.disk_user("d1"), None, "an ended VM still holds its disk");
    let mut again = m.open_disk("d1").unwrap();
    let mut buf = [0u8; 1024];
    again.read(3584, &mut buf).unwrap();
    assert_eq!(&buf[..512], &[0; 512], "before the write: zeros");
    assert_eq!(&buf[512..], &[0xa5; 512]);
    assert!(run("disk delete d1", &mut m).starts_with("disk d1 deleted"));
}

#[test]
fn a_checkpoint_names_the_disk_and_its_restore_attaches_it() {
    let (mut m, _) = manager();
    run("disk create d1 2", &mut m);
    let id = m.run_vm_with_disk("tiny", 4, &[], "", Some("d1")).unwrap();
    let (stream, _) = m.save_vm(id, Vec::new()).unwrap();
    // While vm 1 holds the disk, the checkpoint cannot be restored.
    let e = m.restore_vm(stream.as_slice()).unwrap_err();
    assert_eq!(e, Error::Disk { name: "d1".into(), why: Box::new(DiskRefusal::InUse(1)) });
    assert_eq!(m.vms.len(), 1);
    run("vm stop 1", &mut m);
    let restored = m.restore_vm(stream.as_slice()).unwrap();
    let vm = m.get(restored).unwrap();
    assert_eq!(vm.devices.block_disk().map(|(n, _)| n), Some("d1"));
    assert_eq!(vm.devices.block_backend().unwrap().capacity(), 2 << 20, "the real image, not the stand-in");
    assert_eq!(m.disk_user("d1"), Some(restored));
    // Without the image the restore is refused and nothing is left.
    run(&format!("vm stop {restored}"), &mut m);
    assert!(run("disk delete d1", &mut m).starts_with("disk d1 deleted"));
    let before = m.vms.len();
    let e = m.restore_vm(stream.as_slice()).unwrap_err();
    assert_eq!(e, Error::Disk { name: "d1".into(), why: Box::new(DiskRefusal::NotFound) });
    assert_eq!(m.vms.len(), before);
}

#[test]
fn the_console_restores_a_vm_with_its_disk() {
    let (mut m, _) = manager();
    run("disk create d1 2", &mut m);
    run("vm run tiny mem=4 disk=d1", &mut m);
    let out = run("vm save 1 c1", &mut m);
    assert!(out.contains("saved to checkpoint c1"), "{out}");
    let out = run("vm restore c1", &mut m);
    assert_eq!(out, "error: checkpoint c1: disk d1: vm 1 uses it");
    run("vm stop 1", &mut m);
    let out = run("vm restore c1", &mut m);
    assert!(out.starts_with("vm 2 restored from checkpoint c1"), "{out}");
    assert_eq!(m.disk_user("d1"), Some(2));
}

#[test]
fn a_checkpoint_keeps_the_disk_as_it_was_and_restore_puts_it_back() {
    let (mut m, _) = manager();
    run("disk create d1 2", &mut m);
    run("vm run tiny mem=4 disk=d1", &mut m);
    let mut dev = m.get(1).unwrap().devices.block_backend().unwrap();
    dev.write(8192, &[0xa1; 1024]).unwrap();
    let out = run("vm save 1 c1", &mut m);
    assert!(out.contains("saved to checkpoint c1") && out.contains("disk d1 copied to image c1~disk"), "{out}");
    // The guest goes on writing after the save.
    dev.write(8192, &[0xb2; 512]).unwrap();
    dev.write(1 << 20, &[0xb2; 512]).unwrap();
    run("vm stop 1", &mut m);
    let out = run("vm restore c1", &mut m);
    assert!(out.starts_with("vm 2 restored from checkpoint c1"), "{out}");
    let mut back = m.get(2).unwrap().devices.block_backend().unwrap();
    let mut buf = vec![0u8; 1024];
    back.read(8192, &mut buf).unwrap();
    assert_eq!(buf, [0xa1; 1024], "the restored disk is not the one of the save");
    back.read(1 << 20, &mut buf).unwrap();
    assert_eq!(buf, [0; 1024], "a write after the save survived the restore");
    // Deleting the checkpoint frees its disk copy too; a name too long
    // for the copy is refused before anything is written.
    run("vm stop 2", &mut m);
    assert!(run("vm checkpoint delete c1", &mut m).starts_with("checkpoint c1 deleted"));
    assert!(run("disk list", &mut m).lines().all(|l| !l.starts_with("c1")), "{}", run("disk list", &mut m));
    run("vm run tiny mem=4 disk=d1", &mut m);
    let long = "n".repeat(30);
    let out = run(&format!("vm save 3 {long}"), &mut m);
    assert!(out.starts_with("error: vm 3 has a disk") && out.lines().count() == 1, "{out}");
    assert!(run("disk list", &mut m).lines().all(|l| !l.starts_with("nnn")));
}

#[test]
fn an_image_can_start_as_a_copy_of_a_ramdisk_file() {
    let (mut m, _) = manager();
    let file = m.image_bytes("tiny").unwrap();
    let out = run("disk create d2 1 from=tiny", &mut m);
    assert!(out.contains(&format!("{} bytes copied from tiny", file.len())), "{out}");
    let mut img = m.open_disk("d2").unwrap();
    let padded = file.len().next_multiple_of(512);
    let mut buf = vec![0xffu8; padded + 512];
    img.read(0, &mut buf).unwrap();
    assert_eq!(&buf[..file.len()], file, "the copy differs from the file");
    assert!(buf[file.len()..].iter().all(|&b| b == 0), "past the copy the image reads zero");
    for (line, want) in [
        ("disk create d3 1 from=nope", "error: no ramdisk file \"nope\" to copy"),
        ("disk create d2 1 from=tiny", "already exists"),
    ] {
        let out = run(line, &mut m);
        assert!(out.starts_with("error:") && out.contains(want), "{line}: {out}");
    }
    assert!(m.open_disk("d3").is_err(), "a refused create left an image");
}

#[test]
fn a_live_save_snapshots_the_disk_copy_on_write_while_the_guest_writes_it() {
    let (mut m, _) = manager();
    run("disk create d1 2", &mut m);
    run("vm run tiny mem=4 disk=d1", &mut m);
    let mut dev = m.get(1).unwrap().devices.block_backend().unwrap();
    // 320 KiB: five 64 KiB chunks of the instant.
    for (i, at) in (0..320 * 1024).step_by(64 * 1024).enumerate() {
        dev.write(at, &vec![0xa0 + i as u8; 64 * 1024]).unwrap();
    }
    let out = run("vm save 1 c1 live", &mut m);
    assert!(out.contains("live save to checkpoint c1 started") && out.contains("disk d1 to image c1~disk"), "{out}");
    // The guest writes its disk while the save runs: through the device's
    // backend, which copies first.
    let mut now = m.get(1).unwrap().devices.block_backend().unwrap();
    now.write(3 * 64 * 1024 + 512, &[0xee; 1024]).unwrap();
    assert!(run("disk delete c1~disk", &mut m).starts_with("error: c1~disk is being written by the live save"));
    let mut con = Lines::default();
    let mut rounds = 0;
    while m.live_save.is_some() {
        m.checkpoint_round(&mut con);
        rounds += 1;
        assert!(rounds < 50);
    }
    let t = con.0.join("\n");
    assert!(t.contains("vm 1 saved to checkpoint c1: ") && t.contains("; live: "), "{t}");
    assert!(t.contains("; disk: 1 chunks copied before the guest overwrote them, 4 in the background"), "{t}");
    // The device serves the disk itself again, with the guest's write.
    let mut after = m.get(1).unwrap().devices.block_backend().unwrap();
    let mut buf = vec![0u8; 1024];
    after.read(3 * 64 * 1024 + 512, &mut buf).unwrap();
    assert_eq!(buf, [0xee; 1024]);
    assert!(after == dev, "the original disk is attached again");
    run("vm stop 1", &mut m);
    let out = run("vm restore c1", &mut m);
    assert!(out.starts_with("vm 2 restored from checkpoint c1"), "{out}");
    let mut back = m.get(2).unwrap().devices.block_backend().unwrap();
    for i in 0..5u64 {
        back.read(i * 64 * 1024 + 512, &mut buf).unwrap();
        assert_eq!(buf, [0xa0 + i as u8; 1024], "chunk {i} is not the instant's");
    }
}

#[test]
fn a_save_of_a_vm_larger_than_the_free_space_still_snapshots_its_disk() {
    // The checkpoint's extent takes the whole free stretch until closed:
    // the disk snapshot must be made before it, paused and live.
    let (mut m, _) = manager();
    run("disk create d1 2", &mut m);
    run("vm run tiny mem=24 disk=d1", &mut m);
    let out = run("vm save 1 c1", &mut m);
    assert!(out.contains("saved to checkpoint c1") && out.contains("disk d1 copied to image c1~disk"), "{out}");
    assert!(run("vm checkpoint delete c1", &mut m).starts_with("checkpoint c1 deleted"));
    let out = run("vm save 1 c2 live", &mut m);
    assert!(out.contains("live save to checkpoint c2 started"), "{out}");
    let mut con = Lines::default();
    while m.live_save.is_some() {
        m.checkpoint_round(&mut con);
    }
    assert!(con.0.iter().any(|l| l.contains("vm 1 saved to checkpoint c2: ")), "{:?}", con.0);
}
