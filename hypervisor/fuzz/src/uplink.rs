//! The host NIC as a VM switch's uplink (`hypervisor::net::uplink`) against
//! hostile frames from every side: guests on three VM ports, stations on
//! the wire, and the host's own stack, with time jumps and VM ports that
//! come and go (a VM ending, one arriving by migration and announcing
//! itself).
//!
//! Checks, besides never panicking:
//! - an exchange takes at most `WIRE_BATCH` frames from the wire and as
//!   many from the host's stack, and leaves nothing pending;
//! - nothing goes back where it came from: the wire gets at most the
//!   frames of the VMs and the host's stack, the stack at most those of
//!   the VMs and the wire;
//! - every frame anyone gets was sent by someone, unchanged, is at least an
//!   Ethernet header long and has a unicast, non-zero source;
//! - the MAC table stays within its bounds.
//!
//! Input: operations, each an opcode byte and its operands: 0 VM port
//! `1 + n % 3` sends a frame (`u8` length, bytes; the first twelve are the
//! two MACs); 1 a frame arrives on the wire; 2 the host's stack sends a
//! frame; 3 an exchange; 4 the clock jumps by a `u16` count of seconds;
//! 5 VM port `1 + n % 3` leaves the switch or (back) joins it and
//! announces a MAC.

use std::collections::{BTreeSet, VecDeque};

use hypervisor::net::switch::{self, MAX_MACS, PortId, Switch};
use hypervisor::net::uplink::{self, HOST, MAX_QUEUED, UPLINK, UplinkPort, WIRE_BATCH};

use crate::input::Input;

#[derive(Default)]
struct Port {
    wire_in: VecDeque<Vec<u8>>,
    host_in: VecDeque<Vec<u8>>,
    wire_out: Vec<Vec<u8>>,
    host_out: Vec<Vec<u8>>,
    taken_wire: usize,
    taken_host: usize,
}

impl UplinkPort for Port {
    fn take_wire(&mut self) -> Option<Vec<u8>> {
        let f = self.wire_in.pop_front()?;
        self.taken_wire += 1;
        Some(f)
    }
    fn take_host(&mut self) -> Option<Vec<u8>> {
        let f = self.host_in.pop_front()?;
        self.taken_host += 1;
        Some(f)
    }
    fn to_wire(&mut self, frame: &[u8]) {
        self.wire_out.push(frame.to_vec());
    }
    fn to_host(&mut self, frame: Vec<u8>) {
        self.host_out.push(frame);
    }
}

/// A frame from the input: its MACs are mostly from a small set, so
/// learning, moves and unicast happen.
fn frame(input: &mut Input) -> Vec<u8> {
    let len = usize::from(input.u8()) % 80;
    let mut f = input.bytes(len).to_vec();
    for at in [0, 6] {
        if f.len() >= at + 6 && f[at] & 0x80 != 0 {
            let station = f[at] & 3;
            f[at..at + 6].copy_from_slice(&[2, 0, 0, 0, station, 0]);
        }
    }
    f
}

fn well_formed(f: &[u8]) -> bool {
    f.len() >= switch::ETH_HEADER_LEN && !switch::is_multicast(&f[6..12].try_into().unwrap()) && f[6..12] != [0; 6]
}

pub fn uplink(data: &[u8]) {
    let mut input = Input::new(data);
    let mut sw = Switch::default();
    for (p, up) in [(UPLINK, true), (HOST, false), (1, false), (2, false), (3, false)] {
        sw.attach(p, up);
    }
    let mut port = Port::default();
    let mut pending: Vec<(PortId, Vec<u8>)> = Vec::new();
    // Every frame anyone sent, for the check that outputs are inputs.
    let mut sent: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut now = 0u64;
    for _ in 0..2000 {
        if input.is_empty() {
            break;
        }
        match input.u8() % 6 {
            0 => {
                let p = 1 + PortId::from(input.u8() % 3);
                let f = frame(&mut input);
                sent.insert(f.clone());
                for out in sw.forward(p, &f, now) {
                    assert_ne!(out, p, "a frame went back out of its port");
                    if uplink::is_host_side(out) {
                        if pending.len() < MAX_QUEUED {
                            pending.push((out, f.clone()));
                        }
                    } else {
                        assert!(well_formed(&f));
                    }
                }
            }
            1 if port.wire_in.len() < 4 * WIRE_BATCH => {
                let f = frame(&mut input);
                sent.insert(f.clone());
                port.wire_in.push_back(f);
            }
            2 if port.host_in.len() < 4 * WIRE_BATCH => {
                let f = frame(&mut input);
                sent.insert(f.clone());
                port.host_in.push_back(f);
            }
            3 => {
                let (to_wire, to_host) = (
                    pending.iter().filter(|(p, _)| *p == UPLINK).count(),
                    pending.iter().filter(|(p, _)| *p == HOST).count(),
                );
                port.taken_wire = 0;
                port.taken_host = 0;
                port.wire_out.clear();
                port.host_out.clear();
                let to_vms = uplink::exchange(&mut sw, &mut port, &mut pending, now);
                assert!(pending.is_empty());
                assert!(port.taken_wire <= WIRE_BATCH && port.taken_host <= WIRE_BATCH);
                assert!(port.wire_out.len() <= to_wire + port.taken_host, "the wire got its own frames back");
                assert!(port.host_out.len() <= to_host + port.taken_wire, "the host's stack got its own frames back");
                for (p, frames) in &to_vms {
                    assert!((1..=3).contains(p), "port {p} is not a VM's");
                    assert!(frames.len() <= port.taken_wire + port.taken_host);
                }
                let outs = port.wire_out.iter().chain(&port.host_out).chain(to_vms.values().flatten());
                for f in outs {
                    assert!(well_formed(f), "a malformed frame was switched: {f:?}");
                    assert!(sent.contains(f), "a frame nobody sent: {f:?}");
                }
            }
            4 => now += u64::from(input.u16()) * 1000,
            5 => {
                let p = 1 + PortId::from(input.u8() % 3);
                if !sw.detach(p) {
                    sw.attach(p, false);
                    let mac = [2, 0, 0, 0, input.u8() & 3, 0];
                    let mut to_vms = uplink::ToVms::new();
                    uplink::switch_frame(&mut sw, p, switch::announce(mac), now, &mut port, &mut to_vms);
                    sent.insert(switch::announce(mac));
                    assert_eq!(sw.lookup(&mac, now), Some(p), "the announcement did not teach the switch");
                }
            }
            _ => {}
        }
        assert!(sw.macs() <= MAX_MACS);
    }
}
