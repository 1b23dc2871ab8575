//! Building the boot image: the kernel and the guests (cross-compiled for
//! `x86_64-unknown-none`), a ramdisk (a tar archive of the guests plus the
//! boot configuration `hypervisor.cfg`), and the UEFI disk image that the
//! `bootloader` crate assembles from them.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const KERNEL_TARGET: &str = "x86_64-unknown-none";

/// Guest binaries of the `guests` package that go into the ramdisk.
pub const GUESTS: &[&str] = &[
    "selftest",
    "selftest-mb",
    "escape",
    "crash",
    "exitbench",
    "memtest",
    "cr2",
    "vcputest",
    "hostile",
    "smptest",
    "mcetest",
];

/// The configuration file's name in the ramdisk.
pub const CONFIG_NAME: &str = "hypervisor.cfg";

/// Host files that `boot build` and `boot run` put into the default image
/// besides the test guests, as (ramdisk name, path from the workspace root);
/// `--file` adds more. The Linux guest that `scripts/setup` prepares joins
/// them with one line here (once the device model can boot it):
/// `("linux", "target/guests/linux/vmlinuz"), ("linux-initrd", "target/guests/linux/initrd.img"),`
/// The whole-system tests build their images without these.
pub const DEFAULT_FILES: &[(&str, &str)] =
    &[("linux", "target/guests/linux/vmlinuz"), ("linux-initrd", "target/guests/linux/initrd.img")];

/// Longest ramdisk file name: a ustar name field, as the hypervisor's
/// archive reader takes no GNU long names.
pub const MAX_FILE_NAME: usize = 100;

/// A host file put into the ramdisk under `name`, so that the console can
/// start it (`vm run NAME`) or pass it as a module (`mod=NAME`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraFile {
    pub name: String,
    pub path: PathBuf,
}

impl std::str::FromStr for ExtraFile {
    type Err = anyhow::Error;

    /// Parses `NAME=PATH` (the `--file` argument) and checks the name.
    fn from_str(arg: &str) -> Result<Self> {
        // clap names the argument in front of these messages.
        let Some((name, path)) = arg.split_once('=') else {
            bail!("expected NAME=PATH");
        };
        if path.is_empty() {
            bail!("the path is empty");
        }
        check_file_name(name)?;
        Ok(Self { name: name.into(), path: path.into() })
    }
}

/// A ramdisk name must be one console word (the console splits commands at
/// whitespace), a plain file name (no `/`), fit a ustar header, and not be
/// the configuration file.
pub fn check_file_name(name: &str) -> Result<()> {
    if name.is_empty() {
        bail!("the name is empty");
    }
    if name.len() > MAX_FILE_NAME {
        bail!("the name is {} bytes long; at most {MAX_FILE_NAME} fit the ramdisk", name.len());
    }
    if name.contains('/') {
        bail!("the name {name:?} contains '/'; ramdisk files have plain names");
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic()) {
        bail!("the name {name:?} contains {c:?}; use printable ASCII without spaces");
    }
    if name == CONFIG_NAME {
        bail!("the name {CONFIG_NAME} is taken by the boot configuration");
    }
    Ok(())
}

/// Refuses bad names, names already taken (by a test guest or an earlier
/// file) and paths that are not files, before anything is built.
pub fn check_files(files: &[ExtraFile]) -> Result<()> {
    for (i, f) in files.iter().enumerate() {
        check_file_name(&f.name).with_context(|| format!("--file {}", f.name))?;
        if GUESTS.contains(&f.name.as_str()) {
            bail!("--file {}: the name is taken by a test guest", f.name);
        }
        if files[..i].iter().any(|g| g.name == f.name) {
            bail!("--file {}: the name is given twice", f.name);
        }
        let meta = std::fs::metadata(&f.path).with_context(|| format!("--file {}: {}", f.name, f.path.display()))?;
        if !meta.is_file() {
            bail!("--file {}: {} is not a file", f.name, f.path.display());
        }
    }
    Ok(())
}

/// Checks `files` and reads them, as (name, bytes).
pub fn read_files(files: &[ExtraFile]) -> Result<Vec<(&str, Vec<u8>)>> {
    check_files(files)?;
    files
        .iter()
        .map(|f| {
            let data =
                std::fs::read(&f.path).with_context(|| format!("--file {}: reading {}", f.name, f.path.display()))?;
            Ok((f.name.as_str(), data))
        })
        .collect()
}

/// [`DEFAULT_FILES`] as ramdisk files, paths resolved from the workspace;
/// those the setup could not prepare (offline) are left out.
pub fn default_files() -> Vec<ExtraFile> {
    let root = crate::workspace_root();
    DEFAULT_FILES
        .iter()
        .map(|(name, path)| ExtraFile { name: (*name).into(), path: root.join(path) })
        .filter(|f| f.path.exists())
        .collect()
}

/// The console commands `boot run` starts with when given none: the Linux
/// guest with the terminal attached to its console, when the image has it
/// and someone is at a terminal to type; the selftest guest otherwise.
pub fn default_autorun(files: &[ExtraFile], interactive: bool) -> Vec<String> {
    let has = |n: &str| files.iter().any(|f| f.name == n);
    if interactive && has("linux") && has("linux-initrd") {
        vec!["vm run linux".into(), "vm console 1".into()]
    } else {
        vec!["vm run selftest".into()]
    }
}

/// Settings baked into the image's `hypervisor.cfg`.
#[derive(Clone, Debug, Default)]
pub struct ImageOptions {
    /// Console commands run at boot, in order.
    pub autorun: Vec<String>,
    /// Tell the kernel about the emulator's isa-debug-exit port (0xf4).
    pub debug_exit: bool,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: Option<String>,
    /// Name of the image (so that parallel runs do not overwrite each other).
    pub name: String,
    /// More `key = value` lines for `hypervisor.cfg` (e.g. `fault_inject`).
    pub extra_config: Vec<String>,
    /// Host files for the ramdisk besides the test guests.
    pub files: Vec<ExtraFile>,
}

#[derive(Clone, Debug)]
pub struct Image {
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub ramdisk: PathBuf,
}

/// Compiles kernel and guests (release profile). Cargo's own locking makes
/// concurrent calls safe.
pub fn build_binaries() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(crate::workspace_root())
        .args(["build", "--release", "--target", KERNEL_TARGET, "-p", "hypervisor", "-p", "guests"])
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("building the kernel and guests failed ({status})");
    }
    Ok(crate::target_dir().join(KERNEL_TARGET).join("release"))
}

/// The configuration file the kernel reads from its ramdisk.
pub fn config_text(opts: &ImageOptions) -> String {
    let mut s = String::from("# written by boot/; read by the hypervisor at start-up\n");
    if opts.debug_exit {
        // QEMU's isa-debug-exit (added by `emulator::spawn`), and the PIIX4
        // PM control port for soft-off under Bochs, whose OVMF has no ACPI.
        s.push_str("debug_exit_port = 0xf4\n");
        s.push_str("pm1a_cnt_fallback = 0xb004\n");
    }
    if let Some(level) = &opts.log_level {
        s.push_str(&format!("log_level = {level}\n"));
    }
    for cmd in &opts.autorun {
        s.push_str(&format!("autorun = {cmd}\n"));
    }
    for line in &opts.extra_config {
        s.push_str(line);
        s.push('\n');
    }
    s
}

/// Builds everything and writes `target/images/<name>.img`.
pub fn build(opts: &ImageOptions) -> Result<Image> {
    // A mistyped --file fails now, not after a minute of building.
    check_files(&opts.files)?;
    let bin_dir = build_binaries()?;
    assemble(&bin_dir, opts)
}

/// Writes ramdisk and disk image from already-built binaries.
pub fn assemble(bin_dir: &Path, opts: &ImageOptions) -> Result<Image> {
    let out = crate::target_dir().join("images");
    std::fs::create_dir_all(&out)?;
    let name = if opts.name.is_empty() { "hypervisor" } else { &opts.name };
    let kernel = bin_dir.join("hypervisor");
    let ramdisk = out.join(format!("{name}.ramdisk.tar"));
    write_ramdisk(bin_dir, &config_text(opts), &opts.files, &ramdisk)?;
    let disk = out.join(format!("{name}.img"));
    let mut config = bootloader::BootConfig::default();
    // The bootloader's own log would interleave with the console transcript.
    config.serial_logging = false;
    config.frame_buffer_logging = false;
    bootloader::UefiBoot::new(&kernel)
        .set_ramdisk(&ramdisk)
        .set_boot_config(&config)
        .create_disk_image(&disk)
        .context("creating the UEFI disk image")?;
    pad_to_cylinders(&disk)?;
    Ok(Image { disk, kernel, ramdisk })
}

fn write_ramdisk(bin_dir: &Path, config: &str, files: &[ExtraFile], path: &Path) -> Result<()> {
    // Read (and so check) the extra files before writing anything.
    let extra = read_files(files)?;
    let mut tar = tar::Builder::new(std::fs::File::create(path)?);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut add = |name: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data)?;
        Ok(())
    };
    add(CONFIG_NAME, config.as_bytes())?;
    for g in GUESTS {
        let p = bin_dir.join(g);
        let data = std::fs::read(&p).with_context(|| format!("reading guest {}", p.display()))?;
        add(g, &data)?;
    }
    for (name, data) in &extra {
        add(name, data)?;
    }
    tar.into_inner()?;
    Ok(())
}

/// Bochs wants a disk that is a whole number of cylinders (16 heads x 63
/// sectors of 512 bytes); QEMU does not mind the padding.
pub const CYLINDER_BYTES: u64 = 16 * 63 * 512;

fn pad_to_cylinders(disk: &Path) -> Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(disk)?;
    let len = f.metadata()?.len();
    f.set_len(len.div_ceil(CYLINDER_BYTES) * CYLINDER_BYTES)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(arg: &str) -> Result<ExtraFile> {
        arg.parse()
    }

    #[test]
    fn file_arguments_are_name_equals_path() {
        assert_eq!(
            parse("linux=/tmp/vmlinuz").unwrap(),
            ExtraFile { name: "linux".into(), path: "/tmp/vmlinuz".into() }
        );
        // Only the first '=' splits: paths may hold more.
        assert_eq!(parse("k=a=b").unwrap().path, PathBuf::from("a=b"));
        for bad in ["linux", "=x", "k=", "a/b=x", "a b=x", "hypervisor.cfg=x", "é=x"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let long = format!("{}=x", "n".repeat(MAX_FILE_NAME + 1));
        assert!(format!("{:#}", parse(&long).unwrap_err()).contains("at most 100"));
        assert!(parse(&format!("{}=x", "n".repeat(MAX_FILE_NAME))).is_ok());
    }

    #[test]
    fn files_must_be_readable_and_named_once() {
        let dir = std::env::temp_dir().join(format!("boot-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("kernel");
        std::fs::write(&f, b"bytes").unwrap();
        let file = |name: &str, path: &Path| ExtraFile { name: name.into(), path: path.into() };
        let two = [file("k", &f), file("k2", &f)];
        assert_eq!(read_files(&two).unwrap(), vec![("k", b"bytes".to_vec()), ("k2", b"bytes".to_vec())]);
        let dup = read_files(&[file("k", &f), file("k", &f)]).unwrap_err();
        assert!(format!("{dup:#}").contains("given twice"), "{dup:#}");
        let guest = read_files(&[file("selftest", &f)]).unwrap_err();
        assert!(format!("{guest:#}").contains("test guest"), "{guest:#}");
        let missing = read_files(&[file("k", &dir.join("nope"))]).unwrap_err();
        assert!(format!("{missing:#}").contains("No such file"), "{missing:#}");
        let not_file = check_files(&[file("k", &dir)]).unwrap_err();
        assert!(format!("{not_file:#}").contains("is not a file"), "{not_file:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_default_run_is_linux_at_a_terminal_and_selftest_otherwise() {
        let linux = [
            ExtraFile { name: "linux".into(), path: "k".into() },
            ExtraFile { name: "linux-initrd".into(), path: "i".into() },
        ];
        assert_eq!(default_autorun(&linux, true)[1], "vm console 1");
        assert!(default_autorun(&linux, true)[0] == "vm run linux");
        assert_eq!(default_autorun(&linux, false), ["vm run selftest"], "a script or pipe keeps the selftest");
        assert_eq!(default_autorun(&linux[..1], true), ["vm run selftest"], "no initramfs, no Linux");
    }

    #[test]
    fn default_files_have_good_names() {
        let files = default_files();
        for f in &files {
            check_file_name(&f.name).unwrap();
        }
    }
}
