//! `bench` mode: what the exit path costs, for `cargo xtask bench`.
//!
//! Under QEMU's `-icount shift=0` the time-stamp counter advances by one
//! per executed instruction, so a TSC delta around a loop counts every
//! instruction run on the way, the hypervisor's included. Each measured
//! loop is run again with the exiting instruction replaced by a NOP; the
//! difference per iteration is the cost of one exit round trip.
//!
//! Output lines: `BENCH <name> iterations=N ticks=T baseline=B`.

use crate::cpu;
use core::arch::asm;
use thinvisor_abi as abi;

/// The time-stamp counter (also used by `smi_storm`).
pub(crate) fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// The loop bodies, each 5 instructions per iteration with the measured
/// instruction in the middle.
#[derive(Clone, Copy)]
enum Body {
    /// `mov eax, 1; xor ecx, ecx; cpuid`
    Cpuid,
    /// `mov rax, rax_in; mov rbx, rbx_in; VMCALL/VMMCALL`: function 0 with
    /// a name, or a function number with its argument.
    VmmCall { rax: u64, rbx: u64, vmcall: bool },
}

/// TSC ticks for `iterations` of `body`, or of its NOP twin.
fn measure(body: Body, iterations: u64, nop: bool) -> u64 {
    let start = rdtsc();
    // SAFETY: each loop changes only the registers declared; RBX is saved
    // and restored around it (LLVM reserves it). A VMM call preserves every
    // register but RAX (and RBX, reloaded each iteration; docs/vmm-call.md).
    unsafe {
        match (body, nop) {
            (Body::Cpuid, false) => asm!(
                "push rbx", "2:", "mov eax, 1", "xor ecx, ecx", "cpuid", "dec r8", "jnz 2b", "pop rbx",
                inout("r8") iterations => _, out("eax") _, out("ecx") _, out("edx") _,
            ),
            (Body::Cpuid, true) => asm!(
                "push rbx", "2:", "mov eax, 1", "xor ecx, ecx", "nop", "dec r8", "jnz 2b", "pop rbx",
                inout("r8") iterations => _, out("eax") _, out("ecx") _, out("edx") _,
            ),
            (Body::VmmCall { rax, rbx, vmcall }, nop) => asm!(
                "push rbx",
                "2:",
                "mov rax, rdi",
                "mov rbx, rsi",
                "test r9d, r9d",
                "jnz 4f",
                "test r10d, r10d",
                "jnz 3f",
                "vmmcall",
                "jmp 5f",
                "3:",
                "vmcall",
                "jmp 5f",
                "4:",
                "nop",
                "5:",
                "dec r8",
                "jnz 2b",
                "pop rbx",
                inout("r8") iterations => _, in("rdi") rax, in("rsi") rbx, in("r9d") u32::from(nop),
                in("r10d") u32::from(vmcall), out("rax") _,
            ),
        }
    }
    rdtsc().wrapping_sub(start)
}

fn report(name: &str, body: Body, iterations: u64) {
    // Warm up (first touches of code and data), then measure.
    measure(body, 10, false);
    measure(body, 10, true);
    let ticks = measure(body, iterations, false);
    let baseline = measure(body, iterations, true);
    say!("BENCH {name} iterations={iterations} ticks={ticks} baseline={baseline}");
}

/// Measure, print, end the run as passed.
pub fn run() {
    let vmcall = cpu::uses_vmcall();
    // A calibration loop: 2 instructions per iteration, no exit.
    let start = rdtsc();
    // SAFETY: a counted loop that touches only RCX.
    unsafe {
        asm!("2:", "dec rcx", "jnz 2b", inout("rcx") 100_000u64 => _, options(nomem, nostack))
    };
    let ticks = rdtsc().wrapping_sub(start);
    say!("BENCH calibration iterations=100000 ticks={ticks} instructions=200000");
    report("cpuid_exit", Body::Cpuid, 10_000);
    // Function 0 with the guest's paging off: measured by the 32-bit entry
    // code before long mode (crate::entry, `TG_BENCH32`), printed here.
    let off = crate::entry::bench32();
    if off.iterations > 0 {
        say!(
            "BENCH lookup_dbgsh_paging_off iterations={} ticks={} baseline={}",
            off.iterations,
            off.ticks,
            off.baseline
        );
    }
    let name = b"dbgsh\0";
    report(
        "lookup_dbgsh",
        Body::VmmCall {
            rax: abi::FN_LOOKUP,
            rbx: name.as_ptr() as u64,
            vmcall,
        },
        2_000,
    );
    // Function 0 of a name that is 255 characters long (worst case).
    let mut long = [b'x'; 256];
    long[255] = 0;
    report(
        "lookup_255_chars",
        Body::VmmCall {
            rax: abi::FN_LOOKUP,
            rbx: long.as_ptr() as u64,
            vmcall,
        },
        1_000,
    );
    let mut regs = cpu::Regs {
        rax: abi::FN_LOOKUP,
        rbx: name.as_ptr() as u64,
        ..cpu::Regs::default()
    };
    cpu::vmm_call(&mut regs);
    report(
        "dbgsh_poll",
        Body::VmmCall {
            rax: regs.rax,
            rbx: abi::dbgsh::NOTHING,
            vmcall,
        },
        10_000,
    );
    // The other vendor's instruction, through the #UD intercept.
    report(
        "lookup_dbgsh_other_insn",
        Body::VmmCall {
            rax: abi::FN_LOOKUP,
            rbx: name.as_ptr() as u64,
            vmcall: !vmcall,
        },
        2_000,
    );
}
