//! An Ethernet link between two emulated hosts on this machine only:
//! each QEMU gets an `e1000` (the 82540EM the hypervisor drives) on a
//! `-netdev dgram` whose two ends are unix datagram sockets in one
//! directory, each QEMU sending to the other's. Nothing leaves the
//! machine, no root or network namespace is needed, and either side can be
//! restarted (dgram keeps no connection). Checked set-ups:
//! `../shared/PLATFORM-LINKS.md`.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// One host's end of a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicEnd {
    /// `52:54:00:77:00:0N`: each side its own.
    pub mac: String,
    /// The socket this side receives on, and the one it sends to.
    pub local: PathBuf,
    pub remote: PathBuf,
}

impl NicEnd {
    /// The QEMU arguments for this end.
    pub fn qemu_args(&self) -> Vec<String> {
        vec![
            "-netdev".into(),
            format!(
                "dgram,id=hostlink,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                self.local.display(),
                self.remote.display()
            ),
            "-device".into(),
            format!("e1000,netdev=hostlink,mac={}", self.mac),
        ]
    }
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
    NicEnd { mac: format!("52:54:00:77:00:{n:02x}"), local: local.to_path_buf(), remote: remote.to_path_buf() }
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
        assert_eq!((&a.local, &a.remote), (&b.remote, &b.local));
        assert_ne!(a.mac, b.mac);
        assert!(
            a.qemu_args()[1].contains("local.path=")
                && a.qemu_args()[3] == "e1000,netdev=hostlink,mac=52:54:00:77:00:01"
        );
        assert_eq!(end_of(&dir, "b").unwrap(), b);
        assert!(end_of(&dir, "c").is_err());
        let long = dir.join("x".repeat(120));
        assert!(pair(&long).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
