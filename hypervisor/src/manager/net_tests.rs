//! VM networks on the host: VMs with `net=<switch>` get a virtio-net NIC
//! on that switch (port = VM id); what one VM's NIC transmits reaches the
//! receive buffers of the VMs the switch sends it to, and no VM on another
//! switch; a VM that ends leaves its switch; a checkpoint keeps the switch
//! name and the NIC's MAC.
//!
//! The guests' drivers are played by the test: ring setup and buffers
//! written into the VMs' RAM through the same DMA view the devices use,
//! the transmit notification a real emulated MMIO write of the guest.

use alloc::vec;
use alloc::vec::Vec;
use vcpu::{MemAccess, VmExit};

use super::*;
use crate::console::{HostStatus, execute, parse};
use crate::devices::DeviceSet;
use crate::devices::virtio::feature::VERSION_1;
use crate::devices::virtio::mmio::{reg, status};
use crate::devices::virtio::net::{self, HEADER_LEN};
use crate::devices::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::devices::virtio::{self as virtio};
use crate::net::switch::{BROADCAST, Mac, mac_for};
use crate::testing::{Lines, MockBackend, elf_guest};

/// Entries of each queue the test drivers set up.
const N: u16 = 8;

fn manager() -> Manager<MockBackend> {
    // `mov [rax], ecx`: the guest's queue notification (the script puts
    // the register's address in rax).
    let images = vec![GuestImage { name: "tiny".into(), bytes: elf_guest(&[0x89, 0x08, 0x90, 0x90]) }];
    Manager::new(Ok(MockBackend::new(16384)), images)
}

fn run(line: &str, m: &mut Manager<MockBackend>) -> String {
    let host = HostStatus::default();
    let mut con = Lines::default();
    match parse(line) {
        Ok(Some(p)) => {
            execute(&p, m, &host, &mut con);
        }
        Ok(None) => {}
        Err(e) => crate::console::commands::report_parse_error(&e, &mut con),
    }
    con.text()
}

/// `f` on VM `id`'s devices with the DMA view of its RAM.
fn dma<R>(
    m: &mut Manager<MockBackend>,
    id: u32,
    f: impl FnOnce(&mut DeviceSet, &mut dyn virtio::GuestMemory) -> R,
) -> R {
    let Manager { backend, vms, host_mem, .. } = m;
    let vm = vms.iter_mut().find(|v| v.id == id).unwrap();
    vm.with_dma(backend.as_mut().unwrap(), host_mem, f).expect("a live VM")
}

/// Queue `q`'s descriptors in guest RAM; avail at +0x100, used at +0x200.
fn ring(q: usize) -> u64 {
    0x20_0000 + 0x1000 * q as u64
}

/// Buffer `i` of queue `q` (0x800 bytes each).
fn buf(q: usize, i: u16) -> u64 {
    0x21_0000 + 0x8000 * q as u64 + 0x800 * u64::from(i)
}

/// A guest's virtio-net driver, by hand, over VM `id`'s RAM.
struct Driver {
    id: u32,
    base: u64,
    avail: [u16; 2],
    used_seen: u16,
}

impl Driver {
    /// Finds the NIC's slot (device ID 1) and does Linux's handshake.
    fn up(m: &mut Manager<MockBackend>, id: u32) -> Driver {
        let base = dma(m, id, |d, _| {
            d.virtio_slots()
                .iter()
                .map(|s| u64::from(s.base))
                .find(|&b| d.mmio_read(b + reg::DEVICE_ID, 4, 0) == Some(u64::from(net::DEVICE_ID)))
        })
        .expect("the VM has a virtio-net device");
        let g = Driver { id, base, avail: [0; 2], used_seen: 0 };
        g.w(m, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let want = VERSION_1 | net::feature::OFFERED;
        g.w(m, reg::DRIVER_FEATURES_SEL, 0);
        g.w(m, reg::DRIVER_FEATURES, want as u32);
        g.w(m, reg::DRIVER_FEATURES_SEL, 1);
        g.w(m, reg::DRIVER_FEATURES, (want >> 32) as u32);
        g.w(m, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        for q in 0..2 {
            g.w(m, reg::QUEUE_SEL, q as u32);
            g.w(m, reg::QUEUE_NUM, N.into());
            g.w(m, reg::QUEUE_DESC_LOW, ring(q) as u32);
            g.w(m, reg::QUEUE_DRIVER_LOW, (ring(q) + 0x100) as u32);
            g.w(m, reg::QUEUE_DEVICE_LOW, (ring(q) + 0x200) as u32);
            g.w(m, reg::QUEUE_READY, 1);
        }
        g.w(m, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        g
    }

    fn w(&self, m: &mut Manager<MockBackend>, offset: u64, v: u32) {
        let gpa = self.base + offset;
        assert!(dma(m, self.id, |d, mem| d.virtio_write(gpa, 4, v.into(), mem)));
    }

    fn put(&self, m: &mut Manager<MockBackend>, gpa: u64, bytes: &[u8]) {
        dma(m, self.id, |_, mem| mem.write(gpa, bytes)).unwrap();
    }

    fn get(&self, m: &mut Manager<MockBackend>, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        dma(m, self.id, |_, mem| mem.read(gpa, &mut b)).unwrap();
        b
    }

    /// Descriptor `i` of queue `q`: (address, length, flags, next).
    fn desc(&self, m: &mut Manager<MockBackend>, q: usize, i: u16, (addr, len, flags, next): (u64, u32, u16, u16)) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.put(m, ring(q) + 16 * u64::from(i), &d);
    }

    fn publish(&mut self, m: &mut Manager<MockBackend>, q: usize, head: u16) {
        let slot = self.avail[q] % N;
        self.put(m, ring(q) + 0x100 + 4 + 2 * u64::from(slot), &head.to_le_bytes());
        self.avail[q] = self.avail[q].wrapping_add(1);
        let idx = self.avail[q];
        self.put(m, ring(q) + 0x100 + 2, &idx.to_le_bytes());
    }

    /// Post `n` receive buffers of 1600 bytes (header + a full frame).
    fn post_rx(&mut self, m: &mut Manager<MockBackend>, n: u16) {
        for _ in 0..n {
            let i = self.avail[0] % N;
            self.desc(m, 0, i, (buf(0, i), 1600, VIRTQ_DESC_F_WRITE, 0));
            self.publish(m, 0, i);
        }
        self.w(m, reg::QUEUE_NOTIFY, 0);
    }

    /// Put `frame` on the transmit ring behind a zero header, without the
    /// notification (the guest's own MMIO write makes it).
    fn queue_tx(&mut self, m: &mut Manager<MockBackend>, frame: &[u8]) {
        let head = (2 * self.avail[1]) % N;
        let (h, f) = (buf(1, head), buf(1, head + 1));
        self.put(m, h, &[0; HEADER_LEN]);
        self.put(m, f, frame);
        self.desc(m, 1, head, (h, HEADER_LEN as u32, VIRTQ_DESC_F_NEXT, head + 1));
        self.desc(m, 1, head + 1, (f, frame.len() as u32, 0, 0));
        self.publish(m, 1, head);
    }

    /// Frames in the receive buffers the device used since the last call.
    fn received(&mut self, m: &mut Manager<MockBackend>) -> Vec<Vec<u8>> {
        let idx = u16::from_le_bytes(self.get(m, ring(0) + 0x202, 2).try_into().unwrap());
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self.get(m, ring(0) + 0x204 + 8 * u64::from(self.used_seen % N), 8);
            let id = u32::from_le_bytes(e[..4].try_into().unwrap()) as u16;
            let len = u32::from_le_bytes(e[4..].try_into().unwrap()) as usize;
            let bytes = self.get(m, buf(0, id), len);
            assert_eq!(bytes[..HEADER_LEN], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "zero header, num_buffers 1");
            out.push(bytes[HEADER_LEN..].to_vec());
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

fn frame(dst: Mac, src: Mac, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The next vCPU created runs `mov [rax], ecx` with rax at `gpa`: a guest
/// write of its NIC's QueueNotify register, which the hypervisor emulates.
fn script_notify(m: &mut Manager<MockBackend>, gpa: u64, queue: u32) {
    m.backend.as_mut().unwrap().scripts.push_back(vec![Box::new(move |v| {
        v.gprs.rax = gpa;
        v.gprs.rcx = u64::from(queue);
        VmExit::NestedPageFault { gpa, access: MemAccess::Write, gva: Some(gpa) }
    })]);
}

/// Runs slices until VM `id` has run one (the scheduler's cursor may be
/// on another VM).
fn run_slice_of(m: &mut Manager<MockBackend>, id: u32) {
    let mut con = Lines::default();
    for _ in 0..m.vms.len() {
        let slices = |m: &Manager<MockBackend>| {
            m.get(id).and_then(|v| v.res.as_ref()).map_or(0, |r| r.vcpus.iter().map(|s| s.stats.slices).sum::<u64>())
        };
        let before = slices(m);
        assert!(m.run_slice(&mut con));
        if slices(m) != before || m.get(id).is_some_and(|v| v.res.is_none()) {
            return;
        }
    }
    panic!("vm {id} did not run");
}

#[test]
fn frames_cross_vms_on_one_switch_and_no_other() {
    let mut m = manager();
    // vm 1 notifies its transmit queue from guest code; 2 and 3 idle.
    script_notify(&mut m, 0xd000_2000 + reg::QUEUE_NOTIFY, net::TX_QUEUE as u32);
    for (line, id) in
        [("vm run tiny mem=4 net=sw0", 1), ("vm run tiny mem=4 net=sw0", 2), ("vm run tiny mem=4 net=sw1", 3)]
    {
        let out = run(line, &mut m);
        assert!(out.starts_with(&format!("vm {id} started")), "{out}");
    }
    assert_eq!((m.switch_of(1), m.switch_of(2), m.switch_of(3)), (Some("sw0"), Some("sw0"), Some("sw1")));
    assert_eq!(m.switches["sw0"].ports().collect::<Vec<_>>(), [1, 2]);
    let mut drivers: Vec<Driver> = (1..=3).map(|id| Driver::up(&mut m, id)).collect();
    assert_eq!(drivers[0].base, 0xd000_2000, "the NIC's slot follows the console's and the balloon's");
    for d in &mut drivers[1..] {
        d.post_rx(&mut m, 4);
    }
    // A broadcast from vm 1, then a frame to vm 2's MAC.
    let bcast = frame(BROADCAST, mac_for(1, 0), b"who has 10.0.0.2");
    let unicast = frame(mac_for(2, 0), mac_for(1, 0), &[0x5a; 100]);
    drivers[0].queue_tx(&mut m, &bcast);
    drivers[0].queue_tx(&mut m, &unicast);
    run_slice_of(&mut m, 1);
    let vm1 = m.get(1).unwrap();
    assert_eq!(vm1.stats.mmio, 1, "the notification was an emulated guest write");
    assert!(!vm1.devices.net_frames_waiting(), "the manager took the frames");
    assert_eq!(vm1.devices.virtio_net().unwrap().counters().tx_frames, 2);
    assert_eq!(drivers[1].received(&mut m), [bcast.clone(), unicast.clone()]);
    // The used buffers raised the device's interrupt (2.7.10): its line
    // follows through the I/O APIC once the guest has routed it.
    let isr = dma(&mut m, 2, |d, _| d.mmio_read(0xd000_2000 + reg::INTERRUPT_STATUS, 4, 0));
    assert_eq!(isr, Some(u64::from(crate::devices::virtio::mmio::interrupt::USED_BUFFER)));
    assert_eq!(m.get(2).unwrap().devices.virtio_net().unwrap().counters().rx_frames, 2);
    // vm 3 is on another switch: not even the broadcast.
    assert_eq!(drivers[2].received(&mut m), Vec::<Vec<u8>>::new());
    let c3 = *m.get(3).unwrap().devices.virtio_net().unwrap().counters();
    assert_eq!((c3.rx_frames, c3.rx_dropped_not_ready), (0, 0));
    // The switch learned vm 1's MAC on port 1.
    assert_eq!(m.switches["sw0"].lookup(&mac_for(1, 0), 0), Some(1));
    // vm stats shows the NIC, text and JSON.
    let out = run("vm stats 2", &mut m);
    assert!(out.contains("nic 02:00:00:00:02:00 on switch sw0: rx 2 frames (144 bytes), tx 0 frames"), "{out}");
    let j: serde_json::Value = serde_json::from_str(&run("vm stats 2 --json", &mut m)).unwrap();
    assert_eq!(j["nic"]["mac"], "02:00:00:00:02:00");
    assert_eq!(j["nic"]["switch"], "sw0");
    assert_eq!(j["nic"]["counters"]["rx_frames"], 2);
    assert!(run("vm stats 3", &mut m).contains("on switch sw1: rx 0 frames"));
    assert!(!run("vm run tiny mem=4", &mut m).is_empty());
    assert!(!run("vm stats 4", &mut m).contains("nic"), "no net=, no NIC");
    assert_eq!(m.switch_of(4), None);
}

#[test]
fn an_ended_vm_leaves_its_switch_and_a_reset_keeps_it_on() {
    let mut m = manager();
    let a = m.run_vm_with_nic("tiny", 4, &[], "", None, Some("sw0")).unwrap();
    let b = m.run_vm_with_nic("tiny", 4, &[], "", None, Some("sw0")).unwrap();
    // A frame from b teaches the switch b's MAC.
    let mut db = Driver::up(&mut m, b);
    db.queue_tx(&mut m, &frame(BROADCAST, mac_for(b, 0), b"hello"));
    db.w(&mut m, reg::QUEUE_NOTIFY, net::TX_QUEUE as u32);
    let i = m.vms.iter().position(|v| v.id == b).unwrap();
    m.forward_frames(i);
    assert_eq!(m.switches["sw0"].lookup(&mac_for(b, 0), 0), Some(b as PortId));
    // A reset: same id, same switch, the old guest's MACs forgotten.
    let mut con = Lines::default();
    m.reboot_vm(i, &mut con);
    assert!(con.text().contains(&format!("vm {b} (tiny) restarted")), "{}", con.text());
    assert_eq!(m.switch_of(b), Some("sw0"));
    assert_eq!(m.switches["sw0"].lookup(&mac_for(b, 0), 0), None);
    assert_eq!(m.get(b).unwrap().devices.virtio_net().map(|n| n.mac()), Some(mac_for(b, 0)));
    // Stopped: off the switch, and `vm stats` says so.
    m.stop(a, &mut con).unwrap();
    assert_eq!(m.switch_of(a), None);
    assert_eq!(m.switches["sw0"].ports().collect::<Vec<_>>(), [b as PortId]);
    assert!(run(&format!("vm stats {a}"), &mut m).contains("on switch (none: detached)"));
    // A VM whose guest ends by itself leaves too.
    m.backend.as_mut().unwrap().scripts.push_back(vec![Box::new(|_| VmExit::Shutdown { report: "gone".into() })]);
    let c = m.run_vm_with_nic("tiny", 4, &[], "", None, Some("sw0")).unwrap();
    assert_eq!(m.switch_of(c), Some("sw0"));
    run_slice_of(&mut m, c);
    assert!(m.get(c).unwrap().state.ended());
    assert_eq!(m.switch_of(c), None);
}

#[test]
fn a_vm_id_past_the_ports_gets_no_nic() {
    let mut m = manager();
    m.next_id = u32::from(PortId::MAX) + 1;
    assert_eq!(m.run_vm_with_nic("tiny", 4, &[], "", None, Some("sw0")), Err(Error::NoSwitchPort(65536)));
    assert!(m.vms.is_empty() && m.switches.is_empty());
    // Without a NIC the id is fine.
    assert!(m.run_vm("tiny", 4, "").is_ok());
}

#[test]
fn a_checkpoint_keeps_the_switch_and_the_mac() {
    let mut m = manager();
    let a = m.run_vm_with_nic("tiny", 4, &[], "", None, Some("lan")).unwrap();
    let b = m.run_vm_with_nic("tiny", 4, &[], "", None, Some("lan")).unwrap();
    let (stream, _) = m.save_vm(a, Vec::new()).unwrap();
    // vm a still runs with that MAC: the copy is refused, nothing left.
    let before = m.vms.len();
    assert_eq!(m.restore_vm(stream.as_slice()), Err(Error::MacInUse { mac: mac_for(a, 0), id: a }));
    assert_eq!(m.vms.len(), before);
    let mut con = Lines::default();
    m.stop(a, &mut con).unwrap();
    let r = m.restore_vm(stream.as_slice()).unwrap();
    assert_eq!(m.switch_of(r), Some("lan"));
    assert_eq!(m.get(r).unwrap().devices.virtio_net().unwrap().mac(), mac_for(a, 0), "the MAC its guest saw");
    assert_eq!(m.switches["lan"].ports().collect::<Vec<_>>(), [b as PortId, r as PortId]);
    // Frames from the restored VM reach b.
    let mut dr = Driver::up(&mut m, r);
    let mut db = Driver::up(&mut m, b);
    db.post_rx(&mut m, 2);
    let f = frame(mac_for(b, 0), mac_for(a, 0), b"back");
    dr.queue_tx(&mut m, &f);
    dr.w(&mut m, reg::QUEUE_NOTIFY, net::TX_QUEUE as u32);
    let i = m.vms.iter().position(|v| v.id == r).unwrap();
    m.forward_frames(i);
    assert_eq!(db.received(&mut m), [f]);
    // A VM without a NIC saves without a switch, restores without one.
    let c = m.run_vm("tiny", 4, "").unwrap();
    let (plain, _) = m.save_vm(c, Vec::new()).unwrap();
    let rc = m.restore_vm(plain.as_slice()).unwrap();
    assert!(m.get(rc).unwrap().devices.virtio_net().is_none());
    assert_eq!(m.switch_of(rc), None);
}

#[test]
fn the_host_nic_as_uplink_carries_a_vms_frames_both_ways_and_a_restored_vm_announces_itself() {
    use crate::hostnet::Nic;
    use crate::hostnet::link::{End, hosts};
    use crate::net::uplink::{HOST, UPLINK, host_tag, tagged_mac};
    let mut m = manager();
    let mut con = Lines::default();
    // No NIC: refused, nothing made.
    m.uplink_command::<End>(Some("lan"), false, None, &mut con);
    assert_eq!(con.text(), "error: net uplink: no network device (no 82540EM on the PCI bus, or it failed to start)");
    assert!(m.switches.is_empty() && m.uplink.switch.is_none());
    // Host A's NIC (02:00:00:00:00:01) and a station beyond the wire.
    let (mut host, mut peer) = hosts();
    m.uplink_command(Some("lan"), true, Some(&mut host), &mut con);
    assert!(con.text().contains(r#""uplink":"lan""#), "{}", con.text());
    assert_eq!(m.switches["lan"].ports().collect::<Vec<_>>(), [HOST, UPLINK]);
    assert_eq!(host.uplink(), Some("lan"));
    // A VM on the uplinked switch gets the host's tag; one elsewhere not.
    let a = m.run_vm_with_nic("tiny", 4, &[], "", None, Some("lan")).unwrap();
    let b = m.run_vm_with_nic("tiny", 4, &[], "", None, Some("sw0")).unwrap();
    let mac_a = tagged_mac(host_tag(&host.nic().mac()), a, 0);
    assert_eq!(mac_a[0], 0x06);
    assert_eq!(m.get(a).unwrap().devices.virtio_net().unwrap().mac(), mac_a);
    assert_eq!(m.get(b).unwrap().devices.virtio_net().unwrap().mac(), mac_for(b, 0));

    // Out: a broadcast from VM a reaches the wire at the next round.
    let mut da = Driver::up(&mut m, a);
    da.post_rx(&mut m, 4);
    let hello = frame(BROADCAST, mac_a, b"who has 10.0.0.2");
    da.queue_tx(&mut m, &hello);
    da.w(&mut m, reg::QUEUE_NOTIFY, net::TX_QUEUE as u32);
    let i = m.vms.iter().position(|v| v.id == a).unwrap();
    m.forward_frames(i);
    m.uplink_round(&mut host);
    let mut wire = vec![0u8; 2048];
    let n = peer.nic().recv(&mut wire).expect("the broadcast on the wire");
    assert_eq!(wire[..n], hello[..]);
    // Posing as the peer (to have the host's frames for it) is dropped:
    // on the LAN's switch a VM sends only from its own MAC.
    da.queue_tx(&mut m, &frame(BROADCAST, peer.nic().mac(), b"i am the peer"));
    da.w(&mut m, reg::QUEUE_NOTIFY, net::TX_QUEUE as u32);
    m.forward_frames(i);
    m.uplink_round(&mut host);
    assert!(peer.nic().recv(&mut wire).is_none(), "nothing on the wire");
    assert_eq!(m.uplink.spoofed, 1);
    assert_eq!(host.status().uplink.map(|(_, b)| b.spoofed), Some(1), "what `net` shows");
    assert_eq!(m.switches["lan"].lookup(&peer.nic().mac(), 0), None);
    // In: the station answers the VM's MAC; the VM gets it, the stack not.
    let reply = frame(mac_a, peer.nic().mac(), &[0x5a; 64]);
    peer.nic().send(&reply);
    m.uplink_round(&mut host);
    assert_eq!(da.received(&mut m), [reply]);
    let (_, bridge) = host.status().uplink.unwrap();
    assert_eq!((bridge.to_stack, bridge.dropped), (1, 0), "only the VM's broadcast reached the host's stack");

    // Restored (as a migration's destination does): the VM's port
    // announces its MAC, out of the uplink too.
    let (stream, _) = m.save_vm(a, Vec::new()).unwrap();
    m.stop(a, &mut con).unwrap();
    let r = m.restore_vm(stream.as_slice()).unwrap();
    assert_eq!(m.switches["lan"].lookup(&mac_a, 0), Some(r as PortId));
    m.uplink_round(&mut host);
    let n = peer.nic().recv(&mut wire).expect("the announcement on the wire");
    assert_eq!(wire[..n], crate::net::switch::announce(mac_a)[..]);

    // Off: the switch loses both host ports, the NIC is the stack's.
    con.0.clear();
    m.uplink_command(None, false, Some(&mut host), &mut con);
    assert_eq!(con.text(), "net: the NIC is the host's alone");
    assert_eq!(m.switches["lan"].ports().collect::<Vec<_>>(), [r as PortId]);
    assert_eq!(host.uplink(), None);
}
