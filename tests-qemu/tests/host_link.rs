//! The hosts' own network end to end: two QEMU hosts (AMD-V) on one
//! Ethernet link, each hypervisor driving its e1000 itself. One boot pair
//! serves every check (CI time): the address from `hypervisor.cfg` and from
//! the console, a refused bad address, a verified 4 MiB transfer with its
//! throughput, the frame counters, ping (also to a host whose rounds go on
//! beside two busy VMs), and a transfer to a port nobody listens on failing
//! cleanly.

use std::time::Duration;
use tests_qemu::Machine;

/// 4 MiB; `HOST_LINK_MIB` sets another size (benchmarks, docs/benchmarks.md).
fn bytes() -> u64 {
    std::env::var("HOST_LINK_MIB").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(4) << 20
}

#[test]
fn two_qemu_hosts_transfer_verified_data() {
    let bytes = bytes();
    let (mut a, mut b) = Machine::boot_linked_pair("host-link", &["net_host_ip = 10.0.7.1/24"], &[]);
    let t = a.transcript();
    assert!(t.contains("net: 82540EM ") && t.contains("mac 52:54:00:77:00:01, link "), "{t}");
    assert!(t.contains(", ip 10.0.7.1/24"), "{t}");

    // B's address from the console; a bad one is refused in one line and
    // changes nothing.
    let out = b.cmd("net host ip=10.0.7.2/24");
    assert!(out.contains("net: host address 10.0.7.2/24"), "{out}");
    let out = b.cmd("net host ip=10.0.7.255/24");
    let errors: Vec<&str> = out.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{out}");
    let nb = b.json("net --json");
    assert_eq!(
        (&nb["ip"], &nb["mac"], &nb["link_up"]),
        (&"10.0.7.2/24".into(), &"52:54:00:77:00:02".into(), &true.into()),
        "{nb}"
    );

    let out = b.cmd("net listen 7000");
    assert!(out.contains("listening for transfers on port 7000"), "{out}");
    let (from_a, from_b) = (a.transcript().len(), b.transcript().len());
    // Wall-clock time on this machine, beside each hypervisor's own (its
    // TSC, calibrated against the PIT at boot, which drifts under TCG on a
    // loaded machine).
    let started = std::time::Instant::now();
    let out = a.cmd(&format!("net send 10.0.7.2:7000 {bytes}"));
    assert!(out.contains(&format!("net: sending {bytes} bytes to 10.0.7.2:7000")), "{out}");
    let limit = Duration::from_secs(300);
    a.wait_for_after("net send: ", from_a, limit);
    b.wait_for_after("net listen: ", from_b, limit);
    let wall = started.elapsed().as_secs_f64();
    // Reports arrive asynchronously, after the prompt on its line.
    let report = |t: String, from: usize, what: &str| {
        t[from..].lines().find_map(|l| l.find(what).map(|i| l[i..].to_string())).unwrap_or_default()
    };
    let (sent, got) = (report(a.transcript(), from_a, "net send: "), report(b.transcript(), from_b, "net listen: "));
    eprintln!("[host-link] {sent}\n[host-link] {got}");
    let tsc = |m: &mut Machine| m.json("host --json")["tsc_hz"].as_u64().unwrap_or(0) / 1_000_000;
    eprintln!(
        "[host-link] wall clock: {bytes} bytes in {wall:.2} s from the command to both reports ({:.2} MB/s), tsc a {} MHz b {} MHz",
        bytes as f64 / wall / 1e6,
        tsc(&mut a),
        tsc(&mut b)
    );
    assert!(sent.contains("verified by the receiver"), "{sent}");
    assert!(got.contains("matches, pattern ok"), "{got}");

    // Both sides agree on the checksum; the counters saw the data.
    let (na, nb) = (a.json("net --json"), b.json("net --json"));
    eprintln!("[host-link] a: {}\n[host-link] b: {}", na["counters"], nb["counters"]);
    let (s, r) = (&na["transfers"]["last_send"], &nb["transfers"]["last_receive"]);
    assert_eq!(
        (&s["verified"], &r["verified"], &s["bytes"], &r["bytes"]),
        (&true.into(), &true.into(), &bytes.into(), &bytes.into()),
        "{na}\n{nb}"
    );
    assert_eq!(s["crc32"], r["crc32"]);
    let count = |v: &serde_json::Value, k: &str| v["counters"][k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"));
    assert!(count(&na, "tx_bytes") > bytes && count(&nb, "rx_bytes") > bytes, "{na}\n{nb}");
    // Full-size frames: at least one per 1460 bytes of TCP payload.
    assert!(count(&na, "tx_frames") >= bytes / 1460 && count(&nb, "rx_frames") >= bytes / 1460, "{na}\n{nb}");
    assert_eq!((count(&na, "rx_dropped"), count(&nb, "rx_dropped")), (0, 0), "{na}\n{nb}");

    // B answers pings by itself, also while two busy VMs keep both its
    // CPUs: its network quiet, its rounds go on past the boot CPU's slice,
    // and each echo request that arrives ends one (`docs/smp.md`, "Rounds
    // that go on").
    let rounds_on = |m: &mut Machine| m.json("host --json")["scheduler"]["rounds_on"].as_u64().unwrap();
    let before = rounds_on(&mut b);
    for id in [1, 2] {
        assert!(b.cmd("vm run exitbench -- n=100000000").contains(&format!("vm {id} started")));
    }
    std::thread::sleep(Duration::from_secs(2));
    let from_a = a.transcript().len();
    assert!(a.cmd("net ping 10.0.7.2 3").contains("net: pinging 10.0.7.2 3 times"));
    a.wait_for_after("net ping: 10.0.7.2: 3 sent, 3 received", from_a, Duration::from_secs(60));
    let on = rounds_on(&mut b) - before;
    let t = a.transcript();
    let rtts: Vec<&str> = t[from_a..].lines().filter_map(|l| l.split("net ping: reply from ").nth(1)).collect();
    eprintln!("[host-link] b with two busy vms: {on} rounds went on; replies {rtts:?}");
    assert!(on > 0, "B's rounds never went on with its network quiet");
    for id in [1, 2] {
        b.cmd(&format!("vm stop {id}"));
    }

    // Nobody listens on 7001: B resets the connection, A reports it.
    let from_a = a.transcript().len();
    a.cmd("net send 10.0.7.2:7001 1k");
    a.wait_for_after("net send: to 10.0.7.2:7001 failed after 0 of 1024 bytes", from_a, Duration::from_secs(60));

    a.poweroff();
    b.poweroff();
}
