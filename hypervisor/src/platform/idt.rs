//! The IDT. Every CPU exception but a survivable machine check (`mce`) is
//! fatal in the hypervisor: it prints the
//! vector, error code, RIP, CR2 and the faulting context (which VM, if any, the
//! CPU was serving), then powers off with a failure status. Faults in guests
//! never arrive here: they are VM exits.

use core::sync::atomic::{AtomicBool, Ordering};
use spin::Once;
use x86_64::registers::control::{Cr2, Cr3};
use x86_64::structures::idt::{InterruptDescriptorTable, InterruptStackFrame, PageFaultErrorCode};

use super::gdt;

static IDT: Once<InterruptDescriptorTable> = Once::new();
/// Set while a fault report is printed: a fault inside the report (say, while
/// dumping code bytes at a wild RIP) goes straight to power-off.
static REPORTING: AtomicBool = AtomicBool::new(false);

macro_rules! handler {
    ($name:ident, $vec:expr, $label:expr) => {
        extern "x86-interrupt" fn $name(frame: InterruptStackFrame) {
            fatal($vec, $label, None, &frame);
        }
    };
    ($name:ident, $vec:expr, $label:expr, err) => {
        extern "x86-interrupt" fn $name(frame: InterruptStackFrame, code: u64) {
            fatal($vec, $label, Some(code), &frame);
        }
    };
}

handler!(divide_error, 0, "#DE divide error");
handler!(debug, 1, "#DB debug");
handler!(nmi, 2, "NMI");
handler!(breakpoint, 3, "#BP breakpoint");
handler!(overflow, 4, "#OF overflow");
handler!(bound_range, 5, "#BR bound range exceeded");
handler!(invalid_opcode, 6, "#UD invalid opcode");
handler!(device_not_available, 7, "#NM device not available");
handler!(invalid_tss, 10, "#TS invalid TSS", err);
handler!(segment_not_present, 11, "#NP segment not present", err);
handler!(stack_segment, 12, "#SS stack-segment fault", err);
handler!(general_protection, 13, "#GP general protection", err);
handler!(x87_fp, 16, "#MF x87 floating point");
handler!(alignment_check, 17, "#AC alignment check", err);
handler!(simd_fp, 19, "#XM SIMD floating point");
handler!(virtualization, 20, "#VE virtualization");
handler!(control_protection, 21, "#CP control protection", err);
handler!(hv_injection, 28, "#HV hypervisor injection");
handler!(vmm_communication, 29, "#VC VMM communication", err);
handler!(security, 30, "#SX security", err);

extern "x86-interrupt" fn double_fault(frame: InterruptStackFrame, code: u64) -> ! {
    fatal(8, "#DF double fault", Some(code), &frame);
}

/// A machine check the host cannot survive (`mce::machine_check` decided).
pub fn fatal_machine_check(frame: &InterruptStackFrame) -> ! {
    fatal(18, "#MC machine check", None, frame);
}

extern "x86-interrupt" fn page_fault(frame: InterruptStackFrame, code: PageFaultErrorCode) {
    fatal(14, "#PF page fault", Some(code.bits()), &frame);
}

/// Interrupts the kernel did not ask for (it runs with IF=0 and masks the
/// legacy PIC): reported and ignored.
extern "x86-interrupt" fn unexpected_interrupt(frame: InterruptStackFrame) {
    log::warn!("unexpected interrupt at rip={:#x}", frame.instruction_pointer.as_u64());
}

pub fn init() {
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        idt.divide_error.set_handler_fn(divide_error);
        idt.debug.set_handler_fn(debug);
        idt.breakpoint.set_handler_fn(breakpoint);
        idt.overflow.set_handler_fn(overflow);
        idt.bound_range_exceeded.set_handler_fn(bound_range);
        idt.invalid_opcode.set_handler_fn(invalid_opcode);
        idt.device_not_available.set_handler_fn(device_not_available);
        idt.invalid_tss.set_handler_fn(invalid_tss);
        idt.segment_not_present.set_handler_fn(segment_not_present);
        idt.stack_segment_fault.set_handler_fn(stack_segment);
        idt.general_protection_fault.set_handler_fn(general_protection);
        idt.page_fault.set_handler_fn(page_fault);
        idt.x87_floating_point.set_handler_fn(x87_fp);
        idt.alignment_check.set_handler_fn(alignment_check);
        idt.simd_floating_point.set_handler_fn(simd_fp);
        idt.virtualization.set_handler_fn(virtualization);
        idt.cp_protection_exception.set_handler_fn(control_protection);
        idt.hv_injection_exception.set_handler_fn(hv_injection);
        idt.vmm_communication_exception.set_handler_fn(vmm_communication);
        idt.security_exception.set_handler_fn(security);
        // SAFETY: the IST indices name stacks installed in the TSS by
        // `gdt::init`, which runs first; each is used by one vector only.
        unsafe {
            idt.double_fault.set_handler_fn(double_fault).set_stack_index(gdt::DOUBLE_FAULT_IST);
            idt.non_maskable_interrupt.set_handler_fn(nmi).set_stack_index(gdt::NMI_IST);
            // The handler returns after a survivable error, so it is not the
            // crate's diverging kind: installed by address. SAFETY (also):
            // it is an `extern "x86-interrupt"` function taking the frame,
            // what the CPU's #MC delivery (no error code) expects.
            idt.machine_check
                .set_handler_addr(x86_64::VirtAddr::new(super::mce::machine_check as *const () as u64))
                .set_stack_index(gdt::MACHINE_CHECK_IST);
        }
        for i in 32..=255u8 {
            idt[i].set_handler_fn(unexpected_interrupt);
        }
        idt[super::apic::TIMER_VECTOR].set_handler_fn(super::apic::timer_interrupt);
        idt[super::smp::WAKE_VECTOR].set_handler_fn(super::smp::wake_interrupt);
        idt
    });
    idt.load();
}

/// Loads the IDT `init` built on this CPU (an AP): one table serves all.
pub fn load() {
    IDT.get().expect("the boot CPU builds the IDT first").load();
}

fn fatal(vector: u8, label: &str, code: Option<u64>, frame: &InterruptStackFrame) -> ! {
    let nested = REPORTING.swap(true, Ordering::SeqCst);
    let p = |args: core::fmt::Arguments| super::serial::force_write_fmt(args);
    if nested {
        p(format_args!("\nhypervisor: fault while reporting a fault (vector {vector})\n"));
        super::power::fail();
    }
    let rip = frame.instruction_pointer.as_u64();
    p(format_args!("\n!!! hypervisor: CPU exception {vector} {label}\n"));
    match code {
        Some(c) => p(format_args!("    error code {c:#x}\n")),
        None => p(format_args!("    no error code\n")),
    }
    let (cr3, _) = Cr3::read();
    p(format_args!(
        "    rip={:#018x} cs={:#x} rflags={:#x} rsp={:#018x} ss={:#x}\n",
        rip,
        frame.code_segment.0,
        frame.cpu_flags.bits(),
        frame.stack_pointer.as_u64(),
        frame.stack_segment.0
    ));
    p(format_args!("    cr2={:#018x} cr3={:#018x}\n", Cr2::read_raw(), cr3.start_address().as_u64()));
    p(format_args!("    context: {}\n", crate::kernel::context::describe()));
    if x86_64::VirtAddr::try_new(rip).is_ok() {
        // SAFETY: best effort; a fault here re-enters `fatal`, which sees
        // REPORTING set and powers off without dumping.
        let bytes: [u8; 16] = unsafe { core::ptr::read_volatile(rip as *const [u8; 16]) };
        p(format_args!("    code at rip: {:02x?}\n", bytes));
    }
    p(format_args!("hypervisor: halted after a CPU exception\n"));
    super::power::fail();
}
