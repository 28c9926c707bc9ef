//! CPU exceptions in the hypervisor: report and stop, never hang or
//! triple-fault silently. The one recovered exception is a #GP from the
//! RDMSR/WRMSR thinvisor does with a guest's value (msr.rs). NMIs are the exception: thinvisor does not
//! intercept them, so one that arrives while thinvisor runs belongs to the
//! guest; the handler counts it in the processor's area and the exit path
//! injects it before the next entry. NMIs, double faults and machine checks
//! run on their own interrupt stacks (TSS IST, see percpu.rs), so a broken
//! stack cannot turn them into a triple fault.

use core::arch::global_asm;
use core::fmt::Write;
use core::mem::size_of;
use spin::Once;
use thinvisor_abi::exit_code;
use x86_64::instructions::segmentation::Segment;

/// The registers an exception stub saves, lowest address first.
#[repr(C)]
#[derive(Debug)]
struct ExceptionFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

// One stub per exception vector: push a dummy error code where the CPU
// pushes none (Intel SDM vol. 3A, table 6-1), push the vector, save the
// general registers, call the Rust handler.
global_asm!(
    ".macro exc_stub n, err",
    "exc_stub_\\n:",
    ".if \\err == 0",
    "push 0",
    ".endif",
    "push \\n",
    "jmp exc_common",
    ".endm",
    ".pushsection .text",
    "exc_stub 0, 0", "exc_stub 1, 0", "exc_stub 2, 0", "exc_stub 3, 0",
    "exc_stub 4, 0", "exc_stub 5, 0", "exc_stub 6, 0", "exc_stub 7, 0",
    "exc_stub 8, 1", "exc_stub 9, 0", "exc_stub 10, 1", "exc_stub 11, 1",
    "exc_stub 12, 1", "exc_stub 14, 1", "exc_stub 15, 0",
    "exc_stub 16, 0", "exc_stub 17, 1", "exc_stub 18, 0", "exc_stub 19, 0",
    "exc_stub 20, 0", "exc_stub 21, 1", "exc_stub 22, 0", "exc_stub 23, 0",
    "exc_stub 24, 0", "exc_stub 25, 0", "exc_stub 26, 0", "exc_stub 27, 0",
    "exc_stub 28, 0", "exc_stub 29, 1", "exc_stub 30, 1", "exc_stub 31, 0",
    // #GP: at one of msr.rs's two guest-chosen RDMSR/WRMSRs, resume at
    // its failure exit (the error code popped); anywhere else, report.
    // The frame: [rsp] error code, [rsp + 8] RIP.
    "gp_stub:",
    "push rax",
    "lea rax, [rip + thinvisor_rdmsr_insn]",
    "cmp rax, [rsp + 16]",
    "je 2f",
    "lea rax, [rip + thinvisor_wrmsr_insn]",
    "cmp rax, [rsp + 16]",
    "je 3f",
    "pop rax",
    "push 13",
    "jmp exc_common",
    "2:",
    "lea rax, [rip + thinvisor_rdmsr_failed]",
    "jmp 4f",
    "3:",
    "lea rax, [rip + thinvisor_wrmsr_failed]",
    "4:",
    "mov [rsp + 16], rax",
    "pop rax",
    "add rsp, 8",
    "iretq",
    // NMI: count it for the guest and return (no register is touched).
    "nmi_stub:",
    "lock inc dword ptr gs:[{nmi_pending}]",
    "iretq",
    "exc_common:",
    "push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
    "push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {handler}",
    "ud2",
    ".section .rodata",
    ".align 8",
    ".global thinvisor_exception_stubs",
    "thinvisor_exception_stubs:",
    ".quad exc_stub_0, exc_stub_1, nmi_stub, exc_stub_3, exc_stub_4, exc_stub_5, exc_stub_6, exc_stub_7",
    ".quad exc_stub_8, exc_stub_9, exc_stub_10, exc_stub_11, exc_stub_12, gp_stub, exc_stub_14, exc_stub_15",
    ".quad exc_stub_16, exc_stub_17, exc_stub_18, exc_stub_19, exc_stub_20, exc_stub_21, exc_stub_22, exc_stub_23",
    ".quad exc_stub_24, exc_stub_25, exc_stub_26, exc_stub_27, exc_stub_28, exc_stub_29, exc_stub_30, exc_stub_31",
    ".section .text",
    ".popsection",
    handler = sym exception_handler,
    nmi_pending = const crate::percpu::NMI_PENDING_OFFSET,
);

extern "C" {
    static thinvisor_exception_stubs: [u64; 32];
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization exception",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security exception",
    "reserved 31",
];

extern "C" fn exception_handler(frame: &ExceptionFrame) -> ! {
    let name = NAMES
        .get(frame.vector as usize)
        .copied()
        .unwrap_or("unknown");
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    // Write without the log lock: the exception may have hit while it was held.
    let mut out = crate::serial::Console;
    let _ = writeln!(
        out,
        "thinvisor: [ERROR] CPU exception in the hypervisor: vector {} ({name}), error code {:#x}, rip {:#x}, rsp {:#x}, cr2 {cr2:#x}",
        frame.vector, frame.error_code, frame.rip, frame.rsp
    );
    let _ = writeln!(out, "thinvisor: [ERROR] registers: {frame:x?}");
    crate::power::end_run(exit_code::VMM_PANIC)
}

/// An interrupt gate (Intel SDM vol. 3A, 6.14.1).
#[repr(C, align(16))]
#[derive(Clone, Copy, Default)]
struct Gate([u64; 2]);

static IDT: Once<[Gate; 32]> = Once::new();

/// Install handlers for the 32 exception vectors.
pub fn init() {
    let idt = IDT.call_once(|| {
        let mut gates = [Gate::default(); 32];
        let cs = u64::from(x86_64::instructions::segmentation::CS::get_reg().0);
        for (gate, i) in gates.iter_mut().zip(0..) {
            // SAFETY: reading one entry of the stub table defined above.
            let addr = unsafe { thinvisor_exception_stubs[i] };
            // Present, DPL 0, 64-bit interrupt gate (type 0xE); the IST
            // slot (1-based, 0 = none) in bits 34:32.
            let ist = match i {
                2 => u64::from(crate::percpu::IST_NMI) + 1,
                8 => u64::from(crate::percpu::IST_DOUBLE_FAULT) + 1,
                18 => u64::from(crate::percpu::IST_MACHINE_CHECK) + 1,
                _ => 0,
            };
            gate.0[0] = (addr & 0xFFFF)
                | (cs << 16)
                | (ist << 32)
                | (0x8E << 40)
                | ((addr >> 16) & 0xFFFF) << 48;
            gate.0[1] = addr >> 32;
        }
        gates
    });
    let pointer = x86_64::structures::DescriptorTablePointer {
        limit: (size_of::<[Gate; 32]>() - 1) as u16,
        base: x86_64::VirtAddr::new(idt.as_ptr() as u64),
    };
    // SAFETY: the table is 'static and every gate points at a stub that
    // never returns.
    unsafe { x86_64::instructions::tables::lidt(&pointer) };
}
