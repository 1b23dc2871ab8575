//! The vCPU conformance check, generic over [`Vcpu`]: `set_state` then
//! `state` gives back exactly what was set, for every field of the neutral
//! state, on whichever backend runs it. The kernel runs it at boot when
//! `hypervisor.cfg` says `vcpu_conformance = true` (the whole-system tests
//! do, on both backends); the host tests run it on the mock.
//!
//! The state it sets has a distinct value, other than the default and the
//! vCPU's starting one, in every field the architecture lets a consistent
//! 64-bit state hold. Each field is read back three times: right after
//! `set_state`; while the vCPU is loaded (the FPU, MSRs, XCR0 and debug
//! registers then come from the CPU itself); and after `put` (what the
//! backend saved from the CPU). Then the activity states that cannot go
//! with the main state's interrupt shadow (HLT, wait-for-SIPI) go round
//! too.
//!
//! Fields a backend cannot round-trip, and why:
//! - `fpu.fop`, `fpu.fip`, `fpu.fdp` (the last x87 instruction's opcode and
//!   pointers) are kept exactly until the vCPU is loaded, but what comes back
//!   from the CPU is the CPU's FXSAVE: AMD CPUs store them only while an x87
//!   exception is pending (FSW.ES = 1; APM Vol. 4, FXSAVE), and QEMU's TCG
//!   FXRSTOR does not load them at all (its FXSAVE stores 0). The check
//!   accepts 0 for them from the CPU and says so in a `note` line; any other
//!   value is a failure. Bochs (VT-x) gives them back.
//! - `xcr0` is x87|SSE only where the host's XSAVE has SSE (else 1, the
//!   default), `tsc_aux` 0 where the host cannot give guests RDTSCP: the
//!   state refuses what the CPU could not load (`Limits`).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use vcpu::state::bits::*;
use vcpu::{Activity, DescriptorTable, Event, Fpu, GuestState, SegAttrs, Segment, Vcpu};

use crate::backend::Backend;

/// What the host lets a state hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// XCR0 bits the guest may have (CPUID 0xD.0 EAX; 1 without XSAVE).
    pub xcr0: u64,
    /// IA32_TSC_AUX is the guest's (RDTSCP given to guests).
    pub tsc_aux: bool,
    /// CR4.OSXSAVE may be set.
    pub xsave: bool,
}

impl Limits {
    pub fn of<B: Backend>(backend: &B) -> Limits {
        let xsave = backend.host_cpuid(1, 0).ecx & (1 << 26) != 0;
        let xcr0 = if xsave { backend.host_cpuid(0xd, 0).eax as u64 } else { 1 };
        Limits { xcr0, tsc_aux: backend.quirks().rdtscp, xsave }
    }
}

/// Where a vCPU starts before the check sets its state: a plain 64-bit
/// state unlike [`test_state`] in every field it can be unlike it.
pub fn start_state() -> GuestState {
    let flat = |selector, attrs| Segment { selector, base: 0, limit: 0xffff_ffff, attrs };
    GuestState {
        rip: 0x10_0000,
        cr0: CR0_PE | CR0_ET | CR0_NE | CR0_PG,
        cr3: 0x1000,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        cs: flat(0x08, SegAttrs::CODE64),
        ss: flat(0x10, SegAttrs::DATA),
        ds: flat(0x10, SegAttrs::DATA),
        es: flat(0x10, SegAttrs::DATA),
        fs: flat(0x10, SegAttrs::DATA),
        gs: flat(0x10, SegAttrs::DATA),
        tr: Segment { selector: 0, base: 0, limit: 0x67, attrs: SegAttrs::TSS_BUSY },
        ldtr: Segment { selector: 0, base: 0, limit: 0xffff, attrs: SegAttrs::UNUSABLE },
        ..Default::default()
    }
}

/// A 64-bit kernel-mode state with a distinct, non-default value in every
/// field: in an interrupt shadow after STI, in an NMI handler, a page fault
/// being delivered and four more events waiting.
pub fn test_state(limits: Limits) -> GuestState {
    let seg = |selector, base, limit, attrs| Segment { selector, base, limit, attrs };
    let dpl3 = |a: SegAttrs| SegAttrs(a.0 | (3 << 5));
    let mut fpu = Fpu {
        fcw: 0x027f,
        fsw: 0x3800,
        ftw: 0x81,
        fop: 0x01d9,
        fip: 0x0000_7fff_1234_5678,
        fdp: 0x0000_7fff_8765_4320,
        mxcsr: 0x3f81,
        ..Fpu::default()
    };
    for (i, r) in fpu.st.iter_mut().enumerate() {
        *r = core::array::from_fn(|j| (0x10 * i + j + 1) as u8);
    }
    for (i, r) in fpu.xmm.iter_mut().enumerate() {
        *r = core::array::from_fn(|j| (0x11 * i + 3 * j + 0x80) as u8);
    }
    let mut s = GuestState {
        rip: 0xffff_8000_1234_5678,
        // CF, ZF, IF, DF, OF (and bit 1).
        rflags: 0xe43,
        cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | (1 << 18) | CR0_PG,
        cr2: 0xffff_8880_dead_b000,
        cr3: 0x1_2345_6000,
        cr4: CR4_DE
            | (1 << 4)
            | CR4_PAE
            | CR4_PGE
            | CR4_OSFXSR
            | CR4_OSXMMEXCPT
            | if limits.xsave { CR4_OSXSAVE } else { 0 },
        cr8: 9,
        dr: [0xffff_8000_0000_1000, 0x0000_7fff_0000_2000, 0x3000, 0xffff_ffff_ffff_f000],
        // B0 and BS.
        dr6: DR6_FIXED | 0x4001,
        // L0 (write, 4 bytes), L1 (execute), R/W2 and LEN2 set, G2 off.
        dr7: 0x0f0d_0405,
        efer: EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE,
        pat: 0x0006_0504_0100_0607,
        cs: seg(0x10, 0, 0xffff_ffff, SegAttrs::CODE64),
        ss: seg(0x18, 0, 0xffff_ffff, SegAttrs::DATA),
        ds: seg(0x23, 0x1000, 0xffff_ffff, dpl3(SegAttrs::DATA)),
        es: seg(0x33, 0x2000, 0x000f_ffff, SegAttrs::DATA),
        fs: seg(0x43, 0x7fff_1234_5000, 0xffff_ffff, SegAttrs::DATA),
        gs: seg(0x4b, 0xffff_8880_0001_0000, 0xffff_ffff, SegAttrs::DATA),
        ldtr: seg(0x50, 0xffff_8000_0040_0000, 0xfff, SegAttrs::LDT),
        tr: seg(0x60, 0xffff_fe00_0000_3000, 0x4087, SegAttrs::TSS_BUSY),
        gdtr: DescriptorTable { base: 0xffff_fe00_0000_1000, limit: 0x7f },
        idtr: DescriptorTable { base: 0xffff_fe00_0000_0000, limit: 0xfff },
        sysenter_cs: 0x10,
        sysenter_esp: 0xffff_fe00_0000_5000,
        sysenter_eip: 0xffff_ffff_8100_0000,
        star: 0x0023_0010_0000_0000,
        lstar: 0xffff_ffff_8100_0040,
        cstar: 0xffff_ffff_8100_0080,
        sfmask: 0x4_7700,
        kernel_gs_base: 0xffff_8880_1000_0000,
        tsc_aux: if limits.tsc_aux { 0x1003 } else { 0 },
        xcr0: if limits.xsave { (limits.xcr0 & 3) | 1 } else { 1 },
        fpu,
        tsc_offset: 0xffff_fff0_1234_5000,
        activity: Activity::Active,
        interrupt_shadow: true,
        nmi_blocked: true,
        injected_event: Some(Event::Exception { vector: 14, error_code: Some(6) }),
        ..Default::default()
    };
    for n in 0..16u8 {
        s.gprs.set(n, 0xa5a5_0000_0000_0000 | ((n as u64) << 40) | ((n as u64 + 1) * 0x0101));
    }
    for e in
        [Event::Interrupt { vector: 0x30 }, Event::Nmi, Event::GP0, Event::SoftwareInterrupt { vector: 0x80, len: 2 }]
    {
        s.pending_events.push(e);
    }
    s
}

/// Every field of `s` as (name, value), one line each. The destructuring
/// names every field, so a field added to `GuestState` does not compile
/// here until it is listed (and checked).
pub fn fields(s: &GuestState) -> Vec<(String, String)> {
    let GuestState {
        gprs,
        rip,
        rflags,
        cr0,
        cr2,
        cr3,
        cr4,
        cr8,
        dr,
        dr6,
        dr7,
        efer,
        pat,
        es,
        cs,
        ss,
        ds,
        fs,
        gs,
        ldtr,
        tr,
        gdtr,
        idtr,
        sysenter_cs,
        sysenter_esp,
        sysenter_eip,
        star,
        lstar,
        cstar,
        sfmask,
        kernel_gs_base,
        tsc_aux,
        xcr0,
        fpu,
        tsc_offset,
        activity,
        interrupt_shadow,
        nmi_blocked,
        injected_event,
        pending_events,
    } = s;
    let mut f: Vec<(String, String)> = Vec::new();
    let mut hex = |name: &str, v: u64| f.push((String::from(name), format!("{v:#x}")));
    const GPRS: [&str; 16] =
        ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];
    for (n, name) in GPRS.iter().enumerate() {
        hex(name, gprs.get(n as u8));
    }
    for (name, v) in [
        ("rip", *rip),
        ("rflags", *rflags),
        ("cr0", *cr0),
        ("cr2", *cr2),
        ("cr3", *cr3),
        ("cr4", *cr4),
        ("cr8", *cr8),
        ("dr0", dr[0]),
        ("dr1", dr[1]),
        ("dr2", dr[2]),
        ("dr3", dr[3]),
        ("dr6", *dr6),
        ("dr7", *dr7),
        ("efer", *efer),
        ("pat", *pat),
        ("sysenter_cs", *sysenter_cs),
        ("sysenter_esp", *sysenter_esp),
        ("sysenter_eip", *sysenter_eip),
        ("star", *star),
        ("lstar", *lstar),
        ("cstar", *cstar),
        ("sfmask", *sfmask),
        ("kernel_gs_base", *kernel_gs_base),
        ("tsc_aux", *tsc_aux),
        ("xcr0", *xcr0),
        ("tsc_offset", *tsc_offset),
    ] {
        hex(name, v);
    }
    for (name, sg) in
        [("es", es), ("cs", cs), ("ss", ss), ("ds", ds), ("fs", fs), ("gs", gs), ("ldtr", ldtr), ("tr", tr)]
    {
        f.push((
            String::from(name),
            format!("selector {:#x} base {:#x} limit {:#x} attrs {:#x}", sg.selector, sg.base, sg.limit, sg.attrs.0),
        ));
    }
    for (name, t) in [("gdtr", gdtr), ("idtr", idtr)] {
        f.push((String::from(name), format!("base {:#x} limit {:#x}", t.base, t.limit)));
    }
    let Fpu { fcw, fsw, ftw, fop, fip, fdp, mxcsr, st, xmm } = fpu;
    for (name, v) in [
        ("fpu.fcw", *fcw as u64),
        ("fpu.fsw", *fsw as u64),
        ("fpu.ftw", *ftw as u64),
        ("fpu.fop", *fop as u64),
        ("fpu.fip", *fip),
        ("fpu.fdp", *fdp),
        ("fpu.mxcsr", *mxcsr as u64),
    ] {
        f.push((String::from(name), format!("{v:#x}")));
    }
    let bytes = |b: &[u8]| b.iter().rev().map(|x| format!("{x:02x}")).collect::<String>();
    for (i, r) in st.iter().enumerate() {
        f.push((format!("fpu.st{i}"), bytes(r)));
    }
    for (i, r) in xmm.iter().enumerate() {
        f.push((format!("fpu.xmm{i}"), bytes(r)));
    }
    f.push((String::from("activity"), format!("{activity:?}")));
    f.push((String::from("interrupt_shadow"), format!("{interrupt_shadow}")));
    f.push((String::from("nmi_blocked"), format!("{nmi_blocked}")));
    f.push((String::from("injected_event"), format!("{injected_event:?}")));
    f.push((String::from("pending_events"), format!("{:?}", pending_events.iter().collect::<Vec<_>>())));
    f
}

/// The x87 pointer fields a CPU's FXSAVE may store as 0 (see the module
/// documentation).
const CPU_MAY_CLEAR: [&str; 3] = ["fpu.fop", "fpu.fip", "fpu.fdp"];

/// What a round trip found: fields that differ (name, what and when), and
/// the x87 pointers the CPU cleared.
#[derive(Default)]
struct Found {
    bad: Vec<(String, String)>,
    notes: Vec<(String, String)>,
}

/// Sets `want`, reads it back after `set_state`, while loaded and after
/// `put`; the fields that differ, with where.
fn round_trip(vcpu: &mut impl Vcpu, want: &GuestState) -> Result<Found, String> {
    vcpu.set_state(want).map_err(|e| format!("set_state refused the state: {e}"))?;
    let after_set = vcpu.state();
    vcpu.load();
    let loaded = vcpu.state();
    vcpu.put();
    let after_put = vcpu.state();
    let want_f = fields(want);
    let mut found = Found::default();
    for (when, got) in [("after set_state", &after_set), ("while loaded", &loaded), ("after load/put", &after_put)] {
        let through_cpu = when != "after set_state";
        let mut differs = false;
        for ((name, w), (_, g)) in want_f.iter().zip(fields(got)) {
            if *w == g {
                continue;
            }
            differs = true;
            let what = format!("set {w}, read {g} {when}");
            if through_cpu && g == "0x0" && CPU_MAY_CLEAR.contains(&name.as_str()) {
                if !found.notes.iter().any(|(n, _)| n == name) {
                    found.notes.push((name.clone(), what));
                }
            } else {
                found.bad.push((name.clone(), what));
            }
        }
        if !differs && got != want {
            found.bad.push((String::from("(state)"), format!("differs {when} outside the listed fields")));
        }
    }
    Ok(found)
}

/// Runs the check on `vcpu`, one line per field to `out` and then
/// `vcpu-state: PASS` or `vcpu-state: FAIL ...`; true if it passed.
pub fn check(vcpu: &mut impl Vcpu, limits: Limits, out: &mut impl FnMut(&str)) -> bool {
    let want = test_state(limits);
    let Found { bad, notes } = match round_trip(vcpu, &want) {
        Ok(f) => f,
        Err(e) => {
            out(&format!("vcpu-state: FAIL {e}"));
            return false;
        }
    };
    let fields = fields(&want);
    for (name, value) in &fields {
        match (bad.iter().find(|(n, _)| n == name), notes.iter().find(|(n, _)| n == name)) {
            (Some((_, why)), _) => out(&format!("vcpu-state: FAIL {name}: {why}")),
            (None, Some((_, what))) => {
                out(&format!("vcpu-state: note {name} {value} kept until loaded; this CPU's FXSAVE clears it ({what})"))
            }
            (None, None) => out(&format!("vcpu-state: ok   {name} {value}")),
        }
    }
    let mut failed = bad.len();
    for (_, why) in bad.iter().filter(|(n, _)| !fields.iter().any(|(f, _)| f == n)) {
        out(&format!("vcpu-state: FAIL {why}"));
    }
    // The activity states the main state's STI shadow excludes (a HLT in
    // the shadow ends it; SDM Vol. 3C 27.3.1.5), and wait-for-SIPI, where
    // no event is being delivered.
    let halted = GuestState { activity: Activity::Halted, interrupt_shadow: false, ..want.clone() };
    let waiting = GuestState { activity: Activity::WaitForSipi, injected_event: None, ..halted.clone() };
    for s in [halted, waiting] {
        let name = format!("activity {:?}", s.activity);
        match round_trip(vcpu, &s) {
            Ok(f) if f.bad.is_empty() => out(&format!("vcpu-state: ok   {name} (the whole state)")),
            Ok(f) => {
                failed += f.bad.len();
                for (field, why) in f.bad {
                    out(&format!("vcpu-state: FAIL {name}: {field}: {why}"));
                }
            }
            Err(e) => {
                failed += 1;
                out(&format!("vcpu-state: FAIL {name}: {e}"));
            }
        }
    }
    if failed == 0 {
        out(&format!(
            "vcpu-state: PASS ({} fields and 2 activity states, each after set_state, while loaded and after put; {} \
             x87 pointers cleared by the CPU)",
            fields.len(),
            notes.len()
        ));
    } else {
        out(&format!("vcpu-state: FAIL ({failed} mismatches)"));
    }
    failed == 0
}

/// Creates a vCPU on `backend` (in an empty nested table: it never runs),
/// checks it and destroys it. True if it passed.
pub fn run_on<B: Backend>(backend: &mut B, out: &mut impl FnMut(&str)) -> bool {
    use mm::hal::FrameAlloc;
    let limits = Limits::of(backend);
    let Some(root) = backend.mem().alloc_frame() else {
        out("vcpu-state: FAIL no host frame for a nested table");
        return false;
    };
    let ok = match backend.create_vcpu(root, &start_state()) {
        Ok(mut v) => {
            out(&format!("vcpu-state: checking the {} backend", backend.name()));
            let ok = check(&mut v, limits, out);
            backend.destroy_vcpu(v);
            ok
        }
        Err(e) => {
            out(&format!("vcpu-state: FAIL cannot create a vCPU: {e}"));
            false
        }
    };
    // SAFETY: the frame came from this allocator and the vCPU that used it
    // as its nested root is gone.
    unsafe { backend.mem().free_frame(root) };
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MockBackend;

    const ALL: Limits = Limits { xcr0: 7, tsc_aux: true, xsave: true };

    #[test]
    fn the_test_state_differs_from_default_and_start_everywhere_it_can() {
        let t = fields(&test_state(ALL));
        for other in [GuestState::default(), start_state()] {
            for ((name, a), (_, b)) in t.iter().zip(fields(&other)) {
                // The other activity states go round in their own states.
                if name != "activity" {
                    assert_ne!(*a, b, "{name} is not distinct");
                }
            }
        }
        assert!(t.len() > 80, "{} fields", t.len());
    }

    #[test]
    fn the_test_state_passes_the_neutral_checks() {
        // The vendors' own entry checks run on it in the whole-system test.
        assert_eq!(test_state(ALL).check_neutral(0xffbf), Ok(()));
        let none = Limits { xcr0: 1, tsc_aux: false, xsave: false };
        assert_eq!(test_state(none).check_neutral(0xffbf), Ok(()));
    }

    #[test]
    fn the_mock_passes_and_prints_a_line_per_field() {
        let mut b = MockBackend::new(64);
        let mut lines = Vec::new();
        assert!(run_on(&mut b, &mut |l: &str| lines.push(String::from(l))));
        assert!(lines.iter().any(|l| l.starts_with("vcpu-state: ok   cr0 0x80050033")), "{lines:#?}");
        assert!(lines.iter().any(|l| l.starts_with("vcpu-state: ok   fpu.xmm15 ")));
        assert!(lines.iter().any(|l| l == "vcpu-state: ok   activity Halted (the whole state)"));
        assert!(lines.last().unwrap().starts_with("vcpu-state: PASS ("), "{lines:#?}");
        assert_eq!(
            lines.iter().filter(|l| l.starts_with("vcpu-state: ok   ")).count(),
            fields(&test_state(ALL)).len() + 2
        );
        assert_eq!((b.created, b.destroyed), (1, 1));
    }

    #[test]
    fn a_backend_that_loses_a_field_fails_naming_it() {
        let mut b = MockBackend::new(64);
        b.state_filter = Some(|s: &mut GuestState| s.dr[2] = 0);
        let mut lines = Vec::new();
        assert!(!run_on(&mut b, &mut |l: &str| lines.push(String::from(l))));
        assert!(
            lines.iter().any(|l| l.starts_with("vcpu-state: FAIL dr2: set 0x3000, read 0x0 after set_state")),
            "{lines:#?}"
        );
        assert!(lines.last().unwrap().starts_with("vcpu-state: FAIL ("));
        let mut b = MockBackend::new(64);
        b.state_filter = Some(|s: &mut GuestState| {
            s.pending_events.take_next(true, true);
        });
        let mut lines = Vec::new();
        assert!(!run_on(&mut b, &mut |l: &str| lines.push(String::from(l))));
        assert!(lines.iter().any(|l| l.starts_with("vcpu-state: FAIL pending_events")), "{lines:#?}");
    }

    #[test]
    fn x87_pointers_a_cpu_clears_are_noted_other_values_fail() {
        let mut b = MockBackend::new(64);
        b.put_filter = Some(|s: &mut GuestState| (s.fpu.fip, s.fpu.fdp, s.fpu.fop) = (0, 0, 0));
        let mut lines = Vec::new();
        assert!(run_on(&mut b, &mut |l: &str| lines.push(String::from(l))), "{lines:#?}");
        assert!(lines.iter().any(|l| l.starts_with("vcpu-state: note fpu.fip 0x7fff12345678 kept until loaded")));
        assert!(lines.last().unwrap().contains("3 x87 pointers cleared by the CPU"), "{lines:#?}");
        let mut b = MockBackend::new(64);
        b.put_filter = Some(|s: &mut GuestState| s.fpu.fip = 1);
        let mut lines = Vec::new();
        assert!(!run_on(&mut b, &mut |l: &str| lines.push(String::from(l))));
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("vcpu-state: FAIL fpu.fip: set 0x7fff12345678, read 0x1 after load/put"))
        );
        let mut b = MockBackend::new(64);
        b.put_filter = Some(|s: &mut GuestState| s.fpu.mxcsr = 0x1f80);
        let mut lines = Vec::new();
        assert!(!run_on(&mut b, &mut |l: &str| lines.push(String::from(l))), "only the x87 pointers are excused");
    }
}
