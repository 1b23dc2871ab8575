//! The byte sink a writer writes to and the byte source a reader reads
//! from: a TCP connection, a disk file, a staging buffer. Vec and slice
//! implementations serve tests and in-memory checkpoints.

use alloc::vec::Vec;
use core::fmt;

/// A sink or source failed; what the transport said, in a few words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoError(pub &'static str);

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Where a [`crate::Writer`] puts the stream.
pub trait Sink {
    /// Takes all of `bytes` or fails.
    fn write(&mut self, bytes: &[u8]) -> Result<(), IoError>;
}

impl<T: Sink + ?Sized> Sink for alloc::boxed::Box<T> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), IoError> {
        (**self).write(bytes)
    }
}

/// Where a [`crate::Reader`] gets the stream.
pub trait Source {
    /// Reads up to `buf.len()` bytes into `buf` and says how many; `Ok(0)`
    /// only at the end of the stream.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, IoError>;
}

impl Sink for Vec<u8> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), IoError> {
        self.extend_from_slice(bytes);
        Ok(())
    }
}

impl<S: Sink + ?Sized> Sink for &mut S {
    fn write(&mut self, bytes: &[u8]) -> Result<(), IoError> {
        (**self).write(bytes)
    }
}

impl Source for &[u8] {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, IoError> {
        let n = buf.len().min(self.len());
        let (head, tail) = self.split_at(n);
        buf[..n].copy_from_slice(head);
        *self = tail;
        Ok(n)
    }
}

impl<S: Source + ?Sized> Source for &mut S {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, IoError> {
        (**self).read(buf)
    }
}
