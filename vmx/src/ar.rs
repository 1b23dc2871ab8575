//! Segment access rights: the neutral packed attributes <-> the VMCS
//! access-rights format (SDM Vol. 3C 25.4.1, table 25-2: bits 7:0 as in the
//! descriptor, bits 15:12 = AVL, L, D/B, G, bit 16 = segment unusable).

use vcpu::SegAttrs;

pub const UNUSABLE: u32 = 1 << 16;

pub fn to_vmx(attrs: SegAttrs) -> u32 {
    let a = attrs.0 as u32;
    let ar = (a & 0xff) | ((a & 0xf00) << 4);
    if attrs.present() { ar } else { ar | UNUSABLE }
}

pub fn from_vmx(ar: u32) -> SegAttrs {
    let a = ((ar & 0xff) | ((ar >> 4) & 0xf00)) as u16;
    if ar & UNUSABLE != 0 { SegAttrs(a & !SegAttrs::P) } else { SegAttrs(a) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings() {
        // 64-bit code, DPL 0: type 0xb, S, P, L, G -> 0xa09b in VMX form.
        assert_eq!(to_vmx(SegAttrs::CODE64), 0xa09b);
        assert_eq!(to_vmx(SegAttrs::DATA), 0xc093);
        assert_eq!(to_vmx(SegAttrs::TSS_BUSY), 0x8b);
        assert_eq!(to_vmx(SegAttrs::UNUSABLE), UNUSABLE);
    }

    #[test]
    fn round_trip_every_usable_attribute_value() {
        for a in 0..0x1000u16 {
            let attrs = SegAttrs(a | SegAttrs::P);
            assert_eq!(from_vmx(to_vmx(attrs)), attrs);
        }
        assert!(!from_vmx(UNUSABLE | 0x93).present());
    }
}
