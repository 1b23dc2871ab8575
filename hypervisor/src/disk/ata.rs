//! ATA PIO, the logic half: decoding IDENTIFY DEVICE data, choosing 28- or
//! 48-bit commands and the register writes that issue them, reading the
//! Status register. The port I/O is in the kernel's `platform::disk::ata`.
//!
//! References are to ATA/ATAPI-6 (T13/1410D) by clause and name: clause 7
//! describes the registers, clause 8 the commands, clause 9 the protocols.
//! ACS-3 keeps the same fields and commands.

use alloc::string::String;
use core::fmt;

/// Bytes in one sector; the only logical sector size this driver accepts.
pub const SECTOR_SIZE: usize = 512;

/// Status register bits (clause 7, Status register).
pub mod status {
    /// The device is busy; no other bit is valid.
    pub const BSY: u8 = 0x80;
    /// The device is ready to accept commands.
    pub const DRDY: u8 = 0x40;
    /// Device fault.
    pub const DF: u8 = 0x20;
    /// The device wants to move a data block (PIO).
    pub const DRQ: u8 = 0x08;
    /// The last command failed (see the Error register).
    pub const ERR: u8 = 0x01;
}

/// Device Control register bits (clause 7, Device Control register).
pub mod control {
    /// Interrupts off: INTRQ is not asserted (the kernel polls).
    pub const NIEN: u8 = 0x02;
}

/// Command codes (clause 8).
pub mod command {
    pub const READ_SECTORS: u8 = 0x20;
    pub const READ_SECTORS_EXT: u8 = 0x24;
    pub const WRITE_SECTORS: u8 = 0x30;
    pub const WRITE_SECTORS_EXT: u8 = 0x34;
    pub const FLUSH_CACHE: u8 = 0xe7;
    pub const FLUSH_CACHE_EXT: u8 = 0xea;
    pub const IDENTIFY_DEVICE: u8 = 0xec;
}

/// The two devices of one ATA channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drive {
    Master,
    Slave,
}

impl Drive {
    /// The Device register value that selects this drive (clause 7, Device
    /// register): bits 7 and
    /// 5 are obsolete and set as older devices expect, bit 4 is DEV.
    pub fn select(self) -> u8 {
        match self {
            Drive::Master => 0xa0,
            Drive::Slave => 0xb0,
        }
    }

    /// Whether a Device register value read back selects this drive.
    pub fn is_selected_by(self, device_register: u8) -> bool {
        (device_register & 0x10 != 0) == (self == Drive::Slave)
    }
}

/// Command block registers, as offsets from the channel's base port
/// (clause 7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    SectorCount = 2,
    LbaLow = 3,
    LbaMid = 4,
    LbaHigh = 5,
}

impl Reg {
    pub fn offset(self) -> u16 {
        self as u16
    }
}

/// Sectors one 28-bit command moves at most (a count of 0 means 256).
pub const MAX_SECTORS_28: u32 = 256;
/// Sectors one 48-bit command moves at most (a count of 0 means 65536).
pub const MAX_SECTORS_48: u32 = 65536;
/// 28-bit commands reach sectors below this. The top LBA, 0x0fff_ffff, is
/// left to 48-bit commands, as IDENTIFY words 60-61 never count it.
pub const LBA28_LIMIT: u64 = 0x0fff_ffff;
/// 48-bit commands reach sectors below this.
pub const LBA48_LIMIT: u64 = 1 << 48;

/// One READ SECTORS / WRITE SECTORS command (or its EXT form).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub drive: Drive,
    pub lba: u64,
    /// 1..=256 for 28-bit, 1..=65536 for 48-bit commands.
    pub sectors: u32,
    pub write: bool,
    /// A 48-bit (EXT) command.
    pub ext: bool,
}

/// The register writes between selecting the drive and writing the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parameters {
    writes: [(Reg, u8); 8],
    len: usize,
}

impl Parameters {
    pub fn as_slice(&self) -> &[(Reg, u8)] {
        &self.writes[..self.len]
    }
}

impl Transfer {
    /// The command code (clause 8: READ SECTORS, READ SECTORS EXT, WRITE
    /// SECTORS, WRITE SECTORS EXT).
    pub fn command(&self) -> u8 {
        match (self.write, self.ext) {
            (false, false) => command::READ_SECTORS,
            (false, true) => command::READ_SECTORS_EXT,
            (true, false) => command::WRITE_SECTORS,
            (true, true) => command::WRITE_SECTORS_EXT,
        }
    }

    /// The Device register for this command: LBA mode (bit 6), DEV, and for
    /// 28-bit commands LBA bits 27:24 in bits 3:0 (reserved in 48-bit ones).
    pub fn device(&self) -> u8 {
        let high = if self.ext { 0 } else { ((self.lba >> 24) & 0xf) as u8 };
        self.drive.select() | 0x40 | high
    }

    /// The Sector Count and LBA writes, in order. In 48-bit commands each of
    /// these registers is a two-deep FIFO: the "previous" (high-order) byte
    /// is written first, then the "current" one (clause 6, 48-bit Address
    /// feature set). A full count (256 or 65536) is written as 0.
    pub fn parameters(&self) -> Parameters {
        let b = |shift: u32| (self.lba >> shift) as u8;
        let mut p = Parameters { writes: [(Reg::SectorCount, 0); 8], len: 0 };
        let list: &[(Reg, u8)] = if self.ext {
            let count = (self.sectors % MAX_SECTORS_48) as u16;
            &[
                (Reg::SectorCount, (count >> 8) as u8),
                (Reg::SectorCount, count as u8),
                (Reg::LbaLow, b(24)),
                (Reg::LbaLow, b(0)),
                (Reg::LbaMid, b(32)),
                (Reg::LbaMid, b(8)),
                (Reg::LbaHigh, b(40)),
                (Reg::LbaHigh, b(16)),
            ]
        } else {
            let count = (self.sectors % MAX_SECTORS_28) as u8;
            &[(Reg::SectorCount, count), (Reg::LbaLow, b(0)), (Reg::LbaMid, b(8)), (Reg::LbaHigh, b(16))]
        };
        p.writes[..list.len()].copy_from_slice(list);
        p.len = list.len();
        p
    }
}

/// The commands that move `sectors` sectors from `lba` on. A command that
/// lies wholly below [`LBA28_LIMIT`] is a 28-bit one (every device has
/// those, and they take fewer register writes); one that reaches past it is
/// a 48-bit one.
#[derive(Clone, Debug)]
pub struct Transfers {
    drive: Drive,
    write: bool,
    next: u64,
    end: u64,
}

impl Transfers {
    /// `None` if the range cannot be addressed: past [`LBA28_LIMIT`] on a
    /// device without 48-bit addressing, or past [`LBA48_LIMIT`].
    pub fn new(drive: Drive, lba48: bool, lba: u64, sectors: u64, write: bool) -> Option<Transfers> {
        let end = lba.checked_add(sectors)?;
        let limit = if lba48 { LBA48_LIMIT } else { LBA28_LIMIT };
        (end <= limit).then_some(Transfers { drive, write, next: lba, end })
    }
}

impl Iterator for Transfers {
    type Item = Transfer;

    fn next(&mut self) -> Option<Transfer> {
        let left = self.end.checked_sub(self.next).filter(|&n| n > 0)?;
        let short = left.min(MAX_SECTORS_28 as u64);
        let (sectors, ext) =
            if self.next + short <= LBA28_LIMIT { (short, false) } else { (left.min(MAX_SECTORS_48 as u64), true) };
        let t = Transfer { drive: self.drive, lba: self.next, sectors: sectors as u32, write: self.write, ext };
        self.next += sectors;
        Some(t)
    }
}

/// What a Status register value says, for a polling loop (clause 9: PIO
/// data-in, PIO data-out and non-data command protocols).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// 0xff: nothing drives the bus (no controller at these ports).
    Floating,
    /// BSY: keep waiting.
    Busy,
    /// ERR or DF: the command failed.
    Failed,
    /// DRQ: a data block is ready to move.
    Data,
    /// Neither busy nor asking for data: the command has completed.
    Idle,
}

pub fn state(status: u8) -> State {
    if status == 0xff {
        State::Floating
    } else if status & status::BSY != 0 {
        State::Busy
    } else if status & (status::ERR | status::DF) != 0 {
        State::Failed
    } else if status & status::DRQ != 0 {
        State::Data
    } else {
        State::Idle
    }
}

/// What IDENTIFY DEVICE says about a device (clause 8, IDENTIFY DEVICE).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Model number (words 27-46), trimmed.
    pub model: String,
    /// Serial number (words 10-19), trimmed.
    pub serial: String,
    /// User-addressable sectors: words 100-103 with 48-bit addressing,
    /// else words 60-61.
    pub sectors: u64,
    /// The 48-bit Address feature set (word 83 bit 10).
    pub lba48: bool,
    /// FLUSH CACHE (word 83 bit 12).
    pub flush: bool,
    /// FLUSH CACHE EXT (word 83 bit 13).
    pub flush_ext: bool,
}

impl Identity {
    /// The command that flushes the write cache, if the device has one.
    pub fn flush_command(&self) -> Option<u8> {
        if self.lba48 && self.flush_ext {
            Some(command::FLUSH_CACHE_EXT)
        } else if self.flush {
            Some(command::FLUSH_CACHE)
        } else {
            None
        }
    }
}

/// Why IDENTIFY DEVICE data was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentifyRefusal {
    /// Word 0 bit 15: not an ATA device (ATAPI answers IDENTIFY PACKET DEVICE).
    NotAta,
    /// Word 255 carries the 0xa5 signature and the data does not sum to 0.
    Checksum,
    /// Word 49 bit 9 clear: no LBA addressing.
    NoLba,
    /// Logical sectors are not 512 bytes (word 106, words 117-118).
    SectorSize { bytes: u64 },
    /// The device reports no sectors.
    Empty,
}

impl fmt::Display for IdentifyRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentifyRefusal::NotAta => write!(f, "not an ATA disk (ATAPI?)"),
            IdentifyRefusal::Checksum => write!(f, "IDENTIFY data fails its checksum"),
            IdentifyRefusal::NoLba => write!(f, "no LBA addressing"),
            IdentifyRefusal::SectorSize { bytes } => write!(f, "{bytes}-byte logical sectors (only 512 supported)"),
            IdentifyRefusal::Empty => write!(f, "the disk reports no sectors"),
        }
    }
}

/// Words 82-84 and 106 are only meaningful when bits 15:14 read 01.
fn valid(word: u16) -> bool {
    word & 0xc000 == 0x4000
}

/// An ATA string: two characters a word, the first in the high byte,
/// padded with spaces. Anything but printable ASCII becomes '?', and a
/// double quote becomes a single one, so it can be quoted in a report.
fn ata_string(words: &[u16]) -> String {
    let mut s: String = words
        .iter()
        .flat_map(|w| w.to_be_bytes())
        .map(|b| match b {
            b'"' => '\'',
            0x20..=0x7e => b as char,
            _ => '?',
        })
        .collect();
    s.truncate(s.trim_end_matches([' ', '?']).len());
    let lead = s.len() - s.trim_start().len();
    s.drain(..lead);
    s
}

/// Decodes the 256 words IDENTIFY DEVICE returns.
pub fn decode_identify(w: &[u16; 256]) -> Result<Identity, IdentifyRefusal> {
    if w[0] & 0x8000 != 0 {
        return Err(IdentifyRefusal::NotAta);
    }
    // Word 255 (integrity word): signature 0xa5 in bits 7:0, checksum in 15:8 so
    // that all 512 bytes sum to zero. Devices without it leave it zero.
    if w[255] & 0xff == 0xa5 && w.iter().flat_map(|x| x.to_le_bytes()).fold(0u8, |a, b| a.wrapping_add(b)) != 0 {
        return Err(IdentifyRefusal::Checksum);
    }
    if w[49] & (1 << 9) == 0 {
        return Err(IdentifyRefusal::NoLba);
    }
    if valid(w[106]) && w[106] & (1 << 12) != 0 {
        let bytes = 2 * (u64::from(w[117]) | u64::from(w[118]) << 16);
        if bytes != SECTOR_SIZE as u64 {
            return Err(IdentifyRefusal::SectorSize { bytes });
        }
    }
    let w83 = if valid(w[83]) { w[83] } else { 0 };
    let lba48 = w83 & (1 << 10) != 0;
    // Words 60-61 count at most 0x0fff_ffff sectors (what 28-bit commands
    // reach); a device claiming more must not make the disk look larger
    // than its commands can address.
    let lba28_sectors = (u64::from(w[60]) | u64::from(w[61]) << 16).min(LBA28_LIMIT);
    let lba48_sectors = (0..4).fold(0u64, |acc, i| acc | u64::from(w[100 + i]) << (16 * i));
    let sectors = if lba48 && lba48_sectors != 0 { lba48_sectors.min(LBA48_LIMIT) } else { lba28_sectors };
    if sectors == 0 {
        return Err(IdentifyRefusal::Empty);
    }
    Ok(Identity {
        model: ata_string(&w[27..47]),
        serial: ata_string(&w[10..20]),
        sectors,
        lba48,
        flush: w83 & (1 << 12) != 0,
        flush_ext: w83 & (1 << 13) != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// IDENTIFY data as an emulated disk returns it: LBA, 28-bit only.
    fn identify(sectors28: u32) -> [u16; 256] {
        let mut w = [0u16; 256];
        w[0] = 0x0040; // fixed disk
        put_string(&mut w[10..20], "BXHD00011");
        put_string(&mut w[27..47], "Generic 1234");
        w[49] = 1 << 9;
        w[60] = sectors28 as u16;
        w[61] = (sectors28 >> 16) as u16;
        w[83] = 0x4000 | 1 << 12;
        w
    }

    fn put_string(words: &mut [u16], s: &str) {
        let mut bytes: Vec<u8> = s.bytes().collect();
        bytes.resize(words.len() * 2, b' ');
        for (w, pair) in words.iter_mut().zip(bytes.chunks(2)) {
            *w = u16::from_be_bytes([pair[0], pair[1]]);
        }
    }

    fn seal(w: &mut [u16; 256]) {
        w[255] = 0x00a5;
        let sum = w.iter().flat_map(|x| x.to_le_bytes()).fold(0u8, |a, b| a.wrapping_add(b));
        w[255] |= u16::from(0u8.wrapping_sub(sum)) << 8;
    }

    #[test]
    fn a_28_bit_disk_is_decoded() {
        let id = decode_identify(&identify(129_024)).unwrap();
        assert_eq!(id.model, "Generic 1234");
        assert_eq!(id.serial, "BXHD00011");
        assert_eq!(id.sectors, 129_024);
        assert!(!id.lba48);
        assert_eq!(id.flush_command(), Some(command::FLUSH_CACHE));
    }

    #[test]
    fn a_48_bit_disk_reports_words_100_to_103() {
        let mut w = identify(0x0fff_ffff);
        w[83] |= 1 << 10 | 1 << 13;
        for (i, v) in [0x6789u16, 0x2345, 0x0001, 0].into_iter().enumerate() {
            w[100 + i] = v;
        }
        let id = decode_identify(&w).unwrap();
        assert!(id.lba48);
        assert_eq!(id.sectors, 0x1_2345_6789);
        assert_eq!(id.flush_command(), Some(command::FLUSH_CACHE_EXT));
        // Word 83 without its 01 validity pattern is ignored entirely.
        w[83] = 0xffff;
        let id = decode_identify(&w).unwrap();
        assert!(!id.lba48);
        assert_eq!(id.sectors, 0x0fff_ffff);
        assert_eq!(id.flush_command(), None);
        // 48-bit words left zero: fall back to words 60-61.
        w[83] = 0x4000 | 1 << 10;
        w[100..104].fill(0);
        assert_eq!(decode_identify(&w).unwrap().sectors, 0x0fff_ffff);
    }

    #[test]
    fn a_28_bit_size_past_the_28_bit_limit_is_clamped() {
        // Found by the ata_identify fuzz target: 0x2020_2020 sectors on a
        // device without 48-bit commands, whose end no command can reach.
        let id = decode_identify(&identify(0x2020_2020)).unwrap();
        assert!(!id.lba48);
        assert_eq!(id.sectors, LBA28_LIMIT);
        assert!(Transfers::new(Drive::Slave, false, id.sectors - 1, 1, false).is_some());
    }

    #[test]
    fn strings_are_swapped_trimmed_and_made_printable() {
        let mut w = identify(1);
        put_string(&mut w[27..47], "  QEMU \"HARDDISK\"");
        w[46] = 0x0001; // garbage at the end
        w[10] = 0x41ff;
        let id = decode_identify(&w).unwrap();
        assert_eq!(id.model, "QEMU 'HARDDISK'");
        assert_eq!(id.serial, "A?HD00011");
    }

    #[test]
    fn the_checksum_is_checked_when_signed() {
        let mut w = identify(2048);
        seal(&mut w);
        assert_eq!(decode_identify(&w).unwrap().sectors, 2048);
        w[60] ^= 1;
        assert_eq!(decode_identify(&w), Err(IdentifyRefusal::Checksum));
    }

    #[test]
    fn unusable_devices_are_refused() {
        let mut w = identify(2048);
        w[0] = 0x8580; // ATAPI CD-ROM
        assert_eq!(decode_identify(&w), Err(IdentifyRefusal::NotAta));
        let mut w = identify(2048);
        w[49] = 0;
        assert_eq!(decode_identify(&w), Err(IdentifyRefusal::NoLba));
        assert_eq!(decode_identify(&identify(0)), Err(IdentifyRefusal::Empty));
        let mut w = identify(2048);
        w[106] = 0x4000 | 1 << 12;
        w[117] = 2048; // words: 4 KiB logical sectors
        assert_eq!(decode_identify(&w), Err(IdentifyRefusal::SectorSize { bytes: 4096 }));
        w[117] = 256; // 512 bytes said the long way is fine
        assert!(decode_identify(&w).is_ok());
    }

    #[test]
    fn a_28_bit_command_packs_lba_27_24_into_the_device_register() {
        let t = Transfer { drive: Drive::Slave, lba: 0x0123_4567, sectors: 9, write: false, ext: false };
        assert_eq!(t.device(), 0xf1);
        assert_eq!(t.command(), command::READ_SECTORS);
        assert_eq!(
            t.parameters().as_slice(),
            &[(Reg::SectorCount, 9), (Reg::LbaLow, 0x67), (Reg::LbaMid, 0x45), (Reg::LbaHigh, 0x23)]
        );
        let t = Transfer { drive: Drive::Master, lba: 5, sectors: 256, write: true, ext: false };
        assert_eq!(t.device(), 0xe0);
        assert_eq!(t.command(), command::WRITE_SECTORS);
        assert_eq!(t.parameters().as_slice()[0], (Reg::SectorCount, 0), "256 is written as 0");
    }

    #[test]
    fn a_48_bit_command_writes_each_register_twice_high_byte_first() {
        let t = Transfer { drive: Drive::Slave, lba: 0xa1b2_c3d4_e5f6, sectors: 0x0109, write: true, ext: true };
        assert_eq!(t.device(), 0xf0, "bits 3:0 are reserved in 48-bit commands");
        assert_eq!(t.command(), command::WRITE_SECTORS_EXT);
        assert_eq!(
            t.parameters().as_slice(),
            &[
                (Reg::SectorCount, 0x01),
                (Reg::SectorCount, 0x09),
                (Reg::LbaLow, 0xc3),
                (Reg::LbaLow, 0xf6),
                (Reg::LbaMid, 0xb2),
                (Reg::LbaMid, 0xe5),
                (Reg::LbaHigh, 0xa1),
                (Reg::LbaHigh, 0xd4),
            ]
        );
        let t = Transfer { sectors: MAX_SECTORS_48, write: false, ..t };
        assert_eq!(t.command(), command::READ_SECTORS_EXT);
        assert_eq!(&t.parameters().as_slice()[..2], &[(Reg::SectorCount, 0), (Reg::SectorCount, 0)]);
    }

    fn plan(lba48: bool, lba: u64, n: u64) -> Option<Vec<(u64, u32, bool)>> {
        Transfers::new(Drive::Slave, lba48, lba, n, false).map(|t| t.map(|t| (t.lba, t.sectors, t.ext)).collect())
    }

    #[test]
    fn transfers_are_split_and_use_48_bit_commands_only_where_needed() {
        assert_eq!(plan(false, 100, 9), Some(alloc::vec![(100, 9, false)]));
        assert_eq!(plan(true, 0, 600), Some(alloc::vec![(0, 256, false), (256, 256, false), (512, 88, false)]));
        assert_eq!(plan(false, 7, 0), Some(alloc::vec![]));
        // A command that would cross the 28-bit limit is a 48-bit one whole.
        let lim = LBA28_LIMIT;
        assert_eq!(plan(true, lim - 4, 9), Some(alloc::vec![(lim - 4, 9, true)]));
        assert_eq!(plan(true, lim - 300, 301), Some(alloc::vec![(lim - 300, 256, false), (lim - 44, 45, true)]));
        assert_eq!(plan(true, lim, 70_000), Some(alloc::vec![(lim, 65536, true), (lim + 65536, 4464, true)]));
        // Not addressable.
        assert_eq!(plan(false, lim - 4, 9), None);
        assert_eq!(plan(false, lim - 9, 9).map(|v| v.len()), Some(1));
        assert_eq!(plan(true, LBA48_LIMIT - 1, 2), None);
        assert_eq!(plan(true, u64::MAX, 2), None);
    }

    #[test]
    fn status_values_are_classified() {
        assert_eq!(state(0xff), State::Floating);
        assert_eq!(state(0x80), State::Busy);
        assert_eq!(state(0x89), State::Busy, "other bits are invalid while BSY");
        assert_eq!(state(0x51), State::Failed);
        assert_eq!(state(0x61), State::Failed);
        assert_eq!(state(0x58), State::Data);
        assert_eq!(state(0x50), State::Idle);
        assert_eq!(state(0x00), State::Idle);
    }

    #[test]
    fn drive_selection_is_read_back_by_the_dev_bit() {
        assert!(Drive::Slave.is_selected_by(0xb0));
        assert!(Drive::Slave.is_selected_by(0xf3));
        assert!(!Drive::Slave.is_selected_by(0xa0));
        assert!(Drive::Master.is_selected_by(0xe0));
        assert!(!Drive::Master.is_selected_by(0xff));
    }
}
