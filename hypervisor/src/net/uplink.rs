//! The host's NIC as the uplink of one VM switch, with the host's own
//! TCP/IP stack as a port of that switch beside it (`net uplink <switch>`).
//!
//! Without an uplink the NIC is the host stack's alone and the VMs' switches
//! reach nothing outside the host. With one, every frame goes through the
//! switch, so the host's stack, its VMs and whatever is beyond the wire
//! reach each other as stations of one LAN:
//!
//! ```text
//!     wire ── NIC (promiscuous) ── port UPLINK ─┐
//!                                               ├─ switch ── VM ports (their ids)
//!     host TCP/IP (smoltcp) ──── port HOST ─────┘
//! ```
//!
//! - The NIC runs promiscuous (82540EM RCTL.UPE/MPE, 13.4.22): frames for a
//!   VM's MAC are not the NIC's own address, and its filter would drop them.
//! - The host stack no longer reads the NIC: it gets the frames the switch
//!   sends to [`HOST`] and hands what it sends to the switch, so it reaches
//!   the host's own VMs as well as other hosts.
//! - A VM on this switch gets the host's tag in its MAC ([`tagged_mac`]),
//!   so two hosts' VM 1 do not collide on the LAN.
//! - A VM on this switch sends only from its own MAC
//!   (`Manager::forward_frames`): posing as the host or the peer host, it
//!   could otherwise have the host's traffic (a migration's memory) sent
//!   to it.
//! - A VM that arrives by migration keeps its MAC; its new switch sends
//!   [`super::switch::announce`] from its port, so this switch and the ones
//!   beyond the wire learn where it went.
//!
//! The exchange is bounded per round (`WIRE_BATCH`, `MAX_QUEUED`): a flood
//! on the wire costs dropped frames, never the main loop.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::switch::{Mac, PortId, Switch, mac_for};

/// The switch port of the host's NIC (VM ports are VM ids, below these).
pub const UPLINK: PortId = PortId::MAX;
/// The switch port of the host's own TCP/IP stack.
pub const HOST: PortId = PortId::MAX - 1;
/// Frames waiting for the wire or for the host's stack at most; past it a
/// frame is dropped (and counted), as by a full NIC ring. TCP resends.
pub const MAX_QUEUED: usize = 256;
/// Frames taken from the wire per round, and from the host's stack.
pub const WIRE_BATCH: usize = 128;

/// Whether `port` is one of the host's (the NIC or the stack), not a VM's.
pub fn is_host_side(port: PortId) -> bool {
    port == UPLINK || port == HOST
}

/// The host's tag for its VMs' MACs: the low six bits of its NIC's MAC
/// (hosts of one LAN usually differ there; sequentially assigned MACs do).
pub fn host_tag(nic_mac: &Mac) -> u8 {
    nic_mac[5] & 0x3f
}

/// [`mac_for`] with the host's `tag` in the upper six bits of the first
/// octet: still locally administered unicast (bits 1 and 0 are 1 and 0).
pub fn tagged_mac(tag: u8, vm_id: u32, nic: u8) -> Mac {
    let mut m = mac_for(vm_id, nic);
    m[0] |= (tag & 0x3f) << 2;
    m
}

/// The host's side of the uplink: the NIC's frames and the host stack's.
pub trait UplinkPort {
    /// The next frame the NIC received.
    fn take_wire(&mut self) -> Option<Vec<u8>>;
    /// The next frame the host's stack sent.
    fn take_host(&mut self) -> Option<Vec<u8>>;
    /// Sends `frame` on the wire (a full ring drops it, counted by the NIC).
    fn to_wire(&mut self, frame: &[u8]);
    /// Gives `frame` to the host's stack (dropped past [`MAX_QUEUED`]).
    fn to_host(&mut self, frame: Vec<u8>);
    /// Hands the NIC what was queued this round.
    fn flush(&mut self) {}
    /// The switch side's counts so far, for `net`: frames VMs sent from a
    /// MAC not their own, and frames for the host side dropped for a full
    /// queue (both dropped by the manager, which the NIC never sees).
    fn switch_counters(&mut self, _spoofed: u64, _dropped: u64) {}
}

/// Frames for VM ports, by port, each batch delivered at once.
pub type ToVms = BTreeMap<PortId, Vec<Vec<u8>>>;

/// Sends `frame`, which came in on `from`, through `sw`: to the host side
/// through `port`, to VMs into `to_vms`.
pub fn switch_frame(
    sw: &mut Switch,
    from: PortId,
    frame: Vec<u8>,
    now: u64,
    port: &mut impl UplinkPort,
    to_vms: &mut ToVms,
) {
    for p in sw.forward(from, &frame, now) {
        match p {
            UPLINK => port.to_wire(&frame),
            HOST => port.to_host(frame.clone()),
            vm => to_vms.entry(vm).or_default().push(frame.clone()),
        }
    }
}

/// One round of the uplink: `pending` (frames the VMs sent to the host
/// side, already switched) out, then up to [`WIRE_BATCH`] frames from the
/// wire and as many from the host's stack through the switch. Returns what
/// goes to VM ports.
pub fn exchange(sw: &mut Switch, port: &mut impl UplinkPort, pending: &mut Vec<(PortId, Vec<u8>)>, now: u64) -> ToVms {
    for (to, frame) in pending.drain(..) {
        match to {
            UPLINK => port.to_wire(&frame),
            _ => port.to_host(frame),
        }
    }
    let mut to_vms = ToVms::new();
    for _ in 0..WIRE_BATCH {
        let Some(f) = port.take_wire() else { break };
        switch_frame(sw, UPLINK, f, now, port, &mut to_vms);
    }
    for _ in 0..WIRE_BATCH {
        let Some(f) = port.take_host() else { break };
        switch_frame(sw, HOST, f, now, port, &mut to_vms);
    }
    port.flush();
    to_vms
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::switch::{BROADCAST, announce, mac_for};
    use alloc::collections::VecDeque;

    #[derive(Default)]
    struct Port {
        wire_in: VecDeque<Vec<u8>>,
        host_in: VecDeque<Vec<u8>>,
        wire_out: Vec<Vec<u8>>,
        host_out: Vec<Vec<u8>>,
    }

    impl UplinkPort for Port {
        fn take_wire(&mut self) -> Option<Vec<u8>> {
            self.wire_in.pop_front()
        }
        fn take_host(&mut self) -> Option<Vec<u8>> {
            self.host_in.pop_front()
        }
        fn to_wire(&mut self, frame: &[u8]) {
            self.wire_out.push(frame.to_vec());
        }
        fn to_host(&mut self, frame: Vec<u8>) {
            self.host_out.push(frame);
        }
    }

    fn frame(dst: Mac, src: Mac, tag: u8) -> Vec<u8> {
        let mut f = Vec::from(dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00, tag]);
        f.resize(60, 0);
        f
    }

    const HOST_MAC: Mac = [0x52, 0x54, 0, 0x77, 0, 1];
    const PEER_MAC: Mac = [0x52, 0x54, 0, 0x77, 0, 2];

    fn lan() -> Switch {
        let mut sw = Switch::default();
        for (p, up) in [(UPLINK, true), (HOST, false), (1, false), (2, false)] {
            sw.attach(p, up);
        }
        sw
    }

    #[test]
    fn the_wire_the_host_stack_and_the_vms_reach_each_other_through_the_switch() {
        let (vm1, vm2) = (tagged_mac(1, 1, 0), tagged_mac(1, 2, 0));
        let mut sw = lan();
        let mut port = Port::default();
        // The VMs and the host's stack speak once each, so the switch knows them.
        let mut pending = Vec::new();
        let mut to_vms = ToVms::new();
        for (p, mac) in [(1, vm1), (2, vm2)] {
            for out in sw.forward(p, &frame(BROADCAST, mac, 0), 0) {
                if is_host_side(out) {
                    pending.push((out, frame(BROADCAST, mac, 0)));
                }
            }
        }
        port.host_in.push_back(frame(BROADCAST, HOST_MAC, 0));
        to_vms.extend(exchange(&mut sw, &mut port, &mut pending, 0));
        assert_eq!(port.wire_out.len(), 3, "every broadcast went out of the uplink");
        assert_eq!(port.host_out.len(), 2, "the host's stack saw both VMs' broadcasts, not its own");
        assert_eq!(to_vms.values().map(Vec::len).sum::<usize>(), 2, "each VM saw the host's broadcast");

        // From the wire: one frame for VM 2, one for the host, one for a
        // station nobody here knows (it floods, but never back to the wire).
        port.wire_out.clear();
        port.host_out.clear();
        port.wire_in.extend([frame(vm2, PEER_MAC, 1), frame(HOST_MAC, PEER_MAC, 2), frame([2; 6], PEER_MAC, 3)]);
        // The host answers its peer: the peer is learned on the uplink now.
        port.host_in.push_back(frame(PEER_MAC, HOST_MAC, 4));
        let to_vms = exchange(&mut sw, &mut port, &mut Vec::new(), 1);
        let tags = |fs: &[Vec<u8>]| fs.iter().map(|f| f[14]).collect::<Vec<u8>>();
        assert_eq!(tags(&to_vms[&2]), [1, 3], "VM 2 got its frame and the flood");
        assert_eq!(tags(&to_vms[&1]), [3], "VM 1 only the flood");
        assert_eq!(tags(&port.host_out), [2, 3], "the host its frame and the flood");
        assert_eq!(tags(&port.wire_out), [4], "the host's answer went out, nothing came back");

        // The host's stack reaches its own VM without the wire.
        port.wire_out.clear();
        port.host_in.push_back(frame(vm1, HOST_MAC, 5));
        let to_vms = exchange(&mut sw, &mut port, &mut Vec::new(), 2);
        assert_eq!(tags(&to_vms[&1]), [5]);
        assert!(port.wire_out.is_empty() && !to_vms.contains_key(&2));
    }

    #[test]
    fn a_vm_announced_from_its_new_port_gets_its_frames_there() {
        // Host B's switch: the VM lived beyond the wire (on host A) and
        // arrives on port 7 by migration.
        let vm = tagged_mac(1, 1, 0);
        let mut sw = lan();
        sw.attach(7, false);
        let mut port = Port::default();
        port.wire_in.push_back(frame(BROADCAST, vm, 0));
        exchange(&mut sw, &mut port, &mut Vec::new(), 0);
        assert_eq!(sw.lookup(&vm, 0), Some(UPLINK));
        // The destination announces it from its port: the broadcast goes
        // out of the uplink too, for the switches beyond.
        let mut to_vms = ToVms::new();
        switch_frame(&mut sw, 7, announce(vm), 1, &mut port, &mut to_vms);
        assert_eq!(sw.lookup(&vm, 1), Some(7));
        assert_eq!(port.wire_out.len(), 1);
        port.host_in.push_back(frame(vm, HOST_MAC, 9));
        let to_vms = exchange(&mut sw, &mut port, &mut Vec::new(), 2);
        assert_eq!(to_vms[&7].len(), 1, "the host's frame went to the VM's new port");
        assert_eq!(port.wire_out.len(), 1, "and not to the wire");
    }

    #[test]
    fn a_hosts_tag_keeps_vm_macs_unicast_local_and_apart_from_other_hosts() {
        let (a, b) = (host_tag(&HOST_MAC), host_tag(&PEER_MAC));
        assert_ne!(tagged_mac(a, 1, 0), tagged_mac(b, 1, 0));
        for tag in [0, 1, 0x3f, 0xff] {
            let m = tagged_mac(tag, 1, 0);
            assert_eq!(m[0] & 3, 2, "locally administered unicast: {m:?}");
            assert_eq!(m[1..], mac_for(1, 0)[1..]);
        }
        assert_eq!(tagged_mac(0, 5, 1), mac_for(5, 1));
    }

    #[test]
    fn a_bridged_hosts_stack_still_transfers_over_the_wire_and_the_vms_get_their_frames() {
        use crate::hostnet::Nic;
        use crate::hostnet::link::hosts;
        // Host A's NIC is its switch's uplink, with VM 1 on the switch;
        // host B is plain.
        let (mut a, mut b) = hosts();
        a.set_uplink(Some("lan"));
        assert_eq!(a.uplink(), Some("lan"));
        let mut sw = lan();
        b.listen(7000).unwrap();
        a.send("10.0.0.2:7000".parse().unwrap(), 256 << 10, 0).unwrap();
        let (mut now, mut lines) = (0u64, Vec::new());
        let mut to_vm = Vec::new();
        let vm = tagged_mac(host_tag(&a.nic().mac()), 1, 0);
        for round in 0..4000 {
            now += 1000;
            if round == 10 {
                // A station beyond the wire sends to the VM and to a MAC
                // nobody has: the VM gets the first, the stack neither.
                b.nic().send(&frame(vm, PEER_MAC, 0xa1));
            }
            to_vm.extend(exchange(&mut sw, &mut a, &mut Vec::new(), now / 1000).remove(&1).unwrap_or_default());
            a.poll(now, &mut |l| lines.push(alloc::format!("a: {l}")));
            exchange(&mut sw, &mut a, &mut Vec::new(), now / 1000);
            b.poll(now, &mut |l| lines.push(alloc::format!("b: {l}")));
        }
        assert!(
            lines.iter().any(|l| l.starts_with("a: net send: 262144 bytes to 10.0.0.2:7000") && l.contains("verified")),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("b: net listen: received 262144 bytes") && l.contains("pattern ok")),
            "{lines:?}"
        );
        assert_eq!(to_vm.iter().filter(|f| f[14] == 0xa1).count(), 1, "the VM got the frame for its MAC");
        let st = a.status();
        let (name, bridge) = st.uplink.expect("bridged");
        assert_eq!(name, "lan");
        assert!(bridge.to_stack > 0 && bridge.from_stack > 0 && bridge.dropped == 0, "{bridge:?}");
        // Off again: the stack reads the NIC itself.
        a.set_uplink(None);
        assert!(a.status().uplink.is_none());
        a.ping("10.0.0.2".parse().unwrap(), 1, now).unwrap();
        lines.clear();
        for _ in 0..100 {
            now += 1000;
            a.poll(now, &mut |l| lines.push(alloc::format!("a: {l}")));
            b.poll(now, &mut |l| lines.push(alloc::format!("b: {l}")));
        }
        assert!(lines.contains(&alloc::string::String::from("a: net ping: 10.0.0.2: 1 sent, 1 received")), "{lines:?}");
    }
}
