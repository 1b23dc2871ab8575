//! Running console commands against the VM manager, and their replies: a
//! few text lines, or exactly one JSON line with `--json`.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use serde::Serialize;
use serde_json::{Value, json};
use vcpu::ExitKind;

use super::parse::{Command, CpuidChoice, Parsed};
use crate::backend::Backend;
use crate::manager::{ConsolePort, Manager};
use crate::vm::exit::{Console, ticks_to_us};
use crate::vm::{RunState, Vm};

/// Host facts the kernel gathers for `host` (the manager knows the rest).
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostStatus {
    pub cpu_vendor: String,
    pub cpu_brand: String,
    pub family: u8,
    pub model: u8,
    pub stepping: u8,
    pub apic_ids: Vec<u32>,
    pub mem_usable_bytes: u64,
    pub mem_free_bytes: u64,
    pub heap_bytes: u64,
    pub heap_used_bytes: u64,
    pub tsc_hz: u64,
    pub uptime_us: u64,
    /// Every host CPU that came up, boot CPU first (JSON `host_cpus`;
    /// `cpus` is their number).
    #[serde(rename = "host_cpus")]
    pub cpus: Vec<CpuStatus>,
    /// TSC ticks for one nested-TLB flush on every CPU (a shootdown's cost),
    /// measured when the status was taken.
    pub shootdown_ticks: Option<u64>,
}

/// One host CPU in the `host` report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuStatus {
    pub index: u32,
    pub apic_id: u32,
    /// What it does: "boot" (console, management and VMs) or "idle".
    pub role: String,
    /// Its virtualization instance: "vmx on", "svm on", or why not.
    pub virt: String,
    /// TSC ticks from posting an empty call to it to its answer (IPI,
    /// wake-up, answer), measured when the status was taken; none for the
    /// CPU taking it, or one that did not answer.
    pub call_ticks: Option<u64>,
}

/// The `host` report's CPU lines (empty when the status lists no CPUs).
fn cpus_text(h: &HostStatus) -> String {
    let mut t = String::new();
    for c in &h.cpus {
        t.push_str(&format!("  cpu {}: apic {}, {}, {}", c.index, c.apic_id, c.role, c.virt));
        if let Some(ticks) = c.call_ticks {
            t.push_str(&format!(", answers a call in {ticks} ticks ({} us)", ticks * 1_000_000 / h.tsc_hz.max(1)));
        }
        t.push('\n');
    }
    if let Some(ticks) = h.shootdown_ticks {
        t.push_str(&format!(
            "  shootdown: nested-TLB flush on all {} cpu(s) in {ticks} ticks ({} us)\n",
            h.cpus.len(),
            ticks * 1_000_000 / h.tsc_hz.max(1)
        ));
    }
    t
}

/// What the kernel must do after a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    Nothing,
    PowerOff,
    /// Attach the terminal to this VM's serial console.
    Attach(u32),
}

/// The key that detaches a terminal from a VM's console: Ctrl-], as in
/// telnet and virsh.
pub const DETACH_KEY: u8 = 0x1d;

const HELP: &[(&str, &str)] = &[
    ("help", "this list"),
    ("host", "CPU, memory and virtualization features"),
    (
        "vm run <guest> [mem=<MiB>] [mod=<file>]... [disk=<image>] [net=<switch>] [cpuid=host|pinned|portable] [-- <cmdline>]",
        "start a VM from a ramdisk guest image (net=: a virtio NIC on that host switch; cpuid=pinned: it keeps this host's CPUID wherever restored; portable: the same, cut to features both vendors offer)",
    ),
    (
        "vm create <name> kernel=<file> [initrd=<file>] [mem=<MiB>] [vcpus=<n>] [disk=<image>] [net=<switch>] [cpuid=host|pinned|portable] [cmdline=\"...\"]",
        "build a VM from a ramdisk kernel, stopped until vm start",
    ),
    ("vm start <id>...", "run VMs that vm create built, together"),
    ("vm list", "every VM with its state and exit status"),
    ("vm stats <id>", "exits by reason, run time, host memory overhead"),
    ("vm stop <id>", "stop a VM and free its memory"),
    ("vm send <id> -- <text>", "type a line into the VM's serial console (COM1)"),
    ("vm page <id> <gpa>", "one guest page: its state and the host frame holding it"),
    ("vm balloon <id> <MiB>", "ask the VM's balloon driver to hold this much of its memory (0 gives it all back)"),
    ("vm console <id> [virtio]", "attach this terminal to the VM's serial (or virtio, hvc0) console; Ctrl-] detaches"),
    ("vm pause <id> | vm resume <id>", "stop running the VM (nothing lost) / run it again"),
    ("mem", "host and per-VM memory by page state, sharing and swap"),
    ("mem sharing on [<pages per round>] | off", "background page sharing and its scan budget"),
    ("mem scan [<id>]", "one full page-sharing pass now"),
    ("mem target <id> <MiB>|none", "hold a VM to a memory target by sharing, then swapping"),
    ("mem target host <MiB>|none", "keep this much host memory free: sharing, then balloon or swap per VM"),
    (
        "vm save <id> <name> [paused|live]",
        "write the VM's whole state to checkpoint <name> on the data disk (live: while it runs, copy-on-write)",
    ),
    (
        "vm restore <name> [lazy [fill=<pages/s>]]",
        "a new VM from a checkpoint; lazy: it runs at once, pages load on first touch and in the background",
    ),
    ("vm checkpoints | vm checkpoint delete <name>", "list checkpoints / free one"),
    ("disk [list]", "the data disk's extents: swap, VM disk images, checkpoints"),
    ("disk create <name> <MiB> [from=<file>]", "a VM disk image, zero-filled lazily or a copy of a ramdisk file"),
    ("disk delete <name>", "free an image or checkpoint (not swap, not one a VM uses)"),
    ("poweroff", "stop all VMs and power the machine off"),
];

/// Runs `p`; prints its reply (and any VM end reports) to `console`.
pub fn execute<B: Backend>(p: &Parsed, m: &mut Manager<B>, host: &HostStatus, console: &mut impl Console) -> After {
    let name = p.command.name();
    let result = run(&p.command, m, host, console);
    let attach = match (&p.command, &result) {
        (Command::VmConsole { id, .. }, Ok(_)) => Some(*id),
        _ => None,
    };
    match result {
        Ok(r) => super::reply::print(console, name, p.json, false, Ok((&r.text, r.json))),
        Err(e) => super::reply::print(console, name, p.json, false, Err(&e)),
    }
    match (attach, &p.command) {
        (Some(id), _) => After::Attach(id),
        (None, Command::Poweroff) => After::PowerOff,
        _ => After::Nothing,
    }
}

/// A parse error in the form the operator asked for.
pub fn report_parse_error(e: &super::ParseError, console: &mut impl Console) {
    super::reply::print_parse_error(console, &format!("{e}"), e.json);
}

pub(super) struct Reply {
    pub(super) text: String,
    pub(super) json: Value,
}

fn run<B: Backend>(
    c: &Command,
    m: &mut Manager<B>,
    host: &HostStatus,
    console: &mut impl Console,
) -> Result<Reply, String> {
    match c {
        Command::Help => {
            // The host network's commands (`hostnet::console`) run beside these.
            let all =
                || HELP.iter().chain(crate::hostnet::console::HELP).chain(crate::manager::migration::command::HELP);
            let width = all().map(|(c, _)| c.len()).max().unwrap_or(0);
            let text = all().map(|(c, d)| format!("  {c:<width$}  {d}")).collect::<Vec<_>>().join("\n");
            let text = format!("commands (add --json to any for one JSON line):\n{text}");
            let cmds: Vec<Value> = all().map(|(c, d)| json!({ "usage": c, "summary": d })).collect();
            Ok(Reply { text, json: json!({ "commands": cmds }) })
        }
        Command::Host => Ok(host_reply(m, host)),
        Command::VmRun { guest, mem_mib, vcpus, modules, cmdline, disk, net, pin_cpuid } => {
            let (mem_mib, modules, cmdline) = m.run_defaults(guest, *mem_mib, modules, cmdline.as_deref())?;
            let id = m.run_vm_smp(guest, mem_mib, &modules, &cmdline, disk.as_deref(), net.as_deref(), *vcpus)?;
            // Before it first runs (the scheduler runs after the command).
            if *pin_cpuid != CpuidChoice::Host {
                m.pin_cpuid(id, *pin_cpuid == CpuidChoice::Portable)?;
            }
            let vm = m.get(id).ok_or("the VM vanished")?;
            Ok(Reply {
                text: format!(
                    "vm {id} started: {guest} ({}, {mem_mib} MiB, {} KiB host overhead)",
                    vm.protocol.name(),
                    vm.overhead_bytes.div_ceil(1024)
                ),
                json: json!({ "id": id, "guest": guest, "protocol": vm.protocol.name(), "mem_mib": mem_mib }),
            })
        }
        Command::VmCreate { name, kernel, initrd, mem_mib, vcpus, cmdline, disk, net, pin_cpuid } => {
            let modules: Vec<String> = initrd.iter().cloned().collect();
            let (mem_mib, modules, cmdline) = m.run_defaults(kernel, *mem_mib, &modules, cmdline.as_deref())?;
            let id = m.create_vm_stopped(
                name,
                kernel,
                mem_mib,
                &modules,
                &cmdline,
                disk.as_deref(),
                net.as_deref(),
                *vcpus,
            )?;
            if *pin_cpuid != CpuidChoice::Host {
                m.pin_cpuid(id, *pin_cpuid == CpuidChoice::Portable)?;
            }
            let vm = m.get(id).ok_or("the VM vanished")?;
            Ok(Reply {
                text: format!(
                    "vm {id} created: {name} ({kernel}, {}, {mem_mib} MiB); vm start {id} runs it",
                    vm.protocol.name()
                ),
                json: json!({ "id": id, "name": name, "kernel": kernel, "protocol": vm.protocol.name(), "mem_mib": mem_mib }),
            })
        }
        Command::VmStart { ids } => {
            m.start(ids)?;
            let text = ids.iter().map(|id| format!("vm {id} started")).collect::<Vec<_>>().join("\n");
            Ok(Reply { text, json: json!({ "ids": ids }) })
        }
        Command::VmList => {
            let hz = m.backend.as_ref().map_or(1, |b| b.tsc_hz());
            let mut text = String::from("  ID  GUEST         STATE     MEM(MiB)    EXITS  STATUS");
            for vm in &m.vms {
                text.push_str(&format!(
                    "\n{:>4}  {:<12}  {:<8}  {:>8}  {:>7}  {}",
                    vm.id,
                    vm.guest,
                    vm_state_name(vm),
                    vm.mem_bytes >> 20,
                    vm.stats.total_exits(),
                    status_text(vm)
                ));
            }
            if m.vms.is_empty() {
                text.push_str("\n  (no VMs)");
            }
            let vms: Vec<Value> = m.vms.iter().map(|vm| vm_json(vm, hz)).collect();
            Ok(Reply { text, json: json!({ "vms": vms }) })
        }
        Command::VmStats { id } => {
            let hz = m.backend.as_ref().map_or(1, |b| b.tsc_hz());
            let now = m.nested_pages_now(*id);
            let by_node = m.pages_by_node(*id);
            let vm = m.get(*id).ok_or_else(|| format!("no VM {id}"))?;
            let now_ns =
                m.backend.as_ref().map_or(0, |b| crate::vm::interrupts::vm_ns(b.now(), hz, vm.clock_offset_ns));
            let mut r = stats_reply(vm, hz, m.switch_of(*id), m.lazy_progress(*id), now, now_ns);
            if m.numa.is_numa() {
                numa_stats(&mut r, vm.node, &by_node);
            }
            if let Some(p) = m.postcopy_state(*id) {
                postcopy_stats(&mut r, &p);
            }
            Ok(r)
        }
        Command::VmStop { id } => {
            m.stop(*id, console)?;
            Ok(Reply { text: format!("vm {id} stopped"), json: json!({ "id": id }) })
        }
        Command::VmPause { id } => {
            m.set_paused(*id, true)?;
            Ok(Reply { text: format!("vm {id} paused"), json: json!({ "id": id }) })
        }
        Command::VmPage { id, gpa } => super::mem::page(m, *id, *gpa),
        Command::VmBalloon { id, mib } => {
            let (before, actual) = m.set_balloon(*id, *mib)?;
            Ok(Reply {
                text: format!(
                    "vm {id} balloon target {mib} MiB (was {} MiB; the guest holds {} MiB in it now)",
                    before >> 8,
                    actual >> 8
                ),
                json: json!({ "id": id, "target_mib": mib, "previous_pages": before, "actual_pages": actual }),
            })
        }
        Command::VmResume { id } => {
            m.set_paused(*id, false)?;
            Ok(Reply { text: format!("vm {id} resumed"), json: json!({ "id": id }) })
        }
        Command::VmConsole { id, port } => {
            m.attach(*id, *port)?;
            let which = match port {
                ConsolePort::Serial => "console",
                ConsolePort::Virtio => "virtio console (hvc0)",
            };
            Ok(Reply {
                text: format!("attached to vm {id}'s {which}; Ctrl-] detaches"),
                json: json!({ "id": id, "detach_key": "ctrl-]" }),
            })
        }
        Command::VmSend { id, text } => {
            let mut line = text.clone().into_bytes();
            line.push(b'\r'); // Enter, as a terminal sends it
            let n = m.send_input(*id, &line)?;
            Ok(Reply { text: format!("{n} bytes sent to vm {id}"), json: json!({ "id": id, "bytes": n }) })
        }
        Command::MemShow => Ok(super::mem::show(m, host)),
        Command::MemSharing { on, pages_per_round } => super::mem::sharing(m, *on, *pages_per_round),
        Command::MemScan { id } => super::mem::scan(m, *id),
        Command::MemTarget { id, mib } => super::mem::target(m, *id, *mib),
        Command::MemHostTarget { mib } => Ok(super::mem::host_target(m, *mib)),
        Command::DiskList => super::disk::list(m),
        Command::DiskCreate { name, mib, from } => super::disk::create(m, host, name, *mib, from.as_deref()),
        Command::DiskDelete { name } => super::disk::delete(m, name),
        Command::VmSave { id, name, live } => super::checkpoint::save(m, host, *id, name, *live),
        Command::VmRestore { name, lazy } => super::checkpoint::restore(m, name, *lazy),
        Command::VmCheckpoints => super::checkpoint::list(m),
        Command::VmCheckpointDelete { name } => super::checkpoint::delete(m, name),
        Command::Poweroff => {
            m.stop_all(console);
            Ok(Reply { text: "stopping all VMs and powering off".into(), json: json!({}) })
        }
    }
}

/// The state `vm list` shows: created and paused VMs are running ones that
/// the scheduler passes over.
fn vm_state_name<B: Backend>(vm: &Vm<B>) -> &'static str {
    match () {
        _ if vm.res.is_some() && vm.created => "created",
        _ if vm.res.is_some() && vm.paused => "paused",
        _ => vm.state.name(),
    }
}

fn status_text<B: Backend>(vm: &Vm<B>) -> String {
    match &vm.state {
        RunState::Exited { status } => format!("status {status}"),
        RunState::PoweredOff => String::from("powered off"),
        RunState::Halted { rip } => format!("hlt at {rip:#x}"),
        RunState::Stopped { reason } => truncate(reason, 60),
        _ => String::new(),
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 3).collect();
        t.push_str("...");
        t
    }
}

fn vm_json<B: Backend>(vm: &Vm<B>, hz: u64) -> Value {
    let mut v = json!({
        "id": vm.id,
        "guest": vm.guest,
        "protocol": vm.protocol.name(),
        "mem_mib": vm.mem_bytes >> 20,
        "state": vm_state_name(vm),
        "exits": vm.stats.total_exits(),
        "run_us": ticks_to_us(vm.stats.run_ticks, hz),
        "cpuid": vm.cpuid.describe(),
    });
    if let Value::Object(o) = &mut v {
        match &vm.state {
            RunState::Exited { status } => {
                o.insert("exit_status".into(), json!(status));
            }
            RunState::Stopped { reason } => {
                o.insert("reason".into(), json!(reason));
            }
            RunState::Halted { rip } => {
                o.insert("rip".into(), json!(rip));
            }
            _ => {}
        }
    }
    v
}

/// A VM that arrived by post-copy and still lacks pages: which, and how
/// its touches of them went.
fn postcopy_stats(r: &mut Reply, p: &crate::manager::PostcopyState) {
    let g = &p.progress;
    r.text.push_str(&format!(
        "\n  post-copy from {}: {} of {} pages still only at the source, {} vCPU(s) waiting for one; {} asked for \
         by a touch (wait mean {} us, max {} us), {} pushed",
        p.from,
        p.missing,
        g.pages_at_start,
        p.vcpus_waiting,
        g.demand_pages,
        g.fault_wait_us_mean(),
        g.fault_wait_us_max,
        g.pushed_pages
    ));
    if let Some(o) = r.json.as_object_mut() {
        o.insert(
            "postcopy".into(),
            json!({
                "from": p.from, "pages_missing": p.missing, "pages_at_start": g.pages_at_start,
                "vcpus_waiting": p.vcpus_waiting, "faults": g.faults, "demand_pages": g.demand_pages,
                "pushed_pages": g.pushed_pages, "wait_mean_us": g.fault_wait_us_mean(),
                "wait_max_us": g.fault_wait_us_max,
            }),
        );
    }
}

/// `switch`: the switch the VM's NIC is on (none once it has ended).
/// `lazy`: a lazily restored VM's fill, as of now.
fn stats_reply<B: Backend>(
    vm: &Vm<B>,
    hz: u64,
    switch: Option<&str>,
    lazy: Option<crate::memory::lazy::LazyProgress>,
    nested_now: Option<[u64; 3]>,
    now_ns: u64,
) -> Reply {
    let run_us = ticks_to_us(vm.stats.run_ticks, hz);
    let wall_end = vm.stats.ended_tsc;
    let mut text = format!(
        "vm {} ({}, {}, {} MiB): {}\n  run time in guest: {}.{:03} ms ({} TSC ticks)\n  exits: {} total",
        vm.id,
        vm.guest,
        vm.protocol.name(),
        vm.mem_bytes >> 20,
        vm.state.name(),
        run_us / 1000,
        run_us % 1000,
        vm.stats.run_ticks,
        vm.stats.total_exits()
    );
    let mut by_reason = serde_json::Map::new();
    for k in ExitKind::ALL {
        let n = vm.stats.exits[k as usize];
        if n > 0 {
            text.push_str(&format!("\n    {:<20} {n}", k.name()));
        }
        by_reason.insert(k.name().into(), json!(n));
    }
    // Each vCPU: its state machine's state and what it did (an ended VM
    // has freed its vCPUs: none).
    for line in vm.vcpu_lines(now_ns) {
        text.push_str(&format!("\n  {line}"));
    }
    text.push_str(&format!("\n  cpuid: {}", vm.cpuid.describe()));
    let leaves = |n: [u64; 3]| format!("{} x 1 GiB, {} x 2 MiB, {} x 4 KiB pages", n[2], n[1], n[0]);
    text.push_str(&format!("\n  nested page table at start: {}", leaves(vm.nested_pages)));
    if let Some(n) = nested_now {
        // Sharing, swap, snapshots and lazy loads split and merge leaves.
        text.push_str(&format!("\n  nested page table now: {}", leaves(n)));
    }
    text.push_str(&format!(
        "\n  time slices used up: {}\n  slices beside another of its vcpus: {} ({} apic accesses handled there, {} ipis posted between them, {} halts waited out there, {} of them woken there, {} ended at an ipi for a vcpu not running, {} halted vcpus woken by such an ipi and run at once on the sender's cpu, {} port accesses carried out there, {} interrupt-line moves carried there, {} slices ended by one that moved a line the boot cpu carries)\n  unbacked port accesses: {}\n  device register accesses (emulated): {} ({} of them on another cpu, where the vm ran)\n  exits of its slices on other cpus handled by the boot cpu while the slice waited: {}\n  faults on ram beside a sibling fixed while the round ran: {} ({} shot down on the siblings' cpus)\n  uart bytes out: {}\n  host memory overhead: {} bytes ({} KiB) besides {} MiB of RAM",
        vm.stats.slices_expired,
        vm.stats.parallel_slices,
        vm.stats.sibling_apic_accesses,
        vm.stats.posted_ipis,
        vm.stats.sibling_halts,
        vm.stats.sibling_wakes,
        vm.stats.sibling_ipi_ends,
        vm.stats.standby_wakes,
        vm.stats.sibling_pio,
        vm.stats.sibling_lines,
        vm.stats.sibling_line_ends,
        vm.stats.unbacked_io,
        vm.stats.mmio,
        vm.stats.mmio_away,
        vm.stats.host_calls,
        vm.stats.sibling_faults,
        vm.stats.shootdowns,
        vm.devices.com1_bytes_out(),
        vm.overhead_bytes,
        vm.overhead_bytes.div_ceil(1024),
        vm.mem_bytes >> 20
    ));
    let pages = vm.res.as_ref().map(|r| r.mem.state_counts());
    if let Some(c) = pages {
        text.push_str(&format!(
            "\n  memory pages: {} present, {} zero, {} shared, {} swapped, {} ballooned, {} poisoned; {} swapped in, {} copy-on-write breaks",
            c.present, c.zero, c.shared, c.swapped, c.ballooned, c.poisoned, vm.reclaim.swapped_in, vm.reclaim.cow_breaks
        ));
    }
    if vm.stats.machine_checks > 0 {
        text.push_str(&format!("\n  machine checks given to the guest: {}", vm.stats.machine_checks));
    }
    // Time to the first guest instruction: from the command that built the
    // VM (`vm run`, `vm restore`) to its first VM entry.
    let first_entry = vm.stats.first_entry_tsc.map(|t| t.saturating_sub(vm.stats.requested_tsc));
    if let Some(t) = first_entry {
        let us = ticks_to_us(t, hz);
        text.push_str(&format!(
            "\n  first guest entry: {}.{:03} ms after the command ({t} TSC ticks)",
            us / 1000,
            us % 1000
        ));
    }
    // From the command to the end: with other VMs on the same CPU the
    // guest gets part of it; with a CPU each, nearly all.
    let lifetime = wall_end.map(|e| e.saturating_sub(vm.stats.requested_tsc));
    if let Some(t) = lifetime.filter(|&t| t > 0) {
        let us = ticks_to_us(t, hz);
        text.push_str(&format!(
            "\n  lifetime: {}.{:03} ms from the command to its end, {}% of it in the guest",
            us / 1000,
            us % 1000,
            u128::from(vm.stats.run_ticks) * 100 / u128::from(t)
        ));
    }
    if let Some(p) = &lazy {
        text.push_str(&format!(
            "\n  lazy restore: {} of {} pages on disk{}; {}",
            p.on_disk,
            p.pages_at_start,
            if p.complete { " (fill complete)" } else { "" },
            crate::manager::lazy::progress_text(p)
        ));
    }
    if let Some(d) = vm.devices.balloon() {
        let b = vm.stats.balloon;
        text.push_str(&format!(
            "\n  balloon: target {} pages, guest holds {}; pages inflated {}, deflated {}, reported free {}, refused {}",
            d.target(),
            d.actual(),
            b.inflated,
            b.deflated,
            b.reported,
            b.refused
        ));
    }
    let nic = vm.devices.virtio_net().map(|n| (crate::net::switch::mac_text(&n.mac()), *n.counters()));
    if let Some((mac, c)) = &nic {
        let rx_dropped =
            c.rx_dropped_not_ready + c.rx_dropped_inbox_full + c.rx_dropped_bad_size + c.rx_dropped_small_buffer;
        let tx_dropped = c.tx_dropped_short + c.tx_dropped_long + c.tx_dropped_outbox_full;
        text.push_str(&format!(
            "\n  nic {mac} on switch {}: rx {} frames ({} bytes), tx {} frames ({} bytes); dropped rx {rx_dropped}, tx {tx_dropped}",
            switch.unwrap_or("(none: detached)"),
            c.rx_frames,
            c.rx_bytes,
            c.tx_frames,
            c.tx_bytes,
        ));
    }
    let mut j = vm_json(vm, hz);
    if let Value::Object(o) = &mut j {
        let vcpus: Vec<Value> = vm
            .vcpu_report()
            .into_iter()
            .map(|(i, state, s)| {
                json!({
                    "index": i, "apic_id": i, "state": state, "exits": s.exits, "run_ticks": s.run_ticks,
                    "slices": s.slices, "wakeups": s.wakeups, "last_host_cpu": s.last_host_cpu,
                    "host_cpus": s.host_cpu_list(), "moves": s.moves,
                    "apic": vm.res.as_ref().and_then(|_| vm.devices.apic_summary(i, now_ns)),
                })
            })
            .collect();
        o.insert("vcpus".into(), Value::Array(vcpus));
        if let Some((mac, c)) = nic {
            o.insert("nic".into(), json!({ "mac": mac, "switch": switch, "counters": c }));
        }
        if let Some(c) = pages {
            o.insert(
                "pages".into(),
                json!({
                    "present": c.present, "zero": c.zero, "shared": c.shared, "swapped": c.swapped,
                    "ballooned": c.ballooned, "poisoned": c.poisoned, "not_loaded": c.not_loaded,
                }),
            );
        }
        let b = vm.stats.balloon;
        let dev = vm.devices.balloon();
        o.insert(
            "balloon".into(),
            json!({
                "target_pages": dev.map(|d| d.target()), "actual_pages": dev.map(|d| d.actual()),
                "inflated": b.inflated, "deflated": b.deflated, "reported": b.reported, "refused": b.refused,
                "guest_free_bytes": dev.and_then(|d| d.stats()).and_then(|s| s.free_memory),
                "guest_available_bytes": dev.and_then(|d| d.stats()).and_then(|s| s.available_memory),
            }),
        );
        o.insert("machine_checks".into(), json!(vm.stats.machine_checks));
        o.insert("first_entry_ticks".into(), json!(first_entry));
        o.insert("lifetime_ticks".into(), json!(lifetime));
        o.insert("first_entry_us".into(), json!(first_entry.map(|t| ticks_to_us(t, hz))));
        o.insert(
            "lazy".into(),
            lazy.map_or(Value::Null, |p| {
                json!({
                    "pages_on_disk": p.on_disk, "pages_at_start": p.pages_at_start, "faults": p.faults,
                    "by_fault": p.by_fault, "by_readahead": p.by_readahead, "by_background": p.by_background,
                    "records_read": p.records_read, "bytes_read": p.bytes_read,
                    "fill_pages_per_sec": p.fill_rate, "complete": p.complete,
                })
            }),
        );
        o.insert("swapped_in".into(), json!(vm.reclaim.swapped_in));
        o.insert("swapped_out".into(), json!(vm.reclaim.swapped_out));
        o.insert("cow_breaks".into(), json!(vm.reclaim.cow_breaks));
        o.insert("exits_by_reason".into(), Value::Object(by_reason));
        o.insert("run_ticks".into(), json!(vm.stats.run_ticks));
        o.insert("unbacked_io".into(), json!(vm.stats.unbacked_io));
        o.insert("mmio".into(), json!(vm.stats.mmio));
        o.insert("mmio_away".into(), json!(vm.stats.mmio_away));
        o.insert("host_calls".into(), json!(vm.stats.host_calls));
        o.insert("sibling_faults".into(), json!(vm.stats.sibling_faults));
        o.insert("shootdowns".into(), json!(vm.stats.shootdowns));
        o.insert("slices_expired".into(), json!(vm.stats.slices_expired));
        o.insert("parallel_slices".into(), json!(vm.stats.parallel_slices));
        o.insert("sibling_apic_accesses".into(), json!(vm.stats.sibling_apic_accesses));
        o.insert("posted_ipis".into(), json!(vm.stats.posted_ipis));
        o.insert("sibling_halts".into(), json!(vm.stats.sibling_halts));
        o.insert("sibling_wakes".into(), json!(vm.stats.sibling_wakes));
        o.insert("sibling_ipi_ends".into(), json!(vm.stats.sibling_ipi_ends));
        o.insert("sibling_pio".into(), json!(vm.stats.sibling_pio));
        o.insert("sibling_line_ends".into(), json!(vm.stats.sibling_line_ends));
        o.insert("sibling_lines".into(), json!(vm.stats.sibling_lines));
        o.insert("standby_wakes".into(), json!(vm.stats.standby_wakes));
        o.insert("uart_bytes_out".into(), json!(vm.devices.com1_bytes_out()));
        o.insert("overhead_bytes".into(), json!(vm.overhead_bytes));
        o.insert(
            "nested_pages".into(),
            json!({ "4k": vm.nested_pages[0], "2m": vm.nested_pages[1], "1g": vm.nested_pages[2] }),
        );
        o.insert(
            "nested_pages_now".into(),
            nested_now.map_or(Value::Null, |n| json!({ "4k": n[0], "2m": n[1], "1g": n[2] })),
        );
        o.insert("ended".into(), json!(wall_end.is_some()));
    }
    Reply { text, json: j }
}

/// `vm stats` on a NUMA host: the VM's node and where its pages are.
fn numa_stats(r: &mut Reply, node: Option<u32>, by_node: &[(Option<u32>, u64)]) {
    let home = node.map_or(String::from("none (spread)"), |n| format!("{n}"));
    let pages: Vec<String> = by_node
        .iter()
        .map(|(n, p)| match n {
            Some(n) => format!("{p} on node {n}"),
            None => format!("{p} outside every node"),
        })
        .collect();
    r.text.push_str(&format!("\n  numa node: {home}; pages (4 KiB): {}", pages.join(", ")));
    if let Value::Object(o) = &mut r.json {
        o.insert("numa_node".into(), json!(node));
        let map: serde_json::Map<String, Value> =
            by_node.iter().map(|(n, p)| (n.map_or(String::from("none"), |n| format!("{n}")), json!(p))).collect();
        o.insert("pages_by_node".into(), Value::Object(map));
    }
}

fn host_reply<B: Backend>(m: &Manager<B>, h: &HostStatus) -> Reply {
    let mib = |b: u64| b >> 20;
    let virt = match &m.backend {
        Ok(b) => format!("{} ({})", b.name(), b.features().join(", ")),
        Err(why) => format!("unavailable: {why}"),
    };
    let running = m.vms.iter().filter(|v| !v.state.ended()).count();
    let guests: Vec<&str> = m.images.iter().map(|g| g.name.as_str()).collect();
    let disk = match &m.host_mem.space {
        Some(s) => super::disk::summary_text(s),
        None => format!("data disk: none ({})", m.host_mem.swap_missing),
    };
    let mut cpus = cpus_text(h);
    for n in &m.numa.nodes {
        let free = m.backend.as_ref().map_or(0, |b| b.free_bytes_on(n.id));
        cpus.push_str(&format!(
            "  numa node {}: cpus (apic) {:?}, {} MiB, {} MiB free\n",
            n.id,
            n.apic_ids,
            mib(n.bytes()),
            mib(free)
        ));
    }
    let sc = &m.sched;
    let per = |t: u64| t / sc.rounds.max(1);
    cpus.push_str(&format!(
        "  scheduler: {} rounds, {} slices ({} on other cpus, {} beside a sibling vcpu, {} cut short by a sibling, {} spares taken by a cpu whose own slice ended early, {} halted vcpus run at once on the cpu of a sibling's ipi); {} rounds went on past the boot cpu's slice ({} more slices there, {} on other cpus); {} rounds of the run queue (more vms than cpus: {} slices, {} of them on the boot cpu, {} vms run, {} woken there for their timers); per round {} ticks scheduling ({} before the \
         boot cpu's slice; {} printing the lines of slices away, {} on the {} exits they left to the boot cpu), {} exits of slices away handled by the boot cpu while they waited ({} ticks each, {} of them at an exit of its own slice), {} nested-mapping shootdowns ({} ticks each; {} waited for a sibling in the guest to leave it, {} ticks each), {} in the boot cpu's slice, {} waiting \
         for the others; the longest round {} ticks; with nothing to run, halted {} times for {} ms\n",
        sc.rounds,
        sc.slices,
        sc.slices_away,
        sc.sibling_slices,
        sc.kicked_slices,
        sc.spare_slices,
        sc.standby_slices,
        sc.rounds_on,
        sc.slices_on_here,
        sc.slices_on_away,
        sc.queue_rounds,
        sc.queue_slices,
        sc.queue_slices_here,
        sc.queue_vms,
        sc.queue_wakes,
        sc.overhead_per_round(),
        per(sc.start_ticks),
        per(sc.lines_ticks),
        per(sc.deferred_ticks),
        sc.deferred_exits,
        sc.host_calls,
        sc.host_call_ticks / sc.host_calls.max(1),
        sc.host_calls_in_slice,
        sc.shootdowns,
        sc.shootdown_ticks / sc.shootdowns.max(1),
        sc.shootdown_waits,
        sc.shootdown_wait_ticks / sc.shootdown_waits.max(1),
        per(sc.slice_ticks),
        per(sc.join_ticks),
        sc.longest_round_ticks,
        sc.idle_halts,
        sc.idle_ticks / (h.tsc_hz / 1000).max(1)
    ));
    let text = format!(
        "cpu: {} {} (family {} model {} stepping {}), {} cpu(s), apic ids {:?}\n\
         {cpus}\
         memory: {} MiB usable, {} MiB free, heap {} MiB ({} KiB used)\n\
         virtualization: {virt}\n\
         tsc: {} kHz, up {}.{:03} s\n\
         machine checks: {} errors, {} uncorrected memory errors, {} guest pages poisoned, {} lost (log full)\n\
         vms: {running} live, {} ended; guests: {}\n\
         {disk}",
        h.cpu_vendor,
        h.cpu_brand,
        h.family,
        h.model,
        h.stepping,
        h.cpus.len().max(h.apic_ids.len()),
        if h.cpus.is_empty() { h.apic_ids.clone() } else { h.cpus.iter().map(|c| c.apic_id).collect() },
        mib(h.mem_usable_bytes),
        mib(h.mem_free_bytes),
        mib(h.heap_bytes),
        h.heap_used_bytes / 1024,
        h.tsc_hz / 1000,
        h.uptime_us / 1_000_000,
        (h.uptime_us / 1000) % 1000,
        m.machine_checks.errors,
        m.machine_checks.memory_errors,
        m.machine_checks.pages_poisoned,
        crate::mca::host::HOST_ERRORS.lost(),
        m.vms.len() - running,
        guests.join(", ")
    );
    let mut j = serde_json::to_value(h).unwrap_or(Value::Null);
    if let Value::Object(o) = &mut j {
        o.insert("cpus".into(), json!(h.cpus.len().max(h.apic_ids.len())));
        match &m.backend {
            Ok(b) => {
                o.insert("virtualization".into(), json!({ "backend": b.name(), "features": b.features() }));
            }
            Err(why) => {
                o.insert("virtualization".into(), json!({ "backend": null, "unavailable": format!("{why}") }));
            }
        }
        o.insert("guests".into(), json!(guests));
        o.insert("vms_live".into(), json!(running));
        let mut sched = serde_json::to_value(sc).unwrap_or(Value::Null);
        if let Value::Object(so) = &mut sched {
            so.insert("overhead_ticks_per_round".into(), json!(sc.overhead_per_round()));
        }
        o.insert("scheduler".into(), sched);
        let mc = &m.machine_checks;
        o.insert(
            "machine_checks".into(),
            json!({
                "errors": mc.errors, "memory_errors": mc.memory_errors, "pages_poisoned": mc.pages_poisoned,
                "lost": crate::mca::host::HOST_ERRORS.lost(),
            }),
        );
        o.insert("disk".into(), m.host_mem.space.as_ref().map_or(Value::Null, super::disk::summary_json));
    }
    Reply { text, json: j }
}
