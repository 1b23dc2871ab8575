//! Intel 82540EM ("e1000") ring logic: reset, legacy receive and transmit
//! descriptor rings, polled. The register and DMA accesses go through
//! [`Hw`], so this runs against a simulated device in host tests and
//! against the real BAR and host frames in the kernel
//! (`platform::net`). Sections cited are of the PCI/PCI-X Family of
//! Gigabit Ethernet Controllers Software Developer's Manual (8254x SDM,
//! 317453).
//!
//! The device is hostile input: a descriptor's length, status and error
//! bits are checked before use, the ring position is our own (never the
//! head register the device reports), and a bad descriptor costs one
//! dropped frame, counted.

use super::{Counters, Nic};

/// Register offsets in BAR0 (8254x SDM 13.4, table 13-2).
pub mod reg {
    pub const CTRL: u32 = 0x0000;
    pub const STATUS: u32 = 0x0008;
    pub const EERD: u32 = 0x0014;
    pub const FCAL: u32 = 0x0028;
    pub const FCAH: u32 = 0x002c;
    pub const FCT: u32 = 0x0030;
    pub const ICR: u32 = 0x00c0;
    pub const IMC: u32 = 0x00d8;
    pub const RCTL: u32 = 0x0100;
    pub const FCTTV: u32 = 0x0170;
    pub const TCTL: u32 = 0x0400;
    pub const TIPG: u32 = 0x0410;
    pub const RDBAL: u32 = 0x2800;
    pub const RDBAH: u32 = 0x2804;
    pub const RDLEN: u32 = 0x2808;
    pub const RDH: u32 = 0x2810;
    pub const RDT: u32 = 0x2818;
    pub const RDTR: u32 = 0x2820;
    pub const TDBAL: u32 = 0x3800;
    pub const TDBAH: u32 = 0x3804;
    pub const TDLEN: u32 = 0x3808;
    pub const TDH: u32 = 0x3810;
    pub const TDT: u32 = 0x3818;
    /// Missed packets count: frames lost for want of a free receive
    /// descriptor (13.7.4); clears on read.
    pub const MPC: u32 = 0x4010;
    /// Multicast table array, 128 dwords (13.4.36).
    pub const MTA: u32 = 0x5200;
    pub const RAL0: u32 = 0x5400;
    pub const RAH0: u32 = 0x5404;
}

/// CTRL bits (13.4.1).
const CTRL_SLU: u32 = 1 << 6;
const CTRL_ASDE: u32 = 1 << 5;
const CTRL_LRST: u32 = 1 << 3;
const CTRL_RST: u32 = 1 << 26;
const CTRL_PHY_RST: u32 = 1 << 31;
/// STATUS: link up (13.4.2).
const STATUS_LU: u32 = 1 << 1;
/// EERD: start, done, address at 15:8, data at 31:16 (13.4.4).
const EERD_START: u32 = 1 << 0;
const EERD_DONE: u32 = 1 << 4;
/// RAH: address valid (13.4.37).
const RAH_AV: u32 = 1 << 31;
/// RCTL (13.4.22): enable, accept broadcast, strip the CRC; BSIZE 00 with
/// BSEX 0 is 2048-byte buffers, LPE 0 refuses frames over 1522 bytes.
const RCTL_EN: u32 = 1 << 1;
const RCTL_BAM: u32 = 1 << 15;
const RCTL_SECRC: u32 = 1 << 26;
/// RCTL unicast and multicast promiscuous: every frame on the wire.
const RCTL_UPE: u32 = 1 << 3;
const RCTL_MPE: u32 = 1 << 4;
/// TCTL (13.4.33): enable, pad short packets, collision threshold 0x0f and
/// full-duplex collision distance 0x40, as 14.5 recommends.
const TCTL_EN: u32 = 1 << 1;
const TCTL_PSP: u32 = 1 << 3;
const TCTL_CT: u32 = 0x0f << 4;
const TCTL_COLD: u32 = 0x40 << 12;
/// TIPG for the 82540EM's copper PHY: IPGT 10, IPGR1 8, IPGR2 6 (13.4.34).
const TIPG_COPPER: u32 = 10 | (8 << 10) | (6 << 20);

/// Receive descriptor status and error bits (3.2.3.1, 3.2.3.2).
const RX_DD: u8 = 1 << 0;
const RX_EOP: u8 = 1 << 1;
/// CE, SE, SEQ, CXE, RXE: the frame itself is bad. TCPE/IPE (checksum
/// offload, not enabled) are left to the stack, which checks anyway.
const RX_ERR_FRAME: u8 = 0b1001_0111;
/// Transmit command bits (3.3.3.1): end of packet, insert FCS, report
/// status (so DD is written back).
const TX_EOP: u8 = 1 << 0;
const TX_IFCS: u8 = 1 << 1;
const TX_RS: u8 = 1 << 3;
/// Transmit status: descriptor done (3.3.3.2).
const TX_DD: u8 = 1 << 0;

/// Descriptors per ring: the ring length in bytes must be a multiple of
/// 128 (13.4.27, 13.4.38), i.e. of 8 descriptors.
pub const RX_RING: usize = 128;
pub const TX_RING: usize = 128;
const DESC: usize = 16;
const _: () = assert!((RX_RING * DESC).is_multiple_of(128) && (TX_RING * DESC).is_multiple_of(128));
/// Receive buffer size (RCTL.BSIZE 00, 13.4.22); also the transmit
/// buffers' size.
pub const BUF: usize = 2048;
/// Largest frame handed to the device or accepted from it, without CRC
/// (1500 bytes of payload, Ethernet header, one VLAN tag).
pub const MAX_FRAME: usize = 1518;

/// What the driver needs of the platform: the BAR's registers and DMA
/// memory the device can reach.
pub trait Hw {
    fn read(&mut self, reg: u32) -> u32;
    fn write(&mut self, reg: u32, value: u32);
    /// `bytes` of zeroed, physically contiguous, 4 KiB-aligned memory the
    /// device can reach; its bus address. Never freed: the rings live as
    /// long as the host.
    fn dma_alloc(&mut self, bytes: usize) -> Option<u64>;
    /// Copies out of / into DMA memory from `dma_alloc` (volatile: the
    /// device writes it behind the compiler's back).
    fn dma_read(&mut self, addr: u64, buf: &mut [u8]);
    fn dma_write(&mut self, addr: u64, data: &[u8]);
    fn delay_us(&mut self, us: u64);
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitError {
    NoMemory,
    /// CTRL.RST did not clear within 10 ms.
    ResetStuck,
    /// Neither RAL0/RAH0 nor the EEPROM had a unicast MAC address.
    NoMac,
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            InitError::NoMemory => "no memory for the descriptor rings",
            InitError::ResetStuck => "the device did not come out of reset",
            InitError::NoMac => "no MAC address in the receive address register or the EEPROM",
        })
    }
}

/// One 82540EM, initialised, with its rings.
pub struct E1000<H: Hw> {
    hw: H,
    mac: [u8; 6],
    rx_ring: u64,
    rx_bufs: u64,
    /// The next receive descriptor the device will fill (ours, not RDH).
    rx_next: usize,
    /// Inside a frame spread over several descriptors (no EOP yet): its
    /// remaining descriptors are dropped up to and including the EOP one.
    rx_discarding: bool,
    tx_ring: u64,
    tx_bufs: u64,
    /// The next descriptor to fill, and the oldest one still owned by the
    /// device; `tx_busy` of them are in flight.
    tx_tail: usize,
    tx_clean: usize,
    tx_busy: usize,
    /// Descriptors given back / queued since the tail register was last
    /// written: tails move once per batch, not per frame (each write is an
    /// MMIO access the emulator handles), and at every `flush`.
    rx_unposted: usize,
    tx_unposted: usize,
    counters: Counters,
}

/// Descriptors per tail write at most; well under a ring, so the device
/// never waits long for descriptors the driver already has ready.
const TAIL_BATCH: usize = 16;

impl<H: Hw> E1000<H> {
    /// Resets the device and sets up both rings, following 14.3 (general
    /// configuration), 14.4 (receive) and 14.5 (transmit). Interrupts stay
    /// masked: the kernel polls.
    pub fn new(mut hw: H) -> Result<Self, InitError> {
        // Mask everything before and after the reset (14.3, 13.4.20).
        hw.write(reg::IMC, u32::MAX);
        let ctrl = hw.read(reg::CTRL);
        hw.write(reg::CTRL, ctrl | CTRL_RST);
        // RST self-clears once the reset is done; software waits at least
        // 1 us before touching the device again (13.4.1).
        let mut waited = 0;
        loop {
            hw.delay_us(10);
            waited += 10;
            if hw.read(reg::CTRL) & CTRL_RST == 0 {
                break;
            }
            if waited >= 10_000 {
                return Err(InitError::ResetStuck);
            }
        }
        hw.write(reg::IMC, u32::MAX);
        let _ = hw.read(reg::ICR);
        let mac = read_mac(&mut hw).ok_or(InitError::NoMac)?;
        // Link up through auto-speed detection; no flow control, so its
        // registers are zero (14.3).
        let ctrl = hw.read(reg::CTRL);
        hw.write(reg::CTRL, (ctrl | CTRL_SLU | CTRL_ASDE) & !(CTRL_LRST | CTRL_PHY_RST));
        for r in [reg::FCAL, reg::FCAH, reg::FCT, reg::FCTTV] {
            hw.write(r, 0);
        }

        let rx_ring = hw.dma_alloc(RX_RING * DESC).ok_or(InitError::NoMemory)?;
        let rx_bufs = hw.dma_alloc(RX_RING * BUF).ok_or(InitError::NoMemory)?;
        let tx_ring = hw.dma_alloc(TX_RING * DESC).ok_or(InitError::NoMemory)?;
        let tx_bufs = hw.dma_alloc(TX_RING * BUF).ok_or(InitError::NoMemory)?;

        // Receive (14.4): our address in RAL0/RAH0, an empty multicast
        // table, every descriptor given to the device (tail one behind the
        // head: RDH == RDT means the ring is empty of free descriptors).
        hw.write(reg::RAL0, u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]));
        hw.write(reg::RAH0, u32::from(u16::from_le_bytes([mac[4], mac[5]])) | RAH_AV);
        for i in 0..128 {
            hw.write(reg::MTA + 4 * i, 0);
        }
        for i in 0..RX_RING {
            let mut d = [0u8; DESC];
            d[0..8].copy_from_slice(&(rx_bufs + (i * BUF) as u64).to_le_bytes());
            hw.dma_write(rx_ring + (i * DESC) as u64, &d);
        }
        hw.write(reg::RDBAL, rx_ring as u32);
        hw.write(reg::RDBAH, (rx_ring >> 32) as u32);
        hw.write(reg::RDLEN, (RX_RING * DESC) as u32);
        hw.write(reg::RDH, 0);
        hw.write(reg::RDT, (RX_RING - 1) as u32);
        hw.write(reg::RDTR, 0);
        hw.write(reg::RCTL, RCTL_EN | RCTL_BAM | RCTL_SECRC);

        // Transmit (14.5): an empty ring, head == tail.
        hw.write(reg::TDBAL, tx_ring as u32);
        hw.write(reg::TDBAH, (tx_ring >> 32) as u32);
        hw.write(reg::TDLEN, (TX_RING * DESC) as u32);
        hw.write(reg::TDH, 0);
        hw.write(reg::TDT, 0);
        hw.write(reg::TCTL, TCTL_EN | TCTL_PSP | TCTL_CT | TCTL_COLD);
        hw.write(reg::TIPG, TIPG_COPPER);

        Ok(E1000 {
            hw,
            mac,
            rx_ring,
            rx_bufs,
            rx_next: 0,
            rx_discarding: false,
            tx_ring,
            tx_bufs,
            tx_tail: 0,
            tx_clean: 0,
            tx_busy: 0,
            rx_unposted: 0,
            tx_unposted: 0,
            counters: Counters::default(),
        })
    }

    pub fn hw(&mut self) -> &mut H {
        &mut self.hw
    }

    /// Gives receive descriptor `i` back to the device: clears its status
    /// (so a stale DD is never read as a new frame) and moves the tail to
    /// it.
    fn rx_give_back(&mut self, i: usize) {
        let mut d = [0u8; DESC];
        d[0..8].copy_from_slice(&(self.rx_bufs + (i * BUF) as u64).to_le_bytes());
        self.hw.dma_write(self.rx_ring + (i * DESC) as u64, &d);
        self.rx_unposted += 1;
        if self.rx_unposted >= TAIL_BATCH {
            self.post_rx();
        }
    }

    /// Moves RDT past every descriptor given back. The descriptors were
    /// written before the tail moves: x86 keeps stores in order, and
    /// `Hw::write` is an uncached MMIO store.
    fn post_rx(&mut self) {
        if self.rx_unposted > 0 {
            // The last descriptor given back is the one before `rx_next`.
            self.hw.write(reg::RDT, ((self.rx_next + RX_RING - 1) % RX_RING) as u32);
            self.rx_unposted = 0;
        }
    }

    /// Moves TDT past every queued frame (see `post_rx` for the order).
    fn post_tx(&mut self) {
        if self.tx_unposted > 0 {
            self.hw.write(reg::TDT, self.tx_tail as u32);
            self.tx_unposted = 0;
        }
    }

    /// Reclaims transmit descriptors the device is done with (DD set,
    /// 3.3.3.2), oldest first.
    fn tx_reclaim(&mut self) {
        while self.tx_busy > 0 {
            let mut d = [0u8; DESC];
            self.hw.dma_read(self.tx_ring + (self.tx_clean * DESC) as u64, &mut d);
            if d[12] & TX_DD == 0 {
                break;
            }
            self.tx_clean = (self.tx_clean + 1) % TX_RING;
            self.tx_busy -= 1;
        }
    }

    /// Frames the device could not store for want of free descriptors,
    /// added to the drop count (MPC clears on read).
    fn read_missed(&mut self) {
        let missed = self.hw.read(reg::MPC);
        self.counters.rx_missed += u64::from(missed);
    }
}

/// The MAC address: RAL0/RAH0 if the device loaded it from the EEPROM at
/// reset (5.6.1), else EEPROM words 0-2 through EERD (13.4.4).
fn read_mac<H: Hw>(hw: &mut H) -> Option<[u8; 6]> {
    let (lo, hi) = (hw.read(reg::RAL0), hw.read(reg::RAH0));
    let from_ra = lo.to_le_bytes();
    let mut mac = [from_ra[0], from_ra[1], from_ra[2], from_ra[3], hi as u8, (hi >> 8) as u8];
    if hi & RAH_AV == 0 || !unicast(&mac) {
        for word in 0..3u32 {
            hw.write(reg::EERD, EERD_START | (word << 8));
            let mut tries = 0;
            let v = loop {
                let v = hw.read(reg::EERD);
                if v & EERD_DONE != 0 {
                    break v;
                }
                tries += 1;
                if tries > 1000 {
                    return None;
                }
                hw.delay_us(5);
            };
            let w = ((v >> 16) as u16).to_le_bytes();
            mac[2 * word as usize] = w[0];
            mac[2 * word as usize + 1] = w[1];
        }
    }
    unicast(&mac).then_some(mac)
}

/// Not all zeros, not multicast or broadcast.
fn unicast(mac: &[u8; 6]) -> bool {
    mac != &[0; 6] && mac[0] & 1 == 0
}

impl<H: Hw> Nic for E1000<H> {
    fn mac(&self) -> [u8; 6] {
        self.mac
    }

    fn link_up(&mut self) -> bool {
        self.hw.read(reg::STATUS) & STATUS_LU != 0
    }

    /// The next good frame into `buf` (3.2.3 legacy descriptor: address,
    /// length, checksum, status, errors, special). Bad descriptors are
    /// given back and counted as drops until a good frame or an empty
    /// descriptor is found.
    fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        loop {
            let i = self.rx_next;
            let mut d = [0u8; DESC];
            self.hw.dma_read(self.rx_ring + (i * DESC) as u64, &mut d);
            let (status, errors) = (d[12], d[13]);
            if status & RX_DD == 0 {
                self.read_missed();
                return None;
            }
            // Read the rest of the descriptor only after DD: x86 does not
            // reorder loads, and the copy above is one volatile read.
            let len = usize::from(u16::from_le_bytes([d[8], d[9]]));
            self.rx_next = (i + 1) % RX_RING;
            let eop = status & RX_EOP != 0;
            let discarding = self.rx_discarding;
            self.rx_discarding = !eop;
            let good =
                !discarding && eop && errors & RX_ERR_FRAME == 0 && (14..=MAX_FRAME.min(buf.len())).contains(&len);
            if good {
                self.hw.dma_read(self.rx_bufs + (i * BUF) as u64, &mut buf[..len]);
            }
            self.rx_give_back(i);
            if good {
                self.counters.rx_frames += 1;
                self.counters.rx_bytes += len as u64;
                return Some(len);
            }
            // A frame in several buffers (cannot happen with 2048-byte
            // buffers and LPE off, so the device is misbehaving) counts once,
            // at its first descriptor.
            if !discarding {
                self.counters.rx_dropped += 1;
            }
        }
    }

    /// The next receive descriptor's DD bit (3.2.3.1): the device wrote a
    /// frame there. One 1-byte read of the ring; nothing is taken.
    fn rx_pending(&mut self) -> bool {
        let mut status = [0u8; 1];
        self.hw.dma_read(self.rx_ring + (self.rx_next * DESC) as u64 + 12, &mut status);
        status[0] & RX_DD != 0
    }

    fn can_send(&mut self) -> bool {
        self.tx_reclaim();
        self.tx_busy < TX_RING - 1
    }

    /// Queues `frame` on the transmit ring (3.3.3 legacy descriptor, one
    /// buffer per frame, FCS added by the device). False if the frame is
    /// not a valid size or the ring is full: the frame is dropped, counted.
    fn send(&mut self, frame: &[u8]) -> bool {
        if frame.len() < 14 || frame.len() > MAX_FRAME || !self.can_send() {
            self.counters.tx_dropped += 1;
            return false;
        }
        let i = self.tx_tail;
        let buf = self.tx_bufs + (i * BUF) as u64;
        self.hw.dma_write(buf, frame);
        let mut d = [0u8; DESC];
        d[0..8].copy_from_slice(&buf.to_le_bytes());
        d[8..10].copy_from_slice(&(frame.len() as u16).to_le_bytes());
        d[11] = TX_EOP | TX_IFCS | TX_RS;
        self.hw.dma_write(self.tx_ring + (i * DESC) as u64, &d);
        self.tx_tail = (i + 1) % TX_RING;
        self.tx_busy += 1;
        self.tx_unposted += 1;
        if self.tx_unposted >= TAIL_BATCH {
            self.post_tx();
        }
        self.counters.tx_frames += 1;
        self.counters.tx_bytes += frame.len() as u64;
        true
    }

    fn counters(&self) -> Counters {
        self.counters
    }

    fn flush(&mut self) {
        self.post_tx();
        self.post_rx();
    }

    fn set_promiscuous(&mut self, on: bool) {
        let rctl = self.hw.read(reg::RCTL) & !(RCTL_UPE | RCTL_MPE);
        self.hw.write(reg::RCTL, if on { rctl | RCTL_UPE | RCTL_MPE } else { rctl });
    }
}

#[cfg(any(test, feature = "testing"))]
pub mod sim {
    //! A simulated 82540EM: a register file and DMA memory, and a device
    //! side that fills receive descriptors and consumes transmit ones the
    //! way 3.2.6 and 3.3.4 describe — or, on request, the way a broken or
    //! hostile device would.

    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::rc::Rc;
    use alloc::vec;
    use alloc::vec::Vec;
    use core::cell::{Cell, RefCell};

    #[derive(Default)]
    pub struct SimE1000 {
        pub regs: BTreeMap<u32, u32>,
        pub mem: Vec<u8>,
        /// Frames the device sent, in order.
        pub sent: Vec<Vec<u8>>,
        /// RST sticks (a dead device).
        pub stuck_in_reset: bool,
        pub mac_in_ra: Option<[u8; 6]>,
        pub eeprom_mac: [u8; 6],
    }

    impl SimE1000 {
        pub fn new(mac: [u8; 6]) -> Self {
            SimE1000 { mac_in_ra: Some(mac), eeprom_mac: mac, ..Default::default() }
        }

        fn r(&self, reg: u32) -> u32 {
            self.regs.get(&reg).copied().unwrap_or(0)
        }

        fn desc_addr(&self, base_lo: u32, base_hi: u32, i: u32) -> usize {
            ((u64::from(self.r(base_hi)) << 32 | u64::from(self.r(base_lo))) + u64::from(i) * 16) as usize
        }

        /// The device receives a frame: writes it to the buffer at RDH with
        /// `len`, `status` and `errors` as given (a well-behaved device
        /// passes the frame's length, DD|EOP and 0). False if no free
        /// descriptor (RDH == RDT), as 3.2.6 says; the miss is counted.
        pub fn deliver_raw(&mut self, frame: &[u8], len: u16, status: u8, errors: u8) -> bool {
            let (head, tail) = (self.r(reg::RDH), self.r(reg::RDT));
            let n = self.r(reg::RDLEN) / 16;
            if head == tail || n == 0 {
                *self.regs.entry(reg::MPC).or_default() += 1;
                return false;
            }
            let d = self.desc_addr(reg::RDBAL, reg::RDBAH, head);
            let buf = u64::from_le_bytes(self.mem[d..d + 8].try_into().unwrap()) as usize;
            let copy = frame.len().min(BUF);
            self.mem[buf..buf + copy].copy_from_slice(&frame[..copy]);
            self.mem[d + 8..d + 10].copy_from_slice(&len.to_le_bytes());
            self.mem[d + 12] = status;
            self.mem[d + 13] = errors;
            self.regs.insert(reg::RDH, (head + 1) % n);
            true
        }

        pub fn deliver(&mut self, frame: &[u8]) -> bool {
            self.deliver_raw(frame, frame.len() as u16, RX_DD | RX_EOP, 0)
        }

        /// The device transmits everything between TDH and TDT.
        fn transmit(&mut self) {
            let n = self.r(reg::TDLEN) / 16;
            while n > 0 && self.r(reg::TDH) != self.r(reg::TDT) {
                let head = self.r(reg::TDH);
                let d = self.desc_addr(reg::TDBAL, reg::TDBAH, head);
                let buf = u64::from_le_bytes(self.mem[d..d + 8].try_into().unwrap()) as usize;
                let len = usize::from(u16::from_le_bytes([self.mem[d + 8], self.mem[d + 9]]));
                self.sent.push(self.mem[buf..buf + len].to_vec());
                self.mem[d + 12] |= TX_DD;
                self.regs.insert(reg::TDH, (head + 1) % n);
            }
        }
    }

    /// `SimE1000` as the driver's `Hw`; with `hold_tx`, transmit
    /// descriptors stay unprocessed (a stalled device).
    pub struct SimHw {
        pub dev: Rc<RefCell<SimE1000>>,
        pub hold_tx: Rc<Cell<bool>>,
    }

    impl Hw for SimHw {
        fn read(&mut self, r: u32) -> u32 {
            let mut d = self.dev.borrow_mut();
            match r {
                reg::STATUS => STATUS_LU,
                reg::MPC => d.regs.remove(&reg::MPC).unwrap_or(0),
                reg::CTRL if d.stuck_in_reset => d.r(reg::CTRL),
                reg::CTRL => d.r(reg::CTRL) & !CTRL_RST,
                reg::RAH0 if d.r(reg::RAH0) == 0 => match d.mac_in_ra {
                    Some(m) => u32::from(u16::from_le_bytes([m[4], m[5]])) | RAH_AV,
                    None => 0,
                },
                reg::RAL0 if d.r(reg::RAL0) == 0 => match d.mac_in_ra {
                    Some(m) => u32::from_le_bytes([m[0], m[1], m[2], m[3]]),
                    None => 0,
                },
                reg::EERD => {
                    let v = d.r(reg::EERD);
                    let word = ((v >> 8) & 0xff) as usize;
                    let data = if word < 3 {
                        u16::from_le_bytes([d.eeprom_mac[2 * word], d.eeprom_mac[2 * word + 1]])
                    } else {
                        0
                    };
                    v | EERD_DONE | u32::from(data) << 16
                }
                _ => d.r(r),
            }
        }

        fn write(&mut self, r: u32, value: u32) {
            let mut d = self.dev.borrow_mut();
            d.regs.insert(r, value);
            if r == reg::TDT && !self.hold_tx.get() {
                d.transmit();
            }
        }

        fn dma_alloc(&mut self, bytes: usize) -> Option<u64> {
            let mut d = self.dev.borrow_mut();
            // Address 0 stays unused, as a real allocator's would.
            let at = d.mem.len().max(4096).next_multiple_of(4096);
            d.mem.resize(at + bytes, 0);
            Some(at as u64)
        }

        fn dma_read(&mut self, addr: u64, buf: &mut [u8]) {
            let d = self.dev.borrow();
            buf.copy_from_slice(&d.mem[addr as usize..addr as usize + buf.len()]);
        }

        fn dma_write(&mut self, addr: u64, data: &[u8]) {
            let mut d = self.dev.borrow_mut();
            d.mem[addr as usize..addr as usize + data.len()].copy_from_slice(data);
        }

        fn delay_us(&mut self, _us: u64) {}
    }

    pub fn new_sim(mac: [u8; 6]) -> (E1000<SimHw>, Rc<RefCell<SimE1000>>) {
        let dev = Rc::new(RefCell::new(SimE1000::new(mac)));
        let hw = SimHw { dev: dev.clone(), hold_tx: Default::default() };
        (E1000::new(hw).expect("sim init"), dev)
    }

    pub fn frame(len: usize, tag: u8) -> Vec<u8> {
        let mut f = vec![tag; len];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::sim::*;
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0x00, 0x01];

    #[test]
    fn init_programs_rings_and_reads_the_mac() {
        let (nic, dev) = new_sim(MAC);
        assert_eq!(nic.mac(), MAC);
        let d = dev.borrow();
        assert_eq!(d.regs[&reg::RDLEN], (RX_RING * 16) as u32);
        assert_eq!(d.regs[&reg::RDT], (RX_RING - 1) as u32);
        assert_eq!(d.regs[&reg::TDT], 0);
        assert_ne!(d.regs[&reg::RCTL] & RCTL_EN, 0);
        assert_ne!(d.regs[&reg::TCTL] & TCTL_EN, 0);
        assert_eq!(d.regs[&reg::RAH0] & RAH_AV, RAH_AV);
        assert_eq!(d.regs[&reg::RDBAL] % 16, 0);
        assert_eq!(d.regs[&reg::RCTL] & (RCTL_UPE | RCTL_MPE), 0, "only its own MAC and broadcast");
    }

    #[test]
    fn a_frame_received_is_pending_until_taken() {
        let (mut nic, dev) = new_sim(MAC);
        assert!(!nic.rx_pending());
        assert!(dev.borrow_mut().deliver(&frame(60, 1)));
        assert!(nic.rx_pending(), "the device wrote the next descriptor");
        assert!(nic.rx_pending(), "looking takes nothing");
        let mut buf = vec![0u8; BUF];
        assert_eq!(nic.recv(&mut buf), Some(60));
        assert!(!nic.rx_pending(), "taken");
    }

    #[test]
    fn promiscuous_mode_sets_and_clears_only_its_two_bits() {
        let (mut nic, dev) = new_sim(MAC);
        let rctl = dev.borrow().regs[&reg::RCTL];
        nic.set_promiscuous(true);
        assert_eq!(dev.borrow().regs[&reg::RCTL], rctl | RCTL_UPE | RCTL_MPE);
        nic.set_promiscuous(false);
        assert_eq!(dev.borrow().regs[&reg::RCTL], rctl);
    }

    #[test]
    fn mac_from_eeprom_when_ra_is_empty_and_errors_otherwise() {
        let dev = std::rc::Rc::new(std::cell::RefCell::new(SimE1000::new(MAC)));
        dev.borrow_mut().mac_in_ra = None;
        let nic = E1000::new(SimHw { dev: dev.clone(), hold_tx: Default::default() }).unwrap();
        assert_eq!(nic.mac(), MAC);
        let dev = std::rc::Rc::new(std::cell::RefCell::new(SimE1000::new([0; 6])));
        dev.borrow_mut().mac_in_ra = None;
        assert_eq!(E1000::new(SimHw { dev, hold_tx: Default::default() }).err(), Some(InitError::NoMac));
        let dev = std::rc::Rc::new(std::cell::RefCell::new(SimE1000::new(MAC)));
        dev.borrow_mut().stuck_in_reset = true;
        assert_eq!(E1000::new(SimHw { dev, hold_tx: Default::default() }).err(), Some(InitError::ResetStuck));
    }

    #[test]
    fn frames_round_the_rx_ring_many_times() {
        let (mut nic, dev) = new_sim(MAC);
        let mut buf = vec![0u8; BUF];
        for n in 0..(3 * RX_RING + 5) {
            let f = frame(60 + n % 1400, n as u8);
            assert!(dev.borrow_mut().deliver(&f), "frame {n}: no free descriptor");
            let len = nic.recv(&mut buf).expect("a frame");
            assert_eq!(&buf[..len], &f[..]);
            assert_eq!(nic.recv(&mut buf), None);
            if n % 3 == 0 {
                nic.flush();
            }
        }
        assert_eq!(nic.counters().rx_frames, (3 * RX_RING + 5) as u64);
    }

    #[test]
    fn a_full_rx_ring_misses_frames_and_counts_them() {
        let (mut nic, dev) = new_sim(MAC);
        // One descriptor always stays with the driver (RDT one behind).
        for n in 0..RX_RING + 3 {
            let ok = dev.borrow_mut().deliver(&frame(64, n as u8));
            assert_eq!(ok, n < RX_RING - 1, "frame {n}");
        }
        let mut buf = vec![0u8; BUF];
        let mut got = 0;
        while nic.recv(&mut buf).is_some() {
            got += 1;
        }
        assert_eq!(got, RX_RING - 1);
        assert_eq!(nic.counters().rx_missed, 4);
        nic.flush();
        assert_eq!(dev.borrow().regs[&reg::RDT], (RX_RING - 2) as u32);
        // The ring works again afterwards.
        assert!(dev.borrow_mut().deliver(&frame(64, 9)));
        assert_eq!(nic.recv(&mut buf), Some(64));
    }

    #[test]
    fn hostile_descriptors_are_dropped_not_trusted() {
        let (mut nic, dev) = new_sim(MAC);
        let f = frame(100, 1);
        {
            let mut d = dev.borrow_mut();
            d.deliver_raw(&f, 0xffff, RX_DD | RX_EOP, 0); // longer than the buffer
            d.deliver_raw(&f, 3, RX_DD | RX_EOP, 0); // shorter than a header
            d.deliver_raw(&f, 100, RX_DD | RX_EOP, 0x01); // CRC error
            d.deliver_raw(&f, 100, RX_DD, 0); // no EOP: a multi-buffer frame...
            d.deliver_raw(&f, 100, RX_DD, 0); // ...continued...
            d.deliver_raw(&f, 100, RX_DD | RX_EOP, 0); // ...and ended
            d.deliver_raw(&f, 100, RX_DD | RX_EOP, 0); // good
        }
        let mut small = vec![0u8; 64];
        // A frame longer than the caller's buffer is dropped, not cut.
        assert_eq!(nic.recv(&mut small), None);
        assert_eq!(nic.counters().rx_dropped, 5);
        assert!(dev.borrow_mut().deliver(&f));
        let mut buf = vec![0u8; BUF];
        assert_eq!(nic.recv(&mut buf), Some(100));
        assert_eq!(nic.counters().rx_dropped, 5);
        assert_eq!(nic.counters().rx_frames, 1);
    }

    #[test]
    fn tx_frames_reach_the_wire_in_order_and_the_ring_wraps() {
        let (mut nic, dev) = new_sim(MAC);
        let frames: Vec<Vec<u8>> = (0..3 * TX_RING).map(|n| frame(60 + n % 1450, n as u8)).collect();
        for f in &frames {
            assert!(nic.send(f));
        }
        // Tails move in batches; `flush` posts the rest.
        assert!(dev.borrow().sent.len() >= frames.len() - TAIL_BATCH);
        nic.flush();
        assert_eq!(dev.borrow().sent, frames);
        assert_eq!(nic.counters().tx_frames, frames.len() as u64);
        assert!(!nic.send(&[0u8; 10]));
        assert!(!nic.send(&vec![0u8; MAX_FRAME + 1]));
        assert_eq!(nic.counters().tx_dropped, 2);
    }

    #[test]
    fn a_stalled_device_fills_the_tx_ring_and_sending_resumes_when_it_drains() {
        let (mut nic, dev) = new_sim(MAC);
        nic.hw().hold_tx.set(true);
        let mut sent = 0;
        while nic.can_send() {
            assert!(nic.send(&frame(64, 0)));
            sent += 1;
        }
        nic.flush();
        assert_eq!(sent, TX_RING - 1);
        assert!(!nic.send(&frame(64, 0)));
        assert_eq!(nic.counters().tx_dropped, 1);
        nic.hw().hold_tx.set(false);
        nic.hw().write(reg::TDT, (TX_RING - 1) as u32); // the device catches up
        assert_eq!(dev.borrow().sent.len(), TX_RING - 1);
        assert!(nic.can_send());
        assert!(nic.send(&frame(64, 1)));
    }
}
