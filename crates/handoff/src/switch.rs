//! The jump into thinvisor: record the caller's processor state in the
//! resume tag, leave long mode, and enter thinvisor's 32-bit entry in the
//! state the Multiboot2 Specification (3.3, "I386 machine state")
//! promises. The call returns when thinvisor resumes the caller as its
//! guest.
//!
//! Leaving long mode (Intel SDM vol. 3A, 10.8.5 "Initializing IA-32e Mode",
//! in reverse; AMD APM vol. 2, 14.7): from 64-bit code, a far return to a
//! 32-bit code segment (compatibility mode, still paged, so the code must
//! be identity-mapped below 4 GiB); clearing CR0.PG leaves IA-32e mode
//! (EFER.LMA drops); then EFER.LME is cleared. CR4.PCIDE must be clear
//! before CR0.PG is (SDM vol. 3A, 4.10.1), so it is cleared first. The GDT
//! with the 32-bit segments and the 32-bit code live in a page the caller
//! gives, below 4 GiB and identity-mapped.

use core::arch::global_asm;
use core::mem::offset_of;

use thinvisor_boot::resume::ResumeState;

/// Where things go in the caller's low page.
const GDT_AT: u64 = 0x00;
const GDTR_AT: u64 = 0x20;
const STUB_AT: u64 = 0x40;

/// The 32-bit GDT: null, flat 4 GiB code (0x08), flat data (0x10).
const GDT: [u64; 3] = [0, 0x00CF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF];

const fn gpr(index: usize) -> usize {
    offset_of!(ResumeState, gprs) + 8 * index
}
const fn selector(index: usize) -> usize {
    offset_of!(ResumeState, selectors) + 2 * index
}

global_asm!(
    // thinvisor_handoff_enter(state: rdi, low_page: rsi, entry: edx, info: ecx)
    ".global thinvisor_handoff_enter",
    ".p2align 4",
    "thinvisor_handoff_enter:",
    // The caller's registers as its call should find them on return: the
    // callee-saved ones as they are, RSP pointing at the return address,
    // RAX 0 (the return value), RIP at the `ret` below.
    "mov [rdi + {rbx}], rbx",
    "mov [rdi + {rbp}], rbp",
    "mov [rdi + {r12}], r12",
    "mov [rdi + {r13}], r13",
    "mov [rdi + {r14}], r14",
    "mov [rdi + {r15}], r15",
    "mov [rdi + {rsp}], rsp",
    "mov qword ptr [rdi + {rax}], 0",
    "lea rax, [rip + 2f]",
    "mov [rdi + {rip}], rax",
    "pushfq",
    "pop rax",
    "mov [rdi + {rflags}], rax",
    "mov rax, cr0",
    "mov [rdi + {cr0}], rax",
    "mov rax, cr3",
    "mov [rdi + {cr3}], rax",
    "mov rax, cr4",
    "mov [rdi + {cr4}], rax",
    "mov rax, dr7",
    "mov [rdi + {dr7}], rax",
    "sub rsp, 16",
    "sgdt [rsp]",
    "movzx eax, word ptr [rsp]",
    "mov [rdi + {gdt_limit}], ax",
    "mov rax, [rsp + 2]",
    "mov [rdi + {gdt_base}], rax",
    "sidt [rsp]",
    "movzx eax, word ptr [rsp]",
    "mov [rdi + {idt_limit}], ax",
    "mov rax, [rsp + 2]",
    "mov [rdi + {idt_base}], rax",
    "add rsp, 16",
    "mov ax, cs",
    "mov [rdi + {cs}], ax",
    "mov ax, ss",
    "mov [rdi + {ss}], ax",
    "mov ax, ds",
    "mov [rdi + {ds}], ax",
    "mov ax, es",
    "mov [rdi + {es}], ax",
    "mov ax, fs",
    "mov [rdi + {fs}], ax",
    "mov ax, gs",
    "mov [rdi + {gs}], ax",
    "str ax",
    "mov [rdi + {tr}], ax",
    "sldt ax",
    "mov [rdi + {ldtr}], ax",
    // MSRs: RDMSR takes ECX and returns EDX:EAX; entry and info move to
    // R8 and R9 first.
    "mov r8d, edx",
    "mov r9d, ecx",
    ".macro thv_rdmsr index, field",
    "mov ecx, \\index",
    "rdmsr",
    "shl rdx, 32",
    "or rax, rdx",
    "mov [rdi + \\field], rax",
    ".endm",
    "thv_rdmsr 0xC0000080, {efer}",
    "thv_rdmsr 0xC0000100, {fs_base}",
    "thv_rdmsr 0xC0000101, {gs_base}",
    "thv_rdmsr 0xC0000102, {kernel_gs_base}",
    "thv_rdmsr 0x277, {pat}",
    "thv_rdmsr 0x174, {sysenter_cs}",
    "thv_rdmsr 0x175, {sysenter_esp}",
    "thv_rdmsr 0x176, {sysenter_eip}",
    "thv_rdmsr 0xC0000081, {star}",
    "thv_rdmsr 0xC0000082, {lstar}",
    "thv_rdmsr 0xC0000083, {cstar}",
    "thv_rdmsr 0xC0000084, {sfmask}",
    ".purgem thv_rdmsr",
    // The way out of long mode.
    "cli",
    "lgdt [rsi + {gdtr_at}]",
    "mov rax, cr4",
    "and rax, ~(1 << 17)",
    "mov cr4, rax",
    "mov ebx, r9d",
    "mov edi, r8d",
    "lea rax, [rsi + {stub_at}]",
    "push 0x08",
    "push rax",
    "retfq",
    // thinvisor resumes the caller here, as its guest.
    "2:",
    "xor eax, eax",
    "ret",
    "",
    // The 32-bit part, copied into the low page (position-independent).
    ".global thinvisor_handoff_stub32",
    ".global thinvisor_handoff_stub32_end",
    ".code32",
    "thinvisor_handoff_stub32:",
    "mov eax, cr0",
    "and eax, 0x7FFFFFFF",
    "mov cr0, eax",
    "mov ecx, 0xC0000080",
    "rdmsr",
    "and eax, 0xFFFFFEFF",
    "wrmsr",
    "mov eax, cr4",
    "and eax, 0xFFFFFFDF",
    "mov cr4, eax",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "mov fs, ax",
    "mov gs, ax",
    "mov eax, 0x36D76289",
    "jmp edi",
    "thinvisor_handoff_stub32_end:",
    ".code64",
    rbx = const gpr(3),
    rsp = const gpr(4),
    rbp = const gpr(5),
    r12 = const gpr(12),
    r13 = const gpr(13),
    r14 = const gpr(14),
    r15 = const gpr(15),
    rax = const gpr(0),
    rip = const offset_of!(ResumeState, rip),
    rflags = const offset_of!(ResumeState, rflags),
    cr0 = const offset_of!(ResumeState, cr0),
    cr3 = const offset_of!(ResumeState, cr3),
    cr4 = const offset_of!(ResumeState, cr4),
    dr7 = const offset_of!(ResumeState, dr7),
    gdt_limit = const offset_of!(ResumeState, gdt_limit),
    gdt_base = const offset_of!(ResumeState, gdt_base),
    idt_limit = const offset_of!(ResumeState, idt_limit),
    idt_base = const offset_of!(ResumeState, idt_base),
    cs = const selector(0),
    ss = const selector(1),
    ds = const selector(2),
    es = const selector(3),
    fs = const selector(4),
    gs = const selector(5),
    tr = const selector(6),
    ldtr = const selector(7),
    efer = const offset_of!(ResumeState, efer),
    fs_base = const offset_of!(ResumeState, fs_base),
    gs_base = const offset_of!(ResumeState, gs_base),
    kernel_gs_base = const offset_of!(ResumeState, kernel_gs_base),
    pat = const offset_of!(ResumeState, pat),
    sysenter_cs = const offset_of!(ResumeState, sysenter_cs),
    sysenter_esp = const offset_of!(ResumeState, sysenter_esp),
    sysenter_eip = const offset_of!(ResumeState, sysenter_eip),
    star = const offset_of!(ResumeState, star),
    lstar = const offset_of!(ResumeState, lstar),
    cstar = const offset_of!(ResumeState, cstar),
    sfmask = const offset_of!(ResumeState, sfmask),
    gdtr_at = const GDTR_AT,
    stub_at = const STUB_AT,
);

extern "sysv64" {
    /// The jump itself, for callers that must see their registers exactly
    /// as the switch recorded them (the test guest's check of the
    /// callee-saved registers calls it from assembly, with no Rust frame
    /// in between that could save and restore them on its own): the same
    /// contract as [`enter`], after [`prepare`] wrote `low_page`.
    pub fn thinvisor_handoff_enter(
        state: *mut ResumeState,
        low_page: u64,
        entry: u32,
        info: u32,
    ) -> u64;
    static thinvisor_handoff_stub32: [u8; 0];
    static thinvisor_handoff_stub32_end: [u8; 0];
}

/// Write the 32-bit GDT, its GDTR and the 32-bit stub into `low_page`
/// (what [`enter`] does first).
///
/// # Safety
/// `low_page` is a 4 KiB page below 4 GiB, identity-mapped, writable and
/// executable, that nothing else uses.
pub unsafe fn prepare(low_page: u64) {
    let page = low_page as *mut u8;
    // SAFETY: the caller gives a page of its own, identity-mapped; the
    // stub's bounds are two labels of the assembly above, in order, and
    // it fits after STUB_AT (checked).
    unsafe {
        for (i, d) in GDT.iter().enumerate() {
            (page.add(GDT_AT as usize + 8 * i) as *mut u64).write_unaligned(*d);
        }
        let gdtr = page.add(GDTR_AT as usize);
        (gdtr as *mut u16).write_unaligned((GDT.len() * 8 - 1) as u16);
        (gdtr.add(2) as *mut u64).write_unaligned(low_page + GDT_AT);
        let start = core::ptr::addr_of!(thinvisor_handoff_stub32) as *const u8;
        let end = core::ptr::addr_of!(thinvisor_handoff_stub32_end) as *const u8;
        let len = end as usize - start as usize;
        assert!(
            STUB_AT as usize + len <= 4096,
            "the 32-bit stub outgrew its page"
        );
        core::ptr::copy_nonoverlapping(start, page.add(STUB_AT as usize), len);
    }
}

/// Enter thinvisor at `entry` (its 32-bit `_start`) with the multiboot2
/// information at `info`, after recording the caller's state in `state`
/// (the resume tag's payload inside that information). Returns 0 when
/// thinvisor resumes the caller as its guest; never returns otherwise.
///
/// # Safety
/// - `low_page` is a 4 KiB page below 4 GiB, identity-mapped, that nothing
///   else uses; `info`, `state` and thinvisor's image (loaded at its
///   physical addresses, [`crate::image::Plan::load`]) lie below 4 GiB,
///   identity-mapped, in memory the caller's firmware will not hand out;
/// - the caller runs in 64-bit mode at CPL 0 on the boot processor, with
///   nothing that needs interrupts until the call returns.
pub unsafe fn enter(state: *mut ResumeState, low_page: u64, entry: u32, info: u32) -> u64 {
    // SAFETY: the caller's promises are `prepare`'s and the jump's.
    unsafe {
        prepare(low_page);
        thinvisor_handoff_enter(state, low_page, entry, info)
    }
}
