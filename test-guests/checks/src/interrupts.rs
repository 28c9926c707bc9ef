//! The 64-bit IDT: every one of the 32 exceptions is reported as a failed
//! run, never left to escalate into a triple fault, unless a check armed it
//! (`recover.rs`), or it is a page fault the demand pager of `demand.rs`
//! is armed for. All of them run on a separate IST stack (through a TSS),
//! so even a corrupt RSP is reported. Gate 0x80 (DPL 3) takes ring 3 back to
//! ring 0 for `syscall_sysret` (`user.rs`), on the TSS's RSP0.

use crate::cpu;
use crate::entry::{self, EXC64_STUB_SIZE};
use crate::global;
use crate::{demand, recover, user};
use core::arch::asm;
use core::cell::UnsafeCell;
use core::fmt;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// Selector of the 64-bit code segment in `TG_GDT`.
const CODE64: u16 = 0x08;
/// Selector of the TSS descriptor (GDT slots 4 and 5).
const TSS_SEL: u16 = 0x20;
/// Size of the exception stack.
const IST_STACK_SIZE: usize = 16 * 1024;

/// Memory written once during `init` and then only read by the CPU.
struct CpuTables {
    idt: Idt,
    tss: Tss,
    ist_stack: IstStack,
}

/// All 256 gates (two quadwords each); only the 32 exceptions and
/// `SYSCALL_GATE` are present.
#[repr(C, align(16))]
struct Idt([u64; 512]);

/// The 104-byte 64-bit TSS as dwords (its 64-bit fields are unaligned).
#[repr(C, align(128))]
struct Tss([u32; 26]);

#[repr(C, align(16))]
struct IstStack([u8; IST_STACK_SIZE]);

/// Wrapper that lets the tables be a plain static.
struct Tables(UnsafeCell<CpuTables>);

// SAFETY: one CPU, no interrupts; the tables are only written in `init`.
unsafe impl Sync for Tables {}

static TABLES: Tables = Tables(UnsafeCell::new(CpuTables {
    idt: Idt([0; 512]),
    tss: Tss([0; 26]),
    ist_stack: IstStack([0; IST_STACK_SIZE]),
}));

unsafe extern "C" {
    /// The GDT of the entry code (slots 4-5 are the TSS descriptor).
    static mut TG_GDT: [u64; 9];
}

/// Descriptor-table register image for LIDT.
#[repr(C, packed)]
struct DescriptorPtr {
    limit: u16,
    base: u64,
}

/// Installs the TSS (IST1 = exception stack) and the 64-bit IDT.
pub fn init() {
    let tables = TABLES.0.get();
    // SAFETY: single-threaded start-up; nothing else references TABLES.
    let t = unsafe { &mut *tables };
    let ist_top = addr_of!(t.ist_stack) as u64 + IST_STACK_SIZE as u64;
    // IST1 at byte 36; I/O map base beyond the limit (no bitmap).
    t.tss.0[9] = ist_top as u32;
    t.tss.0[10] = (ist_top >> 32) as u32;
    t.tss.0[25] = 104 << 16;

    let base = addr_of!(t.tss) as u64;
    let limit = 103u64;
    let low = (limit & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x89 << 40) // present, 64-bit available TSS
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    // SAFETY: TG_GDT is the GDT in use; slots 4-5 are reserved for this.
    unsafe {
        let gdt = addr_of_mut!(TG_GDT).cast::<u64>();
        gdt.add(4).write_volatile(low);
        gdt.add(5).write_volatile(base >> 32);
        asm!("ltr {0:x}", in(reg) TSS_SEL, options(nostack, preserves_flags));
    }

    let stubs = addr_of!(entry::TG_EXC64_STUBS) as u64;
    for vector in 0..32u8 {
        let handler = stubs + u64::from(vector) * EXC64_STUB_SIZE;
        // IST1, DPL 0.
        set_gate(&mut t.idt, vector, handler, 1, 0);
    }
    // `int 0x80` from ring 3 back to ring 0: no IST, so the CPU switches to
    // the TSS's RSP0 (set by `set_rsp0` before ring 3 is entered).
    set_gate(&mut t.idt, SYSCALL_GATE, user::int80_entry(), 0, 3);
    let ptr = DescriptorPtr {
        limit: (256 * 16 - 1) as u16,
        base: addr_of!(t.idt) as u64,
    };
    // SAFETY: the IDT just built is static and its gates point at the stubs.
    unsafe { asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags)) }
}

/// The vector of the gate that ring 3 may use (`int 0x80`) to return to
/// ring 0.
pub const SYSCALL_GATE: u8 = 0x80;

/// Writes a present 64-bit interrupt gate into `idt`.
fn set_gate(idt: &mut Idt, vector: u8, handler: u64, ist: u64, dpl: u64) {
    let low = (handler & 0xFFFF)
        | (u64::from(CODE64) << 16)
        | (ist << 32)
        | ((0x8E | dpl << 5) << 40) // present, DPL, 64-bit interrupt gate
        | (((handler >> 16) & 0xFFFF) << 48);
    idt.0[usize::from(vector) * 2] = low;
    idt.0[usize::from(vector) * 2 + 1] = handler >> 32;
}

/// Sets the TSS's RSP0, the stack the CPU switches to when ring 3 enters
/// ring 0 through a gate without IST.
pub fn set_rsp0(top: u64) {
    let tables = TABLES.0.get();
    // SAFETY: one CPU, no interrupts: nothing else accesses the TSS while
    // these two dwords (RSP0 at byte 4) are written; the CPU reads them
    // only on a later privilege change.
    unsafe {
        let tss = addr_of_mut!((*tables).tss.0);
        (*tss)[1] = top as u32;
        (*tss)[2] = (top >> 32) as u32;
    }
}

/// The stack frame `tg_exc64_common` builds (lowest address first).
#[repr(C)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Mnemonics of the 32 exception vectors.
const NAMES: [&str; 32] = [
    "DE", "DB", "NMI", "BP", "OF", "BR", "UD", "NM", "DF", "CSO", "TS", "NP", "SS", "GP", "PF",
    "RSVD15", "MF", "AC", "MC", "XM", "VE", "CP", "RSVD22", "RSVD23", "RSVD24", "RSVD25", "RSVD26",
    "RSVD27", "HV", "VC", "SX", "RSVD31",
];

/// Called by `tg_exc64_common` on the IST stack (on the interrupted stack
/// in the `hostile` mode, whose IDT has no IST). An exception the hostile
/// mode's running CPU armed (`hostile::try_recover`), a page fault the
/// demand pager handles, or an exception a check armed (`recover.rs`), returns
/// here, and the stub resumes the guest with the frame as changed (or, for
/// the demand pager, unchanged: the faulting instruction runs again); any
/// other one is reported and ends the run.
pub extern "sysv64" fn exception_entry(frame: &mut ExceptionFrame) {
    let cr2 = cpu::read_cr2();
    if crate::hostile::try_recover(frame, cr2) {
        return;
    }
    if demand::try_handle(frame, cr2) || recover::try_recover(frame, cr2) {
        return;
    }
    let name = NAMES.get(frame.vector as usize).copied().unwrap_or("??");
    report_and_end(
        format_args!(
            "FAIL exception: #{} vector {} error {:#x} at rip {:#x} (during {})",
            name,
            frame.vector,
            frame.error,
            frame.rip,
            global::current_check()
        ),
        Some(frame),
        (frame.vector == 14).then_some(cr2),
    )
}

/// Reports a fatal error (panic) as a FAIL line and ends the run.
pub fn fatal(line: fmt::Arguments<'_>) -> ! {
    report_and_end(line, None, None)
}

/// Set once a fatal report started: a fault inside the report itself must
/// not recurse, it just ends the run.
static REPORTING: AtomicBool = AtomicBool::new(false);

fn report_and_end(line: fmt::Arguments<'_>, frame: Option<&ExceptionFrame>, cr2: Option<u64>) -> ! {
    if REPORTING.swap(true, Relaxed) {
        crate::console::end_run(false);
    }
    say!("{}", line);
    if let Some(f) = frame {
        say!(
            "test-guest: rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x} rsp {:#x}",
            f.rax,
            f.rbx,
            f.rcx,
            f.rdx,
            f.rsi,
            f.rdi,
            f.rbp,
            f.rsp
        );
        say!(
            "test-guest: r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x} r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x}",
            f.r8,
            f.r9,
            f.r10,
            f.r11,
            f.r12,
            f.r13,
            f.r14,
            f.r15
        );
        say!(
            "test-guest: cs {:#x} ss {:#x} rflags {:#x}",
            f.cs,
            f.ss,
            f.rflags
        );
    }
    if let Some(cr2) = cr2 {
        say!("test-guest: cr2 {:#x}", cr2);
    }
    global::record(false);
    let (passed, failed) = global::tally();
    say!("SUMMARY: {} passed, {} failed", passed, failed);
    crate::console::end_run(false)
}

/// Loads an IDT with limit 0 and raises #BP: the #BP, the #GP it turns into
/// and the #DF all find no gate, so the CPU shuts down (triple fault).
pub fn triple_fault() {
    let ptr = DescriptorPtr { limit: 0, base: 0 };
    // SAFETY: deliberately breaks exception delivery to end the run with a
    // triple fault; `int3` then does not return unless something intervenes.
    unsafe {
        asm!("lidt [{}]", "int3", in(reg) &ptr, options(readonly, nostack));
    }
}
