//! virtio-entropy (virtio 1.2 5.4, device ID 4): one queue of
//! device-writable buffers the device fills with random bytes from the
//! host's [`EntropySource`]. No feature bits, no configuration space.
//!
//! Linux's driver (`drivers/char/hw_random/virtio-rng.c`) posts one small
//! buffer at a time and feeds what comes back to the kernel's pool.

use alloc::vec;

use super::queue::{Queue, QueueError};
use super::{GuestMemory, VirtioDevice};
use crate::devices::persist::{Invalid, Persist};

/// The entropy device's ID (5, "Device Types").
pub const DEVICE_ID: u32 = 4;
/// Its queue's size at most (Firecracker's and QEMU's default too).
pub const QUEUE_SIZE: u16 = 256;
/// Bytes given per buffer at most: bounds the work of one notification
/// (5.4.6.2 lets the device use less than the whole buffer).
pub const MAX_PER_CHAIN: u32 = 4096;

/// Where random bytes come from: RDSEED/RDRAND on the target, a
/// deterministic sequence in tests.
pub trait EntropySource {
    /// Fill `buf`, or fail (the hardware ran dry); then the request waits
    /// for the next notification.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), NoEntropy>;
}

/// The source had no entropy to give now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoEntropy;

/// The entropy device over source `E`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng<E> {
    source: E,
}

impl<E: EntropySource> Rng<E> {
    pub fn new(source: E) -> Self {
        Rng { source }
    }

    pub fn source(&self) -> &E {
        &self.source
    }

    pub fn source_mut(&mut self) -> &mut E {
        &mut self.source
    }
}

impl<E: EntropySource> VirtioDevice for Rng<E> {
    const DEVICE_ID: u32 = DEVICE_ID;
    const QUEUES: usize = 1;
    const QUEUE_MAX_SIZE: u16 = QUEUE_SIZE;

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space (5.4.4).
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, _features: u64) {}

    fn reset(&mut self) {}

    /// Fill every available buffer. A chain with a device-readable buffer
    /// (5.4.6.1: the driver MUST NOT) or no room at all is refused.
    fn notify(&mut self, _index: usize, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<(), QueueError> {
        while let Some(chain) = queue.pop(mem)? {
            let room = chain.writable_len();
            let refused = if !chain.readable.is_empty() {
                Some(QueueError::Direction)
            } else if room == 0 {
                // 5.4.6.2: the device MUST place one or more bytes.
                Some(QueueError::TooShort { needed: 1, found: 0 })
            } else {
                None
            };
            if let Some(e) = refused {
                // The queue stays as the guest left it: a saved state shows
                // the chain not taken.
                queue.undo_pop();
                return Err(e);
            }
            let mut bytes = vec![0u8; room.min(MAX_PER_CHAIN) as usize];
            if self.source.fill(&mut bytes).is_err() {
                // Leave the buffer available: the driver's next
                // notification (or a later one) retries.
                queue.undo_pop();
                log::warn!("virtio-rng: the host entropy source is dry");
                return Ok(());
            }
            let written = Queue::write_chain(mem, &chain, &bytes)?;
            queue.push_used(mem, chain.head, written)?;
        }
        Ok(())
    }
}

/// No state of its own: the source is the host's, not the guest's.
impl<E: EntropySource> Persist for Rng<E> {
    type State = ();
    const STATE_VERSION: u16 = 1;

    fn save(&self) {}

    fn validate(_: &()) -> Result<(), Invalid> {
        Ok(())
    }

    fn restore(&mut self, _: ()) {}
}

/// A deterministic source for tests and the fuzz target: a counter run
/// through SplitMix64, so buffers differ and are predictable. Can be told
/// to run dry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestSource {
    pub state: u64,
    pub dry: bool,
}

impl TestSource {
    /// SplitMix64's output for `z` (its low byte is the byte for `z`).
    pub fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl EntropySource for TestSource {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), NoEntropy> {
        if self.dry {
            return Err(NoEntropy);
        }
        for b in buf {
            *b = Self::splitmix(self.state) as u8;
            self.state = self.state.wrapping_add(1);
        }
        Ok(())
    }
}
