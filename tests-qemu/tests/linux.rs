//! Debian's kernel and the busybox initramfs (`scripts/guest-linux`), booted
//! under the hypervisor through the Linux boot protocol: the kernel finds
//! the memory map, command line, initramfs and ACPI tables it was given,
//! reads the guest's clock from the CMOS RTC, uses the PM timer, runs
//! `/init` to its marker and gives the console a shell; commands typed with
//! `vm send` run and their output comes back, and so do keys typed with the
//! terminal attached (`vm console`, Ctrl-] to detach); `vm pause` stops a
//! counting loop and `vm resume` continues it with nothing lost; `reboot`
//! starts the VM again to a new shell; `poweroff` in the guest ends
//! the VM through ACPI S5. The guest finds the local APIC and I/O APIC in
//! the MADT and runs on them (IRQ 0 through the I/O APIC, ticks from the
//! TSC-deadline timer), with no complaint about them in its log; `sleep 5`
//! takes five seconds of host time; a second Linux guest (`vm create`, then
//! `vm start`), of two vCPUs (`nproc` 2), and a selftest run beside it. Under QEMU also: after the
//! emulator restarts, a new VM with two vCPUs reads its disk image back
//! (`nproc` 2, two busy loops use both CPUs), and a host-wide
//! memory target balloons Linux and swaps a guest without a balloon. On both
//! backends: Bochs with VT-x (about 35 s to the shell) and QEMU TCG with
//! AMD-V (about 3 s). Skipped (with a message) when the guest has not been
//! prepared.

use boot::emulator::Emulator;
use std::time::{Duration, Instant};
use tests_qemu::{Machine, label, on_both_backends};

on_both_backends!(debian_kernel_boots_under_the_hypervisor_to_a_shell);

/// The numbers of the guest's `tick-N` lines, in order.
fn all_ticks(t: &str) -> Vec<u64> {
    t.lines().filter_map(|l| l.rsplit_once("tick-").and_then(|(_, n)| n.trim().parse().ok())).collect()
}

fn last_tick(t: &str) -> u64 {
    all_ticks(t).last().copied().unwrap_or(0)
}

fn debian_kernel_boots_under_the_hypervisor_to_a_shell(emu: Emulator) {
    let Some(files) = tests_qemu::linux_guest_files() else { return };
    // A 256 MiB data disk: half is swap, the rest holds a Linux VM's
    // checkpoint (about 34 MiB).
    let disks = boot::target_dir().join("test-disks");
    std::fs::create_dir_all(&disks).unwrap();
    let scratch = disks.join(format!("{}-{}.img", label(emu, "linux"), std::process::id()));
    std::fs::File::create(&scratch).unwrap().set_len(520 * boot::image::CYLINDER_BYTES).unwrap();
    let mut m = Machine::boot_with_files_and_scratch(emu, &label(emu, "linux"), &files, &scratch);
    let start = Instant::now();
    // A disk image for it on the data disk, served by virtio-blk.
    let out = m.cmd("disk create d1 16");
    assert!(out.contains("disk d1 created: 16.0 MiB image"), "{out}");
    // Nothing but the name and the disk: memory, initramfs and command
    // line are the defaults for a Linux kernel.
    let out = m.cmd("vm run linux disk=d1 net=sw0");
    assert!(out.contains("vm 1 started: linux (linux, 256 MiB"), "{out}");
    // The kernel's own messages may land inside the marker's line (both
    // write the one serial port), so wait for the kernel starting init,
    // then for the start of the marker.
    m.wait_for("Run /init as init process", Duration::from_secs(400));
    m.wait_for(&boot::initramfs::MARKER[..16], Duration::from_secs(60));
    let secs = start.elapsed().as_secs_f64();
    // The shell: a prompt, commands typed into COM1 run, output comes back.
    m.wait_for_or_report("linux-guest:/# ", Duration::from_secs(120), "vm stats 1");
    let out = m.cmd("vm send 1 -- uname -r");
    assert!(out.contains("bytes sent to vm 1"), "{out}");
    m.wait_for("6.1.0-", Duration::from_secs(120));
    m.cmd("vm send 1 -- echo sum=$((6*7)) && grep -c ^processor /proc/cpuinfo");
    m.wait_for("sum=42", Duration::from_secs(120));
    m.cmd("vm send 1 -- grep -o -m1 hypervisor /proc/cpuinfo");
    m.wait_for("[vm 1] hypervisor", Duration::from_secs(120));
    // The local APIC's TSC-deadline timer drives the guest's ticks: its
    // count grows while the guest sleeps.
    m.cmd("vm send 1 -- grep LOC: /proc/interrupts; sleep 1; grep LOC: /proc/interrupts; echo loc-$((40+2))");
    m.wait_for("loc-42", Duration::from_secs(120));
    let locs: Vec<u64> = m
        .transcript()
        .lines()
        .filter_map(|l| l.split_once("LOC:").and_then(|(_, r)| r.split_whitespace().next()?.parse().ok()))
        .collect();
    assert!(locs.len() >= 2 && locs[locs.len() - 1] > locs[locs.len() - 2], "local timer interrupts: {locs:?}");
    // virtio-rng over virtio-mmio, found through the DSDT: the kernel's
    // hwrng uses it, and reading it returns bytes from the host's RDRAND.
    m.cmd("vm send 1 -- cat /sys/class/misc/hw_random/rng_current; head -c 16 /dev/hwrng | od -An -tx1 | tr -d ' '; echo rng-$((1+1))");
    m.wait_for("rng-2", Duration::from_secs(120));
    let t = m.transcript();
    assert!(t.contains("[vm 1] virtio_rng.0"), "the virtio-rng device is not the guest's hwrng:\n{t}");
    assert!(
        t.lines().any(|l| guest_text(l, "[vm 1] ")
            .is_some_and(|r| r.trim().len() == 32 && r.trim().chars().all(|c| c.is_ascii_hexdigit()))),
        "no 16 bytes from /dev/hwrng:\n{t}"
    );
    // virtio-blk: the image is /dev/vda, write-through, 16 MiB; a known
    // pattern written with dd (fsync'd) reads back after the page cache
    // is dropped, and again after a reset and after the emulator restarts.
    let out = m.cmd("disk delete d1");
    assert!(out.contains("error:") && out.contains("vm 1"), "a disk in use was deleted: {out}");
    m.cmd("vm send 1 -- cat /sys/block/vda/size /sys/block/vda/queue/write_cache; echo vda-$((1+1))");
    m.wait_for("[vm 1] vda-2", Duration::from_secs(120));
    let t = m.transcript();
    assert!(t.contains("[vm 1] 32768\n") && t.contains("[vm 1] write through"), "{t}");
    m.cmd(&format!("vm send 1 -- {WRITE_PATTERN}; echo wrote-$((2+3))"));
    m.wait_for("[vm 1] wrote-5", Duration::from_secs(240));
    let sum = pattern_sum(&m.transcript(), "[vm 1] ", "  /tmp/p");
    m.cmd(&format!("vm send 1 -- echo 3 > /proc/sys/vm/drop_caches; {READ_PATTERN}; echo read-$((3+3))"));
    m.wait_for("[vm 1] read-6", Duration::from_secs(240));
    assert_eq!(pattern_sum(&m.transcript(), "[vm 1] ", "  -"), sum, "/dev/vda did not give back what was written");
    // The terminal attached to the guest's console: keys go to its shell,
    // its output comes back byte for byte; Ctrl-] detaches.
    m.send_raw(b"vm console 1\r");
    m.wait_for("attached to vm 1's console; Ctrl-] detaches", Duration::from_secs(60));
    m.send_raw(b"echo attached-$((2+3))\r");
    m.wait_for("attached-5", Duration::from_secs(120));
    m.send_raw(&[0x1d]);
    m.wait_for("[detached from vm 1]", Duration::from_secs(60));
    // The virtio console: hvc0 has a shell of its own; a terminal attached
    // with `vm console 1 virtio` types into it and reads what it prints.
    m.send_raw(b"vm console 1 virtio\r");
    m.wait_for("attached to vm 1's virtio console (hvc0); Ctrl-] detaches", Duration::from_secs(60));
    m.send_raw(b"echo on-hvc-$((3+4)); tty\r");
    m.wait_for("on-hvc-7", Duration::from_secs(120));
    m.wait_for("/dev/hvc0", Duration::from_secs(60));
    m.send_raw(&[0x1d]);
    m.wait_for("[detached from vm 1]", Duration::from_secs(60));
    // The balloon: `vm balloon 1 32` takes 32 MiB from the guest (its free
    // memory drops by that much, the host's pages without frames grow),
    // `vm balloon 1 0` gives them back. Free page reporting has meanwhile
    // returned idle memory by itself.
    let mem_free = |m: &mut Machine, tag: &str| -> i64 {
        m.cmd(&format!("vm send 1 -- grep MemFree /proc/meminfo; echo {tag}-$((5+5))"));
        m.wait_for(&format!("[vm 1] {tag}-10"), Duration::from_secs(120));
        let t = m.transcript();
        let line = t.lines().rfind(|l| l.starts_with("[vm 1] MemFree:")).expect("MemFree");
        line.split_whitespace().nth(3).and_then(|v| v.parse().ok()).expect("MemFree kB")
    };
    let balloon_holds = |m: &mut Machine, pages: u64| {
        let start = Instant::now();
        loop {
            let j = m.json("vm stats 1 --json");
            if j["balloon"]["actual_pages"] == pages {
                return j;
            }
            assert!(start.elapsed() < Duration::from_secs(180), "the balloon never reached {pages} pages: {j}");
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let free_before = mem_free(&mut m, "mf");
    let out = m.cmd("vm balloon 1 32");
    assert!(out.contains("vm 1 balloon target 32 MiB"), "{out}");
    let j = balloon_holds(&mut m, 8192);
    assert!(j["pages"]["ballooned"].as_u64().unwrap() >= 8192, "{j}");
    assert!(j["balloon"]["inflated"].as_u64().unwrap() >= 8192, "{j}");
    let free_inflated = mem_free(&mut m, "mg");
    assert!(free_before - free_inflated > 24_000, "MemFree {free_before} -> {free_inflated} kB");
    m.cmd("vm balloon 1 0");
    let j = balloon_holds(&mut m, 0);
    assert_eq!(j["balloon"]["deflated"], j["balloon"]["inflated"], "{j}");
    assert!(j["balloon"]["reported"].as_u64().unwrap() > 0, "no free page reporting: {j}");
    // Free page reporting takes free 2 MiB blocks off the guest's free
    // lists while the host drops their frames, so MemFree read at that
    // moment is low by up to 64 MiB: look again, for up to half a minute.
    let mut free_deflated = mem_free(&mut m, "mh");
    for tag in ["mi", "mj", "mk", "ml", "mm"] {
        if free_deflated - free_inflated > 24_000 {
            break;
        }
        std::thread::sleep(Duration::from_secs(5));
        free_deflated = mem_free(&mut m, tag);
    }
    assert!(free_deflated - free_inflated > 24_000, "MemFree {free_inflated} -> {free_deflated} kB after deflating");
    eprintln!(
        "{}: balloon: MemFree {free_before} -> {free_inflated} -> {free_deflated} kB; {} pages reported free",
        emu.name(),
        j["balloon"]["reported"]
    );
    // Pause and resume: a counting loop stops while the VM is paused and
    // goes on from where it stood, nothing lost.
    m.cmd("vm send 1 -- (i=0; while [ $i -lt 100000 ]; do i=$((i+1)); echo tick-$i; sleep 1; done) &");
    m.wait_for("tick-3\n", Duration::from_secs(120));
    let out = m.cmd("vm pause 1");
    assert!(out.contains("vm 1 paused"), "{out}");
    let paused_at = last_tick(&m.transcript());
    assert_eq!(m.json("vm list --json")["vms"][0]["state"], "paused");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(last_tick(&m.transcript()), paused_at, "the loop went on while the VM was paused");
    m.cmd("vm resume 1");
    m.wait_for(&format!("tick-{}\n", paused_at + 2), Duration::from_secs(120));
    let ticks = all_ticks(&m.transcript());
    assert_eq!(ticks, (1..=ticks.len() as u64).collect::<Vec<_>>(), "a tick was lost or repeated");
    // The guest's time runs at the host's rate: `sleep 5` takes five
    // seconds of the hypervisor's clock (the emulator's notion of time:
    // Bochs's is virtual), plus the console's round trips.
    let uptime = |m: &mut Machine| m.json("host --json")["uptime_us"].as_u64().unwrap();
    let before = uptime(&mut m);
    m.cmd("vm send 1 -- sleep 5; echo slept-$((1+1))");
    m.wait_for("slept-2", Duration::from_secs(120));
    let slept = (uptime(&mut m) - before) as f64 / 1e6;
    eprintln!("{}: `sleep 5` in the guest took {slept:.2} s of host time", emu.name());
    assert!((5.0..8.0).contains(&slept), "`sleep 5` took {slept:.2} s of host time");
    // Two Linux guests and a selftest at once, time-sliced, each with its
    // own memory and console. The second is built by `vm create` (in 128
    // MiB: the emulated host has 512) and waits for `vm start`; it has two
    // vCPUs, which it brings up and counts (`nproc`), on both backends.
    let out =
        m.cmd("vm create web kernel=linux initrd=linux-initrd mem=128 vcpus=2 net=sw0 cmdline=\"console=ttyS0 quiet\"");
    assert!(out.contains("vm 2 created: web (linux, linux, 128 MiB"), "{out}");
    assert!(out.contains("vm start 2 runs it"), "{out}");
    assert_eq!(m.json("vm list --json")["vms"][1]["state"], "created");
    std::thread::sleep(Duration::from_secs(2));
    assert!(!m.transcript().contains("[vm 2]"), "a created VM ran before vm start");
    m.cmd("vm start 2");
    m.cmd("vm run selftest");
    m.wait_for("vm 3 (selftest) exited with status 1", Duration::from_secs(400));
    m.wait_for("[vm 2] linux-guest:/# ", Duration::from_secs(400));
    m.cmd("vm send 2 -- echo second-$((20+2)) nproc-$(nproc)");
    m.wait_for("[vm 2] second-22", Duration::from_secs(120));
    let t = m.transcript();
    assert!(t.contains("[vm 2] second-22 nproc-2"), "vm 2 does not count both its vCPUs:\n{t}");
    assert!(t.contains("[vm 3] selftest: PASS"), "{t}");
    assert!(!t.contains("[vm 1] second-22"), "vm 2's output reached vm 1's console:\n{t}");
    // virtio-net: both VMs are on switch sw0 (their eth0, MACs
    // 02:00:00:00:0N:00); addressed by hand, each pings the other.
    m.cmd("vm send 1 -- ip addr add 10.0.0.1/24 dev eth0; ip link set eth0 up; cat /sys/class/net/eth0/address");
    m.wait_for("[vm 1] 02:00:00:00:01:00", Duration::from_secs(120));
    m.cmd("vm send 2 -- ip addr add 10.0.0.2/24 dev eth0; ip link set eth0 up; ping -c 3 -W 5 10.0.0.1");
    m.wait_for("[vm 2] 3 packets transmitted, 3 packets received", Duration::from_secs(120));
    m.cmd("vm send 1 -- ping -c 3 -W 5 10.0.0.2");
    m.wait_for("[vm 1] 3 packets transmitted, 3 packets received", Duration::from_secs(120));
    // A TCP transfer with busybox nc: 128 KiB from vm 2 to vm 1, the same
    // MD5 sum on both ends.
    m.cmd("vm send 1 -- nc -l -p 5000 > /tmp/r; md5sum /tmp/r; echo got-$((6+6))");
    std::thread::sleep(Duration::from_secs(1));
    m.cmd("vm send 2 -- yes switch-pattern | head -c 131072 > /tmp/n; md5sum /tmp/n; nc 10.0.0.1 5000 < /tmp/n");
    m.wait_for("[vm 1] got-12", Duration::from_secs(300));
    let t = m.transcript();
    let sent = pattern_sum(&t, "[vm 2] ", "  /tmp/n");
    let got = pattern_sum(&t, "[vm 1] ", "  /tmp/r");
    assert_eq!(sent, got, "the transfer through the switch changed the data");
    let stats = m.json("vm stats 2 --json");
    assert_eq!(stats["nic"]["switch"], "sw0", "{stats}");
    assert!(stats["nic"]["counters"]["rx_frames"].as_u64().unwrap() >= 6, "{stats}");
    m.cmd("vm send 2 -- poweroff");
    m.wait_for("vm 2 (web) powered off (ACPI S5)", Duration::from_secs(120));
    // `reboot` in the guest resets the machine: the VM starts again from
    // its image, same id, and boots to a shell again.
    let mark = m.transcript().len();
    m.cmd("vm send 1 -- reboot");
    m.wait_for_after("vm 1 (linux) restarted (reset 1)", mark, Duration::from_secs(120));
    m.wait_for_after("Run /init as init process", mark, Duration::from_secs(400));
    m.wait_for_after("linux-guest:/# ", mark, Duration::from_secs(120));
    // The reset kept the disk and what was written to it.
    let mark = m.transcript().len();
    m.cmd(&format!("vm send 1 -- {READ_PATTERN}; echo reread-$((3+4))"));
    m.wait_for_after("[vm 1] reread-7", mark, Duration::from_secs(240));
    assert_eq!(pattern_sum(&m.transcript()[mark..], "[vm 1] ", "  -"), sum, "the data did not survive the reset");
    let t = m.transcript();
    // No complaint about the APIC, the timers or ACPI.
    for bad in [
        "Marking TSC unstable",
        "APIC disabled",
        "Keep in PIC mode",
        "timer doesn't work",
        "PM-Timer had inconsistent results",
        "unchecked MSR access",
        "WARNING:",
        "fail to add MMCONFIG",
        "[Firmware Bug]",
        "[Firmware Info]",
    ] {
        assert!(!t.contains(bad), "the guest's log has {bad:?}:\n{t}");
    }
    for want in [
        "Command line: console=ttyS0 tsc_early_khz=",
        " tsc=reliable",
        // The TSC's rate came from the hypervisor: no calibration against
        // the emulated timers, no fallback to jiffies.
        "Calibrating delay loop (skipped), value calculated using timer frequency",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: PM-Timer IO Port: 0x608",
        // The MADT's local APIC and I/O APIC, in use.
        "IOAPIC[0]: apic_id 1, version 17, address 0xfec00000, GSI 0-23",
        "APIC: Switch to symmetric I/O mode setup",
        "..TIMER: vector=0x30 apic1=0 pin1=2",
        "TSC deadline timer available",
        "clocksource: acpi_pm: mask: 0xffffff",
        "clocksource: Switched to clocksource tsc",
        // PCI configuration space, also memory-mapped (the MCFG).
        "PCI: MMCONFIG at [mem 0xe0000000-0xe00fffff] reserved in E820",
        "ACPI: PM: (supports S0 S5)",
        "PCI: Using configuration type 1 for base access",
        "pci 0000:00:00.0: [8086:1237] type 00 class 0x060000",
        "Freeing initrd memory",
        "setting system clock to 20",
        "BusyBox v1.35.0",
    ] {
        assert!(t.contains(want), "the guest's log lacks {want:?}:\n{t}");
    }
    // A live checkpoint of the running kernel: the VM runs on while its
    // memory and disk are copied (copy-on-write); then it powers off;
    // restored lazily, the same kernel goes on at its shell, its timers
    // and its virtio-rng working.
    let out = m.cmd("vm save 1 lx live");
    assert!(
        out.contains("vm 1: live save to checkpoint lx started")
            && out.contains("disk d1 to image lx~disk, copy-on-write"),
        "{out}"
    );
    // While the save runs the guest overwrites its pattern; the restore
    // brings the disk back to the instant of the save.
    m.cmd("vm send 1 -- dd if=/dev/zero of=/dev/vda bs=4096 seek=100 count=256 conv=fsync 2>/dev/null; echo zeroed-$((1+8))");
    m.wait_for("vm 1 saved to checkpoint lx: ", Duration::from_secs(240));
    m.wait_for("[vm 1] zeroed-9", Duration::from_secs(240));
    let t = m.transcript();
    let saved = t.lines().find(|l| l.contains("vm 1 saved to checkpoint lx: ")).unwrap();
    assert!(saved.contains("; live: ") && saved.contains("; disk: "), "{saved}");
    eprintln!("{}: {saved}", emu.name());
    // `poweroff` in the guest ends that VM, cleanly (ACPI S5), and only it.
    m.cmd("vm send 1 -- poweroff");
    m.wait_for("vm 1 (linux) powered off (ACPI S5)", Duration::from_secs(120));
    // Lazily, with no background fill: the kernel runs on pages brought
    // in as it touches them.
    let out = m.cmd("vm restore lx lazy fill=0");
    assert!(out.contains("vm 4 restored from checkpoint lx: linux (linux, 256 MiB), running; lazy: "), "{out}");
    m.cmd("vm send 4 -- cut -d' ' -f1 /proc/uptime; sleep 2; cut -d' ' -f1 /proc/uptime; echo back-$((40+2))");
    m.wait_for("[vm 4] back-42", Duration::from_secs(120));
    let ups: Vec<f64> =
        m.transcript().lines().filter_map(|l| guest_text(l, "[vm 4] ")?.trim().parse::<f64>().ok()).collect();
    assert!(ups.len() >= 2 && ups[1] - ups[0] >= 1.9, "the restored guest's clock: {ups:?}");
    m.cmd("vm send 4 -- head -c 8 /dev/hwrng | od -An -tx1 | tr -d ' '; echo rng-$((3+4))");
    m.wait_for("[vm 4] rng-7", Duration::from_secs(120));
    let lazy = &m.json("vm stats 4 --json")["lazy"];
    assert!(lazy["faults"].as_u64() > Some(0) && lazy["pages_on_disk"].as_u64() > Some(0), "{lazy}");
    // Its disk is the snapshot's (read past its page cache, which the
    // checkpoint also holds).
    let mark = m.transcript().len();
    m.cmd(&format!("vm send 4 -- echo 3 > /proc/sys/vm/drop_caches; {READ_PATTERN}; echo snap-$((5+5))"));
    m.wait_for_after("[vm 4] snap-10", mark, Duration::from_secs(240));
    assert_eq!(pattern_sum(&m.transcript()[mark..], "[vm 4] ", "  -"), sum, "the restore did not bring the disk back");
    m.cmd("vm send 4 -- poweroff");
    m.wait_for("vm 4 (linux) powered off (ACPI S5)", Duration::from_secs(120));
    let list = m.json("vm list --json");
    assert_eq!(list["vms"][0]["state"], "off", "{list}");
    assert_eq!(list["vms"][1]["state"], "off", "{list}");
    assert_eq!(list["vms"][3]["state"], "off", "{list}");
    println!("linux under the hypervisor ({}): {secs:.1} s from `vm run` to the init marker", emu.name());
    m.poweroff();
    if !emu.is_qemu() {
        // What follows tests the data disk across a host restart and the
        // host's memory planner, which do not depend on the backend: QEMU
        // only, sparing Bochs a second host boot and Linux boot (CI time).
        std::fs::remove_file(&scratch).unwrap();
        return;
    }
    // The emulator starts again on the same disk file: the image is in
    // the extent table, and a new VM on it reads the pattern back.
    let mut m = Machine::boot_with_files_and_scratch(emu, &label(emu, "linux-again"), &files, &scratch);
    let out = m.cmd("disk list");
    assert!(out.lines().any(|l| l.starts_with("d1 ") && l.contains("image")), "{out}");
    let out = m.cmd("vm run linux disk=d1 vcpus=2 -- console=ttyS0 quiet");
    assert!(out.contains("vm 1 started"), "{out}");
    m.wait_for_or_report("linux-guest:/# ", Duration::from_secs(400), "vm stats 1");
    m.cmd(&format!("vm send 1 -- {READ_PATTERN}; echo again-$((4+4))"));
    m.wait_for("[vm 1] again-8", Duration::from_secs(240));
    assert_eq!(pattern_sum(&m.transcript(), "[vm 1] ", "  -"), sum, "the data did not survive the host's restart");
    // With two vCPUs: `nproc` shows both, and two busy loops started at
    // once each take a CPU (both CPUs' user time grows).
    m.cmd(&format!("vm send 1 -- echo nproc-$(nproc); {CPU_TIMES}"));
    m.cmd(&format!("vm send 1 -- {TWO_LOOPS}; {CPU_TIMES}; echo par-$((2+2))"));
    m.wait_for("[vm 1] par-4", Duration::from_secs(300));
    let t = m.transcript();
    assert!(t.contains("[vm 1] nproc-2"), "{t}");
    let times: Vec<(u64, u64)> = t
        .lines()
        .filter_map(|l| {
            let (a, b) = guest_text(l, "[vm 1] user ")?.split_once(' ')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect();
    assert_eq!(times.len(), 2, "{t}");
    assert!(times[1].0 > times[0].0 && times[1].1 > times[0].1, "the loops did not run on both CPUs: {times:?}");
    let s = m.json("vm stats 1 --json");
    let sched = m.json("host --json")["scheduler"].clone();
    let cpus: Vec<&str> = s["vcpus"].as_array().unwrap().iter().map(|v| v["host_cpus"].as_str().unwrap()).collect();
    eprintln!(
        "{}: two busy loops on 2 vCPUs: user ticks {times:?}; vCPUs on host cpus {cpus:?}, {} slices beside a sibling, \
         {} port accesses carried out there, {} com1 line moves carried there, {} of those slices ended by a moved line, \
         {} halted vcpus woken by a sibling's ipi and run at once; {} of {} rounds went on ({} more slices on the boot cpu, \
         {} on the other)",
        emu.name(),
        s["parallel_slices"],
        s["sibling_pio"],
        s["sibling_lines"],
        s["sibling_line_ends"],
        s["standby_wakes"],
        sched["rounds_on"],
        sched["rounds"],
        sched["slices_on_here"],
        sched["slices_on_away"]
    );
    // Its console (the 8250 driver polls LSR between bytes) is driven
    // where each vCPU runs, not at the cost of the other's slice
    // (658-3,382 such accesses seen in this run).
    assert!(s["sibling_pio"].as_u64().unwrap() >= 1, "no port access carried out by a sibling: {s}");
    // A host-wide free-memory target beside a guest without a balloon
    // driver (memtest): the planner balloons Linux and swaps memtest, which
    // still checks every word it wrote. The target asks for a little more
    // than Linux's lead over memtest, so the water-filling reaches both.
    let out = m.cmd("vm run memtest mem=16 -- mode=swap mib=8 wait=2000000");
    assert!(out.contains("vm 2 started"), "{out}");
    m.wait_for("[vm 2] memtest: filled", Duration::from_secs(240));
    let j = m.json("mem --json");
    let present = |id: u64| -> u64 {
        let vms = j["vms"].as_array().unwrap();
        vms.iter().find(|v| v["id"] == id).unwrap()["pages"]["present"].as_u64().unwrap()
    };
    let free_pages = j["host"]["free_bytes"].as_u64().unwrap() / 4096;
    let want_mib = (free_pages + present(1).saturating_sub(present(2)) + 2048) / 256 + 1;
    let out = m.cmd(&format!("mem target host {want_mib}"));
    assert!(out.contains(&format!("host target: {want_mib} MiB free")), "{out}");
    m.wait_for("vm 2 (memtest) exited", Duration::from_secs(600));
    let t = m.transcript();
    assert!(t.contains("[vm 2] memtest: PASS") && t.contains("vm 2 (memtest) exited with status 1 "), "{t}");
    let swapped: u64 = t
        .lines()
        .find_map(|l| l.split_once("[vm 2] memtest: ")?.1.split_once(" pages swapped after")?.0.parse().ok())
        .expect("memtest's swap line");
    assert!(swapped > 0, "memtest, without a balloon driver, was not swapped:\n{t}");
    let s = m.json("vm stats 1 --json");
    assert!(s["balloon"]["target_pages"].as_u64().unwrap() > 0, "the planner did not balloon Linux: {s}");
    let plan = &m.json("mem --json")["vms"][0]["host_plan"];
    assert!(plan["why"].is_string(), "mem shows no plan for vm 1: {plan}");
    eprintln!("{}: host target {want_mib} MiB: memtest swapped {swapped} pages; vm 1 {}", emu.name(), s["balloon"]);
    m.poweroff();
    std::fs::remove_file(&scratch).unwrap();
}

/// `user <cpu0> <cpu1>`: each CPU's user time so far (/proc/stat, ticks).
const CPU_TIMES: &str = "echo user $(grep '^cpu[01] ' /proc/stat | cut -d' ' -f2)";
/// Two shell loops at once, waited for.
const TWO_LOOPS: &str = "for c in 1 2; do (i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done) & done; wait";

/// 1 MiB of a known text, written at 400 KiB into /dev/vda, flushed.
const WRITE_PATTERN: &str = "yes hypervisor-disk-pattern | head -c 1048576 > /tmp/p; md5sum /tmp/p; \
     dd if=/tmp/p of=/dev/vda bs=4096 seek=100 conv=fsync 2>/dev/null";
/// The same 1 MiB read back from /dev/vda, summed.
const READ_PATTERN: &str = "dd if=/dev/vda bs=4096 skip=100 count=256 2>/dev/null | md5sum";

/// The MD5 sum on a line `<prefix><32 hex digits><suffix>` of `t`.
/// What follows `prefix` (a guest's "[vm N] ") on a console line. A guest
/// line that arrives just after the console printed its prompt follows the
/// prompt ("hv> [vm 1] ...") on the same line.
fn guest_text<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    line.strip_prefix(prefix).or_else(|| line.strip_prefix("hv> ")?.strip_prefix(prefix))
}

fn pattern_sum(t: &str, prefix: &str, suffix: &str) -> String {
    t.lines()
        .filter_map(|l| guest_text(l, prefix)?.trim_end().strip_suffix(suffix))
        .find(|s| s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no md5sum line ending {suffix:?} in:\n{t}"))
        .to_string()
}
