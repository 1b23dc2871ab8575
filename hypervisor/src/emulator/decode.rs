//! Fetching the instruction at CS:RIP through the guest's page tables and
//! decoding it for the current mode.

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};
use vcpu::MemAccess;

use super::{Error, Mode, Platform, Seg, canonical, linear_mask};

/// The architectural limit on an instruction's length.
pub const MAX_LEN: usize = 15;
const PAGE: u64 = 4096;

/// Reads up to 15 bytes at CS:RIP and decodes one instruction.
///
/// The bytes may cross into a second page. That page is only needed if the
/// instruction extends into it, so a fault translating it is held back and
/// raised only when the decoder runs out of bytes, as a CPU faults only on
/// the bytes it actually fetches (SDM Vol. 3A 4.7: I/D faults).
pub fn fetch_and_decode<P: Platform>(p: &mut P, mode: Mode) -> Result<Instruction, Error> {
    let rip = p.rip();
    let cs_base = if mode == Mode::Bits64 { 0 } else { p.segment_base(Seg::Cs) };
    let la = cs_base.wrapping_add(rip) & linear_mask(mode);
    if mode == Mode::Bits64 && !canonical(la) {
        return Err(Error::NonCanonical { stack: false });
    }

    let mut buf = [0u8; MAX_LEN];
    let first = (PAGE - (la & (PAGE - 1))).min(MAX_LEN as u64) as usize;
    let gpa = p.translate(la, MemAccess::Execute).map_err(|c| Error::PageFault { gva: la, error_code: c.0 })?;
    if !p.read_ram(gpa, &mut buf[..first]) {
        return Err(Error::CodeNotInRam { gpa });
    }
    let mut avail = first;
    // What stops the fetch at the page boundary, raised only if needed.
    let mut beyond = None;
    if first < MAX_LEN {
        let la2 = la.wrapping_add(first as u64) & linear_mask(mode);
        if mode == Mode::Bits64 && !canonical(la2) {
            beyond = Some(Error::NonCanonical { stack: false });
        } else {
            match p.translate(la2, MemAccess::Execute) {
                Ok(gpa2) if p.read_ram(gpa2, &mut buf[first..]) => avail = MAX_LEN,
                Ok(gpa2) => beyond = Some(Error::CodeNotInRam { gpa: gpa2 }),
                Err(c) => beyond = Some(Error::PageFault { gva: la2, error_code: c.0 }),
            }
        }
    }

    let (insn, err) = decode(mode, &buf[..avail], rip);
    match err {
        DecoderError::None => Ok(insn),
        DecoderError::NoMoreBytes => Err(beyond.unwrap_or(Error::TooLong)),
        _ if avail == MAX_LEN && too_long(mode, &buf) => Err(Error::TooLong),
        _ if vector_extension(mode, &buf[..avail]) => Err(Error::VectorInstruction),
        _ => Err(Error::InvalidOpcode),
    }
}

pub fn warm_up() {
    let _ = decode(Mode::Bits64, &[0x90], 0);
}

fn decode(mode: Mode, bytes: &[u8], rip: u64) -> (Instruction, DecoderError) {
    match Decoder::try_with_ip(mode.bits(), bytes, rip, DecoderOptions::NONE) {
        Ok(mut d) => {
            let insn = d.decode();
            (insn, d.last_error())
        }
        // Only an invalid bitness fails, and `Mode` has none.
        Err(_) => (Instruction::default(), DecoderError::InvalidInstruction),
    }
}

/// Whether 15 bytes the decoder rejects are an instruction cut off by the
/// length limit rather than an invalid one: iced reports both as invalid.
/// Past its prefixes, the rest must need more bytes than the limit leaves.
/// (This ignores how 66h/67h change immediate and displacement sizes, so a
/// prefix-padded instruction right at the limit may be called invalid (#UD)
/// where the CPU raises #GP; only a guest that rewrites the faulting
/// instruction can see the difference.)
fn too_long(mode: Mode, buf: &[u8; MAX_LEN]) -> bool {
    let is_prefix = |b: u8| {
        matches!(b, 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3)
            || (mode == Mode::Bits64 && b & 0xf0 == 0x40)
    };
    let prefixes = buf.iter().take_while(|&&b| is_prefix(b)).count();
    if prefixes == 0 || prefixes == MAX_LEN {
        return prefixes == MAX_LEN;
    }
    let (_, err) = decode(mode, &buf[prefixes..], 0);
    err == DecoderError::NoMoreBytes
}

/// Whether bytes the decoder rejects start a VEX- or EVEX-encoded
/// instruction. The decoder is built without those tables (they would add
/// about 70 KB to the kernel, and no such instruction is emulated), so they
/// are recognised here: the CPU ran one, which must not come back to the
/// guest as #UD. The escape byte may follow segment and 67h prefixes only
/// (66h, F2h, F3h, LOCK or REX before it are #UD); outside 64-bit mode
/// C4h/C5h/62h are LES/LDS/BOUND unless the next byte has bits 7:6 set,
/// which as a ModRM byte would name a register (SDM Vol. 2A 2.3.5; EVEX's
/// first payload byte follows the same rule).
fn vector_extension(mode: Mode, bytes: &[u8]) -> bool {
    let prefixes = bytes.iter().take_while(|&&b| matches!(b, 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x67)).count();
    match bytes.get(prefixes..) {
        Some([0xc4 | 0xc5 | 0x62, next, ..]) => mode == Mode::Bits64 || next & 0xc0 == 0xc0,
        _ => false,
    }
}
