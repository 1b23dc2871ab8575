//! The neutral architectural state of an x86-64 vCPU. Plain data: the same
//! struct is written by VT-x and AMD-V backends, saved in checkpoints and
//! migration streams (serde), and loaded on either vendor.

use alloc::format;
use alloc::string::String;
use serde::{Deserialize, Serialize};

pub use crate::events::{Blocking, Event, EventQueue};

/// General-purpose registers, in the encoding order of the ModRM register
/// field (SDM Vol. 2A 2.1.5), so an instruction's register number indexes
/// them directly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub attrs: SegAttrs,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// What the vCPU is doing between instructions (SDM Vol. 3C 25.4.2,
/// "activity state").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activity {
    #[default]
    Active,
    /// Stopped in HLT until an event arrives.
    Halted,
    /// After INIT, an application processor waits for a startup IPI
    /// (SDM Vol. 3A 11.4; VT-x activity state 3).
    WaitForSipi,
}

/// x87, MMX and SSE state: the FXSAVE legacy region (SDM Vol. 1 10.5.1,
/// table 10-2; APM Vol. 2 11.4.4) as fields, so a state saved on one
/// vendor loads on the other without either's image layout.
///
/// Format version 1: the legacy region only, what both backends switch
/// with FXSAVE64/FXRSTOR64 today; XCR0 may enable only x87 and SSE
/// ([`XCR0_SUPPORTED`]). When guests get AVX and beyond, their XSAVE
/// components join as a further field (the XSAVE standard-format extended
/// region), in a new version of the state stream; these fields stay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fpu {
    pub fcw: u16,
    pub fsw: u16,
    /// The abridged tag word: one bit per register, 1 = valid.
    pub ftw: u8,
    pub fop: u16,
    /// Last x87 instruction and operand pointers (64-bit format).
    pub fip: u64,
    pub fdp: u64,
    pub mxcsr: u32,
    /// ST0-ST7 (MM0-MM7): 80 bits each, low byte first.
    pub st: [[u8; 10]; 8],
    pub xmm: [[u8; 16]; 16],
}

/// XCR0 bits the state can hold: x87 and SSE, the components of the
/// FXSAVE image (SDM Vol. 1 13.3). Guests get no more until [`Fpu`] carries
/// the XSAVE components (their AVX registers would otherwise leak between
/// VMs).
pub const XCR0_SUPPORTED: u64 = 0b11;

impl Default for Fpu {
    /// The state after FNINIT and reset: FCW 0x37f, MXCSR 0x1f80 (SDM Vol. 1
    /// 8.1.5, 10.2.3.1), everything else zero.
    fn default() -> Fpu {
        Fpu { fcw: 0x37f, fsw: 0, ftw: 0, fop: 0, fip: 0, fdp: 0, mxcsr: 0x1f80, st: [[0; 10]; 8], xmm: [[0; 16]; 16] }
    }
}

impl Fpu {
    /// The FXSAVE64 image (MXCSR_MASK and reserved bytes zero: FXRSTOR
    /// ignores them).
    pub fn to_fxsave(&self) -> [u8; 512] {
        let mut a = [0u8; 512];
        a[0..2].copy_from_slice(&self.fcw.to_le_bytes());
        a[2..4].copy_from_slice(&self.fsw.to_le_bytes());
        a[4] = self.ftw;
        a[6..8].copy_from_slice(&self.fop.to_le_bytes());
        a[8..16].copy_from_slice(&self.fip.to_le_bytes());
        a[16..24].copy_from_slice(&self.fdp.to_le_bytes());
        a[24..28].copy_from_slice(&self.mxcsr.to_le_bytes());
        for (i, r) in self.st.iter().enumerate() {
            a[32 + 16 * i..42 + 16 * i].copy_from_slice(r);
        }
        for (i, r) in self.xmm.iter().enumerate() {
            a[160 + 16 * i..176 + 16 * i].copy_from_slice(r);
        }
        a
    }

    /// The state an FXSAVE64 image holds.
    pub fn from_fxsave(a: &[u8; 512]) -> Fpu {
        let u16_at = |o: usize| u16::from_le_bytes([a[o], a[o + 1]]);
        let u64_at = |o: usize| u64::from_le_bytes(a[o..o + 8].try_into().unwrap_or([0; 8]));
        let mut f = Fpu {
            fcw: u16_at(0),
            fsw: u16_at(2),
            ftw: a[4],
            fop: u16_at(6),
            fip: u64_at(8),
            fdp: u64_at(16),
            mxcsr: u32::from_le_bytes([a[24], a[25], a[26], a[27]]),
            st: [[0; 10]; 8],
            xmm: [[0; 16]; 16],
        };
        for (i, r) in f.st.iter_mut().enumerate() {
            r.copy_from_slice(&a[32 + 16 * i..42 + 16 * i]);
        }
        for (i, r) in f.xmm.iter_mut().enumerate() {
            r.copy_from_slice(&a[160 + 16 * i..176 + 16 * i]);
        }
        f
    }
}

/// Everything needed to resume a vCPU elsewhere: one neutral form for both
/// vendors. What a backend holds outside its VMCS/VMCB (CR2 and DR0-DR3 on
/// VT-x, DR0-DR3 and the lazily switched MSRs, the FPU, XCR0, the event
/// queue) is part of it as much as the rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestState {
    pub gprs: Gprs,
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// CR8, the task-priority register (bits 3:0).
    pub cr8: u64,
    /// DR0-DR3: breakpoint addresses.
    pub dr: [u64; 4],
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
    /// IA32_TSC_AUX, what RDTSCP and RDPID read (by convention the vCPU's
    /// number).
    pub tsc_aux: u64,
    /// XCR0 (XSETBV's register 0): which state components XSAVE manages.
    pub xcr0: u64,
    pub fpu: Fpu,
    /// What the guest's time-stamp counter reads minus the host's (wrapping):
    /// the hardware adds it to RDTSC, RDTSCP and RDMSR of IA32_TSC. A state
    /// moved to another host needs the offset recomputed from the guest TSC
    /// it had (host TSCs differ); within one host it is the guest's clock.
    pub tsc_offset: u64,
    pub activity: Activity,
    /// Interrupts blocked for one instruction (after STI or MOV SS).
    pub interrupt_shadow: bool,
    /// NMIs blocked: an NMI handler is running and has not executed IRET
    /// (SDM Vol. 3A 6.7.1).
    pub nmi_blocked: bool,
    /// An event whose delivery had begun when the vCPU exited: it is
    /// delivered again first at the next entry, whatever RFLAGS.IF says
    /// (SDM Vol. 3C 28.2.4; APM Vol. 2 15.7.2).
    pub injected_event: Option<Event>,
    /// Events waiting for the guest to be able to take them, delivered one
    /// per entry in the order of SDM Vol. 3A 6.9.
    pub pending_events: EventQueue,
}

impl Default for GuestState {
    /// The architectural reset values where zero is not one: RFLAGS bit 1,
    /// DR6/DR7 (SDM Vol. 3A 18.2), the power-on PAT, XCR0 = x87 and the
    /// FNINIT FPU; everything else zero.
    fn default() -> GuestState {
        GuestState {
            gprs: Gprs::default(),
            rip: 0,
            rflags: bits::RFLAGS_FIXED,
            cr0: 0,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            dr: [0; 4],
            dr6: bits::DR6_FIXED,
            dr7: bits::DR7_FIXED,
            efer: 0,
            pat: bits::PAT_DEFAULT,
            es: Segment::default(),
            cs: Segment::default(),
            ss: Segment::default(),
            ds: Segment::default(),
            fs: Segment::default(),
            gs: Segment::default(),
            ldtr: Segment::default(),
            tr: Segment::default(),
            gdtr: DescriptorTable::default(),
            idtr: DescriptorTable::default(),
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            kernel_gs_base: 0,
            tsc_aux: 0,
            xcr0: 1,
            fpu: Fpu::default(),
            tsc_offset: 0,
            activity: Activity::Active,
            interrupt_shadow: false,
            nmi_blocked: false,
            injected_event: None,
            pending_events: EventQueue::default(),
        }
    }
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
    pub const CR0_TS: u64 = 1 << 3;
    pub const CR4_DE: u64 = 1 << 3;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_MCE: u64 = 1 << 6;
    pub const CR4_PGE: u64 = 1 << 7;
    pub const CR4_OSFXSR: u64 = 1 << 9;
    pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
    pub const CR4_VMXE: u64 = 1 << 13;
    pub const CR4_OSXSAVE: u64 = 1 << 18;
    pub const EFER_SCE: u64 = 1;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
    pub const EFER_NXE: u64 = 1 << 11;
    pub const EFER_SVME: u64 = 1 << 12;
    pub const RFLAGS_FIXED: u64 = 1 << 1;
    pub const RFLAGS_TF: u64 = 1 << 8;
    pub const RFLAGS_IF: u64 = 1 << 9;
    /// DR6 bits that read as 1 (SDM Vol. 3A 18.2.3): the reset value.
    pub const DR6_FIXED: u64 = 0xffff_0ff0;
    /// DR7 bit 10 reads as 1: the reset value.
    pub const DR7_FIXED: u64 = 0x400;
    /// DR7.GD: MOV DR raises #DB (general detect, SDM Vol. 3A 18.2.4).
    pub const DR7_GD: u64 = 1 << 13;
    /// DR6.BD: the #DB was a general detect.
    pub const DR6_BD: u64 = 1 << 13;
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

    /// What keeps the guest from taking an interrupt or an NMI now.
    pub fn blocking(&self) -> Blocking {
        let parked = self.activity == Activity::WaitForSipi;
        let shadow = self.interrupt_shadow || parked;
        Blocking { interrupt: !self.interrupts_enabled() || shadow, nmi: self.nmi_blocked || shadow }
    }

    /// The rules both backends apply before taking a state, beyond their
    /// VMCS/VMCB entry checks: values the hardware would refuse to load
    /// (MOV DR, XSETBV, FXRSTOR and WRMSR fault on them), and events it
    /// could not deliver (SDM Vol. 3C 27.3.1.5; APM Vol. 2 15.20).
    /// `mxcsr_mask` is the host's (FXSAVE's MXCSR_MASK).
    pub fn check_neutral(&self, mxcsr_mask: u32) -> Result<(), String> {
        let canonical = |a: u64| {
            let top = (a as i64) >> 47;
            top == 0 || top == -1
        };
        if let Some(n) = self.dr.iter().position(|&a| !canonical(a)) {
            return Err(format!("DR{n} {:#x} is not canonical", self.dr[n]));
        }
        if self.dr6 >> 32 != 0 || self.dr7 >> 32 != 0 {
            return Err(format!("DR6 {:#x} / DR7 {:#x}: bits 63:32 must be zero", self.dr6, self.dr7));
        }
        if self.cr8 > 15 {
            return Err(format!("CR8 {:#x}: only bits 3:0 exist", self.cr8));
        }
        if self.xcr0 & 1 == 0 || self.xcr0 & !XCR0_SUPPORTED != 0 {
            return Err(format!(
                "XCR0 {:#x}: x87 (bit 0) must be set and only x87 and SSE ({XCR0_SUPPORTED:#x}) are supported",
                self.xcr0
            ));
        }
        if self.fpu.mxcsr & !mxcsr_mask != 0 {
            return Err(format!("MXCSR {:#x} sets bits outside MXCSR_MASK {mxcsr_mask:#x}", self.fpu.mxcsr));
        }
        if self.tsc_aux >> 32 != 0 {
            return Err(format!("IA32_TSC_AUX {:#x}: bits 63:32 are reserved", self.tsc_aux));
        }
        self.pending_events.check().map_err(String::from)?;
        if let Some(e) = self.injected_event {
            e.check().map_err(String::from)?;
            let shadow = self.interrupt_shadow;
            match e {
                Event::Interrupt { .. } if !self.interrupts_enabled() || shadow => {
                    return Err(String::from("an external interrupt is injected while RFLAGS.IF = 0 or in a shadow"));
                }
                Event::Nmi if shadow => return Err(String::from("an NMI is injected in an interrupt shadow")),
                _ if self.activity == Activity::WaitForSipi => {
                    return Err(String::from("an event is injected while waiting for a SIPI"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The state INIT leaves (SDM Vol. 3A 10.1.1, table 10-1): real mode at
    /// F000:FFF0 with caches off, waiting for a startup IPI. The FPU, SSE
    /// and the MSRs other than EFER keep their values; pending events go.
    pub fn after_init(&self) -> GuestState {
        let data = Segment { selector: 0, base: 0, limit: 0xffff, attrs: SegAttrs(0x93) };
        GuestState {
            rflags: bits::RFLAGS_FIXED,
            rip: 0xfff0,
            cr0: bits::CR0_CD | bits::CR0_NW | bits::CR0_ET,
            cs: Segment { selector: 0xf000, base: 0xffff_0000, limit: 0xffff, attrs: SegAttrs(0x9b) },
            ss: data,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ldtr: Segment { selector: 0, base: 0, limit: 0xffff, attrs: SegAttrs(0x82) },
            tr: Segment { selector: 0, base: 0, limit: 0xffff, attrs: SegAttrs(0x8b) },
            gdtr: DescriptorTable { base: 0, limit: 0xffff },
            idtr: DescriptorTable { base: 0, limit: 0xffff },
            activity: Activity::WaitForSipi,
            pat: self.pat,
            sysenter_cs: self.sysenter_cs,
            sysenter_esp: self.sysenter_esp,
            sysenter_eip: self.sysenter_eip,
            star: self.star,
            lstar: self.lstar,
            cstar: self.cstar,
            sfmask: self.sfmask,
            kernel_gs_base: self.kernel_gs_base,
            tsc_aux: self.tsc_aux,
            tsc_offset: self.tsc_offset,
            xcr0: self.xcr0,
            fpu: self.fpu,
            ..GuestState::default()
        }
    }

    /// A startup IPI with vector `vv` starts a waiting vCPU in real mode at
    /// 0VV00:0000, physical 0x000VV000 (SDM Vol. 3A 11.4.4.1).
    pub fn start_at_sipi(&mut self, vv: u8) {
        self.cs.selector = (vv as u16) << 8;
        self.cs.base = (vv as u64) << 12;
        self.rip = 0;
        self.activity = Activity::Active;
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
    fn fxsave_image_round_trips_and_has_the_manual_layout() {
        let mut f = Fpu {
            fcw: 0x27f,
            fsw: 0x3800,
            ftw: 0x81,
            fop: 0x5d9,
            fip: 0x1234_5678_9abc,
            fdp: 0xfed,
            mxcsr: 0x9fc0,
            ..Fpu::default()
        };
        f.st[7] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        f.xmm[15] = [0xee; 16];
        let img = f.to_fxsave();
        assert_eq!(Fpu::from_fxsave(&img), f);
        assert_eq!(&img[0..2], &[0x7f, 0x02]);
        assert_eq!(img[4], 0x81);
        assert_eq!(&img[24..28], &0x9fc0u32.to_le_bytes());
        assert_eq!(img[32 + 7 * 16], 1, "ST7 at 144");
        assert_eq!(img[160 + 15 * 16], 0xee, "XMM15 at 400");
        assert_eq!(&img[28..32], &[0; 4], "MXCSR_MASK left to the CPU");
    }

    #[test]
    fn defaults_are_the_reset_values() {
        let s = GuestState::default();
        assert_eq!((s.dr6, s.dr7, s.pat, s.xcr0, s.rflags), (0xffff_0ff0, 0x400, bits::PAT_DEFAULT, 1, 2));
        assert_eq!((s.fpu.fcw, s.fpu.mxcsr), (0x37f, 0x1f80));
        assert_eq!(s.check_neutral(0xffff), Ok(()));
    }

    #[test]
    fn neutral_checks_name_what_no_cpu_would_load() {
        let bad = |f: &dyn Fn(&mut GuestState), needle: &str| {
            let mut s = GuestState::default();
            f(&mut s);
            let e = s.check_neutral(0xffbf).unwrap_err();
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
        };
        bad(&|s| s.dr[2] = 0x0000_8000_0000_0000, "DR2");
        bad(&|s| s.dr6 = 1 << 40, "DR6");
        bad(&|s| s.cr8 = 16, "CR8");
        bad(&|s| s.xcr0 = 0, "XCR0");
        bad(&|s| s.xcr0 = 7, "XCR0");
        bad(&|s| s.fpu.mxcsr = 1 << 6, "MXCSR");
        bad(&|s| s.tsc_aux = 1 << 32, "TSC_AUX");
        bad(&|s| s.injected_event = Some(Event::Interrupt { vector: 0x30 }), "RFLAGS.IF");
        bad(
            &|s| {
                s.rflags |= bits::RFLAGS_IF;
                s.interrupt_shadow = true;
                s.injected_event = Some(Event::Nmi)
            },
            "shadow",
        );
        bad(&|s| s.injected_event = Some(Event::Exception { vector: 2, error_code: None }), "vector");
        bad(
            &|s| {
                s.pending_events.push(Event::SoftwareInterrupt { vector: 0x80, len: 16 });
            },
            "software interrupt",
        );
    }

    #[test]
    fn the_whole_state_serializes_and_comes_back() {
        let mut s = GuestState {
            cr8: 3,
            dr: [1, 2, 3, 4],
            xcr0: 3,
            tsc_aux: 9,
            tsc_offset: u64::MAX - 5,
            ..Default::default()
        };
        s.fpu.xmm[3] = [0x5a; 16];
        s.activity = Activity::Halted;
        s.nmi_blocked = true;
        s.injected_event = Some(Event::SoftwareInterrupt { vector: 0x80, len: 2 });
        s.pending_events.push(Event::Exception { vector: 14, error_code: Some(2) });
        s.pending_events.push(Event::Interrupt { vector: 0x30 });
        let bytes = postcard::to_allocvec(&s).unwrap();
        let back: GuestState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, s);
        assert!(postcard::from_bytes::<GuestState>(&bytes[..bytes.len() - 1]).is_err(), "a truncated state is refused");
    }

    #[test]
    fn init_then_sipi() {
        let mut s = GuestState {
            cr0: bits::CR0_PE | bits::CR0_PG,
            lstar: 0xffff_8000_0000_1000,
            rip: 0x1234,
            ..Default::default()
        };
        s.pending_events.push(Event::GP0);
        let mut i = s.after_init();
        assert_eq!((i.rip, i.cs.base, i.cs.selector, i.cr0), (0xfff0, 0xffff_0000, 0xf000, 0x6000_0010));
        assert_eq!(i.activity, Activity::WaitForSipi);
        assert_eq!(i.lstar, s.lstar, "MSRs survive INIT");
        assert!(i.pending_events.is_empty());
        assert_eq!(i.blocking(), Blocking { interrupt: true, nmi: true }, "nothing is delivered while waiting");
        i.start_at_sipi(0x9a);
        assert_eq!((i.cs.selector, i.cs.base, i.rip, i.activity), (0x9a00, 0x9a000, 0, Activity::Active));
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
