//! Host-side networking between VMs: plain logic, no device knowledge.
//! The guests' NICs are virtio-net devices
//! ([`crate::devices::virtio::net`]); what joins them is an internal
//! learning Ethernet switch ([`switch`]).

pub mod switch;
