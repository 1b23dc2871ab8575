//! Applying a stream to a VM, and checking a whole stream first.

use core::convert::Infallible;
use core::fmt;

use vcpu::GuestState;

use crate::PAGE_SIZE;
use crate::error::{At, Error};
use crate::header::Header;
use crate::io::Source;
use crate::page::MemOp;
use crate::reader::{Reader, Record};
use crate::stats::Stats;

/// What a VM being restored does with each record. Every method is
/// required: a sink that forgets a kind of state does not compile.
///
/// Calls come in stream order, each after its record passed every check,
/// but a later record may fail: apply to a VM that has not run and drop
/// it on error.
pub trait Apply {
    /// The sink's own refusal (a device rejecting its state, no memory).
    type Error;

    fn vcpu(&mut self, index: u32, state: GuestState) -> Result<(), Self::Error>;
    /// A device's state; `version` is the configuration's for that name.
    fn device(&mut self, name: &str, version: u16, bytes: &[u8]) -> Result<(), Self::Error>;
    /// The `pages` pages from `gfn` on were one large page: the calls
    /// that follow fill it, in order.
    fn large_run(&mut self, gfn: u64, pages: u32) -> Result<(), Self::Error>;
    /// Whole pages of data from `gfn` on (`data.len()` a multiple of
    /// [`PAGE_SIZE`]).
    fn pages(&mut self, gfn: u64, data: &[u8]) -> Result<(), Self::Error>;
    /// `pages` zero pages from `gfn` on.
    fn zero(&mut self, gfn: u64, pages: u32) -> Result<(), Self::Error>;
    /// Page `gfn` has content `id`, sent here for the first time; keep it
    /// (e.g. as a shared frame) for later references.
    fn shared(&mut self, gfn: u64, id: u32, data: &[u8; PAGE_SIZE]) -> Result<(), Self::Error>;
    /// Page `gfn` has content `id`, sent earlier.
    fn shared_ref(&mut self, gfn: u64, id: u32) -> Result<(), Self::Error>;
    /// Page `gfn` was lost to an uncorrectable memory error at the source.
    fn poisoned(&mut self, gfn: u64) -> Result<(), Self::Error>;
    /// Post-copy: the `pages` pages from `gfn` on come after the resume
    /// record; keep them from the guest until they do.
    fn pending(&mut self, gfn: u64, pages: u32) -> Result<(), Self::Error>;
    /// Every vCPU and device has arrived (live migration): the VM may run.
    fn resume(&mut self) -> Result<(), Self::Error>;
}

/// A sink that keeps nothing: reading into it checks a whole stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct Discard;

impl Apply for Discard {
    type Error = Infallible;

    fn vcpu(&mut self, _: u32, _: GuestState) -> Result<(), Infallible> {
        Ok(())
    }
    fn device(&mut self, _: &str, _: u16, _: &[u8]) -> Result<(), Infallible> {
        Ok(())
    }
    fn large_run(&mut self, _: u64, _: u32) -> Result<(), Infallible> {
        Ok(())
    }
    fn pages(&mut self, _: u64, _: &[u8]) -> Result<(), Infallible> {
        Ok(())
    }
    fn zero(&mut self, _: u64, _: u32) -> Result<(), Infallible> {
        Ok(())
    }
    fn shared(&mut self, _: u64, _: u32, _: &[u8; PAGE_SIZE]) -> Result<(), Infallible> {
        Ok(())
    }
    fn shared_ref(&mut self, _: u64, _: u32) -> Result<(), Infallible> {
        Ok(())
    }
    fn poisoned(&mut self, _: u64) -> Result<(), Infallible> {
        Ok(())
    }
    fn pending(&mut self, _: u64, _: u32) -> Result<(), Infallible> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// Why applying a stream stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyError<E> {
    /// The stream was refused.
    Stream(Error),
    /// The sink refused what the record at `at` held.
    Sink { at: At, error: E },
}

impl<E> From<Error> for ApplyError<E> {
    fn from(e: Error) -> ApplyError<E> {
        ApplyError::Stream(e)
    }
}

impl<E: fmt::Display> fmt::Display for ApplyError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApplyError::Stream(e) => e.fmt(f),
            ApplyError::Sink { at, error } => write!(f, "{error} (applying {at})"),
        }
    }
}

fn op<A: Apply>(sink: &mut A, op: MemOp<'_>) -> Result<(), A::Error> {
    match op {
        MemOp::LargeRun { gfn, pages } => sink.large_run(gfn, pages),
        MemOp::Pages { gfn, data } => sink.pages(gfn, data),
        MemOp::Zero { gfn, pages } => sink.zero(gfn, pages),
        MemOp::Shared { gfn, id, data } => sink.shared(gfn, id, data),
        MemOp::SharedRef { gfn, id } => sink.shared_ref(gfn, id),
        MemOp::Poisoned { gfn } => sink.poisoned(gfn),
    }
}

impl<R: Source> Reader<R> {
    /// Hands every remaining record to `sink`, up to and including the end
    /// record; returns what the stream held.
    pub fn apply<A: Apply>(&mut self, sink: &mut A) -> Result<Stats, ApplyError<A::Error>> {
        loop {
            if let Some(stats) = self.apply_next(sink)? {
                return Ok(stats);
            }
        }
    }

    /// Hands the next record to `sink`: `Some(stats)` once the end record
    /// was read (or had been). A stream arriving in pieces (a migration's
    /// connection) calls this once per record that has arrived whole.
    pub fn apply_next<A: Apply>(&mut self, sink: &mut A) -> Result<Option<Stats>, ApplyError<A::Error>> {
        let refused = |at| move |error| ApplyError::Sink { at, error };
        let Some((at, record)) = self.next_record()? else {
            return Ok(Some(*self.stats()));
        };
        match record {
            Record::Vcpu { index, state } => sink.vcpu(index, *state).map_err(refused(at))?,
            Record::Device { name, version, bytes } => sink.device(name, version, bytes).map_err(refused(at))?,
            Record::Memory(mut m) => {
                while let Some((at, o)) = m.next_entry()? {
                    op(sink, o).map_err(refused(at))?;
                }
            }
            Record::Resume => sink.resume().map_err(refused(at))?,
            Record::Pending(runs) => {
                for (gfn, pages) in runs {
                    sink.pending(gfn, pages).map_err(refused(at))?;
                }
            }
            Record::End(stats) => return Ok(Some(stats)),
        }
        Ok(None)
    }
}

/// A stream that passed [`verify`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub header: Header,
    pub stats: Stats,
}

/// Checks a whole stream held in memory (every checksum, rule and LZ4
/// block, every vCPU state decoded) without applying anything: for a
/// checkpoint before its restore starts, or a staging buffer.
pub fn verify(stream: &[u8]) -> Result<Verified, Error> {
    let mut src = stream;
    let mut reader = Reader::open(&mut src)?;
    let stats = reader.apply(&mut Discard).map_err(|e| match e {
        ApplyError::Stream(e) => e,
        ApplyError::Sink { error, .. } => match error {},
    })?;
    let header = reader.header().clone();
    drop(reader);
    if !src.is_empty() {
        return Err(Error::TrailingBytes { offset: (stream.len() - src.len()) as u64 });
    }
    Ok(Verified { header, stats })
}
