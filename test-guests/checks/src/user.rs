//! Ring 3 for `syscall_sysret` and `log_read_refused`: one page of user
//! code, one page of user data (results, a buffer and the user stack), the
//! SYSCALL entry point (LSTAR) and the `int 0x80` gate handler that brings
//! ring 3 back to ring 0.
//!
//! The round trip, started by [`run_ring3`] at CPL 0:
//!  1. `tg_enter_user` saves the callee-saved registers and RSP in
//!     `TG_SYSCALL_REC`, then IRETQs to `TG_USER_ENTRY` (CS 0x43, SS 0x3B,
//!     RSP = top of the user data page, IF off).
//!  2. Ring 3 records CS, looks up "dbgsh" with the VMM call (the name lies
//!     in the user code page), sets DF and records RFLAGS, and runs SYSCALL.
//!  3. `TG_SYSCALL_ENTRY` (CPL 0, still on the user stack) records RCX, R11,
//!     CS, SS, RFLAGS (DF must be masked off by SFMASK), counts the call and
//!     SYSRETs.
//!  4. Back in ring 3 at `TG_USER_AFTER_SYSCALL`: records RFLAGS (DF must be
//!     back), clears DF, records CS and a marker, and runs `int 0x80`.
//!  5. `TG_INT80_ENTRY` (on RSP0) records the interrupted CS and RIP,
//!     reloads the saved RSP and data segments, and returns from
//!     `tg_enter_user`.
//!
//! [`call_ring3`] enters at `TG_USER_CALL` instead, which makes one VMM
//! call with RAX..RDX from a [`UserCall`] in the user data page, stores RAX
//! and RBX back and runs `int 0x80` (step 5).
//!
//! The user code page holds nothing else (`.text.tg_user`, page-aligned and
//! padded); the user data page is a page of its own in `.bss`.

use crate::entry::Page;
use crate::interrupts;
use core::ptr::{addr_of, addr_of_mut};

/// Selector of 32-bit user code; STAR[63:48], the SYSRET base.
pub const USER_BASE_SEL: u16 = 0x30;
/// Selectors ring 3 runs with (RPL 3): SYSRET base + 8 and + 16.
pub const USER_DATA_SEL: u16 = 0x3B;
pub const USER_CODE64_SEL: u16 = 0x43;
/// STAR[47:32], the SYSCALL base: CS 0x08, SS 0x10.
pub const KERNEL_BASE_SEL: u16 = 0x08;

/// What ring 3 writes into its data page (offsets fixed in the assembly).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UserRecord {
    /// CS at the user entry point.
    pub cs_start: u64,
    /// RAX of the "dbgsh" lookup made from ring 3.
    pub lookup: u64,
    /// RFLAGS just before SYSCALL (DF set).
    pub rflags_before: u64,
    /// CS after SYSRET.
    pub cs_after: u64,
    /// RFLAGS right after SYSRET.
    pub rflags_after: u64,
    /// 1 once ring 3 ran past SYSRET.
    pub reached_after: u64,
}

/// What the ring-0 entry points record (offsets fixed in the assembly).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SyscallRecord {
    /// SYSCALLs that reached `TG_SYSCALL_ENTRY`.
    pub count: u64,
    /// RCX, R11, CS, SS, RFLAGS and RSP in the SYSCALL handler.
    pub rcx: u64,
    pub r11: u64,
    pub cs: u64,
    pub ss: u64,
    pub rflags: u64,
    pub rsp: u64,
    /// `int 0x80`s that reached `TG_INT80_ENTRY`, and the CS and RIP they
    /// interrupted.
    pub int_count: u64,
    pub int_cs: u64,
    pub int_rip: u64,
    /// RSP of `tg_enter_user` to return with.
    pub kernel_rsp: u64,
}

// SAFETY (for the whole block): defined by the assembly below with these
// sizes; one CPU, and the records are only read while ring 3 is not running.
unsafe extern "C" {
    /// The user code page.
    static TG_USER_CODE: u8;
    /// The user data page: a `UserRecord` at its start, the stack at its end.
    static mut TG_USER_DATA: Page;
    /// Where SYSCALL returns to (the instruction after it).
    static TG_USER_AFTER_SYSCALL: u8;
    static mut TG_SYSCALL_REC: SyscallRecord;
    /// The page table that splits the first 2 MiB into 4 KiB pages.
    pub static mut TG_PT_LOW: Page;
    static TG_RING0_STACK_TOP: u8;
    static TG_SYSCALL_ENTRY: u8;
    static TG_INT80_ENTRY: u8;
}

unsafe extern "sysv64" {
    /// Enters ring 3 at `entry` (in the user code page) and returns once
    /// ring 3 ran `int 0x80`.
    fn tg_enter_user(use_vmcall: u64, entry: u64);
}

// SAFETY (for the whole block): labels in the user code page below.
unsafe extern "C" {
    /// The `syscall_sysret` round trip.
    static TG_USER_ENTRY: u8;
    /// One VMM call with the registers of `UserCall`.
    static TG_USER_CALL: u8;
}

/// A VMM call made from ring 3 by [`call_ring3`]: RAX..RDX in, RAX and RBX
/// out. Lives at `USER_CALL_OFFSET` in the user data page.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UserCall {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub out_rax: u64,
    pub out_rbx: u64,
}

/// Where `UserCall` lies in the user data page (after `UserRecord`).
const USER_CALL_OFFSET: usize = 0x100;
/// A buffer ring 3 may write: this part of the user data page (the user
/// stack is at the page's end, unused by `call_ring3`).
pub const USER_BUF_OFFSET: u64 = 0x400;
pub const USER_BUF_LEN: u64 = 0x400;

/// Linear (= physical) address of the user code page.
pub fn code_page() -> u64 {
    addr_of!(TG_USER_CODE) as u64
}

/// Linear (= physical) address of the user data page.
pub fn data_page() -> u64 {
    addr_of!(TG_USER_DATA) as u64
}

/// The address SYSCALL must leave in RCX.
pub fn after_syscall() -> u64 {
    addr_of!(TG_USER_AFTER_SYSCALL) as u64
}

/// The LSTAR value.
pub fn syscall_entry() -> u64 {
    addr_of!(TG_SYSCALL_ENTRY) as u64
}

/// The handler of gate 0x80.
pub fn int80_entry() -> u64 {
    addr_of!(TG_INT80_ENTRY) as u64
}

/// Clears both records, sets RSP0, runs the ring-3 round trip and returns
/// what was recorded. STAR, LSTAR, SFMASK and EFER.SCE must be set up.
pub fn run_ring3(use_vmcall: bool) -> (UserRecord, SyscallRecord) {
    interrupts::set_rsp0(addr_of!(TG_RING0_STACK_TOP) as u64);
    // SAFETY: ring 3 is not running; the records are plain data defined by
    // the assembly below.
    unsafe {
        addr_of_mut!(TG_SYSCALL_REC).write_volatile(SyscallRecord::default());
        addr_of_mut!(TG_USER_DATA)
            .cast::<UserRecord>()
            .write_volatile(UserRecord::default());
    }
    // SAFETY: `tg_enter_user` keeps the callee-saved registers and RSP and
    // returns normally through `TG_INT80_ENTRY`; the GDT, IDT gate 0x80,
    // RSP0, the user mappings (`paging::map_user_pages`) and the SYSCALL
    // MSRs are in place. A fault in ring 3 is reported by the exception
    // handler, which ends the run.
    unsafe { tg_enter_user(u64::from(use_vmcall), addr_of!(TG_USER_ENTRY) as u64) };
    // SAFETY: as above; ring 3 has finished.
    unsafe {
        (
            addr_of!(TG_USER_DATA).cast::<UserRecord>().read_volatile(),
            addr_of!(TG_SYSCALL_REC).read_volatile(),
        )
    }
}

/// Makes one VMM call from ring 3 with RAX..RDX from `call` and returns
/// RAX and RBX as ring 3 saw them. The int 0x80 gate and the user mappings
/// must be in place (as for [`run_ring3`]); the SYSCALL MSRs are not used.
pub fn call_ring3(use_vmcall: bool, call: UserCall) -> (u64, u64) {
    interrupts::set_rsp0(addr_of!(TG_RING0_STACK_TOP) as u64);
    let slot = addr_of_mut!(TG_USER_DATA)
        .cast::<u8>()
        .wrapping_add(USER_CALL_OFFSET)
        .cast::<UserCall>();
    // SAFETY: ring 3 is not running; the slot lies in the user data page,
    // past the `UserRecord`, and is 8-byte aligned.
    unsafe { slot.write_volatile(call) };
    // SAFETY: as in `run_ring3`; `TG_USER_CALL` makes the call, stores the
    // results into the slot and returns through `int 0x80`.
    unsafe { tg_enter_user(u64::from(use_vmcall), addr_of!(TG_USER_CALL) as u64) };
    // SAFETY: ring 3 has finished.
    let done = unsafe { slot.read_volatile() };
    (done.out_rax, done.out_rbx)
}

core::arch::global_asm!(
    r#"
.section .bss.tg_user, "aw", @nobits
.balign 4096
.global TG_USER_DATA
TG_USER_DATA:
    .skip 4096
.global TG_PT_LOW
TG_PT_LOW:
    .skip 4096
.global TG_SYSCALL_REC
TG_SYSCALL_REC:
    .skip 11 * 8
.balign 16
    .skip 4096
.global TG_RING0_STACK_TOP
TG_RING0_STACK_TOP:

/* ---------------- ring 0 ------------------------------------------------ */
.section .text.tg_ring0, "ax"
.code64
.global tg_enter_user
tg_enter_user:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov qword ptr [rip + TG_SYSCALL_REC + 80], rsp
    mov r12, rdi                        /* 1 = VMCALL, 0 = VMMCALL */
    push {user_ss}
    lea rax, [rip + TG_USER_DATA + 4096]
    push rax
    push 0x2                            /* RFLAGS: IF off */
    push {user_cs}
    push rsi                            /* the ring-3 entry point */
    iretq

/* LSTAR: CPL 0, RSP still the user's (SYSCALL does not switch stacks). */
.global TG_SYSCALL_ENTRY
TG_SYSCALL_ENTRY:
    mov qword ptr [rip + TG_SYSCALL_REC + 8], rcx
    mov qword ptr [rip + TG_SYSCALL_REC + 16], r11
    mov rax, cs
    mov qword ptr [rip + TG_SYSCALL_REC + 24], rax
    mov rax, ss
    mov qword ptr [rip + TG_SYSCALL_REC + 32], rax
    pushfq
    pop rax
    mov qword ptr [rip + TG_SYSCALL_REC + 40], rax
    mov qword ptr [rip + TG_SYSCALL_REC + 48], rsp
    inc qword ptr [rip + TG_SYSCALL_REC + 0]
    sysretq

/* Gate 0x80 (DPL 3, no IST): on RSP0 with RIP, CS, RFLAGS, RSP, SS. */
.global TG_INT80_ENTRY
TG_INT80_ENTRY:
    mov rax, qword ptr [rsp]
    mov qword ptr [rip + TG_SYSCALL_REC + 72], rax
    mov rax, qword ptr [rsp + 8]
    mov qword ptr [rip + TG_SYSCALL_REC + 64], rax
    inc qword ptr [rip + TG_SYSCALL_REC + 56]
    mov rsp, qword ptr [rip + TG_SYSCALL_REC + 80]
    mov ax, 0x10                        /* SS became null, DS/ES maybe too */
    mov ss, ax
    mov ds, ax
    mov es, ax
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

/* ---------------- ring 3: this page only -------------------------------- */
.section .text.tg_user, "ax"
.balign 4096
.global TG_USER_CODE, TG_USER_ENTRY
TG_USER_CODE:
TG_USER_ENTRY:
    mov rax, cs
    mov qword ptr [rip + TG_USER_DATA + 0], rax
    xor eax, eax                        /* function 0: look up "dbgsh" */
    lea rbx, [rip + tg_user_name]
    test r12, r12
    jz 1f
    vmcall
    jmp 2f
1:
    vmmcall
2:
    mov qword ptr [rip + TG_USER_DATA + 8], rax
    std
    pushfq
    pop rax
    mov qword ptr [rip + TG_USER_DATA + 16], rax
    mov eax, 0x5C
    syscall
.global TG_USER_AFTER_SYSCALL
TG_USER_AFTER_SYSCALL:
    pushfq
    pop rax
    cld
    mov qword ptr [rip + TG_USER_DATA + 32], rax
    mov rax, cs
    mov qword ptr [rip + TG_USER_DATA + 24], rax
    mov qword ptr [rip + TG_USER_DATA + 40], 1
    int {gate}
    ud2
tg_user_name:
    .asciz "dbgsh"

/* One VMM call: RAX..RDX from the UserCall slot, RAX and RBX back into it. */
.global TG_USER_CALL
TG_USER_CALL:
    mov rax, qword ptr [rip + TG_USER_DATA + {call} + 0]
    mov rbx, qword ptr [rip + TG_USER_DATA + {call} + 8]
    mov rcx, qword ptr [rip + TG_USER_DATA + {call} + 16]
    mov rdx, qword ptr [rip + TG_USER_DATA + {call} + 24]
    test r12, r12
    jz 1f
    vmcall
    jmp 2f
1:
    vmmcall
2:
    mov qword ptr [rip + TG_USER_DATA + {call} + 32], rax
    mov qword ptr [rip + TG_USER_DATA + {call} + 40], rbx
    int {gate}
    ud2
.balign 4096
"#,
    user_ss = const USER_DATA_SEL,
    user_cs = const USER_CODE64_SEL,
    gate = const interrupts::SYSCALL_GATE,
    call = const USER_CALL_OFFSET,
);

// The assembly's offsets.
const _: () = {
    assert!(core::mem::offset_of!(SyscallRecord, count) == 0);
    assert!(core::mem::offset_of!(SyscallRecord, rcx) == 8);
    assert!(core::mem::offset_of!(SyscallRecord, r11) == 16);
    assert!(core::mem::offset_of!(SyscallRecord, cs) == 24);
    assert!(core::mem::offset_of!(SyscallRecord, ss) == 32);
    assert!(core::mem::offset_of!(SyscallRecord, rflags) == 40);
    assert!(core::mem::offset_of!(SyscallRecord, rsp) == 48);
    assert!(core::mem::offset_of!(SyscallRecord, int_count) == 56);
    assert!(core::mem::offset_of!(SyscallRecord, int_cs) == 64);
    assert!(core::mem::offset_of!(SyscallRecord, int_rip) == 72);
    assert!(core::mem::offset_of!(SyscallRecord, kernel_rsp) == 80);
    assert!(core::mem::size_of::<SyscallRecord>() == 11 * 8);
    assert!(core::mem::offset_of!(UserRecord, cs_start) == 0);
    assert!(core::mem::offset_of!(UserRecord, lookup) == 8);
    assert!(core::mem::offset_of!(UserRecord, rflags_before) == 16);
    assert!(core::mem::offset_of!(UserRecord, cs_after) == 24);
    assert!(core::mem::offset_of!(UserRecord, rflags_after) == 32);
    assert!(core::mem::offset_of!(UserRecord, reached_after) == 40);
    assert!(core::mem::size_of::<UserRecord>() <= USER_CALL_OFFSET);
    assert!(core::mem::offset_of!(UserCall, rax) == 0);
    assert!(core::mem::offset_of!(UserCall, rbx) == 8);
    assert!(core::mem::offset_of!(UserCall, rcx) == 16);
    assert!(core::mem::offset_of!(UserCall, rdx) == 24);
    assert!(core::mem::offset_of!(UserCall, out_rax) == 32);
    assert!(core::mem::offset_of!(UserCall, out_rbx) == 40);
    assert!(USER_CALL_OFFSET + core::mem::size_of::<UserCall>() <= USER_BUF_OFFSET as usize);
};
