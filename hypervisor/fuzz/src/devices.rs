//! The PC device set (`DeviceSet::pc_smp`, 1 to `MAX_VCPUS` vCPUs) under
//! a guest's port I/O and its accesses to the local APIC, I/O APIC and PCI
//! configuration pages and the APIC's MSRs, from any of its vCPUs (IPIs
//! through the ICR routed between their local APICs; the VM taking the
//! NMIs, INITs and SIPIs they leave), with the
//! VM clock moving and interrupts taken, checked through saved state: every
//! state a guest can drive the devices into must save, pass each device's
//! own `validate` and restore, and the restored set must be the same set.
//!
//! Checks, after every operation:
//! - no panic;
//! - lanes of a read that no device decodes read all ones (a dword at
//!   CONFIG_ADDRESS, claimed whole by the PCI host bridge, aside);
//! - the set's saved state restores into a fresh set of as many vCPUs (so
//!   `validate` accepts every reachable state of every local APIC), which
//!   saves the same bytes; the signals IPIs left travel beside it, as a
//!   checkpoint's machine record carries them;
//! - that copy then answers the next access exactly as the original does,
//!   and agrees on the interrupt line and what waits for each vCPU and,
//!   once both have looked again (a restore drops the cached deadline),
//!   the next timer deadline.
//!
//! Input: RAM size (one byte, MiB), the vCPU count (one byte), then
//! operations (see `step`).

use hypervisor::devices::{DeviceSet, MAX_VCPUS, PortEffect, fw_cfg, lapic, pci};

use crate::input::Input;

const MAX_STEPS: usize = 200;

/// Ports worth hitting more often than at random: each device's.
const PORTS: [u16; 24] = [
    0x3f8,
    0x3f9,
    0x3fa,
    0x3fb,
    0x3fd,
    0x70,
    0x71,
    0x20,
    0x21,
    0xa0,
    0xa1,
    0x4d0,
    0x40,
    0x43,
    0x61,
    0x600,
    0x604,
    0x608,
    pci::CONFIG_ADDRESS,
    pci::CONFIG_ADDRESS + 1,
    pci::CONFIG_DATA,
    pci::CONFIG_DATA + 2,
    fw_cfg::SELECTOR_PORT,
    fw_cfg::DATA_PORT,
];

pub fn devices(data: &[u8]) {
    let mut input = Input::new(data);
    let ram = (1 + u64::from(input.u8())) << 20;
    let vcpus = 1 + usize::from(input.u8()) % MAX_VCPUS;
    let mut set = DeviceSet::pc_smp(0, ram, vcpus);
    let mut now = 0u64;
    let mut steps = 0;
    while !input.is_empty() && steps < MAX_STEPS {
        let mut copy = restored(&set, ram, vcpus);
        step(&mut input, &mut now, &mut set, &mut copy);
        steps += 1;
    }
}

/// A fresh set given `set`'s saved state: it must take it, and save it back
/// unchanged.
fn restored(set: &DeviceSet, ram: u64, vcpus: usize) -> DeviceSet {
    let saved = set.save();
    let mut copy = DeviceSet::pc_smp(0, ram, vcpus);
    if let Err(e) = copy.restore(&saved) {
        panic!("a state the guest reached was refused: {e}");
    }
    assert_eq!(copy.save(), saved, "restored state saves differently");
    for i in 0..vcpus {
        copy.set_signals(i, set.signals(i));
    }
    copy.set_current(set.current());
    copy
}

fn step(input: &mut Input<'_>, now: &mut u64, set: &mut DeviceSet, copy: &mut DeviceSet) {
    let op = input.u8();
    // Time moves by up to ~65 ms, in ns.
    *now += u64::from(input.u16()) * 1000;
    let t = *now;
    match op % 8 {
        5 => {
            device_registers(input, op, t, set, copy);
            set.poll_timers(t);
            copy.poll_timers(t);
            assert_eq!(set.next_timer(), copy.next_timer(), "the next timer differs after op {op:#x}");
        }
        0..=4 => {
            let port = match op >> 3 & 1 {
                0 => PORTS[input.below(PORTS.len() as u64) as usize],
                _ => input.u16(),
            };
            let size = [1, 2, 4, 1][usize::from(op >> 4 & 3)];
            let (a, b) = if op % 8 < 3 {
                let value = input.u32();
                (set.pio_write(port, size, value, || t), copy.pio_write(port, size, value, || t))
            } else {
                let (a, b) = (set.pio_read(port, size, || t), copy.pio_read(port, size, || t));
                if let PortEffect::Done(v) = a {
                    for lane in 0..u16::from(size) {
                        let p = port.wrapping_add(lane);
                        if !set.decodes_port(p) && !set.claims_access(port, size) {
                            assert_eq!(v >> (8 * lane) & 0xff, 0xff, "no device at {p:#x}: all ones");
                        }
                    }
                }
                (a, b)
            };
            assert_eq!(a, b, "the restored copy answered {size} bytes at {port:#x} differently");
            if !matches!(a, PortEffect::Unbacked) {
                set.update_lines(t);
                copy.update_lines(t);
                // What the VM does after every exit: fire what is due. The
                // cached deadline is only refreshed by a poll (or an access
                // to a timer), so compare after one.
                set.poll_timers(t);
                copy.poll_timers(t);
                assert_eq!(set.next_timer(), copy.next_timer(), "the next timer differs after op {op:#x}");
            }
        }
        6 => {
            set.poll_timers(t);
            copy.poll_timers(t);
            assert_eq!(set.next_timer(), copy.next_timer(), "the next timer differs after op {op:#x}");
        }
        _ => match op >> 3 & 3 {
            // Another vCPU's exit: its APIC page, MSRs and interrupt
            // acknowledge from now on.
            1 => {
                let i = input.below(set.vcpu_count() as u64) as usize;
                set.set_current(i);
                copy.set_current(i);
                assert_eq!(set.current(), i);
            }
            // The VM acting on what IPIs left a vCPU.
            2 => {
                let i = input.below(set.vcpu_count() as u64) as usize;
                assert_eq!(set.take_signals(i), copy.take_signals(i), "vCPU {i}'s signals");
            }
            _ => {
                if set.interrupt_pending() {
                    assert_eq!(set.acknowledge_interrupt(), copy.acknowledge_interrupt());
                }
            }
        },
    }
    assert_eq!(set.interrupt_pending(), copy.interrupt_pending(), "INTR differs after op {op:#x}");
    assert_eq!(set.has_signals(), copy.has_signals(), "signals differ after op {op:#x}");
    for i in 0..set.vcpu_count() {
        assert_eq!(set.interrupt_pending_for(i), copy.interrupt_pending_for(i), "vCPU {i} after op {op:#x}");
    }
}

/// Local APIC registers worth hitting more often than at random.
const APIC_REGS: [u64; 8] = [0x300, 0x310, 0x300, 0x310, 0xf0, 0xb0, 0xd0, 0xe0];

/// MSRs of the local APIC worth hitting: its base, the TSC deadline, and a
/// few x2APIC registers (refused: CPUID offers no x2APIC).
const APIC_MSRS: [u32; 5] = [lapic::IA32_APIC_BASE, lapic::IA32_TSC_DEADLINE, 0x802, 0x808, 0x838];

/// One access to a device register in guest-physical memory (the local
/// APIC's page where its base register puts it, the I/O APIC's, PCI
/// configuration space) or to an APIC MSR, on both sets alike.
fn device_registers(input: &mut Input<'_>, op: u8, t: u64, set: &mut DeviceSet, copy: &mut DeviceSet) {
    if op >> 3 & 1 == 1 {
        let msr = APIC_MSRS[input.below(APIC_MSRS.len() as u64) as usize];
        if op >> 4 & 1 == 1 {
            let value = match input.u8() % 4 {
                // A plausible base: relocated, enabled or not, BSP.
                0 => (u64::from(input.u16()) << 12) | (u64::from(input.u8()) & 0x9) << 8,
                _ => input.u64(),
            };
            assert_eq!(set.lapic_write_msr(msr, value, t), copy.lapic_write_msr(msr, value, t), "wrmsr {msr:#x}");
        } else {
            assert_eq!(set.lapic_read_msr(msr, t), copy.lapic_read_msr(msr, t), "rdmsr {msr:#x}");
        }
        return;
    }
    let gpa = match input.u8() % 6 {
        0 => 0xfee0_0000 + u64::from(input.u16() & 0xfff),
        // The registers IPIs and their delivery turn on: the ICR (high
        // half first: the low half's write sends), SVR, EOI, TPR, LDR, DFR.
        4 | 5 => 0xfee0_0000 + APIC_REGS[input.below(APIC_REGS.len() as u64) as usize],
        1 => 0xfec0_0000 + u64::from(input.u8() & 0x1f),
        2 => pci::ECAM_BASE + u64::from(input.u32() & 0x1f_ffff),
        _ => 0xfe00_0000 + u64::from(input.u32() & 0x1ff_ffff),
    };
    let size = [1, 2, 4, 8][usize::from(op >> 5 & 3)];
    if op >> 4 & 1 == 1 {
        let value = input.u64();
        assert_eq!(set.mmio_write(gpa, size, value, t), copy.mmio_write(gpa, size, value, t), "write at {gpa:#x}");
    } else {
        let (a, b) = (set.mmio_read(gpa, size, t), copy.mmio_read(gpa, size, t));
        assert_eq!(a, b, "the restored copy read {size} bytes at {gpa:#x} differently");
        assert_eq!(a.is_some(), set.claims_mmio(gpa), "a read answered where nothing is claimed, or not");
    }
}
