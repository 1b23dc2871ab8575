//! The Linux guest that `scripts/setup` prepares (Debian's cloud kernel and
//! the busybox initramfs, in `target/guests/linux/`), booted directly by
//! QEMU TCG with `-kernel`, no hypervisor: the initramfs reaches its marker
//! and a shell that runs commands, and `poweroff` ends QEMU. The time to
//! the marker is the baseline a boot under the hypervisor is measured
//! against. Skipped (with a message) when the guest has not been prepared.

use boot::initramfs::MARKER;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(180);
const PROMPT: &str = "linux-guest:/# ";

/// QEMU's console output so far, fed by a reader thread.
struct Console {
    rx: mpsc::Receiver<Vec<u8>>,
    text: String,
}

impl Console {
    /// Waits until the output after byte `from` holds `needle`; returns the
    /// position just past it.
    fn wait_for(&mut self, needle: &str, from: usize, deadline: Instant) -> usize {
        loop {
            if let Some(at) = self.text[from..].find(needle) {
                return from + at + needle.len();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(chunk) => self.text.push_str(&String::from_utf8_lossy(&chunk)),
                Err(_) => panic!("no {needle:?} from the guest in time; console:\n{}", self.text),
            }
        }
    }
}

#[test]
fn debian_kernel_boots_directly_under_qemu_to_a_shell() {
    let Some((kernel, initrd)) = tests_qemu::linux_guest() else { return };
    let start = Instant::now();
    let deadline = start + TIMEOUT;
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "pc", "-accel", "tcg", "-m", "256", "-display", "none", "-serial", "stdio"])
        .args(["-monitor", "none", "-no-reboot", "-kernel"])
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting qemu-system-x86_64");
    let mut stdout = qemu.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut console = Console { rx, text: String::new() };
    let mut stdin = qemu.stdin.take().unwrap();

    let at = console.wait_for(MARKER, 0, deadline);
    let to_marker = start.elapsed();
    let at = console.wait_for(PROMPT, at, deadline);
    writeln!(stdin, "uname -r").unwrap();
    let at = console.wait_for("-cloud-amd64", at, deadline);
    let at = console.wait_for(PROMPT, at, deadline);
    writeln!(stdin, "poweroff").unwrap();
    console.wait_for("reboot: Power down", at, deadline);
    while qemu.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "QEMU did not exit after the guest powered off");
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "direct QEMU TCG boot of {}: {MARKER:?} after {:.1} s, powered off after {:.1} s",
        kernel.display(),
        to_marker.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
}
