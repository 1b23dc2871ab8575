//! The emulators the image runs in, and how each is started.
//!
//! Facts these command lines rely on (checked on this project's machines, see
//! `BRIEF.md`): Bochs 2.7 offers VT-x with EPT on `model=tigerlake` and needs
//! `ignore_bad_msrs=1` for OVMF; QEMU TCG offers AMD-V with nested paging but
//! no VT-x; QEMU with KVM runs the image natively when nested virtualisation
//! works on the host.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// The most CPUs a machine may be given (`--cpus`).
pub const MAX_CPUS: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulator {
    /// Bochs with VT-x + EPT (Intel `tigerlake` model).
    Bochs,
    /// Bochs with AMD-V (`ryzen` model): nested paging with next-RIP saving
    /// and flush-by-ASID, which QEMU's AMD-V lacks.
    BochsAmd,
    /// QEMU, software emulation (TCG): AMD-V with NPT, no VT-x.
    QemuTcg,
    /// QEMU TCG with `-icount shift=0`: the guest-visible TSC follows the
    /// emulated instruction count, so cycle figures repeat (benchmarks).
    QemuIcount,
    /// QEMU TCG (AMD-V) with two NUMA nodes: CPU 0 and the first half of
    /// memory on node 0, CPU 1 and the second half on node 1 (the firmware
    /// publishes them in an ACPI SRAT).
    QemuNuma,
    /// QEMU TCG with SVM switched off (`-cpu max,-svm`): a machine without
    /// hardware virtualization.
    QemuNoVirt,
    /// QEMU with KVM and `-cpu host`: needs working nested virtualisation.
    QemuKvm,
}

impl Emulator {
    pub fn parse(s: &str) -> Result<Option<Emulator>> {
        Ok(match s {
            "bochs" => Some(Emulator::Bochs),
            "bochs-amd" => Some(Emulator::BochsAmd),
            "qemu" | "qemu-tcg" => Some(Emulator::QemuTcg),
            "qemu-icount" => Some(Emulator::QemuIcount),
            "qemu-numa" => Some(Emulator::QemuNuma),
            "qemu-novirt" => Some(Emulator::QemuNoVirt),
            "qemu-kvm" | "kvm" => Some(Emulator::QemuKvm),
            "auto" => None,
            other => bail!(
                "unknown emulator {other:?}: use bochs, bochs-amd, qemu, qemu-icount, qemu-numa, qemu-novirt, qemu-kvm or auto"
            ),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Emulator::Bochs => "bochs",
            Emulator::BochsAmd => "bochs-amd",
            Emulator::QemuTcg => "qemu-tcg",
            Emulator::QemuIcount => "qemu-icount",
            Emulator::QemuNuma => "qemu-numa",
            Emulator::QemuNoVirt => "qemu-novirt",
            Emulator::QemuKvm => "qemu-kvm",
        }
    }

    /// The virtualization backend the hypervisor uses there.
    pub fn backend(self) -> &'static str {
        match self {
            Emulator::Bochs => "vmx",
            Emulator::QemuTcg | Emulator::QemuIcount | Emulator::QemuNuma | Emulator::BochsAmd => "svm",
            Emulator::QemuKvm => "the host CPU's",
            Emulator::QemuNoVirt => "none",
        }
    }

    /// CPUs a machine gets unless asked otherwise: two in QEMU (its idle
    /// second CPU costs nothing); one in Bochs, which emulates every CPU in
    /// one thread, a halted one included (two made a Bochs test 28% slower),
    /// so only the tests of SMP itself ask it for two.
    pub fn default_cpus(self) -> u32 {
        if self.is_qemu() { 2 } else { 1 }
    }

    /// Whether this is one of the QEMU variants.
    pub fn is_qemu(self) -> bool {
        !matches!(self, Emulator::Bochs | Emulator::BochsAmd)
    }

    /// The best emulator here: QEMU with KVM when nested virtualisation works,
    /// otherwise QEMU TCG (AMD-V, about three times faster than Bochs),
    /// otherwise Bochs (VT-x).
    pub fn auto() -> Emulator {
        if kvm_works() {
            Emulator::QemuKvm
        } else if has_program("qemu-system-x86_64") {
            Emulator::QemuTcg
        } else {
            Emulator::Bochs
        }
    }
}

fn has_program(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// Whether QEMU can start a KVM vCPU with `-cpu host` here. `/dev/kvm` may
/// exist and still fail (on this project's machines QEMU aborts with "failed
/// to set MSR 0x10a"), so the probe starts QEMU for real.
pub fn kvm_works() -> bool {
    if std::fs::File::open("/dev/kvm").is_err() {
        return false;
    }
    let child = Command::new("qemu-system-x86_64")
        .args(["-accel", "kvm", "-cpu", "host", "-machine", "q35", "-display", "none"])
        .args(["-nodefaults", "-S", "-monitor", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    std::thread::sleep(Duration::from_millis(1500));
    if let Ok(Some(_)) = child.try_wait() {
        return false; // it died on its own: KVM refused
    }
    if let Some(stdin) = child.stdin.as_mut() {
        use std::io::Write;
        let _ = stdin.write_all(b"quit\n");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return st.success();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    false
}

/// QEMU's TCG with one host thread for all the emulated CPUs: the host's
/// VMs run on every CPU, and with a thread per CPU (MTTCG) one emulated
/// host takes two host cores whenever two VMs run, starving the emulator
/// beside it (tests run two at a time on 2-core machines: a Bochs Linux
/// boot next to a QEMU one went from under to over its 600 s limit).
const TCG: &str = "tcg,thread=single";

/// Guest RAM of the emulated machine (MiB).
pub const MACHINE_MEM_MIB: u32 = 512;

/// The scratch disk every machine gets beside its boot disk (the hypervisor
/// uses it for host swap): 128 cylinders of 16 heads x 63 sectors, so that
/// Bochs accepts its geometry, which is exactly 63 MiB (129024 blocks).
pub const SCRATCH_CYLINDERS: u64 = 128;
pub const SCRATCH_BYTES: u64 = SCRATCH_CYLINDERS * crate::image::CYLINDER_BYTES;

/// Creates `run_dir/scratch.img`: sparse and zero-filled, fresh for each run
/// (so nothing carries over between runs, and parallel runs do not share it).
pub fn create_scratch_disk(run_dir: &Path) -> Result<PathBuf> {
    let path = run_dir.join("scratch.img");
    let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(SCRATCH_BYTES)?;
    Ok(path)
}

/// Starts `emu` on `disk` with COM1 connected to 127.0.0.1:`serial_port`
/// (the caller listens there), and a scratch disk: Bochs's ata0-slave
/// (its i440fx has no AHCI and QEMU's q35 no legacy IDE, so each gets the
/// disk its hypervisor driver knows), QEMU's virtio-blk-pci. The scratch
/// disk is `scratch` if given (an existing raw image, used in place: the
/// machine's writes reach the file; Bochs needs a whole number of 16 x 63
/// cylinders), else a fresh one in `run_dir`. Logs go to `run_dir`.
pub fn spawn(emu: Emulator, disk: &Path, scratch: Option<&Path>, serial_port: u16, run_dir: &Path) -> Result<Child> {
    spawn_with_nic(emu, disk, scratch, serial_port, run_dir, None, None)
}

/// [`spawn`], with an `e1000` on one end of a host link (QEMU only; see
/// `link`), and `cpus` CPUs instead of the emulator's default
/// ([`Emulator::default_cpus`]).
pub fn spawn_with_nic(
    emu: Emulator,
    disk: &Path,
    scratch: Option<&Path>,
    serial_port: u16,
    run_dir: &Path,
    nic: Option<&crate::link::NicEnd>,
    cpus: Option<u32>,
) -> Result<Child> {
    let cpus = cpus.unwrap_or(emu.default_cpus());
    if !(1..=MAX_CPUS).contains(&cpus) {
        bail!("{cpus} CPUs: the machines here have 1 to {MAX_CPUS}");
    }
    if nic.is_some() && !emu.is_qemu() && !crate::link::in_private_netns() {
        // Its socket ethmod binds 0.0.0.0 (see `link`).
        bail!("a Bochs host on a link runs only inside a private network namespace");
    }
    std::fs::create_dir_all(run_dir)?;
    let scratch = match scratch {
        Some(p) => {
            let meta = std::fs::metadata(p).with_context(|| format!("the scratch disk {}", p.display()))?;
            if !meta.is_file() || meta.len() == 0 || !meta.len().is_multiple_of(512) {
                bail!("the scratch disk {} must be a file of whole 512-byte blocks", p.display());
            }
            std::path::absolute(p)?
        }
        None => create_scratch_disk(run_dir)?,
    };
    let log = |name: &str| -> Result<std::fs::File> { Ok(std::fs::File::create(run_dir.join(name))?) };
    let child = match emu {
        Emulator::Bochs | Emulator::BochsAmd => {
            let rc = run_dir.join("bochsrc");
            let model = if emu == Emulator::BochsAmd { "ryzen" } else { "tigerlake" };
            let mut text = bochsrc(disk, &scratch, serial_port, run_dir, model, cpus)?;
            if let Some(nic) = nic {
                // The e1000 in the first free PCI slot of the i440fx.
                text =
                    text.replace("pci: enabled=1, chipset=i440fx\n", "pci: enabled=1, chipset=i440fx, slot1=e1000\n");
                text.push_str(&nic.bochs_line()?);
            }
            std::fs::write(&rc, text)?;
            // The debugger starts stopped; "c" runs. BOCHS_DEBUGGER_CMDS may
            // name a file of debugger commands to use instead (breakpoints,
            // `trace on`, stepping: how the exit path is measured).
            let cmds = run_dir.join("bochs.cmds");
            match std::env::var_os("BOCHS_DEBUGGER_CMDS") {
                Some(f) => {
                    std::fs::copy(f, &cmds)?;
                }
                None => std::fs::write(&cmds, "c\n")?,
            }
            Command::new("bochs")
                .arg("-q")
                .arg("-unlock")
                .arg("-f")
                .arg(&rc)
                .arg("-rc")
                .arg(&cmds)
                .current_dir(run_dir)
                .stdin(Stdio::null())
                .stdout(log("emulator.stdout")?)
                .stderr(log("emulator.stderr")?)
                .spawn()
                .context("starting bochs (apt-get install bochs bochsbios vgabios)")?
        }
        Emulator::QemuTcg | Emulator::QemuIcount | Emulator::QemuNuma | Emulator::QemuNoVirt | Emulator::QemuKvm => {
            let mut cmd = Command::new("qemu-system-x86_64");
            cmd.args(["-machine", "q35", "-m", &MACHINE_MEM_MIB.to_string(), "-smp", &cpus.to_string()]);
            match emu {
                Emulator::QemuKvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
                Emulator::QemuIcount => cmd.args(["-accel", "tcg", "-cpu", "max", "-icount", "shift=0"]),
                Emulator::QemuNoVirt => cmd.args(["-accel", TCG, "-cpu", "max,-svm"]),
                Emulator::QemuNuma => {
                    let half = format!("{}M", MACHINE_MEM_MIB / 2);
                    cmd.args(["-accel", TCG, "-cpu", "max"]);
                    for n in 0..2 {
                        cmd.args(["-object", &format!("memory-backend-ram,id=m{n},size={half}")]);
                        cmd.args(["-numa", &format!("node,nodeid={n},cpus={n},memdev=m{n}")]);
                    }
                    &mut cmd
                }
                _ => cmd.args(["-accel", TCG, "-cpu", "max"]),
            };
            cmd.args(["-bios", OVMF])
                .arg("-drive")
                // snapshot=on: writes go to a throwaway overlay, so several
                // machines can boot one image at once (QEMU locks it otherwise).
                .arg(format!("format=raw,file={},snapshot=on", disk.display()))
                // No snapshot on the scratch disk: what the machine writes
                // reaches the file, which tests then inspect.
                .arg("-drive")
                .arg(format!("if=none,id=scratch,format=raw,file={}", scratch.display()))
                .args(["-device", "virtio-blk-pci,drive=scratch"])
                .arg("-serial")
                .arg(format!("tcp:127.0.0.1:{serial_port}"))
                // The monitor on a socket in the run directory (relative:
                // QEMU runs there, and a unix socket path has 108 bytes at
                // most): tests inject machine checks through it (`mce`).
                .args(["-display", "none", "-no-reboot", "-monitor", "unix:monitor.sock,server=on,wait=off"])
                .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
                .args(nic.map(|n| n.qemu_args()).unwrap_or_default())
                .args(["-d", "guest_errors,cpu_reset", "-D"])
                .arg(run_dir.join("qemu.log"))
                .current_dir(run_dir)
                .stdin(Stdio::null())
                .stdout(log("emulator.stdout")?)
                .stderr(log("emulator.stderr")?);
            cmd.spawn().context("starting qemu (apt-get install qemu-system-x86 ovmf)")?
        }
    };
    Ok(child)
}

fn bochsrc(disk: &Path, scratch: &Path, serial_port: u16, run_dir: &Path, model: &str, cpus: u32) -> Result<String> {
    let len = std::fs::metadata(disk)?.len();
    let cylinders = len / crate::image::CYLINDER_BYTES;
    let scratch_len = std::fs::metadata(scratch)?.len();
    if !scratch_len.is_multiple_of(crate::image::CYLINDER_BYTES) {
        bail!("{} is not a whole number of cylinders", scratch.display());
    }
    let scratch_cylinders = scratch_len / crate::image::CYLINDER_BYTES;
    Ok(format!(
        "# written by boot/ for one run
megs: {MACHINE_MEM_MIB}
cpu: model={model}, count={cpus}, ips=100000000, ignore_bad_msrs=1
clock: sync=none, time0=1
romimage: file={OVMF}, address=0xffe00000
vgaromimage: file=/usr/share/vgabios/vgabios.bin
pci: enabled=1, chipset=i440fx
ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14
ata0-master: type=disk, path=\"{disk}\", mode=flat, cylinders={cylinders}, heads=16, spt=63
ata0-slave: type=disk, path=\"{scratch}\", mode=flat, cylinders={scratch_cylinders}, heads=16, spt=63, model=\"HV scratch disk\"
boot: disk
com1: enabled=1, mode=socket-client, dev=127.0.0.1:{serial_port}
display_library: rfb, options=\"timeout=0\"
speaker: enabled=0
sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy
port_e9_hack: enabled=1
log: {log}
panic: action=fatal
error: action=report
info: action=ignore
debug: action=ignore
",
        disk = disk.display(),
        scratch = scratch.display(),
        log = run_dir.join("bochs.log").display(),
    ))
}

/// A fresh directory for one run's logs: `target/runs/<name>-<emulator>-<n>`.
pub fn new_run_dir(name: &str, emu: Emulator) -> Result<PathBuf> {
    let base = crate::target_dir().join("runs");
    std::fs::create_dir_all(&base)?;
    for n in 0.. {
        let dir = base.join(format!("{name}-{}-{n}", emu.name()));
        if std::fs::create_dir(&dir).is_ok() {
            return Ok(dir);
        }
    }
    unreachable!()
}
