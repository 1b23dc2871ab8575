//! The stream prologue and the configuration record: what a receiver
//! needs to build an empty VM of the right shape before any state arrives.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::checksum::crc32c;
use crate::limits::{MAX_DEVICE_NAME, MAX_DEVICES, MAX_GPA_BITS, MAX_RAM_RANGES, MAX_VCPUS};
use crate::record::{Fields, PROLOGUE_LEN};
use crate::{FORMAT_MAJOR, FORMAT_MINOR, MAGIC, PAGE_SIZE};

/// Prologue flag: a live-migration stream. Pages may come more than once
/// (pre-copy re-sends dirty pages; the last copy wins) and a resume record
/// may split the stream into pre-copy and post-copy.
pub const FLAG_LIVE: u32 = 1 << 0;
/// Flags 0-15 change how a stream must be read: a reader refuses those it
/// does not know. Flags 16-31 are information a reader may ignore.
pub const FLAGS_REQUIRED: u32 = 0xffff;
const FLAGS_KNOWN: u32 = FLAG_LIVE;

/// The vCPU state representation: `vcpu::GuestState`, postcard-encoded,
/// the same on Intel and AMD hosts. The only one so far.
pub const CPU_STATE_NEUTRAL_X86_64: u16 = 1;

/// The VM a stream holds: its shape, known before any state arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// A live-migration stream (see `FLAG_LIVE` in README.md).
    pub live: bool,
    /// The host vendor the state was saved on: information for listings
    /// only, a reader never depends on it.
    pub source: Vendor,
    pub vcpus: u32,
    /// Guest-physical RAM, page-aligned, ascending, not overlapping.
    pub ram: Vec<RamRange>,
    /// The devices whose state the stream carries, each exactly once.
    pub devices: Vec<DeviceInfo>,
}

/// A range of guest-physical RAM, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub base: u64,
    pub size: u64,
}

impl RamRange {
    pub fn first_gfn(&self) -> u64 {
        self.base / PAGE_SIZE as u64
    }

    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE as u64
    }
}

/// A device in the VM and the layout version of its saved state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub version: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Unknown,
    Intel,
    Amd,
    /// A code this version does not name (kept, not refused).
    Other(u8),
}

impl Vendor {
    fn code(self) -> u8 {
        match self {
            Vendor::Unknown => 0,
            Vendor::Intel => 1,
            Vendor::Amd => 2,
            Vendor::Other(c) => c,
        }
    }

    fn from_code(c: u8) -> Vendor {
        match c {
            0 => Vendor::Unknown,
            1 => Vendor::Intel,
            2 => Vendor::Amd,
            c => Vendor::Other(c),
        }
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Vendor::Unknown => f.write_str("unknown"),
            Vendor::Intel => f.write_str("Intel VT-x"),
            Vendor::Amd => f.write_str("AMD-V"),
            Vendor::Other(c) => write!(f, "vendor {c}"),
        }
    }
}

/// Why a configuration was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    Malformed(&'static str),
    CpuFormat(u16),
}

impl Header {
    pub(crate) fn flags(&self) -> u32 {
        if self.live { FLAG_LIVE } else { 0 }
    }

    /// Checks every field against the format's rules and limits.
    pub(crate) fn validate(&self) -> Result<(), &'static str> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err("vCPU count out of range");
        }
        if self.ram.is_empty() || self.ram.len() > usize::from(MAX_RAM_RANGES) {
            return Err("RAM range count out of range");
        }
        let mut prev_end = 0u64;
        for (i, r) in self.ram.iter().enumerate() {
            let page = PAGE_SIZE as u64;
            if r.base % page != 0 || r.size % page != 0 || r.size == 0 {
                return Err("RAM range empty or not page-aligned");
            }
            let end = r.base.checked_add(r.size).ok_or("RAM range wraps")?;
            if end > 1 << MAX_GPA_BITS {
                return Err("RAM range beyond the physical address limit");
            }
            if i > 0 && r.base < prev_end {
                return Err("RAM ranges overlap or are not ascending");
            }
            prev_end = end;
        }
        if self.devices.len() > usize::from(MAX_DEVICES) {
            return Err("too many devices");
        }
        for (i, d) in self.devices.iter().enumerate() {
            check_device_name(&d.name)?;
            if self.devices[..i].iter().any(|e| e.name == d.name) {
                return Err("device listed twice");
            }
        }
        Ok(())
    }

    /// The configuration record's payload (README.md, "Configuration").
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&CPU_STATE_NEUTRAL_X86_64.to_le_bytes());
        b.push(self.source.code());
        b.push(0);
        b.extend_from_slice(&self.vcpus.to_le_bytes());
        // validate() capped both counts well below u16::MAX.
        b.extend_from_slice(&(self.ram.len() as u16).to_le_bytes());
        b.extend_from_slice(&(self.devices.len() as u16).to_le_bytes());
        for r in &self.ram {
            b.extend_from_slice(&r.base.to_le_bytes());
            b.extend_from_slice(&r.size.to_le_bytes());
        }
        for d in &self.devices {
            b.push(d.name.len() as u8);
            b.extend_from_slice(d.name.as_bytes());
            b.extend_from_slice(&d.version.to_le_bytes());
        }
        b
    }

    pub(crate) fn decode(payload: &[u8], flags: u32) -> Result<Header, ConfigError> {
        use ConfigError::Malformed;
        let short = Malformed("configuration too short");
        let mut f = Fields::new(payload);
        let format = f.u16().ok_or(short)?;
        if format != CPU_STATE_NEUTRAL_X86_64 {
            return Err(ConfigError::CpuFormat(format));
        }
        let source = Vendor::from_code(f.u8().ok_or(short)?);
        if f.u8().ok_or(short)? != 0 {
            return Err(Malformed("reserved byte not zero"));
        }
        let vcpus = f.u32().ok_or(short)?;
        let nram = f.u16().ok_or(short)?;
        let ndev = f.u16().ok_or(short)?;
        // Check the counts before reserving anything for them.
        if nram == 0 || nram > MAX_RAM_RANGES {
            return Err(Malformed("RAM range count out of range"));
        }
        if ndev > MAX_DEVICES {
            return Err(Malformed("too many devices"));
        }
        let mut ram = Vec::with_capacity(usize::from(nram));
        for _ in 0..nram {
            ram.push(RamRange { base: f.u64().ok_or(short)?, size: f.u64().ok_or(short)? });
        }
        let mut devices = Vec::with_capacity(usize::from(ndev));
        for _ in 0..ndev {
            let len = f.u8().ok_or(short)?;
            let name = f.bytes(usize::from(len)).ok_or(short)?;
            let name = core::str::from_utf8(name).map_err(|_| Malformed("device name not UTF-8"))?;
            devices.push(DeviceInfo { name: String::from(name), version: f.u16().ok_or(short)? });
        }
        if !f.is_empty() {
            return Err(Malformed("bytes after the device list"));
        }
        let h = Header { live: flags & FLAG_LIVE != 0, source, vcpus, ram, devices };
        h.validate().map_err(Malformed)?;
        Ok(h)
    }
}

pub(crate) fn check_device_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_DEVICE_NAME {
        return Err("device name empty or too long");
    }
    Ok(())
}

/// The fixed prologue: magic, format version, flags, CRC-32C of the 16
/// bytes before it. Its layout never changes, so any reader can say which
/// version a stream is.
pub(crate) fn encode_prologue(flags: u32) -> [u8; PROLOGUE_LEN] {
    let mut b = [0u8; PROLOGUE_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..10].copy_from_slice(&FORMAT_MAJOR.to_le_bytes());
    b[10..12].copy_from_slice(&FORMAT_MINOR.to_le_bytes());
    b[12..16].copy_from_slice(&flags.to_le_bytes());
    let sum = crc32c(&b[..16]);
    b[16..20].copy_from_slice(&sum.to_le_bytes());
    b
}

/// Why a prologue was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PrologueError {
    Magic,
    Checksum,
    Version(u16, u16),
    Flags(u32),
}

/// Checks a prologue; returns its flags. The magic first (is it a stream
/// at all?), then the checksum (so a damaged version number reads as
/// damage), then the version and flags.
pub(crate) fn decode_prologue(b: &[u8; PROLOGUE_LEN]) -> Result<u32, PrologueError> {
    if b[..8] != MAGIC {
        return Err(PrologueError::Magic);
    }
    if u32::from_le_bytes([b[16], b[17], b[18], b[19]]) != crc32c(&b[..16]) {
        return Err(PrologueError::Checksum);
    }
    let major = u16::from_le_bytes([b[8], b[9]]);
    let minor = u16::from_le_bytes([b[10], b[11]]);
    if major != FORMAT_MAJOR {
        return Err(PrologueError::Version(major, minor));
    }
    let flags = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
    if flags & FLAGS_REQUIRED & !FLAGS_KNOWN != 0 {
        return Err(PrologueError::Flags(flags));
    }
    Ok(flags)
}
