//! #VMEXIT code and exit information -> what happens next (APM Vol. 2
//! 15.7-15.14 and appendix C). Pure: the vCPU passes in the fields.

use vcpu::{IoAccess, MemAccess, VmExit};

use crate::fetch::Opcode;
use crate::names::*;

/// The MSRs the backend keeps for itself (intercepted in the MSR
/// permission map, handled here, never reaching the hypervisor).
pub const MSR_EFER: u32 = 0xc000_0080;
pub const MSR_PAT: u32 = 0x277;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Hand this to the hypervisor; when `skip` names an opcode, the
    /// hypervisor's `skip_instruction` moves past it.
    Exit(VmExit, Option<Opcode>),
    /// An I/O exit: EXITINFO2 holds the next RIP on every CPU (APM 15.10.2).
    Io(IoAccess, u64),
    /// A physical interrupt arrived while the guest ran (intercepted INTR).
    Interrupt,
    Nmi,
    Shutdown,
    /// VMRUN refused the state.
    Invalid,
    /// An SVM instruction (VMRUN, VMLOAD, ...): #UD.
    InjectUd,
    /// MOV to (`write`) or from DR`dr`: which register is the GPR needs
    /// decode assists (EXITINFO1) or the instruction bytes.
    Dr {
        dr: u8,
        write: bool,
        info1: u64,
    },
    /// The interrupt window opened (V_IRQ taken: VINTR).
    Vintr,
    /// IRET while NMIs are blocked: the NMI handler is returning.
    Iret,
    /// Backend-owned MSRs.
    EferRead,
    EferWrite(u64),
    PatRead,
    PatWrite(u64),
    /// An exit this backend never enables.
    Unknown(u64),
}

/// `rax`/`rcx`/`rdx` are the guest's registers at the exit.
pub fn decode(code: u64, info1: u64, info2: u64, rax: u64, rcx: u64, rdx: u64) -> Decoded {
    // The negative codes are 64-bit -1 and -2, but some implementations
    // (QEMU 7.2) store them as 32-bit values.
    let code = if code >> 32 == 0 && code as u32 >= 0xffff_fff0 { code | 0xffff_ffff_0000_0000 } else { code };
    match code {
        CPUID => Decoded::Exit(VmExit::Cpuid, Some(Opcode::Cpuid)),
        HLT => Decoded::Exit(VmExit::Hlt, Some(Opcode::Hlt)),
        VMMCALL => Decoded::Exit(VmExit::Hypercall, Some(Opcode::Vmmcall)),
        // #UD, intercepted for VMCALL (a guest saved under VT-x).
        EXCP_UD => Decoded::Exit(VmExit::InvalidOpcode, None),
        // A host machine check while the guest ran: the host's handler
        // takes it (`vcpu::machine_check`), the guest is interrupted.
        EXCP_MC => Decoded::Exit(VmExit::ExternalInterrupt { vector: Some(vcpu::machine_check::VECTOR) }, None),
        IOIO => Decoded::Io(io_access(info1), info2),
        MSR => {
            let msr = rcx as u32;
            let write = info1 & 1 != 0;
            let value = (rdx << 32) | (rax & 0xffff_ffff);
            match (msr, write) {
                (MSR_EFER, false) => Decoded::EferRead,
                (MSR_EFER, true) => Decoded::EferWrite(value),
                (MSR_PAT, false) => Decoded::PatRead,
                (MSR_PAT, true) => Decoded::PatWrite(value),
                (_, false) => Decoded::Exit(VmExit::Rdmsr { msr }, Some(Opcode::Rdmsr)),
                (_, true) => Decoded::Exit(VmExit::Wrmsr { msr, value }, Some(Opcode::Wrmsr)),
            }
        }
        NPF => {
            // EXITINFO1 is a #PF error code: W bit 1, instruction fetch bit 4.
            let access = if info1 & (1 << 4) != 0 {
                MemAccess::Execute
            } else if info1 & (1 << 1) != 0 {
                MemAccess::Write
            } else {
                MemAccess::Read
            };
            Decoded::Exit(VmExit::NestedPageFault { gpa: info2, access, gva: None }, None)
        }
        INTR => Decoded::Interrupt,
        NMI => Decoded::Nmi,
        SHUTDOWN => Decoded::Shutdown,
        INVALID => Decoded::Invalid,
        VMRUN | VMLOAD | VMSAVE | STGI | CLGI | SKINIT | INVLPGA | RDPRU => Decoded::InjectUd,
        MONITOR | MWAIT | MWAIT_ARMED => Decoded::Exit(VmExit::MonitorMwait, None),
        XSETBV => Decoded::Exit(VmExit::Xsetbv, Some(Opcode::Xsetbv)),
        INVD => Decoded::Exit(VmExit::CacheFlush { invd: true }, Some(Opcode::Invd)),
        WBINVD => Decoded::Exit(VmExit::CacheFlush { invd: false }, Some(Opcode::Wbinvd)),
        PAUSE => Decoded::Exit(VmExit::Pause, Some(Opcode::Pause)),
        INIT => Decoded::Exit(VmExit::Init, None),
        VINTR => Decoded::Vintr,
        IRET => Decoded::Iret,
        c @ DR_READ..=0x3f => Decoded::Dr { dr: (c & 0xf) as u8, write: c >= DR_WRITE, info1 },
        other => Decoded::Unknown(other),
    }
}

/// EXITINFO1 of an I/O intercept (APM 15.10.2, figure 15-2): TYPE bit 0
/// (1 = IN), STR bit 2, REP bit 3, SZ8/16/32 bits 4-6, port bits 31:16.
pub fn io_access(info1: u64) -> IoAccess {
    let size = if info1 & (1 << 4) != 0 {
        1
    } else if info1 & (1 << 5) != 0 {
        2
    } else {
        4
    };
    IoAccess {
        port: (info1 >> 16) as u16,
        size,
        write: info1 & 1 == 0,
        string: info1 & (1 << 2) != 0,
        rep: info1 & (1 << 3) != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_machine_check_interrupts_the_guest() {
        assert_eq!(decode(EXCP_MC, 0, 0, 0, 0, 0), Decoded::Exit(VmExit::ExternalInterrupt { vector: Some(18) }, None));
    }

    #[test]
    fn io_exit_information() {
        // OUT dx, al to 0x3f8: type 0, SZ8, port in 31:16.
        let d = decode(IOIO, (0x3f8 << 16) | (1 << 4), 0x1234, 0, 0, 0);
        assert_eq!(d, Decoded::Io(IoAccess { port: 0x3f8, size: 1, write: true, string: false, rep: false }, 0x1234));
        // REP INSW from 0x1f0.
        let io = io_access((0x1f0 << 16) | (1 << 5) | (1 << 3) | (1 << 2) | 1);
        assert_eq!(io, IoAccess { port: 0x1f0, size: 2, write: false, string: true, rep: true });
        assert_eq!(io_access((0x80 << 16) | (1 << 6)).size, 4);
    }

    #[test]
    fn msr_exits_split_backend_and_hypervisor_msrs() {
        assert_eq!(decode(MSR, 0, 0, 0, 0x174, 0), Decoded::Exit(VmExit::Rdmsr { msr: 0x174 }, Some(Opcode::Rdmsr)));
        assert_eq!(
            decode(MSR, 1, 0, 0xffff_ffff_0000_0001, 0x2ff, 0x2),
            Decoded::Exit(VmExit::Wrmsr { msr: 0x2ff, value: 0x2_0000_0001 }, Some(Opcode::Wrmsr)),
            "EDX:EAX, upper halves of RAX ignored"
        );
        assert_eq!(decode(MSR, 1, 0, 0xd01, MSR_EFER as u64, 0), Decoded::EferWrite(0xd01));
        assert_eq!(decode(MSR, 0, 0, 0, MSR_EFER as u64, 0), Decoded::EferRead);
        assert_eq!(decode(MSR, 0, 0, 0, 0x1_0000_0277, 0), Decoded::PatRead, "ECX only");
    }

    #[test]
    fn nested_page_faults() {
        let npf = |info1| decode(NPF, info1, 0xfee0_0000, 0, 0, 0);
        let get = |d| match d {
            Decoded::Exit(VmExit::NestedPageFault { gpa, access, gva }, None) => (gpa, access, gva),
            other => panic!("{other:?}"),
        };
        assert_eq!(get(npf(0x1_0000_0006)), (0xfee0_0000, MemAccess::Write, None));
        assert_eq!(get(npf(0x1_0000_0014)), (0xfee0_0000, MemAccess::Execute, None));
        assert_eq!(get(npf(0x1_0000_0004)), (0xfee0_0000, MemAccess::Read, None));
    }

    #[test]
    fn every_svm_instruction_but_vmmcall_is_intercepted_and_refused() {
        use crate::vmcb::{misc1, misc2};
        // (intercept vector, bit, #VMEXIT code), APM Vol. 2 table B-1 and
        // appendix C.
        let svm = [
            (2, misc2::VMRUN, VMRUN),
            (2, misc2::VMLOAD, VMLOAD),
            (2, misc2::VMSAVE, VMSAVE),
            (2, misc2::STGI, STGI),
            (2, misc2::CLGI, CLGI),
            (2, misc2::SKINIT, SKINIT),
            (1, misc1::INVLPGA, INVLPGA),
        ];
        for (vector, bit, code) in svm {
            let on = if vector == 1 { misc1::GUEST } else { misc2::GUEST };
            assert_ne!(on & bit, 0, "{} is not intercepted", exit_code(code));
            assert_eq!(decode(code, 0, 0, 0, 0, 0), Decoded::InjectUd, "{}", exit_code(code));
        }
        assert_eq!(misc1::INVLPGA, 1 << 26, "vector 3 (offset 0x0c) bit 26");
        assert_ne!(misc2::GUEST & misc2::VMMCALL, 0, "the hypercall exits");
    }

    #[test]
    fn the_instruction_exits_linux_needs() {
        let d = |code| decode(code, 0, 0, 0, 0, 0);
        assert_eq!(d(XSETBV), Decoded::Exit(VmExit::Xsetbv, Some(Opcode::Xsetbv)));
        assert_eq!(d(INVD), Decoded::Exit(VmExit::CacheFlush { invd: true }, Some(Opcode::Invd)));
        assert_eq!(d(WBINVD), Decoded::Exit(VmExit::CacheFlush { invd: false }, Some(Opcode::Wbinvd)));
        assert_eq!(d(MONITOR), Decoded::Exit(VmExit::MonitorMwait, None));
        assert_eq!(d(MWAIT), Decoded::Exit(VmExit::MonitorMwait, None));
        assert_eq!(d(PAUSE), Decoded::Exit(VmExit::Pause, Some(Opcode::Pause)));
        assert_eq!(d(INIT), Decoded::Exit(VmExit::Init, None));
        assert_eq!(d(VINTR), Decoded::Vintr);
        assert_eq!(d(IRET), Decoded::Iret);
        assert_eq!(decode(0x27, 5, 0, 0, 0, 0), Decoded::Dr { dr: 7, write: false, info1: 5 });
        assert_eq!(decode(0x33, 0, 0, 0, 0, 0), Decoded::Dr { dr: 3, write: true, info1: 0 });
        use crate::vmcb::{misc1, misc2};
        assert_ne!(misc2::GUEST & misc2::WBINVD, 0);
        assert_ne!(misc1::GUEST & misc1::INIT, 0);
        assert_eq!(misc1::GUEST & (misc1::VINTR | misc1::IRET), 0, "armed per entry");
    }

    #[test]
    fn svm_instructions_are_undefined_for_guests() {
        for code in [VMRUN, VMLOAD, VMSAVE, STGI, CLGI, SKINIT, INVLPGA] {
            assert_eq!(decode(code, 0, 0, 0, 0, 0), Decoded::InjectUd, "{}", exit_code(code));
        }
        assert_eq!(decode(SHUTDOWN, 0, 0, 0, 0, 0), Decoded::Shutdown);
        assert_eq!(decode(INVALID, 0, 0, 0, 0, 0), Decoded::Invalid);
        assert_eq!(decode(0xffff_ffff, 0, 0, 0, 0, 0), Decoded::Invalid, "a 32-bit -1");
        assert_eq!(decode(0x65, 0, 0, 0, 0, 0), Decoded::Unknown(0x65));
        assert_eq!(decode(CPUID, 0, 0, 0, 0, 0), Decoded::Exit(VmExit::Cpuid, Some(Opcode::Cpuid)));
    }
}
