//! `cargo run -p boot -- <build|run>`: build the UEFI image, run it.

use anyhow::Result;
use boot::emulator::Emulator;
use boot::image::{self, ExtraFile, ImageOptions};
use boot::initramfs;
use boot::session::{Session, SessionOptions};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "Build and run the hypervisor's UEFI disk image")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the kernel, the guests and the disk image; print the image path.
    Build {
        /// Put a host file into the image's ramdisk as NAME (repeatable):
        /// `vm run NAME` starts it, `mod=NAME` passes it as a module.
        #[arg(long = "file", value_name = "NAME=PATH")]
        files: Vec<ExtraFile>,
    },
    /// Build the image and boot it in an emulator with the console attached.
    Run {
        /// bochs (VT-x), qemu (TCG, AMD-V), qemu-icount (TCG with a TSC that
        /// counts instructions), qemu-novirt (no SVM), qemu-kvm, or auto.
        #[arg(long, default_value = "auto")]
        emulator: String,
        /// Feed the console this script instead of the terminal (see
        /// boot/src/script.rs for the syntax).
        #[arg(long)]
        script: Option<PathBuf>,
        /// Fail if the machine has not powered off after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Console command to run at boot (repeatable). Without --script
        /// and without this, the default guest is started: `vm run selftest`.
        #[arg(long)]
        autorun: Vec<String>,
        /// Kernel log level: error, warn, info, debug, trace.
        #[arg(long)]
        log_level: Option<String>,
        /// Keep the emulator's logs even when the run succeeds.
        #[arg(long)]
        keep_logs: bool,
        /// Use this existing raw image as the scratch disk (in place: the
        /// machine's writes reach it) instead of a fresh blank one. The
        /// hypervisor takes only a blank disk or its own swap disk, and
        /// refuses anything else without writing to it. Bochs needs a
        /// whole number of cylinders (16 heads x 63 sectors x 512 bytes).
        #[arg(long)]
        scratch_disk: Option<PathBuf>,
        /// Put a host file into the image's ramdisk as NAME (repeatable):
        /// `vm run NAME` starts it, `mod=NAME` passes it as a module.
        #[arg(long = "file", value_name = "NAME=PATH")]
        files: Vec<ExtraFile>,
        /// Give the machine an e1000 on side a or b of a link whose sockets
        /// live in DIR (QEMU only): start one machine with DIR:a, another
        /// with DIR:b, and they share an Ethernet segment on this machine.
        #[arg(long, value_name = "DIR:a|b")]
        link: Option<String>,
        /// CPUs (1-8; default 2 in QEMU, 1 in Bochs, which emulates every
        /// CPU in one thread).
        #[arg(long)]
        cpus: Option<u32>,
    },
    /// Build the Linux guest's initramfs from unpacked Debian packages
    /// (scripts/guest-linux runs this); the file is rewritten only if its
    /// contents change.
    Initramfs {
        /// The unpacked kernel package (holding lib/modules/<version>/).
        #[arg(long)]
        kernel_root: PathBuf,
        /// The busybox binary (from busybox-static).
        #[arg(long)]
        busybox: PathBuf,
        /// Where to write the gzip'd cpio archive.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("boot: {e:#}");
        std::process::exit(2);
    }
}

fn real_main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Initramfs { kernel_root, busybox, out } => {
            let (bytes, summary) = initramfs::build(&initramfs::Inputs { kernel_root, busybox })?;
            for m in &summary.missing {
                eprintln!("[initramfs] {} has no module {m}; the guest goes without it", summary.version);
            }
            let wrote = initramfs::write_if_changed(&out, &bytes)?;
            eprintln!(
                "[initramfs] {} ({} KiB, {} modules for {}){}",
                out.display(),
                bytes.len() / 1024,
                summary.modules.len(),
                summary.version,
                if wrote { "" } else { ", unchanged" }
            );
            Ok(())
        }
        Cmd::Build { files } => {
            let files = [image::default_files(), files].concat();
            let img = image::build(&ImageOptions { debug_exit: true, files, ..Default::default() })?;
            println!("{}", img.disk.display());
            Ok(())
        }
        Cmd::Run { emulator, script, timeout, mut autorun, log_level, keep_logs, scratch_disk, files, link, cpus } => {
            let steps = match &script {
                Some(p) => Some(boot::script::parse(&std::fs::read_to_string(p)?)?),
                None => None,
            };
            let files = [image::default_files(), files].concat();
            if autorun.is_empty() && steps.is_none() {
                autorun = image::default_autorun(&files, std::io::IsTerminal::is_terminal(&std::io::stdin()));
            }
            let emu = match Emulator::parse(&emulator)? {
                Some(e) => e,
                None => Emulator::auto(),
            };
            eprintln!("[boot] building the image");
            let img = image::build(&ImageOptions {
                autorun,
                debug_exit: true,
                log_level,
                name: "run".into(),
                files,
                ..Default::default()
            })?;
            eprintln!("[boot] starting {} on {}", emu.name(), img.disk.display());
            let nic = match link.as_deref().map(|l| l.rsplit_once(':')) {
                None => None,
                Some(Some((dir, side))) => Some(boot::link::end_of(std::path::Path::new(dir), side)?),
                Some(None) => anyhow::bail!("--link takes DIR:a or DIR:b"),
            };
            let options = SessionOptions { scratch_disk, nic, cpus };
            let mut session = Session::start_with(emu, &img.disk, "run", true, &options)?;
            let driven = match &steps {
                Some(steps) => session.run_steps(steps),
                None => session.interactive(),
            };
            let outcome = session.finish(timeout.map(Duration::from_secs));
            if let Err(e) = driven {
                eprintln!("\n[boot] script failed: {e:#}");
                eprintln!("{}", outcome.failure_report());
                std::process::exit(1);
            }
            if outcome.success() {
                eprintln!(
                    "\n[boot] {} run ended cleanly in {:.1}s (emulator exit code {:?})",
                    emu.name(),
                    outcome.elapsed.as_secs_f64(),
                    outcome.exit_code
                );
                if keep_logs {
                    eprintln!("[boot] logs kept in {}", outcome.run_dir.display());
                } else {
                    outcome.tidy();
                }
                Ok(())
            } else {
                eprintln!("\n[boot] {}", outcome.failure_report());
                std::process::exit(1);
            }
        }
    }
}
