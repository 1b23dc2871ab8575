//! The neutral architectural state of an x86-64 vCPU. Plain data: the same
//! struct is written by VT-x and AMD-V backends, saved in checkpoints and
//! migration streams, and loaded on either vendor.

/// General-purpose registers, in the encoding order of the ModRM register
/// field (SDM Vol. 2A 2.1.5), so an instruction's register number indexes
/// them directly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Gprs {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

impl Gprs {
    /// Register `n` (0 = RAX ... 15 = R15).
    pub fn get(&self, n: u8) -> u64 {
        self.as_array()[(n & 15) as usize]
    }

    pub fn set(&mut self, n: u8, v: u64) {
        self.as_array_mut()[(n & 15) as usize] = v;
    }

    fn as_array(&self) -> &[u64; 16] {
        // SAFETY: Gprs is repr(C) with exactly sixteen u64 fields and no
        // padding, so it has the layout of [u64; 16].
        unsafe { &*(self as *const Gprs as *const [u64; 16]) }
    }

    fn as_array_mut(&mut self) -> &mut [u64; 16] {
        // SAFETY: as in `as_array`.
        unsafe { &mut *(self as *mut Gprs as *mut [u64; 16]) }
    }
}

const _: () = assert!(core::mem::size_of::<Gprs>() == 16 * 8);

/// Segment attributes in the packed form of descriptor bits 40..47 and
/// 52..55 (type, S, DPL, P, AVL, L, D/B, G) — the AMD VMCB layout; VT-x's
/// access-rights field is the same bits with a gap (SDM Vol. 3C 25.4.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegAttrs(pub u16);

impl SegAttrs {
    pub const ACCESSED: u16 = 1;
    pub const S: u16 = 1 << 4;
    pub const P: u16 = 1 << 7;
    pub const L: u16 = 1 << 9;
    pub const DB: u16 = 1 << 10;
    pub const G: u16 = 1 << 11;

    pub fn seg_type(self) -> u8 {
        (self.0 & 0xf) as u8
    }
    pub fn dpl(self) -> u8 {
        ((self.0 >> 5) & 3) as u8
    }
    pub fn present(self) -> bool {
        self.0 & Self::P != 0
    }
    pub fn long(self) -> bool {
        self.0 & Self::L != 0
    }
    pub fn db(self) -> bool {
        self.0 & Self::DB != 0
    }
    pub fn granularity(self) -> bool {
        self.0 & Self::G != 0
    }
    pub fn system(self) -> bool {
        self.0 & Self::S == 0
    }

    /// Flat 64-bit code: execute/read, accessed, S, P, L.
    pub const CODE64: SegAttrs = SegAttrs(0xb | Self::S | Self::P | Self::L | Self::G);
    /// Flat 32-bit code: execute/read, accessed, S, P, D, G.
    pub const CODE32: SegAttrs = SegAttrs(0xb | Self::S | Self::P | Self::DB | Self::G);
    /// Flat data: read/write, accessed, S, P, D/B, G.
    pub const DATA: SegAttrs = SegAttrs(0x3 | Self::S | Self::P | Self::DB | Self::G);
    /// A busy 64-bit (or 32-bit) TSS.
    pub const TSS_BUSY: SegAttrs = SegAttrs(0xb | Self::P);
    /// An LDT.
    pub const LDT: SegAttrs = SegAttrs(0x2 | Self::P);
    /// Not present: the segment register is unusable.
    pub const UNUSABLE: SegAttrs = SegAttrs(0);
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub attrs: SegAttrs,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activity {
    #[default]
    Active,
    /// Stopped in HLT until an event arrives.
    Halted,
}

/// Something delivered to the guest through its IDT at the next entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A hardware exception; the error code when the vector takes one.
    Exception {
        vector: u8,
        error_code: Option<u32>,
    },
    /// An external interrupt.
    Interrupt {
        vector: u8,
    },
    Nmi,
}

impl Event {
    /// #GP(0), what the guest gets for a refused MSR access.
    pub const GP0: Event = Event::Exception { vector: 13, error_code: Some(0) };
    /// #UD.
    pub const UD: Event = Event::Exception { vector: 6, error_code: None };
}

/// Everything needed to resume a vCPU elsewhere.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestState {
    pub gprs: Gprs,
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub dr6: u64,
    pub dr7: u64,
    pub efer: u64,
    pub pat: u64,
    pub es: Segment,
    pub cs: Segment,
    pub ss: Segment,
    pub ds: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ldtr: Segment,
    pub tr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub activity: Activity,
    /// Interrupts blocked for one instruction (after STI or MOV SS).
    pub interrupt_shadow: bool,
    /// An event injected but not yet delivered.
    pub pending_event: Option<Event>,
}

/// Architectural constants the backends and state builders share.
pub mod bits {
    pub const CR0_PE: u64 = 1;
    pub const CR0_MP: u64 = 1 << 1;
    pub const CR0_ET: u64 = 1 << 4;
    pub const CR0_NE: u64 = 1 << 5;
    pub const CR0_WP: u64 = 1 << 16;
    pub const CR0_NW: u64 = 1 << 29;
    pub const CR0_CD: u64 = 1 << 30;
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_PGE: u64 = 1 << 7;
    pub const CR4_VMXE: u64 = 1 << 13;
    pub const EFER_SCE: u64 = 1;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
    pub const EFER_NXE: u64 = 1 << 11;
    pub const EFER_SVME: u64 = 1 << 12;
    pub const RFLAGS_FIXED: u64 = 1 << 1;
    pub const RFLAGS_IF: u64 = 1 << 9;
    /// The power-on PAT: WB, WT, UC-, UC repeated (SDM Vol. 3A 13.12.4).
    pub const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;
}

impl GuestState {
    pub fn long_mode(&self) -> bool {
        self.efer & bits::EFER_LMA != 0
    }

    pub fn interrupts_enabled(&self) -> bool {
        self.rflags & bits::RFLAGS_IF != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpr_numbers_follow_the_modrm_encoding() {
        let mut g = Gprs::default();
        for n in 0..16 {
            g.set(n, 100 + n as u64);
        }
        assert_eq!(g.rax, 100);
        assert_eq!(g.rcx, 101);
        assert_eq!(g.rsp, 104);
        assert_eq!(g.rdi, 107);
        assert_eq!(g.r15, 115);
        assert_eq!(g.get(10), 110);
        assert_eq!(g.get(16 + 3), g.rbx, "only the low four bits select a register");
    }

    #[test]
    fn segment_attribute_presets_decode() {
        assert!(SegAttrs::CODE64.long() && SegAttrs::CODE64.present() && !SegAttrs::CODE64.system());
        assert_eq!(SegAttrs::CODE64.seg_type(), 0xb);
        assert!(SegAttrs::TSS_BUSY.system() && SegAttrs::TSS_BUSY.seg_type() == 11);
        assert!(!SegAttrs::UNUSABLE.present());
        assert_eq!(SegAttrs(3 << 5).dpl(), 3);
    }
}
