//! Emulating one guest write that the nested page tables refused.
//!
//! In the pass-through layout a few guest-physical pages are
//! write-protected in the nested page tables (NPT/EPT): thinvisor's own
//! memory (writes are dropped) and, on SVM, the local APIC's page (the ICR
//! write is looked at, every other register write is carried out on the
//! real APIC). The exit says which guest-physical address and that it was
//! a write, but not the value nor the instruction's length: QEMU's SVM has
//! neither NRIPS nor decode assists, and on VT-x the instruction-length
//! field is undefined for EPT violations (SDM vol. 3C, 28.2.5: it is
//! saved only for exits caused by executing an instruction). So the
//! instruction is fetched the way the guest fetched it (its paging, its
//! privilege, CS.base + RIP) and decoded with iced-x86 in the guest's
//! current mode, and [`decode_write`] returns what it writes.
//!
//! # What the caller checks first
//!
//! Only a data write to the final translation may be emulated: not an
//! instruction fetch (`NestedFault::fetch`), and not the processor's own
//! write of an accessed/dirty bit into a guest page table that lies in a
//! protected page (SVM: EXITINFO1 bit 33 instead of bit 32, APM vol. 2,
//! 15.25.6; VT-x: exit qualification bit 8 clear, SDM vol. 3C, table
//! 28-7). Decoding the instruction at RIP in that case would describe a
//! different write. `NestedFault` does not carry that bit yet.
//!
//! Only the stores guests use on such pages are accepted: MOV r/m,r
//! (88/89), MOV r/m,imm (C6/C7), XCHG r/m,r (86/87), MOV moffs,A (A2/A3),
//! STOSB/W/D/Q without REP. Anything else is [`EmulateError::Unsupported`]
//! with the bytes, for the caller to log and stop or inject: emulating
//! read-modify-write or multi-element instructions correctly needs the old
//! memory value and a model of the flags, which none of these pages need.
//!
//! Not modelled: segment limits and the CS access checks beyond paging
//! (the processor fetched these bytes moments ago, so they passed them), a
//! single-step (RFLAGS.TF) trap after the emulated instruction, and
//! another vCPU rewriting the bytes between the exit and the fetch (the
//! decode then describes the new bytes; if they no longer write memory
//! the result is [`EmulateError::NotAWrite`] and re-entering the guest is
//! the right answer).
//!
//! Needs the `emulate` feature: iced-x86's decoder builds its tables on
//! the heap on first use (about 360 KiB, about 3 million instructions, once
//! per boot behind a spin lock), so the binary must have a global
//! allocator, and should call [`prepare`] at boot so that cost and any
//! allocation failure come there, not in the middle of a guest's write.
//! A decode then costs about 900 instructions with paging off and 1,400
//! under 4-level paging (callgrind, `benches/decode.rs`); one that
//! straddles two pages about 2,100.
//!
//! # How an exit handler uses it
//!
//! ```ignore
//! fn on_protected_write<V: EmulationContext>(vcpu: &mut V, fault: NestedFault) -> Action {
//!     let w = match emulate::decode_write(vcpu) {
//!         Ok(w) => w,
//!         Err(EmulateError::Fetch(TranslateError::PageFault { la, error_code })) => {
//!             vcpu.inject(Event::PageFault { error_code, address: la.as_u64() });
//!             return Action::Resume;
//!         }
//!         Err(e) => {
//!             log::error!("cannot emulate the write to {}: {e:?}", fault.gpa);
//!             return Action::Stop(StopReason::Unhandled { code: 0, rip: vcpu.rip() });
//!         }
//!     };
//!     let old = if is_apic(fault.gpa) {
//!         // ICR low: look at it (apic::Icr::xapic(w.value as u32, icr_high)),
//!         // start APs; anything else: write w.value to the real APIC.
//!         forward_to_apic(fault.gpa, &w)
//!     } else {
//!         FILLER_VALUE // thinvisor's own memory: the write is dropped
//!     };
//!     w.finish(vcpu, old); // XCHG's register, STOS's RDI, RIP
//!     Action::Resume
//! }
//! ```
//!
//! References: Intel SDM vol. 2A, 2.1 (instruction format), MOV, XCHG,
//! STOS; vol. 3A, 3.4.5 (the D and L flags) and 20.1 (virtual-8086 code
//! is 16-bit); AMD APM vol. 2, 15.25.6 (nested page faults).

use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction, OpKind, Register};
use thinvisor_memory::{read_linear, Access, GuestLinearAddr, PagingRegs, TranslateError};

use crate::vcpu::{Gpr, Vcpu};

/// The architectural limit on an instruction's length (SDM vol. 2A, 2.3.11).
pub const MAX_INSN_LEN: usize = 15;

/// CS access-rights bits, in the layout of [`crate::SegmentState::access`]
/// (VMX's access-rights layout; SVM's 12-bit attribute has L at bit 9 and
/// D/B at bit 10).
pub mod cs_access {
    /// L: 64-bit code segment (with EFER.LMA).
    pub const L: u16 = 1 << 13;
    /// D/B: default operand and address size 32 (else 16).
    pub const DB: u16 = 1 << 14;
}

/// RFLAGS.DF: string instructions count down.
const RFLAGS_DF: u64 = 1 << 10;
/// RFLAGS.VM: virtual-8086 mode.
const RFLAGS_VM: u64 = 1 << 17;

/// What decoding needs from a backend: [`Vcpu::cs_access`],
/// [`Vcpu::rflags`] and [`Vcpu::complete_instruction`], which every
/// backend provides.
///
/// - `cs_access`: SVM `vmcb.save.cs.attrib` unpacked to this layout (bits
///   11:8 move to 15:12), VMX `GUEST_CS_AR_BYTES`;
/// - `rflags`: VMCB `save.rflags`, VMCS `GUEST_RFLAGS`;
/// - `complete_instruction`: the exit gave no usable length (SVM without
///   NRIPS), so the core computes the next RIP and the backend stores it
///   and ends any STI/MOV SS interrupt shadow, as `skip_instruction` does.
pub trait EmulationContext: Vcpu {}

impl<T: Vcpu + ?Sized> EmulationContext for T {}

/// The size the processor decodes instructions in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CodeBits {
    /// Real mode, virtual-8086 mode, or a protected-mode segment with
    /// D = 0.
    Bits16,
    /// Protected or compatibility mode with CS.D = 1.
    Bits32,
    /// 64-bit mode: EFER.LMA and CS.L.
    Bits64,
}

impl CodeBits {
    /// The decoding mode from CR0.PE, EFER.LMA, CS.L, CS.D and RFLAGS.VM
    /// (SDM vol. 3A, 3.4.5: L is only looked at under LMA, and with L set D
    /// must be 0; 20.1: virtual-8086 code is always 16-bit, whatever the
    /// hidden CS attributes say).
    pub const fn of(cr0: u64, efer: u64, cs_access: u16, rflags: u64) -> Self {
        if cr0 & PagingRegs::CR0_PE == 0 || rflags & RFLAGS_VM != 0 {
            Self::Bits16
        } else if efer & PagingRegs::EFER_LMA != 0 && cs_access & cs_access::L != 0 {
            Self::Bits64
        } else if cs_access & cs_access::DB != 0 {
            Self::Bits32
        } else {
            Self::Bits16
        }
    }

    /// 16, 32 or 64, as iced-x86's decoder takes it.
    pub const fn bits(self) -> u32 {
        match self {
            Self::Bits16 => 16,
            Self::Bits32 => 32,
            Self::Bits64 => 64,
        }
    }

    /// Linear addresses and the instruction pointer wrap at this mask
    /// (32 bits outside 64-bit mode; 16-bit code's IP wraps at 64 KiB).
    const fn ip_mask(self) -> u64 {
        match self {
            Self::Bits16 => 0xFFFF,
            Self::Bits32 => 0xFFFF_FFFF,
            Self::Bits64 => u64::MAX,
        }
    }

    const fn linear_mask(self) -> u64 {
        match self {
            Self::Bits64 => u64::MAX,
            _ => 0xFFFF_FFFF,
        }
    }
}

/// Which part of a general-purpose register an operand names.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RegPart {
    /// Bits 7:0 (AL, ..., R15B, SPL with REX).
    Low8,
    /// Bits 15:8 (AH, CH, DH, BH: only without a REX prefix).
    High8,
    /// Bits 15:0.
    Word,
    /// Bits 31:0; a write zero-extends to 64 bits.
    Dword,
    /// All 64 bits.
    Qword,
}

/// A register operand: which register and which part of it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RegOperand {
    pub reg: Gpr,
    pub part: RegPart,
}

impl RegOperand {
    /// The operand's value, zero-extended.
    pub fn read(self, vcpu: &dyn Vcpu) -> u64 {
        let r = vcpu.gpr(self.reg);
        match self.part {
            RegPart::Low8 => r & 0xFF,
            RegPart::High8 => (r >> 8) & 0xFF,
            RegPart::Word => r & 0xFFFF,
            RegPart::Dword => r & 0xFFFF_FFFF,
            RegPart::Qword => r,
        }
    }

    /// Writes `value` as an instruction writing this operand would: 8-
    /// and 16-bit writes keep the rest of the register, 32-bit writes
    /// zero-extend (SDM vol. 1, 3.4.1.1).
    pub fn write(self, vcpu: &mut dyn Vcpu, value: u64) {
        let r = vcpu.gpr(self.reg);
        let new = match self.part {
            RegPart::Low8 => (r & !0xFF) | (value & 0xFF),
            RegPart::High8 => (r & !0xFF00) | ((value & 0xFF) << 8),
            RegPart::Word => (r & !0xFFFF) | (value & 0xFFFF),
            RegPart::Dword => value & 0xFFFF_FFFF,
            RegPart::Qword => value,
        };
        vcpu.set_gpr(self.reg, new);
    }

    /// The general-purpose register iced-x86 names, if it is one.
    fn from_iced(r: Register) -> Option<Self> {
        // iced-x86 numbers AL..R15L, AX..R15W, EAX..R15D, RAX..R15
        // consecutively; in the 8-bit block AH..BH sit between BL and SPL.
        let (index, part) = if (Register::AL..=Register::R15L).contains(&r) {
            let i = r as usize - Register::AL as usize;
            match i {
                0..=3 => (i, RegPart::Low8),
                4..=7 => (i - 4, RegPart::High8),
                _ => (i - 4, RegPart::Low8),
            }
        } else if (Register::AX..=Register::R15W).contains(&r) {
            (r as usize - Register::AX as usize, RegPart::Word)
        } else if (Register::EAX..=Register::R15D).contains(&r) {
            (r as usize - Register::EAX as usize, RegPart::Dword)
        } else if (Register::RAX..=Register::R15).contains(&r) {
            (r as usize - Register::RAX as usize, RegPart::Qword)
        } else {
            return None;
        };
        Gpr::ALL.get(index).map(|&reg| Self { reg, part })
    }
}

/// What the instruction does besides writing memory.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WriteKind {
    /// MOV: memory gets the value, nothing else changes.
    Store,
    /// XCHG: memory gets the value and `reg` gets the memory's old
    /// contents (the caller reads them: the filler page, the real APIC
    /// register) and passes them to [`MemWrite::finish`].
    Exchange { reg: RegOperand },
    /// STOS: after the store DI, EDI or RDI (`addr_bits`) moves by the
    /// operand size, backwards when RFLAGS.DF was set.
    StoreString { addr_bits: u8, backwards: bool },
}

/// One decoded write to memory.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MemWrite {
    /// The instruction's length in bytes (1..=15).
    pub len: u8,
    /// Bytes written: 1, 2, 4 or 8.
    pub size: u8,
    /// The value written, zero-extended (the immediate already
    /// sign-extended to `size` as the instruction does).
    pub value: u64,
    /// What else the instruction does.
    pub kind: WriteKind,
    /// The mode it was decoded in (RIP wraps accordingly).
    pub bits: CodeBits,
}

impl MemWrite {
    /// A MOV: carrying out (or dropping) the store and stepping over the
    /// instruction is all there is to do.
    pub const fn is_plain_store(&self) -> bool {
        matches!(self.kind, WriteKind::Store)
    }

    /// Whether [`finish`](Self::finish) needs the memory's old value
    /// (XCHG).
    pub const fn needs_old_value(&self) -> bool {
        matches!(self.kind, WriteKind::Exchange { .. })
    }

    /// The bytes written, little-endian: `bytes()[..size]`.
    pub const fn bytes(&self) -> [u8; 8] {
        self.value.to_le_bytes()
    }

    /// Retires the instruction once the caller has dealt with the memory
    /// side: XCHG's register gets `old` (ignored otherwise), STOS moves
    /// its index register, and RIP steps over the instruction (wrapping
    /// as the mode's instruction pointer does).
    pub fn finish(&self, vcpu: &mut dyn EmulationContext, old: u64) {
        match self.kind {
            WriteKind::Store => {}
            WriteKind::Exchange { reg } => reg.write(vcpu, old),
            WriteKind::StoreString {
                addr_bits,
                backwards,
            } => {
                let step = u64::from(self.size);
                let rdi = vcpu.gpr(Gpr::Rdi);
                let moved = if backwards {
                    rdi.wrapping_sub(step)
                } else {
                    rdi.wrapping_add(step)
                };
                let part = match addr_bits {
                    16 => RegPart::Word,
                    32 => RegPart::Dword,
                    _ => RegPart::Qword,
                };
                RegOperand {
                    reg: Gpr::Rdi,
                    part,
                }
                .write(vcpu, moved);
            }
        }
        let next = vcpu.rip().wrapping_add(u64::from(self.len)) & self.bits.ip_mask();
        vcpu.complete_instruction(next);
    }
}

/// Why no write could be decoded.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EmulateError {
    /// Fetching the instruction failed as the guest's own fetch would (a
    /// #PF to inject, a non-canonical RIP) or reached memory outside guest
    /// RAM. A page fault is reported only if the instruction really
    /// extends into the faulting page.
    Fetch(TranslateError),
    /// The bytes are not an instruction in this mode (`len`: how many were
    /// fetched).
    Invalid { bytes: [u8; MAX_INSN_LEN], len: u8 },
    /// A valid instruction this module does not emulate (`len`: its
    /// length).
    Unsupported { bytes: [u8; MAX_INSN_LEN], len: u8 },
    /// A supported instruction whose destination is a register, not
    /// memory (the bytes changed since the exit, or the exit was not this
    /// instruction's write).
    NotAWrite { bytes: [u8; MAX_INSN_LEN], len: u8 },
}

impl EmulateError {
    /// The instruction bytes the error is about (empty for a fetch
    /// error): what to log.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Self::Fetch(_) => &[],
            Self::Invalid { bytes, len }
            | Self::Unsupported { bytes, len }
            | Self::NotAWrite { bytes, len } => bytes.get(..usize::from(*len)).unwrap_or(bytes),
        }
    }
}

impl core::fmt::Display for EmulateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let what = match self {
            Self::Fetch(e) => return write!(f, "instruction fetch failed: {e}"),
            Self::Invalid { .. } => "invalid instruction",
            Self::Unsupported { .. } => "write not emulated",
            Self::NotAWrite { .. } => "instruction does not write memory",
        };
        f.write_str(what)?;
        for b in self.bytes() {
            write!(f, " {b:02x}")?;
        }
        Ok(())
    }
}

impl core::error::Error for EmulateError {}

/// Builds iced-x86's decoder tables now instead of on the first decode:
/// call it once at boot, after the global allocator exists. Harmless to
/// call again.
pub fn prepare() {
    if let Ok(mut decoder) = Decoder::try_with_ip(64, &[0x90], 0, DecoderOptions::NONE) {
        let mut insn = Instruction::default();
        decoder.decode_out(&mut insn);
    }
}

/// Decodes the write the instruction at the guest's CS:RIP makes, in the
/// mode the backend reports (see [`EmulationContext`]).
pub fn decode_write(vcpu: &dyn EmulationContext) -> Result<MemWrite, EmulateError> {
    let paging = vcpu.paging();
    let rflags = vcpu.rflags();
    let bits = CodeBits::of(paging.cr0, paging.efer, vcpu.cs_access(), rflags);
    decode_write_in(vcpu, bits, rflags & RFLAGS_DF != 0)
}

/// [`decode_write`] with the mode given: `bits` to decode in, `df` =
/// RFLAGS.DF (only STOS reads it).
pub fn decode_write_in(
    vcpu: &dyn Vcpu,
    bits: CodeBits,
    df: bool,
) -> Result<MemWrite, EmulateError> {
    let mut buf = [0u8; MAX_INSN_LEN];
    let (fetched, tail_fault) = fetch(vcpu, bits, &mut buf)?;
    let data = buf.get(..fetched).unwrap_or(&[]);
    let mut decoder = Decoder::try_with_ip(bits.bits(), data, vcpu.rip(), DecoderOptions::NONE)
        .map_err(|_| EmulateError::Invalid {
            bytes: buf,
            len: fetched as u8,
        })?;
    let mut insn = Instruction::default();
    decoder.decode_out(&mut insn);
    if insn.is_invalid() {
        return Err(match (decoder.last_error(), tail_fault) {
            (DecoderError::NoMoreBytes, Some(e)) => EmulateError::Fetch(e),
            _ => EmulateError::Invalid {
                bytes: buf,
                len: fetched as u8,
            },
        });
    }
    classify(vcpu, &insn, buf, bits, df)
}

/// Fetches up to 15 bytes at CS.base + RIP with the guest's privilege.
/// Returns how many were fetched and, when the second page failed, its
/// error: an instruction that ends before that page must still decode.
fn fetch(
    vcpu: &dyn Vcpu,
    bits: CodeBits,
    buf: &mut [u8; MAX_INSN_LEN],
) -> Result<(usize, Option<TranslateError>), EmulateError> {
    let mask = bits.linear_mask();
    let la = vcpu.rip_linear() & mask;
    let access = Access {
        write: false,
        user: vcpu.mode().cpl == 3,
        fetch: true,
    };
    let paging = vcpu.paging();
    let memory = vcpu.memory();
    // Bytes to the end of the 4 KiB page: 1..=4096, so `first` is 1..=15.
    let to_page_end = 0x1000 - (la & 0xFFF) as usize;
    let first = to_page_end.min(MAX_INSN_LEN);
    let (head, tail) = buf.split_at_mut(first);
    read_linear(memory, &paging, GuestLinearAddr::new(la), head, access)
        .map_err(EmulateError::Fetch)?;
    if tail.is_empty() {
        return Ok((MAX_INSN_LEN, None));
    }
    let next = la.wrapping_add(first as u64) & mask;
    match read_linear(memory, &paging, GuestLinearAddr::new(next), tail, access) {
        Ok(()) => Ok((MAX_INSN_LEN, None)),
        Err(e) => Ok((first, Some(e))),
    }
}

/// Turns a decoded instruction into the write it makes, or says why not.
fn classify(
    vcpu: &dyn Vcpu,
    insn: &Instruction,
    bytes: [u8; MAX_INSN_LEN],
    bits: CodeBits,
    df: bool,
) -> Result<MemWrite, EmulateError> {
    // The decoder never reports more than 15 bytes.
    let len = insn.len() as u8;
    let unsupported = EmulateError::Unsupported { bytes, len };
    let reg_source = |size: u8| -> Result<(u8, u64, RegOperand), EmulateError> {
        let reg = RegOperand::from_iced(insn.op1_register()).ok_or(unsupported)?;
        Ok((size, reg.read(vcpu), reg))
    };
    let (size, value, kind) = match insn.code() {
        Code::Mov_rm8_r8 | Code::Mov_moffs8_AL => {
            let (s, v, _) = reg_source(1)?;
            (s, v, WriteKind::Store)
        }
        Code::Mov_rm16_r16 | Code::Mov_moffs16_AX => {
            let (s, v, _) = reg_source(2)?;
            (s, v, WriteKind::Store)
        }
        Code::Mov_rm32_r32 | Code::Mov_moffs32_EAX => {
            let (s, v, _) = reg_source(4)?;
            (s, v, WriteKind::Store)
        }
        Code::Mov_rm64_r64 | Code::Mov_moffs64_RAX => {
            let (s, v, _) = reg_source(8)?;
            (s, v, WriteKind::Store)
        }
        Code::Mov_rm8_imm8 => (1, u64::from(insn.immediate8()), WriteKind::Store),
        Code::Mov_rm16_imm16 => (2, u64::from(insn.immediate16()), WriteKind::Store),
        Code::Mov_rm32_imm32 => (4, u64::from(insn.immediate32()), WriteKind::Store),
        // C7 with REX.W: the 32-bit immediate is sign-extended to 64.
        Code::Mov_rm64_imm32 => (8, insn.immediate32to64() as u64, WriteKind::Store),
        Code::Xchg_rm8_r8 | Code::Xchg_rm16_r16 | Code::Xchg_rm32_r32 | Code::Xchg_rm64_r64 => {
            let size = match insn.code() {
                Code::Xchg_rm8_r8 => 1,
                Code::Xchg_rm16_r16 => 2,
                Code::Xchg_rm32_r32 => 4,
                _ => 8,
            };
            let (s, v, reg) = reg_source(size)?;
            (s, v, WriteKind::Exchange { reg })
        }
        Code::Stosb_m8_AL | Code::Stosw_m16_AX | Code::Stosd_m32_EAX | Code::Stosq_m64_RAX => {
            // REP (and REPNE, which STOS treats alike) repeats the store
            // RCX times: several writes, not one.
            if insn.has_rep_prefix() || insn.has_repne_prefix() {
                return Err(unsupported);
            }
            let addr_bits = match insn.op0_kind() {
                OpKind::MemoryESDI => 16,
                OpKind::MemoryESEDI => 32,
                OpKind::MemoryESRDI => 64,
                _ => return Err(unsupported),
            };
            let size = match insn.code() {
                Code::Stosb_m8_AL => 1,
                Code::Stosw_m16_AX => 2,
                Code::Stosd_m32_EAX => 4,
                _ => 8,
            };
            let (s, v, _) = reg_source(size)?;
            let kind = WriteKind::StoreString {
                addr_bits,
                backwards: df,
            };
            return Ok(MemWrite {
                len,
                size: s,
                value: v,
                kind,
                bits,
            });
        }
        _ => return Err(unsupported),
    };
    // MOV and XCHG have a ModRM r/m (or moffs) destination: it must be
    // memory. The decoder reports moffs as an ordinary memory operand.
    if insn.op0_kind() != OpKind::Memory {
        return Err(EmulateError::NotAWrite { bytes, len });
    }
    let value = match size {
        1 => value & 0xFF,
        2 => value & 0xFFFF,
        4 => value & 0xFFFF_FFFF,
        _ => value,
    };
    Ok(MemWrite {
        len,
        size,
        value,
        kind,
        bits,
    })
}

#[cfg(test)]
mod tests;
