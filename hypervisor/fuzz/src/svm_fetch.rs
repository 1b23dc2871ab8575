//! The AMD instruction-length path for CPUs without next-RIP saving
//! (`svm::fetch`): guest code bytes at RIP and the instruction the exit
//! names in, the length to skip out. The bytes are the guest's (it may
//! have rewritten its code), so a wrong answer would move RIP into the
//! middle of an instruction.
//!
//! Checks, against a brute-force reading of the rule (legacy prefixes, REX
//! only in 64-bit code, then the opcode, all within 15 bytes):
//! - a length is only given when the bytes are prefixes then the opcode,
//!   and always then; it is at most 15 and counts exactly those bytes;
//! - bytes after the instruction do not change the answer;
//! - the exit path's one-load comparison (`Opcode::word`) matches exactly
//!   the bare opcode, so its fast answer equals the slow one;
//! - an instruction built from fuzzed prefixes is measured right.
//!
//! Input: a byte choosing the opcode (bits 2:0, mod 6) and 64-bit mode
//! (bit 3), a byte of prefixes to build an instruction from (count), then
//! code bytes.

use svm::fetch::{MAX_LEN, Opcode, instruction_length};

use crate::input::Input;

const OPCODES: [Opcode; 6] = [Opcode::Cpuid, Opcode::Rdmsr, Opcode::Wrmsr, Opcode::Hlt, Opcode::Vmmcall, Opcode::Invd];

/// Legacy prefixes (APM Vol. 3 1.2): operand/address size, segment, LOCK,
/// REP/REPNE.
const LEGACY: [u8; 11] = [0x66, 0x67, 0x2e, 0x3e, 0x26, 0x64, 0x65, 0x36, 0xf0, 0xf3, 0xf2];

fn is_prefix(b: u8, long_mode: bool) -> bool {
    LEGACY.contains(&b) || (long_mode && (0x40..=0x4f).contains(&b))
}

/// The length by the rule, searched by brute force over where the opcode
/// could start.
fn expected(bytes: &[u8], op: Opcode, long_mode: bool) -> Option<u8> {
    let code = op.bytes();
    (0..=bytes.len()).find_map(|k| {
        let prefixes = bytes[..k].iter().all(|&b| is_prefix(b, long_mode));
        (prefixes && bytes[k..].starts_with(code) && k + code.len() <= MAX_LEN).then_some((k + code.len()) as u8)
    })
}

pub fn svm_fetch(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let op = OPCODES[usize::from(mode & 7) % OPCODES.len()];
    let long_mode = mode & 8 != 0;
    let build = input.u8();
    let bytes = input.bytes(32);
    let code = op.bytes();

    let len = instruction_length(bytes, op, long_mode);
    assert_eq!(len, expected(bytes, op, long_mode), "{bytes:02x?} as {op:?}, long mode {long_mode}");
    if let Some(n) = len {
        let n = usize::from(n);
        assert!(n <= MAX_LEN && n >= code.len());
        assert_eq!(&bytes[n - code.len()..n], code);
        // Only the instruction's own bytes matter.
        assert_eq!(instruction_length(&bytes[..n], op, long_mode), len);
        let mut longer = bytes[..n].to_vec();
        longer.extend_from_slice(&[0x0f; 16]);
        assert_eq!(instruction_length(&longer, op, long_mode), len);
    }

    // The fast path reads 4 bytes at RIP and compares under a mask.
    let (word, mask) = op.word();
    let mut four = [0u8; 4];
    four[..bytes.len().min(4)].copy_from_slice(&bytes[..bytes.len().min(4)]);
    let here = u32::from_le_bytes(four);
    // No opcode holds a zero byte, so the padding never completes a match.
    let bare = bytes.starts_with(code);
    assert_eq!(here & mask == word, bare);
    if bare {
        assert_eq!(len, Some(code.len() as u8), "fast and slow paths disagree");
    }

    // An instruction from `build`'s count of prefixes taken from the code
    // bytes (mapped onto the prefix set), then the opcode, then noise.
    let count = usize::from(build % 16);
    let mut insn: Vec<u8> = bytes
        .iter()
        .chain(std::iter::repeat(&0))
        .take(count)
        .map(|&b| {
            let all = LEGACY.len() + if long_mode { 16 } else { 0 };
            let i = usize::from(b) % all;
            if i < LEGACY.len() { LEGACY[i] } else { 0x40 + (i - LEGACY.len()) as u8 }
        })
        .collect();
    insn.extend_from_slice(code);
    insn.extend_from_slice(&bytes[bytes.len().min(count)..]);
    let want = (count + code.len() <= MAX_LEN).then_some((count + code.len()) as u8);
    assert_eq!(instruction_length(&insn, op, long_mode), want, "{insn:02x?} as {op:?}");
}
