//! Several local APICs in one `DeviceSet`: IPI destinations (physical,
//! logical flat and cluster, x2APIC, the shorthands), delivery modes
//! (fixed, NMI, INIT, SIPI), the I/O APIC and the PIC reaching the right
//! vCPU, and hostile ICR values.

use super::lapic::{self, DeliveryMode, Ipi, Shorthand};
use super::*;

const ICR_LOW: u64 = 0xfee0_0300;
const ICR_HIGH: u64 = 0xfee0_0310;
const SVR: u64 = 0xfee0_00f0;

/// A PC with `n` vCPUs whose APICs are all software-enabled, as a guest's
/// start-up code leaves them.
fn smp(n: usize) -> DeviceSet {
    let mut set = DeviceSet::pc_smp(0, 16 << 20, n);
    for i in 0..n {
        set.set_current(i);
        assert!(set.mmio_write(SVR, 4, 0x1ff, 0));
    }
    set.set_current(0);
    set
}

/// vCPU `from` writes the ICR (destination field, then the low word that
/// sends); the vCPUs with a fixed interrupt pending afterwards, as a mask.
fn send(set: &mut DeviceSet, from: usize, dest: u8, low: u32) -> u32 {
    set.set_current(from);
    assert!(set.mmio_write(ICR_HIGH, 4, u64::from(dest) << 24, 0));
    assert!(set.mmio_write(ICR_LOW, 4, u64::from(low), 0));
    let pending =
        (0..set.vcpu_count()).filter(|&i| set.lapics[i].pending_vector().is_some()).fold(0, |m, i| m | 1 << i);
    // Leave no IRR bits behind for the next send.
    for i in 0..set.vcpu_count() {
        set.set_current(i);
        while set.lapics[i].pending_vector().is_some() {
            set.acknowledge_interrupt();
            let _ = set.mmio_write(0xfee0_00b0, 4, 0, 0);
        }
    }
    set.set_current(from);
    pending
}

#[test]
fn each_vcpu_has_its_own_apic_and_fw_cfg_counts_them() {
    let mut set = DeviceSet::pc_smp(0, 16 << 20, 4);
    assert_eq!(set.vcpu_count(), 4);
    for i in 0..4 {
        set.set_current(i);
        assert_eq!(set.apic_id(), i as u32);
        // xAPIC ID register: the ID in bits 31:24.
        assert_eq!(set.mmio_read(0xfee0_0020, 4, 0), Some((i as u64) << 24));
        let base = set.lapic_read_msr(lapic::IA32_APIC_BASE, 0).unwrap().unwrap();
        assert_eq!(base & (1 << 8) != 0, i == 0, "only vCPU 0 is the BSP");
    }
    set.set_current(9);
    assert_eq!(set.current(), 3, "an index past the vCPUs changes nothing");
    // fw_cfg NB_CPUS (key 5).
    set.pio_write(fw_cfg::SELECTOR_PORT, 2, 5, || 0);
    let lo = set.pio_read(fw_cfg::SELECTOR_PORT + 1, 1, || 0);
    let hi = set.pio_read(fw_cfg::SELECTOR_PORT + 1, 1, || 0);
    assert_eq!((lo, hi), (PortEffect::Done(4), PortEffect::Done(0)));
    assert_eq!(DeviceSet::pc_smp(0, 16 << 20, 99).vcpu_count(), MAX_VCPUS, "clamped");
    assert_eq!(DeviceSet::pc_smp(0, 16 << 20, 0).vcpu_count(), 1, "clamped");
}

#[test]
fn physical_destinations_and_shorthands_reach_the_right_vcpus() {
    let mut set = smp(4);
    assert_eq!(send(&mut set, 0, 2, 0x40), 0b0100, "physical ID 2");
    assert_eq!(send(&mut set, 3, 0, 0x40), 0b0001, "an AP to the BSP");
    assert_eq!(send(&mut set, 1, 0xff, 0x40), 0b1111, "physical broadcast");
    assert_eq!(send(&mut set, 2, 7, 0x40), 0, "no vCPU has APIC ID 7");
    assert_eq!(send(&mut set, 2, 0, (1 << 18) | 0x40), 0b0100, "self");
    assert_eq!(send(&mut set, 2, 0, (2 << 18) | 0x40), 0b1111, "all including self");
    assert_eq!(send(&mut set, 2, 0, (3 << 18) | 0x40), 0b1011, "all excluding self");
    assert_eq!(send(&mut set, 0, 1, 0x05), 0, "vectors below 16 are illegal: not sent");
    assert_eq!(send(&mut set, 0, 1, (1 << 8) | 0x40), 0b0010, "lowest priority: one target");
    assert_eq!(send(&mut set, 0, 0xff, (1 << 8) | 0x40), 0b0001, "lowest priority: the first of several");
}

#[test]
fn ipis_to_other_vcpus_kick_the_scheduler_and_wake_halted_ones() {
    let mut set = smp(2);
    let _ = set.take_kicked();
    set.set_current(1);
    assert!(!set.interrupt_pending_for(0));
    assert!(set.mmio_write(ICR_HIGH, 4, 0, 0));
    assert!(set.mmio_write(ICR_LOW, 4, 0x41, 0));
    assert_eq!(set.take_kicked(), 0b01, "an IPI for another vCPU");
    assert_eq!(set.take_kicked(), 0, "taken");
    assert!(set.interrupt_pending_for(0) && !set.interrupt_pending_for(1));
    assert!(!set.interrupt_pending(), "not the current vCPU's");
    set.set_current(0);
    assert!(set.interrupt_pending());
    assert_eq!(set.acknowledge_interrupt(), 0x41);
    // A self IPI is no reason to end the slice.
    assert!(set.mmio_write(ICR_LOW, 4, (1 << 18) | 0x42, 0));
    assert_eq!(set.take_kicked(), 0);
    assert!(!set.interrupt_pending_for(31) && !set.interrupt_pending_for(usize::MAX));
}

#[test]
fn logical_flat_and_cluster_destinations() {
    let mut set = smp(4);
    // Flat model (DFR all ones, the reset value): LDR bit per vCPU.
    for i in 0..4 {
        set.set_current(i);
        assert!(set.mmio_write(0xfee0_00d0, 4, (1u64 << i) << 24, 0));
    }
    assert_eq!(send(&mut set, 0, 0b0110, (1 << 11) | 0x40), 0b0110);
    assert_eq!(send(&mut set, 0, 0b1000, (1 << 11) | 0x40), 0b1000);
    assert_eq!(send(&mut set, 0, 0xff, (1 << 11) | 0x40), 0b1111, "logical broadcast");
    assert_eq!(send(&mut set, 0, 0b1_0000, (1 << 11) | 0x40), 0, "no vCPU has that bit");
    // Cluster model: cluster in LDR bits 31:28, member bits 27:24.
    for i in 0..4 {
        set.set_current(i);
        assert!(set.mmio_write(0xfee0_00e0, 4, 0x0fff_ffff, 0));
        let (cluster, member) = ((i / 2) as u64, 1u64 << (i % 2));
        assert!(set.mmio_write(0xfee0_00d0, 4, ((cluster << 4) | member) << 24, 0));
    }
    assert_eq!(send(&mut set, 0, 0x13, (1 << 11) | 0x40), 0b1100, "cluster 1, both members");
    assert_eq!(send(&mut set, 0, 0x02, (1 << 11) | 0x40), 0b0010, "cluster 0, member 1");
    assert_eq!(send(&mut set, 0, 0x24, (1 << 11) | 0x40), 0, "cluster 2 is empty");
}

#[test]
fn x2apic_icr_msr_uses_32_bit_destinations() {
    let mut set = smp(4);
    // Each vCPU switches its APIC to x2APIC mode, as a guest does.
    for i in 0..4 {
        set.set_current(i);
        let base = set.lapic_read_msr(lapic::IA32_APIC_BASE, 0).unwrap().unwrap();
        assert_eq!(set.lapic_write_msr(lapic::IA32_APIC_BASE, base | (1 << 10), 0), Some(Ok(())));
    }
    set.set_current(0);
    let icr = |dest: u64, low: u64| (dest << 32) | low;
    assert_eq!(set.lapic_write_msr(0x830, icr(3, 0x40), 0), Some(Ok(())));
    assert!(set.interrupt_pending_for(3) && !set.interrupt_pending_for(1));
    let ipi = |logical, destination| Ipi {
        vector: 0x40,
        mode: DeliveryMode::Fixed,
        logical,
        shorthand: Shorthand::None,
        destination,
        x2apic: true,
        assert: true,
        level_triggered: false,
    };
    // Logical x2APIC IDs: cluster in 31:16, a bit per member (SDM 11.12.10.2).
    assert_eq!(set.ipi_targets(&ipi(true, 0b1010)), 0b1010);
    assert_eq!(set.ipi_targets(&ipi(true, (1 << 16) | 1)), 0, "cluster 1 is empty");
    assert_eq!(set.ipi_targets(&ipi(false, 2)), 0b0100);
    assert_eq!(set.ipi_targets(&ipi(false, 0x100 | 2)), 0, "all 32 bits count");
    assert_eq!(set.ipi_targets(&ipi(false, u32::MAX)), 0b1111, "broadcast");
    assert_eq!(set.lapic_write_msr(0x830, 1 << 20, 0), Some(Err(lapic::Gp)), "reserved bits");
}

#[test]
fn init_sipi_and_nmi_become_signals_for_the_vm() {
    let mut set = smp(3);
    // An AP's APIC state before its INIT.
    set.set_current(2);
    assert!(set.mmio_write(0xfee0_0080, 4, 0x20, 0), "TPR");
    assert!(!set.has_signals());
    assert_eq!(send(&mut set, 0, 2, 0x4500), 0, "INIT assert");
    assert!(set.has_signals() && set.interrupt_pending_for(2), "INIT wakes its target");
    assert_eq!(send(&mut set, 0, 2, 0x0620), 0, "SIPI");
    assert_eq!(send(&mut set, 0, 2, 0x8500), 0, "INIT de-assert: ignored");
    assert_eq!(set.take_signals(2), Signals { nmi: false, init: true, sipi: Some(0x20) });
    assert!(!set.has_signals());
    assert_eq!(set.take_signals(2), Signals::default(), "taken");
    set.set_current(2);
    assert_eq!(set.mmio_read(0xfee0_0080, 4, 0), Some(0), "INIT reset the AP's APIC");
    assert_eq!(set.apic_id(), 2, "but for its ID");
    // A SIPI, then an INIT: the INIT voids it.
    send(&mut set, 0, 1, 0x0630);
    send(&mut set, 0, 1, 0x4500);
    assert_eq!(set.take_signals(1), Signals { nmi: false, init: true, sipi: None });
    // NMI to all but self.
    send(&mut set, 1, 0, (3 << 18) | 0x0400);
    assert!(set.take_signals(0).nmi);
    assert_eq!(set.take_signals(1), Signals::default());
    assert!(set.take_signals(2).nmi);
    // INIT to self by destination: the sender parks itself, and the
    // scheduler hears of it.
    let _ = set.take_kicked();
    send(&mut set, 1, 1, 0x4500);
    assert_eq!(set.take_kicked(), 0b10);
    assert!(set.take_signals(1).init);
    assert_eq!(set.take_signals(7), Signals::default(), "no such vCPU");
}

#[test]
fn the_io_apic_routes_to_its_destination_and_the_pic_to_vcpu_0() {
    let mut set = smp(4);
    // PIT IRQ 0 through I/O APIC pin 2 to APIC 3 as vector 0x30; the PICs
    // masked.
    set.pio_write(0x21, 1, 0xff, || 0);
    assert!(set.mmio_write(0xfec0_0000, 4, 0x10 + 2 * 2 + 1, 0));
    assert!(set.mmio_write(0xfec0_0010, 4, 3 << 24, 0));
    assert!(set.mmio_write(0xfec0_0000, 4, 0x10 + 2 * 2, 0));
    assert!(set.mmio_write(0xfec0_0010, 4, 0x30, 0));
    set.pulse_isa_irq(0);
    set.refresh_intr();
    assert!(set.interrupt_pending_for(3));
    assert!((0..3).all(|i| !set.interrupt_pending_for(i)));
    set.set_current(3);
    assert_eq!(set.acknowledge_interrupt(), 0x30);
    // Unmask the PIC (IRQ 1) and mask the pin: only vCPU 0 sees INTR (its
    // LINT0 is ExtINT, as firmware leaves the BSP).
    assert!(set.mmio_write(0xfec0_0000, 4, 0x10 + 2, 0));
    assert!(set.mmio_write(0xfec0_0010, 4, 1 << 16, 0));
    set.pio_write(0x21, 1, 0xfd, || 0);
    set.set_isa_irq(1, true);
    set.refresh_intr();
    assert!(set.interrupt_pending_for(0));
    assert!((1..4).all(|i| !set.interrupt_pending_for(i)));
    set.set_current(2);
    assert!(!set.interrupt_pending());
    assert_ne!(set.acknowledge_interrupt(), 0x21, "an AP does not acknowledge the PIC");
}

#[test]
fn hostile_icr_values_never_panic() {
    let mut set = smp(MAX_VCPUS);
    let mut x = 0x1234_5678_9abc_def0u64;
    for _ in 0..20_000 {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let from = (x >> 61) as usize;
        set.set_current(from);
        assert!(set.mmio_write(ICR_HIGH, 4, x & 0xffff_ffff, 0));
        assert!(set.mmio_write(ICR_LOW, 4, x >> 32, 0));
        for i in 0..MAX_VCPUS {
            let _ = set.take_signals(i);
        }
        let _ = set.take_kicked();
    }
}

#[test]
fn every_vcpus_apic_saves_and_restores_and_a_mismatched_set_is_refused() {
    let mut set = smp(4);
    // vCPU 2: 0x61 in service, 0x72 requested; vCPU 3 a logical ID.
    send(&mut set, 0, 2, 0x61);
    set.lapics[2].accept(0x61, false);
    set.set_current(2);
    assert_eq!(set.acknowledge_interrupt(), 0x61);
    set.lapics[2].accept(0x72, false);
    set.set_current(3);
    assert!(set.mmio_write(0xfee0_00d0, 4, 0x0800_0000, 0));
    let saved = set.save();
    let names: Vec<&str> = saved.iter().map(|s| s.name.as_str()).filter(|n| n.starts_with("lapic")).collect();
    assert_eq!(names, ["lapic0", "lapic1", "lapic2", "lapic3"]);
    let mut copy = DeviceSet::pc_smp(0, 16 << 20, 4);
    copy.restore(&saved).unwrap();
    assert_eq!(copy.save(), saved);
    assert!(copy.interrupt_pending_for(2) && !copy.interrupt_pending_for(1), "0x72 waits for vCPU 2 alone");
    assert_eq!(copy.current(), 0);
    // Fewer vCPUs than APICs saved, a vCPU's APIC missing, or one whose
    // ID is another vCPU's: refused, nothing changed.
    let mut two = DeviceSet::pc_smp(0, 16 << 20, 2);
    let before = two.save();
    assert_eq!(two.restore(&saved), Err(RestoreError::UnknownDevice("lapic2".into())));
    assert_eq!(two.save(), before);
    let missing: Vec<SavedDevice> = saved.iter().filter(|s| s.name != "lapic3").cloned().collect();
    assert_eq!(copy.restore(&missing), Err(RestoreError::MissingDevice("lapic3")));
    let mut swapped = saved.clone();
    let l1 = swapped.iter().position(|s| s.name == "lapic1").unwrap();
    let l0 = swapped.iter().position(|s| s.name == "lapic0").unwrap();
    swapped[l1].bytes = swapped[l0].bytes.clone();
    assert_eq!(
        copy.restore(&swapped),
        Err(RestoreError::Invalid { device: "lapic1", why: "the APIC ID is not its vCPU's index" })
    );
    assert_eq!(copy.save(), saved, "nothing changed");
}
