//! ATA PIO on the legacy primary channel (ports 0x1f0-0x1f7, control
//! 0x3f6), polled, for Bochs, whose i440fx has no AHCI. It drives the
//! channel's SLAVE only: the master is the boot disk, and no command is
//! ever sent to it. Interrupts stay off (nIEN): the kernel has no IRQ 14
//! handler. Every wait is bounded, so a dead device gives `BlockIo`.
//!
//! Protocols from ATA/ATAPI-6 clause 9 (PIO data-in for READ SECTORS and
//! IDENTIFY DEVICE, PIO data-out for WRITE SECTORS, non-data for FLUSH
//! CACHE); registers and commands from `hypervisor::disk::ata`.

use alloc::format;
use alloc::string::{String, ToString};
use hypervisor::disk::ata::{
    self, Drive, Identity, State, Transfer, Transfers, command, control, decode_identify, status,
};
use hypervisor::disk::capacity_text;
use mm::Error;
use mm::swap::{BLOCK_SIZE, BlockStore, check_transfer};
use x86_64::instructions::port::Port;

use crate::platform::time;

const BASE: u16 = 0x1f0;
const DATA: u16 = BASE;
const ERROR: u16 = BASE + 1;
const DEVICE: u16 = BASE + 6;
/// Status when read, Command when written.
const STATUS: u16 = BASE + 7;
/// Alternate Status when read (no side effects), Device Control when written.
const CONTROL: u16 = 0x3f6;

/// The only drive this driver ever selects. The master is the boot disk.
const DRIVE: Drive = Drive::Slave;

/// How long any one wait may last. Emulated disks answer at once; real
/// ones within a second or two unless spun down.
const TIMEOUT_US: u64 = 5_000_000;

fn inb(port: u16) -> u8 {
    // SAFETY: reads of the primary ATA channel's registers, which this
    // driver owns; reading Status acknowledges an interrupt that nIEN keeps
    // from being raised anyway.
    unsafe { Port::<u8>::new(port).read() }
}

/// Writes a command block or control register.
///
/// # Safety
///
/// The slave must be the selected device (see [`select`]) unless `port` is
/// [`CONTROL`] or [`DEVICE`]: anything else reaches the selected drive.
unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller keeps commands away from the master; the ports are
    // the primary channel's.
    unsafe { Port::<u8>::new(port).write(value) }
}

/// Why a wait ended without the device doing what was asked.
#[derive(Debug)]
enum Fault {
    /// Nothing drives the bus: no controller.
    Floating,
    /// ERR or DF set (status and Error register).
    Failed { status: u8, error: u8 },
    /// Still busy at the deadline.
    Timeout { status: u8 },
    /// The Device register does not show the slave selected.
    NotSelected(u8),
}

impl core::fmt::Display for Fault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Fault::Floating => write!(f, "no ATA controller at {BASE:#x}"),
            Fault::Failed { status, error } => write!(f, "device error (status {status:#04x}, error {error:#04x})"),
            Fault::Timeout { status } => write!(f, "no answer in {} ms (status {status:#04x})", TIMEOUT_US / 1000),
            Fault::NotSelected(d) => write!(f, "the slave does not stay selected (device register {d:#04x})"),
        }
    }
}

/// The ~400 ns the device may take before its status is valid after a
/// Device or Command write: four Alternate Status reads (clause 9).
fn settle() {
    for _ in 0..4 {
        inb(CONTROL);
    }
}

/// Polls Alternate Status until `done` accepts a non-busy state, the
/// command fails, or the deadline passes.
fn wait(done: impl Fn(State) -> bool) -> Result<State, Fault> {
    let start = time::micros();
    // Also bounded by count, should the TSC be unusable.
    for _ in 0..200_000_000u64 {
        let s = inb(CONTROL);
        match ata::state(s) {
            State::Floating => return Err(Fault::Floating),
            State::Failed => return Err(Fault::Failed { status: s, error: inb(ERROR) }),
            State::Busy => {}
            st if done(st) => return Ok(st),
            _ => {}
        }
        if time::micros().wrapping_sub(start) > TIMEOUT_US {
            return Err(Fault::Timeout { status: s });
        }
        core::hint::spin_loop();
    }
    Err(Fault::Timeout { status: inb(CONTROL) })
}

/// Selects the slave with Device register value `device` (which must have
/// DEV set) and waits until it can take a command (BSY and DRQ clear).
fn select(device: u8) -> Result<(), Fault> {
    debug_assert!(DRIVE.is_selected_by(device));
    // Nothing may be written while the current device is busy (clause 9,
    // device selection protocol).
    wait(|s| s == State::Idle)?;
    // SAFETY: writing Device only selects a drive (the slave: DEV is set);
    // Device Control with nIEN only masks the channel's interrupt.
    unsafe {
        outb(CONTROL, control::NIEN);
        outb(DEVICE, device);
    }
    settle();
    // Read it back before any command: if DEV did not stick, the next
    // write could reach the master.
    let d = inb(DEVICE);
    if !DRIVE.is_selected_by(d) {
        return Err(Fault::NotSelected(d));
    }
    wait(|s| s == State::Idle).map(|_| ())
}

/// Reads one sector (256 words, little-endian) from the data port.
fn read_sector(buf: &mut [u8]) {
    let mut port = Port::<u16>::new(DATA);
    for pair in buf.as_chunks_mut::<2>().0 {
        // SAFETY: the device has DRQ set for a data-in block; each read
        // takes the next word of it.
        *pair = unsafe { port.read() }.to_le_bytes();
    }
}

/// Writes one sector to the data port.
fn write_sector(buf: &[u8]) {
    let mut port = Port::<u16>::new(DATA);
    for pair in buf.as_chunks::<2>().0 {
        // SAFETY: the slave is selected, has accepted a WRITE SECTORS
        // command and has DRQ set for this block.
        unsafe { port.write(u16::from_le_bytes(*pair)) };
    }
}

/// The slave disk of the primary ATA channel.
pub struct AtaDisk {
    id: Identity,
    /// A wait timed out: the device is in an unknown state and is not used
    /// again (resetting it would reset the boot disk too).
    dead: bool,
}

impl AtaDisk {
    /// Identifies ata0-slave; `Err` says why it cannot be used (no
    /// controller, no slave, not a disk, unsupported).
    pub fn probe() -> Result<(AtaDisk, String), String> {
        let id = identify().map_err(|e| format!("ata0-slave: {e}"))?;
        let id = id.map_err(|e| format!("ata0-slave: {e}"))?;
        let text = format!("ata0-slave, {}, model \"{}\"", capacity_text(id.sectors), id.model);
        log::debug!("ata0-slave: serial \"{}\", lba48 {}, flush {:?}", id.serial, id.lba48, id.flush_command());
        Ok((AtaDisk { id, dead: false }, text))
    }

    fn run(&mut self, t: Transfer, data: &mut Data<'_>) -> Result<(), Fault> {
        select(t.device())?;
        // SAFETY: `select` has just confirmed the slave is selected.
        unsafe {
            for &(reg, value) in t.parameters().as_slice() {
                outb(BASE + reg.offset(), value);
            }
            outb(STATUS, t.command());
        }
        settle();
        for i in 0..t.sectors as usize {
            // Each block: wait for DRQ, move 256 words (clause 9, PIO
            // data-in / data-out).
            wait(|s| s == State::Data)?;
            let at = i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE;
            match data {
                Data::In(buf) => read_sector(&mut buf[at]),
                Data::Out(buf) => write_sector(&buf[at]),
            }
            // DRQ may still read set for a moment after the block.
            settle();
        }
        // After the last block the device goes busy, then reports.
        wait(|s| s == State::Idle).map(|_| ())
    }

    fn transfer(&mut self, block: u64, mut data: Data<'_>) -> Result<(), Error> {
        let write = matches!(data, Data::Out(_));
        let n = check_transfer(self.id.sectors, block, data.len())?;
        let io = Error::BlockIo { block, write };
        if self.dead {
            return Err(io);
        }
        let plan = Transfers::new(DRIVE, self.id.lba48, block, n, write).ok_or(io)?;
        for t in plan {
            if let Err(e) = self.run(t, &mut data) {
                let op = if write { "write" } else { "read" };
                log::warn!("ata0-slave: {op} of {} blocks at {}: {e}", t.sectors, t.lba);
                self.dead |= matches!(e, Fault::Timeout { .. } | Fault::Floating | Fault::NotSelected(_));
                return Err(Error::BlockIo { block: t.lba, write });
            }
            data.advance(t.sectors as usize * BLOCK_SIZE);
        }
        Ok(())
    }
}

/// The caller's buffer for one transfer, consumed from the front command
/// by command.
enum Data<'a> {
    In(&'a mut [u8]),
    Out(&'a [u8]),
}

impl Data<'_> {
    fn len(&self) -> usize {
        match self {
            Data::In(b) => b.len(),
            Data::Out(b) => b.len(),
        }
    }

    fn advance(&mut self, n: usize) {
        match self {
            Data::In(b) => *b = &mut core::mem::take(b)[n..],
            Data::Out(b) => *b = &b[n..],
        }
    }
}

/// IDENTIFY DEVICE on the slave: the outer error is the channel's, the inner
/// a refusal of what the device said.
fn identify() -> Result<Result<Identity, ata::IdentifyRefusal>, String> {
    if inb(CONTROL) == 0xff {
        return Err(Fault::Floating.to_string());
    }
    select(DRIVE.select()).map_err(|e| e.to_string())?;
    // A present device shows DRDY once selected; for an absent slave the
    // master answers Status reads with 0 (clause 9, device selection).
    if inb(CONTROL) & status::DRDY == 0 {
        return Err(String::from("no device"));
    }
    // SAFETY: the slave is selected (checked by `select`); IDENTIFY DEVICE
    // only reads.
    unsafe { outb(STATUS, command::IDENTIFY_DEVICE) };
    settle();
    match wait(|s| s == State::Data) {
        Ok(_) => {}
        Err(Fault::Failed { .. }) => {
            // ATAPI devices abort IDENTIFY DEVICE and leave their signature
            // in LBA Mid/High (clause 9, signature and persistence).
            let sig = (inb(BASE + 4), inb(BASE + 5));
            return Err(if sig == (0x14, 0xeb) {
                String::from("ATAPI device, not a disk")
            } else {
                String::from("IDENTIFY DEVICE aborted")
            });
        }
        Err(e) => return Err(e.to_string()),
    }
    let mut bytes = [0u8; 512];
    read_sector(&mut bytes);
    wait(|s| s == State::Idle).map_err(|e| e.to_string())?;
    let words: [u16; 256] = core::array::from_fn(|i| u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]));
    Ok(decode_identify(&words))
}

impl BlockStore for AtaDisk {
    fn block_count(&self) -> u64 {
        self.id.sectors
    }

    fn read(&mut self, block: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.transfer(block, Data::In(buf))
    }

    fn write(&mut self, block: u64, buf: &[u8]) -> Result<(), Error> {
        self.transfer(block, Data::Out(buf))
    }

    fn flush(&mut self) -> Result<(), Error> {
        let io = Error::BlockIo { block: 0, write: true };
        if self.dead {
            return Err(io);
        }
        let Some(cmd) = self.id.flush_command() else { return Ok(()) };
        let r = select(DRIVE.select() | 0x40).and_then(|()| {
            // SAFETY: `select` confirmed the slave is selected.
            unsafe { outb(STATUS, cmd) };
            settle();
            // Non-data protocol: BSY until the cache is written.
            wait(|s| s == State::Idle).map(|_| ())
        });
        r.map_err(|e| {
            log::warn!("ata0-slave: flush: {e}");
            self.dead |= matches!(e, Fault::Timeout { .. });
            io
        })
    }
}
