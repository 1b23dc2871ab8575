//! Kernel entry and main loop: platform bring-up, then the console and the
//! VM scheduler.

pub mod context;

use bootloader_api::config::{BootloaderConfig, Mapping};
use bootloader_api::{BootInfo, entry_point};

use crate::platform;

pub static BOOTLOADER_CONFIG: BootloaderConfig = {
    let mut config = BootloaderConfig::new_default();
    // All of physical memory at one offset: frames, guest RAM, page tables
    // and ACPI tables are all reached through it.
    config.mappings.physical_memory = Some(Mapping::Dynamic);
    config.kernel_stack_size = 256 * 1024;
    config
};

entry_point!(kernel_main, config = &BOOTLOADER_CONFIG);

fn kernel_main(boot_info: &'static mut BootInfo) -> ! {
    platform::serial::init();
    platform::gdt::init();
    platform::idt::init();
    platform::time::init();
    platform::logger::init(log::LevelFilter::Info);
    crate::println!();
    log::info!("hypervisor {} starting", env!("CARGO_PKG_VERSION"));

    let phys_offset = boot_info
        .physical_memory_offset
        .into_option()
        .expect("bootloader maps physical memory");
    platform::memory::init(&boot_info.memory_regions, phys_offset);
    let mem = platform::memory::info();
    log::info!(
        "memory: {} MiB usable, heap {} MiB, {} MiB free",
        mem.usable_bytes >> 20,
        mem.heap_bytes >> 20,
        platform::memory::free_bytes() >> 20
    );
    let acpi = platform::acpi::init(boot_info.rsdp_addr.into_option());
    log::info!(
        "acpi: {} cpu(s), apic ids {:?}, s5 {:?}",
        acpi.apic_ids.len(),
        acpi.apic_ids,
        acpi.s5
    );
    let cpu = platform::cpu::detect();
    log::info!("cpu: {} {} vmx={} svm={}", cpu.vendor, cpu.brand, cpu.vmx, cpu.svm);
    crate::println!("hypervisor: ready");
    platform::power::off(true);
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    platform::serial::force_write_fmt(format_args!("\n!!! hypervisor panic: {info}\n"));
    platform::serial::force_write_fmt(format_args!("    context: {}\n", context::describe()));
    platform::power::fail();
}
