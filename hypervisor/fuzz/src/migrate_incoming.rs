//! The receiving side of live migration (`migrate listen`): whatever
//! arrives over TCP from another host, in pieces of any size, damaged, cut
//! short or made up. The bytes travel through the real TCP stack over an
//! in-memory cable (`hostnet::link`) into a manager over the mock backend.
//!
//! Checks:
//! - nothing panics, and every stream ends in exactly one console line:
//!   the VM arrived, the stream was refused, or it ended early;
//! - a VM runs only if the bytes it was built from are a whole, valid live
//!   stream (`migrate::verify` accepts the prefix the destination read),
//!   and then the sender is told `HVMIGRATE OK <id>`;
//! - a real source's stream, unmodified, becomes a running VM whatever the
//!   pieces it arrives in;
//! - anything else leaves no VM, every frame back, the listener free for
//!   the next stream and VM ids unused.
//!
//! Input: byte 0 picks the stream. Even: a real source's stream (made once:
//! a 2 MiB VM with written pages migrated by the source side), with up to
//! three bytes changed and maybe cut short; odd: the rest of the input is
//! the stream. Then the sizes of the pieces the sender writes, and whether
//! it closes its side at the end.

use std::sync::OnceLock;

use hypervisor::backend::Backend;
use hypervisor::hostnet::link::hosts;
use hypervisor::hostnet::tcp::{StreamState, Transport, parse_endpoint};
use hypervisor::manager::migration::source::Options;
use hypervisor::manager::migration::{DEFAULT_PORT, REPLY_OK};
use hypervisor::manager::{GuestImage, Manager};
use hypervisor::testing::{Lines, MockBackend, elf_guest};
use mm::GuestPhysAddr;

use crate::input::Input;

const FRAMES: usize = 2048;
const MIB: u32 = 2;
/// Rounds of 1 ms while the connection opens and the sender sends, then of
/// 1 s (past the destination's idle limit) until it decides.
const SEND_ROUNDS: usize = 20_000;
const WAIT_ROUNDS: usize = 200;

fn manager() -> Manager<MockBackend> {
    // One image for every run (`elf_guest` leaks its bytes on purpose).
    static IMAGE: OnceLock<&'static [u8]> = OnceLock::new();
    let bytes = *IMAGE.get_or_init(|| elf_guest(&[0x90; 32]));
    let images = vec![GuestImage { name: "tiny".into(), bytes }];
    Manager::new(Ok(MockBackend::new(FRAMES)), images)
}

fn to_b() -> Options {
    let to = parse_endpoint(&format!("10.0.0.2:{DEFAULT_PORT}")).unwrap();
    Options {
        to,
        downtime_ms: 300,
        bandwidth_mib: None,
        throttle_max: 99,
        corrupt_at: None,
        mode: Default::default(),
        connections: 2,
    }
}

/// What a real source sends for a small VM: a migration to a host that
/// only records the bytes, until they verify as a whole stream.
fn real_stream() -> &'static [u8] {
    static STREAM: OnceLock<Vec<u8>> = OnceLock::new();
    STREAM.get_or_init(|| {
        let (mut a, mut b) = hosts();
        let mut ma = manager();
        let id = ma.run_vm("tiny", MIB, "").unwrap();
        {
            let Manager { backend, vms, host_mem, .. } = &mut ma;
            let backend = backend.as_mut().unwrap();
            let res = vms.iter_mut().find(|v| v.id == id).unwrap().res.as_mut().unwrap();
            for p in 0..64u64 {
                let page = vec![(p as u8).wrapping_mul(7) | 1; 4096];
                host_mem
                    .with_hooks(id, |h| {
                        res.mem.sim_write(&mut backend.mem, h, 0, GuestPhysAddr(0x10_0000 + p * 4096), &page)
                    })
                    .unwrap();
            }
        }
        b.tcp().listen(DEFAULT_PORT).unwrap();
        ma.start_migration(id, to_b(), &mut a.tcp(), 0).unwrap();
        let (mut got, mut stream, mut lines) = (Vec::new(), None, Lines::default());
        let mut buf = vec![0u8; 64 * 1024];
        for round in 1..=SEND_ROUNDS as u64 {
            let now = round * 1000;
            a.poll(now, &mut |_| {});
            b.poll(now, &mut |_| {});
            ma.migration_round(Some(&mut a.tcp()), now, &mut lines);
            if stream.is_none() {
                stream = b.tcp().accept(DEFAULT_PORT);
            }
            if let Some(s) = stream {
                while let Ok(n @ 1..) = b.tcp().read(s, &mut buf) {
                    got.extend_from_slice(&buf[..n]);
                }
                if migrate::verify(&got).is_ok() {
                    return got;
                }
            }
        }
        panic!("the source sent no whole stream: {} bytes; {:?}", got.len(), lines.0);
    })
}

pub fn migrate_incoming(data: &[u8]) {
    let mut input = Input::new(data);
    let real = real_stream();
    let bytes: Vec<u8> = if input.u8() % 2 == 0 {
        let mut s = real.to_vec();
        for _ in 0..input.below(4) {
            let at = input.u32() as usize % s.len();
            s[at] ^= input.u8().max(1);
        }
        if input.bool() {
            s.truncate(input.u32() as usize % s.len());
        }
        s
    } else {
        let n = input.u16() as usize;
        input.bytes(n).to_vec()
    };
    let pieces: Vec<usize> = (0..16).map(|_| 1 + input.below(70_000) as usize).collect();
    let close_at_end = input.bool();
    let unmodified = bytes == real;

    let (mut a, mut b) = hosts();
    let mut mb = manager();
    mb.listen_migrations(DEFAULT_PORT, &mut b.tcp()).unwrap();
    let free_before = mb.backend.as_ref().unwrap().free_frames();
    let s = a.tcp().connect(to_b().to).unwrap();
    let (mut sent, mut closed, mut now, mut k) = (0usize, false, 0u64, 0usize);
    let (mut reply, mut lines) = (Vec::new(), Lines::default());
    let mut buf = [0u8; 256];
    let decided =
        |l: &Lines| l.0.iter().any(|l| l.contains(" and runs") || l.contains("refused") || l.contains("ended early"));
    for round in 0..SEND_ROUNDS + WAIT_ROUNDS {
        // 1 ms steps while the connection opens and the bytes go out.
        let sending = sent < bytes.len() || a.tcp().unacked(s) > 0 || a.tcp().state(s) == StreamState::Connecting;
        now += if round < SEND_ROUNDS && sending { 1000 } else { 1_000_000 };
        a.poll(now, &mut |_| {});
        b.poll(now, &mut |_| {});
        if a.tcp().state(s) == StreamState::Open && sent < bytes.len() {
            let end = (sent + pieces[k % pieces.len()]).min(bytes.len());
            k += 1;
            sent += a.tcp().write(s, &bytes[sent..end]).unwrap_or(0);
        }
        // Its side closes once open (closing a connection still being
        // made only forgets it).
        if sent == bytes.len() && close_at_end && !closed && a.tcp().state(s) != StreamState::Connecting {
            a.tcp().close(s);
            closed = true;
        }
        mb.migration_round(Some(&mut b.tcp()), now, &mut lines);
        while let Ok(n @ 1..) = a.tcp().read(s, &mut buf) {
            reply.extend_from_slice(&buf[..n]);
        }
        if decided(&lines) && (reply.ends_with(b"\n") || a.tcp().state(s) == StreamState::Closed) {
            break;
        }
    }
    let outcomes: Vec<&String> = lines.0.iter().filter(|l| decided(&Lines(vec![(*l).clone()]))).collect();
    assert_eq!(outcomes.len(), 1, "one outcome line per stream: {:?}", lines.0);
    let line = outcomes[0];
    let incoming = mb.migration.incoming.as_ref().unwrap();
    assert!(!incoming.busy(), "the listener still holds the stream: {line}");
    let reply = String::from_utf8_lossy(&reply);
    if line.contains(" and runs") {
        // "... arrived from <peer> (<n> bytes in <ms> ms) and runs"
        let read: usize = line.rsplit_once(" (").and_then(|(_, r)| r.split(' ').next()?.parse().ok()).expect(line);
        let verdict = migrate::verify(&bytes[..read.min(bytes.len())]);
        assert!(verdict.is_ok(), "a VM was built from a stream verify refuses ({verdict:?}): {line}");
        assert_eq!(mb.vms.len(), 1, "{line}");
        let vm = &mb.vms[0];
        assert!(vm.res.is_some() && !vm.paused && !vm.state.ended(), "{line}");
        assert!(reply.starts_with(&format!("{REPLY_OK}{}\n", vm.id)), "reply {reply:?} to {line}");
    } else {
        assert!(!unmodified, "a real source's stream was not taken: {line}; pieces {pieces:?}");
        assert!(mb.vms.is_empty(), "a refused stream left a VM: {line}");
        assert_eq!(mb.backend.as_ref().unwrap().free_frames(), free_before, "a refused stream kept frames: {line}");
        assert!(!reply.starts_with(REPLY_OK), "reply {reply:?} to {line}");
        // The id was given back: the next VM here is vm 1.
        assert_eq!(mb.run_vm("tiny", MIB, "").unwrap(), 1, "{line}");
    }
}

/// Seeds: the real stream whole (in two piece patterns), cut, and with a
/// byte changed; and a line that is no stream.
pub fn migrate_incoming_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let pieces = |n: u16| n.to_le_bytes().repeat(16);
    let junk = b"HVMIGRATE? not a stream";
    vec![
        ("real-whole", [vec![0, 0, 0], pieces(1400), vec![1]].concat()),
        ("real-small-pieces-no-close", [vec![0, 0, 0], pieces(97), vec![0]].concat()),
        ("real-cut", [vec![0, 0, 1], 9000u32.to_le_bytes().to_vec(), pieces(4096), vec![1]].concat()),
        ("real-flipped", [vec![0, 1], 5000u32.to_le_bytes().to_vec(), vec![0x40, 0], pieces(4096), vec![1]].concat()),
        ("garbage", [vec![1], (junk.len() as u16).to_le_bytes().to_vec(), junk.to_vec(), pieces(8), vec![1]].concat()),
    ]
}
