//! `hypervisor.cfg`, the boot configuration in the ramdisk: `key = value`
//! lines, `#` comments. Unknown keys and bad values are reported, not fatal:
//! the hypervisor still boots with its defaults.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootConfig {
    /// I/O port of an emulator's debug-exit device, written at power-off.
    pub debug_exit_port: Option<u16>,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: Option<String>,
    /// Console commands run at start-up, in order.
    pub autorun: Vec<String>,
    /// PM1a control port to use for soft-off when the firmware provides no
    /// ACPI tables (OVMF under Bochs: the PIIX4 PM block at 0xb000).
    pub pm1a_cnt_fallback: Option<u16>,
    /// Deliberate failures, for the tests of the failure paths.
    pub fault_inject: Option<FaultInject>,
    /// Run the vCPU conformance check (`vm::conformance`) at boot.
    pub vcpu_conformance: bool,
    /// The host's own IPv4 address (`net_host_ip = 10.0.0.1/24`).
    pub net_host_ip: Option<smoltcp::wire::Ipv4Cidr>,
    /// The VM switch whose uplink the host's NIC is from boot on
    /// (`net_uplink = lan`, as `net uplink lan`).
    pub net_uplink: Option<String>,
}

/// A failure the hypervisor provokes on purpose (test images only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultInject {
    /// A page fault in the hypervisor itself right after start-up: tests the
    /// exception report and the failure power-off.
    HostPageFault,
    /// The next VM's first entry is given an invalid guest state (unusable
    /// TR): tests the VM-entry failure report.
    VmEntry,
}

/// Parses the file; returns the configuration and one message per line that
/// was ignored.
pub fn parse(text: &str) -> (BootConfig, Vec<String>) {
    let mut cfg = BootConfig::default();
    let mut problems = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            problems.push(alloc::format!("line {}: expected key = value", n + 1));
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "debug_exit_port" => match parse_u16(value) {
                Some(p) if p != 0 => cfg.debug_exit_port = Some(p),
                _ => problems.push(alloc::format!("line {}: bad port {value:?}", n + 1)),
            },
            "log_level" => match value {
                "error" | "warn" | "info" | "debug" | "trace" => cfg.log_level = Some(value.to_string()),
                _ => problems.push(alloc::format!("line {}: bad log level {value:?}", n + 1)),
            },
            "pm1a_cnt_fallback" => match parse_u16(value) {
                Some(p) if p != 0 => cfg.pm1a_cnt_fallback = Some(p),
                _ => problems.push(alloc::format!("line {}: bad port {value:?}", n + 1)),
            },
            "fault_inject" => match value {
                "host-page-fault" => cfg.fault_inject = Some(FaultInject::HostPageFault),
                "vm-entry" => cfg.fault_inject = Some(FaultInject::VmEntry),
                _ => problems.push(alloc::format!("line {}: unknown fault {value:?}", n + 1)),
            },
            "vcpu_conformance" => match value {
                "true" => cfg.vcpu_conformance = true,
                "false" => cfg.vcpu_conformance = false,
                _ => problems.push(alloc::format!("line {}: expected true or false, not {value:?}", n + 1)),
            },
            "net_host_ip" => match crate::hostnet::parse_cidr(value) {
                Ok(c) => cfg.net_host_ip = Some(c),
                Err(e) => problems.push(alloc::format!("line {}: net_host_ip {value:?}: {e}", n + 1)),
            },
            "net_uplink" if crate::console::parse::valid_switch_name(value) => cfg.net_uplink = Some(value.to_string()),
            "net_uplink" => problems.push(alloc::format!("line {}: net_uplink {value:?}: not a switch name", n + 1)),
            "autorun" if !value.is_empty() => cfg.autorun.push(value.to_string()),
            _ => problems.push(alloc::format!("line {}: unknown key {key:?}", n + 1)),
        }
    }
    (cfg, problems)
}

/// Decimal or `0x` hexadecimal.
pub fn parse_u16(s: &str) -> Option<u16> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u16::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_keys_and_reports_bad_lines() {
        let (cfg, problems) = parse(
            "# c\ndebug_exit_port = 0xf4\npm1a_cnt_fallback = 0xb004\nlog_level = debug\nautorun = vm run selftest\nautorun = vm list\nbogus\nfoo = 1\nlog_level = loud\ndebug_exit_port = 0\n",
        );
        assert_eq!(cfg.debug_exit_port, Some(0xf4));
        assert_eq!(cfg.log_level.as_deref(), Some("debug"));
        assert_eq!(cfg.autorun, ["vm run selftest", "vm list"]);
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].starts_with("line 7"));
        assert_eq!(cfg.pm1a_cnt_fallback, Some(0xb004));
        let (cfg, problems) = parse("fault_inject = vm-entry\nfault_inject = everything\n");
        assert_eq!(cfg.fault_inject, Some(FaultInject::VmEntry));
        assert_eq!(problems.len(), 1);
        assert!(!cfg.vcpu_conformance);
        let (cfg, problems) = parse("vcpu_conformance = true\nvcpu_conformance = yes\n");
        assert!(cfg.vcpu_conformance);
        assert_eq!(problems, ["line 2: expected true or false, not \"yes\""]);
        let (cfg, problems) = parse("net_host_ip = 10.0.0.2/24\nnet_host_ip = 10.0.0.0/24\n");
        assert_eq!(cfg.net_host_ip.map(|c| c.to_string()).as_deref(), Some("10.0.0.2/24"));
        assert_eq!(problems, ["line 2: net_host_ip \"10.0.0.0/24\": the network's own or broadcast address"]);
        let (cfg, problems) = parse("net_uplink = lan\nnet_uplink = a/b\n");
        assert_eq!(cfg.net_uplink.as_deref(), Some("lan"));
        assert_eq!(problems, ["line 2: net_uplink \"a/b\": not a switch name"]);
    }
}
