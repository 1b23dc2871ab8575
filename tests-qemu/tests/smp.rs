//! Guests with several vCPUs on both backends (Bochs with VT-x, QEMU TCG
//! with AMD-V), time-sliced on the one host CPU: `smptest` with 2 and then
//! 4 vCPUs starts its APs with INIT-SIPI-SIPI through a real-mode
//! trampoline, counts on every vCPU, exchanges IPIs (AP to BSP, BSP to AP,
//! a broadcast) and runs an atomic-increment stress to the exact total;
//! `vm stats` shows every vCPU. A one-vCPU run of the same guest passes
//! too, and a bad `vcpus=` is refused without starting anything.

use boot::emulator::Emulator;
use std::time::Duration;
use tests_qemu::{Machine, label, on_both_backends};

const TIMEOUT: Duration = Duration::from_secs(400);

on_both_backends!(smptest_passes_with_1_2_and_4_vcpus);

fn smptest_passes_with_1_2_and_4_vcpus(emu: Emulator) {
    let mut m = Machine::boot(emu, &label(emu, "smp"));
    let e = m.cmd("vm run smptest vcpus=9");
    assert!(e.contains("vm run: vcpus must be a number in 1..=8, not \"9\""), "{e}");
    assert!(m.cmd("vm list").contains("no VMs"), "{}", m.transcript());
    for (id, n) in [(1, 2), (2, 4), (3, 1)] {
        m.cmd(&format!("vm run smptest vcpus={n}"));
        m.wait_for(&format!("vm {id} (smptest) exited"), TIMEOUT);
        let t = m.transcript();
        for check in [
            "fw_cfg and the madt agree",
            "bsp has apic id 0",
            "every ap started",
            "each vcpu counted in its own memory",
            "every ap sent the bsp an ipi",
            "the bsp's ipi and broadcast reached every ap",
            "atomic increments from every vcpu reach the exact total",
        ] {
            assert!(t.contains(&format!("[vm {id}] smptest: ok   {check}")), "vm {id}: {check}: {t}");
        }
        assert!(t.contains(&format!("[vm {id}] smptest: {n} cpus (fw_cfg), Some({n}) in the MADT")), "{t}");
        assert!(t.contains(&format!("[vm {id}] smptest: {} aps started", n - 1)), "{t}");
        assert!(t.contains(&format!("[vm {id}] smptest: stress total {}", 100_000 * n)), "{t}");
        assert!(t.contains(&format!("[vm {id}] smptest: PASS ({} checks, {n} vcpus)", 6 + n)), "{t}");
        assert!(t.contains(&format!("vm {id} (smptest) exited with status 1 (0x1)")), "{t}");
        let s = m.json(&format!("vm stats {id} --json"));
        let vcpus = s["vcpus"].as_array().expect("vcpus");
        assert_eq!(vcpus.len(), n, "{s}");
        for (i, v) in vcpus.iter().enumerate() {
            assert_eq!(v["apic_id"], i, "{s}");
            assert_eq!(v["state"], "stopped", "{s}");
            assert_eq!(v["last_host_cpu"], 0, "{s}");
            assert!(v["exits"].as_u64().unwrap() > 0, "vcpu {i} never exited: {s}");
        }
        eprintln!("{}/{}: smptest vcpus={n}: {}", emu.name(), emu.backend(), s["vcpus"]);
    }
    m.poweroff();
}
