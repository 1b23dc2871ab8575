//! QEMU's firmware configuration device, the legacy I/O interface (QEMU's
//! `docs/specs/fw_cfg.rst`): a guest selects an item by writing its 16-bit
//! key to the selector port 0x510, then reads the item's bytes one at a
//! time from the data port 0x511. Firmware and guests written for QEMU
//! (SeaBIOS, Linux's `qemu_fw_cfg`, test kernels) find the machine's RAM
//! size, CPU count and named files there.
//!
//! Only the traditional interface: no DMA (the FW_CFG_ID feature bitmap
//! has bit 0 set and bit 1 clear, so a guest never looks for the DMA
//! address register at 0x514) and no write channel (QEMU dropped guest
//! writes to items; data writes are ignored, as there).
//!
//! The items are derived from the VM's configuration (RAM size, vCPUs,
//! the files added); the only guest state is the selector and the offset
//! in the selected item, and that is what is saved.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use super::persist::{Invalid, Persist};

/// The selector port (16-bit writes) and the data port (8-bit reads), as
/// on QEMU's x86 machines.
pub const SELECTOR_PORT: u16 = 0x510;
pub const DATA_PORT: u16 = 0x511;

/// Item keys (QEMU's `include/standard-headers/linux/qemu_fw_cfg.h`).
pub mod key {
    /// "QEMU".
    pub const SIGNATURE: u16 = 0x0000;
    /// The feature bitmap, u32 little-endian.
    pub const ID: u16 = 0x0001;
    /// RAM bytes, u64 little-endian.
    pub const RAM_SIZE: u16 = 0x0003;
    /// vCPUs at boot, u16 little-endian.
    pub const NB_CPUS: u16 = 0x0005;
    /// vCPUs at most (no hot-plug here: the same), u16 little-endian.
    pub const MAX_CPUS: u16 = 0x000f;
    /// The file directory.
    pub const FILE_DIR: u16 = 0x0019;
    /// The first file's key; files take consecutive keys.
    pub const FILE_FIRST: u16 = 0x0020;
}

/// FW_CFG_ID: bit 0, the traditional interface; bit 1 (DMA) clear.
const FEATURES: u32 = 1;
/// Selector bit 14: the write channel. Reads ignore it, as QEMU's do.
const WRITE_CHANNEL: u16 = 1 << 14;
/// Files the directory holds at most (QEMU's default number of file
/// slots).
pub const MAX_FILES: usize = 32;
/// A directory entry's name field, NUL-terminated within it.
const NAME_BYTES: usize = 56;
/// A directory entry: size (4), select (2), reserved (2), name.
const DIR_ENTRY_BYTES: usize = 8 + NAME_BYTES;

/// Why a file was not added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileError {
    /// The directory has [`MAX_FILES`] files already.
    Full,
    /// The name is empty, has a NUL, or does not fit in 55 bytes.
    BadName,
    /// A file of that name is there already.
    Duplicate,
    /// Longer than a directory entry's 32-bit size.
    TooLarge,
}

/// The guest-visible state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgState {
    /// The last key written to the selector port.
    pub selector: u16,
    /// The next byte of the selected item the data port returns.
    pub offset: u32,
}

/// The fw_cfg device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FwCfg {
    state: FwCfgState,
    /// Configuration, not state: the fixed items' values.
    ram_bytes: u64,
    cpus: u16,
    /// The files, by name, in key order from [`key::FILE_FIRST`].
    files: Vec<(String, Vec<u8>)>,
}

/// The fixed items' lengths (the file directory and files vary).
const fn fixed_len(k: u16) -> Option<u32> {
    match k {
        key::SIGNATURE | key::ID => Some(4),
        key::RAM_SIZE => Some(8),
        key::NB_CPUS | key::MAX_CPUS => Some(2),
        _ => None,
    }
}

impl FwCfg {
    /// The items for a VM of `ram_bytes` of RAM and `cpus` vCPUs, no files.
    pub fn new(ram_bytes: u64, cpus: u16) -> Self {
        FwCfg { state: FwCfgState::default(), ram_bytes, cpus, files: Vec::new() }
    }

    /// Add a file under the next free key; that key.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FileError> {
        if self.files.len() >= MAX_FILES {
            return Err(FileError::Full);
        }
        if name.is_empty() || name.len() >= NAME_BYTES || name.contains('\0') {
            return Err(FileError::BadName);
        }
        if self.files.iter().any(|(n, _)| n == name) {
            return Err(FileError::Duplicate);
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FileError::TooLarge);
        }
        self.files.push((String::from(name), data));
        Ok(key::FILE_FIRST + self.files.len() as u16 - 1)
    }

    /// The length of item `k`, if it exists.
    fn item_len(&self, k: u16) -> Option<u32> {
        if let Some(len) = fixed_len(k) {
            return Some(len);
        }
        match k {
            key::FILE_DIR => Some((4 + DIR_ENTRY_BYTES * self.files.len()) as u32),
            _ => self.file(k).map(|data| data.len() as u32),
        }
    }

    fn file(&self, k: u16) -> Option<&[u8]> {
        let i = usize::from(k.checked_sub(key::FILE_FIRST)?);
        self.files.get(i).map(|(_, data)| &data[..])
    }

    /// Byte `at` of item `k` (`at` below its length).
    fn item_byte(&self, k: u16, at: usize) -> u8 {
        let le = |bytes: &[u8]| bytes.get(at).copied().unwrap_or(0);
        match k {
            key::SIGNATURE => le(b"QEMU"),
            key::ID => le(&FEATURES.to_le_bytes()),
            key::RAM_SIZE => le(&self.ram_bytes.to_le_bytes()),
            key::NB_CPUS | key::MAX_CPUS => le(&self.cpus.to_le_bytes()),
            key::FILE_DIR => self.dir_byte(at),
            _ => self.file(k).and_then(|d| d.get(at).copied()).unwrap_or(0),
        }
    }

    /// Byte `at` of the file directory: a big-endian count, then per file
    /// its size (u32 BE), key (u16 BE), a reserved u16 and its name.
    fn dir_byte(&self, at: usize) -> u8 {
        if at < 4 {
            return (self.files.len() as u32).to_be_bytes()[at];
        }
        let (i, field) = ((at - 4) / DIR_ENTRY_BYTES, (at - 4) % DIR_ENTRY_BYTES);
        let Some((name, data)) = self.files.get(i) else { return 0 };
        match field {
            0..4 => (data.len() as u32).to_be_bytes()[field],
            4..6 => (key::FILE_FIRST + i as u16).to_be_bytes()[field - 4],
            6..8 => 0,
            _ => name.as_bytes().get(field - 8).copied().unwrap_or(0),
        }
    }

    /// Select the item `selector` names; reading starts at its first byte.
    pub fn select(&mut self, selector: u16) {
        self.state = FwCfgState { selector, offset: 0 };
    }

    /// A read of the data port: the next byte of the selected item, or 0
    /// past its end or for a key with no item.
    pub fn read_data(&mut self) -> u8 {
        let k = self.state.selector & !WRITE_CHANNEL;
        match self.item_len(k) {
            Some(len) if self.state.offset < len => {
                let b = self.item_byte(k, self.state.offset as usize);
                self.state.offset += 1;
                b
            }
            _ => 0,
        }
    }

    /// An access of `size` bytes at `offset` in the device's two ports: a
    /// 16-bit write of the selector, 8-bit reads of the data port. Other
    /// accesses are not the interface's: reads see all ones, writes vanish
    /// (data writes included: there is no write channel).
    pub fn read(&mut self, offset: u64, size: u8) -> Option<u32> {
        (offset == 1 && size == 1).then(|| u32::from(self.read_data()))
    }

    /// See [`Self::read`].
    pub fn write(&mut self, offset: u64, size: u8, value: u32) {
        if offset == 0 && size == 2 {
            self.select(value as u16);
        }
    }
}

impl Persist for FwCfg {
    type State = FwCfgState;
    const STATE_VERSION: u16 = 1;

    fn save(&self) -> FwCfgState {
        self.state.clone()
    }

    fn validate(s: &FwCfgState) -> Result<(), Invalid> {
        // The items come from configuration, so only what holds for every
        // configuration is checked: the offset never passes an item's end
        // and never moves for a key with no item.
        let k = s.selector & !WRITE_CHANNEL;
        let max = if let Some(len) = fixed_len(k) {
            len
        } else if k == key::FILE_DIR {
            (4 + DIR_ENTRY_BYTES * MAX_FILES) as u32
        } else if usize::from(k.wrapping_sub(key::FILE_FIRST)) < MAX_FILES {
            u32::MAX
        } else {
            0
        };
        if s.offset > max {
            return Err(Invalid("the offset lies past the end of the selected item"));
        }
        Ok(())
    }

    fn restore(&mut self, state: FwCfgState) {
        self.state = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(f: &mut FwCfg, k: u16, n: usize) -> Vec<u8> {
        f.write(0, 2, u32::from(k));
        (0..n).map(|_| f.read(1, 1).unwrap() as u8).collect()
    }

    #[test]
    fn signature_features_ram_and_cpus() {
        let mut f = FwCfg::new(256 << 20, 1);
        assert_eq!(read_item(&mut f, key::SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut f, key::ID, 4), [1, 0, 0, 0], "traditional interface only, no DMA");
        assert_eq!(read_item(&mut f, key::RAM_SIZE, 8), (256u64 << 20).to_le_bytes());
        assert_eq!(read_item(&mut f, key::NB_CPUS, 2), [1, 0]);
        assert_eq!(read_item(&mut f, key::MAX_CPUS, 2), [1, 0]);
        let mut big = FwCfg::new(0x1_2345_6789, 300);
        assert_eq!(u64::from_le_bytes(read_item(&mut big, key::RAM_SIZE, 8).try_into().unwrap()), 0x1_2345_6789);
        assert_eq!(read_item(&mut big, key::NB_CPUS, 2), 300u16.to_le_bytes());
    }

    #[test]
    fn reads_past_the_end_and_unknown_keys_read_zero() {
        let mut f = FwCfg::new(16 << 20, 1);
        assert_eq!(read_item(&mut f, key::SIGNATURE, 7), b"QEMU\0\0\0");
        assert_eq!(f.save().offset, 4, "the offset stops at the end");
        for k in [0x0002, 0x0004, 0x0010, 0x0020, 0x4019 + 0x8000, 0x8003, 0xffff] {
            assert_eq!(read_item(&mut f, k, 8), [0; 8], "key {k:#x}");
            assert_eq!(f.save().offset, 0);
        }
        // Selecting again starts the item over.
        read_item(&mut f, key::SIGNATURE, 2);
        assert_eq!(read_item(&mut f, key::SIGNATURE, 4), b"QEMU");
        // The write-channel bit does not change what is read.
        assert_eq!(read_item(&mut f, WRITE_CHANNEL | key::SIGNATURE, 4), b"QEMU");
    }

    #[test]
    fn only_word_selector_writes_and_byte_data_reads_are_the_interface() {
        let mut f = FwCfg::new(16 << 20, 1);
        f.write(0, 2, u32::from(key::ID));
        // Byte writes to either port, a word write to the data port: not
        // selector writes.
        f.write(0, 1, 0);
        f.write(1, 1, 0);
        f.write(1, 2, 0);
        assert_eq!(f.read(0, 1), None, "the selector is write-only");
        assert_eq!(f.read(0, 2), None, "the data port is byte-wide");
        assert_eq!(f.read(1, 1), Some(1), "still the feature bitmap, from its start");
    }

    #[test]
    fn the_file_directory_lists_files_big_endian() {
        let mut f = FwCfg::new(16 << 20, 1);
        assert_eq!(read_item(&mut f, key::FILE_DIR, 6), [0, 0, 0, 0, 0, 0], "empty: a count of 0");
        assert_eq!(f.add_file("etc/boot-fail-wait", 5u32.to_le_bytes().to_vec()), Ok(0x20));
        assert_eq!(f.add_file("opt/org.example/blob", alloc::vec![0xab; 300]), Ok(0x21));
        let dir = read_item(&mut f, key::FILE_DIR, 4 + 2 * 64);
        assert_eq!(dir[..4], [0, 0, 0, 2]);
        let entry = |i: usize| &dir[4 + 64 * i..4 + 64 * (i + 1)];
        assert_eq!(entry(0)[..8], [0, 0, 0, 4, 0, 0x20, 0, 0], "size 4, key 0x20, reserved");
        assert_eq!(&entry(0)[8..26], b"etc/boot-fail-wait");
        assert!(entry(0)[26..].iter().all(|&b| b == 0), "NUL-padded");
        assert_eq!(entry(1)[..8], [0, 0, 0x01, 0x2c, 0, 0x21, 0, 0]);
        assert_eq!(read_item(&mut f, 0x20, 5), [5, 0, 0, 0, 0]);
        assert_eq!(read_item(&mut f, 0x21, 301)[299..], [0xab, 0]);
        assert_eq!(f.add_file("etc/boot-fail-wait", alloc::vec![]), Err(FileError::Duplicate));
        assert_eq!(f.add_file("", alloc::vec![]), Err(FileError::BadName));
        assert_eq!(f.add_file(&"x".repeat(56), alloc::vec![]), Err(FileError::BadName));
        assert!(f.add_file(&"x".repeat(55), alloc::vec![]).is_ok(), "55 bytes and the NUL fit");
        for i in 3..MAX_FILES {
            f.add_file(&alloc::format!("f{i}"), alloc::vec![]).unwrap();
        }
        assert_eq!(f.add_file("one-more", alloc::vec![]), Err(FileError::Full));
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        use crate::devices::persist::{RestoreError, decode, save};
        let mut f = FwCfg::new(16 << 20, 1);
        read_item(&mut f, key::SIGNATURE, 2);
        let mut back = FwCfg::new(16 << 20, 1);
        back.restore(decode::<FwCfg>("fw-cfg", &save("fw-cfg", &f)).unwrap());
        assert_eq!(back, f);
        assert_eq!(back.read(1, 1), Some(u32::from(b'M')), "reading goes on where it stood");
        let past = "the offset lies past the end of the selected item";
        for state in [
            FwCfgState { selector: key::SIGNATURE, offset: 5 },
            FwCfgState { selector: key::RAM_SIZE, offset: 9 },
            FwCfgState { selector: key::FILE_DIR, offset: 4 + 64 * 33 },
            FwCfgState { selector: 0x0002, offset: 1 },
            FwCfgState { selector: 0x8003, offset: 1 },
        ] {
            let mut bad = save("fw-cfg", &f);
            bad.bytes = postcard::to_allocvec(&state).unwrap();
            assert_eq!(
                decode::<FwCfg>("fw-cfg", &bad),
                Err(RestoreError::Invalid { device: "fw-cfg", why: past }),
                "{state:?}"
            );
        }
        for state in [
            FwCfgState { selector: key::RAM_SIZE, offset: 8 },
            FwCfgState { selector: key::FILE_DIR | WRITE_CHANNEL, offset: 4 },
            FwCfgState { selector: key::FILE_FIRST + 31, offset: 1 << 20 },
        ] {
            assert!(FwCfg::validate(&state).is_ok(), "{state:?}");
        }
    }
}
