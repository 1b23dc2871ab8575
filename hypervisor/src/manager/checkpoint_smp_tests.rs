//! Checkpoints of VMs with several vCPUs: every vCPU's registers,
//! scheduling state, pending IPIs and local APIC come back as they were
//! (paused and live saves, on another host), and the restored VM goes on
//! as the original does; streams whose vCPU records or local APICs do not
//! fit are refused with one line and leave nothing behind.

use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use vcpu::{Event, GuestState, Vcpu};

use super::*;
use crate::devices::Signals;
use crate::devices::lapic::LapicState;
use crate::devices::persist::Persist;
use crate::testing::{Lines, MockBackend, elf_guest};
use crate::vm::VcpuState;

/// The stream's fixed prologue (`migrate`'s record framing).
const PROLOGUE_LEN: usize = 20;
const ICR_LOW: u64 = 0xfee0_0300;
const ICR_HIGH: u64 = 0xfee0_0310;
const SVR: u64 = 0xfee0_00f0;

fn manager() -> Manager<MockBackend> {
    let images = vec![GuestImage { name: "tiny".into(), bytes: elf_guest(&[0x90; 64]) }];
    Manager::new(Ok(MockBackend::new(16384)), images)
}

fn vm_mut(m: &mut Manager<MockBackend>, id: u32) -> &mut Vm<MockBackend> {
    m.vms.iter_mut().find(|v| v.id == id).unwrap()
}

/// vCPU `from` sends `low` (the ICR's low word) to APIC `dest`.
fn ipi(vm: &mut Vm<MockBackend>, from: usize, dest: u8, low: u32) {
    vm.devices.set_current(from);
    assert!(vm.devices.mmio_write(ICR_HIGH, 4, u64::from(dest) << 24, 0));
    assert!(vm.devices.mmio_write(ICR_LOW, 4, u64::from(low), 0));
}

/// An `n`-vCPU VM (2 or 4) whose vCPUs differ: vCPU 0 runnable; vCPU 1
/// halted with interrupts on, vector 0x41 in service and 0x52 requested,
/// its timer armed (periodic, far off), a logical ID in cluster mode, its
/// TSC ahead of the others; vCPU 2 waiting for a SIPI with an INIT and a
/// SIPI (vector 0x12) not yet acted on; vCPU 3 halted with interrupts off
/// and an NMI for it pending. Every vCPU's RBX and RIP are its own.
fn varied_vm(m: &mut Manager<MockBackend>, n: u32) -> u32 {
    let id = m.run_vm_smp("tiny", 4, &[], "", None, None, n).unwrap();
    let vm = vm_mut(m, id);
    for i in 0..n as usize {
        // What each vCPU's start-up code does first.
        vm.devices.set_current(i);
        assert!(vm.devices.mmio_write(SVR, 4, 0x1ff, 0));
    }
    ipi(vm, 0, 1, 0x41);
    vm.devices.set_current(1);
    assert_eq!(vm.devices.acknowledge_interrupt(), 0x41);
    ipi(vm, 0, 1, 0x52);
    vm.devices.set_current(1);
    for (reg, value) in
        [(0x320, 0x2_0030), (0x3e0, 0b1010), (0x380, 0xffff_ffff), (0xd0, 0x2100_0000), (0xe0, 0x0fff_ffff)]
    {
        assert!(vm.devices.mmio_write(0xfee0_0000 + reg, 4, value, 0));
    }
    if n == 4 {
        ipi(vm, 0, 2, 0x4500);
        ipi(vm, 0, 2, 0x0612);
        ipi(vm, 0, 3, 0x0400);
    }
    vm.devices.set_current(0);
    let res = vm.res.as_mut().unwrap();
    for (i, slot) in res.vcpus.iter_mut().enumerate() {
        let mut s = slot.vcpu.state();
        s.gprs.rbx = 0xb0 + i as u64;
        s.rip += i as u64;
        if i == 1 {
            s.tsc_offset = s.tsc_offset.wrapping_add(777);
            // Its interrupts on, as the guest's AP code left them.
            s.rflags |= vcpu::state::bits::RFLAGS_IF;
        }
        slot.vcpu.set_state(&s).unwrap();
    }
    res.vcpus[1].state = VcpuState::Halted;
    if n == 4 {
        res.vcpus[3].state = VcpuState::Halted;
        res.vcpus[3].halted_irq_off = true;
    }
    id
}

/// Everything about each vCPU a restore must bring back: its registers
/// (the TSC offset relative to vCPU 0's: a restored VM's TSC goes on from
/// the save), scheduling state, pending IPIs and local APIC.
#[derive(Debug, PartialEq)]
struct VcpuView {
    state: GuestState,
    sched: VcpuState,
    irq_off: bool,
    signals: Signals,
    lapic: LapicState,
}

fn view(m: &Manager<MockBackend>, id: u32) -> Vec<VcpuView> {
    let vm = m.get(id).unwrap();
    let res = vm.res.as_ref().unwrap();
    let tsc0 = res.vcpus[0].vcpu.state().tsc_offset;
    res.vcpus
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut state = s.vcpu.state();
            state.tsc_offset = state.tsc_offset.wrapping_sub(tsc0);
            VcpuView {
                state,
                sched: s.state,
                irq_off: s.halted_irq_off,
                signals: vm.devices.signals(i),
                lapic: vm.devices.lapic(i).unwrap().save(),
            }
        })
        .collect()
}

/// What each vCPU had delivered into it and where it is, after `slices`
/// time slices of VM `id` (the only VM of `m`).
fn run_on(m: &mut Manager<MockBackend>, id: u32, slices: usize) -> Vec<(Vec<Event>, VcpuState, u64, u64)> {
    let mut con = Lines::default();
    for _ in 0..slices {
        m.run_slice(&mut con);
    }
    let res = m.get(id).unwrap().res.as_ref().unwrap();
    res.vcpus.iter().map(|s| (s.vcpu.delivered.clone(), s.state, s.vcpu.state.cs.base, s.vcpu.state.rip)).collect()
}

#[test]
fn vms_of_2_and_4_vcpus_restore_every_vcpu_as_it_was_and_go_on_alike() {
    for n in [2, 4] {
        let mut m = manager();
        let id = varied_vm(&mut m, n);
        let before = view(&m, id);
        // The 2-vCPU VM live (its memory under a snapshot), the other
        // paused.
        let stream = if n == 2 {
            let mut job = m.begin_save(id, true).unwrap();
            let mut out = Vec::new();
            while !m.save_step(&mut job, 64, &mut out).unwrap() {}
            m.finish_save(job, &mut out).unwrap();
            out
        } else {
            m.save_vm(id, Vec::new()).unwrap().0
        };
        let verified = migrate::verify(&stream).unwrap();
        assert_eq!(verified.header.vcpus, n);
        let lapics: Vec<_> = verified.header.devices.iter().filter(|d| d.name.starts_with("lapic")).collect();
        assert_eq!(lapics.len(), n as usize, "{lapics:?}");
        // On another host (its clock elsewhere): the same vCPUs.
        let mut other = manager();
        other.backend.as_mut().unwrap().clock.set(1 << 40);
        let restored = other.restore_vm(stream.as_slice()).unwrap();
        let after = view(&other, restored);
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            assert_eq!(b, a, "{n} vCPUs: vCPU {i}");
        }
        assert_eq!(after.len(), n as usize);
        assert_eq!(after[1].sched, VcpuState::Halted);
        assert_eq!(after[1].lapic.isr[1] >> 1 & 1, 1, "0x41 in service");
        assert_eq!(after[1].lapic.irr[1] >> 0x12 & 1, 1, "0x52 requested");
        if n == 4 {
            assert_eq!(after[2].sched, VcpuState::WaitForSipi);
            assert_eq!(after[2].signals, Signals { nmi: false, init: true, sipi: Some(0x12) });
            assert_eq!((after[3].sched, after[3].irq_off, after[3].signals.nmi), (VcpuState::Halted, true, true));
        }
        // Both go on alike: vCPU 1 wakes for 0x52, vCPU 2 starts at its
        // SIPI's vector, vCPU 3 takes its NMI.
        let original = run_on(&mut m, id, 8);
        let copy = run_on(&mut other, restored, 8);
        assert_eq!(original, copy, "{n} vCPUs");
        assert!(copy[1].0.contains(&Event::Interrupt { vector: 0x52 }), "{copy:?}");
        if n == 4 {
            assert_eq!(copy[2].2, 0x12000, "started at the SIPI's vector");
            assert!(copy[3].0.contains(&Event::Nmi), "{copy:?}");
        }
    }
}

#[test]
fn a_restored_paused_vm_runs_with_each_vcpu_where_its_pause_parked_it() {
    let mut m = manager();
    let id = varied_vm(&mut m, 4);
    m.set_paused(id, true).unwrap();
    let (stream, _) = m.save_vm(id, Vec::new()).unwrap();
    let restored = m.restore_vm(stream.as_slice()).unwrap();
    let states: Vec<_> = m.get(restored).unwrap().res.as_ref().unwrap().vcpus.iter().map(|s| s.state).collect();
    assert_eq!(states, [VcpuState::Runnable, VcpuState::Halted, VcpuState::WaitForSipi, VcpuState::Halted]);
    assert!(!m.get(restored).unwrap().paused);
}

/// A stream's records (after the 20-byte prologue, before the end
/// record) as (kind, version, payload), and the stream forged back from
/// them with fresh sequence numbers and checksums: what a hostile or
/// damaged writer could produce (`migrate::Writer` refuses to).
fn unforge(stream: &[u8]) -> Vec<(u8, u16, Vec<u8>)> {
    let mut at = PROLOGUE_LEN;
    let mut recs = Vec::new();
    loop {
        let f = &stream[at..at + 16];
        let len = u32::from_le_bytes(f[8..12].try_into().unwrap()) as usize;
        if f[0] == 0x0f {
            return recs;
        }
        recs.push((f[0], u16::from_le_bytes([f[2], f[3]]), stream[at + 16..at + 16 + len].to_vec()));
        at += 16 + len + 4;
    }
}

fn forge(stream: &[u8], recs: &[(u8, u16, Vec<u8>)]) -> Vec<u8> {
    use mm::swap::format::crc32c;
    let mut out = stream[..PROLOGUE_LEN].to_vec();
    let mut sums = Vec::new();
    let frame = |out: &mut Vec<u8>, sums: &mut Vec<u8>, kind: u8, version: u16, seq: usize, payload: &[u8]| {
        let mut f = vec![kind, 0];
        f.extend_from_slice(&version.to_le_bytes());
        f.extend_from_slice(&(seq as u32).to_le_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let sum = crc32c(&f);
        f.extend_from_slice(&sum.to_le_bytes());
        let mut whole = f.clone();
        whole.extend_from_slice(payload);
        let sum = crc32c(&whole).to_le_bytes();
        sums.extend_from_slice(&sum);
        out.extend_from_slice(&whole);
        out.extend_from_slice(&sum);
    };
    for (seq, (kind, version, payload)) in recs.iter().enumerate() {
        frame(&mut out, &mut sums, *kind, *version, seq, payload);
    }
    let digest = crc32c(&sums);
    let mut end = (recs.len() as u32).to_le_bytes().to_vec();
    end.extend_from_slice(&digest.to_le_bytes());
    end.extend_from_slice(&(out.len() as u64).to_le_bytes());
    frame(&mut out, &mut sums, 0x0f, 1, recs.len(), &end);
    out
}

#[test]
fn streams_whose_vcpus_or_local_apics_do_not_fit_are_refused_with_one_line() {
    let mut m = manager();
    let id = varied_vm(&mut m, 2);
    let (stream, _) = m.save_vm(id, Vec::new()).unwrap();
    let recs = unforge(&stream);
    assert_eq!(migrate::verify(&forge(&stream, &recs)).map(|_| ()), Ok(()), "the forger is right");
    let frames = m.backend.as_ref().unwrap().mem.frames_in_use();
    let (vms, created) = (m.vms.len(), m.backend.as_ref().unwrap().created);
    let mut check = |bytes: &[u8], want: &str| {
        let e = m.restore_vm(bytes).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} does not say {want:?}");
        assert!(!e.contains('\n'), "{e:?}");
        let b = m.backend.as_ref().unwrap();
        assert_eq!(b.mem.frames_in_use(), frames, "{want}: frames leaked");
        assert_eq!(b.created - created, b.destroyed, "{want}: vCPUs leaked");
        assert_eq!(m.vms.len(), vms);
    };
    let vcpu1 = recs.iter().position(|r| r.0 == migrate::Kind::Vcpu.code() && r.2[..4] == 1u32.to_le_bytes()).unwrap();
    // vCPU 1's record missing.
    let mut r = recs.clone();
    r.remove(vcpu1);
    check(&forge(&stream, &r), "vCPU 1");
    // vCPU 1's record as vCPU 2 of a VM of two.
    let mut r = recs.clone();
    r[vcpu1].2[..4].copy_from_slice(&2u32.to_le_bytes());
    check(&forge(&stream, &r), "vCPU");
    // A header of one vCPU, the machine record and the APICs of two: the
    // stream is whole but does not describe one VM.
    let mut reader = migrate::Reader::open(stream.as_slice()).unwrap();
    let header = migrate::Header { vcpus: 1, ..reader.header().clone() };
    let mut one = super::checkpoint_tests::AsVersion(migrate::Writer::begin(Vec::new(), &header).unwrap(), 4);
    struct DropVcpu1<'a>(&'a mut super::checkpoint_tests::AsVersion);
    impl migrate::Apply for DropVcpu1<'_> {
        type Error = migrate::Error;
        fn vcpu(&mut self, index: u32, state: GuestState) -> Result<(), migrate::Error> {
            if index == 0 { self.0.vcpu(index, state) } else { Ok(()) }
        }
        fn device(&mut self, name: &str, version: u16, bytes: &[u8]) -> Result<(), migrate::Error> {
            self.0.0.device(name, version, bytes)
        }
        fn large_run(&mut self, gfn: u64, pages: u32) -> Result<(), migrate::Error> {
            self.0.large_run(gfn, pages)
        }
        fn pages(&mut self, gfn: u64, data: &[u8]) -> Result<(), migrate::Error> {
            self.0.pages(gfn, data)
        }
        fn zero(&mut self, gfn: u64, pages: u32) -> Result<(), migrate::Error> {
            self.0.zero(gfn, pages)
        }
        fn shared(&mut self, gfn: u64, id: u32, data: &[u8; 4096]) -> Result<(), migrate::Error> {
            self.0.shared(gfn, id, data)
        }
        fn shared_ref(&mut self, gfn: u64, id: u32) -> Result<(), migrate::Error> {
            self.0.shared_ref(gfn, id)
        }
        fn poisoned(&mut self, gfn: u64) -> Result<(), migrate::Error> {
            self.0.poisoned(gfn)
        }
        fn pending(&mut self, gfn: u64, pages: u32) -> Result<(), migrate::Error> {
            self.0.pending(gfn, pages)
        }
        fn resume(&mut self) -> Result<(), migrate::Error> {
            self.0.resume()
        }
    }
    reader.apply(&mut DropVcpu1(&mut one)).unwrap();
    let (short, _) = one.0.finish().unwrap();
    check(&short, "the checkpoint has 1 vCPU records but its machine record describes 2 vCPUs");
    // A LAPIC record that does not decode, one that decodes as another
    // vCPU's APIC, and one with a reserved bit set.
    let lapic1 = recs.iter().position(|r| r.0 == migrate::Kind::Device.code() && r.2[1..7] == *b"lapic1").unwrap();
    let lapic0 = recs.iter().position(|r| r.0 == migrate::Kind::Device.code() && r.2[1..7] == *b"lapic0").unwrap();
    let mut r = recs.clone();
    r[lapic1].2.truncate(12);
    check(&forge(&stream, &r), "Device \"lapic1\" state does not decode");
    let mut r = recs.clone();
    r[lapic1].2 = [&recs[lapic1].2[..9], &recs[lapic0].2[9..]].concat();
    check(&forge(&stream, &r), "Device \"lapic1\" state refused: the APIC ID is not its vCPU's index");
    let mut state: LapicState = postcard::from_bytes(&recs[lapic1].2[9..]).unwrap();
    state.svr |= 1 << 12;
    let mut r = recs.clone();
    r[lapic1].2 = [&recs[lapic1].2[..9], &postcard::to_allocvec(&state).unwrap()[..]].concat();
    check(&forge(&stream, &r), "Device \"lapic1\" state refused: SVR or ESR has reserved bits set");
    // The original still restores.
    assert!(m.restore_vm(stream.as_slice()).is_ok());
}
