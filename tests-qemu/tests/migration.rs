//! Live migration (pre-copy) between two QEMU hosts (AMD-V, TCG) on one
//! Ethernet link. One boot pair serves every check (CI time):
//!
//! 1. a corrupt byte on the wire (`corrupt_at=`, the test aid): B refuses
//!    the stream naming the record, A's VM runs on;
//! 2. memtest in `mode=dirty` (rewriting pages at a set rate, checking
//!    every page against its header) moves A -> B: its check passes on B,
//!    its longest pause is printed, A freed the VM only once B confirmed
//!    (A's VM ended naming B's id, which only B's answer carries);
//! 3. a guest that dirties memory faster than the link sends (4 pages per
//!    ms, above the link's rate) is throttled (auto-converge) until its
//!    dirty set fits the downtime limit: it moves before the 30-round cap,
//!    and its check passes on B;
//! 4. post-copy (`mode=postcopy`): the VM runs on B at once, its pages
//!    follow (those it touches asked for first), its check passes on B and
//!    A frees it after the last page;
//! 5. hybrid (`mode=hybrid`) with the guest of part 3: pre-copy rounds,
//!    then post-copy once the dirty set stops shrinking, no throttle;
//! 6. a host memory error: QEMU's monitor injects an uncorrected error
//!    (`mce`) into A's idle CPU 1 at the host frame of a guest page; A's
//!    #MC handler reads the bank and the page is poisoned. The VM migrates
//!    with the page as poisoned (never as data); on B the guest touches it,
//!    gets a machine check naming the page, retires it, and every other
//!    page checks out;
//! 7. B's emulator is killed during pre-copy of another VM: A's VM runs
//!    on and its check still passes.
//!
//! `MIGRATION_RATE` (pages per ms, default 1) and `MIGRATION_MIB` (region,
//! default 8) set the guest for benchmarks (docs/benchmarks.md), and
//! `MIGRATION_CONNECTIONS` (1 or 2, default 2) part 4's post-copy.

use std::time::{Duration, Instant};
use tests_qemu::{Machine, vm_entry};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// VM `id`'s nested page table now: (2 MiB leaves, 4 KiB leaves).
fn nested_now(m: &mut Machine, id: u64) -> (u64, u64) {
    let s = m.json(&format!("vm stats {id} --json"));
    let n = &s["nested_pages_now"];
    (n["2m"].as_u64().unwrap_or_else(|| panic!("{s}")), n["4k"].as_u64().unwrap_or_else(|| panic!("{s}")))
}

/// Part 4's cut: once the guest on B asked for a page and pages are still
/// to come, the link goes down until both sides saw it break (both copies
/// paused), then comes back. B's id of the VM.
fn cut_during_postcopy(
    a: &mut Machine,
    b: &mut Machine,
    from_a: usize,
    from_b: usize,
    started: Instant,
    limit: Duration,
) -> serde_json::Value {
    loop {
        let s = a.json("vm migrate status 3 --json");
        if s["demand_requests"].as_u64().unwrap_or(0) >= 1 && s["postcopy_pages_left"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(s["state"] == "postcopy" && started.elapsed() < limit, "{s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Machine::set_link_up("migration", false);
    a.wait_for_after("lost its connection", from_a, limit);
    b.wait_for_after("broke:", from_b, limit);
    let (lost, broke) =
        (report(&a.transcript(), from_a, "vm 3: post-copy"), report(&b.transcript(), from_b, "migrate: post-copy"));
    eprintln!("[migration] link cut: A: {lost}\n[migration] B: {broke}");
    assert!(lost.contains("stays paused here"), "{lost}");
    assert!(broke.contains("is paused here"), "{broke}");
    assert_eq!(vm_entry(&a.json("vm list --json"), 3)["state"], "paused");
    let on_b = b.json("vm list --json");
    let id_b = on_b["vms"].as_array().unwrap().iter().find(|v| v["state"] == "paused").expect("B's copy, paused")["id"]
        .clone();
    // Which side holds which pages: B says how many it lacks.
    let pc = b.json(&format!("vm stats {id_b} --json"))["postcopy"].clone();
    eprintln!("[migration] B during the cut: {pc}");
    assert!(pc["pages_missing"].as_u64().unwrap() > 0 && pc["from"].as_str().unwrap().starts_with("10.0.8.1:"), "{pc}");
    Machine::set_link_up("migration", true);
    id_b
}

/// The text after `what` on the first line holding it, after byte `from`.
fn report(t: &str, from: usize, what: &str) -> String {
    t[from..].lines().find_map(|l| l.find(what).map(|i| l[i..].to_string())).unwrap_or_default()
}

#[test]
fn precopy_between_two_qemu_hosts() {
    let (rate, mib) = (env("MIGRATION_RATE", 1), env("MIGRATION_MIB", 8));
    let mem = mib + 8;
    let limit = Duration::from_secs(300);
    let (mut a, mut b) =
        Machine::boot_linked_pair("migration", &["net_host_ip = 10.0.8.1/24"], &["net_host_ip = 10.0.8.2/24"]);
    let out = b.cmd("migrate listen");
    assert!(out.contains("migrate: listening for migrations on port 7070"), "{out}");
    let out = a.cmd(&format!("vm run memtest mem={mem} -- mode=dirty mib={mib} rate={rate} seed=7"));
    assert!(out.contains("vm 1"), "{out}");
    a.wait_for("memtest: dirty: ", Duration::from_secs(120));

    // 1. A corrupt byte (inside the first memory records): refused by B
    // naming the record; the VM runs on at A.
    let (from_a, from_b) = (a.transcript().len(), b.transcript().len());
    let out = a.cmd("vm migrate 1 10.0.8.2 corrupt_at=300000");
    assert!(out.contains("vm 1: migrating to 10.0.8.2:7070"), "{out}");
    a.wait_for_after("vm 1: migration to 10.0.8.2:7070 failed", from_a, limit);
    b.wait_for_after("migrate: refused the stream from 10.0.8.1", from_b, limit);
    let refused = report(&b.transcript(), from_b, "migrate: refused the stream");
    let failed = report(&a.transcript(), from_a, "vm 1: migration");
    eprintln!("[migration] B: {refused}\n[migration] A: {failed}");
    assert!(refused.contains("checksum") && refused.contains("record"), "{refused}");
    // A learned why from B's answer (not from a silent connection).
    assert!(failed.contains("the destination refused the stream") && failed.contains("checksum"), "{failed}");
    assert_eq!(vm_entry(&a.json("vm list --json"), 1)["state"], "running");
    let on_b = b.json("vm list --json");
    assert!(on_b["vms"].as_array().is_none_or(|v| v.is_empty()), "{on_b}");

    // 2. The real move.
    let large_on_a = nested_now(&mut a, 1);
    let (from_a, from_b) = (a.transcript().len(), b.transcript().len());
    let started = Instant::now();
    a.cmd("vm migrate 1 10.0.8.2 downtime=300");
    b.wait_for_after("migrate: vm ", from_b, limit);
    a.wait_for_after("vm 1: migrated to 10.0.8.2:7070", from_a, limit);
    let wall = started.elapsed().as_secs_f64();
    let (done, arrived) =
        (report(&a.transcript(), from_a, "vm 1: migrated to"), report(&b.transcript(), from_b, "migrate: vm "));
    eprintln!("[migration] A: {done}\n[migration] B: {arrived}\n[migration] wall clock {wall:.2} s");
    assert!(arrived.contains("arrived from 10.0.8.1") && arrived.contains("and runs"), "{arrived}");
    let status = a.json("vm migrate status 1 --json");
    eprintln!("[migration] status: {status}");
    eprintln!("[migration] A's longest net poll: {} us", a.json("net --json")["longest_poll_us"]);
    assert_eq!(status["state"], "completed", "{status}");
    let there = status["destination_vm"].as_u64().expect("the VM's id on B");
    assert!(status["iteration"].as_u64().unwrap() >= 2 && status["pages_sent"].as_u64().unwrap() >= mem * 256);
    // A freed it, naming B's id: it learned it only from B's answer.
    let gone = vm_entry(&a.json("vm list --json"), 1);
    assert_ne!(gone["state"], "running", "{gone}");
    assert_eq!(vm_entry(&b.json("vm list --json"), there)["state"], "running");
    // Large pages kept: what was 2 MiB-mapped on A is 2 MiB-mapped on B.
    let large_on_b = nested_now(&mut b, there);
    eprintln!("[migration] nested leaves (2 MiB, 4 KiB): A before {large_on_a:?}, B after {large_on_b:?}");
    assert!(large_on_a.0 > 0 && large_on_b.0 >= large_on_a.0, "A {large_on_a:?} B {large_on_b:?}");
    // The guest's check passes on B; its longest pause.
    let from_b = b.transcript().len();
    b.cmd(&format!("vm send {there} -- c"));
    b.wait_for_after("memtest: PASS", from_b, limit);
    let t = b.transcript();
    let pause = report(&t, from_b, "memtest: dirty: ");
    eprintln!(
        "[migration] guest on B: {} / {pause} / {}",
        report(&t, from_b, "memtest: live check"),
        report(&t, from_b, "memtest: dirty: pauses")
    );
    assert!(pause.contains("longest pause"), "{pause}");

    // 3. Faster than the link: throttled until it converges.
    let fast = env("MIGRATION_FAST_RATE", 4);
    let from_a = a.transcript().len();
    let out = a.cmd(&format!("vm run memtest mem={mem} -- mode=dirty mib={mib} rate={fast} seed=9"));
    assert!(out.contains("vm 2"), "{out}");
    a.wait_for_after("memtest: dirty: ", from_a, Duration::from_secs(120));
    let (from_a, from_b) = (a.transcript().len(), b.transcript().len());
    let started = Instant::now();
    a.cmd("vm migrate 2 10.0.8.2 downtime=300");
    a.wait_for_after("vm 2: migrated to 10.0.8.2:7070", from_a, limit);
    let wall = started.elapsed().as_secs_f64();
    let done = report(&a.transcript(), from_a, "vm 2: migrated to");
    let status = a.json("vm migrate status 2 --json");
    eprintln!("[migration] rate {fast}: A: {done}\n[migration] status: {status}\n[migration] wall clock {wall:.2} s");
    assert_eq!(status["state"], "completed", "{status}");
    let throttle = status["throttle_pct"].as_u64().unwrap();
    assert!(throttle >= 20, "not throttled: {status}");
    assert!(done.contains(&format!("throttled up to {throttle}%")), "{done}");
    assert!(status["iteration"].as_u64().unwrap() < 30, "converged before the round cap: {status}");
    assert!(status["expected_downtime_ms"].as_u64().unwrap() <= 300, "{status}");
    let there = status["destination_vm"].as_u64().unwrap();
    let arrived = report(&b.transcript(), from_b, "migrate: vm ");
    assert!(arrived.contains("and runs"), "{arrived}");
    let from_b = b.transcript().len();
    b.cmd(&format!("vm send {there} -- c"));
    b.wait_for_after("memtest: PASS", from_b, limit);
    eprintln!("[migration] rate {fast} guest on B: {}", report(&b.transcript(), from_b, "memtest: dirty: "));

    // 4. Post-copy: the VM runs on B at once and its pages follow, those
    // it touches there asked for ahead of the rest (slowed to 1 MiB/s so
    // it lasts). The link is cut meanwhile: both copies wait paused, A
    // holding the pages B lacks; when it comes back A connects again and
    // sends them. The guest's check passes on B, and A frees the VM only
    // after the last page.
    let from_a = a.transcript().len();
    let out = a.cmd(&format!("vm run memtest mem={mem} -- mode=dirty mib={mib} rate={rate} seed=11"));
    assert!(out.contains("vm 3"), "{out}");
    a.wait_for_after("memtest: dirty: ", from_a, Duration::from_secs(120));
    let large_on_a = nested_now(&mut a, 3);
    let (from_a, from_b) = (a.transcript().len(), b.transcript().len());
    let started = Instant::now();
    let connections = env("MIGRATION_CONNECTIONS", 2);
    // Benchmarks: no bandwidth limit and no cut.
    let bench = env("MIGRATION_POSTCOPY_BENCH", 0) == 1;
    let limit_bw = if bench { "" } else { " bandwidth=1" };
    let out = a.cmd(&format!("vm migrate 3 10.0.8.2 mode=postcopy{limit_bw} connections={connections}"));
    assert!(out.contains("post-copy"), "{out}");
    b.wait_for_after("(post-copy: ", from_b, limit);
    let resumed = started.elapsed().as_secs_f64();
    let id_b = if bench {
        a.wait_for_after("vm 3: migrated to 10.0.8.2:7070", from_a, limit);
        a.json("vm migrate status 3 --json")["destination_vm"].clone()
    } else {
        cut_during_postcopy(&mut a, &mut b, from_a, from_b, started, limit)
    };
    a.wait_for_after("vm 3: migrated to 10.0.8.2:7070", from_a, limit);
    b.wait_for_after("has all its memory", from_b, limit);
    let wall = started.elapsed().as_secs_f64();
    let t = b.transcript();
    let (runs, again, all) = (
        report(&t, from_b, "runs here after"),
        report(&t, from_b, "connected again"),
        report(&t, from_b, "has all its memory"),
    );
    let status = a.json("vm migrate status 3 --json");
    eprintln!(
        "[migration] post-copy: B: {runs} ({resumed:.2} s after the command)\n[migration] B: {again}\n[migration] B: \
         {all}\n[migration] status: {status}\n[migration] wall clock {wall:.2} s (the cut included)"
    );
    assert_eq!((status["state"].as_str(), status["mode"].as_str()), (Some("completed"), Some("postcopy")), "{status}");
    assert!(status["postcopy_pages"].as_u64().unwrap() >= mem * 256, "all of RAM followed the resume: {status}");
    assert_eq!(status["postcopy_pages_left"], 0, "{status}");
    assert!(bench || status["recoveries"].as_u64().unwrap() >= 1, "{status}");
    assert!(all.contains("asked for by a touch"), "{all}");
    assert_eq!(status["destination_vm"], id_b, "{status}");
    let there = id_b.as_u64().unwrap();
    assert_eq!(vm_entry(&b.json("vm list --json"), there)["state"], "running");
    assert_ne!(vm_entry(&a.json("vm list --json"), 3)["state"], "running");
    // Post-copy splits what it marks missing; each 2 MiB region maps large
    // again once its last page is in.
    let large_on_b = nested_now(&mut b, there);
    eprintln!("[migration] post-copy nested leaves (2 MiB, 4 KiB): A before {large_on_a:?}, B after {large_on_b:?}");
    assert!(large_on_a.0 > 0 && large_on_b.0 >= large_on_a.0, "A {large_on_a:?} B {large_on_b:?}");
    let from_b = b.transcript().len();
    b.cmd(&format!("vm send {there} -- c"));
    b.wait_for_after("memtest: PASS", from_b, limit);
    eprintln!("[migration] post-copy guest on B: {}", report(&b.transcript(), from_b, "memtest: dirty: "));

    // 5. Hybrid: a guest that dirties faster than the link sends (as in
    // part 3) gets pre-copy rounds until its dirty set stops shrinking,
    // then the rest goes post-copy instead of a throttle; its check passes
    // on B.
    let from_a = a.transcript().len();
    let out = a.cmd(&format!("vm run memtest mem={mem} -- mode=dirty mib={mib} rate={fast} seed=12"));
    assert!(out.contains("vm 4"), "{out}");
    a.wait_for_after("memtest: dirty: ", from_a, Duration::from_secs(120));
    let (from_a, from_b) = (a.transcript().len(), b.transcript().len());
    let started = Instant::now();
    a.cmd("vm migrate 4 10.0.8.2 mode=hybrid downtime=300");
    a.wait_for_after("vm 4: migrated to 10.0.8.2:7070", from_a, limit);
    b.wait_for_after("has all its memory", from_b, limit);
    let wall = started.elapsed().as_secs_f64();
    let status = a.json("vm migrate status 4 --json");
    let done = report(&a.transcript(), from_a, "vm 4: migrated to");
    eprintln!("[migration] hybrid: A: {done}\n[migration] status: {status}\n[migration] wall clock {wall:.2} s");
    assert_eq!((status["state"].as_str(), status["mode"].as_str()), (Some("completed"), Some("hybrid")), "{status}");
    let post = status["postcopy_pages"].as_u64().unwrap();
    assert!(status["iteration"].as_u64().unwrap() >= 2 && post > 0 && post < mem * 256, "{status}");
    assert_eq!(status["throttle_pct"], 0, "{status}");
    let there = status["destination_vm"].as_u64().unwrap();
    let from_b = b.transcript().len();
    b.cmd(&format!("vm send {there} -- c"));
    b.wait_for_after("memtest: PASS", from_b, limit);
    eprintln!("[migration] hybrid guest on B: {}", report(&b.transcript(), from_b, "memtest: dirty: "));

    // 6. A memory error on A's host CPU 1 (idle: one VM runs on the boot
    // CPU) in the frame of the guest's page 7, then the move.
    let from_a = a.transcript().len();
    let out = a.cmd("vm run mcetest mem=16 -- pages=64 seed=5");
    assert!(out.contains("vm 5"), "{out}");
    a.wait_for_after("mcetest: ready 0x400000 64", from_a, Duration::from_secs(120));
    let lost = 0x40_0000 + 7 * 4096;
    let page = a.json(&format!("vm page 5 {lost:#x} --json"));
    let frame = page["host_frame"].as_u64().unwrap_or_else(|| panic!("{page}"));
    let from_a = a.transcript().len();
    // Uncorrected, action optional, address valid (QEMU's example status),
    // RIPV|MCIP; MISC 0x86: a physical address valid from bit 6.
    let said = a.monitor(&format!("mce 1 4 0xbd000000000000c0 0x5 {:#x} 0x86", frame + 0x40));
    assert!(!said.contains("disabled") && !said.contains("triple fault"), "QEMU: {said}");
    a.wait_for_after("machine check: cpu 1 bank 4", from_a, limit);
    let mc = report(&a.transcript(), from_a, "machine check: cpu 1");
    eprintln!("[migration] A: {mc}");
    assert!(
        mc.contains(&format!("host-physical {:#x}", frame + 0x40))
            && mc.contains(&format!("poisoned vm 5 page {lost:#x}")),
        "{mc}"
    );
    assert_eq!(a.json(&format!("vm page 5 {lost:#x} --json"))["state"], "poisoned");
    assert_eq!(a.json("host --json")["machine_checks"]["pages_poisoned"], 1);
    let (from_a, from_b) = (a.transcript().len(), b.transcript().len());
    a.cmd("vm migrate 5 10.0.8.2");
    a.wait_for_after("vm 5: migrated to 10.0.8.2:7070", from_a, limit);
    let status = a.json("vm migrate status 5 --json");
    eprintln!(
        "[migration] memory error: A: {}\n[migration] status: {status}",
        report(&a.transcript(), from_a, "vm 5: migrated to")
    );
    let there = status["destination_vm"].as_u64().unwrap();
    b.wait_for_after("and runs", from_b, limit);
    let pages = b.json(&format!("vm stats {there} --json"))["pages"].clone();
    assert_eq!(pages["poisoned"], 1, "the page arrived poisoned: {pages}");
    let from_b = b.transcript().len();
    b.cmd(&format!("vm send {there} -- q"));
    b.wait_for_after("mcetest: check:", from_b, limit);
    let t = b.transcript();
    let (given, seen, check) = (
        report(&t, from_b, "machine check delivered"),
        report(&t, from_b, "mcetest: machine check at"),
        report(&t, from_b, "mcetest: check:"),
    );
    eprintln!("[migration] B: {given}\n[migration] guest on B: {seen}\n[migration] guest on B: {check}");
    assert!(given.contains(&format!("guest-physical {lost:#x} is poisoned")), "{given}");
    assert!(seen.contains(&format!("machine check at {lost:#x}")) && seen.contains("page 7 retired"), "{seen}");
    assert!(check.contains("63 good, 1 retired, 0 bad: PASS"), "{check}");

    // 7. B dies during pre-copy of another VM (slowed to 1 MiB/s so
    // pre-copy lasts): the VM runs on at A.
    let from_a = a.transcript().len();
    let out = a.cmd(&format!("vm run memtest mem={mem} -- mode=dirty mib={mib} rate={rate} seed=8"));
    let id = if out.contains("vm 6") { 6 } else { panic!("{out}") };
    a.wait_for_after("memtest: dirty: ", from_a, Duration::from_secs(120));
    let from_a = a.transcript().len();
    a.cmd(&format!("vm migrate {id} 10.0.8.2 bandwidth=1"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = a.json(&format!("vm migrate status {id} --json"));
        if s["state"] == "precopy" && s["bytes_on_wire"].as_u64().unwrap_or(0) > 1 << 20 {
            break;
        }
        assert!(Instant::now() < deadline && s["state"] != "failed", "{s}");
        std::thread::sleep(Duration::from_millis(500));
    }
    b.pull_the_plug();
    a.wait_for_after(&format!("vm {id}: migration to 10.0.8.2:7070 failed"), from_a, limit);
    eprintln!("[migration] A: {}", report(&a.transcript(), from_a, &format!("vm {id}: migration")));
    let s = a.json(&format!("vm migrate status {id} --json"));
    assert_eq!(s["state"], "failed", "{s}");
    assert_eq!(vm_entry(&a.json("vm list --json"), id)["state"], "running");
    let from_a = a.transcript().len();
    a.cmd(&format!("vm send {id} -- c"));
    a.wait_for_after("memtest: PASS", from_a, limit);
    a.poweroff();
}
