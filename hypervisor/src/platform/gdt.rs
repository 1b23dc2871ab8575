//! GDT and TSS, one of each per CPU (a TSS is busy while loaded, and each
//! CPU needs its own interrupt stacks). The TSS carries the interrupt stack
//! tables: exceptions that can strike with a broken stack (double fault,
//! NMI, machine check) switch to a known-good one.

use alloc::boxed::Box;
use core::cell::UnsafeCell;
use spin::Once;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, FS, GS, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::segmentation::SegmentSelector;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;

pub const DOUBLE_FAULT_IST: u16 = 0;
pub const NMI_IST: u16 = 1;
pub const MACHINE_CHECK_IST: u16 = 2;

const IST_STACK_SIZE: usize = 16 * 1024;

/// One CPU's three interrupt stacks. Only the CPU uses them, as stacks:
/// Rust code never reads or writes them, so sharing the address is sound.
#[repr(C, align(16))]
pub struct IstStacks(UnsafeCell<[[u8; IST_STACK_SIZE]; 3]>);

// SAFETY: see the type: nothing but the CPU touches the bytes.
unsafe impl Sync for IstStacks {}

impl IstStacks {
    const fn new() -> IstStacks {
        IstStacks(UnsafeCell::new([[0; IST_STACK_SIZE]; 3]))
    }

    fn top(&self, i: usize) -> VirtAddr {
        VirtAddr::new(self.0.get() as u64 + ((i + 1) * IST_STACK_SIZE) as u64)
    }
}

/// The boot CPU's, in the kernel image: it needs them before the heap exists.
static BOOT_IST: IstStacks = IstStacks::new();
static BOOT_TSS: Once<TaskStateSegment> = Once::new();
static BOOT_GDT: Once<CpuGdt> = Once::new();

pub struct CpuGdt {
    gdt: GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

fn tss_with(ist: &'static IstStacks) -> TaskStateSegment {
    let mut tss = TaskStateSegment::new();
    for (i, slot) in [DOUBLE_FAULT_IST, NMI_IST, MACHINE_CHECK_IST].iter().enumerate() {
        tss.interrupt_stack_table[*slot as usize] = ist.top(i);
    }
    tss
}

fn gdt_with(tss: &'static TaskStateSegment) -> CpuGdt {
    let mut gdt = GlobalDescriptorTable::new();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let tss = gdt.append(Descriptor::tss_segment(tss));
    CpuGdt { gdt, code, data, tss }
}

/// The boot CPU's tables, loaded.
pub fn init() {
    let tss = BOOT_TSS.call_once(|| tss_with(&BOOT_IST));
    load(BOOT_GDT.call_once(|| gdt_with(tss)));
}

/// Fresh tables for an application processor, from the heap, loaded. They
/// live as long as the kernel: a CPU is never taken offline.
pub fn init_ap() {
    // Zeroed in place: 48 KiB would not fit on the AP's stack to be moved.
    let layout = core::alloc::Layout::new::<IstStacks>();
    // SAFETY: IstStacks is plain bytes, valid all-zero; the pointer is
    // checked, comes from the global allocator with IstStacks' layout and
    // is never freed.
    let ist: &'static IstStacks = unsafe {
        let p = alloc::alloc::alloc_zeroed(layout) as *mut IstStacks;
        assert!(!p.is_null(), "no heap for an AP's interrupt stacks");
        &*p
    };
    let tss: &'static TaskStateSegment = Box::leak(Box::new(tss_with(ist)));
    load(Box::leak(Box::new(gdt_with(tss))));
}

fn load(g: &'static CpuGdt) {
    g.gdt.load();
    // SAFETY: the selectors index descriptors of the GDT just loaded, which
    // is 'static; reloading them leaves the flat 64-bit address space as
    // is. The TSS is this CPU's alone, so it is not busy elsewhere. GS is
    // reloaded before GS base is written (`cpu_local::install`): loading a
    // selector would clear the base.
    unsafe {
        CS::set_reg(g.code);
        SS::set_reg(g.data);
        DS::set_reg(g.data);
        ES::set_reg(g.data);
        FS::set_reg(SegmentSelector(0));
        GS::set_reg(SegmentSelector(0));
        load_tss(g.tss);
    }
}
