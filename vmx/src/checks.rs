//! Software checks of guest state against the VM-entry rules (SDM Vol. 3C
//! 27.3.1 "Checks on the Guest State Area"). The hardware only says "invalid
//! guest state"; these checks name the field, so an entry failure report
//! says what is wrong. A subset of the rules: the ones a hypervisor bug or a
//! corrupt saved state would plausibly break.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use vcpu::state::bits::*;
use vcpu::{GuestState, Segment};

/// The VM-entry settings the rules depend on.
#[derive(Clone, Copy, Debug)]
pub struct EntryContext {
    pub ia32e_guest: bool,
    pub unrestricted: bool,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
}

fn canonical(a: u64) -> bool {
    let top = (a as i64) >> 47;
    top == 0 || top == -1
}

/// Every violation found, each naming its field; `cr0`/`cr4` in `s` are the
/// values the CPU runs with (not the guest's read shadows).
pub fn check_guest_state(s: &GuestState, ctx: &EntryContext) -> Vec<String> {
    let mut p = Vec::new();
    let mut fixed0 = ctx.cr0_fixed0;
    if ctx.unrestricted {
        fixed0 &= !(CR0_PE | CR0_PG);
    }
    if s.cr0 & fixed0 != fixed0 {
        p.push(format!("guest CR0 {:#x}: bits {:#x} must be set (IA32_VMX_CR0_FIXED0)", s.cr0, fixed0 & !s.cr0));
    }
    if s.cr0 & !ctx.cr0_fixed1 & 0xffff_ffff != 0 {
        p.push(format!(
            "guest CR0 {:#x}: bits {:#x} must be clear (IA32_VMX_CR0_FIXED1)",
            s.cr0,
            s.cr0 & !ctx.cr0_fixed1
        ));
    }
    if s.cr0 & CR0_PG != 0 && s.cr0 & CR0_PE == 0 {
        p.push(format!("guest CR0 {:#x}: paging (PG) without protection (PE)", s.cr0));
    }
    if s.cr4 & ctx.cr4_fixed0 != ctx.cr4_fixed0 {
        p.push(format!(
            "guest CR4 {:#x}: bits {:#x} must be set (IA32_VMX_CR4_FIXED0)",
            s.cr4,
            ctx.cr4_fixed0 & !s.cr4
        ));
    }
    if s.cr4 & !ctx.cr4_fixed1 != 0 {
        p.push(format!(
            "guest CR4 {:#x}: bits {:#x} must be clear (IA32_VMX_CR4_FIXED1)",
            s.cr4,
            s.cr4 & !ctx.cr4_fixed1
        ));
    }
    if ctx.ia32e_guest && (s.cr0 & CR0_PG == 0 || s.cr4 & CR4_PAE == 0) {
        p.push(format!("IA-32e mode guest needs CR0.PG and CR4.PAE (cr0 {:#x}, cr4 {:#x})", s.cr0, s.cr4));
    }
    if s.efer & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
        p.push(format!("guest IA32_EFER {:#x}: reserved bits set", s.efer));
    }
    if (s.efer & EFER_LMA != 0) != ctx.ia32e_guest {
        p.push(format!(
            "guest IA32_EFER.LMA ({}) differs from the IA-32e mode guest entry control ({})",
            s.efer & EFER_LMA != 0,
            ctx.ia32e_guest
        ));
    }
    if s.cr0 & CR0_PG != 0 && (s.efer & EFER_LMA != 0) != (s.efer & EFER_LME != 0) {
        p.push(format!("guest IA32_EFER {:#x}: LMA differs from LME while paging is on", s.efer));
    }
    let reserved_rflags = (1 << 3) | (1 << 5) | (1 << 15) | !0x3f_ffff;
    if s.rflags & RFLAGS_FIXED == 0 || s.rflags & reserved_rflags != 0 {
        p.push(format!("guest RFLAGS {:#x}: bit 1 must be set and reserved bits clear", s.rflags));
    }
    if ctx.ia32e_guest && s.rflags & (1 << 17) != 0 {
        p.push(format!("guest RFLAGS {:#x}: virtual-8086 mode in IA-32e mode", s.rflags));
    }
    let long_cs = ctx.ia32e_guest && s.cs.attrs.long();
    if long_cs && !canonical(s.rip) {
        p.push(format!("guest RIP {:#x} is not canonical", s.rip));
    } else if !long_cs && s.rip >> 32 != 0 {
        p.push(format!("guest RIP {:#x}: bits 63:32 must be clear outside 64-bit mode", s.rip));
    }
    check_cs(&s.cs, ctx, &mut p);
    let ss = s.ss.attrs;
    if ss.present() && !matches!(ss.seg_type(), 3 | 7) {
        p.push(format!("guest SS type {} is not a writable data segment", ss.seg_type()));
    }
    for (name, seg) in [("DS", &s.ds), ("ES", &s.es), ("FS", &s.fs), ("GS", &s.gs), ("SS", &s.ss)] {
        if seg.attrs.present() {
            if seg.attrs.system() {
                p.push(format!("guest {name}: a system descriptor in a data segment register"));
            }
            if seg.attrs.seg_type() & 1 == 0 {
                p.push(format!("guest {name} type {}: accessed bit must be set", seg.attrs.seg_type()));
            }
        }
    }
    let tr = s.tr.attrs;
    if !tr.present() {
        p.push("guest TR is unusable (a task register is required)".into());
    } else if !tr.system() || !(tr.seg_type() == 11 || (!ctx.ia32e_guest && tr.seg_type() == 3)) {
        p.push(format!("guest TR type {} (S={}) is not a busy TSS", tr.seg_type(), !tr.system() as u8));
    }
    if s.tr.selector & 4 != 0 {
        p.push(format!("guest TR selector {:#x} points into the LDT", s.tr.selector));
    }
    let ldtr = s.ldtr.attrs;
    if ldtr.present() && (!ldtr.system() || ldtr.seg_type() != 2) {
        p.push(format!("guest LDTR type {} is not an LDT", ldtr.seg_type()));
    }
    for (name, seg) in [
        ("CS", &s.cs),
        ("SS", &s.ss),
        ("DS", &s.ds),
        ("ES", &s.es),
        ("FS", &s.fs),
        ("GS", &s.gs),
        ("TR", &s.tr),
        ("LDTR", &s.ldtr),
    ] {
        if !seg.attrs.present() {
            continue;
        }
        let g = seg.attrs.granularity();
        if seg.limit & 0xfff != 0xfff && g {
            p.push(format!("guest {name} limit {:#x} with G=1 must end in 0xfff", seg.limit));
        }
        if seg.limit >> 20 != 0 && !g {
            p.push(format!("guest {name} limit {:#x} above 1 MiB needs G=1", seg.limit));
        }
        if !canonical(seg.base) {
            p.push(format!("guest {name} base {:#x} is not canonical", seg.base));
        }
    }
    for (name, t) in [("GDTR", &s.gdtr), ("IDTR", &s.idtr)] {
        if !canonical(t.base) {
            p.push(format!("guest {name} base {:#x} is not canonical", t.base));
        }
    }
    // 27.3.1.5: the HLT activity state needs CPL 0.
    if s.activity == vcpu::Activity::Halted && s.ss.attrs.dpl() != 0 {
        p.push(format!("guest activity state HLT with SS.DPL {}", s.ss.attrs.dpl()));
    }
    p
}

fn check_cs(cs: &Segment, ctx: &EntryContext, p: &mut Vec<String>) {
    let a = cs.attrs;
    if !a.present() {
        p.push("guest CS is unusable".into());
        return;
    }
    let t = a.seg_type();
    let ok_type = matches!(t, 9 | 11 | 13 | 15) || (ctx.unrestricted && t == 3);
    if !ok_type || a.system() {
        p.push(format!("guest CS type {t} is not an accessed code segment"));
    }
    if ctx.ia32e_guest && a.long() && a.db() {
        p.push("guest CS: L and D/B both set in IA-32e mode".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcpu::{DescriptorTable, SegAttrs};

    fn ctx() -> EntryContext {
        EntryContext {
            ia32e_guest: true,
            unrestricted: true,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xffff_ffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x3f_ffff,
        }
    }

    fn long_mode() -> GuestState {
        let flat = |sel, attrs| Segment { selector: sel, base: 0, limit: 0xffff_ffff, attrs };
        GuestState {
            rip: 0x10_0000,
            rflags: 2,
            cr0: 0x8000_0031,
            cr4: 0x2020,
            efer: EFER_LME | EFER_LMA,
            cs: flat(8, SegAttrs::CODE64),
            ss: flat(16, SegAttrs::DATA),
            ds: flat(16, SegAttrs::DATA),
            es: flat(16, SegAttrs::DATA),
            fs: flat(16, SegAttrs::DATA),
            gs: flat(16, SegAttrs::DATA),
            tr: Segment { selector: 0, base: 0, limit: 0x67, attrs: SegAttrs::TSS_BUSY },
            ldtr: Segment::default(),
            gdtr: DescriptorTable { base: 0x7000, limit: 23 },
            ..Default::default()
        }
    }

    #[test]
    fn a_good_long_mode_state_passes() {
        assert_eq!(check_guest_state(&long_mode(), &ctx()), Vec::<String>::new());
    }

    type Breakage = (&'static str, fn(&mut GuestState));

    #[test]
    fn each_broken_field_is_named() {
        let cases: &[Breakage] = &[
            ("CR0", |s| s.cr0 &= !CR0_NE),
            ("CR4", |s| s.cr4 &= !CR4_VMXE),
            ("LMA", |s| s.efer = EFER_LME),
            ("RFLAGS", |s| s.rflags = 0),
            ("RIP", |s| s.rip = 0x0000_8000_0000_0000),
            ("CS: L and D/B", |s| s.cs.attrs = SegAttrs(s.cs.attrs.0 | SegAttrs::DB)),
            ("TR is unusable", |s| s.tr.attrs = SegAttrs::UNUSABLE),
            ("SS type", |s| s.ss.attrs = SegAttrs(SegAttrs::DATA.0 & !0xf | 0x1)),
            ("DS type 2: accessed", |s| s.ds.attrs = SegAttrs(SegAttrs::DATA.0 & !1)),
            ("limit 0xfffff000", |s| s.es.limit = 0xffff_f000),
            ("GDTR base", |s| s.gdtr.base = 0x1234_0000_0000_0000),
            ("HLT with SS.DPL 3", |s| {
                s.activity = vcpu::Activity::Halted;
                s.ss.attrs = SegAttrs(SegAttrs::DATA.0 | (3 << 5));
            }),
        ];
        for (want, break_it) in cases {
            let mut s = long_mode();
            break_it(&mut s);
            let problems = check_guest_state(&s, &ctx());
            assert!(problems.iter().any(|p| p.contains(want)), "{want}: {problems:?}");
        }
    }

    #[test]
    fn protected_mode_without_paging_is_fine_with_unrestricted_guest() {
        let mut s = long_mode();
        s.cr0 = CR0_PE | CR0_NE | CR0_ET;
        s.cr4 = CR4_VMXE;
        s.efer = 0;
        s.cs.attrs = SegAttrs::CODE32;
        let mut c = ctx();
        c.ia32e_guest = false;
        assert_eq!(check_guest_state(&s, &c), Vec::<String>::new());
        c.unrestricted = false;
        assert!(check_guest_state(&s, &c).iter().any(|p| p.contains("CR0")));
    }
}
