//! What a guest's firmware would hand it: the ACPI tables (and, later, an
//! MP table; fw_cfg is a device, `devices::fw_cfg`). Plain bytes built on
//! the host side of the VM layer, unit-tested against the `acpi` crate's
//! parser.

pub mod acpi;
