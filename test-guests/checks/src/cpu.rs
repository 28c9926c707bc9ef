//! Thin wrappers around the instructions the guest needs: port I/O, CPUID,
//! control registers, and the VMM call itself.

use core::arch::{asm, naked_asm};
use core::mem::offset_of;
use core::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the guest owns the machine; the ports it uses (UART, debug
    // console, exit ports) have no memory side effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit value to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`; reading the UART status has no side effects.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads a 32-bit value from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`; the guest reads PCI configuration space
    // (0xCFC), which has no memory side effects.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// CPUID with a subleaf: [EAX, EBX, ECX, EDX].
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let (eax, ebx, ecx, edx): (u32, u64, u32, u32);
    // SAFETY: CPUID only writes the four registers; RBX is reserved by LLVM,
    // so it is saved in a scratch register and swapped back.
    unsafe {
        asm!(
            "mov {tmp}, rbx",
            "cpuid",
            "xchg {tmp}, rbx",
            tmp = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        )
    }
    [eax, ebx as u32, ecx, edx]
}

/// The 12-byte vendor string of CPUID leaf 0.
pub fn vendor() -> [u8; 12] {
    let [_, b, c, d] = cpuid(0, 0);
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&b.to_le_bytes());
    v[4..8].copy_from_slice(&d.to_le_bytes());
    v[8..].copy_from_slice(&c.to_le_bytes());
    v
}

/// True when the VMM call is VMCALL (Intel), false for VMMCALL.
static USE_VMCALL: AtomicBool = AtomicBool::new(false);

/// Chooses the processor's own call instruction from the CPUID vendor
/// (docs/vmm-call.md, Calling): "GenuineIntel" uses VMCALL, everything
/// else VMMCALL.
pub fn detect_vendor() {
    USE_VMCALL.store(&vendor() == b"GenuineIntel", Relaxed);
}

/// True on Intel, where the VMM call is VMCALL.
pub fn uses_vmcall() -> bool {
    USE_VMCALL.load(Relaxed)
}

/// The mnemonic in use, for the report.
pub fn call_insn_name() -> &'static str {
    if USE_VMCALL.load(Relaxed) {
        "VMCALL"
    } else {
        "VMMCALL"
    }
}

/// Every general register the VMM call can see, in and out.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

impl Regs {
    /// Names and values of every register but RAX, for preservation checks.
    pub fn all_but_rax(&self) -> [(&'static str, u64); 14] {
        [
            ("RBX", self.rbx),
            ("RCX", self.rcx),
            ("RDX", self.rdx),
            ("RSI", self.rsi),
            ("RDI", self.rdi),
            ("RBP", self.rbp),
            ("R8", self.r8),
            ("R9", self.r9),
            ("R10", self.r10),
            ("R11", self.r11),
            ("R12", self.r12),
            ("R13", self.r13),
            ("R14", self.r14),
            ("R15", self.r15),
        ]
    }
}

/// Generates a naked function that stores its resume address into
/// `*resume` (RSI), loads all of `Regs` from `*regs` (RDI), executes
/// `$insn`, and stores all registers back. Being naked, it owns every
/// register, including RBX and RBP which `asm!` cannot name. A fault on
/// the instruction that an exception handler recovers (the hostile mode's)
/// resumes right after it, with the registers as they were at the fault,
/// and stores those.
macro_rules! vmm_call_fn {
    ($name:ident, $insn:literal) => {
        /// Executes the VMM call with every register taken from and
        /// returned into `*regs`; `*resume` receives the address a
        /// recovered fault resumes at.
        ///
        /// # Safety
        /// `regs` must be valid for reads and writes, `resume` for writes.
        #[unsafe(naked)]
        pub unsafe extern "sysv64" fn $name(regs: *mut Regs, resume: *mut u64) {
            // The callee-saved registers are pushed, the pointer kept on the
            // stack while RDI carries a call argument.
            naked_asm!(
                "push rbx",
                "push rbp",
                "push r12",
                "push r13",
                "push r14",
                "push r15",
                "push rdi",
                "lea rax, [rip + 2f]",
                "mov [rsi], rax",
                "mov rax, [rdi + {rax}]",
                "mov rbx, [rdi + {rbx}]",
                "mov rcx, [rdi + {rcx}]",
                "mov rdx, [rdi + {rdx}]",
                "mov rsi, [rdi + {rsi}]",
                "mov rbp, [rdi + {rbp}]",
                "mov r8, [rdi + {r8}]",
                "mov r9, [rdi + {r9}]",
                "mov r10, [rdi + {r10}]",
                "mov r11, [rdi + {r11}]",
                "mov r12, [rdi + {r12}]",
                "mov r13, [rdi + {r13}]",
                "mov r14, [rdi + {r14}]",
                "mov r15, [rdi + {r15}]",
                "mov rdi, [rdi + {rdi}]",
                $insn,
                "2:",
                "xchg rdi, [rsp]",
                "mov [rdi + {rax}], rax",
                "mov [rdi + {rbx}], rbx",
                "mov [rdi + {rcx}], rcx",
                "mov [rdi + {rdx}], rdx",
                "mov [rdi + {rsi}], rsi",
                "mov [rdi + {rbp}], rbp",
                "mov [rdi + {r8}], r8",
                "mov [rdi + {r9}], r9",
                "mov [rdi + {r10}], r10",
                "mov [rdi + {r11}], r11",
                "mov [rdi + {r12}], r12",
                "mov [rdi + {r13}], r13",
                "mov [rdi + {r14}], r14",
                "mov [rdi + {r15}], r15",
                "pop rax",
                "mov [rdi + {rdi}], rax",
                "pop r15",
                "pop r14",
                "pop r13",
                "pop r12",
                "pop rbp",
                "pop rbx",
                "ret",
                rax = const offset_of!(Regs, rax),
                rbx = const offset_of!(Regs, rbx),
                rcx = const offset_of!(Regs, rcx),
                rdx = const offset_of!(Regs, rdx),
                rsi = const offset_of!(Regs, rsi),
                rdi = const offset_of!(Regs, rdi),
                rbp = const offset_of!(Regs, rbp),
                r8 = const offset_of!(Regs, r8),
                r9 = const offset_of!(Regs, r9),
                r10 = const offset_of!(Regs, r10),
                r11 = const offset_of!(Regs, r11),
                r12 = const offset_of!(Regs, r12),
                r13 = const offset_of!(Regs, r13),
                r14 = const offset_of!(Regs, r14),
                r15 = const offset_of!(Regs, r15),
            )
        }
    };
}

vmm_call_fn!(vmcall_regs, "vmcall");
vmm_call_fn!(vmmcall_regs, "vmmcall");

/// Makes a VMM call with all registers from `regs`; afterwards `regs`
/// holds every register as the VMM left it. Without a VMM the instruction
/// raises #UD, which the exception handler reports (and ends the run).
pub fn vmm_call(regs: &mut Regs) {
    let mut resume = 0u64;
    if USE_VMCALL.load(Relaxed) {
        // SAFETY: `regs` and `resume` are valid exclusive references; the
        // stub restores every callee-saved register and the stack.
        unsafe { vmcall_regs(regs, &mut resume) }
    } else {
        // SAFETY: as above.
        unsafe { vmmcall_regs(regs, &mut resume) }
    }
}

/// Patterns `cpuid_loop` keeps in RBP, RSI, RDI, R11, R12, R13, R14, R15
/// (in that order) across the loop; high halves set so that a 32-bit
/// truncation shows.
pub const LOOP_PATTERNS: [u64; 8] = [
    0x5EC0_DE01_0101_0101,
    0x5EC0_DE02_0202_0202,
    0x5EC0_DE03_0303_0303,
    0x5EC0_DE04_0404_0404,
    0x5EC0_DE05_0505_0505,
    0x5EC0_DE06_0606_0606,
    0x5EC0_DE07_0707_0707,
    0x5EC0_DE08_0808_0808,
];

/// In and out of `cpuid_loop`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct CpuidLoop {
    /// In: the leaf (subleaf 0).
    pub leaf: u64,
    /// In: how many CPUIDs (at least 1).
    pub iterations: u64,
    /// Out: [`cpuid_checksum_step`] folded over every result, from 0.
    pub checksum: u64,
    /// Out: RBP, RSI, RDI, R11..R15 after the loop (see `LOOP_PATTERNS`).
    pub kept: [u64; 8],
}

/// One step of `cpuid_loop`'s checksum; RAX..RDX as the full 64-bit
/// registers (CPUID zero-extends, so a VMM that leaves junk in the high
/// halves changes the sum).
pub fn cpuid_checksum_step(sum: u64, regs: [u64; 4]) -> u64 {
    regs.iter().fold(sum, |s, &r| s.rotate_left(7) ^ r)
}

/// Runs CPUID `iterations` times in a tight loop that keeps
/// `LOOP_PATTERNS` in every register it does not need, folding RAX..RDX
/// into a checksum.
pub fn cpuid_loop(io: &mut CpuidLoop) {
    // SAFETY: `io` is a valid exclusive reference; the stub restores every
    // callee-saved register and the stack.
    unsafe { cpuid_loop_raw(io) }
}

/// # Safety
/// `io` must be valid for reads and writes.
#[unsafe(naked)]
unsafe extern "sysv64" fn cpuid_loop_raw(io: *mut CpuidLoop) {
    naked_asm!(
        "push rbx",
        "push rbp",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "push rdi",
        "mov r8, [rdi + {iterations}]",
        "mov r10, [rdi + {leaf}]",
        "xor r9d, r9d",
        "movabs rbp, {p0}",
        "movabs rsi, {p1}",
        "movabs rdi, {p2}",
        "movabs r11, {p3}",
        "movabs r12, {p4}",
        "movabs r13, {p5}",
        "movabs r14, {p6}",
        "movabs r15, {p7}",
        "2:",
        "mov eax, r10d",
        "xor ecx, ecx",
        "cpuid",
        "rol r9, 7",
        "xor r9, rax",
        "rol r9, 7",
        "xor r9, rbx",
        "rol r9, 7",
        "xor r9, rcx",
        "rol r9, 7",
        "xor r9, rdx",
        "dec r8",
        "jnz 2b",
        "xchg rdi, [rsp]",
        "mov [rdi + {checksum}], r9",
        "mov [rdi + {kept}], rbp",
        "mov [rdi + {kept} + 8], rsi",
        "mov [rdi + {kept} + 24], r11",
        "mov [rdi + {kept} + 32], r12",
        "mov [rdi + {kept} + 40], r13",
        "mov [rdi + {kept} + 48], r14",
        "mov [rdi + {kept} + 56], r15",
        "pop rax",
        "mov [rdi + {kept} + 16], rax",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbp",
        "pop rbx",
        "ret",
        leaf = const offset_of!(CpuidLoop, leaf),
        iterations = const offset_of!(CpuidLoop, iterations),
        checksum = const offset_of!(CpuidLoop, checksum),
        kept = const offset_of!(CpuidLoop, kept),
        p0 = const LOOP_PATTERNS[0],
        p1 = const LOOP_PATTERNS[1],
        p2 = const LOOP_PATTERNS[2],
        p3 = const LOOP_PATTERNS[3],
        p4 = const LOOP_PATTERNS[4],
        p5 = const LOOP_PATTERNS[5],
        p6 = const LOOP_PATTERNS[6],
        p7 = const LOOP_PATTERNS[7],
    )
}

/// CR2, the faulting address of the last page fault.
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects at CPL 0.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// CR0.
pub fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 has no side effects at CPL 0.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// CR4.
pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effects at CPL 0.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// The processor's brand string (CPUID 0x80000002-0x80000004), or zeros
/// when the processor has none.
pub fn brand() -> [u8; 48] {
    let mut out = [0u8; 48];
    if cpuid(0x8000_0000, 0)[0] < 0x8000_0004 {
        return out;
    }
    for (i, leaf) in (0x8000_0002..=0x8000_0004).enumerate() {
        for (j, reg) in cpuid(leaf, 0).into_iter().enumerate() {
            let at = 16 * i + 4 * j;
            out[at..at + 4].copy_from_slice(&reg.to_le_bytes());
        }
    }
    out
}

/// Writes CR0.
///
/// # Safety
/// The new value must keep the guest running (protection and paging on;
/// only bits like WP are meant to change).
pub unsafe fn write_cr0(value: u64) {
    // SAFETY: passed on from the caller. Not `nomem`: memory accesses must
    // not move across a change of write protection.
    unsafe { asm!("mov cr0, {}", in(reg) value, options(nostack, preserves_flags)) }
}

/// Flushes the TLB after page-table changes by reloading CR3.
pub fn reload_cr3() {
    // SAFETY: CR3 is written with its own value: same tables, fresh TLB.
    // Not `nomem`: page-table writes before it must not be moved after it.
    unsafe {
        asm!("mov {tmp}, cr3", "mov cr3, {tmp}", tmp = out(reg) _, options(nostack, preserves_flags))
    }
}

/// Halts for good with interrupts off (an NMI would only re-enter the loop).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stopping the CPU is the intent; nothing else runs.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
