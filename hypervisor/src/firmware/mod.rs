//! What a guest's firmware would hand it: the ACPI tables (and, later,
//! fw_cfg and an MP table). Plain bytes built on the host side of the VM
//! layer, unit-tested against the `acpi` crate's parser.

pub mod acpi;
