//! Harness for whole-system tests: one booted machine per test, driven
//! through its serial console. The image is built once per test binary. A
//! failing test keeps the emulator's logs and prints the console's last
//! lines and where the logs are.

use boot::emulator::Emulator;
use boot::image::{self, Image, ImageOptions};
use boot::session::{Outcome, Session};
use std::sync::OnceLock;
use std::time::Duration;

/// How long one console command may take (Bochs runs ~100 MIPS).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        image::build(&ImageOptions {
            debug_exit: true,
            name: "tests".into(),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("building the test image: {e:#}"))
    })
}

pub struct Machine {
    session: Option<Session>,
    pub emulator: Emulator,
    name: String,
}

impl Machine {
    /// Boots the test image; `name` labels the run's log directory.
    pub fn boot(emulator: Emulator, name: &str) -> Machine {
        let img = image();
        let session =
            Session::start(emulator, &img.disk, name, false).expect("starting the emulator");
        eprintln!(
            "[{name}] running on {} (logs: {})",
            emulator.name(),
            session.run_dir.display()
        );
        let m = Machine {
            session: Some(session),
            emulator,
            name: name.into(),
        };
        m.wait_for(boot::session::READY, Duration::from_secs(120));
        m
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

    /// Runs a `--json` command: its output must be exactly one JSON line.
    pub fn json(&mut self, line: &str) -> serde_json::Value {
        let out = self.cmd(line);
        let lines: Vec<&str> = out
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("[vm ") && !l.starts_with("vm "))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "[{}] {line:?} must print one JSON line, printed:\n{out}",
            self.name
        );
        serde_json::from_str(lines[0])
            .unwrap_or_else(|e| panic!("[{}] {line:?}: not JSON ({e}): {}", self.name, lines[0]))
    }

    /// Waits until `text` has appeared anywhere in the console output.
    pub fn wait_for(&self, text: &str, timeout: Duration) {
        if let Err(e) = self.s().wait_for(text, 0, timeout) {
            panic!("[{}] {e:#}", self.name);
        }
    }

    pub fn transcript(&self) -> String {
        self.s().transcript()
    }

    /// Powers off and checks that the machine ended cleanly; keeps the
    /// logs otherwise.
    pub fn poweroff(mut self) -> Outcome {
        let mut s = self.session.take().expect("session");
        let _ = s.send_line("poweroff", COMMAND_TIMEOUT);
        let outcome = s.finish(Some(Duration::from_secs(600)));
        assert!(
            outcome.success(),
            "[{}] {}",
            self.name,
            outcome.failure_report()
        );
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
