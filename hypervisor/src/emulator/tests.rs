//! Unit tests against the mock platform (`fuzzing::Mock`): each emulated
//! instruction in the forms and modes guests use, the prefixes that change
//! them, RFLAGS against values worked out by hand from SDM Vol. 1 3.4.3.1
//! and each instruction's "Flags Affected", and every refusal.

use alloc::vec::Vec;

use super::flags::{AF, CF, DF, OF, PF, RF, SF, STATUS, ZF};
use super::fuzzing::*;
use super::*;
use vcpu::Event;

/// A device register the tests use: the accesses go to `MMIO + 0x100`.
const REG: usize = 0x100;
const DEV: u64 = MMIO + REG as u64;
const IF: u64 = 1 << 9;

fn on_write(gpa: u64) -> MmioFault {
    MmioFault { gpa, access: MemAccess::Write, gva: None }
}

fn on_read(gpa: u64) -> MmioFault {
    MmioFault { gpa, access: MemAccess::Read, gva: None }
}

/// Runs `code` at `CODE` and checks that it completed with RIP advanced by
/// its length and RF cleared.
fn run(m: &mut Mock, code: &[u8], fault: MmioFault) {
    m.set_code(0, code);
    let rip = m.rip;
    let done = emulate(m, &fault).unwrap_or_else(|e| panic!("{code:02x?}: {e:?}"));
    assert_eq!(done, Emulated { len: code.len() as u8, completed: true }, "{code:02x?}");
    assert_eq!(m.rip, rip + code.len() as u64, "{code:02x?}: RIP");
    assert_eq!(m.rflags & RF, 0, "{code:02x?}: RF survives completion");
}

/// Runs `code` expecting a refusal that leaves everything as it was.
fn refuse(m: &mut Mock, code: &[u8], fault: MmioFault) -> Error {
    m.set_code(0, code);
    let before = (m.gprs, m.rip, m.rflags, m.device.clone(), m.ram.clone());
    let e = emulate(m, &fault).expect_err("emulated what should be refused");
    assert_eq!((m.gprs, m.rip, m.rflags, m.device.clone(), m.ram.clone()), before, "{e:?} changed state");
    assert!(m.log.is_empty(), "{e:?} after device accesses {:?}", m.log);
    e
}

/// The device accesses so far, as (write, offset in the device page, size,
/// value), and clears the log.
fn accesses(m: &mut Mock) -> Vec<(bool, u64, u8, u64)> {
    let base = m.device_gpa;
    m.log.drain(..).map(|a| (a.write, a.gpa - base, a.size, a.value)).collect()
}

fn mock64() -> Mock {
    let mut m = Mock::new(Mode::Bits64);
    m.gprs.rax = DEV;
    m
}

/// xorshift64*: a small deterministic generator for the loop tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Opcodes guests use on MMIO (and their neighbours), to start most
/// generated instructions with something the emulator might accept.
const OPCODES: &[&[u8]] = &[
    &[0x88],
    &[0x89],
    &[0x8a],
    &[0x8b],
    &[0xc6],
    &[0xc7],
    &[0xa0],
    &[0xa1],
    &[0xa2],
    &[0xa3],
    &[0x00],
    &[0x01],
    &[0x02],
    &[0x03],
    &[0x08],
    &[0x09],
    &[0x0a],
    &[0x0b],
    &[0x10],
    &[0x11],
    &[0x18],
    &[0x19],
    &[0x20],
    &[0x21],
    &[0x22],
    &[0x23],
    &[0x28],
    &[0x29],
    &[0x30],
    &[0x31],
    &[0x38],
    &[0x39],
    &[0x3a],
    &[0x3b],
    &[0x80],
    &[0x81],
    &[0x83],
    &[0x84],
    &[0x85],
    &[0x86],
    &[0x87],
    &[0xf6],
    &[0xf7],
    &[0xfe],
    &[0xff],
    &[0xa4],
    &[0xa5],
    &[0xaa],
    &[0xab],
    &[0xac],
    &[0xad],
    &[0xa6],
    &[0xae],
    &[0x8c],
    &[0x8e],
    &[0x63],
    &[0x0f, 0xb6],
    &[0x0f, 0xb7],
    &[0x0f, 0xbe],
    &[0x0f, 0xbf],
    &[0x0f, 0xa3],
    &[0x0f, 0xab],
    &[0x0f, 0xb3],
    &[0x0f, 0xbb],
    &[0x0f, 0xba],
    &[0x0f, 0xc3],
    &[0x0f, 0xb1],
    &[0x0f, 0x6f],
    &[0x0f, 0x7f],
    &[0x0f, 0x10],
    &[0xd1],
    &[0xc1],
    &[0xd9],
    &[0x8f],
    &[0xc5, 0xf9, 0x6f],
];
const PREFIXES: &[u8] = &[0x66, 0x67, 0xf3, 0xf2, 0xf0, 0x2e, 0x26, 0x36, 0x3e, 0x64, 0x65, 0x48, 0x41, 0x4c, 0x40];

fn fuzz_input(rng: &mut Rng) -> Vec<u8> {
    let mut d = Vec::with_capacity(HEADER + 15);
    d.push(rng.byte());
    for _ in 0..16 {
        // Mostly pointers into the device page, small offsets.
        d.push([0, 0, 0, 0, 0, 1, 2, 3, 4][rng.below(9) as usize]);
        let operand = if rng.below(4) == 0 { rng.next() } else { rng.below(64) };
        d.extend_from_slice(&operand.to_le_bytes());
    }
    d.extend_from_slice(&rng.next().to_le_bytes()[..3]);
    for _ in 0..5 {
        d.push(rng.byte());
        d.extend_from_slice(&rng.next().to_le_bytes());
    }
    d.extend_from_slice(&rng.next().to_le_bytes()[..5]);
    assert_eq!(d.len(), HEADER);
    // One case in eight is a port exit for INS/OUTS (bit 1 of the
    // direction byte, third from the end of the header), mostly with one.
    let port = rng.below(8) == 0;
    d[HEADER - 3] = if port { d[HEADER - 3] | 2 } else { d[HEADER - 3] & !2 };
    if port && rng.below(4) != 0 {
        let mut word = false;
        for _ in 0..rng.below(3) {
            let prefix = [0xf3, 0xf2, 0x66, 0x67, 0x64, 0x26][rng.below(6) as usize];
            word |= prefix == 0x66;
            d.push(prefix);
        }
        let opcode = 0x6c + rng.below(4) as u8;
        d.push(opcode);
        d.extend((0..14).map(|_| rng.byte()));
        if rng.below(4) != 0 {
            // Mostly the exit this instruction makes: its direction and
            // width, the port in DX (bit 2 clear), RSI and RDI in RAM.
            let size: u8 = if opcode & 1 == 0 {
                0
            } else if word {
                1
            } else {
                2
            };
            d[HEADER - 3] = 2 | (opcode >> 1 & 1) | (size << 3);
            d[1 + 6 * 9] = 3;
            d[1 + 7 * 9] = 3;
            // A small count: the budget is tested on its own.
            d[1 + 9] = 2;
        }
    } else if rng.below(4) == 0 {
        d.extend((0..15).map(|_| rng.byte()));
    } else {
        for _ in 0..rng.below(4) {
            d.push(PREFIXES[rng.below(PREFIXES.len() as u64) as usize]);
        }
        d.extend_from_slice(OPCODES[rng.below(OPCODES.len() as u64) as usize]);
        // ModRM: mostly a register-indirect or displaced memory operand.
        let modrm = match rng.below(4) {
            0 => rng.byte(),
            _ => (rng.byte() & 0x7f) | if rng.below(2) == 0 { 0 } else { 0x40 },
        };
        d.push(modrm);
        d.extend((0..12).map(|_| if rng.below(2) == 0 { 0 } else { rng.byte() }));
    }
    d
}

/// The fuzz check over many generated cases; bounded for debug builds.
#[test]
fn fuzz_check_holds_on_generated_instructions() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let (mut emulated, mut refused, mut ports) = (0u32, 0u32, 0u32);
    for _ in 0..200_000 {
        let input = fuzz_input(&mut rng);
        match check(&input) {
            Outcome::Emulated(_) if input[HEADER - 3] & 2 != 0 => ports += 1,
            Outcome::Emulated(_) => emulated += 1,
            Outcome::Refused(_) => refused += 1,
        }
    }
    std::println!("emulated {emulated} (string port i/o {ports}), refused {refused}");
    assert!(emulated > 10_000, "too few cases got through to the device: {emulated}");
    assert!(ports > 500, "too few INS/OUTS cases were carried out: {ports}");
}

/// The same, longer and seeded from the environment, for a manual run:
/// `EMULATOR_FUZZ_CASES=5000000 EMULATOR_FUZZ_SEED=1 cargo test --release
/// -p hypervisor --lib emulator::tests::fuzz_check_long -- --ignored`.
#[test]
#[ignore]
fn fuzz_check_long() {
    let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let mut rng = Rng(env("EMULATOR_FUZZ_SEED", 1) | 1);
    let mut emulated = 0u64;
    for _ in 0..env("EMULATOR_FUZZ_CASES", 5_000_000) {
        if let Outcome::Emulated(_) = check(&fuzz_input(&mut rng)) {
            emulated += 1;
        }
    }
    std::println!("emulated {emulated}");
}

#[test]
fn fuzz_check_survives_short_and_empty_inputs() {
    let mut rng = Rng(7);
    for len in 0..HEADER + 16 {
        let d: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        check(&d);
    }
}

// ---- MOV and friends ----

#[test]
fn mov_stores_every_width_register_and_immediate() {
    let cases: &[(&[u8], u8, u64)] = &[
        (&[0x88, 0x18], 1, 0x88),                                       // mov [rax], bl
        (&[0x88, 0x38], 1, 0x77),                                       // mov [rax], bh
        (&[0x40, 0x88, 0x20], 1, 0x44),                                 // mov [rax], spl (REX)
        (&[0x88, 0x21], 1, 0x33),                                       // mov [rcx], ah (no REX)
        (&[0x66, 0x89, 0x18], 2, 0x7788),                               // mov [rax], bx
        (&[0x89, 0x18], 4, 0x5566_7788),                                // mov [rax], ebx
        (&[0x48, 0x89, 0x18], 8, 0x1122_3344_5566_7788),                // mov [rax], rbx
        (&[0x44, 0x89, 0x08], 4, 0x9999_aaaa),                          // mov [rax], r9d (REX.R)
        (&[0x4c, 0x89, 0x38], 8, 0xf0f0_f0f0_0f0f_0f0f),                // mov [rax], r15
        (&[0xc6, 0x00, 0x7f], 1, 0x7f),                                 // mov byte [rax], 0x7f
        (&[0x66, 0xc7, 0x00, 0x34, 0x12], 2, 0x1234),                   // mov word [rax], 0x1234
        (&[0xc7, 0x00, 0xef, 0xbe, 0xad, 0xde], 4, 0xdead_beef),        // mov dword [rax], imm32
        (&[0x48, 0xc7, 0x00, 0xfe, 0xff, 0xff, 0xff], 8, u64::MAX - 1), // mov qword [rax], -2 (sign-extended)
        (&[0x0f, 0xc3, 0x18], 4, 0x5566_7788),                          // movnti [rax], ebx
        (&[0x48, 0x0f, 0xc3, 0x18], 8, 0x1122_3344_5566_7788),          // movnti [rax], rbx
    ];
    for &(code, size, value) in cases {
        let mut m = mock64();
        m.gprs.rbx = 0x1122_3344_5566_7788;
        m.gprs.rsp = 0x44;
        m.gprs.r9 = 0x1234_5678_9999_aaaa;
        m.gprs.r15 = 0xf0f0_f0f0_0f0f_0f0f;
        // AH is bits 8..15 of RAX; that case addresses through RCX.
        if code == [0x88, 0x21] {
            m.gprs.rax = 0x3344;
            m.gprs.rcx = DEV;
        }
        let gprs = m.gprs;
        run(&mut m, code, on_write(DEV));
        assert_eq!(accesses(&mut m), [(true, REG as u64, size, value)], "{code:02x?}");
        assert_eq!(m.gprs, gprs, "{code:02x?}: a store changed a register");
        assert_eq!(m.rflags, 2, "{code:02x?}: a store changed RFLAGS");
    }
}

#[test]
fn mov_loads_extend_as_the_destination_width_says() {
    let garbage = 0xdead_beef_dead_beef;
    // (code, device value, rcx afterwards), device register 8 bytes wide.
    let dev = 0x8899_aabb_ccdd_eeff_u64;
    let cases: &[(&[u8], u64)] = &[
        (&[0x8a, 0x08], 0xdead_beef_dead_beff),       // mov cl, [rax]: keeps the rest
        (&[0x8a, 0x28], 0xdead_beef_dead_ffef),       // mov ch, [rax]: bits 8..15
        (&[0x66, 0x8b, 0x08], 0xdead_beef_dead_eeff), // mov cx, [rax]
        (&[0x8b, 0x08], 0xccdd_eeff),                 // mov ecx, [rax]: zero-extends
        (&[0x48, 0x8b, 0x08], dev),                   // mov rcx, [rax]
        (&[0x0f, 0xb6, 0x08], 0xff),                  // movzx ecx, byte [rax]
        (&[0x0f, 0xb7, 0x08], 0xeeff),                // movzx ecx, word [rax]
        (&[0x66, 0x0f, 0xb6, 0x08], 0xdead_beef_dead_00ff), // movzx cx, byte [rax]
        (&[0x0f, 0xbe, 0x08], 0xffff_ffff),           // movsx ecx, byte [rax]: 0xff is -1
        (&[0x48, 0x0f, 0xbf, 0x08], 0xffff_ffff_ffff_eeff), // movsx rcx, word [rax]
        (&[0x48, 0x63, 0x08], 0xffff_ffff_ccdd_eeff), // movsxd rcx, dword [rax]
        (&[0x63, 0x08], 0xccdd_eeff),                 // movsxd ecx, dword [rax] (no REX.W)
    ];
    for &(code, want) in cases {
        let mut m = mock64();
        m.set_device(REG, 8, dev);
        m.gprs.rcx = garbage;
        m.rflags = 2 | CF | ZF;
        run(&mut m, code, on_read(DEV));
        assert_eq!(m.gprs.rcx, want, "{code:02x?}: RCX {:#x}", m.gprs.rcx);
        assert_eq!(accesses(&mut m).len(), 1, "{code:02x?}");
        assert_eq!(m.rflags, 2 | CF | ZF, "{code:02x?}: a load changed RFLAGS");
    }
    // A byte load of 0x80 sign-extends to a negative dword.
    let mut m = mock64();
    m.set_device(REG, 1, 0x80);
    run(&mut m, &[0x0f, 0xbe, 0x08], on_read(DEV));
    assert_eq!(m.gprs.rcx, 0xffff_ff80);
    // R15 through REX.R.
    let mut m = mock64();
    m.set_device(REG, 8, dev);
    run(&mut m, &[0x4c, 0x8b, 0x38], on_read(DEV));
    assert_eq!(m.gprs.r15, dev);
}

#[test]
fn moffs_forms_carry_a_full_address() {
    let mut m = mock64();
    m.set_device(0x50, 4, 0x1234_5678);
    let mut code = alloc::vec![0xa1]; // mov eax, [moffs64]
    code.extend_from_slice(&(MMIO + 0x50).to_le_bytes());
    run(&mut m, &code, on_read(MMIO + 0x50));
    assert_eq!(m.gprs.rax, 0x1234_5678);
    let mut code = alloc::vec![0xa2]; // mov [moffs64], al
    code.extend_from_slice(&(MMIO + 0x51).to_le_bytes());
    run(&mut m, &code, on_write(MMIO + 0x51));
    assert_eq!(accesses(&mut m), [(false, 0x50, 4, 0x1234_5678), (true, 0x51, 1, 0x78)]);
}

// ---- addressing ----

#[test]
fn base_index_scale_displacement() {
    let mut m = mock64();
    m.gprs.rax = MMIO;
    m.gprs.rbx = 0x10;
    m.gprs.rcx = 0xabcd;
    run(&mut m, &[0x89, 0x8c, 0x98, 0x00, 0x01, 0x00, 0x00], on_write(MMIO + 0x140)); // mov [rax+rbx*4+0x100], ecx
    assert_eq!(accesses(&mut m), [(true, 0x140, 4, 0xabcd)]);
    // A negative disp8 and an index alone: mov [rbx*8-8], ecx.
    m.gprs.rbx = (MMIO + 0x208) / 8;
    run(&mut m, &[0x89, 0x0c, 0xdd, 0xf8, 0xff, 0xff, 0xff], on_write(MMIO + 0x200));
    assert_eq!(accesses(&mut m), [(true, 0x200, 4, 0xabcd)]);
}

#[test]
fn rip_relative_through_a_second_mapping_of_the_device() {
    let mut m = mock64();
    m.gprs.rcx = 0x5555;
    // mov [rip+disp32], ecx: 6 bytes at CODE, target MMIO_ALIAS + 0x20.
    let disp = (MMIO_ALIAS + 0x20 - (CODE + 6)) as u32;
    let mut code = alloc::vec![0x89, 0x0d];
    code.extend_from_slice(&disp.to_le_bytes());
    run(&mut m, &code, MmioFault { gva: Some(MMIO_ALIAS + 0x20), ..on_write(MMIO + 0x20) });
    assert_eq!(accesses(&mut m), [(true, 0x20, 4, 0x5555)]);
}

#[test]
fn fs_and_gs_have_bases_in_64_bit_mode_and_the_others_do_not() {
    let mut m = mock64();
    m.seg_base[Seg::Fs as usize] = MMIO_ALIAS;
    m.seg_base[Seg::Gs as usize] = MMIO;
    m.seg_base[Seg::Es as usize] = 0x1000;
    m.seg_base[Seg::Ds as usize] = 0x2000;
    m.gprs.rax = 0x30;
    m.gprs.rcx = 7;
    run(&mut m, &[0x64, 0x89, 0x08], on_write(MMIO + 0x30)); // mov fs:[rax], ecx
    run(&mut m, &[0x65, 0x89, 0x0c, 0x25, 0x40, 0, 0, 0], on_write(MMIO + 0x40)); // mov gs:[0x40], ecx
    m.gprs.rax = DEV;
    run(&mut m, &[0x26, 0x89, 0x08], on_write(DEV)); // mov es:[rax], ecx: ES base ignored
    assert_eq!(accesses(&mut m), [(true, 0x30, 4, 7), (true, 0x40, 4, 7), (true, REG as u64, 4, 7)]);
}

#[test]
fn address_size_override_truncates_to_32_bits() {
    let mut m = mock64();
    m.gprs.rax = 0xdead_0000_0000_0000 | (MMIO + 0x40);
    m.gprs.rcx = 9;
    run(&mut m, &[0x67, 0x89, 0x08], on_write(MMIO + 0x40)); // mov [eax], ecx
    assert_eq!(accesses(&mut m), [(true, 0x40, 4, 9)]);
}

#[test]
fn mode_32_with_paging_segment_bases_and_wrap() {
    let mut m = Mock::new(Mode::Bits32);
    m.gprs.rax = DEV;
    m.gprs.rbx = 0xffff_ffff_0000_0000 | 0x1234_5678;
    run(&mut m, &[0x89, 0x18], on_write(DEV)); // mov [eax], ebx
    run(&mut m, &[0x66, 0x89, 0x18], on_write(DEV)); // mov [eax], bx
    // mov [bx+si], eax (67: 16-bit addressing) with DS's base at the device.
    m.seg_base[Seg::Ds as usize] = MMIO;
    m.gprs.rbx = 0x10;
    m.gprs.rsi = 0x8;
    m.gprs.rax = 0x4242;
    run(&mut m, &[0x67, 0x89, 0x00], on_write(MMIO + 0x18));
    // A base and offset that add up past 4 GiB wrap: mov ecx, [eax].
    m.seg_base[Seg::Ds as usize] = 0xfff0_0000;
    m.gprs.rax = MMIO + 0x10_0000 + 0x10;
    m.gprs.rcx = u64::MAX;
    m.set_device(0x10, 4, 0x0bad_cafe);
    run(&mut m, &[0x8b, 0x08], on_read(MMIO + 0x10));
    assert_eq!(m.gprs.rcx, 0x0bad_cafe, "a 32-bit load zero-extends");
    // mov eax, fs:[ecx*8+0x10].
    m.seg_base[Seg::Fs as usize] = MMIO_ALIAS;
    m.gprs.rcx = 0x20;
    run(&mut m, &[0x64, 0x8b, 0x04, 0xcd, 0x10, 0, 0, 0], on_read(MMIO + 0x110));
    let log = accesses(&mut m);
    assert_eq!(log[..3], [(true, REG as u64, 4, 0x1234_5678), (true, REG as u64, 2, 0x5678), (true, 0x18, 4, 0x4242)]);
    assert_eq!(log[3..].iter().map(|a| a.1).collect::<Vec<_>>(), [0x10, 0x110]);
}

#[test]
fn mode_16_real_mode_segments_and_prefixes() {
    let mut m = Mock::new(Mode::Bits16);
    let dev = MMIO_REAL;
    m.seg_base[Seg::Ds as usize] = dev;
    // mov [bx+si+4], ax: 16-bit registers, only their low halves count.
    m.gprs.rbx = 0xffff_0010;
    m.gprs.rsi = 0x20;
    m.gprs.rax = 0x1111_2222_3333_4444;
    run(&mut m, &[0x89, 0x40, 0x04], on_write(dev + 0x34));
    // The 16-bit effective address wraps: 0xfff0 + 0x20 + 4.
    m.gprs.rbx = 0xfff0;
    run(&mut m, &[0x89, 0x40, 0x04], on_write(dev + 0x14));
    // 66: a dword store; 67 66: 32-bit addressing as well (mov [ebx], eax).
    m.gprs.rbx = 0x30;
    run(&mut m, &[0x66, 0x89, 0x07], on_write(dev + 0x30));
    run(&mut m, &[0x67, 0x66, 0x89, 0x03], on_write(dev + 0x30));
    // BP-based addresses use SS: mov ax, [bp+2].
    m.seg_base[Seg::Ss as usize] = dev + 0x100;
    m.gprs.rbp = 0x40;
    m.set_device(0x142, 2, 0xbeef);
    run(&mut m, &[0x8b, 0x46, 0x02], on_read(dev + 0x142));
    assert_eq!(m.gprs.rax, 0x1111_2222_3333_beef);
    // es: override with an immediate store.
    m.seg_base[Seg::Es as usize] = dev + 0x200;
    m.gprs.rdi = 0x8;
    run(&mut m, &[0x26, 0xc6, 0x45, 0x05, 0x12], on_write(dev + 0x20d));
    assert_eq!(
        accesses(&mut m),
        [
            (true, 0x34, 2, 0x4444),
            (true, 0x14, 2, 0x4444),
            (true, 0x30, 4, 0x3333_4444),
            (true, 0x30, 4, 0x3333_4444),
            (false, 0x142, 2, 0xbeef),
            (true, 0x20d, 1, 0x12)
        ]
    );
    // IP wraps at 64 KiB: a 2-byte instruction at IP 0xfffe ends at IP 0.
    m.seg_base[Seg::Cs as usize] = 0;
    m.ram[0xfffe..0x10000].copy_from_slice(&[0x89, 0x07]); // mov [bx], ax
    m.rip = 0xfffe;
    assert_eq!(emulate(&mut m, &on_write(dev + 0x30)), Ok(Emulated { len: 2, completed: true }));
    assert_eq!(m.rip, 0);
}

#[test]
fn mode_from_the_control_registers_and_cs() {
    use vcpu::state::bits::{CR0_PE, EFER_LMA};
    let cs = |l: bool, d: bool| {
        SegAttrs(
            SegAttrs::CODE32.0 & !SegAttrs::DB | if l { SegAttrs::L } else { 0 } | if d { SegAttrs::DB } else { 0 },
        )
    };
    assert_eq!(Mode::from_parts(0, 0, cs(false, true), 2), Mode::Bits16, "real mode");
    assert_eq!(Mode::from_parts(CR0_PE, 0, cs(false, true), 2), Mode::Bits32);
    assert_eq!(Mode::from_parts(CR0_PE, 0, cs(false, false), 2), Mode::Bits16);
    assert_eq!(Mode::from_parts(CR0_PE, 0, cs(false, true), 2 | 1 << 17), Mode::Bits16, "virtual-8086");
    assert_eq!(Mode::from_parts(CR0_PE, EFER_LMA, cs(true, false), 2), Mode::Bits64);
    assert_eq!(Mode::from_parts(CR0_PE, EFER_LMA, cs(false, true), 2), Mode::Bits32, "compatibility mode");
    assert_eq!(Mode::from_parts(CR0_PE, EFER_LMA, cs(false, false), 2), Mode::Bits16);
}

// ---- arithmetic and logic: results and RFLAGS ----

/// One ALU case: code (memory operand [rax] = the device register, RBX
/// and RCX as the other operands), the device's value and CF before, and
/// what should follow: the device's value, RCX, and the status flags.
struct Alu {
    code: &'static [u8],
    /// Operand width in bytes.
    w: u8,
    dev: u64,
    cf: bool,
    /// The device's value afterwards.
    out: u64,
    /// RCX afterwards.
    rcx: u64,
    /// The status flags afterwards.
    st: u64,
}

const RBX: u64 = 1;
const RCX: u64 = 0x10;

fn check_alu(c: &Alu) {
    let mut m = mock64();
    m.set_device(REG, 8, c.dev);
    m.gprs.rbx = RBX;
    m.gprs.rcx = RCX;
    // Every status flag set that should be cleared, DF and IF set to show
    // that they are kept, RF to show that it is cleared.
    let status_before = (STATUS & !CF) ^ c.st | if c.cf { CF } else { 0 };
    m.rflags = 2 | IF | DF | RF | status_before;
    let writes = c.out != c.dev;
    let access = if writes { on_write(DEV) } else { on_read(DEV) };
    run(&mut m, c.code, access);
    assert_eq!(m.device_u64(REG, 8), c.out, "{:02x?}: device", c.code);
    assert_eq!(m.gprs.rcx, c.rcx, "{:02x?}: RCX", c.code);
    assert_eq!(m.rflags & STATUS, c.st, "{:02x?}: status flags {:#x}", c.code, m.rflags & STATUS);
    assert_eq!(m.rflags & !STATUS, 2 | IF | DF, "{:02x?}: other flags", c.code);
    let log = accesses(&mut m);
    assert_eq!(log[0], (false, REG as u64, c.w, c.dev & flags::mask(c.w)), "{:02x?}: read first", c.code);
    if writes {
        assert_eq!(log[1..], [(true, REG as u64, c.w, c.out & flags::mask(c.w))], "{:02x?}", c.code);
    }
}

#[test]
fn add_adc_sub_sbb_cmp_set_flags_as_hardware() {
    let cases = [
        // add [rax], ebx: 0x7fffffff + 1 overflows into the sign bit, carries out of bit 3; 0x00 low byte: PF.
        Alu {
            code: &[0x01, 0x18],
            w: 4,
            dev: 0x7fff_ffff,
            cf: false,
            out: 0x8000_0000,
            rcx: RCX,
            st: SF | OF | AF | PF,
        },
        // add byte [rax], 0xff: 1 + 0xff wraps to 0 with carry.
        Alu { code: &[0x80, 0x00, 0xff], w: 1, dev: 0x01, cf: false, out: 0x00, rcx: RCX, st: CF | ZF | PF | AF },
        // add qword [rax], -1 (imm8 sign-extended): 1 - 1 = 0 with carry.
        Alu { code: &[0x48, 0x83, 0x00, 0xff], w: 8, dev: 1, cf: false, out: 0, rcx: RCX, st: CF | ZF | PF | AF },
        // add word [rax], bx: the upper bytes of the register do not count.
        Alu {
            code: &[0x66, 0x01, 0x18],
            w: 2,
            dev: 0xdead_0000_7fff,
            cf: false,
            out: 0xdead_0000_8000,
            rcx: RCX,
            st: SF | OF | AF | PF,
        },
        // adc [rax], ebx with CF: 0xfffffffe + 1 + 1 = 0x1_0000_0000.
        Alu { code: &[0x11, 0x18], w: 4, dev: 0xffff_fffe, cf: true, out: 0, rcx: RCX, st: CF | ZF | PF | AF },
        // sbb byte [rax], 1 with CF: 2 - 1 - 1 = 0, no borrow anywhere.
        Alu { code: &[0x80, 0x18, 0x01], w: 1, dev: 0x02, cf: true, out: 0, rcx: RCX, st: ZF | PF },
        // sub [rax], ebx: 0x80000000 - 1 overflows (negative minus positive gives positive).
        Alu { code: &[0x29, 0x18], w: 4, dev: 0x8000_0000, cf: false, out: 0x7fff_ffff, rcx: RCX, st: OF | AF | PF },
        // cmp dword [rax], 5: 3 - 5 borrows; 0xfe has seven 1s: PF clear. The device is not written.
        Alu { code: &[0x83, 0x38, 0x05], w: 4, dev: 3, cf: false, out: 3, rcx: RCX, st: CF | SF | AF },
        // cmp ecx, [rax]: equal.
        Alu { code: &[0x3b, 0x08], w: 4, dev: RCX, cf: false, out: RCX, rcx: RCX, st: ZF | PF },
        // sub ecx, [rax]: 0x10 - 0x20 into ECX (zero-extended); 0xf0 has four 1s.
        Alu { code: &[0x2b, 0x08], w: 4, dev: 0x20, cf: false, out: 0x20, rcx: 0xffff_fff0, st: CF | SF | PF },
        // add ecx, [rax]: 0x10 + 2 = 0x12, two 1s.
        Alu { code: &[0x03, 0x08], w: 4, dev: 2, cf: false, out: 2, rcx: 0x12, st: PF },
        // add cl, [rax]: only CL changes.
        Alu { code: &[0x02, 0x08], w: 1, dev: 0xf0, cf: false, out: 0xf0, rcx: 0x00, st: CF | ZF | PF },
    ];
    for c in &cases {
        check_alu(c);
    }
}

#[test]
fn and_or_xor_test_clear_cf_of_af() {
    let cases = [
        // test byte [rax], 0x80: SF from bit 7; one 1: PF clear.
        Alu { code: &[0xf6, 0x00, 0x80], w: 1, dev: 0x80, cf: true, out: 0x80, rcx: RCX, st: SF },
        // test [rax], ecx: no common bits.
        Alu { code: &[0x85, 0x08], w: 4, dev: 0x01, cf: true, out: 0x01, rcx: RCX, st: ZF | PF },
        // or dword [rax], 0x100: 0x1ff, low byte eight 1s.
        Alu { code: &[0x81, 0x08, 0x00, 0x01, 0x00, 0x00], w: 4, dev: 0xff, cf: true, out: 0x1ff, rcx: RCX, st: PF },
        // xor [rax], rbx: equal values give zero.
        Alu { code: &[0x48, 0x31, 0x18], w: 8, dev: RBX, cf: false, out: 0, rcx: RCX, st: ZF | PF },
        // and word [rax], 0x8001: 0xffff -> 0x8001.
        Alu { code: &[0x66, 0x81, 0x20, 0x01, 0x80], w: 2, dev: 0xffff, cf: false, out: 0x8001, rcx: RCX, st: SF },
        // and ecx, [rax]: into the register.
        Alu { code: &[0x23, 0x08], w: 4, dev: 0x30, cf: false, out: 0x30, rcx: 0x10, st: 0 },
    ];
    for c in &cases {
        check_alu(c);
    }
}

#[test]
fn inc_dec_neg_not() {
    let cases = [
        // inc dword [rax]: wraps to 0; CF is not touched (set before, still set).
        Alu { code: &[0xff, 0x00], w: 4, dev: 0xffff_ffff, cf: true, out: 0, rcx: RCX, st: CF | ZF | PF | AF },
        // dec byte [rax]: 0x80 - 1 overflows; CF clear before, still clear.
        Alu { code: &[0xfe, 0x08], w: 1, dev: 0x80, cf: false, out: 0x7f, rcx: RCX, st: OF | AF },
        // neg dword [rax]: -5; CF because the operand was not zero.
        Alu { code: &[0xf7, 0x18], w: 4, dev: 5, cf: false, out: 0xffff_fffb, rcx: RCX, st: CF | SF | AF },
        // neg qword [rax] of 0: 0, CF clear.
        Alu { code: &[0x48, 0xf7, 0x18], w: 8, dev: 0, cf: true, out: 0, rcx: RCX, st: ZF | PF },
    ];
    for c in &cases {
        check_alu(c);
    }
    // not word [rax]: no flags change at all.
    let mut m = mock64();
    m.set_device(REG, 2, 0x00ff);
    m.rflags = 2 | CF | ZF | OF;
    run(&mut m, &[0x66, 0xf7, 0x10], on_write(DEV));
    assert_eq!(m.device_u64(REG, 2), 0xff00);
    assert_eq!(m.rflags, 2 | CF | ZF | OF);
}

#[test]
fn xchg_swaps_with_or_without_lock() {
    for code in [&[0x87, 0x08][..], &[0xf0, 0x87, 0x08]] {
        let mut m = mock64();
        m.set_device(REG, 4, 0x1111);
        m.gprs.rcx = 0xffff_ffff_2222_2222;
        run(&mut m, code, on_write(DEV));
        assert_eq!(m.gprs.rcx, 0x1111, "the old value, zero-extended");
        assert_eq!(accesses(&mut m), [(false, REG as u64, 4, 0x1111), (true, REG as u64, 4, 0x2222_2222)]);
    }
    // xchg [rax], cl.
    let mut m = mock64();
    m.set_device(REG, 1, 0xaa);
    m.gprs.rcx = 0x1234;
    run(&mut m, &[0x86, 0x08], on_write(DEV));
    assert_eq!((m.gprs.rcx, m.device_u64(REG, 1)), (0x12aa, 0x34));
}

#[test]
fn bit_test_family() {
    let kept = ZF | SF | PF | OF | AF;
    // (code, rcx, device offset, device before, after, CF)
    type Case = (&'static [u8], u64, usize, u64, u64, bool);
    let cases: &[Case] = &[
        (&[0x0f, 0xba, 0x20, 0x03], 0, REG, 0x8, 0x8, true), // bt dword [rax], 3
        (&[0x0f, 0xba, 0x28, 0x23], 0, REG, 0x0, 0x8, false), // bts dword [rax], 35: modulo 32
        (&[0x66, 0x0f, 0xba, 0x38, 0x11], 0, REG, 0x0, 0x2, false), // btc word [rax], 0x11: bit 1
        (&[0x48, 0x0f, 0xb3, 0x08], 69, REG + 8, 0x21, 0x01, true), // btr qword [rax], rcx: next qword, bit 5
        (&[0x0f, 0xa3, 0x08], 0xffff_ffff, REG - 4, 0x8000_0000, 0x8000_0000, true), // bt [rax], ecx = -1: dword before, bit 31
        (&[0x0f, 0xab, 0x08], 31, REG, 0x0, 0x8000_0000, false),                     // bts [rax], ecx
    ];
    for &(code, rcx, off, before, after, cf) in cases {
        let mut m = mock64();
        m.gprs.rcx = rcx;
        m.set_device(off, 4, before);
        m.rflags = 2 | kept;
        let access =
            if before != after || code[1] == 0xab { on_write(MMIO + off as u64) } else { on_read(MMIO + off as u64) };
        run(&mut m, code, access);
        assert_eq!(m.device_u64(off, 4), after, "{code:02x?}");
        assert_eq!(m.rflags, 2 | kept | if cf { CF } else { 0 }, "{code:02x?}: only CF changes");
        assert_eq!(accesses(&mut m)[0].1, off as u64, "{code:02x?}: address");
    }
}

// ---- string instructions ----

#[test]
fn rep_stos_fills_device_registers() {
    let mut m = mock64();
    m.gprs.rdi = MMIO + 0x10;
    m.gprs.rcx = 4;
    m.gprs.rax = 0xabcd;
    run(&mut m, &[0xf3, 0xab], on_write(MMIO + 0x10)); // rep stosd
    assert_eq!((m.gprs.rcx, m.gprs.rdi), (0, MMIO + 0x20));
    let log = accesses(&mut m);
    assert_eq!(
        log.iter().map(|a| (a.0, a.1, a.3)).collect::<Vec<_>>(),
        [0x10, 0x14, 0x18, 0x1c].map(|o| (true, o, 0xabcd))
    );
    // Without REP, one store and RCX untouched.
    m.gprs.rcx = 4;
    run(&mut m, &[0xaa], on_write(MMIO + 0x20)); // stosb
    assert_eq!((m.gprs.rcx, m.gprs.rdi), (4, MMIO + 0x21));
    assert_eq!(accesses(&mut m), [(true, 0x20, 1, 0xcd)]);
    // A count of zero does nothing but complete.
    m.gprs.rcx = 0;
    run(&mut m, &[0xf3, 0x48, 0xab], on_write(MMIO + 0x21));
    assert!(accesses(&mut m).is_empty());
}

#[test]
fn rep_movs_between_ram_and_the_device_both_ways() {
    let mut m = mock64();
    let src = DATA as usize;
    m.ram[src..src + 8].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    m.gprs.rsi = DATA;
    m.gprs.rdi = MMIO + 0x20;
    m.gprs.rcx = 8;
    run(&mut m, &[0xf3, 0xa4], on_write(MMIO + 0x20)); // rep movsb
    assert_eq!(&m.device[0x20..0x28], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!((m.gprs.rsi, m.gprs.rdi, m.gprs.rcx), (DATA + 8, MMIO + 0x28, 0));
    accesses(&mut m);
    // Device to RAM, backwards (DF): reads 0x40, 0x3c, 0x38.
    m.rflags |= DF;
    m.set_device(0x38, 4, 0x3333_3333);
    m.set_device(0x3c, 4, 0x2222_2222);
    m.set_device(0x40, 4, 0x1111_1111);
    m.gprs.rsi = MMIO + 0x40;
    m.gprs.rdi = DATA + 0x100;
    m.gprs.rcx = 3;
    run(&mut m, &[0xf3, 0xa5], on_read(MMIO + 0x40)); // rep movsd
    assert_eq!(accesses(&mut m).iter().map(|a| a.1).collect::<Vec<_>>(), [0x40, 0x3c, 0x38]);
    let d = (DATA + 0xf8) as usize;
    assert_eq!(m.ram[d..d + 12], [0x33, 0x33, 0x33, 0x33, 0x22, 0x22, 0x22, 0x22, 0x11, 0x11, 0x11, 0x11]);
    assert_eq!((m.gprs.rsi, m.gprs.rdi), (MMIO + 0x34, DATA + 0xf4));
    // lodsd into EAX (zero-extended).
    m.rflags &= !DF;
    m.gprs.rax = u64::MAX;
    m.gprs.rsi = MMIO + 0x40;
    run(&mut m, &[0xad], on_read(MMIO + 0x40));
    assert_eq!((m.gprs.rax, m.gprs.rsi), (0x1111_1111, MMIO + 0x44));
}

#[test]
fn a_string_instruction_may_overwrite_its_own_bytes() {
    // rep movsb from the device over the instruction itself (found by the
    // fuzzer, which first blamed the emulator for it): it completes, as on
    // the CPU, and the code page holds the device's bytes.
    let mut m = mock64();
    m.set_device(REG, 2, 0x9090);
    m.gprs.rsi = DEV;
    m.gprs.rdi = CODE;
    m.gprs.rcx = 2;
    run(&mut m, &[0xf3, 0xa4], on_read(DEV));
    assert_eq!(m.ram[CODE as usize..CODE as usize + 2], [0x90, 0x90]);
}

#[test]
fn movs_with_a_ram_operand_across_a_page_boundary() {
    let mut m = mock64();
    let at = (DATA + 0xffe) as usize;
    m.ram[at..at + 4].copy_from_slice(&[0xa, 0xb, 0xc, 0xd]);
    m.gprs.rsi = DATA + 0xffe;
    m.gprs.rdi = DEV;
    run(&mut m, &[0xa5], on_write(DEV)); // movsd
    assert_eq!(m.device_u64(REG, 4), 0x0d0c_0b0a);
}

#[test]
fn rep_stops_where_the_device_page_ends_and_resumes_by_reexecution() {
    let mut m = mock64();
    m.gprs.rdi = MMIO + 0xff8;
    m.gprs.rcx = 4;
    m.set_code(0, &[0xf3, 0xab]);
    let done = emulate(&mut m, &on_write(MMIO + 0xff8));
    assert_eq!(done, Ok(Emulated { len: 2, completed: false }));
    assert_eq!((m.gprs.rcx, m.gprs.rdi, m.rip), (2, MMIO + 0x1000, CODE), "two iterations, RIP on the instruction");
    assert_ne!(m.rflags & RF, 0, "RF set so a breakpoint does not fire again on resumption");
    assert_eq!(accesses(&mut m).len(), 2);
}

#[test]
fn rep_runs_at_most_a_budget_of_iterations_per_exit() {
    // The device mapped at two consecutive linear pages: the device operand
    // never leaves the device, so only the budget stops it.
    let mut m = mock64();
    m.map(MMIO_ALIAS + 0x1000, MMIO);
    m.gprs.rdi = MMIO_ALIAS;
    m.gprs.rcx = 10_000;
    m.set_code(0, &[0xf3, 0xaa]); // rep stosb
    assert_eq!(emulate(&mut m, &on_write(MMIO)), Ok(Emulated { len: 2, completed: false }));
    assert_eq!(m.gprs.rcx, 10_000 - exec::REP_BUDGET);
    assert_eq!(m.log.len() as u64, exec::REP_BUDGET);
}

#[test]
fn string_address_and_count_registers_follow_the_address_size() {
    // 16-bit: rep stosw with CX and DI; the upper bits of RCX/RDI stay.
    let mut m = Mock::new(Mode::Bits16);
    m.seg_base[Seg::Es as usize] = MMIO_REAL;
    m.gprs.rdi = 0x1234_0000_0000_0010;
    m.gprs.rcx = 0x5678_0000_0000_0002;
    m.gprs.rax = 0xbeef;
    run(&mut m, &[0xf3, 0xab], on_write(MMIO_REAL + 0x10));
    assert_eq!((m.gprs.rdi, m.gprs.rcx), (0x1234_0000_0000_0014, 0x5678_0000_0000_0000));
    assert_eq!(accesses(&mut m), [(true, 0x10, 2, 0xbeef), (true, 0x12, 2, 0xbeef)]);
    // 64-bit with 67: EDI and ECX, written back zero-extended.
    let mut m = mock64();
    m.gprs.rdi = 0xffff_0000_0000_0000 | (MMIO + 0x10);
    m.gprs.rcx = 0xffff_0000_0000_0001;
    run(&mut m, &[0x67, 0xf3, 0xab], on_write(MMIO + 0x10));
    assert_eq!((m.gprs.rdi, m.gprs.rcx), (MMIO + 0x14, 0));
}

// ---- string port I/O (INS/OUTS) ----

fn port_exit(port: u16, size: u8, write: bool) -> PortExit {
    PortExit { port, size, write }
}

#[test]
fn rep_outsb_sends_guest_memory_to_the_port() {
    let mut m = mock64();
    let at = DATA as usize;
    m.ram[at..at + 5].copy_from_slice(b"hello");
    m.gprs.rsi = DATA;
    m.gprs.rdx = 0x3f8;
    m.gprs.rcx = 5;
    m.set_code(0, &[0xf3, 0x6e]); // rep outsb
    assert_eq!(string_io(&mut m, &port_exit(0x3f8, 1, true)), Ok(Emulated { len: 2, completed: true }));
    assert_eq!(m.port_log.iter().map(|a| a.3 as u8).collect::<Vec<_>>(), b"hello");
    assert!(m.port_log.iter().all(|a| a.0 == 0x3f8 && a.1 == 1 && a.2));
    assert_eq!((m.gprs.rsi, m.gprs.rcx, m.rip), (DATA + 5, 0, CODE + 2));
    // OUTSD with an FS override reads FS:RSI; without REP RCX stays.
    let mut m = mock64();
    m.seg_base[Seg::Fs as usize] = DATA;
    m.ram[at + 0x20..at + 0x24].copy_from_slice(&[1, 2, 3, 4]);
    m.gprs.rsi = 0x20;
    m.gprs.rdx = 0x510;
    m.gprs.rcx = 9;
    m.set_code(0, &[0x64, 0x6f]); // outsd fs:[rsi]
    assert_eq!(string_io(&mut m, &port_exit(0x510, 4, true)), Ok(Emulated { len: 2, completed: true }));
    assert_eq!(m.port_log, [(0x510, 4, true, 0x0403_0201)]);
    assert_eq!((m.gprs.rsi, m.gprs.rcx), (0x24, 9));
}

#[test]
fn rep_insw_fills_guest_memory_backwards_and_across_a_page() {
    let mut m = mock64();
    // Two words, DF set, the second straddling nothing; a word at 0xfff
    // of a page goes in two pieces.
    m.rflags |= DF;
    m.gprs.rdi = DATA + 0xfff;
    m.gprs.rdx = 0x1ce;
    m.gprs.rcx = 2;
    m.set_code(0, &[0xf3, 0x66, 0x6d]); // rep insw
    assert_eq!(string_io(&mut m, &port_exit(0x1ce, 2, false)), Ok(Emulated { len: 3, completed: true }));
    let at = (DATA + 0xffd) as usize;
    assert_eq!(m.ram[at..at + 4], [0x12, 0x00, 0x11, 0x00]);
    assert_eq!((m.gprs.rdi, m.gprs.rcx), (DATA + 0xffb, 0));
    assert_eq!(m.port_log, [(0x1ce, 2, false, 0x11), (0x1ce, 2, false, 0x12)]);
}

#[test]
fn string_io_stops_before_a_fault_and_resumes_by_reexecution() {
    // INSB into a page with no translation after two good bytes: two
    // iterations, RIP on the instruction, the fault left for re-execution.
    let mut m = mock64();
    m.gprs.rdi = HOLE - 2;
    m.gprs.rdx = 0x60;
    m.gprs.rcx = 5;
    m.set_code(0, &[0xf3, 0x6c]); // rep insb
    assert_eq!(string_io(&mut m, &port_exit(0x60, 1, false)), Ok(Emulated { len: 2, completed: false }));
    assert_eq!((m.gprs.rdi, m.gprs.rcx, m.rip), (HOLE, 3, CODE));
    assert_ne!(m.rflags & RF, 0);
    assert_eq!(m.port_log.len(), 2);
    // Re-executed: the fault comes before any port access (a UART's
    // receive buffer is not drained for a byte that goes nowhere).
    assert_eq!(string_io(&mut m, &port_exit(0x60, 1, false)), Err(Error::PageFault { gva: HOLE, error_code: 0b10 }));
    assert_eq!(m.port_log.len(), 2);
    // A port write that ends the VM stops the instruction after it.
    let mut m = mock64();
    m.gprs.rsi = DATA;
    m.gprs.rdx = 0x604;
    m.gprs.rcx = 4;
    m.stop_after_port_writes = Some(1);
    m.set_code(0, &[0xf3, 0x6e]);
    assert_eq!(string_io(&mut m, &port_exit(0x604, 1, true)), Ok(Emulated { len: 2, completed: false }));
    assert_eq!((m.port_log.len(), m.gprs.rcx), (1, 3));
}

#[test]
fn string_io_that_is_not_the_exit_is_refused() {
    let mut m = mock64();
    m.gprs.rdx = 0x3f8;
    m.gprs.rsi = DATA;
    for (code, exit) in [
        (&[0x6e][..], port_exit(0x3f9, 1, true)),  // another port
        (&[0x6e][..], port_exit(0x3f8, 2, true)),  // another width
        (&[0x6e][..], port_exit(0x3f8, 1, false)), // another direction
        (&[0xee][..], port_exit(0x3f8, 1, true)),  // OUT DX, AL: not a string
    ] {
        m.set_code(0, code);
        assert_eq!(string_io(&mut m, &exit), Err(Error::NotThePortExit), "{code:02x?}");
    }
    // A memory operand that is not RAM: refused before the port is touched.
    m.gprs.rsi = MMIO;
    m.set_code(0, &[0x6e]);
    assert_eq!(string_io(&mut m, &port_exit(0x3f8, 1, true)), Err(Error::NotRam { gpa: MMIO }));
    assert!(m.port_log.is_empty());
    assert_eq!(m.rip, CODE);
}

// ---- refusals ----

#[test]
fn fetch_faults_are_page_faults_with_the_fetch_bit() {
    let mut m = mock64();
    m.rip = HOLE + 0x10;
    assert_eq!(emulate(&mut m, &on_write(DEV)), Err(Error::PageFault { gva: HOLE + 0x10, error_code: 0x10 }));
    m.cpl = 3;
    assert_eq!(emulate(&mut m, &on_write(DEV)), Err(Error::PageFault { gva: HOLE + 0x10, error_code: 0x14 }));
    // An instruction that ends before the unmapped page does not need it...
    let mut m = mock64();
    m.set_code(0xffe, &[0x89, 0x18]);
    assert_eq!(emulate(&mut m, &on_write(DEV)), Ok(Emulated { len: 2, completed: true }));
    // ...one that continues into it faults there.
    let mut m = mock64();
    m.set_code(0xffe, &[0x48, 0x89, 0x18]);
    assert_eq!(emulate(&mut m, &on_write(DEV)), Err(Error::PageFault { gva: HOLE, error_code: 0x10 }));
    assert!(m.log.is_empty());
}

#[test]
fn operand_page_faults_carry_the_address_and_direction() {
    let mut m = mock64();
    m.gprs.rax = HOLE + 8;
    let e = refuse(&mut m, &[0x89, 0x18], on_write(DEV));
    assert_eq!(e, Error::PageFault { gva: HOLE + 8, error_code: 0x2 });
    assert_eq!(e.fault(), Some(Event::Exception { vector: 14, error_code: Some(2) }));
    assert_eq!(refuse(&mut m, &[0x8b, 0x18], on_read(DEV)), Error::PageFault { gva: HOLE + 8, error_code: 0 });
}

#[test]
fn invalid_and_overlong_instructions() {
    let mut m = mock64();
    // PUSH ES does not exist in 64-bit mode; LOCK MOV does not exist anywhere.
    assert_eq!(refuse(&mut m, &[0x06], on_write(DEV)), Error::InvalidOpcode);
    assert_eq!(refuse(&mut m, &[0xf0, 0x89, 0x18], on_write(DEV)), Error::InvalidOpcode);
    assert_eq!(Error::InvalidOpcode.fault(), Some(Event::UD));
    // Thirteen redundant prefixes make 15 bytes: allowed...
    let mut code = alloc::vec![0x66; 13];
    code.extend_from_slice(&[0x89, 0x18]);
    m.gprs.rbx = 0x1234;
    run(&mut m, &code, on_write(DEV));
    assert_eq!(accesses(&mut m), [(true, REG as u64, 2, 0x1234)]);
    // ...fourteen make 16: #GP(0).
    let mut code = alloc::vec![0x66; 14];
    code.extend_from_slice(&[0x89, 0x18]);
    assert_eq!(refuse(&mut m, &code, on_write(DEV)), Error::TooLong);
    assert_eq!(refuse(&mut m, &[0x66; 15], on_write(DEV)), Error::TooLong);
    assert_eq!(Error::TooLong.fault(), Some(Event::GP0));
}

#[test]
fn instructions_and_operands_not_emulated() {
    let mut m = mock64();
    let cases: &[(&[u8], Error)] = &[
        (&[0x0f, 0xaf, 0x08], Error::NotEmulated { mnemonic: Mnemonic::Imul }), // imul ecx, [rax]
        (&[0x66, 0x0f, 0x6f, 0x00], Error::NotEmulated { mnemonic: Mnemonic::Movdqa }), // movdqa xmm0, [rax]
        (&[0xd1, 0x20], Error::NotEmulated { mnemonic: Mnemonic::Shl }),        // shl dword [rax], 1
        (&[0x0f, 0xb1, 0x08], Error::NotEmulated { mnemonic: Mnemonic::Cmpxchg }),
        (&[0xa6], Error::NotEmulated { mnemonic: Mnemonic::Cmpsb }),
        (&[0xff, 0x30], Error::NotEmulated { mnemonic: Mnemonic::Push }), // push qword [rax]
        (&[0x8c, 0x00], Error::UnsupportedOperand { mnemonic: Mnemonic::Mov }), // mov [rax], es
        (&[0x8e, 0x00], Error::UnsupportedOperand { mnemonic: Mnemonic::Mov }), // mov es, [rax]
    ];
    for (code, want) in cases {
        let e = refuse(&mut m, code, on_write(DEV));
        assert_eq!(e, *want, "{code:02x?}");
        assert_eq!(e.fault(), None, "{code:02x?}: stops the VM");
    }
}

#[test]
fn vex_and_evex_instructions_stop_the_vm_rather_than_raise_ud() {
    let mut m = mock64();
    let vmovdqa = [0xc5, 0xf9, 0x6f, 0x00]; // vmovdqa xmm0, [rax]
    let e = refuse(&mut m, &vmovdqa, on_read(DEV));
    assert_eq!((e, e.fault()), (Error::VectorInstruction, None));
    // vmovdqu ymm0, [rax] (3-byte VEX) behind a segment override.
    assert_eq!(refuse(&mut m, &[0x3e, 0xc4, 0xe1, 0x7e, 0x6f, 0x00], on_read(DEV)), Error::VectorInstruction);
    // vmovdqu32 zmm0, [rax] (EVEX).
    assert_eq!(refuse(&mut m, &[0x62, 0xf1, 0x7e, 0x48, 0x6f, 0x00], on_read(DEV)), Error::VectorInstruction);
    // VEX after 66h or REX is #UD on the CPU too.
    assert_eq!(refuse(&mut m, &[0x66, 0xc5, 0xf9, 0x6f, 0x00], on_read(DEV)), Error::InvalidOpcode);
    assert_eq!(refuse(&mut m, &[0x48, 0xc5, 0xf9, 0x6f, 0x00], on_read(DEV)), Error::InvalidOpcode);
    // In 32-bit mode C5h with a memory ModRM is LDS, with bits 7:6 set VEX.
    let mut m = Mock::new(Mode::Bits32);
    m.gprs.rax = DEV;
    assert_eq!(refuse(&mut m, &vmovdqa, on_read(DEV)), Error::VectorInstruction);
    assert_eq!(refuse(&mut m, &[0xc5, 0x00], on_read(DEV)), Error::NotEmulated { mnemonic: Mnemonic::Lds });
}

#[test]
fn locked_read_modify_write_is_refused() {
    let mut m = mock64();
    assert_eq!(refuse(&mut m, &[0xf0, 0x01, 0x18], on_write(DEV)), Error::Locked); // lock add [rax], ebx
    assert_eq!(refuse(&mut m, &[0xf0, 0x0f, 0xab, 0x08], on_write(DEV)), Error::Locked); // lock bts [rax], ecx
}

#[test]
fn accesses_that_are_not_the_exit() {
    let mut m = mock64();
    // A store when the exit was a read, a load when it was a write.
    assert_eq!(refuse(&mut m, &[0x89, 0x18], on_read(DEV)), Error::NotTheFaultingAccess);
    assert_eq!(refuse(&mut m, &[0x8b, 0x18], on_write(DEV)), Error::NotTheFaultingAccess);
    // The exit was for another page.
    assert_eq!(refuse(&mut m, &[0x89, 0x18], on_write(DEV + 0x1000)), Error::NotTheFaultingAccess);
    // The CPU's linear address is on another page than the operand's.
    let fault = MmioFault { gva: Some(MMIO_ALIAS), ..on_write(DEV) };
    assert_eq!(refuse(&mut m, &[0x89, 0x18], fault), Error::NotTheFaultingAccess);
    // No memory operand at all.
    assert_eq!(refuse(&mut m, &[0x89, 0xd8], on_write(DEV)), Error::NotTheFaultingAccess);
    // MOVS between two RAM addresses.
    m.gprs.rsi = DATA;
    m.gprs.rdi = DATA + 0x100;
    assert_eq!(refuse(&mut m, &[0xa4], on_write(DEV)), Error::NotTheFaultingAccess);
    // Executing from the device.
    let fetch = MmioFault { access: MemAccess::Execute, ..on_read(DEV) };
    assert_eq!(refuse(&mut m, &[0x90], fetch), Error::FetchFromMmio);
}

#[test]
fn split_and_non_canonical_accesses() {
    let mut m = mock64();
    m.gprs.rax = MMIO + 0xffe;
    assert_eq!(refuse(&mut m, &[0x89, 0x18], on_write(MMIO)), Error::SplitAccess { gva: MMIO + 0xffe });
    m.gprs.rax = 0x8000_0000_0000_0000;
    let e = refuse(&mut m, &[0x89, 0x18], on_write(DEV));
    assert_eq!((e, e.fault()), (Error::NonCanonical { stack: false }, Some(Event::GP0)));
    // Through RBP the default segment is SS: #SS(0).
    m.gprs.rbp = 0x8000_0000_0000_0000;
    let e = refuse(&mut m, &[0x89, 0x5d, 0x00], on_write(DEV)); // mov [rbp+0], ebx
    assert_eq!(e.fault(), Some(Event::Exception { vector: 12, error_code: Some(0) }));
}

#[test]
fn code_and_string_operands_outside_ram() {
    let mut m = mock64();
    // Code on a page that maps to nothing.
    m.map(0x4000_5000, 0xfec0_0000);
    m.rip = 0x4000_5000;
    assert_eq!(emulate(&mut m, &on_write(DEV)), Err(Error::CodeNotInRam { gpa: 0xfec0_0000 }));
    // MOVS from an unbacked page to the device.
    let mut m = mock64();
    m.map(0x4000_5000, 0xfec0_0000);
    m.gprs.rsi = 0x4000_5000;
    m.gprs.rdi = DEV;
    assert_eq!(refuse(&mut m, &[0xa5], on_write(DEV)), Error::NotRam { gpa: 0xfec0_0000 });
}

#[test]
fn every_refusal_has_a_report() {
    let all = [
        Error::PageFault { gva: 1, error_code: 2 },
        Error::InvalidOpcode,
        Error::TooLong,
        Error::NonCanonical { stack: true },
        Error::FetchFromMmio,
        Error::CodeNotInRam { gpa: 3 },
        Error::NotEmulated { mnemonic: Mnemonic::Imul },
        Error::VectorInstruction,
        Error::UnsupportedOperand { mnemonic: Mnemonic::Mov },
        Error::Locked,
        Error::NotTheFaultingAccess,
        Error::SplitAccess { gva: 4 },
        Error::NotRam { gpa: 5 },
    ];
    for e in all {
        let text = alloc::format!("{e}");
        assert!(text.chars().next().is_some_and(|c| c.is_ascii_uppercase()), "{text}");
        assert!(!text.ends_with('.'), "{text}");
    }
}

#[test]
fn warm_up_then_decode() {
    warm_up();
    let mut m = mock64();
    run(&mut m, &[0x89, 0x18], on_write(DEV));
}
