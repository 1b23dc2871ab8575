//! Harness for whole-system tests: one booted machine per test, driven
//! through its serial console. The image is built once per test binary. A
//! failing test keeps the emulator's logs and prints the console's last
//! lines and where the logs are.

use boot::emulator::Emulator;
use boot::image::{self, ExtraFile, Image, ImageOptions};
use boot::session::{Outcome, Session, SessionOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Defines modules `vmx_bochs` and `svm_qemu`, each with one `#[test]` per
/// named function of the calling file, run on Bochs with VT-x + EPT and on
/// QEMU TCG with AMD-V + NPT.
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod vmx_bochs {
            $(#[test] fn $test() { super::$test(boot::emulator::Emulator::Bochs) })*
        }
        mod svm_qemu {
            $(#[test] fn $test() { super::$test(boot::emulator::Emulator::QemuTcg) })*
        }
    };
}

/// A run name that says which backend ran: `vmx-<test>` or `svm-<test>`.
pub fn label(emu: Emulator, test: &str) -> String {
    format!("{}-{test}", emu.backend())
}

/// How long one console command may take (Bochs runs ~100 MIPS).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// The test image with `extra` lines in its `hypervisor.cfg`; each variant
/// is built once per test binary.
fn image(extra: &[&str]) -> Image {
    image_with(extra, &[])
}

/// The test image with `extra` config lines and host `files` in its
/// ramdisk; each variant is built once per test binary.
fn image_with(extra: &[&str], files: &[ExtraFile]) -> Image {
    static IMAGES: OnceLock<Mutex<HashMap<Vec<String>, Image>>> = OnceLock::new();
    let mut key: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    key.extend(files.iter().map(|f| format!("file:{}={}", f.name, f.path.display())));
    let mut images = IMAGES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let n = images.len();
    images
        .entry(key.clone())
        .or_insert_with(|| {
            let opts = ImageOptions {
                debug_exit: true,
                name: format!("tests-{}-{n}", std::process::id()),
                extra_config: extra.iter().map(|s| s.to_string()).collect(),
                files: files.to_vec(),
                ..Default::default()
            };
            image::build(&opts).unwrap_or_else(|e| panic!("building the test image: {e:#}"))
        })
        .clone()
}

/// The Debian kernel and initramfs `scripts/guest-linux` prepares
/// (`target/guests/linux/`), or `None` after a line saying the test is
/// skipped without them.
pub fn linux_guest() -> Option<(PathBuf, PathBuf)> {
    let dir = boot::target_dir().join("guests/linux");
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.img"));
    if !kernel.exists() || !initrd.exists() {
        println!("skipped: no Linux guest in {} (scripts/guest-linux prepares it)", dir.display());
        return None;
    }
    Some((kernel, initrd))
}

/// [`linux_guest`] as the hypervisor's ramdisk files `linux` and
/// `linux-initrd` (what `vm run linux` boots).
pub fn linux_guest_files() -> Option<[ExtraFile; 2]> {
    let (kernel, initrd) = linux_guest()?;
    Some([ExtraFile { name: "linux".into(), path: kernel }, ExtraFile { name: "linux-initrd".into(), path: initrd }])
}

/// The test image's boot disk (built on first use).
pub fn boot_disk() -> PathBuf {
    image(&[]).disk
}

pub struct Machine {
    session: Option<Session>,
    pub emulator: Emulator,
    name: String,
    /// The boot disk image (shared by the machines of one test binary).
    pub boot_disk: PathBuf,
}

impl Machine {
    /// Boots the test image; `name` labels the run's log directory.
    pub fn boot(emulator: Emulator, name: &str) -> Machine {
        Self::boot_with(emulator, name, &[])
    }

    /// Boots the test image with extra `hypervisor.cfg` lines.
    pub fn boot_with(emulator: Emulator, name: &str, config: &[&str]) -> Machine {
        Self::boot_image(emulator, name, image(config), &SessionOptions::default())
    }

    /// As `boot_with`, with two CPUs in Bochs too (QEMU has two anyway):
    /// for the tests of SMP itself.
    pub fn boot_smp(emulator: Emulator, name: &str, config: &[&str]) -> Machine {
        let options = SessionOptions { cpus: Some(2), ..Default::default() };
        Self::boot_image(emulator, name, image(config), &options)
    }

    /// Boots the test image with `scratch`, an existing raw image, as its
    /// scratch disk (used in place, so the test can inspect it afterwards).
    pub fn boot_with_scratch(emulator: Emulator, name: &str, scratch: &Path) -> Machine {
        let options = SessionOptions { scratch_disk: Some(scratch.to_path_buf()), ..Default::default() };
        Self::boot_image(emulator, name, image(&[]), &options)
    }

    /// Boots the test image with host `files` added to its ramdisk.
    pub fn boot_with_files(emulator: Emulator, name: &str, files: &[ExtraFile]) -> Machine {
        Self::boot_image(emulator, name, image_with(&[], files), &SessionOptions::default())
    }

    /// Both: host `files` in the ramdisk, `scratch` as the scratch disk.
    pub fn boot_with_files_and_scratch(emulator: Emulator, name: &str, files: &[ExtraFile], scratch: &Path) -> Machine {
        let options = SessionOptions { scratch_disk: Some(scratch.to_path_buf()), ..Default::default() };
        Self::boot_image(emulator, name, image_with(&[], files), &options)
    }

    /// Starts `img` and waits for the console. Bochs sometimes cannot start
    /// at all on a busy machine: its display library exits at once when no
    /// port in 5900-5949 is free ("RFB could not bind any port"). That is
    /// the test machine's state, not the hypervisor's, so such a start is
    /// retried (three times, two seconds apart); any other failure is not.
    fn boot_image(emulator: Emulator, name: &str, img: Image, options: &SessionOptions) -> Machine {
        for attempt in 1..=3 {
            let m = Self::start_image(emulator, name, img.clone(), options);
            if m.s().wait_for(boot::session::READY, 0, Duration::from_secs(120)).is_ok() {
                return m;
            }
            let stderr = std::fs::read_to_string(m.run_dir().join("emulator.stderr")).unwrap_or_default();
            if attempt < 3 && stderr.contains("RFB could not bind any port") {
                eprintln!("[{name}] {} could not open its display port; starting it again", emulator.name());
                drop(m);
                std::thread::sleep(Duration::from_secs(2));
                continue;
            }
            // Drop prints the console's last lines and where the logs are.
            panic!("[{name}] timed out after 120s waiting for {:?}", boot::session::READY);
        }
        unreachable!("the last attempt either returned or panicked")
    }

    /// Two QEMU hosts on one Ethernet link (`boot::link`: an e1000 each,
    /// unix datagram sockets on this machine only), booted together with
    /// extra `hypervisor.cfg` lines each. `name` labels both runs.
    pub fn boot_linked_pair(name: &str, config_a: &[&str], config_b: &[&str]) -> (Machine, Machine) {
        Self::boot_linked_pair_with_files(name, config_a, config_b, &[])
    }

    /// As [`Machine::boot_linked_pair`], with host `files_a` in A's ramdisk
    /// (a guest that starts on A and moves to B).
    pub fn boot_linked_pair_with_files(
        name: &str,
        config_a: &[&str],
        config_b: &[&str],
        files_a: &[ExtraFile],
    ) -> (Machine, Machine) {
        Self::boot_linked_pair_with_files_each(name, config_a, config_b, files_a, &[])
    }

    /// As [`Machine::boot_linked_pair_with_files`], with `files_b` in B's
    /// ramdisk too (guests on both hosts).
    pub fn boot_linked_pair_with_files_each(
        name: &str,
        config_a: &[&str],
        config_b: &[&str],
        files_a: &[ExtraFile],
        files_b: &[ExtraFile],
    ) -> (Machine, Machine) {
        let dir = boot::target_dir().join("runs").join(format!("{name}-link-{}", std::process::id()));
        let (end_a, end_b) = boot::link::pair(&dir).unwrap_or_else(|e| panic!("[{name}] setting up the link: {e:#}"));
        let start = |suffix: &str, config: &[&str], files: &[ExtraFile], nic| {
            let options = SessionOptions { nic: Some(nic), ..Default::default() };
            Self::start_image(Emulator::QemuTcg, &format!("{name}-{suffix}"), image_with(config, files), &options)
        };
        let a = start("a", config_a, files_a, end_a);
        let b = start("b", config_b, files_b, end_b);
        for m in [&a, &b] {
            if m.s().wait_for(boot::session::READY, 0, Duration::from_secs(180)).is_err() {
                panic!("[{}] timed out after 180s waiting for {:?}", m.name, boot::session::READY);
            }
        }
        (a, b)
    }

    /// Cuts (`up == false`) or restores the link of the pair
    /// [`Machine::boot_linked_pair`] made as `name`, as a pulled cable
    /// would: each QEMU sends its frames to the other's socket by path,
    /// so moving both paths aside drops every frame until they are back.
    pub fn set_link_up(name: &str, up: bool) {
        let dir = boot::target_dir().join("runs").join(format!("{name}-link-{}", std::process::id()));
        for end in ["a.sock", "b.sock"] {
            let (live, aside) = (dir.join(end), dir.join(format!("{end}.down")));
            let (from, to) = if up { (aside, live) } else { (live, aside) };
            std::fs::rename(&from, &to)
                .unwrap_or_else(|e| panic!("[{name}] {} -> {}: {e}", from.display(), to.display()));
        }
    }

    /// A Bochs host (VT-x) and a QEMU host (AMD-V) on one Ethernet link:
    /// UDP on loopback inside a private network namespace the calling
    /// thread enters first (`boot::link::enter_private_netns`: root only;
    /// the consoles' sockets and Bochs' display port live there too).
    pub fn boot_cross_pair(name: &str, config_bochs: &[&str], config_qemu: &[&str]) -> (Machine, Machine) {
        boot::link::enter_private_netns().unwrap_or_else(|e| panic!("[{name}] {e:#}"));
        let (end_b, end_q) = boot::link::cross_pair(47011);
        let start = |emu, suffix: &str, config: &[&str], nic| {
            let options = SessionOptions { nic: Some(nic), ..Default::default() };
            Self::start_image(emu, &format!("{name}-{suffix}"), image(config), &options)
        };
        let b = start(Emulator::Bochs, "vmx", config_bochs, end_b);
        let q = start(Emulator::QemuTcg, "svm", config_qemu, end_q);
        for m in [&b, &q] {
            if m.s().wait_for(boot::session::READY, 0, Duration::from_secs(400)).is_err() {
                panic!("[{}] timed out after 400s waiting for {:?}", m.name, boot::session::READY);
            }
        }
        (b, q)
    }

    /// Starts the emulator without waiting for the console.
    pub fn start(emulator: Emulator, name: &str, config: &[&str]) -> Machine {
        Self::start_image(emulator, name, image(config), &SessionOptions::default())
    }

    fn start_image(emulator: Emulator, name: &str, img: Image, options: &SessionOptions) -> Machine {
        let session = Session::start_with(emulator, &img.disk, name, false, options).expect("starting the emulator");
        eprintln!("[{name}] running on {} (logs: {})", emulator.name(), session.run_dir.display());
        Machine { session: Some(session), emulator, name: name.into(), boot_disk: img.disk }
    }

    /// Waits for the machine to power off by itself and returns how it
    /// ended, whatever that was (for tests of the failure paths).
    pub fn finish(mut self) -> Outcome {
        let s = self.session.take().expect("session");
        let outcome = s.finish(Some(Duration::from_secs(300)));
        let _ = std::fs::remove_dir_all(&outcome.run_dir);
        outcome
    }

    fn s(&self) -> &Session {
        self.session.as_ref().expect("session")
    }

    /// Runs a console line and returns its output (up to the next prompt).
    pub fn cmd(&mut self, line: &str) -> String {
        let s = self.session.as_mut().expect("session");
        match s.command(line, COMMAND_TIMEOUT) {
            Ok(out) => out,
            Err(e) => panic!("[{}] command {line:?} failed: {e:#}", self.name),
        }
    }

    /// Runs a command on QEMU's monitor (the emulator's, not the
    /// hypervisor's console: `mce ...` injects a machine check) and returns
    /// what it printed.
    pub fn monitor(&mut self, command: &str) -> String {
        assert!(self.emulator.is_qemu(), "[{}] only QEMU has a monitor", self.name);
        let path = self.s().run_dir.join("monitor.sock");
        let sock = std::os::unix::net::UnixStream::connect(&path)
            .unwrap_or_else(|e| panic!("[{}] monitor {}: {e}", self.name, path.display()));
        eprintln!("[{}] monitor: {command}", self.name);
        monitor_command(sock, &self.name, command)
    }

    /// Types `bytes` at once (keys for a guest after `vm console`).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let name = self.name.clone();
        let s = self.session.as_mut().expect("session");
        if let Err(e) = s.send_raw(bytes) {
            panic!("[{name}] typing {bytes:?} failed: {e:#}");
        }
    }

    /// Runs a `--json` command: its output must be exactly one JSON line.
    pub fn json(&mut self, line: &str) -> serde_json::Value {
        let out = self.cmd(line);
        let lines: Vec<&str> =
            out.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("[vm ") && !l.starts_with("vm ")).collect();
        assert_eq!(lines.len(), 1, "[{}] {line:?} must print one JSON line, printed:\n{out}", self.name);
        serde_json::from_str(lines[0])
            .unwrap_or_else(|e| panic!("[{}] {line:?}: not JSON ({e}): {}", self.name, lines[0]))
    }

    /// Waits until `text` has appeared anywhere in the console output.
    pub fn wait_for(&self, text: &str, timeout: Duration) {
        if let Err(e) = self.s().wait_for(text, 0, timeout) {
            panic!("[{}] {e:#}", self.name);
        }
    }

    /// `wait_for`, but on a timeout first asks the hypervisor `diagnose`
    /// (a `vm stats` that shows why a guest went quiet: each vCPU's state
    /// and local APIC) and puts the answer in the panic.
    pub fn wait_for_or_report(&mut self, text: &str, timeout: Duration, diagnose: &str) {
        self.wait_for_after_or_report(text, 0, timeout, diagnose);
    }

    /// As [`Machine::wait_for_after`], and on a timeout the failure also
    /// shows what the console command `diagnose` answers (`vm stats <id>`:
    /// each vCPU's state and local APIC, for a guest that stopped).
    pub fn wait_for_after_or_report(&mut self, text: &str, from: usize, timeout: Duration, diagnose: &str) {
        if let Err(e) = self.s().wait_for(text, from, timeout) {
            let report = self.cmd(diagnose);
            panic!("[{}] {e:#}\n{diagnose}:\n{report}", self.name);
        }
    }

    /// Waits until `text` appears in the console output after byte `from`
    /// of the transcript (for text a guest prints more than once).
    pub fn wait_for_after(&self, text: &str, from: usize, timeout: Duration) {
        if let Err(e) = self.s().wait_for(text, from, timeout) {
            panic!("[{}] {e:#}", self.name);
        }
    }

    pub fn transcript(&self) -> String {
        self.s().transcript()
    }

    /// This run's directory (logs, and the scratch disk `scratch.img`).
    pub fn run_dir(&self) -> PathBuf {
        self.s().run_dir.clone()
    }

    /// Kills the emulator at once, as a power cut would: nothing the
    /// hypervisor had not written by then reaches the disk file.
    pub fn pull_the_plug(mut self) {
        let s = self.session.take().expect("session");
        s.finish(Some(Duration::ZERO)).tidy();
    }

    /// Powers off and checks that the machine ended cleanly; keeps the
    /// logs otherwise. The power-off gets five minutes from now, however
    /// long the run was (the Bochs Linux test runs over ten).
    pub fn poweroff(mut self) -> Outcome {
        let mut s = self.session.take().expect("session");
        let _ = s.send_line("poweroff", COMMAND_TIMEOUT);
        let limit = s.elapsed() + Duration::from_secs(300);
        let outcome = s.finish(Some(limit));
        assert!(outcome.success(), "[{}] {}", self.name, outcome.failure_report());
        outcome.tidy();
        outcome
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(s) = self.session.take()
            && std::thread::panicking()
        {
            let outcome = s.finish(Some(Duration::from_secs(1)));
            eprintln!("[{}] {}", self.name, outcome.failure_report());
        }
    }
}

/// The `vm list --json` entry for VM `id`.
pub fn vm_entry(list: &serde_json::Value, id: u64) -> serde_json::Value {
    list["vms"]
        .as_array()
        .and_then(|v| v.iter().find(|e| e["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("no vm {id} in {list}"))
}

/// Runs one QEMU monitor (HMP) `command` over `sock` and returns what it
/// answered (without the echoed line and the prompts; `name` labels
/// failures). The monitor prints a prompt, echoes the line as typed (with
/// its line editor's escapes) up to the newline, then answers and prompts
/// again.
pub fn monitor_command(mut sock: std::os::unix::net::UnixStream, name: &str, command: &str) -> String {
    use std::io::{Read, Write};
    sock.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let (mut text, mut buf, mut sent) = (Vec::new(), [0u8; 4096], false);
    while String::from_utf8_lossy(&text).matches("(qemu) ").count() < 2 {
        let n = sock.read(&mut buf).unwrap_or_else(|e| panic!("[{name}] monitor: {e}"));
        assert!(n > 0, "[{name}] the monitor closed: {}", String::from_utf8_lossy(&text));
        text.extend_from_slice(&buf[..n]);
        if !sent && String::from_utf8_lossy(&text).contains("(qemu) ") {
            sock.write_all(format!("{command}\n").as_bytes()).expect("monitor write");
            sent = true;
        }
    }
    let text = String::from_utf8_lossy(&text).into_owned();
    let answer = text.split("(qemu) ").nth(1).unwrap_or_default();
    answer.split_once("\r\n").map_or("", |(_, a)| a).replace('\r', "")
}
