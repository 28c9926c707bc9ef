//! `vmmbench`: what an exit costs a Linux user program, for `cargo xtask
//! bench` (its Linux boots run it from the test initramfs' `/init`).
//!
//! Under QEMU's `-icount shift=0` the time-stamp counter advances by one
//! per executed instruction (the test guest's bench mode relies on the
//! same), so a TSC delta around a loop counts every instruction executed
//! on the way, thinvisor's included. Unlike the test guest, which measures
//! with interrupts off, this program runs under Linux: a timer interrupt
//! that lands inside a loop adds the kernel's handler to the count. Each
//! loop is therefore run in batches and the cheapest batch is reported,
//! which is one that no interrupt hit.
//!
//! ```text
//! vmmbench tsc     ->  vmmbench: tsc T
//! vmmbench loops   ->  vmmbench: calibration iterations=N ticks=T instructions=2N
//!                      vmmbench: loop NAME iterations=N ticks=T nop_ticks=B batches=K
//! ```
//!
//! `tsc` works anywhere (the boot benchmark reads it at the init marker,
//! with and without thinvisor). `loops` needs thinvisor: `lookup_dbgsh`
//! is a whole loop iteration of function 0 looking up `dbgsh` with the
//! vendor's call instruction, `cpuid` one of CPUID leaf 1; `ticks` is the
//! whole loop (the figure issue 11 asks for), `nop_ticks` the same loop
//! with a NOP in place of the exiting instruction, for information.

use std::arch::asm;
use std::arch::x86_64::_rdtsc;

use guest_tools::status;
use guest_tools::vmm::Vmm;
use guest_tools::CallInsn;

const USAGE: &str = "\
usage: vmmbench tsc | loops
  tsc    print the time-stamp counter (`vmmbench: tsc T`)
  loops  time loops of exits from this program, pinned to CPU 0, with the
         TSC (instructions under QEMU -icount shift=0): a function-0 lookup
         of dbgsh and a CPUID, each as a whole loop iteration and with a
         NOP in place of the exiting instruction; the cheapest of several
         batches (one no interrupt hit)
Exit status: 0 done, 2 no thinvisor here (loops), 3 thinvisor has no
dbgsh, 1 other failure, 64 usage error.";

/// Batches per loop: enough that, at Linux's timer rate, some batch runs
/// without an interrupt (a batch is about a millisecond of instructions
/// under `-icount shift=0`; Debian's kernel ticks every 4 ms).
const BATCHES: u32 = 16;

/// The time-stamp counter.
fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter; user mode may run it
    // (Linux leaves CR4.TSD clear).
    unsafe { _rdtsc() }
}

/// A loop body, each 5 instructions per iteration with the measured
/// instruction in the middle (the test guest's bodies,
/// test-guests/checks/src/bench.rs).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Body {
    /// `mov eax, 1; xor ecx, ecx; cpuid; dec; jnz`.
    Cpuid,
    /// `xor eax, eax; mov rbx, NAME; VMMCALL/VMCALL; dec; jnz`: function 0
    /// with the name `dbgsh`.
    LookupDbgsh(CallInsn),
}

/// TSC ticks of `iterations` (at least 1) of `body`, or of its twin with
/// a NOP in place of the exiting instruction.
fn run_loop(body: Body, iterations: u64, nop: bool) -> u64 {
    let n = iterations.max(1);
    let start = rdtsc();
    // SAFETY: (all arms) each loop changes only the registers it declares;
    // RBX (reserved by LLVM) is saved in a scratch register and restored.
    // No stack use. The VMM calls run only after `Vmm::get` found thinvisor
    // answering this very instruction, and function 0 only reads the name
    // (docs/vmm-call.md) and writes RAX. The name is spelled inside the
    // 64-byte aligned block, shorter than 64 bytes, so it lies in the page
    // of the code being executed, which is present (function 0 answers 0
    // for a name in a page that is not, rather than faulting it in); the
    // loop jumps over it.
    unsafe {
        match (body, nop) {
            (Body::Cpuid, false) => asm!(
                "mov {saved}, rbx",
                "2:", "mov eax, 1", "xor ecx, ecx", "cpuid", "dec {n}", "jnz 2b",
                "mov rbx, {saved}",
                n = inout(reg) n => _, saved = out(reg) _,
                out("rax") _, out("rcx") _, out("rdx") _,
                options(nostack, nomem),
            ),
            (Body::Cpuid, true) => asm!(
                "mov {saved}, rbx",
                "2:", "mov eax, 1", "xor ecx, ecx", "nop", "dec {n}", "jnz 2b",
                "mov rbx, {saved}",
                n = inout(reg) n => _, saved = out(reg) _,
                out("rax") _, out("rcx") _, out("rdx") _,
                options(nostack, nomem),
            ),
            (Body::LookupDbgsh(CallInsn::Vmmcall), false) => asm!(
                ".p2align 6",
                "lea {name}, [rip + 3f]",
                "mov {saved}, rbx",
                "2:", "xor eax, eax", "mov rbx, {name}", "vmmcall", "dec {n}", "jnz 2b",
                "mov rbx, {saved}",
                "jmp 4f",
                "3: .asciz \"dbgsh\"",
                "4:",
                n = inout(reg) n => _, name = out(reg) _, saved = out(reg) _,
                out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
                options(nostack),
            ),
            (Body::LookupDbgsh(CallInsn::Vmcall), false) => asm!(
                ".p2align 6",
                "lea {name}, [rip + 3f]",
                "mov {saved}, rbx",
                "2:", "xor eax, eax", "mov rbx, {name}", "vmcall", "dec {n}", "jnz 2b",
                "mov rbx, {saved}",
                "jmp 4f",
                "3: .asciz \"dbgsh\"",
                "4:",
                n = inout(reg) n => _, name = out(reg) _, saved = out(reg) _,
                out("rax") _, out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
                options(nostack),
            ),
            (Body::LookupDbgsh(_), true) => asm!(
                ".p2align 6",
                "lea {name}, [rip + 3f]",
                "mov {saved}, rbx",
                "2:", "xor eax, eax", "mov rbx, {name}", "nop", "dec {n}", "jnz 2b",
                "mov rbx, {saved}",
                "jmp 4f",
                "3: .asciz \"dbgsh\"",
                "4:",
                n = inout(reg) n => _, name = out(reg) _, saved = out(reg) _,
                out("rax") _,
                options(nostack, nomem),
            ),
        }
    }
    rdtsc().wrapping_sub(start)
}

/// The cheapest of [`BATCHES`] runs of `iterations`, after a warm-up
/// (first touches of the code page, the TLB).
fn cheapest(body: Body, iterations: u64, nop: bool) -> u64 {
    run_loop(body, 10, nop);
    (0..BATCHES)
        .map(|_| run_loop(body, iterations, nop))
        .min()
        .unwrap_or(0)
}

/// Keeps this thread on CPU 0, so no batch is split by a migration.
fn pin_to_cpu0() -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and
    // sched_setaffinity only read and write the set passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn loops() -> i32 {
    let vmm = match Vmm::get() {
        Ok(vmm) => vmm,
        Err(e) => {
            eprintln!("vmmbench: {e}");
            return status::NO_VMM;
        }
    };
    // The loops assume the lookup answers (they do not check RAX).
    match vmm.lookup(b"dbgsh") {
        Ok(Some(_)) => {}
        Ok(None) => {
            eprintln!("vmmbench: thinvisor has no function named `dbgsh`");
            return status::UNKNOWN_FUNCTION;
        }
        Err(e) => {
            eprintln!("vmmbench: looking up `dbgsh`: {e}");
            return status::FAILED;
        }
    }
    if let Err(e) = pin_to_cpu0() {
        eprintln!("vmmbench: cannot pin to CPU 0: {e}");
        return status::FAILED;
    }
    // Calibration: 2 instructions per iteration, no exit; the xtask checks
    // that the TSC counted one tick per instruction.
    let iterations = 100_000u64;
    let calibration = (0..BATCHES)
        .map(|_| {
            let start = rdtsc();
            // SAFETY: a counted loop that changes only the register given.
            unsafe {
                asm!("2:", "dec {n}", "jnz 2b", n = inout(reg) iterations => _,
                    options(nomem, nostack))
            };
            rdtsc().wrapping_sub(start)
        })
        .min()
        .unwrap_or(0);
    println!(
        "vmmbench: calibration iterations={iterations} ticks={calibration} instructions={}",
        2 * iterations
    );
    for (name, body, iterations) in [
        ("lookup_dbgsh", Body::LookupDbgsh(vmm.insn()), 1_000u64),
        ("cpuid", Body::Cpuid, 2_000u64),
    ] {
        let ticks = cheapest(body, iterations, false);
        let nop_ticks = cheapest(body, iterations, true);
        println!(
            "vmmbench: loop {name} iterations={iterations} ticks={ticks} \
             nop_ticks={nop_ticks} batches={BATCHES}"
        );
    }
    status::OK
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["tsc"] => {
            println!("vmmbench: tsc {}", rdtsc());
            status::OK
        }
        ["loops"] => loops(),
        ["-h"] | ["--help"] => {
            println!("{USAGE}");
            status::OK
        }
        _ => {
            eprintln!("vmmbench: tsc or loops\n{USAGE}");
            status::USAGE
        }
    };
    std::process::exit(code);
}
