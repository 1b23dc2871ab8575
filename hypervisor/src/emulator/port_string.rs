//! INS and OUTS: port I/O to or from guest memory (SDM Vol. 2A INS/INSB/
//! INSW/INSD, Vol. 2B OUTS/OUTSB/OUTSW/OUTSD). The port exit names the
//! port, the width and the direction but not the memory operand, so the
//! instruction is decoded here for its address size, segment and REP
//! prefix, and carried out over guest memory and the port bus.
//!
//! Each iteration checks its memory operand (translation, RAM) before its
//! port access, because a port read can have side effects (a UART's
//! receive buffer): a refusal on the first iteration leaves the guest and
//! the devices as they were. Memory that is not RAM (a device page) is
//! refused: no device here is a DMA target for string I/O.

use iced_x86::{Instruction, Mnemonic, OpKind};
use vcpu::MemAccess;

use super::exec::{Gpr, REP_BUDGET, linear, seg_of};
use super::flags::{DF, RF, mask};
use super::{Emulated, Error, Mode, Platform, Seg, canonical, linear_mask};

/// The port side of a string I/O instruction.
pub trait Ports {
    /// A read of `size` (1, 2 or 4) bytes from `port`.
    fn port_read(&mut self, port: u16, size: u8) -> u32;
    /// A write of the low `size` bytes of `value` to `port`; `false` if the
    /// write ended the run (the VM powered off, exited or reset): the
    /// instruction stops after this iteration.
    fn port_write(&mut self, port: u16, size: u8, value: u32) -> bool;
}

/// The port exit being handled, as the CPU reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortExit {
    pub port: u16,
    /// 1, 2 or 4.
    pub size: u8,
    /// OUTS (true) or INS.
    pub write: bool,
}

/// Decodes the INS/OUTS at RIP and carries it out: at most [`REP_BUDGET`]
/// iterations, stopping early (RIP left on the instruction, registers
/// updated, `completed` false) where a later iteration would fault, so the
/// guest re-executes it and takes the fault then, as on hardware.
pub fn string_io<P: Platform + Ports>(p: &mut P, exit: &PortExit) -> Result<Emulated, Error> {
    let mode = p.mode();
    let i = super::decode::fetch_and_decode(p, mode)?;
    run(p, mode, &i, exit)
}

fn run<P: Platform + Ports>(p: &mut P, mode: Mode, i: &Instruction, exit: &PortExit) -> Result<Emulated, Error> {
    let (write, size) = match i.mnemonic() {
        Mnemonic::Insb => (false, 1),
        Mnemonic::Insw => (false, 2),
        Mnemonic::Insd => (false, 4),
        Mnemonic::Outsb => (true, 1),
        Mnemonic::Outsw => (true, 2),
        Mnemonic::Outsd => (true, 4),
        _ => return Err(Error::NotThePortExit),
    };
    let port = p.gprs().rdx as u16;
    if write != exit.write || size != exit.size || port != exit.port {
        return Err(Error::NotThePortExit);
    }
    let mnemonic = i.mnemonic();
    let unsupported = Error::UnsupportedOperand { mnemonic };
    // The memory operand: ES:rDI for INS (no override), seg:rSI for OUTS.
    let n = if write { 1 } else { 0 };
    let (asize, reg) = match i.op_kind(n) {
        OpKind::MemoryESDI => (2, 7),
        OpKind::MemoryESEDI => (4, 7),
        OpKind::MemoryESRDI => (8, 7),
        OpKind::MemorySegSI => (2, 6),
        OpKind::MemorySegESI => (4, 6),
        OpKind::MemorySegRSI => (8, 6),
        _ => return Err(unsupported),
    };
    let seg = if write { seg_of(i.memory_segment()).ok_or(unsupported)? } else { Seg::Es };
    let (rcx, index) = (Gpr::with_size(1, asize), Gpr::with_size(reg, asize));
    let rep = i.has_rep_prefix() || i.has_repne_prefix();
    let count = if rep { rcx.read(p) } else { 1 };
    let step = if p.rflags() & DF != 0 { u64::from(size).wrapping_neg() } else { u64::from(size) };
    let access = if write { MemAccess::Read } else { MemAccess::Write };

    let mut done = 0;
    while done < count && done < REP_BUDGET {
        let target = operand(p, mode, seg, index.read(p), size, access);
        let (gpas, first) = match target {
            Ok(t) => t,
            Err(e) if done == 0 => return Err(e),
            Err(_) => break,
        };
        let mut bytes = [0u8; 4];
        let (lo, hi) = bytes[..usize::from(size)].split_at_mut(first);
        let go_on = if write {
            let _ = p.read_ram(gpas[0], lo) && (hi.is_empty() || p.read_ram(gpas[1], hi));
            p.port_write(port, size, u32::from_le_bytes(bytes))
        } else {
            let v = p.port_read(port, size) & mask(size) as u32;
            bytes = v.to_le_bytes();
            let (lo, hi) = bytes[..usize::from(size)].split_at(first);
            // `operand` checked both pieces are RAM; ROM drops the write.
            if p.write_ram(gpas[0], lo) && !hi.is_empty() {
                p.write_ram(gpas[1], hi);
            }
            true
        };
        index.write(p, index.read(p).wrapping_add(step));
        if rep {
            rcx.write(p, rcx.read(p).wrapping_sub(1));
        }
        done += 1;
        if !go_on {
            break;
        }
    }
    if done == count {
        let ip_mask = match mode {
            Mode::Bits16 => 0xffff,
            Mode::Bits32 => 0xffff_ffff,
            Mode::Bits64 => u64::MAX,
        };
        let len = i.len() as u8;
        p.set_rip(p.rip().wrapping_add(u64::from(len)) & ip_mask);
        p.set_rflags(p.rflags() & !RF);
        return Ok(Emulated { len, completed: true });
    }
    // Between iterations: RF keeps an instruction breakpoint on it from
    // firing again when the guest re-executes it (SDM Vol. 3B 17.3.1.1).
    p.set_rflags(p.rflags() | RF);
    Ok(Emulated { len: i.len() as u8, completed: false })
}

/// Translates the memory operand at `seg:offset` (one or two pieces, the
/// access may cross a page) and checks both are RAM. Returns the
/// guest-physical addresses and the length of the first piece.
fn operand<P: Platform>(
    p: &mut P,
    mode: Mode,
    seg: Seg,
    offset: u64,
    size: u8,
    access: MemAccess,
) -> Result<([u64; 2], usize), Error> {
    let la = linear(p, mode, seg, offset)?;
    let gpa = p.translate(la, access).map_err(|c| Error::PageFault { gva: la, error_code: c.0 })?;
    let first = (4096 - (la & 0xfff)).min(u64::from(size)) as usize;
    let mut gpas = [gpa, 0];
    if first < usize::from(size) {
        let la2 = la.wrapping_add(first as u64) & linear_mask(mode);
        if mode == Mode::Bits64 && !canonical(la2) {
            return Err(Error::NonCanonical { stack: false });
        }
        gpas[1] = p.translate(la2, access).map_err(|c| Error::PageFault { gva: la2, error_code: c.0 })?;
    }
    let mut probe = [0u8; 4];
    let (lo, hi) = probe[..usize::from(size)].split_at_mut(first);
    if !p.read_ram(gpas[0], lo) {
        return Err(Error::NotRam { gpa: gpas[0] });
    }
    if !hi.is_empty() && !p.read_ram(gpas[1], hi) {
        return Err(Error::NotRam { gpa: gpas[1] });
    }
    Ok((gpas, first))
}
