//! The 32-bit entry trampoline and the memory it sets up.
//!
//! A multiboot v1 loader (or thinvisor) enters `_start` in 32-bit protected
//! mode with paging off: EAX = 0x2BADB002, EBX = the multiboot info. The
//! trampoline
//!  1. copies what it needs from the multiboot info into `.data` (the info
//!     could lie anywhere, even where `.bss` is about to be zeroed),
//!  2. zeroes `.bss`, takes its own stack, GDT and a 32-bit IDT,
//!  3. runs the paging-off lookup check (`lookup_paging_off`); an exception
//!     there is recorded, not fatal, so a bare run still reaches the report;
//!     in `bench` mode (a command-line token `bench`) it then times
//!     lookups of "dbgsh" with paging off, for `bench.rs` to print
//!     (`TG_BENCH32`),
//!  4. runs `log_read_32bit` and `log_read_pae` (recorded the same way in
//!     `TG_LOG32`): each builds small page tables (32-bit paging with 4 MiB
//!     identity pages, or PAE with 2 MiB ones, for 0 .. 8 MiB, and 4 KiB
//!     pages at `LOG32_VA`, the first present and the second not), turns
//!     paging on, looks up "log_read" and reads the log into a buffer that
//!     crosses into the not-present page, which the trampoline's #PF
//!     handler maps when the VMM injects the fault (the call then runs
//!     again), reads once more from where the log ended, and turns paging
//!     off again (CR4 as before: PSE/PAE cleared),
//!  5. builds identity page tables (first 1 GiB and the 2 MiB page at
//!     0xE000_0000, all with 2 MiB pages), enables long mode keeping every
//!     EFER bit it found (thinvisor's SVME must stay set), and
//!  6. calls `guest_main` in 64-bit mode.
//!
//! The 64-bit exception stubs live here too, because their addresses must be
//! evenly spaced (16 bytes) for `interrupts.rs` to compute them.

use core::mem::{offset_of, size_of};
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

/// Results of the paging-off check (`TG_PAGING_OFF` in asm). The first
/// five fields are the header every 32-bit check record shares: the
/// trampoline's exception handler fills them when an exception stops a
/// check.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PagingOffResult {
    /// 0 = not run, 1 = both lookups returned, 2 = an exception stopped it.
    pub status: u32,
    /// The exception vector when `status` is 2.
    pub vector: u32,
    /// The first two dwords of the exception frame (error code and EIP,
    /// or EIP and CS for vectors without an error code).
    pub frame: [u32; 2],
    /// CR2 when the exception was taken.
    pub cr2: u32,
    /// EAX after looking up "dbgsh".
    pub dbgsh: u32,
    /// EAX after looking up "nosuch".
    pub nosuch: u32,
}

/// The paging-off lookup bench (`TG_BENCH32` in asm), measured like
/// `bench.rs` measures in 64-bit mode: TSC ticks of `iterations` lookups
/// of "dbgsh" by function 0 (EBX = its physical address) and of the same
/// loop with a NOP in place of the call. Low 32 bits of the TSC: a run is
/// far below 2^32 instructions. All zero outside bench mode.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Bench32 {
    pub iterations: u32,
    pub ticks: u32,
    pub baseline: u32,
}

/// Lookups the paging-off bench times.
pub const BENCH32_ITERATIONS: u32 = 2_000;

/// Results of `log_read_32bit` and `log_read_pae` (`TG_LOG32` in asm: two
/// records, 32-bit paging first). Written by the trampoline with paging on,
/// read by the 64-bit checks.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Log32Result {
    /// 0 = not run, 1 = finished, 2 = an exception stopped it.
    pub status: u32,
    /// The exception vector when `status` is 2.
    pub vector: u32,
    /// The first two dwords of that exception's frame.
    pub frame: [u32; 2],
    /// CR2 when that exception was taken.
    pub cr2: u32,
    /// How far it got: 1 paging on, 2 "log_read" looked up, 3 the demand
    /// read returned, 4 the read from the end returned.
    pub stage: u32,
    /// EAX of the lookup of "log_read".
    pub number: u32,
    /// The buffer and length passed (`LOG32_BUF`, `LOG32_LEN`).
    pub buf: u32,
    pub len: u32,
    /// EAX and EBX after `log_read(LOG32_BUF, LOG32_LEN, 0)`.
    pub rax: u32,
    pub rbx: u32,
    /// EAX and EBX after `log_read(LOG32_BUF, 0x100, rax)`.
    pub rax2: u32,
    pub rbx2: u32,
    /// Page faults the demand handler mapped a page for.
    pub faults: u32,
    /// CR2 and error code of the first such fault.
    pub first_cr2: u32,
    pub first_error: u32,
    /// Error codes of all of them, or-ed.
    pub errors_or: u32,
    /// The page-table entry the last one wrote (frame | P | W).
    pub mapped: u32,
    /// CR0 and CR4 while paging was on.
    pub cr0: u32,
    pub cr4: u32,
}

/// Where the 32-bit demand-paging checks put their two-page window: the
/// first page is present, the second is mapped by the #PF handler.
pub const LOG32_VA: u32 = 0xC000_0000;
/// The buffer: 256 bytes before the end of the present page.
pub const LOG32_BUF: u32 = LOG32_VA + 0xF00;
/// Its length: it ends inside the second page.
pub const LOG32_LEN: u32 = 0x1000;

/// A 4 KiB page table or data page.
pub type Page = [u64; 512];

// SAFETY (for the whole block): these symbols are defined by the assembly
// below with exactly these sizes; the guest is single-threaded.
unsafe extern "C" {
    /// The multiboot data copied at entry.
    static TG_BOOT: BootCopy;
    /// The paging-off check's results.
    static TG_PAGING_OFF: PagingOffResult;
    /// The 32-bit and PAE log_read checks' results.
    static TG_LOG32: [Log32Result; 2];
    /// The paging-off lookup bench.
    static TG_BENCH32: Bench32;
    /// Frames of those checks: 0 and 1 are the present buffer pages of the
    /// 32-bit and the PAE run, 2 and 3 the pools their #PF handler maps.
    pub static TG_LOG32_FRAMES: [Page; 4];
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

/// The results of `log_read_32bit` (`pae` false) or `log_read_pae`.
pub fn log32_result(pae: bool) -> Log32Result {
    // SAFETY: written only by the trampoline before Rust runs.
    unsafe { addr_of!(TG_LOG32[usize::from(pae)]).read_volatile() }
}

/// The guest-physical address of frame `n` (0..4) of the 32-bit checks.
pub fn log32_frame(n: usize) -> u64 {
    assert!(n < 4);
    // Identity-mapped, so the address is the physical one.
    addr_of!(TG_LOG32_FRAMES) as u64 + 4096 * n as u64
}

/// A copy of the multiboot data saved at entry.
pub fn boot_copy() -> BootCopy {
    // SAFETY: written only by the trampoline before Rust runs.
    unsafe { addr_of!(TG_BOOT).read_volatile() }
}

/// The paging-off lookup bench's figures (all zero unless in bench mode).
pub fn bench32() -> Bench32 {
    // SAFETY: written only by the trampoline before Rust runs.
    unsafe { addr_of!(TG_BENCH32).read_volatile() }
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
    .fill {po_size}, 1, 0
.balign 16
.global TG_BENCH32
TG_BENCH32:
    .long 0, 0, 0               /* iterations ticks baseline */
.balign 16
.global TG_LOG32
TG_LOG32:                       /* 32-bit paging, then PAE */
    .fill 2 * {lr_size}, 1, 0
tg_in_check32:      .long 0     /* 1 while a recoverable 32-bit check runs */
tg_check32_esp:     .long 0     /* ESP to resume with after an exception */
tg_check32_rec:     .long 0     /* its record (status, vector, frame, cr2) */
tg_check32_resume:  .long 0     /* where to resume */
tg_use_vmcall32:    .long 0     /* 1 = Intel (VMCALL), 0 = VMMCALL */
tg_saved_cr4:       .long 0     /* CR4 before a paging check */
/* The 32-bit demand pager: while armed, a #PF with P=0 in the window
   LOG32_VA .. + 8 KiB maps the page to the next frame of the pool. */
tg_demand32_armed:  .long 0
tg_demand32_pt:     .long 0     /* the window's page table */
tg_demand32_shift:  .long 0     /* log2 of its entry size: 2 or 3 (PAE) */
tg_demand32_next:   .long 0     /* next free frame */
tg_demand32_end:    .long 0     /* end of the pool */
tg_demand32_rec:    .long 0     /* record that counts the faults */

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
tg_name_log_read:   .asciz "log_read"
tg_word_bench:      .asciz "bench"
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
/* tables of the 32-bit and PAE log_read checks */
.balign 4096
tg_pd32:        .skip 4096      /* 32-bit paging: page directory */
tg_pt32:        .skip 4096      /*   its page table for LOG32_VA */
tg_pae_pdpt:    .skip 4096      /* PAE: PDPT (first 32 bytes used) */
tg_pae_pd_low:  .skip 4096      /*   0 .. 1 GiB, 2 MiB pages */
tg_pae_pd_high: .skip 4096      /*   3 .. 4 GiB */
tg_pae_pt:      .skip 4096      /*   its page table for LOG32_VA */
.global TG_LOG32_FRAMES
TG_LOG32_FRAMES: .skip 4 * 4096
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
    mov dword ptr [tg_check32_rec], offset TG_PAGING_OFF
    mov dword ptr [tg_check32_resume], offset .Lcheck32_done
    xor eax, eax
    mov ebx, offset tg_name_dbgsh
    call tg_vmm32
    mov dword ptr [TG_PAGING_OFF + {po_dbgsh}], eax
    xor eax, eax
    mov ebx, offset tg_name_nosuch
    call tg_vmm32
    mov dword ptr [TG_PAGING_OFF + {po_nosuch}], eax
    mov dword ptr [TG_PAGING_OFF + {r_status}], 1
.Lcheck32_done:
    mov dword ptr [tg_in_check32], 0

    /* lookup_dbgsh_paging_off (bench mode only): warm up, then time the
       lookups and the same loop with a NOP */
    call tg_cmdline_bench
    test eax, eax
    jz .Lbench32_done
    mov ecx, 10
    xor edx, edx
    call tg_bench32_loop
    mov ecx, 10
    mov edx, 1
    call tg_bench32_loop
    mov ecx, {bench32_n}
    xor edx, edx
    call tg_bench32_loop
    mov dword ptr [TG_BENCH32 + 4], eax
    mov ecx, {bench32_n}
    mov edx, 1
    call tg_bench32_loop
    mov dword ptr [TG_BENCH32 + 8], eax
    mov dword ptr [TG_BENCH32], {bench32_n}
.Lbench32_done:

    /* log_read_32bit: 32-bit paging, 4 MiB identity pages for 0 .. 8 MiB,
       LOG32_VA in 4 KiB pages (the first present, the second not) */
    mov esi, offset TG_LOG32
    mov dword ptr [tg_check32_resume], offset .Llog32_end
    call tg_check32_begin
    mov dword ptr [tg_pd32 + 0], 0x00000083         /* P W PS */
    mov dword ptr [tg_pd32 + 4], 0x00400083
    mov eax, offset tg_pt32
    or eax, 3
    mov dword ptr [tg_pd32 + ({log32_va} >> 22) * 4], eax
    mov eax, offset TG_LOG32_FRAMES
    or eax, 3
    mov dword ptr [tg_pt32], eax
    mov dword ptr [tg_demand32_pt], offset tg_pt32
    mov dword ptr [tg_demand32_shift], 2
    mov dword ptr [tg_demand32_next], offset TG_LOG32_FRAMES + 2 * 4096
    mov dword ptr [tg_demand32_end], offset TG_LOG32_FRAMES + 3 * 4096
    mov eax, cr4
    or eax, 0x10                /* PSE */
    and eax, 0xFFFFFFDF          /* no PAE */
    mov cr4, eax
    mov eax, offset tg_pd32
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    jmp 1f
1:
    call tg_log32_calls
.Llog32_end:                    /* also where an exception resumes */
    call tg_check32_end

    /* log_read_pae: PAE paging, 2 MiB identity pages for 0 .. 8 MiB,
       LOG32_VA in 4 KiB pages (the first present, the second not) */
    mov esi, offset TG_LOG32 + {lr_size}
    mov dword ptr [tg_check32_resume], offset .Lpae_end
    call tg_check32_begin
    mov eax, offset tg_pae_pd_low
    or eax, 1                   /* PDPTEs: P only (R/W, U/S reserved) */
    mov dword ptr [tg_pae_pdpt + 0], eax
    mov eax, offset tg_pae_pd_high
    or eax, 1
    mov dword ptr [tg_pae_pdpt + ({log32_va} >> 30) * 8], eax
    mov dword ptr [tg_pae_pd_low + 0], 0x00000083
    mov dword ptr [tg_pae_pd_low + 8], 0x00200083
    mov dword ptr [tg_pae_pd_low + 16], 0x00400083
    mov dword ptr [tg_pae_pd_low + 24], 0x00600083
    mov eax, offset tg_pae_pt
    or eax, 3
    mov dword ptr [tg_pae_pd_high + (({log32_va} >> 21) & 0x1FF) * 8], eax
    mov eax, offset TG_LOG32_FRAMES + 4096
    or eax, 3
    mov dword ptr [tg_pae_pt], eax
    mov dword ptr [tg_demand32_pt], offset tg_pae_pt
    mov dword ptr [tg_demand32_shift], 3
    mov dword ptr [tg_demand32_next], offset TG_LOG32_FRAMES + 3 * 4096
    mov dword ptr [tg_demand32_end], offset TG_LOG32_FRAMES + 4 * 4096
    mov eax, cr4
    or eax, 0x20                /* PAE */
    mov cr4, eax
    mov eax, offset tg_pae_pdpt
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    jmp 1f
1:
    call tg_log32_calls
.Lpae_end:
    call tg_check32_end

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

/* Starts a recoverable check whose record is at ESI: an exception until
   tg_check32_end records itself there and resumes at tg_check32_resume
   (set by the caller) with the stack as it is after this call. Saves CR4. */
tg_check32_begin:
    lea eax, [esp + 4]
    mov dword ptr [tg_check32_esp], eax
    mov dword ptr [tg_check32_rec], esi
    mov dword ptr [tg_demand32_rec], esi
    mov eax, cr4
    mov dword ptr [tg_saved_cr4], eax
    mov dword ptr [tg_in_check32], 1
    ret

/* Ends it: paging off, CR4 as saved (PAE and PSE cleared again), the
   demand pager disarmed. Runs after an exception too. */
tg_check32_end:
    mov eax, cr0
    and eax, 0x7FFFFFFF
    mov cr0, eax
    jmp 1f
1:
    mov eax, dword ptr [tg_saved_cr4]
    mov cr4, eax
    xor eax, eax
    mov cr3, eax
    mov dword ptr [tg_demand32_armed], 0
    mov dword ptr [tg_in_check32], 0
    ret

/* The body of both paging checks, with paging on and the record at ESI:
   look up "log_read", read the log from offset 0 into the buffer that
   crosses into the not-present page (the demand pager armed), then read
   from where that read ended. Sets the status to 1. */
tg_log32_calls:
    push ebp
    mov eax, cr0
    mov dword ptr [esi + {r_cr0}], eax
    mov eax, cr4
    mov dword ptr [esi + {r_cr4}], eax
    mov dword ptr [esi + {r_stage}], 1
    xor eax, eax
    mov ebx, offset tg_name_log_read
    call tg_vmm32
    mov dword ptr [esi + {r_number}], eax
    mov dword ptr [esi + {r_stage}], 2
    test eax, eax
    jz .Llog32_calls_done
    mov ebp, eax
    mov ebx, {log32_buf}
    mov ecx, {log32_len}
    mov dword ptr [esi + {r_buf}], ebx
    mov dword ptr [esi + {r_len}], ecx
    xor edx, edx
    mov dword ptr [tg_demand32_armed], 1
    call tg_vmm32
    mov dword ptr [tg_demand32_armed], 0
    mov dword ptr [esi + {r_rax}], eax
    mov dword ptr [esi + {r_rbx}], ebx
    mov dword ptr [esi + {r_stage}], 3
    /* from the end: 0x100 bytes at most, all in the present page */
    mov edx, eax
    mov eax, ebp
    mov ebx, {log32_buf}
    mov ecx, 0x100
    call tg_vmm32
    mov dword ptr [esi + {r_rax2}], eax
    mov dword ptr [esi + {r_rbx2}], ebx
    mov dword ptr [esi + {r_stage}], 4
.Llog32_calls_done:
    mov dword ptr [esi + {r_status}], 1
    pop ebp
    ret

/* EAX = 1 when the command line has the token "bench", else 0. */
tg_cmdline_bench:
    push esi
    push edi
    mov esi, offset TG_BOOT + 24
.Lcmdb_token:
    mov al, byte ptr [esi]
    test al, al
    jz .Lcmdb_no
    cmp al, 0x20
    ja .Lcmdb_word
    inc esi                     /* space or control character */
    jmp .Lcmdb_token
.Lcmdb_word:
    mov edi, offset tg_word_bench
    xor ecx, ecx
.Lcmdb_cmp:
    mov al, byte ptr [edi + ecx]
    test al, al
    jz .Lcmdb_word_end
    cmp al, byte ptr [esi + ecx]
    jne .Lcmdb_skip
    inc ecx
    jmp .Lcmdb_cmp
.Lcmdb_word_end:
    cmp byte ptr [esi + ecx], 0x20  /* the token ends here: NUL or space */
    jbe .Lcmdb_yes
.Lcmdb_skip:
    mov al, byte ptr [esi]
    cmp al, 0x20
    jbe .Lcmdb_token
    inc esi
    jmp .Lcmdb_skip
.Lcmdb_yes:
    mov eax, 1
    jmp .Lcmdb_ret
.Lcmdb_no:
    xor eax, eax
.Lcmdb_ret:
    pop edi
    pop esi
    ret

/* The paging-off bench loop: ECX iterations of function 0 with "dbgsh",
   or of the same loop with a NOP in place of the call when EDX != 0
   (the shape of bench.rs's 64-bit loop). EAX = TSC ticks (low 32 bits). */
tg_bench32_loop:
    push ebx
    push esi
    push edi
    push ebp
    mov esi, ecx
    mov ebp, edx
    mov edi, dword ptr [tg_use_vmcall32]
    rdtsc
    push eax
2:
    xor eax, eax
    mov ebx, offset tg_name_dbgsh
    test ebp, ebp
    jnz 4f
    test edi, edi
    jnz 3f
    vmmcall
    jmp 5f
3:
    vmcall
    jmp 5f
4:
    nop
5:
    dec esi
    jnz 2b
    rdtsc
    pop ecx
    sub eax, ecx
    pop ebp
    pop edi
    pop esi
    pop ebx
    ret

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

/* The demand pager first: a #PF it is armed for maps the page and returns
   to the faulting instruction (error code popped). Otherwise, during a
   recoverable check an exception is a result: record it and resume after
   the check. Anywhere else it ends the run. */
tg_exc32_common:
    cmp dword ptr [esp], 14
    jne .Lexc32_other
    cmp dword ptr [tg_demand32_armed], 0
    je .Lexc32_other
    push eax
    push ebx
    push ecx
    push edx
    /* EDX ECX EBX EAX, vector, error code, EIP, CS, EFLAGS */
    mov ebx, dword ptr [esp + 20]
    test ebx, 1
    jnz .Ldemand32_no           /* a protection fault: not ours */
    mov eax, cr2
    cmp eax, {log32_va}
    jb .Ldemand32_no
    cmp eax, {log32_va} + 2 * 4096
    jae .Ldemand32_no
    mov ecx, dword ptr [tg_demand32_next]
    cmp ecx, dword ptr [tg_demand32_end]
    jae .Ldemand32_no           /* pool used up */
    add dword ptr [tg_demand32_next], 4096
    mov edx, dword ptr [tg_demand32_rec]
    cmp dword ptr [edx + {r_faults}], 0
    jne 1f
    mov dword ptr [edx + {r_first_cr2}], eax
    mov dword ptr [edx + {r_first_error}], ebx
1:
    inc dword ptr [edx + {r_faults}]
    or dword ptr [edx + {r_errors_or}], ebx
    or ecx, 3                   /* P W */
    mov dword ptr [edx + {r_mapped}], ecx
    mov edx, eax
    shr edx, 12
    and edx, 0x1FF              /* the window lies in one table either way */
    push ecx
    mov ecx, dword ptr [tg_demand32_shift]
    shl edx, cl
    pop ecx
    add edx, dword ptr [tg_demand32_pt]
    mov dword ptr [edx], ecx    /* PAE: the high half is already 0 */
    invlpg [eax]
    pop edx
    pop ecx
    pop ebx
    pop eax
    add esp, 8                  /* vector, error code */
    iretd
.Ldemand32_no:
    pop edx
    pop ecx
    pop ebx
    pop eax
.Lexc32_other:
    pop eax
    cmp dword ptr [tg_in_check32], 0
    je .Lfatal32
    mov ebx, dword ptr [tg_check32_rec]
    mov dword ptr [ebx + {r_vector}], eax
    mov ecx, dword ptr [esp]
    mov dword ptr [ebx + {r_frame}], ecx
    mov ecx, dword ptr [esp + 4]
    mov dword ptr [ebx + {r_frame} + 4], ecx
    mov ecx, cr2
    mov dword ptr [ebx + {r_cr2}], ecx
    mov dword ptr [ebx + {r_status}], 2
    mov esp, dword ptr [tg_check32_esp]
    jmp dword ptr [tg_check32_resume]
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
    bench32_n = const BENCH32_ITERATIONS,
    po_size = const size_of::<PagingOffResult>(),
    po_dbgsh = const offset_of!(PagingOffResult, dbgsh),
    po_nosuch = const offset_of!(PagingOffResult, nosuch),
    lr_size = const size_of::<Log32Result>(),
    r_status = const offset_of!(Log32Result, status),
    r_vector = const offset_of!(Log32Result, vector),
    r_frame = const offset_of!(Log32Result, frame),
    r_cr2 = const offset_of!(Log32Result, cr2),
    r_stage = const offset_of!(Log32Result, stage),
    r_number = const offset_of!(Log32Result, number),
    r_buf = const offset_of!(Log32Result, buf),
    r_len = const offset_of!(Log32Result, len),
    r_rax = const offset_of!(Log32Result, rax),
    r_rbx = const offset_of!(Log32Result, rbx),
    r_rax2 = const offset_of!(Log32Result, rax2),
    r_rbx2 = const offset_of!(Log32Result, rbx2),
    r_faults = const offset_of!(Log32Result, faults),
    r_first_cr2 = const offset_of!(Log32Result, first_cr2),
    r_first_error = const offset_of!(Log32Result, first_error),
    r_errors_or = const offset_of!(Log32Result, errors_or),
    r_mapped = const offset_of!(Log32Result, mapped),
    r_cr0 = const offset_of!(Log32Result, cr0),
    r_cr4 = const offset_of!(Log32Result, cr4),
    log32_va = const LOG32_VA,
    log32_buf = const LOG32_BUF,
    log32_len = const LOG32_LEN,
);

// Every 32-bit check record starts with the same header, which the
// trampoline's exception handler writes through `tg_check32_rec`.
const _: () = {
    assert!(offset_of!(PagingOffResult, status) == offset_of!(Log32Result, status));
    assert!(offset_of!(PagingOffResult, vector) == offset_of!(Log32Result, vector));
    assert!(offset_of!(PagingOffResult, frame) == offset_of!(Log32Result, frame));
    assert!(offset_of!(PagingOffResult, cr2) == offset_of!(Log32Result, cr2));
    assert!(size_of::<Log32Result>().is_multiple_of(4));
};
