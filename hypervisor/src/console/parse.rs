//! The console's command grammar:
//!
//! ```text
//! help | host | poweroff
//! vm run <guest> [mem=<MiB>] [vcpus=<n>] [mod=<file>]... [disk=<image>] [net=<switch>] [cpuid=host|pinned] [-- <command line>]
//! vm list | vm stats <id> | vm stop <id>
//! mem | mem sharing on [<pages per round>] | mem sharing off
//! mem scan [<id>] | mem target <id> <MiB>|none
//! disk [list] | disk create <name> <MiB> | disk delete <name>
//! ```
//! Every command also takes `--json` (anywhere on the line): its reply is
//! then exactly one JSON line.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::disk::space::{ExtentName, NameError};
use crate::manager::{ConsolePort, MAX_MEM_MIB, MIN_MEM_MIB};

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
        /// `vcpus=`: 1..=`MAX_VCPUS`, default 1.
        vcpus: u32,
        cmdline: Option<String>,
        /// A data-disk image served as the VM's virtio-blk disk.
        disk: Option<String>,
        /// The host switch the VM's virtio-net NIC is on.
        net: Option<String>,
        /// `cpuid=pinned`: the VM keeps the CPUID it is created with.
        pin_cpuid: CpuidChoice,
    },
    /// `vm start <id>...`: one or more created VMs, started together.
    VmStart {
        ids: Vec<u32>,
    },
    /// What the line left out is `None` (or empty): the manager fills it
    /// in by the kind of guest (`Manager::run_defaults`).
    VmRun {
        guest: String,
        mem_mib: Option<u32>,
        /// `vcpus=`: 1..=`MAX_VCPUS`, default 1.
        vcpus: u32,
        /// Ramdisk files passed as Multiboot modules (or, for a Linux guest, its
        /// one initramfs).
        modules: Vec<String>,
        /// The guest's command line: `None` without `--`.
        cmdline: Option<String>,
        /// A data-disk image served as the VM's virtio-blk disk.
        disk: Option<String>,
        /// The host switch the VM's virtio-net NIC is on.
        net: Option<String>,
        /// `cpuid=pinned`: the VM keeps the CPUID it is created with.
        pin_cpuid: CpuidChoice,
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
    /// `vm balloon <id> <MiB>`: how much of the VM's memory its balloon
    /// should hold (0 deflates it all).
    VmBalloon {
        id: u32,
        mib: u32,
    },
    /// Attach the operator's terminal to the guest's serial console.
    VmConsole {
        id: u32,
        port: crate::manager::ConsolePort,
    },
    /// A line of input for the guest's serial console (COM1).
    VmSend {
        id: u32,
        text: String,
    },
    /// `vm page <id> <gpa>`: one guest page's state and host frame.
    VmPage {
        id: u32,
        gpa: u64,
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
    /// `mem target host`: free host memory to keep, across VMs.
    MemHostTarget {
        mib: Option<u32>,
    },
    MemTarget {
        id: u32,
        mib: Option<u32>,
    },
    /// The data disk's extents.
    DiskList,
    /// A VM disk image of `mib` MiB, starting as a copy of ramdisk file
    /// `from` if given.
    DiskCreate {
        name: String,
        mib: u32,
        from: Option<String>,
    },
    DiskDelete {
        name: String,
    },
    /// Write VM `id`'s whole state to checkpoint `name` on the data disk;
    /// `live`: while the VM runs (copy-on-write).
    VmSave {
        id: u32,
        name: String,
        live: bool,
    },
    /// A new VM from checkpoint `name`, started; with `lazy`, its pages
    /// stay on disk until touched or filled in the background at that
    /// many pages a second (0: only when touched).
    VmRestore {
        name: String,
        lazy: Option<u32>,
    },
    /// The checkpoints on the data disk.
    VmCheckpoints,
    VmCheckpointDelete {
        name: String,
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
            Command::VmBalloon { .. } => "vm balloon",
            Command::VmPage { .. } => "vm page",
            Command::MemShow => "mem",
            Command::MemSharing { .. } => "mem sharing",
            Command::MemScan { .. } => "mem scan",
            Command::MemTarget { .. } | Command::MemHostTarget { .. } => "mem target",
            Command::DiskList => "disk list",
            Command::DiskCreate { .. } => "disk create",
            Command::DiskDelete { .. } => "disk delete",
            Command::VmSave { .. } => "vm save",
            Command::VmRestore { .. } => "vm restore",
            Command::VmCheckpoints => "vm checkpoints",
            Command::VmCheckpointDelete { .. } => "vm checkpoint delete",
            Command::Poweroff => "poweroff",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub command: Command,
    pub json: bool,
}

/// A refused line: why, and whether `--json` was asked for (so the error
/// can be printed in the same form).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub refusal: Refusal,
    pub json: bool,
}

/// Why a console line was refused; `Display` is the one-line message.
/// `cmd` is the command as typed ("vm stats", "mem target").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `--json` alone.
    Empty,
    /// The line overflowed the console's buffer; nothing of it ran.
    LineTooLong {
        chars: usize,
    },
    UnknownCommand(String),
    UnknownSubcommand {
        cmd: &'static str,
        arg: String,
        choices: &'static str,
    },
    MissingSubcommand {
        cmd: &'static str,
        choices: &'static str,
    },
    UnexpectedArgument {
        cmd: &'static str,
        arg: String,
    },
    MissingId {
        cmd: &'static str,
    },
    NotAnId {
        cmd: &'static str,
        arg: String,
    },
    /// The command's arguments do not fit its form: how to use it.
    Usage {
        cmd: &'static str,
        usage: &'static str,
    },
    /// `vm send` text over [`MAX_SEND`] bytes.
    TextTooLong,
    PagesPerRound(String),
    TargetMib(String),
    MemMib {
        cmd: &'static str,
        arg: String,
    },
    MissingName {
        cmd: &'static str,
        what: &'static str,
    },
    /// `vm run`'s first word is an option, not a guest.
    OptionBeforeGuest(String),
    NotAVmName(String),
    /// `vcpus=` is not 1..=`MAX_VCPUS`.
    Vcpus {
        cmd: &'static str,
        arg: String,
    },
    UnclosedQuote,
    CmdlineTwice,
    MissingKernel,
    UnknownOption {
        cmd: &'static str,
        opt: String,
        expected: &'static str,
    },
    /// Not an extent name (`disk create`, `disk delete`).
    DiskName {
        cmd: &'static str,
        name: String,
        why: NameError,
    },
    /// `disk create`'s size is not 1..=[`MAX_DISK_MIB`].
    DiskMib(String),
    /// `vm restore ... lazy fill=`'s rate is not a number.
    FillRate(String),
    /// Not a switch name (`net=`).
    SwitchName {
        cmd: &'static str,
        name: String,
    },
    /// `cpuid=` is neither `host` nor `pinned`.
    CpuidProfile {
        cmd: &'static str,
        value: String,
    },
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Refusal::Empty => f.write_str("empty command"),
            Refusal::LineTooLong { chars } => {
                write!(f, "line too long ({chars} characters, at most {}); nothing was run", super::line::MAX_LINE)
            }
            Refusal::UnknownCommand(c) => write!(f, "unknown command {c:?} (type 'help')"),
            Refusal::UnknownSubcommand { cmd, arg, choices } => {
                write!(f, "{cmd}: unknown subcommand {arg:?} ({choices})")
            }
            Refusal::MissingSubcommand { cmd, choices } => write!(f, "{cmd}: missing subcommand ({choices})"),
            Refusal::UnexpectedArgument { cmd, arg } => write!(f, "{cmd}: unexpected argument {arg:?}"),
            Refusal::MissingId { cmd } => write!(f, "{cmd}: missing VM id"),
            Refusal::NotAnId { cmd, arg } => write!(f, "{cmd}: {arg:?} is not a VM id"),
            Refusal::Usage { cmd, usage } => write!(f, "{cmd}: use {usage}"),
            Refusal::TextTooLong => write!(f, "vm send: the text is longer than {MAX_SEND} bytes"),
            Refusal::PagesPerRound(n) => {
                write!(f, "mem sharing on: pages per round must be 1..={MAX_SCAN_PAGES_PER_ROUND}, not {n:?}")
            }
            Refusal::TargetMib(v) => write!(f, "mem target: {v:?} is not 1..={MAX_MEM_MIB} MiB or 'none'"),
            Refusal::MemMib { cmd, arg } => {
                write!(f, "{cmd}: mem must be a number of MiB in {MIN_MEM_MIB}..={MAX_MEM_MIB}, not {arg:?}")
            }
            Refusal::MissingName { cmd, what } => write!(f, "{cmd}: missing {what} name"),
            Refusal::OptionBeforeGuest(o) => write!(f, "vm run: missing guest name before {o:?}"),
            Refusal::NotAVmName(n) => write!(f, "vm create: {n:?} is not a VM name (one word of up to 32 characters)"),
            Refusal::Vcpus { cmd, arg } => {
                write!(f, "{cmd}: vcpus must be a number in 1..={}, not {arg:?}", crate::devices::MAX_VCPUS)
            }
            Refusal::UnclosedQuote => f.write_str("vm create: cmdline=\" has no closing quote"),
            Refusal::CmdlineTwice => f.write_str("vm create: the command line is given twice (cmdline= and --)"),
            Refusal::MissingKernel => f.write_str("vm create: missing kernel=<file>"),
            Refusal::UnknownOption { cmd, opt, expected } => {
                write!(f, "{cmd}: unknown option {opt:?} (expected {expected})")
            }
            Refusal::DiskName { cmd, name, why } => write!(f, "{cmd}: {name:?} is not a disk name: {why}"),
            Refusal::DiskMib(v) => write!(f, "disk create: the size must be 1..={MAX_DISK_MIB} MiB, not {v:?}"),
            Refusal::CpuidProfile { cmd, value } => {
                write!(f, "{cmd}: cpuid= takes host (the default), pinned or portable, not {value:?}")
            }
            Refusal::FillRate(v) => {
                write!(f, "vm restore: fill= takes pages per second (0: only when touched), not {v:?}")
            }
            Refusal::SwitchName { cmd, name } => write!(
                f,
                "{cmd}: {name:?} is not a switch name (1..={MAX_SWITCH_NAME} letters, digits, '-', '_' or '.')"
            ),
        }
    }
}

impl core::fmt::Display for ParseError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.refusal.fmt(f)
    }
}

const VM_SUBCOMMANDS: &str = "run, create, start, list, stats, stop, pause, resume, send, console, balloon, save, restore, checkpoints, checkpoint";

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
    let err = |refusal: Refusal| ParseError { refusal, json };
    let Some((&first, rest)) = words.split_first() else {
        return if json { Err(err(Refusal::Empty)) } else { Ok(None) };
    };
    let command = match first {
        "help" => no_args("help", rest, Command::Help),
        "host" => no_args("host", rest, Command::Host),
        "poweroff" => no_args("poweroff", rest, Command::Poweroff),
        "vm" => parse_vm(rest),
        "mem" => parse_mem(rest),
        "disk" => parse_disk(rest),
        other => Err(Refusal::UnknownCommand(other.to_string())),
    }
    .map_err(err)?;
    Ok(Some(Parsed { command, json }))
}

fn no_args(cmd: &'static str, rest: &[&str], c: Command) -> Result<Command, Refusal> {
    match rest.first() {
        None => Ok(c),
        Some(extra) => Err(Refusal::UnexpectedArgument { cmd, arg: extra.to_string() }),
    }
}

fn vm_id(cmd: &'static str, w: &str) -> Result<u32, Refusal> {
    w.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| Refusal::NotAnId { cmd, arg: w.to_string() })
}

fn parse_id(cmd: &'static str, rest: &[&str]) -> Result<u32, Refusal> {
    match rest {
        [] => Err(Refusal::MissingId { cmd }),
        [id] => vm_id(cmd, id),
        [_, extra, ..] => Err(Refusal::UnexpectedArgument { cmd, arg: extra.to_string() }),
    }
}

fn parse_vm(rest: &[&str]) -> Result<Command, Refusal> {
    let Some((&sub, args)) = rest.split_first() else {
        return Err(Refusal::MissingSubcommand { cmd: "vm", choices: VM_SUBCOMMANDS });
    };
    match sub {
        "list" => no_args("vm list", args, Command::VmList),
        "stats" => parse_id("vm stats", args).map(|id| Command::VmStats { id }),
        "stop" => parse_id("vm stop", args).map(|id| Command::VmStop { id }),
        "send" => parse_send(args),
        "console" => match args {
            [id, "virtio"] => vm_id("vm console", id).map(|id| Command::VmConsole { id, port: ConsolePort::Virtio }),
            [id, "serial"] => vm_id("vm console", id).map(|id| Command::VmConsole { id, port: ConsolePort::Serial }),
            _ => parse_id("vm console", args).map(|id| Command::VmConsole { id, port: ConsolePort::Serial }),
        },
        "pause" => parse_id("vm pause", args).map(|id| Command::VmPause { id }),
        "resume" => parse_id("vm resume", args).map(|id| Command::VmResume { id }),
        "balloon" => match args {
            [id, mib] => {
                let id = vm_id("vm balloon", id)?;
                let mib = mib.parse::<u32>().ok().filter(|&m| m <= MAX_MEM_MIB).ok_or(Refusal::Usage {
                    cmd: "vm balloon",
                    usage: "'vm balloon <id> <MiB>' with MiB up to the VM's memory (0 deflates)",
                })?;
                Ok(Command::VmBalloon { id, mib })
            }
            _ => Err(Refusal::Usage { cmd: "vm balloon", usage: "'vm balloon <id> <MiB>'" }),
        },
        "page" => match args {
            [id, gpa] => {
                let id = vm_id("vm page", id)?;
                let gpa = match gpa.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16).ok(),
                    None => gpa.parse::<u64>().ok(),
                };
                let gpa = gpa.ok_or(Refusal::Usage {
                    cmd: "vm page",
                    usage: "'vm page <id> <guest-physical address>' (decimal, or hex with 0x)",
                })?;
                Ok(Command::VmPage { id, gpa })
            }
            _ => Err(Refusal::Usage { cmd: "vm page", usage: "'vm page <id> <guest-physical address>'" }),
        },
        "run" => parse_run(args),
        "create" => parse_create(args),
        "start" if args.is_empty() => Err(Refusal::MissingId { cmd: "vm start" }),
        "start" => {
            let ids = args.iter().map(|a| vm_id("vm start", a)).collect::<Result<Vec<u32>, Refusal>>()?;
            Ok(Command::VmStart { ids })
        }
        "save" => {
            let live = match args {
                [_, _] | [_, _, "paused"] => false,
                [_, _, "live"] => true,
                _ => return Err(Refusal::Usage { cmd: "vm save", usage: "'vm save <id> <name> [paused|live]'" }),
            };
            Ok(Command::VmSave { id: vm_id("vm save", args[0])?, name: disk_name("vm save", args[1])?, live })
        }
        "restore" => {
            const USAGE: Refusal =
                Refusal::Usage { cmd: "vm restore", usage: "'vm restore <name> [lazy [fill=<pages per second>]]'" };
            let (name, lazy) = match args {
                [name] => (name, None),
                [name, "lazy"] => (name, Some(crate::memory::lazy::DEFAULT_FILL_PAGES_PER_SEC)),
                [name, "lazy", fill] => {
                    let rate = fill.strip_prefix("fill=").ok_or(USAGE)?;
                    (name, Some(rate.parse::<u32>().map_err(|_| Refusal::FillRate(String::from(rate)))?))
                }
                _ => return Err(USAGE),
            };
            Ok(Command::VmRestore { name: disk_name("vm restore", name)?, lazy })
        }
        "checkpoints" => no_args("vm checkpoints", args, Command::VmCheckpoints),
        "checkpoint" => match args {
            ["delete", name] => Ok(Command::VmCheckpointDelete { name: disk_name("vm checkpoint delete", name)? }),
            _ => Err(Refusal::Usage { cmd: "vm checkpoint", usage: "'vm checkpoint delete <name>'" }),
        },
        other => Err(Refusal::UnknownSubcommand { cmd: "vm", arg: other.to_string(), choices: VM_SUBCOMMANDS }),
    }
}

/// `vm send <id> -- <text>`: the words after `--`, joined by single spaces
/// (as a guest command line is).
fn parse_send(args: &[&str]) -> Result<Command, Refusal> {
    let Some(dashdash) = args.iter().position(|w| *w == "--") else {
        return Err(Refusal::Usage { cmd: "vm send", usage: "'vm send <id> -- <text>'" });
    };
    let id = parse_id("vm send", &args[..dashdash])?;
    let text = args[dashdash + 1..].join(" ");
    if text.len() > MAX_SEND {
        return Err(Refusal::TextTooLong);
    }
    Ok(Command::VmSend { id, text })
}

/// Longest text `vm send` passes (the console line caps it anyway).
pub const MAX_SEND: usize = 240;

/// Most pages a sharing step may visit per scheduling round.
pub const MAX_SCAN_PAGES_PER_ROUND: usize = 1 << 20;

fn parse_mem(rest: &[&str]) -> Result<Command, Refusal> {
    match rest {
        [] | ["show"] => Ok(Command::MemShow),
        ["sharing", "on"] => Ok(Command::MemSharing { on: true, pages_per_round: None }),
        ["sharing", "on", n] => match n.parse::<usize>() {
            Ok(p) if (1..=MAX_SCAN_PAGES_PER_ROUND).contains(&p) => {
                Ok(Command::MemSharing { on: true, pages_per_round: Some(p) })
            }
            _ => Err(Refusal::PagesPerRound(n.to_string())),
        },
        ["sharing", "off"] => Ok(Command::MemSharing { on: false, pages_per_round: None }),
        ["sharing", ..] => Err(Refusal::Usage {
            cmd: "mem sharing",
            usage: "'mem sharing on [<pages per round>]' or 'mem sharing off'",
        }),
        ["scan"] => Ok(Command::MemScan { id: None }),
        ["scan", id] => vm_id("mem scan", id).map(|id| Command::MemScan { id: Some(id) }),
        ["target", "host", v] => {
            let mib = target_mib(v)?;
            Ok(Command::MemHostTarget { mib })
        }
        ["target", id, v] => {
            let id = vm_id("mem target", id)?;
            let mib = target_mib(v)?;
            Ok(Command::MemTarget { id, mib })
        }
        ["target", ..] => Err(Refusal::Usage {
            cmd: "mem target",
            usage: "'mem target <id> <MiB>|none' or 'mem target host <MiB>|none'",
        }),
        [other, ..] => Err(Refusal::UnknownSubcommand {
            cmd: "mem",
            arg: other.to_string(),
            choices: "show, sharing, scan, target",
        }),
    }
}

/// Largest VM disk image `disk create` makes (1 TiB); the disk's free
/// space is the real limit.
pub const MAX_DISK_MIB: u32 = 1 << 20;

const DISK_SUBCOMMANDS: &str = "list, create, delete";

fn disk_name(cmd: &'static str, name: &str) -> Result<String, Refusal> {
    match ExtentName::new(name) {
        Ok(_) => Ok(name.to_string()),
        Err(why) => Err(Refusal::DiskName { cmd, name: name.to_string(), why }),
    }
}

/// Longest switch name.
pub const MAX_SWITCH_NAME: usize = 32;

/// A switch name: one short word, so listings and the checkpoint's machine
/// record stay small and it never looks like an option.
fn switch_name(cmd: &'static str, name: &str) -> Result<String, Refusal> {
    if valid_switch_name(name) {
        Ok(name.to_string())
    } else {
        Err(Refusal::SwitchName { cmd, name: name.to_string() })
    }
}

/// Whether `name` is a switch name (also `net uplink`'s).
pub fn valid_switch_name(name: &str) -> bool {
    (1..=MAX_SWITCH_NAME).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A memory target: MiB in `1..=MAX_MEM_MIB`, or `none`.
fn target_mib(v: &str) -> Result<Option<u32>, Refusal> {
    if v == "none" {
        return Ok(None);
    }
    v.parse::<u32>()
        .ok()
        .filter(|m| (1..=MAX_MEM_MIB).contains(m))
        .map(Some)
        .ok_or_else(|| Refusal::TargetMib(v.to_string()))
}

fn parse_disk(rest: &[&str]) -> Result<Command, Refusal> {
    match rest {
        [] | ["list"] => Ok(Command::DiskList),
        ["list", extra, ..] => Err(Refusal::UnexpectedArgument { cmd: "disk list", arg: extra.to_string() }),
        ["create", name, mib, opts @ ..] if opts.len() <= 1 => {
            let name = disk_name("disk create", name)?;
            let mib = mib
                .parse::<u32>()
                .ok()
                .filter(|m| (1..=MAX_DISK_MIB).contains(m))
                .ok_or_else(|| Refusal::DiskMib(mib.to_string()))?;
            let from = match opts {
                [] => None,
                [o] => match o.strip_prefix("from=") {
                    Some(f) if !f.is_empty() => Some(f.to_string()),
                    _ => {
                        return Err(Refusal::UnknownOption {
                            cmd: "disk create",
                            opt: o.to_string(),
                            expected: "from=<ramdisk file>",
                        });
                    }
                },
                _ => None,
            };
            Ok(Command::DiskCreate { name, mib, from })
        }
        ["create", ..] => {
            Err(Refusal::Usage { cmd: "disk create", usage: "'disk create <name> <MiB> [from=<ramdisk file>]'" })
        }
        ["delete", name] => Ok(Command::DiskDelete { name: disk_name("disk delete", name)? }),
        ["delete", ..] => Err(Refusal::Usage { cmd: "disk delete", usage: "'disk delete <name>'" }),
        [other, ..] => {
            Err(Refusal::UnknownSubcommand { cmd: "disk", arg: other.to_string(), choices: DISK_SUBCOMMANDS })
        }
    }
}

/// `vm create <name> kernel=<file> [initrd=<file>] [mem=<MiB>] [vcpus=<n>]
/// [disk=<image>] [net=<switch>] [cpuid=host|pinned] [cmdline="<text>"] [-- <text>]`: the command
/// line either quoted or after `--`.
fn parse_create(args: &[&str]) -> Result<Command, Refusal> {
    let (opts, mut cmdline) = match args.iter().position(|w| *w == "--") {
        Some(i) => (&args[..i], Some(args[i + 1..].join(" "))),
        None => (args, None),
    };
    let Some((&name, opts)) = opts.split_first() else {
        return Err(Refusal::MissingName { cmd: "vm create", what: "VM" });
    };
    if name.contains('=') || name.contains('"') || name.len() > 32 {
        return Err(Refusal::NotAVmName(name.to_string()));
    }
    let (mut kernel, mut initrd, mut mem_mib, mut disk, mut net) = (None, None, None, None, None);
    let mut pin_cpuid = CpuidChoice::Host;
    let mut vcpus = 1;
    let mut i = 0;
    while i < opts.len() {
        let opt = opts[i];
        i += 1;
        match opt.split_once('=') {
            Some(("kernel", f)) if !f.is_empty() => kernel = Some(f.to_string()),
            Some(("initrd", f)) if !f.is_empty() => initrd = Some(f.to_string()),
            Some(("mem", v)) => mem_mib = Some(parse_mib("vm create", v)?),
            Some(("disk", d)) => disk = Some(disk_name("vm create", d)?),
            Some(("net", n)) => net = Some(switch_name("vm create", n)?),
            Some(("cpuid", v)) => pin_cpuid = cpuid_profile("vm create", v)?,
            Some(("vcpus", n)) => vcpus = parse_vcpus("vm create", n)?,
            Some(("cmdline", v)) if v.starts_with('"') => {
                // The quoted text may span words: up to the closing quote.
                let mut text = String::from(&v[1..]);
                while !text.ends_with('"') {
                    let Some(next) = opts.get(i) else {
                        return Err(Refusal::UnclosedQuote);
                    };
                    text.push(' ');
                    text.push_str(next);
                    i += 1;
                }
                text.pop();
                if cmdline.is_some() {
                    return Err(Refusal::CmdlineTwice);
                }
                cmdline = Some(text);
            }
            _ => {
                return Err(Refusal::UnknownOption {
                    cmd: "vm create",
                    opt: opt.to_string(),
                    expected: "kernel=, initrd=, mem=, vcpus=, disk=, net=, cpuid=, cmdline=\"...\"",
                });
            }
        }
    }
    let kernel = kernel.ok_or(Refusal::MissingKernel)?;
    Ok(Command::VmCreate { name: name.to_string(), kernel, initrd, mem_mib, vcpus, cmdline, disk, net, pin_cpuid })
}

/// `cpuid=host|pinned|portable`: which CPUID a new VM sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidChoice {
    /// This host's, at every CPUID.
    Host,
    /// This host's as the VM is created, kept wherever it goes.
    Pinned,
    /// As `Pinned`, cut to features both vendors' hosts offer.
    Portable,
}

fn cpuid_profile(cmd: &'static str, v: &str) -> Result<CpuidChoice, Refusal> {
    match v {
        "host" => Ok(CpuidChoice::Host),
        "pinned" => Ok(CpuidChoice::Pinned),
        "portable" => Ok(CpuidChoice::Portable),
        _ => Err(Refusal::CpuidProfile { cmd, value: v.to_string() }),
    }
}

fn parse_vcpus(cmd: &'static str, v: &str) -> Result<u32, Refusal> {
    v.parse::<u32>()
        .ok()
        .filter(|n| (1..=crate::devices::MAX_VCPUS as u32).contains(n))
        .ok_or_else(|| Refusal::Vcpus { cmd, arg: v.to_string() })
}

fn parse_mib(cmd: &'static str, v: &str) -> Result<u32, Refusal> {
    v.parse::<u32>()
        .ok()
        .filter(|m| (MIN_MEM_MIB..=MAX_MEM_MIB).contains(m))
        .ok_or_else(|| Refusal::MemMib { cmd, arg: v.to_string() })
}

fn parse_run(args: &[&str]) -> Result<Command, Refusal> {
    let (opts, cmdline) = match args.iter().position(|w| *w == "--") {
        Some(i) => (&args[..i], Some(args[i + 1..].join(" "))),
        None => (args, None),
    };
    let Some((&guest, opts)) = opts.split_first() else {
        return Err(Refusal::MissingName { cmd: "vm run", what: "guest" });
    };
    if guest.contains('=') {
        return Err(Refusal::OptionBeforeGuest(guest.to_string()));
    }
    let (mut mem_mib, mut disk, mut net) = (None, None, None);
    let mut pin_cpuid = CpuidChoice::Host;
    let mut vcpus = 1;
    let mut modules = Vec::new();
    for opt in opts {
        match opt.split_once('=') {
            Some(("mod", name)) if !name.is_empty() => modules.push(name.to_string()),
            Some(("mem", v)) => mem_mib = Some(parse_mib("vm run", v)?),
            Some(("vcpus", n)) => vcpus = parse_vcpus("vm run", n)?,
            Some(("disk", d)) => disk = Some(disk_name("vm run", d)?),
            Some(("net", n)) => net = Some(switch_name("vm run", n)?),
            Some(("cpuid", v)) => pin_cpuid = cpuid_profile("vm run", v)?,
            _ => {
                return Err(Refusal::UnknownOption {
                    cmd: "vm run",
                    opt: opt.to_string(),
                    expected: "mem=<MiB>, vcpus=<n>, mod=<file>, disk=<image>, net=<switch> or cpuid=host|pinned",
                });
            }
        }
    }
    Ok(Command::VmRun { guest: guest.to_string(), mem_mib, vcpus, modules, cmdline, disk, net, pin_cpuid })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> Parsed {
        parse(line).unwrap().unwrap()
    }

    fn err(line: &str) -> String {
        parse(line).unwrap_err().to_string()
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
        assert_eq!(ok("vm console 2").command, Command::VmConsole { id: 2, port: ConsolePort::Serial });
        assert_eq!(ok("vm console 2 virtio").command, Command::VmConsole { id: 2, port: ConsolePort::Virtio });
        assert_eq!(ok("vm console 2 serial").command, Command::VmConsole { id: 2, port: ConsolePort::Serial });
        assert!(err("vm console 2 usb").contains("usb"));
        assert_eq!(ok("vm pause 2 --json").command, Command::VmPause { id: 2 });
        assert_eq!(ok("vm resume 2").command, Command::VmResume { id: 2 });
        assert_eq!(ok("vm balloon 2 64").command, Command::VmBalloon { id: 2, mib: 64 });
        assert_eq!(ok("vm balloon 2 0").command, Command::VmBalloon { id: 2, mib: 0 });
        assert_eq!(ok("vm page 2 0x5000").command, Command::VmPage { id: 2, gpa: 0x5000 });
        assert_eq!(ok("vm page 2 4096").command, Command::VmPage { id: 2, gpa: 4096 });
        assert!(err("vm page 2 0xzz").contains("vm page <id> <guest-physical address>"));
        assert!(err("vm page 2").contains("vm page"));
        assert!(err("vm balloon 2").contains("vm balloon: use"));
        assert!(err("vm balloon 2 -1").contains("vm balloon: use"));
        assert!(err("vm balloon x 1").contains("not a VM id"));
        assert_eq!(parse("   ").unwrap(), None);
    }

    #[test]
    fn vm_create_and_start() {
        assert_eq!(
            ok("vm create web kernel=linux initrd=linux-initrd mem=128 vcpus=1 cmdline=\"console=ttyS0  quiet\"")
                .command,
            Command::VmCreate {
                name: "web".into(),
                vcpus: 1,
                kernel: "linux".into(),
                initrd: Some("linux-initrd".into()),
                mem_mib: Some(128),
                cmdline: Some("console=ttyS0 quiet".into()),
                disk: None,
                net: None,
                pin_cpuid: CpuidChoice::Host
            }
        );
        assert_eq!(
            ok("vm create a kernel=k disk=web-root -- root=/dev/vda ro").command,
            Command::VmCreate {
                name: "a".into(),
                vcpus: 1,
                kernel: "k".into(),
                initrd: None,
                mem_mib: None,
                cmdline: Some("root=/dev/vda ro".into()),
                disk: Some("web-root".into()),
                net: None,
                pin_cpuid: CpuidChoice::Host
            }
        );
        assert_eq!(ok("vm start 4").command, Command::VmStart { ids: vec![4] });
        assert_eq!(ok("vm start 4 2").command, Command::VmStart { ids: vec![4, 2] });
        assert!(parse("vm start").is_err());
        assert!(parse("vm start 4 x").is_err(), "a bad id refuses the whole line");
        assert_eq!(err("vm create web"), "vm create: missing kernel=<file>");
        assert_eq!(err("vm create"), "vm create: missing VM name");
        match ok("vm create web kernel=k vcpus=4").command {
            Command::VmCreate { vcpus, .. } => assert_eq!(vcpus, 4),
            other => panic!("{other:?}"),
        }
        for bad in ["0", "9", "-1", "x", "", "4294967297"] {
            let e = err(&format!("vm create web kernel=k vcpus={bad}"));
            assert_eq!(e, format!("vm create: vcpus must be a number in 1..=8, not {bad:?}"));
            let e = err(&format!("vm run memtest vcpus={bad}"));
            assert_eq!(e, format!("vm run: vcpus must be a number in 1..=8, not {bad:?}"));
        }
        match ok("vm run memtest vcpus=8 mem=32").command {
            Command::VmRun { vcpus, mem_mib, .. } => assert_eq!((vcpus, mem_mib), (8, Some(32))),
            other => panic!("{other:?}"),
        }
        assert!(err("vm create web kernel=k mem=0").contains("mem must be"));
        assert!(err("vm create web kernel=k cmdline=\"open").contains("no closing quote"));
        assert!(err("vm create web kernel=k cmdline=\"a\" -- b").contains("given twice"));
        assert!(err("vm create web kernel=k disk=").contains("disk name"), "{}", err("vm create web kernel=k disk="));
        assert!(err("vm create web kernel=k disc=x").contains("unknown option"));
        match ok("vm create web kernel=k net=sw0 cmdline=\"quiet\"").command {
            Command::VmCreate { net, cmdline, .. } => {
                assert_eq!((net.as_deref(), cmdline.as_deref()), (Some("sw0"), Some("quiet")))
            }
            other => panic!("{other:?}"),
        }
        assert!(err("vm create web kernel=k net=").contains("not a switch name"));
        assert!(err("vm start x").contains("not a VM id"));
    }

    #[test]
    fn vm_run_options_and_command_line() {
        assert_eq!(
            ok("vm run selftest").command,
            Command::VmRun {
                guest: "selftest".into(),
                vcpus: 1,
                mem_mib: None,
                modules: Vec::new(),
                cmdline: None,
                disk: None,
                net: None,
                pin_cpuid: CpuidChoice::Host
            }
        );
        assert_eq!(
            ok("vm run escape mem=8 -- write addr=0x1000 --json").command,
            Command::VmRun {
                guest: "escape".into(),
                vcpus: 1,
                mem_mib: Some(8),
                modules: Vec::new(),
                cmdline: Some("write addr=0x1000 --json".into()),
                disk: None,
                net: None,
                pin_cpuid: CpuidChoice::Host
            }
        );
        assert_eq!(
            ok("vm run k mod=a mod=b").command,
            Command::VmRun {
                guest: "k".into(),
                vcpus: 1,
                mem_mib: None,
                modules: vec!["a".into(), "b".into()],
                cmdline: None,
                disk: None,
                net: None,
                pin_cpuid: CpuidChoice::Host
            }
        );
        assert!(err("vm run k mod=").contains("unknown option"));
        assert_eq!(
            ok("vm run linux disk=d1").command,
            Command::VmRun {
                guest: "linux".into(),
                vcpus: 1,
                mem_mib: None,
                modules: Vec::new(),
                cmdline: None,
                disk: Some("d1".into()),
                net: None,
                pin_cpuid: CpuidChoice::Host
            }
        );
        assert!(!ok("vm run escape -- --json").json, "--json after -- belongs to the guest");
        assert_eq!(
            ok("vm run linux disk=d1 net=lan-0.a_b").command,
            Command::VmRun {
                guest: "linux".into(),
                vcpus: 1,
                mem_mib: None,
                modules: Vec::new(),
                cmdline: None,
                disk: Some("d1".into()),
                net: Some("lan-0.a_b".into()),
                pin_cpuid: CpuidChoice::Host
            }
        );
        for bad in ["net=", "net=a/b", "net=\"x\"", &format!("net={}", "s".repeat(33))] {
            let e = err(&format!("vm run linux {bad}"));
            assert!(e.starts_with("vm run: ") && e.contains("is not a switch name"), "{bad}: {e}");
        }
        assert!(ok(&format!("vm run linux net={}", "s".repeat(32))).command != Command::Help);
    }

    #[test]
    fn cpuid_profiles() {
        let pinned = |line: &str| match ok(line).command {
            Command::VmRun { pin_cpuid, .. } | Command::VmCreate { pin_cpuid, .. } => pin_cpuid,
            other => panic!("{other:?}"),
        };
        use CpuidChoice::*;
        assert_eq!(pinned("vm run memtest cpuid=pinned -- hold=1"), Pinned);
        assert_eq!(pinned("vm run memtest cpuid=portable"), Portable);
        assert_eq!(pinned("vm run memtest cpuid=host"), Host);
        assert_eq!(pinned("vm run memtest -- cpuid=pinned"), Host, "after --: the guest's");
        assert_eq!(pinned("vm create web kernel=k cpuid=pinned"), Pinned);
        assert_eq!(pinned("vm create web kernel=k cpuid=portable"), Portable);
        assert_eq!(pinned("vm create web kernel=k"), Host);
        for line in ["vm run memtest cpuid=", "vm run memtest cpuid=Pinned", "vm create web kernel=k cpuid=intel"] {
            let e = err(line);
            assert!(
                e.contains("cpuid= takes host (the default), pinned or portable") && !e.contains('\n'),
                "{line}: {e}"
            );
        }
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

    #[test]
    fn mem_targets_per_vm_and_for_the_host() {
        assert_eq!(ok("mem target 2 64").command, Command::MemTarget { id: 2, mib: Some(64) });
        assert_eq!(ok("mem target 2 none").command, Command::MemTarget { id: 2, mib: None });
        assert_eq!(ok("mem target host 128").command, Command::MemHostTarget { mib: Some(128) });
        assert_eq!(ok("mem target host none").command, Command::MemHostTarget { mib: None });
        for bad in ["mem target 2 0", "mem target host 0", "mem target host lots"] {
            assert!(err(bad).contains("is not 1..="), "{bad}: {}", err(bad));
        }
        assert!(err("mem target host").contains("mem target: use"));
    }

    #[test]
    fn disk_commands() {
        assert_eq!(ok("vm save 3 web-1").command, Command::VmSave { id: 3, name: "web-1".into(), live: false });
        assert_eq!(ok("vm save 3 a paused").command, Command::VmSave { id: 3, name: "a".into(), live: false });
        assert_eq!(ok("vm save 3 a live").command, Command::VmSave { id: 3, name: "a".into(), live: true });
        assert!(err("vm save 3 a lively").contains("use 'vm save <id> <name> [paused|live]'"));
        assert_eq!(ok("vm restore web-1 --json").command, Command::VmRestore { name: "web-1".into(), lazy: None });
        assert_eq!(
            ok("vm restore web-1 lazy").command,
            Command::VmRestore { name: "web-1".into(), lazy: Some(crate::memory::lazy::DEFAULT_FILL_PAGES_PER_SEC) }
        );
        assert_eq!(ok("vm restore a lazy fill=0").command, Command::VmRestore { name: "a".into(), lazy: Some(0) });
        assert!(err("vm restore a lazy fill=lots").contains("fill= takes pages per second"));
        assert!(err("vm restore a eager").contains("use 'vm restore <name> [lazy"));
        assert!(err("vm restore a lazy 5").contains("use 'vm restore <name> [lazy"));
        assert_eq!(ok("vm checkpoints").command, Command::VmCheckpoints);
        assert_eq!(ok("vm checkpoint delete a").command, Command::VmCheckpointDelete { name: "a".into() });
        assert!(err("vm save 3").contains("use 'vm save <id> <name> [paused|live]'"));
        assert!(err("vm save x a").contains("not a VM id"));
        assert!(err("vm restore").contains("use 'vm restore <name> [lazy"));
        assert!(err("vm checkpoint rm a").contains("vm checkpoint delete"));
        assert!(err("vm checkpoints now").contains("unexpected argument"));
        assert_eq!(ok("disk").command, Command::DiskList);
        assert_eq!(ok("disk list --json"), Parsed { command: Command::DiskList, json: true });
        assert_eq!(ok("disk create web 64").command, Command::DiskCreate { name: "web".into(), mib: 64, from: None });
        assert_eq!(
            ok("disk create web 64 from=rootfs").command,
            Command::DiskCreate { name: "web".into(), mib: 64, from: Some("rootfs".into()) }
        );
        assert!(err("disk create web 64 size=3").contains("unknown option"));
        assert!(err("disk create web 64 from=a b").contains("disk create: use"));
        assert_eq!(ok("--json disk delete web").command, Command::DiskDelete { name: "web".into() });
        let long = "n".repeat(32);
        assert_eq!(
            ok(&format!("disk create {long} 1")).command,
            Command::DiskCreate { name: long, mib: 1, from: None }
        );
        assert_eq!(err("disk create web"), "disk create: use 'disk create <name> <MiB> [from=<ramdisk file>]'");
        assert_eq!(err("disk create web 0"), "disk create: the size must be 1..=1048576 MiB, not \"0\"");
        assert!(err("disk create web 1048577").contains("the size must be"));
        assert!(err("disk create web lots").contains("the size must be"));
        assert!(err("disk create web 1 2").contains("unknown option"));
        assert_eq!(
            err(&format!("disk create {} 1", "n".repeat(33))),
            format!("disk create: {:?} is not a disk name: a name is at most 32 bytes, this one is 33", "n".repeat(33))
        );
        assert!(err("disk create caf\u{e9} 1").contains("is not printable ASCII"));
        assert_eq!(err("disk delete"), "disk delete: use 'disk delete <name>'");
        assert!(err("disk delete a b").contains("use 'disk delete"));
        assert!(err("disk list x").contains("unexpected argument"));
        assert_eq!(err("disk wipe"), "disk: unknown subcommand \"wipe\" (list, create, delete)");
        assert!(parse("disk create x 0 --json").unwrap_err().json);
    }
}
