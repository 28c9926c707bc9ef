//! `thinvisor-probe`: run inside a Linux guest, it reports on the serial
//! console what the guest sees of thinvisor, in lines the integration tests
//! look for:
//!
//! ```text
//! probe: cpuid-signature <12 bytes of leaf 0x40000000, escaped>
//! probe: lookup log_read = <RAX of function 0>    (under thinvisor)
//! probe: no thinvisor                              (anywhere else)
//! ```
//!
//! The VMM call is made only when the signature is thinvisor's: on bare
//! hardware (or QEMU TCG, which signs `TCGTCGTCGTCG`) the instruction would
//! raise #UD and kill the program with SIGILL.

use std::arch::asm;
use std::arch::x86_64::__cpuid;
use std::ffi::{c_char, CStr};

use guest_tools::{call_insn, escape, signature_bytes, CallInsn};
use thinvisor_abi::{names, CPUID_SIGNATURE, FN_LOOKUP};

/// CPUID leaf of the hypervisor vendor signature.
const HYPERVISOR_LEAF: u32 = 0x4000_0000;

fn main() {
    let leaf0 = __cpuid(0);
    // Leaf 0 spells the vendor in EBX, EDX, ECX order.
    let vendor = signature_bytes(leaf0.ebx, leaf0.edx, leaf0.ecx);
    let hv = __cpuid(HYPERVISOR_LEAF);
    let signature = signature_bytes(hv.ebx, hv.ecx, hv.edx);
    println!("probe: cpuid-signature {}", escape(&signature));
    if signature != CPUID_SIGNATURE {
        println!("probe: no thinvisor");
        return;
    }
    let (number, name) = lookup_log_read(call_insn(&vendor));
    // The name is spelled inside the asm (see `lookup_log_read`); make sure
    // it is still the ABI's.
    assert_eq!(
        name.to_bytes(),
        names::LOG_READ.as_bytes(),
        "the probe's built-in name differs from the ABI's"
    );
    println!("probe: lookup {} = {number}", names::LOG_READ);
}

/// VMM-call function 0 (look up a name) for `log_read`, with the vendor's
/// own instruction. Returns RAX and the name the call was given.
///
/// The name is spelled in the code, right after the call, and the block is
/// 64-byte aligned and shorter than 64 bytes: it cannot straddle a page
/// boundary, so the name lies in the page of the instruction being executed,
/// which is present. A name in `.rodata` might sit in a page Linux has not
/// faulted in yet, and function 0 answers 0 for an unreadable name instead
/// of faulting it in.
fn lookup_log_read(insn: CallInsn) -> (u64, &'static CStr) {
    let rax: u64;
    let name: *const c_char;
    // RBX is reserved by LLVM, so it cannot be an operand: it is saved in
    // a scratch register around the call. RCX, RDX, RSI and RDI are
    // preserved by the ABI; they are declared clobbered anyway so that a
    // hypervisor bug shows as a wrong answer, not as a corrupted program.
    match insn {
        // SAFETY: runs only when CPUID leaf 0x40000000 says thinvisor, which
        // takes VMMCALL as a call on either vendor; function 0 only reads
        // the name and writes RAX. The asm restores RBX, does not touch the
        // stack, and its embedded name is jumped over.
        CallInsn::Vmmcall => unsafe {
            asm!(
                ".p2align 6",
                "lea {name}, [rip + 2f]",
                "mov {saved}, rbx",
                "mov rbx, {name}",
                "vmmcall",
                "mov rbx, {saved}",
                "jmp 3f",
                "2: .asciz \"log_read\"",
                "3:",
                name = out(reg) name,
                saved = out(reg) _,
                inout("rax") FN_LOOKUP => rax,
                out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
                options(nostack),
            )
        },
        // SAFETY: as above, with Intel's VMCALL.
        CallInsn::Vmcall => unsafe {
            asm!(
                ".p2align 6",
                "lea {name}, [rip + 2f]",
                "mov {saved}, rbx",
                "mov rbx, {name}",
                "vmcall",
                "mov rbx, {saved}",
                "jmp 3f",
                "2: .asciz \"log_read\"",
                "3:",
                name = out(reg) name,
                saved = out(reg) _,
                inout("rax") FN_LOOKUP => rax,
                out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
                options(nostack),
            )
        },
    }
    // SAFETY: `name` points at the NUL-terminated literal inside the code
    // above, which lives (read-only, in .text) as long as the program.
    let name = unsafe { CStr::from_ptr(name) };
    (rax, name)
}
