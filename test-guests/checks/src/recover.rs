//! Expected exceptions: a check arms one vector, runs a single faulting
//! instruction inside an `asm!` block that first stores the address of a
//! local label after the instruction in [`RESUME_RIP`], and the exception
//! handler, seeing the armed vector, records it and returns to that label
//! instead of ending the run. Every register comes back as it was when the
//! exception was taken (the handler's frame is restored by IRETQ), so the
//! `asm!` block simply falls through. Any other exception is still fatal.
//!
//! The wrappers below (`rdmsr`, `wrmsr`, `call_at`, `vmm_call4`, `ud2`,
//! `xsetbv`, `write_cr`) are the only places that arm; each disarms before
//! returning.

use crate::interrupts::ExceptionFrame;
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// No vector armed.
const NONE: u64 = u64::MAX;

/// The vector the running instruction is expected to raise, or `NONE`.
static ARMED: AtomicU64 = AtomicU64::new(NONE);
/// Where to resume after the expected exception (0: not set yet). Written
/// by the `asm!` blocks through `sym`; an `AtomicU64` is a plain `u64` in
/// memory.
static RESUME_RIP: AtomicU64 = AtomicU64::new(0);
/// What the handler saw: vector (`NONE` = nothing caught), error code,
/// CR2 (page faults only, else 0) and the faulting RIP.
static CAUGHT_VECTOR: AtomicU64 = AtomicU64::new(NONE);
static CAUGHT_ERROR: AtomicU64 = AtomicU64::new(0);
static CAUGHT_CR2: AtomicU64 = AtomicU64::new(0);
static CAUGHT_RIP: AtomicU64 = AtomicU64::new(0);

/// Vector numbers the checks expect.
pub const UD: u8 = 6;
pub const GP: u8 = 13;
pub const PF: u8 = 14;

/// An exception that was expected and caught.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caught {
    pub vector: u64,
    pub error: u64,
    /// CR2 for a page fault, 0 otherwise.
    pub cr2: u64,
    /// RIP of the faulting instruction.
    pub rip: u64,
}

/// Arms `vector` for the next instruction and forgets an older catch.
fn arm(vector: u8) {
    CAUGHT_VECTOR.store(NONE, Relaxed);
    RESUME_RIP.store(0, Relaxed);
    ARMED.store(u64::from(vector), Relaxed);
}

/// Disarms; `Err` with what was caught since `arm`, if anything.
fn disarm() -> Result<(), Caught> {
    ARMED.store(NONE, Relaxed);
    RESUME_RIP.store(0, Relaxed);
    let vector = CAUGHT_VECTOR.swap(NONE, Relaxed);
    if vector == NONE {
        return Ok(());
    }
    Err(Caught {
        vector,
        error: CAUGHT_ERROR.load(Relaxed),
        cr2: CAUGHT_CR2.load(Relaxed),
        rip: CAUGHT_RIP.load(Relaxed),
    })
}

/// Called by the exception handler first: when the exception is the armed
/// one and a resume address is set, records it, points the frame at the
/// resume address, disarms, and returns true (the handler then returns and
/// the stub IRETQs). Otherwise returns false and the exception stays fatal.
pub fn try_recover(frame: &mut ExceptionFrame, cr2: u64) -> bool {
    let resume = RESUME_RIP.load(Relaxed);
    if ARMED.load(Relaxed) != frame.vector || resume == 0 {
        return false;
    }
    CAUGHT_ERROR.store(frame.error, Relaxed);
    CAUGHT_CR2.store(if frame.vector == 14 { cr2 } else { 0 }, Relaxed);
    CAUGHT_RIP.store(frame.rip, Relaxed);
    CAUGHT_VECTOR.store(frame.vector, Relaxed);
    ARMED.store(NONE, Relaxed);
    RESUME_RIP.store(0, Relaxed);
    frame.rip = resume;
    true
}

/// RDMSR that may raise `vector`: `Ok(value)` or `Err(what was caught)`.
pub fn rdmsr(msr: u32, vector: u8) -> Result<u64, Caught> {
    let (lo, hi): (u32, u32);
    arm(vector);
    // SAFETY: RDMSR at CPL 0 only reads; an expected fault resumes at label
    // 2 with every register restored (EAX/EDX then hold their old values,
    // which are discarded). Not `nomem`: it orders the stores to the
    // recovery statics around it.
    unsafe {
        asm!(
            "lea {t}, [rip + 2f]",
            "mov qword ptr [rip + {resume}], {t}",
            "rdmsr",
            "2:",
            t = out(reg) _,
            resume = sym RESUME_RIP,
            in("ecx") msr,
            out("eax") lo,
            out("edx") hi,
            options(nostack, preserves_flags),
        )
    }
    disarm().map(|()| u64::from(hi) << 32 | u64::from(lo))
}

/// WRMSR that may raise `vector`.
///
/// # Safety
/// Writing `value` to `msr` must not break the guest (or the check must
/// expect the write to fault).
pub unsafe fn wrmsr(msr: u32, value: u64, vector: u8) -> Result<(), Caught> {
    arm(vector);
    // SAFETY: the caller vouches for the write; a fault resumes at label 2.
    unsafe {
        asm!(
            "lea {t}, [rip + 2f]",
            "mov qword ptr [rip + {resume}], {t}",
            "wrmsr",
            "2:",
            t = out(reg) _,
            resume = sym RESUME_RIP,
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags),
        )
    }
    disarm()
}

/// Calls the code at linear address `target` (it must be a lone `ret` if
/// it runs at all) expecting `vector` may be raised; RSP is put back
/// whether the call returned or faulted with the return address pushed.
///
/// # Safety
/// `target`, if it can be executed, must hold code that only returns.
pub unsafe fn call_at(target: u64, vector: u8) -> Result<(), Caught> {
    arm(vector);
    // SAFETY: the caller guarantees the target only returns; the saved RSP
    // undoes the pushed return address when the fetch faults instead. The
    // stack is used (no `nostack`); x86_64-unknown-none has no red zone.
    unsafe {
        asm!(
            "lea {t}, [rip + 2f]",
            "mov qword ptr [rip + {resume}], {t}",
            "mov {sp}, rsp",
            "call {target}",
            "2:",
            "mov rsp, {sp}",
            t = out(reg) _,
            sp = out(reg) _,
            resume = sym RESUME_RIP,
            target = in(reg) target,
        )
    }
    disarm()
}

/// A VMM call with RAX, RBX, RCX and RDX set (every other register as the
/// compiler left it) during which `vector` may be raised: `Ok((RAX, RBX))`
/// after it, or `Err(what was caught)`. A page fault the demand pager
/// (`demand.rs`) handles is not caught: it runs the call again, as the VMM
/// intends; one it does not handle (say, with CR2 outside its window) ends
/// the call here instead of the run.
pub fn vmm_call4(
    use_vmcall: bool,
    rax: u64,
    rbx: u64,
    rcx: u64,
    rdx: u64,
    vector: u8,
) -> Result<(u64, u64), Caught> {
    let (out_rax, out_rbx): (u64, u64);
    arm(vector);
    // SAFETY: a VMM call changes only the registers its function returns
    // in (RAX, RBX for log_read and lookups), which are outputs here; RCX
    // and RDX are declared clobbered in case a function uses them. RBX is
    // swapped in and out through a scratch register (LLVM reserves it). An
    // expected fault resumes at label 2 with every register as it was at
    // the fault, so RBX is swapped back the same way.
    unsafe {
        asm!(
            "lea {t}, [rip + 2f]",
            "mov qword ptr [rip + {resume}], {t}",
            "xchg {b}, rbx",
            "test {intel:e}, {intel:e}",
            "jz 3f",
            "vmcall",
            "jmp 2f",
            "3:",
            "vmmcall",
            "2:",
            "xchg {b}, rbx",
            t = out(reg) _,
            resume = sym RESUME_RIP,
            intel = in(reg) u32::from(use_vmcall),
            b = inout(reg) rbx => out_rbx,
            inout("rax") rax => out_rax,
            inout("rcx") rcx => _,
            inout("rdx") rdx => _,
            options(nostack),
        )
    }
    disarm().map(|()| (out_rax, out_rbx))
}

/// UD2, which must raise #UD: `Err(what was caught)`, or `Ok(())` if the
/// instruction did not fault at all.
pub fn ud2() -> Result<(), Caught> {
    arm(UD);
    // SAFETY: UD2 only raises #UD; the expected fault resumes at label 2
    // with every register restored.
    unsafe {
        asm!(
            "lea {t}, [rip + 2f]",
            "mov qword ptr [rip + {resume}], {t}",
            "ud2",
            "2:",
            t = out(reg) _,
            resume = sym RESUME_RIP,
            options(nostack, preserves_flags),
        )
    }
    disarm()
}

/// XSETBV of `value` into XCR0 that may raise `vector`.
///
/// # Safety
/// CR4.OSXSAVE must be set, and the guest must not depend on the state
/// components `value` turns off.
pub unsafe fn xsetbv(value: u64, vector: u8) -> Result<(), Caught> {
    arm(vector);
    // SAFETY: the caller vouches for the new XCR0; a fault resumes at
    // label 2 with every register restored.
    unsafe {
        asm!(
            "lea {t}, [rip + 2f]",
            "mov qword ptr [rip + {resume}], {t}",
            "xsetbv",
            "2:",
            t = out(reg) _,
            resume = sym RESUME_RIP,
            in("ecx") 0u32,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags),
        )
    }
    disarm()
}

/// MOV to CR0 (`CR = 0`) or CR4 (`CR = 4`) of `value` that may raise
/// `vector`.
///
/// # Safety
/// Either the write must fault, or `value` must keep the guest running.
pub unsafe fn write_cr<const CR: u8>(value: u64, vector: u8) -> Result<(), Caught> {
    arm(vector);
    // SAFETY: the caller vouches for the value; a fault resumes at label 2
    // with every register restored. Not `nomem`: memory accesses must not
    // move across a change of paging or protection.
    unsafe {
        match CR {
            0 => asm!(
                "lea {t}, [rip + 2f]",
                "mov qword ptr [rip + {resume}], {t}",
                "mov cr0, {v}",
                "2:",
                t = out(reg) _,
                resume = sym RESUME_RIP,
                v = in(reg) value,
                options(nostack, preserves_flags),
            ),
            4 => asm!(
                "lea {t}, [rip + 2f]",
                "mov qword ptr [rip + {resume}], {t}",
                "mov cr4, {v}",
                "2:",
                t = out(reg) _,
                resume = sym RESUME_RIP,
                v = in(reg) value,
                options(nostack, preserves_flags),
            ),
            _ => unreachable!("write_cr::<{CR}>: only CR0 and CR4"),
        }
    }
    disarm()
}
