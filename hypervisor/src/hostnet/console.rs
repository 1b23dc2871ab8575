//! The `net` console commands (the host's own network; the VMs' switches
//! are `vm run ... net=<switch>`):
//!
//! ```text
//! net [show]                          link, MAC, address, counters, transfers
//! net host ip=<a.b.c.d>/<len>         the host's address
//! net listen <port>                   accept test transfers on <port>
//! net send <a.b.c.d>:<port> <bytes>   send <bytes> (k/m/g suffix: KiB/MiB/GiB) of the test pattern
//! net ping <a.b.c.d> [count]          ICMP echo, 3 requests unless told
//! net uplink <switch>|off             the NIC as a VM switch's uplink (`net::uplink`)
//! ```
//! Each takes `--json`. Bad input gets a one-line error and changes nothing.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::net::SocketAddrV4;
use serde_json::{Value, json};
use smoltcp::wire::Ipv4Cidr;

use super::{
    HostNet, Nic, mac_text, parse_cidr, ping::MAX_COUNT as MAX_PINGS, tcp::parse_endpoint, transfer::MAX_BYTES,
};
use crate::vm::exit::Console;
use core::net::Ipv4Addr;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetCommand {
    Show,
    Host(Ipv4Cidr),
    Listen(u16),
    Send(SocketAddrV4, u64),
    Ping(Ipv4Addr, u16),
    /// `net uplink <switch>|off`: run by the manager, which holds the
    /// switches (`Manager::uplink_command`).
    Uplink(Option<String>),
}

impl NetCommand {
    fn name(&self) -> &'static str {
        match self {
            NetCommand::Show => "net",
            NetCommand::Host(_) => "net host",
            NetCommand::Listen(_) => "net listen",
            NetCommand::Send(..) => "net send",
            NetCommand::Ping(..) => "net ping",
            NetCommand::Uplink(_) => "net uplink",
        }
    }
}

/// Help lines for the console's `help`.
pub const HELP: &[(&str, &str)] = &[
    ("net [show]", "the host's NIC: link, MAC, address, frame counters, test transfers"),
    ("net host ip=<a.b.c.d>/<len>", "set the host's IPv4 address"),
    ("net listen <port>", "accept test transfers on <port> (each is verified and reported)"),
    ("net send <a.b.c.d>:<port> <bytes>[k|m|g]", "send a verified test transfer to a listening host"),
    ("net ping <a.b.c.d> [count]", "ICMP echo requests (3 unless told, at most 100), replies with round trips"),
    ("net uplink <switch>|off", "make the NIC the uplink of a VM switch (the host's stack joins it), or not"),
];

/// A parsed `net` line and whether `--json` was given.
pub type Parsed = (NetCommand, bool);

/// `None` if `line` is not a `net` command; else the command or the
/// one-line refusal.
pub fn parse(line: &str) -> Option<Result<Parsed, (String, bool)>> {
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.first() != Some(&"net") {
        return None;
    }
    let json = words.contains(&"--json");
    let args: Vec<&str> = words[1..].iter().copied().filter(|w| *w != "--json").collect();
    Some(parse_args(&args).map(|c| (c, json)).map_err(|e| (e, json)))
}

fn parse_args(args: &[&str]) -> Result<NetCommand, String> {
    match args {
        [] | ["show"] => Ok(NetCommand::Show),
        ["host", ip] => match ip.strip_prefix("ip=") {
            Some(v) => parse_cidr(v).map(NetCommand::Host).map_err(|e| format!("net host: {v:?}: {e}")),
            None => Err(String::from("net host: usage: 'net host ip=<a.b.c.d>/<len>'")),
        },
        ["host", ..] => Err(String::from("net host: usage: 'net host ip=<a.b.c.d>/<len>'")),
        ["listen", port] => match port.parse::<u16>() {
            Ok(p) if p != 0 => Ok(NetCommand::Listen(p)),
            _ => Err(format!("net listen: {port:?} is not a port (1-65535)")),
        },
        ["listen", ..] => Err(String::from("net listen: usage: 'net listen <port>'")),
        ["send", to, bytes] => {
            let to = parse_endpoint(to).map_err(|e| format!("net send: {to:?}: {e}"))?;
            let n = parse_bytes(bytes).ok_or_else(|| {
                format!("net send: {bytes:?}: expected a byte count up to 1g (k, m, g: KiB, MiB, GiB)")
            })?;
            Ok(NetCommand::Send(to, n))
        }
        ["send", ..] => Err(String::from("net send: usage: 'net send <a.b.c.d>:<port> <bytes>[k|m|g]'")),
        ["ping", to, count @ ..] if count.len() <= 1 => {
            let addr: Ipv4Addr = to.parse().map_err(|_| format!("net ping: {to:?} is not an IPv4 address"))?;
            if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() {
                return Err(format!("net ping: {to:?} is not a host address"));
            }
            let n = match count {
                [c] => c
                    .parse::<u16>()
                    .ok()
                    .filter(|n| (1..=MAX_PINGS).contains(n))
                    .ok_or_else(|| format!("net ping: {c:?}: the count must be 1-{MAX_PINGS}"))?,
                _ => 3,
            };
            Ok(NetCommand::Ping(addr, n))
        }
        ["ping", ..] => Err(String::from("net ping: usage: 'net ping <a.b.c.d> [count]'")),
        ["uplink", "off"] => Ok(NetCommand::Uplink(None)),
        ["uplink", name] if crate::console::parse::valid_switch_name(name) => {
            Ok(NetCommand::Uplink(Some(String::from(*name))))
        }
        ["uplink", name] => {
            Err(format!("net uplink: {name:?} is not a switch name (1-32 letters, digits, '-', '_', '.')"))
        }
        ["uplink", ..] => Err(String::from("net uplink: usage: 'net uplink <switch>' or 'net uplink off'")),
        [other, ..] => Err(format!("net: unknown subcommand {other:?} (show, host, listen, send, ping, uplink)")),
    }
}

/// A byte count with an optional binary k/m/g suffix, at most MAX_BYTES.
fn parse_bytes(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1 << shift).filter(|&n| n <= MAX_BYTES)
}

/// Runs a parsed `net` command on `net` (`None`: the host has no NIC) and
/// prints its reply: text lines, or one JSON line.
pub fn execute<N: Nic>(p: &Parsed, net: Option<&mut HostNet<N>>, now_us: u64, out: &mut impl Console) {
    let (cmd, json) = p;
    let name = cmd.name();
    let result = match net {
        None => Err(String::from("no network device (no 82540EM on the PCI bus, or it failed to start)")),
        Some(net) => run(cmd, net, now_us),
    };
    match result {
        Ok((text, fields)) => crate::console::reply::print(out, name, *json, true, Ok((&text, fields))),
        Err(e) => crate::console::reply::print(out, name, *json, true, Err(&e)),
    }
}

/// A refusal from [`parse`], in the form asked for.
pub fn report_parse_error(e: &(String, bool), out: &mut impl Console) {
    crate::console::reply::print_parse_error(out, &e.0, e.1);
}

fn run<N: Nic>(cmd: &NetCommand, net: &mut HostNet<N>, now_us: u64) -> Result<(String, Value), String> {
    match cmd {
        NetCommand::Show => Ok(show(net)),
        NetCommand::Host(cidr) => {
            net.set_addr(*cidr);
            Ok((format!("net: host address {cidr}"), json!({ "ip": cidr.to_string() })))
        }
        NetCommand::Listen(port) => {
            net.listen(*port)?;
            Ok((format!("net: listening for transfers on port {port}"), json!({ "port": port })))
        }
        NetCommand::Ping(to, n) => {
            net.ping(*to, *n, now_us)?;
            Ok((format!("net: pinging {to} {n} times"), json!({ "to": to.to_string(), "count": n })))
        }
        NetCommand::Send(to, n) => {
            net.send(*to, *n, now_us)?;
            Ok((
                format!("net: sending {n} bytes to {to}; the result follows when it is done"),
                json!({ "to": to.to_string(), "bytes": n }),
            ))
        }
        NetCommand::Uplink(_) => Err(String::from("the VM manager runs this command, not the NIC alone")),
    }
}

fn show<N: Nic>(net: &mut HostNet<N>) -> (String, Value) {
    let st = net.status();
    let c = st.counters;
    let ip = st.addr.map(|a| a.to_string());
    let (sending, receiving) = net.service.active();
    let stats = &net.service.stats;
    let listening = net.service.port;
    let text = format!(
        "net: {}, link {}, mac {}, ip {}\n\
         frames in {} ({} bytes), out {} ({} bytes); dropped {} in, {} missed, {} out\n\
         transfers: {}; sent {} ok, {} failed; received {} ok, {} failed; {sending} sending, {receiving} receiving",
        net.device,
        if st.link_up { "up" } else { "down" },
        mac_text(&st.mac),
        ip.as_deref().unwrap_or("none (net host ip=<addr>/<len>)"),
        c.rx_frames,
        c.rx_bytes,
        c.tx_frames,
        c.tx_bytes,
        c.rx_dropped,
        c.rx_missed,
        c.tx_dropped,
        listening.map_or_else(|| String::from("not listening"), |p| format!("listening on port {p}")),
        stats.sends_ok,
        stats.sends_failed,
        stats.receives_ok,
        stats.receives_failed,
    );
    let text = match &st.uplink {
        Some((sw, b)) => format!(
            "{text}\nuplink of switch {sw} (promiscuous): {} frames to the host's stack, {} from it, {} dropped; \
             from VMs, dropped: {} from a MAC not their own, {} for a full queue",
            b.to_stack, b.from_stack, b.dropped, b.spoofed, b.vm_frames_dropped
        ),
        None => text,
    };
    let j = json!({
        "device": net.device,
        "link_up": st.link_up,
        "mac": mac_text(&st.mac),
        "ip": ip,
        "counters": c,
        "listening": listening,
        "sending": sending,
        "receiving": receiving,
        "transfers": stats,
        "longest_poll_us": net.longest_poll_us,
        "uplink": st.uplink.as_ref().map(|(sw, b)| json!({ "switch": sw, "bridge": b })),
    });
    (text, j)
}

#[cfg(test)]
mod tests {
    use super::super::link::*;
    use super::*;

    #[derive(Default)]
    struct Lines(Vec<String>);
    impl Console for Lines {
        fn line(&mut self, text: &str) {
            self.0.push(text.to_string());
        }
    }

    fn ok(line: &str) -> Parsed {
        parse(line).expect("a net command").expect("parses")
    }
    fn err(line: &str) -> String {
        parse(line).expect("a net command").expect_err("refused").0
    }

    #[test]
    fn grammar() {
        assert_eq!(parse("vm list"), None);
        assert_eq!(parse("network"), None);
        assert_eq!(ok("net"), (NetCommand::Show, false));
        assert_eq!(ok("net show --json"), (NetCommand::Show, true));
        assert_eq!(ok("net host ip=10.0.0.1/24").0, NetCommand::Host(parse_cidr("10.0.0.1/24").unwrap()));
        assert_eq!(ok("net listen 7000").0, NetCommand::Listen(7000));
        assert_eq!(
            ok("net send 10.0.0.2:7000 4m").0,
            NetCommand::Send(parse_endpoint("10.0.0.2:7000").unwrap(), 4 << 20)
        );
        assert_eq!(ok("net send 10.0.0.2:7000 123").0, NetCommand::Send(parse_endpoint("10.0.0.2:7000").unwrap(), 123));
        assert_eq!(ok("net ping 10.0.0.2").0, NetCommand::Ping(Ipv4Addr::new(10, 0, 0, 2), 3));
        assert_eq!(ok("net ping 10.0.0.2 100").0, NetCommand::Ping(Ipv4Addr::new(10, 0, 0, 2), 100));
        assert_eq!(
            ok("net send 10.0.0.2:7000 1g").0,
            NetCommand::Send(parse_endpoint("10.0.0.2:7000").unwrap(), 1 << 30)
        );
        for (bad, says) in [
            ("net host", "usage"),
            ("net host 10.0.0.1/24", "usage"),
            ("net host ip=10.0.0.1", "expected"),
            ("net host ip=10.0.0.300/24", "not an IPv4"),
            ("net host ip=10.0.0.1/24 extra", "usage"),
            ("net listen", "usage"),
            ("net listen 0", "not a port"),
            ("net listen 65536", "not a port"),
            ("net send 10.0.0.2 5", "expected"),
            ("net send 10.0.0.2:7000", "usage"),
            ("net send 10.0.0.2:7000 2g", "byte count"),
            ("net send 10.0.0.2:7000 -1", "byte count"),
            ("net send 10.0.0.2:7000 m", "byte count"),
            ("net send 10.0.0.2:7000 99999999999999999999k", "byte count"),
            ("net frob", "unknown subcommand"),
            ("net ping", "usage"),
            ("net ping 10.0.0.2 3 4", "usage"),
            ("net ping 10.0.0.2 0", "count must be"),
            ("net ping 10.0.0.2 101", "count must be"),
            ("net ping 10.0.0.256", "not an IPv4"),
            ("net ping 255.255.255.255", "not a host"),
            ("net uplink", "usage"),
            ("net uplink a b", "usage"),
            ("net uplink sw/0", "not a switch name"),
        ] {
            let e = err(bad);
            assert!(e.contains(says) && !e.contains('\n'), "{bad:?}: {e:?}");
        }
        assert!(parse("net bogus --json").unwrap().unwrap_err().1);
        assert_eq!(ok("net uplink lan").0, NetCommand::Uplink(Some("lan".into())));
        assert_eq!(ok("net uplink off --json"), (NetCommand::Uplink(None), true));
    }

    #[test]
    fn commands_change_state_and_bad_input_changes_nothing() {
        let (mut a, _b) = hosts();
        let mut out = Lines::default();
        execute(&ok("net host ip=192.168.5.7/16"), Some(&mut a), 0, &mut out);
        assert_eq!(a.addr().unwrap().to_string(), "192.168.5.7/16");
        // A refused line never reaches execute; the address stays.
        assert!(parse("net host ip=192.168.5.0/24").unwrap().is_err());
        assert_eq!(a.addr().unwrap().to_string(), "192.168.5.7/16");
        execute(&ok("net listen 7000"), Some(&mut a), 0, &mut out);
        execute(&ok("net listen 7001"), Some(&mut a), 0, &mut out);
        assert_eq!(out.0.last().unwrap(), "error: net listen: already listening on port 7000");
        assert_eq!(a.service.port, Some(7000));
        out.0.clear();
        execute(&ok("net --json"), Some(&mut a), 0, &mut out);
        let v: Value = serde_json::from_str(&out.0[0]).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["ip"], "192.168.5.7/16");
        assert_eq!(v["mac"], "02:00:00:00:00:01");
        assert_eq!(v["listening"], 7000);
        assert_eq!(v["counters"]["tx_frames"], 0);
        out.0.clear();
        execute(&ok("net"), Some(&mut a), 0, &mut out);
        assert_eq!(out.0.len(), 3, "{:?}", out.0);
        assert!(out.0[0].starts_with("net: a, link up, mac 02:00:00:00:00:01, ip 192.168.5.7/16"));
        out.0.clear();
        execute::<End>(&ok("net --json"), None, 0, &mut out);
        assert!(out.0[0].contains("\"ok\":false") && out.0[0].contains("no network device"));
    }
}
