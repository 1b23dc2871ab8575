//! virtio-console (device ID 3, virtio 1.2 5.3): one port, no multiport,
//! no emergency write. Queue 0 (receiveq) carries host input to the guest,
//! queue 1 (transmitq) the guest's output to the host. Linux's
//! `virtio_console` makes it `hvc0`.
//!
//! Every VM has one (`devices::virtio_slots`): its output is printed line
//! by line as `[vm N hvc0] ...` ([`Console::take_lines`]), or byte for byte
//! to a terminal attached with `vm console <id> virtio`
//! ([`Console::take_output`]), whose keys come in through
//! [`Console::input`] and then
//! [`VirtioMmio::device_work`](super::mmio::VirtioMmio::device_work) on
//! queue 0.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use super::queue::{Queue, QueueError};
use super::{GuestMemory, VirtioDevice};
use crate::devices::persist::{Invalid, Persist};

/// virtio-console's device ID (5, "Device Types").
pub const DEVICE_ID: u32 = 3;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 128;
/// Host input held until the guest posts receive buffers: what a
/// terminal's paste may bring; more is refused ([`Console::input`]).
pub const MAX_INPUT: usize = 4096;
/// Guest output held until the host takes it: past it the oldest bytes go
/// (a console nobody reads must not grow the host's heap).
pub const MAX_OUTPUT: usize = 16384;
/// Most bytes taken from one transmit chain (the rest is still consumed).
const MAX_PER_CHAIN: u32 = 4096;

/// The console device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Console {
    input: VecDeque<u8>,
    output: VecDeque<u8>,
    /// Output bytes dropped because nobody took them.
    dropped: u64,
    /// A terminal is attached (the host's, not the guest's state): output
    /// is kept for [`Self::take_output`], not split into lines.
    attached: bool,
}

impl Console {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queue host input for the guest; how many bytes were taken (the rest
    /// did not fit in [`MAX_INPUT`]). The caller then runs the receive
    /// queue (`device_work(0)`).
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(MAX_INPUT - self.input.len());
        self.input.extend(&bytes[..n]);
        n
    }

    /// What the guest wrote since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        self.output.drain(..).collect()
    }

    /// Attach (`true`) or detach a terminal.
    pub fn set_attached(&mut self, on: bool) {
        self.attached = on;
    }

    pub fn is_attached(&self) -> bool {
        self.attached
    }

    /// The complete lines written since the last call (up to the last
    /// newline; the rest waits for its end), `\r` dropped, invalid UTF-8
    /// and control characters shown as U+FFFD (a guest must not drive the
    /// operator's terminal, as for COM1). Nothing while a terminal is
    /// attached.
    pub fn take_lines(&mut self) -> Vec<alloc::string::String> {
        let Some(end) = (!self.attached).then(|| self.output.iter().rposition(|&b| b == b'\n')).flatten() else {
            return Vec::new();
        };
        let bytes: Vec<u8> = self.output.drain(..=end).filter(|&b| b != b'\r').collect();
        bytes[..bytes.len() - 1]
            .split(|&b| b == b'\n')
            .map(|l| {
                let text = alloc::string::String::from_utf8_lossy(l);
                text.chars().map(|c| if c.is_control() && c != '\t' { '\u{fffd}' } else { c }).collect()
            })
            .collect()
    }

    /// Output bytes lost because nobody took them in time.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Receive queue: host input into the guest's writable buffers.
    fn receive(&mut self, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<(), QueueError> {
        while !self.input.is_empty() {
            let Some(chain) = queue.pop(mem)? else { return Ok(()) };
            if !chain.readable.is_empty() {
                queue.undo_pop();
                return Err(QueueError::Direction);
            }
            let n = (chain.writable_len() as usize).min(self.input.len());
            let bytes: Vec<u8> = self.input.iter().take(n).copied().collect();
            let written = Queue::write_chain(mem, &chain, &bytes)?;
            self.input.drain(..written as usize);
            queue.push_used(mem, chain.head, written)?;
        }
        Ok(())
    }

    /// Transmit queue: the guest's readable buffers to the output.
    fn transmit(&mut self, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<(), QueueError> {
        while let Some(chain) = queue.pop(mem)? {
            if !chain.writable.is_empty() {
                queue.undo_pop();
                return Err(QueueError::Direction);
            }
            let mut left = MAX_PER_CHAIN;
            for b in &chain.readable {
                let n = b.len.min(left);
                let mut buf = vec![0u8; n as usize];
                mem.read(b.gpa, &mut buf)?;
                for byte in buf {
                    if self.output.len() == MAX_OUTPUT {
                        self.output.pop_front();
                        self.dropped += 1;
                    }
                    self.output.push_back(byte);
                }
                left -= n;
            }
            // 5.3.6.1: the device writes nothing into a transmit buffer.
            queue.push_used(mem, chain.head, 0)?;
        }
        Ok(())
    }
}

impl VirtioDevice for Console {
    const DEVICE_ID: u32 = DEVICE_ID;
    const QUEUES: usize = 2;
    const QUEUE_MAX_SIZE: u16 = QUEUE_SIZE;

    fn features(&self) -> u64 {
        // Neither SIZE, MULTIPORT nor EMERG_WRITE (5.3.3).
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // Every field is conditional on a feature not offered (5.3.4).
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, _features: u64) {}

    fn reset(&mut self) {
        // Input typed before the driver came up is kept for it; output is
        // the host's to take.
    }

    fn notify(&mut self, index: usize, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<(), QueueError> {
        match index {
            0 => self.receive(queue, mem),
            _ => self.transmit(queue, mem),
        }
    }
}

/// The console's state: the bytes in flight either way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    pub input: Vec<u8>,
    pub output: Vec<u8>,
    pub dropped: u64,
}

impl Persist for Console {
    type State = ConsoleState;
    const STATE_VERSION: u16 = 1;

    fn save(&self) -> ConsoleState {
        ConsoleState {
            input: self.input.iter().copied().collect(),
            output: self.output.iter().copied().collect(),
            dropped: self.dropped,
        }
    }

    fn validate(s: &ConsoleState) -> Result<(), Invalid> {
        if s.input.len() > MAX_INPUT {
            return Err(Invalid("more pending input than the console holds"));
        }
        if s.output.len() > MAX_OUTPUT {
            return Err(Invalid("more pending output than the console holds"));
        }
        Ok(())
    }

    fn restore(&mut self, s: ConsoleState) {
        self.input = s.input.into();
        self.output = s.output.into();
        self.dropped = s.dropped;
        self.attached = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::VecMemory;
    use crate::devices::virtio::feature::VERSION_1;
    use crate::devices::virtio::mmio::{VirtioMmio, reg, status};
    use crate::devices::virtio::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

    /// Queue `q` of 8 entries: descriptors at `base`, avail at +0x100,
    /// used at +0x200.
    fn setup(d: &mut VirtioMmio<Console>, mem: &mut VecMemory, q: u32, base: u64) {
        d.write(reg::QUEUE_SEL, 4, q.into(), mem);
        d.write(reg::QUEUE_NUM, 4, 8, mem);
        for (low, gpa) in
            [(reg::QUEUE_DESC_LOW, base), (reg::QUEUE_DRIVER_LOW, base + 0x100), (reg::QUEUE_DEVICE_LOW, base + 0x200)]
        {
            d.write(low, 4, gpa, mem);
        }
        d.write(reg::QUEUE_READY, 4, 1, mem);
    }

    fn up() -> (VirtioMmio<Console>, VecMemory) {
        let mut mem = VecMemory::new(0, 0x10000);
        let mut d = VirtioMmio::new(Console::new());
        assert_eq!(d.read(reg::DEVICE_ID, 4), 3);
        d.write(reg::STATUS, 4, u64::from(status::ACKNOWLEDGE | status::DRIVER), &mut mem);
        d.write(reg::DRIVER_FEATURES_SEL, 4, 1, &mut mem);
        d.write(reg::DRIVER_FEATURES, 4, VERSION_1 >> 32, &mut mem);
        d.write(reg::STATUS, 4, u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK), &mut mem);
        setup(&mut d, &mut mem, 0, 0x1000);
        setup(&mut d, &mut mem, 1, 0x2000);
        let ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        d.write(reg::STATUS, 4, u64::from(ok), &mut mem);
        assert_eq!(d.read(reg::STATUS, 4), u64::from(ok));
        (d, mem)
    }

    fn desc(mem: &mut VecMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = (table + 16 * u64::from(i)) as usize;
        mem.bytes[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        mem.bytes[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        mem.bytes[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        mem.bytes[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    }

    fn publish(mem: &mut VecMemory, base: u64, slot: u16, head: u16) {
        let avail = (base + 0x100) as usize;
        let s = avail + 4 + 2 * usize::from(slot);
        mem.bytes[s..s + 2].copy_from_slice(&head.to_le_bytes());
        mem.bytes[avail + 2..avail + 4].copy_from_slice(&(slot + 1).to_le_bytes());
    }

    fn used_idx(mem: &VecMemory, base: u64) -> u16 {
        let at = (base + 0x202) as usize;
        u16::from_le_bytes([mem.bytes[at], mem.bytes[at + 1]])
    }

    #[test]
    fn output_reaches_the_host_and_input_the_guest() {
        let (mut d, mut mem) = up();
        // The guest writes "hel" + "lo\n" in one two-buffer chain.
        mem.bytes[0x8000..0x8003].copy_from_slice(b"hel");
        mem.bytes[0x8100..0x8103].copy_from_slice(b"lo\n");
        desc(&mut mem, 0x2000, 0, 0x8000, 3, VIRTQ_DESC_F_NEXT, 1);
        desc(&mut mem, 0x2000, 1, 0x8100, 3, 0, 0);
        publish(&mut mem, 0x2000, 0, 0);
        d.write(reg::QUEUE_NOTIFY, 4, 1, &mut mem);
        assert_eq!(d.device_mut().take_output(), b"hello\n");
        assert_eq!(used_idx(&mem, 0x2000), 1);
        assert!(d.interrupt_asserted());
        d.write(reg::INTERRUPT_ACK, 4, 1, &mut mem);
        // Host input waits for a receive buffer, then fills it.
        assert_eq!(d.device_mut().input(b"ls\r"), 3);
        d.device_work(0, &mut mem);
        assert_eq!(used_idx(&mem, 0x1000), 0, "no buffer posted yet");
        desc(&mut mem, 0x1000, 0, 0x9000, 2, VIRTQ_DESC_F_WRITE, 0);
        publish(&mut mem, 0x1000, 0, 0);
        d.write(reg::QUEUE_NOTIFY, 4, 0, &mut mem);
        assert_eq!(&mem.bytes[0x9000..0x9002], b"ls");
        assert_eq!(used_idx(&mem, 0x1000), 1);
        assert!(d.interrupt_asserted());
        // The rest goes into the next buffer, delivered by the host.
        desc(&mut mem, 0x1000, 1, 0x9100, 8, VIRTQ_DESC_F_WRITE, 0);
        publish(&mut mem, 0x1000, 1, 1);
        d.device_work(0, &mut mem);
        assert_eq!(mem.bytes[0x9100], b'\r');
        assert_eq!(used_idx(&mem, 0x1000), 2);
        // Input beyond what the console holds is refused.
        assert_eq!(d.device_mut().input(&[b'x'; MAX_INPUT + 10]), MAX_INPUT);
    }

    #[test]
    fn output_is_split_into_lines_unless_a_terminal_is_attached() {
        let (mut d, mut mem) = up();
        mem.bytes[0x8000..0x800c].copy_from_slice(b"a\r\nbc\n\x1bd\npar");
        desc(&mut mem, 0x2000, 0, 0x8000, 12, 0, 0);
        publish(&mut mem, 0x2000, 0, 0);
        d.write(reg::QUEUE_NOTIFY, 4, 1, &mut mem);
        assert_eq!(d.device_mut().take_lines(), ["a", "bc", "\u{fffd}d"]);
        assert!(d.device_mut().take_lines().is_empty(), "the partial line waits for its end");
        d.device_mut().set_attached(true);
        assert!(d.device_mut().take_lines().is_empty());
        assert_eq!(d.device_mut().take_output(), b"par");
    }

    #[test]
    fn wrong_directions_need_a_reset_and_state_round_trips() {
        let (mut d, mut mem) = up();
        // A writable buffer on the transmit queue.
        desc(&mut mem, 0x2000, 0, 0x8000, 4, VIRTQ_DESC_F_WRITE, 0);
        publish(&mut mem, 0x2000, 0, 0);
        let before = mem.bytes.clone();
        d.write(reg::QUEUE_NOTIFY, 4, 1, &mut mem);
        assert_ne!(d.read(reg::STATUS, 4) & u64::from(status::DEVICE_NEEDS_RESET), 0);
        assert_eq!(mem.bytes, before, "a refused chain changed guest memory");
        // Saved state carries the bytes in flight; impossible ones refused.
        let (mut d, _) = up();
        d.device_mut().input(b"abc");
        let s = d.save();
        let mut e = VirtioMmio::new(Console::new());
        e.restore(s.clone());
        assert_eq!(e.save(), s);
        let bad = ConsoleState { input: vec![0; MAX_INPUT + 1], output: vec![], dropped: 0 };
        assert!(Console::validate(&bad).is_err());
    }
}
