//! Instruction lengths for CPUs without next-RIP saving (NRIPS; QEMU's SVM
//! has none): the backend reads the bytes at the guest's RIP and measures
//! the one instruction the exit names — prefixes, then its known opcode —
//! instead of running a general instruction decoder. Bytes that are not
//! that instruction give `None`, and the caller falls back to the bare
//! opcode's length. `code` reads the bytes.

/// The intercepted instructions whose length the backend must find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    Cpuid,
    Rdmsr,
    Wrmsr,
    Hlt,
    Vmmcall,
    Invd,
    Wbinvd,
    Xsetbv,
    Pause,
}

impl Opcode {
    pub fn bytes(self) -> &'static [u8] {
        match self {
            Opcode::Cpuid => &[0x0f, 0xa2],
            Opcode::Rdmsr => &[0x0f, 0x32],
            Opcode::Wrmsr => &[0x0f, 0x30],
            Opcode::Hlt => &[0xf4],
            Opcode::Vmmcall => &[0x0f, 0x01, 0xd9],
            Opcode::Invd => &[0x0f, 0x08],
            Opcode::Wbinvd => &[0x0f, 0x09],
            Opcode::Xsetbv => &[0x0f, 0x01, 0xd1],
            Opcode::Pause => &[0xf3, 0x90],
        }
    }

    /// The opcode as a little-endian word and the mask of its bytes, for a
    /// one-load comparison on the exit path.
    #[inline(always)]
    pub fn word(self) -> (u32, u32) {
        let b = self.bytes();
        let mut w = 0u32;
        for (i, &x) in b.iter().enumerate() {
            w |= (x as u32) << (8 * i);
        }
        (w, u32::MAX >> (8 * (4 - b.len())))
    }
}

/// The architectural limit on an instruction's length (APM Vol. 3 1.1).
pub const MAX_LEN: usize = 15;

/// The length of `op` at the start of `bytes`, counting legacy prefixes and
/// (in 64-bit code) REX prefixes; `None` if the bytes are not `op`.
pub fn instruction_length(bytes: &[u8], op: Opcode, long_mode: bool) -> Option<u8> {
    let mut i = 0;
    while i < bytes.len().min(MAX_LEN) {
        match bytes[i] {
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3 => i += 1,
            0x40..=0x4f if long_mode => i += 1,
            _ => break,
        }
    }
    let code = op.bytes();
    let end = i + code.len();
    (end <= MAX_LEN && bytes.get(i..end) == Some(code)).then_some(end as u8)
}

/// A MOV to or from a debug register (0F 23 /r, 0F 21 /r; SDM Vol. 2B
/// "MOV—Move to/from Debug Registers"): ModRM.reg names the DR, ModRM.rm
/// the general-purpose register (REX.B extends it); the mod field is
/// ignored. Returns (length, DR, GPR, write), or `None` if the bytes are not
/// one (REX.R, naming DR8-DR15, is #UD and comes back as `None` too).
pub fn mov_dr(bytes: &[u8], long_mode: bool) -> Option<(u8, u8, u8, bool)> {
    let mut i = 0;
    let mut rex = 0u8;
    while i < bytes.len().min(MAX_LEN) {
        match bytes[i] {
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3 => rex = 0,
            b @ 0x40..=0x4f if long_mode => rex = b,
            _ => break,
        }
        i += 1;
    }
    let write = match bytes.get(i..i + 2)? {
        [0x0f, 0x21] => false,
        [0x0f, 0x23] => true,
        _ => return None,
    };
    let modrm = *bytes.get(i + 2)?;
    let len = i + 3;
    if len > MAX_LEN || rex & 4 != 0 {
        return None;
    }
    Some((len as u8, (modrm >> 3) & 7, (modrm & 7) | ((rex & 1) << 3), write))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mov_dr_forms() {
        // mov dr7, rax; mov rcx, dr6; mov dr0, r9 (REX.B); with a 0x66.
        assert_eq!(mov_dr(&[0x0f, 0x23, 0xf8], true), Some((3, 7, 0, true)));
        assert_eq!(mov_dr(&[0x0f, 0x21, 0xf1], true), Some((3, 6, 1, false)));
        assert_eq!(mov_dr(&[0x41, 0x0f, 0x23, 0xc1], true), Some((4, 0, 9, true)));
        assert_eq!(mov_dr(&[0x66, 0x0f, 0x21, 0xc3], false), Some((4, 0, 3, false)));
        assert_eq!(mov_dr(&[0x41, 0x0f, 0x23, 0xc1], false), None, "0x41 is INC ECX outside 64-bit code");
        assert_eq!(mov_dr(&[0x44, 0x0f, 0x23, 0xc1], true), None, "REX.R: DR8 is #UD");
        assert_eq!(mov_dr(&[0x0f, 0x22, 0xc1], true), None, "MOV CR");
        assert_eq!(mov_dr(&[0x0f, 0x23], true), None, "truncated");
    }

    #[test]
    fn plain_and_prefixed_forms() {
        assert_eq!(instruction_length(&[0x0f, 0xa2, 0x90], Opcode::Cpuid, true), Some(2));
        assert_eq!(instruction_length(&[0xf4], Opcode::Hlt, false), Some(1));
        assert_eq!(instruction_length(&[0x0f, 0x01, 0xd9], Opcode::Vmmcall, true), Some(3));
        assert_eq!(instruction_length(&[0x66, 0x2e, 0x0f, 0x32], Opcode::Rdmsr, false), Some(4));
        assert_eq!(instruction_length(&[0x48, 0x0f, 0x30], Opcode::Wrmsr, true), Some(3), "REX.W");
    }

    #[test]
    fn opcode_words() {
        assert_eq!(Opcode::Cpuid.word(), (0xa20f, 0xffff));
        assert_eq!(Opcode::Vmmcall.word(), (0xd9010f, 0xff_ffff));
        assert_eq!(Opcode::Hlt.word(), (0xf4, 0xff));
    }

    #[test]
    fn rex_is_only_a_prefix_in_64_bit_code() {
        // In 32-bit code 0x48 is DEC EAX: not a WRMSR.
        assert_eq!(instruction_length(&[0x48, 0x0f, 0x30], Opcode::Wrmsr, false), None);
    }

    #[test]
    fn other_bytes_and_overlong_forms_are_refused() {
        assert_eq!(instruction_length(&[0x0f, 0xa3], Opcode::Cpuid, true), None);
        assert_eq!(instruction_length(&[0x0f], Opcode::Cpuid, true), None, "truncated");
        assert_eq!(instruction_length(&[], Opcode::Hlt, true), None);
        let mut long = [0x66u8; 16];
        long[14] = 0x0f;
        long[15] = 0xa2;
        assert_eq!(instruction_length(&long, Opcode::Cpuid, true), None, "16 bytes: over the limit");
        long[13] = 0x0f;
        long[14] = 0xa2;
        assert_eq!(instruction_length(&long, Opcode::Cpuid, true), Some(15), "exactly 15 bytes");
    }
}
