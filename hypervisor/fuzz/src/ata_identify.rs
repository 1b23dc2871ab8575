//! ATA IDENTIFY DEVICE decoding (`hypervisor::disk::ata`), and the command
//! plans built on what it says. The 512 bytes come from whatever answers
//! at the ATA ports; a wrong size would send swap I/O past the disk.
//!
//! Checks:
//! - never panics; a refusal is one line and names a real defect (ATAPI
//!   bit, failed signed checksum, no LBA, odd sector size, no sectors);
//! - an accepted identity has LBA, a valid checksum when signed, model
//!   and serial strings that are printable, quote-free and trimmed, and a
//!   size whose every sector the commands it allows can reach (the first
//!   and the last sector are planned and must come out whole);
//! - the flush command needs the feature bits;
//! - transfer plans from fuzzed ranges cover the range exactly, in
//!   commands of legal size, 28-bit only below the 28-bit limit, and
//!   their register writes encode the LBA and count that were asked for.
//!
//! Input: a flags byte (bit 0: seal the data with a valid checksum, bit 1:
//! force the LBA bit, bit 2: force word 0 to an ATA disk), 512 bytes of
//! IDENTIFY data (256 little-endian words), then a transfer: LBA (`u64`),
//! sector count (`u32`), a byte (bit 0 48-bit device, bit 1 write).

use hypervisor::disk::ata::{
    Drive, IdentifyRefusal, LBA28_LIMIT, LBA48_LIMIT, MAX_SECTORS_28, MAX_SECTORS_48, Reg, State, Transfer, Transfers,
    command, decode_identify, state, status,
};

use crate::input::Input;

pub fn ata_identify(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let mut w = [0u16; 256];
    for word in &mut w {
        *word = input.u16();
    }
    if flags & 2 != 0 {
        w[49] |= 1 << 9;
    }
    if flags & 4 != 0 {
        w[0] &= 0x7fff;
    }
    if flags & 1 != 0 {
        seal(&mut w);
    }
    check_identify(&w);
    let (lba, sectors, kind) = (input.u64(), input.u32(), input.u8());
    // Bounded so a plan stays short (at most 4096 28-bit commands).
    check_transfers(lba, u64::from(sectors % (1 << 20)), kind & 1 != 0, kind & 2 != 0);
    check_status(flags);
}

/// Word 255: signature 0xa5 and a checksum byte making all 512 bytes sum
/// to zero (ATA/ATAPI-6 8.15.61).
fn seal(w: &mut [u16; 256]) {
    w[255] = 0x00a5;
    let sum = w.iter().flat_map(|x| x.to_le_bytes()).fold(0u8, |a, b| a.wrapping_add(b));
    w[255] |= u16::from(0u8.wrapping_sub(sum)) << 8;
}

/// Bytes of an ATA string, first character in each word's high byte.
fn raw_string(words: &[u16]) -> String {
    words
        .iter()
        .flat_map(|w| w.to_be_bytes())
        .map(|b| match b {
            b'"' => '\'',
            0x20..=0x7e => b as char,
            _ => '?',
        })
        .collect()
}

fn check_string(s: &str, words: &[u16]) {
    assert!(s.len() <= words.len() * 2);
    assert!(s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"'), "{s:?}");
    assert!(!s.starts_with(' ') && !s.ends_with(' ') && !s.ends_with('?'), "{s:?} is not trimmed");
    assert!(raw_string(words).contains(s), "{s:?} is not from the data");
}

fn check_identify(w: &[u16; 256]) {
    let signed = w[255] & 0xff == 0xa5;
    let sums_to_zero = w.iter().flat_map(|x| x.to_le_bytes()).fold(0u8, |a, b| a.wrapping_add(b)) == 0;
    match decode_identify(w) {
        Ok(id) => {
            assert_eq!(w[0] & 0x8000, 0, "an ATAPI device was accepted");
            assert!(!signed || sums_to_zero, "a bad checksum was accepted");
            assert_ne!(w[49] & (1 << 9), 0, "a device without LBA was accepted");
            check_string(&id.model, &w[27..47]);
            check_string(&id.serial, &w[10..20]);
            let w83_valid = w[83] & 0xc000 == 0x4000;
            assert!(!id.lba48 || (w83_valid && w[83] & (1 << 10) != 0));
            assert!(!id.flush || (w83_valid && w[83] & (1 << 12) != 0));
            assert!(!id.flush_ext || (w83_valid && w[83] & (1 << 13) != 0));
            match id.flush_command() {
                Some(command::FLUSH_CACHE_EXT) => assert!(id.lba48 && id.flush_ext),
                Some(command::FLUSH_CACHE) => assert!(id.flush),
                Some(other) => panic!("flush command {other:#x}"),
                None => assert!(!id.flush && !(id.lba48 && id.flush_ext)),
            }
            // The disk is `sectors` long: each of them must be reachable
            // with the commands the device accepts.
            assert!(id.sectors > 0 && id.sectors <= LBA48_LIMIT);
            let all = Transfers::new(Drive::Slave, id.lba48, 0, id.sectors, false);
            assert!(all.is_some(), "{} sectors, 48-bit {}: not all addressable", id.sectors, id.lba48);
            for lba in [0, id.sectors - 1] {
                let plan: Vec<Transfer> = Transfers::new(Drive::Slave, id.lba48, lba, 1, true).unwrap().collect();
                assert_eq!(plan.len(), 1);
                assert!(plan[0].lba == lba && plan[0].sectors == 1 && (id.lba48 || !plan[0].ext));
            }
        }
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty() && !text.contains('\n'));
            match e {
                IdentifyRefusal::NotAta => assert_ne!(w[0] & 0x8000, 0),
                IdentifyRefusal::Checksum => assert!(signed && !sums_to_zero),
                IdentifyRefusal::NoLba => assert_eq!(w[49] & (1 << 9), 0),
                IdentifyRefusal::SectorSize { bytes } => assert_ne!(bytes, 512),
                IdentifyRefusal::Empty => {}
            }
        }
    }
}

fn check_transfers(lba: u64, sectors: u64, lba48: bool, write: bool) {
    let Some(plan) = Transfers::new(Drive::Slave, lba48, lba, sectors, write) else {
        let limit = if lba48 { LBA48_LIMIT } else { LBA28_LIMIT };
        assert!(lba.checked_add(sectors).is_none_or(|end| end > limit), "{lba:#x}+{sectors} refused");
        return;
    };
    let mut next = lba;
    for t in plan {
        assert_eq!((t.drive, t.write, t.lba), (Drive::Slave, write, next));
        assert!(t.sectors > 0);
        let end = t.lba + u64::from(t.sectors);
        if t.ext {
            assert!(lba48 && t.sectors <= MAX_SECTORS_48);
            // 48-bit commands only where a 28-bit one cannot reach.
            assert!(end > LBA28_LIMIT, "{t:?} could have been a 28-bit command");
        } else {
            assert!(t.sectors <= MAX_SECTORS_28 && end <= LBA28_LIMIT, "{t:?}");
        }
        assert_eq!(decode_registers(&t), (t.lba, t.sectors), "{t:?}");
        next = end;
    }
    assert_eq!(next, lba + sectors, "the plan does not cover the range");
}

/// The LBA and count a device reads from the register writes (ATA/ATAPI-6
/// clause 6: 48-bit registers are FIFOs, high byte written first).
fn decode_registers(t: &Transfer) -> (u64, u32) {
    let writes = t.parameters();
    let regs = writes.as_slice();
    let value = |reg: Reg| -> Vec<u8> { regs.iter().filter(|(r, _)| *r == reg).map(|(_, v)| *v).collect() };
    let (count, low, mid, high) =
        (value(Reg::SectorCount), value(Reg::LbaLow), value(Reg::LbaMid), value(Reg::LbaHigh));
    let dev = t.device();
    assert_eq!(dev & 0xf0, 0xf0, "LBA mode, slave: {dev:#x}");
    if t.ext {
        assert_eq!(regs.len(), 8);
        assert_eq!(dev & 0x0f, 0, "reserved in 48-bit commands");
        let lba = [low[1], mid[1], high[1], low[0], mid[0], high[0]]
            .iter()
            .enumerate()
            .fold(0u64, |a, (i, &b)| a | u64::from(b) << (8 * i));
        let n = u32::from(u16::from_be_bytes([count[0], count[1]]));
        (lba, if n == 0 { MAX_SECTORS_48 } else { n })
    } else {
        assert_eq!(regs.len(), 4);
        let lba = u64::from(low[0]) | u64::from(mid[0]) << 8 | u64::from(high[0]) << 16 | u64::from(dev & 0xf) << 24;
        (lba, if count[0] == 0 { MAX_SECTORS_28 } else { u32::from(count[0]) })
    }
}

/// Status register values (clause 7): BSY hides everything else.
fn check_status(v: u8) {
    let s = state(v);
    match s {
        State::Floating => assert_eq!(v, 0xff),
        State::Busy => assert!(v != 0xff && v & status::BSY != 0),
        State::Failed => assert!(v & status::BSY == 0 && v & (status::ERR | status::DF) != 0),
        State::Data => assert!(v & (status::BSY | status::ERR | status::DF) == 0 && v & status::DRQ != 0),
        State::Idle => assert!(v & (status::BSY | status::ERR | status::DF | status::DRQ) == 0),
    }
}
