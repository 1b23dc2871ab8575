//! The Intel 8254 programmable interval timer of a PC (the "Intel 8254
//! Programmable Interval Timer" datasheet; section names below are its
//! headings): counters 0-2 at ports 0x40-0x42, the control word at 0x43,
//! a 1.193182 MHz CLK on every counter. Counter 0's OUT is IRQ 0; counter
//! 2's GATE and OUT are bits 0 and 5 of port 0x61 (the PIIX4 NMI status and
//! control register, which also carries the speaker enable and a refresh
//! toggle); counter 1 (DRAM refresh on old PCs) drives nothing.
//!
//! Linux needs two things from it: counter 2 in mode 0 to calibrate the TSC
//! (`quick_pit_calibrate` and `pit_calibrate_tsc` in arch/x86/kernel/tsc.c:
//! gate on through port 0x61, control word 0xb0, a count, then polling
//! port 0x61 bit 5 or the counter's MSB), and counter 0 as the early clock
//! event (drivers/clocksource/i8253.c: mode 2 at HZ for periodic ticks,
//! mode 4 for one-shot, and mode 0 with no count to stop it).
//!
//! Nothing ticks. Each counter keeps the VM time its counting element was
//! loaded and derives its count and OUT from the time elapsed, so reads are
//! exact at any moment, nothing drifts however long it runs, and an idle
//! counter costs nothing. `now_ns` is the VM's clock in nanoseconds; it
//! continues across save and restore, so the saved load times stay valid.
//! A clock that goes backwards is taken as no time passing.

use serde::{Deserialize, Serialize};

use super::persist::{Invalid, Persist};

/// Counter 0's port; counters 1 and 2 follow.
pub const COUNTER0: u16 = 0x40;
/// The control word register.
pub const CONTROL: u16 = 0x43;
/// The NMI status and control port with counter 2's GATE and OUT.
pub const PORT61: u16 = 0x61;
/// The CLK input, in Hz (Linux's `PIT_TICK_RATE`).
pub const PIT_HZ: u64 = 1_193_182;

const NS_PER_S: u128 = 1_000_000_000;

// Where a counter is in its mode's life (`CounterState::phase`).
/// A control word was written and no count yet.
const IDLE: u8 = 0;
/// Mode 0: the first byte of a two-byte count stopped the counter.
const HELD: u8 = 1;
/// Modes 1 and 5: a count was written; counting waits for a GATE trigger.
const ARMED: u8 = 2;
/// The counting element holds a count and counts along the timeline.
const COUNTING: u8 = 3;

// RW1-RW0 of the control word.
const LSB: u8 = 1;
const MSB: u8 = 2;
const WORD: u8 = 3;

// Port 0x61: GATE 2, speaker data, and the two NMI enables are writable;
// the top four bits are status.
const P61_GATE2: u8 = 0x01;
const P61_WRITABLE: u8 = 0x0f;
const P61_REFRESH: u8 = 0x10;
const P61_OUT2: u8 = 0x20;

/// CLK pulses in `ns` nanoseconds.
fn ticks_in(ns: u64) -> u64 {
    // At most 2^64 * 2^21 / 10^9 < 2^56: the result fits.
    (u128::from(ns) * u128::from(PIT_HZ) / NS_PER_S) as u64
}

/// Nanoseconds until `ticks` CLK pulses have happened: the first instant
/// `ticks_in` reaches `ticks`.
fn ns_for(ticks: u64) -> u128 {
    (u128::from(ticks) * NS_PER_S).div_ceil(u128::from(PIT_HZ))
}

/// Four BCD digits of `v` (mod 10000).
fn to_bcd(v: u32) -> u16 {
    let v = v % 10_000;
    ((v / 1000) << 12 | (v / 100 % 10) << 8 | (v / 10 % 10) << 4 | (v % 10)) as u16
}

/// The value of four BCD digits. Nibbles above 9 are no BCD (the chip's
/// behaviour with them is undefined); they count at face value here.
fn from_bcd(v: u16) -> u32 {
    let d = |shift: u16| u32::from((v >> shift) & 0xf);
    d(12) * 1000 + d(8) * 100 + d(4) * 10 + d(0)
}

/// One counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterState {
    /// M2-M0 as written; 6 and 7 act as 2 and 3 ("Control Word Format").
    pub mode: u8,
    /// BCD counting (four decades) instead of 16-bit binary.
    pub bcd: bool,
    /// RW1-RW0 as written: 1 LSB only, 2 MSB only, 3 LSB then MSB.
    pub access: u8,
    /// Where the counter is: 0 idle, 1 held (mode 0, half a count
    /// written), 2 armed (modes 1 and 5, waiting for a trigger), 3 counting.
    pub phase: u8,
    /// The count register: the count as last written (BCD digits in BCD).
    pub cr: u16,
    /// LSB-then-MSB: the LSB has been written, the MSB comes next.
    pub write_msb: bool,
    /// LSB-then-MSB: the next read returns the MSB.
    pub read_msb: bool,
    /// The count in `cr` is not in the counting element yet (status bit 6).
    pub null_count: bool,
    /// Bytes of `latched` still to be read: 0 when nothing is latched.
    pub latch: u8,
    /// The output latch, as the guest reads it (BCD-encoded in BCD mode).
    pub latched: u16,
    /// A read-back status byte waits to be read.
    pub status_latched: bool,
    /// The latched status byte.
    pub status: u8,
    /// The GATE input (counters 0 and 1 are wired high).
    pub gate: bool,
    /// The counting element's value while it does not count (binary).
    pub hold: u16,
    /// The count loaded for the current cycle: 1-65536 (1-10000 in BCD).
    pub n: u32,
    /// CLK pulses counted before `since_ns`.
    pub elapsed: u64,
    /// When counting last (re)started, on the VM clock.
    pub since_ns: u64,
    /// In modes 2 and 3 with a count waiting in `cr`: the position (CLK
    /// pulses, like `elapsed`) at which it is loaded.
    pub reload_at: u64,
    /// Rising edges of OUT not yet reported.
    pub edges: u64,
    /// The position up to which rising edges have been counted.
    pub edge_mark: u64,
}

/// The timer's state. Its times are on the VM clock (`now_ns`), which
/// continues across save and restore: restored on a clock that goes on from
/// the saved moment, every counter resumes exactly where it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    pub counters: [CounterState; 3],
    /// The writable bits of port 0x61 (GATE 2, speaker data, NMI enables).
    pub port61: u8,
    /// Port 0x61 bit 4.
    pub refresh: bool,
    /// The latest VM time seen: time never runs backwards for the device.
    pub clock_ns: u64,
    /// Counter 0's edges that found IRQ 0 still latched (the guest had not
    /// taken the last one): owed to the guest, one per acknowledge, so a
    /// guest that counts ticks keeps time when it was not run for a while
    /// (KVM's PIT does the same, "reinject"). At most `MAX_OWED_TICKS`;
    /// reprogramming counter 0 forgives them.
    pub owed_ticks: u32,
}

/// The most ticks owed: a few seconds at Linux's HZ, so a VM that stood
/// still for long does not spend as long again catching up.
pub const MAX_OWED_TICKS: u32 = 1000;

/// The 8254 with port 0x61.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pit {
    state: PitState,
}

impl CounterState {
    /// A counter at power-on. The datasheet leaves the counters undefined
    /// until programmed; each starts as if told "mode 3, LSB then MSB,
    /// binary" with no count yet: idle, OUT high, no interrupts, so the
    /// guest's first control word makes no stray edge.
    const fn new(gate: bool) -> Self {
        CounterState {
            mode: 3,
            bcd: false,
            access: WORD,
            phase: IDLE,
            cr: 0,
            write_msb: false,
            read_msb: false,
            null_count: true,
            latch: 0,
            latched: 0,
            status_latched: false,
            status: 0,
            gate,
            hold: 0,
            n: 65_536,
            elapsed: 0,
            since_ns: 0,
            reload_at: 0,
            edges: 0,
            edge_mark: 0,
        }
    }

    /// The mode in effect (0-5).
    fn mode(&self) -> u8 {
        if self.mode >= 6 { self.mode - 4 } else { self.mode }
    }

    fn modulus(&self) -> u32 {
        if self.bcd { 10_000 } else { 65_536 }
    }

    fn period(&self) -> u64 {
        u64::from(self.n.max(1))
    }

    /// The count in `cr` as a count of CLK pulses: 0 is the largest,
    /// 2^16 in binary and 10^4 in BCD ("Initial count").
    fn initial_count(&self) -> u32 {
        let v = if self.bcd { from_bcd(self.cr) % 10_000 } else { u32::from(self.cr) };
        if v == 0 { self.modulus() } else { v }
    }

    /// Whether the counting element is clocked: GATE enables counting in
    /// modes 0, 2, 3 and 4 and only triggers in modes 1 and 5 ("GATE").
    fn running(&self) -> bool {
        self.phase == COUNTING && (self.gate || matches!(self.mode(), 1 | 5))
    }

    /// CLK pulses since the count was loaded.
    fn position(&self, now: u64) -> u64 {
        if self.running() {
            self.elapsed.saturating_add(ticks_in(now.saturating_sub(self.since_ns)))
        } else {
            self.elapsed
        }
    }

    /// The VM time the counter reaches `position` (while running).
    fn time_of(&self, position: u64) -> Option<u64> {
        u64::try_from(u128::from(self.since_ns) + ns_for(position.saturating_sub(self.elapsed))).ok()
    }

    /// OUT at `position` in the counting phase ("Mode Definitions").
    fn out_at(&self, d: u64) -> bool {
        let n = self.period();
        match self.mode() {
            // Low from the load (mode 0) or trigger (mode 1) until the
            // count reaches zero, then high.
            0 | 1 => d >= n,
            // Low for the one CLK with count 1, then reload; GATE low forces
            // OUT high in modes 2 and 3.
            2 => !self.gate || d % n != n - 1,
            // High for ceil(N/2) CLKs, low for floor(N/2).
            3 => !self.gate || d % n < n.div_ceil(2),
            // One CLK low when the count reaches zero.
            _ => d != n,
        }
    }

    fn out(&self, now: u64) -> bool {
        match self.phase {
            // A control word sets OUT low in mode 0 and high in the others
            // ("Operation Common to All Modes").
            IDLE => self.mode() != 0,
            // Mode 0: writing the first byte sets OUT low at once.
            HELD => false,
            ARMED => true,
            _ => self.out_at(self.position(now)),
        }
    }

    /// The counting element at `position`, binary.
    fn count_at(&self, d: u64) -> u32 {
        let n = self.period();
        let m = u64::from(self.modulus());
        let v = match self.mode() {
            // N, N-1, ..., 1, then N again.
            2 => n - d % n,
            // Decrements by two, reloading each half cycle; an odd N loads
            // N-1 ("Mode 3").
            3 => {
                let (p, h, top) = (d % n, n.div_ceil(2), n & !1);
                if p < h { top - 2 * p } else { top - 2 * (p - h) }
            }
            // Modes 0, 1, 4, 5 count on through zero, wrapping.
            _ => (n + m - d % m) % m,
        };
        (v % m) as u32
    }

    fn count(&self, now: u64) -> u32 {
        if self.phase == COUNTING { self.count_at(self.position(now)) } else { u32::from(self.hold) }
    }

    /// The count as the guest reads it.
    fn encode(&self, v: u32) -> u16 {
        if self.bcd { to_bcd(v) } else { v as u16 }
    }

    /// Rising edges of OUT at positions in (a, b].
    fn edges_between(&self, a: u64, b: u64) -> u64 {
        if self.phase != COUNTING || b <= a {
            return 0;
        }
        let n = self.period();
        match self.mode() {
            0 | 1 => u64::from(a < n && n <= b),
            // Modes 2 and 3 rise at each reload; a count of 1 is illegal
            // there and never makes OUT rise.
            2 | 3 if n < 2 => 0,
            2 | 3 => b / n - a / n,
            _ => u64::from(a <= n && n < b),
        }
    }

    /// The first position after `d` where OUT rises.
    fn next_edge_after(&self, d: u64) -> Option<u64> {
        let n = self.period();
        match self.mode() {
            0 | 1 => (d < n).then_some(n),
            2 | 3 => (n >= 2).then(|| (d / n).saturating_add(1).saturating_mul(n)),
            _ => (d <= n).then_some(n + 1),
        }
    }

    /// In modes 2 and 3, the position a written count is loaded at.
    fn pending_reload(&self) -> Option<u64> {
        (self.running() && self.null_count && matches!(self.mode(), 2 | 3)).then_some(self.reload_at)
    }

    /// Bring the counter up to `now`: load a count that waited for the end
    /// of a period or half cycle, and count OUT's rising edges so far.
    fn settle(&mut self, now: u64) {
        if let Some(b) = self.pending_reload()
            && self.position(now) >= b
        {
            let at = self.time_of(b).unwrap_or(now).min(now);
            self.edges = self.edges.saturating_add(self.edges_between(self.edge_mark, b));
            let half = self.mode() == 3 && b % self.period() != 0;
            self.n = self.initial_count();
            self.null_count = false;
            self.since_ns = at;
            // Loaded at a half-cycle boundary, the new count starts its
            // low half.
            self.elapsed = if half { self.period().div_ceil(2) } else { 0 };
            self.edge_mark = self.elapsed;
        }
        let d = self.position(now);
        if d > self.edge_mark {
            self.edges = self.edges.saturating_add(self.edges_between(self.edge_mark, d));
            self.edge_mark = d;
        }
    }

    /// Apply `f` at `now`, counting the rising edge it makes if it turns
    /// OUT from low to high (a control word or GATE can).
    fn change(&mut self, now: u64, f: impl FnOnce(&mut Self)) {
        self.settle(now);
        let before = self.out(now);
        f(self);
        if !before && self.out(now) {
            self.edges = self.edges.saturating_add(1);
        }
        self.edge_mark = self.position(now);
    }

    /// Load `cr` into the counting element. The chip loads it on the next
    /// CLK; here the load happens at the write, which moves every event by
    /// less than one CLK (838 ns).
    fn load(&mut self, now: u64) {
        self.n = self.initial_count();
        self.null_count = false;
        self.phase = COUNTING;
        self.elapsed = 0;
        self.since_ns = now;
    }

    /// A control word for this counter with RW1-RW0 nonzero: all its
    /// control logic resets, the counter stops and waits for a count, and
    /// latched data is dropped ("Control Word Format", "Counter Latch
    /// Command": latched until read or reprogrammed).
    fn write_control(&mut self, value: u8, now: u64) {
        self.change(now, |c| {
            let hold = c.count(now);
            c.mode = (value >> 1) & 7;
            c.bcd = value & 1 != 0;
            c.access = (value >> 4) & 3;
            c.hold = (hold % c.modulus()) as u16;
            c.phase = IDLE;
            c.write_msb = false;
            c.read_msb = false;
            c.null_count = true;
            c.latch = 0;
            c.status_latched = false;
        });
    }

    /// A guest write to the counter's port ("Write Operations"): one byte
    /// of a count, the other byte zero in one-byte access modes.
    fn write(&mut self, value: u8, now: u64) {
        match self.access {
            LSB => {
                self.cr = u16::from(value);
                self.count_written(now);
            }
            MSB => {
                self.cr = u16::from(value) << 8;
                self.count_written(now);
            }
            _ if !self.write_msb => {
                self.cr = (self.cr & 0xff00) | u16::from(value);
                self.write_msb = true;
                // "Mode 0: writing the first byte disables counting; OUT is
                // set low immediately."
                if self.mode() == 0 {
                    self.change(now, |c| {
                        c.hold = c.count(now) as u16;
                        c.phase = HELD;
                    });
                }
            }
            _ => {
                self.cr = (self.cr & 0x00ff) | u16::from(value) << 8;
                self.write_msb = false;
                self.count_written(now);
            }
        }
    }

    /// A whole count is in `cr`: when it takes effect depends on the mode.
    fn count_written(&mut self, now: u64) {
        self.null_count = true;
        match self.mode() {
            // Loaded at once; counting restarts from it (modes 0 and 4 are
            // how software retriggers).
            0 | 4 => self.change(now, |c| c.load(now)),
            // Loaded by the next trigger; a one-shot under way goes on.
            1 | 5 => {
                if self.phase == IDLE {
                    self.change(now, |c| c.phase = ARMED);
                }
            }
            // A rate or square wave under way finishes its period (mode 2)
            // or half cycle (mode 3) with the old count; else it starts now.
            _ if self.phase == COUNTING => {
                let d = self.position(now);
                let n = self.period();
                let start = d - d % n;
                let h = n.div_ceil(2);
                self.reload_at = if self.mode() == 3 && d % n < h { start + h } else { start.saturating_add(n) };
            }
            _ => self.change(now, |c| c.load(now)),
        }
    }

    /// The counter latch command: the count is frozen for reading until
    /// read; a second latch before then is ignored ("Counter Latch
    /// Command").
    fn latch_count(&mut self, now: u64) {
        if self.latch == 0 {
            self.latched = self.encode(self.count(now));
            self.latch = if self.access == WORD { 2 } else { 1 };
        }
    }

    /// The read-back command's status latch ("Read-Back Command", "Status
    /// Byte"): OUT, null count, then the control word's RW, M and BCD bits.
    fn latch_status(&mut self, now: u64) {
        if !self.status_latched {
            self.status = u8::from(self.out(now)) << 7
                | u8::from(self.null_count) << 6
                | (self.access & 3) << 4
                | (self.mode & 7) << 1
                | u8::from(self.bcd);
            self.status_latched = true;
        }
    }

    /// A guest read ("Read Operations"): a latched status first, then a
    /// latched count, else the count as it is now. In LSB-then-MSB mode the
    /// bytes alternate; the byte pointer is shared with latched reads.
    fn read(&mut self, now: u64) -> u8 {
        if self.status_latched {
            self.status_latched = false;
            return self.status;
        }
        let value = if self.latch > 0 {
            self.latch -= 1;
            self.latched
        } else {
            self.encode(self.count(now))
        };
        let [lo, hi] = value.to_le_bytes();
        match self.access {
            LSB => lo,
            MSB => hi,
            _ => {
                let msb = self.read_msb;
                self.read_msb = !msb;
                if msb { hi } else { lo }
            }
        }
    }

    /// A new GATE level ("GATE", and each mode's GATE rules).
    fn set_gate(&mut self, high: bool, now: u64) {
        if high == self.gate {
            return;
        }
        self.change(now, |c| {
            if high {
                match c.mode() {
                    // A rising edge triggers (or retriggers) the one-shot.
                    1 | 5 => {
                        if c.phase != IDLE {
                            c.load(now);
                        }
                    }
                    // A rising edge reloads and restarts the period.
                    2 | 3 => {
                        if c.phase == COUNTING {
                            c.load(now);
                        }
                    }
                    // Counting resumes where it stopped.
                    _ => c.since_ns = now,
                }
            } else if c.phase == COUNTING && !matches!(c.mode(), 1 | 5) {
                c.elapsed = c.position(now);
            }
            c.gate = high;
        });
    }

    /// The VM time of OUT's next rising edge at or after `now`.
    fn next_edge_time(&self, now: u64) -> Option<u64> {
        let mut c = *self;
        c.settle(now);
        if c.edges > 0 {
            return Some(now);
        }
        if !c.running() {
            return None;
        }
        let next = c.next_edge_after(c.position(now))?;
        if let Some(b) = c.pending_reload()
            && b < next
        {
            // Mode 3 loads a new count at the half cycle before that edge.
            let at = c.time_of(b)?;
            c.settle(at);
            return c.next_edge_after(c.position(at)).and_then(|e| c.time_of(e));
        }
        c.time_of(next)
    }
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// The timer at power-on: every counter idle, GATE 2 low.
    pub const fn new() -> Self {
        Pit {
            state: PitState {
                counters: [CounterState::new(true), CounterState::new(true), CounterState::new(false)],
                port61: 0,
                refresh: false,
                clock_ns: 0,
                owed_ticks: 0,
            },
        }
    }

    /// `now`, or the latest time already seen if that is later.
    fn observe(&mut self, now: u64) -> u64 {
        self.state.clock_ns = self.state.clock_ns.max(now);
        self.state.clock_ns
    }

    /// A guest read of `port` (0x40-0x43) at `now_ns`.
    pub fn read(&mut self, port: u16, now_ns: u64) -> u8 {
        let now = self.observe(now_ns);
        match port.wrapping_sub(COUNTER0) {
            i @ 0..=2 => {
                let c = &mut self.state.counters[usize::from(i)];
                c.settle(now);
                c.read(now)
            }
            // The control word register cannot be read: the bus floats.
            _ => 0xff,
        }
    }

    /// A guest write of `value` to `port` (0x40-0x43) at `now_ns`.
    pub fn write(&mut self, port: u16, value: u8, now_ns: u64) {
        let now = self.observe(now_ns);
        match port.wrapping_sub(COUNTER0) {
            i @ 0..=2 => {
                let c = &mut self.state.counters[usize::from(i)];
                c.settle(now);
                c.write(value, now);
            }
            3 => self.control(value, now),
            _ => {}
        }
    }

    /// A control word: SC1-SC0 pick the counter, or 3 for the read-back
    /// command; RW1-RW0 = 0 is the counter latch command.
    fn control(&mut self, value: u8, now: u64) {
        let select = value >> 6;
        if select == 3 {
            // Read-back: D5 clear latches counts, D4 clear latches status,
            // D3-D1 select counters 2-0.
            for (i, c) in self.state.counters.iter_mut().enumerate() {
                if value & (2 << i) != 0 {
                    c.settle(now);
                    if value & 0x20 == 0 {
                        c.latch_count(now);
                    }
                    if value & 0x10 == 0 {
                        c.latch_status(now);
                    }
                }
            }
            return;
        }
        let c = &mut self.state.counters[usize::from(select)];
        c.settle(now);
        if value & 0x30 == 0 {
            c.latch_count(now);
        } else {
            c.write_control(value, now);
            if select == 0 {
                self.state.owed_ticks = 0;
            }
        }
    }

    /// A guest read of port 0x61: the writable bits, the refresh toggle and
    /// counter 2's OUT. The refresh bit flips on every read, so a loop
    /// waiting for it to change always moves on (modern Linux does not time
    /// anything with it).
    pub fn read_port61(&mut self, now_ns: u64) -> u8 {
        let now = self.observe(now_ns);
        self.state.refresh = !self.state.refresh;
        let c = &mut self.state.counters[2];
        c.settle(now);
        (self.state.port61 & P61_WRITABLE)
            | if self.state.refresh { P61_REFRESH } else { 0 }
            | if c.out(now) { P61_OUT2 } else { 0 }
    }

    /// A guest write of port 0x61: bit 0 is counter 2's GATE; the status
    /// bits 4-7 are read-only.
    pub fn write_port61(&mut self, value: u8, now_ns: u64) {
        let now = self.observe(now_ns);
        self.state.port61 = value & P61_WRITABLE;
        let c = &mut self.state.counters[2];
        c.settle(now);
        c.set_gate(value & P61_GATE2 != 0, now);
    }

    /// When counter 0's OUT next rises, at or after `now_ns`: `now_ns`
    /// itself if rising edges are waiting for [`Self::irq0_edges`], `None`
    /// if OUT will not rise without the guest reprogramming the counter.
    /// The VM arms a timer for it and raises IRQ 0 when it fires.
    pub fn next_irq0(&self, now_ns: u64) -> Option<u64> {
        self.state.counters[0].next_edge_time(now_ns.max(self.state.clock_ns))
    }

    /// How many times counter 0's OUT rose since the last call. The VM
    /// raises IRQ 0 once for any number (the PIC and I/O APIC latch one
    /// edge) and can account the rest as lost ticks.
    pub fn irq0_edges(&mut self, now_ns: u64) -> u64 {
        let now = self.observe(now_ns);
        let c = &mut self.state.counters[0];
        c.settle(now);
        core::mem::take(&mut c.edges)
    }
}

impl Pit {
    /// Counter 0 rose `n` more times than IRQ 0 could latch.
    pub fn owe_ticks(&mut self, n: u64) {
        self.state.owed_ticks = (u64::from(self.state.owed_ticks) + n).min(u64::from(MAX_OWED_TICKS)) as u32;
    }

    /// Takes one owed tick, if any.
    pub fn take_owed_tick(&mut self) -> bool {
        let owed = self.state.owed_ticks > 0;
        self.state.owed_ticks -= u32::from(owed);
        owed
    }

    pub fn owed_ticks(&self) -> u32 {
        self.state.owed_ticks
    }
}

impl Persist for Pit {
    type State = PitState;
    const STATE_VERSION: u16 = 2;

    fn save(&self) -> PitState {
        self.state
    }

    fn validate(s: &PitState) -> Result<(), Invalid> {
        if s.port61 & !P61_WRITABLE != 0 {
            return Err(Invalid("port 0x61 keeps bits that are read-only"));
        }
        for (i, c) in s.counters.iter().enumerate() {
            if c.mode > 7 {
                return Err(Invalid("a counter mode wider than the control word's three bits"));
            }
            if !(LSB..=WORD).contains(&c.access) {
                return Err(Invalid("a counter access mode that is not LSB, MSB or LSB then MSB"));
            }
            let phase_fits = match c.phase {
                IDLE | COUNTING => true,
                HELD => c.mode() == 0,
                ARMED => matches!(c.mode(), 1 | 5),
                _ => false,
            };
            if !phase_fits {
                return Err(Invalid("a counter phase its mode does not have"));
            }
            if c.access != WORD && (c.write_msb || c.read_msb) {
                return Err(Invalid("a byte pointer on the MSB in a one-byte access mode"));
            }
            if c.latch > 2 || (c.latch == 2 && c.access != WORD) {
                return Err(Invalid("more latched bytes than the access mode reads"));
            }
            let max_n = if c.bcd && c.phase == COUNTING { 10_000 } else { 65_536 };
            if c.n == 0 || c.n > max_n || u32::from(c.hold) >= c.modulus() {
                return Err(Invalid("a count the counter cannot hold"));
            }
            if i < 2 && !c.gate {
                return Err(Invalid("the GATE of counter 0 or 1 is low; it is wired high"));
            }
            if s.owed_ticks > MAX_OWED_TICKS {
                return Err(Invalid("more owed ticks than the timer keeps"));
            }
            if c.since_ns > s.clock_ns {
                return Err(Invalid("a counter started after the timer's clock"));
            }
            if c.edge_mark > c.position(s.clock_ns) {
                return Err(Invalid("rising edges counted past the counter's position"));
            }
        }
        Ok(())
    }

    fn restore(&mut self, state: PitState) {
        self.state = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::persist::{RestoreError, decode, save};

    const COUNTER2: u16 = COUNTER0 + 2;

    /// A guest on a simulated clock: every port access takes `io_ns`, and
    /// its TSC runs at 3 GHz.
    struct Guest {
        pit: Pit,
        now: u64,
        io_ns: u64,
    }

    impl Guest {
        fn new(io_ns: u64) -> Self {
            Guest { pit: Pit::new(), now: 1_000_000_000, io_ns }
        }

        fn inb(&mut self, port: u16) -> u8 {
            self.now += self.io_ns;
            if port == PORT61 { self.pit.read_port61(self.now) } else { self.pit.read(port, self.now) }
        }

        fn outb(&mut self, port: u16, value: u8) {
            self.now += self.io_ns;
            if port == PORT61 { self.pit.write_port61(value, self.now) } else { self.pit.write(port, value, self.now) }
        }

        fn rdtsc(&self) -> u64 {
            self.now * 3
        }
    }

    /// `ns_for` as a u64, for the tests' arithmetic.
    fn ns(ticks: u64) -> u64 {
        ns_for(ticks) as u64
    }

    /// `pit_calibrate_tsc(latch, ms, loopmin)` as arch/x86/kernel/tsc.c
    /// runs it; returns the TSC kHz, or None where Linux gives up.
    fn pit_calibrate_tsc(g: &mut Guest, latch: u16, ms: u64, loopmin: u32) -> Option<u64> {
        let v = g.inb(PORT61);
        g.outb(PORT61, (v & !0x02) | 0x01);
        g.outb(CONTROL, 0xb0);
        g.outb(COUNTER2, latch as u8);
        g.outb(COUNTER2, (latch >> 8) as u8);
        let t1 = g.rdtsc();
        let (mut tsc, mut t2) = (t1, t1);
        let (mut pitcnt, mut tscmin, mut tscmax) = (0, u64::MAX, 0);
        while g.inb(PORT61) & 0x20 == 0 {
            t2 = g.rdtsc();
            let delta = t2 - tsc;
            tsc = t2;
            tscmin = tscmin.min(delta);
            tscmax = tscmax.max(delta);
            pitcnt += 1;
        }
        (pitcnt >= loopmin && tscmax <= 10 * tscmin).then(|| (t2 - t1) / ms)
    }

    #[test]
    fn the_tsc_calibration_loop_measures_its_window() {
        // CAL_LATCH/CAL_MS/CAL_PIT_LOOPS, then the CAL2_ variant.
        for (latch, ms, loopmin) in [(11_931u16, 10, 1000), (59_659, 50, 5000)] {
            let mut g = Guest::new(1000);
            let start = g.now + 5 * g.io_ns; // the second count byte
            let khz = pit_calibrate_tsc(&mut g, latch, ms, loopmin).expect("calibration accepted");
            // OUT rises `latch` CLKs after the count is written.
            let window = ns(u64::from(latch));
            let expected = 3 * window / ms;
            assert!(khz.abs_diff(expected) <= 3 * g.io_ns / ms + 1, "{khz} kHz, expected {expected}");
            assert!(g.now - start >= window && g.now - start <= window + 2 * g.io_ns);
        }
        // A 50 ms calibration measures 50 ms: 59659 CLKs are 49.99992 ms.
        assert_eq!(ns(59_659), 49_999_917);
        // With GATE low the counter does not count: bit 5 stays low.
        let mut g = Guest::new(1000);
        g.outb(CONTROL, 0xb0);
        g.outb(COUNTER2, 0x10);
        g.outb(COUNTER2, 0x00);
        g.now += 1_000_000_000;
        assert_eq!(g.inb(PORT61) & 0x20, 0);
        g.outb(PORT61, 0x01);
        g.now += ns(0x10);
        assert_eq!(g.inb(PORT61) & 0x21, 0x21, "counts once the gate opens");
    }

    /// `pit_verify_msb`: read the LSB and ignore it, compare the MSB.
    fn verify_msb(g: &mut Guest, val: u8) -> bool {
        g.inb(COUNTER2);
        g.inb(COUNTER2) == val
    }

    /// `pit_expect_msb`: the TSC when the MSB was last seen at `val`, the
    /// read's uncertainty, and whether it was seen often enough.
    fn expect_msb(g: &mut Guest, val: u8) -> (u64, u64, bool) {
        let mut tsc = 0;
        let mut count = 0;
        while count < 50_000 {
            if !verify_msb(g, val) {
                break;
            }
            tsc = g.rdtsc();
            count += 1;
        }
        (tsc, g.rdtsc() - tsc, count > 5)
    }

    /// `quick_pit_calibrate`: the TSC kHz from watching counter 2's MSB
    /// fall, or None where Linux reports "Fast TSC calibration failed".
    fn quick_pit_calibrate(g: &mut Guest) -> Option<u64> {
        let v = g.inb(PORT61);
        g.outb(PORT61, (v & !0x02) | 0x01);
        g.outb(CONTROL, 0xb0);
        g.outb(COUNTER2, 0xff);
        g.outb(COUNTER2, 0xff);
        verify_msb(g, 0);
        let (tsc, d1, ok) = expect_msb(g, 0xff);
        if !ok {
            return None;
        }
        let max_iterations = 25 * PIT_HZ / 1000 / 256;
        for i in 1..=max_iterations {
            let (t, d2, ok) = expect_msb(g, 0xff - i as u8);
            if !ok {
                return None;
            }
            let delta = t - tsc;
            if d1 + d2 >= delta >> 11 {
                continue;
            }
            if !verify_msb(g, 0xfe - i as u8) {
                return None;
            }
            let delta = delta as i64 + (d2 as i64 - d1 as i64) / 2;
            return Some(delta as u64 * PIT_HZ / (i * 256 * 1000));
        }
        None
    }

    #[test]
    fn fast_tsc_calibration_reads_the_msb_as_linux_does() {
        for io_ns in [500, 1000, 2000] {
            let mut g = Guest::new(io_ns);
            let khz = quick_pit_calibrate(&mut g).expect("fast calibration succeeds");
            // Linux stops once its error bound is under 500 ppm.
            assert!(khz.abs_diff(3_000_000) <= 3_000_000 / 2000, "{khz} kHz at {io_ns} ns per access");
        }
    }

    /// Linux's `pit_set_periodic`: mode 2 at `latch`.
    fn set_periodic(p: &mut Pit, latch: u16, now: u64) {
        p.write(CONTROL, 0x34, now);
        p.write(COUNTER0, latch as u8, now);
        p.write(COUNTER0, (latch >> 8) as u8, now);
    }

    /// PIT_LATCH for HZ=250 (Debian's kernels).
    const LATCH: u64 = (PIT_HZ + 125) / 250;

    #[test]
    fn periodic_ticks_come_on_time_without_drift() {
        let mut p = Pit::new();
        let t0 = 123_456_789;
        set_periodic(&mut p, LATCH as u16, t0);
        assert_eq!(p.irq0_edges(t0), 0, "mode 2 starts with OUT high: no edge");
        let mut now = t0;
        for k in 1..=2500 {
            let t = p.next_irq0(now).expect("periodic");
            assert_eq!(t, t0 + ns(k * LATCH), "tick {k} at its exact time");
            assert_eq!(p.irq0_edges(t - 1), 0);
            assert_eq!(p.irq0_edges(t), 1);
            now = t;
        }
        // Ten seconds of ticks later the period is still exact.
        assert_eq!(p.next_irq0(now), Some(t0 + ns(2501 * LATCH)));
        // Coalesced: one second unattended is 249 edges (1193182 / 4773).
        let mut q = Pit::new();
        set_periodic(&mut q, LATCH as u16, 0);
        assert_eq!(q.irq0_edges(1_000_000_000), 249);
        assert_eq!(q.irq0_edges(1_000_000_000), 0, "reported once");
        // The count runs down within each period.
        let t1 = 1_000_123_456;
        q.write(CONTROL, 0x00, t1); // latch, as i8253_read does
        let d = ticks_in(t1) % LATCH;
        let count = u64::from(q.read(COUNTER0, t1 + 50_000)) | u64::from(q.read(COUNTER0, t1 + 90_000)) << 8;
        assert_eq!(count, LATCH - d, "the latched count, not the later one");
    }

    #[test]
    fn oneshot_events_fire_once() {
        let mut p = Pit::new();
        let t0 = 7_000_000;
        set_periodic(&mut p, LATCH as u16, 0);
        p.irq0_edges(t0);
        // pit_set_oneshot, then pit_next_event(delta).
        p.write(CONTROL, 0x38, t0);
        assert_eq!(p.irq0_edges(t0), 0, "OUT was high already");
        assert_eq!(p.next_irq0(t0), None, "no count yet");
        let delta = 1193u16;
        p.write(COUNTER0, delta as u8, t0);
        assert_eq!(p.next_irq0(t0), None, "the LSB alone does nothing in mode 4");
        p.write(COUNTER0, (delta >> 8) as u8, t0);
        // Mode 4 strobes OUT low at count 0 (N CLKs); it rises one CLK later.
        let fire = t0 + ns(u64::from(delta) + 1);
        assert_eq!(p.next_irq0(t0), Some(fire));
        assert_eq!(p.irq0_edges(fire - 1), 0);
        assert_eq!(p.irq0_edges(fire), 1);
        assert_eq!(p.next_irq0(fire), None, "one shot");
        assert_eq!(p.irq0_edges(fire + 1_000_000_000), 0, "the count wraps without firing again");
        // A new event rearms it; writing while one is pending restarts.
        let t1 = fire + 2_000_000_000;
        p.write(COUNTER0, 100, t1);
        p.write(COUNTER0, 0, t1);
        p.write(COUNTER0, 50, t1 + 10_000);
        assert_eq!(p.next_irq0(t1 + 10_000), Some(t1 + ns(101)), "the LSB leaves the count running");
        p.write(COUNTER0, 0, t1 + 20_000);
        assert_eq!(p.next_irq0(t1 + 20_000), Some(t1 + 20_000 + ns(51)));
    }

    #[test]
    fn shutdown_stops_counter_0() {
        // clockevent_i8253_disable in current Linux: mode 0, a zero count,
        // mode 0 again.
        let mut p = Pit::new();
        set_periodic(&mut p, LATCH as u16, 0);
        let t = 10_000_000;
        assert_eq!(p.irq0_edges(t), 2);
        for (port, v) in [(CONTROL, 0x30), (COUNTER0, 0), (COUNTER0, 0), (CONTROL, 0x30)] {
            p.write(port, v, t);
        }
        assert_eq!(p.next_irq0(t), None);
        assert_eq!(p.irq0_edges(t + 60_000_000_000), 0, "a mode 0 control word stops the counter");
        // The older sequence without the second control word counts 65536
        // CLKs and raises OUT once, as the hardware does.
        let mut q = Pit::new();
        set_periodic(&mut q, LATCH as u16, 0);
        for (port, v) in [(CONTROL, 0x30), (COUNTER0, 0), (COUNTER0, 0)] {
            q.write(port, v, t);
        }
        q.irq0_edges(t);
        assert_eq!(q.next_irq0(t), Some(t + ns(65_536)));
        assert_eq!(q.irq0_edges(t + 60_000_000_000), 1);
        // A control word that raises OUT is an edge: mode 0 (low) to mode 2.
        q.write(CONTROL, 0x30, t + 60_000_000_000);
        q.write(CONTROL, 0x34, t + 60_000_000_000);
        assert_eq!(q.next_irq0(t + 60_000_000_000), Some(t + 60_000_000_000));
        assert_eq!(q.irq0_edges(t + 60_000_000_000), 1);
    }

    #[test]
    fn latches_and_read_back() {
        let mut p = Pit::new();
        set_periodic(&mut p, 1000, 0);
        let t = ns(300);
        p.write(CONTROL, 0x00, t);
        p.write(CONTROL, 0x00, t + ns(100)); // ignored: still latched
        assert_eq!(p.read(COUNTER0, t + ns(200)), (700 & 0xff) as u8);
        assert_eq!(p.read(COUNTER0, t + ns(200)), (700 >> 8) as u8);
        // Unlatched, the count is live and the bytes alternate.
        let now = ns(650);
        assert_eq!(u16::from(p.read(COUNTER0, now)) | u16::from(p.read(COUNTER0, now)) << 8, 350);
        // Read-back of counter 0's count and status: status first.
        p.write(CONTROL, 0xc2, now);
        assert_eq!(p.read(COUNTER0, now), 0b1011_0100, "OUT high, loaded, LSB-MSB, mode 2, binary");
        assert_eq!(p.read(COUNTER0, now + ns(10)), 350u16 as u8);
        assert_eq!(p.read(COUNTER0, now + ns(20)), (350u16 >> 8) as u8);
        // Status only, on counter 2 after a control word: null count.
        p.write(CONTROL, 0xb0, now);
        p.write(CONTROL, 0xe8, now);
        assert_eq!(p.read(COUNTER2, now), 0b0111_0000, "OUT low, null count, LSB-MSB, mode 0");
        // Status latched twice before reading: the first one stays.
        p.write(COUNTER2, 5, now);
        p.write(COUNTER2, 0, now);
        p.write(CONTROL, 0xe8, now);
        p.write(CONTROL, 0xe8, now);
        assert_eq!(p.read(COUNTER2, now) & 0x40, 0, "the count was loaded");
        // A read-back that latches nothing (both bits set) changes nothing.
        p.write(CONTROL, 0xfe, now);
        assert_eq!(p.read(CONTROL, now), 0xff, "the control register is write-only");
        // A control word drops what was latched.
        p.write(CONTROL, 0x80, now);
        p.write(CONTROL, 0xb0, now);
        assert_eq!(p.save().counters[2].latch, 0);
    }

    #[test]
    fn a_new_mode_2_count_waits_for_the_period_end() {
        let mut p = Pit::new();
        set_periodic(&mut p, 1000, 0);
        let t = ns(500);
        p.write(COUNTER0, 0xf4, t);
        p.write(COUNTER0, 0x01, t); // 500
        p.write(CONTROL, 0xe2, t);
        assert_eq!(p.read(COUNTER0, t) & 0x40, 0x40, "null count until the reload");
        assert_eq!(p.next_irq0(t), Some(ns(1000)));
        assert_eq!(p.irq0_edges(ns(1000)), 1);
        assert_eq!(p.next_irq0(ns(1000)), Some(ns(1000) + ns(500)));
        p.write(CONTROL, 0xe2, ns(1001));
        assert_eq!(p.read(COUNTER0, ns(1001)) & 0x40, 0);
        assert_eq!(p.irq0_edges(ns(1000) + ns(5000)), 10);
        // The count reads N down to 1 and OUT is low at 1.
        let mut q = Guest::new(0);
        q.outb(PORT61, 1);
        q.outb(CONTROL, 0xb4); // counter 2, mode 2
        q.outb(COUNTER2, 4);
        q.outb(COUNTER2, 0);
        let t0 = q.now;
        let mut seen = [(0u8, 0u8); 8];
        for (k, s) in seen.iter_mut().enumerate() {
            q.now = t0 + ns(k as u64);
            let count = q.inb(COUNTER2);
            q.inb(COUNTER2);
            *s = (count, q.inb(PORT61) & 0x20);
        }
        assert_eq!(seen, [(4, 32), (3, 32), (2, 32), (1, 0), (4, 32), (3, 32), (2, 32), (1, 0)]);
    }

    #[test]
    fn mode_3_makes_a_square_wave() {
        for (n, high) in [(10u64, 5u64), (9, 5)] {
            let mut g = Guest::new(0);
            g.outb(PORT61, 1);
            g.outb(CONTROL, 0xb6); // counter 2, mode 3
            g.outb(COUNTER2, n as u8);
            g.outb(COUNTER2, 0);
            let t0 = g.now;
            for k in 0..3 * n {
                g.now = t0 + ns(k);
                let out = g.inb(PORT61) & 0x20 != 0;
                assert_eq!(out, k % n < high, "N={n}, CLK {k}");
                let count = u64::from(g.inb(COUNTER2)) | u64::from(g.inb(COUNTER2)) << 8;
                let p = k % n;
                let top = n & !1;
                let expected = if p < high { top - 2 * p } else { top - 2 * (p - high) };
                assert_eq!(count, expected, "N={n}, CLK {k}: decrements by two");
                if n == 9 {
                    assert_eq!(count, [8, 6, 4, 2, 0, 8, 6, 4, 2][p as usize], "odd N loads N-1");
                }
            }
            // GATE low forces OUT high and stops the count.
            g.now = t0 + ns(n - 1);
            g.outb(PORT61, 0);
            g.now += 1_000_000;
            assert_eq!(g.inb(PORT61) & 0x20, 0x20);
        }
        // On counter 0, OUT rises once a period; a new count takes over at
        // the next half cycle (low for 30 CLKs, then periods of 60).
        let mut p = Pit::new();
        p.write(CONTROL, 0x36, 0);
        p.write(COUNTER0, 100, 0);
        p.write(COUNTER0, 0, 0);
        p.write(COUNTER0, 60, ns(20));
        p.write(COUNTER0, 0, ns(20));
        assert_eq!(p.next_irq0(ns(20)), Some(ns(50) + ns(30)));
        assert_eq!(p.irq0_edges(ns(50) + ns(30)), 1);
        assert_eq!(p.next_irq0(ns(80)), Some(ns(50) + ns(90)));
        assert_eq!(p.irq0_edges(ns(50) + ns(30) + ns(600)), 10);
    }

    #[test]
    fn modes_1_and_5_are_triggered_by_the_gate() {
        // Mode 1: OUT low from the trigger for N CLKs; retriggerable.
        let mut g = Guest::new(0);
        g.outb(CONTROL, 0x92); // counter 2, LSB, mode 1
        g.outb(COUNTER2, 5);
        g.now += 1_000_000;
        assert_eq!(g.inb(PORT61) & 0x20, 0x20, "armed, OUT high");
        g.outb(PORT61, 1);
        let t0 = g.now;
        g.now = t0 + ns(4);
        assert_eq!(g.inb(PORT61) & 0x20, 0);
        assert_eq!(g.inb(COUNTER2), 1);
        g.now = t0 + ns(5);
        assert_eq!(g.inb(PORT61) & 0x20, 0x20);
        g.outb(PORT61, 0);
        g.now = t0 + ns(7);
        g.outb(PORT61, 1);
        assert_eq!(g.inb(PORT61) & 0x20, 0, "retriggered");
        // Mode 5: OUT strobes low for one CLK N CLKs after the trigger.
        let mut g = Guest::new(0);
        g.outb(CONTROL, 0x9a);
        g.outb(COUNTER2, 3);
        g.outb(PORT61, 1);
        let t0 = g.now;
        let outs: [u8; 6] = core::array::from_fn(|k| {
            g.now = t0 + ns(k as u64);
            g.inb(PORT61) & 0x20
        });
        assert_eq!(outs, [32, 32, 32, 0, 32, 32]);
        // Without a trigger nothing happens, in either mode: counter 0's
        // GATE is wired high and never rises.
        let mut p = Pit::new();
        p.write(CONTROL, 0x12, 0);
        p.write(COUNTER0, 5, 0);
        assert_eq!(p.next_irq0(0), None);
    }

    #[test]
    fn the_gate_pauses_modes_0_and_4() {
        let mut g = Guest::new(0);
        g.outb(PORT61, 1);
        g.outb(CONTROL, 0x90); // counter 2, LSB, mode 0
        g.outb(COUNTER2, 100);
        let t0 = g.now;
        g.now = t0 + ns(30);
        g.outb(PORT61, 0);
        g.now += 1_000_000_000;
        assert_eq!(g.inb(COUNTER2), 70);
        g.outb(PORT61, 1);
        let resumed = g.now;
        g.now = resumed + ns(69);
        assert_eq!(g.inb(PORT61) & 0x20, 0);
        g.now = resumed + ns(70);
        assert_eq!(g.inb(PORT61) & 0x20, 0x20);
        assert_eq!(g.inb(COUNTER2), 0);
        g.now = resumed + ns(71);
        assert_eq!(g.inb(COUNTER2), 0xff, "counts on past zero");
        // Mode 0: the first byte of a two-byte count stops it, OUT low.
        g.outb(CONTROL, 0xb0);
        g.outb(COUNTER2, 0x00);
        g.now += 1_000_000;
        assert_eq!(g.inb(PORT61) & 0x20, 0);
        g.outb(COUNTER2, 0x01);
        let t1 = g.now;
        g.now = t1 + ns(256);
        assert_eq!(g.inb(PORT61) & 0x20, 0x20);
    }

    #[test]
    fn bcd_and_byte_access_modes() {
        let mut g = Guest::new(0);
        g.outb(PORT61, 1);
        g.outb(CONTROL, 0xb1); // counter 2, LSB-MSB, mode 0, BCD
        g.outb(COUNTER2, 0x00);
        g.outb(COUNTER2, 0x10); // 1000
        let t0 = g.now;
        let word = |g: &mut Guest| u16::from(g.inb(COUNTER2)) | u16::from(g.inb(COUNTER2)) << 8;
        g.now = t0 + ns(1);
        assert_eq!(word(&mut g), 0x0999);
        g.now = t0 + ns(1000);
        assert_eq!(word(&mut g), 0x0000);
        g.now = t0 + ns(1001);
        assert_eq!(word(&mut g), 0x9999, "BCD wraps at 10000");
        // A BCD zero is 10^4.
        g.outb(COUNTER2, 0);
        g.outb(COUNTER2, 0);
        let t1 = g.now;
        g.now = t1 + ns(9_999);
        assert_eq!(g.inb(PORT61) & 0x20, 0);
        g.now = t1 + ns(10_000);
        assert_eq!(g.inb(PORT61) & 0x20, 0x20);
        // Non-BCD digits do not upset it.
        g.outb(COUNTER2, 0xff);
        g.outb(COUNTER2, 0xff);
        assert_eq!(g.pit.save().counters[2].n, 6665);
        // LSB only: the MSB is zero; reads give the LSB.
        g.outb(CONTROL, 0x90);
        g.outb(COUNTER2, 0x34);
        let t2 = g.now;
        g.now = t2 + ns(4);
        assert_eq!((g.inb(COUNTER2), g.inb(COUNTER2)), (0x30, 0x30));
        // MSB only: the LSB is zero; reads give the MSB.
        g.outb(CONTROL, 0xa0);
        g.outb(COUNTER2, 0x12);
        let t3 = g.now;
        g.now = t3 + ns(0x101);
        assert_eq!((g.inb(COUNTER2), g.inb(COUNTER2)), (0x10, 0x10));
        // Reads and writes keep separate byte pointers ("Write Operations":
        // they may interleave).
        g.outb(CONTROL, 0xb0);
        g.outb(COUNTER2, 0x00);
        g.outb(COUNTER2, 0x02); // 512, loaded now
        let t4 = g.now;
        g.now = t4 + ns(2);
        assert_eq!(g.inb(COUNTER2), 0xfe);
        g.outb(COUNTER2, 0x00);
        assert_eq!(g.inb(COUNTER2), 0x01, "MSB of the held count");
        g.outb(COUNTER2, 0x04);
        assert_eq!(g.pit.save().counters[2].n, 0x400);
    }

    #[test]
    fn port_61() {
        let mut p = Pit::new();
        p.write_port61(0xff, 0);
        let a = p.read_port61(0);
        let b = p.read_port61(0);
        assert_eq!(a & 0x0f, 0x0f, "GATE 2, speaker and NMI enables read back");
        assert_eq!(a & 0xc0, 0, "no NMI sources");
        assert_ne!(a & 0x10, b & 0x10, "the refresh bit toggles");
        assert_eq!(a & 0x20, 0x20, "an idle counter 2 has OUT high");
        p.write_port61(0x00, 0);
        assert_eq!(p.save().port61, 0);
        assert!(!p.save().counters[2].gate);
        assert_eq!(p.read(0x44, 0), 0xff);
        p.write(0x3f, 1, 0);
    }

    #[test]
    fn time_going_backwards_is_no_time() {
        let mut p = Pit::new();
        set_periodic(&mut p, 1000, 1_000_000);
        let later = 1_000_000 + ns(300);
        p.write(CONTROL, 0x00, later);
        let lo = p.read(COUNTER0, later);
        assert_eq!(lo, (700 & 0xff) as u8);
        p.read(COUNTER0, later);
        assert_eq!(p.read(COUNTER0, 0), lo, "the clock went back: still 700");
        assert_eq!(p.next_irq0(0), p.next_irq0(later));
        assert_eq!(p.irq0_edges(0), 0);
        p.write(CONTROL, 0x34, 5);
        p.write(COUNTER0, 10, 5);
        p.write(COUNTER0, 0, 5);
        assert_eq!(p.next_irq0(0), Some(later + ns(10)), "loaded at the latest time seen");
        // The end of time: nothing overflows.
        p.write(COUNTER0, 0, u64::MAX - 10);
        p.write(COUNTER0, 0, u64::MAX - 10);
        assert!(p.next_irq0(u64::MAX).is_none_or(|t| t == u64::MAX));
        p.irq0_edges(u64::MAX);
    }

    /// xorshift64: deterministic noise for the fuzz tests.
    fn noise(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn any_guest_sequence_keeps_a_valid_state() {
        let mut seed = 0x2545_f491_4f6c_dd1d;
        for round in 0..100 {
            let mut p = Pit::new();
            let mut now: u64 = if round % 10 == 9 { u64::MAX - 1_000_000_000 } else { 0 };
            for _ in 0..400 {
                let r = noise(&mut seed);
                now = match r % 16 {
                    0 => now.saturating_sub(r >> 44),
                    1 => now.saturating_add(r >> 20),
                    _ => now.saturating_add((r >> 52) * 100),
                };
                let v = (r >> 8) as u8;
                // Control words biased to mean something.
                let v = if r & 0x30000 == 0 { v & 0xfe } else { v };
                let port = COUNTER0 + ((r >> 24) % 5) as u16;
                match (r >> 28) % 6 {
                    0 | 1 => p.write(port, v, now),
                    2 => {
                        p.read(port, now);
                    }
                    3 => p.write_port61(v, now),
                    4 => {
                        p.read_port61(now);
                    }
                    _ => {
                        // The VM's timer: when next_irq0 says, edges are due.
                        if let Some(t) = p.next_irq0(now) {
                            assert!(t >= now.max(p.save().clock_ns));
                            let mut q = p.clone();
                            assert!(q.irq0_edges(t) >= 1, "an edge at {t}");
                            if t > now.max(p.save().clock_ns) {
                                assert_eq!(p.clone().irq0_edges(t - 1), 0, "no edge before {t}");
                            }
                        }
                        p.irq0_edges(now);
                    }
                }
                assert_eq!(Pit::validate(&p.save()), Ok(()), "after {r:#x}");
            }
        }
    }

    #[test]
    fn state_round_trips_and_resumes_counting() {
        let mut p = Pit::new();
        set_periodic(&mut p, 1000, 0);
        p.write(COUNTER0, 0xf4, ns(500));
        p.write(COUNTER0, 0x01, ns(500)); // 500, pending
        p.write_port61(0x03, ns(510));
        p.write(CONTROL, 0xb0, ns(520));
        p.write(COUNTER2, 0x00, ns(520));
        p.write(COUNTER2, 0x10, ns(520));
        p.write(CONTROL, 0x80, ns(600)); // counter 2 latched
        p.read(COUNTER2, ns(600));
        let saved = save("pit", &p);
        let mut back = Pit::new();
        back.restore(decode::<Pit>("pit", &saved).unwrap());
        assert_eq!(back, p);
        // The VM clock continues: both count on identically.
        for q in [&mut p, &mut back] {
            assert_eq!(q.read(COUNTER2, ns(700)), 0x0f, "the latched MSB");
            assert_eq!(q.next_irq0(ns(700)), Some(ns(1000)));
            assert_eq!(q.irq0_edges(ns(1000) + ns(1500)), 4);
            assert_eq!(q.read_port61(ns(520) + ns(0x1000)) & 0x20, 0x20);
        }
        assert_eq!(back, p);
    }

    #[test]
    fn hostile_state_is_refused() {
        let mut p = Pit::new();
        set_periodic(&mut p, 1000, 50);
        let good = p.save();
        let refuse = |f: &dyn Fn(&mut PitState), why: &'static str| {
            let mut s = good;
            f(&mut s);
            let mut q = Pit::new();
            q.state = s;
            assert_eq!(
                decode::<Pit>("pit", &save("pit", &q)),
                Err(RestoreError::Invalid { device: "pit", why }),
                "{why}"
            );
        };
        refuse(&|s| s.port61 = 0x20, "port 0x61 keeps bits that are read-only");
        refuse(&|s| s.counters[0].mode = 8, "a counter mode wider than the control word's three bits");
        for access in [0, 4] {
            refuse(&|s| s.counters[1].access = access, "a counter access mode that is not LSB, MSB or LSB then MSB");
        }
        refuse(&|s| s.counters[2].phase = 4, "a counter phase its mode does not have");
        refuse(&|s| s.counters[0].phase = HELD, "a counter phase its mode does not have");
        refuse(&|s| s.counters[0].phase = ARMED, "a counter phase its mode does not have");
        refuse(
            &|s| {
                s.counters[2].access = LSB;
                s.counters[2].read_msb = true;
            },
            "a byte pointer on the MSB in a one-byte access mode",
        );
        refuse(&|s| s.counters[0].latch = 3, "more latched bytes than the access mode reads");
        refuse(
            &|s| {
                s.counters[0].access = MSB;
                s.counters[0].latch = 2;
            },
            "more latched bytes than the access mode reads",
        );
        refuse(&|s| s.counters[0].n = 0, "a count the counter cannot hold");
        refuse(&|s| s.counters[0].n = 65_537, "a count the counter cannot hold");
        refuse(
            &|s| {
                s.counters[0].bcd = true;
                s.counters[0].n = 10_001;
            },
            "a count the counter cannot hold",
        );
        refuse(
            &|s| {
                s.counters[2].bcd = true;
                s.counters[2].hold = 10_000;
            },
            "a count the counter cannot hold",
        );
        refuse(&|s| s.counters[1].gate = false, "the GATE of counter 0 or 1 is low; it is wired high");
        refuse(&|s| s.counters[0].since_ns = 51, "a counter started after the timer's clock");
        refuse(&|s| s.counters[0].edge_mark = 1, "rising edges counted past the counter's position");
        let mut saved = save("pit", &p);
        saved.bytes.push(0);
        assert_eq!(decode::<Pit>("pit", &saved), Err(RestoreError::Corrupt { device: "pit" }));
    }
}
