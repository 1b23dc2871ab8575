//! Live migration between two hosts over the host network (issue 14,
//! pre-copy): the source sends a `migrate` live stream over one TCP
//! connection while its VM keeps running ([`source`]), the destination
//! applies it to a new VM that runs only once the stream ended correctly
//! ([`destination`]), then answers with one line. `docs/migration.md` has
//! the design.
//!
//! ```text
//! source                                         destination (migrate listen)
//!   | -- migrate stream (live header, memory     |
//!   |    rounds, vCPU, devices, end record) ---->|  applied record by record to a
//!   |                                            |  new VM that does not run yet
//!   |<-- "HVMIGRATE OK <id>\n" ------------------|  the VM runs; or
//!   |<-- "HVMIGRATE REFUSED <why>\n" ------------|  the partial VM is dropped
//! ```
//!
//! The source frees its VM only after the OK line; any other end (refusal,
//! reset, silence) leaves it running there, as if nothing had happened.

pub mod command;
pub mod destination;
pub mod postcopy;
pub mod source;

#[cfg(test)]
mod postcopy_tests;
#[cfg(test)]
mod tests;

/// The port `migrate listen` and `vm migrate` use unless told.
pub const DEFAULT_PORT: u16 = 7070;
/// The destination's answer once its VM runs: the line, then its id.
pub const REPLY_OK: &str = "HVMIGRATE OK ";
/// The destination's answer when it refused the stream: the line, then why.
pub const REPLY_REFUSED: &str = "HVMIGRATE REFUSED ";
/// Longest answer line either side accepts.
pub const MAX_REPLY: usize = 512;
/// A connection that moves no byte for this long is given up (the
/// destination may be busy applying; the source may be throttled).
pub const IDLE_US: u64 = 20_000_000;

/// The host's migrations: one outgoing and one incoming at a time, the
/// outcome of each VM's last, and finished connections closing.
pub struct Migrations<B: crate::backend::Backend> {
    pub out: Option<source::Outgoing>,
    /// The last finished migration of each VM that migrated from here.
    pub last: alloc::collections::BTreeMap<u32, source::Status>,
    pub incoming: Option<destination::Incoming<B>>,
    /// Streams whose close handshake runs, with a deadline to reset them.
    closing: alloc::vec::Vec<(crate::hostnet::tcp::StreamId, u64)>,
}

impl<B: crate::backend::Backend> Default for Migrations<B> {
    fn default() -> Self {
        Migrations { out: None, last: Default::default(), incoming: None, closing: alloc::vec::Vec::new() }
    }
}

impl<B: crate::backend::Backend> Migrations<B> {
    /// Whether a migration (either way, or a stream's close) is under way:
    /// it moves at every turn of the main loop.
    pub fn busy(&self) -> bool {
        self.out.is_some() || self.incoming.is_some() || !self.closing.is_empty()
    }

    /// Frees closed streams; resets those whose peer never finished.
    fn reap(&mut self, t: &mut impl crate::hostnet::tcp::Transport, now_us: u64) {
        self.closing.retain(|&(s, deadline)| {
            let closed = t.state(s) == crate::hostnet::tcp::StreamState::Closed;
            if closed {
                t.release(s);
            } else if now_us > deadline {
                t.abort(s);
            }
            !closed && now_us <= deadline
        });
    }
}
