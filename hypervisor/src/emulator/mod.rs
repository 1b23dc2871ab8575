//! The instruction emulator for MMIO: when a guest touches a guest-physical
//! page that belongs to a device, the CPU exits with the address but not the
//! value or the destination, so the faulting instruction is fetched,
//! decoded (`iced-x86`) and carried out here, against a device instead of
//! memory. String port I/O (INS/OUTS, [`string_io`]) is decoded and
//! carried out here too: its exit names the port but not the memory
//! operand.
//!
//! Everything the emulator touches goes through [`Platform`]: registers,
//! the guest's page tables, guest RAM and the device bus. The exit handler
//! implements it over the vCPU, `mm` and the MMIO bus; the tests implement
//! it over a few pages of fake memory and a fake device (`fuzzing::Mock`).
//!
//! # How the exit handler uses it
//!
//! At boot, [`warm_up`] builds the decoder's tables. Then on
//! `VmExit::NestedPageFault { gpa, access, gva }` for an address that no
//! RAM backs but a device claims:
//!
//! 1. `emulate(&mut platform, &MmioFault { gpa, access, gva })`;
//! 2. `Ok(done)`: the instruction ran (RIP advanced by its length) or, for a
//!    REP string instruction, ran until it left the device page or used up
//!    its budget of iterations (`done.completed` false, RIP left on it, so
//!    the guest re-executes it for the rest, as after an interrupt between
//!    iterations). When it completed, the handler drops the interrupt
//!    shadow (STI/MOV SS blocking ends with the instruction) and, if
//!    RFLAGS.TF was set before, injects the single-step #DB (DR6.BS);
//! 3. `Err(e)`: nothing changed. `e.fault()` is the exception hardware would
//!    raise (inject it; for #PF also set CR2 to the address in the error),
//!    or `None`: stop the VM with `e` as the report.
//!
//! What the emulator does not check: segment limits and types in 16- and
//! 32-bit modes (the CPU checked them before the access exited; a guest
//! that rewrites the instruction in between only hurts itself), alignment
//! checks (#AC) and data breakpoints.

mod decode;
mod error;
mod exec;
pub mod flags;
#[doc(hidden)]
pub mod fuzzing;
mod port_string;
#[cfg(test)]
mod tests;

pub use error::Error;
pub use iced_x86::Mnemonic;
pub use port_string::{PortExit, Ports, string_io};
use vcpu::state::bits::{CR0_PE, EFER_LMA};
use vcpu::{Gprs, GuestState, MemAccess, SegAttrs};

/// How the CPU decodes and addresses: the default operand and address size
/// (SDM Vol. 1 3.6; Vol. 3A 5.2.1 for the CS.L/CS.D rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Real-address mode, virtual-8086 mode or a 16-bit code segment.
    Bits16,
    /// A 32-bit code segment, in protected or compatibility mode.
    Bits32,
    /// 64-bit mode: IA-32e with CS.L = 1. Only FS and GS have bases.
    Bits64,
}

impl Mode {
    /// The mode from CR0.PE, EFER.LMA, CS's attributes and RFLAGS.VM.
    pub fn from_parts(cr0: u64, efer: u64, cs: SegAttrs, rflags: u64) -> Mode {
        const RFLAGS_VM: u64 = 1 << 17;
        if cr0 & CR0_PE == 0 || (efer & EFER_LMA == 0 && rflags & RFLAGS_VM != 0) {
            Mode::Bits16
        } else if efer & EFER_LMA != 0 && cs.long() {
            Mode::Bits64
        } else if cs.db() {
            Mode::Bits32
        } else {
            Mode::Bits16
        }
    }

    pub fn of(s: &GuestState) -> Mode {
        Mode::from_parts(s.cr0, s.efer, s.cs.attrs, s.rflags)
    }

    fn bits(self) -> u32 {
        match self {
            Mode::Bits16 => 16,
            Mode::Bits32 => 32,
            Mode::Bits64 => 64,
        }
    }
}

/// A segment register, as an instruction names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seg {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
}

impl Seg {
    /// The segment's base in a vCPU's state at an exit.
    pub fn base_in(self, s: &GuestState) -> u64 {
        match self {
            Seg::Es => s.es.base,
            Seg::Cs => s.cs.base,
            Seg::Ss => s.ss.base,
            Seg::Ds => s.ds.base,
            Seg::Fs => s.fs.base,
            Seg::Gs => s.gs.base,
        }
    }
}

/// The failed translation of a guest-virtual address: the #PF error code
/// (P, W/R, U/S, RSVD, I/D; SDM Vol. 3A 4.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFaultCode(pub u32);

/// What the emulator needs from the vCPU, the guest's memory and the
/// device bus. Registers are read at the exit and written back by the
/// caller (or live in the vCPU); nothing here may fail except translation.
pub trait Platform {
    fn gprs(&self) -> &Gprs;
    fn gprs_mut(&mut self) -> &mut Gprs;
    fn rip(&self) -> u64;
    fn set_rip(&mut self, rip: u64);
    fn rflags(&self) -> u64;
    fn set_rflags(&mut self, rflags: u64);
    fn mode(&self) -> Mode;
    /// The segment's base address (in 64-bit mode only FS and GS are used).
    fn segment_base(&self, seg: Seg) -> u64;
    /// The guest-physical address of a guest-virtual (linear) one, through
    /// the guest's page tables, checking the permissions `access` needs at
    /// the current privilege level (`Execute` for instruction fetches).
    fn translate(&mut self, gva: u64, access: MemAccess) -> Result<u64, PageFaultCode>;
    /// Reads guest RAM or ROM; `false` if any byte is not guest memory.
    fn read_ram(&mut self, gpa: u64, buf: &mut [u8]) -> bool;
    /// Writes guest RAM (writes to ROM are dropped); `false` if any byte is
    /// not guest memory.
    fn write_ram(&mut self, gpa: u64, data: &[u8]) -> bool;
    /// A device read of 1, 2, 4 or 8 bytes (all ones where nothing answers).
    fn mmio_read(&mut self, gpa: u64, size: u8) -> u64;
    /// A device write of the low `size` bytes of `value`.
    fn mmio_write(&mut self, gpa: u64, size: u8, value: u64);
}

/// The exit being handled: the guest-physical address that faulted, how it
/// was accessed, and the linear address when the CPU reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioFault {
    pub gpa: u64,
    pub access: MemAccess,
    pub gva: Option<u64>,
}

/// An emulated instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Emulated {
    /// Its length in bytes (1..=15).
    pub len: u8,
    /// False only for a REP string instruction stopped before its count ran
    /// out (it left the device page): RIP still points at it.
    pub completed: bool,
}

/// Decodes the instruction at RIP and carries it out, its MMIO access going
/// to the device through `p`. See the module documentation for what the
/// caller does with the result.
pub fn emulate<P: Platform>(p: &mut P, fault: &MmioFault) -> Result<Emulated, Error> {
    if fault.access == MemAccess::Execute {
        return Err(Error::FetchFromMmio);
    }
    let mode = p.mode();
    let insn = decode::fetch_and_decode(p, mode)?;
    exec::execute(p, mode, &insn, fault)
}

/// Builds the decoder's tables, which iced-x86 does on first use (measured
/// on the host: about 80 KiB of heap in some 2000 allocations, 0.1 ms), so
/// that the first MMIO exit does not pay for it. Call once at boot.
pub fn warm_up() {
    decode::warm_up();
}

/// The page number of an address (4 KiB pages: MMIO is mapped and checked
/// at this granularity whatever page size the guest uses).
fn page(a: u64) -> u64 {
    a >> 12
}

/// The bits of a linear address in this mode: outside 64-bit mode linear
/// addresses are 32 bits wide and wrap (SDM Vol. 3A 3.4).
fn linear_mask(mode: Mode) -> u64 {
    if mode == Mode::Bits64 { u64::MAX } else { 0xffff_ffff }
}

/// Whether a 64-bit linear address is canonical for 4-level paging: bits
/// 63..47 all equal (SDM Vol. 1 3.3.7.1). Guests with 5-level paging are
/// not supported (neither is their page walk, `vcpu::walk`).
fn canonical(la: u64) -> bool {
    ((la as i64) << 16 >> 16) as u64 == la
}
