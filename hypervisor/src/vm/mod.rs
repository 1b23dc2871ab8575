//! One virtual machine: its RAM and nested page table (from `mm`), its vCPUs
//! (from the backend, each with its scheduling state: `vcpu_state`), its
//! devices, and what it has done. Exit handling is in `exit`; creating and
//! scheduling VMs is the manager's job.

pub mod boot;
pub mod conformance;
pub mod exit;
pub mod interrupts;
pub mod mmio;
pub mod regs;
pub mod smp;
pub mod throttle;
pub mod vcpu_state;
use vcpu::walk;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use mm::addr::GuestPhysAddr;
use vcpu::{ExitKind, Vcpu};
pub use vcpu_state::{VcpuEvent, VcpuState};

use crate::backend::Backend;
use crate::devices::DeviceSet;
use crate::memory::GuestMemory;
use crate::memory::reclaim::VmReclaim;
use crate::msr::MsrState;
pub use boot::Protocol;

/// Where a VM is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// In HLT with interrupts enabled: resumes at the next scheduling round
    /// (no virtual interrupt sources exist yet to wake it earlier).
    Waiting,
    /// In HLT with interrupts disabled: nothing can ever wake it.
    Halted {
        rip: u64,
    },
    /// Wrote V to the debug-exit port: status (V << 1) | 1.
    Exited {
        status: u32,
    },
    /// The guest powered its machine off (ACPI S5): a clean end.
    PoweredOff,
    /// Ended by the hypervisor (a fault, an access outside its memory, an
    /// operator's `vm stop`), with the reason.
    Stopped {
        reason: String,
    },
}

impl RunState {
    pub fn name(&self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Waiting => "waiting",
            RunState::Halted { .. } => "halted",
            RunState::Exited { .. } => "exited",
            RunState::PoweredOff => "off",
            RunState::Stopped { .. } => "stopped",
        }
    }

    pub fn runnable(&self) -> bool {
        matches!(self, RunState::Running | RunState::Waiting)
    }

    /// Ended for good: resources can be freed.
    pub fn ended(&self) -> bool {
        matches!(self, RunState::Exited { .. } | RunState::PoweredOff | RunState::Stopped { .. })
    }
}

#[derive(Clone, Debug, Default)]
pub struct VmStats {
    pub exits: [u64; ExitKind::COUNT],
    /// TSC ticks spent running the guest (entry to exit, handler included).
    pub run_ticks: u64,
    pub started_tsc: u64,
    pub ended_tsc: Option<u64>,
    /// Host clock reading when the command that built the VM began (`vm
    /// run`, `vm restore`): with `first_entry_tsc`, the time to its first
    /// guest instruction.
    pub requested_tsc: u64,
    /// Host clock reading at its first VM entry.
    pub first_entry_tsc: Option<u64>,
    /// A lazily restored VM's fill: pages on disk, how the others came in
    /// (kept once the fill completes).
    pub lazy: Option<crate::memory::lazy::LazyProgress>,
    /// Reads and writes of ports no device decodes.
    pub unbacked_io: u64,
    /// Accesses to device registers in guest-physical memory (emulated).
    pub mmio: u64,
    /// Of those, accesses to its interrupt controllers' pages carried out
    /// on another CPU than the boot CPU, where a slice of the VM ran
    /// (`manager::local_mmio`).
    pub mmio_away: u64,
    /// Exits of its slices on another CPU that the boot CPU handled while
    /// the slice waited (host calls: faults on RAM, virtio registers,
    /// string I/O), instead of the slice ending for them.
    pub host_calls: u64,
    /// Nested page faults on RAM of vCPUs running beside a sibling that
    /// the boot CPU fixed while the round ran (host calls from other CPUs,
    /// or in place on the boot CPU), each instead of an end of the round
    /// for every sibling.
    pub sibling_faults: u64,
    /// Of those fixes, the ones that changed a mapping siblings may have
    /// cached: shot down on their CPUs before the guest went on.
    pub shootdowns: u64,
    /// Time slices that ran out (timer exit or wall-clock check) and made
    /// the VM give the CPU up.
    pub slices_expired: u64,
    /// What the balloon did to the VM's memory.
    pub balloon: BalloonStats,
    /// Each vCPU's, kept when the VM ends and its vCPUs are freed.
    pub ended_vcpus: Vec<VcpuStats>,
    /// Machine checks given to the guest (it touched a poisoned page).
    pub machine_checks: u64,
    /// Slices run at the same time as another of its vCPUs, on another
    /// host CPU (`manager::rounds`, "siblings").
    pub parallel_slices: u64,
    /// Local APIC accesses (x2APIC MSRs, the TSC deadline) a sibling
    /// handled where it ran, and IPIs it posted to another vCPU there
    /// (`manager::sibling_apic`).
    pub sibling_apic_accesses: u64,
    pub posted_ipis: u64,
    /// HLTs a sibling waited out on its host CPU, and how many of them a
    /// posted IPI or its APIC's timer ended there (the others ended with
    /// the round).
    pub sibling_halts: u64,
    pub sibling_wakes: u64,
    /// Sibling slices that ended at an IPI for a vCPU not in the guest,
    /// so that it runs before a second one (`manager::rounds`).
    pub sibling_ipi_ends: u64,
    /// Port accesses a sibling carried out where it ran (COM1, the CMOS
    /// clock, the PM timer's reads: `DeviceSet::pio_alone`), each instead
    /// of an end of the round; and the sibling slices one of them ended
    /// because it moved COM1's interrupt line.
    pub sibling_pio: u64,
    pub sibling_line_ends: u64,
    /// Moves of COM1's interrupt line a sibling carried to the interrupt
    /// controllers where it ran (its interrupts posted to their vCPUs).
    pub sibling_lines: u64,
    /// Its vCPUs halted outside the round that a sibling's IPI woke and
    /// ran at once on the sender's CPU (standby siblings).
    pub standby_wakes: u64,
}

/// Pages the guest's balloon driver moved, as `mm` took them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// Given up (inflate) and accepted.
    pub inflated: u64,
    /// Taken back (deflate) and backed again.
    pub deflated: u64,
    /// Reported free (free page reporting) and discarded: backed afresh
    /// when the guest touches them again.
    pub reported: u64,
    /// Pages `mm` refused (not RAM, already in that state, no frame).
    pub refused: u64,
}

impl VmStats {
    pub fn total_exits(&self) -> u64 {
        self.exits.iter().sum()
    }
}

/// What one vCPU has done (`vm stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuStats {
    pub exits: u64,
    /// TSC ticks in its slices.
    pub run_ticks: u64,
    /// Slices it was given.
    pub slices: u64,
    /// Times an interrupt woke it from HLT.
    pub wakeups: u64,
    /// The host CPU it last ran on.
    pub last_host_cpu: u32,
    /// Every host CPU it ran on, a bit each (CPUs past 63 share bit 63).
    pub host_cpus: u64,
    /// Slices it ran on another host CPU than the one before.
    pub moves: u64,
}

impl VcpuStats {
    /// Notes a slice on host CPU `cpu`.
    pub fn ran_on(&mut self, cpu: u32) {
        if self.host_cpus != 0 && cpu != self.last_host_cpu {
            self.moves += 1;
        }
        self.last_host_cpu = cpu;
        self.host_cpus |= 1 << cpu.min(63);
    }

    /// "0,1": the host CPUs it ran on.
    pub fn host_cpu_list(&self) -> String {
        let cpus: Vec<String> = (0..64).filter(|b| self.host_cpus & (1 << b) != 0).map(|b| format!("{b}")).collect();
        if cpus.is_empty() { String::from("none") } else { cpus.join(",") }
    }
}

/// One vCPU: the backend's object and what only this vCPU has. Its local
/// APIC is `DeviceSet::lapic(index)` (see `devices::interrupts`).
pub struct VcpuSlot<V> {
    pub vcpu: V,
    pub state: VcpuState,
    /// Halted with RFLAGS.IF clear: only an NMI, INIT or SIPI wakes it.
    pub halted_irq_off: bool,
    /// Post-copy: the guest frame it touched that is still on its way from
    /// the migration's source. It does not run until that page is here
    /// (then it retries the access: RIP still names it).
    pub awaiting_page: Option<u64>,
    /// Its last slice ran out its time, or ended halted with interrupts on,
    /// rather than at an exit that needs the VM (it computes, or waits for
    /// IPIs): it may run beside its siblings on other host CPUs, where a
    /// HLT waits for what wakes it (`manager::rounds`, "siblings").
    pub computing: bool,
    pub stats: VcpuStats,
}

impl<V> VcpuSlot<V> {
    pub fn new(vcpu: V, state: VcpuState) -> Self {
        VcpuSlot {
            vcpu,
            state,
            halted_irq_off: false,
            awaiting_page: None,
            computing: false,
            stats: VcpuStats::default(),
        }
    }
}

/// Flushes cached nested translations on every vCPU of a VM (the nested
/// page table is the VM's, shared by them all).
pub fn flush_all<V: Vcpu>(vcpus: &mut [VcpuSlot<V>], scope: mm::paging::FlushScope) {
    for s in vcpus {
        s.vcpu.flush_nested_tlb(scope);
    }
}

/// A VM's vCPUs and which of them is current (being run, or whose exit is
/// being handled). The slots are never empty and never change length, and
/// the current index is always below that length: both are private, so the
/// exit path takes the current vCPU without a bounds check. The slots are
/// a slice to everyone else (`Deref`), which cannot change its length.
pub struct VcpuSlots<V> {
    slots: Box<[VcpuSlot<V>]>,
    cur: usize,
}

impl<V> VcpuSlots<V> {
    /// `slots`, vCPU 0 current; `None` if there are none.
    pub fn new(slots: Vec<VcpuSlot<V>>) -> Option<Self> {
        (!slots.is_empty()).then(|| VcpuSlots { slots: slots.into_boxed_slice(), cur: 0 })
    }

    /// Makes vCPU `index` the current one (out of range: no change).
    pub fn set_cur(&mut self, index: usize) {
        if index < self.slots.len() {
            self.cur = index;
        }
    }

    /// The current vCPU's index.
    pub fn cur(&self) -> usize {
        self.cur
    }

    /// The current vCPU's slot. On every exit, twice: unchecked.
    pub fn current_mut(&mut self) -> &mut VcpuSlot<V> {
        // SAFETY: `cur < slots.len()`: `slots` is non-empty (`new`) and,
        // private and boxed, never changes length; `cur` starts at 0 and
        // only `set_cur` changes it, after checking it against that length.
        unsafe { self.slots.get_unchecked_mut(self.cur) }
    }

    pub fn current(&self) -> &VcpuSlot<V> {
        &self.slots[self.cur]
    }

    /// The first slot, for pointers to several slots at once (each
    /// `base.add(i)` with `i < len()`): the slots never move (boxed).
    pub fn as_mut_ptr(&mut self) -> *mut VcpuSlot<V> {
        self.slots.as_mut_ptr()
    }

    /// The slots, to free the vCPUs.
    pub fn into_vec(self) -> Vec<VcpuSlot<V>> {
        self.slots.into_vec()
    }
}

impl<V> core::ops::Deref for VcpuSlots<V> {
    type Target = [VcpuSlot<V>];
    fn deref(&self) -> &[VcpuSlot<V>] {
        &self.slots
    }
}

impl<V> core::ops::DerefMut for VcpuSlots<V> {
    fn deref_mut(&mut self) -> &mut [VcpuSlot<V>] {
        &mut self.slots
    }
}

/// What a live VM holds; dropped (and returned to the host) when it ends.
pub struct Resources<B: Backend> {
    /// RAM, page states and the nested page table.
    pub mem: GuestMemory<B::Format>,
    /// Its vCPUs, vCPU 0 the bootstrap processor.
    pub vcpus: VcpuSlots<B::Vcpu>,
}

impl<B: Backend> Resources<B> {
    /// A VM's resources with one vCPU, runnable.
    pub fn new(mem: GuestMemory<B::Format>, vcpu: B::Vcpu) -> Self {
        let slots =
            VcpuSlots { slots: alloc::vec![VcpuSlot::new(vcpu, VcpuState::Runnable)].into_boxed_slice(), cur: 0 };
        Resources { mem, vcpus: slots }
    }

    /// A VM's resources with these vCPUs; with none, the memory back (in
    /// a box: the error stays small).
    pub fn with_vcpus(
        mem: GuestMemory<B::Format>,
        vcpus: Vec<VcpuSlot<B::Vcpu>>,
    ) -> Result<Self, Box<GuestMemory<B::Format>>> {
        match VcpuSlots::new(vcpus) {
            Some(vcpus) => Ok(Resources { mem, vcpus }),
            None => Err(Box::new(mem)),
        }
    }

    /// Makes vCPU `index` the current one (out of range: no change).
    pub fn set_cur(&mut self, index: usize) {
        self.vcpus.set_cur(index)
    }

    /// The current vCPU's index.
    pub fn cur(&self) -> usize {
        self.vcpus.cur()
    }

    /// The current vCPU (see `cur`).
    #[inline(always)]
    pub fn vcpu(&mut self) -> &mut B::Vcpu {
        &mut self.vcpus.current_mut().vcpu
    }

    /// The current vCPU, to read.
    pub fn vcpu_ref(&self) -> &B::Vcpu {
        &self.vcpus.current().vcpu
    }

    /// The memory and the current vCPU at once.
    pub fn split(&mut self) -> (&mut GuestMemory<B::Format>, &mut B::Vcpu) {
        (&mut self.mem, &mut self.vcpus.current_mut().vcpu)
    }
}

pub struct Vm<B: Backend> {
    pub id: u32,
    pub guest: String,
    pub protocol: Protocol,
    pub mem_bytes: u64,
    pub cmdline: String,
    /// Ramdisk files passed at start (Multiboot modules, the initramfs):
    /// a reset starts the VM again with them.
    pub modules: Vec<String>,
    /// Resets the guest asked for (each started it again).
    pub reboots: u64,
    pub state: RunState,
    pub stats: VmStats,
    /// The guest's devices (the legacy PC set: see `DeviceSet::pc`).
    pub devices: DeviceSet,
    /// Paused by the operator: the scheduler does not run it (its vCPU is
    /// outside the guest, at an instruction boundary, whenever the console
    /// runs a command: on one CPU they take turns).
    pub paused: bool,
    /// CPU share taken away by a migration that does not converge
    /// (`throttle`): the scheduler runs it only its share of the time.
    pub throttle: throttle::Throttle,
    /// `vm create` built it; it runs from `vm start` on.
    pub created: bool,
    /// The guest image it was built from (`guest` is its name, which
    /// `vm create` may choose).
    pub image: String,
    /// The host clock reading (TSC ticks) at which the devices' next timer
    /// interrupt is due (`u64::MAX`: none armed); see `interrupts`.
    pub timer_tick: u64,
    /// The VM's clock (what its devices count in, ns) minus the host's:
    /// 0 for a VM started here; a restored VM's clock goes on from the
    /// reading it was saved at, whatever the host's clock reads now.
    pub clock_offset_ns: i64,
    pub msrs: MsrState,
    /// Host memory the VM's control structures use, measured at start:
    /// VMCS/VMCB and vCPU state, nested page tables, RAM bookkeeping.
    pub overhead_bytes: u64,
    /// Nested-page-table leaves mapping RAM at start: 4 KiB, 2 MiB, 1 GiB.
    pub nested_pages: [u64; 3],
    /// Memory target, swap file and paging counters.
    pub reclaim: VmReclaim,
    /// The host NUMA node its memory comes from and its vCPUs belong on
    /// (`crate::numa`); none when the host has one node or no node could
    /// hold it.
    pub node: Option<u32>,
    /// The CPUID it sees: this host's, or the table pinned when it was
    /// created (`cpuid=pinned`), kept across resets and checkpoints.
    pub cpuid: crate::cpuid::Profile,
    /// The vCPU the scheduler looks at first next time (round-robin).
    pub next_vcpu: usize,
    /// vCPUs (bit i: vCPU i) sent an IPI while they were not running: the
    /// scheduler runs them before the round-robin's next, so that the
    /// sender cannot send the same vector again before they take it (two
    /// would meet in one IRR bit). A hint, not saved state.
    pub ipi_waiting: u32,
    pub res: Option<Resources<B>>,
}

impl<B: Backend> Vm<B> {
    /// The guest's CPUID answer for `leaf`/`subleaf` under `profile` (a
    /// VM's; a function of the field so exit handlers may hold its vCPU),
    /// before the vCPU's own fields ([`crate::cpuid::vcpu_fields`]).
    pub fn cpuid_answer(profile: &crate::cpuid::Profile, backend: &B, leaf: u32, subleaf: u32) -> crate::cpuid::Regs {
        profile.answer(leaf, subleaf, || {
            crate::cpuid::guest_cpuid(leaf, subleaf, backend.host_cpuid(leaf, subleaf), backend.quirks())
        })
    }

    /// Up to `len` bytes at guest-virtual `gva` (through the guest's page
    /// tables), for reports; stops at the first unreadable byte.
    pub fn read_virt(&self, backend: &mut B, gva: u64, len: usize) -> Vec<u8> {
        let Some(res) = &self.res else {
            return Vec::new();
        };
        let state = res.vcpu_ref().state();
        let mem = backend.mem();
        // `peek` never faults pages in: a report must not change the VM.
        let read64 = |gpa: u64| {
            let mut b = [0u8; 8];
            res.mem.peek(&*mem, GuestPhysAddr(gpa), &mut b).ok().map(|_| u64::from_le_bytes(b))
        };
        let mut out = Vec::with_capacity(len);
        for i in 0..len as u64 {
            let Some(gpa) = walk::translate(&state, gva.wrapping_add(i), read64) else {
                break;
            };
            let mut b = [0u8; 1];
            if res.mem.peek(&*mem, GuestPhysAddr(gpa), &mut b).is_err() {
                break;
            }
            out.push(b[0]);
        }
        out
    }
}
