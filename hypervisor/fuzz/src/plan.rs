//! Checks shared by the loader targets: a plan the loader accepted must keep
//! every promise the loader makes, independently re-checked here.

use std::cell::RefCell;
use std::ops::Range;

use hypervisor::loader::{LoadPlan, Op, RamLayout};

/// Largest guest RAM the targets simulate; plans are applied to a buffer of
/// this size, allocated once per process.
pub const MAX_RAM: usize = 32 << 20;

thread_local! {
    static RAM: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_RAM]);
}

/// Whether two ranges share a byte (an empty range shares none).
fn intersects(a: &Range<u64>, b: &Range<u64>) -> bool {
    !a.is_empty() && !b.is_empty() && a.start < b.end && b.start < a.end
}

/// Asserts that `plan` stays inside `layout` (and below 4 GiB when
/// `below_4gib`), that its steps do not overlap, that it only copies bytes
/// `image` has, that the entry point is in copied bytes, and that applying
/// it to guest RAM succeeds.
pub fn check_plan(plan: &LoadPlan<'_>, image: &[u8], layout: &RamLayout<'_>, below_4gib: bool) {
    assert!(layout.ram_size as usize <= MAX_RAM);
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for op in plan.ops() {
        let range = op.gpa_range();
        assert!(!range.is_empty(), "empty step {op:?}");
        assert!(range.end <= layout.ram_size, "{op:?} outside RAM");
        assert!(!below_4gib || range.end <= 1 << 32, "{op:?} above 4 GiB");
        for reserved in layout.reserved {
            assert!(!intersects(&range, reserved), "{op:?} in reserved {reserved:?}");
        }
        if let Op::Copy { src, .. } = op {
            assert!(src.end <= image.len(), "{op:?} past the image");
        }
        ranges.push(range);
    }
    ranges.sort_by_key(|r| r.start);
    for pair in ranges.windows(2) {
        assert!(pair[0].end <= pair[1].start, "overlapping steps {pair:?}");
    }
    let rip = plan.entry().rip;
    assert!(
        plan.ops().iter().any(|op| matches!(op, Op::Copy { .. }) && op.gpa_range().contains(&rip)),
        "entry {rip:#x} not in copied bytes"
    );
    RAM.with_borrow_mut(|ram| {
        let ram = &mut ram[..layout.ram_size as usize];
        plan.apply(image, ram).expect("applying an accepted plan");
    });
}
