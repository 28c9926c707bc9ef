//! RDMSR and WRMSR of values the guest chose: a value the processor
//! refuses raises #GP in thinvisor, which must become the guest's #GP,
//! not a hypervisor crash. The two instructions below are the only ones
//! the #GP handler (idt.rs) recovers from: it resumes at their failure
//! exits.

use core::arch::global_asm;

global_asm!(
    ".pushsection .text.thinvisor_msr_safe, \"ax\"",
    // u32 thinvisor_rdmsr_safe(u32 msr, u64 *value): 0 done, 1 #GP.
    ".global thinvisor_rdmsr_safe",
    ".global thinvisor_rdmsr_insn",
    ".global thinvisor_rdmsr_failed",
    "thinvisor_rdmsr_safe:",
    "mov ecx, edi",
    "thinvisor_rdmsr_insn:",
    "rdmsr",
    "shl rdx, 32",
    "mov eax, eax",
    "or rax, rdx",
    "mov [rsi], rax",
    "xor eax, eax",
    "ret",
    "thinvisor_rdmsr_failed:",
    "mov eax, 1",
    "ret",
    // u32 thinvisor_wrmsr_safe(u32 msr, u64 value): 0 done, 1 #GP.
    ".global thinvisor_wrmsr_safe",
    ".global thinvisor_wrmsr_insn",
    ".global thinvisor_wrmsr_failed",
    "thinvisor_wrmsr_safe:",
    "mov ecx, edi",
    "mov eax, esi",
    "mov rdx, rsi",
    "shr rdx, 32",
    "thinvisor_wrmsr_insn:",
    "wrmsr",
    "xor eax, eax",
    "ret",
    "thinvisor_wrmsr_failed:",
    "mov eax, 1",
    "ret",
    ".popsection",
);

extern "sysv64" {
    fn thinvisor_rdmsr_safe(msr: u32, value: *mut u64) -> u32;
    fn thinvisor_wrmsr_safe(msr: u32, value: u64) -> u32;
}

/// RDMSR; None when the processor raises #GP (no such MSR).
pub fn read(msr: u32) -> Option<u64> {
    let mut value = 0u64;
    // SAFETY: RDMSR only reads; a #GP resumes at the stub's failure exit
    // (idt.rs), and `value` is a valid place for the result.
    let failed = unsafe { thinvisor_rdmsr_safe(msr, &mut value) };
    (failed == 0).then_some(value)
}

/// WRMSR on the guest's behalf; false when the processor raises #GP.
///
/// # Safety
/// The MSR must be one the guest owns (thinvisor checked the value
/// against what thinvisor needs, e.g. `thinvisor_vmm::guard`).
pub unsafe fn write(msr: u32, value: u64) -> bool {
    // SAFETY: the caller vouches for the MSR; a #GP resumes at the
    // stub's failure exit (idt.rs).
    unsafe { thinvisor_wrmsr_safe(msr, value) == 0 }
}
