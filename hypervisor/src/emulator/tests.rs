use super::fuzzing::*;
use super::*;

#[test]
fn smoke() {
    let mut m = Mock::new(Mode::Bits64);
    m.gprs.rax = MMIO + 0x10;
    m.gprs.rbx = 0x1234_5678;
    m.set_code(0, &[0x89, 0x18]); // mov [rax], ebx
    let r = emulate(&mut m, &MmioFault { gpa: MMIO + 0x10, access: MemAccess::Write, gva: None });
    assert_eq!(r, Ok(Emulated { len: 2, completed: true }));
}
