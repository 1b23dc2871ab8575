//! Exit decoding: the raw exit reason and the VMCS exit-information fields
//! become a neutral `VmExit`, or an action the backend handles itself
//! (EFER writes, instructions VMX guests must not have). Pure logic over a
//! field reader, so it is tested with recorded field values.

use alloc::format;
use vcpu::{CrAccess, ExitKind, Gprs, IoAccess, MemAccess, VmExit};
use x86::vmx::vmcs::{guest, ro};

use crate::names;

/// What the backend does with an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Goes up to the hypervisor.
    Exit(VmExit),
    /// The interrupt window opened (exit reason 7): the backend clears the
    /// control it armed and reports it.
    InterruptWindow,
    /// The NMI window opened (reason 8).
    NmiWindow,
    /// WRMSR to IA32_EFER: long-mode activation is tracked by the backend.
    EferWrite { value: u64 },
    /// Raise #UD in the guest (VMX and SMX instructions: CPUID says the
    /// guest has neither).
    InjectUd,
    /// A failed VM entry (exit reason bit 31): the backend adds the guest
    /// state check and reports it.
    EntryFailure { reason: u16, qualification: u64 },
    /// Triple fault: the backend adds the registers and reports it.
    TripleFault,
}

/// Exit-information fields the decoder may read (SDM Vol. 3C 25.9).
pub trait Fields {
    fn read(&self, field: u32) -> u64;
}

impl<F: Fn(u32) -> u64> Fields for F {
    fn read(&self, field: u32) -> u64 {
        self(field)
    }
}

pub const IA32_EFER: u32 = 0xC000_0080;

/// Decodes exit reason `raw_reason` (the full 32-bit field).
pub fn decode(raw_reason: u32, f: &impl Fields, gprs: &Gprs) -> Decoded {
    let reason = (raw_reason & 0xffff) as u16;
    // A machine check during VM entry (exit reason 41, an entry failure):
    // the host's, handled as one during the guest's run; the entry is
    // tried again.
    if reason == 41 {
        return Decoded::Exit(VmExit::ExternalInterrupt { vector: Some(vcpu::machine_check::VECTOR) });
    }
    if raw_reason & (1 << 31) != 0 {
        return Decoded::EntryFailure { reason, qualification: f.read(ro::EXIT_QUALIFICATION) };
    }
    match reason {
        0 => {
            let info = f.read(ro::VMEXIT_INTERRUPTION_INFO);
            let vector = (info & 0xff) as u8;
            let kind = (info >> 8) & 7;
            if kind == 2 {
                // An NMI meant for the host arrived while the guest ran.
                Decoded::Exit(VmExit::ExternalInterrupt { vector: Some(2) })
            } else if kind == 3 && vector == vcpu::machine_check::VECTOR {
                // A host machine check while the guest ran (the bitmap
                // intercepts #MC): the host's handler takes it.
                Decoded::Exit(VmExit::ExternalInterrupt { vector: Some(vector) })
            } else if kind == 3 && vector == 6 {
                // #UD, a hardware exception (type 3, SDM Vol. 3C 25.9.2):
                // the exception bitmap intercepts it.
                Decoded::Exit(VmExit::InvalidOpcode)
            } else {
                unexpected(reason, f, format!(", exception vector {vector} (interruption info {info:#x})"))
            }
        }
        1 => {
            let info = f.read(ro::VMEXIT_INTERRUPTION_INFO);
            let vector = (info & (1 << 31) != 0).then_some((info & 0xff) as u8);
            Decoded::Exit(VmExit::ExternalInterrupt { vector })
        }
        2 => Decoded::TripleFault,
        3 => Decoded::Exit(VmExit::Init),
        // The SIPI's vector is in the qualification (SDM Vol. 3C table 28-1).
        4 => Decoded::Exit(VmExit::Sipi { vector: f.read(ro::EXIT_QUALIFICATION) as u8 }),
        7 => Decoded::InterruptWindow,
        8 => Decoded::NmiWindow,
        10 => Decoded::Exit(VmExit::Cpuid),
        12 => Decoded::Exit(VmExit::Hlt),
        13 => Decoded::Exit(VmExit::CacheFlush { invd: true }),
        18 => Decoded::Exit(VmExit::Hypercall),
        28 => {
            // Table 28-3: CR number 3:0, access type 5:4, GPR 11:8, LMSW
            // source 31:16.
            let q = f.read(ro::EXIT_QUALIFICATION);
            let cr = (q & 0xf) as u8;
            let gpr = ((q >> 8) & 0xf) as u8;
            let access = match (q >> 4) & 3 {
                0 => CrAccess::MovTo { gpr },
                1 => CrAccess::MovFrom { gpr },
                2 => CrAccess::Clts,
                _ => CrAccess::Lmsw { value: (q >> 16) as u16 },
            };
            Decoded::Exit(VmExit::CrAccess { cr, access })
        }
        29 => {
            // Table 28-4: DR number 2:0, direction 4 (0 = MOV to DR), GPR 11:8.
            let q = f.read(ro::EXIT_QUALIFICATION);
            Decoded::Exit(VmExit::DrAccess { dr: (q & 7) as u8, gpr: ((q >> 8) & 0xf) as u8, write: q & (1 << 4) == 0 })
        }
        30 => {
            let q = f.read(ro::EXIT_QUALIFICATION);
            Decoded::Exit(VmExit::Io(IoAccess {
                port: (q >> 16) as u16,
                size: ((q & 7) + 1) as u8,
                write: q & (1 << 3) == 0,
                string: q & (1 << 4) != 0,
                rep: q & (1 << 5) != 0,
            }))
        }
        31 => Decoded::Exit(VmExit::Rdmsr { msr: gprs.rcx as u32 }),
        32 => {
            let msr = gprs.rcx as u32;
            let value = (gprs.rdx << 32) | (gprs.rax & 0xffff_ffff);
            if msr == IA32_EFER { Decoded::EferWrite { value } } else { Decoded::Exit(VmExit::Wrmsr { msr, value }) }
        }
        11 | 19..=27 | 50 | 53 => Decoded::InjectUd,
        36 | 39 => Decoded::Exit(VmExit::MonitorMwait),
        40 => Decoded::Exit(VmExit::Pause),
        48 => {
            let q = f.read(ro::EXIT_QUALIFICATION);
            let access = if q & 2 != 0 {
                MemAccess::Write
            } else if q & 4 != 0 {
                MemAccess::Execute
            } else {
                MemAccess::Read
            };
            let gva = (q & (1 << 7) != 0).then(|| f.read(ro::GUEST_LINEAR_ADDR));
            Decoded::Exit(VmExit::NestedPageFault { gpa: f.read(ro::GUEST_PHYSICAL_ADDR_FULL), access, gva })
        }
        49 => unexpected(
            reason,
            f,
            format!(", guest-physical {:#x} (a hypervisor EPT bug)", f.read(ro::GUEST_PHYSICAL_ADDR_FULL)),
        ),
        52 => Decoded::Exit(VmExit::Preempted),
        54 => Decoded::Exit(VmExit::CacheFlush { invd: false }),
        55 => Decoded::Exit(VmExit::Xsetbv),
        _ => unexpected(reason, f, alloc::string::String::new()),
    }
}

fn unexpected(reason: u16, f: &impl Fields, extra: alloc::string::String) -> Decoded {
    Decoded::Exit(VmExit::Unexpected {
        report: format!(
            "unhandled VM exit {reason} ({}) at rip {:#x}, qualification {:#x}{extra}",
            names::exit_reason(reason),
            f.read(guest::RIP),
            f.read(ro::EXIT_QUALIFICATION)
        ),
    })
}

/// The statistics class of a backend-handled exit.
pub fn handled_kind(d: &Decoded) -> ExitKind {
    match d {
        Decoded::EferWrite { .. } => ExitKind::Wrmsr,
        _ => ExitKind::Unexpected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &'static [(u32, u64)]) -> impl Fn(u32) -> u64 {
        move |f| pairs.iter().find(|(k, _)| *k == f).map_or(0, |(_, v)| *v)
    }

    #[test]
    fn io_qualification_decodes_port_size_direction() {
        // OUT DX, AL to 0x3f8: size-1 = 0, direction 0 (out), port in 31:16.
        let f = fields(&[(ro::EXIT_QUALIFICATION, 0x03f8_0000)]);
        assert_eq!(
            decode(30, &f, &Gprs::default()),
            Decoded::Exit(VmExit::Io(IoAccess { port: 0x3f8, size: 1, write: true, string: false, rep: false }))
        );
        // REP INSD from 0x1f0: size-1 = 3, in, string, rep.
        let f = fields(&[(ro::EXIT_QUALIFICATION, 0x01f0_0000 | 3 | 8 | 16 | 32)]);
        assert_eq!(
            decode(30, &f, &Gprs::default()),
            Decoded::Exit(VmExit::Io(IoAccess { port: 0x1f0, size: 4, write: false, string: true, rep: true }))
        );
    }

    #[test]
    fn ept_violation_reports_gpa_access_and_linear_address() {
        let f = fields(&[
            (ro::EXIT_QUALIFICATION, 0b1000_0010),
            (ro::GUEST_PHYSICAL_ADDR_FULL, 0x1_0000_0000),
            (ro::GUEST_LINEAR_ADDR, 0xffff_8000_0000_0000),
        ]);
        assert_eq!(
            decode(48, &f, &Gprs::default()),
            Decoded::Exit(VmExit::NestedPageFault {
                gpa: 0x1_0000_0000,
                access: MemAccess::Write,
                gva: Some(0xffff_8000_0000_0000)
            })
        );
        let f = fields(&[(ro::EXIT_QUALIFICATION, 0b100), (ro::GUEST_PHYSICAL_ADDR_FULL, 0x5000)]);
        assert_eq!(
            decode(48, &f, &Gprs::default()),
            Decoded::Exit(VmExit::NestedPageFault { gpa: 0x5000, access: MemAccess::Execute, gva: None })
        );
    }

    #[test]
    fn msr_exits_take_index_and_value_from_registers() {
        let g = Gprs { rcx: 0x277, rax: 0xdead_beef_0000_0006, rdx: 0x0007_0406, ..Default::default() };
        assert_eq!(
            decode(32, &fields(&[]), &g),
            Decoded::Exit(VmExit::Wrmsr { msr: 0x277, value: 0x0007_0406_0000_0006 })
        );
        let g = Gprs { rcx: IA32_EFER as u64, rax: 0x500, ..Default::default() };
        assert_eq!(decode(32, &fields(&[]), &g), Decoded::EferWrite { value: 0x500 });
        assert_eq!(decode(31, &fields(&[]), &g), Decoded::Exit(VmExit::Rdmsr { msr: IA32_EFER }));
    }

    #[test]
    fn control_register_moves() {
        let cr = |q: u64| decode(28, &fields(Box::leak(Box::new([(ro::EXIT_QUALIFICATION, q)]))), &Gprs::default());
        // MOV CR0, RBX: cr 0, type 0, gpr 3.
        assert_eq!(cr(3 << 8), Decoded::Exit(VmExit::CrAccess { cr: 0, access: CrAccess::MovTo { gpr: 3 } }));
        // MOV RAX, CR4 (from); MOV CR8, R12.
        assert_eq!(cr(4 | (1 << 4)), Decoded::Exit(VmExit::CrAccess { cr: 4, access: CrAccess::MovFrom { gpr: 0 } }));
        assert_eq!(cr(8 | (12 << 8)), Decoded::Exit(VmExit::CrAccess { cr: 8, access: CrAccess::MovTo { gpr: 12 } }));
        assert_eq!(cr(2 << 4), Decoded::Exit(VmExit::CrAccess { cr: 0, access: CrAccess::Clts }));
        assert_eq!(
            cr((3 << 4) | (0x0011 << 16)),
            Decoded::Exit(VmExit::CrAccess { cr: 0, access: CrAccess::Lmsw { value: 0x11 } })
        );
    }

    #[test]
    fn debug_register_moves_and_the_other_instruction_exits() {
        let q = |q: u64| -> &'static [(u32, u64)] { Box::leak(Box::new([(ro::EXIT_QUALIFICATION, q)])) };
        let g = Gprs::default();
        // MOV DR7, RCX (to DR: direction 0); MOV R9, DR6 (from).
        assert_eq!(
            decode(29, &fields(q(7 | (1 << 8))), &g),
            Decoded::Exit(VmExit::DrAccess { dr: 7, gpr: 1, write: true })
        );
        assert_eq!(
            decode(29, &fields(q(6 | (1 << 4) | (9 << 8))), &g),
            Decoded::Exit(VmExit::DrAccess { dr: 6, gpr: 9, write: false })
        );
        assert_eq!(decode(55, &fields(q(0)), &g), Decoded::Exit(VmExit::Xsetbv));
        assert_eq!(decode(13, &fields(q(0)), &g), Decoded::Exit(VmExit::CacheFlush { invd: true }));
        assert_eq!(decode(54, &fields(q(0)), &g), Decoded::Exit(VmExit::CacheFlush { invd: false }));
        assert_eq!(decode(36, &fields(q(0)), &g), Decoded::Exit(VmExit::MonitorMwait));
        assert_eq!(decode(39, &fields(q(0)), &g), Decoded::Exit(VmExit::MonitorMwait));
        assert_eq!(decode(40, &fields(q(0)), &g), Decoded::Exit(VmExit::Pause));
        assert_eq!(decode(3, &fields(q(0)), &g), Decoded::Exit(VmExit::Init));
        assert_eq!(decode(4, &fields(q(0x9a)), &g), Decoded::Exit(VmExit::Sipi { vector: 0x9a }));
        assert_eq!(decode(7, &fields(q(0)), &g), Decoded::InterruptWindow);
        assert_eq!(decode(8, &fields(q(0)), &g), Decoded::NmiWindow);
        assert_eq!(decode(11, &fields(q(0)), &g), Decoded::InjectUd, "GETSEC: SMX is hidden");
    }

    #[test]
    fn entry_failures_triple_faults_and_unknowns() {
        let f = fields(&[(ro::EXIT_QUALIFICATION, 0), (guest::RIP, 0x1234)]);
        assert_eq!(
            decode((1 << 31) | 33, &f, &Gprs::default()),
            Decoded::EntryFailure { reason: 33, qualification: 0 }
        );
        assert_eq!(decode(2, &f, &Gprs::default()), Decoded::TripleFault);
        assert_eq!(decode(27, &f, &Gprs::default()), Decoded::InjectUd);
        match decode(56, &f, &Gprs::default()) {
            Decoded::Exit(VmExit::Unexpected { report }) => {
                assert!(report.contains("APIC write") && report.contains("0x1234"), "{report}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn external_interrupts_and_host_nmis() {
        let f = fields(&[(ro::VMEXIT_INTERRUPTION_INFO, (1 << 31) | 0x30)]);
        assert_eq!(decode(1, &f, &Gprs::default()), Decoded::Exit(VmExit::ExternalInterrupt { vector: Some(0x30) }));
        let f = fields(&[(ro::VMEXIT_INTERRUPTION_INFO, (1 << 31) | (2 << 8) | 2)]);
        assert_eq!(decode(0, &f, &Gprs::default()), Decoded::Exit(VmExit::ExternalInterrupt { vector: Some(2) }));
        // #UD (hardware exception, type 3), intercepted by the bitmap.
        let f = fields(&[(ro::VMEXIT_INTERRUPTION_INFO, (1 << 31) | (3 << 8) | 6)]);
        assert_eq!(decode(0, &f, &Gprs::default()), Decoded::Exit(VmExit::InvalidOpcode));
        // A host machine check while the guest ran, or during VM entry
        // (reason 41 with the entry-failure bit): the host's, as an
        // interrupt the backend raises for the host's handler.
        let mc = Decoded::Exit(VmExit::ExternalInterrupt { vector: Some(18) });
        let f = fields(&[(ro::VMEXIT_INTERRUPTION_INFO, (1 << 31) | (3 << 8) | 18)]);
        assert_eq!(decode(0, &f, &Gprs::default()), mc);
        assert_eq!(decode((1 << 31) | 41, &f, &Gprs::default()), mc);
        // Any other exception is not expected (nothing else is intercepted).
        let f = fields(&[(ro::VMEXIT_INTERRUPTION_INFO, (1 << 31) | (3 << 8) | 13)]);
        assert!(matches!(decode(0, &f, &Gprs::default()), Decoded::Exit(VmExit::Unexpected { .. })));
    }
}
