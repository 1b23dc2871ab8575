//! A Linux guest moves between two QEMU hosts (AMD-V, TCG) by pre-copy,
//! while it runs: the Debian kernel of `scripts/guest-linux` with its
//! initramfs shell boots on A with two vCPUs; a shell loop prints a numbered beat every
//! second and a file in its tmpfs holds a mark. After the move its console
//! answers on B: the beats go on from where they were (the same processes,
//! not a new boot), the file is there, the clock went on, A freed the VM
//! only once B confirmed, and B maps as many 2 MiB nested leaves as A did.
//! Then it moves back to A by post-copy (running on A at once, its pages
//! following): its shell answers there and its virtio-rng still serves it.

use std::time::{Duration, Instant};
use tests_qemu::{Machine, vm_entry};

/// The numbers of the guest's beats (`beat-N`) in `t`, in order.
fn beats(t: &str) -> Vec<u64> {
    t.lines().filter_map(|l| l.split_once("beat-").and_then(|(_, n)| n.trim().parse().ok())).collect()
}

/// The guest's uptime (seconds) on the last line of `t` that holds both
/// `tag` and a figure after `up=` (the shell echoes the command too, where
/// `up=` is followed by the command substitution).
fn uptime_at(t: &str, tag: &str) -> Option<f64> {
    t.lines()
        .rev()
        .filter(|l| l.contains(tag))
        .find_map(|l| l.split_once("up=").and_then(|(_, r)| r.split_whitespace().next()?.parse().ok()))
}

/// Whether a `vm list` entry is a live VM: running, or (an idle guest)
/// every vCPU halted waiting for an interrupt.
fn live(entry: &serde_json::Value) -> bool {
    matches!(entry["state"].as_str(), Some("running" | "waiting"))
}

/// The VM's nested leaves now (`vm stats --json`), as shown.
fn nested_now(m: &mut Machine, id: u64) -> serde_json::Value {
    m.json(&format!("vm stats {id} --json"))["nested_pages_now"].clone()
}

#[test]
fn a_running_linux_guest_moves_to_another_host_and_its_shell_answers_there() {
    let Some(files) = tests_qemu::linux_guest_files() else { return };
    let limit = Duration::from_secs(300);
    let (mut a, mut b) = Machine::boot_linked_pair_with_files(
        "migration-linux",
        &["net_host_ip = 10.0.9.1/24"],
        &["net_host_ip = 10.0.9.2/24"],
        &files,
    );
    let t0 = Instant::now();
    let at = |what: &str| eprintln!("[migration-linux] {:6.1} s: {what}", t0.elapsed().as_secs_f64());
    let out = b.cmd("migrate listen");
    assert!(out.contains("migrate: listening for migrations on port 7070"), "{out}");
    let out = a.cmd("vm run linux mem=128 vcpus=2 -- console=ttyS0 quiet");
    assert!(out.contains("vm 1 started: linux (linux, 128 MiB"), "{out}");
    a.wait_for_or_report("linux-guest:/# ", Duration::from_secs(400), "vm stats 1");
    at("the shell's prompt on A");
    a.cmd("vm send 1 -- echo moved-with-me > /tmp/mark; (i=0; while :; do i=$((i+1)); echo beat-$i; sleep 1; done) &");
    a.cmd("vm send 1 -- echo up=$(cut -d' ' -f1 /proc/uptime) before-$((100+1))");
    a.wait_for_or_report("before-101", Duration::from_secs(120), "vm stats 1");
    a.wait_for_or_report("beat-3", Duration::from_secs(120), "vm stats 1");
    let up_a = uptime_at(&a.transcript(), "before-101").expect("the guest's uptime on A");

    at("beats on A");
    let nested_a = nested_now(&mut a, 1);
    let (from_a, from_b) = (a.transcript().len(), b.transcript().len());
    let started = Instant::now();
    let out = a.cmd("vm migrate 1 10.0.9.2");
    assert!(out.contains("vm 1: migrating to 10.0.9.2:7070"), "{out}");
    a.wait_for_after("vm 1: migrated to 10.0.9.2:7070", from_a, limit);
    b.wait_for_after("migrate: vm ", from_b, limit);
    let wall = started.elapsed().as_secs_f64();
    let last_beat_on_a = beats(&a.transcript()).last().copied().expect("beats on A");
    let status = a.json("vm migrate status 1 --json");
    eprintln!("[migration-linux] status: {status}\n[migration-linux] wall clock {wall:.2} s");
    assert_eq!(status["state"], "completed", "{status}");
    let there = status["destination_vm"].as_u64().expect("the VM's id on B");
    assert!(!live(&vm_entry(&a.json("vm list --json"), 1)), "A still runs its copy");
    let moved = vm_entry(&b.json("vm list --json"), there);
    assert!(live(&moved), "{moved}");
    // Large pages kept: B maps as many 2 MiB leaves as A did.
    let nested_b = nested_now(&mut b, there);
    eprintln!("[migration-linux] nested leaves on A before: {nested_a}, on B after: {nested_b}");
    assert!(nested_a["2m"].as_u64() > Some(0) && nested_b["2m"].as_u64() >= nested_a["2m"].as_u64(), "{nested_b}");

    at("moved to B");
    // On B: the beats go on from A's last, and the shell answers.
    let from_b = b.transcript().len();
    b.wait_for_after_or_report(
        &format!("beat-{}", last_beat_on_a + 2),
        from_b,
        Duration::from_secs(120),
        &format!("vm stats {there}"),
    );
    b.cmd(&format!(
        "vm send {there} -- cat /tmp/mark; echo cpus=$(grep -c ^processor /proc/cpuinfo); \
         echo up=$(cut -d' ' -f1 /proc/uptime) after-$((40+2))"
    ));
    b.wait_for_after_or_report("after-42", from_b, Duration::from_secs(120), &format!("vm stats {there}"));
    let t = b.transcript();
    let on_b = &t[from_b..];
    assert!(on_b.contains(&format!("[vm {there}] moved-with-me")), "the guest's tmpfs did not move:\n{on_b}");
    assert!(on_b.contains(&format!("[vm {there}] cpus=2")), "both vCPUs came along:\n{on_b}");
    let after: Vec<u64> = beats(on_b);
    assert!(
        after.first().is_some_and(|&n| n > last_beat_on_a && n <= last_beat_on_a + 2),
        "the beats started again rather than going on (A's last {last_beat_on_a}): {after:?}"
    );
    // Increasing (a line the console split while the guest waited for its
    // UART would drop one number from the parse, not reorder them).
    assert!(after.windows(2).all(|w| w[1] > w[0]), "beats repeated on B: {after:?}");
    let up_b = uptime_at(on_b, "after-42").expect("the guest's uptime on B");
    eprintln!(
        "[migration-linux] guest uptime {up_a:.2} s on A before, {up_b:.2} s on B after; beats {last_beat_on_a} on A, {after:?} on B"
    );
    assert!(up_b > up_a, "the guest's clock went back: {up_a} then {up_b}");

    at("B's shell answered");
    // Back to A by post-copy: it runs on A at once, its pages follow.
    let out = a.cmd("migrate listen");
    assert!(out.contains("migrate: listening for migrations on port 7070"), "{out}");
    let (from_a, from_b) = (a.transcript().len(), b.transcript().len());
    let started = Instant::now();
    let out = b.cmd(&format!("vm migrate {there} 10.0.9.1 mode=postcopy"));
    assert!(out.contains("post-copy"), "{out}");
    a.wait_for_after("migrate: vm ", from_a, limit);
    b.wait_for_after(&format!("vm {there}: migrated to 10.0.9.1:7070"), from_b, limit);
    let wall = started.elapsed().as_secs_f64();
    let status = b.json(&format!("vm migrate status {there} --json"));
    eprintln!("[migration-linux] post-copy status: {status}\n[migration-linux] wall clock {wall:.2} s");
    assert_eq!(status["state"], "completed", "{status}");
    let back = status["destination_vm"].as_u64().expect("the VM's id on A");
    at("back on A");
    let last_beat_on_b = beats(&b.transcript()).last().copied().expect("beats on B");
    let from_a = a.transcript().len();
    a.wait_for_after_or_report(
        &format!("beat-{}", last_beat_on_b + 2),
        from_a,
        Duration::from_secs(120),
        &format!("vm stats {back}"),
    );
    a.cmd(&format!("vm send {back} -- cat /tmp/mark; head -c 8 /dev/hwrng | od -An -tx1; echo home-$((40+3))"));
    a.wait_for_after_or_report("home-43", from_a, Duration::from_secs(120), &format!("vm stats {back}"));
    let t = a.transcript();
    let home = &t[from_a..];
    assert!(home.contains(&format!("[vm {back}] moved-with-me")), "{home}");
    // virtio-rng still serves it: its queue pages came by post-copy.
    let prefix = format!("[vm {back}] ");
    assert!(
        home.lines().filter_map(|l| l.strip_prefix(&prefix)).any(|r| {
            let bytes: Vec<&str> = r.split_whitespace().collect();
            bytes.len() == 8 && bytes.iter().all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()))
        }),
        "no 8 bytes from /dev/hwrng on A:\n{home}"
    );
    // Post-copy maps each 2 MiB region large again once its last page is
    // there.
    let nested_back = nested_now(&mut a, back);
    eprintln!("[migration-linux] nested leaves back on A: {nested_back}");
    assert!(nested_back["2m"].as_u64() >= nested_a["2m"].as_u64(), "{nested_back}");
    a.poweroff();
    b.poweroff();
}
