//! An Ethernet link between two emulated hosts on this machine only:
//! each QEMU gets an `e1000` (the 82540EM the hypervisor drives) on a
//! `-netdev dgram` whose two ends are unix datagram sockets in one
//! directory, each QEMU sending to the other's. Nothing leaves the
//! machine, no root or network namespace is needed, and either side can be
//! restarted (dgram keeps no connection).
//!
//! Across vendors (Bochs with VT-x to QEMU with AMD-V) the link is UDP on
//! loopback, one frame per datagram: Bochs' `ethmod=socket` binds
//! 0.0.0.0:<port> and sends to localhost:<port + 1>, so it only ever runs
//! inside a private network namespace ([`enter_private_netns`]), whose
//! loopback is the only interface. Checked set-ups:
//! `../shared/PLATFORM-LINKS.md`.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// One host's end of a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicEnd {
    /// `52:54:00:77:00:0N`: each side its own.
    pub mac: String,
    pub wire: Wire,
}

/// Where this end receives, and where it sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wire {
    /// Unix datagram sockets (QEMU to QEMU).
    Unix { local: PathBuf, remote: PathBuf },
    /// UDP on 127.0.0.1 (Bochs on either end: inside a private namespace).
    Udp { local_port: u16, remote_port: u16 },
}

impl NicEnd {
    /// The QEMU arguments for this end.
    pub fn qemu_args(&self) -> Vec<String> {
        let netdev = match &self.wire {
            Wire::Unix { local, remote } => format!(
                "dgram,id=hostlink,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                local.display(),
                remote.display()
            ),
            Wire::Udp { local_port, remote_port } => format!(
                "dgram,id=hostlink,local.type=inet,local.host=127.0.0.1,local.port={local_port},\
                 remote.type=inet,remote.host=127.0.0.1,remote.port={remote_port}"
            ),
        };
        vec!["-netdev".into(), netdev, "-device".into(), format!("e1000,netdev=hostlink,mac={}", self.mac)]
    }

    /// The bochsrc line for this end: Bochs' socket ethmod, which can only
    /// send to the port after its own.
    pub fn bochs_line(&self) -> Result<String> {
        match &self.wire {
            Wire::Udp { local_port, remote_port } if local_port.checked_add(1) == Some(*remote_port) => {
                Ok(format!("e1000: enabled=1, mac={}, ethmod=socket, ethdev={local_port}\n", self.mac))
            }
            _ => bail!("Bochs' e1000 takes only a UDP end whose remote port follows its own"),
        }
    }
}

/// A Bochs (VT-x) host and a QEMU (AMD-V) host on UDP ports `base` and
/// `base + 1` of the loopback; use inside [`enter_private_netns`].
pub fn cross_pair(base: u16) -> (NicEnd, NicEnd) {
    let bochs = NicEnd { mac: "52:54:00:77:00:01".into(), wire: Wire::Udp { local_port: base, remote_port: base + 1 } };
    let qemu = NicEnd { mac: "52:54:00:77:00:02".into(), wire: Wire::Udp { local_port: base + 1, remote_port: base } };
    (bochs, qemu)
}

thread_local! {
    /// The namespace [`enter_private_netns`] made for this thread.
    static PRIVATE_NS: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}

fn current_netns() -> Option<PathBuf> {
    std::fs::read_link("/proc/thread-self/ns/net").ok()
}

/// Whether the calling thread is in a network namespace that
/// [`enter_private_netns`] made (so binding 0.0.0.0 reaches nothing else).
pub fn in_private_netns() -> bool {
    let now = current_netns();
    now.is_some() && PRIVATE_NS.with(|p| *p.borrow() == now)
}

/// Moves the calling thread (and the emulators and threads it starts from
/// now on) into a new network namespace with only its loopback up. It
/// vanishes with the last process in it: nothing to remove afterwards.
/// Needs root (CAP_SYS_ADMIN).
pub fn enter_private_netns() -> Result<()> {
    // SAFETY: unshare(2) with CLONE_NEWNET only changes this thread's
    // network namespace; no memory is shared with the call.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET) (needs root)");
    }
    let st = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status().context("running ip")?;
    if !st.success() {
        bail!("ip link set lo up failed ({st})");
    }
    PRIVATE_NS.with(|p| *p.borrow_mut() = current_netns());
    Ok(())
}

/// Longest unix socket path (`sun_path`, less its terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// The two ends of a link whose sockets live in `dir` (created if need
/// be; stale socket files from an earlier run are removed, or QEMU could
/// not bind them).
pub fn pair(dir: &Path) -> Result<(NicEnd, NicEnd)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::path::absolute(dir)?;
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    for p in [&a, &b] {
        if p.as_os_str().len() > SUN_PATH_MAX {
            bail!("{} is too long for a unix socket path", p.display());
        }
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing the stale socket {}", p.display())),
        }
    }
    Ok((end(1, &a, &b), end(2, &b, &a)))
}

/// End `n` (1 or 2) of a link: `a` for 1, `b` for 2.
pub fn end_of(dir: &Path, side: &str) -> Result<NicEnd> {
    let dir = std::path::absolute(dir)?;
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    match side {
        "a" => {
            std::fs::create_dir_all(&dir)?;
            let _ = std::fs::remove_file(&a);
            Ok(end(1, &a, &b))
        }
        "b" => {
            std::fs::create_dir_all(&dir)?;
            let _ = std::fs::remove_file(&b);
            Ok(end(2, &b, &a))
        }
        other => bail!("link side {other:?}: use a or b"),
    }
}

fn end(n: u8, local: &Path, remote: &Path) -> NicEnd {
    NicEnd {
        mac: format!("52:54:00:77:00:{n:02x}"),
        wire: Wire::Unix { local: local.to_path_buf(), remote: remote.to_path_buf() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_cross_and_stale_sockets_go() {
        let dir = std::env::temp_dir().join(format!("boot-link-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.sock"), b"stale").unwrap();
        let (a, b) = pair(&dir).unwrap();
        assert!(!dir.join("a.sock").exists());
        let (Wire::Unix { local: al, remote: ar }, Wire::Unix { local: bl, remote: br }) = (&a.wire, &b.wire) else {
            panic!("unix ends expected")
        };
        assert_eq!((al, ar), (br, bl));
        assert!(a.bochs_line().is_err());
        assert_ne!(a.mac, b.mac);
        assert!(
            a.qemu_args()[1].contains("local.path=")
                && a.qemu_args()[3] == "e1000,netdev=hostlink,mac=52:54:00:77:00:01"
        );
        assert_eq!(end_of(&dir, "b").unwrap(), b);
        assert!(end_of(&dir, "c").is_err());
        let (bochs, qemu) = cross_pair(47011);
        assert_eq!(
            bochs.bochs_line().unwrap(),
            "e1000: enabled=1, mac=52:54:00:77:00:01, ethmod=socket, ethdev=47011\n"
        );
        assert!(
            qemu.qemu_args()[1].contains("local.port=47012,remote.type=inet,remote.host=127.0.0.1,remote.port=47011")
        );
        assert!(qemu.bochs_line().is_err());
        let long = dir.join("x".repeat(120));
        assert!(pair(&long).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
