//! The host's ACPI, the logic half (the kernel's `platform::acpi` reads the
//! tables): finds the S5 (soft-off) sleep type in a DSDT without an AML
//! interpreter. The guest's tables are `firmware::acpi`.
//!
//! Powering off takes SLP_TYPa from the `\_S5_` package (ACPI 6.5, 7.4.2
//! "\_Sx (System States)") written to PM1a_CNT with SLP_EN. Firmware defines
//! `_S5_` as a plain `Name(_S5_, Package(){...})` in practice, so a pattern
//! search for that encoding is enough and avoids running firmware AML.

/// AML opcodes (ACPI 6.5, 20.2 "AML Grammar Definition").
const NAME_OP: u8 = 0x08;
const PACKAGE_OP: u8 = 0x12;
const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;

/// SLP_TYPa and SLP_TYPb for S5, from the AML body of a DSDT or SSDT.
pub fn find_s5(aml: &[u8]) -> Option<(u8, u8)> {
    let mut i = 0;
    while let Some(off) = find(&aml[i..], b"_S5_") {
        let at = i + off;
        i = at + 4;
        // NameOp may be followed by a root ('\') prefix before the name.
        let named = (at >= 1 && aml[at - 1] == NAME_OP) || (at >= 2 && aml[at - 1] == b'\\' && aml[at - 2] == NAME_OP);
        if !named {
            continue;
        }
        if let Some(v) = parse_package(&aml[at + 4..]) {
            return Some(v);
        }
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_package(b: &[u8]) -> Option<(u8, u8)> {
    if *b.first()? != PACKAGE_OP {
        return None;
    }
    // PkgLength: the top two bits of the lead byte count the extra bytes.
    let lead = *b.get(1)?;
    let extra = (lead >> 6) as usize;
    let mut p = 2 + extra; // past PackageOp and PkgLength
    let count = *b.get(p)?;
    p += 1;
    if count < 1 {
        return None;
    }
    let (a, used) = integer(b.get(p..)?)?;
    p += used;
    let bval = if count >= 2 { integer(b.get(p..)?).map(|(v, _)| v)? } else { 0 };
    Some((a as u8, bval as u8))
}

/// A small integer term and the bytes it took.
fn integer(b: &[u8]) -> Option<(u64, usize)> {
    match *b.first()? {
        ZERO_OP => Some((0, 1)),
        ONE_OP => Some((1, 1)),
        BYTE_PREFIX => Some((*b.get(1)? as u64, 2)),
        WORD_PREFIX => Some((u16::from_le_bytes([*b.get(1)?, *b.get(2)?]) as u64, 3)),
        DWORD_PREFIX => {
            let v = b.get(1..5)?;
            Some((u32::from_le_bytes([v[0], v[1], v[2], v[3]]) as u64, 5))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_q35_style_zero_ops() {
        // Name(_S5_, Package(4){Zero, Zero, Zero, Zero})
        let aml = [0x10, 0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0, 0, 0, 0];
        assert_eq!(find_s5(&aml), Some((0, 0)));
    }

    #[test]
    fn byte_prefixed_values_and_root_prefix() {
        // Name(\_S5_, Package(2){0x07, 0x05}) preceded by an unrelated "_S5_"
        let aml = [
            b'_', b'S', b'5', b'_', 0xff, 0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x07, 0x02, 0x0a, 0x07, 0x0a, 0x05,
        ];
        assert_eq!(find_s5(&aml), Some((7, 5)));
    }

    #[test]
    fn truncated_or_absent_package_is_none() {
        assert_eq!(find_s5(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x06]), None);
        assert_eq!(find_s5(&[0x08, b'_', b'S', b'4', b'_', 0x12, 0x06, 1, 0]), None);
        assert_eq!(find_s5(&[]), None);
    }
}
