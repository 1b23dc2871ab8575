//! Host-side networking between VMs: plain logic, no device knowledge.
//! The guests' NICs are virtio-net devices
//! ([`crate::devices::virtio::net`]); what joins them is an internal
//! learning Ethernet switch ([`switch`]), and one switch may have the
//! host's NIC as its uplink ([`uplink`]).

pub mod switch;
pub mod uplink;
