//! The 32-bit entry trampoline and the memory it sets up.
//!
//! A multiboot v1 loader (or thinvisor) enters `_start` in 32-bit protected
//! mode with paging off: EAX = 0x2BADB002, EBX = the multiboot info. The
//! trampoline
//!  1. copies what it needs from the multiboot info into `.data` (the info
//!     could lie anywhere, even where `.bss` is about to be zeroed),
//!  2. zeroes `.bss`, takes its own stack, GDT and a 32-bit IDT,
//!  3. runs the paging-off lookup check (`lookup_paging_off`); an exception
//!     there is recorded, not fatal, so a bare run still reaches the report,
//!  4. builds identity page tables (first 1 GiB and the 2 MiB page at
//!     0xE000_0000, all with 2 MiB pages), enables long mode keeping every
//!     EFER bit it found (thinvisor's SVME must stay set), and
//!  5. calls `guest_main` in 64-bit mode.
//!
//! The 64-bit exception stubs live here too, because their addresses must be
//! evenly spaced (16 bytes) for `interrupts.rs` to compute them.

use core::ptr::addr_of;

/// What the trampoline copied from the multiboot info (`TG_BOOT` in asm;
/// the offsets below must match the `TG_BOOT + n` uses in the assembly).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BootCopy {
    /// EAX at entry.
    pub magic: u32,
    /// EBX at entry (the info's guest-physical address).
    pub info: u32,
    /// The info's `flags` (0 when the magic was wrong).
    pub flags: u32,
    /// KiB of low memory (flags bit 0).
    pub mem_lower: u32,
    /// KiB of memory above 1 MiB (flags bit 0).
    pub mem_upper: u32,
    /// Bytes of `cmdline` before its NUL (at most 255).
    pub cmdline_len: u32,
    /// The command line (flags bit 2), NUL-terminated.
    pub cmdline: [u8; 256],
}

/// Results of the paging-off check (`TG_PAGING_OFF` in asm).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PagingOffResult {
    /// 0 = not run, 1 = both lookups returned, 2 = an exception stopped it.
    pub status: u32,
    /// The exception vector when `status` is 2.
    pub vector: u32,
    /// EAX after looking up "dbgsh".
    pub dbgsh: u32,
    /// EAX after looking up "nosuch".
    pub nosuch: u32,
}

/// A 4 KiB page table or data page.
pub type Page = [u64; 512];

// SAFETY (for the whole block): these symbols are defined by the assembly
// below with exactly these sizes; the guest is single-threaded.
unsafe extern "C" {
    /// The multiboot data copied at entry.
    static TG_BOOT: BootCopy;
    /// The paging-off check's results.
    static TG_PAGING_OFF: PagingOffResult;
    /// Top-level page table (CR3).
    pub static mut TG_PML4: Page;
    /// PDPT, PD and PT for the 4 KiB mappings at 0xFFFF_8000_0000_0000.
    pub static mut TG_PDPT_4K: Page;
    pub static mut TG_PD_4K: Page;
    pub static mut TG_PT_4K: Page;
    /// PDPT and PD for the 2 MiB mappings at 0xFFFF_C000_0000_0000.
    pub static mut TG_PDPT_2M: Page;
    pub static mut TG_PD_2M: Page;
    /// Three data pages; the first and the third back the 4 KiB mappings.
    pub static mut TG_DATA_PAGES: [Page; 3];
    /// First of the 32 exception stubs, each 16 bytes.
    pub static TG_EXC64_STUBS: u8;
}

/// Spacing of the 64-bit exception stubs.
pub const EXC64_STUB_SIZE: u64 = 16;

/// A copy of the multiboot data saved at entry.
pub fn boot_copy() -> BootCopy {
    // SAFETY: written only by the trampoline before Rust runs.
    unsafe { addr_of!(TG_BOOT).read_volatile() }
}

/// The paging-off check's results.
pub fn paging_off_result() -> PagingOffResult {
    // SAFETY: written only by the trampoline before Rust runs.
    unsafe { addr_of!(TG_PAGING_OFF).read_volatile() }
}

core::arch::global_asm!(
    r#"
/* ---------------- multiboot v1 header: page-align + memory info -------- */
.section .multiboot, "a"
.balign 4
    .long 0x1BADB002
    .long 0x00000003
    .long -(0x1BADB002 + 0x00000003)

/* ---------------- data the trampoline writes before zeroing .bss ------- */
.section .data.tg_entry, "aw"
.balign 16
.global TG_BOOT
TG_BOOT:
    .long 0, 0, 0, 0, 0, 0      /* magic info flags mem_lower mem_upper len */
    .fill 256, 1, 0             /* cmdline */
.balign 16
.global TG_PAGING_OFF
TG_PAGING_OFF:
    .long 0, 0, 0, 0            /* status vector dbgsh nosuch */
tg_in_check32:      .long 0     /* 1 while the paging-off check runs */
tg_check32_esp:     .long 0     /* ESP to resume with after an exception */
tg_use_vmcall32:    .long 0     /* 1 = Intel (VMCALL), 0 = VMMCALL */

/* GDT: 0x08 64-bit code, 0x10 data, 0x18 32-bit code, 0x20 TSS (filled by
   interrupts.rs), then ring 3 in the order SYSRET needs (STAR[63:48] =
   0x30): 0x30 32-bit user code, 0x38 user data, 0x40 64-bit user code.
   Writable: LTR sets the TSS busy bit. */
.balign 16
.global TG_GDT
TG_GDT:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00CF9A000000FFFF
    .quad 0, 0
    .quad 0x00CFFA000000FFFF
    .quad 0x00CFF2000000FFFF
    .quad 0x00AFFA000000FFFF
tg_gdt_end:
.balign 8
    .word 0
tg_gdt_ptr:
    .word tg_gdt_end - TG_GDT - 1
    .quad TG_GDT
.balign 8
    .word 0
tg_idt32_ptr:
    .word 32 * 8 - 1
    .long tg_idt32

.section .rodata.tg_entry, "a"
tg_name_dbgsh:      .asciz "dbgsh"
tg_name_nosuch:     .asciz "nosuch"
tg_msg_fatal32:     .asciz "FAIL exception: vector "
tg_msg_fatal32_end: .asciz " (during 32-bit entry)\nSUMMARY: 0 passed, 1 failed\n"
tg_msg_shutdown:    .asciz "Shutdown"

/* ---------------- zeroed memory ---------------------------------------- */
.section .bss.pagetables, "aw", @nobits
.balign 4096
.global TG_PML4, TG_PDPT_4K, TG_PD_4K, TG_PT_4K, TG_PDPT_2M, TG_PD_2M
.global TG_DATA_PAGES
TG_PML4:        .skip 4096
tg_pdpt_low:    .skip 4096      /* PML4[0]: 0 .. 512 GiB */
tg_pd_low:      .skip 4096      /* PDPT[0]: 0 .. 1 GiB, 2 MiB pages */
tg_pd_4g:       .skip 4096      /* PDPT[3]: 3 .. 4 GiB, only 0xE0000000 */
TG_PDPT_4K:     .skip 4096
TG_PD_4K:       .skip 4096
TG_PT_4K:       .skip 4096
TG_PDPT_2M:     .skip 4096
TG_PD_2M:       .skip 4096
TG_DATA_PAGES:  .skip 3 * 4096
tg_idt32:       .skip 32 * 8
.balign 4096
.global TG_STACK_BOTTOM, TG_STACK_TOP
TG_STACK_BOTTOM:
    .skip 64 * 1024
TG_STACK_TOP:

/* ---------------- 32-bit entry ----------------------------------------- */
.section .text.entry, "ax"
.code32
.global _start
_start:
    cli
    cld
    mov dword ptr [TG_BOOT + 0], eax
    mov dword ptr [TG_BOOT + 4], ebx
    cmp eax, 0x2BADB002
    jne .Lcopied
    test ebx, ebx
    jz .Lcopied
    mov eax, dword ptr [ebx]
    mov dword ptr [TG_BOOT + 8], eax
    test eax, 1
    jz .Lno_mem
    mov ecx, dword ptr [ebx + 4]
    mov dword ptr [TG_BOOT + 12], ecx
    mov ecx, dword ptr [ebx + 8]
    mov dword ptr [TG_BOOT + 16], ecx
.Lno_mem:
    test eax, 4
    jz .Lcopied
    mov esi, dword ptr [ebx + 16]
    test esi, esi
    jz .Lcopied
    mov edi, offset TG_BOOT + 24
    xor ecx, ecx
.Lcmdline_loop:
    cmp ecx, 255
    jae .Lcmdline_done
    mov al, byte ptr [esi + ecx]
    test al, al
    jz .Lcmdline_done
    mov byte ptr [edi + ecx], al
    inc ecx
    jmp .Lcmdline_loop
.Lcmdline_done:
    mov dword ptr [TG_BOOT + 20], ecx
.Lcopied:
    /* .bss: page tables, IDT, stacks and Rust's zero-initialised statics */
    mov edi, offset __bss_start
    mov ecx, offset __bss_end
    sub ecx, edi
    shr ecx, 2
    xor eax, eax
    rep stosd
    mov esp, offset TG_STACK_TOP

    lgdt [tg_gdt_ptr]
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    push 0x18
    mov eax, offset .Lcs32_loaded
    push eax
    retf
.Lcs32_loaded:

    /* 32-bit IDT: gate i -> tg_exc32_stubs + 8 * i, selector 0x18 */
    mov edi, offset tg_idt32
    mov eax, offset tg_exc32_stubs
    xor ecx, ecx
.Lidt32_loop:
    mov edx, eax
    and edx, 0xFFFF
    or edx, 0x00180000
    mov dword ptr [edi + ecx * 8], edx
    mov edx, eax
    and edx, 0xFFFF0000
    or edx, 0x8E00
    mov dword ptr [edi + ecx * 8 + 4], edx
    add eax, 8
    inc ecx
    cmp ecx, 32
    jb .Lidt32_loop
    lidt [tg_idt32_ptr]

    /* lookup_paging_off: function 0 with physical name addresses */
    mov dword ptr [tg_check32_esp], esp
    mov dword ptr [tg_in_check32], 1
    xor eax, eax
    cpuid
    xor esi, esi
    cmp ebx, 0x756E6547         /* "Genu" */
    jne .Lvendor_known
    cmp edx, 0x49656E69         /* "ineI" */
    jne .Lvendor_known
    cmp ecx, 0x6C65746E         /* "ntel" */
    jne .Lvendor_known
    mov esi, 1
.Lvendor_known:
    mov dword ptr [tg_use_vmcall32], esi
    xor eax, eax
    mov ebx, offset tg_name_dbgsh
    call tg_vmm32
    mov dword ptr [TG_PAGING_OFF + 8], eax
    xor eax, eax
    mov ebx, offset tg_name_nosuch
    call tg_vmm32
    mov dword ptr [TG_PAGING_OFF + 12], eax
    mov dword ptr [TG_PAGING_OFF + 0], 1
.Lcheck32_done:
    mov dword ptr [tg_in_check32], 0

    /* identity map: PML4[0] -> PDPT -> PD (0..1 GiB) and PD (3..4 GiB) */
    mov eax, offset tg_pdpt_low
    or eax, 3
    mov dword ptr [TG_PML4], eax
    mov eax, offset tg_pd_low
    or eax, 3
    mov dword ptr [tg_pdpt_low], eax
    mov eax, offset tg_pd_4g
    or eax, 3
    mov dword ptr [tg_pdpt_low + 3 * 8], eax
    mov edi, offset tg_pd_low
    mov eax, 0x83               /* present, writable, 2 MiB */
    xor ecx, ecx
.Lpd_loop:
    mov dword ptr [edi + ecx * 8], eax
    add eax, 0x200000
    inc ecx
    cmp ecx, 512
    jb .Lpd_loop
    /* 0xE0000000 is PD index 0x100 of the 3..4 GiB directory */
    mov dword ptr [tg_pd_4g + 0x100 * 8], 0xE0000083

    /* long mode: PAE, CR3, EFER.LME (other EFER bits kept), paging */
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, offset TG_PML4
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    push 0x08
    mov eax, offset tg_entry64
    push eax
    retf

/* The VMM call in 32-bit mode: EAX, EBX in; EAX out. */
tg_vmm32:
    cmp dword ptr [tg_use_vmcall32], 0
    je .Lvmm32_amd
    vmcall
    ret
.Lvmm32_amd:
    vmmcall
    ret

/* 32-bit exception stubs, 8 bytes apart: push the vector, go common. */
.balign 8
tg_exc32_stubs:
.irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .org tg_exc32_stubs + \vec * 8
    push \vec
    jmp tg_exc32_common
.endr

/* During the paging-off check an exception is a result: record it and
   resume after the check. Anywhere else it ends the run. */
tg_exc32_common:
    pop eax
    cmp dword ptr [tg_in_check32], 0
    je .Lfatal32
    mov dword ptr [TG_PAGING_OFF + 4], eax
    mov dword ptr [TG_PAGING_OFF + 0], 2
    mov esp, dword ptr [tg_check32_esp]
    jmp .Lcheck32_done
.Lfatal32:
    mov ebx, eax
    mov esi, offset tg_msg_fatal32
    call tg_puts32
    mov eax, ebx
    xor edx, edx
    mov ecx, 10
    div ecx
    mov ebx, edx
    test eax, eax
    jz .Lfatal32_ones
    add al, 0x30
    call tg_putc32
.Lfatal32_ones:
    mov eax, ebx
    add al, 0x30
    call tg_putc32
    mov esi, offset tg_msg_fatal32_end
    call tg_puts32
    /* drain the UART (LSR bit 6), bounded */
    mov ecx, 1000000
.Ldrain32:
    mov dx, 0x3FD
    in al, dx
    test al, 0x40
    jnz .Ldrained32
    dec ecx
    jnz .Ldrain32
.Ldrained32:
    mov dx, 0xF4
    mov eax, 0x11
    out dx, eax
    mov esi, offset tg_msg_shutdown
    mov dx, 0x8900
.Lshutdown32:
    lodsb
    test al, al
    jz .Lhalt32
    out dx, al
    jmp .Lshutdown32
.Lhalt32:
    cli
    hlt
    jmp .Lhalt32

/* Print the NUL-terminated string at ESI. */
tg_puts32:
    lodsb
    test al, al
    jz .Lputs32_done
    call tg_putc32
    jmp tg_puts32
.Lputs32_done:
    ret

/* Print AL on COM1 (waiting, bounded, for LSR bit 5) and port 0xE9. */
tg_putc32:
    push ecx
    push edx
    mov ah, al
    mov ecx, 100000
.Lputc32_wait:
    mov dx, 0x3FD
    in al, dx
    test al, 0x20
    jnz .Lputc32_ready
    dec ecx
    jnz .Lputc32_wait
.Lputc32_ready:
    mov al, ah
    mov dx, 0x3F8
    out dx, al
    mov dx, 0xE9
    out dx, al
    pop edx
    pop ecx
    ret

/* ---------------- 64-bit ----------------------------------------------- */
.code64
tg_entry64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    lea rsp, [rip + TG_STACK_TOP]
    xor ebp, ebp
    call {main}
    ud2

.section .text.exceptions, "ax"
.macro tg_stub_noerr vec
    .org TG_EXC64_STUBS + \vec * 16
    push 0
    push \vec
    jmp tg_exc64_common
.endm
.macro tg_stub_err vec
    .org TG_EXC64_STUBS + \vec * 16
    push \vec
    jmp tg_exc64_common
.endm
.balign 16
.global TG_EXC64_STUBS
TG_EXC64_STUBS:
    tg_stub_noerr 0
    tg_stub_noerr 1
    tg_stub_noerr 2
    tg_stub_noerr 3
    tg_stub_noerr 4
    tg_stub_noerr 5
    tg_stub_noerr 6
    tg_stub_noerr 7
    tg_stub_err 8
    tg_stub_noerr 9
    tg_stub_err 10
    tg_stub_err 11
    tg_stub_err 12
    tg_stub_err 13
    tg_stub_err 14
    tg_stub_noerr 15
    tg_stub_noerr 16
    tg_stub_err 17
    tg_stub_noerr 18
    tg_stub_noerr 19
    tg_stub_noerr 20
    tg_stub_err 21
    tg_stub_noerr 22
    tg_stub_noerr 23
    tg_stub_noerr 24
    tg_stub_noerr 25
    tg_stub_noerr 26
    tg_stub_noerr 27
    tg_stub_noerr 28
    tg_stub_err 29
    tg_stub_err 30
    tg_stub_noerr 31
/* .org fails to assemble ("moving backwards") if a stub outgrows its slot. */

/* Frame for interrupts.rs: 15 GPRs (R15 lowest), vector, error code, then
   the CPU's RIP, CS, RFLAGS, RSP, SS. The handler returns only for an
   exception a check expected (recover.rs), having changed the frame's RIP:
   then every register is restored from the frame and IRETQ resumes. */
tg_exc64_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    mov rbx, rsp                /* callee-saved: the frame, after the call */
    and rsp, -16
    call {exception}
    mov rsp, rbx
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16                 /* vector, error code */
    iretq
"#,
    main = sym crate::guest_main,
    exception = sym crate::interrupts::exception_entry,
);
