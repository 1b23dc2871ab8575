//! Building the boot image: the kernel and the guests (cross-compiled for
//! `x86_64-unknown-none`), a ramdisk (a tar archive of the guests plus the
//! boot configuration `hypervisor.cfg`), and the UEFI disk image that the
//! `bootloader` crate assembles from them.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const KERNEL_TARGET: &str = "x86_64-unknown-none";

/// Guest binaries of the `guests` package that go into the ramdisk.
pub const GUESTS: &[&str] = &["selftest", "selftest-mb", "escape", "crash", "exitbench", "memtest", "cr2"];

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
    write_ramdisk(bin_dir, &config_text(opts), &ramdisk)?;
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

fn write_ramdisk(bin_dir: &Path, config: &str, path: &Path) -> Result<()> {
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
    add("hypervisor.cfg", config.as_bytes())?;
    for g in GUESTS {
        let p = bin_dir.join(g);
        let data = std::fs::read(&p).with_context(|| format!("reading guest {}", p.display()))?;
        add(g, &data)?;
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
