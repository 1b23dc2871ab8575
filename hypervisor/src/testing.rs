//! A backend for host tests: simulated physical memory (`mm::sim`), a
//! controllable clock, and vCPUs that replay scripted exits. With it the VM
//! manager, exit handling and console run end to end in `cargo test`.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::Cell;
use mm::paging::{Ept, FlushScope, PageSize};
use mm::sim::SimPhys;
use vcpu::events::{self, Blocking, Windows};
use vcpu::{Event, Gprs, GuestState, Reg, Vcpu, VmExit};

use crate::backend::Backend;
use crate::cpuid::{HostQuirks, Regs};
use crate::vm::exit::Console;

/// One scripted exit: it may change registers first (as the guest would
/// have before exiting).
pub type Step = Box<dyn FnMut(&mut MockVcpu) -> VmExit>;

/// A step that changes the vCPU (registers, RFLAGS) then exits.
pub fn step(f: impl Fn(&mut MockVcpu) + 'static, exit: VmExit) -> Step {
    Box::new(move |v| {
        f(v);
        exit.clone()
    })
}

/// A manager on the mock (4096 pages) with one guest image, `tiny`: 32
/// NOPs, whose exits the vCPUs' scripts decide.
pub fn tiny_manager() -> crate::manager::Manager<MockBackend> {
    let images = alloc::vec![crate::manager::GuestImage { name: "tiny".into(), bytes: elf_guest(&[0x90; 32]) }];
    crate::manager::Manager::new(Ok(MockBackend::new(4096)), images)
}

/// A vCPU whose guest is a script. Its state is a `GuestState`; events go
/// through the same queue and entry plan as on the backends
/// (`vcpu::events`): before each step, the event the guest can take is
/// "delivered" (recorded in `delivered`), and an open window that was armed
/// ends the run as `InterruptWindow`/`NmiWindow` instead of the step, as
/// VT-x's window exits do.
pub struct MockVcpu {
    pub script: VecDeque<Step>,
    pub gprs: Gprs,
    pub state: GuestState,
    pub rflags: u64,
    pub cpl: u8,
    /// Every event `inject` was given, in order.
    pub injected: Vec<Event>,
    /// Events that went into the guest, in delivery order.
    pub delivered: Vec<Event>,
    pub want: Windows,
    pub skipped: u32,
    pub loaded: bool,
    pub slice: u64,
    pub runs: u32,
    /// Times `release` was called (the scheduler lets another CPU load it).
    pub releases: u32,
    /// Times its cached nested translations were flushed.
    pub nested_flushes: u32,
    /// Changes what `state` returns (tests of the conformance check).
    pub state_filter: Option<fn(&mut GuestState)>,
    /// Changes the state at `put`, as a CPU's save can (same tests).
    pub put_filter: Option<fn(&mut GuestState)>,
}

impl MockVcpu {
    pub fn new(state: &GuestState) -> MockVcpu {
        MockVcpu {
            script: VecDeque::new(),
            gprs: state.gprs,
            state: state.clone(),
            rflags: state.rflags,
            cpl: 0,
            injected: Vec::new(),
            delivered: Vec::new(),
            want: Windows::default(),
            skipped: 0,
            loaded: false,
            slice: 0,
            runs: 0,
            releases: 0,
            nested_flushes: 0,
            state_filter: None,
            put_filter: None,
        }
    }

    fn blocking(&self) -> Blocking {
        GuestState { rflags: self.rflags, ..self.state.clone() }.blocking()
    }
}

impl Vcpu for MockVcpu {
    fn run(&mut self) -> VmExit {
        assert!(self.loaded, "run without load");
        self.runs += 1;
        let blocked = self.blocking();
        let s = &mut self.state;
        let plan = events::plan_entry(&mut s.injected_event, &mut s.pending_events, blocked, self.want);
        if let Some(e) = plan.event {
            self.delivered.push(e);
            if e == Event::Nmi {
                self.state.nmi_blocked = true;
            }
        } else if plan.windows.interrupt && !blocked.interrupt {
            self.want.interrupt = false;
            return VmExit::InterruptWindow;
        } else if plan.windows.nmi && !blocked.nmi {
            self.want.nmi = false;
            return VmExit::NmiWindow;
        }
        match self.script.pop_front() {
            Some(mut step) => step(self),
            // Out of script: behave like a guest spinning without exits.
            None => VmExit::Preempted,
        }
    }
    fn gprs(&self) -> &Gprs {
        &self.gprs
    }
    fn gprs_mut(&mut self) -> &mut Gprs {
        &mut self.gprs
    }
    fn rip(&self) -> u64 {
        self.state.rip
    }
    fn rflags(&self) -> u64 {
        self.rflags
    }
    fn cpl(&self) -> u8 {
        self.cpl
    }
    fn complete_emulated(&mut self, rip: u64, rflags: u64) {
        self.state.rip = rip;
        self.rflags = rflags;
        self.state.interrupt_shadow = false;
    }
    fn skip_instruction(&mut self) {
        self.skipped += 1;
        self.state.rip += 2;
        self.state.interrupt_shadow = false;
    }
    fn state(&self) -> GuestState {
        let mut s = GuestState { gprs: self.gprs, rflags: self.rflags, ..self.state.clone() };
        if let Some(f) = self.state_filter {
            f(&mut s);
        }
        s
    }
    fn set_state(&mut self, s: &GuestState) -> Result<(), vcpu::Error> {
        s.check_neutral(0xffff).map_err(vcpu::Error::InvalidState)?;
        self.state = s.clone();
        self.gprs = s.gprs;
        self.rflags = s.rflags;
        Ok(())
    }
    fn reg(&self, r: Reg) -> u64 {
        let s = &self.state;
        match r {
            Reg::Cr0 => s.cr0,
            Reg::Cr3 => s.cr3,
            Reg::Cr4 => s.cr4,
            Reg::Cr8 => s.cr8,
            Reg::Dr0 => s.dr[0],
            Reg::Dr1 => s.dr[1],
            Reg::Dr2 => s.dr[2],
            Reg::Dr3 => s.dr[3],
            Reg::Dr6 => s.dr6,
            Reg::Dr7 => s.dr7,
            Reg::Efer => s.efer,
            Reg::Xcr0 => s.xcr0,
            Reg::TscOffset => s.tsc_offset,
        }
    }
    fn set_reg(&mut self, r: Reg, v: u64) {
        let s = &mut self.state;
        match r {
            Reg::Cr0 => s.cr0 = v,
            Reg::Cr3 => s.cr3 = v,
            Reg::Cr4 => s.cr4 = v,
            Reg::Cr8 => s.cr8 = v,
            Reg::Dr0 => s.dr[0] = v,
            Reg::Dr1 => s.dr[1] = v,
            Reg::Dr2 => s.dr[2] = v,
            Reg::Dr3 => s.dr[3] = v,
            Reg::Dr6 => s.dr6 = v,
            Reg::Dr7 => s.dr7 = v,
            Reg::Efer => s.efer = v,
            Reg::Xcr0 => s.xcr0 = v,
            Reg::TscOffset => s.tsc_offset = v,
        }
    }
    fn inject(&mut self, e: Event) {
        self.injected.push(e);
        self.state.pending_events.push(e);
    }
    fn request_interrupt_window(&mut self) {
        self.want.interrupt = true;
    }
    fn interrupt_window_open(&self) -> bool {
        !self.blocking().interrupt && self.state.injected_event.is_none() && self.state.pending_events.is_empty()
    }
    fn request_nmi_window(&mut self) {
        self.want.nmi = true;
    }
    fn nmi_window_open(&self) -> bool {
        !self.blocking().nmi && self.state.injected_event.is_none() && !self.state.pending_events.has_nmi()
    }
    fn set_time_slice(&mut self, ticks: u64) {
        self.slice = ticks;
    }
    fn overhead_bytes(&self) -> u64 {
        4096
    }
    fn load(&mut self) {
        self.loaded = true;
    }
    fn put(&mut self) {
        self.loaded = false;
        if let Some(f) = self.put_filter {
            f(&mut self.state);
        }
    }
    fn release(&mut self) {
        assert!(!self.loaded, "release while loaded");
        self.releases += 1;
    }
    fn flush_nested_tlb(&mut self, _: FlushScope) {
        self.nested_flushes += 1;
    }
}

pub struct MockBackend {
    pub mem: SimPhys,
    /// Scripts for the next vCPUs created, in order.
    pub scripts: VecDeque<Vec<Step>>,
    pub created: u32,
    pub destroyed: u32,
    /// The clock: advances by `tick` on every read.
    pub clock: Cell<u64>,
    /// `halt_until` calls (a halted sibling waiting on this CPU).
    pub halts: Cell<u64>,
    pub tick: u64,
    /// What `heap_free` answers (tests of the heap-room check).
    pub heap_free: u64,
    /// Given to the vCPUs it creates (see `MockVcpu::state_filter` and
    /// `put_filter`).
    pub state_filter: Option<fn(&mut GuestState)>,
    pub put_filter: Option<fn(&mut GuestState)>,
    /// The host's CPUID ([`intel_host_cpuid`] unless a test moves the VM
    /// to another host).
    pub cpuid: fn(u32, u32) -> Regs,
    /// Free bytes per NUMA node (`free_bytes_on`), and every node
    /// `prefer_node` was given, in order.
    pub node_free: Vec<(u32, u64)>,
    pub preferred: core::cell::RefCell<Vec<Option<u32>>>,
}

/// A plausible Intel host: VMX in leaf 1, max leaf 0x16.
pub fn intel_host_cpuid(leaf: u32, subleaf: u32) -> Regs {
    match leaf {
        0 => Regs { eax: 0x16, ebx: 0x756e_6547, ecx: 0x6c65_746e, edx: 0x4965_6e69 },
        1 => Regs { eax: 0x806c1, ebx: 0x0010_0800, ecx: 0x7ffa_fbbf, edx: 0xbfeb_fbff },
        // XSAVE with x87, SSE and AVX.
        0xd if subleaf == 0 => Regs { eax: 7, ebx: 576, ecx: 832, edx: 0 },
        _ => Regs::default(),
    }
}

impl MockBackend {
    pub fn new(frames: usize) -> MockBackend {
        MockBackend {
            mem: SimPhys::new(frames),
            scripts: VecDeque::new(),
            created: 0,
            destroyed: 0,
            clock: Cell::new(0),
            halts: Cell::new(0),
            tick: 10,
            heap_free: 64 << 20,
            state_filter: None,
            put_filter: None,
            cpuid: intel_host_cpuid,
            node_free: Vec::new(),
            preferred: core::cell::RefCell::new(Vec::new()),
        }
    }
}

impl MockBackend {
    /// Another CPU of the same host: its own clock, the same physical
    /// memory (a view that allocates nothing).
    ///
    /// # Safety
    /// `self` outlives the one returned.
    pub unsafe fn beside(&self) -> MockBackend {
        let mut other = MockBackend::new(1);
        // SAFETY: the caller's contract.
        other.mem = unsafe { self.mem.view() };
        other
    }
}

impl Backend for MockBackend {
    type Format = Ept;
    type Vcpu = MockVcpu;
    type Mem = SimPhys;

    fn name(&self) -> &'static str {
        "mock"
    }
    fn features(&self) -> Vec<String> {
        alloc::vec![String::from("scripted")]
    }
    fn mem(&mut self) -> &mut SimPhys {
        &mut self.mem
    }
    fn max_page_size(&self) -> PageSize {
        PageSize::Size2M
    }
    fn heap_free(&self) -> u64 {
        self.heap_free
    }
    fn free_frames(&self) -> u64 {
        (self.mem.frame_count() - self.mem.frames_in_use()) as u64
    }
    fn create_vcpu(&mut self, _root: mm::HostPhysAddr, state: &GuestState) -> Result<MockVcpu, vcpu::Error> {
        self.created += 1;
        let script = self.scripts.pop_front().unwrap_or_default();
        let mut v = MockVcpu::new(state);
        v.script = script.into();
        v.state_filter = self.state_filter;
        v.put_filter = self.put_filter;
        Ok(v)
    }
    fn destroy_vcpu(&mut self, _v: MockVcpu) {
        self.destroyed += 1;
    }
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> Regs {
        (self.cpuid)(leaf, subleaf)
    }
    fn quirks(&self) -> HostQuirks {
        HostQuirks::default()
    }
    fn now(&self) -> u64 {
        let t = self.clock.get() + self.tick;
        self.clock.set(t);
        t
    }
    fn tsc_hz(&self) -> u64 {
        1_000_000
    }
    fn free_bytes_on(&self, node: u32) -> u64 {
        self.node_free.iter().find(|(n, _)| *n == node).map_or(0, |(_, b)| *b)
    }
    fn prefer_node(&mut self, node: Option<u32>) {
        self.preferred.borrow_mut().push(node);
    }
    /// Nothing can interrupt a stand-in CPU: it sleeps to `until`.
    fn halt_until(&self, until: u64) {
        self.halts.set(self.halts.get() + 1);
        self.clock.set(self.clock.get().max(until));
    }
}

/// A console that records lines.
#[derive(Default)]
pub struct Lines(pub Vec<String>);

impl Console for Lines {
    fn line(&mut self, text: &str) {
        self.0.push(String::from(text));
    }
}

impl Lines {
    pub fn text(&self) -> String {
        self.0.join("\n")
    }
}

/// A minimal ELF64 guest image: `code` at 1 MiB, entry there.
pub fn elf_guest(code: &[u8]) -> &'static [u8] {
    use crate::loader::testutil::{Seg, elf64};
    Box::leak(elf64(0x10_0000, &[Seg::text(0x10_0000, code)]).into_boxed_slice())
}
