//! A checkpoint's machine record (`manager::checkpoint::MachineState`):
//! postcard bytes the checkpoint's checksum vouches for, but a checkpoint
//! may come from another build or another host, so what they decode to is
//! outside input like any other. The fuzzer's first byte picks the layout
//! version (2, 3, 4 or another); the rest is the record.
//!
//! Checks:
//! - `MachineState::decode` never panics and refuses every version it does
//!   not read, one line each;
//! - an accepted record re-encodes to bytes that decode to itself (version
//!   4), a version-2 record reads as `cpuid=host`, a version-2 or 3 record
//!   as one runnable vCPU, and a version-4 one has 1 to `MAX_VCPUS`;
//! - a pinned or portable table it carries is well formed, and answering
//!   any leaf, naming its vendor, family and model, and checking it against
//!   a host (the table itself, an empty one) never panic; a table finds
//!   itself supported, unless its XSAVE sizes contradict each other.

use hypervisor::cpuid::{Profile, Regs};
use hypervisor::devices::MAX_VCPUS;
use hypervisor::manager::checkpoint::{MachineState, Refused, SavedRun, SavedVcpu};

use crate::input::Input;

pub fn machine_record(data: &[u8]) {
    let mut input = Input::new(data);
    let version = match input.u8() % 4 {
        0 => 2,
        1 => 3,
        2 => 4,
        _ => input.u16(),
    };
    let bytes = input.rest();
    let m = match MachineState::decode(version, bytes) {
        Ok(m) => m,
        Err(e) => {
            if !(2..=4).contains(&version) {
                assert_eq!(e, Refused::MachineVersion(version));
            }
            let line = e.to_string();
            assert!(!line.is_empty() && !line.contains('\n'), "{line:?}");
            return;
        }
    };
    assert!((2..=4).contains(&version), "version {version} accepted");
    if version == 2 {
        assert_eq!(m.cpuid, Profile::Host, "a version-2 record has no profile");
    }
    if version < 4 {
        assert_eq!(m.vcpus, SavedVcpu::legacy(), "a version-{version} record has one runnable vCPU");
    }
    assert!((1..=MAX_VCPUS).contains(&m.vcpus.len()), "{} vCPUs", m.vcpus.len());
    let again = postcard::to_allocvec(&m).expect("a decoded record encodes");
    assert_eq!(MachineState::decode(4, &again).as_ref(), Ok(&m), "re-encoded record decodes to itself");
    if let Some(t) = m.cpuid.table() {
        assert!(t.is_well_formed());
        for &(leaf, sub) in
            &[(0, 0), (1, 0), (7, 0), (7, 1), (0xd, 0), (0xd, 1), (0x8000_0001, 0), (u32::MAX, u32::MAX)]
        {
            let _ = t.answer(leaf, sub);
        }
        for e in t.entries().iter().take(16) {
            let _ = m.cpuid.answer(e.leaf, e.subleaf.unwrap_or(0), Regs::default);
        }
        let _ = (t.vendor(), t.family_model(), m.cpuid.describe());
        // A table offers all it shows, except XSAVE sizes that contradict
        // each other (the size for the enabled features, EBX, above the
        // size for all, ECX): no CPU answers that, and every host refuses it.
        let xsave = t.answer(0xd, 0);
        let own = t.unsupported(|l, s| t.answer(l, s));
        assert!(own.is_empty() || (xsave.ebx > xsave.ecx && own.len() == 1), "a table supports itself: {own:?}");
        let _ = t.unsupported(|_, _| Regs::default());
    }
}

/// Seeds: a version-4 record of each profile (with one, two and four
/// vCPUs), a version-3 and a version-2 one, each after its selector byte.
pub fn machine_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use hypervisor::cpuid::Table;
    let base = MachineState {
        guest: "memtest".into(),
        image: "memtest".into(),
        cmdline: "mode=live".into(),
        modules: vec!["initrd".into()],
        protocol: "elf64".into(),
        mem_bytes: 16 << 20,
        reboots: 1,
        clock_ns: 123_456_789,
        guest_tsc: 987_654_321,
        tsc_hz: 2_600_000_000,
        mtrr_def_type: 0xc06,
        misc_enable: 1,
        disk: Some("data".into()),
        net: Some("lan".into()),
        cpuid: Profile::Host,
        vcpus: Vec::new(),
    };
    let vcpu = |run, sipi: Option<u8>| SavedVcpu { run, nmi: false, init: sipi.is_some(), sipi };
    let two = vec![vcpu(SavedRun::Runnable, None), vcpu(SavedRun::Halted { irq_off: false }, None)];
    let four = vec![
        vcpu(SavedRun::Runnable, None),
        vcpu(SavedRun::Halted { irq_off: true }, None),
        vcpu(SavedRun::WaitForSipi, Some(0x12)),
        SavedVcpu { nmi: true, ..vcpu(SavedRun::Runnable, None) },
    ];
    let table = Table::capture(hypervisor::testing::intel_host_cpuid);
    let pinned = MachineState { cpuid: Profile::Pinned(table.clone()), vcpus: SavedVcpu::legacy(), ..base.clone() };
    let portable =
        MachineState { cpuid: Profile::Portable(table.portable()), disk: None, net: None, vcpus: four, ..base.clone() };
    let host = MachineState { vcpus: two, ..base.clone() };
    let record = |selector: u8, m: &MachineState| {
        let mut v = vec![selector];
        v.extend(postcard::to_allocvec(m).unwrap());
        v
    };
    // Version 3 had no vCPU list: the empty list's trailing 0 goes;
    // version 2 had no profile either: the `Host` variant's 0 goes too.
    let mut v3 = record(1, &base);
    v3.pop();
    let mut v2 = record(0, &base);
    v2.truncate(v2.len() - 2);
    vec![
        ("v4-host-2-vcpus", record(2, &host)),
        ("v4-pinned", record(2, &pinned)),
        ("v4-portable-4-vcpus", record(2, &portable)),
        ("v3", v3),
        ("v2", v2),
        ("future-version", vec![3, 9, 0, 1, 2, 3]),
    ]
}
