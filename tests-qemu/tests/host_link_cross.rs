//! The hosts' own network across vendors: a Bochs host (VT-x) and a QEMU
//! host (AMD-V) on one Ethernet link (UDP on the loopback of a private
//! network namespace; needs root). Both drive their 82540EM with the same
//! driver; a verified transfer goes each way. Bochs' socket backend takes
//! one frame per millisecond of emulated time and drops what it cannot
//! take, so the transfers are small and TCP retransmits.

use std::time::Duration;
use tests_qemu::Machine;

/// The report line after byte `from` of the transcript that starts with
/// `what` (it may follow the prompt on its line).
fn report(m: &Machine, from: usize, what: &str) -> String {
    m.transcript()[from..].lines().find_map(|l| l.find(what).map(|i| l[i..].to_string())).unwrap_or_default()
}

fn transfer(tx: &mut Machine, rx: &mut Machine, to: &str, bytes: u64) {
    let (from_tx, from_rx) = (tx.transcript().len(), rx.transcript().len());
    let out = tx.cmd(&format!("net send {to} {bytes}"));
    assert!(out.contains("net: sending"), "{out}");
    let limit = Duration::from_secs(600);
    tx.wait_for_after("net send: ", from_tx, limit);
    rx.wait_for_after("net listen: ", from_rx, limit);
    let (sent, got) = (report(tx, from_tx, "net send: "), report(rx, from_rx, "net listen: "));
    eprintln!("[host-link-cross] {} -> {}: {sent}\n[host-link-cross] {got}", tx.emulator.name(), rx.emulator.name());
    assert!(sent.contains("verified by the receiver"), "{sent}");
    assert!(got.contains("matches, pattern ok"), "{got}");
}

#[test]
fn bochs_and_qemu_hosts_transfer_both_ways() {
    let (mut b, mut q) =
        Machine::boot_cross_pair("host-link-cross", &["net_host_ip = 10.0.8.1/24"], &["net_host_ip = 10.0.8.2/24"]);
    for m in [&mut b, &mut q] {
        let n = m.json("net --json");
        assert_eq!(n["link_up"], true, "{n}");
    }
    assert!(b.cmd("net listen 7001").contains("listening"));
    assert!(q.cmd("net listen 7000").contains("listening"));
    transfer(&mut b, &mut q, "10.0.8.2:7000", 256 << 10);
    transfer(&mut q, &mut b, "10.0.8.1:7001", 256 << 10);
    for m in [&mut b, &mut q] {
        let n = m.json("net --json");
        eprintln!("[host-link-cross] {}: {}", m.emulator.name(), n["counters"]);
        assert_eq!(n["counters"]["rx_dropped"], 0, "{n}");
    }
    q.poweroff();
    b.poweroff();
}
