//! The console's command grammar:
//!
//! ```text
//! help | host | poweroff
//! vm run <guest> [mem=<MiB>] [mod=<file>]... [-- <command line>]
//! vm list | vm stats <id> | vm stop <id>
//! mem | mem sharing on [<pages per round>] | mem sharing off
//! mem scan [<id>] | mem target <id> <MiB>|none
//! ```
//! Every command also takes `--json` (anywhere on the line): its reply is
//! then exactly one JSON line.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::manager::{MAX_MEM_MIB, MIN_MEM_MIB};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Help,
    Host,
    /// `vm create`: a VM built and waiting for `vm start`.
    VmCreate {
        name: String,
        kernel: String,
        initrd: Option<String>,
        mem_mib: Option<u32>,
        cmdline: Option<String>,
    },
    VmStart {
        id: u32,
    },
    /// What the line left out is `None` (or empty): the manager fills it
    /// in by the kind of guest (`Manager::run_defaults`).
    VmRun {
        guest: String,
        mem_mib: Option<u32>,
        /// Ramdisk files passed as Multiboot modules (or, for a Linux guest, its
        /// one initramfs).
        modules: Vec<String>,
        /// The guest's command line: `None` without `--`.
        cmdline: Option<String>,
    },
    VmList,
    VmStats {
        id: u32,
    },
    VmStop {
        id: u32,
    },
    /// Stop scheduling a VM / schedule it again.
    VmPause {
        id: u32,
    },
    VmResume {
        id: u32,
    },
    /// Attach the operator's terminal to the guest's serial console.
    VmConsole {
        id: u32,
    },
    /// A line of input for the guest's serial console (COM1).
    VmSend {
        id: u32,
        text: String,
    },
    /// Host and per-VM memory by page state.
    MemShow,
    /// Background page sharing on (with a scan budget) or off.
    MemSharing {
        on: bool,
        pages_per_round: Option<usize>,
    },
    /// One full sharing pass now, over one VM or all.
    MemScan {
        id: Option<u32>,
    },
    /// A VM's memory target in MiB (`None`: no target).
    MemTarget {
        id: u32,
        mib: Option<u32>,
    },
    Poweroff,
}

impl Command {
    /// The command's name in replies.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Help => "help",
            Command::Host => "host",
            Command::VmRun { .. } => "vm run",
            Command::VmCreate { .. } => "vm create",
            Command::VmStart { .. } => "vm start",
            Command::VmList => "vm list",
            Command::VmStats { .. } => "vm stats",
            Command::VmStop { .. } => "vm stop",
            Command::VmSend { .. } => "vm send",
            Command::VmConsole { .. } => "vm console",
            Command::VmPause { .. } => "vm pause",
            Command::VmResume { .. } => "vm resume",
            Command::MemShow => "mem",
            Command::MemSharing { .. } => "mem sharing",
            Command::MemScan { .. } => "mem scan",
            Command::MemTarget { .. } => "mem target",
            Command::Poweroff => "poweroff",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub command: Command,
    pub json: bool,
}

/// A refused line: the message, and whether `--json` was asked for (so
/// the error can be printed in the same form).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub message: String,
    pub json: bool,
}

/// Parses one line; `Ok(None)` for a blank line.
pub fn parse(line: &str) -> Result<Option<Parsed>, ParseError> {
    let mut words: Vec<&str> = line.split_whitespace().collect();
    // `--json` is a flag of every command, but not inside a guest command
    // line (after `--`).
    let dashdash = words.iter().position(|w| *w == "--").unwrap_or(words.len());
    let json = words[..dashdash].contains(&"--json");
    if json {
        let tail = words.split_off(dashdash);
        words.retain(|w| *w != "--json");
        words.extend(tail);
    }
    let err = |m: String| ParseError { message: m, json };
    let Some((&first, rest)) = words.split_first() else {
        return if json { Err(err("empty command".into())) } else { Ok(None) };
    };
    let command = match first {
        "help" => no_args("help", rest, Command::Help),
        "host" => no_args("host", rest, Command::Host),
        "poweroff" => no_args("poweroff", rest, Command::Poweroff),
        "vm" => parse_vm(rest),
        "mem" => parse_mem(rest),
        other => Err(alloc::format!("unknown command {other:?} (type 'help')")),
    }
    .map_err(err)?;
    Ok(Some(Parsed { command, json }))
}

fn no_args(name: &str, rest: &[&str], c: Command) -> Result<Command, String> {
    match rest.first() {
        None => Ok(c),
        Some(extra) => Err(alloc::format!("{name}: unexpected argument {extra:?}")),
    }
}

fn parse_id(cmd: &str, rest: &[&str]) -> Result<u32, String> {
    match rest {
        [] => Err(alloc::format!("vm {cmd}: missing VM id")),
        [id] => {
            id.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| alloc::format!("vm {cmd}: {id:?} is not a VM id"))
        }
        [_, extra, ..] => Err(alloc::format!("vm {cmd}: unexpected argument {extra:?}")),
    }
}

fn parse_vm(rest: &[&str]) -> Result<Command, String> {
    let Some((&sub, args)) = rest.split_first() else {
        return Err("vm: missing subcommand (run, list, stats, stop, pause, resume, send, console)".into());
    };
    match sub {
        "list" => no_args("vm list", args, Command::VmList),
        "stats" => parse_id("stats", args).map(|id| Command::VmStats { id }),
        "stop" => parse_id("stop", args).map(|id| Command::VmStop { id }),
        "send" => parse_send(args),
        "console" => parse_id("console", args).map(|id| Command::VmConsole { id }),
        "pause" => parse_id("pause", args).map(|id| Command::VmPause { id }),
        "resume" => parse_id("resume", args).map(|id| Command::VmResume { id }),
        "run" => parse_run(args),
        "create" => parse_create(args),
        "start" => parse_id("start", args).map(|id| Command::VmStart { id }),
        other => Err(alloc::format!(
            "vm: unknown subcommand {other:?} (run, list, stats, stop, pause, resume, send, console)"
        )),
    }
}

/// `vm send <id> -- <text>`: the words after `--`, joined by single spaces
/// (as a guest command line is).
fn parse_send(args: &[&str]) -> Result<Command, String> {
    let Some(dashdash) = args.iter().position(|w| *w == "--") else {
        return Err("vm send: use 'vm send <id> -- <text>'".into());
    };
    let id = parse_id("send", &args[..dashdash])?;
    let text = args[dashdash + 1..].join(" ");
    if text.len() > MAX_SEND {
        return Err(alloc::format!("vm send: the text is longer than {MAX_SEND} bytes"));
    }
    Ok(Command::VmSend { id, text })
}

/// Longest text `vm send` passes (the console line caps it anyway).
pub const MAX_SEND: usize = 240;

/// Most pages a sharing step may visit per scheduling round.
pub const MAX_SCAN_PAGES_PER_ROUND: usize = 1 << 20;

fn parse_mem(rest: &[&str]) -> Result<Command, String> {
    let vm_id =
        |w: &str| w.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| alloc::format!("{w:?} is not a VM id"));
    match rest {
        [] | ["show"] => Ok(Command::MemShow),
        ["sharing", "on"] => Ok(Command::MemSharing { on: true, pages_per_round: None }),
        ["sharing", "on", n] => match n.parse::<usize>() {
            Ok(p) if (1..=MAX_SCAN_PAGES_PER_ROUND).contains(&p) => {
                Ok(Command::MemSharing { on: true, pages_per_round: Some(p) })
            }
            _ => {
                Err(alloc::format!("mem sharing on: pages per round must be 1..={MAX_SCAN_PAGES_PER_ROUND}, not {n:?}"))
            }
        },
        ["sharing", "off"] => Ok(Command::MemSharing { on: false, pages_per_round: None }),
        ["sharing", ..] => Err("mem sharing: use 'mem sharing on [<pages per round>]' or 'mem sharing off'".into()),
        ["scan"] => Ok(Command::MemScan { id: None }),
        ["scan", id] => {
            vm_id(id).map(|id| Command::MemScan { id: Some(id) }).map_err(|e| alloc::format!("mem scan: {e}"))
        }
        ["target", id, v] => {
            let id = vm_id(id).map_err(|e| alloc::format!("mem target: {e}"))?;
            let mib = match *v {
                "none" => None,
                v => Some(
                    v.parse::<u32>()
                        .ok()
                        .filter(|m| (1..=MAX_MEM_MIB).contains(m))
                        .ok_or_else(|| alloc::format!("mem target: {v:?} is not 1..={MAX_MEM_MIB} MiB or 'none'"))?,
                ),
            };
            Ok(Command::MemTarget { id, mib })
        }
        ["target", ..] => Err("mem target: use 'mem target <id> <MiB>|none'".into()),
        [other, ..] => Err(alloc::format!("mem: unknown subcommand {other:?} (show, sharing, scan, target)")),
    }
}

/// `vm create <name> kernel=<file> [initrd=<file>] [mem=<MiB>] [vcpus=1]
/// [cmdline="<text>"] [-- <text>]`: the command line either quoted or
/// after `--`.
fn parse_create(args: &[&str]) -> Result<Command, String> {
    let (opts, mut cmdline) = match args.iter().position(|w| *w == "--") {
        Some(i) => (&args[..i], Some(args[i + 1..].join(" "))),
        None => (args, None),
    };
    let Some((&name, opts)) = opts.split_first() else {
        return Err("vm create: missing VM name".into());
    };
    if name.contains('=') || name.contains('"') || name.len() > 32 {
        return Err(alloc::format!("vm create: {name:?} is not a VM name (one word of up to 32 characters)"));
    }
    let (mut kernel, mut initrd, mut mem_mib) = (None, None, None);
    let mut i = 0;
    while i < opts.len() {
        let opt = opts[i];
        i += 1;
        match opt.split_once('=') {
            Some(("kernel", f)) if !f.is_empty() => kernel = Some(f.to_string()),
            Some(("initrd", f)) if !f.is_empty() => initrd = Some(f.to_string()),
            Some(("mem", v)) => mem_mib = Some(parse_mib("vm create", v)?),
            Some(("vcpus", "1")) => {}
            Some(("vcpus", n)) => {
                return Err(alloc::format!("vm create: vcpus={n}: a VM has one vCPU until SMP support lands"));
            }
            Some(("cmdline", v)) if v.starts_with('"') => {
                // The quoted text may span words: up to the closing quote.
                let mut text = String::from(&v[1..]);
                while !text.ends_with('"') {
                    let Some(next) = opts.get(i) else {
                        return Err("vm create: cmdline=\" has no closing quote".into());
                    };
                    text.push(' ');
                    text.push_str(next);
                    i += 1;
                }
                text.pop();
                if cmdline.is_some() {
                    return Err("vm create: the command line is given twice (cmdline= and --)".into());
                }
                cmdline = Some(text);
            }
            _ => {
                return Err(alloc::format!(
                    "vm create: unknown option {opt:?} (expected kernel=, initrd=, mem=, vcpus=, cmdline=\"...\")"
                ));
            }
        }
    }
    let kernel = kernel.ok_or("vm create: missing kernel=<file>")?;
    Ok(Command::VmCreate { name: name.to_string(), kernel, initrd, mem_mib, cmdline })
}

fn parse_mib(cmd: &str, v: &str) -> Result<u32, String> {
    v.parse::<u32>()
        .ok()
        .filter(|m| (MIN_MEM_MIB..=MAX_MEM_MIB).contains(m))
        .ok_or_else(|| alloc::format!("{cmd}: mem must be a number of MiB in {MIN_MEM_MIB}..={MAX_MEM_MIB}, not {v:?}"))
}

fn parse_run(args: &[&str]) -> Result<Command, String> {
    let (opts, cmdline) = match args.iter().position(|w| *w == "--") {
        Some(i) => (&args[..i], Some(args[i + 1..].join(" "))),
        None => (args, None),
    };
    let Some((&guest, opts)) = opts.split_first() else {
        return Err("vm run: missing guest name".into());
    };
    if guest.contains('=') {
        return Err(alloc::format!("vm run: missing guest name before {guest:?}"));
    }
    let mut mem_mib = None;
    let mut modules = Vec::new();
    for opt in opts {
        match opt.split_once('=') {
            Some(("mod", name)) if !name.is_empty() => modules.push(name.to_string()),
            Some(("mem", v)) => mem_mib = Some(parse_mib("vm run", v)?),
            _ => {
                return Err(alloc::format!("vm run: unknown option {opt:?} (expected mem=<MiB> or mod=<file>)"));
            }
        }
    }
    Ok(Command::VmRun { guest: guest.to_string(), mem_mib, modules, cmdline })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> Parsed {
        parse(line).unwrap().unwrap()
    }

    fn err(line: &str) -> String {
        parse(line).unwrap_err().message
    }

    #[test]
    fn commands_and_json_flag() {
        assert_eq!(ok("help").command, Command::Help);
        assert_eq!(ok("  vm   list  "), Parsed { command: Command::VmList, json: false });
        assert_eq!(ok("vm list --json"), Parsed { command: Command::VmList, json: true });
        assert_eq!(ok("--json host").command, Command::Host);
        assert_eq!(ok("vm stats 3").command, Command::VmStats { id: 3 });
        assert_eq!(ok("vm stop 12 --json").command, Command::VmStop { id: 12 });
        assert_eq!(
            ok("vm send 3 -- uname  -r --json").command,
            Command::VmSend { id: 3, text: "uname -r --json".into() }
        );
        assert_eq!(ok("vm send 3 --").command, Command::VmSend { id: 3, text: String::new() });
        assert_eq!(ok("vm console 2").command, Command::VmConsole { id: 2 });
        assert_eq!(ok("vm pause 2 --json").command, Command::VmPause { id: 2 });
        assert_eq!(ok("vm resume 2").command, Command::VmResume { id: 2 });
        assert_eq!(parse("   ").unwrap(), None);
    }

    #[test]
    fn vm_create_and_start() {
        assert_eq!(
            ok("vm create web kernel=linux initrd=linux-initrd mem=128 vcpus=1 cmdline=\"console=ttyS0  quiet\"")
                .command,
            Command::VmCreate {
                name: "web".into(),
                kernel: "linux".into(),
                initrd: Some("linux-initrd".into()),
                mem_mib: Some(128),
                cmdline: Some("console=ttyS0 quiet".into())
            }
        );
        assert_eq!(
            ok("vm create a kernel=k -- root=/dev/vda ro").command,
            Command::VmCreate {
                name: "a".into(),
                kernel: "k".into(),
                initrd: None,
                mem_mib: None,
                cmdline: Some("root=/dev/vda ro".into())
            }
        );
        assert_eq!(ok("vm start 4").command, Command::VmStart { id: 4 });
        assert_eq!(err("vm create web"), "vm create: missing kernel=<file>");
        assert_eq!(err("vm create"), "vm create: missing VM name");
        assert!(err("vm create web kernel=k vcpus=4").contains("one vCPU"));
        assert!(err("vm create web kernel=k mem=0").contains("mem must be"));
        assert!(err("vm create web kernel=k cmdline=\"open").contains("no closing quote"));
        assert!(err("vm create web kernel=k cmdline=\"a\" -- b").contains("given twice"));
        assert!(err("vm create web kernel=k disk=x").contains("unknown option"));
        assert!(err("vm start x").contains("not a VM id"));
    }

    #[test]
    fn vm_run_options_and_command_line() {
        assert_eq!(
            ok("vm run selftest").command,
            Command::VmRun { guest: "selftest".into(), mem_mib: None, modules: Vec::new(), cmdline: None }
        );
        assert_eq!(
            ok("vm run escape mem=8 -- write addr=0x1000 --json").command,
            Command::VmRun {
                guest: "escape".into(),
                mem_mib: Some(8),
                modules: Vec::new(),
                cmdline: Some("write addr=0x1000 --json".into())
            }
        );
        assert_eq!(
            ok("vm run k mod=a mod=b").command,
            Command::VmRun { guest: "k".into(), mem_mib: None, modules: vec!["a".into(), "b".into()], cmdline: None }
        );
        assert!(err("vm run k mod=").contains("unknown option"));
        assert!(!ok("vm run escape -- --json").json, "--json after -- belongs to the guest");
    }

    #[test]
    fn bad_input_is_one_line_errors() {
        assert_eq!(err("frobnicate"), "unknown command \"frobnicate\" (type 'help')");
        assert!(err("vm").contains("missing subcommand"));
        assert!(err("vm fly").contains("unknown subcommand"));
        assert!(err("vm run").contains("missing guest"));
        assert!(err("vm run mem=4").contains("missing guest name"));
        assert!(err("vm run selftest mem=0").contains("mem must be"));
        assert!(err("vm run selftest mem=lots").contains("mem must be"));
        assert!(err("vm run selftest mem=99999999999").contains("mem must be"));
        assert!(err("vm run selftest cpus=2").contains("unknown option"));
        assert!(err("vm stats").contains("missing VM id"));
        assert!(err("vm stats x").contains("not a VM id"));
        assert!(err("vm stats 0").contains("not a VM id"));
        assert!(err("vm stop 1 2").contains("unexpected argument"));
        assert!(err("help me").contains("unexpected argument"));
        assert!(parse("bogus --json").unwrap_err().json);
        assert!(parse("--json").unwrap_err().json);
        for e in [err("frobnicate"), err("vm run selftest mem=0")] {
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
