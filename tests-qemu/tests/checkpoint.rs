//! Checkpoint and restore across vendors, through the data disk: a guest
//! that filled 8 MiB of its RAM and waits for a key is saved under AMD-V
//! (QEMU), the machine powered off; Bochs with VT-x boots on the same disk
//! file, lists the checkpoint and restores it; the guest goes on, checks
//! every word it wrote and passes. The same the other way: saved under
//! VT-x, restored under AMD-V, eagerly and lazily (pages on disk until
//! touched or filled in the background; the checkpoint cannot be deleted
//! meanwhile). Damaged or missing checkpoints are refused with one line.
//! A live save (the VM running while its memory is written) is one
//! instant, checked by the guest on both copies.
//!
//! CPUID: the guests crossing vendors are not pinned, and their CPUID hash
//! changes with the vendor. A third, `cpuid=pinned` under AMD-V, is
//! refused under VT-x (QEMU's AMD CPU has SSE4a and 3DNow!, Bochs' Tiger
//! Lake neither; the other way, Tiger Lake has SHA, RDSEED, GFNI... that
//! QEMU's TCG lacks), and restored under AMD-V after the round trip, its
//! hash the one it printed at start. A fourth, `cpuid=portable` (cut to
//! what both vendors offer), restores under VT-x with the same hash. A
//! checkpoint with one bit flipped on the disk file is refused under VT-x
//! with one line naming the record.
//!
//! SMP: `smptest hold=1` with 2 vCPUs, its AP counting in a loop, is saved
//! mid-run under AMD-V and restored under VT-x, and the other way (lazily
//! there): the AP goes on counting, the shared atomic counter is the exact
//! sum of the vCPUs' own, and IPIs flow both ways. The one saved under
//! VT-x runs its local APICs in x2APIC mode (`x2apic=1`): the mode and its
//! MSR-only registers cross to AMD-V with it (the guest's IPIs after the
//! release go through the x2APIC ICR; a lost mode would #GP them).

use boot::emulator::Emulator;
use std::time::Duration;
use tests_qemu::Machine;

const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The hash VM `id`'s memtest printed after `what` (`cpuid` at start,
/// `cpuid after release`).
fn cpuid_hash(m: &Machine, id: u32, what: &str) -> String {
    let t = m.transcript();
    let prefix = format!("[vm {id}] memtest: {what} ");
    let line = t.lines().find_map(|l| l.split_once(&prefix).map(|(_, h)| h.trim().to_string()));
    let hash = line.unwrap_or_else(|| panic!("no {prefix:?} line: {t}"));
    assert_eq!(hash.len(), 16, "{hash:?}");
    hash
}

/// Starts the memtest guest with CPUID profile `cpuid`, waits until it
/// holds with its region filled, saves it as `name` and checks the listing
/// says `vendor`; the CPUID hash it printed at start.
fn fill_and_save(m: &mut Machine, id: u32, name: &str, vendor: &str, cpuid: &str) -> String {
    let out = m.cmd(&format!("vm run memtest mem=16 cpuid={cpuid} -- mode=share mib=8 wait=0 hold=1"));
    assert!(out.contains(&format!("vm {id} started: memtest")), "{out}");
    let profile = m.json(&format!("vm stats {id} --json"))["cpuid"].as_str().unwrap_or_default().to_string();
    assert!(profile.starts_with(cpuid), "{profile}");
    m.wait_for(&format!("[vm {id}] memtest: holding until a byte arrives on COM1"), GUEST_TIMEOUT);
    let out = m.cmd(&format!("vm save {id} {name}"));
    assert!(out.contains(&format!("vm {id} saved to checkpoint {name}: ")), "{out}");
    let list = m.json("vm checkpoints --json");
    let cp = list["checkpoints"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned();
    let cp = cp.unwrap_or_else(|| panic!("{name} not listed: {list}"));
    assert_eq!((cp["vendor"].as_str(), cp["complete"].as_bool()), (Some(vendor), Some(true)), "{cp}");
    assert_eq!(cp["ram_bytes"], 16 << 20, "{cp}");
    cpuid_hash(m, id, "cpuid")
}

/// Restores `name` as VM `id`, releases the guest and checks it passes;
/// the CPUID hash it printed once released.
fn restore_and_finish(m: &mut Machine, name: &str, id: u32) -> String {
    let out = m.cmd(&format!("vm restore {name}"));
    assert!(
        out.contains(&format!("vm {id} restored from checkpoint {name}: memtest (elf64, 16 MiB), running")),
        "{out}"
    );
    m.cmd(&format!("vm send {id} -- go"));
    m.wait_for(&format!("vm {id} (memtest) exited"), GUEST_TIMEOUT);
    let t = m.transcript();
    assert!(t.contains(&format!("[vm {id}] memtest: released by 0x67")), "{t}");
    assert!(t.contains(&format!("[vm {id}] memtest: PASS")), "{t}");
    assert!(t.contains(&format!("vm {id} (memtest) exited with status 1 ")), "{t}");
    cpuid_hash(m, id, "cpuid after release")
}

/// Starts `smptest hold=1` with 2 vCPUs as VM `id`, waits until its AP
/// counts in its loop, saves it as `name` there (checking the listing says
/// `vendor`) and stops it. `args`: more of the guest's arguments.
fn smp_run_and_save(m: &mut Machine, id: u32, name: &str, vendor: &str, args: &str) {
    let out = m.cmd(&format!("vm run smptest vcpus=2 -- hold=1{args}"));
    assert!(out.contains(&format!("vm {id} started: smptest")), "{out}");
    m.wait_for(&format!("[vm {id}] smptest: holding until a byte arrives on COM1"), GUEST_TIMEOUT);
    let out = m.cmd(&format!("vm save {id} {name}"));
    assert!(out.contains(&format!("vm {id} saved to checkpoint {name}: ")), "{out}");
    let list = m.json("vm checkpoints --json");
    let cp = list["checkpoints"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned();
    let cp = cp.unwrap_or_else(|| panic!("{name} not listed: {list}"));
    assert_eq!((cp["vendor"].as_str(), cp["complete"].as_bool()), (Some(vendor), Some(true)), "{cp}");
    m.cmd(&format!("vm stop {id}"));
}

/// Restores the `smptest hold=1` checkpoint `name` as VM `id` (`how`: ""
/// or " lazy ..."): both vCPUs come back, the AP where it was (counting:
/// runnable), and once released the guest finds its run went on exactly;
/// `checks`: how many it makes (one more in x2APIC mode).
fn smp_restore_and_finish(m: &mut Machine, name: &str, how: &str, id: u32, checks: u32) {
    let out = m.cmd(&format!("vm restore {name}{how}"));
    assert!(out.contains(&format!("vm {id} restored from checkpoint {name}: smptest (elf64, ")), "{out}");
    let s = m.json(&format!("vm stats {id} --json"));
    let vcpus = s["vcpus"].as_array().expect("vcpus");
    assert_eq!(vcpus.len(), 2, "{s}");
    assert_ne!(vcpus[1]["state"], "wait-for-sipi", "the AP was started before the save: {s}");
    m.cmd(&format!("vm send {id} -- go"));
    m.wait_for(&format!("vm {id} (smptest) exited"), GUEST_TIMEOUT);
    let t = m.transcript();
    for check in [
        "every ap went on counting after the release",
        "atomic increments from every vcpu reach the exact total",
        "ipis flow both ways after the release",
    ] {
        assert!(t.contains(&format!("[vm {id}] smptest: ok   {check}")), "vm {id}: {check}: {t}");
    }
    assert!(t.contains(&format!("[vm {id}] smptest: PASS ({checks} checks, 2 vcpus)")), "{t}");
    assert!(t.contains(&format!("vm {id} (smptest) exited with status 1 (0x1)")), "{t}");
    let line = t.lines().find(|l| l.contains(&format!("[vm {id}] smptest: hold total "))).unwrap();
    eprintln!("{}: restored {name}: {line}", m.emulator.name());
}

/// A live save of a guest that rewrites 24 MiB over and over: the VM runs
/// on while its memory is written, pages it rewrites first are copied,
/// and the checkpoint is one instant: the restored guest finds every page
/// agreeing with its header word (a torn checkpoint has pages newer or
/// older than it says), as does the source, which goes on.
fn live_save_and_restore(m: &mut Machine, id: u32, name: &str, restored: u32) {
    let out = m.cmd(&format!("vm run memtest mem=32 -- mode=live mib=24 seed={id}"));
    assert!(out.contains(&format!("vm {id} started: memtest")), "{out}");
    m.wait_for(&format!("[vm {id}] memtest: live: rewriting 6143 pages"), GUEST_TIMEOUT);
    let out = m.cmd(&format!("vm save {id} {name} live"));
    assert!(out.contains(&format!("vm {id}: live save to checkpoint {name} started (paused ")), "{out}");
    let done = format!("vm {id} saved to checkpoint {name}: ");
    m.wait_for(&done, GUEST_TIMEOUT);
    let t = m.transcript();
    let line = t.lines().find(|l| l.contains(&done)).unwrap();
    let copied: u64 = line.split(" pages copied on write").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(line.contains("; live: pause ") && copied > 0, "the guest wrote nothing during the save? {line}");
    m.cmd(&format!("vm send {id} -- c"));
    m.wait_for(&format!("[vm {id}] memtest: live check 1: "), GUEST_TIMEOUT);
    let out = m.cmd(&format!("vm restore {name}"));
    assert!(out.contains(&format!("vm {restored} restored from checkpoint {name}: memtest")), "{out}");
    m.cmd(&format!("vm send {restored} -- q"));
    m.wait_for(&format!("vm {restored} (memtest) exited"), GUEST_TIMEOUT);
    m.cmd(&format!("vm stop {id}"));
    let t = m.transcript();
    for vm in [id, restored] {
        assert!(t.contains(&format!("[vm {vm}] memtest: live check 1: ")), "{t}");
        assert!(!t.contains(&format!("[vm {vm}] memtest: FAIL")), "{t}");
        assert!(t.contains(&format!("[vm {vm}] memtest: PASS")), "{t}");
    }
    assert!(t.contains(&format!("vm {restored} (memtest) exited with status 1 ")), "{t}");
    let out = m.cmd(&format!("vm checkpoint delete {name}"));
    assert!(out.contains(&format!("checkpoint {name} deleted")), "{out}");
}

/// Restores `name` lazily as VM `id`: the guest runs while most of its
/// pages are still on disk (the checkpoint may not be deleted meanwhile),
/// the background fill brings the rest in while the guest holds, then the
/// guest checks every word and passes. Returns the VM's first-entry time
/// (microseconds after the command) and the pages it started with on disk.
fn lazy_restore_and_finish(m: &mut Machine, name: &str, id: u32) -> (u64, u64) {
    let out = m.cmd(&format!("vm restore {name} lazy fill=512"));
    assert!(
        out.contains(&format!("vm {id} restored from checkpoint {name}: memtest (elf64, 16 MiB), running; lazy: ")),
        "{out}"
    );
    let stats = |m: &mut Machine| m.json(&format!("vm stats {id} --json"));
    // The guest has run: its first entry is on record and the pages it
    // touched (code, stack, page tables) came in by fault.
    let mut s = stats(m);
    for _ in 0..50 {
        if s["first_entry_us"].is_u64() && s["lazy"]["faults"].as_u64() > Some(0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        s = stats(m);
    }
    let lazy = &s["lazy"];
    assert!(s["first_entry_us"].is_u64() && lazy["faults"].as_u64() > Some(0), "{s}");
    assert!(lazy["pages_on_disk"].as_u64() > Some(0), "everything loaded already: {s}");
    assert_eq!(s["pages"]["not_loaded"], lazy["pages_on_disk"], "{s}");
    let out = m.cmd(&format!("vm checkpoint delete {name}"));
    assert!(out.trim_end().starts_with(&format!("error: checkpoint {name} is in use by vm {id}")), "{out}");
    // The background fill converges while the guest holds.
    let deadline = std::time::Instant::now() + GUEST_TIMEOUT;
    let done = loop {
        let s = stats(m);
        if s["lazy"]["pages_on_disk"] == 0 {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "the fill does not converge: {s}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let lazy = &done["lazy"];
    assert_eq!(lazy["complete"], true, "{done}");
    assert!(lazy["by_background"].as_u64() > Some(0), "{done}");
    assert_eq!(done["pages"]["not_loaded"], 0, "{done}");
    m.wait_for(&format!("vm {id}: lazy restore from checkpoint {name} complete: "), GUEST_TIMEOUT);
    m.cmd(&format!("vm send {id} -- go"));
    m.wait_for(&format!("vm {id} (memtest) exited"), GUEST_TIMEOUT);
    let t = m.transcript();
    assert!(t.contains(&format!("[vm {id}] memtest: PASS")), "{t}");
    (done["first_entry_us"].as_u64().unwrap_or(0), lazy["pages_at_start"].as_u64().unwrap_or(0))
}

#[test]
fn a_checkpoint_taken_on_one_vendor_restores_on_the_other() {
    let dir = boot::target_dir().join("test-disks");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("checkpoint-{}.img", std::process::id()));
    std::fs::File::create(&path).unwrap().set_len(boot::emulator::SCRATCH_BYTES).unwrap();

    // AMD-V: fill, save, and let this copy finish here too.
    let mut m = Machine::boot_with_scratch(Emulator::QemuTcg, "checkpoint-amd-1", &path);
    let amd = fill_and_save(&mut m, 1, "from-amd", "amd", "host");
    m.cmd("vm send 1 -- go");
    m.wait_for("[vm 1] memtest: PASS", GUEST_TIMEOUT);
    assert_eq!(cpuid_hash(&m, 1, "cpuid after release"), amd);
    live_save_and_restore(&mut m, 2, "live-amd", 3);
    let amd_pinned = fill_and_save(&mut m, 4, "pinned-amd", "amd", "pinned");
    assert_eq!(amd_pinned, amd, "pinning changes nothing on the host it was taken on");
    let amd_portable = fill_and_save(&mut m, 5, "portable-amd", "amd", "portable");
    assert_ne!(amd_portable, amd, "portable hides the AMD-only features");
    // A second save of it, to be damaged on the disk file while the
    // machine is off.
    let out = m.cmd("vm save 5 damaged");
    assert!(out.contains("vm 5 saved to checkpoint damaged: "), "{out}");
    smp_run_and_save(&mut m, 6, "smp-amd", "amd", "");
    let disk = m.json("disk list --json");
    let extent = disk["extents"].as_array().unwrap().iter().find(|e| e["name"] == "damaged").cloned().unwrap();
    let flip_at = extent["start_block"].as_u64().unwrap() * 512 + extent["bytes"].as_u64().unwrap() / 2;
    // Refusals: one line, nothing changes.
    for (line, want) in [
        ("vm restore nothere", "error: "),
        ("vm save 1 from-amd", "error: "),
        ("vm restore swap", "error: swap is a swap, not a checkpoint"),
    ] {
        let out = m.cmd(line);
        assert!(out.trim_end().starts_with(want) && out.trim_end().lines().count() == 1, "{line}: {out}");
    }
    m.poweroff();
    // One bit flipped in the middle of a checkpoint, as a failing disk
    // would.
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(flip_at)).unwrap();
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(flip_at)).unwrap();
        f.write_all(&[b[0] ^ 0x08]).unwrap();
    }

    // VT-x on the same disk: the AMD checkpoint is there and goes on here;
    // a checkpoint of its own for the way back.
    let mut m = Machine::boot_with_scratch(Emulator::Bochs, "checkpoint-intel", &path);
    let list = m.json("vm checkpoints --json");
    assert_eq!(list["checkpoints"][0]["name"], "from-amd", "{list}");
    // Not pinned: the guest sees this host's CPUID (the vendor string
    // first), as the README says.
    let after = restore_and_finish(&mut m, "from-amd", 1);
    assert_ne!(after, amd, "an unpinned VM's CPUID did not change with the vendor");
    // Pinned: this host cannot give it all its table shows. One line,
    // nothing created (the next VM is 2).
    let out = m.cmd("vm restore pinned-amd");
    let want = "error: checkpoint pinned-amd: the checkpoint's pinned CPUID shows what this host cannot give \
                its guests: leaf 0x";
    assert!(out.trim_end().starts_with(want) && out.trim_end().lines().count() == 1, "{out}");
    // The damaged checkpoint is refused with one line naming the record,
    // and nothing is created (the next VM is still 2).
    let out = m.cmd("vm restore damaged");
    assert!(
        out.trim_end().starts_with("error: checkpoint damaged: ")
            && out.contains("checksum")
            && out.contains(" record ")
            && out.trim_end().lines().count() == 1,
        "{out}"
    );
    // Portable: it has only what both vendors offer, and sees no change.
    assert_eq!(restore_and_finish(&mut m, "portable-amd", 2), amd_portable, "a portable VM's CPUID changed");
    let profile = m.json("vm stats 2 --json")["cpuid"].as_str().unwrap_or_default().to_string();
    assert!(profile.starts_with("portable (AuthenticAMD, "), "{profile}");
    let intel = fill_and_save(&mut m, 3, "from-intel", "intel", "host");
    smp_restore_and_finish(&mut m, "smp-amd", "", 4, 11);
    smp_run_and_save(&mut m, 5, "smp-intel", "intel", " x2apic=1");
    m.poweroff();

    // Back on AMD-V: the Intel checkpoint restores and passes, its CPUID
    // changed; the pinned one restores with its own; then all are deleted.
    let mut m = Machine::boot_with_scratch(Emulator::QemuTcg, "checkpoint-amd-2", &path);
    let after = restore_and_finish(&mut m, "from-intel", 1);
    assert_ne!(after, intel, "an unpinned VM's CPUID did not change with the vendor");
    // And lazily: time to the first guest instruction, eager against lazy
    // (docs/benchmarks.md).
    let eager_us = m.json("vm stats 1 --json")["first_entry_us"].as_u64().unwrap_or(0);
    let (lazy_us, on_disk) = lazy_restore_and_finish(&mut m, "from-intel", 2);
    eprintln!(
        "first guest entry after vm restore (QEMU TCG, 16 MiB memtest): eager {eager_us} us, lazy {lazy_us} us with {on_disk} pages on disk"
    );
    assert_eq!(restore_and_finish(&mut m, "pinned-amd", 3), amd_pinned);
    let profile = m.json("vm stats 3 --json")["cpuid"].as_str().unwrap_or_default().to_string();
    assert!(profile.starts_with("pinned (AuthenticAMD, "), "{profile}");
    smp_restore_and_finish(&mut m, "smp-intel", " lazy fill=4096", 4, 12);
    for name in ["from-amd", "from-intel", "pinned-amd", "portable-amd", "damaged", "smp-amd", "smp-intel"] {
        let out = m.cmd(&format!("vm checkpoint delete {name}"));
        assert!(out.contains(&format!("checkpoint {name} deleted")), "{out}");
    }
    assert_eq!(m.json("vm checkpoints --json")["checkpoints"], serde_json::json!([]));
    m.poweroff();
    std::fs::remove_file(&path).unwrap();
}
