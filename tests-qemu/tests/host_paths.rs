//! The host's own paths, in QEMU: a machine without hardware
//! virtualization (`-cpu max,-svm`), where the hypervisor must say clearly
//! that it cannot run VMs and the console must still work; a CPU
//! exception in the hypervisor itself. And the host's scratch disk (for
//! swap) in both emulators: ATA PIO on Bochs's ata0-slave, virtio-blk on
//! QEMU; a scratch disk holding someone else's data is left untouched.

use boot::emulator::Emulator;
use std::time::{Duration, SystemTime};
use tests_qemu::{Machine, label, on_both_backends};

on_both_backends!(a_disk_with_other_data_is_refused_without_a_write);

#[test]
fn without_virtualization_the_console_works_and_says_why() {
    let mut m = Machine::boot(Emulator::QemuNoVirt, "novirt");
    let t = m.transcript();
    assert!(t.contains("virtualization unavailable: this CPU has neither VT-x nor AMD-V"), "{t}");
    let host = m.cmd("host");
    assert!(host.contains("virtualization: unavailable: this CPU has neither VT-x nor AMD-V"), "{host}");
    let j = m.json("host --json");
    assert_eq!(j["virtualization"]["backend"], serde_json::Value::Null);
    let host_json = j.clone();
    let out = m.cmd("vm run selftest");
    assert!(out.starts_with("error: virtualization is unavailable"), "{out}");
    let j = m.json("vm list --json");
    assert_eq!(j["vms"].as_array().unwrap().len(), 0);
    assert!(m.cmd("help").contains("vm run <guest>"));
    // QEMU runs with -smp 2: both CPUs come from the MADT.
    assert_eq!(host_json["cpus"], 2, "{host_json}");
    assert_eq!(host_json["apic_ids"], serde_json::json!([0, 1]));
    let outcome = m.poweroff();
    // Exit code 0: the ACPI soft-off path (FADT PM1a + \_S5) ended QEMU,
    // not the debug-exit port (which would give 1).
    assert_eq!(outcome.exit_code, Some(0), "{}", outcome.failure_report());
}

#[test]
fn a_cpu_exception_in_the_hypervisor_is_reported_and_powers_off_with_failure() {
    let m = Machine::start(Emulator::QemuTcg, "qemu-hostfault", &["fault_inject = host-page-fault"]);
    let outcome = m.finish();
    let t = &outcome.transcript;
    for want in [
        "!!! hypervisor: CPU exception 14 #PF page fault",
        "error code 0x0",
        "cr2=0x00007fffdead0000",
        "rip=0x",
        "context: cpu 0 (apic 0): host",
        "code at rip:",
        "hypervisor: power off (failure)",
    ] {
        assert!(t.contains(want), "missing {want:?} in:\n{t}");
    }
    assert_eq!(outcome.ending, boot::session::Ending::PoweredOff { ok: false });
    assert_eq!(outcome.exit_code, Some(3), "isa-debug-exit status for failure: (1 << 1) | 1");
}

/// "129024 blocks (63 MiB)": the scratch disk `boot/` gives every machine.
fn scratch_size() -> String {
    let blocks = boot::emulator::SCRATCH_BYTES / 512;
    format!("{blocks} blocks ({} MiB)", boot::emulator::SCRATCH_BYTES >> 20)
}

const SELF_CHECK_OK: &str = "disk: self-check ok (write+read 9 blocks)";

/// The scratch disk after the run: the self-check put back what it found
/// (zeros on a fresh disk), and the blank disk became the data disk, so
/// blocks 0..32 hold the two copies of the extent table, block 32 (the
/// swap extent's first) a swap superblock, and nothing else was written
/// (no VM ran). Swap has half the disk: 64496 blocks, 7166 slots.
fn assert_scratch_untouched(m: &Machine) {
    let scratch = std::fs::read(m.run_dir().join("scratch.img")).expect("reading the scratch disk");
    assert_eq!(scratch.len() as u64, boot::emulator::SCRATCH_BYTES);
    assert_eq!(&scratch[..7], b"HVSPACE", "no extent table in block 0");
    assert_eq!(&scratch[16 * 512..16 * 512 + 7], b"HVSPACE", "no second table copy in block 16");
    assert_eq!(&scratch[32 * 512..32 * 512 + 8], b"MMSWAPSB", "no swap superblock in block 32");
    assert!(scratch[33 * 512..].iter().all(|&b| b == 0), "the self-check left data on the scratch disk");
    let t = m.transcript();
    assert!(t.contains("swap: ") && t.contains("(Formatted), 7166 page slots (27 MiB)"), "{t}");
}

#[test]
fn bochs_uses_ata0_slave_as_its_scratch_disk() {
    let before = std::fs::read(tests_qemu::boot_disk()).expect("reading the boot disk");
    let m = Machine::boot(Emulator::Bochs, "bochs-disk");
    let t = m.transcript();
    let want = format!("disk: ata0-slave, {}, model \"HV scratch disk\"", scratch_size());
    assert!(t.contains(&want), "missing {want:?} in:\n{t}");
    assert!(t.contains(SELF_CHECK_OK), "{t}");
    assert_scratch_untouched(&m);
    let boot_disk = m.boot_disk.clone();
    m.poweroff();
    // The master (the boot disk) is never written.
    assert!(std::fs::read(boot_disk).unwrap() == before, "the boot disk changed");
}

#[test]
fn qemu_uses_virtio_blk_as_its_scratch_disk() {
    let m = Machine::boot(Emulator::QemuTcg, "qemu-disk");
    let t = m.transcript();
    let line =
        t.lines().find(|l| l.contains("disk: virtio-blk ")).unwrap_or_else(|| panic!("no virtio-blk disk in:\n{t}"));
    // "disk: virtio-blk 0000:00:03.0, ..." (the slot is QEMU's choice).
    let rest = line.split("disk: virtio-blk 0000:00:").nth(1).expect("a bus-0 PCI address");
    assert_eq!(rest[2..], format!(".0, {}", scratch_size()), "{line}");
    assert!(t.contains(SELF_CHECK_OK), "{t}");
    assert_scratch_untouched(&m);
    m.poweroff();
}

/// A disk that is neither blank nor swap: every byte non-zero, with a
/// FAT-style boot signature in block 0. Bochs wants whole cylinders: 8 of
/// 16 x 63 sectors (8064 blocks).
fn foreign_disk_bytes() -> Vec<u8> {
    let mut d: Vec<u8> = (0..8 * boot::image::CYLINDER_BYTES as usize)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8 | 1)
        .collect();
    d[3..11].copy_from_slice(b"MSDOS5.0");
    d[510..512].copy_from_slice(&[0x55, 0xaa]);
    d
}

fn a_disk_with_other_data_is_refused_without_a_write(emu: Emulator) {
    let name = label(emu, "foreign-disk");
    let dir = boot::target_dir().join("test-disks");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}.img", std::process::id()));
    let bytes = foreign_disk_bytes();
    std::fs::write(&path, &bytes).unwrap();
    // An old modification time: any write that reaches the file, even one
    // that puts back what was there, moves it.
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();

    let mut m = Machine::boot_with_scratch(emu, &name, &path);
    let t = m.transcript();
    let found = match emu {
        Emulator::Bochs => "disk: ata0-slave, 8064 blocks (3.9 MiB)",
        _ => "disk: virtio-blk 0000:00:",
    };
    assert!(t.contains(found), "the disk was not found:\n{t}");
    let refused = "disk: refused without a write: block 0 has no swap superblock and block 0 holds data (not blank)";
    assert!(t.contains(refused), "missing {refused:?} in:\n{t}");
    assert!(!t.contains("self-check"), "the self-check ran on a foreign disk:\n{t}");
    let mem = m.json("mem --json");
    let missing = mem["swap_missing"].as_str().unwrap_or_else(|| panic!("swap attached: {mem}"));
    assert!(missing.contains("refused without a write"), "{mem}");
    m.poweroff();

    let after = std::fs::read(&path).unwrap();
    assert!(after == bytes, "the foreign disk's contents changed");
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    assert_eq!(modified, old, "something wrote to the foreign disk (its modification time moved)");
    std::fs::remove_file(&path).unwrap();
}
