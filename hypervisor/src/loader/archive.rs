//! The ramdisk: a ustar/POSIX tar archive of guest images, written on the
//! host by the `tar` crate and handed to the hypervisor by the boot loader.
//!
//! Parsing is done by `tar-no-std` (zero-alloc, checks every header
//! checksum, size and the end-of-archive marker before iterating). On top of
//! it this module refuses names that are empty or not UTF-8 and duplicate
//! names, and strips a leading `./` so `tar -C dir .` archives work.
//! Directories, links and PAX metadata entries are skipped; GNU long-name
//! entries are refused (keep image names under 100 bytes).

use alloc::string::String;
use alloc::vec::Vec;

use tar_no_std::{CorruptDataError, TarArchiveRef};

use super::error::{Error, Result};

/// Size of a tar block.
const BLOCK: usize = 512;

/// A validated ramdisk: file names and their bytes, borrowed from the archive.
#[derive(Debug, Clone)]
pub struct Archive<'a> {
    files: Vec<(String, &'a [u8])>,
}

impl<'a> Archive<'a> {
    /// Validates `bytes` as a tar archive and indexes its regular files.
    /// Zero blocks after the end-of-archive marker are tolerated.
    pub fn new(bytes: &'a [u8]) -> Result<Self> {
        // An archive with no entries is just the two-zero-block end marker;
        // `tar-no-std` wants at least three blocks, so accept it here.
        if bytes.len() >= 2 * BLOCK && bytes.len().is_multiple_of(BLOCK) && bytes.iter().all(|&b| b == 0) {
            return Ok(Self { files: Vec::new() });
        }
        let archive = TarArchiveRef::new(bytes).map_err(|e| map_corrupt(e, bytes.len()))?;
        let mut files: Vec<(String, &'a [u8])> = Vec::new();
        for (index, entry) in archive.entries().enumerate() {
            let full = entry.filename();
            let name = full.as_str().map_err(|_| Error::ArchiveName { index })?;
            let name = name.strip_prefix("./").unwrap_or(name);
            if name.is_empty() {
                return Err(Error::ArchiveName { index });
            }
            if files.iter().any(|(n, _)| n == name) {
                return Err(Error::ArchiveDuplicate { name: name.into() });
            }
            files.push((name.into(), entry.data()));
        }
        Ok(Self { files })
    }

    /// The regular files, in archive order, as `(name, bytes)`.
    pub fn files(&self) -> impl ExactSizeIterator<Item = (&str, &'a [u8])> + '_ {
        self.files.iter().map(|(name, data)| (name.as_str(), *data))
    }

    /// The bytes of the file called `name` (a leading `./` is ignored).
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        let name = name.strip_prefix("./").unwrap_or(name);
        self.files.iter().find(|(n, _)| n == name).map(|(_, data)| *data)
    }

    /// Number of regular files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether the archive holds no regular file.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

fn map_corrupt(e: CorruptDataError, len: usize) -> Error {
    match e {
        CorruptDataError::EmptyArchive => Error::ArchiveEmpty,
        CorruptDataError::InvalidBlockSize => Error::ArchiveMisaligned { len },
        CorruptDataError::TooShort { byte_count, .. } => Error::ArchiveTooShort { len: byte_count },
        CorruptDataError::InvalidChecksum { block_index } => Error::ArchiveChecksum { block: block_index },
        CorruptDataError::InvalidTypeFlag { block_index } => Error::ArchiveEntryType { block: block_index },
        CorruptDataError::InvalidPayloadSize { block_index } => Error::ArchiveSize { block: block_index },
        CorruptDataError::PayloadExtendsBeyondArchive { block_index } => {
            Error::ArchivePayloadPastEnd { block: block_index }
        }
        CorruptDataError::MissingTerminator => Error::ArchiveMissingEnd,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An archive written the way the host-side ramdisk builder writes it.
    fn build(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn reads_files_by_name_in_order() {
        let big = vec![0x5Au8; 1500];
        let bytes = build(&[("guest.elf", b"\x7fELF..."), ("big.bin", &big), ("empty", b"")]);
        let archive = Archive::new(&bytes).unwrap();
        let files: Vec<_> = archive.files().collect();
        assert_eq!(files, vec![("guest.elf", &b"\x7fELF..."[..]), ("big.bin", &big[..]), ("empty", &b""[..])]);
        assert_eq!(archive.len(), 3);
        assert_eq!(archive.get("big.bin"), Some(&big[..]));
        assert_eq!(archive.get("./guest.elf"), Some(&b"\x7fELF..."[..]));
        assert_eq!(archive.get("missing"), None);
    }

    #[test]
    fn skips_directories_and_strips_dot_slash() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_ustar();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_size(0);
        builder.append_data(&mut dir, "./", &b""[..]).unwrap();
        let mut file = tar::Header::new_ustar();
        file.set_size(3);
        builder.append_data(&mut file, "./kernels/mb.elf", &b"abc"[..]).unwrap();
        let bytes = builder.into_inner().unwrap();
        let archive = Archive::new(&bytes).unwrap();
        assert_eq!(archive.files().collect::<Vec<_>>(), vec![("kernels/mb.elf", &b"abc"[..])]);
    }

    #[test]
    fn tolerates_trailing_zero_blocks_and_empty_archives() {
        let mut bytes = build(&[("a", b"1")]);
        bytes.extend_from_slice(&[0u8; 10 * BLOCK]);
        assert_eq!(Archive::new(&bytes).unwrap().get("a"), Some(&b"1"[..]));
        let empty = build(&[]);
        assert_eq!(empty.len(), 2 * BLOCK);
        assert!(Archive::new(&empty).unwrap().is_empty());
    }

    #[test]
    fn refuses_bad_lengths() {
        assert_eq!(Archive::new(&[]).unwrap_err(), Error::ArchiveEmpty);
        let bytes = build(&[("a", b"1")]);
        assert_eq!(
            Archive::new(&bytes[..bytes.len() - 100]).unwrap_err(),
            Error::ArchiveMisaligned { len: bytes.len() - 100 }
        );
        assert_eq!(Archive::new(&[0u8; BLOCK]).unwrap_err(), Error::ArchiveTooShort { len: BLOCK });
    }

    #[test]
    fn refuses_a_header_with_a_bad_checksum() {
        let mut bytes = build(&[("a", b"1"), ("b", b"2")]);
        bytes[2 * BLOCK] ^= 0x20; // 'b' -> 'B' in the second header's name
        assert_eq!(Archive::new(&bytes).unwrap_err(), Error::ArchiveChecksum { block: 2 });
    }

    #[test]
    fn refuses_truncated_archives() {
        let bytes = build(&[("a", &[7u8; 2000])]);
        // Header plus two of four data blocks, no end marker.
        assert_eq!(Archive::new(&bytes[..3 * BLOCK]).unwrap_err(), Error::ArchivePayloadPastEnd { block: 0 });
        // All data, end marker missing.
        assert_eq!(Archive::new(&bytes[..5 * BLOCK]).unwrap_err(), Error::ArchiveMissingEnd);
        assert_eq!(Archive::new(&bytes[..6 * BLOCK]).unwrap_err(), Error::ArchiveMissingEnd);
    }

    #[test]
    fn refuses_gnu_long_names() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        let long = "n".repeat(150);
        builder.append_data(&mut header, &long, &b"x"[..]).unwrap();
        let bytes = builder.into_inner().unwrap();
        assert_eq!(Archive::new(&bytes).unwrap_err(), Error::ArchiveEntryType { block: 0 });
    }

    /// An archive with one entry whose header fields are set raw.
    fn raw_entry(name: &[u8], size: &[u8; 12], data: &[u8]) -> Vec<u8> {
        let mut header = tar::Header::new_ustar();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.as_old_mut().size = *size;
        header.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&header, data).unwrap();
        builder.into_inner().unwrap()
    }

    #[test]
    fn refuses_bad_sizes_names_and_duplicates() {
        let bytes = raw_entry(b"a", b"0000000001x\0", b"1");
        assert_eq!(Archive::new(&bytes).unwrap_err(), Error::ArchiveSize { block: 0 });

        let bytes = raw_entry(b"\xff\xfe", b"00000000001\0", b"1");
        assert_eq!(Archive::new(&bytes).unwrap_err(), Error::ArchiveName { index: 0 });
        let bytes = raw_entry(b"./", b"00000000001\0", b"1");
        assert_eq!(Archive::new(&bytes).unwrap_err(), Error::ArchiveName { index: 0 });

        let bytes = build(&[("./x", b"1"), ("x", b"2")]);
        assert_eq!(Archive::new(&bytes).unwrap_err(), Error::ArchiveDuplicate { name: "x".into() });
    }
}
