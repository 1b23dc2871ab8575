//! The Linux guest's initramfs, built from Debian packages that
//! `scripts/guest-linux` unpacked: busybox (from `busybox-static`) with
//! links for the common applets, the kernel's virtio modules and their
//! dependencies (from the `linux-image-*-cloud-amd64` package), and an
//! `/init` that mounts proc, sysfs and devtmpfs, loads the modules, prints
//! [`MARKER`] and hands the console to busybox `init`, which runs a shell on
//! it (and makes `poweroff` and `reboot` in the guest work).
//!
//! The archive is a gzip'd newc cpio, the format the kernel unpacks
//! (`Documentation/driver-api/early-userspace/buffer-format.rst`). It is
//! deterministic (mtime 0, owner root, inodes in order), so rebuilding it
//! from the same packages gives the same bytes and [`write_if_changed`]
//! leaves the file alone.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The line `/init` prints once the guest's user space is up.
pub const MARKER: &str = "linux-guest: init ready";

/// Modules for the virtio devices the hypervisor will give its guests, in
/// load order (their dependencies are found and loaded first). One that
/// the kernel lacks is skipped with a note. Names as the kernel reads them,
/// `-` as `_`: `virtio_rng` is `virtio-rng.ko` (the entropy device).
pub const WANTED_MODULES: &[&str] =
    &["virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "virtio_balloon", "virtio_rng"];

/// Applets linked in the archive itself; `/init` adds links for all the
/// others with `busybox --install -s`.
pub const APPLETS: &[&str] = &[
    "bin/sh",
    "bin/ash",
    "bin/cat",
    "bin/cttyhack",
    "bin/dmesg",
    "bin/echo",
    "bin/ls",
    "bin/mkdir",
    "bin/mount",
    "bin/ps",
    "bin/sleep",
    "bin/umount",
    "bin/uname",
    "sbin/halt",
    "sbin/init",
    "sbin/insmod",
    "sbin/lsmod",
    "sbin/poweroff",
    "sbin/reboot",
    "usr/bin/free",
    "usr/bin/setsid",
    "usr/bin/top",
    "usr/bin/uptime",
];

/// `/init`: PID 1 until it execs busybox init. The kernel gives it
/// /dev/console (which is why the archive carries that node).
const INIT: &str = r#"#!/bin/sh
# /init of the hypervisor's Linux guest (written by boot/src/initramfs.rs).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s
# Virtio drivers, dependencies first (the order is in /etc/modules).
while read -r ko; do
    insmod "/lib/modules/$ko" || echo "linux-guest: cannot load $ko"
done < /etc/modules
echo "linux-guest: init ready"
exec /sbin/init
"#;

/// busybox init's table: a shell on the console (cttyhack makes it the
/// controlling terminal, so job control and Ctrl-C work) and one on the
/// virtio console `hvc0` (`vm console <id> virtio`), each restarted when it
/// exits; `poweroff` and `reboot` sync and power off or restart.
const INITTAB: &str = "\
::respawn:/bin/cttyhack /bin/sh -l
hvc0::respawn:/bin/sh -l
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
";

const PROFILE: &str = "export PS1='linux-guest:\\w# '\nexport PATH=/sbin:/bin:/usr/sbin:/usr/bin\n";

/// File type bits of a cpio mode (as `st_mode`).
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Where the inputs are: the unpacked kernel package (with
/// `lib/modules/<version>/`) and the busybox binary.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub kernel_root: PathBuf,
    pub busybox: PathBuf,
}

/// What went into an archive.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Kernel version (the directory name under `lib/modules`).
    pub version: String,
    /// Modules in load order, as paths under `lib/modules/`.
    pub modules: Vec<String>,
    /// Wanted modules the kernel does not have as modules.
    pub missing: Vec<String>,
}

/// One archive entry.
enum Node {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Link(String),
    CharDev { major: u32, minor: u32 },
}

/// Builds the gzip'd initramfs from `inputs`.
pub fn build(inputs: &Inputs) -> Result<(Vec<u8>, Summary)> {
    let modules_root = inputs.kernel_root.join("lib/modules");
    let version = single_dir(&modules_root)?;
    let kernel_dir = modules_root.join(&version);
    let available = find_modules(&kernel_dir)?;
    let mut summary = Summary { version: version.clone(), ..Default::default() };
    let mut order: Vec<String> = Vec::new();
    for name in WANTED_MODULES {
        if !available.contains_key(*name) {
            summary.missing.push((*name).into());
            continue;
        }
        add_with_deps(name, &available, &mut order, &mut Vec::new())?;
    }

    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    for dir in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "etc", "root", "tmp", "lib"] {
        nodes.insert(dir.into(), Node::Dir);
    }
    nodes.insert("dev/console".into(), Node::CharDev { major: 5, minor: 1 });
    let busybox = std::fs::read(&inputs.busybox).with_context(|| format!("reading {}", inputs.busybox.display()))?;
    nodes.insert("bin/busybox".into(), Node::File { data: busybox, mode: 0o755 });
    for applet in APPLETS {
        nodes.insert((*applet).into(), Node::Link("/bin/busybox".into()));
    }
    nodes.insert("init".into(), Node::File { data: INIT.into(), mode: 0o755 });
    nodes.insert("etc/inittab".into(), Node::File { data: INITTAB.into(), mode: 0o644 });
    nodes.insert("etc/profile".into(), Node::File { data: PROFILE.into(), mode: 0o644 });
    let mut load_list = String::new();
    for name in &order {
        let path = &available[name];
        let rel = path.strip_prefix(&modules_root).expect("found under lib/modules").to_string_lossy().into_owned();
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let dest = format!("lib/modules/{rel}");
        // Parent directories first (the kernel creates nothing itself).
        let mut parent = Path::new(&dest).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            nodes.entry(p.to_string_lossy().into_owned()).or_insert(Node::Dir);
            parent = p.parent();
        }
        nodes.insert(dest, Node::File { data, mode: 0o644 });
        load_list.push_str(&rel);
        load_list.push('\n');
        summary.modules.push(rel);
    }
    nodes.insert("etc/modules".into(), Node::File { data: load_list.into_bytes(), mode: 0o644 });

    let cpio = write_cpio(&nodes)?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&cpio)?;
    Ok((gz.finish()?, summary))
}

/// The one directory under `dir` (the kernel package has one version).
fn single_dir(dir: &Path) -> Result<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one kernel version under {}, found {names:?}", dir.display()),
    }
}

/// Every `*.ko` under `kernel_dir`, by module name (`-` read as `_`, as
/// the kernel does).
fn find_modules(kernel_dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut found = BTreeMap::new();
    let mut stack = vec![kernel_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
                found.insert(name.replace('-', "_"), path);
            }
        }
    }
    Ok(found)
}

/// Appends `name` to `order` after its dependencies (from the `depends=`
/// entry of its `.modinfo` section, what `depmod` reads too).
fn add_with_deps(
    name: &str,
    available: &BTreeMap<String, PathBuf>,
    order: &mut Vec<String>,
    visiting: &mut Vec<String>,
) -> Result<()> {
    if order.iter().any(|n| n == name) {
        return Ok(());
    }
    if visiting.iter().any(|n| n == name) {
        bail!("module dependency cycle through {name}");
    }
    let path = available.get(name).with_context(|| format!("module {name} is needed but not in the kernel package"))?;
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    visiting.push(name.into());
    for dep in module_depends(&data).with_context(|| format!("reading the dependencies of {}", path.display()))? {
        add_with_deps(&dep, available, order, visiting)?;
    }
    visiting.pop();
    order.push(name.into());
    Ok(())
}

/// The modules a `.ko` depends on, from its `.modinfo` section (NUL-
/// separated `key=value` strings; `depends=a,b`).
pub fn module_depends(ko: &[u8]) -> Result<Vec<String>> {
    let file = elf::ElfBytes::<elf::endian::LittleEndian>::minimal_parse(ko).context("not an ELF object")?;
    let Some(section) = file.section_header_by_name(".modinfo").context("bad section headers")? else {
        bail!("no .modinfo section");
    };
    let (data, _) = file.section_data(&section).context("bad .modinfo section")?;
    let mut deps = Vec::new();
    for entry in data.split(|&b| b == 0) {
        if let Some(list) = entry.strip_prefix(b"depends=") {
            let list = std::str::from_utf8(list).context("depends= is not UTF-8")?;
            deps.extend(list.split(',').filter(|d| !d.is_empty()).map(|d| d.replace('-', "_")));
        }
    }
    Ok(deps)
}

/// A newc archive of `nodes` (parents sort before their children in a
/// `BTreeMap` of paths), ending with the trailer.
fn write_cpio(nodes: &BTreeMap<String, Node>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for (ino, (name, node)) in nodes.iter().enumerate() {
        let entry = cpio::newc::Builder::new(name).ino(ino as u32 + 1).uid(0).gid(0).mtime(0);
        let (entry, data): (_, &[u8]) = match node {
            Node::Dir => (entry.mode(S_IFDIR | 0o755).nlink(2), &[]),
            Node::File { data, mode } => (entry.mode(S_IFREG | mode).nlink(1), data),
            Node::Link(target) => (entry.mode(S_IFLNK | 0o777).nlink(1), target.as_bytes()),
            Node::CharDev { major, minor } => {
                (entry.mode(S_IFCHR | 0o600).nlink(1).rdev_major(*major).rdev_minor(*minor), &[])
            }
        };
        let len = u32::try_from(data.len()).with_context(|| format!("{name} is larger than newc allows"))?;
        let mut writer = entry.write(&mut out, len);
        writer.write_all(data)?;
        writer.finish()?;
    }
    cpio::newc::trailer(&mut out)?;
    Ok(out)
}

/// Writes `bytes` to `path` unless it already holds them; says whether it
/// wrote.
pub fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<bool> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn node_file(data: &[u8]) -> Node {
        Node::File { data: data.to_vec(), mode: 0o644 }
    }

    /// An archive entry read back: name, mode, (rdev major, minor), data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    fn read_back(mut archive: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        loop {
            let mut reader = cpio::NewcReader::new(archive).unwrap();
            if reader.entry().is_trailer() {
                return out;
            }
            let e = reader.entry();
            let meta = (e.name().to_string(), e.mode(), (e.rdev_major(), e.rdev_minor()));
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            out.push((meta.0, meta.1, meta.2, data));
            archive = reader.finish().unwrap();
        }
    }

    #[test]
    fn cpio_holds_dirs_files_links_and_device_nodes_in_order() {
        let mut nodes = BTreeMap::new();
        nodes.insert("dev".to_string(), Node::Dir);
        nodes.insert("dev/console".to_string(), Node::CharDev { major: 5, minor: 1 });
        nodes.insert("bin/sh".to_string(), Node::Link("/bin/busybox".into()));
        nodes.insert("init".to_string(), node_file(b"#!/bin/sh\n"));
        let archive = write_cpio(&nodes).unwrap();
        assert!(archive.starts_with(b"070701"), "newc magic");
        assert_eq!(archive.len() % 4, 0);
        let entries = read_back(&archive);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["bin/sh", "dev", "dev/console", "init"]);
        assert_eq!(entries[0].1, S_IFLNK | 0o777);
        assert_eq!(entries[0].3, b"/bin/busybox");
        assert_eq!(entries[1].1, S_IFDIR | 0o755);
        assert_eq!((entries[2].1, entries[2].2), (S_IFCHR | 0o600, (5, 1)));
        assert_eq!(entries[3].3, b"#!/bin/sh\n");
        // Deterministic.
        assert_eq!(write_cpio(&nodes).unwrap(), archive);
    }

    #[test]
    fn init_prints_the_marker_and_loads_the_module_list() {
        assert!(INIT.contains(&format!("echo \"{MARKER}\"")));
        assert!(INIT.contains("< /etc/modules"));
        assert!(INIT.starts_with("#!/bin/sh\n") && APPLETS.contains(&"bin/sh"));
        assert!(APPLETS.contains(&"sbin/init") && APPLETS.contains(&"bin/cttyhack"));
    }

    #[test]
    fn write_if_changed_leaves_equal_files_alone() {
        let path = std::env::temp_dir().join(format!("initramfs-{}.img", std::process::id()));
        assert!(write_if_changed(&path, b"abc").unwrap());
        assert!(!write_if_changed(&path, b"abc").unwrap());
        assert!(write_if_changed(&path, b"abd").unwrap());
        std::fs::remove_file(&path).unwrap();
    }

    /// With the packages `scripts/setup` unpacked: the real initramfs has
    /// busybox, /init and the virtio modules after their dependencies.
    #[test]
    fn builds_the_real_initramfs_if_the_packages_are_there() {
        let dir = crate::target_dir().join("guests/linux");
        let inputs = Inputs { kernel_root: dir.join("kernel"), busybox: dir.join("busybox/bin/busybox") };
        if !inputs.busybox.exists() || !inputs.kernel_root.exists() {
            println!("skipped: no unpacked packages under {} (run scripts/setup)", dir.display());
            return;
        }
        let (gz, summary) = build(&inputs).unwrap();
        assert!(summary.missing.is_empty(), "{summary:?}");
        let pos = |m: &str| summary.modules.iter().position(|p| p.ends_with(&format!("/{m}.ko"))).unwrap();
        assert!(pos("virtio") < pos("virtio_pci") && pos("virtio_ring") < pos("virtio_blk"));
        let mut cpio = Vec::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut cpio).unwrap();
        let names: Vec<String> = read_back(&cpio).into_iter().map(|e| e.0).collect();
        for needed in ["init", "bin/busybox", "dev/console", "etc/inittab", "etc/modules"] {
            assert!(names.iter().any(|n| n == needed), "{needed} missing");
        }
    }
}
