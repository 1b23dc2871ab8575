//! The format's ordering and consistency rules, enforced by the reader and
//! by the writer alike (the writer runs every call through them first), so
//! a writer cannot produce a stream its reader refuses.
//!
//! - The configuration comes first and once.
//! - vCPU, device and memory records may come in any order (pre-copy sends
//!   memory while the VM runs, vCPUs and devices at switch-over); each vCPU
//!   index below the configured count and each listed device exactly once,
//!   all of them before the resume record (if any) and the end record.
//! - A large-page run is filled in order, page by page, before any other
//!   entry or record.
//! - Shared contents are numbered 0, 1, 2, ... in the order they are sent;
//!   a reference names one already sent.
//! - Memory lies inside the configured RAM ranges, each entry inside one.
//! - Pending runs (post-copy) only in a live stream, before the resume
//!   record, each inside one RAM range.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::error::{At, Error};
use crate::header::{DeviceInfo, Header};
use crate::limits::MAX_SHARED_IDS;
use crate::page::{LARGE_RUN_PAGES, MemOp};
use crate::record::Kind;

#[derive(Debug, Default)]
pub struct Checker {
    live: bool,
    /// RAM as [first frame, end frame).
    ram: Vec<(u64, u64)>,
    vcpus: Vec<bool>,
    devices: Vec<DeviceInfo>,
    devices_seen: Vec<bool>,
    /// The open large-page run: next frame expected, end frame.
    run: Option<(u64, u64)>,
    shared: u32,
    resumed: bool,
}

/// Where a checked memory entry landed, for the writer's grouping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Landing {
    /// Which RAM range.
    pub range: usize,
    /// The entry finished a large-page run.
    pub closed_run: bool,
}

impl Checker {
    /// `header` must have passed `Header::validate`.
    pub fn new(header: &Header) -> Checker {
        Checker {
            live: header.live,
            ram: header.ram.iter().map(|r| (r.first_gfn(), r.first_gfn() + r.pages())).collect(),
            vcpus: vec![false; header.vcpus as usize],
            devices: header.devices.clone(),
            devices_seen: vec![false; header.devices.len()],
            run: None,
            shared: 0,
            resumed: false,
        }
    }

    /// Rules for any record of `kind` after the configuration.
    pub fn record(&self, kind: Kind, at: At) -> Result<(), Error> {
        match kind {
            Kind::Config => Err(Error::Order { at, why: "a second configuration" }),
            Kind::Memory => Ok(()),
            _ if self.run.is_some() => Err(Error::Order { at, why: "large-page run left unfinished" }),
            Kind::Vcpu | Kind::Device if self.resumed => Err(Error::Order { at, why: "state after the resume record" }),
            _ => Ok(()),
        }
    }

    pub fn vcpu(&mut self, index: u32, at: At) -> Result<(), Error> {
        self.record(Kind::Vcpu, at)?;
        let count = self.vcpus.len() as u32;
        let seen = self.vcpus.get_mut(index as usize).ok_or(Error::VcpuIndex { at, index, count })?;
        if *seen {
            return Err(Error::DuplicateVcpu { at, index });
        }
        *seen = true;
        Ok(())
    }

    pub fn device(&mut self, name: &str, version: u16, at: At) -> Result<(), Error> {
        self.record(Kind::Device, at)?;
        let i = self
            .devices
            .iter()
            .position(|d| d.name == name)
            .ok_or_else(|| Error::UnknownDevice { at, name: String::from(name) })?;
        if self.devices_seen[i] {
            return Err(Error::DuplicateDevice { at, name: String::from(name) });
        }
        let expected = self.devices[i].version;
        if version != expected {
            return Err(Error::DeviceVersion { at, name: String::from(name), found: version, expected });
        }
        self.devices_seen[i] = true;
        Ok(())
    }

    fn in_ram(&self, gfn: u64, pages: u64, at: At) -> Result<usize, Error> {
        let outside = Error::OutsideRam { at, gfn, pages };
        let end = gfn.checked_add(pages).ok_or(outside.clone())?;
        self.ram.iter().position(|&(first, last)| gfn >= first && end <= last).ok_or(outside)
    }

    pub fn memory(&mut self, op: &MemOp<'_>, at: At) -> Result<Landing, Error> {
        if let MemOp::LargeRun { gfn, pages } = *op {
            if self.run.is_some() {
                return Err(Error::Order { at, why: "large-page run inside another" });
            }
            if !LARGE_RUN_PAGES.contains(&pages) {
                return Err(Error::Malformed { at, why: "large-page run of an unknown size" });
            }
            if gfn % u64::from(pages) != 0 {
                return Err(Error::Malformed { at, why: "large-page run not aligned to its size" });
            }
            let range = self.in_ram(gfn, u64::from(pages), at)?;
            self.run = Some((gfn, gfn + u64::from(pages)));
            return Ok(Landing { range, closed_run: false });
        }
        let (gfn, pages) = op.span();
        let range = self.in_ram(gfn, pages, at)?;
        match *op {
            MemOp::Shared { id, .. } if id != self.shared || id >= MAX_SHARED_IDS => {
                return Err(Error::Malformed { at, why: "shared content id out of sequence" });
            }
            MemOp::Shared { .. } => self.shared += 1,
            MemOp::SharedRef { id, .. } if id >= self.shared => {
                return Err(Error::Malformed { at, why: "reference to a shared content not yet sent" });
            }
            _ => {}
        }
        let mut closed_run = false;
        if let Some((next, end)) = self.run {
            if gfn != next {
                return Err(Error::Order { at, why: "large-page run filled out of order" });
            }
            // In RAM, so no overflow.
            let next = gfn + pages;
            if next > end {
                return Err(Error::Order { at, why: "entry crosses the end of a large-page run" });
            }
            closed_run = next == end;
            self.run = if closed_run { None } else { Some((next, end)) };
        }
        Ok(Landing { range, closed_run })
    }

    /// Post-copy: `pages` pages from `gfn` on come after the resume record.
    pub fn pending(&mut self, gfn: u64, pages: u32, at: At) -> Result<(), Error> {
        if !self.live {
            return Err(Error::Order { at, why: "pending pages in a stream that is not live" });
        }
        if self.resumed {
            return Err(Error::Order { at, why: "pending pages after the resume record" });
        }
        if pages == 0 {
            return Err(Error::Malformed { at, why: "empty pending run" });
        }
        self.in_ram(gfn, u64::from(pages), at).map(|_| ())
    }

    pub fn resume(&mut self, at: At) -> Result<(), Error> {
        if !self.live {
            return Err(Error::Order { at, why: "resume record in a stream that is not live" });
        }
        if self.resumed {
            return Err(Error::Order { at, why: "a second resume record" });
        }
        self.complete(at)?;
        self.resumed = true;
        Ok(())
    }

    pub fn end(&self, at: At) -> Result<(), Error> {
        self.complete(at)
    }

    /// Everything a VM needs to run has been seen.
    fn complete(&self, at: At) -> Result<(), Error> {
        if self.run.is_some() {
            return Err(Error::Order { at, why: "large-page run left unfinished" });
        }
        if let Some(index) = self.vcpus.iter().position(|&s| !s) {
            return Err(Error::MissingVcpu { at, index: index as u32 });
        }
        if let Some(i) = self.devices_seen.iter().position(|&s| !s) {
            return Err(Error::MissingDevice { at, name: self.devices[i].name.clone() });
        }
        Ok(())
    }
}
