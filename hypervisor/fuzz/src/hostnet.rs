//! The host's own network (`hypervisor::hostnet`) against a hostile wire
//! and a hostile NIC: frames and receive descriptors (length, status and
//! error bits) as the fuzzer likes, TCP segments that follow the host's own
//! sequence numbers (so a connection can open and stream bytes into the
//! transfer receiver), time jumps, and `net` console lines.
//!
//! Checks:
//! - never panics (the stack, the driver, the transfer service, the
//!   console);
//! - the driver counts every descriptor it consumed exactly once, as a
//!   frame or a drop, and never hands the device a frame outside 14..=1518
//!   bytes;
//! - every frame the host sends is a well-formed Ethernet frame from its
//!   own MAC.
//!
//! Input: a sequence of operations, each an opcode byte and its operands:
//! 0 a frame (`u16` length, bytes) delivered as a good descriptor; 1 the
//! same with a fuzzed descriptor length, status and error byte; 2 a TCP
//! segment from 10.0.0.9 to the host (source port, destination port,
//! flags, `u16` payload length, payload), its sequence and acknowledgement
//! numbers following the host's last segment; 3 advance the clock by a
//! `u16` count of milliseconds and poll; 4 a `net` console line (`u8`
//! length, text).

use hypervisor::hostnet::e1000::sim::{SimE1000, SimHw};
use hypervisor::hostnet::e1000::{E1000, MAX_FRAME};
use hypervisor::hostnet::{HostNet, Nic, console, parse_cidr};
use hypervisor::vm::exit::Console;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress,
    IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::input::Input;

const HOST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x01];
const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x09];
const HOST_IP: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
const PEER_IP: Ipv4Address = Ipv4Address::new(10, 0, 0, 9);

struct Sink;
impl Console for Sink {
    fn line(&mut self, _: &str) {}
}

fn eth(ethertype: EthernetProtocol, payload_len: usize, emit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let repr = EthernetRepr { src_addr: EthernetAddress(PEER_MAC), dst_addr: EthernetAddress(HOST_MAC), ethertype };
    let mut f = vec![0u8; repr.buffer_len() + payload_len];
    let mut frame = EthernetFrame::new_unchecked(&mut f[..]);
    repr.emit(&mut frame);
    emit(frame.payload_mut());
    f
}

/// The peer's ARP announcement, so the host can answer without asking.
fn arp() -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(PEER_MAC),
        source_protocol_addr: PEER_IP,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: HOST_IP,
    };
    eth(EthernetProtocol::Arp, repr.buffer_len(), |p| repr.emit(&mut ArpPacket::new_unchecked(p)))
}

/// The last TCP segment the host sent: (our port, its port, its seq + len,
/// its ack).
fn last_segment(sent: &[Vec<u8>]) -> Option<(u16, u16, TcpSeqNumber, Option<TcpSeqNumber>)> {
    let caps = ChecksumCapabilities::ignored();
    sent.iter().rev().find_map(|f| {
        let e = EthernetFrame::new_checked(&f[..]).ok()?;
        let ip = Ipv4Packet::new_checked(e.payload()).ok()?;
        let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
        let repr =
            TcpRepr::parse(&tcp, &IpAddress::Ipv4(ip.src_addr()), &IpAddress::Ipv4(ip.dst_addr()), &caps).ok()?;
        Some((repr.dst_port, repr.src_port, repr.seq_number + repr.segment_len(), repr.ack_number))
    })
}

pub fn hostnet(data: &[u8]) {
    let mut input = Input::new(data);
    let dev = Rc::new(RefCell::new(SimE1000::new(HOST_MAC)));
    let hw = SimHw { dev: dev.clone(), hold_tx: Rc::new(Cell::new(false)) };
    let Ok(nic) = E1000::new(hw) else { panic!("the simulated e1000 must start") };
    let mut net = HostNet::new(nic, "fuzz".into(), 0, 1);
    net.set_addr(parse_cidr("10.0.0.1/24").expect("a valid address"));
    net.listen(7000).expect("a free port");
    let mut now = 0u64;
    let mut delivered = 0u64;
    let mut deliver = |dev: &Rc<RefCell<SimE1000>>, f: &[u8], len: u16, status: u8, errors: u8| {
        if dev.borrow_mut().deliver_raw(f, len, status, errors) {
            delivered += 1;
        }
    };
    deliver(&dev, &arp(), arp().len() as u16, 3, 0);
    let mut our_seq = TcpSeqNumber(1000);
    for _ in 0..256 {
        if input.is_empty() {
            break;
        }
        match input.u8() % 5 {
            0 => {
                let len = usize::from(input.u16() % 1600);
                let f = input.bytes(len).to_vec();
                deliver(&dev, &f, f.len() as u16, 3, 0);
            }
            1 => {
                let len = usize::from(input.u16() % 1600);
                let f = input.bytes(len).to_vec();
                let (dlen, status, errors) = (input.u16(), input.u8(), input.u8());
                deliver(&dev, &f, dlen, status, errors);
            }
            2 => {
                let (src_port, dst_port, flags) = (input.u16() | 1, input.u16(), input.u8());
                let n = usize::from(input.u16() % 1460);
                let payload = input.bytes(n);
                let last = last_segment(&dev.borrow().sent);
                let ack_number = last.map(|(_, _, next, _)| next);
                if let Some((_, _, _, Some(their_ack))) = last
                    && flags & 0x80 != 0
                {
                    our_seq = their_ack;
                }
                let control = match flags & 3 {
                    0 => TcpControl::None,
                    1 => TcpControl::Syn,
                    2 => TcpControl::Fin,
                    _ => TcpControl::Rst,
                };
                let repr = TcpRepr {
                    src_port,
                    dst_port: if flags & 4 != 0 { 7000 } else { dst_port },
                    control,
                    seq_number: our_seq,
                    ack_number: if control == TcpControl::Syn { None } else { ack_number },
                    window_len: 65535,
                    window_scale: None,
                    max_seg_size: None,
                    sack_permitted: false,
                    sack_ranges: [None; 3],
                    timestamp: None,
                    payload,
                };
                our_seq += repr.segment_len();
                let ip = Ipv4Repr {
                    src_addr: PEER_IP,
                    dst_addr: HOST_IP,
                    next_header: IpProtocol::Tcp,
                    payload_len: repr.buffer_len(),
                    hop_limit: 64,
                };
                let caps = ChecksumCapabilities::default();
                let f = eth(EthernetProtocol::Ipv4, ip.buffer_len() + repr.buffer_len(), |p| {
                    let mut packet = Ipv4Packet::new_unchecked(p);
                    ip.emit(&mut packet, &caps);
                    repr.emit(
                        &mut TcpPacket::new_unchecked(packet.payload_mut()),
                        &IpAddress::Ipv4(PEER_IP),
                        &IpAddress::Ipv4(HOST_IP),
                        &caps,
                    );
                });
                deliver(&dev, &f, f.len() as u16, 3, 0);
            }
            3 => now += u64::from(input.u16()) * 1000,
            _ => {
                let len = usize::from(input.u8() % 80);
                let text = String::from_utf8_lossy(input.bytes(len)).into_owned();
                match console::parse(&format!("net {text}")) {
                    Some(Ok(p)) => console::execute(&p, Some(&mut net), now, &mut Sink),
                    Some(Err(e)) => console::report_parse_error(&e, &mut Sink),
                    None => unreachable!("a line starting with net is a net command"),
                }
            }
        }
        now += 1000;
        net.poll(now, &mut |_| {});
    }
    // Drain what is left, then check the accounting.
    for _ in 0..8 {
        now += 1000;
        net.poll(now, &mut |_| {});
    }
    let c = net.nic().counters();
    assert!(
        c.rx_frames + c.rx_dropped <= delivered,
        "{} frames and {} drops from {delivered} descriptors",
        c.rx_frames,
        c.rx_dropped
    );
    for f in &dev.borrow().sent {
        assert!((14..=MAX_FRAME).contains(&f.len()), "sent a {}-byte frame", f.len());
        assert_eq!(f[6..12], HOST_MAC, "sent a frame from another MAC");
    }
}
