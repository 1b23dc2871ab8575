//! What CPUID tells a guest: the host's answer with the features this
//! hypervisor does not virtualise removed, the hypervisor-present bit set,
//! and a vendor leaf at 0x40000000 (the range reserved for hypervisors, see
//! the Intel SDM Vol. 2A CPUID "Hypervisor" note and Linux's
//! Documentation/virt/kvm/x86/cpuid.rst for the convention).
//!
//! A VM answers either from the host (`cpuid=host`: [`guest_cpuid`] on
//! every exit, so a checkpoint restored on another host, of the other
//! vendor say, sees that host's CPUID) or from a [`Table`] taken when it
//! was created (`cpuid=pinned`), which travels in its checkpoints; only the
//! fields that describe the vCPU itself ([`vcpu_fields`]) follow the vCPU.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// The signature in EBX:ECX:EDX of leaf 0x40000000.
pub const SIGNATURE: &[u8; 12] = b"RustyHVType1";
pub const HV_LEAF: u32 = 0x4000_0000;
/// Highest hypervisor leaf.
pub const HV_MAX_LEAF: u32 = 0x4000_0001;
/// Interface version in leaf 0x40000001 EAX.
pub const HV_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Facts about the host that change what guests may be told.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostQuirks {
    /// IA32_MISC_ENABLE.FAST_STRINGS is off (Bochs): then ERMS/FSRM must be
    /// hidden, or Linux's short `memmove` faults forever.
    pub fast_strings_off: bool,
    /// The backend lets the guest run RDTSCP and RDPID with its own
    /// IA32_TSC_AUX (VT-x: "enable RDTSCP"; AMD-V: the CPU has the MSR, which
    /// the backend switches). Otherwise both are hidden, and raise #UD.
    pub rdtscp: bool,
}

// Leaf 1 ECX (SDM Vol. 2A table 3-10).
const ECX_MONITOR: u32 = 1 << 3;
const ECX_DS_CPL: u32 = 1 << 4;
const ECX_VMX: u32 = 1 << 5;
const ECX_SMX: u32 = 1 << 6;
const ECX_EST: u32 = 1 << 7;
const ECX_TM2: u32 = 1 << 8;
const ECX_PDCM: u32 = 1 << 15;
const ECX_PCID: u32 = 1 << 17;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX (table 3-11).
/// FMA and F16C are VEX-encoded: they need the AVX state (YMM, XCR0 bit
/// 2) that guests cannot enable here (SDM Vol. 1 14.3, 14.4).
const ECX_NEEDS_AVX: u32 = (1 << 12) | (1 << 29);
const EDX_VME: u32 = 1 << 1;
const EDX_DE: u32 = 1 << 2;
const EDX_PSE: u32 = 1 << 3;
const EDX_PAE: u32 = 1 << 6;
const EDX_MCE: u32 = 1 << 7;
const EDX_PGE: u32 = 1 << 13;
const EDX_FXSR: u32 = 1 << 24;
const EDX_SSE: u32 = 1 << 25;
const EDX_APIC: u32 = 1 << 9;
const EDX_DS: u32 = 1 << 21;
const EDX_ACPI: u32 = 1 << 22;
const EDX_TM: u32 = 1 << 29;
const EDX_PBE: u32 = 1 << 31;
// Leaf 7 subleaf 0.
const L7_EBX_FSGSBASE: u32 = 1 << 0;
/// IA32_TSC_ADJUST is not emulated (its MSR raises #GP).
const L7_EBX_TSC_ADJUST: u32 = 1 << 1;
const L7_EBX_SMEP: u32 = 1 << 7;
const L7_EBX_ERMS: u32 = 1 << 9;
/// MPX: its bound registers are XSAVE state the guest cannot have.
const L7_EBX_MPX: u32 = 1 << 14;
const L7_EBX_SMAP: u32 = 1 << 20;
const L7_EBX_AVX2: u32 = 1 << 5;
const L7_EBX_AVX512: u32 = 0xd023_0000; // F, DQ, IFMA, CD, BW, VL
const L7_ECX_UMIP: u32 = 1 << 2;
/// PKU and CET: PKRU and the CET registers are XSAVE state that is not
/// switched between VMs, so guests must not be told to use them.
const L7_ECX_PKU: u32 = 1 << 3;
const L7_ECX_WAITPKG: u32 = 1 << 5;
const L7_ECX_CET_SS: u32 = 1 << 7;
/// 5-level paging: the hypervisor's walks of guest page tables (reports,
/// instruction bytes on AMD without NRIPS, MOV DR and MMIO decoding) know
/// 4 levels, so a guest must not turn on a fifth.
const L7_ECX_LA57: u32 = 1 << 16;
const L7_ECX_RDPID: u32 = 1 << 22;
/// VEX/EVEX-only extensions, which need the AVX or AVX-512 state guests
/// cannot enable: AVX512_VBMI 1, VBMI2 6, VAES 9, VPCLMULQDQ 10,
/// AVX512_VNNI 11, BITALG 12, VPOPCNTDQ 14 (SDM Vol. 2A CPUID, table 3-8).
const L7_ECX_NEEDS_AVX: u32 = (1 << 1) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12) | (1 << 14);
/// PKS: CR4.PKS (bit 24) is not among the bits a guest may set here
/// (`cr4_allowed`), so the feature must not be shown.
const L7_ECX_PKS: u32 = 1 << 31;
/// AVX512_4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, FP16 23.
const L7_EDX_NEEDS_AVX: u32 = (1 << 2) | (1 << 3) | (1 << 8) | (1 << 23);
const L7_EDX_CET_IBT: u32 = 1 << 20;
/// AMX: tile state is XSAVE state too.
const L7_EDX_AMX: u32 = (1 << 22) | (1 << 24) | (1 << 25);
const L7_EDX_FSRM: u32 = 1 << 4;
/// IBRS/IBPB, STIBP, L1D_FLUSH, ARCH_CAPABILITIES, SSBD: their MSRs are
/// not virtualised yet, so the guest must not be told to use them.
const L7_EDX_SPEC: u32 = (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 31);
// 0x80000001 ECX and EDX.
const EXT_ECX_SVM: u32 = 1 << 2;
/// AMD's XOP and FMA4: VEX-like encodings on the YMM state (APM Vol. 3
/// E.4.2).
const EXT_ECX_NEEDS_AVX: u32 = (1 << 11) | (1 << 16);
const EXT_EDX_RDTSCP: u32 = 1 << 27;
/// The XSAVE area's size for what XCR0 may enable (x87 and SSE): the
/// 512-byte legacy region and the 64-byte header (SDM Vol. 1 13.4).
const XSAVE_LEGACY_SIZE: u32 = 576;

/// The guest's answer for `leaf`/`subleaf`, given the host's answer.
pub fn guest_cpuid(leaf: u32, subleaf: u32, host: Regs, quirks: HostQuirks) -> Regs {
    let _ = subleaf;
    let mut r = host;
    match leaf {
        1 => {
            // XSAVE stays (with XCR0 limited to x87 and SSE, leaf 0xD);
            // OSXSAVE mirrors the guest's CR4 and is set by the caller.
            r.ecx &= !(ECX_MONITOR
                | ECX_DS_CPL
                | ECX_VMX
                | ECX_SMX
                | ECX_EST
                | ECX_TM2
                | ECX_PDCM
                | ECX_OSXSAVE
                | ECX_AVX
                | ECX_NEEDS_AVX);
            r.ecx |= ECX_HYPERVISOR;
            // The local APIC, xAPIC and x2APIC (`devices::lapic`; the
            // hardware's does not matter), with its TSC-deadline timer.
            // Linux without interrupt remapping stays in xAPIC mode unless
            // it knows the hypervisor (arch/x86/kernel/apic/apic.c,
            // `try_to_enable_x2apic`); other guests may switch.
            r.edx &= !(EDX_DS | EDX_ACPI | EDX_TM | EDX_PBE);
            r.edx |= EDX_APIC;
            r.ecx |= ECX_TSC_DEADLINE | ECX_X2APIC;
            // One logical processor, initial APIC id 0.
            r.ebx = (r.ebx & 0xffff) | (1 << 16);
        }
        // Thermal/power and topology leaves describe hardware the guest
        // does not have.
        5 | 6 | 0xb | 0x1f => r = Regs::default(),
        // XSAVE: only the x87 and SSE components, which the saved state
        // holds (`vcpu::state::XCR0_SUPPORTED`); no XSAVEOPT, XSAVEC or
        // XSAVES (subleaf 1), no further components.
        0xd => {
            r = if subleaf == 0 && host.eax & 1 != 0 {
                let mask = host.eax & vcpu::state::XCR0_SUPPORTED as u32;
                Regs { eax: mask, ebx: XSAVE_LEGACY_SIZE, ecx: XSAVE_LEGACY_SIZE, edx: 0 }
            } else {
                Regs::default()
            }
        }
        7 => {
            if subleaf == 0 {
                r.ebx &= !(L7_EBX_AVX2 | L7_EBX_AVX512 | L7_EBX_TSC_ADJUST | L7_EBX_MPX);
                r.ecx &= !(L7_ECX_WAITPKG | L7_ECX_PKU | L7_ECX_CET_SS | L7_ECX_LA57 | L7_ECX_NEEDS_AVX | L7_ECX_PKS);
                if !quirks.rdtscp {
                    r.ecx &= !L7_ECX_RDPID;
                }
                r.edx &= !(L7_EDX_SPEC | L7_EDX_CET_IBT | L7_EDX_AMX | L7_EDX_NEEDS_AVX);
                if quirks.fast_strings_off {
                    r.ebx &= !L7_EBX_ERMS;
                    r.edx &= !L7_EDX_FSRM;
                }
            } else {
                r = Regs::default();
            }
        }
        HV_LEAF => {
            let w = |i: usize| u32::from_le_bytes([SIGNATURE[i], SIGNATURE[i + 1], SIGNATURE[i + 2], SIGNATURE[i + 3]]);
            r = Regs { eax: HV_MAX_LEAF, ebx: w(0), ecx: w(4), edx: w(8) };
        }
        0x4000_0001 => r = Regs { eax: HV_VERSION, ..Default::default() },
        0x4000_0002..=0x4fff_ffff => r = Regs::default(),
        0x8000_0001 => {
            r.ecx &= !(EXT_ECX_SVM | EXT_ECX_NEEDS_AVX);
            if !quirks.rdtscp {
                r.edx &= !EXT_EDX_RDTSCP;
            }
        }
        _ => {}
    }
    r
}

/// The fields of an answer that describe the vCPU asking rather than the
/// machine, set the same under either profile: CPUID.1:ECX.OSXSAVE mirrors
/// CR4.OSXSAVE (SDM Vol. 2A CPUID, table 3-10), and the APIC IDs are the
/// vCPU's local APIC's: leaf 1 EBX[31:24] (initial APIC ID), leaves 0xB
/// and 0x1F EDX (x2APIC ID, SDM Vol. 2A CPUID) and AMD's Fn8000_001E EAX
/// (extended APIC ID, APM Vol. 3 E.4.16). A leaf that answers all zeros
/// (absent, or hidden) stays so.
pub fn vcpu_fields(leaf: u32, mut r: Regs, osxsave: bool, apic_id: u32) -> Regs {
    match leaf {
        1 => {
            r.ecx = (r.ecx & !ECX_OSXSAVE) | if osxsave { ECX_OSXSAVE } else { 0 };
            r.ebx = (r.ebx & 0x00ff_ffff) | ((apic_id & 0xff) << 24);
        }
        0xb | 0x1f if r != Regs::default() => r.edx = apic_id,
        0x8000_001e if r != Regs::default() => r.eax = apic_id,
        _ => {}
    }
    r
}

/// Whether [`vcpu_fields`] changes anything in `leaf`: the exit path reads
/// CR4 (two VMREADs under VT-x) and the local APIC's ID only for these.
#[inline]
pub fn describes_vcpu(leaf: u32) -> bool {
    matches!(leaf, 1 | 0xb | 0x1f | 0x8000_001e)
}

/// Subleaves a table probes per leaf: 0xD has one per XSAVE state
/// component (bits 0..62 of XCR0 and IA32_XSS, SDM Vol. 1 13.2), the other
/// indexed leaves (4, 7, 0xB, 0x1F, 0x8000001D...) fewer.
const SUBLEAVES: u32 = 64;
/// Leaves a table takes per range (basic, hypervisor, extended): CPUs have
/// a few dozen; the bound keeps a table small whatever leaf 0 says.
const LEAVES_PER_RANGE: u32 = 0x100;
/// Entries a well-formed table has at most: a capture stays far below it,
/// a checkpoint's table above it is refused.
pub const MAX_ENTRIES: usize = 4096;

/// One answer of a [`Table`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub leaf: u32,
    /// `None`: the leaf's answer does not depend on ECX.
    pub subleaf: Option<u32>,
    pub regs: Regs,
}

/// A VM's whole guest-visible CPUID, taken once (`cpuid=pinned`): the
/// answers [`guest_cpuid`] gave on the host the VM was created on, which
/// the VM keeps wherever it is restored. Plain data, sorted by leaf and
/// subleaf; leaves and subleaves it lacks answer all zeros, as AMD CPUs
/// answer a leaf above the maximum (Intel CPUs answer the highest basic
/// leaf's data instead, SDM Vol. 2A CPUID; software checks the maximum
/// first).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    entries: Vec<Entry>,
}

/// Which CPUID a VM sees.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Profile {
    /// [`guest_cpuid`] of the host it runs on, asked at every exit.
    #[default]
    Host,
    /// The table taken when it was created.
    Pinned(Table),
    /// The table taken when it was created, its features cut to
    /// [`Table::portable`]'s set, which hosts of both vendors offer.
    Portable(Table),
}

impl Profile {
    /// The guest's answer for `leaf`/`subleaf`, before [`vcpu_fields`];
    /// `host` gives [`guest_cpuid`] on this host.
    pub fn answer(&self, leaf: u32, subleaf: u32, host: impl FnOnce() -> Regs) -> Regs {
        match self {
            Profile::Host => host(),
            Profile::Pinned(t) | Profile::Portable(t) => t.answer(leaf, subleaf),
        }
    }

    /// `host`, or `pinned (<vendor>, <family>/<model>)`, as `vm stats`
    /// shows it.
    pub fn describe(&self) -> String {
        match self {
            Profile::Host => String::from("host"),
            Profile::Pinned(t) => {
                let (family, model) = t.family_model();
                format!("pinned ({}, {family}/{model})", t.vendor())
            }
            Profile::Portable(t) => {
                let (family, model) = t.family_model();
                format!("portable ({}, {family}/{model})", t.vendor())
            }
        }
    }

    /// The table a VM keeps, if it keeps one.
    pub fn table(&self) -> Option<&Table> {
        match self {
            Profile::Host => None,
            Profile::Pinned(t) | Profile::Portable(t) => Some(t),
        }
    }
}

impl Table {
    /// Every answer `cpuid` (a guest's CPUID on this host) gives: the basic
    /// leaves up to leaf 0's maximum, the hypervisor leaves up to
    /// 0x40000000's, the extended leaves up to 0x80000000's. A leaf whose
    /// answer changes with the subleaf keeps each subleaf that is not all
    /// zeros (an invalid subleaf answers zeros: SDM Vol. 2A CPUID leaves 4,
    /// 7, 0xD); probing rather than naming the indexed leaves keeps this
    /// free of any one vendor's list.
    pub fn capture(cpuid: impl Fn(u32, u32) -> Regs) -> Table {
        let mut entries = Vec::new();
        for base in [0, HV_LEAF, 0x8000_0000] {
            let max = cpuid(base, 0).eax;
            let last = if max >= base { max.min(base + LEAVES_PER_RANGE - 1) } else { base };
            for leaf in base..=last {
                let first = cpuid(leaf, 0);
                let subs: Vec<Regs> = (1..SUBLEAVES).map(|s| cpuid(leaf, s)).collect();
                if subs.iter().all(|r| *r == first) {
                    if first != Regs::default() {
                        entries.push(Entry { leaf, subleaf: None, regs: first });
                    }
                    continue;
                }
                for (s, regs) in core::iter::once(first).chain(subs).enumerate() {
                    if regs != Regs::default() {
                        entries.push(Entry { leaf, subleaf: Some(s as u32), regs });
                    }
                }
            }
        }
        entries.truncate(MAX_ENTRIES);
        Table { entries }
    }

    /// This table with its features cut to a set both vendors' hosts
    /// offer (`cpuid=portable`): x86-64-v2 (SSE3 to SSE4.2, SSSE3,
    /// POPCNT, CX16, LAHF) with PCLMULQDQ, AES, MOVBE, RDRAND, FSGSBASE,
    /// BMI1/2, ADX, SMEP, SMAP, LZCNT, XSAVE of x87 and SSE state only, and
    /// the long-mode basics; vendor-only extensions (SSE4a, 3DNow!, PCID,
    /// INVPCID, RDSEED, SHA, the AVX-512 family, ...) are hidden. The
    /// vendor string, family and model stay the creating host's: the guest
    /// sees them unchanged wherever it is restored. Bits the creating host
    /// lacks stay clear (this only removes).
    pub fn portable(mut self) -> Table {
        // Leaf 1 ECX: SSE3 0, PCLMULQDQ 1, SSSE3 9, CX16 13, SSE4.1 19,
        // SSE4.2 20, x2APIC 21, MOVBE 22, POPCNT 23, TSC-deadline 24, AES
        // 25, XSAVE 26, OSXSAVE 27, RDRAND 30, hypervisor 31 (SDM Vol. 2A
        // table 3-10).
        const L1_ECX: u32 = 0xcff8_2203;
        // Leaf 1 EDX: FPU 0, DE 2, PSE 3, TSC 4, MSR 5, PAE 6, MCE 7, CX8
        // 8, APIC 9, SEP 11, MTRR 12, PGE 13, MCA 14, CMOV 15, PAT 16,
        // PSE-36 17, CLFSH 19, MMX 23, FXSR 24, SSE 25, SSE2 26 (table 3-11).
        const L1_EDX: u32 = 0x078b_fbfd;
        // Leaf 7.0 EBX: FSGSBASE 0, BMI1 3, SMEP 7, BMI2 8, ADX 19, SMAP 20.
        const L7_EBX: u32 = 0x0018_0189;
        // 0x80000001 ECX: LAHF/SAHF 0, LZCNT 5; EDX: SYSCALL 11, NX 20,
        // 1-GByte pages 26, RDTSCP 27, LM 29 (APM Vol. 3 E.4.2).
        const E1_ECX: u32 = 0x0000_0021;
        const E1_EDX: u32 = 0x2c10_0800;
        // XCR0: x87 and SSE; their XSAVE area is 576 bytes (SDM Vol. 1 13.4).
        const XSAVE_LEGACY: u32 = 576;
        self.entries.retain(|e| {
            !(e.leaf == 0xd && e.subleaf.is_some_and(|s| s >= 2)) && !(e.leaf == 7 && e.subleaf.is_some_and(|s| s >= 1))
        });
        for e in &mut self.entries {
            let r = &mut e.regs;
            match (e.leaf, e.subleaf.unwrap_or(0)) {
                (1, _) => {
                    r.ecx &= L1_ECX;
                    r.edx &= L1_EDX;
                }
                (7, 0) => {
                    // EAX: the highest subleaf, now 0.
                    r.eax = 0;
                    r.ebx &= L7_EBX;
                    r.ecx = 0;
                    r.edx = 0;
                }
                (7, _) => *r = Regs::default(),
                (0xd, 0) => {
                    r.eax &= 0b11;
                    r.edx = 0;
                    r.ebx = r.ebx.min(XSAVE_LEGACY);
                    r.ecx = r.ecx.min(XSAVE_LEGACY);
                }
                (0xd, 1) => *r = Regs::default(),
                (0x8000_0001, _) => {
                    r.ecx &= E1_ECX;
                    r.edx &= E1_EDX;
                }
                _ => {}
            }
        }
        // A leaf left all zeros is what a missing entry answers.
        self.entries.retain(|e| e.regs != Regs::default());
        self
    }

    /// A table of these entries, if well formed (see
    /// [`Self::is_well_formed`]).
    pub fn from_entries(entries: Vec<Entry>) -> Option<Table> {
        let t = Table { entries };
        t.is_well_formed().then_some(t)
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Sorted by leaf then subleaf without repeats, a leaf either flat or
    /// indexed, at most [`MAX_ENTRIES`]: what [`Self::answer`]'s binary
    /// searches need. A checkpoint's table is checked with this before use.
    pub fn is_well_formed(&self) -> bool {
        self.entries.len() <= MAX_ENTRIES
            && self.entries.windows(2).all(|w| {
                (w[0].leaf, w[0].subleaf) < (w[1].leaf, w[1].subleaf)
                    && !(w[0].leaf == w[1].leaf && w[0].subleaf.is_none())
            })
    }

    /// The answer for `leaf`/`subleaf` (zeros where the table has none).
    pub fn answer(&self, leaf: u32, subleaf: u32) -> Regs {
        let key = |e: &Entry| (e.leaf, e.subleaf);
        let find = |k| self.entries.binary_search_by_key(&k, key).ok().map(|i| self.entries[i].regs);
        find((leaf, None)).or_else(|| find((leaf, Some(subleaf)))).unwrap_or_default()
    }

    /// The vendor string of leaf 0 (EBX, EDX, ECX), printable ASCII only.
    pub fn vendor(&self) -> String {
        let r = self.answer(0, 0);
        [r.ebx, r.edx, r.ecx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .map(|b| if b.is_ascii_graphic() { char::from(b) } else { '?' })
            .collect()
    }

    /// DisplayFamily and DisplayModel of leaf 1 EAX (SDM Vol. 2A CPUID,
    /// figure 3-6; APM Vol. 3 E.4.1 adds the extended model for family 0xF
    /// only, and AMD has no family 6 with an extended model).
    pub fn family_model(&self) -> (u32, u32) {
        let eax = self.answer(1, 0).eax;
        let base = (eax >> 8) & 0xf;
        let family = if base == 0xf { base + ((eax >> 20) & 0xff) } else { base };
        let model = (eax >> 4) & 0xf;
        let model = if base == 6 || base == 0xf { model | (((eax >> 16) & 0xf) << 4) } else { model };
        (family, model)
    }

    /// What this table shows that a host offering `offered` (its
    /// [`guest_cpuid`]) cannot honour: feature bits in the registers that
    /// list instructions and state the guest runs natively, and an XSAVE
    /// area larger than the host gives guests. Empty: the host can run a
    /// VM pinned to it.
    pub fn unsupported(&self, offered: impl Fn(u32, u32) -> Regs) -> Vec<Unsupported> {
        use Reg32::*;
        // Leaf 1 ECX/EDX, leaf 7.0 EBX/ECX/EDX and 7.1 EAX, 0x80000001
        // ECX/EDX: instruction-set and paging features; 0xD.0 EDX:EAX: the
        // XCR0 bits the guest may set; 0xD.1 EAX: XSAVEOPT, XSAVEC,
        // XGETBV1, XSAVES.
        const FEATURES: [(u32, u32, Reg32); 11] = [
            (1, 0, Ecx),
            (1, 0, Edx),
            (7, 0, Ebx),
            (7, 0, Ecx),
            (7, 0, Edx),
            (7, 1, Eax),
            (0xd, 0, Eax),
            (0xd, 0, Edx),
            (0xd, 1, Eax),
            (0x8000_0001, 0, Ecx),
            (0x8000_0001, 0, Edx),
        ];
        let mut out = Vec::new();
        for (leaf, subleaf, reg) in FEATURES {
            let mut have = reg.of(offered(leaf, subleaf));
            if (leaf, reg) == (0x8000_0001, Edx) {
                // AMD repeats these leaf-1 EDX features here (APM Vol. 3
                // E.4.2, CPUID Fn8000_0001_EDX); Intel reserves the bits.
                // The feature is the same one: a host that offers it in
                // leaf 1 honours it here.
                have |= offered(1, 0).edx & EXT_EDX_LEAF1_COPIES;
            }
            let bits = reg.of(self.answer(leaf, subleaf)) & !have;
            if bits != 0 {
                out.push(Unsupported::Bits { leaf, subleaf, reg, bits });
            }
        }
        // XSAVE sizes (0xD.0 EBX for the XCR0 bits set, ECX for all it
        // offers): the guest sizes its XSAVE buffers by them, and the
        // vCPU's saved state holds only what this host offers guests
        // (x87 and SSE: 576 bytes, SDM Vol. 1 13.4). A table that shows
        // more describes state this host cannot keep.
        let host = offered(0xd, 0).ecx;
        let pinned = self.answer(0xd, 0);
        if pinned.ebx.max(pinned.ecx) > host {
            out.push(Unsupported::XsaveSize { pinned: pinned.ebx.max(pinned.ecx), host });
        }
        out
    }
}

/// AMD's copies of leaf-1 EDX features in 0x80000001 EDX: bits 0-9, 12-17,
/// 23 and 24 (APM Vol. 3 E.4.2).
const EXT_EDX_LEAF1_COPIES: u32 = 0x0183_f3ff;

/// A 32-bit result register of CPUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg32 {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg32 {
    fn of(self, r: Regs) -> u32 {
        match self {
            Reg32::Eax => r.eax,
            Reg32::Ebx => r.ebx,
            Reg32::Ecx => r.ecx,
            Reg32::Edx => r.edx,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Reg32::Eax => "EAX",
            Reg32::Ebx => "EBX",
            Reg32::Ecx => "ECX",
            Reg32::Edx => "EDX",
        }
    }
}

/// Why a host cannot honour a pinned table ([`Table::unsupported`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unsupported {
    /// Bits the table shows in a feature register that the host does not
    /// offer.
    Bits { leaf: u32, subleaf: u32, reg: Reg32, bits: u32 },
    /// The table's largest XSAVE area (0xD.0 EBX or ECX) exceeds the
    /// host's for guests (its 0xD.0 ECX).
    XsaveSize { pinned: u32, host: u32 },
}

impl core::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Unsupported::Bits { leaf, subleaf, reg, bits } => {
                write!(f, "leaf {leaf:#x}.{subleaf} {} bits {bits:#010x} (", reg.name())?;
                let mut sep = "";
                for b in (0..32).filter(|b| bits & (1 << b) != 0) {
                    write!(f, "{sep}{b}")?;
                    sep = ", ";
                }
                f.write_str(")")
            }
            Unsupported::XsaveSize { pinned, host } => {
                write!(f, "leaf 0xd.0 XSAVE area of {pinned} bytes, more than this host's {host}")
            }
        }
    }
}

/// CR4 bits a guest may set: those of the features its CPUID reports (SDM
/// Vol. 3A 2.5 and the CPUID feature each bit belongs to), never VMXE or
/// SMXE. `cpuid` answers as the guest's CPUID does.
pub fn cr4_allowed(cpuid: impl Fn(u32, u32) -> Regs) -> u64 {
    let l1 = cpuid(1, 0);
    let l7 = cpuid(7, 0);
    let bit = |has: bool, b: u32| if has { 1u64 << b } else { 0 };
    // TSD (2) and PCE (8) exist on every x86-64 CPU.
    let mut m = (1 << 2) | (1 << 8);
    m |= bit(l1.edx & EDX_VME != 0, 0) | bit(l1.edx & EDX_VME != 0, 1);
    m |= bit(l1.edx & EDX_DE != 0, 3) | bit(l1.edx & EDX_PSE != 0, 4) | bit(l1.edx & EDX_PAE != 0, 5);
    m |= bit(l1.edx & EDX_MCE != 0, 6) | bit(l1.edx & EDX_PGE != 0, 7);
    m |= bit(l1.edx & EDX_FXSR != 0, 9) | bit(l1.edx & EDX_SSE != 0, 10);
    m |= bit(l7.ecx & L7_ECX_UMIP != 0, 11) | bit(l7.ecx & L7_ECX_LA57 != 0, 12);
    m |= bit(l7.ebx & L7_EBX_FSGSBASE != 0, 16) | bit(l1.ecx & ECX_PCID != 0, 17);
    m |= bit(l1.ecx & ECX_XSAVE != 0, 18) | bit(l7.ebx & L7_EBX_SMEP != 0, 20);
    m |= bit(l7.ebx & L7_EBX_SMAP != 0, 21) | bit(l7.ecx & L7_ECX_PKU != 0, 22);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const ALL: Regs = Regs { eax: !0, ebx: !0, ecx: !0, edx: !0 };

    #[test]
    fn five_level_paging_is_hidden_and_its_cr4_bit_refused() {
        let r = guest_cpuid(7, 0, ALL, HostQuirks::default());
        assert_eq!(r.ecx & L7_ECX_LA57, 0);
        let allowed = cr4_allowed(|l, s| guest_cpuid(l, s, ALL, HostQuirks::default()));
        assert_eq!(allowed & (1 << 12), 0, "CR4.LA57");
    }

    #[test]
    fn hides_virtualisation_and_sets_hypervisor_bit() {
        let r = guest_cpuid(1, 0, Regs { ecx: ECX_VMX | ECX_SMX, ..Default::default() }, HostQuirks::default());
        assert_eq!(r.ecx & (ECX_VMX | ECX_SMX), 0);
        assert_ne!(r.ecx & ECX_HYPERVISOR, 0);
        let r = guest_cpuid(0x8000_0001, 0, ALL, HostQuirks::default());
        assert_eq!(r.ecx & EXT_ECX_SVM, 0);
        assert_eq!(r.edx, !EXT_EDX_RDTSCP, "NX, LM, 1 GiB pages pass through; RDTSCP only with TSC_AUX");
    }

    #[test]
    fn vendor_leaf_names_the_hypervisor() {
        let r = guest_cpuid(HV_LEAF, 0, ALL, HostQuirks::default());
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&r.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
        sig[8..].copy_from_slice(&r.edx.to_le_bytes());
        assert_eq!(&sig, SIGNATURE);
        assert_eq!(r.eax, HV_MAX_LEAF);
        assert_eq!(guest_cpuid(0x4000_0001, 0, ALL, HostQuirks::default()).eax, HV_VERSION);
        assert_eq!(guest_cpuid(0x4000_0100, 0, ALL, HostQuirks::default()), Regs::default());
    }

    #[test]
    fn fast_string_quirk_hides_erms_and_fsrm() {
        let q = HostQuirks { fast_strings_off: true, ..Default::default() };
        let r = guest_cpuid(7, 0, ALL, q);
        assert_eq!(r.ebx & L7_EBX_ERMS, 0);
        assert_eq!(r.edx & L7_EDX_FSRM, 0);
        let r = guest_cpuid(7, 0, ALL, HostQuirks::default());
        assert_ne!(r.edx & L7_EDX_FSRM, 0);
    }

    #[test]
    fn leaf1_reports_one_cpu_with_an_x2apic_and_its_tsc_deadline_timer() {
        let r = guest_cpuid(1, 0, ALL, HostQuirks::default());
        assert_eq!(r.ebx >> 16, 1);
        assert_eq!(r.ebx >> 24, 0, "initial APIC id 0");
        assert_ne!(r.edx & EDX_APIC, 0);
        assert_eq!(r.ecx & (ECX_X2APIC | ECX_TSC_DEADLINE), ECX_X2APIC | ECX_TSC_DEADLINE);
        assert_eq!(r.ecx & (ECX_MONITOR | ECX_AVX), 0, "no MONITOR/MWAIT, no AVX");
        assert_eq!(r.ecx & ECX_OSXSAVE, 0, "OSXSAVE follows the guest's CR4 (set by the exit handler)");
        assert_ne!(r.ecx & ECX_XSAVE, 0);
        assert_eq!(guest_cpuid(5, 0, ALL, HostQuirks::default()), Regs::default(), "no MONITOR leaf");
        let r = guest_cpuid(1, 0, Regs::default(), HostQuirks::default());
        assert_ne!(r.edx & EDX_APIC, 0, "whatever the host says");
        assert_ne!(r.ecx & ECX_X2APIC, 0, "the x2APIC is emulated, not the host's");
    }

    #[test]
    fn xsave_offers_only_x87_and_sse() {
        let host = Regs { eax: 0x2e7, ebx: 2696, ecx: 2696, edx: 0 };
        let r = guest_cpuid(0xd, 0, host, HostQuirks::default());
        assert_eq!(r, Regs { eax: 3, ebx: 576, ecx: 576, edx: 0 });
        assert_eq!(guest_cpuid(0xd, 1, ALL, HostQuirks::default()), Regs::default(), "no XSAVEOPT/XSAVEC/XSAVES");
        assert_eq!(guest_cpuid(0xd, 2, ALL, HostQuirks::default()), Regs::default(), "no AVX component");
        let r = guest_cpuid(7, 0, ALL, HostQuirks::default());
        assert_eq!(r.ecx & (L7_ECX_PKU | L7_ECX_CET_SS), 0);
        assert_eq!(r.ebx & (L7_EBX_MPX | L7_EBX_TSC_ADJUST), 0);
    }

    #[test]
    fn features_that_need_avx_state_or_cr4_pks_are_hidden() {
        let q = HostQuirks::default();
        assert_eq!(guest_cpuid(1, 0, ALL, q).ecx & ((1 << 12) | (1 << 29)), 0, "FMA, F16C");
        let r = guest_cpuid(7, 0, ALL, q);
        assert_eq!(r.ecx & (L7_ECX_NEEDS_AVX | L7_ECX_PKS), 0);
        assert_ne!(r.ecx & (1 << 8), 0, "GFNI has legacy SSE encodings: kept");
        assert_eq!(r.edx & L7_EDX_NEEDS_AVX, 0);
        assert_eq!(guest_cpuid(0x8000_0001, 0, ALL, q).ecx & ((1 << 11) | (1 << 16)), 0, "XOP, FMA4");
        let allowed = cr4_allowed(|l, s| guest_cpuid(l, s, ALL, q));
        assert_eq!(allowed & (1 << 24), 0, "CR4.PKS");
    }

    #[test]
    fn rdtscp_and_rdpid_only_with_tsc_aux() {
        let q = HostQuirks { rdtscp: true, ..Default::default() };
        assert_ne!(guest_cpuid(0x8000_0001, 0, ALL, q).edx & EXT_EDX_RDTSCP, 0);
        assert_ne!(guest_cpuid(7, 0, ALL, q).ecx & L7_ECX_RDPID, 0);
        let none = HostQuirks::default();
        assert_eq!(guest_cpuid(0x8000_0001, 0, ALL, none).edx & EXT_EDX_RDTSCP, 0);
        assert_eq!(guest_cpuid(7, 0, ALL, none).ecx & L7_ECX_RDPID, 0);
    }

    /// A host's raw CPUID: an AMD CPU with leaves up to 0xD (7 with two
    /// subleaves, 0xD with x87/SSE/AVX) and extended leaves up to
    /// 0x80000008, the vendor and brand strings in their leaves.
    fn amd_host(leaf: u32, sub: u32) -> Regs {
        let r = |eax, ebx, ecx, edx| Regs { eax, ebx, ecx, edx };
        match (leaf, sub) {
            (0, _) => r(0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            // Family 0x19 (0xf + 0xa), model 0x21; APIC id 3.
            (1, _) => r(0x00a2_0f10, 0x0310_0800, 0x7ed8_320b, 0x178b_fbff),
            (7, 0) => r(1, 0x219c_97a9, 0x0040_069c, 0x10),
            (7, 1) => r(0, 0, 0, 0),
            (0xd, 0) => r(7, 832, 832, 0),
            (0xd, 1) => r(0xf, 0, 0, 0),
            (0xd, 2) => r(256, 576, 0, 0),
            (0x8000_0000, _) => r(0x8000_0008, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            (0x8000_0001, _) => r(0x00a2_0f10, 0, 0x7574_f3ff, 0x2fd3_fbff),
            (0x8000_0002..=0x8000_0004, _) => r(leaf, leaf + 1, leaf + 2, leaf + 3),
            _ => Regs::default(),
        }
    }

    fn guest_of(host: fn(u32, u32) -> Regs) -> impl Fn(u32, u32) -> Regs {
        move |l, s| guest_cpuid(l, s, host(l, s), HostQuirks::default())
    }

    #[test]
    fn a_table_holds_every_leaf_and_subleaf_the_guest_sees() {
        let guest = guest_of(amd_host);
        let t = Table::capture(&guest);
        assert!(t.is_well_formed());
        for leaf in (0..=0x10).chain(HV_LEAF..=HV_LEAF + 2).chain(0x8000_0000..=0x8000_000a) {
            for sub in [0, 1, 2, 63, 64, 0xffff_ffff] {
                // Out of the range the capture probed, an indexed leaf's
                // subleaf answers zeros, as an invalid one does.
                let want = if sub >= SUBLEAVES && matches!(leaf, 7 | 0xd) { Regs::default() } else { guest(leaf, sub) };
                assert_eq!(t.answer(leaf, sub), want, "leaf {leaf:#x}.{sub}");
            }
        }
        // Leaf 7 varies with the subleaf (guest_cpuid zeros 7.1): kept as
        // indexed; leaf 1 does not: one entry; zero leaves are left out.
        let subs = |leaf| t.entries().iter().filter(|e| e.leaf == leaf).map(|e| e.subleaf).collect::<Vec<_>>();
        assert_eq!(subs(7), [Some(0)]);
        assert_eq!(subs(1), [None]);
        assert_eq!(subs(0xd), [Some(0)], "x87 and SSE only: no subleaf 1 or 2");
        assert!(subs(5).is_empty());
        assert_eq!(t.answer(HV_LEAF, 0).eax, HV_MAX_LEAF, "the hypervisor leaves");
        assert!(t.entries().len() < 64, "{} entries", t.entries().len());
        let p = Profile::Pinned(t);
        assert_eq!(p.describe(), "pinned (AuthenticAMD, 25/33)");
        assert_eq!(Profile::Host.describe(), "host");
        assert_eq!(p.answer(0, 0, || unreachable!("a pinned VM does not ask the host")), guest(0, 0));
        // Postcard round trip, as in a checkpoint.
        let bytes = postcard::to_allocvec(&p).unwrap();
        assert_eq!(postcard::from_bytes::<Profile>(&bytes).unwrap(), p);
    }

    #[test]
    fn the_vcpus_own_fields_follow_the_vcpu() {
        let t = Table::capture(guest_of(amd_host));
        let l1 = t.answer(1, 0);
        assert_eq!((l1.ebx >> 24, l1.ecx & ECX_OSXSAVE), (0, 0));
        let r = vcpu_fields(1, l1, true, 5);
        assert_eq!((r.ebx >> 24, r.ecx & ECX_OSXSAVE, r.ebx & 0xff_ffff), (5, ECX_OSXSAVE, l1.ebx & 0xff_ffff));
        assert_eq!(vcpu_fields(1, r, false, 0), l1);
        let topo = Regs { eax: 1, ebx: 1, ecx: 0x100, edx: 9 };
        assert_eq!(vcpu_fields(0xb, topo, false, 2).edx, 2);
        assert_eq!(vcpu_fields(0x8000_001e, Regs { eax: 9, ebx: 1, ..Default::default() }, false, 0).eax, 0);
        assert_eq!(vcpu_fields(0x1f, Regs::default(), false, 7), Regs::default(), "an absent leaf stays absent");
        // Every leaf the exit path skips is one this leaves alone.
        let any = Regs { eax: 1, ebx: 2, ecx: 3, edx: 4 };
        for leaf in (0..0x40).chain(0x4000_0000..0x4000_0010).chain(0x8000_0000..0x8000_0030) {
            if !describes_vcpu(leaf) {
                assert_eq!(vcpu_fields(leaf, any, true, 9), any, "leaf {leaf:#x}");
                assert_eq!(vcpu_fields(leaf, any, false, 0), any, "leaf {leaf:#x}");
            }
        }
    }

    #[test]
    fn a_host_that_lacks_a_pinned_feature_is_named_bit_by_bit() {
        let t = Table::capture(guest_of(amd_host));
        assert_eq!(t.unsupported(guest_of(amd_host)), Vec::new(), "the host it was taken on");
        // An Intel host without SSE4a, LZCNT (0x80000001 ECX 5, 6) and
        // SHA (7.0 EBX 29), and without AMD's copies of leaf-1 features
        // in 0x80000001 EDX, which it has in leaf 1.
        fn intel(leaf: u32, sub: u32) -> Regs {
            let mut r = amd_host(leaf, sub);
            match (leaf, sub) {
                (7, 0) => r.ebx &= !(1 << 29),
                (0x8000_0001, _) => {
                    r.ecx &= !((1 << 5) | (1 << 6));
                    r.edx &= !EXT_EDX_LEAF1_COPIES;
                }
                _ => {}
            }
            r
        }
        let missing = t.unsupported(guest_of(intel));
        let text: Vec<String> = missing.iter().map(|m| format!("{m}")).collect();
        assert_eq!(
            text,
            ["leaf 0x7.0 EBX bits 0x20000000 (29)", "leaf 0x80000001.0 ECX bits 0x00000060 (5, 6)"],
            "{missing:?}"
        );
        // A table offering more XSAVE state than the host keeps for guests.
        let mut entries = t.entries().to_vec();
        let xsave = entries.iter_mut().find(|e| e.leaf == 0xd).unwrap();
        xsave.regs = Regs { eax: 7, ebx: 832, ecx: 832, edx: 0 };
        let big = Table::from_entries(entries).unwrap();
        let missing = big.unsupported(guest_of(amd_host));
        assert_eq!(
            missing,
            [
                Unsupported::Bits { leaf: 0xd, subleaf: 0, reg: Reg32::Eax, bits: 4 },
                Unsupported::XsaveSize { pinned: 832, host: 576 }
            ]
        );
    }

    #[test]
    fn a_portable_table_keeps_what_both_vendors_offer() {
        // An Intel host as Bochs' Tiger Lake differs from QEMU's AMD CPU:
        // no SSE4a, CmpLegacy, AltMovCr8 (0x80000001 ECX 6, 1, 4), no
        // 3DNow!/MmxExt (EDX 31, 30, 22), no ERMS (7.0 EBX 9); but SHA and
        // RDSEED (7.0 EBX 29, 18) the AMD one lacks.
        fn amd(leaf: u32, sub: u32) -> Regs {
            let mut r = amd_host(leaf, sub);
            if (leaf, sub) == (7, 0) {
                r.ebx &= !((1 << 29) | (1 << 18));
            }
            r
        }
        fn intel(leaf: u32, sub: u32) -> Regs {
            let mut r = amd_host(leaf, sub);
            match (leaf, sub) {
                (0, _) => (r.ebx, r.edx, r.ecx) = (0x756e_6547, 0x4965_6e69, 0x6c65_746e), // GenuineIntel
                (7, 0) => r.ebx = (r.ebx & !(1 << 9)) | (1 << 29) | (1 << 18),
                (0x8000_0001, _) => {
                    r.ecx &= !((1 << 1) | (1 << 4) | (1 << 6));
                    r.edx &= !((1 << 31) | (1 << 30) | (1 << 22));
                }
                _ => {}
            }
            r
        }
        let pinned = Table::capture(guest_of(amd));
        assert!(!pinned.unsupported(guest_of(intel)).is_empty(), "pinned: refused on the other vendor");
        let portable = Table::capture(guest_of(amd)).portable();
        assert!(portable.is_well_formed());
        assert_eq!(portable.unsupported(guest_of(intel)), Vec::new());
        assert_eq!(portable.unsupported(guest_of(amd)), Vec::new());
        // The other way round too.
        let back = Table::capture(guest_of(intel)).portable();
        assert_eq!(back.unsupported(guest_of(amd)), Vec::new());
        // It keeps the creating host's identity and the common features,
        // and hides the vendor-only ones.
        assert_eq!(portable.vendor(), "AuthenticAMD");
        assert_eq!(portable.family_model(), (25, 33));
        assert_eq!(portable.answer(0, 0), guest_of(amd)(0, 0));
        let l1 = portable.answer(1, 0);
        assert_eq!(l1.ecx & ((1 << 20) | (1 << 23)), (1 << 20) | (1 << 23), "SSE4.2 and POPCNT");
        assert_eq!(portable.answer(0x8000_0001, 0).ecx & (1 << 6), 0, "SSE4a hidden");
        assert_eq!(portable.answer(0x8000_0001, 0).edx & (1 << 29), 1 << 29, "long mode");
        assert_eq!(back.answer(7, 0).ebx & ((1 << 29) | (1 << 18)), 0, "SHA and RDSEED hidden");
        assert_eq!(portable.answer(0xd, 0), Regs { eax: 3, ebx: 576, ecx: 576, edx: 0 });
        let p = Profile::Portable(portable);
        assert!(p.describe().starts_with("portable (AuthenticAMD, 25/33)"), "{}", p.describe());
        let bytes = postcard::to_allocvec(&p).unwrap();
        assert_eq!(postcard::from_bytes::<Profile>(&bytes).unwrap(), p);
    }

    #[test]
    fn malformed_tables_are_not_tables() {
        let e = |leaf, subleaf| Entry { leaf, subleaf, regs: Regs { eax: 1, ..Default::default() } };
        assert!(Table::from_entries(vec![e(0, None), e(1, None), e(7, Some(0)), e(7, Some(1))]).is_some());
        assert!(Table::from_entries(vec![e(1, None), e(0, None)]).is_none(), "unsorted");
        assert!(Table::from_entries(vec![e(1, None), e(1, None)]).is_none(), "repeated");
        assert!(Table::from_entries(vec![e(7, None), e(7, Some(0))]).is_none(), "flat and indexed");
        assert!(Table::from_entries((0..=MAX_ENTRIES as u32).map(|l| e(l, None)).collect()).is_none());
        // Whatever a hostile table holds, answers are lookups.
        let t = Table::default();
        assert_eq!(t.answer(0xffff_ffff, 0xffff_ffff), Regs::default());
        assert_eq!(t.vendor(), "????????????");
    }

    #[test]
    fn cr4_follows_the_guests_cpuid() {
        let all = cr4_allowed(|l, s| guest_cpuid(l, s, ALL, HostQuirks::default()));
        assert_eq!(all & ((1 << 13) | (1 << 14)), 0, "VMXE and SMXE never");
        assert_ne!(all & (1 << 18), 0, "OSXSAVE with XSAVE");
        assert_eq!(all & (1 << 22), 0, "PKE: PKU is hidden");
        assert_ne!(all & 0x7ff, 0);
        let bare = cr4_allowed(|_, _| Regs::default());
        assert_eq!(bare, (1 << 2) | (1 << 8));
    }
}
