//! The host data disk's space manager in the running hypervisor: a VM disk
//! image made with `disk create` is in the extent table on the disk, so it
//! is still there after the machine is restarted on the same disk file;
//! `disk delete` frees it, and swap keeps its extent throughout. A live
//! save cut short by a power failure leaves no checkpoint behind.

use boot::emulator::Emulator;
use tests_qemu::{Machine, label, on_both_backends};

on_both_backends!(a_disk_image_survives_a_restart_and_is_deleted);

fn names(list: &serde_json::Value) -> Vec<String> {
    let extents = list["extents"].as_array().unwrap_or_else(|| panic!("no extents: {list}"));
    extents.iter().map(|e| e["name"].as_str().unwrap().to_string()).collect()
}

fn a_disk_image_survives_a_restart_and_is_deleted(emu: Emulator) {
    let name = label(emu, "data-disk");
    let dir = boot::target_dir().join("test-disks");
    std::fs::create_dir_all(&dir).unwrap();
    // A fresh (sparse, zero) scratch disk of the usual size, kept by the
    // test across two boots.
    let path = dir.join(format!("{name}-{}.img", std::process::id()));
    std::fs::File::create(&path).unwrap().set_len(boot::emulator::SCRATCH_BYTES).unwrap();

    let mut m = Machine::boot_with_scratch(emu, &format!("{name}-1"), &path);
    let t = m.transcript();
    assert!(t.contains("(Formatted), 7166 page slots (27 MiB)"), "{t}");
    let out = m.cmd("disk create web 4");
    assert!(out.starts_with("disk web created: 4.0 MiB image at block "), "{out}");
    let list = m.json("disk list --json");
    assert_eq!(list["ok"], true, "{list}");
    assert_eq!(names(&list), ["swap", "web"]);
    let web = &list["extents"][1];
    // The extent holds the 4 MiB the guest sees and the image's 4 KiB
    // header.
    assert_eq!(
        (&web["kind"], &web["size_bytes"], &web["complete"]),
        (&"image".into(), &((4 << 20) + 4096).into(), &true.into())
    );
    // Bad input changes nothing.
    let out = m.cmd("disk create web 1");
    assert_eq!(out.trim_end(), "error: \"web\" already exists");
    let out = m.cmd("disk delete swap");
    assert_eq!(out.trim_end(), "error: \"swap\" is the host's swap and cannot be deleted");
    let host = m.json("host --json");
    assert_eq!(host["disk"]["images"], 1, "{host}");
    // The power fails during a live save: its checkpoint is listed as
    // being written until then, and is gone, not complete, after.
    let out = m.cmd("vm run memtest mem=32 -- mode=live mib=24");
    assert!(out.contains("vm 1 started"), "{out}");
    m.wait_for("[vm 1] memtest: live: rewriting", std::time::Duration::from_secs(240));
    let out = m.cmd("vm save 1 cut live");
    assert!(out.contains("live save to checkpoint cut started"), "{out}");
    let list = m.json("vm checkpoints --json");
    assert_eq!(list["checkpoints"][0]["complete"], false, "{list}");
    m.pull_the_plug();

    // The same disk again: the table is reopened, the image is still there.
    let mut m = Machine::boot_with_scratch(emu, &format!("{name}-2"), &path);
    let t = m.transcript();
    assert!(t.contains("(Reopened), 7166 page slots (27 MiB)"), "{t}");
    let list = m.json("disk list --json");
    assert_eq!(names(&list), ["swap", "web"], "{list}");
    assert_eq!(list["extents"][1]["created"], web["created"]);
    assert_eq!(m.json("vm checkpoints --json")["checkpoints"], serde_json::json!([]));
    assert!(t.contains("disk: dropped \"cut\": it was never completed (a save cut short)"), "{t}");
    let text = m.cmd("disk list");
    assert!(text.lines().any(|l| l.starts_with("web ") && l.contains("image") && l.ends_with("yes")), "{text}");
    let out = m.cmd("disk delete web");
    assert!(out.starts_with("disk web deleted (image, 4.0 MiB freed)"), "{out}");
    let list = m.json("disk list --json");
    assert_eq!(names(&list), ["swap"]);
    // Swap still works in its extent.
    let mem = m.json("mem --json");
    assert_eq!(mem["swap"]["slots"], 7166, "{mem}");
    m.poweroff();
    std::fs::remove_file(&path).unwrap();
}
