//! AMD-V exit decoding (`svm::decode`): #VMEXIT code, EXITINFO1/2 and the
//! guest's RAX/RCX/RDX in; a neutral `VmExit` (with the instruction to skip)
//! or a backend action out.
//!
//! Two halves on every input, as in `vmx_exit`:
//! - raw: never panics, is deterministic, treats a 32-bit -1/-2 like the
//!   64-bit ones (QEMU stores them that way), keeps EFER and PAT in the
//!   backend, names the right instruction to skip, and agrees with the
//!   APM's EXITINFO1 layouts bit by bit.
//! - neutral: the exits `vmx_exit` encodes for VT-x, encoded the APM's way
//!   with fuzzed don't-care bits; decoding gives exactly the same neutral
//!   exit (so the hypervisor sees one thing on both vendors).
//!
//! Input: exit code, EXITINFO1, EXITINFO2, RAX, RCX, RDX (`u64` each,
//! little-endian), then a selector byte for the neutral half.

use svm::decode::{Decoded, MSR_EFER, MSR_PAT, decode, io_access};
use svm::fetch::Opcode;
use svm::names::{self, CPUID, HLT, INTR, IOIO, MSR, NPF, VMMCALL};
use vcpu::{IoAccess, MemAccess, VmExit};

use crate::input::Input;

pub fn svm_exit(data: &[u8]) {
    let mut input = Input::new(data);
    let v = [input.u64(), input.u64(), input.u64(), input.u64(), input.u64(), input.u64()];
    check_raw(v);
    check_neutral(v, input.u8());
}

fn run(v: [u64; 6]) -> Decoded {
    decode(v[0], v[1], v[2], v[3], v[4], v[5])
}

fn check_raw(v: [u64; 6]) {
    let [code, info1, info2, rax, rcx, rdx] = v;
    let d = run(v);
    assert_eq!(d, run(v), "decoding is deterministic");
    // A 32-bit negative code means the same as the 64-bit one.
    if code >> 32 == 0 && code as u32 >= 0xffff_fff0 {
        assert_eq!(d, run([code | 0xffff_ffff_0000_0000, info1, info2, rax, rcx, rdx]));
    }
    let msr = rcx as u32;
    let value = rdx << 32 | (rax & 0xffff_ffff);
    match d {
        Decoded::Exit(exit, skip) => {
            let want_skip = match &exit {
                VmExit::Cpuid => Some(Opcode::Cpuid),
                VmExit::Hlt => Some(Opcode::Hlt),
                VmExit::Hypercall => Some(Opcode::Vmmcall),
                VmExit::Rdmsr { .. } => Some(Opcode::Rdmsr),
                VmExit::Wrmsr { .. } => Some(Opcode::Wrmsr),
                VmExit::Xsetbv => Some(Opcode::Xsetbv),
                VmExit::CacheFlush { invd: true } => Some(Opcode::Invd),
                VmExit::CacheFlush { invd: false } => Some(Opcode::Wbinvd),
                VmExit::Pause => Some(Opcode::Pause),
                _ => None,
            };
            assert_eq!(skip, want_skip, "{exit:?} skips the wrong instruction");
            match exit {
                VmExit::Cpuid => assert_eq!(code, CPUID),
                VmExit::Hlt => assert_eq!(code, HLT),
                VmExit::Hypercall => assert_eq!(code, VMMCALL),
                VmExit::Rdmsr { msr: m } => {
                    assert!(code == MSR && info1 & 1 == 0 && m == msr && m != MSR_EFER && m != MSR_PAT)
                }
                VmExit::Wrmsr { msr: m, value: x } => {
                    assert!(code == MSR && info1 & 1 == 1 && m == msr && m != MSR_EFER && m != MSR_PAT);
                    assert_eq!(x, value, "WRMSR takes EDX:EAX");
                }
                VmExit::NestedPageFault { gpa, access, gva } => {
                    // EXITINFO1 is a #PF error code (W bit 1, I/D bit 4);
                    // EXITINFO2 the guest-physical address. No linear one.
                    assert_eq!(code, NPF);
                    assert_eq!(gpa, info2);
                    assert_eq!(gva, None);
                    let want = match (info1 & 0x10 != 0, info1 & 2 != 0) {
                        (true, _) => MemAccess::Execute,
                        (false, true) => MemAccess::Write,
                        (false, false) => MemAccess::Read,
                    };
                    assert_eq!(access, want);
                }
                VmExit::Xsetbv => assert_eq!(code, names::XSETBV),
                VmExit::CacheFlush { invd } => assert_eq!(code, if invd { names::INVD } else { names::WBINVD }),
                VmExit::Pause => assert_eq!(code, names::PAUSE),
                VmExit::Init => assert_eq!(code, names::INIT),
                // #UD for the guest: CPUID hides MONITOR/MWAIT.
                VmExit::MonitorMwait => assert!(matches!(code, names::MONITOR | names::MWAIT | names::MWAIT_ARMED)),
                VmExit::InvalidOpcode => assert_eq!(code, names::EXCP_UD),
                other => panic!("decode made {other:?}"),
            }
        }
        Decoded::Dr { dr, write, info1: i } => {
            // APM table 15-7: 0x20 + n reads DRn, 0x30 + n writes it.
            assert!((names::DR_READ..names::DR_WRITE + 16).contains(&code));
            assert_eq!((u64::from(dr), write, i), (code & 0xf, code >= names::DR_WRITE, info1));
        }
        Decoded::Vintr => assert_eq!(code, names::VINTR),
        Decoded::Iret => assert_eq!(code, names::IRET),
        Decoded::Io(io, next_rip) => {
            // APM figure 15-2: TYPE (1 = IN) bit 0, STR 2, REP 3, SZ8/16/32
            // bits 4-6, port 31:16; EXITINFO2 is the next RIP.
            assert_eq!(code, IOIO);
            assert_eq!(next_rip, info2);
            assert_eq!(io, io_access(info1));
            assert_eq!(io.port, (info1 >> 16) as u16);
            assert_eq!(io.write, info1 & 1 == 0);
            assert_eq!(io.string, info1 & 4 != 0);
            assert_eq!(io.rep, info1 & 8 != 0);
            assert!(matches!(io.size, 1 | 2 | 4));
            for (bit, size) in [(4, 1), (5, 2), (6, 4)] {
                if info1 >> 4 & 7 == 1 << (bit - 4) {
                    assert_eq!(io.size, size);
                }
            }
        }
        Decoded::EferRead | Decoded::EferWrite(_) => {
            assert!(code == MSR && msr == MSR_EFER);
            assert_eq!(d == Decoded::EferRead, info1 & 1 == 0);
            if let Decoded::EferWrite(x) = d {
                assert_eq!(x, value);
            }
        }
        Decoded::PatRead | Decoded::PatWrite(_) => {
            assert!(code == MSR && msr == MSR_PAT);
            assert_eq!(d == Decoded::PatRead, info1 & 1 == 0);
            if let Decoded::PatWrite(x) = d {
                assert_eq!(x, value);
            }
        }
        Decoded::Interrupt => assert_eq!(code, INTR),
        Decoded::Nmi => assert_eq!(code, names::NMI),
        Decoded::Shutdown => assert_eq!(code, names::SHUTDOWN),
        Decoded::Invalid => assert!(code == names::INVALID || code == 0xffff_ffff),
        Decoded::InjectUd => assert!(names::exit_code(code) != "unknown", "#UD for unnamed code {code:#x}"),
        Decoded::Unknown(c) => {
            // Reported with the normalized code; the handled ones never land here.
            let normalized = if code >> 32 == 0 && code as u32 >= 0xffff_fff0 { code | !0xffff_ffff } else { code };
            assert_eq!(c, normalized);
            assert!(![CPUID, HLT, VMMCALL, IOIO, MSR, NPF, INTR].contains(&c));
        }
    }
}

/// The neutral exits of `vmx_exit`'s second half, in AMD's encoding.
fn check_neutral(v: [u64; 6], selector: u8) {
    let [a, noise, info2, rax, rcx, rdx] = v;
    let (code, info1, expected) = match selector % 7 {
        0 => {
            let io = IoAccess {
                port: (a >> 8) as u16,
                size: [1u8, 2, 4][(a % 3) as usize],
                write: noise & 1 != 0,
                string: noise & 2 != 0,
                rep: noise & 4 != 0,
            };
            // Bits 9:7 (address size) and 12:10 (segment) are don't-cares.
            let info1 = u64::from(io.port) << 16
                | 1 << (4 + a % 3)
                | u64::from(!io.write)
                | u64::from(io.string) << 2
                | u64::from(io.rep) << 3
                | noise & 0x1f80;
            assert_eq!(run([IOIO, info1, info2, rax, rcx, rdx]), Decoded::Io(io, info2));
            return;
        }
        1 | 2 => {
            let (msr, write) = (rcx as u32, selector % 7 == 2);
            let value = rdx << 32 | (rax & 0xffff_ffff);
            let d = match (msr, write) {
                (MSR_EFER, false) => Decoded::EferRead,
                (MSR_EFER, true) => Decoded::EferWrite(value),
                (MSR_PAT, false) => Decoded::PatRead,
                (MSR_PAT, true) => Decoded::PatWrite(value),
                (_, false) => Decoded::Exit(VmExit::Rdmsr { msr }, Some(Opcode::Rdmsr)),
                (_, true) => Decoded::Exit(VmExit::Wrmsr { msr, value }, Some(Opcode::Wrmsr)),
            };
            (MSR, u64::from(write), d)
        }
        3 => {
            let access = [MemAccess::Read, MemAccess::Write, MemAccess::Execute][(a % 3) as usize];
            // P (bit 0), U/S (2), RSV (3) and the nested-walk bits 32/33
            // are don't-cares; W for writes, I/D for fetches.
            let info1 = match access {
                MemAccess::Read => 0,
                MemAccess::Write => 2,
                MemAccess::Execute => 0x10,
            } | noise & 0x3_0000_000d;
            (NPF, info1, Decoded::Exit(VmExit::NestedPageFault { gpa: info2, access, gva: None }, None))
        }
        4 => (CPUID, noise, Decoded::Exit(VmExit::Cpuid, Some(Opcode::Cpuid))),
        5 => (HLT, noise, Decoded::Exit(VmExit::Hlt, Some(Opcode::Hlt))),
        _ => (VMMCALL, noise, Decoded::Exit(VmExit::Hypercall, Some(Opcode::Vmmcall))),
    };
    assert_eq!(run([code, info1, info2, rax, rcx, rdx]), expected);
}
