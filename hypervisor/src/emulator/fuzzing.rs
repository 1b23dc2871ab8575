//! A mock platform and a checking function for fuzzing the emulator, here
//! rather than under `#[cfg(test)]` so a cargo-fuzz target can call
//! [`check`] with its input. The unit tests use the same mock.
//!
//! The mock is a small guest: `RAM_SIZE` bytes of RAM from guest-physical
//! 0, page tables built in it for the mode (4-level paging in 64-bit mode,
//! 32-bit paging in 32-bit mode, none in 16-bit real mode), and one device
//! page that records every access.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;

use iced_x86::{Decoder, DecoderOptions, OpKind};
use vcpu::walk::{Paging, translate_with};
use vcpu::{Gprs, MemAccess};

use super::flags::{RF, STATUS, mask};
use super::{Emulated, Error, MmioFault, Mode, PageFaultCode, Platform, PortExit, Seg, emulate, page, string_io};

/// Guest RAM: guest-physical [0, RAM_SIZE).
pub const RAM_SIZE: u64 = 0x10000;
/// A page of code (identity-mapped, like all RAM but `HOLE`).
pub const CODE: u64 = 0xa000;
/// The page after `CODE`, left unmapped so fetches and accesses can fault.
pub const HOLE: u64 = 0xb000;
/// Four data pages in RAM, up to `RAM_SIZE`.
pub const DATA: u64 = 0xc000;
/// The device page in 32- and 64-bit modes, identity-mapped...
pub const MMIO: u64 = 0xfebf_0000;
/// ...and mapped a second time here (a linear address unlike the physical).
pub const MMIO_ALIAS: u64 = 0x4000_0000;
/// The device page in 16-bit (real) mode, where paging is off.
pub const MMIO_REAL: u64 = 0xa_0000;
/// The pages the page-table builder allocates from (RAM below `TABLES_END`
/// is not mapped).
const TABLES: u64 = 0x1000;
const TABLES_END: u64 = 0x9000;

/// The device's registers at reset: a pattern, so that different registers
/// read differently (built at compile time: the fuzz loop makes a mock per
/// case).
const DEVICE_PATTERN: [u8; 4096] = {
    let mut a = [0u8; 4096];
    let mut i = 0;
    while i < 4096 {
        a[i] = ((i as u32).wrapping_mul(0x9d) >> 1 ^ 0x5a) as u8;
        i += 1;
    }
    a
};

/// One device access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceAccess {
    pub write: bool,
    pub gpa: u64,
    pub size: u8,
    pub value: u64,
}

/// The mock guest.
#[derive(Clone, Debug)]
pub struct Mock {
    pub gprs: Gprs,
    pub rip: u64,
    pub rflags: u64,
    pub mode: Mode,
    /// Segment bases, indexed by `Seg as usize`.
    pub seg_base: [u64; 6],
    /// CPL, for the U/S bit of page-fault error codes.
    pub cpl: u8,
    pub paging: Paging,
    pub ram: Vec<u8>,
    /// The guest-physical address of the device page.
    pub device_gpa: u64,
    /// The device's registers: reads return these bytes, writes store them.
    pub device: Vec<u8>,
    pub log: Vec<DeviceAccess>,
    /// Bytes written to RAM through the platform.
    pub ram_written: usize,
    /// Port accesses (string I/O): (port, size, write, value). Port reads
    /// return 0x11, 0x12, ... (masked to the width).
    pub port_log: Vec<(u16, u8, bool, u32)>,
    /// The port write after which [`Ports::port_write`] says "stop", if any
    /// (a write that powers the VM off).
    pub stop_after_port_writes: Option<usize>,
    next_table: u64,
}

impl Mock {
    /// A guest in `mode` with the RAM and device pages mapped, CS:RIP at
    /// `CODE` (in 16-bit mode CS's base is `CODE`), RFLAGS 2, registers and
    /// other segment bases zero, and the device filled with a pattern.
    pub fn new(mode: Mode) -> Mock {
        let mut m = Mock {
            gprs: Gprs::default(),
            rip: CODE,
            rflags: 2,
            mode,
            seg_base: [0; 6],
            cpl: 0,
            paging: Paging::default(),
            ram: vec![0; RAM_SIZE as usize],
            device_gpa: if mode == Mode::Bits16 { MMIO_REAL } else { MMIO },
            device: DEVICE_PATTERN.to_vec(),
            log: Vec::new(),
            ram_written: 0,
            port_log: Vec::new(),
            stop_after_port_writes: None,
            next_table: TABLES,
        };
        if mode == Mode::Bits16 {
            m.seg_base[Seg::Cs as usize] = CODE;
            m.rip = 0;
            return m;
        }
        let root = m.alloc_table();
        m.paging = match mode {
            Mode::Bits64 => Paging::long_mode(root),
            _ => Paging { cr0: 1 | (1 << 31), cr3: root, cr4: 0, efer: 0 },
        };
        for a in (0..RAM_SIZE).step_by(4096) {
            if a != HOLE && a >= TABLES_END {
                m.map(a, a);
            }
        }
        m.map(MMIO, MMIO);
        m.map(MMIO_ALIAS, MMIO);
        m
    }

    /// The linear address the guest reaches the device page at.
    pub fn device_gva(&self) -> u64 {
        self.device_gpa
    }

    /// Places instruction bytes at linear `CODE + offset` and points CS:RIP
    /// there.
    pub fn set_code(&mut self, offset: u64, bytes: &[u8]) {
        let at = (CODE + offset) as usize;
        let end = (at + bytes.len()).min(self.ram.len());
        self.ram[at..end].copy_from_slice(&bytes[..end - at]);
        self.rip = CODE + offset - self.seg_base[Seg::Cs as usize];
    }

    /// The device's bytes at `offset`, little-endian.
    pub fn device_u64(&self, offset: usize, size: usize) -> u64 {
        let mut b = [0u8; 8];
        b[..size].copy_from_slice(&self.device[offset..offset + size]);
        u64::from_le_bytes(b)
    }

    pub fn set_device(&mut self, offset: usize, size: usize, v: u64) {
        self.device[offset..offset + size].copy_from_slice(&v.to_le_bytes()[..size]);
    }

    fn alloc_table(&mut self) -> u64 {
        let t = self.next_table;
        self.next_table += 4096;
        assert!(self.next_table <= TABLES_END, "mock page tables overflow their pages");
        t
    }

    fn entry(&self, at: u64, wide: bool) -> u64 {
        let at = at as usize;
        let mut b = [0u8; 8];
        let n = if wide { 8 } else { 4 };
        b[..n].copy_from_slice(&self.ram[at..at + n]);
        u64::from_le_bytes(b)
    }

    fn set_entry(&mut self, at: u64, wide: bool, v: u64) {
        let at = at as usize;
        let n = if wide { 8 } else { 4 };
        self.ram[at..at + n].copy_from_slice(&v.to_le_bytes()[..n]);
    }

    /// Maps the 4 KiB page at `gva` to `gpa`, present, writable, user.
    pub fn map(&mut self, gva: u64, gpa: u64) {
        const PWU: u64 = 7;
        let wide = self.mode == Mode::Bits64;
        let levels: &[u32] = if wide { &[39, 30, 21, 12] } else { &[22, 12] };
        let index_mask = if wide { 0x1ff } else { 0x3ff };
        let entry_size = if wide { 8 } else { 4 };
        let mut table = self.paging.cr3 & !0xfff;
        for (n, &shift) in levels.iter().enumerate() {
            let at = table + ((gva >> shift) & index_mask) * entry_size;
            if n == levels.len() - 1 {
                self.set_entry(at, wide, gpa | PWU);
                return;
            }
            let e = self.entry(at, wide);
            table = if e & 1 != 0 {
                e & 0xffff_f000
            } else {
                let t = self.alloc_table();
                self.set_entry(at, wide, t | PWU);
                t
            };
        }
    }

    /// Removes the mapping of the page at `gva` (its last-level entry).
    pub fn unmap(&mut self, gva: u64) {
        let wide = self.mode == Mode::Bits64;
        let levels: &[u32] = if wide { &[39, 30, 21, 12] } else { &[22, 12] };
        let index_mask = if wide { 0x1ff } else { 0x3ff };
        let entry_size = if wide { 8 } else { 4 };
        let mut table = self.paging.cr3 & !0xfff;
        for (n, &shift) in levels.iter().enumerate() {
            let at = table + ((gva >> shift) & index_mask) * entry_size;
            let e = self.entry(at, wide);
            if e & 1 == 0 {
                return;
            }
            if n == levels.len() - 1 {
                self.set_entry(at, wide, 0);
                return;
            }
            table = e & 0xffff_f000;
        }
    }

    fn in_device(&self, gpa: u64, size: u8) -> Option<usize> {
        let off = gpa.checked_sub(self.device_gpa)?;
        (off + u64::from(size) <= 4096).then_some(off as usize)
    }

    fn ram_range(&self, gpa: u64, len: usize) -> Option<core::ops::Range<usize>> {
        let end = gpa.checked_add(len as u64)?;
        (end <= self.ram.len() as u64).then_some(gpa as usize..end as usize)
    }
}

impl Platform for Mock {
    fn gprs(&self) -> &Gprs {
        &self.gprs
    }
    fn gprs_mut(&mut self) -> &mut Gprs {
        &mut self.gprs
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn set_rip(&mut self, rip: u64) {
        self.rip = rip;
    }
    fn rflags(&self) -> u64 {
        self.rflags
    }
    fn set_rflags(&mut self, rflags: u64) {
        self.rflags = rflags;
    }
    fn mode(&self) -> Mode {
        self.mode
    }
    fn segment_base(&self, seg: Seg) -> u64 {
        self.seg_base[seg as usize]
    }

    fn translate(&mut self, gva: u64, access: MemAccess) -> Result<u64, PageFaultCode> {
        let ram = &self.ram;
        let read64 = |a: u64| {
            let a = usize::try_from(a).ok()?;
            ram.get(a..a.checked_add(8)?).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        };
        translate_with(self.paging, gva, read64).ok_or_else(|| {
            // Not present (P = 0), with W/R, U/S and I/D (SDM Vol. 3A 4.7).
            let mut code = 0;
            if access == MemAccess::Write {
                code |= 1 << 1;
            }
            if self.cpl == 3 {
                code |= 1 << 2;
            }
            if access == MemAccess::Execute {
                code |= 1 << 4;
            }
            PageFaultCode(code)
        })
    }

    fn read_ram(&mut self, gpa: u64, buf: &mut [u8]) -> bool {
        match self.ram_range(gpa, buf.len()) {
            Some(r) => {
                buf.copy_from_slice(&self.ram[r]);
                true
            }
            None => false,
        }
    }

    fn write_ram(&mut self, gpa: u64, data: &[u8]) -> bool {
        match self.ram_range(gpa, data.len()) {
            Some(r) => {
                self.ram[r].copy_from_slice(data);
                self.ram_written += data.len();
                true
            }
            None => false,
        }
    }

    fn mmio_read(&mut self, gpa: u64, size: u8) -> u64 {
        let value = match self.in_device(gpa, size) {
            Some(off) => self.device_u64(off, usize::from(size)),
            None => mask(size),
        };
        self.log.push(DeviceAccess { write: false, gpa, size, value });
        value
    }

    fn mmio_write(&mut self, gpa: u64, size: u8, value: u64) {
        if let Some(off) = self.in_device(gpa, size) {
            self.set_device(off, usize::from(size), value);
        }
        self.log.push(DeviceAccess { write: true, gpa, size, value });
    }
}

impl super::Ports for Mock {
    fn port_read(&mut self, port: u16, size: u8) -> u32 {
        let value = (0x11 + self.port_log.len() as u32) & mask(size) as u32;
        self.port_log.push((port, size, false, value));
        value
    }

    fn port_write(&mut self, port: u16, size: u8, value: u32) -> bool {
        self.port_log.push((port, size, true, value));
        let writes = self.port_log.iter().filter(|a| a.2).count();
        self.stop_after_port_writes != Some(writes)
    }
}

/// Takes fields from the front of the fuzz input, zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        self.field(1) as u8
    }

    /// `bytes` little-endian bytes (at most 8), always consumed whole.
    fn field(&mut self, bytes: usize) -> u64 {
        let (head, rest) = self.0.split_at(bytes.min(self.0.len()));
        self.0 = rest;
        head.iter().rev().fold(0, |v, &b| (v << 8) | u64::from(b))
    }
}

/// What [`check`] saw, for a loop test to measure how deep it got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Emulated(Emulated),
    Refused(Error),
}

/// Bytes of fuzz input before the instruction bytes (see [`check`]).
pub const HEADER: usize = 1 + 16 * 9 + 3 + 5 * 9 + 3 + 2;

/// Runs one fuzz case and checks the emulator's promises; panics (the
/// fuzzer's signal) if one is broken.
///
/// Input, fixed-size fields so the fuzzer's mutations stay in place: the
/// mode; per register a kind (the device page, its alias, a small number,
/// a RAM address, any value) and 8 bytes of operand; RFLAGS (3 bytes); per
/// segment ES, SS, DS, FS, GS a base kind and 8 bytes; the faulting offset
/// in the device page (2) and its direction (1); where the code sits (2);
/// then up to 15 instruction bytes. `HEADER` is the length before them.
///
/// Promises: no panic; on success the length is 1..=15, RIP moved by it
/// (or, for an unfinished REP, not at all), only registers the instruction
/// names (and RAX, RCX, RSI, RDI for string instructions) and only the
/// status flags and RF changed, and every device access is within the
/// faulting page; on a refusal nothing changed at all.
pub fn check(data: &[u8]) -> Outcome {
    let mut input = Input(data);
    let mode = match input.byte() % 3 {
        0 => Mode::Bits16,
        1 => Mode::Bits32,
        _ => Mode::Bits64,
    };
    let mut m = Mock::new(mode);
    let device = m.device_gva();
    let alias = if mode == Mode::Bits16 { 0 } else { MMIO_ALIAS };
    for n in 0..16 {
        let kind = input.byte();
        let operand = input.field(8);
        let v = match kind % 5 {
            0 => device + operand % 4096,
            1 => alias + operand % 4096,
            2 => operand & 0xff,
            3 => DATA + operand % 0x2000,
            _ => operand,
        };
        m.gprs.set(n, v);
    }
    m.rflags = 2 | (input.field(3) & (STATUS | super::flags::DF | super::flags::TF | RF));
    for seg in [Seg::Es, Seg::Ss, Seg::Ds, Seg::Fs, Seg::Gs] {
        let kind = input.byte();
        let operand = input.field(8);
        m.seg_base[seg as usize] = match kind % 4 {
            0 => device,
            1 => DATA,
            2 => operand,
            _ => 0,
        };
    }
    let offset_in_page = input.field(2) % 4096;
    let direction = input.byte();
    let fault = MmioFault {
        gpa: m.device_gpa + offset_in_page,
        access: if direction & 1 == 0 { MemAccess::Read } else { MemAccess::Write },
        gva: None,
    };
    // Bit 1: a port exit (INS/OUTS) instead: DX's port (or, with bit 2,
    // another), the width from bits 3-4.
    let port_exit = (direction & 2 != 0).then(|| PortExit {
        port: if direction & 4 == 0 { m.gprs.rdx as u16 } else { offset_in_page as u16 },
        size: [1, 2, 4, 4][usize::from(direction >> 3) & 3],
        write: direction & 1 != 0,
    });
    // Code at the start of its page, or ending 1..15 bytes into the hole.
    let place = input.field(2);
    let offset = if place % 4 == 0 { 4096 - 1 - (place >> 8) % 15 } else { 0 };
    let code: Vec<u8> = input.0.iter().copied().take(15).collect();
    m.set_code(offset, &code);
    let (gprs, rip, rflags) = (m.gprs, m.rip, m.rflags);
    // The bytes as the guest sees them (the input may be shorter), kept
    // before a string instruction can overwrite them.
    let at = (CODE + offset) as usize;
    let mut bytes = [0u8; 15];
    bytes.copy_from_slice(&m.ram[at..at + 15]);

    if let Some(exit) = port_exit {
        return check_string_io(&mut m, &exit, mode, &bytes);
    }
    let result = emulate(&mut m, &fault);
    match result {
        Err(e) => {
            assert_eq!((m.gprs, m.rip, m.rflags), (gprs, rip, rflags), "{e:?} changed the registers");
            assert!(m.log.is_empty(), "{e:?} after device accesses {:?}", m.log);
            assert_eq!(m.ram_written, 0, "{e:?} after writing RAM");
            // The report and the fault decision must not panic either.
            let _ = e.fault();
            let _ = write!(Sink, "{e}");
            Outcome::Refused(e)
        }
        Ok(done) => {
            let len = u64::from(done.len);
            assert!((1..=15).contains(&len), "length {len}");
            let decoded = Decoder::try_with_ip(mode.bits(), &bytes, rip, DecoderOptions::NONE).map(|mut d| d.decode());
            let Ok(insn) = decoded else { panic!("emulated what does not decode") };
            assert_eq!(insn.len() as u64, len, "emulated length differs from a fresh decode");
            let string = (0..insn.op_count()).any(|n| super::exec::is_string_operand(insn.op_kind(n)));
            let ip_mask = match mode {
                Mode::Bits16 => 0xffff,
                Mode::Bits32 => 0xffff_ffff,
                Mode::Bits64 => u64::MAX,
            };
            if done.completed {
                assert_eq!(m.rip, rip.wrapping_add(len) & ip_mask, "RIP not advanced by the length");
            } else {
                assert!(string, "only REP string instructions stop early");
                assert_eq!(m.rip, rip, "an unfinished instruction moved RIP");
            }
            let mut allowed = 0u16;
            for n in 0..insn.op_count() {
                if insn.op_kind(n) == OpKind::Register
                    && let Some(g) = super::exec::Gpr::of(insn.op_register(n))
                {
                    allowed |= 1 << g.num();
                }
            }
            if string {
                // RAX, RCX, RSI, RDI.
                allowed |= 0b1100_0011;
            }
            for n in 0..16u8 {
                if allowed & (1 << n) == 0 {
                    assert_eq!(m.gprs.get(n), gprs.get(n), "register {n} changed");
                }
            }
            assert_eq!((m.rflags ^ rflags) & !(STATUS | RF), 0, "RFLAGS beyond the status flags changed");
            assert!(!m.log.is_empty() || string, "emulated without touching the device");
            for a in &m.log {
                assert!([1, 2, 4, 8].contains(&a.size), "device access of {} bytes", a.size);
                let last = a.gpa + u64::from(a.size) - 1;
                assert!(page(a.gpa) == page(fault.gpa) && page(last) == page(fault.gpa), "access {a:?} off the page");
            }
            if !string {
                assert!(m.log.len() <= 2 && m.ram_written == 0, "{:?}", m.log);
            }
            Outcome::Emulated(done)
        }
    }
}

/// The promises of [`string_io`]: on a refusal nothing changed and no port
/// was touched; on success only RCX, RSI and RDI and RF changed, RIP moved
/// by the length (or not at all, unfinished), no device page was touched,
/// and every port access is the exit's port and width.
fn check_string_io(m: &mut Mock, exit: &PortExit, mode: Mode, bytes: &[u8; 15]) -> Outcome {
    let (gprs, rip, rflags) = (m.gprs, m.rip, m.rflags);
    match string_io(m, exit) {
        Err(e) => {
            assert_eq!((m.gprs, m.rip, m.rflags), (gprs, rip, rflags), "{e:?} changed the registers");
            assert!(m.port_log.is_empty(), "{e:?} after port accesses {:?}", m.port_log);
            assert_eq!(m.ram_written, 0, "{e:?} after writing RAM");
            let _ = e.fault();
            let _ = write!(Sink, "{e}");
            Outcome::Refused(e)
        }
        Ok(done) => {
            let decoded = Decoder::try_with_ip(mode.bits(), bytes, rip, DecoderOptions::NONE).map(|mut d| d.decode());
            let Ok(insn) = decoded else { panic!("emulated what does not decode") };
            assert_eq!(insn.len(), usize::from(done.len), "emulated length differs from a fresh decode");
            let ip_mask = match mode {
                Mode::Bits16 => 0xffff,
                Mode::Bits32 => 0xffff_ffff,
                Mode::Bits64 => u64::MAX,
            };
            if done.completed {
                assert_eq!(m.rip, rip.wrapping_add(u64::from(done.len)) & ip_mask, "RIP not advanced by the length");
            } else {
                assert_eq!(m.rip, rip, "an unfinished instruction moved RIP");
                assert!(!m.port_log.is_empty(), "stopped before its first iteration without a refusal");
            }
            for n in (0..16u8).filter(|n| ![1, 6, 7].contains(n)) {
                assert_eq!(m.gprs.get(n), gprs.get(n), "register {n} changed");
            }
            assert_eq!((m.rflags ^ rflags) & !RF, 0, "RFLAGS beyond RF changed");
            assert!(m.log.is_empty(), "string I/O touched the device page: {:?}", m.log);
            for &(port, size, write, _) in &m.port_log {
                assert_eq!((port, size, write), (exit.port, exit.size, exit.write), "not the exit's port access");
            }
            Outcome::Emulated(done)
        }
    }
}

/// Discards formatted text.
struct Sink;

impl Write for Sink {
    fn write_str(&mut self, _: &str) -> core::fmt::Result {
        Ok(())
    }
}
