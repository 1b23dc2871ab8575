//! The manager's side of the host NIC as a switch's uplink
//! (`crate::net::uplink`): which switch has it, the frames VMs sent to the
//! host side between rounds, `net uplink`, and the announcement a VM's new
//! port makes after a migration or restore.

use alloc::string::String;
use alloc::vec::Vec;
use serde_json::json;

use super::Manager;
use crate::backend::Backend;
use crate::hostnet::{HostNet, Nic};
use crate::net::switch::{self, Mac, PortId};
use crate::net::uplink::{self, HOST, MAX_QUEUED, UPLINK, UplinkPort};
use crate::vm::exit::Console;

/// Which switch the host's NIC is the uplink of, and what waits for it.
#[derive(Debug, Default)]
pub struct Uplink {
    /// The switch's name, while the NIC is its uplink.
    pub switch: Option<String>,
    /// The host's tag for MACs of VMs on that switch (`uplink::host_tag`).
    pub tag: u8,
    /// Frames VMs sent to the NIC or the host's stack since the last
    /// round (at most `MAX_QUEUED`).
    pending: Vec<(PortId, Vec<u8>)>,
    /// Frames dropped for a full `pending`.
    pub dropped: u64,
    /// Frames a VM on the uplinked switch sent from a MAC not its own,
    /// dropped (`Manager::forward_frames`).
    pub spoofed: u64,
}

impl Uplink {
    /// Queues `frame` for the host side `to` (`UPLINK` or `HOST`).
    pub(super) fn queue(&mut self, to: PortId, frame: Vec<u8>) {
        if self.switch.is_some() && self.pending.len() < MAX_QUEUED {
            self.pending.push((to, frame));
        } else {
            self.dropped += 1;
        }
    }

    /// The MAC of a new VM `id`'s NIC on switch `net`: tagged with the
    /// host's tag when that switch has the uplink, so it is unique on the
    /// LAN; plain `switch::mac_for` otherwise.
    pub fn mac_for(&self, id: u32, net: &str) -> Mac {
        match &self.switch {
            Some(s) if s == net => uplink::tagged_mac(self.tag, id, 0),
            _ => switch::mac_for(id, 0),
        }
    }
}

impl<B: Backend> Manager<B> {
    /// Makes the host's NIC (MAC `nic_mac`) the uplink of switch `name`
    /// (made if no VM joined it yet), or of none. A switch the NIC leaves
    /// forgets the MACs learned through it.
    pub fn set_uplink(&mut self, name: Option<&str>, nic_mac: Mac) {
        if let Some(old) = self.uplink.switch.take()
            && let Some(sw) = self.switches.get_mut(&old)
        {
            sw.detach(UPLINK);
            sw.detach(HOST);
        }
        self.uplink.pending.clear();
        if let Some(name) = name {
            let sw = self.switches.entry(String::from(name)).or_default();
            sw.attach(UPLINK, true);
            sw.attach(HOST, false);
            self.uplink.switch = Some(String::from(name));
            self.uplink.tag = uplink::host_tag(&nic_mac);
        }
    }

    /// One round of the uplink (the main loop, between scheduler rounds,
    /// around the host stack's poll): what VMs sent out, then frames from
    /// the wire and from the host's stack through the switch.
    /// Whether no VM frame waits for the uplink (the host's rounds may go
    /// on; a VM that sends ends its slice's round anyway).
    pub fn uplink_idle(&self) -> bool {
        self.uplink.pending.is_empty()
    }

    pub fn uplink_round(&mut self, port: &mut impl UplinkPort) {
        let Some(name) = &self.uplink.switch else { return };
        let Ok(backend) = self.backend.as_mut() else { return };
        let Some(sw) = self.switches.get_mut(name) else { return };
        let now_ms = crate::vm::exit::ticks_to_ns(backend.now(), backend.tsc_hz()) / 1_000_000;
        let to_vms = uplink::exchange(sw, port, &mut self.uplink.pending, now_ms);
        port.switch_counters(self.uplink.spoofed, self.uplink.dropped);
        self.deliver_frames(to_vms);
    }

    /// Sends a RARP broadcast from VM `id`'s port with its NIC's MAC
    /// (`switch::announce`): its switch, and those beyond the uplink, learn
    /// where it now is. A VM that arrives by migration does this before
    /// it runs; otherwise frames for it would go where it was until it
    /// sends something itself, which a TCP receiver may never do.
    pub(super) fn announce(&mut self, id: u32) {
        let Some(mac) = self.get(id).and_then(|v| v.devices.virtio_net().map(|n| n.mac())) else { return };
        let Ok(port) = PortId::try_from(id) else { return };
        self.send_from_port(port, alloc::vec![switch::announce(mac)]);
    }

    /// `net uplink <switch>|off`: both sides (this switch and the NIC's
    /// mode) or, with no NIC, a one-line refusal that changes nothing.
    pub fn uplink_command<N: Nic>(
        &mut self,
        name: Option<&str>,
        json: bool,
        net: Option<&mut HostNet<N>>,
        out: &mut impl Console,
    ) {
        let result = match net {
            None => Err(String::from("no network device (no 82540EM on the PCI bus, or it failed to start)")),
            Some(net) => {
                let mac = net.nic().mac();
                self.set_uplink(name, mac);
                net.set_uplink(name);
                Ok(match name {
                    Some(n) => (
                        alloc::format!(
                            "net: the NIC is the uplink of switch {n} (promiscuous); VMs that join it get MACs \
                             {:02x}:<vm id>:<nic>",
                            uplink::tagged_mac(self.uplink.tag, 0, 0)[0]
                        ),
                        json!({ "uplink": n, "mac_tag": self.uplink.tag }),
                    ),
                    None => (String::from("net: the NIC is the host's alone"), json!({ "uplink": null })),
                })
            }
        };
        match result {
            Ok((text, fields)) => crate::console::reply::print(out, "net uplink", json, true, Ok((&text, fields))),
            Err(e) => crate::console::reply::print(out, "net uplink", json, true, Err(&e)),
        }
    }
}
