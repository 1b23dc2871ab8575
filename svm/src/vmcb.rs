//! The VMCB: one 4 KiB page, a control area at 0x000 and the guest's state
//! save area at 0x400 (APM Vol. 2 appendix B, tables B-1 and B-2). Fields
//! are at fixed offsets, read and written with ordinary (volatile) memory
//! accesses — the CPU reads the page at VMRUN and writes it at #VMEXIT.

use vcpu::{DescriptorTable, Event, GuestState, SegAttrs, Segment};

/// Control-area offsets (table B-1).
pub mod ctl {
    pub const INTERCEPT_CR: usize = 0x000;
    pub const INTERCEPT_DR: usize = 0x004;
    pub const INTERCEPT_EXCEPTIONS: usize = 0x008;
    pub const INTERCEPT_MISC1: usize = 0x00c;
    pub const INTERCEPT_MISC2: usize = 0x010;
    pub const IOPM_BASE_PA: usize = 0x040;
    pub const MSRPM_BASE_PA: usize = 0x048;
    pub const TSC_OFFSET: usize = 0x050;
    pub const GUEST_ASID: usize = 0x058;
    pub const TLB_CONTROL: usize = 0x05c;
    pub const VINTR: usize = 0x060;
    pub const INTERRUPT_SHADOW: usize = 0x068;
    pub const EXIT_CODE: usize = 0x070;
    pub const EXIT_INFO1: usize = 0x078;
    pub const EXIT_INFO2: usize = 0x080;
    pub const EXIT_INT_INFO: usize = 0x088;
    pub const NP_ENABLE: usize = 0x090;
    pub const EVENT_INJ: usize = 0x0a8;
    pub const N_CR3: usize = 0x0b0;
    pub const CLEAN_BITS: usize = 0x0c0;
    pub const NEXT_RIP: usize = 0x0c8;
    pub const INSN_LEN: usize = 0x0d0;
    pub const INSN_BYTES: usize = 0x0d1;
}

/// State-save-area offsets (table B-2, from the start of the page).
pub mod save {
    pub const ES: usize = 0x400;
    pub const CS: usize = 0x410;
    pub const SS: usize = 0x420;
    pub const DS: usize = 0x430;
    pub const FS: usize = 0x440;
    pub const GS: usize = 0x450;
    pub const GDTR: usize = 0x460;
    pub const LDTR: usize = 0x470;
    pub const IDTR: usize = 0x480;
    pub const TR: usize = 0x490;
    pub const CPL: usize = 0x4cb;
    pub const EFER: usize = 0x4d0;
    pub const CR4: usize = 0x548;
    pub const CR3: usize = 0x550;
    pub const CR0: usize = 0x558;
    pub const DR7: usize = 0x560;
    pub const DR6: usize = 0x568;
    pub const RFLAGS: usize = 0x570;
    pub const RIP: usize = 0x578;
    pub const RSP: usize = 0x5d8;
    pub const RAX: usize = 0x5f8;
    pub const STAR: usize = 0x600;
    pub const LSTAR: usize = 0x608;
    pub const CSTAR: usize = 0x610;
    pub const SFMASK: usize = 0x618;
    pub const KERNEL_GS_BASE: usize = 0x620;
    pub const SYSENTER_CS: usize = 0x628;
    pub const SYSENTER_ESP: usize = 0x630;
    pub const SYSENTER_EIP: usize = 0x638;
    pub const CR2: usize = 0x640;
    pub const G_PAT: usize = 0x668;
}

/// Intercept bits of the first misc vector (offset 0x00c).
pub mod misc1 {
    pub const INTR: u32 = 1 << 0;
    pub const NMI: u32 = 1 << 1;
    /// INIT: the neutral layer models it (the vCPU waits for a SIPI).
    pub const INIT: u32 = 1 << 3;
    /// VINTR: the interrupt window (a pending V_IRQ the guest could take).
    pub const VINTR: u32 = 1 << 4;
    pub const CPUID: u32 = 1 << 18;
    /// IRET: set while the guest's NMIs are blocked, to see the handler end
    /// (AMD-V has no NMI-window intercept).
    pub const IRET: u32 = 1 << 20;
    pub const INVD: u32 = 1 << 22;
    pub const HLT: u32 = 1 << 24;
    /// INVLPGA: the guest runs with EFER.SVME set (VMRUN requires it), so
    /// without this intercept it could drop TLB entries of any ASID, the
    /// host's included, and learn that SVM is there.
    pub const INVLPGA: u32 = 1 << 26;
    pub const IOIO_PROT: u32 = 1 << 27;
    pub const MSR_PROT: u32 = 1 << 28;
    pub const TASK_SWITCH: u32 = 1 << 29;
    pub const SHUTDOWN: u32 = 1 << 31;

    /// What every guest runs with.
    /// PAUSE is not intercepted: a VM has one vCPU, so a spinning guest
    /// waits for nothing another vCPU of its own could do sooner; with SMP
    /// guests the pause filter (APM 15.14.4) is the tool.
    pub const GUEST: u32 =
        INTR | NMI | INIT | CPUID | INVD | HLT | INVLPGA | IOIO_PROT | MSR_PROT | TASK_SWITCH | SHUTDOWN;
}

/// Intercept bits of the second misc vector (offset 0x010).
pub mod misc2 {
    pub const VMRUN: u32 = 1 << 0;
    pub const VMMCALL: u32 = 1 << 1;
    pub const VMLOAD: u32 = 1 << 2;
    pub const VMSAVE: u32 = 1 << 3;
    pub const STGI: u32 = 1 << 4;
    pub const CLGI: u32 = 1 << 5;
    pub const SKINIT: u32 = 1 << 6;
    pub const ICEBP: u32 = 1 << 8;
    /// WBINVD (and WBNOINVD): completed by skipping it.
    pub const WBINVD: u32 = 1 << 9;
    pub const MONITOR: u32 = 1 << 10;
    pub const MWAIT: u32 = 1 << 11;
    pub const MWAIT_ARMED: u32 = 1 << 12;
    pub const XSETBV: u32 = 1 << 13;
    pub const RDPRU: u32 = 1 << 14;

    /// What every guest runs with: VMRUN must be intercepted (APM 15.5.1),
    /// and with it every other SVM instruction, which the guest could run
    /// because its EFER.SVME is set (APM 15.9); VMMCALL is the hypercall.
    /// INVLPGA is in the first vector.
    pub const GUEST: u32 = VMRUN
        | VMMCALL
        | VMLOAD
        | VMSAVE
        | STGI
        | CLGI
        | SKINIT
        | WBINVD
        | MONITOR
        | MWAIT
        | MWAIT_ARMED
        | XSETBV
        | RDPRU;
}

/// Debug-register intercepts (offset 0x004): reads of DR0-DR7 in bits 7:0,
/// writes in bits 23:16. DR0-DR3 are not in the VMCB, so every MOV DR
/// exits and the vCPU's copies are always the guest's.
pub const INTERCEPT_DR_ALL: u32 = 0x00ff_00ff;

/// The VINTR field (offset 0x060, APM Vol. 2 table B-1, 15.21): V_TPR in
/// bits 3:0 (the guest's CR8 with V_INTR_MASKING), V_IRQ bit 8, V_INTR_PRIO
/// 19:16, V_IGN_TPR bit 20.
pub mod vintr {
    pub const TPR: u64 = 0xf;
    pub const IRQ: u64 = 1 << 8;
    pub const PRIO: u64 = 0xf << 16;
    pub const IGN_TPR: u64 = 1 << 20;
}

/// V_INTR_MASKING (offset 0x060 bit 24): the guest's RFLAGS.IF masks only
/// virtual interrupts; physical ones stay the host's (APM 15.21.1).
pub const VINTR_MASKING: u64 = 1 << 24;
/// TLB_CONTROL 1: flush every ASID's entries at VMRUN (the only flush a CPU
/// without flush-by-ASID offers).
pub const TLB_FLUSH_ALL: u8 = 1;
/// TLB_CONTROL 3: flush this guest's ASID only (needs FlushByAsid).
pub const TLB_FLUSH_ASID: u8 = 3;

/// EVENTINJ / EXITINTINFO format (APM 15.20): vector 7:0, type 10:8,
/// error-code valid 11, valid 31, error code 63:32.
pub mod event {
    pub const VALID: u64 = 1 << 31;
    pub const EV: u64 = 1 << 11;
    pub const TYPE_INTR: u64 = 0;
    pub const TYPE_NMI: u64 = 2;
    pub const TYPE_EXCEPTION: u64 = 3;
    pub const TYPE_SOFT_INT: u64 = 4;
}

/// Encodes an event for EVENTINJ (APM 15.20); `protected_mode` decides
/// whether an exception pushes its error code. INT3, INTO and INT1 (one
/// byte, vectors 3, 4, 1) go in as exceptions, other software interrupts as
/// type 4; for both the caller has moved RIP past the instruction, since
/// without next-RIP saving the CPU pushes RIP as it is.
pub fn encode_event(ev: Event, protected_mode: bool) -> u64 {
    use event::*;
    match ev {
        Event::Exception { vector, .. } => {
            let mut v = VALID | (TYPE_EXCEPTION << 8) | vector as u64;
            if let Some(c) = ev.delivered_error_code(protected_mode) {
                v |= EV | ((c as u64) << 32);
            }
            v
        }
        Event::Interrupt { vector } => VALID | (TYPE_INTR << 8) | vector as u64,
        Event::Nmi => VALID | (TYPE_NMI << 8) | 2,
        Event::SoftwareInterrupt { vector, len: 1 } if matches!(vector, 1 | 3 | 4) => {
            VALID | (TYPE_EXCEPTION << 8) | vector as u64
        }
        Event::SoftwareInterrupt { vector, .. } => VALID | (TYPE_SOFT_INT << 8) | vector as u64,
    }
}

/// Whether an EVENTINJ value injects an external interrupt (type 0).
pub fn is_external_interrupt(v: u64) -> bool {
    v & (event::VALID | 0x700) == event::VALID | (event::TYPE_INTR << 8)
}

/// Decodes EXITINTINFO; `None` when not valid. A software interrupt comes
/// back with length 0: only the caller knows it (see `SvmVcpu`).
pub fn decode_event(v: u64) -> Option<Event> {
    use event::*;
    if v & VALID == 0 {
        return None;
    }
    let vector = v as u8;
    Some(match (v >> 8) & 7 {
        TYPE_NMI => Event::Nmi,
        TYPE_EXCEPTION => Event::Exception { vector, error_code: (v & EV != 0).then_some((v >> 32) as u32) },
        TYPE_SOFT_INT => Event::SoftwareInterrupt { vector, len: 0 },
        _ => Event::Interrupt { vector },
    })
}

/// A VMCB page seen through a pointer.
///
/// All accesses are volatile: the CPU writes the page at every #VMEXIT.
#[derive(Clone, Copy, Debug)]
pub struct Vmcb {
    base: *mut u8,
}

impl Vmcb {
    /// # Safety
    /// `base` points to a 4 KiB VMCB page, valid for reads and writes for as
    /// long as this value (and its copies) are used.
    pub unsafe fn new(base: *mut u8) -> Vmcb {
        Vmcb { base }
    }

    #[inline(always)]
    pub fn read<T: Copy>(&self, off: usize) -> T {
        debug_assert!(off + core::mem::size_of::<T>() <= 4096);
        // SAFETY: in bounds of the page (`new`'s contract); every field is
        // naturally aligned in the layout and the page is 4 KiB-aligned.
        unsafe { core::ptr::read_volatile(self.base.add(off) as *const T) }
    }

    #[inline(always)]
    pub fn write<T: Copy>(&mut self, off: usize, v: T) {
        debug_assert!(off + core::mem::size_of::<T>() <= 4096);
        // SAFETY: in bounds of the page; every field is naturally aligned in
        // the layout and the page is 4 KiB-aligned.
        unsafe { core::ptr::write_volatile(self.base.add(off) as *mut T, v) }
    }

    pub fn u64(&self, off: usize) -> u64 {
        self.read(off)
    }

    pub fn set_u64(&mut self, off: usize, v: u64) {
        self.write(off, v)
    }

    pub fn segment(&self, off: usize) -> Segment {
        Segment {
            selector: self.read(off),
            attrs: SegAttrs(self.read::<u16>(off + 2) & 0xfff),
            limit: self.read(off + 4),
            base: self.read(off + 8),
        }
    }

    pub fn set_segment(&mut self, off: usize, s: &Segment) {
        self.write(off, s.selector);
        self.write(off + 2, s.attrs.0 & 0xfff);
        self.write(off + 4, s.limit);
        self.write(off + 8, s.base);
    }

    fn table(&self, off: usize) -> DescriptorTable {
        DescriptorTable { limit: self.read::<u32>(off + 4) as u16, base: self.read(off + 8) }
    }

    fn set_table(&mut self, off: usize, t: &DescriptorTable) {
        self.write(off + 4, t.limit as u32);
        self.write(off + 8, t.base);
    }

    /// The guest's architectural state as the VMCB holds it, except the
    /// general-purpose registers other than RAX and RSP (the caller's),
    /// EFER.SVME (the host's requirement, not the guest's state) and what
    /// the VMCB does not hold (DR0-DR3, XCR0, TSC_AUX, the FPU, the activity
    /// state, NMI blocking and events: the vCPU's).
    pub fn store_state(&self, s: &mut GuestState) {
        use save::*;
        s.es = self.segment(ES);
        s.cs = self.segment(CS);
        s.ss = self.segment(SS);
        s.ds = self.segment(DS);
        s.fs = self.segment(FS);
        s.gs = self.segment(GS);
        s.ldtr = self.segment(LDTR);
        s.tr = self.segment(TR);
        s.gdtr = self.table(GDTR);
        s.idtr = self.table(IDTR);
        s.efer = self.u64(EFER) & !vcpu::state::bits::EFER_SVME;
        s.cr0 = self.u64(CR0);
        s.cr2 = self.u64(CR2);
        s.cr3 = self.u64(CR3);
        s.cr4 = self.u64(CR4);
        s.cr8 = self.u64(ctl::VINTR) & vintr::TPR;
        s.dr6 = self.u64(DR6);
        s.dr7 = self.u64(DR7);
        s.rflags = self.u64(RFLAGS);
        s.rip = self.u64(RIP);
        s.gprs.rsp = self.u64(RSP);
        s.gprs.rax = self.u64(RAX);
        s.star = self.u64(STAR);
        s.lstar = self.u64(LSTAR);
        s.cstar = self.u64(CSTAR);
        s.sfmask = self.u64(SFMASK);
        s.kernel_gs_base = self.u64(KERNEL_GS_BASE);
        s.sysenter_cs = self.u64(SYSENTER_CS);
        s.sysenter_esp = self.u64(SYSENTER_ESP);
        s.sysenter_eip = self.u64(SYSENTER_EIP);
        s.pat = self.u64(G_PAT);
        s.tsc_offset = self.u64(ctl::TSC_OFFSET);
        s.interrupt_shadow = self.u64(ctl::INTERRUPT_SHADOW) & 1 != 0;
    }

    /// Writes `s` into the state save area (RAX and RSP included); EFER
    /// gets SVME, which VMRUN requires of every guest (APM 15.5.1).
    pub fn load_state(&mut self, s: &GuestState) {
        use save::*;
        use vcpu::state::bits::*;
        self.set_segment(ES, &s.es);
        self.set_segment(CS, &s.cs);
        self.set_segment(SS, &s.ss);
        self.set_segment(DS, &s.ds);
        self.set_segment(FS, &s.fs);
        self.set_segment(GS, &s.gs);
        self.set_segment(LDTR, &s.ldtr);
        self.set_segment(TR, &s.tr);
        self.set_table(GDTR, &s.gdtr);
        self.set_table(IDTR, &s.idtr);
        // The CPL is SS.DPL in protected mode and 0 in real mode (APM 15.5).
        let cpl = if s.cr0 & CR0_PE != 0 { s.ss.attrs.dpl() } else { 0 };
        self.write(CPL, cpl);
        self.set_u64(EFER, s.efer | EFER_SVME);
        self.set_u64(CR0, s.cr0);
        self.set_u64(CR2, s.cr2);
        self.set_u64(CR3, s.cr3);
        self.set_u64(CR4, s.cr4);
        let v = self.u64(ctl::VINTR);
        self.set_u64(ctl::VINTR, (v & !vintr::TPR) | (s.cr8 & vintr::TPR));
        self.set_u64(DR6, s.dr6);
        self.set_u64(DR7, s.dr7);
        self.set_u64(RFLAGS, s.rflags | RFLAGS_FIXED);
        self.set_u64(RIP, s.rip);
        self.set_u64(RSP, s.gprs.rsp);
        self.set_u64(RAX, s.gprs.rax);
        self.set_u64(STAR, s.star);
        self.set_u64(LSTAR, s.lstar);
        self.set_u64(CSTAR, s.cstar);
        self.set_u64(SFMASK, s.sfmask);
        self.set_u64(KERNEL_GS_BASE, s.kernel_gs_base);
        self.set_u64(SYSENTER_CS, s.sysenter_cs);
        self.set_u64(SYSENTER_ESP, s.sysenter_esp);
        self.set_u64(SYSENTER_EIP, s.sysenter_eip);
        self.set_u64(G_PAT, s.pat);
        self.set_u64(ctl::TSC_OFFSET, s.tsc_offset);
        self.set_u64(ctl::INTERRUPT_SHADOW, s.interrupt_shadow as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcpu::state::bits::*;

    #[repr(C, align(4096))]
    struct Page([u8; 4096]);

    fn page() -> Box<Page> {
        Box::new(Page([0; 4096]))
    }

    fn sample_state() -> GuestState {
        let seg = |sel: u16, attrs| Segment { selector: sel, base: 0x1000 * sel as u64, limit: 0xfffff, attrs };
        let mut s = GuestState {
            rip: 0x10_0000,
            rflags: 0x202,
            cr0: CR0_PE | CR0_PG | CR0_ET | CR0_NE,
            cr2: 0xdead_0000,
            cr3: 0x7000,
            cr4: CR4_PAE,
            dr6: 0xffff_0ff0,
            dr7: 0x400,
            efer: EFER_LME | EFER_LMA | EFER_NXE,
            pat: 0x0007_0406_0007_0406,
            es: seg(0x10, SegAttrs::DATA),
            cs: seg(0x08, SegAttrs::CODE64),
            ss: seg(0x10, SegAttrs(SegAttrs::DATA.0 | (3 << 5))),
            ds: seg(0x10, SegAttrs::DATA),
            fs: seg(0, SegAttrs::UNUSABLE),
            gs: seg(0, SegAttrs::UNUSABLE),
            ldtr: seg(0, SegAttrs::UNUSABLE),
            tr: seg(0x18, SegAttrs::TSS_BUSY),
            gdtr: DescriptorTable { base: 0x5000, limit: 0x27 },
            idtr: DescriptorTable { base: 0x6000, limit: 0xfff },
            sysenter_cs: 8,
            sysenter_esp: 0x9000,
            sysenter_eip: 0xa000,
            star: 1,
            lstar: 2,
            cstar: 3,
            sfmask: 4,
            kernel_gs_base: 5,
            cr8: 7,
            tsc_offset: 0xffff_fff0_0000_1234,
            interrupt_shadow: true,
            ..Default::default()
        };
        s.gprs.rax = 0x1234;
        s.gprs.rsp = 0x8000;
        s
    }

    #[test]
    fn state_round_trips_through_the_save_area() {
        let mut p = page();
        // SAFETY: a live, aligned 4 KiB page owned by this test.
        let mut v = unsafe { Vmcb::new(p.0.as_mut_ptr()) };
        let s = sample_state();
        v.load_state(&s);
        let mut back = GuestState { gprs: s.gprs, ..Default::default() };
        v.store_state(&mut back);
        assert_eq!(back, s);
        assert_eq!((v.u64(save::CR2), back.cr2), (0xdead_0000, 0xdead_0000), "CR2 in and out");
        // The hardware's view differs from the guest's only where it must.
        assert_ne!(v.u64(save::EFER) & EFER_SVME, 0, "VMRUN needs EFER.SVME");
        assert_eq!(v.read::<u8>(save::CPL), 3, "CPL follows SS.DPL");
    }

    #[test]
    fn offsets_match_the_manual() {
        // Spot checks against APM Vol. 2 table B-2 (offsets from 0x400).
        assert_eq!(save::RIP - 0x400, 0x178);
        assert_eq!(save::RAX - 0x400, 0x1f8);
        assert_eq!(save::G_PAT - 0x400, 0x268);
        assert_eq!(save::CPL - 0x400, 0xcb);
        assert_eq!(save::CR2 - 0x400, 0x240, "CR2: VMRUN loads it, #VMEXIT saves it");
        let mut p = page();
        // SAFETY: as above.
        let mut v = unsafe { Vmcb::new(p.0.as_mut_ptr()) };
        v.set_segment(save::CS, &Segment { selector: 0x08, base: 0x1122_3344, limit: 0xffff, attrs: SegAttrs::CODE64 });
        assert_eq!(&p.0[0x410..0x414], &[0x08, 0x00, 0x9b, 0x0a], "selector, then attrib (0xa9b)");
    }

    #[test]
    fn events_round_trip() {
        for ev in [
            Event::GP0,
            Event::UD,
            Event::Exception { vector: 14, error_code: Some(0xdead) },
            Event::Interrupt { vector: 0x30 },
            Event::Nmi,
            Event::SoftwareInterrupt { vector: 0x80, len: 0 },
        ] {
            assert_eq!(decode_event(encode_event(ev, true)), Some(ev));
        }
        assert_eq!(decode_event(0x30), None, "not valid");
        // Only an external interrupt gets the nudge (`SvmCpu::nudge_after_interrupt`).
        assert!(is_external_interrupt(encode_event(Event::Interrupt { vector: 0xec }, true)));
        for ev in [Event::GP0, Event::Nmi, Event::SoftwareInterrupt { vector: 0x80, len: 2 }] {
            assert!(!is_external_interrupt(encode_event(ev, true)), "{ev:?}");
        }
        assert!(!is_external_interrupt(0xec), "not valid");
        assert_eq!(encode_event(Event::GP0, true), 0x8000_0b0d);
        assert_eq!(encode_event(Event::GP0, false), 0x8000_030d, "no error code in real mode");
        assert_eq!(
            encode_event(Event::SoftwareInterrupt { vector: 3, len: 1 }, true),
            0x8000_0303,
            "INT3 goes in as #BP"
        );
    }
}
