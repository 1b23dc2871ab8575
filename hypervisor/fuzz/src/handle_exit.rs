//! Exit handling as a whole (`Vm::handle_exit` under `Manager::run_slice`)
//! on the mock backend: VMs with simulated RAM and scripted vCPUs get
//! random exits with random registers, while the guest reads and writes
//! its memory through the nested page table (faulting into the same exit
//! path) and the host runs background sharing, swap to a simulated disk
//! and memory targets, with the disk failing, losing writes or damaged at
//! random. The guest is hostile: nothing it does may crash the host.
//!
//! Checks:
//! - the host never panics; a VM ends only through its own fault (the
//!   debug-exit port, a shutdown or failed entry, an access outside RAM,
//!   a page that cannot be brought back because the disk failed or the
//!   host is out of frames), with one console line, and an ended VM holds
//!   nothing;
//! - every other exit completes the instruction (RIP moves past it) or
//!   injects exactly one fault, and changes only the registers the
//!   instruction writes (CPUID's four, RAX/RDX for RDMSR, RAX for IN and
//!   hypercalls, with x86's merge and zero-extension rules);
//! - a guest access faults at most a few times before it goes through,
//!   and reads what the guest last wrote (or the VM is stopped because
//!   the disk failed: never wrong data);
//! - console lines are single printable lines;
//! - when every VM is stopped, every host frame comes back (only the
//!   sharing index's zero frame stays, until the index is freed), swap
//!   files are empty and no shared page is left.
//!
//! Input: host frames (`u16`), swap disk size (`u16` pages, 0: none),
//! sharing on and its budget, then operations of one byte and their
//! parameters (see `Host::step`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::OnceLock;

use hypervisor::disk::space::{DATA_START, FormatOptions};
use hypervisor::manager::{GuestImage, Manager};
use hypervisor::memory::Swap;
use hypervisor::testing::{Lines, MockBackend, elf_guest};
use hypervisor::vm::RunState;
use mm::GuestPhysAddr;
use mm::hal::PhysMem;
use mm::paging::Access;
use mm::swap::{BlockStore, MemBlockStore};
use vcpu::exit::CrAccess;
use vcpu::state::bits::RFLAGS_IF;
use vcpu::{Event, ExitKind, Gprs, IoAccess, MemAccess, VmExit};

use crate::input::Input;

const MAX_STEPS: usize = 48;
const EXIT_PORT: u16 = 0xf4;

/// Marks ModRM register `gpr` (0 = RAX ... 15) as one the instruction may
/// write, in the order of `may`: RAX, RBX, RCX, RDX, RSI, RDI.
fn mark_gpr(may: &mut [bool; 6], gpr: u8) {
    match gpr {
        0 => may[0] = true,
        1 => may[2] = true,
        2 => may[3] = true,
        3 => may[1] = true,
        6 => may[4] = true,
        7 => may[5] = true,
        // RSP, RBP and R8-R15 are not compared, except R8 below.
        _ => {}
    }
}

/// Whether a port write reaches the PM1a control block or the reset port
/// (0xcf9; a dword at 0xcf8 is the PCI host bridge's CONFIG_ADDRESS, not
/// a write to 0xcf9 in its second lane).
fn power_port(io: &IoAccess) -> bool {
    use hypervisor::devices::pci::CONFIG_ADDRESS;
    use hypervisor::firmware::acpi::{PM1A_CNT, RESET_PORT};
    if io.port == CONFIG_ADDRESS && io.size == 4 {
        return false;
    }
    (0..u16::from(io.size)).map(|l| io.port.wrapping_add(l)).any(|p| p == PM1A_CNT + 1 || p == RESET_PORT)
}

type Page = Box<[u8; 4096]>;

fn image() -> &'static [u8] {
    static IMAGE: OnceLock<&'static [u8]> = OnceLock::new();
    // HLT at 1 MiB; the mock vCPU never runs it.
    IMAGE.get_or_init(|| elf_guest(&[0xf4; 16]))
}

struct Host {
    m: Manager<MockBackend>,
    disk: Option<Rc<RefCell<MemBlockStore>>>,
    /// The disk failed or was damaged: page-ins may fail (never lie).
    tampered: bool,
    console: Lines,
    /// Per VM: page address -> what the guest last wrote there.
    written: HashMap<u32, HashMap<u64, Page>>,
}

pub fn handle_exit(data: &[u8]) {
    let mut input = Input::new(data);
    // From too few for two VMs to plenty: running out is part of the test.
    // From too few for two VMs to plenty: running out is part of the test.
    let frames = 1024 + input.below(2048) as usize;
    let images = vec![GuestImage { name: "tiny".into(), bytes: image() }];
    let mut m = Manager::new(Ok(MockBackend::new(frames)), images);
    let disk = match input.below(512) {
        0 => None,
        pages => {
            // The extent table, then a swap extent of the whole rest: a
            // superblock and `pages` slots, rounded up to 4 KiB.
            let disk = Rc::new(RefCell::new(MemBlockStore::new(DATA_START + 1 + 9 * pages + 7)));
            let opts = FormatOptions { swap_percent: 100, min_swap_blocks: 0 };
            let (swap, space) = Swap::attach(Box::new(disk.clone()), "simdisk".into(), &opts, 0, || 0).unwrap();
            m.host_mem.swap = Some(swap);
            m.host_mem.space = Some(space);
            Some(disk)
        }
    };
    m.host_mem.sharing_enabled = input.bool();
    m.host_mem.scan_pages_per_round = 1 + input.below(1024) as usize;
    let baseline = mem(&m).frames_in_use();
    let mut h = Host { m, disk, tampered: false, console: Lines::default(), written: HashMap::new() };
    h.start(2);
    let mut steps = 0;
    while !input.is_empty() && steps < MAX_STEPS {
        h.step(&mut input);
        h.check();
        steps += 1;
    }
    h.finish(baseline);
}

fn mem(m: &Manager<MockBackend>) -> &mm::sim::SimPhys {
    &m.backend.as_ref().unwrap().mem
}

/// A printable one-line report, as the backends write them.
fn report(input: &mut Input<'_>) -> String {
    let n = input.below(40) as usize;
    input.bytes(n).iter().map(|&b| char::from(0x20 + b % 0x5f)).collect()
}

/// What the vCPU looked like before an exit.
#[derive(Clone, Debug)]
struct Before {
    gprs: Gprs,
    skipped: u32,
    injected: usize,
    rip: u64,
    exits: u64,
    reboots: u64,
}

impl Host {
    fn start(&mut self, mib: u32) -> Option<u32> {
        let before = mem(&self.m).frames_in_use();
        match self.m.run_vm("tiny", mib, "") {
            Ok(id) => {
                self.written.insert(id, HashMap::new());
                Some(id)
            }
            Err(e) => {
                // Only a host out of frames refuses a valid request, and it
                // gives back what it took.
                let e = e.to_string();
                assert!(e.contains("cannot") && !e.contains('\n'), "{e}");
                assert_eq!(mem(&self.m).frames_in_use(), before, "a failed start leaked frames: {e}");
                None
            }
        }
    }

    /// A VM that can take an exit (has resources and is runnable).
    fn runnable(&self, input: &mut Input<'_>) -> Option<usize> {
        let live: Vec<usize> =
            (0..self.m.vms.len()).filter(|&i| self.m.vms[i].res.is_some() && self.m.vms[i].state.runnable()).collect();
        (!live.is_empty()).then(|| live[input.below(live.len() as u64) as usize])
    }

    fn step(&mut self, input: &mut Input<'_>) {
        match input.u8() % 12 {
            0 => {
                self.start(2 + input.below(3) as u32);
            }
            1..=4 => {
                if let Some(i) = self.runnable(input) {
                    self.random_exit(i, input);
                }
            }
            5 => {
                if let Some(i) = self.runnable(input) {
                    let page = input.below(self.pages(i));
                    let mut data = Box::new([0u8; 4096]);
                    match input.u8() {
                        // Raw bytes: page tables for the report walker, say.
                        0..=63 => data[..64].copy_from_slice(&input.array::<64>()),
                        tag => data.iter_mut().enumerate().for_each(|(k, b)| *b = (k as u8).wrapping_mul(tag) ^ tag),
                    }
                    self.guest_access(i, page * 4096, Some(data));
                }
            }
            6 => {
                if let Some(i) = self.runnable(input) {
                    let id = self.m.vms[i].id;
                    let known: Vec<u64> = self.written[&id].keys().copied().collect();
                    let page = match known.is_empty() {
                        true => input.below(self.pages(i)) * 4096,
                        false => known[input.below(known.len() as u64) as usize],
                    };
                    self.guest_access(i, page, None);
                }
            }
            7 => self.m.reclaim_round(),
            8 => {
                let id = self.pick_id(input);
                let pages = match input.u8() % 4 {
                    0 => None,
                    _ => Some(u64::from(input.u16()) % 1200),
                };
                if let Err(e) = self.m.set_target(id, pages) {
                    let e = e.to_string();
                    assert!(!e.is_empty() && !e.contains('\n'));
                }
            }
            9 => {
                let id = input.bool().then(|| self.pick_id(input));
                if let Err(e) = self.m.share_now(id) {
                    assert!(id.is_some() && !e.to_string().contains('\n'), "{e}");
                }
            }
            10 => {
                let id = self.pick_id(input);
                let live = self.m.get(id).is_some_and(|v| !v.state.ended());
                assert_eq!(self.m.stop(id, &mut self.console).is_ok(), live);
                assert!(self.m.get(id).is_none_or(|v| v.res.is_none()));
            }
            _ => self.damage_disk(input),
        }
    }

    fn pick_id(&self, input: &mut Input<'_>) -> u32 {
        1 + input.below(u64::from(self.m.vms.iter().map(|v| v.id).max().unwrap_or(0)) + 1) as u32
    }

    fn pages(&self, i: usize) -> u64 {
        self.m.vms[i].mem_bytes / 4096
    }

    fn damage_disk(&mut self, input: &mut Input<'_>) {
        let Some(disk) = &self.disk else { return };
        let mut disk = disk.borrow_mut();
        let blocks = disk.block_count();
        match input.u8() % 4 {
            0 => {
                let (block, offset, mask) = (u64::from(input.u16()) % blocks, input.below(512) as usize, input.u8());
                if block > DATA_START {
                    // Blocks 0..32 are the extent table and block 32 the swap
                    // superblock, read only when attaching.
                    disk.corrupt(block, offset, mask);
                }
            }
            1 => disk.fail_next_reads(1 + u32::from(input.u8() % 4)),
            2 => disk.fail_next_writes(1 + u32::from(input.u8() % 4)),
            _ => disk.lose_next_writes(1 + u32::from(input.u8() % 4)),
        }
        self.tampered = true;
    }

    /// Runs slices until VM `i` has taken the exits scripted for it.
    fn deliver(&mut self, i: usize, exit: VmExit) {
        let vm = &mut self.m.vms[i];
        let vcpu = vm.res.as_mut().unwrap().vcpu();
        let mut exit = Some(exit);
        vcpu.script.push_back(Box::new(move |_| exit.take().expect("one exit per step")));
        for _ in 0..=self.m.vms.len() {
            let vm = &self.m.vms[i];
            if vm.res.as_ref().is_none_or(|r| r.vcpu_ref().script.is_empty()) {
                return;
            }
            let id = vm.id;
            assert!(self.m.run_slice(&mut self.console), "VM {id} is runnable but nothing ran");
        }
        panic!("the exit scripted for VM {} never ran", self.m.vms[i].id);
    }

    fn random_exit(&mut self, i: usize, input: &mut Input<'_>) {
        let pages = self.pages(i);
        let exit = match input.u8() % 15 {
            0 => VmExit::Cpuid,
            1 => {
                let port = match input.u8() % 4 {
                    0 => EXIT_PORT,
                    1 => 0x3f8 + input.below(8) as u16,
                    // Power (PM1a control, reset), PCI configuration
                    // (CONFIG_ADDRESS, CONFIG_DATA and a byte of each),
                    // fw_cfg (selector, data).
                    2 if input.u8() & 1 == 0 => {
                        [0x604, 0xcf9, 0xcf8, 0xcfc, 0xcfe, 0x510, 0x511, 0xcfb][usize::from(input.u8() & 7)]
                    }
                    _ => input.u16(),
                };
                let flags = input.u8();
                VmExit::Io(IoAccess {
                    port,
                    size: [1, 2, 4, 1, 2, 4, 3, 8][usize::from(flags & 7)],
                    write: flags & 8 != 0,
                    string: flags & 0x30 == 0x30,
                    rep: flags & 0x40 != 0,
                })
            }
            2 => VmExit::Hlt,
            3 => VmExit::Hypercall,
            4 | 5 => {
                let msr = match input.u8() % 3 {
                    0 => [0x10, 0x17, 0x3a, 0x79, 0x8b, 0xce, 0xfe, 0x1a0, 0x277, 0x2ff][input.below(10) as usize],
                    1 => 0xc000_0080 + input.below(5) as u32,
                    _ => input.u32(),
                };
                if input.bool() { VmExit::Rdmsr { msr } } else { VmExit::Wrmsr { msr, value: input.u64() } }
            }
            6 | 7 => {
                let gpa = match input.u8() % 4 {
                    0 => input.u64(),
                    1 => pages * 4096 + input.below(1 << 16),
                    _ => input.below(pages) * 4096 + input.below(4096),
                };
                let access = [MemAccess::Read, MemAccess::Write, MemAccess::Execute][input.below(3) as usize];
                VmExit::NestedPageFault { gpa, access, gva: input.bool().then(|| input.u64()) }
            }
            8 => VmExit::ExternalInterrupt { vector: input.bool().then(|| input.u8()) },
            9 => VmExit::Preempted,
            10 => VmExit::Shutdown { report: report(input) },
            11 => VmExit::EntryFailed { report: report(input) },
            12 => VmExit::Handled(ExitKind::ALL[input.below(ExitKind::COUNT as u64) as usize]),
            // The vCPU model's exits (register instructions, windows, INIT).
            13 => match input.u8() % 11 {
                0 => VmExit::Xsetbv,
                1 => VmExit::CacheFlush { invd: input.bool() },
                2 => VmExit::Pause,
                3 => VmExit::MonitorMwait,
                4 => VmExit::InterruptWindow,
                5 => VmExit::NmiWindow,
                6 => VmExit::Sipi { vector: input.u8() },
                7 => VmExit::DrAccess { dr: input.u8() % 8, gpr: input.u8() % 16, write: input.bool() },
                8 => {
                    let gpr = input.u8() % 16;
                    let access = match input.u8() % 4 {
                        0 => CrAccess::MovTo { gpr },
                        1 => CrAccess::MovFrom { gpr },
                        2 => CrAccess::Clts,
                        _ => CrAccess::Lmsw { value: input.u16() },
                    };
                    VmExit::CrAccess { cr: [0, 3, 4, 8, 2, 5][usize::from(input.u8() % 6)], access }
                }
                9 => VmExit::InvalidOpcode,
                _ => VmExit::Init,
            },
            _ => {
                // The guest's paging state is its own: the report walks it.
                let vcpu = self.m.vms[i].res.as_mut().unwrap().vcpu();
                vcpu.state.cr0 = input.u64();
                vcpu.state.cr3 = input.u64() % (pages * 4096);
                vcpu.state.cr4 = input.u64();
                vcpu.state.efer = input.u64();
                vcpu.state.rip = input.u64();
                VmExit::Unexpected { report: report(input) }
            }
        };
        // Registers as the guest left them.
        let vcpu = self.m.vms[i].res.as_mut().unwrap().vcpu();
        vcpu.gprs = Gprs {
            rax: match input.u8() % 4 {
                0 => input.below(6),
                _ => input.u64(),
            },
            rbx: input.u64(),
            rcx: input.u64(),
            rdx: input.u64(),
            rsi: input.u64(),
            rdi: input.u64(),
            r8: 0x8888,
            ..Gprs::default()
        };
        vcpu.rflags = if input.bool() { RFLAGS_IF | 2 } else { 2 };
        vcpu.cpl = if input.u8() % 8 == 0 { 3 } else { 0 };
        self.exit_and_check(i, exit);
    }

    fn exit_and_check(&mut self, i: usize, exit: VmExit) {
        let vm = &self.m.vms[i];
        let (id, res) = (vm.id, vm.res.as_ref().unwrap());
        let v = res.vcpu_ref();
        let b = Before {
            gprs: v.gprs,
            skipped: v.skipped,
            injected: v.injected.len(),
            rip: v.state.rip,
            exits: vm.stats.exits[exit.kind() as usize],
            reboots: vm.reboots,
        };
        let (cpl, interrupts) = (v.cpl, v.rflags & RFLAGS_IF != 0);
        let lines = self.console.0.len();
        self.deliver(i, exit.clone());

        let vm = &self.m.vms[i];
        if vm.reboots != b.reboots {
            // The guest reset its machine (port 0xcf9): the VM started again
            // from its image, same id, fresh memory and vCPU.
            assert!(matches!(&exit, VmExit::Io(io) if io.write && power_port(io)), "reset after {exit:?}");
            assert_eq!(vm.reboots, b.reboots + 1);
            assert!(vm.res.is_some() && vm.state == RunState::Running, "VM {id} after a reset: {:?}", vm.state);
            let text = self.console.0[lines..].join("\n");
            assert!(text.contains(&format!("vm {id} (tiny) restarted")), "no restart report: {text}");
            self.written.insert(id, Default::default());
            return;
        }
        let ends = match &exit {
            VmExit::Io(io) if io.write && !io.string && matches!(io.size, 1 | 2 | 4) && io.port == EXIT_PORT => true,
            // Soft-off (SLP_EN in PM1a control) and a reset (port 0xcf9)
            // end a VM too; whether this write did depends on the device
            // state, so the end itself is checked below.
            VmExit::Io(io) if io.write && !io.string && matches!(io.size, 1 | 2 | 4) && power_port(io) => {
                vm.state.ended()
            }
            VmExit::Shutdown { .. } | VmExit::EntryFailed { .. } | VmExit::Unexpected { .. } | VmExit::Init => true,
            VmExit::NestedPageFault { .. } => vm.state.ended(),
            // INS/OUTS is decoded at RIP: bytes that are not the exit's
            // instruction (this model's guest runs HLTs) stop the VM with a
            // report, as a racing code change would; a string write to a
            // power port may end it too.
            VmExit::Io(io) if io.string => vm.state.ended(),
            _ => false,
        };
        if ends {
            assert!(vm.state.ended() && vm.res.is_none(), "VM {id} after {exit:?}: {:?}", vm.state);
            let text = self.console.0[lines..].join("\n");
            assert!(text.contains(&format!("vm {id} (tiny) ")), "no end report for VM {id}: {text}");
            if let (VmExit::Io(io), RunState::Stopped { reason }) = (&exit, &vm.state)
                && io.string
            {
                assert!(reason.contains("could not be carried out"), "VM {id} after {exit:?}: {reason}");
            } else if let VmExit::Io(io) = &exit
                && io.port != EXIT_PORT
            {
                // A reset restarts the VM (above); only a failed restart ends it.
                let reset =
                    matches!(&vm.state, RunState::Stopped { reason } if reason.contains("could not start again"));
                assert!(vm.state == RunState::PoweredOff || reset, "VM {id} after {exit:?}: {:?}", vm.state);
            }
            if let (VmExit::NestedPageFault { gpa, .. }, RunState::Stopped { reason }) = (&exit, &vm.state) {
                // Outside RAM, or the page could not be brought back.
                let outside = *gpa >= vm.mem_bytes;
                assert!(outside || self.fault_explained(reason), "VM {id} stopped at {gpa:#x}: {reason}");
            }
            self.written.remove(&id);
            return;
        }
        assert!(vm.res.is_some(), "VM {id} lost its resources after {exit:?}: {:?}", vm.state);
        if exit.kind() != ExitKind::Preempted {
            assert_eq!(vm.stats.exits[exit.kind() as usize], b.exits + 1, "{exit:?} not counted");
        }
        let v = vm.res.as_ref().unwrap().vcpu_ref();
        let skipped = v.skipped - b.skipped;
        let injected = &v.injected[b.injected..];
        assert_eq!(v.state.rip, b.rip + 2 * u64::from(skipped));
        let g = v.gprs;
        // Registers the instruction may write; everything else must stay.
        let mut may = [false; 6]; // rax rbx rcx rdx rsi rdi
        let one_fault = |e: Event| injected == [e] && skipped == 0;
        let completed = injected.is_empty() && skipped == 1;
        match &exit {
            VmExit::Cpuid => {
                assert!(completed, "CPUID: {skipped} skipped, {injected:?}");
                may[..4].fill(true);
                for r in [g.rax, g.rbx, g.rcx, g.rdx] {
                    assert_eq!(r >> 32, 0, "CPUID writes 32-bit values");
                }
            }
            VmExit::Io(io) if io.string || !matches!(io.size, 1 | 2 | 4) => {
                assert!(one_fault(Event::GP0), "{io:?}: {skipped} skipped, {injected:?}")
            }
            VmExit::Io(io) => {
                assert!(completed, "{io:?}: {skipped} skipped, {injected:?}");
                if !io.write {
                    may[0] = true;
                    let mask = (1u64 << (8 * io.size)) - 1;
                    if io.size == 4 {
                        assert_eq!(g.rax >> 32, 0, "a 32-bit IN zero-extends");
                    } else {
                        assert_eq!(g.rax & !mask, b.gprs.rax & !mask, "an 8/16-bit IN merges");
                    }
                    for lane in 0..u16::from(io.size) {
                        let port = io.port.wrapping_add(lane);
                        if !vm.devices.decodes_port(port) && !vm.devices.claims_access(io.port, io.size) {
                            let byte = (g.rax >> (8 * lane)) & 0xff;
                            assert_eq!(byte, 0xff, "no device at {port:#x}: all ones");
                        }
                    }
                }
            }
            VmExit::Hlt => {
                assert!(completed);
                let want = if interrupts { RunState::Waiting } else { RunState::Halted { rip: v.state.rip } };
                assert_eq!(vm.state, want);
            }
            VmExit::Hypercall if cpl != 0 => assert!(one_fault(Event::UD), "hypercall from ring {cpl}"),
            VmExit::Hypercall => {
                // QUEUE_INTERRUPT (a vector 32-255) and QUEUE_NMI queue one
                // event for the caller; nothing else injects anything.
                let queued = match (b.gprs.rax, b.gprs.rdi) {
                    (4, v @ 32..=255) => Some(Event::Interrupt { vector: v as u8 }),
                    (5, _) => Some(Event::Nmi),
                    _ => None,
                };
                match queued {
                    Some(e) => assert!(skipped == 1 && injected == [e], "{e:?}: {skipped} skipped, {injected:?}"),
                    None => assert!(completed, "hypercall {:#x}: {skipped} skipped, {injected:?}", b.gprs.rax),
                }
                may[0] = true;
                match b.gprs.rax {
                    0 => assert_eq!(g.rax, 0x4b4f_5648),
                    1 => assert_eq!(g.rax, u64::from(id)),
                    // SHARED_IN_RANGE hands back the rest of its range in
                    // RDI/RSI: it moves forward, its end stays.
                    3 => {
                        may[4] = true;
                        may[5] = true;
                        let end = b.gprs.rdi.saturating_add(b.gprs.rsi);
                        assert!(g.rdi >= b.gprs.rdi && g.rdi.saturating_add(g.rsi) == end, "range moved");
                    }
                    _ => {}
                }
            }
            VmExit::Rdmsr { .. } => {
                assert!(completed || one_fault(Event::GP0), "{exit:?}: {skipped} skipped, {injected:?}");
                if completed {
                    may[0] = true;
                    may[3] = true;
                    assert!(g.rax >> 32 == 0 && g.rdx >> 32 == 0, "RDMSR writes EDX:EAX");
                }
            }
            VmExit::Wrmsr { .. } => {
                assert!(completed || one_fault(Event::GP0), "{exit:?}: {skipped} skipped, {injected:?}")
            }
            // XSETBV: #UD with CR4.OSXSAVE clear, #GP for a bad XCR0 or
            // from ring 3; WBINVD/INVD: #GP from ring 3.
            VmExit::Xsetbv => {
                let fault = one_fault(Event::GP0) || one_fault(Event::UD);
                assert!(completed || fault, "{exit:?}: {skipped} skipped, {injected:?}")
            }
            VmExit::CacheFlush { .. } => {
                assert!(completed || one_fault(Event::GP0), "{exit:?}: {skipped} skipped, {injected:?}")
            }
            VmExit::Pause => assert!(completed, "PAUSE: {skipped} skipped, {injected:?}"),
            VmExit::MonitorMwait => assert!(one_fault(Event::UD), "{exit:?}: {skipped} skipped, {injected:?}"),
            // The other vendor's hypercall instruction completes; anything
            // else gets its #UD back.
            VmExit::InvalidOpcode => {
                assert!(completed || one_fault(Event::UD), "{exit:?}: {skipped} skipped, {injected:?}")
            }
            VmExit::CrAccess { access, .. } => {
                // #UD for a control register that does not exist (CR1, CR5).
                let fault = one_fault(Event::GP0) || one_fault(Event::UD);
                assert!(completed || fault, "{exit:?}: {skipped} skipped, {injected:?}");
                if let (true, CrAccess::MovFrom { gpr }) = (completed, access) {
                    mark_gpr(&mut may, *gpr);
                }
            }
            VmExit::DrAccess { gpr, write, .. } => {
                // #GP (privilege, reserved bits), #UD (DR4/5 with CR4.DE),
                // #DB (DR7.GD) or done; a read writes its GPR.
                let fault = skipped == 0
                    && injected.len() == 1
                    && matches!(injected[0], Event::Exception { vector: 1 | 6 | 13, .. });
                assert!(completed || fault, "{exit:?}: {skipped} skipped, {injected:?}");
                if completed && !write {
                    mark_gpr(&mut may, *gpr);
                }
            }
            _ => assert!(skipped == 0 && injected.is_empty(), "{exit:?}: {skipped} skipped, {injected:?}"),
        }
        let regs = |g: &Gprs| [g.rax, g.rbx, g.rcx, g.rdx, g.rsi, g.rdi];
        // (The windows and SIPI fall in the arm above that wants no skip
        // and no injection: nothing was queued for the window, and a vCPU
        // that is not waiting for a SIPI ignores it.)
        for (k, (now, was)) in regs(&g).into_iter().zip(regs(&b.gprs)).enumerate() {
            assert!(may[k] || now == was, "{exit:?} changed register {k}: {was:#x} -> {now:#x}");
        }
        let writes_r8 = match &exit {
            VmExit::CrAccess { access: CrAccess::MovFrom { gpr }, .. } => *gpr == 8,
            VmExit::DrAccess { gpr, write: false, .. } => *gpr == 8,
            _ => false,
        };
        assert!(writes_r8 || g.r8 == 0x8888, "{exit:?} changed R8");
        if !matches!(exit, VmExit::Hlt) {
            assert_eq!(vm.state, RunState::Running, "after {exit:?}");
        }
    }

    /// Why a fault inside RAM may stop a VM: the disk failed (it was
    /// damaged) or the host has no frame for the page.
    fn fault_explained(&self, reason: &str) -> bool {
        reason.contains("could not be resolved")
            && (reason.contains("Out of host memory") || self.tampered && !reason.contains("missing"))
    }

    /// The guest reads (`data` None) or writes a page, faulting through
    /// the exit path until the nested page table lets it.
    fn guest_access(&mut self, i: usize, gpa: u64, data: Option<Page>) {
        let id = self.m.vms[i].id;
        if data.is_some() && self.m.vms[i].res.as_ref().is_some_and(|r| r.mem.is_read_only(GuestPhysAddr(gpa))) {
            // The BIOS ROM: a guest write there is an emulated instruction
            // that changes nothing (the hostile whole-system guest checks
            // it); this model writes pages, so it leaves ROM alone.
            return;
        }
        let access = if data.is_some() { Access::WRITE } else { Access::READ };
        for _ in 0..4 {
            let Some(res) = self.m.vms[i].res.as_ref() else {
                let RunState::Stopped { reason } = &self.m.vms[i].state else { unreachable!() };
                assert!(self.fault_explained(reason), "VM {id} stopped on a guest access: {reason}");
                self.written.remove(&id);
                return;
            };
            let sim = mem(&self.m);
            if let Some(hpa) = res.mem.tables().0.hw_access(sim, GuestPhysAddr(gpa), access) {
                let p = sim.phys_to_ptr(hpa);
                match data {
                    // SAFETY: `hpa` is the writable frame the nested table
                    // maps at `gpa` (page-aligned), inside simulated memory.
                    Some(d) => {
                        unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), p, 4096) };
                        self.written.get_mut(&id).unwrap().insert(gpa, d);
                    }
                    None => {
                        let mut got = [0u8; 4096];
                        // SAFETY: as above, readable.
                        unsafe { std::ptr::copy_nonoverlapping(p, got.as_mut_ptr(), 4096) };
                        if let Some(want) = self.written[&id].get(&gpa) {
                            assert!(got == **want, "VM {id} reads other data at {gpa:#x}");
                        }
                    }
                }
                return;
            }
            let access = if data.is_some() { MemAccess::Write } else { MemAccess::Read };
            self.deliver(i, VmExit::NestedPageFault { gpa, access, gva: None });
        }
        panic!("VM {id}: access to {gpa:#x} still faults after 4 resolved faults");
    }

    fn check(&self) {
        for vm in &self.m.vms {
            assert_eq!(vm.res.is_none(), vm.state.ended(), "VM {}: {:?}", vm.id, vm.state);
            if let Some(res) = &vm.res {
                assert_eq!(res.mem.state_counts().total(), vm.mem_bytes / 4096);
            }
        }
        for line in &self.console.0 {
            assert!(!line.is_empty() && !line.chars().any(|c| c.is_control() && c != '\t'), "console line {line:?}");
        }
    }

    fn finish(mut self, baseline: usize) {
        // Every page each live VM wrote reads back (faulting in).
        for i in 0..self.m.vms.len() {
            let id = self.m.vms[i].id;
            let pages: Vec<u64> = self.written.get(&id).map(|w| w.keys().copied().collect()).unwrap_or_default();
            for gpa in pages {
                if self.m.vms[i].res.is_some() && self.m.vms[i].state.runnable() {
                    self.guest_access(i, gpa, None);
                }
            }
        }
        self.m.stop_all(&mut self.console);
        self.check();
        assert!(self.m.vms.iter().all(|v| v.res.is_none() && !v.state.runnable()));
        let host = &mut self.m.host_mem;
        if let Some(swap) = &host.swap {
            assert_eq!(swap.stats().in_files, 0, "swap slots left after every VM stopped");
        }
        let s = host.sharing.as_ref().unwrap().stats();
        assert_eq!((s.shared_frames, s.shared_refs, s.zero_refs), (0, 0, 0), "sharing left: {s:?}");
        assert_eq!(mem(&self.m).frames_in_use(), baseline, "frames not returned by stopped VMs");
        let index = self.m.host_mem.sharing.take().unwrap();
        let backend = self.m.backend.as_mut().unwrap();
        // SAFETY: every VM that used the index was freed.
        unsafe { index.free(&mut backend.mem) };
        assert_eq!(backend.mem.frames_in_use(), 0);
    }
}
