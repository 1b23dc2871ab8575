//! Saving and restoring device state as plain data.
//!
//! Every device model implements [`Persist`]: its state is a plain-data
//! struct (serde), separate from the runtime object, so checkpoints,
//! migration, record/replay and fault tolerance can move it without knowing
//! the device's insides. The trait has no default methods: a device that
//! forgets its state does not compile (Cloud Hypervisor's empty-by-default
//! snapshots are the counter-example).
//!
//! On the wire a device is a [`SavedDevice`]: its name in the VM, the
//! version of its state layout, and the state encoded with postcard (a
//! compact format with a documented, stable 1.x specification). The state
//! stream around it (header, checksums) belongs to `migrate/`.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A device whose state can be saved and restored.
pub trait Persist {
    /// The device's whole guest-visible state, as plain data.
    type State: Serialize + DeserializeOwned + Clone + PartialEq + fmt::Debug;

    /// The layout version of [`Self::State`]; bump it when the layout
    /// changes. A state of another version is refused on restore.
    const STATE_VERSION: u16;

    /// The current state.
    fn save(&self) -> Self::State;

    /// Whether `state` is one this device could be in. Saved state may
    /// come from a corrupted or hostile stream: check every field the
    /// device relies on. Separate from [`Self::restore`] so a VM checks all
    /// its devices before it changes any.
    fn validate(state: &Self::State) -> Result<(), Invalid>;

    /// Take over a state [`Self::validate`] accepted.
    fn restore(&mut self, state: Self::State);
}

/// A state field a device refused on restore: what and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

/// One device's saved state, as it travels in a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedDevice {
    /// The device's name in the VM (`com1`, `debug-exit`, ...).
    pub name: String,
    /// [`Persist::STATE_VERSION`] of the device that saved it.
    pub version: u16,
    /// The state, postcard-encoded.
    pub bytes: Vec<u8>,
}

/// Why saved device state was not restored. Nothing is half-applied: a
/// restore checks every device before it changes any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreError {
    /// The saved state names a device this VM does not have.
    UnknownDevice(String),
    /// This VM has a device the saved state does not mention.
    MissingDevice(&'static str),
    /// The same device appears twice.
    Duplicate(String),
    /// The state was saved by another layout version.
    Version { device: &'static str, found: u16, expected: u16 },
    /// The bytes do not decode as the device's state.
    Corrupt { device: &'static str },
    /// The state decodes but the device refused a field.
    Invalid { device: &'static str, why: &'static str },
}

impl fmt::Display for RestoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestoreError::UnknownDevice(name) => write!(f, "Saved state names an unknown device {name:?}"),
            RestoreError::MissingDevice(name) => write!(f, "Saved state has nothing for device {name:?}"),
            RestoreError::Duplicate(name) => write!(f, "Saved state holds device {name:?} twice"),
            RestoreError::Version { device, found, expected } => {
                write!(f, "Device {device:?} state is version {found}, this hypervisor reads version {expected}")
            }
            RestoreError::Corrupt { device } => write!(f, "Device {device:?} state does not decode"),
            RestoreError::Invalid { device, why } => write!(f, "Device {device:?} state refused: {why}"),
        }
    }
}

/// `device`'s state as it travels.
pub fn save<D: Persist>(name: &str, device: &D) -> SavedDevice {
    SavedDevice {
        name: String::from(name),
        version: D::STATE_VERSION,
        // Encoding plain data into a growable buffer cannot fail.
        bytes: postcard::to_allocvec(&device.save()).unwrap_or_default(),
    }
}

/// Decode `saved` as `D`'s state and validate it, without applying it.
pub fn decode<D: Persist>(device: &'static str, saved: &SavedDevice) -> Result<D::State, RestoreError> {
    if saved.version != D::STATE_VERSION {
        return Err(RestoreError::Version { device, found: saved.version, expected: D::STATE_VERSION });
    }
    let (state, rest) =
        postcard::take_from_bytes::<D::State>(&saved.bytes).map_err(|_| RestoreError::Corrupt { device })?;
    if !rest.is_empty() {
        // Trailing bytes: not what this layout wrote.
        return Err(RestoreError::Corrupt { device });
    }
    D::validate(&state).map_err(|Invalid(why)| RestoreError::Invalid { device, why })?;
    Ok(state)
}

/// A boxed device (a large one kept out of line) saves as the device.
impl<T: Persist> Persist for alloc::boxed::Box<T> {
    type State = T::State;
    const STATE_VERSION: u16 = T::STATE_VERSION;

    fn save(&self) -> T::State {
        (**self).save()
    }

    fn validate(state: &T::State) -> Result<(), Invalid> {
        T::validate(state)
    }

    fn restore(&mut self, state: T::State) {
        (**self).restore(state)
    }
}
