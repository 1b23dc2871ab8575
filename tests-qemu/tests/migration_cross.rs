//! Live migration across vendors (issue 14): a VM moves by pre-copy from
//! a Bochs host (VT-x) to a QEMU host (AMD-V) over their Ethernet link
//! (UDP on the loopback of a private network namespace; needs root), and
//! back by post-copy.
//!
//! The guest is memtest in `mode=dirty`: it rewrites its region during
//! the whole move, each page checkable against a header word, so a page
//! the move lost or took from the wrong round fails its check on the
//! destination. The region and the dirty rate are small (2 MiB, 100
//! pages/s) and the stream is capped at 1 MiB/s: the link does 1.3-1.8
//! MB/s from Bochs and Bochs runs the guest slowly.
//!
//! CPUID: the VM is not pinned (`cpuid=host`), as in the cross-vendor
//! checkpoint test: the migration's destination rebuilds it with the
//! restore's own code and the same rule, so it sees the AMD host's CPUID
//! there (memtest does not depend on it).
//!
//! The way back (QEMU -> Bochs) is post-copy: Bochs' socket backend drops
//! frames, so that way the link carries 0.05-0.12 MB/s, slower than the
//! guest dirties, and pre-copy could not converge. The VM runs on Bochs
//! at once, its pages follow (those it touches asked for first); the
//! drops stall the stream now and then long enough for the source's
//! 20-second progress check to drop the connection, after which it
//! connects again and the transfer goes on (post-copy recovery). On
//! Bochs every page checks out against the guest's header.

use std::time::{Duration, Instant};
use tests_qemu::{Machine, vm_entry};

/// The text after `what` on the first line holding it, after byte `from`.
fn report(t: &str, from: usize, what: &str) -> String {
    t[from..].lines().find_map(|l| l.find(what).map(|i| l[i..].to_string())).unwrap_or_default()
}

#[test]
fn a_vm_moves_from_a_vtx_host_to_an_amdv_host_by_precopy_and_back_by_postcopy() {
    let limit = Duration::from_secs(300);
    let (mut b, mut q) =
        Machine::boot_cross_pair("migration-cross", &["net_host_ip = 10.0.8.1/24"], &["net_host_ip = 10.0.8.2/24"]);
    let out = q.cmd("migrate listen");
    assert!(out.contains("migrate: listening for migrations on port 7070"), "{out}");
    let out = b.cmd("vm run memtest mem=16 -- mode=dirty mib=2 pps=100 seed=7");
    assert!(out.contains("vm 1"), "{out}");
    b.wait_for("memtest: dirty: ", limit);
    assert!(b.json("vm list --json")["vms"][0]["cpuid"].as_str().unwrap_or_default().starts_with("host"));

    let from_q = q.transcript().len();
    let started = Instant::now();
    let out = b.cmd("vm migrate 1 10.0.8.2 downtime=300 bandwidth=1");
    assert!(out.contains("vm 1: migrating to 10.0.8.2:7070"), "{out}");
    // After the command's own line: "migrated to", or "migration to ... failed".
    let from_b = b.transcript().len();
    q.wait_for_after("migrate: vm ", from_q, limit);
    b.wait_for_after("vm 1: migrat", from_b, limit);
    let wall = started.elapsed().as_secs_f64();
    let (done, arrived) =
        (report(&b.transcript(), from_b, "vm 1: migrat"), report(&q.transcript(), from_q, "migrate: vm "));
    eprintln!("[migration-cross] Bochs: {done}\n[migration-cross] QEMU: {arrived}\n[migration-cross] wall {wall:.1} s");
    assert!(done.starts_with("vm 1: migrated to 10.0.8.2:7070"), "{done}");
    assert!(arrived.contains("arrived from 10.0.8.1") && arrived.contains("and runs"), "{arrived}");
    let status = b.json("vm migrate status 1 --json");
    eprintln!("[migration-cross] status: {status}");
    assert_eq!(status["state"], "completed", "{status}");
    // Pre-copy: the full copy, then at least one round of dirty pages.
    assert!(status["iteration"].as_u64().unwrap() >= 2, "{status}");
    let there = status["destination_vm"].as_u64().expect("the VM's id on QEMU");
    assert_ne!(vm_entry(&b.json("vm list --json"), 1)["state"], "running");
    let moved = vm_entry(&q.json("vm list --json"), there);
    assert_eq!(moved["state"], "running", "{moved}");
    // Unpinned: it sees this (AMD) host's CPUID now, as a restored
    // checkpoint would.
    assert!(moved["cpuid"].as_str().unwrap_or_default().starts_with("host"), "{moved}");

    // Every page agrees with the guest's header on the AMD-V host.
    let from_q = q.transcript().len();
    q.cmd(&format!("vm send {there} -- c"));
    q.wait_for_after("memtest: PASS", from_q, limit);
    let t = q.transcript();
    let pause = report(&t, from_q, "memtest: dirty: ");
    eprintln!("[migration-cross] guest on QEMU: {} / {pause}", report(&t, from_q, "memtest: live check"));
    assert!(report(&t, from_q, "memtest: live check").contains("agree with the header"), "{t}");

    // The way back, QEMU (AMD-V) to Bochs (VT-x).
    let out = b.cmd("migrate listen");
    assert!(out.contains("migrate: listening for migrations on port 7070"), "{out}");
    let (from_b, from_q) = (b.transcript().len(), q.transcript().len());
    let started = Instant::now();
    let out = q.cmd(&format!("vm migrate {there} 10.0.8.1 mode=postcopy"));
    assert!(out.contains("post-copy"), "{out}");
    let ends = [format!("vm {there}: migrated to"), format!("vm {there}: migration to"), "broke".to_string()];
    while started.elapsed() < limit && !ends.iter().any(|e| q.transcript()[from_q..].contains(e.as_str())) {
        std::thread::sleep(Duration::from_secs(1));
    }
    let wall = started.elapsed().as_secs_f64();
    let done = ends.iter().map(|e| report(&q.transcript(), from_q, e)).find(|r| !r.is_empty()).unwrap_or_default();
    let status = q.json(&format!("vm migrate status {there} --json"));
    let arrived = report(&b.transcript(), from_b, "migrate: vm ");
    eprintln!(
        "[migration-cross] back: QEMU: {done}\n[migration-cross] back: Bochs: {arrived}\n\
         [migration-cross] back: status {status}\n[migration-cross] back: wall {wall:.1} s"
    );
    assert_eq!(status["state"], "completed", "{status}");
    assert!(arrived.contains("from 10.0.8.2") && arrived.contains("runs here"), "{arrived}");
    let home = status["destination_vm"].as_u64().expect("the VM's id on Bochs");
    assert_ne!(vm_entry(&q.json("vm list --json"), there)["state"], "running");
    // Every page agrees with the guest's header on the VT-x host again.
    let from_b = b.transcript().len();
    b.cmd(&format!("vm send {home} -- c"));
    b.wait_for_after("memtest: PASS", from_b, limit);
    let t = b.transcript();
    eprintln!("[migration-cross] guest back on Bochs: {}", report(&t, from_b, "memtest: live check"));
    assert!(report(&t, from_b, "memtest: live check").contains("agree with the header"), "{t}");
    q.poweroff();
    b.poweroff();
}
