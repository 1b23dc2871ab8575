//! Carrying out a decoded instruction whose memory operand is the device.
//!
//! Every instruction is checked completely (operands, addresses,
//! translations, the match with the exit) before its first device access,
//! because a device read can have side effects: a refusal leaves the guest
//! and the device as they were.

use iced_x86::{Instruction, MemorySize, Mnemonic, OpKind, Register};
use vcpu::MemAccess;

use super::flags::{self, CF, DF, RF, STATUS, mask};
use super::{Emulated, Error, MmioFault, Mode, Platform, Seg, canonical, linear_mask, page};

/// At most this many iterations of a REP string instruction per exit, so a
/// guest cannot hold the CPU with a huge count; the guest re-executes the
/// instruction for the rest (as after an interrupt between iterations).
pub const REP_BUDGET: u64 = 4096;

pub fn execute<P: Platform>(p: &mut P, mode: Mode, i: &Instruction, fault: &MmioFault) -> Result<Emulated, Error> {
    let mnemonic = i.mnemonic();
    if (0..i.op_count()).any(|n| is_string_operand(i.op_kind(n))) {
        return string(p, mode, i, fault);
    }
    if !(0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory) {
        return Err(Error::NotTheFaultingAccess);
    }
    // XCHG is locked with or without the prefix (SDM Vol. 2B XCHG) and is
    // run as a read then a write; guests use it on MMIO as a store (Linux's
    // xAPIC writes on CPUs with the 11AP erratum). Any other locked
    // instruction is a read-modify-write that would lose its atomicity.
    if i.has_lock_prefix() && mnemonic != Mnemonic::Xchg {
        return Err(Error::Locked);
    }
    let cx = Cx { mode, i, fault, mnemonic };
    match mnemonic {
        Mnemonic::Mov | Mnemonic::Movnti => cx.mov(p),
        Mnemonic::Movzx => cx.load_extended(p, false),
        Mnemonic::Movsx | Mnemonic::Movsxd => cx.load_extended(p, true),
        Mnemonic::Add
        | Mnemonic::Or
        | Mnemonic::Adc
        | Mnemonic::Sbb
        | Mnemonic::And
        | Mnemonic::Sub
        | Mnemonic::Xor
        | Mnemonic::Cmp
        | Mnemonic::Test => cx.binary(p),
        Mnemonic::Inc | Mnemonic::Dec | Mnemonic::Not | Mnemonic::Neg => cx.unary(p),
        Mnemonic::Xchg => cx.xchg(p),
        Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc => cx.bit_test(p),
        _ => Err(Error::NotEmulated { mnemonic }),
    }
}

/// A general-purpose register operand: its number in ModRM order, its
/// width in bytes, and whether it is AH, CH, DH or BH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpr {
    num: u8,
    size: u8,
    high: bool,
}

// iced numbers the GPRs in four runs in ModRM order: AL..BH, SPL..R15L (20
// byte registers), then 16 each of words, dwords and qwords.
const _: () = assert!(Register::R15L as u32 == Register::AL as u32 + 19);
const _: () = assert!(Register::AX as u32 == Register::AL as u32 + 20);
const _: () = assert!(Register::EAX as u32 == Register::AX as u32 + 16);
const _: () = assert!(Register::RAX as u32 == Register::EAX as u32 + 16);
const _: () = assert!(Register::R15 as u32 == Register::RAX as u32 + 15);

impl Gpr {
    const RAX: Gpr = Gpr { num: 0, size: 8, high: false };

    pub(super) fn of(r: Register) -> Option<Gpr> {
        let v = r as u32;
        let al = Register::AL as u32;
        let ax = Register::AX as u32;
        if v < al || v > Register::R15 as u32 {
            return None;
        }
        if v < ax {
            // AL, CL, DL, BL; AH, CH, DH, BH (without REX); SPL.. R15L.
            let n = (v - al) as u8;
            return Some(match n {
                0..=3 => Gpr { num: n, size: 1, high: false },
                4..=7 => Gpr { num: n - 4, size: 1, high: true },
                _ => Gpr { num: n - 4, size: 1, high: false },
            });
        }
        let n = v - ax;
        Some(Gpr { num: (n % 16) as u8, size: [2, 4, 8][(n / 16) as usize], high: false })
    }

    pub(super) fn num(self) -> u8 {
        self.num
    }

    pub(super) fn with_size(num: u8, size: u8) -> Gpr {
        Gpr { num, size, high: false }
    }

    pub(super) fn read<P: Platform>(self, p: &P) -> u64 {
        let v = p.gprs().get(self.num);
        if self.high { (v >> 8) & 0xff } else { v & mask(self.size) }
    }

    /// Writes the low `size` bytes. A 32-bit write zero-extends into the
    /// whole register, 8- and 16-bit writes keep the rest (SDM Vol. 1
    /// 3.4.1.1).
    pub(super) fn write<P: Platform>(self, p: &mut P, value: u64) {
        let old = p.gprs().get(self.num);
        let new = match (self.size, self.high) {
            (1, true) => (old & !0xff00) | ((value & 0xff) << 8),
            (4, _) => value & 0xffff_ffff,
            (8, _) => value,
            (size, _) => (old & !mask(size)) | (value & mask(size)),
        };
        p.gprs_mut().set(self.num, new);
    }
}

pub(super) fn seg_of(r: Register) -> Option<Seg> {
    Some(match r {
        Register::ES => Seg::Es,
        Register::CS => Seg::Cs,
        Register::SS => Seg::Ss,
        Register::DS => Seg::Ds,
        Register::FS => Seg::Fs,
        Register::GS => Seg::Gs,
        _ => return None,
    })
}

/// The integer memory sizes the emulator moves; anything else (vectors,
/// x87, far pointers, descriptor tables) is refused.
fn mem_size(m: MemorySize) -> Option<u8> {
    Some(match m {
        MemorySize::UInt8 | MemorySize::Int8 => 1,
        MemorySize::UInt16 | MemorySize::Int16 | MemorySize::WordOffset => 2,
        MemorySize::UInt32 | MemorySize::Int32 | MemorySize::DwordOffset => 4,
        MemorySize::UInt64 | MemorySize::Int64 | MemorySize::QwordOffset => 8,
        _ => return None,
    })
}

fn sign_extend(v: u64, size: u8) -> u64 {
    let shift = 64 - 8 * u32::from(size);
    (((v << shift) as i64) >> shift) as u64
}

pub(super) fn is_string_operand(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::MemorySegSI
            | OpKind::MemorySegESI
            | OpKind::MemorySegRSI
            | OpKind::MemorySegDI
            | OpKind::MemorySegEDI
            | OpKind::MemorySegRDI
            | OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI
    )
}

/// An explicit operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operand {
    Reg(Gpr),
    Imm(u64),
    Mem,
}

/// The linear address of `seg:ea`: in 64-bit mode only FS and GS add a
/// base and the result must be canonical; elsewhere it wraps at 4 GiB
/// (SDM Vol. 3A 3.4.4).
pub(super) fn linear<P: Platform>(p: &P, mode: Mode, seg: Seg, ea: u64) -> Result<u64, Error> {
    if mode == Mode::Bits64 {
        let base = if matches!(seg, Seg::Fs | Seg::Gs) { p.segment_base(seg) } else { 0 };
        let la = base.wrapping_add(ea);
        if !canonical(la) {
            return Err(Error::NonCanonical { stack: seg == Seg::Ss });
        }
        Ok(la)
    } else {
        Ok(p.segment_base(seg).wrapping_add(ea) & linear_mask(mode))
    }
}

/// Checks that the MMIO operand at `la` is the access the exit reported and
/// translates it: the same guest-physical page (and linear page, when the
/// CPU gave one), the same direction, within one page.
fn mmio_target<P: Platform>(
    p: &mut P,
    mode: Mode,
    fault: &MmioFault,
    la: u64,
    size: u8,
    reads: bool,
    writes: bool,
) -> Result<u64, Error> {
    let last = la.wrapping_add(u64::from(size) - 1) & linear_mask(mode);
    if page(last) != page(la) {
        return Err(Error::SplitAccess { gva: la });
    }
    let access = if writes { MemAccess::Write } else { MemAccess::Read };
    let gpa = p.translate(la, access).map_err(|c| Error::PageFault { gva: la, error_code: c.0 })?;
    let same_page = page(gpa) == page(fault.gpa) && fault.gva.is_none_or(|g| page(g) == page(la));
    let same_direction = match fault.access {
        MemAccess::Read => reads,
        MemAccess::Write => writes,
        MemAccess::Execute => false,
    };
    if !same_page || !same_direction {
        return Err(Error::NotTheFaultingAccess);
    }
    Ok(gpa)
}

/// The instruction being run and the exit it is for.
struct Cx<'a> {
    mode: Mode,
    i: &'a Instruction,
    fault: &'a MmioFault,
    mnemonic: Mnemonic,
}

impl Cx<'_> {
    fn unsupported(&self) -> Error {
        Error::UnsupportedOperand { mnemonic: self.mnemonic }
    }

    fn operand(&self, n: u32) -> Result<Operand, Error> {
        match self.i.op_kind(n) {
            OpKind::Register => Gpr::of(self.i.op_register(n)).map(Operand::Reg).ok_or(self.unsupported()),
            OpKind::Memory => Ok(Operand::Mem),
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => Ok(Operand::Imm(self.i.immediate(n))),
            _ => Err(self.unsupported()),
        }
    }

    /// The two operands, or a refusal for other operand counts.
    fn operands2(&self) -> Result<(Operand, Operand), Error> {
        if self.i.op_count() != 2 {
            return Err(self.unsupported());
        }
        Ok((self.operand(0)?, self.operand(1)?))
    }

    fn mem_size(&self) -> Result<u8, Error> {
        mem_size(self.i.memory_size()).ok_or(self.unsupported())
    }

    /// The memory operand's effective address (base + index * scale +
    /// displacement, SDM Vol. 1 3.7.5) truncated to the address size, and
    /// that size in bytes.
    fn effective_address<P: Platform>(&self, p: &P) -> Result<(u64, u8), Error> {
        let i = self.i;
        let base = i.memory_base();
        if base == Register::RIP || base == Register::EIP {
            // iced has already added the next RIP to the displacement.
            return Ok((i.memory_displacement64(), if base == Register::RIP { 8 } else { 4 }));
        }
        let mut ea = i.memory_displacement64();
        let mut size = 0;
        if base != Register::None {
            let g = Gpr::of(base).ok_or(self.unsupported())?;
            ea = ea.wrapping_add(g.read(p));
            size = g.size;
        }
        let index = i.memory_index();
        if index != Register::None {
            // A vector index (VSIB) is not a GPR and is refused here.
            let g = Gpr::of(index).ok_or(self.unsupported())?;
            ea = ea.wrapping_add(g.read(p).wrapping_mul(u64::from(i.memory_index_scale())));
            size = g.size;
        }
        if size == 0 {
            // An absolute address: its width is the address size.
            size = match i.memory_displ_size() {
                2 => 2,
                4 => 4,
                8 => 8,
                _ => match self.mode {
                    Mode::Bits16 => 2,
                    Mode::Bits32 => 4,
                    Mode::Bits64 => 8,
                },
            };
        }
        Ok((ea & mask(size), size))
    }

    fn segment(&self) -> Result<Seg, Error> {
        seg_of(self.i.memory_segment()).ok_or(self.unsupported())
    }

    /// The device address of the memory operand (`size` bytes, moved by
    /// `adjust` bytes from the encoded address, for BT with a register
    /// offset).
    fn target<P: Platform>(&self, p: &mut P, size: u8, adjust: u64, reads: bool, writes: bool) -> Result<u64, Error> {
        let (ea, asize) = self.effective_address(p)?;
        let ea = ea.wrapping_add(adjust) & mask(asize);
        let la = linear(p, self.mode, self.segment()?, ea)?;
        mmio_target(p, self.mode, self.fault, la, size, reads, writes)
    }

    /// Advances RIP past the instruction (wrapping at the mode's IP width)
    /// and clears RF, as completing any instruction does.
    fn complete<P: Platform>(&self, p: &mut P) -> Result<Emulated, Error> {
        let ip_mask = match self.mode {
            Mode::Bits16 => 0xffff,
            Mode::Bits32 => 0xffff_ffff,
            Mode::Bits64 => u64::MAX,
        };
        let len = self.i.len() as u8;
        p.set_rip(p.rip().wrapping_add(u64::from(len)) & ip_mask);
        p.set_rflags(p.rflags() & !RF);
        Ok(Emulated { len, completed: true })
    }

    fn set_status<P: Platform>(&self, p: &mut P, affected: u64, status: u64) {
        p.set_rflags((p.rflags() & !affected) | (status & affected));
    }

    /// MOV (SDM Vol. 2B MOV) and MOVNTI: a register or immediate stored to
    /// the device, or a device register loaded into a GPR.
    fn mov<P: Platform>(&self, p: &mut P) -> Result<Emulated, Error> {
        let size = self.mem_size()?;
        match self.operands2()? {
            (Operand::Reg(dst), Operand::Mem) if dst.size == size => {
                let gpa = self.target(p, size, 0, true, false)?;
                let v = p.mmio_read(gpa, size);
                dst.write(p, v);
            }
            (Operand::Mem, Operand::Reg(src)) if src.size == size => {
                let gpa = self.target(p, size, 0, false, true)?;
                let v = src.read(p);
                p.mmio_write(gpa, size, v);
            }
            (Operand::Mem, Operand::Imm(v)) => {
                let gpa = self.target(p, size, 0, false, true)?;
                p.mmio_write(gpa, size, v & mask(size));
            }
            _ => return Err(self.unsupported()),
        }
        self.complete(p)
    }

    /// MOVZX, MOVSX, MOVSXD (SDM Vol. 2B): a narrower device register
    /// extended into a GPR.
    fn load_extended<P: Platform>(&self, p: &mut P, signed: bool) -> Result<Emulated, Error> {
        let size = self.mem_size()?;
        let (Operand::Reg(dst), Operand::Mem) = self.operands2()? else {
            return Err(self.unsupported());
        };
        if dst.high || size > dst.size {
            return Err(self.unsupported());
        }
        let gpa = self.target(p, size, 0, true, false)?;
        let v = p.mmio_read(gpa, size) & mask(size);
        dst.write(p, if signed { sign_extend(v, size) } else { v });
        self.complete(p)
    }

    /// ADD, OR, ADC, SBB, AND, SUB, XOR, CMP, TEST with one operand on the
    /// device; CMP and TEST only read it.
    fn binary<P: Platform>(&self, p: &mut P) -> Result<Emulated, Error> {
        let size = self.mem_size()?;
        let writes_result = !matches!(self.mnemonic, Mnemonic::Cmp | Mnemonic::Test);
        let (dst, src) = self.operands2()?;
        let value = |p: &P, o: Operand| match o {
            Operand::Reg(g) => g.read(p),
            Operand::Imm(v) => v & mask(size),
            Operand::Mem => 0,
        };
        let cf = p.rflags() & CF != 0;
        match (dst, src) {
            (Operand::Mem, Operand::Reg(Gpr { size: s, .. })) | (Operand::Reg(Gpr { size: s, .. }), Operand::Mem)
                if s != size =>
            {
                Err(self.unsupported())
            }
            (Operand::Mem, Operand::Reg(_) | Operand::Imm(_)) => {
                let gpa = self.target(p, size, 0, true, writes_result)?;
                let a = p.mmio_read(gpa, size);
                let (r, status) = self.alu(a, value(p, src), cf, size);
                if writes_result {
                    p.mmio_write(gpa, size, r);
                }
                self.set_status(p, STATUS, status);
                self.complete(p)
            }
            (Operand::Reg(g), Operand::Mem) => {
                let gpa = self.target(p, size, 0, true, false)?;
                let b = p.mmio_read(gpa, size);
                let (r, status) = self.alu(g.read(p), b, cf, size);
                if writes_result {
                    g.write(p, r);
                }
                self.set_status(p, STATUS, status);
                self.complete(p)
            }
            _ => Err(self.unsupported()),
        }
    }

    /// The result and status flags of a two-operand instruction.
    fn alu(&self, a: u64, b: u64, cf: bool, size: u8) -> (u64, u64) {
        match self.mnemonic {
            Mnemonic::Add => flags::add(a, b, false, size),
            Mnemonic::Adc => flags::add(a, b, cf, size),
            Mnemonic::Sub | Mnemonic::Cmp => flags::sub(a, b, false, size),
            Mnemonic::Sbb => flags::sub(a, b, cf, size),
            Mnemonic::Or => ((a | b) & mask(size), flags::logic(a | b, size)),
            Mnemonic::Xor => ((a ^ b) & mask(size), flags::logic(a ^ b, size)),
            // AND and TEST.
            _ => ((a & b) & mask(size), flags::logic(a & b, size)),
        }
    }

    /// INC and DEC (CF kept), NOT (no flags), NEG (SDM Vol. 2A/2B) on a
    /// device register.
    fn unary<P: Platform>(&self, p: &mut P) -> Result<Emulated, Error> {
        let size = self.mem_size()?;
        if self.i.op_count() != 1 || self.operand(0)? != Operand::Mem {
            return Err(self.unsupported());
        }
        let gpa = self.target(p, size, 0, true, true)?;
        let a = p.mmio_read(gpa, size);
        let (r, affected, status) = match self.mnemonic {
            Mnemonic::Inc => {
                let (r, f) = flags::add(a, 1, false, size);
                (r, STATUS & !CF, f)
            }
            Mnemonic::Dec => {
                let (r, f) = flags::sub(a, 1, false, size);
                (r, STATUS & !CF, f)
            }
            Mnemonic::Neg => {
                let (r, f) = flags::sub(0, a, false, size);
                (r, STATUS, f)
            }
            _ => (!a & mask(size), 0, 0),
        };
        p.mmio_write(gpa, size, r);
        self.set_status(p, affected, status);
        self.complete(p)
    }

    /// XCHG between a GPR and a device register (SDM Vol. 2B XCHG).
    fn xchg<P: Platform>(&self, p: &mut P) -> Result<Emulated, Error> {
        let size = self.mem_size()?;
        let g = match self.operands2()? {
            (Operand::Mem, Operand::Reg(g)) | (Operand::Reg(g), Operand::Mem) if g.size == size => g,
            _ => return Err(self.unsupported()),
        };
        let gpa = self.target(p, size, 0, true, true)?;
        let old = p.mmio_read(gpa, size);
        let v = g.read(p);
        p.mmio_write(gpa, size, v);
        g.write(p, old);
        self.complete(p)
    }

    /// BT, BTS, BTR, BTC on a device register (SDM Vol. 2A BT): CF gets
    /// the bit; OF, SF, AF and PF are undefined and kept, ZF is kept. A
    /// register bit offset is signed and selects the operand-sized word
    /// at `ea + size * (offset div bits)`; an immediate one is taken modulo
    /// the operand size.
    fn bit_test<P: Platform>(&self, p: &mut P) -> Result<Emulated, Error> {
        let size = self.mem_size()?;
        let bits = 8 * u64::from(size);
        let (offset, adjust) = match self.operands2()? {
            (Operand::Mem, Operand::Imm(v)) => (v & (bits - 1), 0),
            (Operand::Mem, Operand::Reg(g)) if g.size == size => {
                let off = sign_extend(g.read(p), size) as i64;
                let words = off >> bits.trailing_zeros();
                ((off as u64) & (bits - 1), (words as u64).wrapping_mul(u64::from(size)))
            }
            _ => return Err(self.unsupported()),
        };
        let writes = self.mnemonic != Mnemonic::Bt;
        let gpa = self.target(p, size, adjust, true, writes)?;
        let v = p.mmio_read(gpa, size);
        let bit = 1u64 << offset;
        let new = match self.mnemonic {
            Mnemonic::Bts => v | bit,
            Mnemonic::Btr => v & !bit,
            Mnemonic::Btc => v ^ bit,
            _ => v,
        };
        if writes {
            p.mmio_write(gpa, size, new & mask(size));
        }
        self.set_status(p, CF, if v & bit != 0 { CF } else { 0 });
        self.complete(p)
    }
}

/// Where one operand of a string instruction lives.
#[derive(Clone, Copy, Debug)]
enum Side {
    /// The device page of the exit, at this guest-physical address.
    Mmio(u64),
    /// Guest RAM, in one or two pieces (the access may cross a page):
    /// guest-physical addresses, the length of the first, and the bytes
    /// there when it was classified.
    Ram { gpa: [u64; 2], first: usize, bytes: [u8; 8] },
}

/// MOVS, STOS, LODS, with or without REP (SDM Vol. 2B MOVS, STOS, LODS;
/// Vol. 2B "REP/REPE/REPZ/REPNE/REPNZ"). Each iteration runs while one
/// operand is in the device page of the exit; the other may be RAM. When
/// the device operand leaves the page, or after [`REP_BUDGET`] iterations,
/// the instruction stops with RSI/RDI/RCX updated and RIP unchanged, so the
/// guest re-executes it for the rest.
fn string<P: Platform>(p: &mut P, mode: Mode, i: &Instruction, fault: &MmioFault) -> Result<Emulated, Error> {
    let mnemonic = i.mnemonic();
    let unsupported = Error::UnsupportedOperand { mnemonic };
    let (reads_src, writes_dst) = match mnemonic {
        Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq => (true, true),
        Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => (false, true),
        Mnemonic::Lodsb | Mnemonic::Lodsw | Mnemonic::Lodsd | Mnemonic::Lodsq => (true, false),
        _ => return Err(Error::NotEmulated { mnemonic }),
    };
    let size = mem_size(i.memory_size()).ok_or(unsupported)?;
    let mut asize = 0;
    for n in 0..i.op_count() {
        asize = match i.op_kind(n) {
            OpKind::MemorySegSI | OpKind::MemorySegDI | OpKind::MemoryESDI => 2,
            OpKind::MemorySegESI | OpKind::MemorySegEDI | OpKind::MemoryESEDI => 4,
            OpKind::MemorySegRSI | OpKind::MemorySegRDI | OpKind::MemoryESRDI => 8,
            _ => asize,
        };
    }
    if asize == 0 {
        return Err(unsupported);
    }
    let src_seg = seg_of(i.memory_segment()).ok_or(unsupported)?;
    let (rcx, rsi, rdi) = (Gpr::with_size(1, asize), Gpr::with_size(6, asize), Gpr::with_size(7, asize));
    let acc = Gpr { size, ..Gpr::RAX };
    // REPNE acts as REP on MOVS, STOS and LODS on current processors.
    let rep = i.has_rep_prefix() || i.has_repne_prefix();
    let step = if p.rflags() & DF != 0 { u64::from(size).wrapping_neg() } else { u64::from(size) };
    let count = if rep { rcx.read(p) } else { 1 };

    let mut done = 0;
    while done < count && done < REP_BUDGET {
        let first = done == 0;
        let src = match reads_src {
            true => match side(p, mode, fault, src_seg, rsi.read(p), size, MemAccess::Read) {
                Ok(s) => Some(s),
                Err(e) if first => return Err(e),
                Err(_) => break,
            },
            false => None,
        };
        let dst = match writes_dst {
            true => match side(p, mode, fault, Seg::Es, rdi.read(p), size, MemAccess::Write) {
                Ok(s) => Some(s),
                Err(e) if first => return Err(e),
                Err(_) => break,
            },
            false => None,
        };
        let src_mmio = matches!(src, Some(Side::Mmio(_)));
        let dst_mmio = matches!(dst, Some(Side::Mmio(_)));
        if first {
            let matches_exit = match fault.access {
                MemAccess::Read => src_mmio,
                MemAccess::Write => dst_mmio,
                MemAccess::Execute => false,
            };
            if !matches_exit {
                return Err(Error::NotTheFaultingAccess);
            }
        } else if !src_mmio && !dst_mmio {
            break;
        }

        let value = match src {
            Some(Side::Mmio(gpa)) => p.mmio_read(gpa, size),
            Some(Side::Ram { bytes, .. }) => u64::from_le_bytes(bytes),
            None => acc.read(p),
        };
        match dst {
            Some(Side::Mmio(gpa)) => p.mmio_write(gpa, size, value & mask(size)),
            Some(Side::Ram { gpa, first, .. }) => {
                let b = value.to_le_bytes();
                let (lo, hi) = b[..usize::from(size)].split_at(first);
                // `side` read these bytes, so they are guest memory; a
                // write can fail only if the platform's memory map changed
                // in between, and there is nothing better to do than drop
                // it, as a write to ROM is dropped.
                if p.write_ram(gpa[0], lo) && !hi.is_empty() {
                    p.write_ram(gpa[1], hi);
                }
            }
            None => acc.write(p, value),
        }
        if reads_src {
            rsi.write(p, rsi.read(p).wrapping_add(step));
        }
        if writes_dst {
            rdi.write(p, rdi.read(p).wrapping_add(step));
        }
        if rep {
            rcx.write(p, rcx.read(p).wrapping_sub(1));
        }
        done += 1;
    }

    if done == count {
        let cx = Cx { mode, i, fault, mnemonic };
        return cx.complete(p);
    }
    // Stopped between iterations: RF keeps an instruction breakpoint on it
    // from firing again when it resumes (SDM Vol. 3B, "Instruction-
    // Breakpoint Exception Condition").
    p.set_rflags(p.rflags() | RF);
    Ok(Emulated { len: i.len() as u8, completed: false })
}

/// Classifies one string operand: the exit's device page (which it must
/// not cross out of) or RAM (read to check it is RAM).
fn side<P: Platform>(
    p: &mut P,
    mode: Mode,
    fault: &MmioFault,
    seg: Seg,
    offset: u64,
    size: u8,
    access: MemAccess,
) -> Result<Side, Error> {
    let la = linear(p, mode, seg, offset)?;
    let gpa = p.translate(la, access).map_err(|c| Error::PageFault { gva: la, error_code: c.0 })?;
    let in_page = (4096 - (la & 0xfff)).min(u64::from(size)) as usize;
    if page(gpa) == page(fault.gpa) {
        if in_page < usize::from(size) {
            return Err(Error::SplitAccess { gva: la });
        }
        if fault.gva.is_some_and(|g| page(g) != page(la)) {
            return Err(Error::NotTheFaultingAccess);
        }
        return Ok(Side::Mmio(gpa));
    }
    let mut gpas = [gpa, 0];
    if in_page < usize::from(size) {
        let la2 = la.wrapping_add(in_page as u64) & linear_mask(mode);
        if mode == Mode::Bits64 && !canonical(la2) {
            return Err(Error::NonCanonical { stack: false });
        }
        gpas[1] = p.translate(la2, access).map_err(|c| Error::PageFault { gva: la2, error_code: c.0 })?;
        if page(gpas[1]) == page(fault.gpa) {
            return Err(Error::SplitAccess { gva: la });
        }
    }
    let mut probe = [0u8; 8];
    let (lo, hi) = probe[..usize::from(size)].split_at_mut(in_page);
    if !p.read_ram(gpas[0], lo) {
        return Err(Error::NotRam { gpa: gpas[0] });
    }
    if !hi.is_empty() && !p.read_ram(gpas[1], hi) {
        return Err(Error::NotRam { gpa: gpas[1] });
    }
    Ok(Side::Ram { gpa: gpas, first: in_page, bytes: probe })
}
