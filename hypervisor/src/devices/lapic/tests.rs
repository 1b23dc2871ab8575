use super::*;
use crate::devices::ioapic::IoApic;
use crate::devices::persist::{RestoreError, SavedDevice, decode, save};

const TSC_HZ: u64 = 2_000_000_000;

fn config(id: u32) -> LapicConfig {
    LapicConfig { id, bsp: true, bus_hz: DEFAULT_BUS_HZ, tsc_hz: TSC_HZ, phys_addr_bits: 39 }
}

/// A LAPIC software-enabled through the SVR, as Linux's
/// `setup_local_APIC` leaves it (spurious vector 0xff).
fn enabled() -> Lapic {
    let mut l = Lapic::new(config(3));
    w(&mut l, 0xf0, 0x1ff);
    l
}

fn x2apic() -> Lapic {
    let mut l = enabled();
    l.set_apic_base(DEFAULT_BASE | BASE_EN | BASE_EXTD | BASE_BSP).unwrap();
    l
}

/// An MMIO write at time 0 that must not ask anything of the caller.
fn w(l: &mut Lapic, offset: u64, value: u32) {
    assert_eq!(l.write(offset, value, 0), Effect::None, "write {offset:#x}");
}

/// An MMIO write at `now` that must not ask anything of the caller.
fn wt(l: &mut Lapic, offset: u64, value: u32, now: u64) {
    assert_eq!(l.write(offset, value, now), Effect::None, "write {offset:#x}");
}

/// An MSR write at `now` that must succeed and ask nothing of the caller.
fn wm(l: &mut Lapic, msr: u32, value: u64, now: u64) {
    assert_eq!(l.write_msr(msr, value, now), Ok(Effect::None), "write {msr:#x}");
}

fn r(l: &mut Lapic, offset: u64) -> u32 {
    l.read(offset, 0)
}

/// ESR as software reads it: write, then read (SDM 11.5.3).
fn esr(l: &mut Lapic) -> u32 {
    w(l, 0x280, 0);
    r(l, 0x280)
}

fn irr(l: &Lapic, v: u8) -> bool {
    bit_test(&l.s.irr, v)
}

#[test]
fn reset_state_follows_the_sdm() {
    let mut l = Lapic::new(config(3));
    assert_eq!(l.mode(), Mode::XApic);
    assert_eq!(l.apic_base(), 0xfee0_0900, "enabled, BSP, default base");
    assert_eq!(l.mmio_base(), Some(0xfee0_0000));
    assert_eq!(r(&mut l, 0x20), 3 << 24);
    assert_eq!(r(&mut l, 0x30), 0x0005_0014, "six LVTs, version 0x14, no directed EOI");
    assert_eq!(r(&mut l, 0xf0), 0xff, "software-disabled, spurious vector 0xff");
    assert_eq!(r(&mut l, 0xe0), 0xffff_ffff, "flat model");
    for lvt in (0x320..=0x370).step_by(0x10) {
        assert_eq!(r(&mut l, lvt), 0x1_0000, "LVT {lvt:#x} masked");
    }
    for reg in [0x80, 0xa0, 0xd0, 0x280, 0x300, 0x310, 0x380, 0x390, 0x3e0] {
        assert_eq!(r(&mut l, reg), 0, "register {reg:#x}");
    }
    assert!(!l.enabled());
    assert!(!l.accept(0x40, false), "a software-disabled APIC drops fixed interrupts");
    assert_eq!(l.pending_vector(), None);
    // 11.4.7.2: LVT masks stay set while software-disabled.
    w(&mut l, 0x320, 0x40);
    assert_eq!(r(&mut l, 0x320), 0x1_0040);
    let ap = Lapic::new(LapicConfig { bsp: false, ..config(1) });
    assert_eq!(ap.apic_base(), 0xfee0_0800);
}

#[test]
fn priority_classes_gate_delivery() {
    let mut l = enabled();
    assert!(l.accept(0x51, false));
    assert_eq!(l.pending_vector(), Some(0x51));
    w(&mut l, 0x80, 0x50);
    assert_eq!(l.pending_vector(), None, "same class as the TPR: held");
    assert_eq!(r(&mut l, 0xa0), 0x50, "PPR is the TPR with nothing in service");
    w(&mut l, 0x80, 0x4f);
    assert_eq!(l.pending_vector(), Some(0x51));
    assert!(l.acknowledge(0x51));
    assert!(!l.acknowledge(0x51), "no longer requested");
    assert_eq!(r(&mut l, 0xa0), 0x50, "ISR's class beats TPR 0x4f: PPR = 0x50");
    w(&mut l, 0x80, 0x6a);
    assert_eq!(r(&mut l, 0xa0), 0x6a, "TPR's class beats ISR's: PPR = TPR");
    assert_eq!(l.tpr(), 0x6a);
    l.set_tpr(0);
    assert!(l.accept(0x52, false));
    assert_eq!(l.pending_vector(), None, "same class as the one in service");
    assert!(l.accept(0x61, false));
    assert_eq!(l.pending_vector(), Some(0x61), "a higher class nests");
    assert!(l.accept(0xe0, false));
    assert_eq!(l.pending_vector(), Some(0xe0), "highest first");
    // The vector bits as registers: IRR word 7 holds 0xe0.
    assert_eq!(r(&mut l, 0x270), 1);
    assert_eq!(r(&mut l, 0x120), 1 << (0x51 - 64), "ISR word 2 holds 0x51");
}

#[test]
fn eoi_ends_the_highest_in_service_interrupt_first() {
    let mut l = enabled();
    l.accept(0x51, false);
    l.acknowledge(0x51);
    l.accept(0x52, false);
    l.accept(0x61, false);
    assert_eq!(l.pending_vector(), Some(0x61));
    l.acknowledge(0x61);
    assert_eq!(l.ppr(), 0x60);
    assert_eq!(l.pending_vector(), None, "0x52 waits behind both");
    w(&mut l, 0xb0, 0);
    assert_eq!(l.ppr(), 0x50, "0x61 ended, 0x51 still in service");
    assert_eq!(l.pending_vector(), None);
    w(&mut l, 0xb0, 0);
    assert_eq!(l.ppr(), 0);
    assert_eq!(l.pending_vector(), Some(0x52));
    assert_eq!(l.eoi(), None, "nothing in service: nothing to end");
    assert_eq!(r(&mut l, 0xb0), 0, "EOI is write-only");
}

#[test]
fn level_triggered_eoi_is_broadcast() {
    let mut l = enabled();
    l.accept(0x40, true);
    // Linux reads TMR before its EOI to tell level from edge
    // (io_apic.c, ioapic_ack_level).
    assert_eq!(r(&mut l, 0x180 + 0x20), 1, "TMR word 2 bit 0: vector 0x40");
    l.acknowledge(0x40);
    assert_eq!(l.write(0xb0, 0, 0), Effect::EoiBroadcast(0x40));
    l.accept(0x41, false);
    l.acknowledge(0x41);
    assert_eq!(l.write(0xb0, 0, 0), Effect::None, "edge: no broadcast");
    assert_eq!(r(&mut l, 0x1a0), 1, "TMR says how 0x40 last arrived; 0x41 is edge");
    l.accept(0x40, false);
    assert_eq!(r(&mut l, 0x1a0), 0, "re-accepted as edge");
    // x2APIC: the same through MSR 0x80b.
    let mut l = x2apic();
    l.accept(0x90, true);
    l.acknowledge(0x90);
    assert_eq!(l.write_msr(0x80b, 0, 0), Ok(Effect::EoiBroadcast(0x90)));
}

#[test]
fn illegal_vectors_and_the_error_register() {
    let mut l = enabled();
    assert!(!l.accept(5, false));
    assert!(!irr(&l, 5));
    assert_eq!(r(&mut l, 0x280), 0, "logged, not visible until ESR is written");
    assert_eq!(esr(&mut l), ESR_RECEIVE_ILLEGAL_VECTOR);
    assert_eq!(esr(&mut l), 0, "a write clears what was read");
    // The error interrupt (LVT error, 11.5.3).
    w(&mut l, 0x370, 0xfe);
    assert!(!l.accept(15, true));
    assert!(irr(&l, 0xfe), "error interrupt raised");
    assert!(!bit_test(&l.s.tmr, 15));
    // An illegal vector in the error LVT is logged and goes no further.
    w(&mut l, 0x370, 0x03);
    l.accept(1, false);
    assert_eq!(esr(&mut l), ESR_RECEIVE_ILLEGAL_VECTOR);
    // Sending one (with the error interrupt masked again).
    w(&mut l, 0x370, 0x1_00fe);
    w(&mut l, 0x310, 1 << 24);
    w(&mut l, 0x300, 0x4009);
    assert_eq!(esr(&mut l), ESR_SEND_ILLEGAL_VECTOR);
    // A reserved register.
    assert_eq!(r(&mut l, 0x40), 0);
    assert_eq!(esr(&mut l), ESR_ILLEGAL_REGISTER);
}

#[test]
fn xapic_registers_keep_their_defined_bits() {
    let mut l = enabled();
    w(&mut l, 0x80, 0xffff_ffff);
    assert_eq!(r(&mut l, 0x80), 0xff);
    w(&mut l, 0xd0, 0xffff_ffff);
    assert_eq!(r(&mut l, 0xd0), 0xff00_0000);
    w(&mut l, 0xe0, 0x0000_0000);
    assert_eq!(r(&mut l, 0xe0), 0x0fff_ffff, "cluster model; bits 27:0 read 1");
    w(&mut l, 0xf0, 0xffff_ffff);
    assert_eq!(r(&mut l, 0xf0), 0x3ff, "no EOI-broadcast suppression bit");
    w(&mut l, 0x310, 0xffff_ffff);
    assert_eq!(r(&mut l, 0x310), 0xff00_0000);
    assert!(matches!(l.write(0x300, 0xffff_ffff, 0), Effect::None), "mode 0b111 is not an IPI");
    assert_eq!(r(&mut l, 0x300), 0x000c_cfff, "delivery status reads idle");
    w(&mut l, 0x320, 0xffff_ffff);
    assert_eq!(r(&mut l, 0x320), 0x7_00ff);
    w(&mut l, 0x350, 0xffff_ffff);
    assert_eq!(r(&mut l, 0x350), 0x1_a7ff, "remote IRR and delivery status read-only");
    w(&mut l, 0x3e0, 0xffff_ffff);
    assert_eq!(r(&mut l, 0x3e0), 0xb);
    // Read-only registers.
    for (reg, value) in [(0x20, 3 << 24), (0x30, VERSION), (0xa0, 0xff), (0x390, 0)] {
        w(&mut l, reg, 0x1234_5678);
        assert_eq!(r(&mut l, reg), value, "register {reg:#x} is read-only");
    }
    w(&mut l, 0x200, 0xffff_ffff);
    assert_eq!(l.pending_vector(), None, "IRR is read-only");
    assert_eq!(esr(&mut l), 0, "read-only registers are not errors");
    // Bytes 4-15 of a slot and offsets past the page: nothing.
    assert_eq!(r(&mut l, 0x84), 0);
    assert_eq!(r(&mut l, 0x81), 0);
    w(&mut l, 0x84, 0);
    assert_eq!(r(&mut l, 0x80), 0xff);
    assert_eq!(r(&mut l, 0x1000), 0);
    assert_eq!(r(&mut l, u64::MAX), 0);
    assert_eq!(esr(&mut l), 0);
    // Reserved offsets: 0x2f0 (no CMCI LVT with six entries), 0x3f0 (SELF
    // IPI is x2APIC-only), the rest of the page.
    for reg in [0x0, 0x10, 0x70, 0x290, 0x2f0, 0x3a0, 0x3f0, 0x400, 0xff0] {
        assert_eq!(r(&mut l, reg), 0);
        assert_eq!(esr(&mut l), ESR_ILLEGAL_REGISTER, "read of {reg:#x}");
        w(&mut l, reg, 1);
        assert_eq!(esr(&mut l), ESR_ILLEGAL_REGISTER, "write of {reg:#x}");
    }
    // APR and RRD are defined and read 0.
    assert_eq!(r(&mut l, 0x90), 0);
    assert_eq!(r(&mut l, 0xc0), 0);
    assert_eq!(esr(&mut l), 0);
}

#[test]
fn software_disable_masks_every_lvt() {
    let mut l = enabled();
    w(&mut l, 0x350, 0x700);
    w(&mut l, 0x360, 0x400);
    assert_eq!(l.lint(Lint::Lint0), LintRoute::ExtInt, "virtual wire to the PIC");
    assert_eq!(l.lint(Lint::Lint1), LintRoute::Nmi);
    w(&mut l, 0x350, 0x8031);
    assert_eq!(l.lint(Lint::Lint0), LintRoute::Fixed { vector: 0x31, level_triggered: true });
    w(&mut l, 0x360, 0x1_0400);
    assert_eq!(l.lint(Lint::Lint1), LintRoute::Masked);
    w(&mut l, 0x350, 0x200);
    assert_eq!(l.lint(Lint::Lint0), LintRoute::Smi);
    w(&mut l, 0x350, 0x500);
    assert_eq!(l.lint(Lint::Lint0), LintRoute::Init);
    w(&mut l, 0x350, 0x100);
    assert_eq!(l.lint(Lint::Lint0), LintRoute::Masked, "lowest priority means nothing on a pin");
    w(&mut l, 0x350, 0x700);
    w(&mut l, 0xf0, 0xff);
    assert_eq!(l.lint(Lint::Lint0), LintRoute::Masked);
    for lvt in (0x320..=0x370).step_by(0x10) {
        assert_ne!(r(&mut l, lvt) & LVT_MASKED, 0);
    }
    w(&mut l, 0xf0, 0x1ff);
    assert_eq!(l.lint(Lint::Lint0), LintRoute::Masked, "re-enabling does not unmask");
    // Globally disabled: the pins are INTR and NMI.
    l.set_apic_base(DEFAULT_BASE).unwrap();
    assert_eq!(l.lint(Lint::Lint0), LintRoute::ExtInt);
    assert_eq!(l.lint(Lint::Lint1), LintRoute::Nmi);
}

#[test]
fn ipis_are_described_for_the_caller() {
    let mut l = enabled();
    w(&mut l, 0x310, 2 << 24);
    let ipi = match l.write(0x300, 0x4031, 0) {
        Effect::Ipi(ipi) => ipi,
        e => panic!("{e:?}"),
    };
    assert_eq!(
        ipi,
        Ipi {
            vector: 0x31,
            mode: DeliveryMode::Fixed,
            logical: false,
            shorthand: Shorthand::None,
            destination: 2,
            x2apic: false,
            assert: true,
            level_triggered: false,
        }
    );
    assert_eq!(r(&mut l, 0x300) & (1 << 12), 0, "delivery status always idle");
    let send = |l: &mut Lapic, low: u32| match l.write(0x300, low, 0) {
        Effect::Ipi(ipi) => Some(ipi),
        _ => None,
    };
    // Linux's AP start-up: INIT assert, INIT de-assert, SIPI
    // (smpboot.c, wakeup_secondary_cpu_via_init).
    let init = send(&mut l, 0xc500).unwrap();
    assert_eq!((init.mode, init.assert, init.level_triggered), (DeliveryMode::Init, true, true));
    assert!(!init.is_init_deassert());
    assert!(send(&mut l, 0x8500).unwrap().is_init_deassert());
    let sipi = send(&mut l, 0x0609).unwrap();
    assert_eq!((sipi.mode, sipi.vector), (DeliveryMode::StartUp, 0x09), "a SIPI's vector may be below 16");
    assert_eq!(esr(&mut l), 0);
    // Shorthands (Table 11-3).
    assert_eq!(send(&mut l, 0xc_0400).unwrap().shorthand, Shorthand::AllExcludingSelf);
    assert_eq!(send(&mut l, 0x4_0040).unwrap().shorthand, Shorthand::SelfOnly);
    assert_eq!(send(&mut l, 0x8_0040).unwrap().shorthand, Shorthand::AllIncludingSelf);
    assert_eq!(send(&mut l, 0x4_0400), None, "self NMI is invalid");
    assert_eq!(send(&mut l, 0x8_0500), None, "INIT to all including self is invalid");
    assert_eq!(send(&mut l, 0x0340), None, "0b011 is reserved");
    let lowest = send(&mut l, 0x0940).unwrap();
    assert_eq!((lowest.mode, lowest.logical), (DeliveryMode::LowestPriority, true));
    assert_eq!(send(&mut l, 0x0200).unwrap().mode, DeliveryMode::Smi);
    // x2APIC: one 64-bit MSR, a 32-bit destination.
    let mut l = x2apic();
    let ipi = match l.write_msr(0x830, (0x1_0005 << 32) | 0x40f3, 0) {
        Ok(Effect::Ipi(ipi)) => ipi,
        e => panic!("{e:?}"),
    };
    assert_eq!((ipi.vector, ipi.destination, ipi.x2apic), (0xf3, 0x1_0005, true));
    assert_eq!(l.read_msr(0x830, 0), Ok((0x1_0005 << 32) | 0x40f3));
    for reserved in [1 << 12, 1 << 13, 1 << 16, 1 << 17, 1 << 20, 1 << 31] {
        assert_eq!(l.write_msr(0x830, reserved | 0x40f3, 0), Err(Gp), "ICR bit {reserved:#x}");
    }
    assert_eq!(l.read_msr(0x831, 0), Err(Gp), "no ICR high half in x2APIC");
}

#[test]
fn x2apic_self_ipi() {
    let mut l = x2apic();
    assert_eq!(l.write_msr(0x83f, 0x45, 0), Ok(Effect::None));
    assert!(irr(&l, 0x45));
    assert_eq!(l.pending_vector(), Some(0x45));
    assert_eq!(l.write_msr(0x83f, 0x145, 0), Err(Gp));
    assert_eq!(l.read_msr(0x83f, 0), Err(Gp), "write-only");
    assert_eq!(l.write_msr(0x83f, 0x05, 0), Ok(Effect::None));
    assert_eq!(l.write_msr(0x828, 0, 0), Ok(Effect::None));
    assert_eq!(l.read_msr(0x828, 0), Ok(u64::from(ESR_SEND_ILLEGAL_VECTOR)));
}

#[test]
fn apic_base_transitions_follow_the_x2apic_state_diagram() {
    let mut l = enabled();
    let xapic = DEFAULT_BASE | BASE_EN | BASE_BSP;
    let x2 = xapic | BASE_EXTD;
    let disabled = DEFAULT_BASE | BASE_BSP;
    // Reserved bits: 7:0, 9, MAXPHYADDR (39) and up.
    for bad in [1, 0x80, 1 << 9, 1 << 39, 1 << 63] {
        assert_eq!(l.set_apic_base(xapic | bad), Err(Gp), "bit {bad:#x}");
    }
    assert_eq!(l.set_apic_base(DEFAULT_BASE | BASE_EXTD), Err(Gp), "EN=0, EXTD=1 is invalid");
    // Relocation in xAPIC mode, and the BSP flag is software's to write.
    l.set_apic_base(0x7f_fff0_0000 | BASE_EN).unwrap();
    assert_eq!(l.mmio_base(), Some(0x7f_fff0_0000));
    assert_eq!(l.read_msr(IA32_APIC_BASE, 0), Ok(0x7f_fff0_0800));
    assert_eq!(l.write_msr(IA32_APIC_BASE, xapic, 0), Ok(Effect::None));
    assert_eq!(l.mmio_base(), Some(DEFAULT_BASE));
    // x2APIC MSRs fault in xAPIC mode.
    assert_eq!(l.read_msr(0x802, 0), Err(Gp));
    assert_eq!(l.write_msr(0x808, 0, 0), Err(Gp));
    // xAPIC -> x2APIC keeps the registers and hides the page.
    w(&mut l, 0x80, 0x20);
    l.set_apic_base(x2).unwrap();
    assert_eq!(l.mode(), Mode::X2Apic);
    assert_eq!(l.mmio_base(), None);
    assert_eq!(l.read_msr(0x808, 0), Ok(0x20));
    assert_eq!(r(&mut l, 0x80), 0, "the page is not decoded in x2APIC mode");
    assert_eq!(l.write(0x80, 0x30, 0), Effect::None);
    assert_eq!(l.tpr(), 0x20);
    // x2APIC -> xAPIC directly is illegal; through disabled it is not.
    assert_eq!(l.set_apic_base(xapic), Err(Gp));
    l.set_apic_base(disabled).unwrap();
    assert_eq!(l.mode(), Mode::Disabled);
    assert_eq!(l.mmio_base(), None);
    assert_eq!(l.read_msr(0x808, 0), Err(Gp));
    assert!(!l.accept(0x40, false));
    assert!(!l.is_destination(false, 3, false));
    // Disabled -> x2APIC is illegal; -> xAPIC finds the reset state.
    assert_eq!(l.set_apic_base(x2), Err(Gp));
    l.set_apic_base(xapic).unwrap();
    assert_eq!(r(&mut l, 0x80), 0, "registers were lost when disabled");
    assert_eq!(r(&mut l, 0xf0), 0xff);
    assert_eq!(r(&mut l, 0x20), 3 << 24, "the ID survives");
    // Writing the same mode again is fine.
    l.set_apic_base(xapic).unwrap();
    l.set_apic_base(x2).unwrap();
    l.set_apic_base(x2).unwrap();
    assert_eq!(l.write_msr(IA32_APIC_BASE, x2 | 1, 0), Err(Gp));
    assert_eq!(l.mode(), Mode::X2Apic, "a refused write changes nothing");
}

#[test]
fn x2apic_msrs_fault_as_the_sdm_says() {
    let mut l = x2apic();
    let mut big = Lapic::new(config(0x1_2345));
    w(&mut big, 0xf0, 0x1ff);
    big.set_apic_base(DEFAULT_BASE | BASE_EN | BASE_EXTD).unwrap();
    assert_eq!(big.read_msr(0x802, 0), Ok(0x1_2345), "the full 32-bit ID");
    assert_eq!(big.read_msr(0x80d, 0), Ok(0x1234_0020), "LDR: cluster 0x1234, member bit 5");
    assert_eq!(l.read_msr(0x803, 0), Ok(u64::from(VERSION)));
    assert_eq!(l.read_msr(0x80f, 0), Ok(0x1ff));
    // Registers x2APIC mode does not have, and reserved addresses.
    for msr in [0x800, 0x801, 0x804, 0x809, 0x80c, 0x80e, 0x82f, 0x831, 0x83a, 0x83d, 0x840, 0x8ff] {
        assert_eq!(l.read_msr(msr, 0), Err(Gp), "read {msr:#x}");
        assert_eq!(l.write_msr(msr, 0, 0), Err(Gp), "write {msr:#x}");
    }
    // Read-only registers.
    for msr in [0x802, 0x803, 0x80a, 0x80d, 0x810, 0x817, 0x818, 0x820, 0x827, 0x839] {
        assert!(l.read_msr(msr, 0).is_ok(), "read {msr:#x}");
        assert_eq!(l.write_msr(msr, 0, 0), Err(Gp), "write {msr:#x}");
    }
    // Write-only.
    assert_eq!(l.read_msr(0x80b, 0), Err(Gp));
    // Reserved bits.
    for (msr, value) in [
        (0x808, 0x100),
        (0x808, 1 << 32),
        (0x80b, 1),
        (0x80f, 1 << 12),
        (0x828, 1),
        (0x832, 1 << 8),
        (0x832, 1 << 19),
        (0x833, 1 << 11),
        (0x835, 1 << 17),
        (0x837, 1 << 8),
        (0x838, 1 << 32),
        (0x83e, 1 << 2),
    ] {
        assert_eq!(l.write_msr(msr, value, 0), Err(Gp), "{msr:#x} <- {value:#x}");
    }
    // Read-only bits of an LVT may be written back.
    assert_eq!(l.write_msr(0x835, 0x1_5700, 0), Ok(Effect::None));
    assert_eq!(l.read_msr(0x835, 0), Ok(0x1_0700));
    assert_eq!(l.write_msr(0x808, 0xff, 0), Ok(Effect::None));
    assert_eq!(l.read_msr(0x80a, 0), Ok(0xff), "PPR follows TPR");
    assert_eq!(l.write_msr(0x838, 0xffff_ffff, 0), Ok(Effect::None));
    assert_eq!(l.read_msr(0x838, 0), Ok(0xffff_ffff));
    // Other MSRs are not the LAPIC's.
    assert!(!Lapic::handles_msr(0x10));
    assert!(Lapic::handles_msr(0x1b) && Lapic::handles_msr(0x6e0) && Lapic::handles_msr(0x83f));
    assert_eq!(l.read_msr(0x10, 0), Err(Gp));
    assert_eq!(l.write_msr(0x900, 0, 0), Err(Gp));
}

#[test]
fn destinations_follow_the_logical_models() {
    let mut l = enabled();
    assert!(l.is_destination(false, 3, false));
    assert!(!l.is_destination(false, 4, false));
    assert!(l.is_destination(false, 0xff, false), "broadcast");
    assert!(l.is_destination(true, 0xff, false));
    assert!(!l.is_destination(false, 0x103, true), "a wide ID is not this xAPIC's");
    // Flat: a bitmap of up to eight APICs.
    w(&mut l, 0xd0, 0x0400_0000);
    assert!(l.is_destination(true, 0x0c, false));
    assert!(!l.is_destination(true, 0x03, false));
    // Cluster: cluster 2, member bit 0.
    w(&mut l, 0xe0, 0x0fff_ffff);
    w(&mut l, 0xd0, 0x2100_0000);
    assert!(l.is_destination(true, 0x21, false));
    assert!(l.is_destination(true, 0x23, false));
    assert!(!l.is_destination(true, 0x11, false));
    assert!(!l.is_destination(true, 0x22, false));
    // x2APIC: physical 32-bit IDs, logical from the ID (11.12.10.2).
    let mut l = Lapic::new(config(0x23));
    l.set_apic_base(DEFAULT_BASE | BASE_EN | BASE_EXTD).unwrap();
    assert!(l.is_destination(false, 0x23, true));
    assert!(l.is_destination(false, u32::MAX, true));
    assert!(!l.is_destination(false, 0x123, true));
    assert!(l.is_destination(true, 0x0002_0008, true));
    assert!(l.is_destination(true, 0x0002_ff0f, true));
    assert!(!l.is_destination(true, 0x0001_0008, true));
    assert!(!l.is_destination(true, 0x0002_0004, true));
}

#[test]
fn init_resets_all_but_the_id_and_the_mode() {
    let mut l = x2apic();
    wm(&mut l, 0x808, 0x40, 0);
    l.accept(0x50, true);
    wm(&mut l, 0x838, 1000, 0);
    l.init();
    assert_eq!(l.mode(), Mode::X2Apic);
    assert_eq!(l.read_msr(0x802, 0), Ok(3));
    assert_eq!(l.read_msr(0x808, 0), Ok(0));
    assert_eq!(l.read_msr(0x80f, 0), Ok(0xff));
    assert_eq!(l.read_msr(0x838, 0), Ok(0));
    assert_eq!(l.read_msr(0x832, 0), Ok(0x1_0000));
    assert!(!irr(&l, 0x50));
}

/// A LAPIC with the timer's LVT set to `lvt` and divide code `divide`.
fn timer(lvt: u32, divide: u32) -> Lapic {
    let mut l = enabled();
    w(&mut l, 0x3e0, divide);
    w(&mut l, 0x320, lvt);
    l
}

#[test]
fn one_shot_fires_once_at_the_right_time() {
    let mut l = timer(0x20, 0xb); // divide by 1: a tick per ns
    assert_eq!(l.write(0x380, 1000, 500), Effect::None);
    assert_eq!(l.next_timer_deadline(500, 0), Some(1500));
    assert_eq!(l.read(0x390, 900), 600);
    assert!(!l.tick(1499, 0));
    assert_eq!(l.read(0x390, 1499), 1);
    assert!(l.tick(1500, 0));
    assert!(irr(&l, 0x20));
    assert_eq!(l.read(0x390, 1500), 0);
    assert_eq!(l.read(0x380, 1500), 1000, "the initial count stays");
    assert_eq!(l.next_timer_deadline(1500, 0), None);
    assert!(!l.tick(1_000_000, 0), "once");
    // Writing the initial count restarts it; 0 stops it.
    wt(&mut l, 0x380, 10, 2000);
    assert_eq!(l.next_timer_deadline(2000, 0), Some(2010));
    wt(&mut l, 0x380, 0, 2005);
    assert_eq!(l.next_timer_deadline(2005, 0), None);
    assert_eq!(l.read(0x390, 2005), 0);
    assert!(!l.tick(3000, 0));
    // An access after the expiry catches it up even if `tick` was late.
    l.acknowledge(0x20);
    wt(&mut l, 0x380, 10, 4000);
    wt(&mut l, 0x380, 10, 4020);
    assert!(irr(&l, 0x20), "the first count expired before the rewrite");
    assert_eq!(l.next_timer_deadline(4020, 0), Some(4030));
}

#[test]
fn periodic_keeps_its_period_without_drift() {
    let mut l = timer(0x2_0030, 0x0); // periodic, divide by 2
    wt(&mut l, 0x380, 100, 0); // 200 ns period
    assert_eq!(l.next_timer_deadline(0, 0), Some(200));
    assert_eq!(l.read(0x390, 50), 75);
    // A late visit fires and the next expiry stays on the grid.
    assert!(l.tick(250, 0));
    assert_eq!(l.read(0x390, 250), 75, "reloaded at 200, 25 ticks gone");
    assert_eq!(l.next_timer_deadline(250, 0), Some(400));
    l.acknowledge(0x30);
    assert!(l.tick(410, 0));
    l.acknowledge(0x30);
    assert_eq!(l.next_timer_deadline(410, 0), Some(600));
    // Several periods missed: one interrupt, then back on the grid.
    assert!(l.tick(1_010, 0));
    assert_eq!(l.next_timer_deadline(1_010, 0), Some(1_200));
    assert!(!l.tick(1_199, 0));
    l.acknowledge(0x30);
    // A million periods later the grid has not moved.
    assert!(l.tick(200_000_000, 0));
    assert_eq!(l.next_timer_deadline(200_000_000, 0), Some(200_000_200));

    // A period that is not a whole number of nanoseconds: a 3 MHz clock,
    // one tick per period. Rounding does not accumulate.
    let mut l = Lapic::new(LapicConfig { bus_hz: 3_000_000, ..config(0) });
    w(&mut l, 0xf0, 0x1ff);
    w(&mut l, 0x3e0, 0xb);
    w(&mut l, 0x320, 0x2_0030);
    wt(&mut l, 0x380, 1, 0);
    let mut seen = Vec::new();
    let mut now = 0;
    while seen.len() < 3000 {
        now = l.next_timer_deadline(now, 0).unwrap();
        assert!(l.tick(now, 0));
        l.acknowledge(0x30);
        seen.push(now);
    }
    assert_eq!(&seen[..3], [334, 667, 1000]);
    assert_eq!(seen[2999], 1_000_000, "3000 periods of 1/3 us are exactly 1 ms");
}

#[test]
fn every_divide_encoding() {
    for (code, div) in [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64), (0xa, 128), (0xb, 1)] {
        assert_eq!(divisor(code), div);
        let mut l = timer(0x20, code);
        wt(&mut l, 0x380, 10, 0);
        assert_eq!(l.next_timer_deadline(0, 0), Some(10 * div), "code {code:#x}");
        assert_eq!(l.read(0x390, 3 * div), 7);
    }
    // Changing the divisor mid-count: what is left goes on at the new rate.
    let mut l = timer(0x20, 0xb);
    wt(&mut l, 0x380, 100, 0);
    wt(&mut l, 0x3e0, 0x0, 50);
    assert_eq!(l.read(0x390, 50), 50);
    assert_eq!(l.next_timer_deadline(50, 0), Some(150));
    assert!(l.tick(150, 0));
}

#[test]
fn tsc_deadline_mode() {
    let mut l = timer(0x4_0030, 0xb);
    assert_eq!(l.write(0x380, 1000, 0), Effect::None);
    assert_eq!(l.read(0x380, 0), 0, "initial-count writes are ignored");
    assert_eq!(l.read(0x390, 0), 0);
    assert_eq!(l.next_timer_deadline(0, 0), None, "disarmed");
    wm(&mut l, IA32_TSC_DEADLINE, 5000, 0);
    assert_eq!(l.read_msr(IA32_TSC_DEADLINE, 0), Ok(5000));
    // 4000 TSC ticks at 2 GHz are 2 us.
    assert_eq!(l.next_timer_deadline(100, 1000), Some(2100));
    assert!(!l.tick(2099, 4999));
    assert!(l.tick(2100, 5000));
    assert!(irr(&l, 0x30));
    assert_eq!(l.read_msr(IA32_TSC_DEADLINE, 0), Ok(0), "it disarms itself");
    assert!(!l.tick(3000, 7000));
    // A deadline already passed is due now; 0 disarms.
    wm(&mut l, IA32_TSC_DEADLINE, 10, 0);
    assert_eq!(l.next_timer_deadline(3000, 7000), Some(3000));
    wm(&mut l, IA32_TSC_DEADLINE, 0, 0);
    assert_eq!(l.next_timer_deadline(3000, 7000), None);
    // Changing the mode disarms it; outside the mode the MSR reads 0 and
    // ignores writes.
    wm(&mut l, IA32_TSC_DEADLINE, 9000, 0);
    w(&mut l, 0x320, 0x30);
    assert_eq!(l.read_msr(IA32_TSC_DEADLINE, 0), Ok(0));
    wm(&mut l, IA32_TSC_DEADLINE, 9000, 0);
    w(&mut l, 0x320, 0x4_0030);
    assert_eq!(l.read_msr(IA32_TSC_DEADLINE, 0), Ok(0));
    assert!(!l.tick(u64::MAX, u64::MAX));
    // Any mode change stops a count, one-shot to periodic too.
    let mut l = timer(0x30, 0xb);
    wt(&mut l, 0x380, 100, 0);
    w(&mut l, 0x320, 0x2_0030);
    assert_eq!(l.read(0x390, 10), 0, "a mode change disarms (11.5.4.1)");
    assert_eq!(l.next_timer_deadline(10, 0), None);
}

#[test]
fn masked_timers_count_silently() {
    // One-shot expiring while masked: nothing then, nothing on unmask.
    let mut l = timer(0x1_0020, 0xb);
    wt(&mut l, 0x380, 100, 0);
    assert_eq!(l.read(0x390, 40), 60, "a masked timer still counts");
    assert_eq!(l.next_timer_deadline(0, 0), None, "no need to come back");
    assert_eq!(l.write(0x320, 0x20, 500), Effect::None);
    assert!(!l.tick(500, 0));
    assert!(!irr(&l, 0x20));
    // Periodic: the periods that passed masked are dropped, later ones fire.
    let mut l = timer(0x3_0020, 0xb);
    wt(&mut l, 0x380, 100, 0);
    assert!(!l.tick(350, 0));
    wt(&mut l, 0x320, 0x2_0020, 350);
    assert_eq!(l.next_timer_deadline(350, 0), Some(400));
    assert!(!l.tick(399, 0));
    assert!(l.tick(400, 0));
    // Software disable masks the timer too.
    l.acknowledge(0x20);
    wt(&mut l, 0xf0, 0xff, 450);
    assert!(!l.tick(1000, 0));
    assert!(!irr(&l, 0x20));
    // TSC deadline masked: reaching it disarms without an interrupt.
    let mut l = timer(0x5_0020, 0xb);
    wm(&mut l, IA32_TSC_DEADLINE, 100, 0);
    assert_eq!(l.next_timer_deadline(0, 0), Some(50), "reported so that it disarms on time");
    assert!(!l.tick(50, 100));
    assert_eq!(l.read_msr(IA32_TSC_DEADLINE, 0), Ok(0));
    wt(&mut l, 0x320, 0x4_0020, 60);
    assert!(!l.tick(60, 120));
    assert!(!irr(&l, 0x20));
}

#[test]
fn a_timer_vector_below_16_is_an_error() {
    let mut l = timer(0x05, 0xb);
    wt(&mut l, 0x380, 10, 0);
    assert!(!l.tick(10, 0));
    assert_eq!(esr(&mut l), ESR_RECEIVE_ILLEGAL_VECTOR);
}

#[test]
fn linux_style_bring_up_in_x2apic_mode() {
    // Roughly arch/x86/kernel/apic/apic.c: setup_local_APIC, the ESR
    // dance of lapic_setup_esr, the timer in one-shot then TSC-deadline
    // mode (lapic_next_event, lapic_next_deadline).
    let mut l = Lapic::new(config(1));
    let base = l.read_msr(IA32_APIC_BASE, 0).unwrap();
    wm(&mut l, IA32_APIC_BASE, base | BASE_EXTD, 0);
    assert_eq!(l.read_msr(0x803, 0).unwrap() >> 16 & 0xff, 5, "maxlvt");
    wm(&mut l, 0x808, 0, 0);
    wm(&mut l, 0x80f, 0x1ff, 0);
    wm(&mut l, 0x835, 0x700, 0);
    wm(&mut l, 0x836, 0x400, 0);
    wm(&mut l, 0x828, 0, 0);
    wm(&mut l, 0x837, 0xfe, 0);
    wm(&mut l, 0x828, 0, 0);
    assert_eq!(l.read_msr(0x828, 0), Ok(0), "no APIC errors");
    // Calibration: count down from all-ones, masked, divide by 16.
    wm(&mut l, 0x83e, 0x3, 0);
    wm(&mut l, 0x832, 0x1_00ec, 0);
    wm(&mut l, 0x838, 0xffff_ffff, 1_000);
    let counted = 0xffff_ffff - l.read_msr(0x839, 1_001_000).unwrap();
    assert_eq!(counted, 62_500, "1 ms at 1 GHz / 16");
    // One-shot clock events.
    wm(&mut l, 0x832, 0xec, 2_000_000);
    wm(&mut l, 0x838, 625, 2_000_000);
    assert_eq!(l.next_timer_deadline(2_000_000, 0), Some(2_010_000));
    assert!(l.tick(2_010_000, 0));
    assert_eq!(l.pending_vector(), Some(0xec));
    l.acknowledge(0xec);
    assert_eq!(l.write_msr(0x80b, 0, 0), Ok(Effect::None));
    // TSC-deadline clock events.
    wm(&mut l, 0x832, 0x4_00ec, 3_000_000);
    wm(&mut l, IA32_TSC_DEADLINE, 6_100_000, 3_000_000);
    assert_eq!(l.next_timer_deadline(3_000_000, 6_000_000), Some(3_050_000));
    assert!(l.tick(3_050_000, 6_100_000));
    assert_eq!(l.pending_vector(), Some(0xec));
}

#[test]
fn an_ioapic_level_interrupt_end_to_end() {
    let mut io = IoApic::new(0);
    let mut l = enabled();
    // Pin 10: level-triggered, vector 0x41, physical destination 3.
    io.write(0x00, 0x10 + 2 * 10 + 1);
    io.write(0x10, 3 << 24);
    io.write(0x00, 0x10 + 2 * 10);
    assert_eq!(io.write(0x10, 0x8041), None);
    let deliver = |l: &mut Lapic, m: crate::devices::ioapic::Message| {
        assert!(l.is_destination(m.logical, u32::from(m.destination), false));
        assert_eq!(m.mode, DeliveryMode::Fixed);
        assert!(l.accept(m.vector, m.level_triggered));
    };
    let m = io.set_irq(10, true).unwrap();
    deliver(&mut l, m);
    assert_eq!(l.pending_vector(), Some(0x41));
    l.acknowledge(0x41);
    assert_eq!(io.set_irq(10, true), None, "remote IRR: nothing more until EOI");
    // The handler does not quiet the device: the EOI re-delivers.
    let Effect::EoiBroadcast(v) = l.write(0xb0, 0, 0) else { panic!("level EOI is broadcast") };
    let again: Vec<_> = io.eoi(v).collect();
    assert_eq!(again.len(), 1);
    deliver(&mut l, again[0]);
    assert_eq!(l.pending_vector(), Some(0x41));
    l.acknowledge(0x41);
    // Now it does: the line drops and the EOI ends it.
    io.set_irq(10, false);
    let Effect::EoiBroadcast(v) = l.write(0xb0, 0, 0) else { panic!("level EOI is broadcast") };
    assert_eq!(io.eoi(v).count(), 0);
    assert_eq!(l.pending_vector(), None);
    assert!(io.set_irq(10, true).is_some(), "a new assertion is a new interrupt");
}

#[test]
fn state_round_trips_and_the_timer_resumes() {
    let mut l = x2apic();
    wm(&mut l, 0x808, 0x20, 0);
    wm(&mut l, 0x83e, 0x0, 0);
    wm(&mut l, 0x832, 0x2_0033, 0);
    wm(&mut l, 0x838, 500, 100); // periodic, 1000 ns
    l.accept(0x60, true);
    l.acknowledge(0x60);
    l.accept(0x70, false);
    assert!(l.tick(1_100, 0));
    let saved = save("lapic0", &l);
    let mut back = Lapic::new(config(9));
    back.restore(decode::<Lapic>("lapic0", &saved).unwrap());
    assert_eq!(back, l);
    // On a clock continuing from the same value, both count alike.
    for now in [1_500, 2_099, 2_100, 7_777] {
        assert_eq!(back.read_msr(0x839, now), l.read_msr(0x839, now));
        assert_eq!(back.next_timer_deadline(now, 0), l.next_timer_deadline(now, 0));
        assert_eq!(back.tick(now, 0), l.tick(now, 0));
    }
    assert_eq!(back.next_timer_deadline(7_777, 0), Some(8_100));
    assert_eq!(back.eoi(), Some(0x60));

    let mut saved = save("lapic0", &l);
    saved.bytes.pop();
    assert_eq!(decode::<Lapic>("lapic0", &saved), Err(RestoreError::Corrupt { device: "lapic0" }));
    saved.version = 2;
    assert!(matches!(decode::<Lapic>("lapic0", &saved), Err(RestoreError::Version { found: 2, .. })));
}

#[test]
fn hostile_state_is_refused() {
    let mut l = enabled();
    wt(&mut l, 0x320, 0x2_0030, 0);
    wt(&mut l, 0x380, 100, 0);
    let good = l.save();
    assert_eq!(Lapic::validate(&good), Ok(()));
    let refused = |edit: &dyn Fn(&mut LapicState)| {
        let mut s = good.clone();
        edit(&mut s);
        let saved = SavedDevice { name: "lapic".into(), version: 1, bytes: postcard::to_allocvec(&s).unwrap() };
        match decode::<Lapic>("lapic", &saved) {
            Err(RestoreError::Invalid { why, .. }) => why,
            other => panic!("accepted: {other:?}"),
        }
    };
    refused(&|s| s.id = u32::MAX);
    refused(&|s| s.bus_hz = 0);
    refused(&|s| s.tsc_hz = u64::MAX);
    refused(&|s| s.phys_addr_bits = 64);
    refused(&|s| s.apic_base |= 1);
    refused(&|s| s.apic_base |= 1 << 45);
    refused(&|s| s.apic_base = DEFAULT_BASE | BASE_EXTD);
    refused(&|s| s.irr[0] |= 1 << 3);
    refused(&|s| s.isr[0] |= 1 << 15);
    refused(&|s| s.tmr[0] |= 1);
    refused(&|s| s.ldr = 1);
    refused(&|s| s.dfr_model = 0x10);
    refused(&|s| s.svr = 1 << 12);
    refused(&|s| s.esr_pending = 1 << 8);
    refused(&|s| s.icr |= 1 << 12);
    refused(&|s| s.lvt[3] |= LVT_REMOTE_IRR);
    refused(&|s| s.lvt[0] |= 1 << 8);
    refused(&|s| {
        s.svr = 0xff;
        s.lvt[5] = 0xfe;
    });
    refused(&|s| s.timer.divide = 4);
    refused(&|s| s.timer.start_count = 0);
    refused(&|s| s.timer.start_count = 101);
    refused(&|s| s.timer.initial = 0);
    refused(&|s| s.lvt[0] = 0x4_0030);
    refused(&|s| {
        s.lvt[0] = 0x30;
        s.timer.expiries = 1;
    });
    refused(&|s| s.timer.tsc_deadline = 5);
    // Arrays of the wrong length do not even decode: the layout fixes them.
    let mut bytes = postcard::to_allocvec(&good).unwrap();
    bytes.truncate(bytes.len() - 3);
    let saved = SavedDevice { name: "lapic".into(), version: 1, bytes };
    assert_eq!(decode::<Lapic>("lapic", &saved), Err(RestoreError::Corrupt { device: "lapic" }));
}

/// A xorshift generator: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn check_invariants(l: &Lapic, now: u64) {
    assert_eq!(Lapic::validate(&l.save()), Ok(()), "{:?}", l.s);
    if let Some(v) = l.pending_vector() {
        assert!(v >= 16 && v >> 4 > l.ppr() >> 4);
    }
    assert!(l.ppr() >> 4 >= l.tpr() >> 4);
    assert!(l.s.timer.current(now, l.s.bus_hz, l.timer_periodic()) <= l.s.timer.initial);
    if let Some(d) = l.next_timer_deadline(now, now) {
        assert!(l.timer_mode() == TimerMode::TscDeadline || d > l.s.timer.start_ns || l.s.timer.start_count == 0);
    }
}

#[test]
fn random_guest_input_never_panics_and_keeps_invariants() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut l = enabled();
    let mut now = 0u64;
    let values = [0, 1, 0xff, 0x100, 0x1ff, 0x1_0000, 0x2_0040, 0x4_0040, 0xffff_ffff];
    // How often the interesting things happened: the walk must reach them.
    let (mut fired, mut taken, mut in_x2apic, mut level_eois, mut faults) = (0, 0, 0, 0, 0);
    let (mut ipis, mut broadcasts) = (0, 0);
    let mut effect = |e: Effect| match e {
        Effect::Ipi(_) => ipis += 1,
        Effect::EoiBroadcast(_) => broadcasts += 1,
        Effect::None => {}
    };
    for round in 0..60_000 {
        let value = if rng.below(2) == 0 { values[rng.below(values.len() as u64) as usize] } else { rng.next() };
        let x2 = l.mode() == Mode::X2Apic;
        // A register write through whichever interface the mode has.
        let reg_write = |l: &mut Lapic, reg: u32, value: u32| {
            if x2 {
                l.write_msr(0x800 + (reg >> 4), u64::from(value), now).unwrap_or(Effect::None)
            } else {
                l.write(u64::from(reg), value, now)
            }
        };
        match rng.below(15) {
            12 => {
                // Program the timer as a guest would.
                let mode = rng.below(3) as u32;
                let mask = if rng.below(5) == 0 { LVT_MASKED } else { 0 };
                effect(reg_write(&mut l, REG_TIMER_DIVIDE, [0, 1, 2, 3, 8, 9, 10, 11][rng.below(8) as usize]));
                effect(reg_write(&mut l, REG_LVT_TIMER, (mode << 17) | mask | (0x20 + rng.below(0xe0) as u32)));
                effect(reg_write(&mut l, REG_TIMER_INITIAL, 1 + rng.below(3000) as u32));
                let _ = l.write_msr(IA32_TSC_DEADLINE, now.wrapping_mul(2) + rng.below(20_000), now);
            }
            13 => effect(reg_write(&mut l, REG_EOI, 0)),
            14 => {
                effect(reg_write(&mut l, REG_ICR_HIGH, rng.next() as u32));
                effect(reg_write(&mut l, REG_ICR_LOW, rng.next() as u32 & 0x000c_cfff));
                if x2 {
                    let _ = l.write_msr(0x830, rng.next() & !ICR_X2APIC_RESERVED, now).map(&mut effect);
                }
            }
            0 | 1 => {
                let offset = if rng.below(8) == 0 { rng.below(0x1100) } else { rng.below(0x40) << 4 };
                effect(l.write(offset, value as u32, now));
            }
            2 | 3 => {
                let offset = if rng.below(8) == 0 { rng.below(0x1100) } else { rng.below(0x40) << 4 };
                l.read(offset, now);
            }
            4 | 5 => {
                let msr = match rng.below(10) {
                    0 => IA32_APIC_BASE,
                    1 => IA32_TSC_DEADLINE,
                    _ => 0x800 + rng.below(0x100) as u32,
                };
                match l.write_msr(msr, if rng.below(2) == 0 { value & 0xffff_ffff } else { value }, now) {
                    Ok(e) => effect(e),
                    Err(Gp) => faults += 1,
                }
            }
            6 => {
                let _ = l.read_msr(0x800 + rng.below(0x100) as u32, now);
            }
            7 => {
                let base = DEFAULT_BASE | [0, BASE_EN, BASE_EN | BASE_EXTD, BASE_BSP][rng.below(4) as usize];
                let _ = l.set_apic_base(if rng.below(10) == 0 { rng.next() } else { base });
                if l.mode() != Mode::Disabled && rng.below(2) == 0 {
                    // Keep it software-enabled often enough to matter.
                    let _ = l.write(0xf0, 0x1ff, now);
                    let _ = l.write_msr(0x80f, 0x1ff, now);
                }
            }
            8 => {
                l.accept(rng.next() as u8, rng.below(2) == 0);
            }
            9 => {
                if let Some(v) = l.pending_vector() {
                    assert!(l.acknowledge(v));
                    taken += 1;
                }
                if rng.below(3) == 0 && l.eoi().is_some() {
                    level_eois += 1;
                }
            }
            10 => {
                let span = if rng.below(4) == 0 { 1 << 40 } else { 5_000 };
                now += rng.below(span);
                if l.tick(now, now.wrapping_mul(2)) {
                    fired += 1;
                }
            }
            _ => {
                if round % 997 == 0 {
                    l.init();
                }
                let _ = l.next_timer_deadline(now, now);
                let _ = l.lint(Lint::Lint0);
            }
        }
        check_invariants(&l, now);
        if l.mode() == Mode::X2Apic {
            in_x2apic += 1;
        }
    }
    let counts = [fired, taken, in_x2apic, level_eois, faults, ipis, broadcasts];
    assert!(
        counts.iter().all(|&n| n > 20),
        "fired, taken, x2APIC rounds, level EOIs, #GPs, IPIs, broadcasts: {counts:?}"
    );
    // Extremes of time.
    l.tick(u64::MAX, u64::MAX);
    let _ = l.next_timer_deadline(u64::MAX, 0);
    let _ = l.read(0x390, u64::MAX);
}

#[test]
fn the_summary_shows_a_vector_left_in_service_and_when_the_timer_is_due() {
    // TSC-deadline mode, vector 0xec (Linux's local timer), armed 2 us
    // ahead; 0xec delivered and not yet ended, 0xfd requested.
    let mut l = timer(0x4_00ec, 0xb);
    wm(&mut l, IA32_TSC_DEADLINE, 5000, 0);
    assert!(l.accept(0xec, false));
    l.acknowledge(0xec);
    assert!(l.accept(0xfd, false));
    let s = l.summary(100, 1000);
    assert_eq!((s.isr, s.irr, s.ppr, s.lvt_timer, s.tsc_deadline), (Some(0xec), Some(0xfd), 0xe0, 0x4_00ec, 5000));
    assert_eq!(s.timer_in_ns, Some(2000));
    assert_eq!(s.to_string(), "isr 0xec, irr 0xfd, tpr 0x00, ppr 0xe0, lvt timer 0x400ec, timer due in 2 us");
    wm(&mut l, IA32_TSC_DEADLINE, 0, 0);
    assert_eq!(l.summary(100, 1000).timer_in_ns, None);
}
