//! The CMOS real-time clock and its RAM (Motorola MC146818A, as in every
//! PC): index port 0x70 (bit 7 masks NMIs), data port 0x71.
//!
//! The clock is the host's wall-clock time plus a per-VM offset that moves
//! when the guest sets the time, so it keeps running while a VM is paused or
//! saved, as a battery-backed RTC does; the offset is what is saved. The
//! CMOS RAM carries the memory-size bytes QEMU's `pc` firmware interface
//! puts there, so small guests written for QEMU find them.
//!
//! No interrupts yet (periodic, alarm and update-ended flags are kept, IRQ 8
//! is raised once the interrupt controllers exist); UIP always reads 0, so a
//! guest never waits for an update cycle.

use alloc::vec;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use super::persist::{Invalid, Persist};

/// CMOS bytes addressed through port 0x70 (the basic 128; the clock
/// registers are the first 14).
pub const CMOS_BYTES: usize = 128;

const SECONDS: usize = 0x00;
const MINUTES: usize = 0x02;
const HOURS: usize = 0x04;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
/// IBM's century byte (BCD), where QEMU and SeaBIOS keep it.
const CENTURY: usize = 0x32;

const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const D_VRT: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

/// The guest-visible state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    /// The register port 0x71 reaches.
    pub index: u8,
    /// Bit 7 of the last write to port 0x70.
    pub nmi_masked: bool,
    /// Seconds the guest's clock runs ahead of the host's wall clock.
    pub offset_secs: i64,
    /// CMOS RAM and the control registers (A-D); the time bytes are
    /// computed on read and not kept here.
    pub ram: Vec<u8>,
}

/// The RTC/CMOS device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rtc {
    state: RtcState,
    /// The host's Unix time at its boot (host configuration: not saved).
    host_epoch: u64,
}

/// The calendar fields of a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 1 = Sunday, as the RTC counts.
    weekday: u32,
}

/// Days since 1970-01-01 to a date. Written by hand (no calendar crate in
/// the kernel for twelve lines): Howard Hinnant's `civil_from_days`.
fn civil(unix: i64) -> Civil {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month,
        day,
        hour: secs / 3600,
        minute: secs / 60 % 60,
        second: secs % 60,
        // 1970-01-01 was a Thursday (5 when Sunday is 1).
        weekday: ((days + 4).rem_euclid(7) + 1) as u32,
    }
}

/// "2026-11-23 10:04:05": Unix seconds as a UTC date and time, for reports.
pub fn utc_text(unix: u64) -> alloc::string::String {
    let c = civil(i64::try_from(unix).unwrap_or(i64::MAX / 2));
    alloc::format!("{:04}-{:02}-{:02} {:02}:{:02}:{:02}", c.year, c.month, c.day, c.hour, c.minute, c.second)
}

/// A date to seconds since 1970 (the inverse, `days_from_civil`).
fn unix(c: Civil) -> i64 {
    let y = c.year - i64::from(c.month <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(c.month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(c.day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + i64::from(c.hour * 3600 + c.minute * 60 + c.second)
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0x0f)
}

impl Rtc {
    /// A clock set to the host's time, its CMOS RAM telling a guest with
    /// `ram_bytes` of RAM (from 0) its memory size. `host_epoch` is the
    /// host's Unix time at its boot (the clock reads `host_epoch + now_ns`).
    pub fn new(host_epoch: u64, ram_bytes: u64) -> Rtc {
        let mut ram = vec![0u8; CMOS_BYTES];
        ram[REG_A] = 0x26; // 32.768 kHz time base, 1024 Hz periodic rate
        ram[REG_B] = B_24H;
        ram[REG_D] = D_VRT;
        ram[CENTURY] = 0x20;
        // Memory sizes as QEMU's `pc` machine reports them (hw/i386/pc.c):
        // base KiB; KiB between 1 and 64 MiB; 64 KiB units between 16 MiB and
        // 4 GiB; 64 KiB units above 4 GiB.
        let base = 640u16;
        let ext = (ram_bytes.saturating_sub(1 << 20) >> 10).min(0xffff) as u16;
        let above16 = (ram_bytes.min(1 << 32).saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        let above4g = ram_bytes.saturating_sub(1 << 32) >> 16;
        ram[0x15..0x17].copy_from_slice(&base.to_le_bytes());
        ram[0x17..0x19].copy_from_slice(&ext.to_le_bytes());
        ram[0x30..0x32].copy_from_slice(&ext.to_le_bytes());
        ram[0x34..0x36].copy_from_slice(&above16.to_le_bytes());
        ram[0x5b..0x5e].copy_from_slice(&above4g.to_le_bytes()[..3]);
        Rtc { state: RtcState { index: 0, nmi_masked: false, offset_secs: 0, ram }, host_epoch }
    }

    /// The guest's current time, seconds since 1970.
    fn now(&self, now_ns: u64) -> i64 {
        (self.host_epoch as i64).saturating_add((now_ns / 1_000_000_000) as i64).saturating_add(self.state.offset_secs)
    }

    /// Whether NMIs are masked through port 0x70.
    pub fn nmi_masked(&self) -> bool {
        self.state.nmi_masked
    }

    /// A read of port `offset` (0: 0x70, 1: 0x71).
    pub fn read(&mut self, offset: u64, now_ns: u64) -> u8 {
        if offset == 0 {
            // The index register is write-only on real chipsets; reads
            // float.
            return 0xff;
        }
        let i = usize::from(self.state.index);
        match i {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR => self.time_byte(i, now_ns),
            // Reading C acknowledges the interrupt flags.
            REG_C => core::mem::take(&mut self.state.ram[REG_C]),
            _ => self.state.ram[i],
        }
    }

    /// A write of `value` to port `offset`.
    pub fn write(&mut self, offset: u64, value: u8, now_ns: u64) {
        if offset == 0 {
            self.state.index = value & 0x7f;
            self.state.nmi_masked = value & 0x80 != 0;
            return;
        }
        let i = usize::from(self.state.index);
        match i {
            SECONDS | MINUTES | HOURS | DAY | MONTH | YEAR => self.set_time_byte(i, value, now_ns),
            // The weekday follows from the date here.
            WEEKDAY => {}
            // UIP (bit 7) is read-only.
            REG_A => self.state.ram[REG_A] = (self.state.ram[REG_A] & 0x80) | (value & 0x7f),
            REG_B => self.state.ram[REG_B] = value,
            // Read-only flags and the battery bit.
            REG_C | REG_D => {}
            CENTURY => self.set_time_byte(i, value, now_ns),
            _ => self.state.ram[i] = value,
        }
    }

    fn encode(&self, v: u32) -> u8 {
        if self.state.ram[REG_B] & B_BINARY != 0 { v as u8 } else { to_bcd(v) }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.state.ram[REG_B] & B_BINARY != 0 { u32::from(v) } else { from_bcd(v) }
    }

    fn time_byte(&self, i: usize, now_ns: u64) -> u8 {
        let c = civil(self.now(now_ns));
        match i {
            SECONDS => self.encode(c.second),
            MINUTES => self.encode(c.minute),
            HOURS if self.state.ram[REG_B] & B_24H != 0 => self.encode(c.hour),
            HOURS => {
                let h12 = (c.hour + 11) % 12 + 1;
                self.encode(h12) | if c.hour >= 12 { HOUR_PM } else { 0 }
            }
            WEEKDAY => self.encode(c.weekday),
            DAY => self.encode(c.day),
            MONTH => self.encode(c.month),
            _ => self.encode(c.year.rem_euclid(100) as u32),
        }
    }

    /// The guest sets one field: the clock moves so that field reads back
    /// as written (out-of-range values are clamped to the field's range).
    fn set_time_byte(&mut self, i: usize, value: u8, now_ns: u64) {
        let mut c = civil(self.now(now_ns));
        let century = c.year.div_euclid(100);
        match i {
            SECONDS => c.second = self.decode(value).min(59),
            MINUTES => c.minute = self.decode(value).min(59),
            HOURS => {
                c.hour = if self.state.ram[REG_B] & B_24H != 0 {
                    self.decode(value).min(23)
                } else {
                    let h = self.decode(value & !HOUR_PM).clamp(1, 12) % 12;
                    h + if value & HOUR_PM != 0 { 12 } else { 0 }
                };
            }
            DAY => c.day = self.decode(value).clamp(1, 31),
            MONTH => c.month = self.decode(value).clamp(1, 12),
            YEAR => c.year = century * 100 + i64::from(self.decode(value).min(99)),
            _ => {
                // The century byte is always BCD.
                self.state.ram[CENTURY] = value;
                c.year = i64::from(from_bcd(value).min(99)) * 100 + c.year.rem_euclid(100);
            }
        }
        let target = unix(c);
        self.state.offset_secs = self.state.offset_secs.saturating_add(target.saturating_sub(self.now(now_ns)));
    }

    /// Whether the guest holds the clock (register B's SET bit), for reports.
    pub fn halted(&self) -> bool {
        self.state.ram[REG_B] & B_SET != 0
    }
}

/// A PC clock's registers (seconds, minutes, hours, day, month, year,
/// century, register B: what the host's own RTC holds) as seconds since
/// 1970, or `None` if they are not a valid time.
pub fn unix_from_registers(r: [u8; 8]) -> Option<u64> {
    let b = r[7];
    let field = |v: u8| if b & B_BINARY != 0 { u32::from(v) } else { from_bcd(v) };
    let mut hour = field(r[2] & !HOUR_PM);
    if b & B_24H == 0 {
        hour = hour % 12 + if r[2] & HOUR_PM != 0 { 12 } else { 0 };
    }
    let century = match from_bcd(r[6]) {
        c @ 19..=99 => c,
        // No century byte: assume this one.
        _ => 20,
    };
    let c = Civil {
        year: i64::from(century * 100 + field(r[5])),
        month: field(r[4]),
        day: field(r[3]),
        hour,
        minute: field(r[1]),
        second: field(r[0]),
        weekday: 0,
    };
    let valid = (1..=12).contains(&c.month)
        && (1..=31).contains(&c.day)
        && c.hour < 24
        && c.minute < 60
        && c.second < 60
        && (field(r[5]) < 100);
    let t = unix(c);
    (valid && t >= 0).then_some(t as u64)
}

impl Persist for Rtc {
    type State = RtcState;
    const STATE_VERSION: u16 = 1;

    fn save(&self) -> RtcState {
        self.state.clone()
    }

    fn validate(s: &RtcState) -> Result<(), Invalid> {
        if s.ram.len() != CMOS_BYTES {
            return Err(Invalid("the CMOS RAM is not 128 bytes"));
        }
        if s.index >= CMOS_BYTES as u8 {
            return Err(Invalid("the index register points past the CMOS RAM"));
        }
        Ok(())
    }

    fn restore(&mut self, state: RtcState) {
        self.state = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-01 16:49:05 UTC, a Tuesday.
    const T: u64 = 1_796_143_745;

    fn read(r: &mut Rtc, i: u8, now: u64) -> u8 {
        r.write(0, i, now);
        r.read(1, now)
    }

    fn write(r: &mut Rtc, i: u8, v: u8, now: u64) {
        r.write(0, i, now);
        r.write(1, v, now);
    }

    #[test]
    fn calendar_conversions_round_trip() {
        let c = civil(T as i64);
        assert_eq!((c.year, c.month, c.day, c.hour, c.minute, c.second, c.weekday), (2026, 12, 1, 16, 49, 5, 3));
        assert_eq!(civil(0).weekday, 5, "1970-01-01 was a Thursday");
        assert_eq!((civil(951_782_400).month, civil(951_782_400).day), (2, 29), "2000 was a leap year");
        for t in [0i64, 951_782_400, T as i64, 4_102_444_800, -86_400, 253_402_300_799] {
            assert_eq!(unix(civil(t)), t);
        }
    }

    #[test]
    fn the_clock_reads_the_host_time_in_bcd_and_runs() {
        let mut r = Rtc::new(T - 100, 64 << 20);
        let now = 100_000_000_000; // 100 s after the host booted
        assert_eq!(read(&mut r, 0x00, now), 0x05);
        assert_eq!(read(&mut r, 0x02, now), 0x49);
        assert_eq!(read(&mut r, 0x04, now), 0x16);
        assert_eq!(read(&mut r, 0x06, now), 0x03);
        assert_eq!(read(&mut r, 0x07, now), 0x01);
        assert_eq!(read(&mut r, 0x08, now), 0x12);
        assert_eq!(read(&mut r, 0x09, now), 0x26);
        assert_eq!(read(&mut r, 0x32, now), 0x20);
        assert_eq!(read(&mut r, 0x00, now + 3_000_000_000), 0x08, "three seconds later");
        assert_eq!(read(&mut r, 0x0a, now) & 0x80, 0, "never in an update cycle");
        assert_eq!(read(&mut r, 0x0d, now), 0x80, "battery good");
    }

    #[test]
    fn host_registers_decode() {
        // 2026-12-01 16:49:05 in BCD, 24-hour mode.
        assert_eq!(unix_from_registers([0x05, 0x49, 0x16, 0x01, 0x12, 0x26, 0x20, B_24H]), Some(T));
        // 4:49:05 PM in binary 12-hour mode, no century byte.
        assert_eq!(unix_from_registers([5, 49, 4 | HOUR_PM, 1, 12, 26, 0, B_BINARY]), Some(T));
        assert_eq!(unix_from_registers([0x05, 0x49, 0x16, 0x01, 0x13, 0x26, 0x20, B_24H]), None, "month 13");
        assert_eq!(unix_from_registers([0xff; 8]), None);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut r = Rtc::new(T, 0);
        write(&mut r, 0x0b, B_BINARY, 0);
        assert_eq!(read(&mut r, 0x04, 0), 4 | HOUR_PM, "16h is 4 PM, binary");
        assert_eq!(read(&mut r, 0x02, 0), 49);
        write(&mut r, 0x0b, B_BINARY | B_24H, 0);
        assert_eq!(read(&mut r, 0x04, 0), 16);
    }

    #[test]
    fn setting_the_time_moves_the_clock_and_it_keeps_running() {
        let mut r = Rtc::new(T, 0);
        write(&mut r, 0x0b, B_SET | B_24H, 0);
        write(&mut r, 0x09, 0x30, 0); // year 2030
        write(&mut r, 0x04, 0x07, 0); // 07h
        write(&mut r, 0x0b, B_24H, 0);
        assert_eq!(read(&mut r, 0x09, 0), 0x30);
        assert_eq!(read(&mut r, 0x04, 0), 0x07);
        assert_eq!(read(&mut r, 0x02, 0), 0x49, "other fields unchanged");
        assert_eq!(read(&mut r, 0x00, 2_000_000_000), 0x07);
        // Garbage is clamped, never a panic.
        write(&mut r, 0x08, 0xff, 0);
        assert_eq!(read(&mut r, 0x08, 0), 0x12);
        write(&mut r, 0x07, 0x00, 0);
        assert_eq!(read(&mut r, 0x07, 0), 0x01);
    }

    #[test]
    fn index_nmi_mask_ram_and_flags() {
        let mut r = Rtc::new(T, (6u64 << 30) + (64 << 20));
        r.write(0, 0x80 | 0x40, 0);
        assert!(r.nmi_masked());
        r.write(1, 0xab, 0);
        assert_eq!(r.read(1, 0), 0xab, "CMOS RAM keeps bytes");
        assert_eq!(r.read(0, 0), 0xff);
        assert_eq!(read(&mut r, 0x30, 0), 0xff, "extended memory saturates at 64 MiB");
        assert_eq!(u16::from_le_bytes([read(&mut r, 0x34, 0), read(&mut r, 0x35, 0)]), 0xff00);
        let above = u32::from_le_bytes([read(&mut r, 0x5b, 0), read(&mut r, 0x5c, 0), read(&mut r, 0x5d, 0), 0]);
        assert_eq!(u64::from(above) << 16, (2u64 << 30) + (64 << 20));
        r.state.ram[REG_C] = 0xc0;
        assert_eq!(read(&mut r, 0x0c, 0), 0xc0);
        assert_eq!(read(&mut r, 0x0c, 0), 0, "reading C clears it");
        write(&mut r, 0x0d, 0, 0);
        assert_eq!(read(&mut r, 0x0d, 0), 0x80, "D is read-only");
    }

    #[test]
    fn state_round_trips_and_keeps_the_offset() {
        use crate::devices::persist::{RestoreError, decode, save};
        let mut r = Rtc::new(T, 16 << 20);
        write(&mut r, 0x09, 0x31, 0);
        write(&mut r, 0x50, 0x77, 0);
        let saved = save("rtc", &r);
        // Restored on a host that booted an hour later, 10 s into its uptime.
        let mut other = Rtc::new(T + 3600, 16 << 20);
        other.restore(decode::<Rtc>("rtc", &saved).unwrap());
        assert_eq!(read(&mut other, 0x09, 10_000_000_000), 0x31, "the guest's year survives");
        assert_eq!(read(&mut other, 0x04, 10_000_000_000), 0x17, "and the clock ran on with the host");
        assert_eq!(read(&mut other, 0x50, 0), 0x77);
        let mut bad = save("rtc", &r);
        let mut state = r.save();
        state.ram.pop();
        bad.bytes = postcard::to_allocvec(&state).unwrap();
        assert_eq!(
            decode::<Rtc>("rtc", &bad),
            Err(RestoreError::Invalid { device: "rtc", why: "the CMOS RAM is not 128 bytes" })
        );
    }
}
