//! The migration console commands (they need the host network as well
//! as the VMs, so the kernel routes them here beside `net`):
//!
//! ```text
//! migrate listen [port]                         accept migrations (default port 7070)
//! vm migrate <id> <a.b.c.d>[:port] [mode=precopy|postcopy|hybrid] [connections=1|2] [downtime=<ms>] [bandwidth=<MiB/s>] [throttle=<max %>] [corrupt_at=<byte>]
//! vm migrate status <id>                        progress, or how the last one ended
//! ```
//! Each takes `--json`. `corrupt_at=` is a test aid: it flips that byte of
//! the stream on the wire, so the destination's refusal can be tested.
//! Bad input gets a one-line error and changes nothing.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use serde_json::{Value, json};

use super::DEFAULT_PORT;
use super::source::{DEFAULT_DOWNTIME_MS, Mode, Options, Status};
use crate::backend::Backend;
use crate::hostnet::tcp::{Transport, parse_endpoint};
use crate::manager::Manager;
use crate::vm::exit::Console;
use crate::vm::throttle::MAX_PCT;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrateCommand {
    Listen(u16),
    Start(u32, Options),
    Status(u32),
}

/// Help lines for the console's `help`.
pub const HELP: &[(&str, &str)] = &[
    ("migrate listen [port]", "accept live migrations on <port> (7070 unless told), one at a time"),
    (
        "vm migrate <id> <a.b.c.d>[:port] [mode=precopy|postcopy|hybrid] [connections=1|2] [downtime=<ms>] [bandwidth=<MiB/s>] [throttle=<max %>]",
        "live-migrate VM <id> to a listening host (pre-copy unless told; pre-copy slowed by up to throttle=, 99 unless told, 0: never, if it does not converge; hybrid goes post-copy instead); freed here once it runs there with all its memory",
    ),
    ("vm migrate status <id>", "a migration's progress, or how the last one ended"),
];

/// A parsed line and whether `--json` was given.
pub type Parsed = (MigrateCommand, bool);

/// `None` if `line` is not a migration command; else the command or the
/// one-line refusal (and whether JSON was asked for).
pub fn parse(line: &str) -> Option<Result<Parsed, (String, bool)>> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let json = words.contains(&"--json");
    let args: Vec<&str> = words.iter().copied().filter(|w| *w != "--json").collect();
    let r = match args.as_slice() {
        ["migrate", rest @ ..] => parse_listen(rest),
        ["vm", "migrate", rest @ ..] => parse_migrate(rest),
        _ => return None,
    };
    Some(r.map(|c| (c, json)).map_err(|e| (e, json)))
}

fn parse_listen(args: &[&str]) -> Result<MigrateCommand, String> {
    match args {
        ["listen"] => Ok(MigrateCommand::Listen(DEFAULT_PORT)),
        ["listen", port] => match port.parse::<u16>() {
            Ok(p) if p != 0 => Ok(MigrateCommand::Listen(p)),
            _ => Err(format!("migrate listen: {port:?} is not a port (1-65535)")),
        },
        _ => Err(String::from("migrate: usage: 'migrate listen [port]'")),
    }
}

fn parse_id(s: &str) -> Result<u32, String> {
    s.parse().map_err(|_| format!("vm migrate: {s:?} is not a VM id"))
}

fn parse_migrate(args: &[&str]) -> Result<MigrateCommand, String> {
    const USAGE: &str = "vm migrate: usage: 'vm migrate <id> <a.b.c.d>[:port] [mode=precopy|postcopy|hybrid] [connections=1|2] [downtime=<ms>] [bandwidth=<MiB/s>] [throttle=<max %>]' or 'vm migrate status <id>'";
    match args {
        ["status", id] => Ok(MigrateCommand::Status(parse_id(id)?)),
        [id, host, opts @ ..] if *id != "status" => {
            let id = parse_id(id)?;
            let with_port = if host.contains(':') { String::from(*host) } else { format!("{host}:{DEFAULT_PORT}") };
            let to = parse_endpoint(&with_port).map_err(|e| format!("vm migrate: {host:?}: {e}"))?;
            let mut o = Options {
                to,
                downtime_ms: DEFAULT_DOWNTIME_MS,
                bandwidth_mib: None,
                throttle_max: MAX_PCT,
                corrupt_at: None,
                mode: Mode::Precopy,
                connections: 2,
            };
            for opt in opts {
                let (key, value) =
                    opt.split_once('=').ok_or_else(|| format!("vm migrate: {opt:?}: expected key=value"))?;
                let num = |max: u64| {
                    value
                        .parse::<u64>()
                        .ok()
                        .filter(|&n| n >= 1 && n <= max)
                        .ok_or_else(|| format!("vm migrate: {opt:?}: expected a number 1-{max}"))
                };
                match key {
                    "downtime" => o.downtime_ms = num(60_000)? as u32,
                    "bandwidth" => o.bandwidth_mib = Some(num(100_000)? as u32),
                    "throttle" => {
                        o.throttle_max = value.parse::<u8>().ok().filter(|&n| n <= MAX_PCT).ok_or_else(|| {
                            format!("vm migrate: {opt:?}: expected the most CPU time to take, 0-{MAX_PCT} (percent)")
                        })?
                    }
                    "connections" => {
                        o.connections = match value {
                            "1" => 1,
                            "2" => 2,
                            _ => {
                                return Err(format!(
                                    "vm migrate: {opt:?}: 1 (one connection) or 2 (post-copy: a second one for the \
                                     pages the destination asks for)"
                                ));
                            }
                        }
                    }
                    "mode" => {
                        o.mode = match value {
                            "precopy" => Mode::Precopy,
                            "postcopy" => Mode::Postcopy,
                            "hybrid" => Mode::Hybrid,
                            _ => return Err(format!("vm migrate: {opt:?}: mode is precopy, postcopy or hybrid")),
                        }
                    }
                    "corrupt_at" => {
                        o.corrupt_at =
                            Some(value.parse().map_err(|_| format!("vm migrate: {opt:?}: not a byte offset"))?)
                    }
                    _ => {
                        return Err(format!(
                            "vm migrate: unknown option {key:?} (mode, connections, downtime, bandwidth, throttle)"
                        ));
                    }
                }
            }
            Ok(MigrateCommand::Start(id, o))
        }
        _ => Err(String::from(USAGE)),
    }
}

/// Runs a parsed command (`t`: the host network, `None` without a NIC)
/// and prints its reply: text lines, or one JSON line.
pub fn execute<B: Backend, T: Transport>(
    p: &Parsed,
    m: &mut Manager<B>,
    t: Option<&mut T>,
    now_us: u64,
    out: &mut impl Console,
) {
    let (cmd, json) = p;
    let name = match cmd {
        MigrateCommand::Listen(_) => "migrate listen",
        MigrateCommand::Start(..) => "vm migrate",
        MigrateCommand::Status(_) => "vm migrate status",
    };
    let result = run(cmd, m, t, now_us);
    match result {
        Ok((text, fields)) => crate::console::reply::print(out, name, *json, true, Ok((&text, fields))),
        Err(e) => crate::console::reply::print(out, name, *json, true, Err(&e)),
    }
}

/// A refusal from [`parse`], in the form asked for.
pub fn report_parse_error(e: &(String, bool), out: &mut impl Console) {
    crate::console::reply::print_parse_error(out, &e.0, e.1);
}

fn run<B: Backend, T: Transport>(
    cmd: &MigrateCommand,
    m: &mut Manager<B>,
    t: Option<&mut T>,
    now_us: u64,
) -> Result<(String, Value), String> {
    const NO_NET: &str = "no network device (no 82540EM on the PCI bus, or it failed to start)";
    match cmd {
        MigrateCommand::Listen(port) => {
            m.listen_migrations(*port, t.ok_or(NO_NET)?)?;
            Ok((format!("migrate: listening for migrations on port {port}"), json!({ "port": port })))
        }
        MigrateCommand::Start(id, o) => {
            m.start_migration(*id, o.clone(), t.ok_or(NO_NET)?, now_us)?;
            let bw = o.bandwidth_mib.map_or_else(|| String::from("unlimited"), |b| format!("{b} MiB/s"));
            let how = match o.mode {
                Mode::Postcopy => String::from("post-copy: it runs there at once, its pages follow"),
                Mode::Hybrid => {
                    format!("hybrid, downtime {} ms: post-copy once pre-copy stops converging", o.downtime_ms)
                }
                Mode::Precopy if o.throttle_max == 0 => {
                    format!("pre-copy, downtime {} ms, never throttled", o.downtime_ms)
                }
                Mode::Precopy => format!(
                    "pre-copy, downtime {} ms, throttled up to {}% if it does not converge",
                    o.downtime_ms, o.throttle_max
                ),
            };
            Ok((
                format!(
                    "vm {id}: migrating to {} ({how}, bandwidth {bw}); 'vm migrate status {id}' shows progress, the \
                     result follows",
                    o.to
                ),
                json!({ "id": id, "to": o.to.to_string() }),
            ))
        }
        MigrateCommand::Status(id) => {
            let s = m.migration_status(*id).ok_or_else(|| format!("vm {id} has not migrated from this host"))?;
            Ok((status_text(s), serde_json::to_value(s).unwrap_or(Value::Null)))
        }
    }
}

fn status_text(s: &Status) -> String {
    let mut t = format!(
        "vm {}: migration to {}: {}, iteration {}, {} pages sent ({} raw, {} zero, {} compressed), {} bytes on the wire, \
         {} dirty in the last round ({} pages/s), expected downtime {} ms at {} KiB/s, {} ms elapsed",
        s.id,
        s.to,
        s.state,
        s.iteration,
        s.pages_sent,
        s.sent.raw_pages,
        s.sent.zero_pages,
        s.sent.compressed_pages,
        s.bytes_on_wire,
        s.dirty_pages_last_round,
        s.dirty_rate_pages_per_s,
        s.expected_downtime_ms,
        s.rate_bytes_per_s / 1024,
        s.elapsed_ms
    );
    if s.throttle_pct > 0 {
        t.push_str(&format!("; throttled {}%", s.throttle_pct));
    }
    if s.postcopy_pages > 0 {
        t.push_str(&format!(
            "; post-copy: {} of {} pages left, {} asked for by the destination",
            s.postcopy_pages_left, s.postcopy_pages, s.demand_requests
        ));
    }
    if let Some(d) = s.downtime_ms {
        t.push_str(&format!("; downtime {d} ms"));
    }
    if let Some(v) = s.destination_vm {
        t.push_str(&format!("; vm {v} there"));
    }
    if let Some(e) = &s.error {
        t.push_str(&format!("; error: {e}"));
    }
    t
}
