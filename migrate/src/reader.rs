//! Reading a stream: one record at a time, every check made before the
//! record reaches the caller.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use crc::{Digest, Table};
use vcpu::GuestState;

use crate::VCPU_STATE_VERSION;
use crate::checker::Checker;
use crate::checksum::digest;
use crate::error::{At, Error};
use crate::header::{ConfigError, Header, PrologueError, check_device_name, decode_prologue};
use crate::io::{IoError, Source};
use crate::page::{self, MemOp};
use crate::record::{End, FRAME_LEN, Fields, Frame, FrameError, Kind, PROLOGUE_LEN, TRAILER_LEN, payload_crc};
use crate::stats::Stats;

/// A payload is read in steps of this many bytes, so the buffer grows with
/// the bytes that actually arrive, not with what a length field claims.
const READ_STEP: usize = 64 * 1024;

/// One record, checked.
#[derive(Debug)]
pub enum Record<'a> {
    Vcpu {
        index: u32,
        state: Box<GuestState>,
    },
    /// A device's state: its name in the VM, its state layout version (the
    /// configuration's) and the bytes its `Persist::restore` decodes.
    Device {
        name: &'a str,
        version: u16,
        bytes: &'a [u8],
    },
    /// Memory: take the entries with [`MemoryRecord::next_entry`]. Entries not
    /// taken are still checked before the next record is read.
    Memory(MemoryRecord<'a>),
    /// Live migration: every vCPU and device has arrived; the VM may run.
    /// Memory after this is post-copy.
    Resume,
    /// Post-copy: runs of pages (first frame, count) whose content comes
    /// after the resume record.
    Pending(Vec<(u64, u32)>),
    /// The stream is complete and consistent.
    End(Stats),
}

/// The entries of a memory record, decoded and checked one at a time.
pub struct MemoryRecord<'a> {
    st: &'a mut State,
}

impl fmt::Debug for MemoryRecord<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRecord").field("cursor", &self.st.cursor).finish_non_exhaustive()
    }
}

impl MemoryRecord<'_> {
    /// The next entry and where it is, or `None` after the last.
    pub fn next_entry(&mut self) -> Result<Option<(At, MemOp<'_>)>, Error> {
        self.st.next_entry()
    }
}

#[derive(Clone, Copy, Debug)]
struct Cursor {
    /// Where the next entry starts in the payload.
    pos: usize,
    at: At,
}

struct State {
    checker: Checker,
    /// Sequence number of the next record.
    seq: u32,
    /// Stream offset of the next record.
    offset: u64,
    digest: Digest<'static, u32, Table<16>>,
    /// `digest` before the last record read: what an end record names.
    end_digest: u32,
    payload: Vec<u8>,
    /// Decompressed pages of the current LZ4 block.
    block: Vec<u8>,
    /// The memory record being taken apart.
    cursor: Option<Cursor>,
    stats: Stats,
    ended: bool,
    failed: bool,
}

/// Reads one stream from a [`Source`].
///
/// Records come out only after their checksums, sequence number and the
/// format's ordering rules passed; a later record may still fail, so apply
/// them to a VM that has not run yet and drop it on error (or check an
/// in-memory stream first with [`crate::verify`]). After any error the
/// reader only returns [`Error::UsedAfterError`].
pub struct Reader<R: Source> {
    src: R,
    header: Header,
    st: State,
}

impl<R: Source> fmt::Debug for Reader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader").field("header", &self.header).field("record", &self.st.seq).finish_non_exhaustive()
    }
}

enum ReadFail {
    End,
    Io(IoError),
}

fn read_exact<R: Source>(src: &mut R, mut buf: &mut [u8]) -> Result<(), ReadFail> {
    while !buf.is_empty() {
        match src.read(buf) {
            Ok(0) => return Err(ReadFail::End),
            // A source claiming more than it was asked for is a broken
            // source, not a reason to panic.
            Ok(n) => buf = buf.get_mut(n..).ok_or(ReadFail::Io(IoError("source overran the buffer")))?,
            Err(e) => return Err(ReadFail::Io(e)),
        }
    }
    Ok(())
}

impl<R: Source> Reader<R> {
    /// Reads the prologue and the configuration: the VM's shape, before
    /// any state.
    pub fn open(mut src: R) -> Result<Reader<R>, Error> {
        let mut prologue = [0u8; PROLOGUE_LEN];
        let at = At { record: 0, offset: 0, kind: None };
        read_exact(&mut src, &mut prologue).map_err(|e| match e {
            ReadFail::End => Error::Truncated { at, part: "prologue" },
            ReadFail::Io(error) => Error::Io { offset: 0, error },
        })?;
        let flags = decode_prologue(&prologue).map_err(|e| match e {
            PrologueError::Magic => Error::BadMagic,
            PrologueError::Checksum => Error::PrologueChecksum,
            PrologueError::Version(major, minor) => Error::Version { major, minor },
            PrologueError::Flags(flags) => Error::UnknownFlags { flags },
        })?;
        let mut st = State {
            // Replaced once the configuration is read.
            checker: Checker::default(),
            seq: 0,
            offset: PROLOGUE_LEN as u64,
            digest: digest(),
            end_digest: 0,
            payload: Vec::new(),
            block: Vec::new(),
            cursor: None,
            stats: Stats::default(),
            ended: false,
            failed: false,
        };
        let (frame, at) = st.read_record(&mut src)?;
        if frame.kind != Kind::Config {
            return Err(Error::Order { at, why: "the stream does not begin with its configuration" });
        }
        if frame.version != Kind::Config.version() {
            return Err(Error::RecordVersion { at, version: frame.version });
        }
        let header = Header::decode(&st.payload, flags).map_err(|e| match e {
            ConfigError::Malformed(why) => Error::Malformed { at, why },
            ConfigError::CpuFormat(format) => Error::CpuFormat { at, format },
        })?;
        st.checker = Checker::new(&header);
        Ok(Reader { src, header, st })
    }

    /// The VM's configuration.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// What has been read so far (all of it after the end record).
    pub fn stats(&self) -> &Stats {
        &self.st.stats
    }

    /// Stream bytes read so far (the prologue included): where the record
    /// after the last one read starts. With [`crate::At::offset`] of a
    /// record, its byte range (what a lazy restore reads back).
    pub fn offset(&self) -> u64 {
        self.st.offset
    }

    /// The source, positioned after the last record read.
    pub fn into_source(self) -> R {
        self.src
    }

    /// The source, to add bytes to one that is a buffer (a stream arriving
    /// over a connection).
    pub fn source_mut(&mut self) -> &mut R {
        &mut self.src
    }

    /// The next record and where it is; `None` after the end record.
    pub fn next_record(&mut self) -> Result<Option<(At, Record<'_>)>, Error> {
        if self.st.failed {
            return Err(Error::UsedAfterError);
        }
        let (at, parsed) = match self.next_parsed() {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(None),
            Err(e) => {
                self.st.failed = true;
                return Err(e);
            }
        };
        let st = &mut self.st;
        let record = match parsed {
            Parsed::Vcpu { index, state } => Record::Vcpu { index, state },
            Parsed::Device { name, version, bytes } => Record::Device {
                // Checked as UTF-8 by next_parsed.
                name: core::str::from_utf8(&st.payload[name..bytes - 2]).unwrap_or_default(),
                version,
                bytes: &st.payload[bytes..],
            },
            Parsed::Memory => Record::Memory(MemoryRecord { st }),
            Parsed::Resume => Record::Resume,
            Parsed::Pending(runs) => Record::Pending(runs),
            Parsed::End(stats) => Record::End(stats),
        };
        Ok(Some((at, record)))
    }

    /// Reads and checks the next record.
    fn next_parsed(&mut self) -> Result<Option<(At, Parsed)>, Error> {
        // Entries the caller did not take are checked all the same.
        while self.st.next_entry()?.is_some() {}
        if self.st.ended {
            return Ok(None);
        }
        let (frame, at) = loop {
            let (frame, at) = self.st.read_record(&mut self.src)?;
            match frame.kind {
                // Added by a newer minor version; safe to pass over.
                Kind::Other(code) if code & Kind::OPTIONAL != 0 => continue,
                Kind::Other(code) => return Err(Error::UnknownKind { at, code }),
                _ => break (frame, at),
            }
        };
        if frame.version != frame.kind.version() {
            return Err(Error::RecordVersion { at, version: frame.version });
        }
        let st = &mut self.st;
        st.checker.record(frame.kind, at)?;
        let parsed = match frame.kind {
            Kind::Vcpu => {
                let short = Error::Malformed { at, why: "vCPU record too short" };
                let mut f = Fields::new(&st.payload);
                let index = f.u32().ok_or(short.clone())?;
                let version = f.u16().ok_or(short)?;
                st.checker.vcpu(index, at)?;
                if version != VCPU_STATE_VERSION {
                    return Err(Error::VcpuVersion { at, index, version });
                }
                let state = match postcard::take_from_bytes::<GuestState>(f.rest()) {
                    Ok((state, [])) => Box::new(state),
                    _ => return Err(Error::VcpuState { at, index }),
                };
                st.stats.vcpus += 1;
                Parsed::Vcpu { index, state }
            }
            Kind::Device => {
                let short = Error::Malformed { at, why: "device record too short" };
                let mut f = Fields::new(&st.payload);
                let len = f.u8().ok_or(short.clone())?;
                let name = f.bytes(usize::from(len)).ok_or(short.clone())?;
                let name =
                    core::str::from_utf8(name).map_err(|_| Error::Malformed { at, why: "device name not UTF-8" })?;
                check_device_name(name).map_err(|why| Error::Malformed { at, why })?;
                let version = f.u16().ok_or(short)?;
                st.checker.device(name, version, at)?;
                st.stats.devices += 1;
                Parsed::Device { name: 1, version, bytes: f.pos() }
            }
            Kind::Memory => {
                st.cursor = Some(Cursor { pos: 0, at });
                Parsed::Memory
            }
            Kind::Resume => {
                if !st.payload.is_empty() {
                    return Err(Error::Malformed { at, why: "resume record not empty" });
                }
                st.checker.resume(at)?;
                Parsed::Resume
            }
            Kind::Pending => {
                let bad = Error::Malformed { at, why: "pending record not a whole number of runs" };
                if st.payload.is_empty() || st.payload.len() % 12 != 0 {
                    return Err(bad);
                }
                let n = st.payload.len() / 12;
                if n > crate::limits::MAX_PENDING_RUNS {
                    return Err(Error::Malformed { at, why: "too many pending runs in one record" });
                }
                let mut runs = Vec::with_capacity(n);
                let mut f = Fields::new(&st.payload);
                while let (Some(gfn), Some(pages)) = (f.u64(), f.u32()) {
                    st.checker.pending(gfn, pages, at)?;
                    runs.push((gfn, pages));
                }
                st.stats.pending_pages =
                    st.stats.pending_pages.saturating_add(runs.iter().map(|&(_, p)| u64::from(p)).sum::<u64>());
                Parsed::Pending(runs)
            }
            Kind::End => {
                st.checker.end(at)?;
                let end =
                    End::decode(&st.payload).ok_or(Error::Malformed { at, why: "end record of the wrong size" })?;
                if end.records != at.record {
                    return Err(Error::EndMismatch { at, what: "record count" });
                }
                if end.bytes != at.offset {
                    return Err(Error::EndMismatch { at, what: "byte count" });
                }
                if end.digest != st.end_digest {
                    return Err(Error::EndMismatch { at, what: "digest of the records" });
                }
                st.ended = true;
                st.stats.bytes = st.offset;
                Parsed::End(st.stats)
            }
            Kind::Config | Kind::Other(_) => unreachable!("refused above"),
        };
        Ok(Some((at, parsed)))
    }
}

/// A checked record before it borrows the reader's buffer.
enum Parsed {
    Vcpu {
        index: u32,
        state: Box<GuestState>,
    },
    /// Payload offsets: the name from `name` to `bytes - 2`, the state from
    /// `bytes`.
    Device {
        name: usize,
        version: u16,
        bytes: usize,
    },
    Memory,
    Resume,
    Pending(Vec<(u64, u32)>),
    End(Stats),
}

impl State {
    /// Reads the next record's frame, payload and checksum into `payload`;
    /// checks both checksums and the sequence number.
    fn read_record<R: Source>(&mut self, src: &mut R) -> Result<(Frame, At), Error> {
        let mut at = At { record: self.seq, offset: self.offset, kind: None };
        let fail = |at: At, part: &'static str, offset: u64| {
            move |e| match e {
                ReadFail::End => Error::Truncated { at, part },
                ReadFail::Io(error) => Error::Io { offset, error },
            }
        };
        let mut fb = [0u8; FRAME_LEN];
        read_exact(src, &mut fb).map_err(fail(at, "frame header", at.offset))?;
        let frame = Frame::decode(&fb).map_err(|e| match e {
            FrameError::Checksum => Error::FrameChecksum { at },
            FrameError::Reserved => Error::Malformed { at, why: "reserved frame byte not zero" },
            FrameError::TooLong(len) => Error::TooLong { at, len: u64::from(len) },
        })?;
        at.kind = Some(frame.kind);
        if frame.seq != self.seq {
            return Err(Error::Sequence { at, found: frame.seq });
        }
        let len = frame.len as usize;
        let start = at.offset + FRAME_LEN as u64;
        self.payload.clear();
        while self.payload.len() < len {
            let have = self.payload.len();
            let step = (len - have).min(READ_STEP);
            self.payload.resize(have + step, 0);
            read_exact(src, &mut self.payload[have..]).map_err(fail(at, "payload", start + have as u64))?;
        }
        let mut crc = [0u8; TRAILER_LEN];
        read_exact(src, &mut crc).map_err(fail(at, "payload checksum", start + len as u64))?;
        let crc_ok = u32::from_le_bytes(crc) == payload_crc(&fb, &self.payload);
        if !crc_ok {
            return Err(Error::Checksum { at });
        }
        // Sequence numbers do not wrap: a stream of 2^32 records ends here.
        let next = self.seq.checked_add(1).ok_or(Error::Malformed { at, why: "more than 2^32 records" })?;
        // The end record's digest covers the records before it.
        self.end_digest = self.digest.clone().finalize();
        self.digest.update(&crc);
        self.seq = next;
        self.offset = start + (len + TRAILER_LEN) as u64;
        self.stats.records = next;
        Ok((frame, at))
    }

    /// The next entry of the current memory record, checked.
    fn next_entry(&mut self) -> Result<Option<(At, MemOp<'_>)>, Error> {
        if self.failed {
            return Err(Error::UsedAfterError);
        }
        let Some(cur) = self.cursor else {
            return Ok(None);
        };
        if cur.pos >= self.payload.len() {
            self.cursor = None;
            return Ok(None);
        }
        let at = At { offset: cur.at.offset + (FRAME_LEN + cur.pos) as u64, ..cur.at };
        let mut f = Fields::new(&self.payload);
        f.bytes(cur.pos);
        let (op, kind) = match page::decode(&mut f, &mut self.block) {
            Ok(decoded) => decoded,
            Err(why) => {
                self.failed = true;
                return Err(Error::Malformed { at, why });
            }
        };
        if let Err(e) = self.checker.memory(&op, at) {
            self.failed = true;
            return Err(e);
        }
        match kind {
            Some(kind) => self.stats.add(kind, op.span().1, f.pos() - cur.pos),
            None => self.stats.large_runs = self.stats.large_runs.saturating_add(1),
        }
        self.cursor = Some(Cursor { pos: f.pos(), ..cur });
        Ok(Some((at, op)))
    }
}
