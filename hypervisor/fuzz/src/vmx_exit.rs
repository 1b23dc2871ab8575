//! VT-x exit decoding (`vmx::decode`): raw exit reason, exit-information
//! fields and guest registers in; a neutral `VmExit` or a backend action
//! out.
//!
//! Two halves on every input:
//! - raw: the fuzzed values go straight in. Never panics, reads only
//!   exit-information fields, is deterministic, and every result agrees
//!   with the SDM's field layouts (checked here bit by bit).
//! - neutral: an exit the hypervisor understands (port access, MSR access,
//!   EPT violation, interrupt, plain instruction exits) is encoded the way
//!   the SDM says the CPU reports it, with every don't-care bit fuzzed;
//!   decoding must give exactly that exit back. `svm_exit` does the same
//!   through AMD's encodings, so both backends agree on every neutral exit.
//!
//! Input: reason `u32`, then qualification, interruption info, guest-linear
//! address, guest-physical address, RIP, RAX, RCX, RDX (`u64` each,
//! little-endian); missing bytes read as zero.

use std::cell::RefCell;

use vcpu::exit::CrAccess;
use vcpu::{ExitKind, Gprs, IoAccess, MemAccess, VmExit};
use vmx::decode::{Decoded, IA32_EFER, decode, handled_kind};
use x86::vmx::vmcs::{guest, ro};

use crate::input::Input;

/// The fields an exit handler may read (SDM Vol. 3C 28.2: exit information,
/// plus the guest RIP for reports).
const EXIT_FIELDS: [u32; 5] = [
    ro::EXIT_QUALIFICATION,
    ro::VMEXIT_INTERRUPTION_INFO,
    ro::GUEST_LINEAR_ADDR,
    ro::GUEST_PHYSICAL_ADDR_FULL,
    guest::RIP,
];

#[derive(Clone, Copy, Debug)]
struct Raw {
    reason: u32,
    fields: [u64; 5],
    gprs: [u64; 3],
}

impl Raw {
    fn field(&self, f: u32) -> u64 {
        self.fields[EXIT_FIELDS.iter().position(|&x| x == f).unwrap()]
    }
    fn qual(&self) -> u64 {
        self.field(ro::EXIT_QUALIFICATION)
    }
    fn gprs(&self) -> Gprs {
        Gprs { rax: self.gprs[0], rcx: self.gprs[1], rdx: self.gprs[2], ..Gprs::default() }
    }
}

/// Decodes `raw`, asserting that only exit-information fields are read.
fn run(raw: &Raw) -> Decoded {
    let read = RefCell::new(Vec::new());
    let fields = |f: u32| {
        assert!(EXIT_FIELDS.contains(&f), "decode read VMCS field {f:#x}");
        read.borrow_mut().push(f);
        raw.field(f)
    };
    decode(raw.reason, &fields, &raw.gprs())
}

pub fn vmx_exit(data: &[u8]) {
    let mut input = Input::new(data);
    let reason = input.u32();
    let fields = [input.u64(), input.u64(), input.u64(), input.u64(), input.u64()];
    let gprs = [input.u64(), input.u64(), input.u64()];
    let raw = Raw { reason, fields, gprs };
    check_raw(&raw);
    check_neutral(&raw);
}

fn check_raw(raw: &Raw) {
    let d = run(raw);
    assert_eq!(d, run(raw), "decoding is deterministic");
    let basic = (raw.reason & 0xffff) as u16;
    let q = raw.qual();
    if raw.reason & (1 << 31) != 0 {
        // SDM 28.2.1: bit 31 is "VM-entry failure", whatever the basic reason.
        assert_eq!(d, Decoded::EntryFailure { reason: basic, qualification: q });
        return;
    }
    match &d {
        Decoded::Exit(exit) => check_exit(raw, basic, exit),
        Decoded::InterruptWindow => assert_eq!(basic, 7),
        Decoded::NmiWindow => assert_eq!(basic, 8),
        Decoded::EferWrite { value } => {
            assert!(basic == 32 && raw.gprs[1] as u32 == IA32_EFER);
            assert_eq!(*value, raw.gprs[2] << 32 | (raw.gprs[0] & 0xffff_ffff));
        }
        Decoded::InjectUd => assert!(matches!(basic, 11 | 19..=27 | 50 | 53), "#UD for reason {basic}"),
        Decoded::EntryFailure { .. } => panic!("entry failure without bit 31"),
        Decoded::TripleFault => assert_eq!(basic, 2),
    }
    if let Decoded::EferWrite { .. } = d {
        assert_eq!(handled_kind(&d), ExitKind::Wrmsr);
    }
}

fn check_exit(raw: &Raw, basic: u16, exit: &VmExit) {
    let q = raw.qual();
    let (rax, rcx, rdx) = (raw.gprs[0], raw.gprs[1], raw.gprs[2]);
    match exit {
        VmExit::Cpuid => assert_eq!(basic, 10),
        VmExit::CrAccess { cr, access } => {
            // Table 28-3: CR number in 3:0, access type 5:4, GPR in 11:8,
            // LMSW's source in 31:16.
            assert_eq!(basic, 28);
            assert_eq!(u64::from(*cr), q & 0xf);
            let gpr = ((q >> 8) & 0xf) as u8;
            let want = match (q >> 4) & 3 {
                0 => CrAccess::MovTo { gpr },
                1 => CrAccess::MovFrom { gpr },
                2 => CrAccess::Clts,
                _ => CrAccess::Lmsw { value: (q >> 16) as u16 },
            };
            assert_eq!(*access, want);
        }
        VmExit::DrAccess { dr, gpr, write } => {
            // Table 28-4: DR number 2:0, direction 4 (0 = MOV to DR), GPR 11:8.
            assert_eq!(basic, 29);
            assert_eq!((u64::from(*dr), u64::from(*gpr), *write), (q & 7, (q >> 8) & 0xf, q & 16 == 0));
        }
        VmExit::Init => assert_eq!(basic, 3),
        VmExit::Sipi { vector } => assert!(basic == 4 && *vector == q as u8, "SIPI vector from the qualification"),
        VmExit::CacheFlush { invd } => assert!(matches!((basic, *invd), (13, true) | (54, false))),
        VmExit::Xsetbv => assert_eq!(basic, 55),
        VmExit::Pause => assert_eq!(basic, 40),
        VmExit::MonitorMwait => assert!(matches!(basic, 36 | 39)),
        // #UD intercepted through the exception bitmap (reason 0, type 3).
        VmExit::InvalidOpcode => assert!(basic == 0 && raw.field(ro::VMEXIT_INTERRUPTION_INFO) & 0x7ff == (3 << 8) | 6),
        VmExit::InterruptWindow | VmExit::NmiWindow => panic!("the decoder reports windows as Decoded, not {exit:?}"),
        VmExit::Hlt => assert_eq!(basic, 12),
        VmExit::Hypercall => assert_eq!(basic, 18),
        VmExit::Preempted => assert_eq!(basic, 52),
        VmExit::Io(io) => {
            // Table 28-5: size - 1 in 2:0, IN in bit 3, string 4, REP 5,
            // port in 31:16. Only 1, 2 and 4 are architectural sizes.
            assert_eq!(basic, 30);
            assert_eq!(io.port, (q >> 16) as u16);
            assert_eq!(io.write, q & 8 == 0);
            assert_eq!(io.string, q & 16 != 0);
            assert_eq!(io.rep, q & 32 != 0);
            let encoded = match io.size {
                1 => Some(0),
                2 => Some(1),
                4 => Some(3),
                _ => None,
            };
            if let Some(e) = encoded {
                assert_eq!(q & 7, e, "size {} from {q:#x}", io.size);
            }
        }
        VmExit::Rdmsr { msr } => assert!(basic == 31 && *msr == rcx as u32, "RDMSR takes ECX"),
        VmExit::Wrmsr { msr, value } => {
            assert!(basic == 32 && *msr == rcx as u32 && *msr != IA32_EFER);
            assert_eq!(*value, rdx << 32 | (rax & 0xffff_ffff), "WRMSR takes EDX:EAX");
        }
        VmExit::NestedPageFault { gpa, access, gva } => {
            // Table 28-7: read 0, write 1, fetch 2; bit 7 says the
            // guest-linear field is valid.
            assert_eq!(basic, 48);
            assert_eq!(*gpa, raw.field(ro::GUEST_PHYSICAL_ADDR_FULL));
            let want = if q & 2 != 0 {
                MemAccess::Write
            } else if q & 4 != 0 {
                MemAccess::Execute
            } else {
                MemAccess::Read
            };
            assert_eq!(*access, want);
            assert_eq!(*gva, (q & 0x80 != 0).then(|| raw.field(ro::GUEST_LINEAR_ADDR)));
        }
        VmExit::ExternalInterrupt { vector } => {
            let info = raw.field(ro::VMEXIT_INTERRUPTION_INFO);
            match basic {
                // Table 25-19: vector 7:0, type 10:8 (2 = NMI), valid bit 31.
                0 => assert!(info >> 8 & 7 == 2 && *vector == Some(2), "only host NMIs"),
                1 => assert_eq!(*vector, (info & (1 << 31) != 0).then_some(info as u8)),
                _ => panic!("interrupt from reason {basic}"),
            }
        }
        VmExit::Unexpected { report } => {
            // Ends the VM with this as the console's one line about it.
            assert!(!report.is_empty() && !report.contains('\n'), "{report:?}");
            assert!(report.contains(&format!("unhandled VM exit {basic} (")), "{report}");
            assert!(report.contains(&format!("at rip {:#x}", raw.field(guest::RIP))), "{report}");
        }
        VmExit::Shutdown { .. } | VmExit::EntryFailed { .. } | VmExit::Handled(_) => {
            panic!("the decoder leaves {exit:?} to the backend")
        }
    }
}

/// A neutral exit from the same bytes, encoded as the CPU would report it;
/// decoding gives it back.
fn check_neutral(raw: &Raw) {
    let [qual, info, linear, gpa, rip] = raw.fields;
    let [rax, rcx, rdx] = raw.gprs;
    // Don't-care bits come from the fuzzer too: the decoder must ignore them.
    let noise = info;
    let (reason, q, expected) = match raw.reason % 9 {
        0 => {
            let size = [1u8, 2, 4][(qual % 3) as usize];
            let io = IoAccess {
                port: (qual >> 8) as u16,
                size,
                write: noise & 1 != 0,
                string: noise & 2 != 0,
                rep: noise & 4 != 0,
            };
            let q = u64::from(io.port) << 16
                | [0, 1, 3][(qual % 3) as usize]
                | u64::from(!io.write) << 3
                | u64::from(io.string) << 4
                | u64::from(io.rep) << 5
                | noise & 0x40; // operand encoding (DX or immediate)
            (30, q, Decoded::Exit(VmExit::Io(io)))
        }
        1 => (31, qual, Decoded::Exit(VmExit::Rdmsr { msr: rcx as u32 })),
        2 => {
            let value = (rdx << 32) | (rax & 0xffff_ffff);
            let msr = rcx as u32;
            let d = if msr == IA32_EFER {
                Decoded::EferWrite { value }
            } else {
                Decoded::Exit(VmExit::Wrmsr { msr, value })
            };
            (32, qual, d)
        }
        3 => {
            let access = [MemAccess::Read, MemAccess::Write, MemAccess::Execute][(qual % 3) as usize];
            let gva = (noise & 1 != 0).then_some(linear);
            // Bits 5:3 (the EPT entry's rights), 8 and 12 are don't-cares.
            let q = [1u64, 2, 4][(qual % 3) as usize] | noise & 0x1138 | u64::from(gva.is_some()) << 7;
            (48, q, Decoded::Exit(VmExit::NestedPageFault { gpa, access, gva }))
        }
        4 => (10, qual, Decoded::Exit(VmExit::Cpuid)),
        5 => (12, qual, Decoded::Exit(VmExit::Hlt)),
        6 => (18, qual, Decoded::Exit(VmExit::Hypercall)),
        7 => (52, qual, Decoded::Exit(VmExit::Preempted)),
        _ => {
            // External interrupt, acknowledged on exit (info valid) or not.
            let vector = (noise & 1 != 0).then_some(qual as u8);
            let i = vector.map_or(0, |v| 1 << 31 | u64::from(v));
            let encoded = Raw { reason: 1, fields: [qual, i, linear, gpa, rip], gprs: raw.gprs };
            assert_eq!(run(&encoded), Decoded::Exit(VmExit::ExternalInterrupt { vector }));
            return;
        }
    };
    let encoded = Raw { reason, fields: [q, info, linear, gpa, rip], gprs: raw.gprs };
    assert_eq!(run(&encoded), expected, "{encoded:x?}");
}
