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
use vcpu::{Event, Gprs, GuestState, Vcpu, VmExit};

use crate::backend::Backend;
use crate::cpuid::{HostQuirks, Regs};
use crate::vm::exit::Console;

/// One scripted exit: it may change registers first (as the guest would
/// have before exiting).
pub type Step = Box<dyn FnMut(&mut MockVcpu) -> VmExit>;

pub struct MockVcpu {
    pub script: VecDeque<Step>,
    pub gprs: Gprs,
    pub state: GuestState,
    pub rflags: u64,
    pub cpl: u8,
    pub injected: Vec<Event>,
    pub skipped: u32,
    pub loaded: bool,
    pub slice: u64,
    pub runs: u32,
}

impl Vcpu for MockVcpu {
    fn run(&mut self) -> VmExit {
        assert!(self.loaded, "run without load");
        self.runs += 1;
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
    fn skip_instruction(&mut self) {
        self.skipped += 1;
        self.state.rip += 2;
    }
    fn state(&self) -> GuestState {
        GuestState { gprs: self.gprs, ..self.state.clone() }
    }
    fn set_state(&mut self, s: &GuestState) -> Result<(), vcpu::Error> {
        self.state = s.clone();
        self.gprs = s.gprs;
        Ok(())
    }
    fn inject(&mut self, e: Event) {
        self.injected.push(e);
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
    }
    fn flush_nested_tlb(&mut self, _: FlushScope) {}
}

pub struct MockBackend {
    pub mem: SimPhys,
    /// Scripts for the next vCPUs created, in order.
    pub scripts: VecDeque<Vec<Step>>,
    pub created: u32,
    pub destroyed: u32,
    /// The clock: advances by `tick` on every read.
    pub clock: Cell<u64>,
    pub tick: u64,
    /// What `heap_free` answers (tests of the heap-room check).
    pub heap_free: u64,
}

impl MockBackend {
    pub fn new(frames: usize) -> MockBackend {
        MockBackend {
            mem: SimPhys::new(frames),
            scripts: VecDeque::new(),
            created: 0,
            destroyed: 0,
            clock: Cell::new(0),
            tick: 10,
            heap_free: 64 << 20,
        }
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
    fn create_vcpu(&mut self, _root: mm::HostPhysAddr, state: &GuestState) -> Result<MockVcpu, vcpu::Error> {
        self.created += 1;
        let script = self.scripts.pop_front().unwrap_or_default();
        Ok(MockVcpu {
            script: script.into(),
            gprs: state.gprs,
            state: state.clone(),
            rflags: state.rflags,
            cpl: 0,
            injected: Vec::new(),
            skipped: 0,
            loaded: false,
            slice: 0,
            runs: 0,
        })
    }
    fn destroy_vcpu(&mut self, _v: MockVcpu) {
        self.destroyed += 1;
    }
    fn host_cpuid(&self, leaf: u32, _subleaf: u32) -> Regs {
        // A plausible Intel host: VMX in leaf 1, max leaf 0x16.
        match leaf {
            0 => Regs { eax: 0x16, ebx: 0x756e_6547, ecx: 0x6c65_746e, edx: 0x4965_6e69 },
            1 => Regs { eax: 0x806c1, ebx: 0x0010_0800, ecx: 0x7ffa_fbbf, edx: 0xbfeb_fbff },
            _ => Regs::default(),
        }
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
