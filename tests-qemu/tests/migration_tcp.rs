//! A TCP stream a Linux guest serves goes on while the guest moves to
//! another host (two QEMU hosts, AMD-V, TCG, joined by their e1000s).
//!
//! Each host's NIC is the uplink of its switch `lan` (A: `net uplink lan`
//! on the console; B: `net_uplink = lan` in its `hypervisor.cfg`), so
//! the hosts' own stacks, their VMs and the wire are one LAN:
//!
//! - a Linux guest on A (10.0.9.11) serves `nc -l`; a Linux guest on B
//!   (10.0.9.12) streams 20 chunks of 64 KiB to it, one a second;
//! - host A pings its own VM through its switch (no wire involved);
//! - while the stream runs, the server moves to B by pre-copy, over the
//!   same NICs; B announces its MAC from its new port;
//! - the stream ends on B with the MD5 sum the client computed, and host B
//!   now reaches the moved VM through its own switch.
//!
//! The two VMs' MACs differ although both are VM 1 of their host: each host
//! tags the MACs of the VMs on its uplinked switch.

use std::time::Duration;
use tests_qemu::{Machine, vm_entry};

/// The MD5 sum printed on the line after `[vm N] ` that ends with `tag`.
fn md5_line(t: &str, prefix: &str, tag: &str) -> Option<String> {
    t.lines().filter_map(|l| l.strip_prefix(prefix)).find_map(|r| {
        let (sum, rest) = r.split_once(char::is_whitespace)?;
        (rest.trim() == tag && sum.len() == 32 && sum.chars().all(|c| c.is_ascii_hexdigit())).then(|| sum.to_string())
    })
}

/// The highest `chunk-N` the client has reported in `t`.
fn chunks(t: &str) -> u64 {
    t.lines().filter_map(|l| l.split_once("chunk-").and_then(|(_, n)| n.trim().parse().ok())).max().unwrap_or(0)
}

#[test]
fn a_tcp_stream_a_linux_guest_serves_goes_on_while_it_moves_to_another_host() {
    let Some(files) = tests_qemu::linux_guest_files() else { return };
    let limit = Duration::from_secs(300);
    let (mut a, mut b) = Machine::boot_linked_pair_with_files_each(
        "migration-tcp",
        &["net_host_ip = 10.0.9.1/24"],
        &["net_host_ip = 10.0.9.2/24", "net_uplink = lan"],
        &files,
        &files,
    );
    // A by the console, B by its hypervisor.cfg.
    let out = a.cmd("net uplink lan");
    assert!(out.contains("net: the NIC is the uplink of switch lan (promiscuous)"), "{out}");
    assert!(b.transcript().contains("net: the NIC is the uplink of switch lan (promiscuous)"), "{}", b.transcript());
    let out = b.cmd("migrate listen");
    assert!(out.contains("migrate: listening"), "{out}");
    let out = a.cmd("vm run linux mem=128 net=lan -- console=ttyS0 quiet");
    assert!(out.contains("vm 1 started"), "{out}");
    let out = b.cmd("vm run linux mem=128 net=lan -- console=ttyS0 quiet");
    assert!(out.contains("vm 1 started"), "{out}");
    a.wait_for_or_report("linux-guest:/# ", Duration::from_secs(400), "vm stats 1");
    b.wait_for_or_report("linux-guest:/# ", Duration::from_secs(400), "vm stats 1");

    // Both are VM 1 of their host, with MACs of their host's tag (the low
    // six bits of its NIC's MAC, 52:54:00:77:00:01 and :02).
    a.cmd("vm send 1 -- ip addr add 10.0.9.11/24 dev eth0; ip link set eth0 up; cat /sys/class/net/eth0/address");
    a.wait_for("[vm 1] 06:00:00:00:01:00", Duration::from_secs(120));
    b.cmd("vm send 1 -- ip addr add 10.0.9.12/24 dev eth0; ip link set eth0 up; cat /sys/class/net/eth0/address");
    b.wait_for("[vm 1] 0a:00:00:00:01:00", Duration::from_secs(120));
    b.cmd("vm send 1 -- ping -c 2 -W 5 10.0.9.11");
    b.wait_for("[vm 1] 2 packets transmitted, 2 packets received", Duration::from_secs(120));
    // Host A reaches its own VM through its switch.
    let from_a = a.transcript().len();
    a.cmd("net ping 10.0.9.11 2");
    a.wait_for_after("net ping: 10.0.9.11: 2 sent, 2 received", from_a, Duration::from_secs(60));

    // The stream: A's guest serves, B's guest sends a chunk a second.
    a.cmd("vm send 1 -- nc -l -p 5000 | md5sum; echo stream-done-$((3+4))");
    std::thread::sleep(Duration::from_secs(1));
    b.cmd(
        "vm send 1 -- yes tcp-across-migration | head -c 65536 > /tmp/c; \
         i=0; while [ $i -lt 20 ]; do i=$((i+1)); cat /tmp/c; done | md5sum; echo sent-sum-$((1+1))",
    );
    b.wait_for("[vm 1] sent-sum-2", Duration::from_secs(120));
    b.cmd("vm send 1 -- (i=0; while [ $i -lt 20 ]; do i=$((i+1)); cat /tmp/c; echo chunk-$i >&2; sleep 1; done) | nc 10.0.9.11 5000");
    b.wait_for("chunk-3", Duration::from_secs(120));

    let (from_a, from_b) = (a.transcript().len(), b.transcript().len());
    let out = a.cmd("vm migrate 1 10.0.9.2");
    assert!(out.contains("vm 1: migrating to 10.0.9.2:7070"), "{out}");
    a.wait_for_after("vm 1: migrated to 10.0.9.2:7070", from_a, limit);
    b.wait_for_after("migrate: vm ", from_b, limit);
    let at_switch_over = chunks(&b.transcript());
    let status = a.json("vm migrate status 1 --json");
    eprintln!("[migration-tcp] status: {status}; the client had sent {at_switch_over} of 20 chunks");
    assert_eq!(status["state"], "completed", "{status}");
    assert!(at_switch_over < 20, "the stream was over before the move; nothing was tested");
    let there = status["destination_vm"].as_u64().expect("the VM's id on B");
    assert!(vm_entry(&b.json("vm list --json"), there)["state"].is_string());

    // The stream ends on B with the client's sum.
    let done = format!("[vm {there}] stream-done-7");
    b.wait_for_after(&done, from_b, limit);
    let t = b.transcript();
    let sent = md5_line(&t, "[vm 1] ", "-").expect("the client's MD5 sum");
    let got = md5_line(&t[from_b..], &format!("[vm {there}] "), "-").expect("the server's MD5 sum on B");
    assert_eq!(sent, got, "the stream's bytes changed across the move");
    assert!(t.contains("[vm 1] sent-sum-2"), "{t}");

    // Host B reaches the VM that moved in through its own switch.
    let from_b = b.transcript().len();
    b.cmd("net ping 10.0.9.11 2");
    b.wait_for_after("net ping: 10.0.9.11: 2 sent, 2 received", from_b, Duration::from_secs(60));
    let stats = b.json(&format!("vm stats {there} --json"));
    assert_eq!(stats["nic"]["switch"], "lan", "{stats}");
    let net_b = b.json("net --json");
    eprintln!("[migration-tcp] B: {net_b}");
    assert_eq!(net_b["uplink"]["switch"], "lan", "{net_b}");
    a.poweroff();
    b.poweroff();
}
