//! RFLAGS results of the integer instructions the emulator runs, from the
//! status-flag definitions of SDM Vol. 1 3.4.3.1 and each instruction's
//! "Flags Affected" section in Vol. 2.

/// Carry: unsigned overflow out of the most significant bit.
pub const CF: u64 = 1;
/// Parity: the least significant byte of the result has an even number of 1s.
pub const PF: u64 = 1 << 2;
/// Auxiliary carry: a carry or borrow out of bit 3.
pub const AF: u64 = 1 << 4;
pub const ZF: u64 = 1 << 6;
pub const SF: u64 = 1 << 7;
pub const TF: u64 = 1 << 8;
pub const DF: u64 = 1 << 10;
/// Signed overflow.
pub const OF: u64 = 1 << 11;
/// Resume flag: cleared when an instruction completes (SDM Vol. 3B,
/// "Instruction-Breakpoint Exception Condition").
pub const RF: u64 = 1 << 16;

/// The six status flags.
pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;

/// All ones in the low `size` bytes (1, 2, 4 or 8).
pub fn mask(size: u8) -> u64 {
    u64::MAX >> (64 - 8 * u32::from(size.clamp(1, 8)))
}

fn sign(size: u8) -> u64 {
    1 << (8 * u32::from(size.clamp(1, 8)) - 1)
}

/// SF, ZF and PF of a result (already truncated to `size`).
fn szp(r: u64, size: u8) -> u64 {
    let mut f = 0;
    if r & sign(size) != 0 {
        f |= SF;
    }
    if r == 0 {
        f |= ZF;
    }
    if (r as u8).count_ones() % 2 == 0 {
        f |= PF;
    }
    f
}

/// `a + b + carry` in `size` bytes: ADD, ADC, INC (SDM Vol. 2A ADD).
pub fn add(a: u64, b: u64, carry: bool, size: u8) -> (u64, u64) {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    let wide = u128::from(a) + u128::from(b) + u128::from(carry);
    let r = wide as u64 & m;
    let mut f = szp(r, size);
    if wide > u128::from(m) {
        f |= CF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= AF;
    }
    // Operands of one sign and a result of the other.
    if (a ^ r) & (b ^ r) & sign(size) != 0 {
        f |= OF;
    }
    (r, f)
}

/// `a - b - borrow` in `size` bytes: SUB, SBB, CMP, DEC, NEG (SDM Vol. 2B SUB).
pub fn sub(a: u64, b: u64, borrow: bool, size: u8) -> (u64, u64) {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    let r = a.wrapping_sub(b).wrapping_sub(u64::from(borrow)) & m;
    let mut f = szp(r, size);
    if u128::from(a) < u128::from(b) + u128::from(borrow) {
        f |= CF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= AF;
    }
    // Operands of different signs and a result with the sign of the subtrahend.
    if (a ^ b) & (a ^ r) & sign(size) != 0 {
        f |= OF;
    }
    (r, f)
}

/// AND, OR, XOR, TEST: CF and OF cleared, SF/ZF/PF from the result (SDM
/// Vol. 2A AND). AF is architecturally undefined; it is cleared, as current
/// Intel and AMD processors do.
pub fn logic(r: u64, size: u8) -> u64 {
    szp(r & mask(size), size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference flags from the definitions in SDM Vol. 1 3.4.3.1, computed
    /// with wide signed and unsigned arithmetic instead of bit tricks.
    fn reference(a: u64, b: u64, cin: bool, size: u8, subtract: bool) -> (u64, u64) {
        let bits = 8 * u32::from(size);
        let m = mask(size);
        let (a, b) = (a & m, b & m);
        let signed = |v: u64| -> i128 { ((v as i128) << (128 - bits)) >> (128 - bits) };
        let (ur, sr) = if subtract {
            (a as i128 - b as i128 - cin as i128, signed(a) - signed(b) - cin as i128)
        } else {
            (a as i128 + b as i128 + cin as i128, signed(a) + signed(b) + cin as i128)
        };
        let r = (ur as u128 as u64) & m;
        let mut f = 0;
        if ur < 0 || ur > m as i128 {
            f |= CF;
        }
        let low_a = (a & 0xf) as i32;
        let low_b = (b & 0xf) as i32;
        let low = if subtract { low_a - low_b - cin as i32 } else { low_a + low_b + cin as i32 };
        if !(0..=15).contains(&low) {
            f |= AF;
        }
        if r == 0 {
            f |= ZF;
        }
        if (r >> (bits - 1)) & 1 == 1 {
            f |= SF;
        }
        if (r & 0xff).count_ones() % 2 == 0 {
            f |= PF;
        }
        let min = -(1i128 << (bits - 1));
        let max = (1i128 << (bits - 1)) - 1;
        if sr < min || sr > max {
            f |= OF;
        }
        (r, f)
    }

    #[test]
    fn known_values() {
        // 0x7f + 1 in a byte: signed overflow into the sign bit, carry out of bit 3.
        assert_eq!(add(0x7f, 1, false, 1), (0x80, SF | OF | AF));
        // 0xff + 1: wraps to zero with carry; parity of 0 is even.
        assert_eq!(add(0xff, 1, false, 1), (0, CF | ZF | PF | AF));
        // 0 - 1 in a dword: borrow, negative, 0xffffffff has even parity.
        assert_eq!(sub(0, 1, false, 4), (0xffff_ffff, CF | SF | PF | AF));
        // 0x80000000 - 1: signed overflow, no borrow.
        assert_eq!(sub(0x8000_0000, 1, false, 4), (0x7fff_ffff, OF | AF | PF));
        // 5 - 5 = 0.
        assert_eq!(sub(5, 5, false, 8), (0, ZF | PF));
        assert_eq!(logic(0x8000, 2), SF | PF);
        assert_eq!(logic(0x1_0000, 2), ZF | PF, "bits above the operand size are ignored");
        assert_eq!(logic(0x3, 8), PF);
        assert_eq!(logic(0x7, 8), 0);
    }

    #[test]
    fn add_and_sub_match_the_definitions() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let edges = [0, 1, 0x7f, 0x80, 0xff, 0x7fff, 0x8000, 0xffff, 0x7fff_ffff, 0x8000_0000, u64::MAX];
        for size in [1u8, 2, 4, 8] {
            for &a in &edges {
                for &b in &edges {
                    for cin in [false, true] {
                        assert_eq!(
                            add(a, b, cin, size),
                            reference(a, b, cin, size, false),
                            "{a:#x}+{b:#x}+{cin} /{size}"
                        );
                        assert_eq!(
                            sub(a, b, cin, size),
                            reference(a, b, cin, size, true),
                            "{a:#x}-{b:#x}-{cin} /{size}"
                        );
                    }
                }
            }
            for _ in 0..2000 {
                let (a, b, cin) = (next(), next(), next() & 1 == 1);
                assert_eq!(add(a, b, cin, size), reference(a, b, cin, size, false));
                assert_eq!(sub(a, b, cin, size), reference(a, b, cin, size, true));
            }
        }
    }
}
