//! Host tests of the write decoder against a fake vCPU whose guest memory
//! holds the instruction bytes.

extern crate std;
use std::vec;

use super::*;
use crate::vcpu::{CpuMode, Event, Exit};
use thinvisor_memory::pagetable::{PageTables, NX, RW, SIZE_4K, US};
use thinvisor_memory::{pf_error, GuestPhysAddr, GuestPhysMemory, IsolatedMemory, PagingMode};

const RAM: usize = 1 << 20;
/// Flat 32-bit code segment access rights (G, D, P, S, type B).
const CODE32: u16 = 0xC09B;
/// 64-bit code segment (G, L, P, S, type B).
const CODE64: u16 = 0xA09B;
/// 16-bit code segment.
const CODE16: u16 = 0x009B;

struct FakeVcpu {
    regs: [u64; 16],
    rip: u64,
    cs_base: u64,
    cs_access: u16,
    rflags: u64,
    cpl: u8,
    paging: PagingRegs,
    /// Shared, as the VM's memory is between its vCPUs.
    mem: &'static IsolatedMemory<'static>,
    completed: Option<u64>,
}

impl FakeVcpu {
    /// 64-bit mode, paging off in the tables' sense (identity), RIP 0x1000.
    fn new(bits: CodeBits) -> Self {
        let (cr0, efer, cs_access) = match bits {
            CodeBits::Bits64 => (
                PagingRegs::CR0_PE | PagingRegs::CR0_PG,
                PagingRegs::EFER_LMA,
                CODE64,
            ),
            CodeBits::Bits32 => (PagingRegs::CR0_PE, 0, CODE32),
            CodeBits::Bits16 => (0, 0, CODE16),
        };
        Self {
            regs: [0; 16],
            rip: 0x1000,
            cs_base: 0,
            cs_access,
            rflags: 2,
            cpl: 0,
            // 64-bit mode needs paging on; these tests only build real
            // tables where they need them, so CR3 starts at a table that
            // identity-maps the first MiB (see `identity64`).
            paging: PagingRegs {
                cr0,
                cr3: 0,
                cr4: 0,
                efer,
            },
            mem: std::boxed::Box::leak(std::boxed::Box::new(IsolatedMemory::new(
                vec![0u8; RAM].leak(),
            ))),
            completed: None,
        }
    }

    fn put(&mut self, gpa: u64, bytes: &[u8]) {
        self.mem.write_phys(GuestPhysAddr::new(gpa), bytes).unwrap();
    }

    /// Puts `insn` at CS:RIP (paging identity or off).
    fn with_insn(mut self, insn: &[u8]) -> Self {
        let at = self.cs_base + self.rip;
        self.put(at, insn);
        self
    }

    fn set(&mut self, reg: Gpr, value: u64) {
        self.regs[reg as usize] = value;
    }
}

impl Vcpu for FakeVcpu {
    fn cs_access(&self) -> u16 {
        self.cs_access
    }
    fn rflags(&self) -> u64 {
        self.rflags
    }
    fn complete_instruction(&mut self, next_rip: u64) {
        self.completed = Some(next_rip);
        self.rip = next_rip;
    }
    fn gpr(&self, reg: Gpr) -> u64 {
        self.regs[reg as usize]
    }
    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        self.regs[reg as usize] = value;
    }
    fn rip(&self) -> u64 {
        self.rip
    }
    fn rip_linear(&self) -> u64 {
        self.cs_base.wrapping_add(self.rip)
    }
    fn paging(&self) -> PagingRegs {
        self.paging
    }
    fn mode(&self) -> CpuMode {
        CpuMode {
            cpl: self.cpl,
            long64: CodeBits::of(
                self.paging.cr0,
                self.paging.efer,
                self.cs_access,
                self.rflags,
            ) == CodeBits::Bits64,
        }
    }
    fn memory(&self) -> &dyn GuestPhysMemory {
        self.mem
    }
    fn skip_instruction(&mut self) {
        panic!("the emulator must not use skip_instruction: the exit has no length");
    }
    fn inject(&mut self, _: Event) {}
    fn run(&mut self) -> Exit {
        Exit::Hlt
    }
}

/// Page tables at 0xC0000.. identity-mapping the first MiB with 4 KiB
/// pages (RW, supervisor), for 64-bit mode.
const TABLES: (u64, u64) = (0xC0000, 0x100000);

fn paged(mut vcpu: FakeVcpu) -> (FakeVcpu, PageTables) {
    let mut pt = PageTables::new(vcpu.mem, PagingMode::Level4, TABLES.0, TABLES.1).unwrap();
    pt.map_range(vcpu.mem, 0, 0, 0x80000, RW).unwrap();
    vcpu.paging = PagingRegs {
        efer: vcpu.paging.efer | pt.regs().efer,
        ..pt.regs()
    };
    (vcpu, pt)
}

fn vcpu64(insn: &[u8]) -> FakeVcpu {
    paged(FakeVcpu::new(CodeBits::Bits64)).0.with_insn(insn)
}

fn vcpu32(insn: &[u8]) -> FakeVcpu {
    FakeVcpu::new(CodeBits::Bits32).with_insn(insn)
}

fn vcpu16(insn: &[u8]) -> FakeVcpu {
    FakeVcpu::new(CodeBits::Bits16).with_insn(insn)
}

fn store(len: u8, size: u8, value: u64, bits: CodeBits) -> MemWrite {
    MemWrite {
        len,
        size,
        value,
        kind: WriteKind::Store,
        bits,
    }
}

fn decode(vcpu: &FakeVcpu) -> Result<MemWrite, EmulateError> {
    decode_write(vcpu)
}

const RAX: u64 = 0x1122_3344_5566_7788;

fn regs_pattern(v: &mut FakeVcpu) {
    for (i, r) in v.regs.iter_mut().enumerate() {
        // Each register distinct in every byte that an operand can pick.
        let i = i as u64;
        *r = (i << 60)
            | (i << 52)
            | (i << 36)
            | (i << 28)
            | (i << 20)
            | (i << 12)
            | (i << 4)
            | 0x0101_0101_0101_0101;
    }
    v.set(Gpr::Rax, RAX);
}

#[test]
fn mode_comes_from_pe_lma_l_d_and_vm() {
    use CodeBits::*;
    const PE: u64 = PagingRegs::CR0_PE;
    const LMA: u64 = PagingRegs::EFER_LMA;
    assert_eq!(CodeBits::of(0, 0, CODE32, 0), Bits16, "real mode");
    assert_eq!(CodeBits::of(0, LMA, CODE64, 0), Bits16, "PE off wins");
    assert_eq!(CodeBits::of(PE, 0, CODE32, 0), Bits32);
    assert_eq!(CodeBits::of(PE, 0, CODE16, 0), Bits16);
    assert_eq!(
        CodeBits::of(PE, 0, CODE64, 0),
        Bits16,
        "L ignored without LMA"
    );
    assert_eq!(CodeBits::of(PE, LMA, CODE64, 0), Bits64);
    assert_eq!(
        CodeBits::of(PE, LMA, CODE32, 0),
        Bits32,
        "compatibility mode"
    );
    assert_eq!(CodeBits::of(PE, LMA, CODE16, 0), Bits16);
    assert_eq!(
        CodeBits::of(PE, 0, CODE32, RFLAGS_VM),
        Bits16,
        "virtual-8086"
    );
}

// ---- 64-bit mode -----------------------------------------------------------

#[test]
fn linux_xapic_writes_64() {
    // mov %eax,(%rdx)
    let mut v = vcpu64(&[0x89, 0x02]);
    regs_pattern(&mut v);
    let w = decode(&v).unwrap();
    assert_eq!(w, store(2, 4, 0x5566_7788, CodeBits::Bits64));
    assert!(w.is_plain_store() && !w.needs_old_value());
    // mov %eax,0xffffffffff5fd0b0 (absolute, SIB without base)
    let v = vcpu64(&[0x89, 0x04, 0x25, 0xB0, 0xD0, 0x5F, 0xFF]);
    assert_eq!(decode(&v).unwrap().len, 7);
    // movl $0x0,0xfee000b0(%rip)-style absolute with imm32: EOI.
    let v = vcpu64(&[0xC7, 0x04, 0x25, 0xB0, 0x00, 0xE0, 0xFE, 0, 0, 0, 0]);
    assert_eq!(decode(&v).unwrap(), store(11, 4, 0, CodeBits::Bits64));
    // mov %ecx,0x300(%rax) with disp32
    let mut v = vcpu64(&[0x89, 0x88, 0x00, 0x03, 0x00, 0x00]);
    v.set(Gpr::Rcx, 0xFFFF_FFFF_000C_4500);
    assert_eq!(
        decode(&v).unwrap(),
        store(6, 4, 0x000C_4500, CodeBits::Bits64)
    );
}

#[test]
fn rex_prefixes_pick_registers_and_sizes() {
    use RegPart::*;
    let cases: &[(&[u8], u8, Gpr, RegPart)] = &[
        (&[0x48, 0x89, 0x02], 3, Gpr::Rax, Qword), // mov %rax,(%rdx)
        (&[0x44, 0x89, 0x02], 3, Gpr::R8, Dword),  // mov %r8d,(%rdx)
        (&[0x4C, 0x89, 0x3A], 3, Gpr::R15, Qword), // mov %r15,(%rdx)
        (&[0x41, 0x89, 0x00], 3, Gpr::Rax, Dword), // mov %eax,(%r8)
        (&[0x44, 0x88, 0x0A], 3, Gpr::R9, Low8),   // mov %r9b,(%rdx)
        (&[0x40, 0x88, 0x32], 3, Gpr::Rsi, Low8),  // mov %sil,(%rdx), not %dh
        (&[0x40, 0x88, 0x22], 3, Gpr::Rsp, Low8),  // mov %spl,(%rdx), not %ah
        (&[0x66, 0x89, 0x02], 3, Gpr::Rax, Word),  // mov %ax,(%rdx)
        (&[0x66, 0x44, 0x89, 0x12], 4, Gpr::R10, Word), // mov %r10w,(%rdx)
        (&[0x4D, 0x89, 0x64, 0x24, 0x08], 5, Gpr::R12, Qword), // mov %r12,8(%r12)
    ];
    for &(bytes, len, reg, part) in cases {
        let mut v = vcpu64(bytes);
        regs_pattern(&mut v);
        let r = v.gpr(reg);
        let (size, value) = match part {
            Low8 => (1, r & 0xFF),
            High8 => (1, (r >> 8) & 0xFF),
            Word => (2, r & 0xFFFF),
            Dword => (4, r & 0xFFFF_FFFF),
            Qword => (8, r),
        };
        assert_eq!(
            decode(&v),
            Ok(store(len, size, value, CodeBits::Bits64)),
            "{bytes:x?}"
        );
    }
}

#[test]
fn high_byte_registers_without_rex() {
    let mut v = vcpu64(&[0x88, 0x22]); // mov %ah,(%rdx)
    v.set(Gpr::Rax, 0xAB_CD);
    assert_eq!(decode(&v).unwrap().value, 0xAB);
    for (modrm, reg) in [(0x2A, Gpr::Rcx), (0x32, Gpr::Rdx), (0x3A, Gpr::Rbx)] {
        let mut v = vcpu64(&[0x88, modrm]); // ch, dh, bh
        v.set(reg, 0x5A_00 | 0x11);
        assert_eq!(decode(&v).unwrap().value, 0x5A, "{modrm:#x}");
    }
    // Same in 16-bit and 32-bit code.
    let mut v = vcpu16(&[0x88, 0x3F]); // mov %bh,(%bx)
    v.set(Gpr::Rbx, 0x7E_01);
    assert_eq!(decode(&v).unwrap(), store(2, 1, 0x7E, CodeBits::Bits16));
    let mut v = vcpu32(&[0x88, 0x20]); // mov %ah,(%eax)
    v.set(Gpr::Rax, 0x9900);
    assert_eq!(decode(&v).unwrap(), store(2, 1, 0x99, CodeBits::Bits32));
}

#[test]
fn immediates_are_sign_extended_as_the_instruction_does() {
    let cases: &[(&[u8], u8, u8, u64)] = &[
        (&[0xC6, 0x02, 0x80], 3, 1, 0x80),
        (&[0x66, 0xC7, 0x02, 0x00, 0x80], 5, 2, 0x8000),
        (&[0xC7, 0x02, 0x00, 0x45, 0x0C, 0x80], 6, 4, 0x800C_4500),
        (
            &[0x48, 0xC7, 0x02, 0xFF, 0xFF, 0xFF, 0xFF],
            7,
            8,
            0xFFFF_FFFF_FFFF_FFFF,
        ),
        (
            &[0x48, 0xC7, 0x02, 0x00, 0x00, 0x00, 0x80],
            7,
            8,
            0xFFFF_FFFF_8000_0000,
        ),
        (
            &[0x48, 0xC7, 0x02, 0x78, 0x56, 0x34, 0x12],
            7,
            8,
            0x1234_5678,
        ),
    ];
    for &(bytes, len, size, value) in cases {
        let v = vcpu64(bytes);
        assert_eq!(
            decode(&v),
            Ok(store(len, size, value, CodeBits::Bits64)),
            "{bytes:x?}"
        );
    }
}

#[test]
fn moffs_stores_in_every_mode() {
    let mut v = vcpu64(&[0xA3, 0x00, 0x03, 0xE0, 0xFE, 0, 0, 0, 0]);
    v.set(Gpr::Rax, RAX);
    assert_eq!(decode(&v), Ok(store(9, 4, 0x5566_7788, CodeBits::Bits64)));
    let mut v = vcpu64(&[0x48, 0xA3, 0x00, 0x03, 0xE0, 0xFE, 0, 0, 0, 0]);
    v.set(Gpr::Rax, RAX);
    assert_eq!(decode(&v), Ok(store(10, 8, RAX, CodeBits::Bits64)));
    let mut v = vcpu64(&[0xA2, 0x00, 0x03, 0xE0, 0xFE, 0, 0, 0, 0]);
    v.set(Gpr::Rax, RAX);
    assert_eq!(decode(&v), Ok(store(9, 1, 0x88, CodeBits::Bits64)));
    // 32-bit: 4-byte offset.
    let mut v = vcpu32(&[0xA3, 0x00, 0x03, 0xE0, 0xFE]);
    v.set(Gpr::Rax, RAX);
    assert_eq!(decode(&v), Ok(store(5, 4, 0x5566_7788, CodeBits::Bits32)));
    let mut v = vcpu32(&[0x66, 0xA3, 0x00, 0x03, 0xE0, 0xFE]);
    v.set(Gpr::Rax, RAX);
    assert_eq!(decode(&v), Ok(store(6, 2, 0x7788, CodeBits::Bits32)));
    // 16-bit: 2-byte offset; 66 makes it EAX.
    let mut v = vcpu16(&[0xA3, 0x00, 0x03]);
    v.set(Gpr::Rax, RAX);
    assert_eq!(decode(&v), Ok(store(3, 2, 0x7788, CodeBits::Bits16)));
    let mut v = vcpu16(&[0x66, 0xA3, 0x00, 0x03]);
    v.set(Gpr::Rax, RAX);
    assert_eq!(decode(&v), Ok(store(4, 4, 0x5566_7788, CodeBits::Bits16)));
    // ... and 67 a 4-byte offset.
    let mut v = vcpu16(&[0x67, 0x66, 0xA3, 0x00, 0x03, 0xE0, 0xFE]);
    v.set(Gpr::Rax, RAX);
    assert_eq!(decode(&v), Ok(store(7, 4, 0x5566_7788, CodeBits::Bits16)));
}

#[test]
fn xchg_returns_the_register_for_the_old_value() {
    // xchg %eax,(%rdx): Linux's xAPIC write on CPUs with the 11AP erratum.
    let mut v = vcpu64(&[0x87, 0x02]);
    v.set(Gpr::Rax, RAX);
    let w = decode(&v).unwrap();
    let reg = RegOperand {
        reg: Gpr::Rax,
        part: RegPart::Dword,
    };
    assert_eq!(w.kind, WriteKind::Exchange { reg });
    assert_eq!((w.len, w.size, w.value), (2, 4, 0x5566_7788));
    assert!(w.needs_old_value() && !w.is_plain_store());
    w.finish(&mut v, 0xFFFF_FFFF_0000_0042);
    assert_eq!(v.gpr(Gpr::Rax), 0x42, "32-bit write zero-extends");
    assert_eq!(v.completed, Some(0x1002));

    // xchg %ah,(%rdx): only bits 15:8 change.
    let mut v = vcpu64(&[0x86, 0x22]);
    v.set(Gpr::Rax, 0x1234_5678);
    let w = decode(&v).unwrap();
    assert_eq!((w.size, w.value), (1, 0x56));
    w.finish(&mut v, 0xAB);
    assert_eq!(v.gpr(Gpr::Rax), 0x1234_AB78);

    // xchg %r11,(%rax) and a 16-bit one.
    let mut v = vcpu64(&[0x4C, 0x87, 0x18]);
    v.set(Gpr::R11, 7);
    let w = decode(&v).unwrap();
    assert_eq!((w.len, w.size, w.value), (3, 8, 7));
    w.finish(&mut v, u64::MAX);
    assert_eq!(v.gpr(Gpr::R11), u64::MAX);
    let mut v = vcpu16(&[0x87, 0x0F]); // xchg %cx,(%bx)
    v.set(Gpr::Rcx, 0xDEAD_BEEF);
    let w = decode(&v).unwrap();
    assert_eq!((w.len, w.size, w.value), (2, 2, 0xBEEF));
    w.finish(&mut v, 0x1_2345);
    assert_eq!(v.gpr(Gpr::Rcx), 0xDEAD_2345);
    // LOCK XCHG is what XCHG with memory does anyway.
    let v = vcpu32(&[0xF0, 0x87, 0x02]);
    assert_eq!(decode(&v).unwrap().len, 3);
}

#[test]
fn stos_without_rep_moves_the_index_register() {
    let cases: &[(&[u8], CodeBits, u8, u8)] = &[
        (&[0xAA], CodeBits::Bits64, 1, 64),
        (&[0xAB], CodeBits::Bits64, 4, 64),
        (&[0x66, 0xAB], CodeBits::Bits64, 2, 64),
        (&[0x48, 0xAB], CodeBits::Bits64, 8, 64),
        (&[0x67, 0xAB], CodeBits::Bits64, 4, 32),
        (&[0xAB], CodeBits::Bits32, 4, 32),
        (&[0x67, 0xAA], CodeBits::Bits32, 1, 16),
        (&[0xAB], CodeBits::Bits16, 2, 16),
        (&[0x66, 0xAB], CodeBits::Bits16, 4, 16),
    ];
    for &(bytes, bits, size, addr_bits) in cases {
        for df in [false, true] {
            let mut v = match bits {
                CodeBits::Bits64 => vcpu64(bytes),
                CodeBits::Bits32 => vcpu32(bytes),
                CodeBits::Bits16 => vcpu16(bytes),
            };
            v.set(Gpr::Rax, RAX);
            v.rflags = if df { 2 | RFLAGS_DF } else { 2 };
            let rdi = 0xAAAA_BBBB_0000_FFFC;
            v.set(Gpr::Rdi, rdi);
            let w = decode(&v).unwrap();
            assert_eq!(
                w.kind,
                WriteKind::StoreString {
                    addr_bits,
                    backwards: df
                },
                "{bytes:x?} {bits:?}"
            );
            assert_eq!(w.size, size);
            assert_eq!(w.value, RAX & (u64::MAX >> (64 - 8 * u32::from(size))));
            w.finish(&mut v, 0);
            let step = u64::from(size);
            let moved = if df {
                rdi.wrapping_sub(step)
            } else {
                rdi.wrapping_add(step)
            };
            let expect = match addr_bits {
                16 => (rdi & !0xFFFF) | (moved & 0xFFFF),
                32 => moved & 0xFFFF_FFFF,
                _ => moved,
            };
            assert_eq!(v.gpr(Gpr::Rdi), expect, "{bytes:x?} {bits:?} df={df}");
            assert_eq!(v.completed, Some(0x1000 + bytes.len() as u64));
        }
    }
}

#[test]
fn everything_else_is_unsupported_with_its_bytes() {
    let cases: &[&[u8]] = &[
        &[0xF3, 0xAB],             // rep stosd
        &[0xF2, 0xAA],             // repne stosb
        &[0xA5],                   // movsd
        &[0xF3, 0xA4],             // rep movsb
        &[0x01, 0x02],             // add %eax,(%rdx)
        &[0xF0, 0x01, 0x02],       // lock add
        &[0xF0, 0x0F, 0xB1, 0x0A], // lock cmpxchg
        &[0xC5, 0xFD, 0x7F, 0x02], // vmovdqa %ymm0,(%rdx)
        &[0x0F, 0x11, 0x02],       // movups %xmm0,(%rdx)
        &[0x0F, 0xC3, 0x02],       // movnti %eax,(%rdx)
        &[0x8C, 0x02],             // mov %es,(%rdx)
        &[0xFF, 0x02],             // incl (%rdx)
        &[0x0F, 0x0B],             // ud2
        &[0x90],                   // nop
        &[0x8B, 0x02],             // mov (%rdx),%eax: a read
    ];
    for &bytes in cases {
        let v = vcpu64(bytes);
        match decode(&v) {
            Err(EmulateError::Unsupported { bytes: b, len }) => {
                assert_eq!(usize::from(len), bytes.len(), "{bytes:x?}");
                assert_eq!(&b[..bytes.len()], bytes);
            }
            other => panic!("{bytes:x?}: {other:?}"),
        }
    }
    // In 32-bit code 0x48 is DEC EAX, not REX.W.
    let v = vcpu32(&[0x48, 0x89, 0x02]);
    assert!(matches!(
        decode(&v),
        Err(EmulateError::Unsupported { len: 1, .. })
    ));
}

#[test]
fn register_destinations_are_not_writes() {
    for bytes in [
        &[0x89u8, 0xC0][..],
        &[0x88, 0xE0],
        &[0xC7, 0xC0, 1, 0, 0, 0],
        &[0x87, 0xC8],
    ] {
        let v = vcpu64(bytes);
        assert!(
            matches!(decode(&v), Err(EmulateError::NotAWrite { len, .. }) if usize::from(len) == bytes.len()),
            "{bytes:x?}"
        );
    }
}

#[test]
fn invalid_encodings_are_reported_as_such() {
    // LOCK MOV is #UD.
    let v = vcpu64(&[0xF0, 0x89, 0x02]);
    assert!(matches!(decode(&v), Err(EmulateError::Invalid { .. })));
    // 15 prefixes and no opcode: longer than 15 bytes.
    let v = vcpu64(&[0x66; 15]);
    assert!(matches!(decode(&v), Err(EmulateError::Invalid { .. })));
    // A moffs store has no 32-bit-mode REX (0x40 is INC EAX) ... and in
    // 64-bit mode C6 /1 is undefined.
    let v = vcpu64(&[0xC6, 0x0A, 0x00]);
    assert!(matches!(decode(&v), Err(EmulateError::Invalid { .. })));
}

// ---- 32-bit and 16-bit modes --------------------------------------------

#[test]
fn linux_xapic_writes_32() {
    // movl $0x0,0xfee000b0 (EOI), disp32 addressing.
    let v = vcpu32(&[0xC7, 0x05, 0xB0, 0x00, 0xE0, 0xFE, 0, 0, 0, 0]);
    assert_eq!(decode(&v), Ok(store(10, 4, 0, CodeBits::Bits32)));
    // mov %edx,0xfee00310 ; mov %eax,(%edx)
    let mut v = vcpu32(&[0x89, 0x15, 0x10, 0x03, 0xE0, 0xFE]);
    v.set(Gpr::Rdx, 0x0300_0000);
    assert_eq!(decode(&v), Ok(store(6, 4, 0x0300_0000, CodeBits::Bits32)));
    let mut v = vcpu32(&[0x89, 0x02]);
    v.set(Gpr::Rax, 0xFFFF_FFFF_000C_4608);
    assert_eq!(decode(&v), Ok(store(2, 4, 0x000C_4608, CodeBits::Bits32)));
    // 16-bit operand via 66, 8-bit immediate store.
    let v = vcpu32(&[0x66, 0xC7, 0x02, 0x34, 0x12]);
    assert_eq!(decode(&v), Ok(store(5, 2, 0x1234, CodeBits::Bits32)));
    let v = vcpu32(&[0xC6, 0x05, 0x00, 0x03, 0xE0, 0xFE, 0xFF]);
    assert_eq!(decode(&v), Ok(store(7, 1, 0xFF, CodeBits::Bits32)));
    // Compatibility mode decodes as 32-bit code too.
    let (mut v, _) = paged(FakeVcpu::new(CodeBits::Bits64));
    v.cs_access = CODE32;
    let mut v = v.with_insn(&[0xC7, 0x05, 0xB0, 0x00, 0xE0, 0xFE, 0, 0, 0, 0]);
    v.set(Gpr::Rax, 1);
    assert_eq!(decode(&v), Ok(store(10, 4, 0, CodeBits::Bits32)));
}

#[test]
fn real_mode_and_16_bit_code() {
    // mov %ax,(%bx)
    let mut v = vcpu16(&[0x89, 0x07]);
    v.set(Gpr::Rax, RAX);
    assert_eq!(decode(&v), Ok(store(2, 2, 0x7788, CodeBits::Bits16)));
    // mov %eax,(%bx)
    let mut v = vcpu16(&[0x66, 0x89, 0x07]);
    v.set(Gpr::Rax, RAX);
    assert_eq!(decode(&v), Ok(store(3, 4, 0x5566_7788, CodeBits::Bits16)));
    // movw $0x4500,0x300 ; movl $0x000c4500,0x300 ; mov %eax,(%edx)
    let v = vcpu16(&[0xC7, 0x06, 0x00, 0x03, 0x00, 0x45]);
    assert_eq!(decode(&v), Ok(store(6, 2, 0x4500, CodeBits::Bits16)));
    let v = vcpu16(&[0x66, 0xC7, 0x06, 0x00, 0x03, 0x00, 0x45, 0x0C, 0x00]);
    assert_eq!(decode(&v), Ok(store(9, 4, 0x000C_4500, CodeBits::Bits16)));
    let mut v = vcpu16(&[0x67, 0x66, 0x89, 0x02]);
    v.set(Gpr::Rax, RAX);
    assert_eq!(decode(&v), Ok(store(4, 4, 0x5566_7788, CodeBits::Bits16)));
    // CS.base + IP: the bytes are fetched at segment 0xF000 offset 0x10.
    let mut v = FakeVcpu::new(CodeBits::Bits16);
    v.cs_base = 0xF0000;
    v.rip = 0x10;
    let mut v = v.with_insn(&[0x88, 0x07]);
    v.set(Gpr::Rax, 0x42);
    let w = decode(&v).unwrap();
    assert_eq!(w, store(2, 1, 0x42, CodeBits::Bits16));
    w.finish(&mut v, 0);
    assert_eq!(v.completed, Some(0x12));
    // IP wraps at 64 KiB.
    let mut v = FakeVcpu::new(CodeBits::Bits16);
    v.cs_base = 0x10000;
    v.rip = 0xFFFF;
    let mut v = v.with_insn(&[0xAA]);
    decode(&v).unwrap().finish(&mut v, 0);
    assert_eq!(v.completed, Some(0));
}

#[test]
fn virtual_8086_code_is_16_bit_whatever_cs_says() {
    let mut v = vcpu32(&[0x89, 0x07]);
    v.rflags |= RFLAGS_VM;
    v.set(Gpr::Rax, RAX);
    assert_eq!(decode(&v), Ok(store(2, 2, 0x7788, CodeBits::Bits16)));
}

#[test]
fn outside_64_bit_mode_rip_and_linear_addresses_are_32_bits() {
    let mut v = FakeVcpu::new(CodeBits::Bits32);
    v.rip = 0xFFFF_FFFF_0000_2000;
    let mut v = v.with_insn(&[]);
    v.put(0x2000, &[0xAB]);
    v.set(Gpr::Rax, 5);
    let w = decode(&v).unwrap();
    assert_eq!(w.size, 4);
    w.finish(&mut v, 0);
    assert_eq!(v.completed, Some(0x2001));
    // EIP wraps to 0.
    let mut v = FakeVcpu::new(CodeBits::Bits32);
    v.rip = 0xFFFF_FFFE;
    v.cs_base = 0x3002; // linear 0x3000 after wrapping
    v.put(0x3000, &[0x89, 0x02]);
    let w = decode(&v).unwrap();
    w.finish(&mut v, 0);
    assert_eq!(v.completed, Some(0));
}

// ---- fetching through the guest's paging ----------------------------------

/// Linear 0x40_0000 maps to physical 0x30000, 0x40_1000 to 0x50000 (not
/// adjacent), 0x40_2000 is not mapped.
const LA: u64 = 0x40_0000;

fn split_pages(flags: u64) -> FakeVcpu {
    let (v, mut pt) = paged(FakeVcpu::new(CodeBits::Bits64));
    pt.map(v.mem, LA, 0x30000, SIZE_4K, flags).unwrap();
    pt.map(v.mem, LA + SIZE_4K, 0x50000, SIZE_4K, flags)
        .unwrap();
    v
}

#[test]
fn an_instruction_straddling_pages_is_fetched_from_both() {
    let mut v = split_pages(RW);
    let insn = [
        0xC7, 0x04, 0x25, 0x00, 0x03, 0xE0, 0xFE, 0x08, 0x46, 0x0C, 0x00,
    ];
    for split in 1..insn.len() {
        let at = SIZE_4K - split as u64;
        v.put(0x30000 + at, &insn[..split]);
        v.put(0x50000, &insn[split..]);
        v.rip = LA + at;
        assert_eq!(
            decode(&v),
            Ok(store(11, 4, 0x000C_4608, CodeBits::Bits64)),
            "split after {split}"
        );
    }
}

#[test]
fn fetch_faults_are_reported_not_panicked() {
    // RIP on an unmapped page: the #PF the guest's fetch would raise (the
    // tables' EFER has NXE, so the fault says "instruction fetch").
    let mut v = split_pages(RW);
    v.rip = LA + 2 * SIZE_4K + 5;
    assert_eq!(
        decode(&v),
        Err(EmulateError::Fetch(TranslateError::PageFault {
            la: GuestLinearAddr::new(LA + 2 * SIZE_4K + 5),
            error_code: pf_error::FETCH,
        }))
    );
    // An instruction running into the unmapped page faults on that page...
    v.rip = LA + 2 * SIZE_4K - 3;
    v.put(0x50000 + SIZE_4K - 3, &[0xC7, 0x04, 0x25]);
    assert_eq!(
        decode(&v),
        Err(EmulateError::Fetch(TranslateError::PageFault {
            la: GuestLinearAddr::new(LA + 2 * SIZE_4K),
            error_code: pf_error::FETCH,
        }))
    );
    // ... but one that ends before it decodes.
    v.rip = LA + 2 * SIZE_4K - 2;
    v.put(0x50000 + SIZE_4K - 2, &[0x89, 0x02]);
    assert_eq!(decode(&v).map(|w| w.len), Ok(2));
    // Non-canonical RIP.
    v.rip = 0x0000_8000_0000_0000;
    assert!(matches!(
        decode(&v),
        Err(EmulateError::Fetch(TranslateError::NonCanonical { .. }))
    ));
    // Paging off, RIP beyond guest RAM.
    let mut v = FakeVcpu::new(CodeBits::Bits32);
    v.rip = RAM as u64 + 0x100;
    assert!(matches!(
        decode(&v),
        Err(EmulateError::Fetch(TranslateError::PhysUnreadable { .. }))
    ));
    // The last bytes of RAM: a short instruction decodes, a long one
    // reports the unbacked byte.
    v.rip = RAM as u64 - 2;
    v.put(RAM as u64 - 2, &[0x89, 0x02]);
    assert_eq!(decode(&v).map(|w| w.len), Ok(2));
    v.put(RAM as u64 - 2, &[0xC7, 0x05]);
    assert_eq!(
        decode(&v),
        Err(EmulateError::Fetch(TranslateError::PhysUnreadable {
            gpa: GuestPhysAddr::new(RAM as u64)
        }))
    );
}

#[test]
fn fetches_use_the_guests_privilege_and_execute_rights() {
    // Supervisor page, CPL 3: a user fetch fault.
    let mut v = split_pages(RW);
    v.put(0x30000, &[0x89, 0x02]);
    v.rip = LA;
    assert!(decode(&v).is_ok());
    v.cpl = 3;
    assert_eq!(
        decode(&v),
        Err(EmulateError::Fetch(TranslateError::PageFault {
            la: GuestLinearAddr::new(LA),
            error_code: pf_error::PRESENT | pf_error::USER | pf_error::FETCH,
        }))
    );
    // A user page is fine from CPL 3.
    let mut v = split_pages(RW | US);
    v.put(0x30000, &[0x89, 0x02]);
    v.rip = LA;
    v.cpl = 3;
    assert!(decode(&v).is_ok());
    // NX page (the tables' EFER has NXE): not executable.
    let mut v = split_pages(RW | NX);
    assert!(v.paging.nx_enabled());
    v.put(0x30000, &[0x89, 0x02]);
    v.rip = LA;
    assert_eq!(
        decode(&v),
        Err(EmulateError::Fetch(TranslateError::PageFault {
            la: GuestLinearAddr::new(LA),
            error_code: pf_error::PRESENT | pf_error::FETCH,
        }))
    );
}

// ---- hostile input ---------------------------------------------------------

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]

    /// Random bytes in any mode, with random registers: never a panic, and
    /// every decoded write is self-consistent.
    #[test]
    fn random_bytes_never_panic(
        bytes in proptest::array::uniform15(proptest::prelude::any::<u8>()),
        regs in proptest::array::uniform16(proptest::prelude::any::<u64>()),
        mode in 0u8..3,
        rflags in proptest::prelude::any::<u64>(),
        rip_off in 0u64..0x1000,
    ) {
        let bits = [CodeBits::Bits16, CodeBits::Bits32, CodeBits::Bits64][usize::from(mode)];
        let mut v = match bits {
            CodeBits::Bits64 => paged(FakeVcpu::new(bits)).0,
            _ => FakeVcpu::new(bits),
        };
        v.regs = regs;
        v.rflags = rflags & !RFLAGS_VM;
        // Anywhere in the page, so the fetch runs into the next one.
        v.rip = 0x1000 + rip_off;
        v.put(v.rip, &bytes);
        match decode(&v) {
            Ok(w) => {
                proptest::prop_assert!((1..=15).contains(&w.len));
                proptest::prop_assert!([1, 2, 4, 8].contains(&w.size));
                proptest::prop_assert_eq!(w.value >> 1 >> (8 * u32::from(w.size) - 1), 0);
                proptest::prop_assert_eq!(w.bits, bits);
                w.finish(&mut v, regs[0]);
                proptest::prop_assert!(v.completed.is_some());
            }
            Err(EmulateError::Unsupported { len, .. } | EmulateError::NotAWrite { len, .. }) => {
                proptest::prop_assert!((1..=15).contains(&len));
            }
            Err(EmulateError::Invalid { len, .. }) => proptest::prop_assert!(len <= 15),
            Err(EmulateError::Fetch(_)) => {}
        }
    }

    /// Random page tables and control registers: fetches fail cleanly.
    #[test]
    fn random_paging_state_never_panics(
        fill in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8192),
        cr in proptest::array::uniform4(proptest::prelude::any::<u64>()),
        cs_access in proptest::prelude::any::<u16>(),
        rflags in proptest::prelude::any::<u64>(),
        rip in proptest::prelude::any::<u64>(),
        cpl in 0u8..4,
    ) {
        let mut v = FakeVcpu::new(CodeBits::Bits64);
        v.put(0, &fill);
        v.paging = PagingRegs { cr0: cr[0], cr3: cr[1] & 0xF_F000, cr4: cr[2], efer: cr[3] };
        v.cs_access = cs_access;
        v.rflags = rflags;
        v.rip = rip;
        v.cs_base = rip.rotate_left(17);
        v.cpl = cpl;
        let _ = decode(&v);
    }
}

#[test]
fn prepare_builds_the_tables_and_decoding_still_works() {
    prepare();
    prepare();
    let v = vcpu32(&[0x89, 0x02]);
    assert_eq!(decode(&v).map(|w| w.len), Ok(2));
}

#[test]
fn errors_name_their_bytes() {
    extern crate alloc;
    use alloc::string::ToString;
    let e = decode(&vcpu64(&[0xF3, 0xAB])).unwrap_err();
    assert_eq!(e.bytes(), [0xF3, 0xAB]);
    assert_eq!(e.to_string(), "write not emulated f3 ab");
    let e = decode(&vcpu64(&[0x89, 0xC0])).unwrap_err();
    assert_eq!(e.to_string(), "instruction does not write memory 89 c0");
    let mut v = FakeVcpu::new(CodeBits::Bits32);
    v.rip = RAM as u64;
    let e = decode(&v).unwrap_err();
    assert!(e.bytes().is_empty());
    assert!(e.to_string().starts_with("instruction fetch failed: "));
}
