//! One run of the image in an emulator, with COM1 bridged over a loopback
//! TCP socket: the emulator connects to us, we keep the transcript, feed it
//! console lines (from a script, a test or the terminal), and decide how the
//! run ended from what the hypervisor printed.

use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::emulator::{self, Emulator};
use crate::script::Step;

/// What the kernel prints; the harness keys on these.
pub const PROMPT: &str = "hv> ";
/// Printed once boot and the autorun commands are done.
pub const READY: &str = "hypervisor: ready";
pub const POWER_OFF_OK: &str = "hypervisor: power off (ok)";
pub const POWER_OFF_FAIL: &str = "hypervisor: power off (failure)";
pub const FATAL: &str = "!!! hypervisor";

#[derive(Default)]
struct Shared {
    text: String,
    closed: bool,
}

type Output = Arc<(Mutex<Shared>, Condvar)>;

/// How a machine is set up beyond its boot disk.
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    /// An existing raw image to use as the scratch disk, in place, instead
    /// of a fresh blank one in the run directory.
    pub scratch_disk: Option<PathBuf>,
    /// An `e1000` on one end of a link to another host (`link`).
    pub nic: Option<crate::link::NicEnd>,
    /// CPUs, if not the emulator's default (`Emulator::default_cpus`).
    pub cpus: Option<u32>,
}

pub struct Session {
    pub emulator: Emulator,
    pub run_dir: PathBuf,
    child: Child,
    stream: TcpStream,
    out: Output,
    started: Instant,
    /// Prompt count when the last line was sent.
    prompts_at_send: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The hypervisor powered the machine off and said whether all was well.
    PoweredOff {
        ok: bool,
    },
    /// The emulator stopped without the hypervisor's power-off line.
    EmulatorExited(Option<i32>),
    TimedOut,
}

#[derive(Debug)]
pub struct Outcome {
    pub emulator: Emulator,
    pub ending: Ending,
    /// The emulator's exit code, if it exited on its own. QEMU with
    /// isa-debug-exit: 3 = the hypervisor reported failure; 0 = ACPI soft-off.
    pub exit_code: Option<i32>,
    pub transcript: String,
    pub run_dir: PathBuf,
    pub elapsed: Duration,
}

impl Outcome {
    /// Powered off cleanly and no CPU exception or panic was reported.
    pub fn success(&self) -> bool {
        self.ending == Ending::PoweredOff { ok: true } && !self.transcript.contains(FATAL)
    }

    /// The last lines of the console and of the emulator's logs, for a
    /// failure report.
    pub fn failure_report(&self) -> String {
        let mut s = format!(
            "run on {} ended with {:?} after {:.1}s; logs kept in {}\n--- last console lines:\n",
            self.emulator.name(),
            self.ending,
            self.elapsed.as_secs_f64(),
            self.run_dir.display()
        );
        s.push_str(&tail(&self.transcript, 40));
        for f in ["emulator.stderr", "emulator.stdout", "bochs.log", "qemu.log"] {
            if let Ok(t) = std::fs::read_to_string(self.run_dir.join(f))
                && !t.trim().is_empty()
            {
                s.push_str(&format!("\n--- last lines of {f}:\n{}", tail(&t, 15)));
            }
        }
        s
    }

    /// Deletes the logs of a successful run; keeps them otherwise.
    pub fn tidy(&self) {
        if self.success() {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    let start = v.len().saturating_sub(lines);
    let mut s = v[start..].join("\n");
    s.push('\n');
    s
}

/// The key that ends an interactive run: Ctrl-\ (Ctrl-] belongs to the
/// hypervisor, which detaches from a guest's console on it).
pub const QUIT_KEY: u8 = 0x1c;

impl Session {
    /// Starts the emulator and waits for it to connect its serial port.
    /// With `echo`, console output is copied to stdout as it arrives.
    pub fn start(emu: Emulator, disk: &std::path::Path, name: &str, echo: bool) -> Result<Session> {
        Self::start_with(emu, disk, name, echo, &SessionOptions::default())
    }

    /// [`start`](Self::start) with `options`.
    pub fn start_with(
        emu: Emulator,
        disk: &std::path::Path,
        name: &str,
        echo: bool,
        options: &SessionOptions,
    ) -> Result<Session> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the console socket")?;
        let port = listener.local_addr()?.port();
        let run_dir = emulator::new_run_dir(name, emu)?;
        let mut child = emulator::spawn_with_nic(
            emu,
            disk,
            options.scratch_disk.as_deref(),
            port,
            &run_dir,
            options.nic.as_ref(),
            options.cpus,
        )?;
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Some(st) = child.try_wait()? {
                        bail!(
                            "{} exited ({st}) before connecting its serial port; logs in {}",
                            emu.name(),
                            run_dir.display()
                        );
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        bail!("{} did not connect its serial port within 60 s", emu.name());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        let out: Output = Arc::default();
        let reader = stream.try_clone()?;
        let out2 = out.clone();
        std::thread::spawn(move || pump(reader, out2, echo));
        Ok(Session { emulator: emu, run_dir, child, stream, out, started: Instant::now(), prompts_at_send: None })
    }

    pub fn transcript(&self) -> String {
        self.out.0.lock().unwrap().text.clone()
    }

    /// Waits until `cond` holds for the transcript, the console closes or
    /// `timeout` passes; returns whether `cond` held.
    fn wait_until(&self, timeout: Duration, cond: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.out;
        let mut g = lock.lock().unwrap();
        loop {
            if cond(&g.text) {
                return true;
            }
            let now = Instant::now();
            if g.closed || now >= deadline {
                return false;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Waits for `text` to appear after byte offset `from` of the
    /// transcript, and for the line it is on to be complete.
    pub fn wait_for(&self, text: &str, from: usize, timeout: Duration) -> Result<()> {
        let complete = |t: &str| {
            t.get(from..).and_then(|s| s.find(text).map(|p| s[p + text.len()..].contains('\n'))).unwrap_or(false)
        };
        if self.wait_until(timeout, complete) {
            Ok(())
        } else if self.out.0.lock().unwrap().closed {
            bail!("the console closed (the emulator ended) while waiting for {text:?}")
        } else {
            bail!("timed out after {}s waiting for {text:?}", timeout.as_secs())
        }
    }

    /// Sends `bytes` as they are, at once (keys for an attached guest);
    /// returns the transcript offset from which their effect shows.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<usize> {
        let offset = self.out.0.lock().unwrap().text.len();
        self.stream.write_all(bytes)?;
        self.stream.flush()?;
        Ok(offset)
    }

    /// Why the console ended early, for an error message: the emulator's
    /// exit status once it is gone (QEMU's debug-exit port gives 3 for the
    /// hypervisor's failure power-off), or nothing while it still runs.
    fn why_closed(&mut self) -> String {
        if !self.out.0.lock().unwrap().closed {
            return String::new();
        }
        // The console closes just before the process is reaped.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return format!(": the console closed, the emulator ended ({st})"),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => return String::from(": the console closed, the emulator still running"),
            }
        }
    }

    /// Sends one console line once the hypervisor is at its prompt; returns
    /// the transcript offset where the command's output begins.
    pub fn send_line(&mut self, line: &str, timeout: Duration) -> Result<usize> {
        let need = self.prompts_at_send.map_or(1, |n| n + 1);
        if !self.wait_until(timeout, |t| t.matches(PROMPT).count() >= need) {
            bail!(
                "the console showed no prompt within {}s (before sending {line:?}){}",
                timeout.as_secs(),
                self.why_closed()
            );
        }
        let (count, offset) = {
            let g = self.out.0.lock().unwrap();
            (g.text.matches(PROMPT).count(), g.text.len())
        };
        self.prompts_at_send = Some(count);
        self.stream.write_all(line.as_bytes())?;
        self.stream.write_all(b"\r")?;
        self.stream.flush()?;
        Ok(offset)
    }

    /// Sends a line and returns its output: everything up to the next prompt.
    pub fn command(&mut self, line: &str, timeout: Duration) -> Result<String> {
        let from = self.send_line(line, timeout)?;
        let need = self.prompts_at_send.unwrap_or(0) + 1;
        if !self.wait_until(timeout, |t| t.matches(PROMPT).count() >= need) {
            bail!("no prompt within {}s after {line:?}{}", timeout.as_secs(), self.why_closed());
        }
        let t = self.transcript();
        let body = &t[from..];
        // The output starts after the echo of the command (VM output may
        // come before it) and ends at the next prompt.
        let echo = format!("{line}\n");
        let start = body.find(&echo).map_or(0, |p| p + echo.len());
        let body = &body[start..];
        let end = body.find(PROMPT).unwrap_or(body.len());
        Ok(body[..end].to_string())
    }

    pub fn run_steps(&mut self, steps: &[Step]) -> Result<()> {
        let mut mark = 0;
        for step in steps {
            match step {
                Step::Send(line) => mark = self.send_line(line, Duration::from_secs(120))?,
                Step::Wait { text, timeout } => self.wait_for(text, mark, *timeout)?,
                Step::Sleep(d) => std::thread::sleep(*d),
                Step::Type(bytes) => mark = self.send_raw(bytes)?,
            }
        }
        Ok(())
    }

    /// Forwards the terminal to the console until the machine powers off.
    /// On a terminal, keys go through raw (Ctrl-\\ quits; Ctrl-] is the
    /// hypervisor's key to detach from a guest's console); otherwise stdin
    /// is read as console lines.
    pub fn interactive(&mut self) -> Result<()> {
        let stdin_tty = unsafe_isatty(0);
        if stdin_tty {
            eprintln!("[boot] console attached; Ctrl-\\ quits (Ctrl-] detaches from a guest's console)");
            let _raw = RawTerminal::enable()?;
            let mut w = self.stream.try_clone()?;
            let out = self.out.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                let mut stdin = std::io::stdin();
                while let Ok(n) = stdin.read(&mut buf) {
                    if n == 0 || buf[..n].contains(&QUIT_KEY) {
                        break;
                    }
                    if w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                out.0.lock().unwrap().closed = true;
                out.1.notify_all();
            });
            self.wait_until(Duration::from_secs(u64::MAX / 4), |t| {
                t.contains(POWER_OFF_OK) || t.contains(POWER_OFF_FAIL)
            });
        } else {
            for line in std::io::stdin().lines() {
                let line = line?;
                let steps = crate::script::parse(&line)?;
                self.run_steps(&steps)?;
            }
            // Input ended: once the console is up (autorun done), let every
            // VM that was started finish, then power off, so a
            // non-interactive run always ends.
            self.wait_for(READY, 0, Duration::from_secs(300))?;
            for id in started_vms(&self.transcript()) {
                self.wait_for(&format!("vm {id} ("), 0, Duration::from_secs(600))?;
            }
            self.send_line("poweroff", Duration::from_secs(120))?;
        }
        Ok(())
    }

    /// How long the emulator has been running.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for the power-off line (or the emulator's end) and stops the
    /// emulator; `timeout` counts from the start of the run.
    pub fn finish(mut self, timeout: Option<Duration>) -> Outcome {
        let limit = timeout.unwrap_or(Duration::from_secs(u64::MAX / 4));
        let remaining = limit.saturating_sub(self.started.elapsed());
        let powered = self.wait_until(remaining, |t| t.contains(POWER_OFF_OK) || t.contains(POWER_OFF_FAIL));
        let ending = if powered {
            let ok = self.transcript().contains(POWER_OFF_OK);
            // Give the emulator a moment to act on the power-off.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ending::PoweredOff { ok }
        } else {
            match self.child.try_wait() {
                Ok(Some(st)) => Ending::EmulatorExited(st.code()),
                _ => Ending::TimedOut,
            }
        };
        let exit_code = match self.child.try_wait() {
            Ok(Some(st)) => st.code(),
            _ => None,
        };
        let _ = self.child.kill();
        let _ = self.child.wait();
        let transcript = self.transcript();
        let _ = std::fs::write(self.run_dir.join("console.log"), &transcript);
        Outcome {
            emulator: self.emulator,
            ending,
            exit_code,
            transcript,
            run_dir: self.run_dir.clone(),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// Ids of the VMs the transcript shows being started ("vm N started").
pub fn started_vms(transcript: &str) -> Vec<u32> {
    transcript.lines().filter_map(|l| l.strip_prefix("vm ")?.split_once(" started")?.0.parse().ok()).collect()
}

/// Copies console bytes into the transcript ('\r' dropped).
fn pump(mut s: TcpStream, out: Output, echo: bool) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk: Vec<u8> = buf[..n].iter().copied().filter(|&b| b != b'\r').collect();
        let text = String::from_utf8_lossy(&chunk);
        if echo {
            let mut o = std::io::stdout();
            let _ = o.write_all(text.as_bytes());
            let _ = o.flush();
        }
        out.0.lock().unwrap().text.push_str(&text);
        out.1.notify_all();
    }
    out.0.lock().unwrap().closed = true;
    out.1.notify_all();
}

fn unsafe_isatty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// Puts the terminal in raw mode for as long as it lives.
struct RawTerminal(libc::termios);

impl RawTerminal {
    fn enable() -> Result<RawTerminal> {
        // SAFETY: plain termios calls on stdin with a zeroed, then filled,
        // termios structure.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                bail!("tcgetattr failed");
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            t.c_oflag |= libc::OPOST | libc::ONLCR;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            Ok(RawTerminal(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enable`.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn started_vms_are_found() {
        let t = "hv> vm run selftest\nvm 1 started: selftest (elf64)\n[vm 1] vm 9 started\nvm 12 started: x\n";
        assert_eq!(super::started_vms(t), vec![1, 12]);
    }
}
