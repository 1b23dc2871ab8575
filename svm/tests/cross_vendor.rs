//! A state saved on one backend loads on the other. The neutral
//! `vcpu::GuestState` is what checkpoints and migration streams carry; here
//! recorded states go from the VT-x representation (VMCS access-rights
//! format, checked by the VMX entry rules) into a VMCB and back, and the
//! other way, and must come out identical and acceptable to both vendors'
//! entry checks.

use svm::checks::{ControlContext, check_guest_state as svm_check};
use svm::vmcb::Vmcb;
use vcpu::state::bits::*;
use vcpu::{DescriptorTable, GuestState, SegAttrs, Segment};
use vmx::checks::{EntryContext, check_guest_state as vmx_check};

#[repr(C, align(4096))]
struct Page([u8; 4096]);

fn seg(selector: u16, base: u64, limit: u32, attrs: SegAttrs) -> Segment {
    Segment { selector, base, limit, attrs }
}

/// States as the backends hold them: a 64-bit kernel at its entry, a
/// Multiboot kernel at its 32-bit entry, and a 64-bit guest caught in user
/// mode with an interrupt shadow, a TPR, a TSC offset and its syscall MSRs.
fn recorded_states() -> Vec<(&'static str, GuestState)> {
    let long_entry = GuestState {
        rip: 0x10_0000,
        rflags: RFLAGS_FIXED,
        cr0: CR0_PE | CR0_PG | CR0_ET | CR0_NE | CR0_WP,
        cr3: 0x1000,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA | EFER_NXE,
        pat: PAT_DEFAULT,
        cs: seg(0x08, 0, 0xffff_ffff, SegAttrs::CODE64),
        ss: seg(0x10, 0, 0xffff_ffff, SegAttrs::DATA),
        ds: seg(0x10, 0, 0xffff_ffff, SegAttrs::DATA),
        es: seg(0x10, 0, 0xffff_ffff, SegAttrs::DATA),
        fs: seg(0, 0, 0, SegAttrs::UNUSABLE),
        gs: seg(0, 0, 0, SegAttrs::UNUSABLE),
        ldtr: seg(0, 0, 0, SegAttrs::UNUSABLE),
        tr: seg(0x18, 0x3000, 0x67, SegAttrs::TSS_BUSY),
        gdtr: DescriptorTable { base: 0x2000, limit: 0x1f },
        dr6: 0xffff_0ff0,
        dr7: 0x400,
        ..Default::default()
    };
    let mut multiboot = GuestState {
        rip: 0x10_000c,
        rflags: RFLAGS_FIXED,
        cr0: CR0_PE | CR0_ET,
        pat: PAT_DEFAULT,
        cs: seg(0x08, 0, 0xffff_ffff, SegAttrs::CODE32),
        ss: seg(0x10, 0, 0xffff_ffff, SegAttrs::DATA),
        ds: seg(0x10, 0, 0xffff_ffff, SegAttrs::DATA),
        es: seg(0x10, 0, 0xffff_ffff, SegAttrs::DATA),
        fs: seg(0x10, 0, 0xffff_ffff, SegAttrs::DATA),
        gs: seg(0x10, 0, 0xffff_ffff, SegAttrs::DATA),
        ldtr: seg(0, 0, 0, SegAttrs::UNUSABLE),
        tr: seg(0, 0, 0xffff, SegAttrs::TSS_BUSY),
        dr6: 0xffff_0ff0,
        dr7: 0x400,
        ..Default::default()
    };
    multiboot.gprs.rax = 0x2bad_b002;
    multiboot.gprs.rbx = 0x9000;
    let user = |dpl: u16, a: SegAttrs| SegAttrs(a.0 | (dpl << 5));
    let mut user_mode = GuestState {
        rip: 0x4000_1234,
        rflags: RFLAGS_FIXED | RFLAGS_IF | 0x85,
        cr0: CR0_PE | CR0_PG | CR0_ET | CR0_NE | CR0_WP | CR0_MP,
        cr2: 0x7fff_f000,
        cr3: 0x0012_3000,
        cr4: CR4_PAE | CR4_PGE | (1 << 9) | (1 << 10),
        efer: EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE,
        pat: 0x0007_0106_0007_0406,
        cs: seg(0x33, 0, 0xffff_ffff, user(3, SegAttrs::CODE64)),
        ss: seg(0x2b, 0, 0xffff_ffff, user(3, SegAttrs::DATA)),
        ds: seg(0x2b, 0, 0xffff_ffff, user(3, SegAttrs::DATA)),
        es: seg(0x2b, 0, 0xffff_ffff, user(3, SegAttrs::DATA)),
        fs: seg(0, 0x7f00_dead_0000, 0, SegAttrs::UNUSABLE),
        gs: seg(0, 0xffff_8880_0000_0000, 0, SegAttrs::UNUSABLE),
        ldtr: seg(0, 0, 0, SegAttrs::UNUSABLE),
        tr: seg(0x40, 0xffff_fe00_0000_3000, 0x4087, SegAttrs::TSS_BUSY),
        gdtr: DescriptorTable { base: 0xffff_fe00_0000_1000, limit: 0x7f },
        idtr: DescriptorTable { base: 0xffff_fe00_0000_0000, limit: 0xfff },
        dr6: 0xffff_0ff0,
        dr7: 0x400,
        sysenter_cs: 0x10,
        sysenter_esp: 0xffff_fe00_0000_5000,
        sysenter_eip: 0xffff_ffff_8100_0000,
        star: 0x0023_0010_0000_0000,
        lstar: 0xffff_ffff_8100_0040,
        cstar: 0xffff_ffff_8100_0080,
        sfmask: 0x4_7700,
        kernel_gs_base: 0xffff_8880_1000_0000,
        interrupt_shadow: true,
        cr8: 5,
        tsc_offset: 0xffff_ff00_0000_0000,
        ..Default::default()
    };
    for n in 0..16 {
        user_mode.gprs.set(n, 0x1111_0000_0000_0000 * (n as u64 % 7 + 1) + n as u64);
    }
    vec![("64-bit entry", long_entry), ("multiboot entry", multiboot), ("64-bit user mode, event pending", user_mode)]
}

/// The VT-x view: each segment through the VMCS access-rights format, then
/// the VMX entry checks on what the VMCS would hold (CR0.NE and CR4.VMXE
/// forced on by the fixed bits; unrestricted guest).
fn through_vmx(s: &GuestState) -> GuestState {
    let mut v = s.clone();
    for seg in [&mut v.es, &mut v.cs, &mut v.ss, &mut v.ds, &mut v.fs, &mut v.gs, &mut v.ldtr, &mut v.tr] {
        seg.attrs = vmx::ar::from_vmx(vmx::ar::to_vmx(seg.attrs));
    }
    let ctx = EntryContext {
        ia32e_guest: s.efer & EFER_LMA != 0,
        unrestricted: true,
        cr0_fixed0: CR0_PE | CR0_NE | CR0_PG,
        cr0_fixed1: 0xffff_ffff,
        cr4_fixed0: CR4_VMXE,
        cr4_fixed1: 0x3f_7fff,
    };
    let mut hw = v.clone();
    hw.cr0 |= CR0_NE;
    hw.cr4 |= CR4_VMXE;
    assert_eq!(vmx_check(&hw, &ctx), Vec::<String>::new(), "VT-x refuses {s:#?}");
    v
}

/// The AMD-V view: into a VMCB and out again, with the VMRUN checks.
fn through_svm(s: &GuestState) -> GuestState {
    let mut page = Box::new(Page([0; 4096]));
    // SAFETY: a live, aligned 4 KiB page owned by this test.
    let mut vmcb = unsafe { Vmcb::new(page.0.as_mut_ptr()) };
    vmcb.load_state(s);
    let ctx = ControlContext { asid: 1, intercepts_vmrun: true, vmcb_efer: vmcb.u64(svm::vmcb::save::EFER) };
    assert_eq!(svm_check(s, &ctx), Vec::<String>::new(), "AMD-V refuses {s:#?}");
    let mut back = GuestState { gprs: s.gprs, ..Default::default() };
    vmcb.store_state(&mut back);
    back
}

#[test]
fn states_move_between_vendors_unchanged() {
    for (name, s) in recorded_states() {
        let via_vmx = through_vmx(&s);
        assert_eq!(via_vmx, s, "{name}: VT-x representation lost something");
        let vmx_to_svm = through_svm(&via_vmx);
        assert_eq!(vmx_to_svm, s, "{name}: saved on VT-x, loaded on AMD-V");
        let svm_to_vmx = through_vmx(&through_svm(&s));
        assert_eq!(svm_to_vmx, s, "{name}: saved on AMD-V, loaded on VT-x");
    }
}

#[test]
fn a_state_one_vendor_refuses_is_refused_by_the_other() {
    // Long mode with paging but no PAE: both vendors' rules forbid it.
    let (_, mut s) = recorded_states().into_iter().next().unwrap();
    s.cr4 &= !CR4_PAE;
    let mut page = Box::new(Page([0; 4096]));
    // SAFETY: as above.
    let mut vmcb = unsafe { Vmcb::new(page.0.as_mut_ptr()) };
    vmcb.load_state(&s);
    let ctx = ControlContext { asid: 1, intercepts_vmrun: true, vmcb_efer: vmcb.u64(svm::vmcb::save::EFER) };
    assert!(!svm_check(&s, &ctx).is_empty());
    let vctx = EntryContext {
        ia32e_guest: true,
        unrestricted: true,
        cr0_fixed0: CR0_NE,
        cr0_fixed1: 0xffff_ffff,
        cr4_fixed0: CR4_VMXE,
        cr4_fixed1: 0x3f_7fff,
    };
    let mut hw = s.clone();
    hw.cr4 |= CR4_VMXE;
    assert!(!vmx_check(&hw, &vctx).is_empty());
}
