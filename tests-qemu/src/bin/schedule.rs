//! Runs every whole-system test, one process per test, on as many emulator
//! slots as the machine has cores, longest first.
//!
//! `cargo test -p tests-qemu -- --test-threads=2` runs the suites one after
//! another, so a suite whose last test is long (the Bochs Linux boot) leaves
//! a core idle until it ends. Here every test of every suite is one job; the
//! jobs start longest first (by the times in `tests-qemu/schedule.txt`) and a
//! test that boots two hosts takes two slots. Each test's output goes to
//! `target/test-logs/<suite>--<test>.log` and is printed when it fails; at
//! the end the measured times are printed in `schedule.txt`'s format.
//!
//! Usage: `cargo run -p tests-qemu --bin schedule -- [--jobs N] [FILTER]...`
//! (a test runs when its `suite::name` contains any FILTER, or there is none).

use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A test not in `schedule.txt` is expected to take this long.
const UNKNOWN_SECS: u64 = 60;

/// How much of a failed test's output is printed (all of it is in its log).
const LOG_TAIL_LINES: usize = 200;

struct Job {
    suite: String,
    test: String,
    exe: PathBuf,
    expected_secs: u64,
    slots: usize,
}

impl Job {
    fn id(&self) -> String {
        format!("{}::{}", self.suite, self.test)
    }
}

struct Finished {
    index: usize,
    ok: bool,
    took: Duration,
    log: PathBuf,
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("schedule: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool, String> {
    let mut jobs_wanted = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let mut filters = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--jobs" {
            jobs_wanted = args.next().and_then(|n| n.parse().ok()).filter(|&n| n > 0).ok_or("--jobs needs a number")?;
        } else {
            filters.push(a);
        }
    }
    let slots = jobs_wanted;
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let table = read_table(&here.join("schedule.txt"))?;

    let mut jobs = Vec::new();
    for (suite, exe) in test_binaries(&here)? {
        for test in list_tests(&exe)? {
            let id = format!("{suite}::{test}");
            if !filters.is_empty() && !filters.iter().any(|f| id.contains(f.as_str())) {
                continue;
            }
            let (expected_secs, hosts) = table.get(&id).copied().unwrap_or((UNKNOWN_SECS, 1));
            jobs.push(Job { suite: suite.clone(), test, exe: exe.clone(), expected_secs, slots: hosts.min(slots) });
        }
    }
    if jobs.is_empty() {
        return Err("no test matches".into());
    }
    // Longest first: the long tests start while there is still other work
    // to fill the remaining slots.
    jobs.sort_by(|a, b| b.expected_secs.cmp(&a.expected_secs).then_with(|| a.id().cmp(&b.id())));
    let expected: u64 = jobs.iter().map(|j| j.expected_secs * j.slots as u64).sum();
    println!(
        "schedule: {} tests on {slots} slot(s), about {} min of emulator time",
        jobs.len(),
        expected.div_ceil(60 * slots as u64)
    );

    let logs = boot::target_dir().join("test-logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let start = Instant::now();
    let (tx, rx) = mpsc::channel::<Finished>();
    let mut pending: Vec<usize> = (0..jobs.len()).collect();
    let mut free = slots;
    let mut running = 0;
    let mut results: Vec<Option<Finished>> = (0..jobs.len()).map(|_| None).collect();
    loop {
        // Start the longest pending job that fits in the free slots.
        while let Some(pos) = pending.iter().position(|&i| jobs[i].slots <= free) {
            let i = pending.remove(pos);
            let job = &jobs[i];
            free -= job.slots;
            running += 1;
            let log = logs.join(format!("{}--{}.log", job.suite, job.test.replace("::", "--")));
            println!("[{:>5}s] start {} (about {} s)", start.elapsed().as_secs(), job.id(), job.expected_secs);
            let (exe, test, tx) = (job.exe.clone(), job.test.clone(), tx.clone());
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let ok = run_one(&exe, &test, &log);
                let _ = tx.send(Finished { index: i, ok, took: t0.elapsed(), log });
            });
        }
        if running == 0 {
            break;
        }
        let done = rx.recv().map_err(|e| e.to_string())?;
        running -= 1;
        let job = &jobs[done.index];
        free += job.slots;
        let verdict = if done.ok { "ok    " } else { "FAILED" };
        println!("[{:>5}s] {verdict} {} in {} s", start.elapsed().as_secs(), job.id(), done.took.as_secs());
        if !done.ok {
            // The harness's own report (console tail, log directory) and
            // libtest's panic message are at the end.
            let out = std::fs::read_to_string(&done.log).unwrap_or_default();
            let lines: Vec<&str> = out.lines().collect();
            let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
            println!(
                "---- {} output, last {LOG_TAIL_LINES} lines of {} ----\n{tail}\n---- end of {} ----",
                job.id(),
                done.log.display(),
                job.id()
            );
        }
        let index = done.index;
        results[index] = Some(done);
    }

    let failed: Vec<String> =
        results.iter().flatten().filter(|r| !r.ok).map(|r| jobs[r.index].id()).collect::<Vec<_>>();
    println!("\nschedule: measured times (schedule.txt's format):");
    for (job, r) in jobs.iter().zip(&results) {
        if let Some(r) = r {
            println!("{} {} {}", job.id(), r.took.as_secs(), job.slots);
        }
    }
    println!(
        "\nschedule: {} passed, {} failed, {} s in all",
        jobs.len() - failed.len(),
        failed.len(),
        start.elapsed().as_secs()
    );
    for f in &failed {
        println!("  failed: {f}");
    }
    Ok(failed.is_empty())
}

/// `suite::test expected_seconds hosts` per line; `#` starts a comment.
fn read_table(path: &Path) -> Result<HashMap<String, (u64, usize)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut table = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let parsed = match f.as_slice() {
            [id, secs, hosts] => secs.parse().ok().zip(hosts.parse().ok()).map(|v| (id.to_string(), v)),
            _ => None,
        };
        let (id, v) =
            parsed.ok_or_else(|| format!("{}:{}: expected `suite::test seconds hosts`", path.display(), n + 1))?;
        table.insert(id, v);
    }
    Ok(table)
}

/// Builds the whole-system test binaries and names each by its suite.
fn test_binaries(package_dir: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["test", "-p", "tests-qemu", "--no-run", "--message-format=json"])
        .current_dir(package_dir)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cargo: {e}"))?;
    if !out.status.success() {
        return Err("building the tests failed".into());
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        let is_test = v["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(exe)) = (is_test, v["target"]["name"].as_str(), v["executable"].as_str()) {
            bins.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    bins.sort();
    Ok(bins)
}

fn list_tests(exe: &Path) -> Result<Vec<String>, String> {
    let out = Command::new(exe)
        .args(["--list", "--format", "terse"])
        .output()
        .map_err(|e| format!("{}: {e}", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().filter_map(|l| l.strip_suffix(": test")).map(str::to_string).collect())
}

/// Runs one test alone in its binary, output to `log`.
fn run_one(exe: &Path, test: &str, log: &Path) -> bool {
    let Ok(file) = std::fs::File::create(log) else { return false };
    let Ok(err) = file.try_clone() else { return false };
    Command::new(exe)
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .status()
        .is_ok_and(|s| s.success())
}
