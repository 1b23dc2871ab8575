//! Kernel entry and main loop: platform bring-up, then the console and the
//! VM scheduler on the boot CPU.

pub mod context;
mod cpus;
mod svm_backend;
mod vmx_backend;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use bootloader_api::config::{BootloaderConfig, Mapping};
use bootloader_api::{BootInfo, entry_point};
use hypervisor::backend::Unavailable;
use hypervisor::boot_config::{self, BootConfig, FaultInject};
use hypervisor::console::{self, Edit, LineEditor, commands::After};
use hypervisor::cpuid::HostQuirks;
use hypervisor::devices::virtio_slots::HostEntropy;
use hypervisor::disk::selfcheck;
use hypervisor::disk::space::FormatOptions;
use hypervisor::hostnet;
use hypervisor::loader::archive::Archive;
use hypervisor::manager::{GuestImage, Manager};
use hypervisor::memory::swap::AttachError;
use hypervisor::memory::{HostSpace, NoSwap, Swap};
use hypervisor::vm::exit::Console;

use crate::platform;
use hypervisor::backend::Backend;
use svm_backend::SvmBackend;
use vmx_backend::VmxBackend;

pub static BOOTLOADER_CONFIG: BootloaderConfig = {
    let mut config = BootloaderConfig::new_default();
    // All of physical memory at one offset: frames, guest RAM, page tables
    // and ACPI tables are all reached through it.
    config.mappings.physical_memory = Some(Mapping::Dynamic);
    config.kernel_stack_size = 256 * 1024;
    config
};

entry_point!(kernel_main, config = &BOOTLOADER_CONFIG);

/// The console is COM1. While the operator is typing a line, output from
/// VMs is held back (so it does not split the line being typed) and printed
/// when the line is entered.
#[derive(Default)]
struct Serial {
    hold: bool,
    held: Vec<String>,
}

/// Held lines beyond this are printed anyway.
const MAX_HELD_LINES: usize = 256;

impl Serial {
    fn release(&mut self) {
        self.hold = false;
        for l in core::mem::take(&mut self.held) {
            crate::println!("{l}");
        }
    }
}

impl Console for Serial {
    fn line(&mut self, text: &str) {
        if self.hold && self.held.len() < MAX_HELD_LINES {
            self.held.push(String::from(text));
        } else {
            crate::println!("{text}");
        }
    }
}

fn kernel_main(boot_info: &'static mut BootInfo) -> ! {
    platform::serial::init();
    platform::gdt::init();
    platform::smp::init_boot_cpu();
    platform::idt::init();
    platform::time::init();
    platform::logger::init(log::LevelFilter::Info);
    crate::println!();
    log::info!("hypervisor {} starting", env!("CARGO_PKG_VERSION"));
    match platform::mce::enable() {
        0 => log::warn!("machine checks: this CPU has no machine-check architecture"),
        n => log::info!("machine checks: {n} banks reporting on every cpu"),
    }

    let phys_offset = boot_info.physical_memory_offset.into_option().expect("bootloader maps physical memory");
    platform::memory::init(&boot_info.memory_regions, phys_offset);
    let ramdisk: &'static [u8] = match boot_info.ramdisk_addr.into_option() {
        // SAFETY: the bootloader mapped the ramdisk at this address for the
        // kernel's lifetime, `ramdisk_len` bytes long, and nothing writes it.
        Some(addr) => unsafe { core::slice::from_raw_parts(addr as *const u8, boot_info.ramdisk_len as usize) },
        None => &[],
    };
    let (config, images) = read_ramdisk(ramdisk);
    if let Some(port) = config.debug_exit_port {
        platform::power::set_debug_exit_port(port);
    }
    if let Some(port) = config.pm1a_cnt_fallback {
        platform::acpi::set_pm1a_fallback(port);
    }
    if let Some(level) = config.log_level.as_deref().and_then(|l| l.parse().ok()) {
        log::set_max_level(level);
    }
    let mem = platform::memory::info();
    log::info!(
        "memory: {} MiB usable, heap {} MiB, {} MiB free",
        mem.usable_bytes >> 20,
        mem.heap_bytes >> 20,
        platform::memory::free_bytes() >> 20
    );
    let acpi = platform::acpi::init(boot_info.rsdp_addr.into_option());
    log::info!("acpi: {} cpu(s), apic ids {:?}, s5 {:?}", acpi.apic_ids.len(), acpi.apic_ids, acpi.s5);
    let cpu = platform::cpu::detect();
    log::info!(
        "cpu: {} {} (family {} model {}){}",
        cpu.vendor,
        cpu.brand,
        cpu.family,
        cpu.model,
        if cpu.nested { ", under another hypervisor" } else { "" }
    );
    platform::memory::set_numa(acpi.numa.clone());
    for n in &acpi.numa.nodes {
        log::info!("numa: node {}: cpus (apic) {:?}, {} MiB in {:x?}", n.id, n.apic_ids, n.bytes() >> 20, n.ranges);
    }
    // Before the boot CPU's own virtualization: the APs copy its control
    // registers, which must not carry VMXE/SVME yet.
    cpus::start(&acpi.apic_ids);
    // The scratch disk becomes the data disk, with host swap in its `swap` extent.
    let disk = open_disk();
    if cpu.vmx {
        serve(VmxBackend::start(), &config, images, &cpu, disk)
    } else if cpu.svm {
        serve(SvmBackend::start(), &config, images, &cpu, disk)
    } else {
        serve::<VmxBackend>(Err(Unavailable::NoVirtualization), &config, images, &cpu, disk)
    }
}

/// Probes for the scratch disk and takes it over as the host's data disk
/// (`Swap::attach`: classified first, refused without a write if it holds
/// other data, else self-checked on the swap extent, then its extent table
/// formatted or reopened and swap started in the `swap` extent). The swap
/// device and the disk's space manager, or why there are none.
fn open_disk() -> Result<(Swap, HostSpace), NoSwap> {
    let (disk, text) = platform::disk::probe();
    let Some(disk) = disk else {
        log::info!("disk: none ({text})");
        return Err(NoSwap::NoDisk { probe: text });
    };
    log::info!("disk: {text}");
    // Dates the swap extent of a freshly formatted table.
    let now = platform::rtc::unix_time().unwrap_or(0);
    match Swap::attach(disk, text.clone(), &FormatOptions::default(), now, platform::time::micros) {
        Ok((swap, space)) => {
            log::info!(
                "disk: self-check ok (write+read {} blocks) at block {}, {} us with save and restore",
                selfcheck::CHECK_BLOCKS,
                swap.check.first,
                swap.check.micros
            );
            log::info!(
                "disk: extent table generation {} (copy {}), {} extents, {} free",
                space.generation(),
                space.current_copy(),
                space.list().len(),
                hypervisor::disk::capacity_text(space.free_blocks())
            );
            if let Some(why) = space.refused_copy() {
                log::warn!("disk: the other table copy was unusable ({why}); the next change rewrites it");
            }
            for name in space.dropped() {
                log::warn!("disk: dropped {name:?}: it was never completed (a save cut short)");
            }
            Ok((swap, space))
        }
        Err(e) => {
            match e {
                AttachError::SelfCheck(_) => log::error!("disk: SELF-CHECK FAILED: {e}; the disk will not be used"),
                AttachError::Refused(_) => log::warn!("disk: {e}; the disk will not be used"),
                _ => log::error!("disk: {e}; the disk will not be used"),
            }
            Err(NoSwap::Attach { device: text, error: e })
        }
    }
}

/// A backend as the kernel drives it: the VM layer's interface plus the
/// start-up report and the test hook for a failing entry.
pub(crate) trait HostBackend: Backend {
    /// "VT-x" or "AMD-V".
    const VENDOR: &'static str;
    fn log_caps(&self);
    fn break_next_entry(&mut self);
    /// This backend on an AP, made of the AP's own virtualization instance
    /// (taken from `slot`) and the boot CPU's quirks; `None`, with `slot`
    /// untouched, if the instance is not this vendor's.
    fn on_ap(slot: &mut Option<cpus::CpuVirt>, quirks: HostQuirks) -> Option<Self>
    where
        Self: Sized;
    /// The AP's instance back, for the next slice.
    fn into_virt(self) -> cpus::CpuVirt;
}

impl HostBackend for VmxBackend {
    const VENDOR: &'static str = "VT-x";
    fn log_caps(&self) {
        let c = self.caps();
        log::debug!(
            "vmx caps: basic {:#x} pin {:#x} proc {:#x} proc2 {:#x} exit {:#x} entry {:#x} misc {:#x} ept/vpid {:#x}",
            c.basic,
            c.pinbased,
            c.procbased,
            c.procbased2,
            c.exit,
            c.entry,
            c.misc,
            c.ept_vpid
        );
    }
    fn break_next_entry(&mut self) {
        self.break_next_entry = true;
    }
    fn on_ap(slot: &mut Option<cpus::CpuVirt>, quirks: HostQuirks) -> Option<Self> {
        match slot.take() {
            Some(cpus::CpuVirt::Vmx(c)) => Some(VmxBackend::on_ap(c, quirks)),
            other => {
                *slot = other;
                None
            }
        }
    }
    fn into_virt(self) -> cpus::CpuVirt {
        cpus::CpuVirt::Vmx(self.into_cpu())
    }
}

impl HostBackend for SvmBackend {
    const VENDOR: &'static str = "AMD-V";
    fn log_caps(&self) {
        log::debug!("svm caps: {:?}", self.caps());
    }
    fn break_next_entry(&mut self) {
        self.break_next_entry = true;
    }
    fn on_ap(slot: &mut Option<cpus::CpuVirt>, quirks: HostQuirks) -> Option<Self> {
        match slot.take() {
            Some(cpus::CpuVirt::Svm(c)) => Some(SvmBackend::on_ap(c, quirks)),
            other => {
                *slot = other;
                None
            }
        }
    }
    fn into_virt(self) -> cpus::CpuVirt {
        cpus::CpuVirt::Svm(self.into_cpu())
    }
}

/// The console and the VM scheduler, forever, on `backend`.
fn serve<B: HostBackend>(
    backend: Result<B, Unavailable>,
    config: &BootConfig,
    images: Vec<GuestImage>,
    cpu: &platform::cpu::CpuInfo,
    disk: Result<(Swap, HostSpace), NoSwap>,
) -> ! {
    match &backend {
        Ok(b) => {
            log::info!("virtualization: {} ({})", B::VENDOR, b.features().join(", "));
            b.log_caps();
        }
        Err(why) => {
            log::warn!("virtualization unavailable: {why}; the console still works, VMs cannot run")
        }
    }
    let mut backend = backend;
    match config.fault_inject {
        Some(FaultInject::HostPageFault) => {
            log::warn!("fault injection: touching unmapped memory");
            // SAFETY: deliberately not: this must fault (test images only).
            unsafe { core::ptr::read_volatile(0x0000_7fff_dead_0000 as *const u64) };
        }
        Some(FaultInject::VmEntry) => {
            log::warn!("fault injection: the next VM's entry will fail");
            if let Ok(b) = backend.as_mut() {
                b.break_next_entry();
            }
        }
        None => {}
    }
    if config.vcpu_conformance
        && let Ok(b) = backend.as_mut()
    {
        hypervisor::vm::conformance::run_on(b, &mut |line: &str| crate::println!("{line}"));
        cpus::vcpu_move_check(b, &mut |line: &str| crate::println!("{line}"));
    }
    let names: Vec<&str> = images.iter().map(|g| g.name.as_str()).collect();
    log::info!("guests in the ramdisk: {}", names.join(", "));
    // The MMIO instruction decoder's tables, built now rather than at a
    // guest's first device access.
    hypervisor::emulator::warm_up();
    let boot_virt = match &backend {
        Ok(b) => format!("{} on", b.name()),
        Err(why) => format!("virtualization off: {why}"),
    };
    let mut aps =
        cpus::Aps::<B>::new(backend.as_ref().map(|b| b.quirks()).unwrap_or_default(), platform::memory::numa());
    let mut manager = Manager::new(backend, images);
    if let Some(t) = platform::memory::numa() {
        manager.numa = t.clone();
    }
    if platform::random::available() {
        manager.entropy = Some(HostEntropy(platform::random::fill));
        log::info!("entropy: RDRAND; VMs get a virtio-rng device");
    } else {
        log::warn!("entropy: no RDRAND; VMs get no virtio-rng device");
    }
    // Guests' clocks start from the host's: its Unix time when the TSC
    // (the backends' clock) was 0.
    match platform::rtc::unix_time() {
        Some(t) => {
            manager.host_epoch = t.saturating_sub(platform::time::rdtsc() / platform::time::tsc_hz().max(1));
            log::info!("rtc: host clock reads {t} (Unix seconds)");
        }
        None => log::warn!("rtc: the host clock is unreadable; guest clocks start at 1970"),
    }
    match disk {
        Ok((swap, space)) => {
            let st = swap.stats();
            log::info!("swap: {} ({:?}), {} page slots ({} MiB)", swap.device, swap.attached, st.slots, st.slots >> 8);
            manager.host_mem.swap = Some(swap);
            manager.host_mem.space = Some(space);
        }
        Err(why) => {
            log::warn!("swap: none ({why})");
            manager.host_mem.swap_missing = why;
        }
    }
    let status = |line: &str| host_status(cpu, &boot_virt, line);
    // This CPU's APIC timer ends its idle halts (`idle`); the backends set
    // it up too, but a host without virtualization has none.
    platform::apic::init();
    let mut con = Serial::default();
    // The APs hold the host's NIC: a round that goes on looks at it
    // (`Aps::wanted`).
    aps.net = start_net(config);
    if let Some(name) = &config.net_uplink {
        // Before the autorun commands, so VMs they start on it get the
        // host's MAC tag.
        manager.uplink_command(Some(name), false, aps.net.as_mut(), &mut con);
    }
    // The VM whose serial console the terminal is attached to, if any.
    let mut attached = None;
    for cmd in &config.autorun {
        crate::println!("{}{cmd}", console::PROMPT);
        match run_line(cmd, &mut manager, &status(cmd), &mut con, &mut aps.net) {
            After::PowerOff => power_off(),
            After::Attach(id) => attached = Some(id),
            After::Nothing => {}
        }
    }
    // After the autorun commands: from here on the console takes input.
    crate::println!("hypervisor: ready; type 'help' for commands");
    if attached.is_none() {
        crate::print!("{}", console::PROMPT);
    }
    let mut editor = LineEditor::default();
    loop {
        if let Some(id) = attached {
            // Attached: keys go to the guest, its output to the terminal;
            // other VMs' lines wait. Ctrl-] (or the VM ending) detaches.
            con.hold = true;
            let mut detach = false;
            while let Some(b) = platform::serial::try_read() {
                if b == console::commands::DETACH_KEY {
                    detach = true;
                    break;
                }
                // A full receive buffer drops the key, as an overrun would.
                let _ = manager.console_input(id, &[b]);
            }
            match manager.console_output(id) {
                Some(out) => platform::serial::write_bytes(&out),
                None => detach = true,
            }
            if detach {
                manager.detach(id);
                attached = None;
                crate::println!("\r\n[detached from vm {id}]");
                con.release();
                crate::print!("{}", console::PROMPT);
            }
            // Keys and output go to and from the attached guest between
            // rounds: each round ends with the boot CPU's slice.
            aps.short_rounds = true;
            let ran = manager.run_round(&mut con, &mut aps);
            if ran {
                manager.reclaim_round();
            }
            manager.machine_check_round(&mut con);
            // Lazily restored VMs converge also while every VM idles.
            manager.lazy_fill_round(&mut con);
            if !ran {
                idle(&mut manager);
            }
            manager.checkpoint_round(&mut con);
            poll_net(&mut aps.net, &mut manager, &mut con);
            manager.migration_round(aps.net.as_mut().map(|n| n.tcp()).as_mut(), platform::time::micros(), &mut con);
            continue;
        }
        while let Some(b) = platform::serial::try_read() {
            match editor.feed(b) {
                Edit::Echo(bytes) => {
                    for c in bytes {
                        crate::print!("{}", c as char);
                    }
                }
                Edit::Line(line) => {
                    crate::println!();
                    con.release();
                    match run_line(&line, &mut manager, &status(&line), &mut con, &mut aps.net) {
                        After::PowerOff => power_off(),
                        After::Attach(id) => {
                            attached = Some(id);
                            break;
                        }
                        After::Nothing => crate::print!("{}", console::PROMPT),
                    }
                }
                Edit::Refused(e) => {
                    crate::println!();
                    con.release();
                    console::commands::report_parse_error(&e, &mut con);
                    crate::print!("{}", console::PROMPT);
                }
                Edit::None => {}
            }
            con.hold = !editor.is_empty();
        }
        // A host on a network polls its NIC between rounds: while its
        // network is busy each round ends with the boot CPU's slice; while
        // it is quiet a round may go on, and a frame that arrives ends it
        // (`docs/smp.md`, "Rounds that go on").
        let now_us = platform::time::micros();
        aps.short_rounds = !manager.uplink_idle() || aps.net.as_mut().is_some_and(|n| n.in_use() && !n.quiet(now_us));
        let ran = manager.run_round(&mut con, &mut aps);
        if ran {
            manager.reclaim_round();
        }
        // Host machine checks: the pages they cost are poisoned before
        // anything else reads them.
        manager.machine_check_round(&mut con);
        // Lazily restored VMs converge also while every VM idles.
        manager.lazy_fill_round(&mut con);
        if !ran {
            idle(&mut manager);
        }
        // A live save writes between time slices, also while no VM wants
        // the CPU.
        manager.checkpoint_round(&mut con);
        poll_net(&mut aps.net, &mut manager, &mut con);
        // Migrations move between rounds too (after the NIC's poll, so
        // what they write goes out in the next one).
        manager.migration_round(aps.net.as_mut().map(|n| n.tcp()).as_mut(), platform::time::micros(), &mut con);
    }
}

/// Nothing could run: the boot CPU halts until the earliest VM timer, at
/// most a millisecond (the console and the NIC are polled, not
/// interrupt-driven), so an idle host costs no CPU time. Not while work
/// moves at every turn of the loop (a live save, a lazy fill, a
/// migration): that only spins once.
fn idle<B: HostBackend>(manager: &mut Manager<B>) {
    let Some(until) = manager.idle_until() else {
        core::hint::spin_loop();
        return;
    };
    let t0 = platform::time::rdtsc();
    let poll = t0.saturating_add(platform::time::tsc_hz() / 1000);
    if until <= t0 {
        return;
    }
    platform::smp::halt_until(until.min(poll));
    manager.sched.idle_halts += 1;
    manager.sched.idle_ticks += platform::time::rdtsc().saturating_sub(t0);
}

/// The host's own network (`hostnet`): the NIC, if there is one, with the
/// address from `hypervisor.cfg`.
fn start_net(config: &BootConfig) -> Option<platform::net::HostNic> {
    match platform::net::start() {
        Ok(mut n) => {
            let st = n.status();
            if let Some(cidr) = config.net_host_ip {
                n.set_addr(cidr);
            }
            log::info!(
                "net: {}, mac {}, link {}, ip {}",
                n.device,
                hostnet::mac_text(&st.mac),
                if st.link_up { "up" } else { "down" },
                config.net_host_ip.map_or_else(|| String::from("none"), |c| alloc::format!("{c}"))
            );
            Some(n)
        }
        Err(why) => {
            log::info!("net: none ({why})");
            None
        }
    }
}

/// One round of the host network: frames in and out, transfers moved on,
/// finished ones reported.
/// With the NIC a switch's uplink, the switch moves frames before the
/// stack's poll (the wire's to the stack and the VMs) and after it (the
/// stack's out), so a reply leaves in the same round.
fn poll_net<B: Backend>(net: &mut Option<platform::net::HostNic>, m: &mut Manager<B>, con: &mut Serial) {
    if let Some(n) = net {
        m.uplink_round(n);
        let began = platform::time::micros();
        n.poll(began, &mut |line| con.line(line));
        n.longest_poll_us = n.longest_poll_us.max(platform::time::micros().saturating_sub(began));
        m.uplink_round(n);
    }
}

fn run_line<B: Backend>(
    line: &str,
    m: &mut Manager<B>,
    status: &console::HostStatus,
    con: &mut Serial,
    net: &mut Option<platform::net::HostNic>,
) -> After {
    // `net ...`: the host's own network, beside the VM console's commands.
    if let Some(parsed) = hostnet::console::parse(line) {
        match parsed {
            // The uplink joins the NIC to a VM switch: the manager's too.
            Ok((hostnet::console::NetCommand::Uplink(name), json)) => {
                m.uplink_command(name.as_deref(), json, net.as_mut(), con)
            }
            Ok(p) => hostnet::console::execute(&p, net.as_mut(), platform::time::micros(), con),
            Err(e) => hostnet::console::report_parse_error(&e, con),
        }
        return After::Nothing;
    }
    // `migrate listen`, `vm migrate`: the VMs and the host network both.
    if let Some(parsed) = hypervisor::manager::migration::command::parse(line) {
        use hypervisor::manager::migration::command;
        match parsed {
            Ok(p) => command::execute(&p, m, net.as_mut().map(|n| n.tcp()).as_mut(), platform::time::micros(), con),
            Err(e) => command::report_parse_error(&e, con),
        }
        return After::Nothing;
    }
    match console::parse(line) {
        Ok(Some(p)) => console::execute(&p, m, status, con),
        Ok(None) => After::Nothing,
        Err(e) => {
            console::commands::report_parse_error(&e, con);
            After::Nothing
        }
    }
}

fn read_ramdisk(ramdisk: &'static [u8]) -> (BootConfig, Vec<GuestImage>) {
    let mut images = Vec::new();
    let mut config = BootConfig::default();
    if ramdisk.is_empty() {
        log::warn!("no ramdisk: no guests and no boot configuration");
        return (config, images);
    }
    let archive = match Archive::new(ramdisk) {
        Ok(a) => a,
        Err(e) => {
            log::error!("ramdisk unreadable: {e}");
            return (config, images);
        }
    };
    for (name, bytes) in archive.files() {
        if name == "hypervisor.cfg" {
            let text = core::str::from_utf8(bytes).unwrap_or("");
            let (c, problems) = boot_config::parse(text);
            for p in problems {
                log::warn!("hypervisor.cfg: {p}");
            }
            config = c;
        } else {
            images.push(GuestImage { name: String::from(name), bytes });
        }
    }
    (config, images)
}

/// What `host` reports. The CPUs are asked (and timed) only for `host`.
fn host_status(cpu: &platform::cpu::CpuInfo, boot_virt: &str, line: &str) -> console::HostStatus {
    let mem = platform::memory::info();
    let asks_host = matches!(console::parse(line), Ok(Some(console::Parsed { command: console::Command::Host, .. })));
    let (cpus, shootdown_ticks) = if asks_host { cpus::status(boot_virt) } else { (Vec::new(), None) };
    console::HostStatus {
        cpu_vendor: cpu.vendor.clone(),
        cpu_brand: cpu.brand.clone(),
        family: cpu.family,
        model: cpu.model,
        stepping: cpu.stepping,
        apic_ids: platform::acpi::info().map(|a| a.apic_ids.clone()).unwrap_or_default(),
        mem_usable_bytes: mem.usable_bytes,
        mem_free_bytes: platform::memory::free_bytes(),
        heap_bytes: mem.heap_bytes,
        heap_used_bytes: platform::memory::heap_used() as u64,
        tsc_hz: platform::time::tsc_hz(),
        uptime_us: platform::time::micros(),
        cpus,
        shootdown_ticks,
    }
}

fn power_off() -> ! {
    crate::println!("hypervisor: power off (ok)");
    platform::power::off(true);
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    platform::serial::force_write_fmt(format_args!("\n!!! hypervisor panic: {info}\n"));
    platform::serial::force_write_fmt(format_args!("    context: {}\n", context::describe()));
    platform::power::fail();
}
