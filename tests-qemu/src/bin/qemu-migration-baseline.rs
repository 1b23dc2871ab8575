//! The baseline for live migration's figures: QEMU migrating an equivalent
//! guest between two QEMU instances on this machine, with QEMU's own
//! pre-copy (`migrate`), the same guest memory, dirty rate, downtime limit
//! and bandwidth as `tests-qemu/tests/migration.rs` part 2 uses for ours.
//!
//! The guest is `memtest-mb` (`guests::memtest` booted through Multiboot,
//! so plain QEMU's `-kernel` runs it) in `mode=dirty`: it rewrites R pages
//! per millisecond of its own TSC and, on `c` at its serial port, checks
//! every page and prints the longest gap between two page writes it saw
//! (the pause). Both QEMUs run TCG with one thread, as our hosts do; the
//! guest runs directly on the emulated CPU here, nested under the
//! hypervisor there.
//!
//! Usage: `cargo run -p tests-qemu --bin qemu-migration-baseline --
//! [rate=<pages/ms>] [mib=<region MiB>] [bandwidth=<MiB/s>]
//! [downtime=<ms>] [converge=1]` (defaults 1, 8, 8, 300; `converge=1`
//! turns QEMU's auto-converge on, off by default as in QEMU). Prints
//! QEMU's `info migrate` at completion and one summary line.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Qemu {
    child: Child,
    dir: PathBuf,
    name: &'static str,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Qemu {
    fn start(name: &'static str, dir: &Path, kernel: &Path, append: &str, mem_mib: u64, incoming: Option<u16>) -> Qemu {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "pc", "-accel", "tcg,thread=single", "-cpu", "max", "-m", &format!("{mem_mib}M")])
            .args(["-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(kernel)
            .args(["-append", append])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
            .args(["-serial", &format!("unix:{name}.serial,server=on,wait=off")])
            .args(["-monitor", &format!("unix:{name}.monitor,server=on,wait=off")])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.stderr"))).expect("log file"));
        if let Some(port) = incoming {
            cmd.args(["-incoming", &format!("tcp:127.0.0.1:{port}")]);
        }
        let child = cmd.spawn().expect("starting qemu-system-x86_64 (apt-get install qemu-system-x86)");
        Qemu { child, dir: dir.to_path_buf(), name }
    }

    fn socket(&self, what: &str) -> UnixStream {
        let path = self.dir.join(format!("{}.{what}", self.name));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match UnixStream::connect(&path) {
                Ok(s) => return s,
                Err(e) if Instant::now() > deadline => panic!("[{}] {}: {e}", self.name, path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// One monitor command's answer.
    fn monitor(&self, command: &str) -> String {
        tests_qemu::monitor_command(self.socket("monitor"), self.name, command)
    }
}

/// Reads `serial` until a line holding `what`; returns that line.
fn wait_line(serial: &mut UnixStream, seen: &mut String, what: &str, limit: Duration) -> String {
    serial.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        if let Some(line) = seen.lines().find(|l| l.contains(what) && seen.contains(&format!("{l}\n"))) {
            let line = line.to_string();
            let cut = seen.find(&line).unwrap() + line.len();
            seen.drain(..cut);
            return line;
        }
        assert!(Instant::now() < deadline, "no {what:?} within {limit:?}; the guest said: {seen}");
        if let Ok(n) = serial.read(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
}

fn field<'a>(info: &'a str, name: &str) -> &'a str {
    info.lines().find_map(|l| l.strip_prefix(name)).map_or("?", |v| v.trim())
}

fn main() {
    let mut rate = 1;
    let mut mib = 8;
    let mut bandwidth = 8;
    let mut downtime = 300;
    let mut converge = 0;
    for a in std::env::args().skip(1) {
        let (k, v) = a.split_once('=').unwrap_or_else(|| panic!("{a}: want key=value"));
        let v: u64 = v.parse().unwrap_or_else(|_| panic!("{a}: not a number"));
        match k {
            "rate" => rate = v,
            "mib" => mib = v,
            "bandwidth" => bandwidth = v,
            "downtime" => downtime = v,
            "converge" => converge = v,
            _ => panic!("{a}: rate=, mib=, bandwidth=, downtime= or converge="),
        }
    }
    let root = boot::target_dir();
    let built = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "guests", "--release", "--target", "x86_64-unknown-none", "--bin", "memtest-mb"])
        .status()
        .expect("cargo");
    assert!(built.success(), "building memtest-mb failed");
    let kernel = root.join("x86_64-unknown-none/release/memtest-mb");
    let dir = root.join("runs").join(format!("qemu-migration-baseline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("run directory");
    // Memory as the hypervisor's VM has it: the region plus 8 MiB.
    let mem = mib + 8;
    let append = format!("mode=dirty mib={mib} rate={rate} seed=7");
    let port = 47400 + (std::process::id() % 500) as u16;
    let b = Qemu::start("b", &dir, &kernel, &append, mem, Some(port));
    let a = Qemu::start("a", &dir, &kernel, &append, mem, None);
    let (mut sa, mut seen_a) = (a.socket("serial"), String::new());
    let started = wait_line(&mut sa, &mut seen_a, "memtest: dirty: ", Duration::from_secs(60));
    eprintln!("[a] {started}");
    let mut sb = b.socket("serial");
    a.monitor(&format!("migrate_set_parameter downtime-limit {downtime}"));
    a.monitor(&format!("migrate_set_parameter max-bandwidth {bandwidth}M"));
    if converge == 1 {
        // QEMU's auto-converge: throttles the guest's CPU while the dirty
        // rate outruns the link (off by default).
        a.monitor("migrate_set_capability auto-converge on");
    }
    let t0 = Instant::now();
    a.monitor(&format!("migrate -d tcp:127.0.0.1:{port}"));
    let info = loop {
        let info = a.monitor("info migrate");
        if info.contains("Migration status: completed") || info.contains("Migration status: failed") {
            break info;
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "still migrating after 600 s:\n{info}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let wall = t0.elapsed().as_secs_f64();
    println!("{info}");
    assert!(info.contains("completed"), "the migration failed");
    let mut seen_b = String::new();
    sb.write_all(b"c").expect("serial write");
    // The check: "live check ...", the longest pause, then PASS (or FAIL
    // with the first mismatch).
    let check = wait_line(&mut sb, &mut seen_b, "memtest: live check", Duration::from_secs(60));
    let pause = wait_line(&mut sb, &mut seen_b, "memtest: dirty: ", Duration::from_secs(60));
    // Where its pauses fell (a line of its own since 2026-12-03).
    let pauses = wait_line(&mut sb, &mut seen_b, "memtest: dirty: pauses over", Duration::from_secs(60));
    let pause = format!("{pause} / {pauses}");
    let verdict = wait_line(&mut sb, &mut seen_b, "memtest: ", Duration::from_secs(60));
    assert!(verdict.contains("PASS"), "the guest's check on B: {check} / {verdict}");
    println!(
        "qemu baseline: rate {rate} pages/ms, {mem} MiB guest ({mib} MiB region), bandwidth {bandwidth} MiB/s, downtime limit {downtime} ms, auto-converge {}: \
         total {} ms (wall {wall:.2} s), downtime {} ms, {} iterations (dirty syncs), transferred {} KiB, {} zero pages, {} normal pages, throttle {}; guest on B: {pause}",
        if converge == 1 { "on" } else { "off" },
        field(&info, "total time:").trim_end_matches(" ms"),
        field(&info, "downtime:").trim_end_matches(" ms"),
        field(&info, "dirty sync count:"),
        field(&info, "transferred ram:").trim_end_matches(" kbytes"),
        field(&info, "duplicate:").trim_end_matches(" pages"),
        field(&info, "normal:").trim_end_matches(" pages"),
        field(&info, "cpu throttle percentage:"),
    );
    let _ = std::fs::remove_dir_all(&dir);
}
