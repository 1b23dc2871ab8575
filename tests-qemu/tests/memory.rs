//! The memory manager in the running hypervisor, on both backends (Bochs
//! with VT-x + EPT, QEMU TCG with AMD-V + NPT): identical guests share
//! memory and still see only their own writes; a guest squeezed below its
//! working set by swapping to the emulator's scratch disk still computes
//! correct results.

use boot::emulator::Emulator;
use std::time::Duration;
use tests_qemu::{Machine, label, on_both_backends};

const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

on_both_backends!(
    identical_guests_share_memory_and_keep_their_own_writes,
    a_guest_squeezed_by_swapping_computes_correctly
);

/// The number after `prefix` in `line`.
fn number_after(t: &str, prefix: &str) -> Option<u64> {
    let at = t.find(prefix)? + prefix.len();
    t[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn identical_guests_share_memory_and_keep_their_own_writes(emu: Emulator) {
    let mut m = Machine::boot(emu, &label(emu, "sharing"));
    assert!(m.cmd("mem sharing on 1024").contains("sharing on: scanning 1024 pages per scheduling round"));
    for _ in 0..3 {
        m.cmd("vm run memtest mem=16 -- mode=share mib=6 wait=100000");
    }
    for id in 1..=3 {
        m.wait_for(&format!("vm {id} (memtest) exited"), GUEST_TIMEOUT);
    }
    let t = m.transcript();
    for id in 1..=3 {
        let me = format!("[vm {id}] memtest: ");
        assert!(t.contains(&format!("{me}PASS")), "vm {id} failed:\n{t}");
        assert!(t.contains(&format!("vm {id} (memtest) exited with status 1 ")), "{t}");
        // The guest saw its pages shared (through the statistics hypercall)
        // before it wrote to half of them.
        // `contains`, not `starts_with`: guest output can follow the
        // console's prompt on the same line.
        let line = t.lines().find(|l| l.contains(&me) && l.contains("pages shared after"));
        let line = line.unwrap_or_else(|| panic!("vm {id} never reported sharing:\n{t}"));
        let n = number_after(line, "memtest: ").unwrap();
        assert!(n >= 768, "vm {id}: only {n} of 1536 pages shared: {line}");
    }
    let j = m.json("mem --json");
    let s = &j["sharing"];
    assert!(s["merged"].as_u64().unwrap() >= 3 * 768, "{j}");
    assert!(s["frames_freed"].as_u64().unwrap() >= 2 * 768, "{j}");
    // Every write to a shared page broke the sharing for the writer only.
    assert!(s["cow_breaks"].as_u64().unwrap() >= 3 * 384, "{j}");
    m.poweroff();
}

fn a_guest_squeezed_by_swapping_computes_correctly(emu: Emulator) {
    let mut m = Machine::boot(emu, &label(emu, "swap"));
    let j = m.json("mem --json");
    assert!(j["swap"]["slots"].as_u64().unwrap() > 4096, "the scratch disk is the swap device: {j}");
    // 12 MiB (3072 pages), 8 of them the test region, held to 2 MiB (512
    // private pages). Zero pages outside the region are merged into the
    // zero frame (at most 1024 of them), so at least 1536 pages go out;
    // the guest waits for that, and then at least 512 of its region's
    // pages are on disk when it starts checking.
    m.cmd("vm run memtest mem=12 -- mode=swap mib=8 passes=2 wait=100000 target=1536");
    let out = m.cmd("mem target 1 2");
    assert!(out.contains("vm 1: target 2 MiB (512 pages)"), "{out}");
    m.wait_for("vm 1 (memtest) exited", GUEST_TIMEOUT);
    let t = m.transcript();
    assert!(t.contains("[vm 1] memtest: PASS"), "{t}");
    assert!(t.contains("vm 1 (memtest) exited with status 1 "), "{t}");
    let line = t.lines().find(|l| l.contains("memtest: checksum")).unwrap_or_default();
    let (got, want) = line.split_once(" (expected ").unwrap_or(("", ""));
    assert!(!got.is_empty() && got.ends_with(want.trim_end_matches(')')), "{line}");
    let j = m.json("mem --json");
    let swap = &j["swap"];
    assert!(swap["swapped_out"].as_u64().unwrap() >= 1536, "{j}");
    assert!(swap["swapped_in"].as_u64().unwrap() >= 512, "8 MiB verified twice with 2 MiB resident: {j}");
    assert_eq!(swap["in_use"], 0, "the VM's swap file was emptied when it ended: {j}");
    m.poweroff();
}
